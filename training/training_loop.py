"""EDM's training loop (edm-interface.md §2.6) with edm-aniso's additions (docs/architecture.md).

Additions over EDM: a `device` argument (CPU works: gloo, fp32), snapshots and states written atomically, an exact
resume (RNG states, data position and image count travel in the training state as extra keys), a stop with a clear
error when the loss is non-finite for a whole tick, LR decay, a second optimizer for schedule parameters, explicit
gradient sync for losses that need double backward, raw-copied EMA prefixes and a network-defined `--transfer`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import time
from typing import Any, Callable, Optional, Union

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, training_stats


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite during a tick: training stops before that tick writes
    anything, and the message names the newest training state that is still good."""


# ---------------------------------------------------------------------------------------------------------------------
# Small pure helpers (tested on their own)


def batch_layout(batch_size: int, batch_gpu: Optional[int], world_size: int) -> tuple[int, int, int]:
    """EDM's batch arithmetic: (images per rank per step, micro-batch per rank, accumulation rounds).

    The micro-batch is `batch_gpu` capped at the per-rank share; the total must split exactly into
    world_size x rounds x micro-batch, else ValueError.
    """
    if batch_size < 1 or world_size < 1 or (batch_gpu is not None and batch_gpu < 1):
        raise ValueError(f'batch sizes and world size must be positive (batch={batch_size}, batch_gpu={batch_gpu}, '
                         f'world_size={world_size})')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    rounds = batch_gpu_total // batch_gpu if batch_gpu > 0 else 0
    if batch_gpu == 0 or batch_size != batch_gpu * rounds * world_size:
        raise ValueError(f'batch size {batch_size} does not split into {world_size} process(es) x accumulation rounds '
                         f'x per-GPU batch {batch_gpu}; use a --batch divisible by {world_size} x --batch-gpu')
    return batch_gpu_total, batch_gpu, rounds


def lr_multiplier(cur_nimg: float, lr_rampup_kimg: float = 10000, lr_decay_start_kimg: Optional[float] = None,
                  lr_halflife_kimg: Optional[float] = None) -> float:
    """LR factor for the step taken after `cur_nimg` images: EDM's linear ramp min(cur/ramp, 1) (so the first step
    has LR 0), times 0.5^((cur - start) / halflife) once past `lr_decay_start_kimg` (continuous halving; start None
    means 0). Decay is off when `lr_halflife_kimg` is None, whatever the start.
    """
    ramp = min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
    if lr_halflife_kimg is None:
        return ramp
    if lr_halflife_kimg <= 0:
        raise ValueError(f'lr_halflife_kimg must be positive, got {lr_halflife_kimg}')
    start = (lr_decay_start_kimg or 0) * 1000
    return ramp * 0.5 ** (max(cur_nimg - start, 0) / (lr_halflife_kimg * 1000))


def ema_beta(cur_nimg: float, batch_size: int, ema_halflife_kimg: float,
             ema_rampup_ratio: Optional[float] = 0.05) -> float:
    """EDM's EMA decay per step: half-life in images, capped at cur_nimg x ratio during ramp-up (so beta = 0 at
    step 0 and the EMA starts equal to the weights)."""
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float, raw_prefixes: tuple = ()) -> None:
    """theta_ema <- beta theta_ema + (1 - beta) theta for parameters only (buffers keep their values); parameters
    whose names start with one of `raw_prefixes` are copied raw (the plugin's schedules)."""
    for (name, p_ema), p_net in zip(ema.named_parameters(), net.parameters()):
        if raw_prefixes and name.startswith(tuple(raw_prefixes)):
            p_ema.copy_(p_net.detach())
        else:
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))


atomic_write = dnnlib.util.atomic_write   # re-exported: snapshots and states are written through it


def write_file(path: str, write: Callable[[Any], None]) -> None:
    """`atomic_write`, with the path in any OSError (disk full, read-only, permission denied) for a one-line error."""
    try:
        atomic_write(path, write)
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), path) from err


# Keyword arguments of training_loop recorded in every training state (JSON-able): a resume reads the run's seed,
# length and ramps from the state itself, not from a training_options.json that may not have travelled with it.
RECORDED_KWARGS = ('dataset_kwargs', 'network_kwargs', 'loss_kwargs', 'optimizer_kwargs', 'augment_kwargs', 'seed',
                   'batch_size', 'total_kimg', 'ema_halflife_kimg', 'ema_rampup_ratio', 'lr_rampup_kimg',
                   'lr_decay_start_kimg', 'lr_halflife_kimg', 'loss_scaling', 'schedule_optimizer_kwargs')


def _all_finite(modules: list[torch.nn.Module]) -> bool:
    """Whether every parameter and buffer of the modules is finite on every rank (collective)."""
    bad = torch.zeros([], device=dist.device() or 'cpu')
    for module in modules:
        for t in misc.params_and_buffers(module):
            if t.is_floating_point():
                bad = bad + (~torch.isfinite(t.detach())).sum().to(bad.device)
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.SUM)
    return bool(bad == 0)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the loop


class _SkipSampler(torch.utils.data.Sampler):
    """Drops the first `skip` indices of another sampler: resumes a seeded data order where it stopped."""

    def __init__(self, sampler: torch.utils.data.Sampler, skip: int) -> None:
        super().__init__()
        self.sampler = sampler
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def _build_optimizers(net: torch.nn.Module, optimizer_kwargs: dict,
                      schedule_optimizer_kwargs: Optional[dict]) -> list[tuple[torch.optim.Optimizer, float]]:
    """One optimizer over all parameters (EDM), or two: network and schedule parameters (plugin hook).
    Returns (optimizer, base LR) pairs."""
    if schedule_optimizer_kwargs is None:
        opt = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
        return [(opt, optimizer_kwargs['lr'])]
    for method in ('network_parameters', 'schedule_parameters'):
        if not callable(getattr(net, method, None)):
            raise ValueError(f'schedule_optimizer_kwargs needs a network with {method}(); '
                             f'{type(net).__name__} has none')
    opt = dnnlib.util.construct_class_by_name(params=list(net.network_parameters()), **optimizer_kwargs)
    sched = dnnlib.util.construct_class_by_name(params=list(net.schedule_parameters()), **schedule_optimizer_kwargs)
    return [(opt, optimizer_kwargs['lr']), (sched, schedule_optimizer_kwargs['lr'])]


def _rng_state(device: torch.device) -> dict:
    """This process's torch (CPU and CUDA) and numpy RNG states."""
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state())
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def _gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order (collective)."""
    if dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _load_pickle(url: str) -> dict:
    """Load a network pickle, rank 0 first (it may download it into the cache)."""
    if dist.get_rank() != 0:
        dist.barrier()
    with dnnlib.util.open_url(url, verbose=(dist.get_rank() == 0)) as f:
        data = pickle.load(f)
    if dist.get_rank() == 0:
        dist.barrier()
    return data


def transfer_weights(src: torch.nn.Module, net: torch.nn.Module, ema: torch.nn.Module) -> None:
    """`--transfer`: the network's own `transfer_from(src)` if it has one, else EDM's name-matching copy."""
    if callable(getattr(net, 'transfer_from', None)):
        net.transfer_from(src)
        misc.copy_params_and_buffers(src_module=net, dst_module=ema, require_all=True)
    else:
        misc.copy_params_and_buffers(src_module=src, dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=src, dst_module=ema, require_all=False)


def _save_snapshot(path: str, ema: torch.nn.Module, loss_fn: Any, augment_pipe: Any, dataset_kwargs: dict) -> None:
    """EDM network pickle: {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}; modules deep-copied, eval, no grad,
    checked identical across ranks, on CPU. Collective; rank 0 writes."""
    def frozen_cpu_copy(obj: Any) -> Any:
        if not isinstance(obj, torch.nn.Module):
            return obj
        clone = copy.deepcopy(obj).eval().requires_grad_(False)
        misc.check_ddp_consistency(clone)  # every rank must hold the same tensors
        return clone.cpu()

    data = {'ema': frozen_cpu_copy(ema), 'loss_fn': frozen_cpu_copy(loss_fn),
            'augment_pipe': frozen_cpu_copy(augment_pipe), 'dataset_kwargs': dict(dataset_kwargs)}
    if dist.get_rank() == 0:
        write_file(path, lambda f: pickle.dump(data, f))


def _nonfinite_grad_count(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros([])
    return sum((~torch.isfinite(g)).sum() for g in grads)


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def training_loop(
    run_dir: str = '.',                         # output folder (rank 0 writes into it)
    dataset_kwargs: dict = {},                  # training set, for construct_class_by_name
    data_loader_kwargs: dict = {},              # torch.utils.data.DataLoader options
    network_kwargs: dict = {},                  # preconditioner + backbone
    loss_kwargs: dict = {},                     # loss function
    optimizer_kwargs: dict = {},                # optimizer (over network parameters when a schedule optimizer exists)
    augment_kwargs: Optional[dict] = None,      # augmentation pipe, None = off
    seed: int = 0,                              # global seed; each rank derives its own
    batch_size: int = 512,                      # total batch per step, all ranks
    batch_gpu: Optional[int] = None,            # micro-batch cap per rank, None = no cap
    total_kimg: float = 200000,                 # training length in thousands of images
    ema_halflife_kimg: float = 500,             # EMA half-life
    ema_rampup_ratio: Optional[float] = 0.05,   # EMA half-life ramp (fraction of images seen), None = off
    lr_rampup_kimg: float = 10000,              # linear LR ramp length
    lr_decay_start_kimg: Optional[float] = None,  # start of LR halving, None = 0 when a half-life is given
    lr_halflife_kimg: Optional[float] = None,   # LR half-life after the start, None = no decay
    loss_scaling: float = 1,                    # multiplies the loss before backward (never divided out)
    kimg_per_tick: float = 50,                  # progress interval
    snapshot_ticks: Optional[int] = 50,         # snapshot interval in ticks, None = off
    state_dump_ticks: Optional[int] = 500,      # training-state interval in ticks, None = off
    resume_pkl: Optional[str] = None,           # network pickle to start from (transfer, or a resume's snapshot)
    resume_state_dump: Optional[str] = None,    # training-state-*.pt to resume from
    resume_kimg: float = 0,                     # images already seen (when the state does not record them)
    cudnn_benchmark: bool = True,               # torch.backends.cudnn.benchmark
    schedule_optimizer_kwargs: Optional[dict] = None,  # second optimizer over net.schedule_parameters(), None = off
    device: Union[str, torch.device, None] = None,     # None: CUDA if available, else CPU
) -> None:
    """Train a network (EDM's loop, edm-interface.md §2.6); writes snapshots, states, log lines and stats.jsonl.

    A resume whose state has already reached `total_kimg` returns at once and writes nothing (a finished run stays
    finished). A tick in which the loss or the weights become non-finite raises NonFiniteLossError before it writes.
    """
    record = {key: value for key, value in locals().items() if key in RECORDED_KWARGS}
    start_time = time.time()
    device = misc.pick_device(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    np.random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    batch_gpu_total, batch_gpu, num_rounds = batch_layout(batch_size, batch_gpu, world_size)

    # Training state to resume from (read early: it decides where the data order restarts).
    state = None
    if resume_state_dump:
        dist.print0(f'Loading training state from "{resume_state_dump}"...')
        state = torch.load(resume_state_dump, map_location=torch.device('cpu'), weights_only=False)
    exact = state is not None and state.get('world_size') == world_size and 'rng_states' in state
    if state is not None and not exact:
        dist.print0('Note: the training state has no RNG/data position for this process count; '
                    'data order and random draws restart (as in EDM).')

    # Dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed)
    data_position = int(state['data_position']) if exact else 0
    if data_position:
        sampler = _SkipSampler(sampler, data_position)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=sampler, batch_size=batch_gpu,
                                                        **data_loader_kwargs))

    # Network.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                            label_dim=dataset_obj.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    dist.broadcast_(misc.params_and_buffers(net))  # every rank starts from rank 0's weights
    if rank == 0:
        res = net.img_resolution
        probe = [torch.zeros([batch_gpu, net.img_channels, res, res], device=device),  # images
                 torch.ones([batch_gpu], device=device),                              # sigma = 1
                 torch.nn.functional.one_hot(                                          # class 0
                     torch.zeros([batch_gpu], dtype=torch.long, device=device), net.label_dim).float()
                 if net.label_dim else torch.zeros([batch_gpu, 0], device=device)]
        with torch.no_grad():
            misc.print_module_summary(net, probe, max_nesting=2)

    # Loss, optimizers, augmentation, DDP, EMA.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizers = _build_optimizers(net, optimizer_kwargs, schedule_optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    explicit_sync = bool(getattr(loss_fn, 'explicit_grad_sync', False))
    ddp = net
    if world_size > 1 and not explicit_sync:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    raw_prefixes = tuple(getattr(net, 'ema_raw_prefixes', ()))
    begin_step = getattr(loss_fn, 'begin_step', None)

    # Resume or transfer.
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        src = _load_pickle(resume_pkl)['ema']
        if state is None:
            transfer_weights(src, net, ema)
        else:
            misc.copy_params_and_buffers(src_module=src, dst_module=net, require_all=False)
            misc.copy_params_and_buffers(src_module=src, dst_module=ema, require_all=False)
        del src
    cur_nimg = int(resume_kimg * 1000)
    step = cur_nimg // batch_size
    if state is not None:
        misc.copy_params_and_buffers(src_module=state['net'], dst_module=net, require_all=True)
        if 'ema_state' in state:
            ema.load_state_dict(state['ema_state'])
        elif resume_pkl is None:
            raise ValueError(f'{resume_state_dump} holds no EMA weights; pass its network snapshot as resume_pkl')
        optimizers[0][0].load_state_dict(state['optimizer_state'])
        if len(optimizers) > 1:
            if 'schedule_optimizer_state' not in state:
                raise ValueError(f'{resume_state_dump} has no schedule_optimizer_state for the schedule optimizer')
            optimizers[1][0].load_state_dict(state['schedule_optimizer_state'])
        cur_nimg = int(state.get('cur_nimg', cur_nimg))
        step = int(state.get('step', cur_nimg // batch_size))
        if exact:
            _set_rng_state(state['rng_states'][rank], device)
        del state
    if resume_state_dump and cur_nimg >= total_kimg * 1000:
        dist.print0(f'Training already finished: "{resume_state_dump}" is at {cur_nimg / 1000:g} kimg of '
                    f'{total_kimg:g}; nothing to do.')
        return
    last_good_state = resume_state_dump   # named by a NonFiniteLossError

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    all_params = list(net.parameters())
    cur_tick = 0
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    tick_iters = 0
    tick_bad_iters = torch.zeros([], device=device)
    maintenance_time = tick_start_time - start_time
    dist.update_progress(int(cur_nimg // 1000), total_kimg)
    stats_jsonl = None
    training_stats.reset()      # this run's statistics only (an earlier run in this process may have left some behind)
    lrs = [0.0 for _ in optimizers]
    while True:
        # Accumulate gradients.
        if begin_step is not None:
            begin_step(step)
        for opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)
        bad = torch.zeros([], dtype=torch.bool, device=device)
        for round_idx in range(num_rounds):
            with misc.ddp_sync(ddp, round_idx == num_rounds - 1):
                pixels, labels = next(dataset_iterator)
                images = pixels.to(device=device, dtype=torch.float32) / 127.5 - 1   # uint8 -> [-1, 1]
                loss = loss_fn(net=ddp, images=images, labels=labels.to(device), augment_pipe=augment_pipe)
                training_stats.report('Loss/loss', loss)
                loss_sum = loss.sum()
                bad |= ~torch.isfinite(loss_sum.detach())
                loss_sum.mul(loss_scaling / batch_gpu_total).backward()
        data_position += batch_gpu_total
        tick_iters += 1
        tick_bad_iters += bad.float()
        if explicit_sync:
            for p in all_params:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            dist.all_reduce_mean_([p.grad for p in all_params])

        # Update weights.
        mult = lr_multiplier(cur_nimg, lr_rampup_kimg, lr_decay_start_kimg, lr_halflife_kimg)
        lrs = [base_lr * mult for _, base_lr in optimizers]
        for (opt, _), lr in zip(optimizers, lrs):
            for group in opt.param_groups:
                group['lr'] = lr
        training_stats.report('Loss/nonfinite_grad_entries', _nonfinite_grad_count(all_params))
        for p in all_params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        for opt, _ in optimizers:
            opt.step()

        # Update EMA.
        update_ema(ema, net, ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio), raw_prefixes)

        # Maintenance once per tick.
        cur_nimg += batch_size
        step += 1
        done = cur_nimg >= total_kimg * 1000
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue

        # Status line, also reported to training_stats.
        tick_end_time = time.time()
        tick_sec = tick_end_time - tick_start_time
        cuda = device.type == 'cuda'
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
        peak_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0
        report0 = training_stats.report0
        fields = [
            f"tick {report0('Progress/tick', cur_tick):<5d}",
            f"kimg {report0('Progress/kimg', cur_nimg / 1e3):<9.1f}",
            f"time {dnnlib.util.format_time(report0('Timing/total_sec', tick_end_time - start_time)):<12s}",
            f"sec/tick {report0('Timing/sec_per_tick', tick_sec):<7.1f}",
            f"sec/kimg {report0('Timing/sec_per_kimg', tick_sec / (cur_nimg - tick_start_nimg) * 1e3):<7.2f}",
            f"maintenance {report0('Timing/maintenance_sec', maintenance_time):<6.1f}",
            f"cpumem {report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}",
            f"gpumem {report0('Resources/peak_gpu_mem_gb', peak):<6.2f}",
            f"reserved {report0('Resources/peak_gpu_mem_reserved_gb', peak_reserved):<6.2f}",
            f"lr {report0('Progress/lr', lrs[0]):<9.3g}",
        ]
        if len(lrs) > 1:
            fields.append(f"schedule_lr {report0('Progress/schedule_lr', lrs[1]):<9.3g}")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        dist.print0(' '.join(fields))

        # A non-finite loss in any iteration of the tick (on any rank), or non-finite weights, stop training before
        # this tick writes anything.
        counts = torch.stack([tick_bad_iters, torch.tensor(float(tick_iters), device=device)])
        if world_size > 1:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        weights_ok = _all_finite([net, ema])
        if counts[0] > 0 or not weights_ok:
            what = (f'the loss was NaN or infinite in {int(counts[0])} of {int(counts[1])} iteration(s)'
                    if counts[0] > 0 else 'the weights became NaN or infinite')
            good = f'the last good training state is {last_good_state}' if last_good_state else \
                'no training state was written yet'
            raise NonFiniteLossError(
                f'{what} of tick {cur_tick} (kimg {cur_nimg / 1e3:.3f}); stopped without saving this tick; {good}. '
                f'Resume from it with a lower --lr, a different --ls, or --fp16=0.')

        if not done and dist.should_stop():
            done = True
            dist.print0()
            dist.print0('Aborting...')

        # Snapshot (tick 0, every snapshot_ticks ticks, and the end).
        kimg_str = f'{int(cur_nimg // 1000):06d}'
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            _save_snapshot(os.path.join(run_dir or '.', f'network-snapshot-{kimg_str}.pkl'), ema, loss_fn,
                           augment_pipe, dataset_kwargs)

        # Training state (every state_dump_ticks ticks and the end, never at tick 0).
        if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            rng_states = _gather_objects(_rng_state(device))
            if rank == 0:
                data = dict(net=net, optimizer_state=optimizers[0][0].state_dict())
                if len(optimizers) > 1:
                    data['schedule_optimizer_state'] = optimizers[1][0].state_dict()
                data.update(ema_state=ema.state_dict(), cur_nimg=cur_nimg, step=step, seed=seed,
                            world_size=world_size, batch_size=batch_size, data_position=data_position,
                            rng_states=rng_states, training_options=copy.deepcopy(record))
                state_path = os.path.join(run_dir, f'training-state-{kimg_str}.pt')
                write_file(state_path, lambda f: torch.save(data, f))
                last_good_state = state_path
                del data

        # Logs.
        training_stats.default_collector.update()
        if rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            line = dict(training_stats.default_collector.as_dict(), timestamp=time.time())
            stats_jsonl.write(json.dumps(line) + '\n')
            stats_jsonl.flush()
        dist.update_progress(int(cur_nimg // 1000), total_kimg)

        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        tick_iters = 0
        tick_bad_iters.zero_()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Exiting...')
