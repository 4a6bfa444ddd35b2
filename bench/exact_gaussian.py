"""Exact sampler benchmark on image-shaped Gaussian data diagonal in the DCT basis (method.md §9.6), plus a mixture.

    python bench/exact_gaussian.py [--out=bench/exact_gaussian.png] [--train-steps=300] [--quick]

Data: 1x16x16 and 3x32x32 images whose DCT coefficients are independent N(0, λ_k), λ ∝ (1 + u² + v²)^-1 (a 1/f² power
spectrum) scaled to sigma_data = 0.5. With the exact denoiser (edm_aniso.gaussian.OracleNet) the PF-ODE and every
sampler step are linear per coefficient, so running the real sampler once on the latent whose DCT coefficients are all
one gives each coefficient's gain exactly; the output is N(0, diag((gain·σ_max)²)) and its Fréchet distance to the data
is Σ_k (√λ_k − |gain_k σ_max|)². Schedules compared at N in {3, 4, 5, 6, 8, 10, 13, 18} (NFE = 2N − 1):

- EDM Heun: ``generate.edm_sampler`` (Karras ρ = 7 grid) with the oracle as the network;
- stage 1: a learned isotropic g trained with ``edm_aniso.loss.AnisoStage1Loss``, the oracle as the network;
- stage 2 (estimator): g, h on the DCT split, trained from stage 1 with ``AnisoStage2Loss`` (Hutchinson θ-estimator,
  exact denoiser as the "network"), sampled with aniso_heun;
- stage 2 (exact objective): the same, trained on the closed-form value of the stage-2 objective at the optimal network,
  L(θ) = (1/T)∫ Σ_blocks ġ²/(g²(g+κ)) Σ_k λ_k g/(λ_k + g) dt (method.md §5), by quadrature;
- best split: the per-level split a_i/b_i found by minimising the exact FD at each N (L-BFGS; what any schedule
  pair could reach at that N, up to local optima).

Mixture variant (1x16x16): 8 equal-weight Gaussians with means ~ N(0, 0.6 Λ) and covariance 0.4 Λ (so the total spectrum
is still ≈ Λ); reference = a 255-NFE EDM Heun solve of the same latents; FD between Gaussians fitted to 1024 samples.
"""

from __future__ import annotations

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_aniso import gaussian as G                  # noqa: E402
from edm_aniso.sampler import aniso_heun, edm_sigma_grid  # noqa: E402
from edm_aniso.schedule import KnotSchedule, evaluate_log_knots  # noqa: E402

STEPS = [3, 4, 5, 6, 8, 10, 13, 18]
KAPPA = 1.0
REF_STEPS = 128        # the mixture's reference solve: EDM Heun with 2·128 − 1 = 255 NFE


# ----------------------------------------------------------------------------------------------------------------------
# Exact Fréchet distance of a sampler's output.


def unit_latent(c: int, res: int) -> torch.Tensor:
    return G.from_dct(torch.ones(1, c, res, res, dtype=torch.float64))


def gain_fd(lam: torch.Tensor, coef: torch.Tensor) -> float:
    """FD between N(0, diag λ) and N(0, diag coef²)."""
    return G.frechet_diag(lam, coef.square())


def fd_edm(lam: torch.Tensor, n: int) -> float:
    import generate
    c, res, _ = lam.shape
    net = G.OracleNet(G.DCTGaussian(lam))
    coef = G.to_dct(generate.edm_sampler(net, unit_latent(c, res), num_steps=n))[0]
    return gain_fd(lam, coef)


def fd_aniso(net: G.OracleNet, lam: torch.Tensor, n: int) -> float:
    c, res, _ = lam.shape
    coef = G.to_dct(aniso_heun(net, unit_latent(c, res), num_steps=n))[0]
    return gain_fd(lam, coef)


def fd_split(lam: torch.Tensor, mask: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """Differentiable exact FD for per-level log splits r [N] (r_0 = 0): a = σ e^r, b = σ e^-r, via heun_factors."""
    sig = edm_sigma_grid(n, 0.002, 80.0, 7.0)
    a = torch.cat([sig * r.exp(), sig.new_zeros(1)])
    b = torch.cat([sig * (-r).exp(), sig.new_zeros(1)])
    lev = torch.where(mask[..., None].bool(), a, b).expand(*lam.shape, -1)
    var = (G.heun_factors(lam, lev) * lev[..., 0]).square()
    return (lam.sqrt() - var.sqrt()).square().sum()


def best_split(lam: torch.Tensor, mask: torch.Tensor, n: int, warm: tuple[int, torch.Tensor] | None = None,
               iters: int = 150) -> tuple[float, torch.Tensor]:
    """Minimise the exact FD over the split of levels 1..N-1 (level 0 is σ_max, where g = h = T) with L-BFGS, from
    no split and (if given) from a previous N's split interpolated in ln σ; the better local optimum is kept."""
    sig = edm_sigma_grid(n, 0.002, 80.0, 7.0)
    starts = [torch.zeros(n, dtype=torch.float64)]
    if warm is not None:
        prev = edm_sigma_grid(warm[0], 0.002, 80.0, 7.0).log().flip(0).numpy()
        starts.append(torch.from_numpy(np.interp(sig.log().numpy(), prev, warm[1].flip(0).numpy())))
    best = None
    for start in starts:
        free = start[1:].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([free], lr=0.5, max_iter=iters, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            loss = fd_split(lam, mask, torch.cat([free.new_zeros(1), free]), n)
            loss.backward()
            return loss
        opt.step(closure)
        r = torch.cat([free.new_zeros(1), free]).detach()
        fd = float(fd_split(lam, mask, r, n))
        if best is None or fd < best[0]:
            best = (fd, r)
    return best


# ----------------------------------------------------------------------------------------------------------------------
# Schedule training with the exact denoiser standing in for the network.


def train_with_loss(net: G.OracleNet, dist: G.DCTGaussian, loss_fn, params, steps: int, lr: float, batch: int,
                    seed: int) -> list[float]:
    """Adam on the schedule parameters with one of edm_aniso.loss's losses (per-sample sums, batch mean)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    hist = []
    for _ in range(steps):
        x0 = dist.sample(batch, gen)
        loss = loss_fn(net, x0, None).sum() / batch
        opt.zero_grad()
        loss.backward()
        for p in params:
            p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        opt.step()
        hist.append(loss.item())
    return hist


def exact_stage2_objective(sg: KnotSchedule, sh: KnotSchedule, lam: torch.Tensor, mask: torch.Tensor,
                           points: int = 4000) -> torch.Tensor:
    """(1/T)∫ Σ_blocks ġ²/(g²(g+κ)) Σ_k λ_k g/(λ_k+g) dt by the midpoint rule (the objective at the optimal network)."""
    T = sg.T
    t = (torch.arange(points, dtype=torch.float64) + 0.5) * (T / points)
    total = 0
    for sched, m in ((sg, mask), (sh, 1 - mask)):
        v, dv = evaluate_log_knots(sched.log_knots(), sched.tau, t)
        lam_b = lam[m.expand_as(lam).bool()]
        mmse = (lam_b[None] * v[:, None] / (lam_b[None] + v[:, None])).sum(1)
        total = total + (dv.square() / (v.square() * (v + KAPPA)) * mmse).mean()
    return total


def train_exact(sg: KnotSchedule, sh: KnotSchedule, lam, mask, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([sg.u, sh.u], lr=lr)
    hist = []
    for _ in range(steps):
        loss = exact_stage2_objective(sg, sh, lam, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    return hist


def trained_schedules(lam: torch.Tensor, mask: torch.Tensor, steps: int, log) -> dict[str, tuple]:
    """Stage 1 (loss.py), stage 2 with the estimator (loss.py) and stage 2 on the exact objective."""
    from edm_aniso.loss import AnisoStage1Loss, AnisoStage2Loss
    dist = G.DCTGaussian(lam)
    sub = G.MaskedDCTSubspace(mask)
    batch = 64
    s1 = KnotSchedule(dtype=torch.float64)
    net1 = G.OracleNet(dist, subspace=sub, schedule_g=s1, schedule_h=s1)
    t0 = time.time()
    h1 = train_with_loss(net1, dist, AnisoStage1Loss(kappa=KAPPA), [s1.u], steps, 1e-2, batch, seed=1)
    log(f'  stage 1 (loss.py): {steps} steps, loss {sum(h1[:20]) / 20:.4g} -> {sum(h1[-20:]) / 20:.4g} '
        f'({time.time() - t0:.1f} s)')
    out = {'stage1': (s1, s1)}

    g2, h2 = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    g2.load_rows_from(s1)
    h2.load_rows_from(s1)
    net2 = G.OracleNet(dist, subspace=sub, schedule_g=g2, schedule_h=h2)
    t0 = time.time()
    h2h = train_with_loss(net2, dist, AnisoStage2Loss(kappa=KAPPA), [g2.u, h2.u], steps, 1e-2, batch, seed=2)
    log(f'  stage 2 (loss.py estimator): {steps} steps, loss {sum(h2h[:20]) / 20:.4g} -> {sum(h2h[-20:]) / 20:.4g}, '
        f'exact objective {exact_stage2_objective(s1, s1, lam, mask).item():.4g} -> '
        f'{exact_stage2_objective(g2, h2, lam, mask).item():.4g} ({time.time() - t0:.1f} s)')
    out['stage2_est'] = (g2, h2)

    g3, h3 = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    g3.load_rows_from(s1)
    h3.load_rows_from(s1)
    t0 = time.time()
    h3h = train_exact(g3, h3, lam, mask, steps, 1e-2)
    log(f'  stage 2 (exact objective): {steps} steps, objective {h3h[0]:.4g} -> {h3h[-1]:.4g} '
        f'({time.time() - t0:.1f} s)')
    out['stage2_exact'] = (g3, h3)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Mixture variant.


def mixture_rows(lam: torch.Tensor, mask: torch.Tensor, schedules: dict, splits: dict, n_samples: int,
                 steps: list[int]) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(7)
    c, res, _ = lam.shape
    means = torch.randn([8, c, res, res], dtype=torch.float64, generator=gen) * (0.6 * lam).sqrt()
    dist = G.DCTGaussianMixture(means, 0.4 * lam)
    z = torch.randn([n_samples, c, res, res], dtype=torch.float64, generator=gen)
    import generate
    ref = generate.edm_sampler(G.OracleNet(dist), z, num_steps=REF_STEPS)
    rows = {'EDM Heun': [], 'stage 2 (estimator)': [], 'stage 2 (exact objective)': [], 'best split (Gaussian)': []}
    sub = G.MaskedDCTSubspace(mask)
    for n in steps:
        rows['EDM Heun'].append(G.frechet_samples(generate.edm_sampler(G.OracleNet(dist), z, num_steps=n), ref))
        for name, key in (('stage 2 (estimator)', 'stage2_est'), ('stage 2 (exact objective)', 'stage2_exact')):
            sg, sh = schedules[key]
            net = G.OracleNet(dist, subspace=sub, schedule_g=sg, schedule_h=sh)
            rows[name].append(G.frechet_samples(aniso_heun(net, z, num_steps=n), ref))
        r = splits[n]
        # r holds one log ratio per level of the N-step grid; the sampler asks for every sample's grid at once.
        net = G.OracleNet(dist, G.ratio_levels(lambda s, r=r: r.repeat(s.numel() // r.numel())), sub)
        rows['best split (Gaussian)'].append(G.frechet_samples(aniso_heun(net, z, num_steps=n), ref))
    rows['(data vs reference)'] = [G.frechet_samples(dist.sample(n_samples, gen), ref)] * len(steps)
    return rows


# ----------------------------------------------------------------------------------------------------------------------


def table(title: str, rows: dict[str, list[float]], steps: list[int]) -> str:
    head = '| method | ' + ' | '.join(f'NFE {2 * n - 1}' for n in steps) + ' |'
    sep = '| --- |' + ' ---: |' * len(steps)
    lines = [f'**{title}**', '', head, sep]
    for name, vals in rows.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{v:.3g}' for v in vals) + ' |')
    return '\n'.join(lines) + '\n'


def plot_fd_curves(curves: dict, nfe: list[int], out: str, style=None, keep=None, size=(5.5, 4.2),
                   legend: int = 7) -> None:
    """PNG of FD against NFE (log-log), one panel per table {tag: {row: values}}; ``style(row)`` gives the line format
    (default 'o-', dotted black for rows in parentheses), ``keep(row)`` which rows are drawn (default all)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    style = style or (lambda name: 'k:' if name.startswith('(') else 'o-')
    fig, axes = plt.subplots(1, len(curves), figsize=(size[0] * len(curves), size[1]))
    for ax, (tag, rows) in zip(axes if len(curves) > 1 else [axes], curves.items()):
        for name, vals in rows.items():
            if keep is None or keep(name):
                ax.loglog(nfe, vals, style(name), ms=3, label=name)
        ax.set_title(tag)
        ax.set_xlabel('NFE')
        ax.set_ylabel('Fréchet distance')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=legend)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)


@click.command()
@click.option('--out', help='PNG of FD against NFE', metavar='PNG', type=str, default='bench/exact_gaussian.png',
              show_default=True)
@click.option('--train-steps', help='Adam steps per schedule training', metavar='INT', type=click.IntRange(min=1),
              default=200, show_default=True)
@click.option('--samples', help='Samples for the mixture variant', metavar='INT', type=click.IntRange(min=16),
              default=1024, show_default=True)
@click.option('--quick', help='Small run (for tests): 1x16x16 only, few steps', is_flag=True)
def main(out: str, train_steps: int, samples: int, quick: bool) -> None:
    """Exact Fréchet distances of EDM Heun and aniso_heun schedules on DCT-Gaussian data."""
    torch.set_num_threads(1)   # small matmuls: one thread beats two on shared cores (OpenMP spinning)
    t_start = time.time()
    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731
    steps = [3, 5, 10] if quick else STEPS
    shapes = [(1, 16)] if quick else [(1, 16), (3, 32)]
    md, curves = [], {}
    splits16 = None
    for c, res in shapes:
        tag = f'{c}x{res}x{res}'
        log(f'{tag}: training schedules')
        lam = G.power_law_variances(c, res)
        mask = G.low_block_mask(res)
        sch = trained_schedules(lam, mask, train_steps if not quick else 20, log)
        rows = {'EDM Heun (Karras)': [fd_edm(lam, n) for n in steps]}
        dist = G.DCTGaussian(lam)
        sub = G.MaskedDCTSubspace(mask)
        for name, key in (('stage 1 iso (loss.py)', 'stage1'), ('stage 2 DCT (loss.py estimator)', 'stage2_est'),
                          ('stage 2 DCT (exact objective)', 'stage2_exact')):
            sg, sh = sch[key]
            net = G.OracleNet(dist, subspace=sub, schedule_g=sg, schedule_h=sh)
            rows[name] = [fd_aniso(net, lam, n) for n in steps]
        best, warm = [], None
        for n in steps:
            best.append(best_split(lam, mask, n, warm))
            warm = (n, best[-1][1])
        rows['best split per N (FD-minimised)'] = [b[0] for b in best]
        md.append(table(f'{tag} Gaussian: exact FD to the data (data FD scale: Σλ = {float(lam.sum()):.3g})', rows,
                        steps))
        curves[tag] = rows
        if (c, res) == (1, 16):
            splits16, sch16, lam16, mask16 = {n: b[1] for n, b in zip(steps, best)}, sch, lam, mask
        log(f'{tag}: done ({time.time() - t_start:.0f} s)')
    log('mixture 1x16x16')
    mix = mixture_rows(lam16, mask16, sch16, splits16, samples if not quick else 256, steps)
    md.append(table(f'1x16x16 mixture of 8 Gaussians: FD of {samples if not quick else 256} samples to a {2 * REF_STEPS - 1}-NFE '
                    f'reference solve', mix, steps))
    curves['1x16x16 mixture'] = mix

    plot_fd_curves(curves, [2 * n - 1 for n in steps], out)
    print('\n'.join(md))
    print(f'_total time {time.time() - t_start:.0f} s on CPU; plot: {out}_')


if __name__ == '__main__':
    main()
