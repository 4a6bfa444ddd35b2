"""ADA-style augmentation pipeline with EDM's constructor arguments and augment-label layout.

Implements `training.augment.AugmentPipe` (edm-interface.md §2.4). Every enabled augmentation fires per sample with
probability `multiplier * p` and appends its parameters to the augment label; a disabled or non-firing augmentation
contributes zeros, so a zero label means "no augmentation" (the non-leaky conditioning of EDM).

This module is embedded in network pickles, so it imports only numpy, torch and torch_utils.
"""

import numpy as np
import torch

from torch_utils import persistence

# Low-pass decomposition filter of the Symlet-6 wavelet (12 taps, sum sqrt(2), orthonormal under even shifts).
# Used for 2x up- and downsampling around the geometric transform.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)

Entry = float | int | torch.Tensor

# ---------------------------------------------------------------------------------------------------------------------
# Batched homogeneous matrices. Entries are Python numbers or tensors of shape [N]; the result is [N, R, C] float32.


def _mat(rows: list[list[Entry]], n: int, device: torch.device) -> torch.Tensor:
    cols = len(rows[0])
    out = torch.empty([n, len(rows), cols], dtype=torch.float32, device=device)
    for r, row in enumerate(rows):
        if len(row) != cols:
            raise ValueError('All matrix rows must have the same length')
        for c, v in enumerate(row):
            out[:, r, c] = v.reshape(n).to(torch.float32) if isinstance(v, torch.Tensor) else float(v)
    return out


def _shift2(n: int, device: torch.device, tx: Entry, ty: Entry) -> torch.Tensor:
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, device)


def _scale2(n: int, device: torch.device, sx: Entry, sy: Entry) -> torch.Tensor:
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, device)


def _rot2(n: int, device: torch.device, theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]], n, device)


def _shift3(n: int, device: torch.device, t: torch.Tensor) -> torch.Tensor:
    return _mat([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, device)


def _scale3(n: int, device: torch.device, s: torch.Tensor) -> torch.Tensor:
    return _mat([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, device)


def _rot3(n: int, device: torch.device, axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation by `theta` [N] about the unit vector `axis` [3] (homogeneous 4x4)."""
    ax, ay, az = (float(a) for a in axis[:3])
    s, c = torch.sin(theta), torch.cos(theta)
    k = 1 - c
    return _mat([
        [ax * ax * k + c, ax * ay * k - az * s, ax * az * k + ay * s, 0],
        [ay * ax * k + az * s, ay * ay * k + c, ay * az * k - ax * s, 0],
        [az * ax * k - ay * s, az * ay * k + ax * s, az * az * k + c, 0],
        [0, 0, 0, 1],
    ], n, device)


# ---------------------------------------------------------------------------------------------------------------------
# Separable filtering with the wavelet filter.


def _filter_axis(x: torch.Tensor, taps: torch.Tensor, axis: int, up: bool) -> torch.Tensor:
    """2x upsample (zero insertion + filter) or filter + 2x downsample along `axis` (2 = rows, 3 = columns).

    Upsampling maps length L to 2L with out[k] = sum_i x[i] h[k + 5 - 2i]; downsampling maps length 2L + 12 to L
    with out[j] = sum_m h[m] x[2j + 1 + m]. Both place the filter's nominal centre (tap 5.5) on the pixel grid, so
    downsampling the upsampled signal returns the input exactly (orthonormality of the filter under even shifts).
    """
    n, c = x.shape[:2]
    moved = x.movedim(axis, -1)
    lead = moved.shape[:-1]
    flat = moved.reshape(-1, 1, moved.shape[-1])
    w = taps.to(dtype=x.dtype, device=x.device).reshape(1, 1, -1)
    if up:
        length = flat.shape[-1]
        y = torch.nn.functional.conv_transpose1d(flat, w, stride=2)[:, :, 5:5 + 2 * length]
    else:
        length = (flat.shape[-1] - 12) // 2
        y = torch.nn.functional.conv1d(flat[:, :, 1:], w, stride=2)[:, :, :length]
    return y.reshape(*lead, y.shape[-1]).movedim(-1, axis)


# ---------------------------------------------------------------------------------------------------------------------


@persistence.persistent_class
class AugmentPipe:
    """EDM's augmentation pipeline: `pipe(images [N,C,H,W]) -> (images, augment_labels [N, D] float32)`."""

    def __init__(self,
        p: float = 1,                       # Overall multiplier of every augmentation probability.
        # Pixel blitting.
        xflip: float = 0,                   # Probability multiplier: horizontal flip (1 label dim).
        yflip: float = 0,                   # Probability multiplier: vertical flip (1).
        rotate_int: float = 0,              # Probability multiplier: rotation by a multiple of 90 degrees (2).
        translate_int: float = 0,           # Probability multiplier: integer translation (2).
        translate_int_max: float = 0.125,   # Range of integer translation, relative to the image size.
        # Geometric transformations.
        scale: float = 0,                   # Probability multiplier: isotropic scaling (1).
        rotate_frac: float = 0,             # Probability multiplier: arbitrary rotation (2).
        aniso: float = 0,                   # Probability multiplier: anisotropic scaling (2).
        translate_frac: float = 0,          # Probability multiplier: fractional translation (2).
        scale_std: float = 0.2,             # Log2 std of isotropic scaling.
        rotate_frac_max: float = 1,         # Range of arbitrary rotation, 1 = full circle.
        aniso_std: float = 0.2,             # Log2 std of anisotropic scaling.
        aniso_rotate_prob: float = 0.5,     # Probability of scaling along a randomly rotated frame.
        translate_frac_std: float = 0.125,  # Std of fractional translation, relative to the image size.
        # Colour transformations.
        brightness: float = 0,              # Probability multiplier: brightness offset (1).
        contrast: float = 0,                # Probability multiplier: contrast scaling (1).
        lumaflip: float = 0,                # Probability multiplier: luma inversion (1).
        hue: float = 0,                     # Probability multiplier: hue rotation (2).
        saturation: float = 0,              # Probability multiplier: saturation scaling (1).
        brightness_std: float = 0.2,        # Std of brightness offset.
        contrast_std: float = 0.5,          # Log2 std of contrast.
        hue_max: float = 1,                 # Range of hue rotation, 1 = full circle.
        saturation_std: float = 1,          # Log2 std of saturation.
    ) -> None:
        super().__init__()
        args = dict(locals())
        for key in ('self', '__class__'):
            args.pop(key, None)
        for key, value in args.items():
            setattr(self, key, float(value))

    # -----------------------------------------------------------------------------------------------------------------

    def _fires(self, multiplier: float, shape: list[int], device: torch.device) -> torch.Tensor:
        """Per-sample Bernoulli(multiplier * p) mask."""
        return torch.rand(list(shape), device=device) < multiplier * self.p

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe expects images of shape [N, C, H, W], got {list(images.shape)}')
        n, c, h, w = images.shape
        dev = images.device
        labels: list[torch.Tensor] = []
        images = self._blit(images, labels)
        images = self._geometric(images, labels)
        images = self._colour(images, labels)
        if labels:
            out = torch.cat([v.to(torch.float32).reshape(n, -1) for v in labels], dim=1)
        else:
            out = torch.zeros([n, 0], dtype=torch.float32, device=dev)
        return images, out

    # -----------------------------------------------------------------------------------------------------------------

    def _blit(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        """Lossless pixel moves: flips, 90-degree rotations, integer translation with mirror wrap."""
        n, c, h, w = images.shape
        dev = images.device
        zero = torch.zeros([], dtype=torch.int64, device=dev)
        for mult, dim in ((self.xflip, 3), (self.yflip, 2)):
            if mult > 0:
                k = torch.randint(2, [n, 1, 1, 1], device=dev)
                k = torch.where(self._fires(mult, [n, 1, 1, 1], dev), k, zero)
                images = torch.where(k == 1, images.flip(dim), images)
                labels.append(k)

        if self.rotate_int > 0:
            k = torch.randint(4, [n, 1, 1, 1], device=dev)
            k = torch.where(self._fires(self.rotate_int, [n, 1, 1, 1], dev), k, zero)
            fx = (k == 1) | (k == 2)
            fy = (k == 2) | (k == 3)
            images = torch.where(fx, images.flip(3), images)
            images = torch.where(fy, images.flip(2), images)
            images = torch.where((k == 1) | (k == 3), images.transpose(2, 3), images)
            labels += [fx, fy]

        if self.translate_int > 0:
            u = torch.rand([2, n], device=dev) * 2 - 1
            u = torch.where(self._fires(self.translate_int, [1, n], dev), u, torch.zeros_like(u))
            tx = (u[0] * (w * self.translate_int_max)).round().to(torch.int64)
            ty = (u[1] * (h * self.translate_int_max)).round().to(torch.int64)
            # Source index per output pixel, mirrored at the borders (period 2*size - 2).
            xs = _mirror(torch.arange(w, device=dev)[None, :] - tx[:, None], w)
            ys = _mirror(torch.arange(h, device=dev)[None, :] + ty[:, None], h)
            bi = torch.arange(n, device=dev)[:, None, None, None]
            ci = torch.arange(c, device=dev)[None, :, None, None]
            images = images[bi, ci, ys[:, None, :, None], xs[:, None, None, :]]
            labels += [tx / (w * self.translate_int_max), ty / (h * self.translate_int_max)]
        return images

    # -----------------------------------------------------------------------------------------------------------------

    def _geometric(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        """Scale, rotation, anisotropic scaling and fractional translation by one resampling pass."""
        n, c, h, w = images.shape
        dev = images.device
        inv = None  # maps output pixel coordinates (centred) to input ones, [N, 3, 3]

        def chain(m: torch.Tensor) -> None:
            nonlocal inv
            inv = m if inv is None else inv @ m

        if self.scale > 0:
            z = torch.randn([n], device=dev)
            z = torch.where(self._fires(self.scale, [n], dev), z, torch.zeros_like(z))
            s = torch.exp2(z * self.scale_std)
            chain(_scale2(n, dev, 1 / s, 1 / s))
            labels.append(z)

        if self.rotate_frac > 0:
            a = (torch.rand([n], device=dev) * 2 - 1) * (np.pi * self.rotate_frac_max)
            a = torch.where(self._fires(self.rotate_frac, [n], dev), a, torch.zeros_like(a))
            chain(_rot2(n, dev, a))
            labels += [torch.cos(a) - 1, torch.sin(a)]

        if self.aniso > 0:
            z = torch.randn([n], device=dev)
            r = (torch.rand([n], device=dev) * 2 - 1) * np.pi
            z = torch.where(self._fires(self.aniso, [n], dev), z, torch.zeros_like(z))
            r = torch.where(torch.rand([n], device=dev) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(z * self.aniso_std)
            chain(_rot2(n, dev, -r) @ _scale2(n, dev, 1 / s, s) @ _rot2(n, dev, r))
            labels += [z * torch.cos(r), z * torch.sin(r)]

        if self.translate_frac > 0:
            t = torch.randn([2, n], device=dev)
            t = torch.where(self._fires(self.translate_frac, [1, n], dev), t, torch.zeros_like(t))
            chain(_shift2(n, dev, -t[0] * (w * self.translate_frac_std), -t[1] * (h * self.translate_frac_std)))
            labels += [t[0], t[1]]

        if inv is None:
            return images
        return _resample(images, inv)

    # -----------------------------------------------------------------------------------------------------------------

    def _colour(self, images: torch.Tensor, labels: list) -> torch.Tensor:
        """Brightness, contrast, luma flip, hue rotation and saturation as one affine map in RGB."""
        n, c, h, w = images.shape
        dev = images.device
        luma = torch.tensor([1, 1, 1, 0], dtype=torch.float32, device=dev) / np.sqrt(3)
        luma_proj = torch.outer(luma, luma)
        eye = torch.eye(4, device=dev)
        m = None

        def chain(t: torch.Tensor) -> None:
            nonlocal m
            m = t if m is None else t @ m

        if self.brightness > 0:
            z = torch.randn([n], device=dev)
            z = torch.where(self._fires(self.brightness, [n], dev), z, torch.zeros_like(z))
            chain(_shift3(n, dev, z * self.brightness_std))
            labels.append(z)

        if self.contrast > 0:
            z = torch.randn([n], device=dev)
            z = torch.where(self._fires(self.contrast, [n], dev), z, torch.zeros_like(z))
            chain(_scale3(n, dev, torch.exp2(z * self.contrast_std)))
            labels.append(z)

        if self.lumaflip > 0:
            k = torch.randint(2, [n, 1, 1], device=dev)
            k = torch.where(self._fires(self.lumaflip, [n, 1, 1], dev), k, torch.zeros_like(k))
            chain(eye - 2 * luma_proj * k)
            labels.append(k)

        if self.hue > 0:
            a = (torch.rand([n], device=dev) * 2 - 1) * (np.pi * self.hue_max)
            a = torch.where(self._fires(self.hue, [n], dev), a, torch.zeros_like(a))
            chain(_rot3(n, dev, luma, a))
            labels += [torch.cos(a) - 1, torch.sin(a)]

        if self.saturation > 0:
            z = torch.randn([n, 1, 1], device=dev)
            z = torch.where(self._fires(self.saturation, [n, 1, 1], dev), z, torch.zeros_like(z))
            chain(luma_proj + (eye - luma_proj) * torch.exp2(z * self.saturation_std))
            labels.append(z)

        if m is None:
            return images
        m = m.expand(n, 4, 4).to(images.dtype)
        flat = images.reshape(n, c, h * w)
        if c == 3:
            flat = m[:, :3, :3] @ flat + m[:, :3, 3:]
        elif c == 1:
            # A grey pixel v is the colour (v, v, v); the result is the mean of the transformed channels.
            rows = m[:, :3, :].mean(dim=1, keepdim=True)  # [N, 1, 4]
            flat = flat * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
        else:
            raise ValueError(f'Colour augmentation needs 1 or 3 channels, got {c}')
        return flat.reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------------------------------


def _mirror(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect integer indices into [0, size) without repeating the edge pixel (period 2*size - 2)."""
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    return (size - 1) - ((size - 1) - idx.remainder(period)).abs()


def _resample(images: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Apply the inverse map `inv` [N, 3, 3] (centred pixel coordinates) to `images` [N, C, H, W].

    Steps: reflect-pad so that every sample the transform reads lies inside the padded image, upsample 2x with the
    sym6 filter, bilinear `grid_sample`, filter and downsample 2x back to H x W.
    """
    n, c, h, w = images.shape
    dev = images.device
    taps = torch.tensor(SYM6, dtype=torch.float32)
    guard = len(SYM6) // 4  # extra border (in output pixels) that the downsampling filter reads

    # Region of the input that the output corners map to, plus room for the filters; reflect padding is limited to
    # size - 1, the most a single reflection can provide.
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=torch.float32, device=dev)
    src = inv @ corners.t()  # [N, 3, 4]
    xs, ys = src[:, 0, :], src[:, 1, :]
    need = torch.stack([-xs.min() - cx, -ys.min() - cy, xs.max() - cx, ys.max() - cy]) + 2 * guard
    limits = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=torch.float32, device=dev)
    pad_l, pad_t, pad_r, pad_b = (int(v) for v in torch.minimum(need.clamp(min=0), limits).ceil().tolist())
    images = torch.nn.functional.pad(images, [pad_l, pad_r, pad_t, pad_b], mode='reflect')
    inv = _shift2(n, dev, (pad_l - pad_r) / 2, (pad_t - pad_b) / 2) @ inv

    # Upsample; in the upsampled grid a centred coordinate u becomes 2u - 1/2 (the filter's phase).
    images = _filter_axis(_filter_axis(images, taps, 3, up=True), taps, 2, up=True)
    half = _shift2(n, dev, -0.5, -0.5)
    half_inv = _shift2(n, dev, 0.5, 0.5)
    inv = half @ _scale2(n, dev, 2, 2) @ inv @ _scale2(n, dev, 0.5, 0.5) @ half_inv

    # Resample onto an output grid with `guard` extra pixels each side (in original units), then downsample.
    out_h, out_w = 2 * (h + 2 * guard), 2 * (w + 2 * guard)
    in_h, in_w = images.shape[2], images.shape[3]
    theta = _scale2(n, dev, 2 / in_w, 2 / in_h) @ inv @ _scale2(n, dev, out_w / 2, out_h / 2)
    grid = torch.nn.functional.affine_grid(theta[:, :2, :].to(images.dtype), [n, c, out_h, out_w], align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    images = _filter_axis(_filter_axis(images, taps, 3, up=False), taps, 2, up=False)
    return images
