"""Per-step cost of the anisotropic losses next to EDM's (method.md §5 "Cost"; issue 11 targets on the CIFAR-10
DDPM++ net at batch 4: stage 2 <= 1.8x EDM per step and <= 1.5x its peak memory, --estimator-every=4 <= 1.2x,
stage 1 <= 1.05x).

One training step = zero_grad, loss on a batch, backward of sum/batch, Adam on phi (and on theta for the plugin).
Every configuration uses the same backbone weights, batch and device. Kinds: edm (EDMLoss), stage1, stage2 (estimator
every step, --hvp=fd), stage2-autograd (the same with --hvp=autograd, the reference), stage2-every4 (--hvp=fd
--estimator-every=4: one timing unit is four steps, one with the estimator and three without, divided by four), and
stage2-ckptN (stage 2 with the fd's second call checkpointing its first N residual blocks, ``fd_checkpoint=N``;
the default is 3). Every other kind uses the loss's defaults.

Time (bench/timing.py): process CPU time on CPU (wall time on CUDA), every kind once per round in rotation, the first
round a warm-up; reported are the median over rounds of each kind's time / EDM's time in the same round, and the
median seconds. Memory: each kind in a fresh process, two units; "peak" is the highest memory during them above the
level after building the net, batch and optimizers (it includes the optimizer state the first step creates), "step"
the peak of the second unit above the level just before it (what a steady step adds: activations, gradients,
estimator).

    python bench/train_step_cost.py --nets=cifar --batch=4 --rounds=5 --threads=1
    python bench/train_step_cost.py --nets=tiny --kinds=edm,stage2 --no-memory
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing                                                 # noqa: E402
from edm_aniso.disc_loss import EnergyDiscLoss                # noqa: E402
from edm_aniso.loss import AnisoStage1Loss, AnisoStage2Loss   # noqa: E402
from edm_aniso.precond import AnisoPrecond                    # noqa: E402
from torch_utils import misc                                  # noqa: E402
from training import networks                                 # noqa: E402
from training.loss import EDMLoss                             # noqa: E402

KINDS = ('edm', 'stage1', 'stage2', 'stage2-every4', 'stage2-autograd')
# Opt-in (--kinds): stage 2 with --objective=energy+disc at its CLI defaults (--disc-substeps=4, --disc-metric=
# denoiser) and --disc-steps=3-18, span 1, 4 and all (docs/discretisation-objective.md "Cost").
DISC_KINDS = {'stage2-disc1': 1, 'stage2-disc4': 4, 'stage2-discall': 'all'}
NETS = {
    'tiny': dict(res=8, kwargs=dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[], dropout=0.0)),
    'cifar': dict(res=32, kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                                      decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                                      model_channels=128, channel_mult=[2, 2, 2], dropout=0.13)),
    # The README's toy runs (bench/toy_runs.py TOY: --arch=ddpmpp --cbase=16 --cres=1,2 at 16x16).
    'toy': dict(res=16, kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                                    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                                    model_channels=16, channel_mult=[1, 2], dropout=0.13)),
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


def _build(kind: str, net_name: str, batch: int, cbase: int | None, device: torch.device
           ) -> tuple[Callable[[], None], int]:
    """(unit(): run one timing unit, steps per unit) for one kind, with the shared backbone weights and batch."""
    res, kwargs, state, extra = _setup(net_name, batch, cbase, device)
    images, labels = extra['_images'], extra['_labels']
    if kind == 'edm':
        net = networks.EDMPrecond(res, 3, label_dim=10, **kwargs)
        loss_fn = EDMLoss()
    else:
        stage = 1 if kind == 'stage1' else 2
        net = AnisoPrecond(res, 3, label_dim=10, stage=stage, subspace='iso' if stage == 1 else 'dct', **kwargs)
        extra_kw = dict(fd_checkpoint=int(kind[len('stage2-ckpt'):])) if kind.startswith('stage2-ckpt') else {}
        if kind in DISC_KINDS:
            loss_fn = EnergyDiscLoss(dict(class_name='edm_aniso.loss.AnisoStage2Loss'), disc_steps='3-18',
                                     disc_substeps=4, disc_span=DISC_KINDS[kind])
        else:
            loss_fn = AnisoStage1Loss() if stage == 1 else AnisoStage2Loss(
                estimator_every=4 if kind == 'stage2-every4' else 1,
                hvp='autograd' if kind == 'stage2-autograd' else 'fd', **extra_kw)
    net.model.load_state_dict(state)
    del state
    net.train().requires_grad_(True).to(device)
    if kind == 'edm':
        opts = [torch.optim.Adam(net.parameters(), lr=1e-5)]
    else:
        opts = [torch.optim.Adam(net.network_parameters(), lr=1e-5),
                torch.optim.Adam(net.schedule_parameters(), lr=1e-4)]
    group = 4 if kind == 'stage2-every4' else 1
    counter = [0]

    def unit() -> None:
        for _ in range(group):
            if hasattr(loss_fn, 'begin_step'):
                loss_fn.begin_step(counter[0])
            counter[0] += 1
            if kind in DISC_KINDS:                 # the disc kinds draw the same K, j in the same round
                torch.manual_seed(counter[0])
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss_fn(net, images, labels).sum().div(images.shape[0]).backward()
            for opt in opts:
                opt.step()

    return unit, group


def _memory_setup(kind: str, net_name: str, batch: int, cbase: int | None, device: str) -> Callable[[], None]:
    return _build(kind, net_name, batch, cbase, torch.device(device))[0]


def measure(net_name: str, batch: int, rounds: int, device: torch.device, cbase: int | None = None,
            threads: int | None = None, memory: bool = True, kinds: tuple[str, ...] = KINDS,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Per kind: median seconds per step and median paired ratio to the first kind ('edm'), timed in rotation in this
    process (no timing when rounds = 0); peak memory (MiB, each kind in its own process) and its ratio to the first
    kind's."""
    if threads is not None:
        torch.set_num_threads(threads)
    per_step: dict[str, list[float]] = {kind: [] for kind in kinds}
    if rounds > 0:
        units = {kind: _build(kind, net_name, batch, cbase, device) for kind in kinds}
        times = timing.rotation({kind: fn for kind, (fn, _) in units.items()}, rounds, device, warmup=1,
                                progress=progress)
        per_step = {kind: [t / units[kind][1] for t in ts] for kind, ts in times.items()}
        del units
    ratios = timing.paired_ratios(per_step, kinds[0])
    rows = []
    for kind in kinds:
        mem = step_mem = float('nan')
        if memory:
            mem, step_mem = timing.peak_memory(_memory_setup, (kind, net_name, batch, cbase, str(device)), device,
                                               threads, calls=2)
            if progress is not None:
                progress(f'memory {kind}: peak {mem:.0f} MiB, step {step_mem:.0f} MiB')
        rows.append(dict(net=net_name, kind=kind, sec=timing.median(per_step[kind]),
                         time_ratio=timing.median(ratios[kind]), ratios=ratios[kind], secs=per_step[kind],
                         mem=mem, step_mem=step_mem))
    for row in rows:
        row['mem_ratio'] = row['mem'] / rows[0]['mem'] if rows[0]['mem'] > 0 else float('nan')
        row['step_mem_ratio'] = row['step_mem'] / rows[0]['step_mem'] if rows[0]['step_mem'] > 0 else float('nan')
    return rows


def table(rows: list[dict[str, Any]], time_label: str) -> str:
    """Markdown table of the measurements (ratios: medians of paired rounds)."""
    out = [f'| net | loss | {time_label} | x EDM (median of paired rounds) | per-round ratios | peak MiB | x EDM | '
           f'step MiB | x EDM |', '|---|---|---:|---:|---|---:|---:|---:|---:|']
    for r in rows:
        out.append(f"| {r['net']} | {r['kind']} | {r['sec']:.3f} | {r['time_ratio']:.3f} | "
                   f"{' '.join(f'{v:.2f}' for v in r['ratios'])} | {r['mem']:.0f} | {r['mem_ratio']:.2f} | "
                   f"{r['step_mem']:.0f} | {r['step_mem_ratio']:.2f} |")
    return '\n'.join(out)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Bar chart of the time and memory ratios to EDMLoss, one group of bars per net."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    nets = list(dict.fromkeys(r['net'] for r in rows))
    kinds = [k for k in dict.fromkeys(r['kind'] for r in rows) if k != 'edm']
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [(axes[0], 'time_ratio', 'CPU time per step / EDMLoss'), (axes[1], 'mem_ratio', 'peak memory / EDMLoss'),
              (axes[2], 'step_mem_ratio', 'memory a steady step adds / EDMLoss')]
    for ax, key, title in panels:
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
@click.option('--nets', help='Comma-separated nets (tiny, cifar, toy)', default='tiny,cifar', show_default=True)
@click.option('--kinds', help=f'Comma-separated losses, the first is the baseline ({", ".join(KINDS)}; '
              'stage2-ckptN: stage 2 with fd_checkpoint=N; opt-in: ' + ', '.join(DISC_KINDS) + ')',
              default=','.join(KINDS), show_default=True)
@click.option('--batch', help='Batch per step', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--rounds', help='Timed rounds (after one warm-up round); 0 = memory only', type=click.IntRange(min=0),
              default=5, show_default=True)
@click.option('--cbase', help='Override model_channels of the cifar net', type=click.IntRange(min=1))
@click.option('--device', help='cpu, cuda, cuda:N  [default: cuda if available]', type=str)
@click.option('--threads', help='CPU threads', type=click.IntRange(min=1))
@click.option('--memory/--no-memory', help='Also measure peak memory (one process per configuration)', default=True,
              show_default=True)
@click.option('--plot', 'plot_path', help='Also write a PNG bar chart of the ratios here', metavar='PNG', type=str)
def main(nets: str, kinds: str, batch: int, rounds: int, cbase: int | None, device: str | None,
         threads: int | None, memory: bool, plot_path: str | None) -> None:
    """Print a markdown table of step time and peak memory per loss, with ratios to the first (EDMLoss)."""
    names = nets.split(',')
    for name in names:
        if name not in NETS:
            raise click.ClickException(f'--nets: unknown net {name!r}; expected {", ".join(NETS)}')
    kind_list = tuple(kinds.split(','))
    for kind in kind_list:
        if kind not in KINDS and kind not in DISC_KINDS and not re.fullmatch(r'stage2-ckpt\d+', kind):
            raise click.ClickException(f'--kinds: unknown loss {kind!r}; expected {", ".join(KINDS + tuple(DISC_KINDS))}'
                                       ' or stage2-ckptN')
    dev = misc.pick_device(device)
    rows = []
    for name in names:
        rows += measure(name, batch, rounds, dev, cbase if name == 'cifar' else None, threads, memory, kind_list,
                        progress=lambda msg, name=name: print(f'[{name}] {msg}', file=sys.stderr, flush=True))
    print(f'device={dev} batch={batch} threads={threads or torch.get_num_threads()} rounds={rounds}'
          + (f' cifar model_channels={cbase}' if cbase else ''))
    print(table(rows, 'wall s/step' if dev.type == 'cuda' else 'CPU s/step'))
    if plot_path:
        plot(rows, plot_path)
        print(f'Wrote {plot_path}')


if __name__ == '__main__':
    main()
