"""The discretisation-aware objective (edm_aniso.disc_loss, docs/discretisation-objective.md) and --grid=schedule."""

import json
import os
import subprocess
import sys

import click
import pytest
import torch

import dnnlib
from edm_aniso import gaussian as G
from edm_aniso import plugin
from edm_aniso.disc_loss import DiscTerm, EnergyDiscLoss, parse_span, parse_steps
from edm_aniso.loss import AnisoStage1Loss, AnisoStage2Loss
from edm_aniso.path import edm_sigma_grid, noise_path
from edm_aniso.sampler import aniso_heun

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _mixture(res=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lam = G.power_law_variances(1, res)
    means = torch.randn([3, 1, res, res], dtype=torch.float64, generator=gen) * (0.6 * lam).sqrt()
    return G.DCTGaussianMixture(means, 0.4 * lam)


def _draws(disc, batch, seed=1, shape=(1, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    k, j = disc.draw(batch, generator=gen)
    eps = torch.randn([batch, *shape], dtype=torch.float64, generator=gen)
    return k, j, eps


def test_parse_steps():
    assert parse_steps('7') == (7, 7) and parse_steps('3-18') == (3, 18) and parse_steps([4, 9]) == (4, 9)
    for bad in ('0', '9-3', 'x', '3-'):
        with pytest.raises(ValueError):
            parse_steps(bad)
    k, j = DiscTerm(steps='3-5').draw(4000, generator=torch.Generator().manual_seed(0))
    assert set(k.tolist()) == {3, 4, 5} and bool((j >= 0).all()) and bool((j < k).all())
    assert set(j[k == 5].tolist()) == set(range(5))


def test_steps_chain_to_the_schedule_grid_sampler():
    """Step j of the K-step grid, chained j = 0..K-1 from the prior, is aniso_heun on --grid=schedule."""
    net = G.random_knot_oracle(_mixture(), seed=3)
    disc = DiscTerm(steps=6)
    z = torch.randn([3, 1, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for K in (1, 2, 6):
        lev = noise_path(net, None, z).grid(K, 'schedule')
        x = net.subspace.apply(z, lev.a[:, 0], lev.b[:, 0])
        for j in range(K):
            x = disc.step(net, x, None, torch.full([3], K), torch.full([3], j))
        torch.testing.assert_close(x, aniso_heun(net, z, num_steps=K, grid='schedule'), rtol=1e-13, atol=1e-13)


def test_parse_span_and_window_draws():
    assert parse_span(1) == 1 and parse_span('4') == 4 and parse_span('all') == 0 and parse_span('ALL') == 0
    for bad in ('0', '-2', 'x', '2.5'):
        with pytest.raises(ValueError):
            parse_span(bad)
    disc = DiscTerm(steps='3-6', span=4)
    k, j = disc.draw(6000, generator=torch.Generator().manual_seed(0))
    L = disc.window(k)
    assert torch.equal(L, k.clamp(max=4)) and bool((j >= 0).all()) and bool((j + L <= k).all())
    assert set(j[k == 6].tolist()) == {0, 1, 2} and set(j[k == 3].tolist()) == {0}
    k, j = DiscTerm(steps='3-6', span='all').draw(500, generator=torch.Generator().manual_seed(0))
    assert bool((j == 0).all())
    # span 1 draws what the one-step term always drew (same stream)
    a = DiscTerm(steps='3-9').draw(50, generator=torch.Generator().manual_seed(4))
    b = DiscTerm(steps='3-9', span=1).draw(50, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_whole_window_is_the_sampler_and_mixed_windows_batch():
    """span=all from the prior is aniso_heun on --grid=schedule; a batch of samples with different K and windows
    gives each sample what it gets alone."""
    net = G.random_knot_oracle(_mixture(), seed=3)
    z = torch.randn([3, 1, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    disc = DiscTerm(steps='2-7', span='all')
    for K in (1, 2, 7):
        lev = noise_path(net, None, z).grid(K, 'schedule')
        x = net.subspace.apply(z, lev.a[:, 0], lev.b[:, 0])
        kk = torch.full([3], K)
        x = disc.step(net, x, None, kk, torch.zeros_like(kk), count=disc.window(kk))
        torch.testing.assert_close(x, aniso_heun(net, z, num_steps=K, grid='schedule'), rtol=1e-13, atol=1e-13)
    disc = DiscTerm(steps='2-7', span=3, substeps=3)
    x0 = _mixture().sample(8, torch.Generator().manual_seed(3))
    k, j, eps = _draws(disc, 8)
    assert len(set(disc.window(k).tolist())) > 1
    with torch.no_grad():
        together = disc.compute(net, x0, None, k, j, eps)
        alone = torch.cat([disc.compute(net, x0[i:i + 1], None, k[i:i + 1], j[i:i + 1], eps[i:i + 1])
                           for i in range(8)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=0)
    assert bool((together > 0).all())


def test_whole_solve_term_is_the_squared_output_error():
    """span=all on a Gaussian: the term is ||K-step sampler output - fine solve||^2 at t = 0, and with the fine
    solve this close to exact it matches the closed-form output error of the sampler from the same start."""
    lam = G.power_law_variances(1, 8)
    net = G.random_knot_oracle(G.DCTGaussian(lam), seed=4)
    x0 = G.DCTGaussian(lam).sample(4, torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    K = 5
    disc = DiscTerm(steps=K, substeps=32, span='all', k_power=0.0)
    k = torch.full([4], K)
    with torch.no_grad():
        term = disc.compute(net, x0, None, k, torch.zeros_like(k), eps)
    x = x0 + net.subspace.apply(eps, *disc._levels(net, disc.step_times(net, k, k * 0, x0)[0], None))
    lev = noise_path(net, None, x).grid(K, 'schedule')
    mask = G.low_block_mask(8).bool()
    levels = torch.where(mask[..., None], lev.a[0], lev.b[0])                     # [1, 8, 8, K+1] per coefficient
    gain = G.heun_factors(lam, levels)
    exact = ((lam + 0.0) / (lam + levels[..., 0] ** 2)).sqrt()                     # the PF-ODE map to t = 0
    want = (G.to_dct(x) * (gain - exact)).square().flatten(1).sum(1)
    torch.testing.assert_close(term, want, rtol=2e-2, atol=0)
    vals = []
    for K in (8, 16):                                                              # the whole-solve error ~ K^-4
        d = DiscTerm(steps=K, substeps=8, span='all', k_power=0.0)
        kk = torch.full([4], K)
        with torch.no_grad():
            vals.append(float(d.compute(net, x0, None, kk, kk * 0, eps).sum()))
    assert 8 < vals[0] / vals[1] < 32                                               # 2^4 = 16


def test_reference_solve_converges_and_term_is_the_heun_local_error():
    """On a Gaussian the reference solve approaches the exact PF-ODE map; the term falls ~K^-5 (local error K^-3,
    squared, summed over K steps) on an interior step of the grid."""
    lam = G.power_law_variances(1, 8)
    net = G.random_knot_oracle(G.DCTGaussian(lam), seed=4)
    x0 = G.DCTGaussian(lam).sample(4, torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    disc = DiscTerm(steps=8)
    k, j = torch.full([4], 8), torch.full([4], 3)
    x = x0 + net.subspace.apply(eps, *disc._levels(net, disc.step_times(net, k, j, x0)[0], None))
    t_s, t_e, _ = disc.step_times(net, k, j, x0)
    (a0, b0), (a1, b1) = disc._levels(net, t_s, None), disc._levels(net, t_e, None)
    mask = G.low_block_mask(8).bool()
    s0, s1 = torch.where(mask, a0[0], b0[0]), torch.where(mask, a1[0], b1[0])
    exact = G.from_dct(G.to_dct(x) * ((lam + s1 ** 2) / (lam + s0 ** 2)).sqrt())   # x_k ∝ sqrt(λ_k + m_k)
    with torch.no_grad():
        errs = [float((disc.step(net, x, None, k, j, m) - exact).abs().max()) for m in (4, 8, 16)]
    assert 3 < errs[0] / errs[1] < 5 and 3 < errs[1] / errs[2] < 5                 # second order: ~4x per halving
    vals = []
    for K in (16, 32):
        d = DiscTerm(steps=K, substeps=8)
        kk, jj = torch.full([4], K), torch.full([4], K // 2)
        with torch.no_grad():
            vals.append(float(d.compute(net, x0, None, kk, jj, eps).sum()))
    assert 16 < vals[0] / vals[1] < 64                                                # 2^5 = 32


@pytest.mark.parametrize('stage, metric, span', [(1, 'denoiser', 1), (2, 'denoiser', 1), (2, 'data', 1),
                                                 (2, 'denoiser', 3), (2, 'denoiser', 'all')])
def test_theta_gradient_matches_finite_difference(stage, metric, span):
    """Autograd through the error term equals a central finite difference of the term (mixture oracle, float64)."""
    net = G.random_knot_oracle(_mixture(), seed=5)
    if stage == 1:
        net.schedule_h = net.schedule_g
    disc = DiscTerm(weight=0.7, steps='3-7', substeps=3, metric=metric, k_power=2.0, span=span)
    x0 = _mixture().sample(6, torch.Generator().manual_seed(3))
    k, j, eps = _draws(disc, 6)
    L = disc.window(k)
    j[0] = k[0] - L[0]                                                               # one window ends at t = 0
    if span != 'all':
        j[1] = 0
        k[1] = 7                                                                     # and one ends inside
    assert bool((j + L == k).any()) and (span == 'all' or bool((j + L < k).any()))
    theta = net.schedule_parameters()
    value = disc.compute(net, x0, None, k, j, eps).sum()
    grads = torch.autograd.grad(value, theta)
    gen = torch.Generator().manual_seed(9)
    dirs = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in theta]
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs))
    delta = 1e-5

    def at(sign):
        with torch.no_grad():
            for p, d in zip(theta, dirs):
                p.add_(sign * delta * d)
            v = disc.compute(net, x0, None, k, j, eps).sum()
            for p, d in zip(theta, dirs):
                p.sub_(sign * delta * d)
        return v
    fd = (at(1) - at(-1)) / (2 * delta)
    assert abs(float(analytic)) > 1e-3
    assert abs(float(analytic - fd)) <= 1e-6 * abs(float(fd)) + 1e-9


def _tiny_aniso(stage):
    from edm_aniso.precond import AnisoPrecond
    torch.manual_seed(0)
    return AnisoPrecond(img_resolution=8, img_channels=1, label_dim=0, stage=stage,
                        subspace='iso' if stage == 1 else 'dct', model_type='SongUNet', model_channels=8,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


def _loss_and_grads(loss_fn, net, images, seed):
    torch.manual_seed(seed)
    for p in net.parameters():
        p.grad = None
    loss = loss_fn(net, images, None)
    loss.sum().backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in net.parameters()]


@pytest.mark.parametrize('stage', [1, 2])
def test_disc_weight_zero_is_the_energy_objective_bit_for_bit(stage):
    net = _tiny_aniso(stage)
    images = torch.randn([4, 1, 8, 8], generator=torch.Generator().manual_seed(1)) * 0.5
    energy = dict(class_name='edm_aniso.loss.AnisoStage1Loss') if stage == 1 else \
        dict(class_name='edm_aniso.loss.AnisoStage2Loss', probes=1)
    plain = AnisoStage1Loss() if stage == 1 else AnisoStage2Loss(probes=1)
    ref_loss, ref_grads = _loss_and_grads(plain, net, images, 7)
    loss, grads = _loss_and_grads(EnergyDiscLoss(energy, disc_weight=0.0), net, images, 7)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert (g is None and r is None) or torch.equal(g, r)
    # Not vacuous: a positive weight changes the value and the schedule gradient, and with the network detached
    # (the default) the network weights get exactly the energy gradient.
    loss2, grads2 = _loss_and_grads(EnergyDiscLoss(energy, disc_weight=1.0, disc_steps='3-5'), net, images, 7)
    assert not torch.equal(loss2, ref_loss)
    theta_ids = {id(p) for p in net.schedule_parameters()}
    for p, g, r in zip(net.parameters(), grads2, ref_grads):
        if id(p) in theta_ids:
            assert not torch.equal(g, r)
        elif r is not None:
            assert torch.equal(g, r)
    _, grads3 = _loss_and_grads(EnergyDiscLoss(energy, disc_weight=1.0, disc_steps='3-5', disc_detach_net=False),
                                net, images, 7)
    assert any(id(p) not in theta_ids and r is not None and not torch.equal(g, r)
               for p, g, r in zip(net.parameters(), grads3, ref_grads))
    assert all(p.requires_grad for p in net.parameters())                             # restored after the term


def test_karras_grid_outputs_unchanged_bit_for_bit():
    """--grid=karras (the default) is today's sampler: levels F^-1 of EDM's sigmas, the Heun loop of method.md §6."""
    lam = G.power_law_variances(1, 8)
    net = G.random_knot_oracle(G.DCTGaussian(lam), seed=6)
    z = torch.randn([2, 1, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for n in (1, 4, 9):
        out = aniso_heun(net, z, num_steps=n)
        assert torch.equal(out, aniso_heun(net, z, num_steps=n, grid='karras'))
        path = noise_path(net, None, z)
        a, b = net.levels(edm_sigma_grid(n, 0.002, 80.0, 7.0), None, batch=2)
        x = path.apply(z, a[:, 0], b[:, 0])
        for i in range(n):
            f = net.flow(x, a[:, i] ** 2, b[:, i] ** 2, basis_id=path.basis_id)
            da, db = a[:, i + 1] - a[:, i], b[:, i + 1] - b[:, i]
            x_next = x - path.apply(f, da, db)
            if i < n - 1:
                f2 = net.flow(x_next, a[:, i + 1] ** 2, b[:, i + 1] ** 2, basis_id=path.basis_id)
                x_next = x - path.apply((f + f2) / 2, da, db)
            x = x_next
        assert torch.equal(out, x)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration.


def _config(**opts):
    c = dnnlib.EasyDict(network_kwargs=dnnlib.EasyDict(model_type='SongUNet', use_fp16=False),
                        loss_kwargs=dnnlib.EasyDict(),
                        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=1e-3), total_kimg=100,
                        batch_size=64)
    base = dict(cond=False, duration=0.1, transfer=None, outdir='.', dry_run=False)
    base.update(opts)
    plugin.configure(c, dnnlib.EasyDict(base))
    return c


def test_configure_objective():
    assert _config().loss_kwargs.class_name == 'edm_aniso.loss.AnisoStage1Loss'
    assert _config(objective='energy').loss_kwargs.class_name == 'edm_aniso.loss.AnisoStage1Loss'
    c = _config(stage=2, objective='energy+disc', disc_weight=0.3, disc_steps='4-9', kappa=0.5)
    kw = c.loss_kwargs
    assert kw.class_name == 'edm_aniso.disc_loss.EnergyDiscLoss'
    assert kw.energy == dict(class_name='edm_aniso.loss.AnisoStage2Loss', kappa=0.5, probes=1, estimator_every=1)
    assert kw.disc_weight == 0.3 and kw.disc_steps == [4, 9] and kw.disc_substeps == 4 and kw.disc_detach_net
    assert kw.disc_metric == 'denoiser' and kw.disc_k_power == 3.0 and kw.disc_span == 1
    loss = dnnlib.util.construct_class_by_name(**kw)
    assert isinstance(loss.energy, AnisoStage2Loss) and loss.energy.kappa == 0.5 and loss.disc.steps == (4, 9)
    c1 = _config(objective='energy+disc', disc_detach_net=False, disc_metric='data', disc_k_power=0.0)
    assert c1.loss_kwargs.disc_metric == 'data' and c1.loss_kwargs.disc_k_power == 0.0
    assert c1.loss_kwargs.energy['class_name'] == 'edm_aniso.loss.AnisoStage1Loss'
    assert c1.loss_kwargs.disc_steps == [5, 18] and c1.loss_kwargs.disc_weight == 1.0
    assert not c1.loss_kwargs.disc_detach_net
    c2 = _config(stage=2, objective='energy+disc', disc_span='all')
    assert c2.loss_kwargs.disc_span == 0 and dnnlib.util.construct_class_by_name(**c2.loss_kwargs).disc.span == 0
    assert _config(objective='energy+disc', disc_span='3').loss_kwargs.disc_span == 3


@pytest.mark.parametrize('opts, message', [
    (dict(disc_weight=1.0), '--disc-weight applies only to --objective=energy\\+disc'),
    (dict(objective='energy', disc_steps='5'), '--disc-steps applies only'),
    (dict(disc_metric='data'), '--disc-metric applies only'),
    (dict(objective='energy+disc', disc_steps='9-3'), '--disc-steps'),
    (dict(objective='energy+disc', disc_steps='five'), '--disc-steps'),
    (dict(disc_span='all'), '--disc-span applies only'),
    (dict(objective='energy+disc', disc_span='0'), '--disc-span: disc span must be'),
])
def test_configure_objective_errors(opts, message):
    with pytest.raises(click.ClickException, match=message):
        _config(**opts)


# ----------------------------------------------------------------------------------------------------------------------
# Two processes equal one.


@pytest.mark.slow
@pytest.mark.parametrize('span', [1, 3])
def test_energy_disc_two_ranks_equal_one_process(tmp_path, span):
    """As tests/test_aniso_distributed.py, with --objective=energy+disc (stage 2, estimator on, disc term; span 3:
    windows of 3 steps, shorter where K is)."""
    import datagen
    import disc_deterministic
    import aniso_deterministic
    from training import training_loop as loop
    data = str(tmp_path / 'tiny-8x8.zip')
    datagen.make_dataset_zip(data, 16, 8, num_classes=2)

    def kwargs(run_dir, batch_gpu):
        os.makedirs(run_dir, exist_ok=True)
        return dict(run_dir=str(run_dir),
                    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                                        xflip=False),
                    data_loader_kwargs=dict(num_workers=0),
                    network_kwargs=dict(class_name='edm_aniso.precond.AnisoPrecond', stage=2, subspace='dct',
                                        per_class=True, model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
                                        num_blocks=1, attn_resolutions=[], dropout=0.0),
                    loss_kwargs=dict(class_name='disc_deterministic.DeterministicDiscLoss', disc_weight=1e-5,
                                     disc_steps=[3, 6], disc_substeps=2, disc_span=span),
                    optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=300.0),
                    schedule_optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=100.0),
                    augment_kwargs=None, seed=0, batch_size=8, batch_gpu=batch_gpu, total_kimg=0.032,
                    ema_halflife_kimg=0.01, lr_rampup_kimg=0, kimg_per_tick=0.008, snapshot_ticks=1,
                    state_dump_ticks=1, device='cpu')

    with open(tmp_path / 'two.json', 'w') as f:
        json.dump(kwargs(tmp_path / 'two', 4), f)
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([TESTS, ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(TESTS, 'aniso_deterministic.py'), str(tmp_path / 'two.json')],
                         cwd=str(tmp_path), capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    aniso_deterministic.LIVE.clear()
    loop.training_loop(**kwargs(tmp_path / 'one', 8))
    init = aniso_deterministic.LIVE['init']
    assert disc_deterministic.CALLS['disc'] > 0
    one = torch.load(tmp_path / 'one' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    two = torch.load(tmp_path / 'two' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    aniso_deterministic.assert_updates_agree(one['net'].state_dict(), two['net'].state_dict(), init)


def test_energy_disc_loss_pickles_with_its_options():
    """Snapshots pickle loss_fn (EDM's format): the wrapper and its energy loss round-trip."""
    import pickle
    loss = EnergyDiscLoss(dict(class_name='edm_aniso.loss.AnisoStage2Loss', kappa=0.5), disc_weight=0.2,
                          disc_steps='4-6', disc_metric='data', disc_k_power=1.5, disc_span='all')
    back = pickle.loads(pickle.dumps(loss))
    assert isinstance(back.energy, AnisoStage2Loss) and back.energy.kappa == 0.5 and back.explicit_grad_sync
    assert (back.disc.weight, back.disc.steps, back.disc.metric, back.disc.k_power) == (0.2, (4, 6), 'data', 1.5)
    assert back.disc.span == 0
    old = DiscTerm(steps='4-6')                          # a term pickled before --disc-span has no span: one step
    del old.__dict__['span']
    k = torch.tensor([4, 5, 6])
    assert torch.equal(old.window(k), torch.ones_like(k))
    with pytest.raises(ValueError, match='metric'):
        DiscTerm(metric='l2')
