"""AnisoPrecond: EDM reduction, per-subspace coefficients, banks, transfer and persistence
(method.md §4, §9.1, §9.8)."""

import math
import pickle
import subprocess
import sys

import pytest
import torch

from edm_aniso.precond import AnisoPrecond
from edm_aniso.subspace import dct_matrix
from training import networks

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


def _perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights of a visible size (the output conv starts near zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def _edm(label_dim: int = 0, seed: int = 0) -> networks.EDMPrecond:
    torch.manual_seed(seed)
    return _perturbed(networks.EDMPrecond(8, 3, label_dim=label_dim, model_type='SongUNet', **TINY), seed)


def _aniso(label_dim: int = 0, seed: int = 1, **kw) -> AnisoPrecond:
    torch.manual_seed(seed)
    return AnisoPrecond(8, 3, label_dim=label_dim, **TINY, **kw)


def _inputs(n: int = 5, label_dim: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen) * 3
    sigma = torch.exp(torch.randn(n, generator=gen) * 2)
    labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return x, sigma, labels


def _dense_dct_projector(res: int, m: int) -> torch.Tensor:
    """Independent dense P on vec(X) (row-major): the span of the low m x m DCT atoms c_u c_v^T."""
    C = dct_matrix(res, torch.float64)
    atoms = torch.stack([torch.outer(C[u], C[v]).flatten() for u in range(m) for v in range(m)], dim=1)
    return atoms @ atoms.T


class _Capture:
    """Forward hook on the backbone: records (input image, noise labels)."""

    def __init__(self, net):
        self.seen = None
        net.model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.seen = (args[0].detach().clone(), args[1].detach().clone(), output.detach().clone())


@pytest.mark.parametrize('label_dim', [0, 4])
@pytest.mark.parametrize('subspace', ['iso', 'dct'])
def test_isotropic_reduction_to_edm(label_dim, subspace):
    """g = h = sigma^2: D and all coefficients equal EDMPrecond's on the same U-Net (method.md §9.1)."""
    edm = _edm(label_dim)
    net = _aniso(label_dim, subspace=subspace)
    net.transfer_from(edm)
    x, sigma, labels = _inputs(label_dim=label_dim)
    cap_e, cap_a = _Capture(edm), _Capture(net)
    with torch.no_grad():
        d_edm = edm(x, sigma, labels)
        d_sig = net(x, sigma, labels)
        d_gh = net(x, g=sigma ** 2, h=sigma ** 2, class_labels=labels)
    assert (d_sig - d_edm).abs().max() <= 1e-5
    assert (d_gh - d_edm).abs().max() <= 1e-5
    assert torch.allclose(cap_a.seen[0], cap_e.seen[0], atol=1e-5)   # c_in x
    assert torch.allclose(cap_a.seen[1], cap_e.seen[1], atol=1e-6)   # c_noise = ln(sigma)/4
    c = net.coefficients(sigma ** 2, sigma ** 2)
    sd = 0.5
    for k, ref in [('c_in', 1 / (sigma ** 2 + sd ** 2).sqrt()), ('c_skip', sd ** 2 / (sigma ** 2 + sd ** 2)),
                   ('c_out', sigma * sd / (sigma ** 2 + sd ** 2).sqrt())]:
        assert torch.allclose(c[k][0], ref, rtol=1e-6) and torch.allclose(c[k][1], ref, rtol=1e-6)
    assert torch.allclose(c['c_noise'], sigma.log() / 4, atol=1e-6)


def test_anisotropic_coefficients_on_dct_subspace():
    """With g != h the backbone sees c_in(g) P x + c_in(h) P_perp x and D = c_skip x + c_out F, per subspace."""
    net = _perturbed(_aniso(subspace='dct', stage=2))
    x, _, _ = _inputs(3)
    g = torch.tensor([0.01, 2.0, 400.0])
    h = torch.tensor([5.0, 0.3, 1.0])
    cap = _Capture(net)
    with torch.no_grad():
        D = net(x, g=g, h=h)
    P = _dense_dct_projector(8, 4).to(torch.float32)
    sd2 = 0.25

    def mat(v, a, b):   # a P v + b P_perp v with the dense projector, per channel
        flat = v.reshape(v.shape[0], 3, 64)
        pv = flat @ P
        return (a.reshape(-1, 1, 1) * pv + b.reshape(-1, 1, 1) * (flat - pv)).reshape(v.shape)

    x_in, c_noise, F = cap.seen
    assert torch.allclose(x_in, mat(x, (g + sd2).rsqrt(), (h + sd2).rsqrt()), atol=1e-5)
    assert torch.allclose(c_noise, (g.log() + h.log()) / 16, atol=1e-6)
    c_out = (0.5 * (g / (g + sd2)).sqrt(), 0.5 * (h / (h + sd2)).sqrt())
    expect = mat(x, sd2 / (g + sd2), sd2 / (h + sd2)) + mat(F, *c_out)
    assert torch.allclose(D, expect, atol=1e-5)
    # Flow head f = M^(-1/2) (D - x).
    with torch.no_grad():
        f = net.flow(x, g, h)
    assert torch.allclose(f, mat(D - x, g.rsqrt(), h.rsqrt()), atol=1e-4, rtol=1e-5)


def test_stage2_detaches_schedule_from_conditioning_stage1_does_not():
    x, _, _ = _inputs(2)
    for stage, expect_grad in [(1, True), (2, False)]:
        net = _perturbed(_aniso(stage=stage))
        g = torch.tensor([0.5, 3.0], requires_grad=True)
        D = net(x, g=g, h=g * 1.0)
        grad = torch.autograd.grad(D.sum(), g, allow_unused=True)[0]
        has = grad is not None and grad.abs().sum() > 0
        assert has == expect_grad, stage


def test_class_bank_schedules_and_levels_per_sample():
    net = _aniso(3, stage=2, per_class=True)
    with torch.no_grad():
        for k, s in enumerate([net.schedule_g, net.schedule_h]):
            s.u.add_(0.4 * torch.randn(s.u.shape, generator=torch.Generator().manual_seed(k)))
    labels = torch.eye(3)[[2, 0, 1, 2, 1]]
    t = torch.tensor([10.0, 500.0, 1200.0, 3000.0, 6000.0])
    g, gd, h, hd = net.schedules(t, labels)
    for i, cls in enumerate([2, 0, 1, 2, 1]):
        gi, gdi = net.schedule_g(t[i:i + 1], torch.tensor([cls]))
        hi, _ = net.schedule_h(t[i:i + 1], torch.tensor([cls]))
        assert torch.allclose(g[i], gi[0]) and torch.allclose(gd[i], gdi[0]) and torch.allclose(h[i], hi[0])
    g0, _, _, _ = net.schedules(t, torch.eye(3)[[0] * 5])
    assert not torch.allclose(g, g0)                                  # class 0's row would give other values
    with pytest.raises(ValueError, match='class bank'):
        net.schedules(t, None)
    sigmas = torch.tensor([80.0, 3.0, 0.5, 0.002], dtype=torch.float64)
    a, b = net.levels(sigmas, labels)
    assert a.shape == (5, 5) and a.dtype == torch.float64
    assert torch.allclose(a[:, :4] * b[:, :4], sigmas.square().expand(5, 4), rtol=1e-10)   # sigma_eff = sigma_i
    assert (a[:, 4] == 0).all() and (b[:, 4] == 0).all()
    assert not torch.allclose(a[0], a[1])                            # rows differ per class
    assert torch.allclose(a[0], a[3]) and torch.allclose(a[2], a[4])


def test_stage1_levels_are_edm_levels():
    net = _aniso(stage=1)
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=torch.float64)
    a, b = net.levels(sigmas, None, batch=2)
    assert torch.allclose(a[:, :5], sigmas.expand(2, 5), rtol=1e-5) and torch.equal(a, b)


def test_per_sample_basis_ids_match_a_per_sample_loop(tmp_path):
    gen = torch.Generator().manual_seed(0)
    bases = torch.linalg.qr(torch.randn(2, 64, 6, generator=gen, dtype=torch.float64))[0]
    path = tmp_path / 'bases.pt'
    torch.save(dict(bases=bases, groups=torch.tensor([1, 0, 1]), rank=6, resolution=8), path)
    net = _perturbed(_aniso(3, stage=2, subspace='pca', pca_bases=str(path)))
    assert net.basis_rows.tolist() == [1, 0, 1]
    labels = torch.eye(3)[[0, 1, 2, 1]]
    _, basis_id = net.rows_for(labels, 4)
    assert basis_id.tolist() == [1, 0, 1, 0]
    x, _, _ = _inputs(4)
    g, h = torch.tensor([0.3, 2.0, 9.0, 0.1]), torch.tensor([1.0, 0.2, 4.0, 3.0])
    with torch.no_grad():
        batched = net.flow(x, g, h, labels)
        single = torch.cat([net.flow(x[i:i + 1], g[i:i + 1], h[i:i + 1], labels[i:i + 1]) for i in range(4)])
        wrong = net.flow(x, g, h, labels, basis_id=torch.zeros(4, dtype=torch.long))
    assert torch.allclose(batched, single, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(batched, wrong, atol=1e-3)


def test_transfer_validation():
    edm = _edm(4)
    stage1 = _aniso(4, stage=1, per_class=True)
    stage1.transfer_from(edm)
    with torch.no_grad():
        stage1.schedule_g.u.add_(0.2)
    stage2 = _aniso(4, stage=2, subspace='dct', per_class=True)
    stage2.transfer_from(stage1)
    assert torch.equal(stage2.schedule_g.u, stage1.schedule_g.u)
    assert torch.equal(stage2.schedule_h.u, stage1.schedule_g.u)      # h <- g
    for k, v in stage1.model.state_dict().items():
        assert torch.equal(stage2.model.state_dict()[k], v)
    with pytest.raises(ValueError, match='label_dim'):
        _aniso(0, stage=2).transfer_from(stage1)
    with pytest.raises(ValueError, match='stage 1 from a stage-2'):
        _aniso(4, stage=1).transfer_from(stage2)
    with pytest.raises(ValueError, match='backbone mismatch'):
        AnisoPrecond(8, 3, label_dim=4, stage=2, **{**TINY, 'model_channels': 32}).transfer_from(stage1)
    with pytest.raises(ValueError, match='schedule rows'):
        _aniso(4, stage=2, per_class=True, class_groups=[0, 1, 0, 1]).transfer_from(stage1)
    with pytest.raises(ValueError, match='maps classes to schedule rows differently'):
        _aniso(4, stage=2, per_class=True, class_groups=[1, 0, 3, 2]).transfer_from(stage1)
    # A stage-2 pickle's h belongs to its own P_perp: the subspace must match.
    stage2.transfer_from(stage2)
    with pytest.raises(ValueError, match='subspace dct'):
        _aniso(4, stage=2, subspace='iso', per_class=True).transfer_from(stage2)
    with pytest.raises(ValueError, match='subspace dct'):
        _aniso(4, stage=2, subspace='dct', dct_cutoff=2, per_class=True).transfer_from(stage2)


def test_class_bank_refuses_all_zero_labels():
    """No default class (method.md §8.2): EDM's all-zero 'unconditional' label row is refused by a bank."""
    bank = _aniso(4, stage=2, subspace='dct', per_class=True)
    t = torch.tensor([10.0, 20.0])
    with pytest.raises(ValueError, match='all-zero label row'):
        bank.schedules(t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match='all-zero label row'):
        bank.schedules(t, torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 0]]))
    plain = _aniso(4, stage=2, subspace='dct')   # one row: the label does not choose a schedule
    g, *_ = plain.schedules(t, torch.zeros(2, 4))
    assert torch.isfinite(g).all()


_CHILD = r'''
import pickle, sys, torch
sys.path.insert(0, sys.argv[3])
with open(sys.argv[1], 'rb') as f:
    net = pickle.load(f)['ema']
inp = torch.load(sys.argv[2])
with torch.no_grad():
    D = net(inp['x'], g=inp['g'], h=inp['h'], class_labels=inp['y'])
    f = net.flow(inp['x'], inp['g'], inp['h'], inp['y'])
    s = net.schedules(inp['t'], inp['y'])
    lv = net.levels(inp['sig'], inp['y'])
torch.save(dict(D=D, f=f, s=s, lv=lv, cls=type(net).__module__), sys.argv[2] + '.out')
'''


@pytest.mark.parametrize('stage', [1, 2])
def test_pickle_round_trip_in_fresh_process(tmp_path, repo_root, stage):
    net = _perturbed(_aniso(3, stage=stage, per_class=True, subspace='dct' if stage == 2 else 'iso')).eval()
    with torch.no_grad():
        for s in {id(net.schedule_g): net.schedule_g, id(net.schedule_h): net.schedule_h}.values():
            s.u.add_(0.3 * torch.randn(s.u.shape, generator=torch.Generator().manual_seed(3)))
    x, _, y = _inputs(4, label_dim=3)
    inp = dict(x=x, g=torch.tensor([0.2, 1.0, 30.0, 2.0]), h=torch.tensor([0.5, 0.1, 20.0, 2.0]), y=y,
               t=torch.tensor([1.0, 100.0, 2000.0, 6000.0]), sig=torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64))
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    torch.save(inp, tmp_path / 'inp.pt')
    script = tmp_path / 'child.py'
    script.write_text(_CHILD)
    subprocess.run([sys.executable, str(script), str(tmp_path / 'net.pkl'), str(tmp_path / 'inp.pt'), repo_root],
                   check=True, cwd=str(tmp_path))
    out = torch.load(str(tmp_path / 'inp.pt') + '.out', weights_only=False)
    with torch.no_grad():
        D = net(x, g=inp['g'], h=inp['h'], class_labels=y)
        f = net.flow(x, inp['g'], inp['h'], y)
        s = net.schedules(inp['t'], y)
        lv = net.levels(inp['sig'], y)
    assert torch.equal(out['D'], D) and torch.equal(out['f'], f)
    assert all(torch.equal(a, b) for a, b in zip(out['s'], s))
    assert all(torch.equal(a, b) for a, b in zip(out['lv'], lv))
    assert out['cls'] != 'edm_aniso.precond'                          # rebuilt from the pickled source


def test_bad_input_errors():
    with pytest.raises(ValueError, match='stage'):
        _aniso(stage=3)
    with pytest.raises(ValueError, match='label_dim'):
        _aniso(0, per_class=True)
    with pytest.raises(ValueError, match='pca_bases'):
        _aniso(subspace='pca')
    net = _aniso()
    with pytest.raises(ValueError, match='sigma or'):
        net(torch.zeros(1, 3, 8, 8))
    assert math.isclose(net.T, 6400.0)
