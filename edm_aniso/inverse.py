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
exactly. Between replacements the state moves with a predictor (the reverse-SDE step of the ``pc`` sampler, or the
deterministic Heun step of aniso_heun) and, optionally, Langevin corrector steps at each level (score-SDE's
predictor-corrector scheme, ``edm_aniso.stochastic.langevin_correct``) on the score's unknown component
(``conditional_score``), each followed by a replacement. The predictor alone follows the network's score at a noised
observation, score-SDE's approximation p_t(u | y) ~ p_t(u | K x_t): on correlated data it stays off the exact
conditional however many steps it takes; the corrector steps relax u toward p_t(u | K x_t) at each level, which at the
data end is the exact conditional. bench/inverse_gaussian.py measures both on Gaussian data (bench/RESULTS.md).
Everything per-subspace (M^1/2, M^-1, the blocks of the corrector) comes from the path (edm_aniso.path), so EDM
networks (a = b = sigma) and anisotropic ones run the same code.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from edm_aniso import stochastic
from edm_aniso.path import GRID_KINDS, PathDenoiser, noise_path
from edm_aniso.sampler import heun_step
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
        if self.block.L.device != x.device:
            self.block = self.block.to(x.device)
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


DEFAULT_SNR = 0.16          # score-SDE's signal-to-noise ratio for VE models (the pc sampler's default)


def conditional_score(den: Callable, path: Any, observation: Observation) -> Callable:
    """(x, a, b) -> (I - K) M^-1 (D(x; M) - x): the network's score with its known component removed, the score of
    p(u | K x) in the unknown component u.

    The corrector steps on it: x + E (I - K) g + (2 E)^1/2 z with E = eps_P P + eps_perp P_perp (langevin_correct);
    the replacement that follows keeps (I - K) of it, u + (I - K) E (I - K) g + 2^1/2 (I - K) E^1/2 z, which is
    Langevin dynamics on u with preconditioner (I - K) E (I - K): its invariant law (small steps) is the network's
    p(u | K x) at the level. On the full score the known component's score would leak into u through E wherever E
    does not commute with K (a pixel mask on an anisotropic DCT path; bench/inverse_gaussian.py measures it)."""
    def score(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g = path.apply(den(x, a, b) - x, a.square().reciprocal(), b.square().reciprocal())
        return g - observation.project(g)
    return score


def blocks_inside(path: Any, observation: Observation, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample [B] bool: does the block P (resp. P_perp) of the path lie inside the known component (range K)?
    E.g. P = K for super-resolution on the DCT split a network was trained on. Tested on a fixed random probe."""
    probe = torch.randn(like.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(like.device)
    out = []
    for v in (path.project(probe), probe - path.project(probe)):
        rest = (v - observation.project(v)).flatten(1).norm(dim=1)
        out.append(rest <= 1e-9 * v.flatten(1).norm(dim=1))
    return out[0], out[1]


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
    predictor:       str = 'heun',                      # 'sde': reverse-SDE step; 'heun': aniso_heun's step
    corrector_steps: int = 0,                           # Langevin steps at each level (0: none)
    snr:             Optional[float] = None,            # corrector signal-to-noise ratio (None: DEFAULT_SNR)
    corrector_step_size: Optional[Callable[[int], tuple]] = None,  # i -> fixed (eps_P, eps_perp) instead of the rule
    callback:        Optional[Callable[[dict], None]] = None,   # {'i', 'x', 'a', 'b', 'nfe'} after each level
) -> torch.Tensor:
    """Sample the unknown component given K x = ``known`` (module docstring); float64 [B, C, H, W] whose known
    component is ``known`` (exactly for masks, to rounding for the DCT block and luminance). It runs in the caller's
    grad mode (the command line uses no_grad; exact laws differentiate through it).

    Levels (a_i, b_i) from ``path.grid`` (a_N = b_N = 0). Start x_0 = M_0^1/2 z, replaced. At each level i < N:
    ``corrector_steps`` times one Langevin step at level i (``edm_aniso.stochastic.langevin_correct`` on the
    ``conditional_score``) followed by a replacement at level i; then the predictor to level i + 1, then a
    replacement at level i + 1 (at i + 1 = N: K x = y exactly, no noise drawn). Predictors, with D = D(x; M_i):

    - ``sde``: the reverse-diffusion step of the ``pc`` sampler (``edm_aniso.stochastic.reverse_sde_step``),
      x + (M_i - M_{i+1}) M_i^-1 (D - x) + (M_i - M_{i+1})^1/2 z per block; the last step returns D. NFE = N.
    - ``heun``: aniso_heun's per-subspace Heun step (the last one Euler). NFE = 2N - 1.

    The corrector's step sizes follow score-SDE's snr rule per block (``edm_aniso.stochastic.snr_step_sizes`` on the
    conditional score and the step's noise), set at a level's first corrector step and kept for the level's other
    steps (as ``langevin_correct`` does within one run), 0 on a block inside the known component (``blocks_inside``:
    its conditional score is 0 up to rounding, and the rule would divide by it); ``corrector_step_size`` fixes them
    instead (exact laws on Gaussian data). Each corrector step costs one evaluation more. Per-seed draws in order:
    latents (the caller's), a replacement at level 0, then per level each corrector step's noise and its replacement,
    the predictor's noise (sde, not on the last step) and the replacement at the next level (none at the data end)."""
    check_sampler_options(num_steps, predictor, corrector_steps, snr, grid)
    if known.shape != latents.shape:
        raise ValueError(f'known {tuple(known.shape)} and latents {tuple(latents.shape)} must have the same shape')
    path = noise_path(net, class_labels, latents)
    lev = path.grid(num_steps, grid, sigma_min, sigma_max, rho)
    den = PathDenoiser(net, path, class_labels)
    cond_score = conditional_score(den, path, observation)
    a, b = lev.a, lev.b
    known = known.to(torch.float64)
    snr = DEFAULT_SNR if snr is None else float(snr)
    inside = blocks_inside(path, observation, latents) if corrector_steps > 0 else None

    def replace(x: torch.Tensor, i: int) -> torch.Tensor:
        """Known component <- K (y + M_i^1/2 e); at the data end (a_i = b_i = 0) <- y."""
        if bool((a[:, i] == 0).all() and (b[:, i] == 0).all()):
            return observation.impose(x, known)
        noised = known + path.apply(randn_like(x), a[:, i], b[:, i])
        return observation.impose(x, observation.project(noised))

    def correct(x: torch.Tensor, level: tuple, eps: Optional[tuple]) -> tuple[torch.Tensor, tuple]:
        """One Langevin step (langevin_correct) on the conditional score; the snr rule (stochastic.snr_step_sizes)
        sets eps where it is None, from this step's score and noise, with step 0 on blocks inside range K."""
        g = cond_score(x, *level)
        z = randn_like(x)
        if eps is None:
            eps_a, eps_b = stochastic.snr_step_sizes(path, g, z, snr)
            eps = (torch.where(inside[0], torch.zeros_like(eps_a), eps_a),
                   torch.where(inside[1], torch.zeros_like(eps_b), eps_b))
        drift = path.apply(g, level[0].square(), level[1].square())       # D' - x with M^-1 (D' - x) = g
        x = stochastic.langevin_correct(path, lambda v, *_: v + drift, x, level, snr=snr, steps=1,
                                        randn_like=lambda like: z, step_size=eps)
        return x, eps

    x = replace(path.apply(latents.to(torch.float64), a[:, 0], b[:, 0]), 0)
    for i in range(num_steps):
        level = (a[:, i], b[:, i])
        eps = None if corrector_step_size is None else corrector_step_size(i)
        for _ in range(corrector_steps):
            x, eps = correct(x, level, eps)                 # the level's first step sets its step sizes
            x = replace(x, i)
        last = i == num_steps - 1
        if predictor == 'sde':
            x = stochastic.reverse_sde_step(path, x, den(x, *level), *level, a[:, i + 1], b[:, i + 1],
                                            None if last else randn_like(x))
        else:
            x = heun_step(den, path, x, den.flow(x, *level), *level, a[:, i + 1], b[:, i + 1], last)
        x = replace(x, i + 1)
        if callback is not None:
            callback(dict(i=i, x=x, a=a[:, i + 1], b=b[:, i + 1], nfe=den.calls))
    return x


def network_evaluations(num_steps: int, predictor: str, corrector_steps: int = 0) -> int:
    """NFE of solve_inverse per image: N (sde) or 2N - 1 (heun), plus one per corrector step."""
    base = num_steps if predictor == 'sde' else 2 * num_steps - 1
    return base + num_steps * corrector_steps


__all__ = ['TASKS', 'PREDICTORS', 'COLOR_BASIS', 'DEFAULT_SNR', 'Observation', 'MaskObservation',
           'LowFrequencyObservation', 'LuminanceObservation', 'to_color_basis', 'check_task_options',
           'make_observation', 'conditional_score', 'blocks_inside', 'check_sampler_options', 'solve_inverse',
           'network_evaluations']
