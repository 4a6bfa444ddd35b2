"""Inverse problems on exact Gaussian data: the gap between solve_inverse's output law and the exact conditional law
of the unknown part given the known part, against the number of steps and of corrector steps.

    python bench/inverse_gaussian.py [--quick] [--out=results.json]

Data: 1x8x8 Gaussian diagonal in the DCT basis with a 1/f^2 spectrum (edm_aniso.gaussian.power_law_variances, pixels
strongly correlated); one observation y = K x of a draw x (seed 0). Networks: the exact denoiser (OracleNet) on the
EDM path (SigmaView: a = b = sigma) and on a random anisotropic knot schedule over the DCT low block
(random_knot_oracle, seed 3). Tasks: ``inpaint`` with the left half of the pixels known, ``inpaint`` with a random
60 % of the pixels known, ``superres`` x2 (the DCT low block 4x4 known).

With the exact denoiser and fixed corrector step sizes every step is affine in its Gaussian draws, so the output law
is Gaussian and its mean and covariance are computed exactly (edm_aniso.inverse_exact.exact_gap, with
edm_aniso.gaussian.affine_sampler_moments: reverse-mode Jacobians, no Monte-Carlo error). The exact conditional is gaussian_conditional (Schur complement). The corrector
runs at the deterministic-equivalent step sizes of the snr rule (conditional_snr_step_sizes, snr = 0.16 unless given).
Reported, on the unknown component U = I - K:

    mean   ||U (mu - mu*)|| / sqrt(tr C*)        cov   ||U (C - C*) U||_F / ||C*||_F

The known component equals y in every output (checked: max |K x - y| is printed per task).
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

from edm_aniso import gaussian as G                                   # noqa: E402
from edm_aniso import inverse as inv                                  # noqa: E402
from edm_aniso.inverse_exact import exact_gap                        # noqa: E402

RES = 8
LAM = G.power_law_variances(1, RES)
COV = G.dct_gaussian_covariance(LAM)
X_TRUE = G.DCTGaussian(LAM).sample(1, torch.Generator().manual_seed(0))


def _masks() -> dict:
    half = torch.zeros(RES, RES)
    half[:, :RES // 2] = 1
    rand = (torch.rand(RES, RES, generator=torch.Generator().manual_seed(4)) < 0.6).double()
    return {'inpaint-half': half, 'inpaint-random': rand}


def observations() -> dict:
    obs = {name: inv.make_observation('inpaint', 1, RES, mask=m) for name, m in _masks().items()}
    obs['superres-x2'] = inv.make_observation('superres', 1, RES, scale=2)
    return obs


def networks() -> dict:
    dist = G.DCTGaussian(LAM)
    return {'EDM path': G.SigmaView(G.OracleNet(dist)), 'aniso path': G.random_knot_oracle(dist, 3)}


def gap(net, obs, steps: int, predictor: str, corrector_steps: int = 0, snr: float = 0.16,
        leak: bool = False) -> dict:
    """The exact gap of one setting (edm_aniso.inverse_exact.exact_gap) and its CPU seconds."""
    t0 = time.process_time()
    r = exact_gap(net, obs, COV, X_TRUE, steps, predictor, corrector_steps, snr, leak)
    return dict(r, cpu=time.process_time() - t0)


def _cell(r: dict) -> str:
    return f'{r["mean"]:.3g} / {r["cov"]:.3g}'


def _rate(values: list[float], steps: list[int]) -> float:
    """Least-squares slope of -log2(gap) against log2(N): the observed order."""
    xs, ys = [math.log2(n) for n in steps], [-math.log2(max(v, 1e-300)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@click.command()
@click.option('--quick', is_flag=True, help='Fewer settings (a smoke run)')
@click.option('--out', help='Also write every number as JSON here', metavar='JSON', default=None)
def main(quick: bool, out: str | None) -> None:
    torch.set_num_threads(1)
    steps_list = [8, 16, 32] if quick else [8, 16, 32, 64, 128, 256]
    corr_steps = [8, 32] if quick else [8, 32, 128]
    corr_list = [0, 1, 4] if quick else [0, 1, 4, 16, 64]
    nets, obs = networks(), observations()
    results: dict = dict(steps=[], corrector=[], snr=[], leak=[])
    t_all = time.process_time()

    print('## Gap against the number of steps (no corrector)\n')
    print('Cells: mean / cov error (module docstring) of the output law against the exact conditional. NFE = N '
          '(sde), 2N - 1 (heun). Order: least-squares slope of -log2(cov error) against log2 N (superres; '
          'inpainting tends to a floor).\n')
    for p in inv.PREDICTORS:
        print(f'predictor = {p}\n')
        print('| task | path | ' + ' | '.join(f'N={n}' for n in steps_list) + ' | order (cov) |')
        print('|---|---|' + '---|' * (len(steps_list) + 1))
        for t in obs:
            for n in nets:
                rs = []
                for steps in steps_list:
                    r = gap(nets[n], obs[t], steps, p)
                    results['steps'].append(dict(net=n, task=t, predictor=p, steps=steps, **r))
                    rs.append(r)
                order = f'{_rate([r["cov"] for r in rs], steps_list):.2f}' if t.startswith('superres') else '-'
                print(f'| {t} | {n} | ' + ' | '.join(_cell(r) for r in rs) + f' | {order} |', flush=True)
        print()
    worst = max(r['known_err'] for r in results['steps'])
    print(f'Largest |K x - y| over these outputs: {worst:.2g}\n')

    print('## Inpainting gap against corrector steps per level (snr = 0.16)\n')
    print('Cells: mean / cov error; C corrector steps per level; NFE = N (C + 1) (sde) or 2N - 1 + N C (heun).\n')
    for t in ('inpaint-half', 'inpaint-random'):
        print(f'{t}\n')
        print('| path | predictor | N | ' + ' | '.join(f'C={c}' for c in corr_list) + ' |')
        print('|---|---|---|' + '---|' * len(corr_list))
        for n in nets:
            for p in inv.PREDICTORS:
                for steps in corr_steps:
                    row = []
                    for c in corr_list:
                        if steps * c > 4096:
                            row.append('')
                            continue
                        r = gap(nets[n], obs[t], steps, p, c)
                        results['corrector'].append(dict(net=n, task=t, predictor=p, steps=steps,
                                                         corrector_steps=c, **r))
                        row.append(_cell(r))
                    print(f'| {n} | {p} | {steps} | ' + ' | '.join(row) + ' |', flush=True)
        print()
    worst = max(r['known_err'] for r in results['corrector'])
    print(f'Largest |K x - y| over these outputs: {worst:.2g}\n')

    print('## The corrector\'s snr (inpaint-half, sde, N = 32, C = 16)\n')
    print('| snr | ' + ' | '.join(nets) + ' |')
    print('|---|' + '---|' * len(nets))
    for snr in ([0.16] if quick else [0.04, 0.08, 0.16, 0.32]):
        row = []
        for n in nets:
            r = gap(nets[n], obs['inpaint-half'], 32, 'sde', 16, snr=snr)
            results['snr'].append(dict(net=n, snr=snr, **r))
            row.append(_cell(r))
        print(f'| {snr} | ' + ' | '.join(row) + ' |', flush=True)

    print('\n## Ablation: corrector on the full score (inpaint-half, sde, N = 32, C = 16)\n')
    print('| corrector | ' + ' | '.join(nets) + ' |')
    print('|---|' + '---|' * len(nets))
    for leak in (False, True):
        row = []
        for n in nets:
            r = gap(nets[n], obs['inpaint-half'], 32, 'sde', 16, leak=leak)
            results['leak'].append(dict(net=n, leak=leak, **r))
            row.append(_cell(r))
        name = 'full score (the known part\'s leaks)' if leak else 'conditional_score'
        print(f'| {name} | ' + ' | '.join(row) + ' |', flush=True)
    print(f'\nTotal process CPU time: {time.process_time() - t_all:.0f} s')
    if out is not None:
        with open(out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
