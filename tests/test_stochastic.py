"""Stochastic samplers (edm_aniso.stochastic): EDM's churn sampler and predictor-corrector on the noise path, the
Langevin corrector, their exact laws on Gaussian data (edm_aniso.gaussian) and the generate.py command line."""

import math
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import generate
from edm_aniso import gaussian as G
from edm_aniso.path import PathDenoiser, noise_path
from edm_aniso.stochastic import aniso_sde, langevin_correct, pc, snr_step_sizes
from tiny_nets import TINY, tiny_edm

CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)      # EDM's ImageNet setting


def seeded(seeds, shape):
    """Latents and the per-seed randn_like, as generate.py draws them."""
    rnd = generate.StackedRandomGenerator('cpu', seeds)
    return rnd.randn([len(seeds), *shape]), rnd.randn_like


def gaussian_oracle(channels=3, res=8, seed=1, scale=0.4, label_dim=0, with_mean=True):
    """An anisotropic knot-schedule oracle over N(mu, diag lambda) (a one-component mixture when with_mean)."""
    lam = G.power_law_variances(channels, res)
    if with_mean:
        mu = 0.3 * torch.randn(1, channels, res, res, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        dist = G.DCTGaussianMixture(mu, lam)
    else:
        dist = G.DCTGaussian(lam)
    return G.random_knot_oracle(dist, seed=seed, scale=scale, label_dim=label_dim), lam


def law_stats(x, mean, var):
    """(mean of z^2 of the coefficient means, mean of the squared standardised variance errors): both ~1 when the
    samples' law is N(mean, diag var)."""
    n = x.shape[0]
    c = G.to_dct(x)
    z_mean = (c.mean(0) - mean) / (var / n).sqrt()
    z_var = (c.var(0) / var - 1) / math.sqrt(2 / (n - 1))
    return z_mean.square().mean().item(), z_var.square().mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# Isotropic reduction and per-seed noise.


@pytest.mark.parametrize('label_dim,stage', [(0, None), (0, 1), (4, 1), (0, 2)])
def test_aniso_sde_with_g_equal_h_is_edms_stochastic_sampler(label_dim, stage):
    """With g = h, aniso_sde equals generate.edm_sampler with churn, for the same per-seed noise: on the EDM network
    itself (bit for bit) and on AnisoPrecond nets transferred from it (stage 1 with a random learned g, per class for a
    bank; stage 2 on the DCT split with h = g)."""
    edm = tiny_edm(label_dim)
    net = edm
    if stage is not None:
        precond = pytest.importorskip('edm_aniso.precond')
        kw = dict(TINY, label_dim=label_dim)
        del kw['model_type']
        net = precond.AnisoPrecond(stage=stage, per_class=label_dim > 0, subspace='iso' if stage == 1 else 'dct',
                                   model_type='SongUNet', **kw).eval()
        net.transfer_from(edm)
        with torch.no_grad():
            net.schedule_g.u.add_(0.5 * torch.randn(net.schedule_g.u.shape, generator=torch.Generator().manual_seed(5)))
            if stage == 2:
                net.schedule_h.load_rows_from(net.schedule_g)
    seeds = [3, 11, 12, 40]
    labels = torch.eye(label_dim)[[0, 1, 3, 1]] if label_dim else None
    z, rl = seeded(seeds, [3, 8, 8])
    with torch.no_grad():
        ref = generate.edm_sampler(edm, z, labels, randn_like=rl, num_steps=6, **CHURN)
    z, rl = seeded(seeds, [3, 8, 8])
    out = aniso_sde(net, z, labels, randn_like=rl, num_steps=6, **CHURN)
    assert ref.dtype == out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= 1e-5
    if stage is None:
        assert torch.equal(out, ref)                             # on the EDM network itself: bit for bit
    assert ref.abs().max().item() > 0.05
    z, rl = seeded(seeds, [3, 8, 8])
    no_churn = aniso_sde(net, z, labels, randn_like=rl, num_steps=6)
    assert (no_churn - ref).abs().max().item() > 1e-2         # the churn noise matters


@pytest.mark.parametrize('sampler,opts', [(aniso_sde, dict(S_churn=10)), (pc, dict(corrector_steps=2))])
@pytest.mark.parametrize('grid', ['karras', 'schedule'])
def test_an_image_depends_only_on_its_seed(sampler, opts, grid):
    """Per-class schedule rows (per-sample levels) and per-seed noise: a seed's image is the same alone or in a
    batch."""
    net, _ = gaussian_oracle(label_dim=3)
    labels = torch.eye(3)[[2, 0, 1]]
    z, rl = seeded([5, 6, 7], [3, 8, 8])
    batch = sampler(net, z, labels, randn_like=rl, num_steps=5, grid=grid, **opts)
    z1, rl1 = seeded([6], [3, 8, 8])
    alone = sampler(net, z1, labels[1:2], randn_like=rl1, num_steps=5, grid=grid, **opts)
    assert torch.allclose(batch[1:2], alone, rtol=0, atol=1e-12)
    z, rl = seeded([5, 6, 7], [3, 8, 8])
    other = sampler(net, z, labels, randn_like=rl, num_steps=5, grid=grid, **{**opts, 'seeds': None})
    assert torch.equal(batch, other)


def test_stage2_class_bank_runs_per_sample():
    """A stage-2 AnisoPrecond with a per-class bank and h != g: both samplers give finite images that depend on the
    per-subspace split (not equal to the run with h = g) and, per seed, not on the batch (up to float32 rounding)."""
    precond = pytest.importorskip('edm_aniso.precond')
    kw = dict(TINY, label_dim=3)
    del kw['model_type']
    net = precond.AnisoPrecond(stage=2, per_class=True, subspace='dct', model_type='SongUNet', **kw).eval()
    net.transfer_from(tiny_edm(3))
    iso = precond.AnisoPrecond(stage=2, per_class=True, subspace='dct', model_type='SongUNet', **kw).eval()
    iso.load_state_dict(net.state_dict())
    with torch.no_grad():
        net.schedule_h.u.add_(0.5 * torch.randn(net.schedule_h.u.shape, generator=torch.Generator().manual_seed(9)))
    labels = torch.eye(3)[[2, 0]]
    for sampler, opts in [(aniso_sde, dict(S_churn=10)), (pc, dict(corrector_steps=1))]:
        z, rl = seeded([1, 2], [3, 8, 8])
        out = sampler(net, z, labels, randn_like=rl, num_steps=3, **opts)
        z, rl = seeded([2], [3, 8, 8])
        alone = sampler(net, z, labels[1:], randn_like=rl, num_steps=3, **opts)
        z, rl = seeded([1, 2], [3, 8, 8])
        same = sampler(iso, z, labels, randn_like=rl, num_steps=3, **opts)
        assert bool(torch.isfinite(out).all())
        assert (out[1:] - alone).abs().max().item() <= 1e-3       # float32 convolutions: batch-size rounding
        assert (out - same).abs().max().item() > 1e-3


def test_nfe_counts():
    net, _ = gaussian_oracle()
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for n in [1, 2, 5]:
        net.calls = 0
        aniso_sde(net, z, num_steps=n, S_churn=5)
        assert net.calls == 2 * n - 1
        for k in [0, 1, 3]:
            net.calls = 0
            pc(net, z, num_steps=n, corrector_steps=k)
            assert net.calls == n * (k + 1)


# ----------------------------------------------------------------------------------------------------------------------
# The corrector.


def test_langevin_step_on_an_isotropic_path_is_score_sdes_rule_per_sample():
    """On a SigmaPath (P = 0) one step is x + eps g + sqrt(2 eps) z with eps = 2 (snr ||z|| / ||g||)^2 per sample."""
    net = G.SigmaView(G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8))))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    path = noise_path(net, None, x)
    den = PathDenoiser(net, path)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    out = langevin_correct(path, den, x, 0.7, snr=0.16, steps=1, randn_like=lambda v: z.clone())
    g = (net(x, torch.tensor(0.7, dtype=torch.float64)) - x) / 0.7 ** 2
    eps = 2 * (0.16 * z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)) ** 2
    ref = x + eps[:, None, None, None] * g + (2 * eps)[:, None, None, None].sqrt() * z
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    calls = []
    assert torch.equal(langevin_correct(path, lambda *v: calls.append(1), x, 0.7, snr=0.1, steps=0), x)
    assert not calls
    with pytest.raises(ValueError, match='snr'):
        langevin_correct(path, den, x, 0.7, snr=0.0, steps=1)
    with pytest.raises(ValueError, match='steps'):
        langevin_correct(path, den, x, 0.7, snr=0.1, steps=-1)


def test_step_sizes_are_per_block():
    """Each block gets score-SDE's rule on its own norms: eps_P/eps_perp follows the blocks' score ratio."""
    net, _ = gaussian_oracle(with_mean=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    path = noise_path(net, None, x)
    g = path.apply(x, 2.0, 0.5)
    z = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eps_a, eps_b = snr_step_sizes(path, g, z, 0.1)
    pz, pg = path.project(z), path.project(g)
    ref_a = 2 * 0.01 * pz.flatten(1).square().sum(1) / pg.flatten(1).square().sum(1)
    ref_b = 2 * 0.01 * (z - pz).flatten(1).square().sum(1) / (g - pg).flatten(1).square().sum(1)
    assert torch.allclose(eps_a, ref_a) and torch.allclose(eps_b, ref_b)
    assert (eps_b / eps_a).min().item() > 5                 # the P_perp score is 4x smaller: steps 16x larger


@pytest.mark.parametrize('sigma', [0.05, 0.5, 5.0])
def test_corrector_at_a_fixed_level_keeps_the_exact_marginal(sigma):
    """100 Langevin steps at snr 0.02 on the anisotropic path, from the exact marginal N(mu, Lambda + M): the exact law
    moves every coefficient's variance by <= 1e-3 relative (and its mean not at all), while the same run at the
    wrong level (the isotropic sigma on both blocks) moves it by > 1e-2. The sampler's own run with the law's step
    sizes matches the law in Monte Carlo."""
    net, lam = gaussian_oracle(channels=1, res=16, with_mean=False)
    mask = G.oracle_mask(net)
    path = noise_path(net, None, torch.zeros(1, 1, 16, 16))
    a, b = (v[0] for v in path.split(sigma))
    s = torch.where(mask.bool().expand_as(lam), a, b)
    exact = lam + s ** 2
    mean, var, eps = G.langevin_law(lam, mask, (a, b), 100, 0.02)
    assert ((var - exact) / exact).abs().max().item() <= 1e-3
    assert mean.abs().max().item() == 0
    assert min(eps) > 0
    _, wrong, _ = G.langevin_law(lam, mask, (torch.tensor(sigma), torch.tensor(sigma)), 100, 0.02,
                                 start=(torch.zeros_like(lam), exact))
    assert ((wrong - exact) / exact).abs().max().item() > 1e-2
    # Monte Carlo: the sampler's corrector with the law's step sizes, paired with its start.
    n = 2000
    gen = torch.Generator().manual_seed(11)
    x0 = G.from_dct(torch.randn(n, 1, 16, 16, dtype=torch.float64, generator=gen) * exact.sqrt())
    paths = noise_path(net, None, x0)
    den = PathDenoiser(net, paths)
    rl = lambda v: torch.randn(v.shape, dtype=v.dtype, generator=gen)     # noqa: E731
    mean20, var20, eps20 = G.langevin_law(lam, mask, (a, b), 20, 0.02)
    x = langevin_correct(paths, den, x0, sigma, snr=0.02, steps=20, randn_like=rl, step_size=eps20)
    zm, zv = law_stats(x, mean20, var20)
    assert zm < 1.5 and zv < 1.5
    ratio = (G.to_dct(x).square().mean(0).sum() / G.to_dct(x0).square().mean(0).sum()).item()
    assert abs(ratio - var20.sum().item() / exact.sum().item()) < 3e-3


# ----------------------------------------------------------------------------------------------------------------------
# Exact laws.


def test_exact_laws_match_monte_carlo():
    """aniso_sde with churn and pc with two corrector steps on the anisotropic path over N(mu, diag lambda): the
    per-coefficient sample means and variances of 2500 runs agree with the exact law (pc with the law's step sizes,
    and within 2 % in total variance with the snr rule's own random step sizes); the deterministic law does not."""
    net, lam = gaussian_oracle()
    n = 2500
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(n, 3, 8, 8, dtype=torch.float64, generator=gen)
    rl = lambda v: torch.randn(v.shape, dtype=v.dtype, generator=gen)     # noqa: E731
    churn = dict(S_churn=10, S_min=0.05, S_max=50)
    x = aniso_sde(net, z, None, randn_like=rl, num_steps=8, **churn)
    mean, var, _ = G.stochastic_law(net, 'aniso_sde', 8, **churn)
    zm, zv = law_stats(x, mean, var)
    assert zm < 1.5 and zv < 1.5
    ode_mean, ode_var, _ = G.stochastic_law(net, 'aniso_sde', 8)
    assert law_stats(x, ode_mean, ode_var)[1] > 10

    mean, var, steps = G.stochastic_law(net, 'pc', 8, corrector_steps=2, snr=0.16)
    x = pc(net, z, None, randn_like=rl, num_steps=8, corrector_steps=2, corrector_step_size=steps.get)
    zm, zv = law_stats(x, mean, var)
    assert zm < 1.5 and zv < 1.5
    x = pc(net, z, None, randn_like=rl, num_steps=8, corrector_steps=2, snr=0.16)
    assert abs(G.to_dct(x).var(0).sum().item() / var.sum().item() - 1) < 0.02


def test_sde_law_without_churn_is_the_heun_law():
    """S_churn = 0: the law is the deterministic Heun gain of edm_aniso.gaussian.heun_factors, times s_0 z."""
    net, lam = gaussian_oracle(with_mean=False)
    mask = G.oracle_mask(net)
    path = noise_path(net, None, torch.zeros(1, 3, 8, 8))
    lev = path.grid(7)
    levels = torch.where(mask.bool()[None, :, :, None], lev.a[0], lev.b[0]).expand(3, 8, 8, -1)
    gain = G.heun_factors(lam, levels) * levels[..., 0]
    _, var, _ = G.stochastic_law(net, 'aniso_sde', 7)
    assert torch.allclose(var, gain ** 2, rtol=1e-12)


def _fds(net, lam, sampler, steps, **opts):
    return [G.law_frechet(*G.stochastic_law(net, sampler, n, **opts)[:2], lam) for n in steps]


@pytest.mark.parametrize('path', ['iso', 'aniso'])
def test_fd_falls_toward_zero_as_steps_grow(path):
    """Exact FD to the data law: aniso_sde (EDM's churn setting) falls monotonically to < 1e-5 by N = 1024 at an
    observed rate >= 3 (FD ~ N^-rate); pc without a corrector (the reverse SDE, weak order 1) at rate ~2; pc with a
    corrector falls until the unadjusted-Langevin floor, which scales as snr^4."""
    lam = G.power_law_variances(1, 16)
    dist = G.DCTGaussian(lam)
    net = G.SigmaView(G.OracleNet(dist)) if path == 'iso' else G.random_knot_oracle(dist, seed=1, scale=0.4)
    steps = [16, 32, 64, 128, 256, 512, 1024]
    rate = lambda f: math.log2(f[-3] / f[-1]) / 2            # noqa: E731  (slope over the last two doublings)
    sde = _fds(net, lam, 'aniso_sde', steps, S_churn=40, S_min=0.05, S_max=50)
    assert all(b < a for a, b in zip(sde, sde[1:])) and sde[-1] < 1e-5 and rate(sde) >= 3
    rsde = _fds(net, lam, 'pc', steps, corrector_steps=0)
    assert all(b < a for a, b in zip(rsde, rsde[1:])) and 1.8 <= rate(rsde) <= 2.2
    pc1 = _fds(net, lam, 'pc', steps, corrector_steps=1, snr=0.05)
    assert all(b < a for a, b in zip(pc1, pc1[1:])) and pc1[-1] < rsde[-1] / 3
    floor = [_fds(net, lam, 'pc', [4096], corrector_steps=1, snr=s)[0] for s in (0.16, 0.08)]
    assert 8 < floor[0] / floor[1] < 32                       # ~ (0.16/0.08)^4 = 16


# ----------------------------------------------------------------------------------------------------------------------
# Library errors and the command line.


def test_bad_library_arguments():
    net, _ = gaussian_oracle()
    z = torch.zeros(1, 3, 8, 8)
    for kw, msg in [(dict(snr=0), 'snr'), (dict(corrector_steps=-1), 'corrector_steps'),
                    (dict(corrector_steps=1.5), 'corrector_steps'), (dict(num_steps=0), 'num_steps')]:
        with pytest.raises(ValueError, match=msg):
            pc(net, z, **kw)
    for kw, msg in [(dict(S_churn=-1), 'S_churn'), (dict(num_steps=0), 'num_steps')]:
        with pytest.raises(ValueError, match=msg):
            aniso_sde(net, z, **kw)


@pytest.fixture(scope='module')
def net_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'net.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=tiny_edm()), f)
    return str(path)


def cli(args):
    return CliRunner().invoke(generate.build_cli(), args)


@pytest.mark.parametrize('args,message', [
    (['--sampler=edm', '--snr=0.1'], '--snr applies only to --sampler=pc'),
    (['--sampler=aniso_heun', '--corrector-steps=2'], '--corrector-steps applies only to --sampler=pc'),
    (['--sampler=aniso_sde', '--corrector-steps=2'], '--corrector-steps applies only to --sampler=pc'),
    (['--sampler=pc', '--S_churn=1'], '--S_churn applies only to --sampler=aniso_sde|edm'),
    (['--sampler=pc', '--snr=0'], "Invalid value for '--snr'"),
    (['--sampler=pc', '--corrector-steps=-1'], "Invalid value for '--corrector-steps'"),
    (['--sampler=aniso_sde', '--S_churn=-1'], "Invalid value for '--S_churn'"),
    (['--sampler=aniso_sde', '--S_min=5', '--S_max=1'], '--S_min must not exceed --S_max'),
    (['--sampler=pc', '--grid=schedule'], '--grid=schedule needs a network with a learned schedule'),
    (['--sampler=pc', '--corrector-steps=0', '--snr=0.1'], '--snr sets the corrector\'s step size'),
    (['--sampler=aniso_sde', '--sigma_min=5', '--sigma_max=1'], '--sigma_min < --sigma_max'),
])
def test_cli_bad_options(tmp_path, net_pkl, args, message):
    res = cli([f'--network={net_pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0', '--device=cpu'] + args)
    assert res.exit_code != 0
    assert message in res.output and 'Traceback' not in res.output, res.output
    assert sum(line.startswith('Error') for line in res.output.splitlines()) == 1
    assert not os.path.exists(tmp_path / 'out' / '000000.png')


def test_cli_writes_images_and_lists_options(tmp_path, net_pkl):
    for args in (['--sampler=aniso_sde', '--S_churn=10', '--S_noise=1.003'],
                 ['--sampler=pc', '--corrector-steps=1', '--snr=0.1']):
        out = tmp_path / args[0].split('=')[1]
        res = cli([f'--network={net_pkl}', f'--outdir={out}', '--seeds=0-1', '--steps=3', '--device=cpu'] + args)
        assert res.exit_code == 0, res.output
        assert sorted(os.listdir(out)) == ['000000.png', '000001.png']
    res = cli(['--help'])
    assert 'Options of --sampler=aniso_sde|edm' in res.output and 'Options of --sampler=pc' in res.output
    assert res.output.count('--S_churn') == 1 and '--corrector-steps' in res.output and '--snr' in res.output


def test_cli_images_do_not_depend_on_batch_size(tmp_path, net_pkl):
    """Through generate.py: the same seeds give the same PNGs with --batch=1 and --batch=3 (per-seed noise)."""
    import numpy as np
    import PIL.Image
    for args in (['--sampler=aniso_sde', '--S_churn=10'], ['--sampler=pc', '--corrector-steps=1']):
        outs = []
        for batch in (1, 3):
            out = tmp_path / f'{args[0].split("=")[1]}-{batch}'
            res = cli([f'--network={net_pkl}', f'--outdir={out}', '--seeds=0-2', '--steps=3', f'--batch={batch}',
                       '--device=cpu'] + args)
            assert res.exit_code == 0, res.output
            outs.append([np.asarray(PIL.Image.open(out / f'{s:06d}.png')) for s in range(3)])
        for one, three in zip(*outs):
            assert np.array_equal(one, three)
        assert not np.array_equal(outs[0][0], outs[0][1])
