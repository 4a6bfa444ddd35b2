"""Backbones and preconditioners of training/networks.py (edm-interface.md §2.1-2.2, §4.1, §7.2)."""

import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import networks as N

DDPMPP = dict(embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
              resample_filter=[1, 1])
NCSNPP = dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
TINY_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)
TINY_ADM = dict(model_channels=32, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[8], dropout=0)


def _count(net: torch.nn.Module) -> tuple:
    return sum(p.numel() for p in net.parameters()), len(net.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Published sizes (edm-interface.md §1.2 presets).


def test_cifar10_ddpmpp_size():
    with torch.device('meta'):
        net = N.EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', augment_dim=9,
                           model_channels=128, channel_mult=[2, 2, 2], **DDPMPP)
    assert _count(net) == (55_735_299, 427)


def test_imagenet64_adm_size():
    with torch.device('meta'):
        net = N.EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
                           model_channels=192, channel_mult=[1, 2, 3, 4])
    assert _count(net) == (295_899_267, 553)


def test_ncsnpp_builds_with_fourier_and_residual():
    with torch.device('meta'):
        net = N.EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet', model_channels=128,
                           channel_mult=[2, 2, 2], **NCSNPP)
    model = net.model
    assert isinstance(model.map_noise, N.FourierEmbedding)
    assert tuple(model.map_noise.freqs.shape) == (128,)              # noise_channels / 2 = 128 * 2 / 2
    assert tuple(model.map_layer0.weight.shape) == (512, 256)
    keys = list(model.enc.keys())
    assert '16x16_aux_residual' in keys and '8x8_aux_residual' in keys and '32x32_aux_residual' not in keys
    assert model.enc['16x16_aux_residual'].fused_resample
    assert tuple(model.enc['16x16_down'].conv0.resample_filter.shape) == (1, 1, 4, 4)
    # The encoder's residual aux path goes in3 -> 256 channels at 16x16, then 256 -> 256 at 8x8.
    assert tuple(model.enc['16x16_aux_residual'].weight.shape) == (256, 3, 3, 3)
    assert tuple(model.enc['8x8_aux_residual'].weight.shape) == (256, 256, 3, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes through tiny backbones.


@pytest.mark.parametrize('preset', [DDPMPP, NCSNPP, dict(DDPMPP, encoder_type='skip', decoder_type='skip')],
                         ids=['ddpmpp', 'ncsnpp', 'skip'])
def test_song_unet_shapes(preset):
    torch.manual_seed(0)
    net = N.SongUNet(img_resolution=16, in_channels=3, out_channels=5, label_dim=4, augment_dim=9, **TINY_SONG,
                     **preset)
    x = torch.randn(3, 3, 16, 16)
    labels = torch.eye(4)[:3]
    y = net(x, torch.randn(3), labels, augment_labels=torch.randn(3, 9))
    assert y.shape == (3, 5, 16, 16) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # A single noise label and a single label row broadcast over the batch.
    y1 = net(x, torch.randn(1), torch.zeros(1, 4))
    assert y1.shape == (3, 5, 16, 16)


def test_dhariwal_unet_shapes():
    torch.manual_seed(0)
    net = N.DhariwalUNet(img_resolution=16, in_channels=3, out_channels=6, label_dim=7, augment_dim=9, **TINY_ADM)
    # Every block at 8x8 carries attention with 128 // 64 = 2 heads; the 16x16 level has none.
    assert net.enc['8x8_block0'].num_heads == 2 and net.enc['16x16_block0'].num_heads == 0
    assert net.dec['8x8_in0'].num_heads == 2 and net.dec['8x8_in1'].num_heads == 0
    x = torch.randn(2, 3, 16, 16)
    y = net(x, torch.randn(2), torch.eye(7)[:2], augment_labels=torch.randn(2, 9))
    assert y.shape == (2, 6, 16, 16) and y.dtype == torch.float32
    # Zero-initialised output conv: a fresh ADM outputs exactly zero.
    assert torch.count_nonzero(y) == 0


def test_init_schemes():
    torch.manual_seed(0)
    song = N.SongUNet(img_resolution=16, in_channels=3, out_channels=3, **TINY_SONG, **DDPMPP)
    adm = N.DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, augment_dim=9, **TINY_ADM)
    # Song: output conv xavier_uniform x 1e-5; bound sqrt(6 / (fan_in + fan_out)), fans = channels * 3 * 3.
    w = song.dec['16x16_aux_conv'].weight
    bound = math.sqrt(6 / (16 * 9 + 3 * 9)) * 1e-5
    assert 0 < w.abs().max() <= bound and w.abs().max() > bound / 2
    qkv = song.enc['8x8_block0'].qkv.weight                         # xavier_uniform x sqrt(0.2), 1x1 kernel
    assert qkv.abs().max() <= math.sqrt(6 / (32 + 96)) * math.sqrt(0.2)
    # ADM: zero-init output conv, conv1 and augment mapping; kaiming_uniform x sqrt(1/3) elsewhere.
    assert torch.count_nonzero(adm.out_conv.weight) == 0
    assert torch.count_nonzero(adm.enc['16x16_block0'].conv1.weight) == 0
    assert torch.count_nonzero(adm.map_augment.weight) == 0 and adm.map_augment.bias is None
    assert adm.map_label.bias is None
    b = adm.enc['16x16_block0'].conv0.bias
    assert 0 < b.abs().max() <= math.sqrt(3 / (32 * 9)) * math.sqrt(1 / 3)
    # map_label: kaiming_normal x sqrt(label_dim) -> std sqrt(1 / fan_in) * sqrt(5) = 1.
    assert 0.5 < adm.map_label.weight.std().item() < 1.5


def test_group_norm_groups_and_eps():
    song = N.SongUNet(img_resolution=16, in_channels=3, out_channels=3, **TINY_SONG, **DDPMPP)
    adm = N.DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, **TINY_ADM)
    assert song.enc['16x16_block0'].norm0.num_groups == 4 and song.enc['16x16_block0'].norm0.eps == 1e-6
    assert song.dec['16x16_aux_norm'].eps == 1e-6
    assert adm.enc['8x8_block0'].norm1.num_groups == 32 and adm.out_norm.eps == 1e-5
    assert N.GroupNorm(num_channels=1024).num_groups == 32 and N.GroupNorm(num_channels=12).num_groups == 3


def test_persistent_classes_and_pickle_round_trip():
    for name in ('Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding',
                 'SongUNet', 'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'):
        assert persistence.is_persistent(getattr(N, name)), name
    torch.manual_seed(0)
    net = N.EDMPrecond(img_resolution=16, img_channels=3, label_dim=2, model_type='SongUNet', **TINY_SONG,
                       **NCSNPP).eval()
    _scramble(net)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 7.0])
    clone = pickle.loads(pickle.dumps(net))
    assert clone.init_kwargs['model_type'] == 'SongUNet'
    assert torch.equal(clone(x, sigma, torch.eye(2)), net(x, sigma, torch.eye(2)))


# ---------------------------------------------------------------------------------------------------------------------
# Layers.


def test_conv2d_resampling_with_box_filter():
    x = torch.randn(2, 3, 8, 8)
    down = N.Conv2d(3, 3, kernel=0, down=True)
    assert down.weight is None and down.bias is None
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    up = N.Conv2d(3, 3, kernel=0, up=True)
    assert torch.allclose(up(x), torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest'), atol=1e-6)
    # Fused down = 'same' conv followed by the box filter.
    fused = N.Conv2d(3, 5, kernel=3, down=True, fused_resample=True, init_bias=1)
    ref = torch.nn.functional.conv2d(x, fused.weight, padding=1)
    ref = torch.nn.functional.avg_pool2d(ref, 2) + fused.bias.reshape(1, -1, 1, 1)
    assert torch.allclose(fused(x), ref, atol=1e-5)
    # The NCSN++ filter is normalised and only up/down layers keep it.
    f = N.Conv2d(3, 3, kernel=3, down=True, resample_filter=[1, 3, 3, 1]).resample_filter
    assert f.shape == (1, 1, 4, 4) and abs(f.sum().item() - 1) < 1e-6 and f[0, 0, 1, 1] == 9 / 64
    assert N.Conv2d(3, 3, kernel=3).resample_filter is None
    assert 'resample_filter' not in N.Conv2d(3, 3, kernel=3).state_dict()


def test_fused_up_matches_unfused_for_box_filter():
    torch.manual_seed(1)
    a = N.Conv2d(4, 6, kernel=3, up=True, fused_resample=True, init_bias=1)
    b = N.Conv2d(4, 6, kernel=3, up=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 5, 5)
    # With [1,1] (no filter padding) both paths are 'nearest up then same conv'.
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_attention_op_forward_and_backward():
    torch.manual_seed(0)
    q = torch.randn(3, 8, 10, dtype=torch.float32, requires_grad=True)
    k = torch.randn(3, 8, 12, dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 10, 12)
    w = N.AttentionOp.apply(q, k)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = torch.softmax(torch.einsum('ncq,nck->nqk', q64, k64) / math.sqrt(8), dim=2)
    assert torch.allclose(w.double(), ref, atol=1e-6) and torch.allclose(w.sum(2), torch.ones(3, 10))
    (w * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert torch.allclose(q.grad.double(), q64.grad, atol=1e-5)
    assert torch.allclose(k.grad.double(), k64.grad, atol=1e-5)


def test_attention_qkv_layout():
    """qkv channels are grouped head-major, then channel, with q/k/v innermost (edm-interface.md §2.2)."""
    torch.manual_seed(0)
    heads, c, hw = 2, 8, 4
    block = N.UNetBlock(in_channels=c, out_channels=c, emb_channels=4, attention=True, num_heads=heads,
                        adaptive_scale=False, init_zero={})
    x = torch.randn(1, c, hw, hw)
    h = torch.randn(1, c, hw, hw)
    qkv = block.qkv(block.norm2(h))[0].reshape(3 * c, hw * hw)
    out = torch.zeros(c, hw * hw)
    ch = c // heads
    for head in range(heads):
        idx = lambda j, s: (head * ch + j) * 3 + s                        # noqa: E731
        q = torch.stack([qkv[idx(j, 0)] for j in range(ch)])
        k = torch.stack([qkv[idx(j, 1)] for j in range(ch)])
        v = torch.stack([qkv[idx(j, 2)] for j in range(ch)])
        w = torch.softmax(q.t() @ k / math.sqrt(ch), dim=1)               # [L_q, L_k]
        out[head * ch:(head + 1) * ch] = v @ w.t()
    assert torch.allclose(block._attend(block.qkv(block.norm2(h)), h.shape), out.reshape(1, c, hw, hw), atol=1e-5)
    assert block(x, torch.randn(1, 4)).shape == x.shape


def test_positional_embedding_frequencies():
    x = torch.tensor([0.5, -2.0, 3.0])
    for endpoint in (False, True):
        emb = N.PositionalEmbedding(num_channels=8, endpoint=endpoint)(x).double()
        freqs = np.array([10000.0 ** (-i / (4 - endpoint)) for i in range(4)])
        arg = np.outer(x.double().numpy(), freqs)
        assert np.allclose(emb.numpy(), np.concatenate([np.cos(arg), np.sin(arg)], axis=1), atol=1e-6)
    four = N.FourierEmbedding(num_channels=8, scale=16)
    arg = np.outer(x.double().numpy(), 2 * np.pi * four.freqs.double().numpy())
    assert np.allclose(four(x).double().numpy(), np.concatenate([np.cos(arg), np.sin(arg)], 1), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Preconditioners with a recording backbone.


class _Recorder(torch.nn.Module):
    """Backbone stub: records its inputs and returns a fixed random F (channels beyond the first half huge)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, **kwargs):
        super().__init__()
        self.out_channels, self.in_channels, self.kwargs = out_channels, in_channels, kwargs
        self.calls = []
        self.F = None

    def forward(self, x, noise_labels, class_labels=None, **model_kwargs):
        self.calls.append(dict(x=x, noise=noise_labels, labels=class_labels, kwargs=model_kwargs))
        gen = torch.Generator().manual_seed(7)
        F = torch.randn(x.shape[0], self.out_channels, *x.shape[2:], generator=gen)
        F[:, self.in_channels:] = 1e6
        self.F = F[:, :self.in_channels].double()
        return F.to(x.dtype)


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(N, '_Recorder', _Recorder, raising=False)
    return '_Recorder'


def _vp_sigma64(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def _vp_t_by_bisection(sigma, beta_d=19.9, beta_min=0.1):
    lo, hi = np.zeros_like(sigma), np.full_like(sigma, 10.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        too_big = _vp_sigma64(mid, beta_d, beta_min) > sigma
        hi, lo = np.where(too_big, mid, hi), np.where(too_big, lo, mid)
    return (lo + hi) / 2


def _iddpm_u64(M=1000, C_1=0.001, C_2=0.008):
    ab = lambda j: np.sin(0.5 * np.pi * j / (M * (C_2 + 1))) ** 2      # noqa: E731
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(ab(j - 1) / ab(j), C_1) - 1)
    return u


def _expected(kind, sigma, sd=0.5):
    """(c_skip, c_out, c_in, c_noise) by edm-interface.md §2.1, in float64 numpy."""
    s = sigma
    if kind == 'edm':
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(s ** 2 + sd ** 2), \
            np.log(s) / 4
    if kind == 've':
        return np.ones_like(s), s, np.ones_like(s), np.log(s / 2)
    if kind == 'vp':
        return np.ones_like(s), -s, 1 / np.sqrt(s ** 2 + 1), 999 * _vp_t_by_bisection(s)
    u = _iddpm_u64()
    j = np.abs(s[:, None] - u[None, :]).argmin(1)
    return np.ones_like(s), -s, 1 / np.sqrt(s ** 2 + 1), 999.0 - j


PRECONDS = dict(edm=N.EDMPrecond, ve=N.VEPrecond, vp=N.VPPrecond, iddpm=N.iDDPMPrecond)


@pytest.mark.parametrize('kind', list(PRECONDS))
def test_precond_coefficients(kind, recorder):
    net = PRECONDS[kind](img_resolution=4, img_channels=2, label_dim=3, model_type=recorder, extra=1)
    assert net.model.kwargs == dict(extra=1)
    assert net.model.out_channels == (4 if kind == 'iddpm' else 2)
    sigma = np.array([0.003, 0.2, 1.0, 5.0, 60.0])
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    D = net(x, torch.tensor(sigma), augment_labels=torch.zeros(5, 9))
    assert D.dtype == torch.float32 and D.shape == x.shape
    call = net.model.calls[-1]
    assert call['kwargs'].keys() == {'augment_labels'}
    c_skip, c_out, c_in, c_noise = (torch.tensor(c).reshape(-1, 1, 1, 1) for c in _expected(kind, sigma))
    x32 = x.float().double()
    assert call['x'].dtype == torch.float32
    assert torch.allclose(call['x'].double(), c_in * x32, rtol=1e-5, atol=1e-6)
    assert call['noise'].shape == (5,)
    # atol: VP's ln(1 + sigma^2) is evaluated in fp32, which loses ~1% of c_noise ~ 0.09 at sigma = 0.003.
    assert torch.allclose(call['noise'].double(), c_noise.flatten(), rtol=1e-4, atol=2e-3)
    assert torch.allclose(D.double(), c_skip * x32 + c_out * net.model.F, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', list(PRECONDS))
def test_precond_labels_sigma_and_dtype(kind, recorder):
    cond = PRECONDS[kind](img_resolution=4, img_channels=2, label_dim=3, use_fp16=True, model_type=recorder)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float16)
    D = cond(x, torch.tensor(1.5))                                  # scalar sigma, no labels
    call = cond.model.calls[-1]
    assert D.dtype == torch.float32
    assert call['x'].dtype == torch.float32                         # fp16 only on CUDA
    assert call['noise'].shape == (1,)
    assert torch.equal(call['labels'], torch.zeros(1, 3))
    cond(x, torch.tensor([1.0, 2.0]), class_labels=torch.tensor([[0, 1, 0], [1, 0, 0]], dtype=torch.float64))
    labels = cond.model.calls[-1]['labels']
    assert labels.dtype == torch.float32 and torch.equal(labels, torch.tensor([[0., 1, 0], [1, 0, 0]]))
    uncond = PRECONDS[kind](img_resolution=4, img_channels=2, model_type=recorder)
    uncond(x, torch.tensor([1.0, 2.0]), class_labels=torch.ones(2, 3))
    assert uncond.model.calls[-1]['labels'] is None
    for attr in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max'):
        assert hasattr(cond, attr)


def test_precond_sigma_ranges_and_round_sigma(recorder):
    edm = N.EDMPrecond(img_resolution=4, img_channels=1, model_type=recorder)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float('inf'), 0.5)
    ve = N.VEPrecond(img_resolution=4, img_channels=1, model_type=recorder)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    s = torch.tensor([[0.1, 2.0]], dtype=torch.float64)
    for net in (edm, ve):
        assert torch.equal(net.round_sigma(s), s)


def test_vp_sigma_round_trip(recorder):
    vp = N.VPPrecond(img_resolution=4, img_channels=1, model_type=recorder)
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    sig = vp.sigma(t)
    assert torch.allclose(sig, torch.from_numpy(_vp_sigma64(t.numpy())), rtol=1e-12)
    assert torch.allclose(vp.sigma_inv(sig), t, rtol=1e-10)
    assert vp.sigma_max == pytest.approx(_vp_sigma64(1.0), rel=1e-5)
    # sigma(1e-5) computed in fp32 suffers cancellation: EDM reports 0.0009765625 (edm-interface.md §2.1 [R]).
    assert vp.sigma_min == pytest.approx(_vp_sigma64(1e-5), rel=0.05)
    assert vp.sigma_min == 0.0009765625
    assert torch.equal(vp.round_sigma(sig), sig)


def test_iddpm_u_table_and_round_sigma(recorder):
    net = N.iDDPMPrecond(img_resolution=4, img_channels=1, model_type=recorder)
    u = net.u.double().numpy()
    ref = _iddpm_u64()
    assert u.shape == (1001,) and u[1000] == 0 and np.all(np.diff(u) < 0)
    assert np.allclose(u, ref, rtol=2e-3)                            # EDM runs the recursion in fp32
    assert np.allclose(u[:900], ref[:900], rtol=1e-5)
    assert net.sigma_min == float(net.u[999]) and net.sigma_max == float(net.u[0])
    assert net.sigma_min == pytest.approx(0.00642, rel=1e-2) and net.sigma_max == pytest.approx(20291, rel=1e-3)
    assert 'u' in dict(net.named_buffers())
    gen = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(4, 25, dtype=torch.float64).uniform_(-6, 10, generator=gen))
    rounded = net.round_sigma(sigma)
    index = net.round_sigma(sigma, return_index=True)
    assert rounded.shape == sigma.shape and rounded.dtype == torch.float64 and index.shape == sigma.shape
    brute = np.abs(sigma.numpy()[..., None] - u).argmin(-1)
    assert np.array_equal(index.numpy(), brute)
    assert torch.equal(rounded, net.u[index].double())
    assert float(net.round_sigma(0.5)) == pytest.approx(u[np.abs(u - 0.5).argmin()], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='fp16 runs only on a CUDA device')
def test_fp16_backbone_on_cuda():
    device = torch.device('cuda')
    torch.manual_seed(0)
    net = N.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, use_fp16=True, model_type='SongUNet',
                       **TINY_SONG, **DDPMPP).eval().to(device)
    _scramble(net)
    x, sigma = torch.randn(2, 3, 16, 16, device=device), torch.tensor([0.5, 5.0], device=device)
    seen = []
    hook = net.model.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    half = net(x, sigma)
    full = net(x, sigma, force_fp32=True)
    hook.remove()
    assert seen == [(torch.float16, torch.float16), (torch.float32, torch.float32)]
    assert half.dtype == full.dtype == torch.float32
    assert torch.allclose(half, full, atol=5e-2)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match='model_type'):
        N.EDMPrecond(img_resolution=8, img_channels=3, model_type='NoSuchNet')
    with pytest.raises(ValueError, match='embedding_type'):
        N.SongUNet(img_resolution=8, in_channels=3, out_channels=3, embedding_type='sinusoid')
    with pytest.raises(ValueError, match='init_mode'):
        N.Linear(3, 4, init_mode='orthogonal')
    with pytest.raises(ValueError):
        N.Conv2d(3, 3, kernel=3, up=True, down=True)


def test_label_dropout_zeroes_labels():
    torch.manual_seed(0)
    for cls, kw in ((N.SongUNet, dict(TINY_SONG, **DDPMPP)), (N.DhariwalUNet, TINY_ADM)):
        net = cls(img_resolution=16, in_channels=3, out_channels=3, label_dim=4, label_dropout=1.0, **kw)
        _scramble(net)
        x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(4)[:2]
        net.train()
        dropped = net(x, noise, labels)
        net.eval()
        assert torch.allclose(dropped, net(x, noise, torch.zeros(2, 4)), atol=1e-6)
        assert not torch.allclose(dropped, net(x, noise, labels), atol=1e-4)


def _scramble(net: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter an O(1)-output random value, so outputs depend on every layer (zero inits hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * r + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# Against NVIDIA's EDM (only where EDM_UPSTREAM points to an EDM checkout; never in CI).

UPSTREAM = os.environ.get('EDM_UPSTREAM')

COMPAT_CASES = {
    'song_ddpmpp': ('EDMPrecond', dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9,
                                       model_type='SongUNet', **TINY_SONG, **DDPMPP)),
    'song_ncsnpp': ('EDMPrecond', dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9,
                                       model_type='SongUNet', **TINY_SONG, **NCSNPP)),
    'song_skip': ('EDMPrecond', dict(img_resolution=16, img_channels=3, model_type='SongUNet', **TINY_SONG,
                                     **dict(DDPMPP, encoder_type='skip', decoder_type='skip'))),
    'adm': ('EDMPrecond', dict(img_resolution=16, img_channels=3, label_dim=5, augment_dim=9,
                               model_type='DhariwalUNet', **TINY_ADM)),
    'vp': ('VPPrecond', dict(img_resolution=16, img_channels=3, model_type='SongUNet', **TINY_SONG, **DDPMPP)),
    've': ('VEPrecond', dict(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet', **TINY_SONG,
                             **NCSNPP)),
    'iddpm': ('iDDPMPrecond', dict(img_resolution=16, img_channels=3, label_dim=5, model_type='DhariwalUNet',
                                   **TINY_ADM)),
}

SIGMAS = dict(vp=[0.01, 3.0], ve=[0.05, 20.0], iddpm=[0.05, 2.0])

# Runs inside the EDM checkout (cwd, first on sys.path); our repository is not importable there.
UPSTREAM_WORKER = textwrap.dedent('''
    import math, pickle, sys, torch
    from training import networks
    cases, sigmas, out_path = torch.load(sys.argv[1])
    exec(sys.argv[2])                                 # defines _scramble
    torch.set_num_threads(int(sys.argv[3]))
    result = {}
    for name, (cls, kwargs) in cases.items():
        torch.manual_seed(123)
        net = getattr(networks, cls)(**kwargs).eval()
        init_state = {k: v.clone() for k, v in net.state_dict().items()}
        _scramble(net)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, 3, 16, 16, generator=gen)
        sigma = torch.tensor(sigmas.get(name, [0.2, 7.0]))
        label_dim = kwargs.get('label_dim', 0)
        labels = torch.eye(label_dim)[[1, 3 % label_dim]] if label_dim else None
        extra = dict(augment_labels=torch.randn(2, 9, generator=gen)) if kwargs.get('augment_dim') else {}
        D = net(x, sigma, labels, **extra)
        D_scalar = net(x, sigma[1], None, **extra)
        xg = x.clone().requires_grad_()
        (net(xg, sigma, labels, **extra) * x.flip(0)).sum().backward()
        rec = dict(init_state=init_state, state=net.state_dict(), x=x, sigma=sigma, labels=labels, extra=extra,
                   D=D.detach(), D_scalar=D_scalar.detach(), grad=xg.grad, order=[n for n, _ in net.named_parameters()],
                   sigma_min=net.sigma_min, sigma_max=net.sigma_max, pickle=pickle.dumps(net))
        if cls == 'iDDPMPrecond':
            grid = torch.logspace(-3, 4.5, 3000, dtype=torch.float64)
            rec['grid'] = grid
            rec['grid_index'] = net.round_sigma(grid, return_index=True)
        result[name] = rec
    torch.save(result, out_path)
''')


@pytest.fixture(scope='module')
def upstream_results(tmp_path_factory):
    if not UPSTREAM:
        pytest.skip('EDM_UPSTREAM is not set')
    import inspect
    tmp = tmp_path_factory.mktemp('edm_compat')
    torch.save((COMPAT_CASES, SIGMAS, str(tmp / 'out.pt')), tmp / 'in.pt')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', UPSTREAM_WORKER, str(tmp / 'in.pt'), inspect.getsource(_scramble),
                           str(torch.get_num_threads())],  # same thread count: same reduction order
                          cwd=UPSTREAM, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / 'out.pt', weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize('case', list(COMPAT_CASES))
def test_matches_upstream_edm(case, upstream_results):
    ref = upstream_results[case]
    cls, kwargs = COMPAT_CASES[case]
    torch.manual_seed(123)
    net = getattr(N, cls)(**kwargs).eval()
    # Same names, shapes, registration order and, from the same seed, the same initial values.
    assert [n for n, _ in net.named_parameters()] == ref['order']
    ours_init = net.state_dict()
    assert ours_init.keys() == ref['init_state'].keys()
    for k, v in ref['init_state'].items():
        assert torch.equal(ours_init[k], v), k
    net.load_state_dict(ref['state'], strict=True)
    assert (net.sigma_min, net.sigma_max) == (ref['sigma_min'], ref['sigma_max'])
    D = net(ref['x'], ref['sigma'], ref['labels'], **ref['extra'])
    D_scalar = net(ref['x'], ref['sigma'][1], None, **ref['extra'])
    xg = ref['x'].clone().requires_grad_()
    (net(xg, ref['sigma'], ref['labels'], **ref['extra']) * ref['x'].flip(0)).sum().backward()
    diffs = dict(D=(D - ref['D']).abs().max().item(), D_scalar=(D_scalar - ref['D_scalar']).abs().max().item(),
                 grad=(xg.grad - ref['grad']).abs().max().item())
    print(f'{case}: max |D| {ref["D"].abs().max():.3g}, max abs diff {diffs}')
    scale = max(1.0, ref['D'].abs().max().item())
    assert diffs['D'] < 1e-5 * scale and diffs['D_scalar'] < 1e-5 * scale
    assert diffs['grad'] < 1e-5 * max(1.0, ref['grad'].abs().max().item())
    if 'grid' in ref:
        ours = net.round_sigma(ref['grid'], return_index=True)
        mismatch = (ours != ref['grid_index']).sum().item()
        print(f'{case}: round_sigma index mismatches on a 3000-point grid: {mismatch}')
        # EDM finds the nearest u_j with torch.cdist, whose matrix-product path can pick the farther of two
        # near-tied levels; ours is the exact nearest (checked in test_iddpm_u_table_and_round_sigma).
        assert mismatch <= 3


class _MapToOurClasses(pickle.Unpickler):
    """Unpickle an EDM network pickle into OUR classes (__new__ + __setstate__, no NVIDIA code exec'd)."""

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            def rebuild(meta):
                cls = getattr(N, meta['class_name'])
                obj = cls.__new__(cls)
                obj.__setstate__(dict(meta['state']))
                return obj
            return rebuild
        return super().find_class(module, name)


@pytest.mark.slow
@pytest.mark.parametrize('case', list(COMPAT_CASES))
def test_upstream_pickle_state_drives_our_classes(case, upstream_results):
    """EDM's pickled attributes are exactly what our forward passes read (edm-interface.md §4.1, class mapping)."""
    import io
    ref = upstream_results[case]
    net = _MapToOurClasses(io.BytesIO(ref['pickle'])).load()
    assert type(net) is getattr(N, COMPAT_CASES[case][0]) and type(net.model).__module__ == N.__name__
    D = net(ref['x'], ref['sigma'], ref['labels'], **ref['extra'])
    diff = (D - ref['D']).abs().max().item()
    print(f'{case}: EDM pickle state in our classes, max abs diff {diff}')
    assert diff < 1e-5 * max(1.0, ref['D'].abs().max().item())


UPSTREAM_LOADER = textwrap.dedent('''
    import pickle, sys, torch
    with open(sys.argv[1], 'rb') as f:
        data = pickle.load(f)
    net = data['ema']
    assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
    D = net(data['x'], data['sigma'], data['labels'])
    print('max abs diff', (D - data['D']).abs().max().item())
''')


@pytest.mark.slow
@pytest.mark.skipif(not UPSTREAM, reason='EDM_UPSTREAM is not set')
@pytest.mark.parametrize('case', ['song_ncsnpp', 'adm'])
def test_our_pickle_runs_in_upstream_edm(case, tmp_path):
    """Stock EDM exec's this module's embedded source (edm-interface.md §4.1) and reproduces our outputs."""
    cls, kwargs = COMPAT_CASES[case]
    torch.manual_seed(0)
    net = getattr(N, cls)(**{k: v for k, v in kwargs.items() if k != 'augment_dim'}).eval().requires_grad_(False)
    _scramble(net)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 4.0])
    labels = torch.eye(kwargs['label_dim'])[:2]
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, x=x, sigma=sigma, labels=labels, D=net(x, sigma, labels)), f)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', UPSTREAM_LOADER, str(tmp_path / 'net.pkl')], cwd=UPSTREAM, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.split('max abs diff')[-1])
    print(f'{case}: our pickle in EDM, max abs diff {diff}')
    assert diff < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# State-dict layout against a record made with NVIDIA's EDM (runs everywhere, no checkout needed).
#
# tests/data/edm_state_dict_layout.json was written by running NVlabs/edm's own training/networks.py on these tiny
# configurations with torch.manual_seed(0): for every state_dict entry, in order, its name, shape, and the sum and
# absolute sum of its initial values. Equal names and order mean EDM state dicts load with strict=True and pickles map
# onto our attributes; equal sums mean our modules draw their initial values in EDM's order.

LAYOUT_PATH = os.path.join(os.path.dirname(__file__), 'data', 'edm_state_dict_layout.json')


def _layout_cases() -> dict:
    import json
    with open(LAYOUT_PATH) as f:
        return json.load(f)


@pytest.mark.parametrize('case', sorted(_layout_cases()))
def test_state_dict_layout_matches_edm_record(case):
    rec = _layout_cases()[case]
    torch.manual_seed(0)
    net = getattr(N, rec['cls'])(**rec['kwargs'])
    state = net.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == [[k, shape] for k, shape, _, _ in rec['tensors']]
    for key, _, total, abs_total in rec['tensors']:
        t = state[key].double()
        assert t.sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), key
        assert t.abs().sum().item() == pytest.approx(abs_total, rel=1e-9, abs=1e-9), key
    # A state dict in EDM's layout loads strictly into a fresh instance.
    other = getattr(N, rec['cls'])(**rec['kwargs'])
    other.load_state_dict(state, strict=True)
