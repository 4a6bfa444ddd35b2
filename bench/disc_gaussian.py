"""Discretisation-aware schedules on the exact Gaussians and the mixture, against honest headroom rows.

    python bench/disc_gaussian.py [--out=bench/disc_gaussian.png] [--jobs=2] [--parts=1x16x16,3x32x32,mixture]
                                  [--solve-s2-lr=1e-2] [--train-steps=400] [--starts=6] [--quick]

Data and exact FD as bench/exact_gaussian.py (1x16x16 and 3x32x32 Gaussians diagonal in the DCT basis with a 1/f²
spectrum, DCT low-block split; 1x16x16 mixture of 8 Gaussians, FD of 1024 samples to a 255-NFE EDM Heun solve).
NFE 2N − 1 for N in {3, 4, 5, 6, 8, 10, 13, 18}. Rows:

- EDM Heun: ``generate.edm_sampler`` (Karras ρ = 7).
- Karras init (untrained), schedule grid: the Karras-initialised g on ``--grid=schedule``.
- energy s1 / s2: the trajectory objective (``AnisoStage1Loss``; then ``AnisoStage2Loss`` with its θ-estimator), the
  exact denoiser standing in for the network; sampled with aniso_heun on ``--grid=karras`` and ``--grid=schedule``.
- disc s1 / s2: ``--objective=energy+disc`` (``edm_aniso.disc_loss.EnergyDiscLoss``, weight 1, K in 3-18, 8 reference
  substeps, denoiser metric, K-power 3), stage 1 from the Karras init, stage 2 from the disc stage-1 schedule;
  same two grids. One schedule per row for every N. The mixture rows are trained on the mixture itself (its θ-estimator Hessian term is non-zero).
- disc-all s1 / s2: the same with the whole-solve term (``--disc-span=all``, 4 reference substeps per step, K-power
  4); stage 2 at ``--solve-s2-lr`` (default 1e-2). The done-when checks read ``disc-all s2, schedule grid``.
- Headroom (Gaussians only; exact FD of aniso_heun minimised per N by L-BFGS on log FD from several starts, the
  Karras levels and random perturbations of them, best kept):
  (a) best monotone split on the Karras grid: a_i b_i = σ_i², r_i = ln(a_i/σ_i), r_0 = 0,
      |r_{i+1} − r_i| ≤ ln(σ_i/σ_{i+1}) (so a_i and b_i both fall: reachable by monotone g, h);
  (b) best isotropic grid: free σ_0 = 80 > σ_1 > ... > σ_{N−1} > 0 (what grid tuning such as AYS can reach);
  (c) best of both free: monotone a_i and b_i, each from 80 down, independently.
- disc-all s2 (conditioning detached), 1x16x16 only: stage 2 with the oracle's (g, h) detached in its conditioning, as
  stage-2 AnisoPrecond does (so the disc term's θ-gradient lacks ∂f/∂M, as on a real stage-2 network).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_aniso import gaussian as G                          # noqa: E402
from edm_aniso.disc_loss import EnergyDiscLoss               # noqa: E402
from edm_aniso.loss import AnisoStage1Loss, AnisoStage2Loss  # noqa: E402
from edm_aniso.path import edm_sigma_grid                    # noqa: E402
from edm_aniso.sampler import aniso_heun                     # noqa: E402
from edm_aniso.schedule import KnotSchedule                  # noqa: E402
from exact_gaussian import plot_fd_curves, train_with_loss   # noqa: E402  (bench/ is this script's folder)

STEPS = [3, 4, 5, 6, 8, 10, 13, 18]
KAPPA = 1.0
REF_STEPS = 128
DISC = dict(disc_weight=1.0, disc_steps=[3, 18], disc_substeps=8, disc_k_power=3.0, disc_metric='denoiser')
# The whole-solve variant (--disc-span=all): K-power 4 balances its K^-4 fall over the range; 4 reference substeps.
SOLVE = dict(DISC, disc_k_power=4.0, disc_span='all', disc_substeps=4)
OBJECTIVES = (('energy', None), ('disc', DISC), ('disc-all', SOLVE))
HEADLINE = 'disc-all'      # the stage-2 row the done-when checks read


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Exact FD.


def unit_latent(c: int, res: int) -> torch.Tensor:
    return G.from_dct(torch.ones(1, c, res, res, dtype=torch.float64))


def fd_edm(lam: torch.Tensor, n: int) -> float:
    import generate
    c, res, _ = lam.shape
    coef = G.to_dct(generate.edm_sampler(G.OracleNet(G.DCTGaussian(lam)), unit_latent(c, res), num_steps=n))[0]
    return G.frechet_diag(lam, coef.square())


def fd_net(net, lam: torch.Tensor, n: int, grid: str) -> float:
    c, res, _ = lam.shape
    coef = G.to_dct(aniso_heun(net, unit_latent(c, res), num_steps=n, grid=grid))[0]
    return G.frechet_diag(lam, coef.square())


def fd_levels(lam: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable exact FD of aniso_heun for levels a, b [N+1] (last 0): Σ (√λ − |gain a_0|)²."""
    lev = torch.where(mask.bool()[..., None], a, b).expand(*lam.shape, -1)
    out = (G.heun_factors(lam, lev) * lev[..., 0]).abs()
    return (lam.sqrt() - out).square().sum()


# ----------------------------------------------------------------------------------------------------------------------
# Headroom: exact FD minimised per N from several starts.


def _karras(n: int) -> torch.Tensor:
    return edm_sigma_grid(n, 0.002, 80.0, 7.0)


def levels_split(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a) Karras sigmas, monotone split: r_{i+1} = r_i + ln(σ_i/σ_{i+1}) tanh(z_i), r_0 = 0."""
    sig = _karras(n)
    step = (sig[:-1] / sig[1:]).log() * torch.tanh(z)
    r = torch.cat([sig.new_zeros(1), step.cumsum(0)])
    zero = sig.new_zeros(1)
    return torch.cat([sig * r.exp(), zero]), torch.cat([sig * (-r).exp(), zero])


def _falling(p: torch.Tensor) -> torch.Tensor:
    """80 = s_0 > s_1 > ... from log-decrements softplus(p) (one per level after the first), then the final 0."""
    ls = math.log(80.0) - torch.nn.functional.softplus(p).cumsum(0)
    return torch.cat([p.new_full([1], 80.0), ls.exp(), p.new_zeros(1)])


def _inv_falling(sig: torch.Tensor) -> torch.Tensor:
    d = (sig[:-1] / sig[1:]).log().clamp_min(1e-6)
    return d + torch.log(-torch.expm1(-d))


def levels_iso(p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = _falling(p)
    return s, s


def levels_free(p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _falling(p[:n - 1]), _falling(p[n - 1:])


def headroom(lam: torch.Tensor, mask: torch.Tensor, n: int, kind: str, starts: int, seed: int = 0,
             iters: int = 200) -> float:
    """min over levels of the exact FD, by L-BFGS on log FD from ``starts`` starts (Karras + perturbed)."""
    if n == 1:
        return float(fd_levels(lam, mask, *levels_iso(torch.zeros(0, dtype=torch.float64), 1)))
    gen = torch.Generator().manual_seed(seed)
    base = _inv_falling(_karras(n))
    init = {'split': torch.zeros(n - 1, dtype=torch.float64), 'iso': base, 'free': torch.cat([base, base])}[kind]
    fn = {'split': levels_split, 'iso': levels_iso, 'free': levels_free}[kind]
    best = math.inf
    for s in range(starts):
        noise = torch.randn(init.shape, dtype=torch.float64, generator=gen) * (0.0 if s == 0 else 0.5 * s / starts
                                                                                + 0.2)
        if kind == 'free' and s % 2 == 1:      # alternate: start from a split of the Karras grid
            noise[:n - 1] += 0.3
            noise[n - 1:] -= 0.3
        p = (init + noise).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([p], lr=0.5, max_iter=iters, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            v = fd_levels(lam, mask, *fn(p, n)).log()
            v.backward()
            return v
        try:
            opt.step(closure)
        except RuntimeError:
            pass
        with torch.no_grad():
            v = float(fd_levels(lam, mask, *fn(p, n)))
        if math.isfinite(v):
            best = min(best, v)
    return best


# ----------------------------------------------------------------------------------------------------------------------
# Schedule training with the exact denoiser standing in for the network.


def train(net, dist, loss_fn, params, steps: int, lr: float, batch: int, seed: int) -> tuple[float, float, float]:
    """Adam on θ with one of the losses (exact_gaussian.train_with_loss); returns (first, last loss means, CPU s)."""
    t0 = time.process_time()
    hist = train_with_loss(net, dist, loss_fn, params, steps, lr, batch, seed)
    k = max(1, min(20, steps // 5))
    return sum(hist[:k]) / k, sum(hist[-k:]) / k, time.process_time() - t0


class DetachedOracle(G.OracleNet):
    """The oracle with (g, h) detached in its conditioning, as stage-2 AnisoPrecond (method.md §4): the disc term's
    θ-gradient then misses ∂f/∂M at fixed x, as it does on a real stage-2 network."""

    def flow(self, x, g, h, class_labels=None, basis_id=None, **unused):
        return super().flow(x, torch.as_tensor(g).detach(), torch.as_tensor(h).detach(), class_labels, basis_id)


def detached_stage2(dist, mask: torch.Tensor, s1: KnotSchedule, steps: int, batch: int, tag: str) -> tuple:
    g2, h2 = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    g2.load_rows_from(s1)
    h2.load_rows_from(s1)
    net = DetachedOracle(dist, subspace=G.MaskedDCTSubspace(mask), schedule_g=g2, schedule_h=h2)
    loss = EnergyDiscLoss(dict(class_name='edm_aniso.loss.AnisoStage2Loss', kappa=KAPPA), **dict(OBJECTIVES)[HEADLINE])
    first, last, cpu = train(net, dist, loss, [g2.u, h2.u], steps, 1e-2, batch, seed=2)
    log(f'  {tag} {HEADLINE} s2 (conditioning detached): {steps} steps, loss {first:.4g} -> {last:.4g} '
        f'({cpu:.0f} CPU s)')
    return g2, h2


def schedules(dist, mask: torch.Tensor, steps: int, batch: int, tag: str, solve_s2_lr: float = 1e-2
              ) -> dict[str, tuple]:
    """For each objective of OBJECTIVES: s1, then s2 from that s1: (g, h) KnotSchedules."""
    sub = G.MaskedDCTSubspace(mask)
    out = {}
    e1 = dict(class_name='edm_aniso.loss.AnisoStage1Loss', kappa=KAPPA)
    e2 = dict(class_name='edm_aniso.loss.AnisoStage2Loss', kappa=KAPPA)
    for name, obj in OBJECTIVES:
        s1 = KnotSchedule(dtype=torch.float64)
        net = G.OracleNet(dist, subspace=sub, schedule_g=s1, schedule_h=s1)
        loss = AnisoStage1Loss(kappa=KAPPA) if obj is None else EnergyDiscLoss(e1, **obj)
        first, last, cpu = train(net, dist, loss, [s1.u], steps, 1e-2 if obj is None else 2e-2, batch, seed=1)
        log(f'  {tag} {name} s1: {steps} steps, loss {first:.4g} -> {last:.4g} ({cpu:.0f} CPU s)')
        g2, h2 = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
        g2.load_rows_from(s1)
        h2.load_rows_from(s1)
        net2 = G.OracleNet(dist, subspace=sub, schedule_g=g2, schedule_h=h2)
        loss2 = AnisoStage2Loss(kappa=KAPPA) if obj is None else EnergyDiscLoss(e2, **obj)
        lr2 = solve_s2_lr if name == 'disc-all' else 1e-2
        first, last, cpu = train(net2, dist, loss2, [g2.u, h2.u], steps, lr2, batch, seed=2)
        log(f'  {tag} {name} s2: {steps} steps, loss {first:.4g} -> {last:.4g} ({cpu:.0f} CPU s)')
        out[f'{name} s1'] = (s1, s1)
        out[f'{name} s2'] = (g2, h2)
    return out


# ----------------------------------------------------------------------------------------------------------------------


def table(title: str, rows: dict[str, list[float]], steps: list[int], ref: str = 'EDM Heun') -> str:
    head = '| method | ' + ' | '.join(f'NFE {2 * n - 1}' for n in steps) + ' |'
    lines = [f'**{title}**', '', head, '| --- |' + ' ---: |' * len(steps)]
    for name, vals in rows.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{v:.3g}' for v in vals) + ' |')
    if ref in rows:
        lines += ['', f'Ratio to {ref}:', '', head, '| --- |' + ' ---: |' * len(steps)]
        for name, vals in rows.items():
            if name != ref and not name.startswith('('):
                lines.append(f'| {name} | ' + ' | '.join(f'{v / r:.2f}' for v, r in zip(vals, rows[ref])) + ' |')
    return '\n'.join(lines) + '\n'


def checks(rows: dict[str, list[float]], steps: list[int], row: str, iso_row: str, best_iso: str | None) -> str:
    """The issue's done-when per NFE for one learned stage-2 row on its own grid."""
    nfe = [2 * n - 1 for n in steps]
    out = []
    edm = rows['EDM Heun']
    half = [n for n, v, e in zip(nfe, rows[row], edm) if 9 <= n <= 35 and not v <= 0.5 * e]
    worse = [n for n, v, e in zip(nfe, rows[row], edm) if n in (5, 7) and not v <= e]
    out.append(f'- `{row}` <= 0.5x EDM Heun at every NFE 9..35: {"yes" if not half else "no, fails at " + str(half)}; '
               f'no worse at NFE 5 and 7: {"yes" if not worse else "no, worse at " + str(worse)}')
    if best_iso is not None:
        far = [n for n, v, b in zip(nfe, rows[row], rows[best_iso]) if not v <= 2 * b]
        out.append(f'- within 2x of the best isotropic grid per N: {"yes" if not far else "no, beyond 2x at " + str(far)}'
                   f' (ratios ' + ', '.join(f'{v / b:.2f}' for v, b in zip(rows[row], rows[best_iso])) + ')')
    beats = ['yes' if v < w else 'no' for v, w in zip(rows[row], rows[iso_row])]
    out.append(f'- learned split beats the learned isotropic grid (`{iso_row}`) per NFE ' +
               ', '.join(f'{n}: {b}' for n, b in zip(nfe, beats)))
    return '\n'.join(out) + '\n'


def section(part: str, c: int, res: int, steps: list[int], train_steps: int, batch: int, starts: int,
            samples: int, solve_s2_lr: float = 1e-2) -> tuple[str, str, dict, float]:
    """One table of the benchmark: an exact Gaussian c x res x res, or the 1x16x16 mixture; (markdown, tag, rows,
    CPU s). Runs alone (a pool worker may run it): one thread, its own seeds."""
    torch.set_num_threads(1)
    t0 = time.process_time()
    lam, mask = G.power_law_variances(c, res), G.low_block_mask(res)
    sub = G.MaskedDCTSubspace(mask)
    s2, s1_row = f'{HEADLINE} s2, schedule grid', f'{HEADLINE} s1, schedule grid'
    if part == 'gaussian':
        tag = f'{c}x{res}x{res}'
        dist = G.DCTGaussian(lam)
        log(f'{tag}: training')
        sch = schedules(dist, mask, train_steps, max(8, batch // c), tag, solve_s2_lr)   # 3 channels: a third
        if c == 1:
            sch[f'{HEADLINE} s2 (conditioning detached)'] = detached_stage2(dist, mask, sch[f'{HEADLINE} s1'][0],
                                                                            train_steps, batch, tag)
        rows = {'EDM Heun': [fd_edm(lam, n) for n in steps]}
        init = KnotSchedule(dtype=torch.float64)
        rows['Karras init (untrained), schedule grid'] = [
            fd_net(G.OracleNet(dist, subspace=sub, schedule_g=init, schedule_h=init), lam, n, 'schedule') for n in steps]
        for name, (sg, sh) in sch.items():
            net = G.OracleNet(dist, subspace=sub, schedule_g=sg, schedule_h=sh)
            for grid in ('karras', 'schedule') if 'detached' not in name else ('schedule',):
                rows[f'{name}, {grid} grid'] = [fd_net(net, lam, n, grid) for n in steps]
        log(f'{tag}: headroom ({time.process_time() - t0:.0f} CPU s so far)')
        for kind, name in (('split', 'best monotone split, Karras grid'), ('iso', 'best isotropic grid'),
                           ('free', 'best grid and split (both free)')):
            rows[name] = [headroom(lam, mask, n, kind, starts) for n in steps]
            log(f'  {tag} {name}: done ({time.process_time() - t0:.0f} CPU s)')
        text = table(f'{tag} Gaussian: exact FD to the data (Σλ = {float(lam.sum()):.3g})', rows, steps)
        text += '\n' + checks(rows, steps, s2, s1_row, 'best isotropic grid')
        text += '\nThe one-step objective (`--disc-span=1`):\n\n' + checks(rows, steps, 'disc s2, schedule grid',
                                                                        'disc s1, schedule grid', 'best isotropic grid')
        return text, tag, rows, time.process_time() - t0

    tag = '1x16x16 mixture'
    log('mixture 1x16x16: training on the mixture')
    gen = torch.Generator().manual_seed(7)
    means = torch.randn([8, 1, 16, 16], dtype=torch.float64, generator=gen) * (0.6 * lam).sqrt()
    mix = G.DCTGaussianMixture(means, 0.4 * lam)
    z = torch.randn([samples, 1, 16, 16], dtype=torch.float64, generator=gen)
    import generate
    ref = generate.edm_sampler(G.OracleNet(mix), z, num_steps=REF_STEPS)
    sch = schedules(mix, mask, train_steps, batch, 'mixture', solve_s2_lr)
    rows = {'EDM Heun': [G.frechet_samples(generate.edm_sampler(G.OracleNet(mix), z, num_steps=n), ref)
                         for n in steps]}
    for name, (sg, sh) in sch.items():
        net = G.OracleNet(mix, subspace=sub, schedule_g=sg, schedule_h=sh)
        for grid in ('karras', 'schedule'):
            rows[f'{name}, {grid} grid'] = [G.frechet_samples(aniso_heun(net, z, num_steps=n, grid=grid), ref)
                                            for n in steps]
    rows['(data vs reference)'] = [G.frechet_samples(mix.sample(samples, gen), ref)] * len(steps)
    text = table(f'1x16x16 mixture of 8 Gaussians (schedules trained on the mixture): FD of {samples} samples to '
                 f'a {2 * REF_STEPS - 1}-NFE reference solve', rows, steps) + '\n'
    nfe = [2 * n - 1 for n in steps]
    for row in (s2, s1_row, 'disc s2, schedule grid', 'disc s1, schedule grid'):
        bad = [n for n, v, e in zip(nfe, rows[row], rows['EDM Heun']) if n <= 25 and not v < e]
        text += f'- `{row}` beats EDM Heun at every NFE 5..25: {"yes" if not bad else "no, not at " + str(bad)}\n'
    return text, tag, rows, time.process_time() - t0


@click.command()
@click.option('--out', help='PNG of FD against NFE', metavar='PNG', type=str, default='bench/disc_gaussian.png',
              show_default=True)
@click.option('--json-out', help='Write every row as JSON here', metavar='PATH', type=str, default=None)
@click.option('--train-steps', help='Adam steps per schedule training', metavar='INT', type=click.IntRange(min=1),
              default=400, show_default=True)
@click.option('--batch', help='Training batch (divided by the channel count, at least 8)', metavar='INT',
              type=click.IntRange(min=1), default=32,
              show_default=True)
@click.option('--starts', help='L-BFGS starts per headroom row and N', metavar='INT', type=click.IntRange(min=1),
              default=6, show_default=True)
@click.option('--samples', help='Samples for the mixture', metavar='INT', type=click.IntRange(min=16), default=1024,
              show_default=True)
@click.option('--jobs', help='Processes: the three tables run in parallel', metavar='INT', type=click.IntRange(min=1),
              default=1, show_default=True)
@click.option('--parts', help='Tables to run (comma-separated)', metavar='LIST', type=str,
              default='1x16x16,3x32x32,mixture', show_default=True)
@click.option('--solve-s2-lr', help='θ LR of the disc-all stage 2', metavar='FLOAT', type=click.FloatRange(min=0,
              min_open=True), default=1e-2, show_default=True)
@click.option('--quick', help='Small run: 1x16x16, N in {3, 5, 10}, few steps', is_flag=True)
def main(out: str, json_out: str | None, train_steps: int, batch: int, starts: int, samples: int, jobs: int,
         parts: str, solve_s2_lr: float, quick: bool) -> None:
    """Exact FD of schedules trained with the discretisation-aware objective, against EDM and headroom rows."""
    torch.set_num_threads(1)
    t_start = time.process_time()
    steps = [3, 5, 10] if quick else STEPS
    wanted = [p.strip() for p in parts.split(',') if p.strip()]
    known = ('1x16x16', '3x32x32', 'mixture')
    if not wanted or any(p not in known for p in wanted):
        raise click.BadParameter(f'expected a comma-separated list of {", ".join(known)}', param_hint='--parts')
    shapes = [(c, r) for c, r in ((1, 16), (3, 32)) if f'{c}x{r}x{r}' in wanted and not (quick and c == 3)]
    if quick:
        train_steps, starts, samples = min(train_steps, 20), min(starts, 2), min(samples, 256)
    todo = [('gaussian', c, res) for c, res in shapes] + ([('mixture', 1, 16)] if 'mixture' in wanted else [])
    args = [(part, c, res, steps, train_steps, batch, starts, samples, solve_s2_lr) for part, c, res in todo]
    if jobs > 1:
        import multiprocessing
        with multiprocessing.get_context('spawn').Pool(min(jobs, len(args))) as pool:
            results = pool.starmap(section, args)
    else:
        results = [section(*a) for a in args]
    md, curves = [], {}
    for text, tag, rows, _ in results:
        md.append(text)
        curves[tag] = rows
    cpu = time.process_time() - t_start + (sum(r[3] for r in results) if jobs > 1 else 0.0)   # workers' own time
    nfe = [2 * n - 1 for n in steps]
    if json_out:
        with open(json_out, 'w') as f:
            json.dump(dict(steps=steps, curves=curves), f, indent=1)
    if out:
        plot_fd_curves(curves, nfe, out, keep=lambda name: not ('karras grid' in name and 'energy' in name),
                       style=lambda name: 'k:' if name.startswith('(') else ('--' if name.startswith('best') else 'o-'),
                       size=(6, 4.6), legend=6)
    print('\n'.join(md))
    print(f'_total {cpu:.0f} CPU s (one thread per section: ' +
          ', '.join(f'{tag} {r[3]:.0f} s' for tag, r in zip(curves, results)) + ')_')


if __name__ == '__main__':
    main()
