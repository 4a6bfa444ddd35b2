"""Sample images from a trained diffusion network (EDM's generate.py, edm-interface.md §1.3 and §3).

Library first: :func:`generate_images` does the work and the click command only drives it. The samplers
(:func:`edm_sampler`, :func:`ablation_sampler`), :class:`StackedRandomGenerator` and :func:`parse_int_list` keep EDM's
names and signatures so that user code importing them from ``generate`` keeps working. Samplers are chosen by name
from ``training.registry.SAMPLERS``; the built-in entry ``edm`` is registered here, plugins add theirs.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib.util import parse_int_list  # re-exported: EDM users import it from generate.py
from torch_utils import distributed as dist
from torch_utils import misc
from training import preflight, registry

__all__ = ['edm_sampler', 'ablation_sampler', 'StackedRandomGenerator', 'parse_int_list', 'karras_sigmas',
           'load_network', 'generate_images', 'build_cli', 'main']

ABLATION_KEYS = ('solver', 'discretization', 'schedule', 'scaling')  # any of these selects ablation_sampler

# ---------------------------------------------------------------------------------------------------------------------
# Noise-level grids


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                  device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """EDM's step levels (paper eq. 5): (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0…N−1, in fp64."""
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2 (got {num_steps}): the grid divides by num_steps - 1')
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (num_steps - 1) * (lo - hi)) ** rho


def _clamp_range(net: Any, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Restrict [sigma_min, sigma_max] to what the network supports (EDM's first sampler step)."""
    return max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))


def _churn_gamma(level: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """Algorithm 2's γ_i: min(S_churn/N, √2 − 1) inside [S_min, S_max], else 0."""
    if S_min <= level <= S_max:
        return min(S_churn / num_steps, float(np.sqrt(2) - 1))
    return 0.0


# ---------------------------------------------------------------------------------------------------------------------
# EDM's sampler (Algorithm 2 of the paper)


def edm_sampler(
    net: Any,                                   # denoiser: net(x, sigma, class_labels), sigma_min/max, round_sigma
    latents: torch.Tensor,                      # [N, C, H, W] unit-variance noise
    class_labels: Optional[torch.Tensor] = None,    # [N, label_dim] one-hot, or None
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,  # source of churn noise
    num_steps: int = 18,                        # N; NFE = 2N − 1
    sigma_min: float = 0.002,                   # lowest level (raised to net.sigma_min)
    sigma_max: float = 80,                      # highest level (lowered to net.sigma_max)
    rho: float = 7,                             # step exponent
    S_churn: float = 0,                         # stochasticity strength; 0 = deterministic
    S_min: float = 0,                           # churn only where S_min <= t_i <= S_max
    S_max: float = float('inf'),
    S_noise: float = 1,                         # noise inflation
) -> torch.Tensor:
    """Heun's 2nd-order method on σ with Karras steps and optional churn (EDM Algorithm 2); returns x_N in fp64.

    The last step (to t_N = 0) is plain Euler, so the network is evaluated 2N − 1 times.
    """
    sigma_min, sigma_max = _clamp_range(net, sigma_min, sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f'sigma_min ({sigma_min:g}) must be below sigma_max ({sigma_max:g}) after clamping to the '
                         f'network range')
    levels = net.round_sigma(karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device))
    levels = torch.cat([levels, levels.new_zeros(1)])     # t_N = 0

    x = latents.to(torch.float64) * levels[0]
    for i in range(num_steps):
        t_cur, t_next = levels[i], levels[i + 1]

        # Churn: raise the level to t_hat and add the matching fresh noise. When churn is on, noise is drawn at every
        # step (possibly scaled by 0) so that each seed's random stream matches EDM's.
        gamma = _churn_gamma(float(t_cur), num_steps, S_churn, S_min, S_max)
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x
        if S_churn > 0:
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)

        # Euler predictor, then the trapezoidal corrector except on the final step.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_next = (x - net(x, t_next, class_labels).to(torch.float64)) / t_next
            x = x_hat + (t_next - t_hat) * (d_cur + d_next) / 2
    return x


# ---------------------------------------------------------------------------------------------------------------------
# EDM's generalised ablation sampler (paper §3, Table 1; edm-interface.md §3.2)


def _vp_sigma(beta_d: float, beta_min: float, t: Any) -> Any:
    """VP noise level σ(t) = √(exp(½β_d t² + β_min t) − 1); t is a float or a tensor."""
    if isinstance(t, torch.Tensor):
        return (torch.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1).sqrt()
    return float(np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1))


class _Schedule:
    """σ(t), σ'(t) and σ⁻¹ of one ablation schedule, plus the signal scaling s(t) and s'(t)."""

    def __init__(self, schedule: str, scaling: str, vp_beta_d: float, vp_beta_min: float) -> None:
        self.kind, self.scaling = schedule, scaling
        self.beta_d, self.beta_min = vp_beta_d, vp_beta_min

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == 'vp':
            return _vp_sigma(self.beta_d, self.beta_min, t)
        return t.sqrt() if self.kind == 've' else t

    def sigma_deriv(self, t: torch.Tensor) -> Any:
        if self.kind == 'vp':
            s = self.sigma(t)
            return 0.5 * (self.beta_min + self.beta_d * t) * (s + 1 / s)
        return 0.5 / t.sqrt() if self.kind == 've' else 1

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.kind == 'vp':
            bd, bm = self.beta_d, self.beta_min
            return ((bm ** 2 + 2 * bd * (sigma ** 2 + 1).log()).sqrt() - bm) / bd
        return sigma ** 2 if self.kind == 've' else sigma

    def s(self, t: torch.Tensor) -> Any:
        return 1 / (1 + self.sigma(t) ** 2).sqrt() if self.scaling == 'vp' else 1

    def s_deriv(self, t: torch.Tensor) -> Any:
        if self.scaling == 'vp':
            return -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3
        return 0

    def velocity(self, net: Any, x: torch.Tensor, t: torch.Tensor,
                 class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """dx/dt of the probability-flow ODE with scaling: (σ'/σ + s'/s)·x − σ'·s/σ · D(x/s; σ)."""
        sig, dsig, s, ds = self.sigma(t), self.sigma_deriv(t), self.s(t), self.s_deriv(t)
        denoised = net(x / s, sig, class_labels).to(torch.float64)
        return (dsig / sig + ds / s) * x - dsig * s / sig * denoised


def _iddpm_levels(M: int, C_1: float, C_2: float, device: Union[str, torch.device, None]) -> torch.Tensor:
    """iDDPM's u table: u_M = 0 and u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C_1) − 1), ᾱ(j) = sin²(π/2·j/(M(C_2+1)))."""
    # ᾱ and its ratios are evaluated in float32, as EDM does (integer steps times Python floats); this fixes the
    # published iDDPM levels (e.g. 0.006422 rather than 0.006425 for the smallest one). The recursion runs in fp64.
    j = torch.arange(M + 1, dtype=torch.float32)
    alpha_bar = torch.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1).tolist()
    u = [0.0] * (M + 1)
    for k in range(M, 0, -1):
        u[k - 1] = float(np.sqrt((u[k] ** 2 + 1) / ratio[k - 1] - 1))
    return torch.tensor(u, dtype=torch.float64, device=device)


def _ablation_sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                          epsilon_s: float, C_1: float, C_2: float, M: int, vp_beta_d: float, vp_beta_min: float,
                          device: Union[str, torch.device, None]) -> torch.Tensor:
    """The N noise levels σ_i of one discretisation (vp, ve, iddpm or edm), in fp64."""
    frac = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    if discretization == 'vp':
        return _vp_sigma(vp_beta_d, vp_beta_min, 1 + frac * (epsilon_s - 1))
    if discretization == 've':
        return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** frac).sqrt()
    if discretization == 'iddpm':
        u = _iddpm_levels(M, C_1, C_2, device)
        kept = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(kept) == 0:
            raise ValueError(f'no iDDPM level lies in [{sigma_min:g}, {sigma_max:g}]')
        return kept[((len(kept) - 1) * frac).round().to(torch.int64)]
    return karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)


def ablation_default_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """Default (sigma_min, sigma_max) of each discretisation before clamping (edm-interface.md §3.2 table)."""
    vp = (_vp_sigma(19.9, 0.1, epsilon_s), _vp_sigma(19.9, 0.1, 1.0))
    table = {'vp': vp, 've': (0.02, 100.0), 'iddpm': (0.002, 81.0), 'edm': (0.002, 80.0)}
    if discretization not in table:
        raise ValueError(f'unknown discretization {discretization!r}; choose one of vp, ve, iddpm, edm')
    return table[discretization]


def ablation_sampler(
    net: Any,                                   # denoiser, as for edm_sampler
    latents: torch.Tensor,                      # [N, C, H, W] unit-variance noise
    class_labels: Optional[torch.Tensor] = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    num_steps: int = 18,                        # N
    sigma_min: Optional[float] = None,          # None: the discretisation's default
    sigma_max: Optional[float] = None,          # None: the discretisation's default
    rho: float = 7,                             # exponent of the edm discretisation
    solver: str = 'heun',                       # euler | heun
    discretization: str = 'edm',                # vp | ve | iddpm | edm: how the σ_i are spaced
    schedule: str = 'linear',                   # vp | ve | linear: σ(t)
    scaling: str = 'none',                      # vp | none: s(t)
    epsilon_s: float = 1e-3,                    # VP's smallest t
    C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,     # iDDPM table
    alpha: float = 1,                           # node of the generalised 2nd-order step
    S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'), S_noise: float = 1,
) -> torch.Tensor:
    """EDM's superset sampler over solver, step spacing, σ(t) and s(t) (paper Table 1 / Algorithm 1); fp64 output.

    NFE: N for Euler, 2N − 1 for Heun (the last step is Euler).
    """
    choices = {'solver': (solver, ('euler', 'heun')), 'discretization': (discretization, ('vp', 've', 'iddpm', 'edm')),
               'schedule': (schedule, ('vp', 've', 'linear')), 'scaling': (scaling, ('vp', 'none'))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(allowed)}')
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2 (got {num_steps}): the grid divides by num_steps - 1')
    if alpha <= 0:
        raise ValueError(f'alpha must be positive (got {alpha})')

    default_min, default_max = ablation_default_range(discretization, epsilon_s)
    sigma_min, sigma_max = _clamp_range(net, default_min if sigma_min is None else sigma_min,
                                        default_max if sigma_max is None else sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f'sigma_min ({sigma_min:g}) must be below sigma_max ({sigma_max:g}) after clamping to the '
                         f'network range')

    # VP's β_d and β_min re-derived from the clamped range so that σ(ε_s) = σ_min and σ(1) = σ_max.
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
    sched = _Schedule(schedule, scaling, float(vp_beta_d), float(vp_beta_min))

    sigma_steps = _ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M,
                                        float(vp_beta_d), float(vp_beta_min), latents.device)
    t_steps = sched.sigma_inv(net.round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, t_steps.new_zeros(1)])  # t_N = 0

    x = latents.to(torch.float64) * (sched.sigma(t_steps[0]) * sched.s(t_steps[0]))
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        sig_cur = sched.sigma(t_cur)

        # Churn on σ(t): move to t_hat, rescale the signal and add the missing noise.
        gamma = _churn_gamma(float(sig_cur), num_steps, S_churn, S_min, S_max)
        t_hat = sched.sigma_inv(net.round_sigma(sig_cur + gamma * sig_cur))
        x_hat = sched.s(t_hat) / sched.s(t_cur) * x
        if S_churn > 0:
            extra = (sched.sigma(t_hat) ** 2 - sig_cur ** 2).clip(min=0).sqrt()
            x_hat = x_hat + extra * sched.s(t_hat) * S_noise * randn_like(x)

        # Euler step; Heun's generalised correction (node alpha) on every step but the last.
        h = t_next - t_hat
        d_cur = sched.velocity(net, x_hat, t_hat, class_labels)
        if solver == 'euler' or i == num_steps - 1:
            x = x_hat + h * d_cur
        else:
            d_prime = sched.velocity(net, x_hat + alpha * h * d_cur, t_hat + alpha * h, class_labels)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + d_prime / (2 * alpha))
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Per-seed random numbers


class StackedRandomGenerator:
    """One torch.Generator per seed (seeded with seed mod 2³²), so every image's noise is independent of batching."""

    def __init__(self, device: Union[str, torch.device], seeds: Iterable[int]) -> None:
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check_batch(self, size: Sequence[int]) -> None:
        if size[0] != len(self.generators):
            raise ValueError(f'leading size {size[0]} does not match the number of seeds ({len(self.generators)})')

    def randn(self, size: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """Stack of per-seed standard normal draws of shape size[1:]."""
        self._check_batch(size)
        return torch.stack([torch.randn(list(size[1:]), generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """randn with the dtype, layout and device of ``input``."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args: Any, size: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """Stack of per-seed torch.randint(*args, size=size[1:]) draws."""
        self._check_batch(size)
        return torch.stack([torch.randint(*args, size=list(size[1:]), generator=g, **kwargs) for g in self.generators])


# ---------------------------------------------------------------------------------------------------------------------
# The built-in `edm` sampler entry


def _edm_entry_sample(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                      randn_like: Callable = torch.randn_like, **opts: Any) -> torch.Tensor:
    """--sampler=edm: edm_sampler, or ablation_sampler when any of --solver/--disc/--schedule/--scaling is given."""
    opts = {k: v for k, v in opts.items() if v is not None}
    fn = ablation_sampler if any(k in opts for k in ABLATION_KEYS) else edm_sampler
    return fn(net, latents, class_labels, randn_like=randn_like, **opts)


def _edm_entry_check(net: Any, opts: dict) -> None:
    """Refuse --steps < 2 and an empty noise range for the EDM samplers before any work is done."""
    steps = opts.get('num_steps')
    if steps is not None and steps < 2:
        raise click.ClickException(f'--steps must be at least 2 for --sampler=edm (got {steps}); EDM divides by '
                                   f'steps - 1 and returns NaN images at --steps=1')
    if any(opts.get(k) is not None for k in ABLATION_KEYS):
        lo, hi = ablation_default_range(opts.get('discretization') or 'edm')
    else:
        lo, hi = 0.002, 80.0
    lo = lo if opts.get('sigma_min') is None else opts['sigma_min']
    hi = hi if opts.get('sigma_max') is None else opts['sigma_max']
    lo_net, hi_net = _clamp_range(net, lo, hi)
    if not lo_net < hi_net:
        raise click.ClickException(f'sigma_min must be below sigma_max: got {lo:g} and {hi:g} (network supports '
                                   f'{float(net.sigma_min):g} to {float(net.sigma_max):g})')


def _edm_options() -> list[click.Option]:
    """Options owned by the edm entry (default None, so that other samplers can refuse them)."""
    def opt(*decls: str, **kw: Any) -> click.Option:
        return click.Option(list(decls), default=None, **kw)
    return [
        opt('--S_churn', 'S_churn', help='Stochasticity strength  [default: 0]', metavar='FLOAT',
            type=click.FloatRange(min=0)),
        opt('--S_min', 'S_min', help='Stoch. min noise level  [default: 0]', metavar='FLOAT',
            type=click.FloatRange(min=0)),
        opt('--S_max', 'S_max', help='Stoch. max noise level  [default: inf]', metavar='FLOAT',
            type=click.FloatRange(min=0)),
        opt('--S_noise', 'S_noise', help='Stoch. noise inflation  [default: 1]', metavar='FLOAT', type=float),
        opt('--solver', help='Ablate ODE solver', metavar='euler|heun', type=click.Choice(['euler', 'heun'])),
        opt('--disc', 'discretization', help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm',
            type=click.Choice(['vp', 've', 'iddpm', 'edm'])),
        opt('--schedule', help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear',
            type=click.Choice(['vp', 've', 'linear'])),
        opt('--scaling', help='Ablate signal scaling s(t)', metavar='vp|none', type=click.Choice(['vp', 'none'])),
    ]


EDM_SAMPLER_ENTRY = registry.register_sampler(registry.SamplerEntry(
    name='edm', sample=_edm_entry_sample, options=_edm_options(), check=_edm_entry_check, min_steps=2,
    help="EDM's Heun sampler (Algorithm 2); the ablation sampler when --solver/--disc/--schedule/--scaling is given"))


# ---------------------------------------------------------------------------------------------------------------------
# Loading networks and writing images


def load_network(network_pkl: str, device: Union[str, torch.device] = 'cpu', verbose: bool = True) -> Any:
    """Read the 'ema' network of an EDM-format pickle (path or URL) and move it to ``device``.

    The pickle is read and checked by `training.preflight.read_network_pickle`, the reader train.py checks --transfer
    with: ValueError with one line for a missing, truncated or foreign file."""
    return preflight.read_network_pickle(network_pkl, verbose=verbose)['ema'].to(device)


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    """`<outdir>/<seed:06d>.png`, or `<outdir>/<seed - seed % 1000:06d>/<seed:06d>.png` with --subdirs."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW → uint8 NHWC as EDM: x·127.5 + 128, clipped to [0, 255], truncated."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str) -> None:
    """Write one HWC uint8 image: greyscale ('L') for one channel, RGB for three."""
    if image.shape[2] not in (1, 3):
        raise ValueError(f'cannot save an image with {image.shape[2]} channels as PNG (need 1 or 3)')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path)


def seed_batches(seeds: Sequence[int], max_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """EDM's split: ⌈len/(batch·world)⌉·world near-equal consecutive chunks, rank r taking chunks r, r + world, …."""
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    chunks = np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)
    return [[int(s) for s in chunk] for chunk in chunks[rank::world_size]]


def generate_images(
    network: Union[str, torch.nn.Module],       # pickle path or URL, or an already loaded network
    outdir: str,                                # where the PNGs go
    seeds: Sequence[int] = tuple(range(64)),    # one image per seed
    subdirs: bool = False,                      # group images in folders of 1000 seeds
    class_idx: Optional[int] = None,            # None: a random class per seed (conditional nets)
    max_batch_size: int = 64,                   # images per sampler call and process
    sampler: str = 'edm',                       # name in training.registry.SAMPLERS
    device: Union[str, torch.device, None] = None,  # None: cuda if available, else cpu
    progress: bool = True,                      # tqdm bar on rank 0
    **sampler_kwargs: Any,                      # num_steps, sigma_min, ... and the sampler's own options; None = unset
) -> list[str]:
    """Generate one image per seed with the chosen sampler and write them as PNG; returns this rank's file paths.

    Latents, labels and churn noise come from per-seed generators on ``device`` (in that order), so an image depends
    only on its seed, the network and the options, not on batch size or process count. Under torchrun the seeds are
    split over ranks as in EDM.
    """
    if sampler not in registry.SAMPLERS:
        raise ValueError(f'unknown sampler {sampler!r}; choose one of {", ".join(sorted(registry.SAMPLERS))}')
    if len(seeds) == 0:
        raise ValueError('no seeds given')
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size must be at least 1 (got {max_batch_size})')
    entry = registry.SAMPLERS[sampler]
    device = misc.pick_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()

    # Rank 0 loads (and possibly downloads) first; the others follow from the cache.
    if isinstance(network, str):
        if rank != 0:
            dist.barrier()
        dist.print0(f'Loading network from "{network}"...')
        try:
            net = load_network(network, device=device, verbose=(rank == 0))
        finally:
            if rank == 0:
                dist.barrier()
    else:
        net = network.to(device)

    label_dim = int(net.label_dim)
    if class_idx is not None:
        if label_dim == 0:
            raise ValueError(f'--class={class_idx} given, but the network is unconditional (label_dim = 0)')
        if not 0 <= class_idx < label_dim:
            raise ValueError(f'--class={class_idx} is out of range: the network has {label_dim} classes '
                             f'(0 to {label_dim - 1})')
    if entry.check is not None:
        entry.check(net, dnnlib.EasyDict(sampler_kwargs, sampler=sampler, class_idx=class_idx,
                                         max_batch_size=max_batch_size, seeds=list(seeds)))
    sampler_opts = {k: v for k, v in sampler_kwargs.items() if v is not None}

    batches = seed_batches(list(seeds), max_batch_size, rank, world)
    dist.print0(f'Generating {len(seeds)} images to "{outdir}"...')
    written = []
    for batch_seeds in tqdm.tqdm(batches, unit='batch', disable=(rank != 0 or not progress)):
        dist.barrier()
        if not batch_seeds:
            continue
        rnd = StackedRandomGenerator(device, batch_seeds)
        n = len(batch_seeds)
        latents = rnd.randn([n, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = None
        if label_dim > 0:
            labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[n], device=device)]
            if class_idx is not None:
                labels = torch.zeros_like(labels)
                labels[:, class_idx] = 1
        with torch.no_grad():
            images = entry.sample(net, latents, labels, randn_like=rnd.randn_like, **sampler_opts)
        for seed, image in zip(batch_seeds, to_uint8(images)):
            path = image_path(outdir, seed, subdirs)
            save_png(image, path)
            written.append(path)
    dist.barrier()
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Command line


class _SectionedCommand(click.Command):
    """A click command whose --help lists each sampler's own options under a heading of their own."""

    def __init__(self, *args: Any, sections: Sequence[tuple[str, Sequence[str]]] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sections = list(sections)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        owned = {name for _, names in self.sections for name in names}
        groups = [('Options', [p for p in self.get_params(ctx) if p.name not in owned])]
        by_name = {p.name: p for p in self.params}
        groups += [(title, [by_name[n] for n in names]) for title, names in self.sections]
        for title, params in groups:
            rows = [r for r in (p.get_help_record(ctx) for p in params) if r is not None]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _min_steps_text() -> str:
    """'2 for edm, 1 for aniso_heun, ...': each registered sampler's smallest --steps."""
    by_min: dict[int, list[str]] = {}
    for name, entry in sorted(registry.SAMPLERS.items()):
        by_min.setdefault(entry.min_steps, []).append(name)
    return '; '.join(f'{n} for {", ".join(names)}' for n, names in sorted(by_min.items(), reverse=True))


def _base_options() -> list[click.Option]:
    """EDM's generate.py options that apply to every sampler, plus --device and --sampler."""
    names = sorted(registry.SAMPLERS)
    return [
        click.Option(['--network', 'network_pkl'], help='Network pickle filename', metavar='PATH|URL', type=str,
                     required=True),
        click.Option(['--outdir'], help='Where to save the output images', metavar='DIR', type=str, required=True),
        click.Option(['--seeds'], help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=parse_int_list,
                     default='0-63', show_default=True),
        click.Option(['--subdirs'], help='Create subdirectory for every 1000 seeds', is_flag=True),
        click.Option(['--class', 'class_idx'], help='Class label  [default: random]', metavar='INT',
                     type=click.IntRange(min=0), default=None),
        click.Option(['--batch', 'max_batch_size'], help='Maximum batch size', metavar='INT',
                     type=click.IntRange(min=1), default=64, show_default=True),
        click.Option(['--steps', 'num_steps'], help=f'Number of sampling steps (at least {_min_steps_text()})',
                     metavar='INT',
                     type=click.IntRange(min=1), default=18, show_default=True),
        click.Option(['--sigma_min'], help='Lowest noise level  [default: varies]', metavar='FLOAT',
                     type=click.FloatRange(min=0, min_open=True)),
        click.Option(['--sigma_max'], help='Highest noise level  [default: varies]', metavar='FLOAT',
                     type=click.FloatRange(min=0, min_open=True)),
        click.Option(['--rho'], help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
                     default=7, show_default=True),
        click.Option(['--sampler'], help='Sampler', type=click.Choice(names), default='edm', show_default=True),
        click.Option(['--device'], help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str,
                     default=None),
    ]


def _run(network_pkl: str, outdir: str, seeds: list[int], subdirs: bool, class_idx: Optional[int],
         max_batch_size: int, sampler: str, device: Optional[str], **sampler_kwargs: Any) -> None:
    """Body of the command: validate, start the process group, generate."""
    registry.check_foreign_options(registry.SAMPLERS, sampler, sampler_kwargs, '--sampler')
    try:
        dev = dist.init(device)   # cuda → cuda:LOCAL_RANK under torchrun
        generate_images(network_pkl, outdir, seeds=seeds, subdirs=subdirs, class_idx=class_idx,
                        max_batch_size=max_batch_size, sampler=sampler, device=dev, **sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    dist.print0('Done.')


def build_cli() -> click.Command:
    """The generate.py command: the base options plus the options of every registered sampler."""
    registry.load_plugins()
    params = _base_options()
    owners = registry.option_owners(registry.SAMPLERS)
    sections: dict[str, list[str]] = {}
    for entry in registry.SAMPLERS.values():
        for opt in entry.options:            # an option shared by several samplers is listed once, under all of them
            if opt.name not in {p.name for p in params}:
                params.append(opt)
                sections.setdefault(f'Options of --sampler={owners[opt.name][0]}', []).append(opt.name)
    sections = list(sections.items())
    epilog_lines = [f'{name}: {e.help}' for name, e in sorted(registry.SAMPLERS.items()) if e.help]
    return _SectionedCommand(
        name='generate', params=params, callback=_run, sections=sections,
        help=('Generate random images with a trained diffusion network (EDM-compatible).\n\n'
              'Examples:\n\n\b\n'
              '  python generate.py --outdir=out --seeds=0-63 --batch=64 --network=NET.pkl\n\b\n'
              '  torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-999 --network=NET.pkl\n\n'
              'Samplers:\n\n\b\n' + '\n'.join(f'  {line}' for line in epilog_lines)))


def main() -> None:
    """Entry point: build the command (loading plugins) and run it."""
    build_cli()()


if __name__ == '__main__':
    main()
