"""Tensor and module helpers with EDM's `torch_utils.misc` interface (edm-interface.md §2.7, §7.1), plus
`pick_device` for the `--device` option (docs/architecture.md, "Device").

Pickled EDM modules (AugmentPipe) import this module and call `constant` at run time, so the names here are part of
the pickle contract.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

import dnnlib

# ---------------------------------------------------------------------------------------------------------------------
# Devices


def pick_device(name: Union[str, torch.device, None] = None) -> torch.device:
    """Resolve a `--device` value: None means 'cuda' when CUDA is available, else 'cpu'.

    Accepts 'cpu', 'cuda', 'cuda:N' and 'mps'; raises ValueError for a name torch does not know or a device this
    machine does not have.
    """
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f'unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps') from err
    if device.type == 'cpu':
        return device
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'device {str(name)!r} requested but CUDA is not available here; use --device=cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f'device {str(name)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist')
        return device
    if device.type == 'mps':
        if not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
            raise ValueError(f'device {str(name)!r} requested but MPS is not available here')
        return device
    raise ValueError(f'unsupported device {str(name)!r}; use cpu, cuda, cuda:N or mps')


# ---------------------------------------------------------------------------------------------------------------------
# Constants, NaN handling, shape checks


_constants: dict[tuple, torch.Tensor] = {}


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Union[str, torch.device, None] = None,
             memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """A cached constant tensor built from `value` (broadcast to `shape` if given).

    The same (value, shape, dtype, device, memory format) returns the same tensor object, so repeated calls inside a
    forward pass (EDM's AugmentPipe) do not copy host data to the device each time. Defaults: the default float dtype,
    the CPU, contiguous layout.
    """
    array = np.asarray(value)
    shape = None if shape is None else tuple(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    key = (array.shape, array.dtype.str, array.tobytes(), shape, dtype, device, memory_format)
    cached = _constants.get(key)
    if cached is None:
        cached = torch.as_tensor(array.copy(), dtype=dtype, device=device)
        if shape is not None:
            cached = torch.broadcast_to(cached, shape)
        cached = cached.contiguous(memory_format=memory_format)
        _constants[key] = cached
    return cached


nan_to_num = torch.nan_to_num  # EDM re-exports it for old torch versions


@contextlib.contextmanager
def suppress_tracer_warnings() -> Iterator[None]:
    """Silence `torch.jit.TracerWarning` inside the block (a filter entry, not catch_warnings, which is not
    thread-safe)."""
    entry = ('ignore', None, torch.jit.TracerWarning, None, 0)
    warnings.filters.insert(0, entry)
    try:
        yield
    finally:
        try:
            warnings.filters.remove(entry)
        except ValueError:
            pass


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Any]) -> None:
    """Raise AssertionError unless `tensor.shape` matches `ref_shape` (None entries match any size).

    Sizes given as tensors (inside `torch.jit.trace`) are checked symbolically with `torch._assert`.
    """
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for dim, (size, ref) in enumerate(zip(tensor.shape, ref_shape)):
        if ref is None:
            continue
        if isinstance(ref, torch.Tensor) or isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                ok = torch.equal(torch.as_tensor(size), torch.as_tensor(ref))
                torch._assert(ok, f'Wrong size for dimension {dim}: expected {ref}')
        elif size != ref:
            raise AssertionError(f'Wrong size for dimension {dim}: got {size}, expected {ref}')


def profiled_function(fn: Callable) -> Callable:
    """Decorator: run `fn` inside `torch.autograd.profiler.record_function(fn.__name__)`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------------------------------------------------
# Infinite data sampler


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices for a DataLoader, split over ranks (EDM's `misc.InfiniteSampler`).

    The global stream walks cyclically over an order that starts as a seeded permutation (`shuffle=True`) and keeps
    changing: after position i is visited, its entry is swapped with one at most `window_size * len(dataset)` places
    behind it. Rank r receives the global items r, r + num_replicas, ... so ranks never share a position and together
    they consume the stream in order. Same seed, same stream; the draws are EDM's, so data order matches EDM's
    (tests/data/edm_sampler_streams.json). Unlike EDM's, it does not pass the dataset to `Sampler.__init__`, which new
    torch rejects.
    """

    def __init__(self, dataset: Any, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5) -> None:
        checks = ((len(dataset) > 0, 'the dataset is empty'),
                  (num_replicas > 0, f'num_replicas must be positive, got {num_replicas}'),
                  (0 <= rank < num_replicas, f'rank must be in [0, {num_replicas}), got {rank}'),
                  (0 <= window_size <= 1, f'window_size must be in [0, 1], got {window_size}'))
        failed = [message for ok, message in checks if not ok]
        if failed:
            raise ValueError('InfiniteSampler: ' + failed[0])
        super().__init__()
        # EDM's attribute names (read by training code and by anything that inspects a DataLoader's sampler).
        vars(self).update(dataset=dataset, rank=rank, num_replicas=num_replicas, shuffle=shuffle, seed=seed,
                          window_size=window_size)

    def _global_stream(self) -> Iterator[int]:
        """Every rank's items interleaved: position p of the order at step p mod n, then the swap of step p."""
        n = len(self.dataset)
        order = np.arange(n)
        if not self.shuffle:
            yield from itertools.cycle(range(n))
        rng = np.random.RandomState(self.seed)
        rng.shuffle(order)
        window = int(np.rint(n * self.window_size))
        for pos in itertools.cycle(range(n)):
            yield int(order[pos])
            if window >= 2:  # a window of 0 or 1 would only ever swap an entry with itself
                behind = (pos - rng.randint(window)) % n
                order[[pos, behind]] = order[[behind, pos]]

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._global_stream(), self.rank, None, self.num_replicas)


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and buffers


def params_and_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """All parameters followed by all buffers of `module`."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'expected a torch.nn.Module, got {type(module).__name__}')
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for all parameters followed by all buffers of `module`."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'expected a torch.nn.Module, got {type(module).__name__}')
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> None:
    """Copy every parameter/buffer of `dst_module` from the tensor of the same name in `src_module`, in place.

    Names missing from the source are left alone unless `require_all=True` (then ValueError). Used by `--transfer`
    and to keep the EMA copy in sync.
    """
    source = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in source:
            if require_all:
                raise ValueError(f'copy_params_and_buffers: source module has no tensor named {name!r}')
            continue
        if source[name].shape != tensor.shape:
            raise ValueError(f'copy_params_and_buffers: shape mismatch for {name!r}: source '
                             f'{list(source[name].shape)}, destination {list(tensor.shape)}')
        tensor.copy_(source[name])


# ---------------------------------------------------------------------------------------------------------------------
# DDP helpers


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Inside the block, a DistributedDataParallel `module` all-reduces gradients only if `sync` (else `no_sync`)."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'expected a torch.nn.Module, got {type(module).__name__}')
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Check that every rank holds the same parameters and buffers as rank 0 (NaN/Inf compare as in `nan_to_num`).

    Tensors whose full name `<ClassName>.<tensor name>` fully matches `ignore_regex` are skipped. Raises
    RuntimeError naming every differing tensor. Without an initialised process group this is a no-op.
    """
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'expected a torch.nn.Module, got {type(module).__name__}')
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    pattern = None if ignore_regex is None else re.compile(ignore_regex)
    mismatched: list[str] = []
    for name, tensor in named_params_and_buffers(module):
        fullname = f'{type(module).__name__}.{name}'
        if pattern is not None and pattern.fullmatch(fullname):
            continue
        local = tensor.detach()
        if local.is_floating_point():
            local = nan_to_num(local)
        if local.dtype == torch.bool:
            local = local.to(torch.uint8)
        reference = local.clone().contiguous()
        dist.broadcast(reference, src=0)
        if not torch.equal(local, reference):
            mismatched.append(fullname)
    if mismatched:  # raised only after the loop, so every rank makes the same number of broadcasts
        raise RuntimeError(f'DDP consistency check failed: {", ".join(mismatched)} differ(s) from rank 0')


# ---------------------------------------------------------------------------------------------------------------------
# Module summary


def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run `module(*inputs)` once and print EDM's table of submodules: parameter and buffer counts, output shape and
    datatype, then a total row. Submodules deeper than `max_nesting` are folded into their parent; with
    `skip_redundant`, rows that add no new parameters, buffers or outputs are dropped. Returns the module's output.
    """
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'expected a torch.nn.Module, got {type(module).__name__}')
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError('print_module_summary cannot hook a ScriptModule')
    if not isinstance(inputs, (tuple, list)):
        raise ValueError('print_module_summary: inputs must be a tuple or list of positional arguments')

    # Record (module, tensor outputs) as each call finishes, for calls at most max_nesting deep.
    records: list[dnnlib.EasyDict] = []
    depth = [0]

    def enter(_mod: torch.nn.Module, _args: Any) -> None:
        depth[0] += 1

    def leave(mod: torch.nn.Module, _args: Any, out: Any) -> None:
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            records.append(dnnlib.EasyDict(mod=mod, outputs=[t for t in outs if isinstance(t, torch.Tensor)]))

    handles = []
    for sub in module.modules():
        handles.append(sub.register_forward_pre_hook(enter))
        handles.append(sub.register_forward_hook(leave))
    try:
        result = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    # Attribute each tensor to the first record (innermost, earliest finished) that owns it.
    seen: set[int] = set()
    for rec in records:
        rec.new_params = [t for t in rec.mod.parameters() if id(t) not in seen]
        rec.new_buffers = [t for t in rec.mod.buffers() if id(t) not in seen]
        rec.new_outputs = [t for t in rec.outputs if id(t) not in seen]
        seen.update(id(t) for t in rec.new_params + rec.new_buffers + rec.new_outputs)
    if skip_redundant:
        records = [r for r in records if r.new_params or r.new_buffers or r.new_outputs]

    # Build and print the table.
    names = {mod: name for name, mod in module.named_modules()}
    header = [type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']
    rule = ['---'] * len(header)
    rows = [header, rule]
    total_params = total_buffers = 0
    for rec in records:
        label = '<top-level>' if rec.mod is module else names.get(rec.mod, type(rec.mod).__name__)
        n_params = sum(t.numel() for t in rec.new_params)
        n_buffers = sum(t.numel() for t in rec.new_buffers)
        total_params += n_params
        total_buffers += n_buffers
        shapes = [str(list(t.shape)) for t in rec.outputs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in rec.outputs] or ['-']
        suffix = ':0' if len(rec.outputs) >= 2 else ''
        rows.append([label + suffix, str(n_params) if n_params else '-', str(n_buffers) if n_buffers else '-',
                     shapes[0], dtypes[0]])
        for k in range(1, len(rec.outputs)):
            rows.append([f'{label}:{k}', '-', '-', shapes[k], dtypes[k]])
    rows += [rule, ['Total', str(total_params), str(total_buffers), '-', '-']]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    print()
    for row in rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
    print()
    return result
