"""Multistep samplers on the noise path: ``dpmpp_2m``, ``dpmpp_3m`` (data prediction, DPM-Solver++) and ``ipndm``
(Adams-Bashforth with a lower-order warm start), for EDM networks and for learned anisotropic paths (method.md §1, §6).

Each network evaluation is reused by the following steps, so **NFE = N**, the number of levels of the grid, for every
N >= 1 (one evaluation at each level sigma_0 > ... > sigma_{N-1}; the step to the final 0 costs nothing more). The
levels are ``NoisePath.grid`` (``--grid=karras|schedule``), per sample: a_i on P, b_i on P_perp, a_N = b_N = 0.

**Why the solvers generalise per block.** M = a^2 P + b^2 P_perp is diagonal in the subspace basis, and on each block
the probability-flow ODE is EDM's isotropic VE ODE in that block's own clock (method.md §1):

    d(P x)/da = (P x - P D)/a,     d(P_perp x)/db = (P_perp x - P_perp D)/b,     D = D(x; a, b) shared.

Along the sampler's trajectory both clocks fall strictly with the step index, so each block's part of D is a smooth
function of its own clock, and a solver derived for one scalar sigma applies to each block with that block's sigma
sequence: **lambda = -ln a on P and lambda = -ln b on P_perp** play the role of DPM-Solver++'s lambda = -ln sigma
(for VE, alpha = 1). Every update is thus a combination sum_k (alpha_k P v_k + beta_k P_perp v_k) of the current x and
past network outputs, alpha_k from the a-sequence and beta_k from the b-sequence (per sample, [B]); ``_combine``
evaluates it with one projection. With g = h (a = b = sigma: EDM networks, stage-1 schedules) alpha_k = beta_k and
each sampler is exactly its isotropic form.

**Data-prediction steps (dpmpp_2m, dpmpp_3m).** On one block with clock s (a or b) and lambda = -ln s, the ODE reads
dx/dlambda = D - x, so by variation of constants, with h_i = lambda_{i+1} - lambda_i = ln(s_i / s_{i+1}) > 0:

    x_{i+1} = e^{-h_i} x_i + int_0^{h_i} e^{-(h_i - u)} D(lambda_i + u) du.                                    (1)

Expanding D(lambda_i + u) = sum_n u^n D^(n)_i / n! turns (1) into x_{i+1} = e^{-h} x_i + sum_n (I_n(h)/n!) D^(n)_i
with I_n(h) = int_0^h e^{-w} (h - w)^n dw, i.e. I_0 = 1 - e^{-h} and I_n = h^n - n I_{n-1} (parts):
I_1 = h - I_0 ~ h^2/2, I_2 = h^2 - 2 I_1 ~ h^3/3. The derivatives come from the past evaluations D_{i-1}, D_{i-2}
at lambda_{i-1} = lambda_i - h_{i-1}, lambda_{i-2} = lambda_{i-1} - h_{i-2} (each block its own h's):

- first order (the first step; DDIM): x_{i+1} = e^{-h} x_i + I_0 D_i.
- ``dpmpp_2m`` (DPM-Solver++(2M), Lu et al. 2022, Algorithm 2): D' ~ (D_i - D_{i-1})/h_{i-1} with the coefficient
  I_0 h/2 in place of I_1 (equal to O(h^3)): x_{i+1} = e^{-h} x_i + I_0 ((1 + 1/(2r)) D_i - D_{i-1}/(2r)),
  r = h_{i-1}/h_i. Local error O(h^3), order 2.
- ``dpmpp_3m``: the quadratic through (lambda_{i-2..i}, D_{i-2..i}) in Newton form,
  p = D_i + D[i, i-1] (lambda - lambda_i) + D[i, i-1, i-2] (lambda - lambda_i)(lambda - lambda_{i-1}), has
  p'(lambda_i) = D[i, i-1] + h_{i-1} D[i, i-1, i-2] and p''/2 = D[i, i-1, i-2] (divided differences), so

      x_{i+1} = e^{-h} x_i + I_0 D_i + I_1 (D[i, i-1] + h_{i-1} D[i, i-1, i-2]) + I_2 D[i, i-1, i-2].

  Local error O(h^4), order 3. The form in DPM-Solver's and k-diffusion's code (``sample_dpmpp_3m_sde`` at eta = 0)
  has the same I_0 and I_1 terms but I_2/2 in place of I_2 on the second difference, which leaves an O(h^3) local
  error: its measured order is 2 (bench/RESULTS.md; the issue's prototype found the same). Step 0 is first order,
  step 1 the linear interpolant, I_0 D_i + I_1 D[i, i-1].
- The step to s_N = 0 has h = infinity: x_N = D_{N-1} (e^{-h} = 0, I_0 = 1), as in DPM-Solver++ and k-diffusion.

**Adams-Bashforth steps (ipndm).** On one block dx/ds = -f with f = M^{-1/2}(D - x) = (D - x)/s there (method.md
§1, the flow head), so x_{i+1} = x_i - int_{s_i}^{s_{i+1}} f ds. iPNDM (Zhang & Chen 2023) replaces f by the
polynomial through its last k values (k = min(i + 1, max_order): Euler, AB2, AB3, then AB4; the lower orders are
the warm start and cost no extra evaluations) and integrates it. The original applies the classical weights
(3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24) to the sigma steps. They are exact only for equal
steps: on the rho-spaced steps of a Karras grid they are off by O(h) relative, on differences of f that are O(h)
themselves, a local error O(h^3), so the method is of order 2 there (the issue's prototype; ``fixed_weights=True``
keeps it for comparison). Here the weights are
those of the variable-step method: with tau a smooth function of s,

    x_{i+1} = x_i - sum_{j<k} w_j f_{i-j},   w_j = int_{s_i}^{s_{i+1}} l_j(tau(s)) ds = int l_j(tau) (ds/dtau) dtau,

l_j the Lagrange basis polynomials on the nodes tau(s_i), ..., tau(s_{i-k+1}) (each block its own nodes): f is
interpolated in tau and integrated exactly in s (Gauss-Legendre in tau, ``ab_weights``). The local error is
O(h^{k+1}) on any smooth grid, so the order is k. The interpolation variable is tau = s^(1/rho) with the grid's rho
(``variable='rho'``, the default): the Karras grid is uniform in it, and f, a sigmoid of ln s per coefficient, is far
better resolved there at few steps than in s itself (``variable='sigma'``, tau = s; bench/RESULTS.md). Integrating
F = f ds/dtau in tau instead (classical AB in tau) would be exact on the Karras grid too, but ds/dtau = rho
tau^(rho - 1) makes F stiff in tau and that method unstable at few steps. The step to s = 0 is Euler, x_N = D_{N-1},
as in EDM's Heun: an Adams step there would extrapolate f over [0, s_{N-1}], a span that does not shrink as N grows,
so the sampler would converge only at first order (to a limit other than D(x(s_min))).

**Warm starts.** The first steps run at lower order (first order at step 0), whose local error O(h^2) is, strictly,
not small enough for order above 2. Its constant is tiny, though: at sigma_max the trajectory is almost pure noise and
D, f vary slowly (f' ~ lambda/sigma_max^3 per coefficient). On the 8x8 exact Gaussian the observed order of ipndm is 4
until the relative error reaches about 1e-8 (N ~ 512) and only then falls to 2; dpmpp_3m stays at 3 down to 1e-8
(N = 4096). The orders stated above hold over the range anyone samples in.

Zero steps (consecutive equal levels in every block and sample, which only a network's round_sigma can produce) are
skipped without a network evaluation; NFE is then the number of distinct levels.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from edm_aniso.path import NoisePath
from edm_aniso.sampler import GRID_OPTION, TRAJECTORY_OPTION, check_options, start_on_grid

try:
    from training.registry import SamplerEntry
except ImportError:      # inside upstream NVlabs/edm (patches/), whose training package has no registry
    SamplerEntry = None

IPNDM_VARIABLES = ('rho', 'sigma')

# ----------------------------------------------------------------------------------------------------------------------
# Per-block combinations.


def _combine(path: NoisePath, terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_k (alpha_k P v_k + beta_k P_perp v_k) for terms (v_k, alpha_k [B], beta_k [B]) with a single projection:
    sum_k beta_k v_k + P sum_k (alpha_k - beta_k) v_k (no projection when alpha_k = beta_k for all k)."""
    shape = (-1,) + (1,) * (terms[0][0].ndim - 1)
    out = sum(beta.reshape(shape) * v for v, _, beta in terms)
    if all(torch.equal(alpha, beta) for _, alpha, beta in terms):
        return out
    return out + path.project(sum((alpha - beta).reshape(shape) * v for v, alpha, beta in terms))


def _expm1_neg(h: torch.Tensor) -> torch.Tensor:
    """I_0(h) = 1 - e^{-h} (1 at h = inf)."""
    return -torch.expm1(-h)


# ----------------------------------------------------------------------------------------------------------------------
# The shared driver.


def _run(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor], randn_like: Callable,
         num_steps: int, sigma_min: Optional[float], sigma_max: Optional[float], rho: float, grid: str,
         trajectory: Optional[str], seeds: Optional[list[int]], callback: Optional[Callable[[dict], None]],
         step: Callable) -> torch.Tensor:
    """Levels, prior sample x_0 = M_0^{1/2} z, one network evaluation per level, ``step`` for each update.

    ``step(path, x, D, hist, a, b, i)`` returns (x_{i+1}, v_i), v_i what later steps need of level i (D_i, or
    D_i - x_i); ``hist`` lists the (v_j, a_j, b_j) of the earlier levels, newest first (at most three)."""
    path, den, a, b, x, record, _ = start_on_grid(net, latents, class_labels, randn_like, num_steps, grid, sigma_min,
                                               sigma_max, rho, trajectory, seeds)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(num_steps):
        if torch.equal(a[:, i], a[:, i + 1]) and torch.equal(b[:, i], b[:, i + 1]):
            continue                                        # a zero step (merged levels): x stays, no evaluation
        D = den(x, a[:, i], b[:, i])
        if record is not None:
            record(D)
        if callback is not None:
            callback(dict(i=i, x=x, denoised=D, a=a[:, i], b=b[:, i]))
        x_next, keep = step(path, x, D, hist, a, b, i)
        hist.insert(0, (keep, a[:, i], b[:, i]))
        del hist[3:]
        x = x_next
    if record is not None:
        record.save(x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction).


def _dpm_coefficients(h: torch.Tensor, h1: Optional[torch.Tensor], h2: Optional[torch.Tensor], order: int,
                      paper_2m: bool, second_difference: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One block's (e^{-h}, [c_0, c_1, c_2]): x_{i+1} = e^{-h} x_i + sum_j c_j D_{i-j} (module docstring).

    order 1: c_0 = I_0. order 2 with ``paper_2m`` (DPM-Solver++(2M)): c_0 = I_0 (1 + h/(2 h1)), c_1 = -I_0 h/(2 h1);
    without it, the linear interpolant I_0 D_i + I_1 D[i, i-1]: c_0 = I_0 + I_1/h1, c_1 = -I_1/h1. order 3 (the
    quadratic, in divided differences): I_0 D_i + A D[i, i-1] + (A h1 + C) D[i, i-1, i-2] with A = I_1 and
    C = second_difference * I_2; writing E = (A h1 + C)/(h1 + h2): c_0 = I_0 + (A + E)/h1,
    c_1 = -(A + E)/h1 - E/h2, c_2 = E/h2."""
    i0 = _expm1_neg(h)
    decay = torch.exp(-h)
    if order == 1:
        return decay, [i0]
    if order == 2 and paper_2m:
        k = i0 * h / (2 * h1)
        return decay, [i0 + k, -k]
    i1 = h - i0
    if order == 2:
        return decay, [i0 + i1 / h1, -i1 / h1]
    i2 = second_difference * (h * h - 2 * i1)
    e = (i1 * h1 + i2) / (h1 + h2)
    return decay, [i0 + (i1 + e) / h1, -(i1 + e) / h1 - e / h2, e / h2]


def _dpm_step(max_order: int, second_difference: float = 1.0) -> Callable:
    """The data-prediction step of order min(max_order, levels so far): 2M's update for max_order 2, the linear
    interpolant as the second step of max_order 3 (so that 3M is one derivation throughout)."""
    def step(path: NoisePath, x: torch.Tensor, D: torch.Tensor, hist: list, a: torch.Tensor, b: torch.Tensor,
             i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool((a[:, i + 1] > 0).any() or (b[:, i + 1] > 0).any()):
            return D, D                                       # the step to 0: h = inf, x_N = D_{N-1}
        order = min(max_order, len(hist) + 1)
        coef = []
        for s in (a, b):                                      # a on P, b on P_perp
            lam = [-s[:, i].log()] + [-(lv[1] if s is a else lv[2]).log() for lv in hist[:order - 1]]
            h = -s[:, i + 1].log() - lam[0]
            h1 = lam[0] - lam[1] if order >= 2 else None
            h2 = lam[1] - lam[2] if order >= 3 else None
            coef.append(_dpm_coefficients(h, h1, h2, order, max_order == 2, second_difference))
        (da, ca), (db, cb) = coef
        terms = [(x, da, db)] + list(zip([D] + [v for v, _, _ in hist], ca, cb))
        return _combine(path, terms), D
    return step


@torch.no_grad()
def dpmpp_2m(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
             randn_like: Callable = torch.randn_like,
             num_steps: int = 18,                 # N: levels, NFE = N
             sigma_min: Optional[float] = 0.002,  # lowest level (None: 0.002), clamped to net.sigma_min
             sigma_max: Optional[float] = 80.0,   # highest level (None: 80), clamped to net.sigma_max
             rho: float = 7.0,                    # rho of the Karras grid
             grid: str = 'karras',                # 'karras' | 'schedule' (edm_aniso.path.NoisePath.grid)
             trajectory: Optional[str] = None,    # directory for per-sample strips of denoised images (None: off)
             seeds: Optional[list[int]] = None,   # strip names (None: seeds of generate.py's generators)
             callback: Optional[Callable[[dict], None]] = None,  # called with {'i', 'x', 'denoised', 'a', 'b'}
             **unused) -> torch.Tensor:
    """DPM-Solver++(2M) per block on the network's noise path, NFE = N, float64 output (module docstring).

    Step i per block (clock s = a on P, b on P_perp; h = ln(s_i/s_{i+1}), r = h_{i-1}/h):
    x_{i+1} = (s_{i+1}/s_i) x_i + (1 - e^{-h}) ((1 + 1/(2r)) D_i - D_{i-1}/(2r)); first step without D_{i-1}, last
    step x_N = D_{N-1}. With g = h it is k-diffusion's ``sample_dpmpp_2m`` on the same sigmas."""
    return _run(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max, rho, grid, trajectory,
                seeds, callback, _dpm_step(2))


@torch.no_grad()
def dpmpp_3m(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
             randn_like: Callable = torch.randn_like,
             num_steps: int = 18,                 # N: levels, NFE = N
             sigma_min: Optional[float] = 0.002,  # as in dpmpp_2m
             sigma_max: Optional[float] = 80.0,
             rho: float = 7.0,
             grid: str = 'karras',
             trajectory: Optional[str] = None,
             seeds: Optional[list[int]] = None,
             callback: Optional[Callable[[dict], None]] = None,
             second_difference: float = 1.0,      # weight of the I_2 term; 0.5: the common form (order 2)
             **unused) -> torch.Tensor:
    """Third-order data-prediction multistep per block, NFE = N, float64 output (module docstring, equation (1)).

    Step i >= 2 per block: x_{i+1} = e^{-h} x_i + I_0 D_i + I_1 (D[i, i-1] + h_{i-1} D[i, i-1, i-2])
    + I_2 D[i, i-1, i-2]; step 0 is first order, step 1 the linear interpolant I_0 D_i + I_1 D[i, i-1], the last
    x_N = D_{N-1}. ``second_difference=0.5`` gives the form of DPM-Solver's and k-diffusion's code (kept to compare
    against: with g = h it is k-diffusion's ``sample_dpmpp_3m_sde`` at eta = 0)."""
    return _run(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max, rho, grid, trajectory,
                seeds, callback, _dpm_step(3, float(second_difference)))


# ----------------------------------------------------------------------------------------------------------------------
# iPNDM (variable-step Adams-Bashforth).

_GAUSS_POINTS = 8      # Gauss-Legendre points of the weight integrals: exact up to degree 15


_GAUSS_CACHE: dict = {}


def _gauss(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64), built once per device."""
    if str(device) not in _GAUSS_CACHE:
        nodes, weights = np.polynomial.legendre.leggauss(_GAUSS_POINTS)
        _GAUSS_CACHE[str(device)] = (torch.as_tensor((nodes + 1) / 2, dtype=torch.float64, device=device),
                                     torch.as_tensor(weights / 2, dtype=torch.float64, device=device))
    return _GAUSS_CACHE[str(device)]


def ab_weights(nodes: list[torch.Tensor], target: torch.Tensor, rho: Optional[float] = None) -> list[torch.Tensor]:
    """Variable-step Adams-Bashforth weights w_j = int_{s_i}^{s_target} l_j(tau(s)) ds for the nodes s_i, s_{i-1}, ...
    (``nodes``, newest first, each [B]; ``target`` [B]), l_j the Lagrange basis on tau(nodes): tau = s^(1/rho), or
    tau = s when rho is None. Computed as int l_j(tau) (ds/dtau) dtau by 8-point Gauss-Legendre quadrature: exact
    for up to 4 nodes when rho is None or an integer <= 13 (the integrand is then a polynomial of degree <= 15).
    Equal steps with rho None give the classical weights times the step."""
    if rho is None:
        taus, end = nodes, target
    else:
        taus, end = [n ** (1 / rho) for n in nodes], target ** (1 / rho)
    q, qw = _gauss(target.device)
    span = (end - taus[0])[:, None]                                    # [B, 1]
    tau = taus[0][:, None] + q[None] * span                            # [B, Q]
    measure = qw[None] * span * (1.0 if rho is None else rho * tau ** (rho - 1))
    weights = []
    for j, tj in enumerate(taus):
        basis = torch.ones_like(tau)
        for m, tm in enumerate(taus):
            if m != j:
                basis = basis * (tau - tm[:, None]) / (tj - tm)[:, None]
        weights.append((basis * measure).sum(1))
    return weights


CLASSICAL_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _ipndm_step(max_order: int, rho: Optional[float], fixed_weights: bool) -> Callable:
    def weights(nodes: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        if fixed_weights:                                # the original iPNDM: classical weights times the step
            return [c * (target - nodes[0]) for c in CLASSICAL_AB[len(nodes) - 1]]
        return ab_weights(nodes, target, rho)

    def step(path: NoisePath, x: torch.Tensor, D: torch.Tensor, hist: list, a: torch.Tensor, b: torch.Tensor,
             i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool((a[:, i + 1] > 0).any() or (b[:, i + 1] > 0).any()):
            return D, D - x                                   # the step to 0: Euler, x_N = D_{N-1}
        k = min(max_order, len(hist) + 1)
        past = [(D - x, a[:, i], b[:, i])] + hist[:k - 1]   # (D_j - x_j, a_j, b_j), newest first
        w_a = weights([sa for _, sa, _ in past], a[:, i + 1])
        w_b = weights([sb for _, _, sb in past], b[:, i + 1])
        terms = [(x, torch.ones_like(a[:, i]), torch.ones_like(b[:, i]))]
        for (dj, aj, bj), wa, wb in zip(past, w_a, w_b):
            # -w_j f_j per block, f_j = M_j^{-1/2} (D_j - x_j) = (D_j - x_j)/s_j.
            terms.append((dj, -wa / aj, -wb / bj))
        return _combine(path, terms), past[0][0]
    return step


@torch.no_grad()
def ipndm(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
          randn_like: Callable = torch.randn_like,
          num_steps: int = 18,                 # N: levels, NFE = N
          sigma_min: Optional[float] = 0.002,  # as in dpmpp_2m
          sigma_max: Optional[float] = 80.0,
          rho: float = 7.0,                    # rho of the Karras grid and of the integration variable s^(1/rho)
          grid: str = 'karras',
          trajectory: Optional[str] = None,
          seeds: Optional[list[int]] = None,
          callback: Optional[Callable[[dict], None]] = None,
          max_order: int = 4,                  # highest Adams-Bashforth order (1..4); lower orders warm up
          variable: str = 'rho',               # interpolation variable: 'rho' (tau = s^(1/rho)) or 'sigma' (tau = s)
          fixed_weights: bool = False,         # True: the original iPNDM's classical weights (order 2 on Karras)
          **unused) -> torch.Tensor:
    """iPNDM per block with step-size-aware Adams-Bashforth weights, NFE = N, float64 output (module docstring).

    Step i per block (clock s = a on P, b on P_perp): x_{i+1} = x_i - sum_{j<k} w_j f_{i-j}, f = (D - x)/s,
    k = min(i + 1, max_order), w_j = int_{s_i}^{s_{i+1}} l_j(tau(s)) ds with l_j the Lagrange basis on
    tau(s_i), ..., tau(s_{i-k+1}), tau = s^(1/rho); the last step is Euler to 0, x_N = D_{N-1}."""
    if not 1 <= int(max_order) <= 4:
        raise ValueError(f'max_order must be in 1..4, got {max_order}')
    if variable not in IPNDM_VARIABLES:
        raise ValueError(f'unknown variable {variable!r}; choose one of {", ".join(IPNDM_VARIABLES)}')
    return _run(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max, rho, grid, trajectory,
                seeds, callback, _ipndm_step(int(max_order), float(rho) if variable == 'rho' else None,
                                                       bool(fixed_weights)))


# ----------------------------------------------------------------------------------------------------------------------
# Registry entries (registered by edm_aniso.plugin).


def _checker(name: str):
    def check(net: Any, opts: Any) -> None:
        check_options(net, opts, needs_aniso=False, sampler=name, min_steps=1)
    return check


SAMPLER_ENTRIES: list = [] if SamplerEntry is None else [
    SamplerEntry(name='dpmpp_2m', sample=dpmpp_2m, options=[GRID_OPTION, TRAJECTORY_OPTION], check=_checker('dpmpp_2m'),
                 help='DPM-Solver++(2M) per subspace on the network\'s noise path (NFE N, N >= 1)'),
    SamplerEntry(name='dpmpp_3m', sample=dpmpp_3m, options=[GRID_OPTION, TRAJECTORY_OPTION], check=_checker('dpmpp_3m'),
                 help='third-order data-prediction multistep per subspace (NFE N, N >= 1)'),
    SamplerEntry(name='ipndm', sample=ipndm, options=[GRID_OPTION, TRAJECTORY_OPTION], check=_checker('ipndm'),
                 help='iPNDM, variable-step Adams-Bashforth up to 4th order per subspace (NFE N, N >= 1)'),
]

__all__ = ['dpmpp_2m', 'dpmpp_3m', 'ipndm', 'ab_weights', 'CLASSICAL_AB', 'SAMPLER_ENTRIES']
