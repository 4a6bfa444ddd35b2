"""training.augment.AugmentPipe: label layout, identities and the geometry/colour maps (edm-interface.md §2.4)."""

import pickle

import numpy as np
import pytest
import torch

from training.augment import SYM6, AugmentPipe

TRAIN_SET = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # train.py's augment_kwargs
ALL = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
           brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def smooth_image(n: int, c: int, res: int, fx: float = 0.31, fy: float = 0.23) -> tuple[torch.Tensor, np.ndarray]:
    """A low-frequency plane wave sampled at centred pixel coordinates, and the wave as a function."""
    u = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    y, x = torch.meshgrid(u, u, indexing='ij')
    img = torch.sin(fx * x + fy * y)
    return img.expand(n, c, res, res).clone(), (fx, fy)


def centre_mask(res: int, radius: float) -> torch.Tensor:
    u = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    y, x = torch.meshgrid(u, u, indexing='ij')
    return (x ** 2 + y ** 2) < radius ** 2


def test_filter_is_orthonormal_lowpass():
    h = np.array(SYM6)
    assert len(h) == 12 and np.isclose(h.sum(), np.sqrt(2))
    for k in range(1, 6):  # orthogonality under even shifts is what makes down(up(x)) == x
        assert abs(np.dot(h[:12 - 2 * k], h[2 * k:])) < 1e-9
    assert np.isclose(np.dot(h, h), 1)


def test_label_dims():
    x = torch.zeros(4, 3, 8, 8)
    assert AugmentPipe(p=0.12, **TRAIN_SET)(x)[1].shape == (4, 9)
    assert AugmentPipe(p=0.5, **ALL)(x)[1].shape == (4, 19)
    out, lab = AugmentPipe()(x)
    assert lab.shape == (4, 0) and torch.equal(out, x)


@pytest.mark.parametrize('channels', [1, 3])
def test_p0_is_identity_with_zero_labels(channels):
    torch.manual_seed(0)
    x = torch.rand(5, channels, 16, 16) * 2 - 1
    out, lab = AugmentPipe(p=0, **ALL)(x)
    assert torch.count_nonzero(lab) == 0
    # The resampling path still runs (identity matrix): up- and downsampling must reproduce the pixels.
    assert torch.allclose(out, x, atol=1e-5)


def test_xflip_label_matches_image():
    torch.manual_seed(1)
    x = torch.randn(32, 3, 8, 8)
    out, lab = AugmentPipe(p=1, xflip=1)(x)
    flipped = lab[:, 0] == 1
    assert 0 < flipped.sum() < 32  # both outcomes occur (P(fail) = 2**-31)
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])


def test_rotate_int_labels_and_images():
    torch.manual_seed(2)
    x = torch.randn(24, 1, 8, 8)
    out, lab = AugmentPipe(p=1, rotate_int=1)(x)
    for i in range(24):
        fx, fy = int(lab[i, 0]), int(lab[i, 1])
        # Labels (fx, fy): (0,0) none, (1,0) 90, (1,1) 180, (0,1) 270 degrees.
        k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(fx, fy)]
        matches = [torch.equal(out[i], torch.rot90(x[i], r, dims=(1, 2))) for r in range(4)]
        assert sum(matches) == 1
        assert matches.index(True) in (k, (4 - k) % 4)
    assert len({tuple(r.tolist()) for r in lab}) == 4


def test_translate_int_moves_pixels():
    torch.manual_seed(3)
    x = torch.randn(8, 3, 16, 16)
    out, lab = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)(x)
    tx = (lab[:, 0] * 16 * 0.25).round().long()
    ty = (lab[:, 1] * 16 * 0.25).round().long()
    assert torch.allclose(lab[:, 0] * 4, tx.float()) and (tx.abs() <= 4).all()
    for i in range(8):
        a, b = int(tx[i]), int(ty[i])
        # out[y, x] = in[y + ty, x - tx] wherever both are inside the image.
        ys = slice(max(0, -b), min(16, 16 - b))
        xs = slice(max(0, a), min(16, 16 + a))
        src = x[i][:, ys.start + b:ys.stop + b, xs.start - a:xs.stop - a]
        assert torch.equal(out[i][:, ys, xs], src)


def test_fractional_translation_matches_shifted_wave():
    x, (fx, fy) = smooth_image(6, 1, 32)
    torch.manual_seed(4)
    out, lab = AugmentPipe(p=1, translate_frac=1, translate_frac_std=0.05)(x)
    u = torch.arange(32, dtype=torch.float32) - 15.5
    yy, xx = torch.meshgrid(u, u, indexing='ij')
    mask = centre_mask(32, 9)
    for i in range(6):
        dx, dy = lab[i, 0] * 32 * 0.05, lab[i, 1] * 32 * 0.05
        want = torch.sin(fx * (xx - dx) + fy * (yy - dy))
        assert (out[i, 0] - want)[mask].abs().max() < 0.03


def test_rotation_and_scale_match_wave():
    x, (fx, fy) = smooth_image(6, 3, 32)
    torch.manual_seed(5)
    out, lab = AugmentPipe(p=1, scale=1, rotate_frac=1)(x)
    u = torch.arange(32, dtype=torch.float32) - 15.5
    yy, xx = torch.meshgrid(u, u, indexing='ij')
    mask = centre_mask(32, 8)
    # EDM places the upsampled grid at 2u - 1/2, while the sym6 filter's low-frequency phase (its centroid c)
    # puts it at 2u - (5.5 - c); the transform therefore pivots about -delta with delta = (c - 5) / 2 (~0.05 px).
    h = np.array(SYM6)
    delta = float((np.arange(12) * h).sum() / h.sum() - 5) / 2
    errs = []
    for i in range(6):
        s = 2 ** (lab[i, 0] * 0.2)
        a = torch.atan2(lab[i, 2], lab[i, 1] + 1)
        # Output at u samples the input at R(a) (u + delta) / s - delta.
        px, py = xx + delta, yy + delta
        sx = (torch.cos(a) * px - torch.sin(a) * py) / s - delta
        sy = (torch.sin(a) * px + torch.cos(a) * py) / s - delta
        want = torch.sin(fx * sx + fy * sy)
        errs.append(float((out[i] - want)[:, mask].abs().max()))
    assert max(errs) < 0.01, errs


@pytest.mark.parametrize('channels', [1, 3])
def test_brightness_and_contrast_exact(channels):
    torch.manual_seed(6)
    x = torch.rand(6, channels, 8, 8)
    out, lab = AugmentPipe(p=1, brightness=1)(x)
    assert torch.allclose(out, x + (lab[:, 0] * 0.2).view(-1, 1, 1, 1), atol=1e-6)
    out, lab = AugmentPipe(p=1, contrast=1)(x)
    assert torch.allclose(out, x * (2 ** (lab[:, 0] * 0.5)).view(-1, 1, 1, 1), atol=1e-5)


def test_grey_pixels_keep_hue_and_saturation_and_flip_under_lumaflip():
    torch.manual_seed(7)
    g = torch.rand(6, 1, 8, 8)
    out, _ = AugmentPipe(p=1, hue=1, saturation=1)(g.expand(6, 3, 8, 8))
    assert torch.allclose(out, g.expand(6, 3, 8, 8), atol=1e-5)  # grey lies on the luma axis
    out, lab = AugmentPipe(p=1, lumaflip=1)(g)
    sign = 1 - 2 * lab[:, 0].view(-1, 1, 1, 1)
    assert torch.allclose(out, g * sign, atol=1e-6)


def test_hue_rotation_preserves_luma_and_norm():
    torch.manual_seed(8)
    x = torch.rand(6, 3, 8, 8)
    out, lab = AugmentPipe(p=1, hue=1)(x)
    assert torch.allclose(out.mean(1), x.mean(1), atol=1e-5)
    assert torch.allclose(out.norm(dim=1), x.norm(dim=1), atol=1e-5)
    assert torch.allclose(lab[:, 0] + 1, torch.cos(torch.atan2(lab[:, 1], lab[:, 0] + 1)), atol=1e-6)


@pytest.mark.parametrize('channels', [1, 3])
def test_outputs_finite_and_in_range(channels):
    torch.manual_seed(9)
    x = torch.rand(16, channels, 16, 16) * 2 - 1
    for kwargs in (dict(p=0.12, **TRAIN_SET), dict(p=1, **ALL)):
        out, lab = AugmentPipe(**kwargs)(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all() and torch.isfinite(lab).all()
        assert out.abs().max() < 20
    out, _ = AugmentPipe(p=1, **TRAIN_SET)(x)
    assert out.abs().max() < 1.5  # geometry alone barely overshoots [-1, 1] (filter ringing)


def test_colour_needs_one_or_three_channels():
    with pytest.raises(ValueError, match='1 or 3 channels'):
        AugmentPipe(p=1, brightness=1)(torch.zeros(2, 2, 8, 8))


def test_pickle_round_trip_keeps_settings():
    pipe = AugmentPipe(p=0.3, **TRAIN_SET)
    data = pickle.dumps(pipe)
    assert b'_reconstruct_persistent_obj' in data and b'class AugmentPipe' in data  # EDM format, source embedded
    clone = pickle.loads(data)
    assert clone.p == pytest.approx(0.3) and clone.xflip == 1e8 and clone.hue == 0
    assert clone(torch.zeros(2, 3, 8, 8))[1].shape == (2, 9)
