"""Multistep samplers (edm_aniso.multistep): isotropic reduction, k-diffusion reference, observed orders on exact
Gaussians, NFE counts, registry entries."""

import contextlib
import importlib.util
import os
import sys
import types

import click
import numpy as np
import pytest
import torch

from edm_aniso import gaussian as G
from edm_aniso.multistep import CLASSICAL_AB, SAMPLER_ENTRIES, ab_weights, dpmpp_2m, dpmpp_3m, ipndm
from edm_aniso.path import edm_sigma_grid, noise_path
from edm_aniso.schedule import KnotSchedule
from tiny_nets import TINY, tiny_edm

SAMPLERS = {'dpmpp_2m': dpmpp_2m, 'dpmpp_3m': dpmpp_3m, 'ipndm': ipndm}
ORDERS = {'dpmpp_2m': 2, 'dpmpp_3m': 3, 'ipndm': 4}


def knot_schedules(scale, seed):
    sg, sh = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sg.u.add_(scale * torch.randn(sg.u.shape, generator=gen, dtype=torch.float64))
        sh.u.add_(scale * torch.randn(sh.u.shape, generator=gen, dtype=torch.float64))
    return sg, sh


# ----------------------------------------------------------------------------------------------------------------------
# Isotropic reduction and NFE.


@pytest.mark.parametrize('label_dim,stage', [(0, 1), (4, 1), (0, 2)])
@pytest.mark.parametrize('name', list(SAMPLERS))
def test_aniso_precond_with_g_equal_h_is_the_sampler_on_its_edm_network(name, label_dim, stage):
    """A stage-1 AnisoPrecond (random learned g, M = g I), or a stage-2 one on the DCT split with h = g, on its path
    gives the same images as the sampler on the EDM network it was transferred from."""
    precond = pytest.importorskip('edm_aniso.precond')
    edm = tiny_edm(label_dim)
    kw = dict(TINY, label_dim=label_dim)
    del kw['model_type']
    aniso = precond.AnisoPrecond(stage=stage, per_class=label_dim > 0, subspace='iso' if stage == 1 else 'dct',
                                 model_type='SongUNet', **kw).eval()
    aniso.transfer_from(edm)
    with torch.no_grad():
        aniso.schedule_g.u.add_(0.5 * torch.randn(aniso.schedule_g.u.shape, generator=torch.Generator().manual_seed(5)))
        if stage == 2:
            aniso.schedule_h.load_rows_from(aniso.schedule_g)
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.eye(label_dim)[[0, 1, 3, 1]] if label_dim else None
    ref = SAMPLERS[name](edm, z, labels, num_steps=6)
    out = SAMPLERS[name](aniso, z, labels, num_steps=6)
    assert ref.dtype == out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= 1e-5
    assert ref.abs().max().item() > 0.05


@pytest.mark.parametrize('name', list(SAMPLERS))
def test_nfe_is_the_number_of_levels(name):
    """Every N >= 1 is possible and costs exactly N network evaluations (counted by a forward hook)."""
    net = tiny_edm()
    calls = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        for n in [1, 2, 3, 4, 7]:
            calls.clear()
            out = SAMPLERS[name](net, z, num_steps=n)
            assert len(calls) == n
            assert bool(torch.isfinite(out).all())
    finally:
        handle.remove()
    oracle = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)), schedule_g=knot_schedules(0.3, 0)[0],
                         schedule_h=knot_schedules(0.3, 0)[1])
    for n in [1, 5]:
        oracle.calls = 0
        SAMPLERS[name](oracle, torch.zeros(3, 1, 8, 8), num_steps=n, grid='schedule')
        assert oracle.calls == n


def test_one_level_is_the_denoised_prior_sample():
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)), G.ratio_levels(lambda s: 0.3 + 0 * s))
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    path = noise_path(net, None, z)
    a, b = path.split(80.0)
    x0 = path.apply(z, a, b)
    for fn in SAMPLERS.values():
        assert torch.allclose(fn(net, z, num_steps=1), net(x0, None, g=a ** 2, h=b ** 2), rtol=1e-12, atol=1e-12)


class RoundedEDM(torch.nn.Module):
    """An EDM-style network (only net(x, sigma, labels)) whose round_sigma merges levels above 1 to integers."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle, self.calls = oracle, 0
        self.sigma_min, self.sigma_max, self.label_dim = 0.002, 80.0, 0
        self.img_channels, self.img_resolution = oracle.img_channels, oracle.img_resolution

    def round_sigma(self, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.where(s > 1, s.round(), s)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.oracle(x, sigma)


def test_merged_levels_are_skipped():
    """Zero steps (levels merged by round_sigma) cost no evaluation and change nothing."""
    net = RoundedEDM(G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8))))
    z = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    levels = net.round_sigma(edm_sigma_grid(60, 0.002, 80, 7))
    distinct = int(torch.unique(levels).numel())
    assert distinct < 60
    for name, fn in SAMPLERS.items():
        net.calls = 0
        out = fn(net, z, num_steps=60)
        assert net.calls == distinct, name
        unrounded = fn(net.oracle, z, num_steps=60)
        assert bool(torch.isfinite(out).all()) and (out - unrounded).abs().max() < 0.02 * out.abs().max(), name


# ----------------------------------------------------------------------------------------------------------------------
# Observed orders on exact Gaussians.


def exact_denoised_end(net, lam):
    """The limit of a fine solve (G.exact_denoised_gain) for the net's Karras levels 80 -> 0.002."""
    lev = noise_path(net, None, torch.zeros(1, *lam.shape)).grid(2, 'karras')
    return G.exact_denoised_gain(lam[0], net.subspace.masks[0], (lev.a[0, 0], lev.b[0, 0]), (lev.a[0, 1], lev.b[0, 1]))


def observed_order(fn, net, lam, steps):
    """Least-squares slope of -log(max relative coefficient error) against log N, and the errors."""
    res = lam.shape[-1]
    ref = exact_denoised_end(net, lam)
    latent = G.from_dct(torch.ones(1, 1, res, res, dtype=torch.float64))
    errs = [((G.to_dct(fn(net, latent, num_steps=n))[0, 0] - ref).abs() / ref.abs()).max().item() for n in steps]
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


ORDER_STEPS = [32, 64, 128, 256]


def order_nets():
    lam = G.power_law_variances(1, 8)
    dist = G.DCTGaussian(lam)
    sg, sh = knot_schedules(0.4, 1)
    return lam, {
        'isotropic': G.OracleNet(dist),
        'smooth split': G.OracleNet(dist, G.ratio_levels(lambda s: 0.5 * torch.sin(torch.log(s)) *
                                                         (1 - (s / 80) ** 2))),
        'knot schedules': G.OracleNet(dist, schedule_g=sg, schedule_h=sh),
    }


@pytest.mark.parametrize('name', list(SAMPLERS))
def test_observed_order_on_the_karras_grid(name):
    """Error against the exact solution as N doubles (32 -> 256): the nominal order within 0.3, for g = h, a smooth
    split and random knot schedules (g != h, ln(a/b) from -0.9 to 0)."""
    lam, nets = order_nets()
    for label, net in nets.items():
        if label == 'knot schedules':
            lev = noise_path(net, None, torch.zeros(1, 1, 8, 8)).grid(18, 'karras')
            assert float((lev.a[0, :-1] / lev.b[0, :-1]).log().abs().max()) > 0.5     # clearly anisotropic
        order, errs = observed_order(SAMPLERS[name], net, lam, ORDER_STEPS)
        assert abs(order - ORDERS[name]) <= 0.3, (label, order, errs)
        assert errs[-1] < 1e-3, (label, errs)


def test_common_forms_have_order_two():
    """The forms this module does not use: k-diffusion's/DPM-Solver's 3M coefficient (second_difference=0.5) and the
    original iPNDM's fixed weights are second order on the Karras grid (the reason for the corrected forms)."""
    lam, nets = order_nets()
    net = nets['isotropic']
    common, _ = observed_order(lambda *a, **k: dpmpp_3m(*a, second_difference=0.5, **k), net, lam, [256, 512, 1024])
    fixed, _ = observed_order(lambda *a, **k: ipndm(*a, fixed_weights=True, **k), net, lam, [128, 256, 512])
    assert abs(common - 2) <= 0.3 and abs(fixed - 2) <= 0.3, (common, fixed)


def test_ab_weights():
    """Equal steps give the classical Adams-Bashforth weights; any nodes integrate cubics exactly."""
    steps = [torch.tensor([4.0 - k], dtype=torch.float64) for k in range(4)]      # 4, 3, 2, 1 -> target 5
    for k in range(1, 5):
        w = ab_weights(steps[:k], torch.tensor([5.0], dtype=torch.float64))
        assert torch.allclose(torch.cat(w), torch.tensor(CLASSICAL_AB[k - 1], dtype=torch.float64), rtol=1e-12)
    nodes = [torch.tensor([v], dtype=torch.float64) for v in (1.3, 2.0, 4.5, 9.0)]
    target = torch.tensor([0.2], dtype=torch.float64)
    cubic = lambda s: 0.3 * s ** 3 - s ** 2 + 2 * s - 0.7                              # noqa: E731
    exact = (lambda s: 0.075 * s ** 4 - s ** 3 / 3 + s ** 2 - 0.7 * s)(target) - \
        (lambda s: 0.075 * s ** 4 - s ** 3 / 3 + s ** 2 - 0.7 * s)(nodes[0])
    w = ab_weights(nodes, target)
    assert torch.allclose(sum(wj * cubic(n) for wj, n in zip(w, nodes)), exact, rtol=1e-12)
    # In tau = s^(1/7): a cubic in tau is integrated exactly in s.
    cubic_tau = lambda s: cubic(s ** (1 / 7))                                           # noqa: E731
    w = ab_weights(nodes, target, rho=7.0)
    t0, t1 = nodes[0] ** (1 / 7), target ** (1 / 7)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    tau = t0 + (t1 - t0) * grid
    integrand = cubic(tau) * 7 * tau ** 6 * (t1 - t0)
    quad = torch.trapezoid(integrand, grid)
    assert torch.allclose(sum(wj * cubic_tau(n) for wj, n in zip(w, nodes)), quad, rtol=1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample paths, callbacks, options.


def test_class_conditional_paths_are_per_sample():
    """Each sample follows its own class's split and basis: a batch equals its samples run one by one."""
    res, lam = 8, G.power_law_variances(1, 8)
    ratios = lambda s: torch.stack([0 * s, 0.5 + 0 * s, -0.4 * torch.log(s) / 5])        # noqa: E731
    masks = torch.stack([G.low_block_mask(res, 4), G.low_block_mask(res, 2)])
    net = G.OracleNet(G.DCTGaussianMixture(torch.randn(3, 1, res, res, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(0)) * 0.3, lam),
                      G.ratio_levels(ratios), G.MaskedDCTSubspace(masks), label_dim=3, basis_of_class=[0, 1, 1])
    classes = [2, 0, 1, 2]
    labels = torch.eye(3)[classes]
    z = torch.randn(4, 1, res, res, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for fn in SAMPLERS.values():
        batch = fn(net, z, labels, num_steps=7)
        single = torch.cat([fn(net, z[k:k + 1], labels[k:k + 1], num_steps=7) for k in range(4)])
        assert torch.allclose(batch, single, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(batch[0], fn(net, z[:1], torch.eye(3)[[0]], num_steps=7)[0], rtol=1e-3)


def test_callback_and_trajectory(tmp_path):
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)), G.ratio_levels(lambda s: 0.2 + 0 * s))
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, fn in SAMPLERS.items():
        seen = []
        out = fn(net, z, num_steps=5, callback=seen.append, trajectory=str(tmp_path / name), seeds=[3, 4])
        assert [d['i'] for d in seen] == list(range(5))
        assert torch.equal(seen[-1]['denoised'], out)                                  # x_N = D_{N-1}
        assert torch.equal(out, fn(net, z, num_steps=5))
        assert sorted(os.listdir(tmp_path / name)) == ['000003-traj.png', '000004-traj.png']


def test_schedule_grid_and_bad_options():
    sg, sh = knot_schedules(0.3, 2)
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)), schedule_g=sg, schedule_h=sh)
    z = G.from_dct(torch.ones(1, 1, 8, 8, dtype=torch.float64))
    for fn in SAMPLERS.values():
        assert not torch.allclose(fn(net, z, num_steps=8, grid='schedule'), fn(net, z, num_steps=8), rtol=1e-3)
    edm_like = tiny_edm()
    for entry in SAMPLER_ENTRIES:
        entry.check(net, dict(num_steps=1))                                             # valid
        with pytest.raises(click.ClickException, match='--steps must be >= 1'):
            entry.check(net, dict(num_steps=0))
        with pytest.raises(click.ClickException, match='--grid=schedule needs a network with a learned schedule'):
            entry.check(edm_like, dict(num_steps=4, grid='schedule'))
    with pytest.raises(ValueError, match='max_order'):
        ipndm(net, z, num_steps=3, max_order=5)


def test_generate_runs_the_multistep_samplers(tmp_path):
    generate = pytest.importorskip('generate')
    precond = pytest.importorskip('edm_aniso.precond')
    pytest.importorskip('edm_aniso.plugin')
    from training import registry
    assert {'dpmpp_2m', 'dpmpp_3m', 'ipndm'} <= set(registry.SAMPLERS)
    kw = dict(TINY, label_dim=3)
    net = precond.AnisoPrecond(stage=2, subspace='dct', per_class=True, **kw).eval()
    with torch.no_grad():
        net.schedule_h.u.add_(0.3 * torch.randn(net.schedule_h.u.shape))
    for name in ['dpmpp_2m', 'ipndm']:
        paths = generate.generate_images(net, str(tmp_path / name), seeds=[0, 7, 9], max_batch_size=2, sampler=name,
                                         device='cpu', progress=False, num_steps=3, grid='schedule')
        assert len(paths) == 3
    registry.check_foreign_options(registry.SAMPLERS, 'ipndm', dict(grid='karras'), '--sampler')
    with pytest.raises(click.ClickException, match='--grid applies only to'):
        registry.check_foreign_options(registry.SAMPLERS, 'edm', dict(grid='karras'), '--sampler')


# ----------------------------------------------------------------------------------------------------------------------
# k-diffusion as an outside reference (runs where its sampling module is importable: pip install --no-deps k-diffusion).

_UNUSED_BY_SAMPLING = ['torchdiffeq', 'torchsde', 'torchvision', 'torchvision.transforms',
                       'torchvision.transforms.functional', 'safetensors']


class _Unavailable:
    """What a placeholder module hands out for ``from X import Y``: fails only if it is used."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f'{self.name} is not installed')


@contextlib.contextmanager
def _placeholders(names):
    """Empty modules for imports that k-diffusion's sampling.py and utils.py make but the samplers here never use,
    present only while they load (and only where the real package is not installed)."""
    roots = {name.split('.')[0] for name in names}
    missing_roots = {r for r in roots if r not in sys.modules and importlib.util.find_spec(r) is None}
    added = []
    for name in names:
        if name.split('.')[0] in missing_roots:
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr, name=name: _Unavailable(f'{name}.{attr}')
            sys.modules[name] = module
            added.append(name)
    for name in added:
        parent, _, child = name.rpartition('.')
        if parent in sys.modules:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def k_diffusion_sampling():
    """k-diffusion's sampling module, loaded from the installed package without its heavy __init__."""
    spec = importlib.util.find_spec('k_diffusion')
    if spec is None or not spec.submodule_search_locations:
        pytest.skip('k-diffusion is not installed (pip install --no-deps k-diffusion)')
    root = list(spec.submodule_search_locations)[0]
    package = types.ModuleType('_kdiff_ref')
    package.__path__ = [root]
    saved = {k: sys.modules.get(k) for k in ('_kdiff_ref', '_kdiff_ref.utils', '_kdiff_ref.sampling')}
    sys.modules['_kdiff_ref'] = package
    try:
        with _placeholders(_UNUSED_BY_SAMPLING):
            for sub in ('utils', 'sampling'):
                sub_spec = importlib.util.spec_from_file_location(f'_kdiff_ref.{sub}', os.path.join(root, f'{sub}.py'))
                module = importlib.util.module_from_spec(sub_spec)
                sys.modules[f'_kdiff_ref.{sub}'] = module
                sub_spec.loader.exec_module(module)
                setattr(package, sub, module)
    except Exception as err:  # noqa: BLE001 - an incompatible k-diffusion version is a skip, not a failure
        pytest.skip(f'k-diffusion\'s sampling module does not load here ({type(err).__name__}: {err})')
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return package.sampling


@pytest.mark.parametrize('steps', [2, 5, 10])
def test_dpmpp_2m_equals_k_diffusion(steps):
    kd = k_diffusion_sampling()
    net = tiny_edm()
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0, 7.0).to(torch.float64)
    model = lambda x, sigma: net(x, sigma).to(torch.float64)                          # noqa: E731
    ref = kd.sample_dpmpp_2m(model, z.to(torch.float64) * sigmas[0], sigmas, disable=True)
    out = dpmpp_2m(net, z, num_steps=steps)
    assert (out - ref).abs().max().item() <= 1e-5
    assert ref.abs().max().item() > 0.05


def test_common_3m_form_equals_k_diffusion():
    """second_difference=0.5 is k-diffusion's sample_dpmpp_3m_sde at eta = 0: the only difference of dpmpp_3m."""
    kd = k_diffusion_sampling()
    net = tiny_edm()
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    sigmas = kd.get_sigmas_karras(8, 0.002, 80.0, 7.0).to(torch.float64)
    model = lambda x, sigma: net(x, sigma).to(torch.float64)                          # noqa: E731
    ref = kd.sample_dpmpp_3m_sde(model, z.to(torch.float64) * sigmas[0], sigmas, disable=True, eta=0.0,
                                 noise_sampler=lambda *_: 0.0)
    assert (dpmpp_3m(net, z, num_steps=8, second_difference=0.5) - ref).abs().max().item() <= 1e-5
    assert (dpmpp_3m(net, z, num_steps=8) - ref).abs().max().item() > 1e-4
