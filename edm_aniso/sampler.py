"""Deterministic samplers for anisotropic schedules: ``aniso_heun`` (method.md §6) and ``aniso_rk2`` (§6, optional).

Both follow EDM's sampler signature, so generate.py runs them by name (``--sampler=aniso_heun``). With a network that
has no ``levels``/``flow`` (an EDM ``EDMPrecond``) ``aniso_heun`` runs the isotropic case g = h = σ², which is EDM's
deterministic Heun sampler (``edm_sampler`` with S_churn = 0).
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

import click
import torch

from edm_aniso.path import GRID_KINDS, NoisePath, PathDenoiser, edm_sigma_grid, noise_path

try:
    from training.registry import SamplerEntry
except ImportError:      # inside upstream NVlabs/edm (patches/), whose training package has no registry
    SamplerEntry = None

def _clamp_range(net: Any, sigma_min: Optional[float], sigma_max: Optional[float]) -> tuple[float, float]:
    """EDM's clamp of the sigma range to what the network supports."""
    sigma_min = 0.002 if sigma_min is None else sigma_min
    sigma_max = 80.0 if sigma_max is None else sigma_max
    return max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))


def is_aniso(net: Any) -> bool:
    """True for networks with learned schedules (AnisoPrecond API: ``levels`` and ``flow``)."""
    return hasattr(net, 'levels') and hasattr(net, 'flow')


# ----------------------------------------------------------------------------------------------------------------------
# Trajectory strips (``--trajectory``).


class TrajectoryRecorder:
    """Collects the denoised estimate of every step and writes one strip PNG per sample: <dir>/<name>-traj.png."""

    def __init__(self, out_dir: str, names: Optional[list[str]] = None):
        self.out_dir, self.names, self.frames = out_dir, names, []

    def __call__(self, denoised: torch.Tensor) -> None:
        self.frames.append(denoised.detach().to(torch.float64).cpu())

    def save(self, final: torch.Tensor) -> list[str]:
        import PIL.Image
        os.makedirs(self.out_dir, exist_ok=True)
        frames = torch.stack(self.frames + [final.detach().to(torch.float64).cpu()], dim=1)   # [B, S, C, H, W]
        pix = (frames * 127.5 + 128).clip(0, 255).to(torch.uint8)
        paths = []
        for k, strip in enumerate(pix):
            row = torch.cat(list(strip), dim=-1).permute(1, 2, 0).numpy()                  # [H, S·W, C]
            name = self.names[k] if self.names is not None else f'{TrajectoryRecorder._counter:06d}'
            TrajectoryRecorder._counter += 1
            path = os.path.join(self.out_dir, f'{name}-traj.png')
            PIL.Image.fromarray(row[:, :, 0] if row.shape[2] == 1 else row, 'L' if row.shape[2] == 1 else 'RGB').save(path)
            paths.append(path)
        return paths

    _counter = 0


def _recorder(trajectory: Optional[str], seeds: Optional[list[int]], randn_like: Any = None
              ) -> Optional[TrajectoryRecorder]:
    """A recorder naming strips by seed: given seeds, else the per-seed generators behind generate.py's randn_like."""
    if trajectory is None:
        return None
    gens = getattr(getattr(randn_like, '__self__', None), 'generators', None)
    if seeds is None and gens is not None:
        seeds = [gen.initial_seed() for gen in gens]
    names = [f'{int(s):06d}' for s in seeds] if seeds is not None else None
    return TrajectoryRecorder(trajectory, names)


class GridStart(NamedTuple):
    """What every sampler on a level grid starts from (``start_on_grid``)."""
    path: NoisePath                 # the network's noise path (per sample)
    den: PathDenoiser               # D(x; M) and the flow f on that path
    a: torch.Tensor                 # [B, N+1] levels on P (a_N = 0)
    b: torch.Tensor                 # [B, N+1] levels on P_perp
    x: torch.Tensor                 # x_0 = M_0^{1/2} z, float64
    record: Optional[TrajectoryRecorder]
    sigma: torch.Tensor             # [B, N+1] the effective levels of the grid (Grid.sigma)


def start_on_grid(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor], randn_like: Any,
                  num_steps: int, grid: str, sigma_min: Optional[float], sigma_max: Optional[float], rho: float,
                  trajectory: Optional[str], seeds: Optional[list[int]]) -> GridStart:
    """The network's path, its N + 1 levels (``NoisePath.grid``), the denoiser, the prior sample x_0 = M_0^{1/2} z
    and the optional trajectory recorder: the set-up shared by aniso_heun and the samplers built on it."""
    path = noise_path(net, class_labels, latents)
    lev = path.grid(num_steps, grid, sigma_min, sigma_max, rho)
    x = path.apply(latents.to(torch.float64), lev.a[:, 0], lev.b[:, 0])
    return GridStart(path, PathDenoiser(net, path, class_labels), lev.a, lev.b, x,
                     _recorder(trajectory, seeds, randn_like), lev.sigma)


def heun_step(den: PathDenoiser, path: NoisePath, x: torch.Tensor, f: torch.Tensor, a0: torch.Tensor,
              b0: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, last: bool) -> torch.Tensor:
    """One per-subspace Heun step from (a0, b0) to (a1, b1) (method.md §6), given f = den.flow(x, a0, b0):
    Delta = (a1 - a0) P + (b1 - b0) P_perp, x' = x - Delta f; unless ``last``, x - Delta (f + f(x'; M1)) / 2
    (the last step stays Euler). Shared by aniso_heun, aniso_sde and the inverse-problem solver."""
    da, db = a1 - a0, b1 - b0
    x_next = x - path.apply(f, da, db)
    if not last:
        x_next = x - path.apply((f + den.flow(x_next, a1, b1)) / 2, da, db)
    return x_next


# ----------------------------------------------------------------------------------------------------------------------
# aniso_heun.


@torch.no_grad()
def aniso_heun(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
               randn_like: Callable = torch.randn_like,
               num_steps: int = 18,                 # N: levels, NFE = 2N - 1
               sigma_min: Optional[float] = 0.002,  # lowest level (None: 0.002), clamped to net.sigma_min
               sigma_max: Optional[float] = 80.0,   # highest level (None: 80), clamped to net.sigma_max
               rho: float = 7.0,                    # rho of the Karras grid
               grid: str = 'karras',                # 'karras' | 'schedule' (edm_aniso.path.NoisePath.grid)
               trajectory: Optional[str] = None,    # directory for per-sample strips of denoised images (None: off)
               seeds: Optional[list[int]] = None,   # strip names (None: seeds of generate.py's generators, else a counter)
               callback: Optional[Callable[[dict], None]] = None,  # called with {'i', 'x', 'denoised', 'a', 'b'}
               **unused) -> torch.Tensor:
    """Per-subspace Heun on the network's noise path (method.md §6), float64 output.

    Levels (a_i, b_i) from ``NoisePath.grid`` (EDM's sigma grid mapped to each sample's schedule times, or uniform
    steps of schedule time down to 0 with grid='schedule'). Step i: Delta = (a_{i+1} - a_i) P + (b_{i+1} - b_i) P_perp,
    x' = x_i - Delta f(x_i; M_i); unless i = N - 1, x_{i+1} = x_i - Delta (f(x_i; M_i) + f(x'; M_{i+1}))/2.
    Start x_0 = M_0^{1/2} z. On an EDM network (a = b = sigma) every step is EDM's deterministic Heun step.
    """
    path, den, a, b, x, record, _ = start_on_grid(net, latents, class_labels, randn_like, num_steps, grid, sigma_min,
                                               sigma_max, rho, trajectory, seeds)
    for i in range(num_steps):
        f = den.flow(x, a[:, i], b[:, i])
        if record is not None or callback is not None:
            denoised = den.denoised_from_flow(x, f, a[:, i], b[:, i])
            if record is not None:
                record(denoised)
            if callback is not None:
                callback(dict(i=i, x=x, denoised=denoised, a=a[:, i], b=b[:, i]))
        x = heun_step(den, path, x, f, a[:, i], b[:, i], a[:, i + 1], b[:, i + 1], i == num_steps - 1)
    if record is not None:
        record.save(x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# aniso_rk2 (uniform t, optional).


@torch.no_grad()
def aniso_rk2(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              randn_like: Callable = torch.randn_like,
              num_steps: int = 18,                 # N intervals of a uniform t grid on [0, T]; NFE = 2N - 1
              trajectory: Optional[str] = None,    # as in aniso_heun
              seeds: Optional[list[int]] = None,
              **unused) -> torch.Tensor:
    """Uniform-t two-stage RK2 per subspace (method.md §6, optional); sigma_min/sigma_max/rho do not apply.

    t_j = j T / N, j = N ... 0 (N intervals). This deviates from method.md §6's t_j = j T / (N - 1) on purpose: with N
    intervals, N - 1 two-stage steps plus the final Euler step cost 2N - 1 evaluations, the same NFE as aniso_heun at
    the same --steps (with T/(N - 1) it would be 2N - 3), so the two samplers compare at equal cost.
    Per subspace with sigma(t) = sqrt(g) or sqrt(h): D_half = sigma(t_m) - sigma(t_k), D_full = sigma(t_{k-1}) -
    sigma(t_k), r = D_full/D_half, x_m = x - D_half f_0, x_next = x - D_full (f_0 + (r/2)(f_m - f_0)); the last step is
    Euler to 0.
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    batch = latents.shape[0]
    path = noise_path(net, class_labels, latents)
    if not path.has_schedule_time:
        raise ValueError('aniso_rk2 needs a network with learned schedules (--precond=aniso)')
    den, record = PathDenoiser(net, path, class_labels), _recorder(trajectory, seeds, randn_like)
    big_t = float(net.sigma_max) ** 2

    def levels(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        if t <= 0:
            z = torch.zeros(batch, dtype=torch.float64, device=latents.device)
            return z, z
        return path.split_at_time(t)

    ts = [big_t * j / num_steps for j in range(num_steps, -1, -1)]
    cur = levels(ts[0])
    x = path.apply(latents.to(torch.float64), cur[0], cur[1])
    for k in range(num_steps):
        nxt = levels(ts[k + 1])
        f0 = den.flow(x, *cur)
        if record is not None:
            record(den.denoised_from_flow(x, f0, *cur))
        full = (nxt[0] - cur[0], nxt[1] - cur[1])
        if k == num_steps - 1:
            x = x - path.apply(f0, full[0], full[1])
        else:
            mid = levels((ts[k] + ts[k + 1]) / 2)
            half = (mid[0] - cur[0], mid[1] - cur[1])
            fm = den.flow(x - path.apply(f0, half[0], half[1]), *mid)
            # Per subspace: x - D_full f0 - (D_full r / 2)(fm - f0), with r = D_full / D_half.
            x = x - path.apply(f0, full[0], full[1]) \
                - path.apply(fm - f0, full[0] ** 2 / (2 * half[0]), full[1] ** 2 / (2 * half[1]))
        cur = nxt
    if record is not None:
        record.save(x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Registry entries (registered by edm_aniso.plugin).


def _opt(opts: Any, name: str, default=None):
    value = opts.get(name, default) if hasattr(opts, 'get') else getattr(opts, name, default)
    return default if value is None else value


def check_options(net: Any, opts: Any, needs_aniso: bool = False, sampler: str = 'aniso_heun',
                  min_steps: int = 1) -> None:
    """One clear ``click.ClickException`` for an unusable network/option pair (shared by every noise-path sampler)."""
    steps = _opt(opts, 'num_steps', 18)
    if steps < min_steps:
        raise click.ClickException(f'--steps must be >= {min_steps} for --sampler={sampler}, got {steps}')
    sigma_min, sigma_max = _opt(opts, 'sigma_min', 0.002), _opt(opts, 'sigma_max', 80.0)
    if not 0 < sigma_min < sigma_max:
        raise click.ClickException(f'--sampler={sampler} needs 0 < --sigma_min < --sigma_max, '
                                   f'got {sigma_min} and {sigma_max}')
    lo, hi = _clamp_range(net, sigma_min, sigma_max)
    if not lo < hi:
        raise click.ClickException(f'the network supports sigma in [{float(net.sigma_min)}, {float(net.sigma_max)}]; '
                                   f'--sigma_min/--sigma_max leave an empty range')
    if _opt(opts, 'rho', 7.0) <= 0:
        raise click.ClickException(f'--rho must be > 0, got {_opt(opts, "rho")}')
    learned = getattr(net, 'schedule_g', None) is not None or hasattr(net, 'noise_path')
    if needs_aniso and not (is_aniso(net) and learned):
        raise click.ClickException(f'--sampler={sampler} needs a network trained with --precond=aniso '
                                   f'(got {type(net).__name__})')
    grid = _opt(opts, 'grid', 'karras')
    if grid not in GRID_KINDS:
        raise click.ClickException(f'--grid must be one of {", ".join(GRID_KINDS)}, got {grid!r}')
    if grid == 'schedule' and getattr(net, 'schedule_g', None) is None:
        raise click.ClickException(f'--grid=schedule needs a network with a learned schedule (--precond=aniso); '
                                   f'{type(net).__name__} has only the Karras grid')


def _check_heun(net: Any, opts: Any) -> None:
    check_options(net, opts, needs_aniso=False, sampler='aniso_heun')


def _check_rk2(net: Any, opts: Any) -> None:
    check_options(net, opts, needs_aniso=True, sampler='aniso_rk2')


# Options shared by the samplers on the noise path (one click.Option object each: generate.py lists a shared option
# once, under all its samplers).
TRAJECTORY_OPTION = click.Option(['--trajectory'], help='Save a strip PNG of the denoised estimate at every step per '
                                 'seed here', metavar='DIR', type=str, default=None)
GRID_OPTION = click.Option(['--grid'], help='Sampler levels: karras = EDM\'s sigma grid (rho), schedule = N uniform steps '
                           'of the learned schedule\'s time down to 0 (--sigma_min not applied)  [default: karras]',
                           type=click.Choice(list(GRID_KINDS)), default=None)

SAMPLER_ENTRIES: list = [] if SamplerEntry is None else [
    SamplerEntry(name='aniso_heun', sample=aniso_heun, options=[GRID_OPTION, TRAJECTORY_OPTION], check=_check_heun,
                 help='per-subspace Heun on the network\'s noise path (NFE 2N-1, N >= 1); EDM networks: EDM Heun'),
    SamplerEntry(name='aniso_rk2', sample=aniso_rk2, options=[TRAJECTORY_OPTION], check=_check_rk2,
                 help='uniform-t RK2 on the learned schedules (NFE 2N-1, N >= 1)'),
]

__all__ = ['aniso_heun', 'aniso_rk2', 'edm_sigma_grid', 'is_aniso', 'check_options', 'TrajectoryRecorder',
           'SAMPLER_ENTRIES', 'GRID_OPTION', 'TRAJECTORY_OPTION']
