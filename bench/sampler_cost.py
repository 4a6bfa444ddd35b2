"""Per-step cost of aniso_heun against EDM's Heun on the same CIFAR-sized network and batch.

    python bench/sampler_cost.py [--batch=8] [--steps=4] [--rounds=5] [--cbase=128] [--subspace=dct] [--device=cpu]
        [--threads=1] [--memory]

Builds EDM's CIFAR-10 DDPM++ backbone (SongUNet, 32x32, channel_mult 2,2,2, 4 blocks, attention at 16x16) once, wraps
the same weights in an EDMPrecond and in a stage-2 AnisoPrecond (DCT split, random anisotropic schedules), and times
``generate.edm_sampler`` and ``edm_aniso.sampler.aniso_heun`` on identical latents (bench/timing.py): process CPU time
on CPU (wall time on CUDA), both samplers once per round in rotation after a warm-up round. Reported: the median time
per network evaluation (NFE = 2N - 1 for both), the median over rounds of the paired ratio aniso/EDM (target <= 1.05),
and with --memory the peak memory of one sampler call above the loaded network, each sampler in a fresh process.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing   # noqa: E402


def build(cbase: int, subspace: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    from edm_aniso.precond import AnisoPrecond
    from training.networks import EDMPrecond
    kw = dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', embedding_type='positional',
              encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
              model_channels=cbase, channel_mult=[2, 2, 2], dropout=0.13)
    torch.manual_seed(0)
    edm = EDMPrecond(**kw).eval().to(device)
    aniso = AnisoPrecond(stage=2, subspace=subspace, **kw).eval()
    aniso.transfer_from(edm.cpu())
    with torch.no_grad():
        aniso.schedule_h.u.add_(0.3 * torch.randn(aniso.schedule_h.u.shape))
    return edm.to(device), aniso.to(device)


def _latents(batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)


def _samplers(edm: torch.nn.Module, aniso: torch.nn.Module, z: torch.Tensor, num_steps: int
              ) -> dict[str, Callable[[], Any]]:
    import generate
    from edm_aniso.sampler import aniso_heun

    def run(fn, net):
        def call():
            with torch.no_grad():
                return fn(net, z, num_steps=num_steps)
        return call
    return {'EDM Heun': run(generate.edm_sampler, edm), 'aniso_heun': run(aniso_heun, aniso)}


def _memory_setup(name: str, cbase: int, subspace: str, device: str, batch: int, num_steps: int
                  ) -> Callable[[], Any]:
    dev = torch.device(device)
    edm, aniso = build(cbase, subspace, dev)
    return _samplers(edm, aniso, _latents(batch, dev), num_steps)[name]


@click.command()
@click.option('--batch', help='Images per sampler call', metavar='INT', type=click.IntRange(min=1), default=8,
              show_default=True)
@click.option('--steps', 'num_steps', help='Sampler steps N (NFE 2N-1)', metavar='INT', type=click.IntRange(min=2),
              default=4, show_default=True)
@click.option('--rounds', help='Timed rounds of the rotation (after one warm-up round)', metavar='INT',
              type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--cbase', help='Channel multiplier (128 = EDM CIFAR-10)', metavar='INT', type=click.IntRange(min=8),
              default=128, show_default=True)
@click.option('--subspace', help='AnisoPrecond subspace', type=click.Choice(['iso', 'dct']), default='dct',
              show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='DEV', type=str, default=None)
@click.option('--threads', help='CPU threads for torch', metavar='INT', type=click.IntRange(min=1), default=1,
              show_default=True)
@click.option('--memory/--no-memory', help='Also measure peak memory (one process per sampler)', default=False,
              show_default=True)
def main(batch: int, num_steps: int, rounds: int, cbase: int, subspace: str, device: str | None, threads: int,
         memory: bool) -> None:
    """Time aniso_heun against edm_sampler on one network."""
    from torch_utils import misc
    torch.set_num_threads(threads)
    dev = misc.pick_device(device)
    edm, aniso = build(cbase, subspace, dev)
    samplers = _samplers(edm, aniso, _latents(batch, dev), num_steps)
    times = timing.rotation(samplers, rounds, dev, warmup=1,
                            progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    nfe = 2 * num_steps - 1
    ratios = timing.paired_ratios(times, 'EDM Heun')['aniso_heun']
    mem = {name: timing.peak_memory(_memory_setup, (name, cbase, subspace, str(dev), batch, num_steps), dev, threads)
           for name in samplers} if memory else {}
    params = sum(p.numel() for p in edm.parameters())
    clock = 'wall' if dev.type == 'cuda' else 'CPU'
    print(f'_{dev.type}, {params / 1e6:.1f}M parameters, batch {batch}, N = {num_steps} (NFE {nfe}), {threads} '
          f'thread(s), {rounds} rounds; {clock} time of the process_\n')
    print(f'| sampler | median {clock} s/NFE | median ratio to EDM Heun (same round) | ratios |'
          + (' peak MiB |' if memory else ''))
    print('| --- | ---: | ---: | --- |' + (' ---: |' if memory else ''))
    for name, ts in times.items():
        r = timing.paired_ratios(times, 'EDM Heun')[name]
        print(f'| {name} | {timing.median(ts) / nfe:.4f} | {timing.median(r):.3f} | '
              f'{", ".join(f"{v:.3f}" for v in r)} |' + (f' {mem[name][0]:.0f} |' if memory else ''))
    print(f'\n_aniso_heun / EDM Heun: median of paired ratios {timing.median(ratios):.3f}_')


if __name__ == '__main__':
    main()
