"""Likelihood of data under a trained network, in nats and bits/dim, on the network's noise path (edm_aniso.path):
the probability-flow ODE (score-SDE's "exact likelihood") and the continuous-time variational bound (VDM / MuLAN).
Both work for EDM networks (SigmaPath: a = b = sigma) and anisotropic ones (SchedulePath: M = a^2 P + b^2 P_perp,
per sample for class banks). ``likelihood.py`` at the top level is the command line.

**Probability-flow ODE.** In s = ln sigma the PF-ODE is dx/ds = v(x, s) = -apply(D - x, kappa_a, kappa_b)
(NoisePath.ode_derivative). Integrating the data point x(s_min) = x from s_min = ln sigma_min to s_max = ln sigma_max
together with the divergence gives the log-density of the ODE model (the prior pushed through the ODE, a normalised
density on R^d):
    log p(x) = log N(x(s_max); 0, M(sigma_max)) + int_{s_min}^{s_max} div_x v(x(s), s) ds.
div v = tr(dv/dx) exactly (d vector-Jacobian products, tiny images) or by Hutchinson's estimator
E_e[e^T (dv/dx) e] with Rademacher probes e held fixed through the solve (unbiased; K probes are averaged).
Solver: scipy.integrate.solve_ivp (adaptive Runge-Kutta, RK45 by default, rtol = atol = 1e-5 as score-SDE uses),
one solve per smooth piece: on a learned knot schedule kappa jumps where t crosses a knot (NoisePath.kinks).
scipy rather than torchdiffeq: it is already a dependency, it is the solver behind score-SDE's published bits/dim (so
the numbers compare), its error control and dense output are mature, and the host round trip per step is small next
to a network evaluation. The batch is one ODE system (shared step sizes): an image's value depends, within the
tolerance, on its batch, so the command line fixes batches independently of the number of processes.

**Variational bound.** With the decoder p(x | x_min) = N(x; x_min, M(sigma_min)) and the prior N(0, M(sigma_max)),
for every x (VDM's continuous-time bound, one SNR 1/a^2 on P and 1/b^2 on P_perp, MuLAN's multivariate form):
    -log p(x) <= L_rec + L_prior + L_diff,
    L_rec   = 1/2 sum_blocks d_block (1 + ln(2 pi m_block(sigma_min)))             (m = a^2 on P, b^2 on P_perp)
    L_prior = 1/2 x^T M(sigma_max)^-1 x                                          (KL of N(x, M_max) to the prior)
    L_diff  = 1/2 int M_dot M^-2 weighted ||x - D(x_t)||^2 dt
            = int_{s_min}^{s_max} E_eps[ kappa_a/a^2 ||P(x - D)||^2 + kappa_b/b^2 ||P_perp(x - D)||^2 ] ds,
with x_t = x + M^1/2 eps (d m = 2 m kappa ds turns 1/2 m_dot/m^2 dt into kappa/m ds). L_diff is estimated by Monte
Carlo: s uniform on [s_min, s_max] (importance sampling uniform in log sigma), stratified per image
(s_j = s_min + (j + u_j)/J (s_max - s_min), an independent u_j per stratum and image: with one u shared by all strata
(systematic sampling) the strata are correlated and the neighbouring-difference standard error below was measured
about 1.4x too small), each s with an antithetic pair (eps, -eps), and the
control variate beta_a kappa_a (||P eps||^2 - d_P) + beta_b kappa_b (||P_perp eps||^2 - d_perp) (zero mean;
beta = (sigma_data^2 / (m + sigma_data^2))^2, exact for D = x_t at low noise) subtracted: unbiased, with its
standard error per image.

**Discrete data.** Images are 8-bit; EDM maps a level v in {0..255} to x_v = v / 127.5 - 1. Uniform
dequantisation (as score-SDE): x = x_v + (u - 1/2) Delta with u ~ U[0, 1)^d and Delta = 2/255, the bins tile the
line, so for any density p, P(v) = int_bin p >= exp(E_u ln p(x)) Delta^d (Jensen) and
    bits/dim = ( E_u[-ln p(x)] / d - ln Delta ) / ln 2 = E_u[-ln p(x)] / (d ln 2) + log2(127.5)
is an upper bound on the model's negative log-likelihood of the 8-bit data, in bits per dimension
(``bits_per_dim``; for the bound, E_u[L] replaces E_u[-ln p]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from edm_aniso.path import NoisePath, PathDenoiser, noise_path

BIN_WIDTH = 2 / 255                      # one 8-bit level in EDM's [-1, 1] scaling x = v / 127.5 - 1
TRACE_KINDS = ('exact', 'hutchinson')

# ----------------------------------------------------------------------------------------------------------------------
# Discrete data.


def dequantize(pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x = v / 127.5 - 1 + (u - 1/2) * 2/255 for 8-bit levels v and u in [0, 1): uniform in v's bin (float64)."""
    return pixels.to(torch.float64) / 127.5 - 1 + (u.to(torch.float64) - 0.5) * BIN_WIDTH


def bits_per_dim(nll: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """Bits per dimension of 8-bit data from the continuous NLL (nats) of its dequantised point (module docstring)."""
    return nll / (dim * math.log(2)) - math.log2(BIN_WIDTH)


@dataclass
class Likelihood:
    """Per-image results [B]: nll in nats of the continuous (dequantised) point, and network forward evaluations."""
    nll: torch.Tensor
    nfe: torch.Tensor
    terms: dict = field(default_factory=dict)     # named parts [B] (e.g. prior, delta_logp; rec, prior, diff, diff_se)


def _setup(net: Any, x: torch.Tensor, class_labels: Optional[torch.Tensor], sigma_min: Optional[float],
           sigma_max: Optional[float]) -> tuple[NoisePath, PathDenoiser, float, float]:
    path = noise_path(net, class_labels, x)
    lo = max(0.002 if sigma_min is None else float(sigma_min), path.sigma_min)   # EDM's sampler range, clamped
    hi = min(80.0 if sigma_max is None else float(sigma_max), path.sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f'need 0 < sigma_min < sigma_max within the network range, got {lo:g} and {hi:g}')
    path.sigma_max = hi                                     # the prior sits at the top of the integration range
    return path, PathDenoiser(net, path, class_labels), lo, hi


# ----------------------------------------------------------------------------------------------------------------------
# Divergence of the ODE drift.


def rademacher(shape: tuple, generator: Optional[torch.Generator] = None, device: Any = 'cpu',
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Entries +-1 with probability 1/2 each."""
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def divergence(v: torch.Tensor, x: torch.Tensor, trace: str = 'exact', probes: Optional[torch.Tensor] = None,
               chunk: int = 64) -> torch.Tensor:
    """Per-sample tr(dv/dx) [B] for v = v(x) built with x.requires_grad (x [B, ...], samples independent).

    'exact': one vector-Jacobian product per dimension (batched ``chunk`` at a time). 'hutchinson': the mean over
    probes [K, B, ...] of e^T (dv/dx) e (one product per probe)."""
    batch, d = x.shape[0], x[0].numel()
    if trace == 'hutchinson':
        if probes is None:
            raise ValueError('Hutchinson\'s estimator needs probes [K, B, ...]')
        total = torch.zeros(batch, dtype=torch.float64, device=x.device)
        for k in range(probes.shape[0]):
            e = probes[k].to(v.dtype)
            g = torch.autograd.grad(v, x, grad_outputs=e, retain_graph=True)[0]
            total = total + (g * e).flatten(1).sum(1).to(torch.float64)
        return total / probes.shape[0]
    if trace != 'exact':
        raise ValueError(f'unknown trace {trace!r}; choose one of {", ".join(TRACE_KINDS)}')
    diag = torch.zeros(batch, d, dtype=torch.float64, device=x.device)
    for start in range(0, d, chunk):
        idx = torch.arange(start, min(start + chunk, d), device=x.device)
        basis = torch.zeros(idx.shape[0], batch, d, dtype=v.dtype, device=x.device)
        basis[torch.arange(idx.shape[0]), :, idx] = 1                  # e_i for every sample
        basis = basis.reshape(idx.shape[0], *v.shape)
        g = torch.autograd.grad(v, x, grad_outputs=basis, retain_graph=True, is_grads_batched=True)[0]
        g = g.reshape(idx.shape[0], batch, d)
        diag[:, idx] = g[torch.arange(idx.shape[0]), :, idx].T.to(torch.float64)
    return diag.sum(1)


# ----------------------------------------------------------------------------------------------------------------------
# Probability-flow ODE.


def ode_nll(net: Any, x: torch.Tensor, class_labels: Optional[torch.Tensor] = None, *,
            trace:      str                     = 'hutchinson', # 'exact' | 'hutchinson'
            probes:     Optional[torch.Tensor]  = None,         # [K, B, C, H, W] Hutchinson probes (None: 1 drawn)
            rtol:       float                   = 1e-5,         # solve_ivp relative tolerance
            atol:       float                   = 1e-5,         # solve_ivp absolute tolerance
            sigma_min:  Optional[float]         = None,         # data end (None: 0.002), raised to net.sigma_min
            sigma_max:  Optional[float]         = None,         # prior end (None: 80), lowered to net.sigma_max
            method:     str                     = 'RK45',       # solve_ivp method
            ) -> Likelihood:
    """-ln p(x) [B] in nats under the network's probability-flow ODE model (module docstring), with the number of
    network evaluations per image. x [B, C, H, W] continuous points (e.g. ``dequantize``d images)."""
    import scipy.integrate
    path, den, lo, hi = _setup(net, x, class_labels, sigma_min, sigma_max)
    batch, shape, dev = x.shape[0], tuple(x.shape), x.device
    n_x = x.numel()
    if trace == 'hutchinson' and probes is None:
        probes = rademacher((1, *shape), device=dev)

    slopes = None

    def drift(s: float, y: np.ndarray) -> np.ndarray:
        xs = torch.from_numpy(y[:n_x]).to(dev).reshape(shape)
        sigma = torch.full([batch], math.exp(s), dtype=torch.float64, device=dev)
        a, b = path.split(sigma)
        with torch.enable_grad():
            xs = xs.requires_grad_(True)
            v = path.ode_derivative(xs, den(xs, a, b), sigma, slopes)
            div = divergence(v, xs, trace, probes)
        return np.concatenate([v.detach().reshape(-1).cpu().numpy(), div.detach().cpu().numpy()])

    y = np.concatenate([x.detach().to(torch.float64).reshape(-1).cpu().numpy(), np.zeros(batch)])
    edges = sorted({math.log(lo), math.log(hi), *(math.log(k) for k in path.kinks(lo, hi))})
    for s0, s1 in zip(edges[:-1], edges[1:]):      # one solve per smooth piece: kappa jumps at schedule knots
        # kappa is constant on the piece: take it inside, so that the piece's end points (knots) use its own value
        slopes = path.log_slopes(torch.full([batch], math.exp((s0 + s1) / 2), dtype=torch.float64, device=dev)) \
            if path.constant_slopes else None
        sol = scipy.integrate.solve_ivp(drift, (s0, s1), y, method=method, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f'the probability-flow ODE solve failed: {sol.message}')
        y = sol.y[:, -1]
    end = torch.from_numpy(y).to(dev)
    x_end = end[:n_x].reshape(shape)
    delta = end[n_x:]
    prior = path.prior_logp(x_end)
    nfe = torch.full([batch], float(den.calls), dtype=torch.float64, device=dev)
    return Likelihood(nll=-(prior + delta), nfe=nfe, terms=dict(prior_logp=prior, delta_logp=delta))


# ----------------------------------------------------------------------------------------------------------------------
# Variational bound.


def elbo_nll(net: Any, x: torch.Tensor, class_labels: Optional[torch.Tensor] = None, *,
             samples:    int                     = 64,          # network evaluations per image (an even number)
             offsets:    Optional[torch.Tensor]  = None,        # [samples/2, B] offsets u_j in [0, 1) (None: drawn)
             noise:      Optional[torch.Tensor]  = None,        # [samples/2, B, C, H, W] eps (None: drawn)
             sigma_min:  Optional[float]         = None,        # decoder level (None: 0.002), raised to net.sigma_min
             sigma_max:  Optional[float]         = None,        # prior level (None: 80), lowered to net.sigma_max
             sigma_data: Optional[float]         = None,        # for the control variate (None: net's, else 0.5)
             ) -> Likelihood:
    """Upper bound L_rec + L_prior + L_diff on -ln p(x) [B] in nats (module docstring), unbiased Monte-Carlo estimate
    of L_diff with its standard error in ``terms['diff_se']``; ``samples`` network evaluations per image."""
    if samples < 2 or samples % 2:
        raise ValueError(f'samples must be an even number >= 2 (antithetic pairs), got {samples}')
    path, den, lo, hi = _setup(net, x, class_labels, sigma_min, sigma_max)
    x = x.to(torch.float64)
    batch, dev, pairs = x.shape[0], x.device, samples // 2
    sd2 = float(sigma_data if sigma_data is not None else getattr(net, 'sigma_data', 0.5)) ** 2
    d_p, d_q = path.dims
    if offsets is None:
        offsets = torch.rand(pairs, batch, dtype=torch.float64, device=dev)
    if tuple(offsets.shape) != (pairs, batch):
        raise ValueError(f'offsets must have shape [samples/2, B] = [{pairs}, {batch}] (one per stratum and image), '
                         f'got {list(offsets.shape)}')
    if noise is None:
        noise = torch.randn(pairs, *x.shape, dtype=torch.float64, device=dev)
    if noise.shape[0] != pairs:
        raise ValueError(f'noise must hold samples/2 = {pairs} draws, got {noise.shape[0]}')

    # Closed-form terms.
    a0, b0 = path.split(lo)
    rec = 0.5 * (d_p * (1 + torch.log(2 * math.pi * a0.square())) + d_q * (1 + torch.log(2 * math.pi * b0.square())))
    a1, b1 = path.split(hi)
    px = path.project(x)
    prior = 0.5 * (px.square().flatten(1).sum(1) / a1.square() + (x - px).square().flatten(1).sum(1) / b1.square())

    # Diffusion term: stratified s, antithetic eps, control variate.
    s_lo, s_hi = math.log(lo), math.log(hi)
    per_pair = torch.zeros(pairs, batch, dtype=torch.float64, device=dev)
    for j in range(pairs):
        s = s_lo + (j + offsets[j].to(dev, torch.float64)) / pairs * (s_hi - s_lo)
        sigma = s.exp()
        a, b = path.split(sigma)
        ka, kb = path.log_slopes(sigma)
        eps = noise[j].to(dev, torch.float64)
        pe = path.project(eps)
        cv = (sd2 / (a.square() + sd2)).square() * ka * (pe.square().flatten(1).sum(1) - d_p) + \
            (sd2 / (b.square() + sd2)).square() * kb * ((eps - pe).square().flatten(1).sum(1) - d_q)
        value = torch.zeros(batch, dtype=torch.float64, device=dev)
        for sign in (1.0, -1.0):
            x_t = x + path.apply(sign * eps, a, b)
            err = x - den(x_t, a, b)
            pe_err = path.project(err)
            value = value + 0.5 * (ka / a.square() * pe_err.square().flatten(1).sum(1) +
                                   kb / b.square() * (err - pe_err).square().flatten(1).sum(1))
        per_pair[j] = (value - cv) * (s_hi - s_lo)
    diff = per_pair.mean(0)
    # Strata are independent: the variance of the mean is estimated from neighbouring-pair differences.
    if pairs > 1:
        diff_se = (per_pair.diff(dim=0).square().mean(0) / 2 / pairs).sqrt()
    else:
        diff_se = torch.full_like(diff, float('nan'))
    nfe = torch.full([batch], float(samples), dtype=torch.float64, device=dev)
    return Likelihood(nll=rec + prior + diff, nfe=nfe, terms=dict(rec=rec, prior=prior, diff=diff, diff_se=diff_se))


__all__ = ['BIN_WIDTH', 'TRACE_KINDS', 'dequantize', 'bits_per_dim', 'Likelihood', 'rademacher', 'divergence',
           'ode_nll', 'elbo_nll']
