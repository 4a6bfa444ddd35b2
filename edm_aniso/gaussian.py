"""Exact oracle denoisers for data whose covariance is diagonal in the 2-D DCT basis (method.md §9.6).

Used by the sampler tests and by ``bench/exact_gaussian.py``: with the oracle standing in for the network, the
probability-flow ODE is linear per DCT coefficient (Gaussian case), so a sampler's output distribution can be pushed
through exactly, and the Fréchet distance to the data is known in closed form.

Coordinates: for an image X_c (one channel) the DCT coefficients are C X_c Cᵀ with C the orthonormal DCT-II matrix.
The noise covariance M_t = g P + h P_perp is diagonal there too when P is a set of DCT frequencies (a mask).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from edm_aniso.path import NoisePath, SchedulePath
from edm_aniso.subspace import dct_matrix

# ----------------------------------------------------------------------------------------------------------------------
# DCT transforms and spectra.


_DCT_CACHE: dict = {}


def _dct(res: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II matrix, built once per (res, dtype, device)."""
    key = (res, dtype, str(device))
    if key not in _DCT_CACHE:
        _DCT_CACHE[key] = dct_matrix(res, dtype=torch.float64).to(device=device, dtype=dtype)
    return _DCT_CACHE[key]


def to_dct(x: torch.Tensor) -> torch.Tensor:
    """Per-channel orthonormal 2-D DCT-II of [..., H, W] images (H == W)."""
    c = _dct(x.shape[-1], x.dtype, x.device)
    return c @ x @ c.T


def from_dct(coef: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_dct``."""
    c = _dct(coef.shape[-1], coef.dtype, coef.device)
    return c.T @ coef @ c


def power_law_variances(channels: int, resolution: int, exponent: float = 2.0, sigma_data: float = 0.5,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Natural-image-like spectrum λ[c, u, v] ∝ (1 + u² + v²)^(-exponent/2), scaled so mean(λ) = sigma_data².

    With exponent 2 the power falls as 1/f², the classic natural-image law; E‖x‖²/d = sigma_data² as in EDM.
    """
    if channels < 1 or resolution < 1 or sigma_data <= 0:
        raise ValueError('power_law_variances needs channels >= 1, resolution >= 1 and sigma_data > 0')
    f = torch.arange(resolution, dtype=dtype)
    lam = (1 + f[:, None] ** 2 + f[None, :] ** 2) ** (-exponent / 2)
    lam = lam * (sigma_data ** 2 / lam.mean())
    return lam.expand(channels, resolution, resolution).clone()


def low_block_mask(resolution: int, cutoff: Optional[int] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Mask [H, W] of the DCT low block u, v < cutoff (method.md §3; cutoff defaults to resolution // 2)."""
    m = resolution // 2 if cutoff is None else int(cutoff)
    if not 0 <= m <= resolution:
        raise ValueError(f'cutoff must be in [0, {resolution}], got {m}')
    mask = torch.zeros(resolution, resolution, dtype=dtype)
    mask[:m, :m] = 1
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# A subspace given by per-basis DCT masks (the DCT low block, or any set of frequencies), with the Subspace API.


class MaskedDCTSubspace(torch.nn.Module):
    """P = projector onto the DCT frequencies selected by ``masks[basis_id]`` (per channel, no colour mixing).

    Implements ``project``/``apply`` like ``edm_aniso.subspace.Subspace``; several masks give per-sample bases.
    """

    kind = 'dct'

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        masks = torch.as_tensor(masks, dtype=torch.float64)
        if masks.ndim == 2:
            masks = masks[None]
        self.register_buffer('masks', masks)
        self.num_bases = masks.shape[0]
        self.rank = int(masks[0].sum().item())

    def _mask(self, x: torch.Tensor, basis_id: Optional[torch.Tensor]) -> torch.Tensor:
        masks = self.masks.to(device=x.device, dtype=x.dtype)
        if basis_id is None:
            return masks[0][None, None]
        return masks[basis_id.to(x.device).long()][:, None]

    def project(self, x: torch.Tensor, basis_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P x (computed in float64 and returned in x.dtype)."""
        xd = x.to(torch.float64)
        return from_dct(to_dct(xd) * self._mask(xd, basis_id)).to(x.dtype)

    def apply(self, x: torch.Tensor, a, b, basis_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        """a·P x + b·(x − P x) with scalars or per-sample [B] tensors a, b."""
        a, b = _per_sample(a, x), _per_sample(b, x)
        px = self.project(x, basis_id)
        return a * px + b * (x - px)


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a [B] tensor over x's C, H, W."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim == 1 else v


# ----------------------------------------------------------------------------------------------------------------------
# Data distributions with closed-form denoisers.


class DCTGaussian:
    """x ~ N(0, Σ) with Σ diagonal in the DCT basis: coefficient variances ``variances`` [C, H, W] (§9.6)."""

    def __init__(self, variances: torch.Tensor):
        self.variances = torch.as_tensor(variances, dtype=torch.float64)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = torch.randn([n, *self.variances.shape], dtype=torch.float64, generator=generator)
        return from_dct(z * self.variances.sqrt())

    def denoise_dct(self, coef: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] in DCT coordinates: λ/(λ + m) x for per-coefficient noise variances m."""
        lam = self.variances.to(coef.device)
        return lam / (lam + noise_var) * coef


class DCTGaussianMixture:
    """Equal-weight mixture of Gaussians N(μ_j, Σ), all diagonal in the DCT basis (the mixture variant of §9.6).

    ``means`` [J, C, H, W] and ``variances`` [C, H, W] are given in DCT coordinates.
    """

    def __init__(self, means: torch.Tensor, variances: torch.Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.variances = torch.as_tensor(variances, dtype=torch.float64)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        j = torch.randint(self.means.shape[0], [n], generator=generator)
        z = torch.randn([n, *self.variances.shape], dtype=torch.float64, generator=generator)
        return from_dct(self.means[j] + z * self.variances.sqrt())

    def denoise_dct(self, coef: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j(x) (μ_j + s (x − μ_j)) = s x + (1 − s) Σ_j w_j μ_j with s = λ/(λ + m) and posterior weights
        w_j ∝ N(x; μ_j, Λ + M). The covariance is shared, so log w_j = Σ_k (x_k μ_jk − μ_jk²/2)/(λ_k + m_k) + const:
        two matrix products over the coefficients, no [B, J, C, H, W] tensor."""
        lam = self.variances.to(coef.device)
        mu = self.means.to(coef.device).flatten(1)                       # [J, d]
        inv_var = (1 / (lam + noise_var)).expand_as(coef).flatten(1)     # [B, d]
        logw = (coef.flatten(1) * inv_var) @ mu.T - 0.5 * inv_var @ mu.square().T
        w = torch.softmax(logw, dim=1)                                   # [B, J]
        shrink = (lam / (lam + noise_var)).expand_as(coef)
        return shrink * coef + (1 - shrink) * (w @ mu).reshape(coef.shape)


# ----------------------------------------------------------------------------------------------------------------------
# The oracle "network": AnisoPrecond's sampling API with the exact denoiser inside.

LevelsFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def ratio_levels(log_ratio: Callable[[torch.Tensor], torch.Tensor]) -> LevelsFn:
    """Levels from a split function: a_i = σ_i e^{r}, b_i = σ_i e^{−r} with r = ½ ln(g/h) = log_ratio(σ_i).

    Any schedule pair (g, h) sampled at t_i = F⁻¹(σ_i²) has this form, since a_i b_i = σ_i² (method.md §6 step 2).
    ``log_ratio`` may return [N] (one split for all) or [K, N] (one per class, gathered by the sample's row).
    """
    def levels(sigmas: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        r = torch.as_tensor(log_ratio(sigmas), dtype=torch.float64, device=sigmas.device)
        if r.ndim == 2:
            r = r[rows if rows is not None else torch.zeros(1, dtype=torch.long)]
        else:
            r = r[None]
        return torch.stack([sigmas * r.exp(), sigmas * (-r).exp()])  # [2, B|1, N]
    levels.log_ratio = log_ratio        # RatioPath evaluates the split at any level
    return levels


class RatioPath(NoisePath):
    """The noise path of an oracle whose split is given by a log-ratio function (``ratio_levels``):
    a = sigma e^r, b = sigma e^-r with r = log_ratio(sigma) (or the sample's row of a [K, ...] result).
    kappa_a = 1 + dr/d ln sigma, kappa_b = 1 - dr/d ln sigma (by autograd). There is no schedule time."""

    def __init__(self, net: 'OracleNet', class_labels: Optional[torch.Tensor], batch: int, device=None) -> None:
        rows, basis_id = net.rows_for(class_labels, batch)
        super().__init__(net.subspace, basis_id, batch, (net.img_channels, net.img_resolution, net.img_resolution),
                         net.sigma_min, net.sigma_max, 'cpu' if device is None else device)
        self.log_ratio = getattr(net.levels_fn, 'log_ratio', None)
        if self.log_ratio is None:
            raise ValueError('this oracle\'s levels function has no log_ratio: build it with ratio_levels')
        self.rows = rows

    def _ratio(self, s: torch.Tensor) -> torch.Tensor:
        r = torch.as_tensor(self.log_ratio(s.reshape(-1)), dtype=torch.float64)
        if r.ndim == 2:                              # one split per class: each sample its own row
            rows = self.rows.reshape(-1, *([1] * (s.ndim - 1))).expand_as(s).reshape(-1)
            r = r[rows, torch.arange(rows.shape[0])]
        return r.reshape(s.shape)

    def split(self, sigma):
        s = self.levels(sigma)
        r = self._ratio(s)
        return s * r.exp(), s * (-r).exp()

    def log_slopes(self, sigma):
        s = self.levels(sigma).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            dr = torch.autograd.grad(self._ratio(s).sum(), s, allow_unused=True)[0]
        dr = torch.zeros_like(s) if dr is None else dr * s.detach()
        return 1 + dr, 1 - dr


def knot_split(lg: torch.Tensor, lh: torch.Tensor, tau: torch.Tensor, sigmas: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(a, b) [2, R|B, N] from log-knots of g and h: t_i = F⁻¹(σ_i²) with F = √(g h), a = √g(t_i), b = √h(t_i).

    Differentiable in the log-knots (method.md §6 step 2); rows None evaluates every row of the bank.
    """
    from edm_aniso.schedule import split_at_levels
    rows = torch.arange(lg.shape[0], device=lg.device) if rows is None else rows.to(lg.device)
    rr = rows[:, None].expand(-1, sigmas.shape[0])
    _, a, b = split_at_levels(lg, lh, tau, sigmas.to(lg.dtype)[None].expand_as(rr), rr)
    return torch.stack([a, b]).to(torch.float64)


def schedule_levels(schedule_g, schedule_h) -> LevelsFn:
    """Levels from two KnotSchedule objects (rows gathered per sample when they are banks)."""
    def levels(sigmas: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        rows = torch.zeros(1, dtype=torch.long) if rows is None else rows
        return knot_split(schedule_g.log_knots(), schedule_h.log_knots(), schedule_g.tau, sigmas, rows)
    return levels


class OracleNet(torch.nn.Module):
    """Stand-in for AnisoPrecond whose denoiser is exact for ``dist`` (a DCTGaussian or DCTGaussianMixture).

    Exposes what the samplers use: ``levels``, ``flow``, ``rows_for``, ``subspace``, the EDM-style call
    ``net(x, sigma, class_labels)``, ``round_sigma``, ``sigma_min``/``sigma_max``, ``img_*``, ``label_dim``; ``calls``
    counts network evaluations. Per-class splits (``levels_fn`` from ``ratio_levels`` with a [K, N] log ratio) and
    per-class bases (``basis_of_class``, indices into the subspace's masks) exercise per-sample handling.
    """

    def __init__(self, dist, levels_fn: Optional[LevelsFn] = None, subspace: Optional[MaskedDCTSubspace] = None,
                 label_dim: int = 0, basis_of_class: Optional[Sequence[int]] = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 schedule_g: Optional[torch.nn.Module] = None, schedule_h: Optional[torch.nn.Module] = None):
        super().__init__()
        self.dist = dist
        c, res, _ = dist.variances.shape
        self.img_channels, self.img_resolution, self.label_dim = c, res, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.subspace = subspace if subspace is not None else MaskedDCTSubspace(low_block_mask(res))
        self.schedule_g, self.schedule_h = schedule_g, schedule_h
        if levels_fn is None:
            levels_fn = schedule_levels(schedule_g, schedule_h) if schedule_g is not None \
                else ratio_levels(torch.zeros_like)
        self.levels_fn = levels_fn
        basis = torch.as_tensor(basis_of_class if basis_of_class is not None else [0] * max(label_dim, 1))
        self.register_buffer('basis_rows', basis.long())
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def noise_path(self, class_labels: Optional[torch.Tensor], batch: int, device=None) -> NoisePath:
        """The oracle's path (edm_aniso.path): its knot schedules, or its ratio-levels split."""
        if self.schedule_g is not None:
            return SchedulePath(self, class_labels, batch, 'cpu' if device is None else device)
        return RatioPath(self, class_labels, batch, device)

    def rows_for(self, class_labels: Optional[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(schedule row, basis id) per sample; labels one-hot → argmax, unconditional → zeros."""
        rows = torch.zeros(batch, dtype=torch.long) if class_labels is None or self.label_dim == 0 \
            else class_labels.argmax(dim=1).cpu()
        return rows, self.basis_rows[rows]

    def levels(self, sigmas: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
               batch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) [B, N+1] float64 with a_N = b_N = 0 (method.md §6 step 2)."""
        b_size = class_labels.shape[0] if class_labels is not None else (batch or 1)
        rows, _ = self.rows_for(class_labels, b_size)
        ab = self.levels_fn(sigmas.to(torch.float64), rows if self.label_dim else None)
        ab = torch.cat([ab, torch.zeros_like(ab[..., :1])], dim=-1).expand(2, b_size, -1)
        return ab[0], ab[1]

    def schedule_parameters(self) -> list[torch.nn.Parameter]:
        """θ: the schedule modules' parameters (shared ones once), as AnisoPrecond.schedule_parameters."""
        seen, out = set(), []
        for mod in (self.schedule_g, self.schedule_h):
            for p in (mod.parameters() if mod is not None else []):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def network_parameters(self) -> list[torch.nn.Parameter]:
        """φ: none, the oracle is exact."""
        return []

    def schedules(self, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        """(g, g_dot, h, h_dot) per sample from the schedule modules (as AnisoPrecond.schedules)."""
        if self.schedule_g is None:
            raise ValueError('this oracle has no schedule modules')
        rows = self.rows_for(class_labels, t.shape[0])[0].to(t.device) if self.label_dim else None
        g, g_dot = self.schedule_g(t, rows)
        h, h_dot = self.schedule_h(t, rows)
        return g, g_dot, h, h_dot

    def _noise_var(self, g: torch.Tensor, h: torch.Tensor, basis_id: Optional[torch.Tensor], like: torch.Tensor):
        mask = self.subspace._mask(like, basis_id)
        g, h = _per_sample(g, like), _per_sample(h, like)
        return g * mask + h * (1 - mask)

    def denoise(self, x: torch.Tensor, g, h, basis_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact E[x0 | x_t = x] under M = g P + h P_perp (float64)."""
        xd = x.to(torch.float64)
        m = self._noise_var(torch.as_tensor(g, dtype=torch.float64), torch.as_tensor(h, dtype=torch.float64),
                            basis_id, xd)
        return from_dct(self.dist.denoise_dct(to_dct(xd), m))

    def forward(self, x: torch.Tensor, sigma=None, class_labels=None, force_fp32: bool = False, *, g=None, h=None,
                basis_id=None, **unused) -> torch.Tensor:
        """EDM-compatible call (g = h = σ²) or an anisotropic one with per-sample g, h."""
        self.calls += 1
        if g is None:
            s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
            g = h = s ** 2
        if basis_id is None:
            basis_id = self.rows_for(class_labels, x.shape[0])[1]
        return self.denoise(x, g, h, basis_id)

    def flow(self, x: torch.Tensor, g, h, class_labels=None, basis_id=None, **unused) -> torch.Tensor:
        """f = M^{-1/2}(D − x) (method.md §1)."""
        d = self.forward(x, class_labels=class_labels, g=g, h=h, basis_id=basis_id)
        g, h = torch.as_tensor(g, dtype=torch.float64), torch.as_tensor(h, dtype=torch.float64)
        return self.subspace.apply(d - x.to(torch.float64), g.rsqrt(), h.rsqrt(), basis_id)


def random_knot_oracle(dist, seed: int, scale: float = 0.4, label_dim: int = 0) -> OracleNet:
    """An oracle with random anisotropic knot schedules: u of g and h perturbed by ``scale`` standard normals (one
    bank row per class when label_dim > 0, every class on the one low-block basis), float64."""
    from edm_aniso.schedule import KnotSchedule
    rows = max(label_dim, 1)
    sg, sh = KnotSchedule(num_rows=rows, dtype=torch.float64), KnotSchedule(num_rows=rows, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sg.u.add_(scale * torch.randn(sg.u.shape, generator=gen, dtype=torch.float64))
        sh.u.add_(scale * torch.randn(sh.u.shape, generator=gen, dtype=torch.float64))
    return OracleNet(dist, schedule_g=sg, schedule_h=sh, label_dim=label_dim, basis_of_class=[0] * rows)


class SigmaView(torch.nn.Module):
    """An oracle behind EDM's call only, net(x, sigma, class_labels), like an EDMPrecond: its noise path is then the
    SigmaPath a = b = sigma (edm_aniso.path)."""

    def __init__(self, net: OracleNet):
        super().__init__()
        self.net = net
        self.sigma_min, self.sigma_max, self.label_dim, self.sigma_data = 0.0, float('inf'), 0, net.sigma_data
        self.img_channels, self.img_resolution = net.img_channels, net.img_resolution

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        return self.net(x, sigma)


# ----------------------------------------------------------------------------------------------------------------------
# Closed-form sampler factors and Fréchet distances.


def heun_factors(variances: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per-coefficient gain of aniso_heun on Gaussian data: output coefficient = gain · levels[..., 0] · z.

    ``levels`` [..., N+1] are the σ levels of each coefficient's block (a_i on P, b_i on P_perp), last one 0. With the
    oracle f = −k x with k = s/(λ + s²), an Euler step multiplies x by e_i = 1 − (s_i − s_{i+1}) k_i and a Heun step
    by 1 − (s_i − s_{i+1})(k_i + k_{i+1} e_i)/2; the last step is Euler.
    """
    lam = variances[..., None].to(torch.float64)
    s = levels.to(torch.float64)
    k = s / (lam + s ** 2)
    gain = torch.ones(torch.broadcast_shapes(lam.shape[:-1], s.shape[:-1]), dtype=torch.float64)
    n = s.shape[-1] - 1
    for i in range(n):
        ds = s[..., i] - s[..., i + 1]
        euler = 1 - ds * k[..., i]
        gain = gain * (euler if i == n - 1 else 1 - ds * (k[..., i] + k[..., i + 1] * euler) / 2)
    return gain


def frechet_diag(var_a: torch.Tensor, var_b: torch.Tensor) -> float:
    """Fréchet distance between N(0, diag var_a) and N(0, diag var_b): Σ (√a − √b)²."""
    return float(((var_a.sqrt() - var_b.sqrt()) ** 2).sum())


def frechet_gaussians(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Fréchet distance ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between two Gaussians (float64). The trace of
    the root is Σ √eig(R Σ_b R) with R = Σ_a^½ (both symmetric PSD: two eigen-decompositions, no general sqrtm)."""
    mu_a, mu_b = mu_a.to(torch.float64), mu_b.to(torch.float64)
    cov_a, cov_b = cov_a.to(torch.float64), cov_b.to(torch.float64)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root)


def frechet_samples(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sample sets [n, ...] (as FID does for features)."""
    a = x.reshape(x.shape[0], -1).to(torch.float64)
    b = y.reshape(y.shape[0], -1).to(torch.float64)
    return frechet_gaussians(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def exact_denoised_gain(variances: torch.Tensor, mask: torch.Tensor, start: tuple, end: tuple) -> torch.Tensor:
    """Per-coefficient gain of the exact solve that every sampler ending with x_N = D(x_{N-1}) converges to: the
    prior sample s_0 z, the exact PF-ODE x(s) = s_0 z √((λ + s²)/(λ + s_0²)) in each block's clock down to s_end
    (method.md §9.6), then the exact denoiser λ/(λ + s_end²). ``start`` = (a_0, b_0), ``end`` = (a_end, b_end) are
    the levels on P (``mask``) and on P_perp."""
    lam, on_p = variances.to(torch.float64), mask.bool()
    f64 = lambda v: torch.as_tensor(v, dtype=torch.float64)           # noqa: E731
    s0 = torch.where(on_p, f64(start[0]), f64(start[1]))
    s1 = torch.where(on_p, f64(end[0]), f64(end[1]))
    return s0 * ((lam + s1 ** 2) / (lam + s0 ** 2)).sqrt() * lam / (lam + s1 ** 2)


def gaussian_nll(variances: torch.Tensor, x: torch.Tensor, noise_var: torch.Tensor | float = 0.0) -> torch.Tensor:
    """-ln N(x; 0, Λ + M) per sample [B] for x [B, C, H, W] in pixel space, Λ and M diagonal in the DCT basis
    (``noise_var`` per coefficient, broadcastable to x; the DCT is orthonormal, so the density is the same there)."""
    var = variances.to(torch.float64) + torch.as_tensor(noise_var, dtype=torch.float64)
    coef = to_dct(x.to(torch.float64))
    var = var.expand_as(coef)
    return 0.5 * (coef.square() / var + torch.log(2 * np.pi * var)).flatten(1).sum(1)


def gaussian_elbo(variances: torch.Tensor, x: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor) -> torch.Tensor:
    """The expected variational bound of edm_aniso.likelihood.elbo_nll [B] with the exact denoiser, in closed form.

    Per DCT coefficient with data variance λ, value x and noise variance m rising from m_lo to m_hi along any monotone
    path: L_rec = ½(1 + ln 2π m_lo), L_prior = x²/(2 m_hi), and with x − D = (m x − λ√m ε)/(λ + m),
    L_diff = ½ ∫ [x²/(λ+m)² + λ²/(m(λ+m)²)] dm
           = ½ [x² (1/(λ+m_lo) − 1/(λ+m_hi)) + ln(m_hi/m_lo) − ln((λ+m_hi)/(λ+m_lo)) + λ/(λ+m_hi) − λ/(λ+m_lo)],
    which depends on the path only through its end levels. ``m_lo``, ``m_hi`` broadcast to x's coefficients."""
    lam = variances.to(torch.float64)
    c2 = to_dct(x.to(torch.float64)).square()
    m0 = torch.as_tensor(m_lo, dtype=torch.float64).expand_as(c2)
    m1 = torch.as_tensor(m_hi, dtype=torch.float64).expand_as(c2)
    lam = lam.expand_as(c2)
    rec = 0.5 * (1 + torch.log(2 * np.pi * m0))
    prior = c2 / (2 * m1)
    diff = 0.5 * (c2 * (1 / (lam + m0) - 1 / (lam + m1)) + torch.log(m1 / m0) - torch.log((lam + m1) / (lam + m0))
                  + lam / (lam + m1) - lam / (lam + m0))
    return (rec + prior + diff).flatten(1).sum(1)


def exact_end_ratio(variances: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
    """The exact PF-ODE gain √(λ/(λ + σ_max²)) from x_T = σ_max z to t = 0 (method.md §9.6)."""
    lam = variances.to(torch.float64)
    return (lam / (lam + sigma_max ** 2)).sqrt()



# ----------------------------------------------------------------------------------------------------------------------
# Exact laws of the stochastic samplers (edm_aniso.stochastic).
#
# With the exact denoiser of N(mu, diag lambda) (DCT coordinates) every step of aniso_sde and pc is, per coefficient k
# with block clock s_k (a on P, b on P_perp) and y = x - mu_k, linear plus independent Gaussian noise:
#   churn          y <- y + S_noise sqrt(s_hat^2 - s^2) eps
#   Heun s -> s'   y <- c y, c = 1 - (s - s')(k + k' e)/2, e = 1 - (s - s') k, k = s/(lambda + s^2)  (Euler: c = e)
#   predictor      y <- ((lambda + s'^2)/(lambda + s^2)) y + sqrt(s^2 - s'^2) z
#                  (the last step: y <- lambda/(lambda + s^2) y, no z)
#   corrector      y <- (1 - eps/v) y + sqrt(2 eps) z,  v = lambda + s^2  (grad log p = -y/v)
# so the output law is Gaussian, N(mu + m_y, diag var), propagated exactly here from x_0 = s_0 z. The corrector's step
# eps is per block: score-SDE's rule eps = 2 snr^2 ||z_B||^2 / ||g_B||^2 is random per sample; the law uses its
# deterministic equivalent eps_B = 2 snr^2 E||z_B||^2 / E||g_B||^2 = 2 snr^2 d_B / sum_{k in B} E[y_k^2] / v_k^2 under
# the current law at the first step of each corrector run (the limit of the rule as d_B grows), kept for the run's
# other steps as the sampler keeps its own; the sampler runs exactly this law when given these step sizes
# (``pc(..., corrector_step_size=...)``).


def _clock(mask: torch.Tensor, a, b, like: torch.Tensor) -> torch.Tensor:
    """Per-coefficient level: a on P (mask = 1), b on P_perp."""
    f64 = lambda v: torch.as_tensor(v, dtype=torch.float64)           # noqa: E731
    return torch.where(mask.bool().expand_as(like), f64(a), f64(b))


def _heun_gain(lam: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, last: bool) -> torch.Tensor:
    k, k_next = s / (lam + s ** 2), s_next / (lam + s_next ** 2)
    euler = 1 - (s - s_next) * k
    return euler if last else 1 - (s - s_next) * (k + k_next * euler) / 2


def law_start(variances: torch.Tensor, s0: torch.Tensor, means: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of y = x - mu, var) of the prior sample x_0 = s_0 z per coefficient."""
    lam = variances.to(torch.float64)
    mu = torch.zeros_like(lam) if means is None else torch.as_tensor(means, dtype=torch.float64).expand_as(lam)
    return -mu, (s0 ** 2).expand_as(lam).clone()


def corrector_law_step(variances: torch.Tensor, mask: torch.Tensor, s: torch.Tensor, mean_y: torch.Tensor,
                       var: torch.Tensor, snr: float, eps: Optional[tuple[float, float]] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """One Langevin step at per-coefficient levels ``s`` on the law (mean_y, var): returns the new law and the
    per-block step sizes (eps_P, eps_perp) used (``eps``, or the deterministic equivalent of the snr rule)."""
    lam = variances.to(torch.float64)
    v = lam + s ** 2
    on_p = mask.bool().expand_as(lam)
    if eps is None:
        g2 = (var + mean_y ** 2) / v ** 2                                # E[g_k^2]
        out = []
        for blk in (on_p, ~on_p):
            d = int(blk.sum())
            out.append(2 * snr ** 2 * d / float(g2[blk].sum()) if d > 0 else 0.0)
        eps = (out[0], out[1])
    e = torch.where(on_p, torch.as_tensor(float(eps[0]), dtype=torch.float64),
                    torch.as_tensor(float(eps[1]), dtype=torch.float64))
    c = 1 - e / v
    return c * mean_y, c ** 2 * var + 2 * e, (float(eps[0]), float(eps[1]))


def aniso_sde_law(variances: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  a_hat: torch.Tensor, b_hat: torch.Tensor, S_noise: float = 1.0,
                  means: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact output law (mean, var) per DCT coefficient of ``aniso_sde`` with the exact denoiser of
    N(means, diag variances): levels a, b [N+1] (last 0) of one sample and its churn levels a_hat, b_hat [N]
    (edm_aniso.stochastic.churn_levels; a_hat = a where there is no churn). ``mask`` [H, W] selects P."""
    lam = variances.to(torch.float64)
    s = lambda v, w: _clock(mask, v, w, lam)                          # noqa: E731
    mean_y, var = law_start(lam, s(a[0], b[0]), means)
    n = a.shape[0] - 1
    for i in range(n):
        si, sh, sn = s(a[i], b[i]), s(a_hat[i], b_hat[i]), s(a[i + 1], b[i + 1])
        var = var + S_noise ** 2 * (sh ** 2 - si ** 2).clamp_min(0)
        c = _heun_gain(lam, sh, sn, i == n - 1)
        mean_y, var = c * mean_y, c ** 2 * var
    mu = torch.zeros_like(lam) if means is None else torch.as_tensor(means, dtype=torch.float64).expand_as(lam)
    return mu + mean_y, var


def pc_law(variances: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, corrector_steps: int,
           snr: float, means: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Exact output law (mean, var) per DCT coefficient of ``pc`` with the exact denoiser, given the corrector step
    sizes of the deterministic-equivalent snr rule (section comment); also returns those step sizes,
    {i: (eps_P, eps_perp)} per level (set at the level's first corrector step, as the sampler does), which
    ``pc(..., corrector_step_size=steps.get)`` reproduces."""
    lam = variances.to(torch.float64)
    s = lambda v, w: _clock(mask, v, w, lam)                          # noqa: E731
    mean_y, var = law_start(lam, s(a[0], b[0]), means)
    n, steps = a.shape[0] - 1, {}
    for i in range(n):
        si, sn = s(a[i], b[i]), s(a[i + 1], b[i + 1])
        for j in range(int(corrector_steps)):          # the rule at the level's first step sets its step size
            mean_y, var, steps[i] = corrector_law_step(lam, mask, si, mean_y, var, snr, steps.get(i))
        if i == n - 1:
            c = lam / (lam + si ** 2)
            mean_y, var = c * mean_y, c ** 2 * var
        else:
            c = (lam + sn ** 2) / (lam + si ** 2)
            mean_y, var = c * mean_y, c ** 2 * var + (si ** 2 - sn ** 2).clamp_min(0)
    mu = torch.zeros_like(lam) if means is None else torch.as_tensor(means, dtype=torch.float64).expand_as(lam)
    return mu + mean_y, var, steps


def langevin_law(variances: torch.Tensor, mask: torch.Tensor, level: tuple, steps: int, snr: float,
                 start: Optional[tuple[torch.Tensor, torch.Tensor]] = None, means: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Law (mean, var) per DCT coefficient after ``steps`` corrector steps at the fixed level (a, b) = ``level``,
    from ``start`` = (mean, var) (default: the exact marginal N(mu, lambda + s^2)); also the step sizes
    (eps_P, eps_perp) of the run (the rule's deterministic equivalent at its first step, kept for the others)."""
    lam = variances.to(torch.float64)
    mu = torch.zeros_like(lam) if means is None else torch.as_tensor(means, dtype=torch.float64).expand_as(lam)
    s = _clock(mask, level[0], level[1], lam)
    mean, var = (mu.clone(), lam + s ** 2) if start is None else start
    mean_y, used = mean - mu, []
    eps = None
    for _ in range(int(steps)):                         # the rule at the first step sets the run's step size
        mean_y, var, eps = corrector_law_step(lam, mask, s, mean_y, var, snr, eps)
    return mu + mean_y, var, eps


def law_frechet(mean: torch.Tensor, var: torch.Tensor, variances: torch.Tensor,
                means: Optional[torch.Tensor] = None) -> float:
    """Fréchet distance of N(mean, diag var) to the data N(means, diag variances) (DCT coordinates; the DCT is
    orthonormal, so it is the distance in pixel space)."""
    mu = 0.0 if means is None else torch.as_tensor(means, dtype=torch.float64)
    return float((mean - mu).square().sum()) + frechet_diag(var, variances.to(torch.float64))


def oracle_mask(net: 'OracleNet', row: int = 0) -> torch.Tensor:
    """P of an oracle's sample of basis ``row`` as a DCT mask [H, W] (zeros behind SigmaView: P = 0)."""
    if isinstance(net, SigmaView):
        return torch.zeros(net.img_resolution, net.img_resolution, dtype=torch.float64)
    return net.subspace.masks[int(net.basis_rows[row])].to(torch.float64)


def stochastic_law(net, sampler: str, num_steps: int, grid: str = 'karras', sigma_min: float = 0.002,
                   sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                   S_max: float = float('inf'), S_noise: float = 1.0, corrector_steps: int = 1, snr: float = 0.16
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The exact output law (mean, var, corrector step sizes) of ``sampler`` ('aniso_sde' or 'pc') on an unconditional
    OracleNet over a DCTGaussian (or a one-component DCTGaussianMixture: its mean), or on a SigmaView of one: the
    levels and churn levels come from the sampler's own path and grid (edm_aniso.stochastic)."""
    from edm_aniso.path import noise_path
    from edm_aniso.stochastic import churn_gamma, churn_levels
    inner = net.net if isinstance(net, SigmaView) else net
    dist = inner.dist
    means = None
    if isinstance(dist, DCTGaussianMixture):
        if dist.means.shape[0] != 1:
            raise ValueError('stochastic_law needs Gaussian data: a DCTGaussian or a one-component mixture')
        means = dist.means[0]
    like = torch.zeros(1, inner.img_channels, inner.img_resolution, inner.img_resolution, dtype=torch.float64)
    path = noise_path(net, None, like)
    lev = path.grid(num_steps, grid, sigma_min, sigma_max, rho)
    a, b = lev.a[0], lev.b[0]
    mask = oracle_mask(net)
    if sampler == 'aniso_sde':
        sig = lev.sigma[:, :-1]                                          # [1, N]: one sample, every level
        gamma = churn_gamma(sig, num_steps, S_churn, S_min, S_max)
        _, a_hat, b_hat = churn_levels(net, path, sig, lev.a[:, :-1], lev.b[:, :-1], gamma)
        a_hat, b_hat = a_hat[0], b_hat[0]
        mean, var = aniso_sde_law(dist.variances, mask, a, b, a_hat, b_hat, S_noise, means)
        return mean, var, {}
    if sampler == 'pc':
        return pc_law(dist.variances, mask, a, b, corrector_steps, snr, means)
    raise ValueError(f'unknown sampler {sampler!r}; stochastic_law knows aniso_sde and pc')


# ----------------------------------------------------------------------------------------------------------------------
# Exact conditional laws and exact moments of affine samplers (inverse problems: edm_aniso.inverse).


def dct_gaussian_covariance(variances: torch.Tensor) -> torch.Tensor:
    """Pixel-space covariance [d, d] (d = C·H·W, flattened in C, H, W order) of DCTGaussian(variances): Σ = Bᵀ Λ B
    with B the orthonormal per-channel 2-D DCT, whose rows map images to coefficients."""
    lam = variances.to(torch.float64)
    d = lam.numel()
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *lam.shape)
    basis = from_dct(eye).reshape(d, d)                # row j: the image of DCT coefficient j
    return basis.T @ (lam.reshape(d, 1) * basis)


def projector_matrix(project: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The matrix [d, d] of a linear map on images of ``shape`` (C, H, W), e.g. an observation's projector K."""
    d = int(np.prod(shape))
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return project(eye).reshape(d, d).T.contiguous()


def gaussian_conditional(cov: torch.Tensor, known: torch.Tensor, y: torch.Tensor, tol: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Law of x ~ N(0, Σ) given K x = y, for K an orthogonal projector (the known component of an inverse problem).

    With orthonormal bases Q_k of range K and Q_u of its complement (eigenvectors of K), k = Q_kᵀ y and Σ_ab =
    Q_aᵀ Σ Q_b: the unknown coordinates are N(Σ_uk Σ_kk⁻¹ k, Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku) (Schur complement). Returned in
    pixel space: mean = y + Q_u μ_u [d] and covariance Q_u C_u Q_uᵀ [d, d] (zero on the known component). ``tol`` > 0
    adds tol·mean(diag Σ_kk) to Σ_kk before the solve (for nearly singular data)."""
    cov, known = cov.to(torch.float64), known.to(torch.float64)
    y = y.reshape(-1).to(torch.float64)
    sym = (known + known.T) / 2
    if float((sym @ sym - sym).abs().max()) > 1e-8 or float((known - known.T).abs().max()) > 1e-8:
        raise ValueError('known must be an orthogonal projector (K² = K = Kᵀ)')
    if float((sym @ y - y).abs().max()) > 1e-8 * max(1.0, float(y.abs().max())):
        raise ValueError('y must lie in the known component (K y = y)')
    w, v = torch.linalg.eigh(sym)
    q_k, q_u = v[:, w > 0.5], v[:, w <= 0.5]
    s_kk, s_uk, s_uu = q_k.T @ cov @ q_k, q_u.T @ cov @ q_k, q_u.T @ cov @ q_u
    if q_k.shape[1] == 0:
        return torch.zeros_like(y), cov.clone()
    chol = torch.linalg.cholesky(s_kk + tol * torch.eye(s_kk.shape[0], dtype=torch.float64) * s_kk.diagonal().mean())
    gain = torch.cholesky_solve(s_uk.T, chol).T               # Σ_uk Σ_kk⁻¹
    mean_u = gain @ (q_k.T @ y)
    cov_u = s_uu - gain @ s_uk.T
    return y + q_u @ mean_u, q_u @ ((cov_u + cov_u.T) / 2) @ q_u.T


def affine_sampler_moments(run: Callable[[torch.Tensor, Callable], torch.Tensor], shape: Sequence[int]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (mean [d], covariance [d, d]) of ``run(latents, randn_like)`` for standard normal latents and draws,
    when the sampler is affine in them (a Gaussian oracle, linear observations, fixed step sizes), with no
    Monte-Carlo error.

    The output is c + Σ_k J_k ξ_k over the draws ξ_k (the latents and every randn_like call), so mean = c, the output
    at zero draws, and covariance = Σ_k J_k J_kᵀ. The Jacobians come from one reverse-mode pass: ``run`` gets a batch
    of d identical samples whose draws are zero leaf tensors; the gradient of Σ_r out[r, r] (coordinate r of sample
    r) with respect to draw k holds row r of J_k in its sample r. ``run`` must be differentiable (not under no_grad)
    and treat the samples of a batch independently."""
    d = int(np.prod(shape))
    draws: list[torch.Tensor] = []

    def randn_like(like: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(like.shape, dtype=torch.float64, device=like.device, requires_grad=True)
        draws.append(z)
        return z
    latents = randn_like(torch.empty(d, *shape))
    with torch.enable_grad():
        out = run(latents, randn_like).reshape(d, d).to(torch.float64)
        grads = torch.autograd.grad(out.diagonal().sum(), draws, allow_unused=True)
    jac = torch.cat([g.reshape(d, d) for g in grads if g is not None], dim=1)       # [d, d · draws]
    return out[0].detach(), jac @ jac.T


def conditional_snr_step_sizes(cov: torch.Tensor, known: torch.Tensor, subspace: torch.Tensor, a: float, b: float,
                               snr: float) -> tuple[float, float]:
    """Deterministic equivalents (eps_P, eps_perp) of score-SDE's snr rule for the inverse-problem corrector
    (edm_aniso.inverse.conditional_score) on x ~ N(0, Σ): per block B of the path (P = ``subspace`` [d, d], and
    P_perp), eps_B = 2 snr² E‖B z‖² / E‖B (I − K) g‖² = 2 snr² tr B / tr(B (I − K)(Σ + M)⁻¹(I − K)) with
    M = a² P + b² P_perp (the score g = −(Σ + M)⁻¹ x of the noisy marginal has covariance (Σ + M)⁻¹); 0 for a block of
    dimension 0 or one inside range K (as solve_inverse does). With these fixed steps the corrector is affine, so its
    exact moments follow (affine_sampler_moments)."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    p, u = subspace.to(torch.float64), eye - known.to(torch.float64)
    m = a ** 2 * p + b ** 2 * (eye - p)
    g = u @ torch.linalg.inv(cov.to(torch.float64) + m) @ u
    out = []
    for block in (p, eye - p):
        dim, unknown = float(block.trace()), float((block @ u).trace())
        out.append(0.0 if dim < 0.5 or unknown < 1e-9 else 2 * snr ** 2 * dim / float((block @ g).trace()))
    return out[0], out[1]


__all__ = ['to_dct', 'from_dct', 'power_law_variances', 'low_block_mask', 'MaskedDCTSubspace', 'DCTGaussian',
           'DCTGaussianMixture', 'ratio_levels', 'RatioPath', 'knot_split', 'schedule_levels', 'OracleNet', 'heun_factors', 'frechet_diag', 'frechet_gaussians',
           'frechet_samples',
           'exact_end_ratio', 'exact_denoised_gain', 'gaussian_nll', 'gaussian_elbo',
           'random_knot_oracle', 'SigmaView', 'aniso_sde_law', 'pc_law', 'langevin_law', 'corrector_law_step',
           'law_start', 'law_frechet', 'oracle_mask', 'stochastic_law',
           'dct_gaussian_covariance', 'projector_matrix', 'gaussian_conditional', 'affine_sampler_moments',
           'conditional_snr_step_sizes']
