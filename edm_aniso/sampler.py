"""Deterministic samplers for anisotropic schedules: ``aniso_heun`` (method.md §6) and ``aniso_rk2`` (§6, optional).

Both follow EDM's sampler signature, so generate.py runs them by name (``--sampler=aniso_heun``). With a network that
has no ``levels``/``flow`` (an EDM ``EDMPrecond``) ``aniso_heun`` runs the isotropic case g = h = σ², which is EDM's
deterministic Heun sampler (``edm_sampler`` with S_churn = 0).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import click
import torch

from edm_aniso.schedule import karras_sigmas

try:
    from training.registry import SamplerEntry
except ImportError:      # inside upstream NVlabs/edm (patches/), whose training package has no registry
    SamplerEntry = None

# ----------------------------------------------------------------------------------------------------------------------
# Grids.


def edm_sigma_grid(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                   device: torch.device | str = 'cpu') -> torch.Tensor:
    """EDM's ρ-grid σ_0 = sigma_max > … > σ_{N−1} = sigma_min in float64 (method.md §6 step 1); N = 1 gives [sigma_max].

    The grid itself is ``edm_aniso.schedule.karras_sigmas``; this wrapper adds the N = 1 case and the ρ check."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if rho <= 0:
        raise ValueError(f'rho must be > 0, got {rho}')
    if num_steps == 1:   # the first level of the formula, (sigma_max^(1/rho))^rho, as for N >= 2
        return torch.full([1], sigma_max ** (1 / rho), dtype=torch.float64, device=device) ** rho
    return karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64, device=device)


def _clamp_range(net: Any, sigma_min: Optional[float], sigma_max: Optional[float]) -> tuple[float, float]:
    """EDM's clamp of the σ range to what the network supports."""
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


# ----------------------------------------------------------------------------------------------------------------------
# aniso_heun.


@torch.no_grad()
def aniso_heun(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
               randn_like: Callable = torch.randn_like,
               num_steps: int = 18,                 # N: Karras levels, NFE = 2N − 1
               sigma_min: Optional[float] = 0.002,  # lowest level (None: 0.002), clamped to net.sigma_min
               sigma_max: Optional[float] = 80.0,   # highest level (None: 80), clamped to net.sigma_max
               rho: float = 7.0,                    # ρ of the EDM grid
               trajectory: Optional[str] = None,    # directory for per-sample strips of denoised images (None: off)
               seeds: Optional[list[int]] = None,   # strip names (None: seeds of generate.py's generators, else a counter)
               callback: Optional[Callable[[dict], None]] = None,  # called with {'i', 'x', 'denoised', 'a', 'b'}
               **unused) -> torch.Tensor:
    """Per-subspace Heun on EDM's σ grid mapped to each sample's schedule times (method.md §6), float64 output.

    Step i: Δ = (a_{i+1} − a_i) P + (b_{i+1} − b_i) P_perp, x′ = x_i − Δ f(x_i; M_{t_i}); unless i = N − 1,
    x_{i+1} = x_i − Δ (f(x_i; M_{t_i}) + f(x′; M_{t_{i+1}}))/2. Start x_0 = M_{t_0}^{1/2} z (= sigma_max z at t_0 = T).
    """
    sigma_min, sigma_max = _clamp_range(net, sigma_min, sigma_max)
    sigmas = edm_sigma_grid(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    record = _recorder(trajectory, seeds, randn_like)
    if not is_aniso(net):
        x = _edm_heun(net, latents, class_labels, sigmas, record, callback)
    else:
        x = _aniso_heun(net, latents, class_labels, sigmas, record, callback)
    if record is not None:
        record.save(x)
    return x


def _edm_heun(net, latents, class_labels, sigmas, record, callback) -> torch.Tensor:
    """The isotropic case g = h = σ² with an EDM network: EDM's deterministic Heun, term by term."""
    t = torch.cat([net.round_sigma(sigmas), torch.zeros_like(sigmas[:1])])
    n = len(sigmas)
    x = latents.to(torch.float64) * t[0]
    for i in range(n):
        denoised = net(x, t[i], class_labels).to(torch.float64)
        d = (x - denoised) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if record is not None:
            record(denoised)
        if callback is not None:
            callback(dict(i=i, x=x, denoised=denoised, a=t[i], b=t[i]))
        if i < n - 1:
            d2 = (x_next - net(x_next, t[i + 1], class_labels).to(torch.float64)) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
        x = x_next
    return x


def _aniso_heun(net, latents, class_labels, sigmas, record, callback) -> torch.Tensor:
    batch = latents.shape[0]
    a, b = net.levels(sigmas, class_labels)                               # [B or 1, N+1] float64
    a = a.to(device=latents.device, dtype=torch.float64).expand(batch, -1)
    b = b.to(device=latents.device, dtype=torch.float64).expand(batch, -1)
    basis_id = net.rows_for(class_labels, batch)[1].to(latents.device)
    sub = net.subspace
    n = len(sigmas)

    def flow(x, i):
        return net.flow(x, a[:, i] ** 2, b[:, i] ** 2, class_labels, basis_id=basis_id).to(torch.float64)

    x = sub.apply(latents.to(torch.float64), a[:, 0], b[:, 0], basis_id)
    for i in range(n):
        f = flow(x, i)
        da, db = a[:, i + 1] - a[:, i], b[:, i + 1] - b[:, i]
        x_next = x - sub.apply(f, da, db, basis_id)
        if record is not None or callback is not None:
            denoised = x + sub.apply(f, a[:, i], b[:, i], basis_id)       # D = x + M^{1/2} f
            if record is not None:
                record(denoised)
            if callback is not None:
                callback(dict(i=i, x=x, denoised=denoised, a=a[:, i], b=b[:, i]))
        if i < n - 1:
            x_next = x - sub.apply((f + flow(x_next, i + 1)) / 2, da, db, basis_id)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------------------------------
# aniso_rk2 (uniform t, optional).


@torch.no_grad()
def aniso_rk2(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              randn_like: Callable = torch.randn_like,
              num_steps: int = 18,                 # N intervals of a uniform t grid on [0, T]; NFE = 2N − 1
              trajectory: Optional[str] = None,    # as in aniso_heun
              seeds: Optional[list[int]] = None,
              **unused) -> torch.Tensor:
    """Uniform-t two-stage RK2 per subspace (method.md §6, optional); sigma_min/sigma_max/rho do not apply.

    t_j = j T / N, j = N … 0 (N intervals). This deviates from method.md §6's t_j = j T / (N − 1) on purpose: with N
    intervals, N − 1 two-stage steps plus the final Euler step cost 2N − 1 evaluations, the same NFE as aniso_heun at
    the same --steps (with T/(N − 1) it would be 2N − 3), so the two samplers compare at equal cost.
    Per subspace with σ(t) = √g or √h: Δ_half = σ(t_m) − σ(t_k), Δ_full = σ(t_{k−1}) − σ(t_k), r = Δ_full/Δ_half,
    x_m = x − Δ_half f_0, x_next = x − Δ_full (f_0 + (r/2)(f_m − f_0)); the last step is Euler to 0.
    """
    if not (hasattr(net, 'schedules') and is_aniso(net)):
        raise ValueError('aniso_rk2 needs a network with learned schedules (--precond=aniso)')
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    batch, dev = latents.shape[0], latents.device
    big_t = float(net.sigma_max) ** 2
    basis_id = net.rows_for(class_labels, batch)[1].to(dev)
    sub, record = net.subspace, _recorder(trajectory, seeds, randn_like)

    def levels(t: float):
        if t <= 0:
            z = torch.zeros(batch, dtype=torch.float64, device=dev)
            return z, z
        g, _, h, _ = net.schedules(torch.full([batch], t, dtype=torch.float64, device=dev), class_labels)
        return g.to(torch.float64).sqrt(), h.to(torch.float64).sqrt()

    def flow(x, ab):
        return net.flow(x, ab[0] ** 2, ab[1] ** 2, class_labels, basis_id=basis_id).to(torch.float64)

    ts = [big_t * j / num_steps for j in range(num_steps, -1, -1)]
    cur = levels(ts[0])
    x = sub.apply(latents.to(torch.float64), cur[0], cur[1], basis_id)
    for k in range(num_steps):
        nxt = levels(ts[k + 1])
        f0 = flow(x, cur)
        if record is not None:
            record(x + sub.apply(f0, cur[0], cur[1], basis_id))
        full = (nxt[0] - cur[0], nxt[1] - cur[1])
        if k == num_steps - 1:
            x = x - sub.apply(f0, full[0], full[1], basis_id)
        else:
            mid = levels((ts[k] + ts[k + 1]) / 2)
            half = (mid[0] - cur[0], mid[1] - cur[1])
            fm = flow(x - sub.apply(f0, half[0], half[1], basis_id), mid)
            # Per subspace: x − Δ_full f0 − (Δ_full r / 2)(fm − f0), with r = Δ_full / Δ_half.
            x = x - sub.apply(f0, full[0], full[1], basis_id) \
                - sub.apply(fm - f0, full[0] ** 2 / (2 * half[0]), full[1] ** 2 / (2 * half[1]), basis_id)
        cur = nxt
    if record is not None:
        record.save(x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Registry entries (registered by edm_aniso.plugin).


def _opt(opts: Any, name: str, default=None):
    value = opts.get(name, default) if hasattr(opts, 'get') else getattr(opts, name, default)
    return default if value is None else value


def check_options(net: Any, opts: Any, needs_aniso: bool = False, sampler: str = 'aniso_heun') -> None:
    """One clear ``click.ClickException`` for an unusable network/option pair."""
    steps = _opt(opts, 'num_steps', 18)
    if steps < 1:
        raise click.ClickException(f'--steps must be >= 1 for --sampler={sampler}, got {steps}')
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
    if needs_aniso and not (is_aniso(net) and hasattr(net, 'schedules')):
        raise click.ClickException(f'--sampler={sampler} needs a network trained with --precond=aniso '
                                   f'(got {type(net).__name__})')


def _check_heun(net: Any, opts: Any) -> None:
    check_options(net, opts, needs_aniso=False, sampler='aniso_heun')


def _check_rk2(net: Any, opts: Any) -> None:
    check_options(net, opts, needs_aniso=True, sampler='aniso_rk2')


def _trajectory_option() -> click.Option:
    return click.Option(['--trajectory'], help='Save a strip PNG of the denoised estimate at every step per seed here',
                        metavar='DIR', type=str, default=None)


SAMPLER_ENTRIES: list = [] if SamplerEntry is None else [
    SamplerEntry(name='aniso_heun', sample=aniso_heun, options=[_trajectory_option()], check=_check_heun,
                 help='per-subspace Heun on the EDM grid mapped through the learned schedules (NFE 2N-1)'),
    SamplerEntry(name='aniso_rk2', sample=aniso_rk2, options=[], check=_check_rk2,
                 help='uniform-t RK2 on the learned schedules (NFE 2N-1)'),
]

__all__ = ['aniso_heun', 'aniso_rk2', 'edm_sigma_grid', 'is_aniso', 'check_options', 'TrajectoryRecorder',
           'SAMPLER_ENTRIES']
