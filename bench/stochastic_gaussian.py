"""Stochastic samplers (aniso_sde, pc) on Gaussian data diagonal in the DCT basis with the exact denoiser: exact
Fréchet distance to the data law against the number of steps, observed rates, and the corrector's effect on an
exact marginal.

    python bench/stochastic_gaussian.py [--plot=bench/stochastic_gaussian.png] [--train-steps=200] [--mc=2000]

Data: 1x16x16, N(0, diag λ) in the DCT basis with the 1/f² spectrum of bench/exact_gaussian.py (mean λ = 0.25).
Paths (the sampler's own noise path, edm_aniso.path):
- EDM: an EDM-style network (SigmaView of the oracle): a = b = sigma;
- knots: random anisotropic knot schedules (edm_aniso.gaussian.random_knot_oracle, seed 1, scale 0.4) on the DCT low
  block 8x8;
- trained: stage-2 (g, h) on the DCT low block trained on the exact stage-2 objective of bench/exact_gaussian.py from
  the Karras initialisation (``--train-steps`` Adam steps, lr 1e-2).
Every step of both samplers is linear plus Gaussian noise per DCT coefficient, so the output law is Gaussian and is
propagated exactly (edm_aniso.gaussian.stochastic_law); FD = Σ (√v − √λ)² (zero means). pc's corrector step sizes in
the law are the deterministic equivalent of score-SDE's snr rule (edm_aniso.gaussian, section comment). Rates: the
least-squares slope p of ln FD against ln N over N = 128..1024 (FD ~ N^-p). "N=16384" is the limit the sampler
approaches with the same options (for pc with a corrector: the unadjusted-Langevin floor).

Corrector table: K Langevin steps at one level from the exact marginal N(0, Λ + M), on the knots path: the largest
relative change of a coefficient's variance in the exact law, the relative change of the total variance in the law
after 10 steps, and (``--mc`` samples, the sampler's own snr rule with
random per-sample step sizes, paired with the start) the relative change of the total second moment, ± its standard
error from 20 batch means.
"""

from __future__ import annotations

import math
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from edm_aniso import gaussian as G                                   # noqa: E402
from edm_aniso.path import PathDenoiser, noise_path                   # noqa: E402
from edm_aniso.schedule import KnotSchedule                           # noqa: E402
from edm_aniso.stochastic import langevin_correct                     # noqa: E402

STEPS = [8, 16, 32, 64, 128, 256, 512, 1024]
LIMIT = 16384
RATE_FROM = 128
GROUPS = 20         # batch means for the Monte-Carlo standard errors
CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.0)
SAMPLERS = {
    'aniso_sde S_churn=40': ('aniso_sde', CHURN),
    'aniso_sde S_churn=0 (Heun)': ('aniso_sde', dict(S_churn=0)),
    'pc K=0 (reverse SDE)': ('pc', dict(corrector_steps=0)),
    'pc K=1 snr=0.16': ('pc', dict(corrector_steps=1, snr=0.16)),
    'pc K=1 snr=0.05': ('pc', dict(corrector_steps=1, snr=0.05)),
    'pc K=2 snr=0.05': ('pc', dict(corrector_steps=2, snr=0.05)),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trained_oracle(dist: G.DCTGaussian, mask: torch.Tensor, steps: int) -> G.OracleNet:
    from exact_gaussian import train_exact
    g, h = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    hist = train_exact(g, h, dist.variances, mask, steps, 1e-2) if steps > 0 else [float('nan')]
    log(f'  trained path: exact stage-2 objective {hist[0]:.4g} -> {hist[-1]:.4g} ({steps} steps)')
    return G.OracleNet(dist, subspace=G.MaskedDCTSubspace(mask), schedule_g=g, schedule_h=h)


def fd_rows(net, lam: torch.Tensor) -> dict[str, list[float]]:
    rows = {}
    for label, (sampler, opts) in SAMPLERS.items():
        t0 = time.process_time()
        rows[label] = [G.law_frechet(*G.stochastic_law(net, sampler, n, **opts)[:2], lam) for n in STEPS + [LIMIT]]
        log(f'    {label}: {time.process_time() - t0:.1f} s CPU')
    return rows


def rate(fds: list[float]) -> float:
    keep = [(n, f) for n, f in zip(STEPS, fds) if n >= RATE_FROM and f > 0]
    x, y = np.log([n for n, _ in keep]), np.log([f for _, f in keep])
    return float(-np.polyfit(x, y, 1)[0])


def fd_table(title: str, rows: dict[str, list[float]]) -> str:
    head = '| sampler | ' + ' | '.join(f'N={n}' for n in STEPS) + f' | rate (N≥{RATE_FROM}) | N={LIMIT} |'
    lines = [f'**{title}**', '', head, '|' + ' --- |' * (len(STEPS) + 3)]
    for label, fds in rows.items():
        lines.append(f'| {label} | ' + ' | '.join(f'{f:.3g}' for f in fds[:-1]) + f' | {rate(fds[:-1]):.2f} | '
                     f'{fds[-1]:.3g} |')
    return '\n'.join(lines)


def corrector_table(net: G.OracleNet, lam: torch.Tensor, mc: int) -> str:
    mask = G.oracle_mask(net)
    res = lam.shape[-1]
    path1 = noise_path(net, None, torch.zeros(1, 1, res, res))
    lines = ['| sigma (a, b) | snr | K=1 law | K=10 law | K=100 law | K=1000 law | K=10 law, total | '
             'K=10 MC, total (snr rule) |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    gen = torch.Generator().manual_seed(3)
    for sigma in (0.05, 0.5, 5.0):
        a, b = (v[0] for v in path1.split(sigma))
        exact = lam + torch.where(mask.bool().expand_as(lam), a, b) ** 2
        for snr in (0.16, 0.05, 0.02):
            cells = []
            for k in (1, 10, 100, 1000):
                _, var, _ = G.langevin_law(lam, mask, (a, b), k, snr)
                cells.append(f'{((var - exact) / exact).abs().max().item():.2e}')
                if k == 10:
                    total = f'{(var.sum() / exact.sum() - 1).item():+.2e}'
            cells.append(total)
            mc_cell = '-'
            if mc > 0:
                x0 = G.from_dct(torch.randn(mc, *lam.shape, dtype=torch.float64, generator=gen) * exact.sqrt())
                path = noise_path(net, None, x0)
                rl = lambda v: torch.randn(v.shape, dtype=v.dtype, generator=gen)   # noqa: E731
                x = langevin_correct(path, PathDenoiser(net, path), x0, sigma, snr=snr, steps=10, randn_like=rl)
                e1, e0 = G.to_dct(x).square().flatten(1).sum(1), G.to_dct(x0).square().flatten(1).sum(1)
                r = (e1.sum() / e0.sum() - 1).item()
                grp = (e1.reshape(GROUPS, -1).sum(1) / e0.reshape(GROUPS, -1).sum(1) - 1)   # batch means
                mc_cell = f'{r:+.2e} ± {grp.std().item() / math.sqrt(GROUPS):.1e}'
            lines.append(f'| {sigma} ({a.item():.3g}, {b.item():.3g}) | {snr} | ' + ' | '.join(cells) +
                         f' | {mc_cell} |')
    return '\n'.join(lines)


def plot(out: str, tables: dict[str, dict[str, list[float]]]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4), sharey=True)
    for ax, (title, rows) in zip(np.atleast_1d(axes), tables.items()):
        for label, fds in rows.items():
            ax.loglog(STEPS, fds[:-1], marker='o', ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel('steps N')
        ax.grid(True, which='both', alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel('exact FD to the data law')
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = out + '.tmp.png'
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    log(f'wrote {out}')


def _mc(v: int) -> int:
    if v % GROUPS:
        raise click.BadParameter(f'must be a multiple of {GROUPS}')
    return v


@click.command()
@click.option('--plot', 'plot_out', help='Write a log-log plot of FD vs steps here', metavar='PNG', type=str,
              default=None)
@click.option('--train-steps', help='Adam steps on the exact stage-2 objective for the trained path', metavar='INT',
              type=click.IntRange(min=0), default=200, show_default=True)
@click.option('--mc', help='Monte-Carlo samples for the corrector table (0: law only)', metavar='INT',
              type=click.IntRange(min=0), default=2000, show_default=True, callback=lambda c, p, v: _mc(v))
def main(plot_out, train_steps, mc):
    """Exact FD of aniso_sde and pc vs steps on 1x16x16 Gaussian data, and the corrector at a fixed level."""
    torch.set_num_threads(1)
    lam = G.power_law_variances(1, 16)
    dist = G.DCTGaussian(lam)
    mask = G.low_block_mask(16)
    log('building paths')
    nets = {'EDM path (isotropic)': G.SigmaView(G.OracleNet(dist)),
            'random knot schedules (DCT 8x8 block)': G.random_knot_oracle(dist, seed=1, scale=0.4),
            'trained stage 2, exact objective (DCT 8x8 block)': trained_oracle(dist, mask, train_steps)}
    tables = {}
    for title, net in nets.items():
        log(f'  {title}')
        tables[title] = fd_rows(net, lam)
    print('### Exact FD to the data law vs steps N (1x16x16 Gaussian, exact denoiser)\n')
    for title, rows in tables.items():
        print(fd_table(title, rows) + '\n')
    log('corrector table')
    print('### Corrector at a fixed level: relative change of the exact marginal (random knot schedules)\n')
    print(corrector_table(nets['random knot schedules (DCT 8x8 block)'], lam, mc) + '\n')
    if plot_out:
        plot(plot_out, tables)
    log(f'CPU time {time.process_time():.1f} s')


if __name__ == '__main__':
    main()
