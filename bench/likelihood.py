"""Likelihood benchmark: bits/dim by the probability-flow ODE and the variational bound (edm_aniso.likelihood).

    python bench/likelihood.py [--num=64] [--workdir=DIR] [--edm=PKL --aniso=PKL --data=ZIP] [--out=bench/likelihood.png]

Part 1, exact Gaussian (1x16x16, DCT-diagonal 1/f^2 spectrum, the exact denoiser as the network): the ODE value of
dequantisation-free points against the closed-form Gaussian log-density, on the EDM path and on two anisotropic knot
paths (exact trace and one Hutchinson probe), and the bound's Monte-Carlo estimate against its closed form.

Part 2, trained networks: the README's toy quick start (256 coloured blobs at 16x16 in 4 classes; a tiny conditional
EDM model, then stage 1 and stage 2 from it; trained here in --workdir unless --edm/--aniso/--data are given), on the
first --num dataset images (the training images: the toy set has no held-out split). Bits/dim with standard errors
over images, network evaluations per image, and CPU seconds per image (one thread).
"""

from __future__ import annotations

import math
import os
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # toy_runs
sys.path.insert(0, ROOT)                                          # first: likelihood.py is the CLI's

from toy_runs import TOY, newest_snapshot, run, toy_dataset  # noqa: E402
from edm_aniso import gaussian as G                           # noqa: E402
from edm_aniso.likelihood import bits_per_dim, elbo_nll, ode_nll, rademacher   # noqa: E402
from edm_aniso.path import noise_path                         # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Part 1: exact Gaussian.


def noise_per_coefficient(net, x, sigma, mask):
    a, b = noise_path(net, None, x).split(sigma)
    return a[:, None, None, None] ** 2 * mask + b[:, None, None, None] ** 2 * (1 - mask)


def exact_gaussian_rows(num: int) -> list[list[str]]:
    res = 16
    lam = G.power_law_variances(1, res)
    dist = G.DCTGaussian(lam)
    mask = G.low_block_mask(res)
    x = dist.sample(num, torch.Generator().manual_seed(0))
    d = x[0].numel()
    exact = G.gaussian_nll(lam, x)
    rows = []
    for name, net in [('EDM path (a = b = sigma)', G.SigmaView(G.OracleNet(dist))),
                      ('anisotropic path A', G.random_knot_oracle(dist, 3, 0.4)),
                      ('anisotropic path B', G.random_knot_oracle(dist, 11, 0.8))]:
        t0 = time.process_time()
        ode = ode_nll(net, x, trace='exact')
        t_ode = time.process_time() - t0
        hut = ode_nll(net, x, trace='hutchinson', probes=rademacher((1, *x.shape), torch.Generator().manual_seed(1)))
        closed = G.gaussian_elbo(lam, x, noise_per_coefficient(net, x, 0.002, mask),
                                 noise_per_coefficient(net, x, 80.0, mask))
        elbo = elbo_nll(net, x, samples=256, noise=None,
                        offsets=torch.rand(128, num, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        bpd = lambda v: bits_per_dim(v, d)                                          # noqa: E731
        bits = lambda v: v / (d * math.log(2))                                      # noqa: E731  (a difference)
        rows.append([name,
                     f'{float(bpd(exact).mean()):.5f}',
                     f'{float(bpd(ode.nll).mean()):.5f}',
                     f'{float(((ode.nll - exact) / exact).abs().max()):.1e}',
                     f'{float(bpd(hut.nll).mean()):.4f} ± {float(bits(hut.nll - exact).std()) / math.sqrt(num):.4f}',
                     f'{float(ode.nfe[0]):.0f}',
                     f'{float(bpd(closed).mean()):.5f}',
                     f'{float(bpd(elbo.nll).mean()):.4f} ± '
                     f'{float(bits(elbo.terms["diff_se"]).square().sum().sqrt()) / num:.4f}',
                     f'{t_ode / num:.2f}'])
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: the quick-start models.


def train_quickstart(workdir: str) -> tuple[str, str, str, float]:
    """The README's toy quick start, one process: EDM (6 kimg), stage 1 (2 kimg), stage 2 (2 kimg). Returns the two
    pickles, the dataset and the training wall time."""
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    data = toy_dataset(workdir)
    train = os.path.join(ROOT, 'train.py')
    runs = {k: os.path.join(workdir, k) for k in ('edm', 'stage1', 'stage2')}
    if not os.path.isdir(runs['edm']):
        run([train, f'--outdir={runs["edm"]}', '--nosubdir', f'--data={data}', *TOY, '--duration=0.006',
             '--lr-rampup=0', '--lr=2e-3', '--augment=0', '--dump=2'], workdir)
    if not os.path.isdir(runs['stage1']):
        run([train, f'--outdir={runs["stage1"]}', '--nosubdir', f'--data={data}', *TOY, '--duration=0.002',
             '--precond=aniso', '--stage=1', f'--transfer={newest_snapshot(runs["edm"])}'], workdir)
    if not os.path.isdir(runs['stage2']):
        run([train, f'--outdir={runs["stage2"]}', '--nosubdir', f'--data={data}', *TOY, '--duration=0.002',
             '--precond=aniso', '--stage=2', '--subspace=dct', f'--transfer={newest_snapshot(runs["stage1"])}'],
            workdir)
    return newest_snapshot(runs['edm']), newest_snapshot(runs['stage2']), data, time.time() - t0


def model_rows(edm_pkl: str, aniso_pkl: str, data_path: str, num: int, samples: int) -> list[list[str]]:
    import likelihood as cli
    from generate import load_network
    rows = []
    for name, pkl in [('EDM (quick start)', edm_pkl), ('stage 2 anisotropic (quick start)', aniso_pkl)]:
        net = load_network(pkl, verbose=False).eval().requires_grad_(False)
        data = cli.open_dataset(data_path, net, num)
        ratio = ''
        if hasattr(net, 'schedule_h'):
            t = torch.linspace(0, net.T, 200)
            labels = torch.eye(net.label_dim)[[0]].expand(200, -1) if net.label_dim else None
            g, _, h, _ = net.schedules(t, labels)
            ratio = f' (g/h in [{float((g / h).min()):.3f}, {float((g / h).max()):.3f}])'
        for method in ('ode', 'elbo'):
            records = list(cli.compute_likelihood(net, data, num=num, method=method, samples=samples, batch=16,
                                                  seed=0))
            s = cli.summarize(records, (method,))
            m = s[method]
            rows.append([name + ratio, 'PF-ODE (1 Hutchinson probe)' if method == 'ode' else f'bound ({samples} draws)',
                         f'{m["bits_per_dim"]:.4f} ± {m["standard_error"]:.4f}', f'{m["nfe_per_image"]:.1f}',
                         f'{s["cpu_seconds_per_image"]:.2f}'])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(' --- ' for _ in header) + '|']
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


@click.command()
@click.option('--num', help='Images per model (part 2) and Gaussian points (part 1)', type=int, default=64,
              show_default=True)
@click.option('--samples', help='Draws of the bound per image', type=int, default=64, show_default=True)
@click.option('--workdir', help='Where the quick-start models are trained (reused if present)', type=str,
              default='bench-likelihood-work', show_default=True)
@click.option('--edm', 'edm_pkl', help='Evaluate this EDM pickle instead of training', type=str, default=None)
@click.option('--aniso', 'aniso_pkl', help='Evaluate this stage-2 pickle instead of training', type=str, default=None)
@click.option('--data', 'data_path', help='Dataset for --edm/--aniso', type=str, default=None)
@click.option('--skip-gaussian', is_flag=True, help='Only part 2')
def main(num: int, samples: int, workdir: str, edm_pkl: str, aniso_pkl: str, data_path: str,
         skip_gaussian: bool) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)          # the bound's draws in part 1
    t0 = time.time()
    if not skip_gaussian:
        rows = exact_gaussian_rows(min(num, 16))
        print('Exact Gaussian 1x16x16 (bits/dim of continuous points: NLL/(d ln 2) + log2(127.5)), '
              f'{min(num, 16)} points')
        print(table(['path', 'closed form', 'PF-ODE (exact trace)', 'max rel. error (nats)',
                     'PF-ODE (Hutchinson) ± s.e.', 'NFE', 'bound, closed form', 'bound, MC (256) ± s.e.',
                     'CPU s/point (exact trace)'], rows))
    if edm_pkl is None:
        edm_pkl, aniso_pkl, data_path, t_train = train_quickstart(workdir)
        print(f'\nQuick-start models trained in {t_train:.0f} s (wall) in {workdir}')
    rows = model_rows(edm_pkl, aniso_pkl, data_path, num, samples)
    print(f'\nQuick-start toy data, first {num} images (8-bit, uniform dequantisation)')
    print(table(['model', 'method', 'bits/dim ± s.e.', 'NFE per image', 'CPU s per image'], rows))
    print(f'\nTotal wall time {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
