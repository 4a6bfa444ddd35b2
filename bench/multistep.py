"""Multistep samplers (dpmpp_2m, dpmpp_3m, ipndm) against EDM Heun and aniso_heun, on the EDM path and on learned
anisotropic paths, with the exact denoiser (method.md §9.6), at every NFE from 3 to 35.

    python bench/multistep.py [--out=bench/multistep.png] [--train-steps=200] [--samples=4096] [--quick]

Data and schedules as in bench/exact_gaussian.py (its helpers are imported): 1x16x16 and 3x32x32 Gaussians diagonal
in the DCT basis with a 1/f² spectrum, and the 1x16x16 mixture of 8 Gaussians; stage-2 (g, h) on the DCT split trained
with edm_aniso.loss's estimator ("est") and on the exact stage-2 objective ("exact"), from a stage-1 g.

- Gaussians: the exact Fréchet distance of each sampler's output (run once on the latent whose DCT coefficients are
  all one: every step is linear per coefficient).
- Mixture: FD between Gaussians fitted to the outputs of ``--samples`` latents and to a fine solve of the same latents
  on the same path (aniso_heun, 2·512 − 1 NFE; each path's exact ODE map pushes the latents to the data, so the FD to
  it measures the sampler's error, with the latents' noise largely cancelled). Standard errors: delete-a-group
  jackknife over 16 groups of latents. The fine solve's own error is shown as the FD between it and the same solve
  at half the steps.
- Orders: error of the output coefficients against the exact solve (edm_aniso.gaussian.exact_denoised_gain) on the
  1x16x16 Gaussian as N doubles from 32 to 256 (least-squares slope), including the common forms this project does
  not use (k-diffusion's 3M coefficient, iPNDM's fixed weights, iPNDM interpolated in sigma).

Every cell's NFE is counted with the oracle's call counter; a cell whose count differs from its row is marked [n].
Heun (EDM's and aniso_heun) exists only at odd NFE (2N − 1).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from edm_aniso import gaussian as G                                   # noqa: E402
from edm_aniso.multistep import dpmpp_2m, dpmpp_3m, ipndm             # noqa: E402
from edm_aniso.path import noise_path                                # noqa: E402
from edm_aniso.sampler import aniso_heun                             # noqa: E402
from exact_gaussian import gain_fd, trained_schedules, unit_latent   # noqa: E402

NFES = list(range(3, 36))
REF_STEPS = 512            # the mixture's fine solve: aniso_heun with 2·512 − 1 NFE on each path
GROUPS = 16                # jackknife groups of latents
PATHS = {'EDM': None, 'est': 'stage2_est', 'exact': 'stage2_exact'}
PATH_NAMES = {'EDM': 'EDM path (isotropic)', 'est': 'stage 2, loss.py estimator', 'exact': 'stage 2, exact objective'}


def _heun(net, latents, num_steps):
    """EDM's Heun on the EDM path (generate.edm_sampler, as EDM users run it); aniso_heun on learned paths."""
    if getattr(net, 'schedule_g', None) is None:
        import generate
        return generate.edm_sampler(net, latents, num_steps=num_steps)
    return aniso_heun(net, latents, num_steps=num_steps)


SAMPLERS: dict[str, tuple[Callable, Callable[[int], int | None]]] = {   # name: (sampler, NFE -> num_steps or None)
    'Heun': (_heun, lambda nfe: (nfe + 1) // 2 if nfe % 2 == 1 else None),
    '2M': (dpmpp_2m, lambda nfe: nfe),
    '3M': (dpmpp_3m, lambda nfe: nfe),
    'iPNDM': (ipndm, lambda nfe: nfe),
}
VARIANTS: dict[str, Callable] = {                                      # forms kept for comparison (EDM path)
    '3M, k-diffusion coefficient': lambda net, z, num_steps: dpmpp_3m(net, z, num_steps=num_steps,
                                                                      second_difference=0.5),
    'iPNDM, fixed weights': lambda net, z, num_steps: ipndm(net, z, num_steps=num_steps, fixed_weights=True),
    'iPNDM, interpolated in sigma': lambda net, z, num_steps: ipndm(net, z, num_steps=num_steps, variable='sigma'),
}


def oracle(dist, mask, schedules, key) -> G.OracleNet:
    if key is None:
        return G.OracleNet(dist)
    sg, sh = schedules[key]
    return G.OracleNet(dist, subspace=G.MaskedDCTSubspace(mask), schedule_g=sg, schedule_h=sh)


def counted(fn: Callable, net: G.OracleNet, latents: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, int]:
    net.calls = 0
    out = fn(net, latents, num_steps=num_steps)
    return out, net.calls


# ----------------------------------------------------------------------------------------------------------------------
# Gaussians (exact FD) and orders.


def gaussian_table(lam, mask, schedules, nfes, log) -> dict:
    """{column: {nfe: (fd, counted nfe)}} with columns 'path: sampler'."""
    c, res, _ = lam.shape
    dist, z = G.DCTGaussian(lam), unit_latent(c, res)
    cols = {}
    for pname, key in PATHS.items():
        net = oracle(dist, mask, schedules, key)
        for sname, (fn, steps) in SAMPLERS.items():
            cells = {}
            for nfe in nfes:
                if steps(nfe) is not None:
                    out, calls = counted(fn, net, z, steps(nfe))
                    cells[nfe] = (gain_fd(lam, G.to_dct(out)[0]), calls)
            cols[f'{pname}: {sname}'] = cells
        log(f'  {pname} path done')
    return cols


def observed_orders(lam, mask, schedules, steps=(32, 64, 128, 256)) -> dict:
    """{(path, sampler): (slope, [errors])} on the Gaussian, error = max relative coefficient error vs the exact solve."""
    c, res, _ = lam.shape
    dist, z = G.DCTGaussian(lam), unit_latent(c, res)
    out = {}
    runs = [(p, s, SAMPLERS[s][0]) for p in ('EDM', 'est') for s in ('2M', '3M', 'iPNDM')]
    runs += [('EDM', name, fn) for name, fn in VARIANTS.items()] + [('EDM', 'Heun', _heun), ('est', 'Heun', _heun)]
    for pname, sname, fn in runs:
        net = oracle(dist, mask, schedules, PATHS[pname])
        lev = noise_path(net, None, z).grid(2, 'karras')
        ref = G.exact_denoised_gain(lam, mask, (lev.a[0, 0], lev.b[0, 0]), (lev.a[0, 1], lev.b[0, 1]))
        n_of = (lambda n: n // 2) if sname == 'Heun' else (lambda n: n)    # Heun: N levels for 2N - 1 NFE
        errs = [((G.to_dct(fn(net, z, num_steps=n_of(n)))[0] - ref).abs() / ref.abs()).max().item() for n in steps]
        out[(pname, sname)] = (-np.polyfit(np.log(steps), np.log(errs), 1)[0], errs)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Mixture (sampled FD with jackknife standard errors).


def mixture(lam: torch.Tensor, seed: int = 7) -> tuple[G.DCTGaussianMixture, torch.Generator]:
    """8 equal-weight Gaussians, means ~ N(0, 0.6 Λ), covariance 0.4 Λ (bench/exact_gaussian.py's mixture)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn([8, *lam.shape], dtype=torch.float64, generator=gen) * (0.6 * lam).sqrt()
    return G.DCTGaussianMixture(means, 0.4 * lam), gen


class Moments:
    """Per-group sums of x and x xᵀ of a sample set, for the full FD and its leave-one-group-out values."""

    def __init__(self, x: torch.Tensor, groups: int) -> None:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        parts = flat.chunk(groups)
        self.n = torch.tensor([p.shape[0] for p in parts], dtype=torch.float64)
        self.s1 = torch.stack([p.sum(0) for p in parts])
        self.s2 = torch.stack([p.T @ p for p in parts])

    def gaussian(self, leave: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.ones(len(self.n), dtype=torch.bool)
        if leave is not None:
            keep[leave] = False
        n, s1, s2 = self.n[keep].sum(), self.s1[keep].sum(0), self.s2[keep].sum(0)
        mu = s1 / n
        return mu, (s2 - n * torch.outer(mu, mu)) / (n - 1)


def fd_jackknife(a: Moments, b: Moments) -> tuple[float, np.ndarray]:
    """(FD of the full sets, leave-one-group-out FDs)."""
    full = G.frechet_gaussians(*a.gaussian(), *b.gaussian())
    loo = np.array([G.frechet_gaussians(*a.gaussian(g), *b.gaussian(g)) for g in range(len(a.n))])
    return full, loo


def jackknife_se(loo: np.ndarray) -> float:
    k = len(loo)
    return float(math.sqrt((k - 1) / k * ((loo - loo.mean()) ** 2).sum()))


def mixture_table(lam, mask, schedules, nfes, n_samples, log) -> tuple[dict, dict]:
    """({column: {nfe: (fd, counted nfe, leave-one-out FDs)}}, {path: fine-solve check FD})."""
    dist, gen = mixture(lam)
    c, res, _ = lam.shape
    z = torch.randn([n_samples, c, res, res], dtype=torch.float64, generator=gen)
    cols, checks, refs = {}, {}, {}
    for pname, key in PATHS.items():
        net = oracle(dist, mask, schedules, key)
        t0 = time.time()
        ref = refs[pname] = aniso_heun(net, z, num_steps=REF_STEPS)
        half = aniso_heun(net, z, num_steps=REF_STEPS // 2)
        ref_m = Moments(ref, GROUPS)
        checks[pname] = G.frechet_samples(half, ref)
        log(f'  mixture {pname}: fine solve {time.time() - t0:.0f} s, FD(half-step solve, fine) = {checks[pname]:.2e}')
        samplers = dict((s, SAMPLERS[s]) for s in SAMPLERS)
        if pname == 'EDM':
            samplers.update({v: (fn, lambda nfe: nfe) for v, fn in VARIANTS.items()})
        for sname, (fn, steps) in samplers.items():
            cells = {}
            for nfe in nfes:
                if steps(nfe) is not None:
                    out, calls = counted(fn, net, z, steps(nfe))
                    fd, loo = fd_jackknife(Moments(out, GROUPS), ref_m)
                    cells[nfe] = (fd, calls, loo)
            cols[f'{pname}: {sname}'] = cells
        log(f'  mixture {pname} path done ({time.time() - t0:.0f} s)')
    checks['independent data samples vs the EDM-path fine solve'] = G.frechet_samples(dist.sample(n_samples, gen),
                                                                                        refs['EDM'])
    return cols, checks


# ----------------------------------------------------------------------------------------------------------------------
# Tables.


def fmt(v: float) -> str:
    return f'{v:.3g}'


def nfe_table(title: str, cols: dict, nfes: list[int], note: str = '') -> str:
    names = list(cols)
    lines = [f'**{title}**', '', '| NFE | ' + ' | '.join(names) + ' |', '| ---: |' + ' ---: |' * len(names)]
    for nfe in nfes:
        row = []
        for name in names:
            cell = cols[name].get(nfe)
            if cell is None:
                row.append('—')
            else:
                row.append(fmt(cell[0]) + ('' if cell[1] == nfe else f' [{cell[1]}]'))
        lines.append(f'| {nfe} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + ('\n\n' + note if note else '') + '\n'


def best_table(cols: dict, nfes: list[int]) -> tuple[str, list]:
    """Best anisotropic column against the best isotropic one (registered samplers and EDM Heun) at each NFE."""
    iso = [n for n in cols if n.startswith('EDM: ') and n[5:] in SAMPLERS]
    aniso = [n for n in cols if not n.startswith('EDM: ')]
    lines = ['| NFE | best isotropic | FD ± s.e. | best anisotropic | FD ± s.e. | ratio aniso/iso ± s.e. |',
             '| ---: | --- | ---: | --- | ---: | ---: |']
    rows = []
    for nfe in nfes:
        bi = min((n for n in iso if nfe in cols[n]), key=lambda n: cols[n][nfe][0])
        ba = min((n for n in aniso if nfe in cols[n]), key=lambda n: cols[n][nfe][0])
        (fi, _, li), (fa, _, la) = cols[bi][nfe], cols[ba][nfe]
        ratio = fa / fi
        rse = jackknife_se(la / li)
        rows.append((nfe, bi, fi, ba, fa, ratio))
        lines.append(f'| {nfe} | {bi} | {fmt(fi)} ± {jackknife_se(li):.2g} | {ba} | {fmt(fa)} ± {jackknife_se(la):.2g} | '
                     f'{ratio:.3f} ± {rse:.3f} |')
    return '\n'.join(lines) + '\n', rows


def order_table(orders: dict) -> str:
    lines = ['| path | sampler | N = 32 | 64 | 128 | 256 | observed order |', '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for (pname, sname), (slope, errs) in orders.items():
        lines.append(f'| {pname} | {sname} | ' + ' | '.join(f'{e:.2e}' for e in errs) + f' | {slope:.2f} |')
    return '\n'.join(lines) + '\n'


def plot(curves: dict, out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colors = {'Heun': 'C0', '2M': 'C1', '3M': 'C2', 'iPNDM': 'C3'}
    styles = {'EDM': '-', 'est': '--', 'exact': ':'}
    fig, axes = plt.subplots(1, len(curves), figsize=(5.8 * len(curves), 4.4))
    for ax, (title, cols) in zip(np.atleast_1d(axes), curves.items()):
        for name, cells in cols.items():
            pname, sname = name.split(': ', 1)
            if sname not in colors or not cells:
                continue
            nfe = sorted(cells)
            ax.semilogy(nfe, [cells[n][0] for n in nfe], styles[pname], color=colors[sname], lw=1.3, marker='o',
                        ms=2.5, label=f'{sname} ({pname})')
        ax.set_title(title)
        ax.set_xlabel('NFE')
        ax.set_ylabel('Fréchet distance')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=6.5, ncol=3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)


@click.command()
@click.option('--out', help='PNG of FD against NFE', metavar='PNG', type=str, default='bench/multistep.png',
              show_default=True)
@click.option('--train-steps', help='Adam steps per schedule training (as exact_gaussian.py)', metavar='INT',
              type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--samples', help='Latents for the mixture FD', metavar='INT', type=click.IntRange(min=64),
              default=4096, show_default=True)
@click.option('--quick', help='Small run (smoke test): 1x16x16 only, a few NFE, 256 samples', is_flag=True)
def main(out: str, train_steps: int, samples: int, quick: bool) -> None:
    """Multistep samplers against Heun on the EDM and learned anisotropic paths, NFE 3..35."""
    torch.set_num_threads(1)
    t_start = time.time()
    log = lambda s: print(s, file=sys.stderr, flush=True)            # noqa: E731
    nfes = [3, 5, 6, 10] if quick else NFES
    shapes = [(1, 16)] if quick else [(1, 16), (3, 32)]
    md, curves = [], {}
    for c, res in shapes:
        tag = f'{c}x{res}x{res}'
        lam, mask = G.power_law_variances(c, res), G.low_block_mask(res)
        log(f'{tag}: training schedules')
        sch = trained_schedules(lam, mask, 20 if quick else train_steps, log)
        cols = gaussian_table(lam, mask, sch, nfes, log)
        md.append(nfe_table(f'{tag} Gaussian: exact FD to the data (data scale Σλ = {float(lam.sum()):.3g})', cols,
                            nfes))
        curves[f'{tag} Gaussian (exact FD)'] = cols
        if (c, res) == (1, 16):
            lam16, mask16, sch16 = lam, mask, sch
            log(f'{tag}: orders')
            md.append('**Observed orders on the 1x16x16 Gaussian** (max relative coefficient error against the exact '
                      'solve; Heun rows at NFE 2N − 1 for the N shown / 2)\n\n' +
                      order_table(observed_orders(lam, mask, sch)))
        log(f'{tag}: done ({time.time() - t_start:.0f} s)')
    n_mix = 256 if quick else samples
    log('mixture 1x16x16')
    mix, checks = mixture_table(lam16, mask16, sch16, nfes, n_mix, log)
    max_rel = max(jackknife_se(cell[2]) / cell[0] for cells in mix.values() for cell in cells.values())
    check_text = '; '.join(f'{k}: {v:.2e}' for k, v in checks.items())
    main_cols = {k: v for k, v in mix.items() if k.split(': ', 1)[1] in SAMPLERS}
    md.append(nfe_table(f'1x16x16 mixture of 8 Gaussians: FD of {n_mix} samples to a {2 * REF_STEPS - 1}-NFE fine '
                        f'solve on the same path', main_cols, nfes,
                        f'Jackknife standard errors (16 groups) are at most {100 * max_rel:.0f}% of the value in any '
                        f'cell. Fine-solve checks (FD): {check_text}.'))
    var_cols = {k: v for k, v in mix.items() if k.split(': ', 1)[1] in VARIANTS}
    md.append(nfe_table('1x16x16 mixture, EDM path: forms kept for comparison', var_cols, nfes))
    text, _ = best_table(main_cols, [n for n in nfes if n >= 5])
    md.append('**1x16x16 mixture: best anisotropic against best isotropic sampler at each NFE**\n\n' + text)
    curves['1x16x16 mixture (sampled FD)'] = main_cols
    plot(curves, out)
    print('\n'.join(md))
    print(f'_total time {time.time() - t_start:.0f} s on CPU (one thread); plot: {out}_')


if __name__ == '__main__':
    main()
