"""Training statistics with EDM's `torch_utils.training_stats` interface (edm-interface.md §2.7, §7.1).

`report(name, value)` is cheap and may be called anywhere (loss, network, loop): it adds the count, sum and sum of
squares of the reported scalars to a per-name, per-device counter without any host synchronisation. A `Collector`
turns the counters into mean/std over the interval between two `update()` calls; in a multi-process run `update()`
sums the counters of all ranks with one `all_reduce` (gloo works on CPU tensors), so every rank sees the global
statistics. `Collector.as_dict()` has the JSON shape of EDM's `stats.jsonl`: `{name: {num, mean, std}}`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import numpy as np
import torch

import dnnlib

from . import misc

_MOMENTS = 3                      # [count, sum, sum of squares]
_DTYPE = torch.float64            # dtype of the moments and counters

_rank: int = 0                                    # rank of this process
_sync_device: Optional[torch.device] = None       # device used for the cross-rank reduction; None = single process
_sync_called: bool = False                        # has a reduction happened yet (then init is too late)
_counters: dict[str, dict[torch.device, torch.Tensor]] = {}   # name -> device -> moments reported since last sync
_cumulative: dict[str, torch.Tensor] = {}         # name -> moments summed over all syncs (CPU, all ranks)


def init_multiprocessing(rank: int, sync_device: Optional[torch.device]) -> None:
    """Enable cross-rank reduction: call after the process group exists and before the first `Collector.update()`.

    `sync_device` is the device whose tensors the backend can all-reduce (the CUDA device for nccl, the CPU for gloo),
    or None for a single process. Calling it again with the same settings after a reduction is harmless.
    """
    global _rank, _sync_device
    new_device = None if sync_device is None else torch.device(sync_device)
    if _sync_called and (int(rank), new_device) != (_rank, _sync_device):
        raise RuntimeError('training_stats.init_multiprocessing() must be called before the first Collector.update()')
    _rank = int(rank)
    _sync_device = new_device


@misc.profiled_function
def report(name: str, value: Any) -> Any:
    """Add the scalars in `value` (Python number, list, NumPy array or tensor of any shape) to statistic `name`.

    Returns `value` unchanged. Every rank must report every name at least once, in the same order; a rank with
    nothing to add may report an empty list.
    """
    per_device = _counters.setdefault(name, {})
    if isinstance(value, torch.Tensor):
        elems = value
    else:
        try:  # Python numbers and lists keep full precision (torch.as_tensor would round them to float32)
            elems = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError, RuntimeError):
            elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_DTYPE)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    counter = per_device.get(moments.device)
    if counter is None:
        per_device[moments.device] = moments
    else:
        counter.add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """Like `report`, but only rank 0's scalars are counted (other ranks register the name with no scalars)."""
    report(name, value if _rank == 0 else [])
    return value


def _sync(names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Move the pending counters of `names` into the cumulative totals, summing over ranks; return (name, total)."""
    global _sync_called
    if not names:
        return []
    _sync_called = True
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    rows = []
    for name in names:
        row = torch.zeros([_MOMENTS], dtype=_DTYPE, device=device)
        for counter in _counters[name].values():
            row.add_(counter.to(device))
            counter.zero_()
        rows.append(row)
    deltas = torch.stack(rows)
    if _sync_device is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for name, delta in zip(names, deltas):
        _cumulative.setdefault(name, torch.zeros([_MOMENTS], dtype=_DTYPE)).add_(delta)
    return [(name, _cumulative[name]) for name in names]


def reset() -> None:
    """Forget every statistic and the default collector's interval, so that a new run in this process starts from zero.

    The totals are cumulative, so one non-finite value reported by an earlier run in the same process would otherwise
    make every later interval's mean NaN. Collectors other than `default_collector` should be created after it."""
    _counters.clear()
    _cumulative.clear()
    default_collector._seen.clear()
    default_collector._moments.clear()


class Collector:
    """Mean, std and count of each reported statistic over the interval between the last two `update()` calls.

    `regex` selects the names to collect (full match). With `keep_previous=True`, a statistic that received nothing
    during the last interval keeps its previous values; otherwise it reads as num 0, mean/std NaN. A new collector
    only sees values reported after it was created.
    """

    def __init__(self, regex: str = '.*', keep_previous: bool = True) -> None:
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._seen: dict[str, torch.Tensor] = {}     # cumulative totals at the last update()
        self._moments: dict[str, torch.Tensor] = {}  # moments of the last interval
        self.update()
        self._moments.clear()

    def names(self) -> list[str]:
        """Names reported so far that match the regex, in first-report order."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Close the current interval: gather the counters (one all-reduce across ranks) and expose their moments."""
        if not self._keep_previous:
            self._moments.clear()
        for name, total in _sync(self.names()):
            previous = self._seen.setdefault(name, torch.zeros([_MOMENTS], dtype=_DTYPE))
            delta = total - previous
            previous.copy_(total)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _delta(self, name: str) -> torch.Tensor:
        if not self._regex.fullmatch(name):
            raise ValueError(f'statistic {name!r} does not match this collector\'s regex {self._regex.pattern!r}')
        return self._moments.get(name, torch.zeros([_MOMENTS], dtype=_DTYPE))

    def num(self, name: str) -> int:
        """Number of scalars reported for `name` in the last interval."""
        return int(self._delta(name)[0])

    def mean(self, name: str) -> float:
        """Mean of those scalars (NaN if there were none)."""
        count, total, _ = (float(v) for v in self._delta(name))
        return total / count if count else float('nan')

    def std(self, name: str) -> float:
        """Population standard deviation of those scalars (NaN if none or non-finite, 0 for one scalar)."""
        count, total, squares = (float(v) for v in self._delta(name))
        if count == 0 or not math.isfinite(total):
            return float('nan')
        if count == 1:
            return 0.0
        mean = total / count
        return math.sqrt(max(squares / count - mean * mean, 0.0))

    def as_dict(self) -> dnnlib.EasyDict:
        """`{name: {num, mean, std}}` for every collected name (the record written to stats.jsonl)."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in self.names()})

    def __getitem__(self, name: str) -> float:
        """`collector[name]` is `collector.mean(name)`."""
        return self.mean(name)


default_collector = Collector()
