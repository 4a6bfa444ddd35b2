"""Per-step cost of aniso_heun against EDM's Heun on the same CIFAR-sized network and batch.

    python bench/sampler_cost.py [--batch=8] [--steps=4] [--repeats=3] [--cbase=128] [--subspace=dct] [--device=cpu]
        [--threads=1]

Builds EDM's CIFAR-10 DDPM++ backbone (SongUNet, 32x32, channel_mult 2,2,2, 4 blocks, attention at 16x16) once, wraps the
same weights in an EDMPrecond and in a stage-2 AnisoPrecond (DCT split, random anisotropic schedules), and times
``generate.edm_sampler`` and ``edm_aniso.sampler.aniso_heun`` alternately on identical latents. Reports the minimum over
repeats of the time per network evaluation (NFE = 2N − 1 for both) and the ratio aniso/EDM (target ≤ 1.05).
"""

from __future__ import annotations

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
    return time.perf_counter() - start


@click.command()
@click.option('--batch', help='Images per sampler call', metavar='INT', type=click.IntRange(min=1), default=8,
              show_default=True)
@click.option('--steps', 'num_steps', help='Sampler steps N (NFE 2N-1)', metavar='INT', type=click.IntRange(min=2),
              default=4, show_default=True)
@click.option('--repeats', help='Timed runs per sampler (min is reported)', metavar='INT', type=click.IntRange(min=1),
              default=3, show_default=True)
@click.option('--cbase', help='Channel multiplier (128 = EDM CIFAR-10)', metavar='INT', type=click.IntRange(min=8),
              default=128, show_default=True)
@click.option('--subspace', help='AnisoPrecond subspace', type=click.Choice(['iso', 'dct']), default='dct',
              show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='DEV', type=str, default=None)
@click.option('--threads', help='CPU threads for torch  [default: torch\'s choice]', metavar='INT',
              type=click.IntRange(min=1), default=None)
def main(batch: int, num_steps: int, repeats: int, cbase: int, subspace: str, device: str | None,
         threads: int | None) -> None:
    """Time aniso_heun against edm_sampler on one network."""
    if threads is not None:
        torch.set_num_threads(threads)
    import generate
    from edm_aniso.sampler import aniso_heun
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    edm, aniso = build(cbase, subspace, dev)
    z = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    nfe = 2 * num_steps - 1
    timed(generate.edm_sampler, edm, z, num_steps=2)                # warm-up
    timed(aniso_heun, aniso, z, num_steps=2)
    t_edm, t_aniso = [], []
    for _ in range(repeats):
        sync()
        t_edm.append(timed(generate.edm_sampler, edm, z, num_steps=num_steps))
        sync()
        t_aniso.append(timed(aniso_heun, aniso, z, num_steps=num_steps))
        sync()
    e, a = min(t_edm) / nfe, min(t_aniso) / nfe
    params = sum(p.numel() for p in edm.parameters())
    print(f'| device | params | batch | N (NFE) | EDM Heun s/NFE | aniso_heun ({subspace}) s/NFE | ratio |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    print(f'| {dev.type} | {params / 1e6:.1f}M | {batch} | {num_steps} ({nfe}) | {e:.4f} | {a:.4f} | {a / e:.3f} |')
    pairs = sorted(b / a for a, b in zip(t_edm, t_aniso))
    print(f'_median of paired ratios (aniso run / the EDM run just before it): {pairs[len(pairs) // 2]:.3f}_')
    print(f'_all runs (s): EDM {", ".join(f"{t:.2f}" for t in t_edm)}; aniso {", ".join(f"{t:.2f}" for t in t_aniso)}_')


if __name__ == '__main__':
    main()
