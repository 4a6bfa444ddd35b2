"""Cost per network evaluation of the multistep samplers against EDM's Heun on the CIFAR-sized network (CPU time).

    python bench/multistep_cost.py [--batch=8] [--nfe=5] [--rounds=5] [--threads=1]

The network is bench/sampler_cost.py's (EDM's CIFAR-10 DDPM++ SongUNet, 55.7M parameters; the same weights as an
EDMPrecond and as a stage-2 AnisoPrecond with a DCT split and random anisotropic schedules). Samplers at equal NFE:
EDM Heun (``generate.edm_sampler``, N = (NFE + 1)/2), aniso_heun on the AnisoPrecond, and dpmpp_2m, dpmpp_3m, ipndm
(N = NFE) on both networks. Each round runs every sampler once on the same latents, starting one place further in the
list each round; a run's time is the CPU time of the process (``time.process_time``, one thread) divided by the
evaluations a forward hook counted. Reported: the median over rounds of each sampler's time per NFE divided by EDM
Heun's in the same round (target <= 1.03), and the median time per NFE.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def runs(edm: torch.nn.Module, aniso: torch.nn.Module, nfe: int) -> list[tuple[str, torch.nn.Module, object, int]]:
    import generate
    from edm_aniso.multistep import dpmpp_2m, dpmpp_3m, ipndm
    from edm_aniso.sampler import aniso_heun
    heun_steps = (nfe + 1) // 2
    out = [('EDM Heun (EDMPrecond)', edm, generate.edm_sampler, heun_steps),
           ('aniso_heun (AnisoPrecond dct)', aniso, aniso_heun, heun_steps)]
    for name, fn in (('dpmpp_2m', dpmpp_2m), ('dpmpp_3m', dpmpp_3m), ('ipndm', ipndm)):
        out.append((f'{name} (EDMPrecond)', edm, fn, nfe))
        out.append((f'{name} (AnisoPrecond dct)', aniso, fn, nfe))
    return out


def timed(net: torch.nn.Module, fn, z: torch.Tensor, steps: int) -> tuple[float, int]:
    """(CPU seconds of the process, network evaluations) of one sampler call."""
    calls = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    try:
        start = time.process_time()
        with torch.no_grad():
            fn(net, z, num_steps=steps)
        return time.process_time() - start, len(calls)
    finally:
        handle.remove()


@click.command()
@click.option('--batch', help='Images per sampler call', metavar='INT', type=click.IntRange(min=1), default=8,
              show_default=True)
@click.option('--nfe', help='Network evaluations per run (odd, so that Heun reaches it)', metavar='INT',
              type=click.IntRange(min=3), default=5, show_default=True)
@click.option('--rounds', help='Rounds of the rotation', metavar='INT', type=click.IntRange(min=1), default=5,
              show_default=True)
@click.option('--cbase', help='Channel multiplier (128 = EDM CIFAR-10)', metavar='INT', type=click.IntRange(min=8),
              default=128, show_default=True)
@click.option('--threads', help='CPU threads for torch', metavar='INT', type=click.IntRange(min=1), default=1,
              show_default=True)
def main(batch: int, nfe: int, rounds: int, cbase: int, threads: int) -> None:
    """Time the multistep samplers against EDM Heun per network evaluation."""
    if nfe % 2 == 0:
        raise click.ClickException('--nfe must be odd (EDM Heun uses 2N - 1 evaluations)')
    torch.set_num_threads(threads)
    from sampler_cost import build
    edm, aniso = build(cbase, 'dct', torch.device('cpu'))
    z = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    todo = runs(edm, aniso, nfe)
    for _, net, fn, _ in todo:                                      # warm-up
        timed(net, fn, z, 2)
    per_nfe = {name: [] for name, *_ in todo}
    counts = {name: set() for name, *_ in todo}
    for r in range(rounds):
        order = todo[r % len(todo):] + todo[:r % len(todo)]
        for name, net, fn, steps in order:
            seconds, calls = timed(net, fn, z, steps)
            per_nfe[name].append(seconds / calls)
            counts[name].add(calls)
        print(f'round {r + 1}/{rounds} done', file=sys.stderr, flush=True)
    base = per_nfe[todo[0][0]]
    params = sum(p.numel() for p in edm.parameters())
    print(f'_{params / 1e6:.1f}M parameters, batch {batch}, {threads} thread(s), {rounds} rounds; CPU time of the '
          f'process per network evaluation_\n')
    print('| sampler | NFE counted | median s/NFE | median ratio to EDM Heun (same round) | ratios |')
    print('| --- | ---: | ---: | ---: | --- |')
    for name, *_ in todo:
        ratios = [t / b for t, b in zip(per_nfe[name], base)]
        print(f'| {name} | {",".join(str(c) for c in sorted(counts[name]))} | {statistics.median(per_nfe[name]):.4f} '
              f'| {statistics.median(ratios):.3f} | {", ".join(f"{v:.3f}" for v in ratios)} |')


if __name__ == '__main__':
    main()
