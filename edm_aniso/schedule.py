"""Monotone log-knot noise schedules (method.md §2).

A schedule maps time t in [0, T] to a variance g(t). Its logarithm is piecewise linear between K equally spaced
knots tau_i = i*T/(K-1); the knot values are built from unconstrained parameters u so that the endpoints are exactly
g(0) = g0 and g(T) = T and the values strictly increase. Banks hold one row of u per class (or group) and are
evaluated per sample with one batched gather. The geometric mean F = sqrt(g h) of two schedules is again a
schedule of the same kind (log-knots averaged), and its inverse is analytic.
"""

from __future__ import annotations

import math

import torch

from torch_utils import persistence

G0 = 1e-9          # g(0) = h(0): variance at t = 0 (method.md §1)
T_MAX = 6400.0     # g(T) = h(T) = T = sigma_max**2 (method.md §1)
DELTA_FLOOR = 1e-8  # added to softplus(u) so every segment rises (method.md §2)

# ----------------------------------------------------------------------------------------------------------------------
# Grids and helpers.


def karras_sigmas(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """EDM's rho-grid, descending: sigma_i = (smax^(1/rho) + i/(num-1) (smin^(1/rho) - smax^(1/rho)))^rho (§6 step 1),
    computed in float64 on `device` (None: CPU) and then cast to `dtype`."""
    if num < 2:
        raise ValueError(f'karras_sigmas needs num >= 2, got {num}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'karras_sigmas needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
    frac = torch.arange(num, dtype=torch.float64, device=device) / (num - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + frac * (lo - hi)) ** rho).to(dtype)


def softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """Stable inverse of softplus for y > 0: x = y + log(1 - exp(-y)) = y + log(-expm1(-y))."""
    if not bool(torch.all(y > 0)):
        raise ValueError('softplus_inverse is defined only for positive values')
    return y + torch.log(-torch.expm1(-y))


def geometric_mean_log_knots(lg: torch.Tensor, lh: torch.Tensor) -> torch.Tensor:
    """Log-knots of F = sqrt(g h) (method.md §2): the mean of the two log-knot tensors."""
    return (lg + lh) / 2


def _knot_index(tau: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index i of the segment [tau_{i-1}, tau_i] that holds t; a knot belongs to its left segment, t = 0 to the first."""
    idx = torch.searchsorted(tau, t.contiguous(), right=False)
    return idx.clamp(1, tau.shape[0] - 1)


def _prepare(log_knots: torch.Tensor, tau: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None):
    """Common checks; returns (log_knots, tau, x, rows) broadcast to one shape and one floating dtype."""
    if log_knots.ndim != 2 or tau.ndim != 1 or log_knots.shape[1] != tau.shape[0] or tau.shape[0] < 2:
        raise ValueError(f'expected log_knots [R, K] and tau [K] with K >= 2, got {tuple(log_knots.shape)} and '
                         f'{tuple(tau.shape)}')
    x = torch.as_tensor(x, device=log_knots.device)
    if rows is None:
        if log_knots.shape[0] != 1:
            raise ValueError('a class bank needs per-sample rows')
        rows = torch.zeros(x.shape, dtype=torch.long, device=log_knots.device)
    rows = torch.as_tensor(rows, device=log_knots.device)
    if rows.dtype != torch.long:
        raise ValueError(f'rows must be a long tensor, got {rows.dtype}')
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= log_knots.shape[0]):
        raise ValueError(f'schedule rows must be in [0, {log_knots.shape[0]}), got {int(rows.min())}..'
                         f'{int(rows.max())}')
    dtype = torch.promote_types(log_knots.dtype, x.dtype if x.is_floating_point() else log_knots.dtype)
    x, rows = torch.broadcast_tensors(x.to(dtype), rows)
    return log_knots.to(dtype), tau.to(dtype), x, rows


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and inversion, shared by g, h and F.


def evaluate_log_knots(log_knots: torch.Tensor, tau: torch.Tensor, t: torch.Tensor,
                       rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Value v(t) and derivative dv/dt of a log-linear knot schedule per sample (method.md §2).

    log_knots [R, K] (ln of the knot values of each row), tau [K] knot times, t and rows broadcastable (rows long,
    row of each sample; None allowed for R = 1). t is clamped to [tau_0, tau_{K-1}]. Inside segment i,
    ln v = (1 - s) l_{i-1} + s l_i with s = (t - tau_{i-1}) / (tau_i - tau_{i-1}) and dv/dt = v (l_i - l_{i-1}) /
    (tau_i - tau_{i-1}). Differentiable with respect to log_knots (and t).
    """
    log_knots, tau, t, rows = _prepare(log_knots, tau, t, rows)
    t = torch.minimum(torch.maximum(t, tau[0]), tau[-1])
    hi = _knot_index(tau, t)
    lo = hi - 1
    t_lo, t_hi = tau[lo], tau[hi]
    l_lo, l_hi = log_knots[rows, lo], log_knots[rows, hi]
    width = t_hi - t_lo
    s = (t - t_lo) / width
    v = torch.exp((1 - s) * l_lo + s * l_hi)
    return v, v * (l_hi - l_lo) / width


def inverse_log_knots(log_knots: torch.Tensor, tau: torch.Tensor, v: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """Analytic inverse t = v^{-1}(value) of a log-knot schedule per sample (method.md §2, F^{-1}).

    The value is clamped to the row's range [v(tau_0), v(tau_{K-1})] (= [g0, T]); the segment is located on the
    log-knots and the linear piece in ln v is inverted.
    """
    log_knots, tau, v, rows = _prepare(log_knots, tau, v, rows)
    knots = log_knots[rows]                                   # [..., K]: each sample's own row
    ell = torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))
    ell = torch.minimum(torch.maximum(ell, knots[..., 0]), knots[..., -1])
    hi = torch.searchsorted(knots.contiguous(), ell.unsqueeze(-1).contiguous()).squeeze(-1)
    hi = hi.clamp(1, tau.shape[0] - 1)
    lo = hi - 1
    l_lo = knots.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    l_hi = knots.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    s = ((ell - l_lo) / (l_hi - l_lo)).clamp(0, 1)
    t_lo, t_hi = tau[lo], tau[hi]
    return t_lo + s * (t_hi - t_lo)


def split_at_levels(lg: torch.Tensor, lh: torch.Tensor, tau: torch.Tensor, sigma: torch.Tensor,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, a, b) at effective levels sigma: t = F^{-1}(sigma^2) with F = sqrt(g h), a = sqrt(g(t)), b = sqrt(h(t))
    (method.md §6 step 2), elementwise; sigma and rows broadcastable, lg/lh [R, K] log-knots of g and h.

    Since a b = F(t) = sigma^2 exactly, the schedules only choose the split a/b at each level. Differentiable in the
    log-knots. This is the one implementation behind AnisoPrecond.levels, the noise paths and the exact oracles."""
    t = inverse_log_knots(geometric_mean_log_knots(lg, lh), tau, torch.as_tensor(sigma).square(), rows)
    a = evaluate_log_knots(lg, tau, t, rows)[0].sqrt()
    b = evaluate_log_knots(lh, tau, t, rows)[0].sqrt()
    return t, a, b


def inverse_log_knots_bisection(log_knots: torch.Tensor, tau: torch.Tensor, v: torch.Tensor,
                                rows: torch.Tensor | None = None, iters: int = 80) -> torch.Tensor:
    """Inverse by bisection on t (the reference's method); a fallback and cross-check for inverse_log_knots."""
    log_knots, tau, v, rows = _prepare(log_knots, tau, v, rows)
    with torch.no_grad():
        target = torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))
        lo = torch.full_like(v, float(tau[0]))
        hi = torch.full_like(v, float(tau[-1]))
        for _ in range(iters):
            mid = (lo + hi) / 2
            val, _ = evaluate_log_knots(log_knots, tau, mid, rows)
            below = torch.log(val) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------------------------------
# Learned schedule module.


def karras_log_knots(num_knots: int = 32, T: float = T_MAX, g0: float = G0,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Log-knots of the Karras init (method.md §2): squares of the num_knots-level rho = 7 grid (0.002, sqrt(T))
    in ascending order, the first replaced by g0 and the last set to T. Returns [K]."""
    sig = karras_sigmas(num_knots, sigma_min=0.002, sigma_max=math.sqrt(T), dtype=torch.float64).flip(0)
    ell = 2 * torch.log(sig)
    ell[0], ell[-1] = math.log(g0), math.log(T)
    if not bool(torch.all(ell[1:] > ell[:-1])):
        raise ValueError(f'Karras init needs g0 below the second knot value {sig[1].item() ** 2:g}, got {g0:g}')
    return ell.to(dtype)


def karras_init_u(num_knots: int = 32, T: float = T_MAX, g0: float = G0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Parameters u [K-1] reproducing the Karras knots: u_i = softplus^{-1}(l_{i+1} - l_i - 1e-8) (method.md §2;
    the 1e-8 floor is taken out so that the knots come back exactly)."""
    ell = karras_log_knots(num_knots, T, g0, torch.float64)
    return softplus_inverse(ell.diff() - DELTA_FLOOR).to(dtype)


@persistence.persistent_class
class KnotSchedule(torch.nn.Module):
    """Monotone log-knot schedule g(t) (method.md §2), one row of parameters per class/group in a bank.

    u [R, K-1]: delta_i = softplus(u_i) + 1e-8; l_0 = ln g0, l_i = l_0 + (ln T - ln g0) sum_{j<i} delta_j / sum_j
    delta_j, l_{K-1} = ln T exactly. forward(t, rows) -> (g, g_dot) per sample.
    """

    def __init__(self,
        num_rows:   int         = 1,                # Rows of the bank (1 = one global schedule).
        num_knots:  int         = 32,               # K knots at tau_i = i T / (K - 1).
        T:          float       = T_MAX,            # End time; g(T) = T.
        g0:         float       = G0,               # g(0) = g0.
        dtype:      torch.dtype = torch.float32,    # Parameter dtype (float64 for tests).
    ) -> None:
        super().__init__()
        if num_rows < 1 or num_knots < 2:
            raise ValueError(f'KnotSchedule needs num_rows >= 1 and num_knots >= 2, got {num_rows}, {num_knots}')
        if not 0 < g0 < T:
            raise ValueError(f'KnotSchedule needs 0 < g0 < T, got g0={g0}, T={T}')
        self.num_rows, self.num_knots, self.T, self.g0 = int(num_rows), int(num_knots), float(T), float(g0)
        u = karras_init_u(num_knots, T, g0, torch.float64).to(dtype)
        self.u = torch.nn.Parameter(u.unsqueeze(0).repeat(num_rows, 1))
        self.register_buffer('tau', torch.arange(num_knots, dtype=torch.float64).mul(T / (num_knots - 1)).to(dtype))

    def log_knots(self) -> torch.Tensor:
        """ln of the knot values [R, K], differentiable in u."""
        delta = torch.nn.functional.softplus(self.u) + DELTA_FLOOR
        cum = delta.cumsum(dim=1)
        frac = cum[:, :-1] / cum[:, -1:]
        l0, l1 = math.log(self.g0), math.log(self.T)
        inner = l0 + (l1 - l0) * frac
        first = torch.full_like(inner[:, :1], l0)
        last = torch.full_like(inner[:, :1], l1)
        return torch.cat([first, inner, last], dim=1)

    def forward(self, t: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(t), g_dot(t)) per sample; rows [B] long picks each sample's bank row (None only for one row)."""
        if rows is None and self.num_rows != 1:
            raise ValueError('a class bank needs per-sample rows')
        return evaluate_log_knots(self.log_knots(), self.tau, t, rows)

    def inverse(self, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """g^{-1}(v) per sample (analytic, v clamped to [g0, T])."""
        if rows is None and self.num_rows != 1:
            raise ValueError('a class bank needs per-sample rows')
        return inverse_log_knots(self.log_knots(), self.tau, v, rows)

    @torch.no_grad()
    def load_rows_from(self, other: 'KnotSchedule') -> None:
        """Copy u from another schedule with the same knots (same row count, or one row broadcast to all rows)."""
        if (other.num_knots, other.T, other.g0) != (self.num_knots, self.T, self.g0):
            raise ValueError(f'schedule mismatch: knots/T/g0 {(other.num_knots, other.T, other.g0)} vs '
                             f'{(self.num_knots, self.T, self.g0)}')
        if other.num_rows not in (1, self.num_rows):
            raise ValueError(f'cannot load {other.num_rows} schedule rows into {self.num_rows}')
        self.u.copy_(other.u.detach().to(self.u.dtype).expand_as(self.u))

    def extra_repr(self) -> str:
        return f'num_rows={self.num_rows}, num_knots={self.num_knots}, T={self.T:g}, g0={self.g0:g}'
