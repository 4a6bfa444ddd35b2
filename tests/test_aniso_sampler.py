"""aniso_heun / aniso_rk2 (method.md §6) against EDM's sampler and the exact Gaussian oracle (§9 items 2 and 6)."""

import os

import click
import numpy as np
import PIL.Image
import pytest
import torch

from edm_aniso import gaussian as G
from edm_aniso.sampler import SAMPLER_ENTRIES, aniso_heun, aniso_rk2, check_options, edm_sigma_grid


class EDMView(torch.nn.Module):
    """Only the EDM call of a network (no levels/flow): aniso_heun must take its isotropic path."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.sigma_min, self.sigma_max, self.label_dim = net.sigma_min, net.sigma_max, net.label_dim
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.net(x, sigma, class_labels)


def unit_latent(channels, res, batch=1):
    """The latent whose DCT coefficients are all 1: the output's coefficients are then the per-coefficient gains."""
    return G.from_dct(torch.ones(batch, channels, res, res, dtype=torch.float64))


def block_levels(mask, a, b):
    """Per-coefficient σ levels [..., H, W, N+1]: a on the mask (P), b elsewhere."""
    return torch.where(mask[..., None].bool(), a, b)


def test_isotropic_split_equals_edm_path():
    dist = G.DCTGaussian(G.power_law_variances(2, 8))
    net = G.OracleNet(dist)                                        # g = h: zero split
    z = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = aniso_heun(net, z, num_steps=7)
    view = EDMView(G.OracleNet(dist))
    ref = aniso_heun(view, z, num_steps=7)
    assert net.calls == view.calls == 2 * 7 - 1
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)


def test_matches_generate_edm_sampler():
    generate = pytest.importorskip('generate')
    networks = pytest.importorskip('training.networks')
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet',
                              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]).eval()
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)                      # make the zero-initialised output layers matter
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    counts = []

    def counting(n):
        def hook(*_):
            counts[n] += 1
        return hook
    for n, fn in enumerate([aniso_heun, generate.edm_sampler]):
        counts.append(0)
        handle = net.register_forward_hook(counting(n))
        out = fn(net, z, num_steps=5)
        handle.remove()
        if n == 0:
            mine = out
    assert counts == [9, 9]
    assert out.dtype == mine.dtype == torch.float64
    assert (mine - out).abs().max().item() <= 1e-5
    assert out.abs().max() > 0.05


def tiny_edm(label_dim=0):
    networks = pytest.importorskip('training.networks')
    torch.manual_seed(0)
    kw = dict(img_resolution=8, img_channels=3, label_dim=label_dim, model_type='SongUNet', model_channels=16,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    net = networks.EDMPrecond(**kw).eval()
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return net, kw


@pytest.mark.parametrize('label_dim', [0, 4])
def test_aniso_precond_stage1_matches_edm_sampler(label_dim):
    generate = pytest.importorskip('generate')
    precond = pytest.importorskip('edm_aniso.precond')
    edm, kw = tiny_edm(label_dim)
    aniso = precond.AnisoPrecond(stage=1, per_class=label_dim > 0, **kw).eval()
    aniso.transfer_from(edm)
    with torch.no_grad():
        aniso.schedule_g.u.add_(0.5 * torch.randn(aniso.schedule_g.u.shape))  # g is learned, yet g = h: EDM's split
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.eye(label_dim)[[0, 1, 3, 1]] if label_dim else None
    ref = generate.edm_sampler(edm, z, labels, num_steps=6)
    out = aniso_heun(aniso, z, labels, num_steps=6)
    assert (out - ref).abs().max().item() <= 1e-5


def test_output_is_product_of_step_factors_and_converges():
    res, lam = 8, G.power_law_variances(1, 8)
    r = lambda s: 0.4 * torch.sin(torch.log(s)) + 0.1             # a random-looking anisotropic split
    net = G.OracleNet(G.DCTGaussian(lam), G.ratio_levels(r))
    mask = G.low_block_mask(res)
    exact = 80 * G.exact_end_ratio(lam)
    errs = []
    for n in [20, 40, 80]:
        net.calls = 0
        coef = G.to_dct(aniso_heun(net, unit_latent(1, res), num_steps=n))[0]
        a, b = net.levels(edm_sigma_grid(n, 0.002, 80, 7), None)
        lev = block_levels(mask, a[0], b[0])[None]
        assert net.calls == 2 * n - 1
        assert torch.allclose(coef, G.heun_factors(lam, lev) * lev[..., 0], rtol=1e-10, atol=1e-12)
        errs.append(((coef - exact) / exact).abs().max().item())
    for coarse, fine in zip(errs, errs[1:]):
        assert 3.0 < coarse / fine < 5.5, errs                    # second order: ≈4× per doubling of N


def test_callback_called_once_per_step_with_documented_dict():
    res, lam, n = 8, G.power_law_variances(1, 8), 5
    net = G.OracleNet(G.DCTGaussian(lam), G.ratio_levels(lambda s: 0.3 * torch.sin(torch.log(s))))
    z = torch.randn(2, 1, res, res, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    seen = []
    out = aniso_heun(net, z, num_steps=n, callback=seen.append)
    a, b = net.levels(edm_sigma_grid(n, 0.002, 80, 7), None)
    assert [d['i'] for d in seen] == list(range(n))
    assert all(set(d) == {'i', 'x', 'denoised', 'a', 'b'} for d in seen)
    for d in seen:
        assert torch.equal(d['a'], a[:, d['i']].expand(2)) and torch.equal(d['b'], b[:, d['i']].expand(2))
        assert d['x'].shape == d['denoised'].shape == z.shape
    assert torch.equal(seen[0]['x'], net.subspace.apply(z, a[:, 0].expand(2), b[:, 0].expand(2), None))
    assert torch.equal(out, aniso_heun(net, z, num_steps=n))         # the callback does not change the result
    edm_seen = []
    aniso_heun(EDMView(G.OracleNet(G.DCTGaussian(lam))), z, num_steps=n, callback=edm_seen.append)
    assert [d['i'] for d in edm_seen] == list(range(n))


def test_knot_schedules_and_rk2_converge():
    from edm_aniso.schedule import KnotSchedule
    lam = G.power_law_variances(1, 8)
    sg, sh = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    with torch.no_grad():
        sh.u.add_(0.3 * torch.randn(sh.u.shape, generator=torch.Generator().manual_seed(3, )))
    net = G.OracleNet(G.DCTGaussian(lam), schedule_g=sg, schedule_h=sh)
    a, b = net.levels(edm_sigma_grid(6, 0.002, 80, 7), None)
    assert torch.allclose(a[:, :-1] * b[:, :-1], edm_sigma_grid(6, 0.002, 80, 7) ** 2, rtol=1e-9)
    assert not torch.allclose(a, b)
    exact = 80 * G.exact_end_ratio(lam)
    errs = []
    for n in [64, 128, 256]:
        net.calls = 0
        coef = G.to_dct(aniso_rk2(net, unit_latent(1, 8), num_steps=n))[0]
        assert net.calls == 2 * n - 1
        errs.append(((coef - exact) / exact).abs().max().item())
    assert errs[2] < errs[1] < errs[0] < 0.5, errs


def test_class_conditional_uses_per_sample_grids_and_bases():
    res, lam, n = 8, G.power_law_variances(1, 8), 6
    ratios = lambda s: torch.stack([0 * s, 0.5 + 0 * s, -0.4 * torch.log(s) / 5])
    masks = torch.stack([G.low_block_mask(res, 4), G.low_block_mask(res, 2)])
    net = G.OracleNet(G.DCTGaussian(lam), G.ratio_levels(ratios), G.MaskedDCTSubspace(masks), label_dim=3,
                      basis_of_class=[0, 1, 1])
    labels = torch.eye(3)[[2, 0, 1, 2]]
    coef = G.to_dct(aniso_heun(net, unit_latent(1, res, batch=4), labels, num_steps=n))
    sig = edm_sigma_grid(n, 0.002, 80, 7)
    for k, c in enumerate([2, 0, 1, 2]):
        ab = G.ratio_levels(ratios)(sig, torch.tensor([c]))
        a, b = [torch.cat([v[0], torch.zeros(1, dtype=v.dtype)]) for v in ab]
        lev = block_levels(masks[net.basis_rows[c]], a, b)[None]
        assert torch.allclose(coef[k], G.heun_factors(lam, lev) * lev[..., 0], rtol=1e-10, atol=1e-12)
        if c != 0:                                                 # class 0's grid and basis would give another answer
            a0, b0 = [torch.cat([v[0], torch.zeros(1, dtype=v.dtype)]) for v in G.ratio_levels(ratios)(sig, torch.tensor([0]))]
            lev0 = block_levels(masks[0], a0, b0)[None]
            assert not torch.allclose(coef[k], G.heun_factors(lam, lev0) * lev0[..., 0], rtol=1e-4)


def test_bad_options_give_one_clear_error():
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)))
    edm_like = EDMView(net)
    with pytest.raises(click.ClickException, match='--steps must be >= 1'):
        check_options(net, dict(num_steps=0))
    with pytest.raises(click.ClickException, match='--sigma_min < --sigma_max'):
        check_options(net, dict(num_steps=4, sigma_min=5.0, sigma_max=1.0))
    rk2 = next(e for e in SAMPLER_ENTRIES if e.name == 'aniso_rk2')
    with pytest.raises(click.ClickException, match='--precond=aniso'):
        rk2.check(edm_like, dict(num_steps=4))
    heun = next(e for e in SAMPLER_ENTRIES if e.name == 'aniso_heun')
    heun.check(edm_like, dict(num_steps=4, sigma_min=None, sigma_max=None))   # valid: no error
    with pytest.raises(ValueError, match='num_steps'):
        aniso_heun(net, torch.zeros(1, 1, 8, 8), num_steps=0)


def test_trajectory_names_from_generate_rng(tmp_path):
    generate = pytest.importorskip('generate')
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8)))
    rnd = generate.StackedRandomGenerator('cpu', [3, 42])
    aniso_heun(net, rnd.randn([2, 1, 8, 8]), num_steps=3, trajectory=str(tmp_path), randn_like=rnd.randn_like)
    assert sorted(os.listdir(tmp_path)) == ['000003-traj.png', '000042-traj.png']
    assert PIL.Image.open(tmp_path / '000003-traj.png').mode == 'L'


def test_trajectory_strips(tmp_path):
    net = G.OracleNet(G.DCTGaussian(G.power_law_variances(3, 8)), G.ratio_levels(lambda s: 0.2 + 0 * s))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = aniso_heun(net, z, num_steps=4, trajectory=str(tmp_path), seeds=[5, 17])
    paths = sorted(os.listdir(tmp_path))
    assert paths == ['000005-traj.png', '000017-traj.png']
    img = PIL.Image.open(tmp_path / '000017-traj.png')
    assert img.size == (8 * 5, 8) and img.mode == 'RGB'           # N denoised frames + the final image
    last = torch.from_numpy(np.array(img)).double()[:, 32:]
    expect = (out[1] * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).double()
    assert torch.equal(last, expect)


def test_generate_runs_aniso_heun_with_trajectory(tmp_path):
    generate = pytest.importorskip('generate')
    precond = pytest.importorskip('edm_aniso.precond')
    pytest.importorskip('edm_aniso.plugin')
    from training import registry
    assert {'aniso_heun', 'aniso_rk2'} <= set(registry.SAMPLERS)
    _, kw = tiny_edm(label_dim=3)
    net = precond.AnisoPrecond(stage=2, subspace='dct', per_class=True, **kw).eval()
    with torch.no_grad():
        net.schedule_h.u.add_(0.3 * torch.randn(net.schedule_h.u.shape))
    paths = generate.generate_images(net, str(tmp_path / 'img'), seeds=[0, 7, 9], max_batch_size=2,
                                     sampler='aniso_heun', device='cpu', progress=False, num_steps=3,
                                     trajectory=str(tmp_path / 'traj'))
    assert len(paths) == 3
    assert sorted(os.listdir(tmp_path / 'traj')) == ['000000-traj.png', '000007-traj.png', '000009-traj.png']
    strip = np.array(PIL.Image.open(tmp_path / 'traj' / '000007-traj.png'))
    assert strip.shape == (8, 8 * 4, 3)
    assert np.array_equal(strip[:, 24:], np.array(PIL.Image.open(tmp_path / 'img' / '000007.png')))


def test_schedule_grid_heun_is_product_of_step_factors():
    """--grid=schedule: levels at uniform schedule time; each Heun step is still the exact per-coefficient factor."""
    from edm_aniso.path import noise_path
    from edm_aniso.schedule import KnotSchedule
    lam = G.power_law_variances(1, 8)
    sg, sh = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    with torch.no_grad():
        sg.u.add_(0.4 * torch.randn(sg.u.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
        sh.u.add_(0.4 * torch.randn(sh.u.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    net = G.OracleNet(G.DCTGaussian(lam), schedule_g=sg, schedule_h=sh)
    z = unit_latent(1, 8)
    lev = noise_path(net, None, z).grid(9, 'schedule')
    coef = G.to_dct(aniso_heun(net, z, num_steps=9, grid='schedule'))[0]
    levels = block_levels(G.low_block_mask(8), lev.a[0], lev.b[0])[None]
    assert torch.allclose(coef, G.heun_factors(lam, levels) * levels[..., 0], rtol=1e-10, atol=1e-12)
    karras = G.to_dct(aniso_heun(net, z, num_steps=9))[0]
    assert not torch.allclose(coef, karras, rtol=1e-3)


def test_schedule_grid_refused_for_edm_networks():
    net = EDMView(G.OracleNet(G.DCTGaussian(G.power_law_variances(1, 8))))
    heun = next(e for e in SAMPLER_ENTRIES if e.name == 'aniso_heun')
    with pytest.raises(click.ClickException, match='--grid=schedule needs a network with a learned schedule'):
        heun.check(net, dict(num_steps=4, grid='schedule'))
