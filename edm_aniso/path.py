"""The noise path of a batch: the one description of M = g P + h P_perp that samplers, likelihood and inverse
problems share (the role of score-SDE's SDE class, for VE-type matrix schedules; method.md §1, §2, §6).

Every path is indexed by its **effective level** sigma, sigma^2 = F(t) = sqrt(g(t) h(t)) (method.md §2), so that EDM's
sigma grids, its churn sigma -> sigma (1 + gamma) and log-sigma integration variables carry over unchanged:

    a(sigma) = sqrt(g(t)),  b(sigma) = sqrt(h(t)),  t = F^{-1}(sigma^2),  a b = sigma^2.

- ``SigmaPath``: EDM networks (EDMPrecond, VP/VE/iDDPM preconditioners): isotropic, a = b = sigma, P = 0.
- ``SchedulePath``: networks with learned knot schedules (AnisoPrecond, the exact oracles of edm_aniso.gaussian):
  a and b from each sample's schedule row, P the network's subspace with each sample's basis.
A network may also build its own path (a ``noise_path(class_labels, batch)`` method); ``noise_path`` picks.

The per-subspace algebra, all per sample and blockwise on P and P_perp (``apply(v, alpha, beta) = alpha P v + beta
P_perp v``, so psi(M) v = apply(v, psi(a^2), psi(b^2))):

    kappa_a = d ln a / d ln sigma,  kappa_b = d ln b / d ln sigma      (kappa_a + kappa_b = 2; 1 and 1 on SigmaPath)
    probability-flow ODE   dx / d ln sigma = -apply(D - x, kappa_a, kappa_b)      (EDM: dx/dsigma = (x - D)/sigma)
    score                  grad log p = M^-1 (D - x) = apply(D - x, a^-2, b^-2)
    flow head              f = M^-1/2 (D - x) = apply(D - x, 1/a, 1/b)             (method.md §1)
    prior                  N(0, M(sigma_max)),  log density in closed form
    noise between levels   x + (M(sigma') - M(sigma))^1/2 e = x + apply(e, sqrt(a'^2 - a^2), sqrt(b'^2 - b^2))

The PF-ODE follows from method.md §1, dx/dt = -1/2 M_dot M^-1 (D - x), with d ln g / d ln F = kappa_a:
d ln F = 2 d ln sigma, so dx/d ln sigma = -(d ln g/d ln F) P (D - x) - (d ln h/d ln F) P_perp (D - x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from edm_aniso import schedule as sched
from edm_aniso.subspace import IsoSubspace

GRID_KINDS = ('karras', 'schedule')

# ----------------------------------------------------------------------------------------------------------------------
# Grids.


def edm_sigma_grid(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                   device: torch.device | str = 'cpu') -> torch.Tensor:
    """EDM's rho-grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min in float64 (method.md §6 step 1); N = 1
    gives [sigma_max]. The grid itself is ``edm_aniso.schedule.karras_sigmas``; this adds N = 1 and the rho check."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if rho <= 0:
        raise ValueError(f'rho must be > 0, got {rho}')
    if num_steps == 1:   # the first level of the formula, (sigma_max^(1/rho))^rho, as for N >= 2
        return torch.full([1], sigma_max ** (1 / rho), dtype=torch.float64, device=device) ** rho
    return sched.karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64, device=device)


@dataclass
class Grid:
    """A sampler's levels per sample: effective sigma, a on P and b on P_perp, each [B, N+1] float64 with a final 0
    (the data end), and the schedule times t [B, N+1] where the path has them (None on SigmaPath and oracles)."""
    sigma: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    t: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return self.sigma.shape[1] - 1


# ----------------------------------------------------------------------------------------------------------------------
# Paths.


def _net_shape(net: Any) -> tuple[int, int, int]:
    return int(net.img_channels), int(net.img_resolution), int(net.img_resolution)


def _per_sample(v: Any, batch: int, device: torch.device) -> torch.Tensor:
    """A float64 tensor [B, ...]: a scalar (or a leading size of 1) is broadcast to every sample, [B, ...] is kept."""
    v = torch.as_tensor(v, dtype=torch.float64, device=device)
    if v.ndim == 0:
        return v.expand(batch)
    if v.shape[0] == 1 and batch != 1:
        return v.expand(batch, *v.shape[1:])
    if v.shape[0] != batch:
        raise ValueError(f'levels must be a scalar or have one row per sample ({batch}), got shape {tuple(v.shape)}; '
                         f'give a shared grid [N] as [1, N]')
    return v


class NoisePath:
    """M(sigma) = a(sigma)^2 P + b(sigma)^2 P_perp for one batch of B samples (see the module docstring).

    Subclasses provide ``split`` (and, where they can, ``log_slopes``, ``time``, ``sigma_at_time``). Levels are
    scalars, [B] or [B, N] per sample, or [1, N] for a grid shared by every sample; results are [B] or [B, N] float64."""

    has_schedule_time = False   # True where a learned schedule time t exists (--grid=schedule needs it)
    constant_slopes = False     # True where kappa is constant between kinks (then an ODE piece may use one value)

    def __init__(self,
        subspace:   Any,                        # object with apply(v, alpha, beta, basis_id) and project, rank
        basis_id:   Optional[torch.Tensor],     # [B] long basis of each sample, or None (one basis)
        batch:      int,                        # B
        shape:      tuple[int, int, int],       # (C, H, W) of one sample
        sigma_min:  float,                      # lowest level the network supports
        sigma_max:  float,                      # highest level; the prior is N(0, M(sigma_max))
        device:     torch.device | str = 'cpu',
    ) -> None:
        self.subspace, self.basis_id, self.batch = subspace, basis_id, int(batch)
        self.shape = tuple(int(s) for s in shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.device = torch.device(device)

    # -- the per-subspace algebra --------------------------------------------------------------------------------------

    @property
    def dims(self) -> tuple[int, int]:
        """(dim P, dim P_perp) of one sample: C * rank and the rest."""
        c, h, w = self.shape
        d_p = c * int(getattr(self.subspace, 'rank', 0))
        return d_p, c * h * w - d_p

    def apply(self, v: torch.Tensor, alpha: Any, beta: Any) -> torch.Tensor:
        """alpha P v + beta P_perp v with per-sample scalars alpha, beta ([B] or scalars), each sample its basis."""
        return self.subspace.apply(v, alpha, beta, self.basis_id)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """P v."""
        return self.subspace.project(v, self.basis_id)

    def levels(self, sigma: Any) -> torch.Tensor:
        """The level tensor [B, ...] float64 for ``sigma`` (scalar, [1, ...] shared, or [B, ...] per sample)."""
        return _per_sample(sigma, self.batch, self.device)

    def split(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) per sample at effective level(s) sigma: the standard deviations of the noise on P and P_perp."""
        raise NotImplementedError

    def log_slopes(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(kappa_a, kappa_b) = (d ln a / d ln sigma, d ln b / d ln sigma) per sample; they sum to 2."""
        raise NotImplementedError(f'{type(self).__name__} has no continuous schedule derivatives')

    def time(self, sigma: Any) -> torch.Tensor:
        """Schedule time t = F^{-1}(sigma^2) per sample (paths with a learned schedule only)."""
        raise NotImplementedError(f'{type(self).__name__} has no schedule time')

    def sigma_at_time(self, t: Any) -> torch.Tensor:
        """Effective level sqrt(F(t)) per sample (paths with a learned schedule only)."""
        raise NotImplementedError(f'{type(self).__name__} has no schedule time')

    def split_at_time(self, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) = (sqrt g(t), sqrt h(t)) per sample at schedule time t (paths with a learned schedule only)."""
        raise NotImplementedError(f'{type(self).__name__} has no schedule time')

    def kinks(self, sigma_lo: float, sigma_hi: float) -> list[float]:
        """Levels in (sigma_lo, sigma_hi) where kappa jumps for some sample (knots of a learned schedule), ascending:
        an ODE solver should not step across them. None on SigmaPath."""
        return []

    def covariance_apply(self, v: torch.Tensor, sigma: Any, power: float) -> torch.Tensor:
        """M(sigma)^power v."""
        a, b = self.split(sigma)
        return self.apply(v, a ** (2 * power), b ** (2 * power))

    def score(self, x: torch.Tensor, denoised: torch.Tensor, sigma: Any) -> torch.Tensor:
        """grad_x log p = M^-1 (D - x) (Tweedie, method.md §1)."""
        a, b = self.split(sigma)
        return self.apply(denoised - x, a ** -2, b ** -2)

    def ode_derivative(self, x: torch.Tensor, denoised: torch.Tensor, sigma: Any,
                       slopes: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Probability-flow ODE dx / d ln sigma = -apply(D - x, kappa_a, kappa_b) (module docstring); ``slopes``
        gives (kappa_a, kappa_b) instead of evaluating them at sigma (e.g. a piece's own value at its end knots)."""
        ka, kb = self.log_slopes(sigma) if slopes is None else slopes
        return -self.apply(denoised - x, ka, kb)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, sigma_from: Any, sigma_to: Any) -> torch.Tensor:
        """Move x from level sigma_from up to sigma_to >= sigma_from along the path: x + (M(to) - M(from))^1/2 noise.

        Per block the added variance is a_to^2 - a_from^2 and b_to^2 - b_from^2 (both >= 0 on monotone schedules),
        so a sample of p(sigma_from) becomes a sample of p(sigma_to). With a = b this is EDM's churn noise
        sqrt(sigma_to^2 - sigma_from^2) noise."""
        a0, b0 = self.split(sigma_from)
        a1, b1 = self.split(sigma_to)
        return x + self.apply(noise, (a1.square() - a0.square()).clamp_min(0).sqrt(),
                              (b1.square() - b0.square()).clamp_min(0).sqrt())

    # -- prior -------------------------------------------------------------------------------------------------------

    def prior_sample(self, z: torch.Tensor) -> torch.Tensor:
        """x = M(sigma_max)^1/2 z in float64 (method.md §6 step 3)."""
        a, b = self.split(self.sigma_max)
        return self.apply(z.to(torch.float64), a, b)

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, M(sigma_max)) per sample [B] float64."""
        a, b = self.split(self.sigma_max)
        x = x.to(torch.float64)
        px = self.project(x)
        quad = (px.square().flatten(1).sum(1) / a.square() + (x - px).square().flatten(1).sum(1) / b.square())
        d_p, d_q = self.dims
        logdet = 2 * d_p * a.log() + 2 * d_q * b.log()
        return -0.5 * (quad + logdet + (d_p + d_q) * math.log(2 * math.pi))

    # -- grids -------------------------------------------------------------------------------------------------------

    def grid(self,
        num_steps:  int,                        # N levels before the final 0
        kind:       str             = 'karras', # 'karras': EDM's rho grid; 'schedule': N uniform steps of t to 0
        sigma_min:  Optional[float] = None,     # None: 0.002, raised to the network's sigma_min
        sigma_max:  Optional[float] = None,     # None: 80, lowered to the network's sigma_max
        rho:        float           = 7.0,      # rho of the Karras grid
    ) -> Grid:
        """The sampler levels (method.md §6).

        ``karras``: sigma_i = EDM's rho grid, so t_i = F^{-1}(sigma_i^2) and a learned schedule only sets the split
        a_i/b_i at each Karras level (a learned isotropic g is then a pure reparametrisation: exactly EDM's levels).
        ``schedule``: N uniform steps of schedule time from t_0 = t(sigma_max) down to 0, t_i = t_0 (1 - i/N),
        i = 0 ... N-1, sigma_i = sqrt(F(t_i)), and the final level 0 at t_N = 0: a learned g is then a learned time grid
        and a learned (g, h) a learned grid and split, decided by the schedule alone (``sigma_min`` is not applied;
        the last level before 0 is sigma(t_0 / N), set by the learned g). This is the grid the discretisation
        objective trains for (edm_aniso.disc_loss, docs/discretisation-objective.md: steps of t_0/K). With the
        Karras initialisation of g it is a rho-like grid whose last level sigma(T/N) lies inside the knot grid
        (with that init about 0.007 at N = 18 and 0.085 at N = 5). Both grids end with a_N = b_N = 0."""
        if kind not in GRID_KINDS:
            raise ValueError(f'unknown grid {kind!r}; choose one of {", ".join(GRID_KINDS)}')
        lo = max(0.002 if sigma_min is None else float(sigma_min), self.sigma_min)
        hi = min(80.0 if sigma_max is None else float(sigma_max), self.sigma_max)
        if kind == 'karras':
            sig = self._karras(edm_sigma_grid(num_steps, lo, hi, rho, device=self.device))[None]
            a, b = self.split(sig)
            t = self.time(sig) if self.has_schedule_time else None
            sig = self.levels(sig)
        else:
            if not self.has_schedule_time:
                raise ValueError('--grid=schedule needs a network with a learned schedule (--precond=aniso); '
                                 'an EDM network has only the Karras grid')
            t0 = self.time(hi)                                                   # [B]
            frac = torch.arange(num_steps, dtype=torch.float64, device=self.device) / num_steps
            t = t0[:, None] * (1 - frac[None])                                   # [B, N]: t_0 (1 - i/N)
            a, b = self.split_at_time(t)
            sig = (a * b).sqrt()
        zero = torch.zeros(self.batch, 1, dtype=torch.float64, device=self.device)
        if t is not None:
            t = torch.cat([t, zero], dim=1)
        return Grid(sigma=torch.cat([sig, zero], 1), a=torch.cat([a, zero], 1), b=torch.cat([b, zero], 1), t=t)

    def _karras(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Hook for networks that round levels (iDDPM): the identity here."""
        return sigmas


class SigmaPath(NoisePath):
    """EDM networks: a = b = sigma, P = 0 (method.md §1 reduction). Levels pass through the network's round_sigma
    on the Karras grid, as EDM's samplers do."""

    constant_slopes = True

    def __init__(self, net: Any, batch: int, device: torch.device | str = 'cpu',
                 shape: Optional[tuple[int, int, int]] = None) -> None:
        super().__init__(IsoSubspace(), None, batch, shape or _net_shape(net), float(net.sigma_min),
                         float(net.sigma_max), device)
        self._round = getattr(net, 'round_sigma', None)

    def split(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.levels(sigma)
        return s, s

    def log_slopes(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        one = torch.ones_like(self.levels(sigma))
        return one, one

    def _karras(self, sigmas: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._round(sigmas), dtype=torch.float64) if self._round is not None else sigmas


class SchedulePath(NoisePath):
    """Learned knot schedules g, h (rows per sample for class banks) on the network's subspace (method.md §2-3).

    Built from any network with ``schedule_g``, ``schedule_h`` (KnotSchedule; stage 1 aliases h to g), ``rows_for``
    and ``subspace``: AnisoPrecond and the schedule oracles of edm_aniso.gaussian."""

    has_schedule_time = True
    constant_slopes = True      # ln g and ln h are linear in t between knots

    def __init__(self, net: Any, class_labels: Optional[torch.Tensor], batch: int,
                 device: torch.device | str = 'cpu') -> None:
        rows, basis_id = net.rows_for(class_labels, batch)
        device = torch.device(device)
        super().__init__(net.subspace, basis_id.to(device), batch, _net_shape(net), float(net.sigma_min),
                         float(net.sigma_max), device)
        sg, sh = net.schedule_g, net.schedule_h
        with torch.no_grad():
            self.lg = sg.log_knots().detach().to(device=device, dtype=torch.float64)
            self.lh = sh.log_knots().detach().to(device=device, dtype=torch.float64)
        self.tau = sg.tau.to(device=device, dtype=torch.float64)
        self.rows = rows.to(device)

    def _rows(self, v: torch.Tensor) -> torch.Tensor:
        return self.rows.reshape(-1, *([1] * (v.ndim - 1))).expand_as(v)

    def split(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.levels(sigma)
        _, a, b = sched.split_at_levels(self.lg, self.lh, self.tau, s, self._rows(s))
        return a, b

    def time(self, sigma: Any) -> torch.Tensor:
        s = self.levels(sigma)
        lf = sched.geometric_mean_log_knots(self.lg, self.lh)
        return sched.inverse_log_knots(lf, self.tau, s.square(), self._rows(s))

    def split_at_time(self, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.levels(t)
        rows = self._rows(t)
        g = sched.evaluate_log_knots(self.lg, self.tau, t, rows)[0]
        h = sched.evaluate_log_knots(self.lh, self.tau, t, rows)[0]
        return g.sqrt(), h.sqrt()

    def sigma_at_time(self, t: Any) -> torch.Tensor:
        a, b = self.split_at_time(t)
        return (a * b).sqrt()

    def kinks(self, sigma_lo: float, sigma_hi: float) -> list[float]:
        lf = sched.geometric_mean_log_knots(self.lg, self.lh)[torch.unique(self.rows)]
        knots = torch.unique((lf / 2).exp().flatten()).tolist()
        return [k for k in knots if sigma_lo < k < sigma_hi]

    def log_slopes(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """kappa_a = (d ln g/dt) / (d ln F/dt) at t = F^{-1}(sigma^2): piecewise constant between knots."""
        t = self.time(sigma)
        rows = self._rows(t)
        g, g_dot = sched.evaluate_log_knots(self.lg, self.tau, t, rows)
        h, h_dot = sched.evaluate_log_knots(self.lh, self.tau, t, rows)
        rg, rh = g_dot / g, h_dot / h
        mean = (rg + rh) / 2
        return rg / mean, rh / mean


def noise_path(net: Any, class_labels: Optional[torch.Tensor], like: torch.Tensor) -> NoisePath:
    """The path of ``net`` for the batch ``like`` [B, C, H, W] (its size, shape and device): the network's own
    ``noise_path(class_labels, batch, device)`` if it has one, a SchedulePath for networks with learned schedules,
    else the SigmaPath of an EDM network."""
    batch, device = like.shape[0], like.device
    if hasattr(net, 'noise_path'):
        return net.noise_path(class_labels, batch, device)
    if getattr(net, 'schedule_g', None) is not None and hasattr(net, 'rows_for') and hasattr(net, 'subspace'):
        return SchedulePath(net, class_labels, batch, device)
    return SigmaPath(net, batch, device, shape=tuple(like.shape[1:]))


# ----------------------------------------------------------------------------------------------------------------------
# The network on its path.


class PathDenoiser:
    """D(x; a, b) of a network on its path, in float64, counting network evaluations (``calls``).

    SigmaPath: EDM's call net(x, sigma, y) with sigma = b (= a). Otherwise the anisotropic call
    net(x, None, y, g=a^2, h=b^2, basis_id=...) and, for ``flow``, the network's own flow head."""

    def __init__(self, net: Any, path: NoisePath, class_labels: Optional[torch.Tensor] = None,
                 on_call: Optional[Callable[[], None]] = None) -> None:
        self.net, self.path, self.class_labels = net, path, class_labels
        self.isotropic = isinstance(path, SigmaPath)
        self.calls = 0

    def __call__(self, x: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        """The denoised estimate D (float64)."""
        self.calls += 1
        if self.isotropic:
            return self.net(x, b, self.class_labels).to(torch.float64)
        a, b = self.path.levels(a), self.path.levels(b)
        return self.net(x, None, self.class_labels, g=a.square(), h=b.square(),
                        basis_id=self.path.basis_id).to(torch.float64)

    def flow(self, x: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        """f = M^-1/2 (D - x) (method.md §1), float64."""
        if self.isotropic:
            return (self(x, a, b) - x) / self.path.levels(b).reshape(-1, *([1] * (x.ndim - 1)))
        self.calls += 1
        a, b = self.path.levels(a), self.path.levels(b)
        return self.net.flow(x, a.square(), b.square(), self.class_labels,
                             basis_id=self.path.basis_id).to(torch.float64)

    def denoised_from_flow(self, x: torch.Tensor, f: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        """D = x + M^1/2 f."""
        return x + self.path.apply(f, a, b)


__all__ = ['GRID_KINDS', 'Grid', 'NoisePath', 'SigmaPath', 'SchedulePath', 'noise_path', 'PathDenoiser',
           'edm_sigma_grid']
