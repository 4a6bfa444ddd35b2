"""edm_aniso.path: the noise path shared by samplers and likelihood (levels, slopes, grids, prior, noise moves)."""

import math

import click
import pytest
import torch

from edm_aniso import gaussian as G
from edm_aniso.path import PathDenoiser, SchedulePath, SigmaPath, edm_sigma_grid, noise_path
from edm_aniso.schedule import KnotSchedule


def knot_oracle(res=8, channels=1, label_dim=0, scale=0.4, seed=3):
    """An exact oracle with random anisotropic knot schedules (a bank when label_dim > 0)."""
    return G.random_knot_oracle(G.DCTGaussian(G.power_law_variances(channels, res)), seed, scale, label_dim)


def test_sigma_path_is_edm():
    dist = G.DCTGaussian(G.power_law_variances(2, 8))
    net = G.OracleNet(dist)
    view = type('EDMNet', (), dict(sigma_min=0.002, sigma_max=80.0, img_channels=2, img_resolution=8))()
    path = SigmaPath(view, batch=3)
    a, b = path.split(torch.tensor([[0.5, 2.0]]))
    assert torch.equal(a, b) and a.shape == (3, 2) and float(a[1, 1]) == 2.0
    ka, kb = path.log_slopes(0.7)
    assert torch.equal(ka, torch.ones(3)) and torch.equal(kb, torch.ones(3))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    D = net(x, 0.7)
    assert torch.allclose(path.ode_derivative(x, D, 0.7), x - D, atol=0, rtol=0)
    # prior: N(0, 80^2 I)
    expect = -0.5 * (x.square().flatten(1).sum(1) / 6400 + 128 * math.log(2 * math.pi * 6400))
    assert torch.allclose(path.prior_logp(x), expect, rtol=1e-12)
    with pytest.raises(ValueError, match='grid=schedule'):
        path.grid(4, 'schedule')


def test_schedule_path_levels_times_and_slopes():
    net = knot_oracle(label_dim=3)
    labels = torch.eye(3)[[2, 0, 1, 2]]
    path = noise_path(net, labels, torch.zeros(4, 1, 8, 8))
    assert isinstance(path, SchedulePath)
    sig = torch.tensor([[0.01, 0.3, 4.0, 60.0]], dtype=torch.float64)
    a, b = path.split(sig)
    assert torch.allclose(a * b, sig.expand(4, -1).square(), rtol=1e-10)
    assert not torch.allclose(a, b, rtol=1e-2)
    assert torch.allclose(a[0], a[3]) and not torch.allclose(a[0], a[1])        # rows per sample
    t = path.time(sig)
    assert torch.allclose(path.sigma_at_time(t), sig.expand(4, -1), rtol=1e-10)
    assert torch.allclose(torch.stack(path.split_at_time(t)), torch.stack([a, b]), rtol=1e-10)
    ka, kb = path.log_slopes(sig)
    assert torch.allclose(ka + kb, torch.full_like(ka, 2.0), rtol=1e-12)
    eps = 1e-6                                                                  # d ln a / d ln sigma, central FD
    up, down = path.split(sig * math.exp(eps)), path.split(sig * math.exp(-eps))
    fd_a = (up[0].log() - down[0].log()) / (2 * eps)
    assert torch.allclose(ka, fd_a, rtol=1e-5)


def test_karras_grid_equals_network_levels_and_schedule_grid_is_uniform_in_t():
    net = knot_oracle()
    path = noise_path(net, None, torch.zeros(2, 1, 8, 8))
    lev = path.grid(6, 'karras', 0.002, 80, 7)
    a, b = net.levels(edm_sigma_grid(6, 0.002, 80, 7), None)
    assert torch.equal(lev.a, a.expand(2, -1)) and torch.equal(lev.b, b.expand(2, -1))
    assert torch.allclose(lev.sigma[:, :-1], edm_sigma_grid(6, 0.002, 80, 7)[None].expand(2, -1), rtol=1e-12)
    sch = path.grid(6, 'schedule', 0.002, 80)
    steps = sch.t.diff(dim=1)
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), rtol=1e-9)       # N uniform steps of t down to 0
    assert torch.allclose(sch.t[:, 0], path.time(80.0), rtol=1e-12) and float(sch.t[0, -1]) == 0.0
    assert torch.allclose(sch.sigma[:, 0], torch.full([2], 80.0, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(sch.sigma[:, :-1], path.sigma_at_time(sch.t[:, :-1]), rtol=1e-12)
    assert torch.allclose(sch.a * sch.b, sch.sigma.square(), rtol=1e-10)
    assert float(sch.a[0, -1]) == float(sch.b[0, -1]) == 0.0
    assert bool((sch.sigma[:, 1:] < sch.sigma[:, :-1]).all())
    with pytest.raises(ValueError, match='unknown grid'):
        path.grid(6, 'uniform')


def test_ratio_path_slopes_by_autograd():
    r = lambda s: 0.3 * torch.sin(torch.log(s))                            # noqa: E731
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)), G.ratio_levels(r))
    path = noise_path(net, None, torch.zeros(1, 1, 8, 8))
    s = torch.tensor([[0.1, 1.0, 10.0]], dtype=torch.float64)
    ka, kb = path.log_slopes(s)
    assert torch.allclose(ka, 1 + 0.3 * torch.cos(torch.log(s)), rtol=1e-12)
    assert torch.allclose(kb, 1 - 0.3 * torch.cos(torch.log(s)), rtol=1e-12)


def test_add_noise_moves_the_exact_marginal_up_the_path():
    """Per DCT coefficient, Var(x at sigma') = lam + m(sigma'): adding the path's noise to samples at sigma must give it."""
    net = knot_oracle(channels=1)
    lam = net.dist.variances
    n = 20000
    x0 = net.dist.sample(n, torch.Generator().manual_seed(0))
    path = noise_path(net, None, x0)
    s0, s1 = 0.3, 2.0
    a0, b0 = path.split(s0)
    x = x0 + path.apply(torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), a0, b0)
    x = path.add_noise(x, torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
                       s0, s1)
    a1, b1 = path.split(s1)
    mask = net.subspace.masks[0]
    expect = lam + mask * a1[0] ** 2 + (1 - mask) * b1[0] ** 2
    var = G.to_dct(x).var(dim=0)
    assert ((var / expect - 1).abs().max() < 0.06)                        # 20k samples: s.e. of a variance ~1%
    assert ((var / expect - 1).abs().mean() < 0.015)


def test_prior_logp_matches_dense_gaussian():
    net = knot_oracle(channels=2)
    path = noise_path(net, None, torch.zeros(3, 2, 8, 8))
    path.sigma_max = 3.0                                                   # a level where g != h
    a, b = path.split(3.0)
    assert abs(float(a[0] / b[0]) - 1) > 1e-2
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Dense covariance of M(3) in pixel space: columns are M applied to basis vectors.
    eye = torch.eye(128, dtype=torch.float64).reshape(128, 2, 8, 8)
    cov = net.subspace.apply(eye, a[0] ** 2, b[0] ** 2).reshape(128, 128)
    ref = torch.distributions.MultivariateNormal(torch.zeros(128, dtype=torch.float64), covariance_matrix=cov)
    assert torch.allclose(path.prior_logp(x), ref.log_prob(x.reshape(3, -1)), rtol=1e-10)
    assert path.dims == (2 * 16, 128 - 32)


def test_denoiser_counts_and_flow():
    net = knot_oracle()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    path = noise_path(net, None, x)
    den = PathDenoiser(net, path)
    a, b = path.split(1.5)
    D = den(x, a, b)
    f = den.flow(x, a, b)
    assert den.calls == 2
    assert torch.allclose(den.denoised_from_flow(x, f, a, b), D, rtol=1e-12, atol=1e-12)
    assert torch.allclose(path.score(x, D, 1.5), path.apply(f, 1 / a, 1 / b), rtol=1e-12)


def test_shared_sampler_option_is_refused_for_other_samplers():
    pytest.importorskip('edm_aniso.plugin')
    from training import registry
    owners = registry.option_owners(registry.SAMPLERS)
    assert 'aniso_heun' in owners['grid'][0].split('|')
    registry.check_foreign_options(registry.SAMPLERS, 'aniso_heun', dict(grid='schedule'), '--sampler')
    with pytest.raises(click.ClickException, match='--grid applies only to --sampler='):
        registry.check_foreign_options(registry.SAMPLERS, 'aniso_rk2', dict(grid='schedule'), '--sampler')
    with pytest.raises(click.ClickException, match='--grid applies only to'):
        registry.check_foreign_options(registry.SAMPLERS, 'edm', dict(grid='karras'), '--sampler')
