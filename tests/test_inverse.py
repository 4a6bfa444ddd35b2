"""edm_aniso.inverse and inverse.py: the known part is kept, the unknown part approaches the exact conditional law on
Gaussian data (exact moments, edm_aniso.gaussian), and the command line checks its inputs and writes its outputs."""

import os
import pickle
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from edm_aniso import gaussian as G
from edm_aniso.inverse import (COLOR_BASIS, PREDICTORS, make_observation, network_evaluations, solve_inverse,
                               to_color_basis)
from edm_aniso.inverse_exact import exact_gap

RES = 8
LAM = G.power_law_variances(1, RES)
DIST = G.DCTGaussian(LAM)
COV = G.dct_gaussian_covariance(LAM)
X_TRUE = DIST.sample(1, torch.Generator().manual_seed(0))

HALF_MASK = torch.zeros(RES, RES)
HALF_MASK[:, :RES // 2] = 1
RANDOM_MASK = (torch.rand(RES, RES, generator=torch.Generator().manual_seed(4)) < 0.6).double()

ORACLES = {'edm': lambda: G.SigmaView(G.OracleNet(DIST)), 'aniso': lambda: G.random_knot_oracle(DIST, 3)}


def gap(net, obs, steps, predictor, corrector_steps=0, snr=0.16):
    """(mean error / sqrt(tr C), relative Frobenius covariance error) of the output on the unknown part against the
    exact conditional law given K x = K X_TRUE (edm_aniso.inverse_exact.exact_gap: exact moments of the affine
    sampler, the corrector at the deterministic-equivalent step sizes of the snr rule)."""
    r = exact_gap(net, obs, COV, X_TRUE, steps, predictor, corrector_steps, snr)
    return r['mean'], r['cov']


# ----------------------------------------------------------------------------------------------------------------------
# The exact conditional law and the exact-moment machinery.


def test_conditional_law_matches_the_precision_form():
    """Pixel mask: the Schur-complement law equals the precision-matrix form u | k ~ N(-Q_uu^-1 Q_uk k, Q_uu^-1)."""
    obs = make_observation('inpaint', 1, RES, mask=RANDOM_MASK)
    y = obs.project(X_TRUE).reshape(-1)
    mean, cov = G.gaussian_conditional(COV, G.projector_matrix(obs.project, (1, RES, RES)), y)
    k = RANDOM_MASK.reshape(-1).bool()
    prec = torch.linalg.inv(COV)
    q_uu = prec[~k][:, ~k]
    assert torch.allclose(mean[~k], -torch.linalg.solve(q_uu, prec[~k][:, k] @ y[k]), atol=1e-9)
    assert torch.equal(mean[k], y[k])
    assert torch.allclose(cov[~k][:, ~k], torch.linalg.inv(q_uu), atol=1e-9)
    assert float(cov[k].abs().max()) < 1e-12
    # DCT-diagonal data and the DCT low block: the unknown coefficients are independent of it, their prior.
    obs = make_observation('superres', 1, RES, scale=2)
    y = obs.project(X_TRUE).reshape(-1)
    mean, cov = G.gaussian_conditional(COV, G.projector_matrix(obs.project, (1, RES, RES)), y)
    low = G.low_block_mask(RES).bool()
    assert torch.allclose(mean, y, atol=1e-12)
    cov_dct = G.to_dct(G.to_dct(cov.reshape(RES, RES, RES, RES)).permute(2, 3, 0, 1))   # B Σ B^T per index pair
    assert torch.allclose(cov_dct.reshape(RES * RES, RES * RES),
                          torch.diag((LAM[0] * ~low).reshape(-1)), atol=1e-12)


def test_exact_moments_agree_with_monte_carlo():
    """BasisNoise's exact mean and covariance of a stochastic sampler agree with 4000 draws (within 5 s.e.)."""
    obs = make_observation('inpaint', 1, RES, mask=HALF_MASK)
    net = ORACLES['aniso']()
    y = obs.project(X_TRUE)

    def run(lat, randn_like):
        return solve_inverse(net, obs, y.expand(lat.shape[0], 1, RES, RES), lat, randn_like=randn_like, num_steps=6)
    mu, cov = G.affine_sampler_moments(run, (1, RES, RES))
    n = 4000
    gen = torch.Generator().manual_seed(1)
    samples = run(torch.randn(n, 1, RES, RES, generator=gen, dtype=torch.float64),
                  lambda like: torch.randn(like.shape, generator=gen, dtype=like.dtype)).reshape(n, -1)
    sd = cov.diagonal().sqrt()
    assert float(((samples.mean(0) - mu).abs() / (sd / n ** 0.5).clamp_min(1e-12)).max()) < 5
    var_se = cov.diagonal() * (2 / n) ** 0.5
    assert float(((samples.var(0) - cov.diagonal()).abs() / var_se.clamp_min(1e-12)).max()) < 5


# ----------------------------------------------------------------------------------------------------------------------
# The sampler on Gaussian data.


@pytest.mark.parametrize('name', list(ORACLES))
@pytest.mark.parametrize('predictor', PREDICTORS)
def test_superres_approaches_the_exact_conditional(name, predictor):
    """DCT-diagonal data, known low block: the gap falls toward 0 with the number of steps (Heun ~4x per doubling,
    the reverse SDE ~2x), the mean is exact (0 on the unknown coefficients)."""
    obs = make_observation('superres', 1, RES, scale=2)
    gaps = [gap(ORACLES[name](), obs, n, predictor) for n in (8, 16, 32)]
    assert all(g[0] < 1e-10 for g in gaps)
    covs = [g[1] for g in gaps]
    ratio = 3.0 if predictor == 'heun' else 1.6
    assert covs[0] / covs[1] > ratio and covs[1] / covs[2] > ratio, covs
    assert covs[2] < (0.05 if predictor == 'heun' else 0.5)


@pytest.mark.parametrize('predictor', PREDICTORS)
def test_inpainting_gap_falls_with_steps(predictor):
    """Inpainting on correlated pixels: the covariance gap falls with the steps (toward score-SDE's approximation's
    own floor without correctors, bench/RESULTS.md)."""
    obs = make_observation('inpaint', 1, RES, mask=HALF_MASK)
    gaps = [gap(ORACLES['aniso'](), obs, n, predictor) for n in (4, 16)]
    assert gaps[1][1] < 0.5 * gaps[0][1], gaps


@pytest.mark.parametrize('name', list(ORACLES))
@pytest.mark.parametrize('mask', ['half', 'random'])
def test_inpainting_approaches_the_exact_conditional_with_correctors(name, mask):
    """Without correctors the replacement method stays off the exact conditional (mean error ~0.4 at N = 8); Langevin
    corrector steps on the conditional score bring mean and covariance toward it, on the EDM path and on an
    anisotropic path whose preconditioner does not commute with the mask."""
    obs = make_observation('inpaint', 1, RES, mask=HALF_MASK if mask == 'half' else RANDOM_MASK)
    gaps = [gap(ORACLES[name](), obs, 8, 'sde', c) for c in (0, 4, 16, 64)]
    means, covs = [g[0] for g in gaps], [g[1] for g in gaps]
    assert means == sorted(means, reverse=True) and covs == sorted(covs, reverse=True), gaps
    assert means[0] > 0.2 and means[-1] < 0.25 * means[0] and covs[-1] < 0.1, gaps


def tiny_nets(channels=3, label_dim=0):
    """A tiny random EDM network and an anisotropic one (stage 2, DCT split, perturbed schedule h) from it."""
    networks = pytest.importorskip('training.networks')
    from edm_aniso.precond import AnisoPrecond
    torch.manual_seed(0)
    kw = dict(img_resolution=RES, img_channels=channels, label_dim=label_dim, model_type='SongUNet',
              model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    edm = networks.EDMPrecond(**kw).eval()
    for p in edm.parameters():
        p.data += 0.05 * torch.randn_like(p)
    aniso = AnisoPrecond(stage=2, subspace='dct', **kw).eval()
    aniso.transfer_from(edm)
    with torch.no_grad():
        aniso.schedule_h.u.add_(0.3 * torch.randn(aniso.schedule_h.u.shape))
    return {'edm': edm.requires_grad_(False), 'aniso': aniso.requires_grad_(False)}


@pytest.mark.parametrize('task', ['inpaint', 'superres', 'colorize'])
def test_known_part_is_kept_on_real_networks(task):
    nets = tiny_nets()
    mask = RANDOM_MASK if task == 'inpaint' else None
    obs = make_observation(task, 3, RES, mask=mask, scale=2 if task == 'superres' else None)
    gen = torch.Generator().manual_seed(2)
    x_true = torch.rand(3, 3, RES, RES, generator=gen, dtype=torch.float64) * 2 - 1
    y = obs.project(x_true)
    for name, net in nets.items():
        grids = ['karras', 'schedule'] if name == 'aniso' else ['karras']
        for predictor, corr, grid in [(p, c, g) for p, c in [('sde', 0), ('heun', 0), ('sde', 2)] for g in grids]:
            z = torch.randn(3, 3, RES, RES, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                out = solve_inverse(net, obs, y, z, num_steps=3, predictor=predictor, corrector_steps=corr, grid=grid)
            assert out.dtype == torch.float64 and torch.isfinite(out).all()
            if task == 'inpaint':
                assert torch.equal(out[:, :, RANDOM_MASK.bool()], x_true[:, :, RANDOM_MASK.bool()])
            else:
                assert float((obs.project(out) - y).abs().max()) < 1e-12
            assert float((out - obs.project(out)).abs().max()) > 1e-3          # the unknown part was filled


def test_observations_are_orthogonal_projectors():
    for task, kw in [('inpaint', dict(mask=RANDOM_MASK)), ('superres', dict(scale=4)), ('colorize', {})]:
        obs = make_observation(task, 3, RES, **kw)
        k = G.projector_matrix(obs.project, (3, RES, RES))
        assert torch.allclose(k @ k, k, atol=1e-12) and torch.allclose(k, k.T, atol=1e-12)
        rank = round(float(k.trace()))
        expected = {'inpaint': 3 * int(RANDOM_MASK.sum()), 'superres': 3 * (RES // 4) ** 2, 'colorize': RES * RES}
        assert rank == expected[task]
    assert torch.allclose(COLOR_BASIS @ COLOR_BASIS.T, torch.eye(3, dtype=torch.float64), atol=1e-15)
    x = torch.randn(2, 3, RES, RES, dtype=torch.float64)
    lum = make_observation('colorize', 3, RES).project(x)
    assert torch.allclose(to_color_basis(lum)[:, 1:], torch.zeros(2, 2, RES, RES, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(to_color_basis(lum)[:, 0], to_color_basis(x)[:, 0], atol=1e-14)


def test_each_result_depends_only_on_its_seed():
    """Per-seed generators: a result is the same alone and in a batch, and NFE is N (sde) or 2N - 1 (heun)."""
    import generate
    net = tiny_nets()['aniso']
    obs = make_observation('inpaint', 3, RES, mask=HALF_MASK)
    x_true = torch.rand(3, 3, RES, RES, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    for predictor, corr in [(p, c) for p in PREDICTORS for c in (0, 2)]:
        outs, nfes = [], []
        for seeds, idx in (([4, 9, 11], [0, 1, 2]), ([9], [1])):
            rnd = generate.StackedRandomGenerator('cpu', seeds)
            z = rnd.randn([len(seeds), 3, RES, RES], dtype=torch.float64)
            calls = []
            with torch.no_grad():
                outs.append(solve_inverse(net, obs, obs.project(x_true[idx]), z, randn_like=rnd.randn_like,
                                          num_steps=4, predictor=predictor, corrector_steps=corr,
                                          callback=lambda r: calls.append(r['nfe'])))
            nfes.append(calls[-1])
        assert float((outs[0][1] - outs[1][0]).abs().max()) < 1e-5            # float32 network, other batch
        expected = (4 if predictor == 'sde' else 7) + 4 * corr
        assert nfes == [network_evaluations(4, predictor, corr)] * 2 == [expected] * 2


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


@pytest.fixture(scope='module')
def cli_files(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from datagen import make_image_folder
    root = tmp_path_factory.mktemp('inverse')
    make_image_folder(str(root / 'imgs'), n=3, res=RES, channels=3, num_classes=2)
    make_image_folder(str(root / 'imgs16'), n=2, res=16, channels=3)
    make_image_folder(str(root / 'grey'), n=2, res=RES, channels=1)
    nets = tiny_nets()
    for name, net in nets.items():
        with open(root / f'{name}.pkl', 'wb') as f:
            pickle.dump(dict(ema=net), f)
    with open(root / 'cond.pkl', 'wb') as f:
        pickle.dump(dict(ema=tiny_nets(label_dim=2)['edm']), f)
    with open(root / 'grey.pkl', 'wb') as f:
        pickle.dump(dict(ema=tiny_nets(channels=1)['edm']), f)
    mask = np.full((RES, RES), 255, np.uint8)
    mask[2:6, 2:6] = 0
    PIL.Image.fromarray(mask).save(root / 'mask.png')
    PIL.Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / 'mask16.png')
    PIL.Image.fromarray(np.full((RES, RES), 100, np.uint8)).save(root / 'grey-mask.png')
    rgba = np.full((RES, RES, 4), 255, np.uint8)
    rgba[2:6, 2:6, :3] = 0
    PIL.Image.fromarray(rgba, 'RGBA').save(root / 'mask-rgba.png')
    return root


def run_in_process(args, cwd, monkeypatch):
    import click.testing
    import inverse
    monkeypatch.chdir(cwd)
    return click.testing.CliRunner().invoke(inverse.main, args)


@pytest.mark.parametrize('args, message', [
    (['--task=inpaint', '--mask=mask16.png'], '--mask is 16x16 but the network makes 8x8 images'),
    (['--task=inpaint', '--mask=grey-mask.png'], '--mask must be binary'),
    (['--task=inpaint'], '--task=inpaint needs --mask=PNG'),
    (['--task=superres', '--mask=mask.png'], '--mask applies only to --task=inpaint'),
    (['--task=inpaint', '--mask=mask.png', '--images=imgs16'], 'is 3x16x16 (CxHxW) but the network makes 3x8x8'),
    (['--task=superres', '--images=grey'], 'is 1x8x8 (CxHxW) but the network makes 3x8x8'),
    (['--task=superres', '--class=1'], 'the network is unconditional'),
    (['--task=superres', '--network=cond.pkl', '--class=2'], '--class=2 is out of range'),
    (['--task=colorize', '--network=grey.pkl', '--images=grey'], '--task=colorize needs a 3-channel'),
    (['--task=superres', '--scale=3'], '--scale=3 does not divide the resolution 8'),
    (['--task=colorize', '--scale=2'], '--scale applies only to --task=superres'),
    (['--task=superres', '--snr=0.2'], '--snr sets the corrector\'s step size: it needs --corrector-steps >= 1'),
    (['--task=superres', '--images=nowhere.zip'], '--images:'),
    (['--task=superres', '--num=4'], '--num=4 but "imgs" has only 3 images'),
    (['--task=superres', '--network=missing.pkl'], 'cannot read network pickle'),
])
def test_cli_bad_input_one_line(cli_files, args, message, monkeypatch):
    defaults = {'--network': '--network=edm.pkl', '--images': '--images=imgs'}
    given = {a.split('=')[0] for a in args}
    full = [v for k, v in defaults.items() if k not in given] + args + ['--outdir=out-bad']
    out = run_in_process(full, cli_files, monkeypatch)
    assert out.exit_code != 0
    errors = [line for line in out.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and message in errors[0], out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert not (cli_files / 'out-bad').exists()


@pytest.mark.parametrize('net', ['edm', 'aniso'])
def test_cli_writes_results_strips_and_observations(cli_files, net, monkeypatch):
    out = run_in_process([f'--network={net}.pkl', '--images=imgs', '--task=inpaint', '--mask=mask.png',
                          '--seeds=3,5', '--steps=3', '--batch=4', f'--outdir=out-{net}'], cli_files, monkeypatch)
    assert out.exit_code == 0, out.output
    assert 'Solving inpaint (75.0 % of the pixels known) for 3 image(s) x 2 seed(s)' in out.output
    folder = cli_files / f'out-{net}'
    names = sorted(os.listdir(folder))
    assert names == sorted([f'{n:06d}-{s:06d}{t}.png' for n in range(3) for s in (3, 5) for t in ('', '-strip')]
                           + [f'{n:06d}-observation.png' for n in range(3)])
    inputs = sorted(os.listdir(cli_files / 'imgs'))
    mask = np.array(PIL.Image.open(cli_files / 'mask.png')) == 255
    for n in range(3):
        src = np.array(PIL.Image.open(cli_files / 'imgs' / [f for f in inputs if f.endswith('.png')][n]))
        res = np.array(PIL.Image.open(folder / f'{n:06d}-000005.png'))
        assert res.shape == (RES, RES, 3) and np.array_equal(res[mask], src[mask])
        obs = np.array(PIL.Image.open(folder / f'{n:06d}-observation.png'))
        assert np.array_equal(obs[mask], src[mask]) and (obs[~mask] == 128).all()
        strip = np.array(PIL.Image.open(folder / f'{n:06d}-000005-strip.png'))
        assert strip.shape == (RES, 3 * RES + 2, 3)
        assert np.array_equal(strip[:, :RES], src) and np.array_equal(strip[:, -RES:], res)
    assert not any(f.endswith('.tmp') for f in names)


def test_mask_png_forms(cli_files):
    """Greyscale and RGBA (alpha ignored) masks read the same; white = known."""
    import inverse
    grey = inverse.load_mask(str(cli_files / 'mask.png'), 3, RES)
    rgba = inverse.load_mask(str(cli_files / 'mask-rgba.png'), 3, RES)
    assert grey.shape == rgba.shape == (1, RES, RES) and torch.equal(grey, rgba)
    assert int(grey.sum()) == RES * RES - 16 and not bool(grey[0, 2:6, 2:6].any())


def test_cli_superres_and_colorize_on_a_conditional_network(cli_files, monkeypatch):
    for task, extra in (('superres', ['--predictor=heun']),
                        ('colorize', ['--predictor=sde', '--corrector-steps=1', '--snr=0.1'])):
        out = run_in_process(['--network=cond.pkl', '--images=imgs', f'--task={task}', '--steps=2', '--num=2',
                              f'--outdir=out-{task}'] + extra, cli_files, monkeypatch)
        assert out.exit_code == 0, out.output
        assert len(os.listdir(cli_files / f'out-{task}')) == 2 * 3
