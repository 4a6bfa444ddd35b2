"""Inverse problems with a trained network: inpainting, colourisation and super-resolution (score-SDE's method on the
matrix noise path M = a^2 P + b^2 P_perp of edm_aniso.path).

Each task observes one linear component of the image: ``K x`` with K an orthogonal projector (the *known* part), and
asks for samples of the rest given it. The tasks differ only in K:

- ``inpaint``: a binary pixel mask m (1 = known), K x = m * x.
- ``superres``: the low DCT block u, v < res/scale of every channel (edm_aniso.subspace.DCTSubspace), i.e. what a
  DCT-domain downsampling by ``scale`` keeps; K x = L X_c L per channel.
- ``colorize``: the luminance axis of an orthonormal colour basis (luminance + two chroma axes, ``COLOR_BASIS``);
  K x = w w^T x per pixel with w = (1, 1, 1)/sqrt(3).

The sampler (``solve_inverse``) is score-SDE's conditional sampler (Song et al. 2021, appendix I) under M: every time
the state reaches level i, its known component is replaced by the observation noised along the path to that level,

    x <- (I - K) x + K (y + M_i^1/2 e),    e ~ N(0, I) fresh at every replacement (per-seed generators),

which is a sample of the forward marginal of K x_i given K x_0 = y; at the data end (M_N = 0) the known part is y
exactly. Between replacements the state moves with a predictor (the reverse-SDE step of the path, or the
deterministic Heun step of aniso_heun) and, optionally, Langevin corrector steps at each level (score-SDE's
predictor-corrector scheme), each followed by a replacement. The unknown part thus follows the network's score
evaluated at a noised observation: score-SDE's approximation p_t(u | y) ~ p_t(u | K x_t), not an exact conditional
sampler; bench/inverse_gaussian.py measures the gap to the exact conditional on Gaussian data.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from edm_aniso.path import GRID_KINDS, PathDenoiser, noise_path
from edm_aniso.subspace import DCTSubspace

TASKS = ('inpaint', 'colorize', 'superres')
PREDICTORS = ('sde', 'heun')

# Orthonormal colour basis (rows): luminance, then two chroma axes (red - blue, green - magenta). The luminance axis is
# the equal-weight mean, close to the first principal axis of natural images' RGB covariance, so luminance and chroma
# are nearly decorrelated; the basis is orthonormal so that K below is an orthogonal projector.
COLOR_BASIS = torch.tensor([[1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
                            [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)],
                            [1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)]], dtype=torch.float64)

# ----------------------------------------------------------------------------------------------------------------------
# Observations: the known component K x.


class Observation:
    """A linear observation of [B, C, H, W] images through an orthogonal projector K (K^2 = K = K^T).

    ``project(x)`` = K x (the observation y, as an image); ``impose(x, known)`` = (I - K) x + known for a ``known``
    in the range of K: the state with its known component replaced."""

    task: str = ''

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def impose(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return x - self.project(x) + known

    def describe(self) -> str:
        return self.task


class MaskObservation(Observation):
    """Inpainting: known pixels where ``mask`` is 1 (``mask`` [H, W] or [1 | C, H, W], values 0 or 1)."""

    task = 'inpaint'

    def __init__(self, mask: torch.Tensor) -> None:
        mask = torch.as_tensor(mask)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f'a mask must be [H, W] or [C, H, W], got shape {tuple(mask.shape)}')
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError('a mask must be binary (0 = unknown, 1 = known)')
        self.mask = mask.to(torch.bool)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask.to(x.device)[None]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self._mask(x), x, torch.zeros_like(x))

    def impose(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return torch.where(self._mask(x), known, x)          # exact: the known pixels are copied

    def describe(self) -> str:
        m = self.mask.to(torch.float64)
        return f'inpaint ({100 * float(m.mean()):.1f} % of the pixels known)'


class LowFrequencyObservation(Observation):
    """Super-resolution by ``scale``: the low DCT block u, v < resolution / scale of every channel is known."""

    task = 'superres'

    def __init__(self, resolution: int, scale: int) -> None:
        if scale < 1 or resolution % scale:
            raise ValueError(f'--scale={scale} must divide the resolution {resolution}')
        self.scale, self.cutoff = int(scale), resolution // scale
        self.block = DCTSubspace(resolution, self.cutoff)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.project(x)

    def describe(self) -> str:
        return f'superres x{self.scale} (DCT block {self.cutoff}x{self.cutoff} known)'


class LuminanceObservation(Observation):
    """Colourisation: the luminance coordinate of ``COLOR_BASIS`` is known, the two chroma coordinates are not."""

    task = 'colorize'

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f'colorize needs 3-channel images, got {x.shape[1]} channel(s)')
        w = COLOR_BASIS[0].to(device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
        return w * (w * x).sum(dim=1, keepdim=True)

    def describe(self) -> str:
        return 'colorize (luminance known, chroma unknown)'


def to_color_basis(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB -> (luminance, chroma 1, chroma 2) coordinates of COLOR_BASIS."""
    return torch.einsum('kc,bchw->bkhw', COLOR_BASIS.to(device=x.device, dtype=x.dtype), x)


def check_task_options(task: str, has_mask: bool, scale: Optional[int]) -> None:
    """One clear ValueError where a task's options do not fit it: a mask for inpaint (only), a scale for superres
    (only)."""
    if task not in TASKS:
        raise ValueError(f'unknown task {task!r}; choose one of {", ".join(TASKS)}')
    if task != 'inpaint' and has_mask:
        raise ValueError(f'--mask applies only to --task=inpaint (got --task={task})')
    if task != 'superres' and scale is not None:
        raise ValueError(f'--scale applies only to --task=superres (got --task={task})')
    if task == 'inpaint' and not has_mask:
        raise ValueError('--task=inpaint needs --mask=PNG (white = known pixels, black = pixels to fill)')


def make_observation(task: str, channels: int, resolution: int, mask: Optional[torch.Tensor] = None,
                     scale: Optional[int] = None) -> Observation:
    """The observation of ``task`` for a network's images (C = channels, H = W = resolution), checking the task's
    inputs: a binary mask of the network's size for inpaint (only), 3 channels for colorize, a scale >= 2 dividing the
    resolution for superres (only; None = 2). Raises ValueError with one clear line."""
    check_task_options(task, mask is not None, scale)
    if task == 'inpaint':
        mask = torch.as_tensor(mask)
        if mask.ndim == 2:
            mask = mask[None]
        if tuple(mask.shape[-2:]) != (resolution, resolution):
            raise ValueError(f'--mask is {mask.shape[-1]}x{mask.shape[-2]} but the network makes '
                             f'{resolution}x{resolution} images')
        if mask.shape[0] not in (1, channels):
            raise ValueError(f'--mask has {mask.shape[0]} channels; give one (all channels) or {channels}')
        return MaskObservation(mask)
    if task == 'colorize':
        if channels != 3:
            raise ValueError(f'--task=colorize needs a 3-channel (RGB) network; this one makes {channels}-channel '
                             f'images')
        return LuminanceObservation()
    scale = 2 if scale is None else int(scale)
    if scale < 2:
        raise ValueError(f'--scale must be at least 2, got {scale}')
    if resolution % scale:
        raise ValueError(f'--scale={scale} does not divide the resolution {resolution}')
    return LowFrequencyObservation(resolution, scale)


# ----------------------------------------------------------------------------------------------------------------------
# The conditional sampler.


def _corrector() -> Callable:
    """edm_aniso.stochastic.langevin_correct (the Langevin corrector of the pc sampler)."""
    try:
        from edm_aniso.stochastic import langevin_correct
    except ImportError as err:
        raise ValueError('corrector steps need edm_aniso.stochastic.langevin_correct, which this installation '
                         'lacks') from err
    return langevin_correct


def check_sampler_options(num_steps: int, predictor: str, corrector_steps: int, snr: Optional[float],
                          grid: str = 'karras') -> None:
    """One clear ValueError for unusable sampler options (before any work)."""
    if num_steps < 1:
        raise ValueError(f'--steps must be >= 1, got {num_steps}')
    if predictor not in PREDICTORS:
        raise ValueError(f'unknown predictor {predictor!r}; choose one of {", ".join(PREDICTORS)}')
    if grid not in GRID_KINDS:
        raise ValueError(f'unknown grid {grid!r}; choose one of {", ".join(GRID_KINDS)}')
    if corrector_steps < 0:
        raise ValueError(f'--corrector-steps must be >= 0, got {corrector_steps}')
    if snr is not None and corrector_steps == 0:
        raise ValueError('--snr sets the corrector\'s step size: it needs --corrector-steps >= 1')
    if snr is not None and not snr > 0:
        raise ValueError(f'--snr must be > 0, got {snr}')
    if corrector_steps > 0:
        _corrector()


@torch.no_grad()
def solve_inverse(
    net:             Any,                               # EDM network or AnisoPrecond (or an oracle of gaussian.py)
    observation:     Observation,                       # K: what is known
    known:           torch.Tensor,                      # [B, C, H, W] y = K x_true (observation.project of the inputs)
    latents:         torch.Tensor,                      # [B, C, H, W] unit normal latents (per seed)
    class_labels:    Optional[torch.Tensor] = None,     # [B, label_dim] one-hot, or None
    randn_like:      Callable = torch.randn_like,       # per-seed source of the fresh noise
    num_steps:       int = 18,                          # N levels (then the data end)
    sigma_min:       Optional[float] = None,            # None: 0.002, raised to the network's
    sigma_max:       Optional[float] = None,            # None: 80, lowered to the network's
    rho:             float = 7.0,                       # rho of the Karras grid
    grid:            str = 'karras',                    # 'karras' | 'schedule' (edm_aniso.path.NoisePath.grid)
    predictor:       str = 'sde',                       # 'sde': reverse-SDE step; 'heun': aniso_heun's step
    corrector_steps: int = 0,                           # Langevin steps at each level (0: none)
    snr:             Optional[float] = None,            # corrector signal-to-noise ratio (None: the corrector's default)
    callback:        Optional[Callable[[dict], None]] = None,   # called with {'i', 'x', 'a', 'b'} after each level
) -> torch.Tensor:
    """Sample the unknown component given K x = ``known`` (module docstring); float64 [B, C, H, W] whose known
    component is ``known`` (exactly for masks, to rounding for the DCT block and luminance).

    Levels (a_i, b_i) from ``path.grid`` (a_N = b_N = 0). Start x_0 = M_0^1/2 z, replaced. At each level i < N:
    ``corrector_steps`` times a Langevin step at level i, then a replacement at level i; then the predictor to level
    i + 1, then a replacement at level i + 1 (at i + 1 = N: K x = y exactly, no noise drawn). Predictors, with
    D = D(x; M_i) and s = M_i^-1 (D - x) (``NoisePath.score``):

    - ``sde`` (score-SDE's reverse diffusion): x <- x + (M_i - M_{i+1}) s + (M_i - M_{i+1})^1/2 z, per block
      a_i^2 - a_{i+1}^2 on P and b_i^2 - b_{i+1}^2 on P_perp; the last step returns D (the mean, no noise).
      NFE = N.
    - ``heun``: aniso_heun's per-subspace Heun step (the last one Euler). NFE = 2N - 1.

    Each corrector step costs one more evaluation. Per-seed draws in order: latents (the caller's), then per level the
    corrector's and replacements' noise, then the predictor's (sde, not on the last step)."""
    check_sampler_options(num_steps, predictor, corrector_steps, snr, grid)
    if known.shape != latents.shape:
        raise ValueError(f'known {tuple(known.shape)} and latents {tuple(latents.shape)} must have the same shape')
    path = noise_path(net, class_labels, latents)
    lev = path.grid(num_steps, grid, sigma_min, sigma_max, rho)
    den = PathDenoiser(net, path, class_labels)
    a, b = lev.a, lev.b
    known = known.to(torch.float64)
    correct = _corrector() if corrector_steps > 0 else None

    def replace(x: torch.Tensor, i: int) -> torch.Tensor:
        """Known component <- K (y + M_i^1/2 e); at the data end (a_i = b_i = 0) <- y."""
        if bool((a[:, i] == 0).all() and (b[:, i] == 0).all()):
            return observation.impose(x, known)
        noised = known + path.apply(randn_like(x), a[:, i], b[:, i])
        return observation.impose(x, observation.project(noised))

    x = replace(path.apply(latents.to(torch.float64), a[:, 0], b[:, 0]), 0)
    for i in range(num_steps):
        last = i == num_steps - 1
        for _ in range(corrector_steps):
            kwargs = {} if snr is None else dict(snr=snr)
            x = correct(den, path, x, a[:, i], b[:, i], randn_like=randn_like, **kwargs)
            x = replace(x, i)
        if predictor == 'sde':
            denoised = den(x, a[:, i], b[:, i])
            if last:
                x = denoised
            else:
                da2, db2 = a[:, i].square() - a[:, i + 1].square(), b[:, i].square() - b[:, i + 1].square()
                drift = path.apply(denoised - x, da2 / a[:, i].square(), db2 / b[:, i].square())  # (M_i - M_i+1) s
                x = x + drift + path.apply(randn_like(x), da2.clamp_min(0).sqrt(), db2.clamp_min(0).sqrt())
        else:
            f = den.flow(x, a[:, i], b[:, i])
            da, db = a[:, i + 1] - a[:, i], b[:, i + 1] - b[:, i]
            x_next = x - path.apply(f, da, db)
            if not last:
                x_next = x - path.apply((f + den.flow(x_next, a[:, i + 1], b[:, i + 1])) / 2, da, db)
            x = x_next
        x = replace(x, i + 1)
        if callback is not None:
            callback(dict(i=i, x=x, a=a[:, i + 1], b=b[:, i + 1], nfe=den.calls))
    return x


def network_evaluations(num_steps: int, predictor: str, corrector_steps: int = 0) -> int:
    """NFE of solve_inverse per image: N (sde) or 2N - 1 (heun), plus one per corrector step."""
    base = num_steps if predictor == 'sde' else 2 * num_steps - 1
    return base + num_steps * corrector_steps


__all__ = ['TASKS', 'PREDICTORS', 'COLOR_BASIS', 'Observation', 'MaskObservation', 'LowFrequencyObservation',
           'LuminanceObservation', 'to_color_basis', 'check_task_options', 'make_observation', 'check_sampler_options', 'solve_inverse',
           'network_evaluations']
