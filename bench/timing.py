"""Timing and memory helpers shared by the cost benchmarks (bench/train_step_cost.py, bench/sampler_cost.py).

Time is the CPU time of this process (``time.process_time``: user + system of all its threads), which other processes
on a shared machine do not inflate the way they inflate wall time; on CUDA, wall time between synchronisations.
Candidates are timed in rotation: each round runs every candidate once, starting one place further along the list
than the round before, and each candidate's time in a round is divided by the baseline's time in the same round
(paired ratios); reported are medians over rounds.

Peak memory is measured in a fresh process per candidate (``peak_memory``): on CPU the peak resident set size during
the work (the kernel's high-water mark, reset after the set-up) minus the resident size after the set-up, with glibc
told to map every allocation over 64 KiB separately (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident
set at once instead of lingering in the heap; on CUDA ``torch.cuda.max_memory_allocated`` over the work minus the
allocation after the set-up. Both are reported for the whole run and for its last call alone (``peak_memory``).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

MMAP_THRESHOLD = 65536


def clock(device: torch.device) -> Callable[[], float]:
    """The clock of the module docstring for ``device`` (synchronising first on CUDA)."""
    if torch.device(device).type == 'cuda':
        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return wall
    return time.process_time


def rotation(candidates: dict[str, Callable[[], Any]], rounds: int, device: torch.device = torch.device('cpu'),
             warmup: int = 1, progress: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one value per round, timed in rotation (the first ``warmup`` rounds are
    run but not kept)."""
    now = clock(device)
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = now()
            candidates[name]()
            dt = now() - t0
            if r >= warmup:
                times[name].append(dt)
        if progress is not None:
            progress(f'round {r + 1 - warmup}/{rounds}' if r >= warmup else f'warm-up {r + 1}/{warmup}')
    return times


def paired_ratios(times: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per-round ratio of each candidate's time to the baseline's time in the same round."""
    return {name: [t / b for t, b in zip(ts, times[base])] for name, ts in times.items()}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if len(values) else float('nan')


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory in a fresh process.


def _status_kib(field: str) -> int:
    with open('/proc/self/status', 'r', encoding='ascii') as f:
        return int(re.search(rf'^{field}:\s+(\d+)\s+kB', f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _child(setup: Callable[..., Callable[[], Any]], args: tuple, device: str, threads: Optional[int],
           calls: int, queue: Any) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        dev = torch.device(device)
        work = setup(*args)
        cuda = dev.type == 'cuda'

        def level() -> float:                       # bytes now
            if cuda:
                torch.cuda.synchronize(dev)
                return float(torch.cuda.memory_allocated(dev))
            return _status_kib('VmRSS') * 1024.0

        def reset() -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            elif not _reset_peak_rss():
                raise RuntimeError('cannot reset the peak RSS (/proc/self/clear_refs)')

        def peak() -> float:                        # bytes, since the last reset
            if cuda:
                torch.cuda.synchronize(dev)
                return float(torch.cuda.max_memory_allocated(dev))
            return _status_kib('VmHWM') * 1024.0

        base = level()
        reset()
        for _ in range(calls - 1):
            work()
        before_last = level()
        first_peak = peak()
        reset()
        work()
        last_peak = peak()
        queue.put(('ok', ((max(first_peak, last_peak) - base) / 2**20, (last_peak - before_last) / 2**20)))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put(('error', repr(err)))


def peak_memory(setup: Callable[..., Callable[[], Any]], args: tuple = (), device: torch.device = torch.device('cpu'),
                threads: Optional[int] = None, calls: int = 2) -> tuple[float, float]:
    """Peak memory in MiB of ``calls`` calls of ``work = setup(*args)``, in a fresh (spawned) process: (the peak over
    all calls above the level after the set-up, the peak of the last call above the level just before it). For a
    training step the first includes what the first step leaves behind (optimizer state), the second is what a steady
    step adds transiently (activations, gradients, estimator). ``setup`` must be a module-level function."""
    if calls < 2:
        raise ValueError('peak_memory needs calls >= 2')
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    old = os.environ.get('MALLOC_MMAP_THRESHOLD_')
    os.environ['MALLOC_MMAP_THRESHOLD_'] = str(MMAP_THRESHOLD)
    try:
        proc = ctx.Process(target=_child, args=(setup, args, str(device), threads, calls, queue))
        proc.start()
    finally:
        if old is None:
            os.environ.pop('MALLOC_MMAP_THRESHOLD_', None)
        else:
            os.environ['MALLOC_MMAP_THRESHOLD_'] = old
    status, value = queue.get()
    proc.join()
    if status != 'ok':
        raise RuntimeError(f'memory child failed: {value}')
    return float(value[0]), float(value[1])
