"""Process-group start-up and rank helpers with EDM's `torch_utils.distributed` interface (edm-interface.md §1.1).

`init()` reads torchrun's environment (defaults make a plain `python script.py` one process), uses `gloo` on CPU and
`nccl` on CUDA, and skips `init_process_group` entirely for a single process, so single-process runs never bind a
port. Every helper here works whether or not a process group exists.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Any, Iterable, Optional, Union

import torch

from . import misc, training_stats

# torchrun's variables and the defaults EDM fills in when they are unset.
_ENV_DEFAULTS = {'MASTER_ADDR': 'localhost', 'MASTER_PORT': '29500', 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1'}

_device: Optional[torch.device] = None
_watcher: Optional[threading.Thread] = None


def _set_watcher(thread: Optional[threading.Thread]) -> None:
    global _watcher
    _watcher = thread


def watch_parent(poll_s: float = 1.0) -> Optional[threading.Thread]:
    """Exit this process (status 1) soon after its parent dies; started by `init()` under torchrun.

    A worker whose torchrun agent is killed (kill -9, a lost node) is re-parented, and until now trained on, or sat in
    a collective forever, holding its GPU. A daemon thread polls the parent pid every `poll_s` seconds; when it has
    changed, it prints one line and calls `os._exit(1)` (an atomic write in progress leaves only a temporary file,
    which train.py removes at its next start). Returns the thread, or None when the parent is already init.
    """
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f'rank {get_rank()}: the launching process (pid {parent}) is gone; exiting.', file=sys.stderr,
              flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name='watch-parent', daemon=True)
    thread.start()
    return thread


def init(device: Union[str, torch.device, None] = None, timeout: Optional[float] = None) -> torch.device:
    """Set up this process for (possibly) distributed work and return its device.

    `device` is resolved with `misc.pick_device` (None: CUDA if available, else CPU); on CUDA the index becomes
    LOCAL_RANK unless one was given. With WORLD_SIZE > 1 the default process group is created from the environment
    (`env://`) with backend `gloo` (CPU) or `nccl` (CUDA); `timeout` (seconds, None = torch's default) bounds every
    collective, so that a frozen rank fails the others instead of hanging them. Under torchrun
    (TORCHELASTIC_RUN_ID set) the process exits when the agent dies (`watch_parent`). `training_stats` is told to
    reduce across ranks on this device.
    """
    global _device
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    world_size = int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ['LOCAL_RANK'])

    dev = misc.pick_device(device)
    if dev.type == 'cuda':
        if dev.index is None:
            dev = misc.pick_device(f'cuda:{local_rank}')
        torch.cuda.set_device(dev)
    _device = dev

    if world_size > 1 and not is_initialized():
        if not torch.distributed.is_available():
            raise ValueError(f'WORLD_SIZE={world_size} but this torch build has no torch.distributed support')
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        extra = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=float(timeout)))
        torch.distributed.init_process_group(backend=backend, init_method='env://', **extra)
    if 'TORCHELASTIC_RUN_ID' in os.environ and _watcher is None:
        _set_watcher(watch_parent())

    training_stats.init_multiprocessing(rank=get_rank(), sync_device=dev if get_world_size() > 1 else None)
    return dev


def device() -> Optional[torch.device]:
    """The device chosen by `init()`, or None before it is called."""
    return _device


def is_initialized() -> bool:
    """True when a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def should_stop() -> bool:
    """Hook for cluster schedulers that want the training loop to stop early; never true here (as in EDM)."""
    return False


def update_progress(cur: int, total: int) -> None:
    """Hook for progress reporting to a cluster scheduler; does nothing here (as in EDM)."""
    _ = cur, total


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


def _as_list(tensors: Union[torch.Tensor, Iterable[Optional[torch.Tensor]]]) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return [t for t in tensors if t is not None]


@torch.no_grad()
def all_reduce_mean_(tensors: Union[torch.Tensor, Iterable[Optional[torch.Tensor]]]) -> None:
    """Replace each floating-point tensor by its average over all ranks, in place (None entries are skipped).

    Tensors are flattened into one buffer per (dtype, device) so a whole model's gradients cost one all-reduce each.
    No-op for one process.
    """
    items = _as_list(tensors)
    for t in items:
        if not t.is_floating_point():
            raise ValueError(f'all_reduce_mean_ needs floating-point tensors, got {t.dtype}')
    world_size = get_world_size()
    if world_size == 1 or not items:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in items:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world_size)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def broadcast_(tensors: Union[torch.Tensor, Iterable[Optional[torch.Tensor]]], src: int = 0) -> None:
    """Overwrite each tensor with rank `src`'s copy, in place (None entries are skipped; no-op for one process)."""
    if get_world_size() == 1:
        return
    for t in _as_list(tensors):
        if t.dtype == torch.bool:  # not every backend broadcasts bool
            tmp = t.to(torch.uint8)
            torch.distributed.broadcast(tmp, src=src)
            t.copy_(tmp.bool())
        elif t.is_contiguous():
            torch.distributed.broadcast(t, src=src)
        else:
            tmp = t.contiguous()
            torch.distributed.broadcast(tmp, src=src)
            t.copy_(tmp)
