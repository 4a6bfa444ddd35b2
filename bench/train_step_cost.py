"""Per-step cost of the anisotropic losses next to EDM's (method.md §5 "Cost"; issue targets stage1/EDM <= 1.15,
stage2/EDM <= 3.0, stage 2 with --estimator-every=4 <= 1.6).

One training step = zero_grad, loss on a batch, backward of sum/batch, Adam on phi (and on theta for the plugin).
Every configuration uses the same backbone weights, batch and device. Time is the median over steps after warm-up,
the configurations timed round-robin in one process (stage 2 every-4 averages whole groups of four steps: one with
the estimator, three without): wall-clock on CUDA, process CPU time on CPU (robust to other processes sharing the
cores; use --threads=1 for comparable numbers). Memory is measured in a fresh process per configuration: on CUDA the
peak allocated memory of two steps (groups); on CPU the peak rise of the process RSS over its level after building
the net and batch (sampled every 2 ms), i.e. what the first steps add: activations, gradients, optimizer state.

    python bench/train_step_cost.py                       # tiny (8 px) and CIFAR-sized (32 px DDPM++) nets
    python bench/train_step_cost.py --nets=cifar --cbase=64 --batch=8 --device=cpu
"""

from __future__ import annotations

import os
import statistics
import sys
import multiprocessing
import threading
import time
from typing import Any, Callable

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_aniso.loss import AnisoStage1Loss, AnisoStage2Loss   # noqa: E402
from edm_aniso.precond import AnisoPrecond                    # noqa: E402
from torch_utils import misc                                  # noqa: E402
from training import networks                                 # noqa: E402
from training.loss import EDMLoss                             # noqa: E402

NETS = {
    'tiny': dict(res=8, kwargs=dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[], dropout=0.0)),
    'cifar': dict(res=32, kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                                      decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                                      model_channels=128, channel_mult=[2, 2, 2], dropout=0.13)),
}


def _setup(net_name: str, batch: int, cbase: int | None, device: torch.device) -> tuple[int, dict, dict, dict]:
    """(resolution, backbone kwargs, shared backbone weights, shared batch) of one net."""
    spec = NETS[net_name]
    kwargs = dict(spec['kwargs'])
    if cbase is not None:
        kwargs['model_channels'] = cbase
    res = spec['res']
    torch.manual_seed(0)
    state = dict(networks.EDMPrecond(res, 3, label_dim=10, **kwargs).model.state_dict())
    extra = dict(_images=(torch.rand(batch, 3, res, res) * 2 - 1).to(device),
                 _labels=torch.eye(10)[torch.arange(batch) % 10].to(device))
    return res, kwargs, state, extra


class _PeakRSS:
    """Samples the process RSS every 2 ms in a thread; ``stop()`` returns the peak rise over the start (MiB)."""

    def __init__(self) -> None:
        import psutil
        self.proc = psutil.Process(os.getpid())
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return (max(self.peak, self.proc.memory_info().rss) - self.base) / 2**20


def _memory_child(kind: str, net_name: str, batch: int, device_name: str, cbase: int | None, threads: int | None,
                  queue: Any) -> None:
    """Peak memory (MiB) of one kind's steps, in a fresh process."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    step, group = _build_for(kind, net_name, batch, cbase, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    sampler = _PeakRSS() if device.type == 'cpu' else None
    for i in range(2 * group):
        step(i)
    if device.type == 'cuda':
        queue.put(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        queue.put(sampler.stop())


def _build_for(kind: str, net_name: str, batch: int, cbase: int | None, device: torch.device
               ) -> tuple[Callable[[int], None], int]:
    res, kwargs, state, extra = _setup(net_name, batch, cbase, device)
    return _build(kind, res, kwargs, device, state, extra)


def measure(net_name: str, batch: int, steps: int, device: torch.device, cbase: int | None = None,
            threads: int | None = None, memory: bool = True,
            kinds: tuple[str, ...] = ('edm', 'stage1', 'stage2', 'stage2-every4')) -> list[dict[str, Any]]:
    """Seconds per step (all kinds in this process, timed round-robin so that load changes hit all alike) and peak
    memory in MiB (each kind in its own process) on one net, with ratios to the first kind ('edm')."""
    if threads is not None:
        torch.set_num_threads(threads)
    steppers = {kind: _build_for(kind, net_name, batch, cbase, device) for kind in kinds}
    for step, group in steppers.values():                                     # warm-up
        for i in range(group):
            step(i)
    clock = time.perf_counter if device.type == 'cuda' else time.process_time
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for s in range(steps):
        for kind, (step, group) in steppers.items():
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t0 = clock()
            for i in range(group):
                step((s + 1) * group + i)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            times[kind].append((clock() - t0) / group)
    del steppers
    rows = []
    ctx = multiprocessing.get_context('spawn')
    for kind in kinds:
        mem = float('nan')
        if memory:
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(kind, net_name, batch, str(device), cbase, threads, queue))
            proc.start()
            mem = queue.get()
            proc.join()
        rows.append(dict(net=net_name, kind=kind, sec=statistics.median(times[kind]), mem=mem))
    base = rows[0]
    for row in rows:
        row['time_ratio'] = row['sec'] / base['sec']
        row['mem_ratio'] = row['mem'] / base['mem'] if base['mem'] > 0 else float('nan')
    return rows


def _build(kind: str, res: int, kwargs: dict, device: torch.device, state: dict, extra: dict
           ) -> tuple[Callable[[int], None], int]:
    """(step(i), steps per timing group) for one loss kind, with the shared backbone weights and batch."""
    model_state = dict(state)
    model_state.update(extra)
    images, labels = model_state.pop('_images'), model_state.pop('_labels')
    if kind == 'edm':
        net = networks.EDMPrecond(res, 3, label_dim=10, **kwargs)
        loss_fn, opts = EDMLoss(), None
    else:
        stage = 1 if kind == 'stage1' else 2
        net = AnisoPrecond(res, 3, label_dim=10, stage=stage, subspace='iso' if stage == 1 else 'dct', **kwargs)
        loss_fn = AnisoStage1Loss() if stage == 1 else AnisoStage2Loss(estimator_every=4 if kind.endswith('4') else 1)
    net.model.load_state_dict(model_state)
    net.train().requires_grad_(True).to(device)
    if kind == 'edm':
        opts = [torch.optim.Adam(net.parameters(), lr=1e-5)]
    else:
        opts = [torch.optim.Adam(net.network_parameters(), lr=1e-5),
                torch.optim.Adam(net.schedule_parameters(), lr=1e-4)]

    def step(i: int) -> None:
        if hasattr(loss_fn, 'begin_step'):
            loss_fn.begin_step(i)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss_fn(net, images, labels).sum().div(images.shape[0]).backward()
        for opt in opts:
            opt.step()

    return step, 4 if kind == 'stage2-every4' else 1


def table(rows: list[dict[str, Any]], time_label: str, mem_label: str) -> str:
    """Markdown table of the measurements."""
    out = [f'| net | loss | {time_label} | x EDM | {mem_label} | x EDM |', '|---|---|---:|---:|---:|---:|']
    for r in rows:
        out.append(f"| {r['net']} | {r['kind']} | {r['sec']:.4f} | {r['time_ratio']:.2f} | {r['mem']:.1f} | "
                   f"{r['mem_ratio']:.2f} |")
    return '\n'.join(out)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Bar chart of the time and memory ratios to EDMLoss, one group of bars per net."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    nets = list(dict.fromkeys(r['net'] for r in rows))
    kinds = [k for k in dict.fromkeys(r['kind'] for r in rows) if k != 'edm']
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in [(axes[0], 'time_ratio', 'step time / EDMLoss'), (axes[1], 'mem_ratio', 'peak memory / EDMLoss')]:
        width = 0.8 / max(len(kinds), 1)
        for i, kind in enumerate(kinds):
            values = [next((r[key] for r in rows if r['net'] == n and r['kind'] == kind), float('nan')) for n in nets]
            ax.bar([j + i * width for j in range(len(nets))], values, width, label=kind)
        ax.axhline(1.0, color='k', lw=0.8)
        ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(nets))], nets)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option('--nets', help='Comma-separated nets (tiny, cifar)', default='tiny,cifar', show_default=True)
@click.option('--batch', help='Batch per step', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--steps', help='Timed steps (groups of 4 for every-4)', type=click.IntRange(min=1), default=5,
              show_default=True)
@click.option('--cbase', help='Override model_channels of the cifar net', type=click.IntRange(min=1))
@click.option('--device', help='cpu, cuda, cuda:N  [default: cuda if available]', type=str)
@click.option('--threads', help='CPU threads', type=click.IntRange(min=1))
@click.option('--memory/--no-memory', help='Also measure peak memory (one process per configuration)', default=True,
              show_default=True)
@click.option('--plot', 'plot_path', help='Also write a PNG bar chart of the ratios here', metavar='PNG', type=str)
def main(nets: str, batch: int, steps: int, cbase: int | None, device: str | None, threads: int | None,
         memory: bool, plot_path: str | None) -> None:
    """Print a markdown table of step time and peak memory per loss, with ratios to EDMLoss."""
    dev = misc.pick_device(device)
    rows = []
    for name in nets.split(','):
        if name not in NETS:
            raise click.ClickException(f'--nets: unknown net {name!r}; expected {", ".join(NETS)}')
        rows += measure(name, batch, steps, dev, cbase if name == 'cifar' else None, threads, memory)
    mem_label = 'peak MiB' if dev.type == 'cuda' else 'peak RSS +MiB'
    print(f'device={dev} batch={batch} threads={threads or torch.get_num_threads()}'
          + (f' cifar model_channels={cbase}' if cbase else ''))
    print(table(rows, 'wall s/step' if dev.type == 'cuda' else 'CPU s/step', mem_label))
    if plot_path:
        plot(rows, plot_path)
        print(f'Wrote {plot_path}')


if __name__ == '__main__':
    main()
