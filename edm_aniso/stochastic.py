"""Stochastic samplers on the noise path: ``aniso_sde`` (EDM's churn sampler) and ``pc`` (score-SDE's
predictor-corrector), for EDM networks and for learned anisotropic paths M = a^2 P + b^2 P_perp (method.md §1, §6),
plus ``langevin_correct``, the corrector on its own (shared with the inverse problems).

Both are registered with generate.py (``--sampler=aniso_sde``, ``--sampler=pc``). Levels come from
``NoisePath.grid`` (``--grid=karras|schedule``), per sample: a_i on P, b_i on P_perp, sigma_i = sqrt(a_i b_i) the
effective level, a_N = b_N = 0. All fresh noise is drawn with ``randn_like`` on the float64 state, which generate.py
binds to the per-seed generators, so an image depends only on its seed (and the network and options), not on the batch.

**aniso_sde: churn on the matrix path.** EDM's Algorithm 2 raises the level t_i -> t_hat = t_i (1 + gamma_i) and adds
noise of variance t_hat^2 - t_i^2, so that a sample of p(t_i) becomes one of p(t_hat). On the matrix path the same
move is made in the path's own coordinate, the effective level: sigma_hat = sigma_i (1 + gamma_i) (rounded by the
network's ``round_sigma`` on an EDM network), i.e. schedule time t_hat = F^{-1}(sigma_hat^2) on a learned schedule,
and (a_hat, b_hat) = ``path.split(sigma_hat)``. The noise is raised **per subspace** by what the path needs there:

    x_hat = x_i + S_noise (sqrt(a_hat^2 - a_i^2) P eps + sqrt(b_hat^2 - b_i^2) P_perp eps),   eps = randn_like(x_i),

so that Cov goes from M(t_i) to M(t_hat) (both blocks rise together along the path, not by one isotropic amount: the
state stays on the path, a sample of p(t_hat) when x_i is one of p(t_i) and S_noise = 1). Then one Heun step of the
probability-flow ODE from (a_hat, b_hat) to (a_{i+1}, b_{i+1}) as in ``aniso_heun`` (Euler on the last step). gamma_i
= min(S_churn/N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0 (EDM's rule on the effective level; per sample
on a schedule grid). With S_churn > 0 the noise is drawn at every step (scaled by 0 where gamma_i = 0), as in EDM, so
each seed's stream matches EDM's. With g = h (EDM networks, stage-1 schedules) it is EDM's stochastic sampler; with
S_churn = 0 it is ``aniso_heun``. NFE = 2N - 1. Schedules must be monotone (a and b rise with sigma); a negative
increment, which a monotone path cannot produce, is clamped to 0. A learned schedule ends at its sigma_max (time T):
there sigma_hat above it splits as sigma_max, so a churn step from a level near sigma_max adds less noise than EDM's
would (EDM networks keep EDM's t_hat > sigma_max). EDM's published settings (S_max = 50 < 80/(1 + gamma)) never
churn there, and with them a learned g = h gives EDM's images.

**pc: predictor-corrector (Song et al. 2021, VE case) per subspace.** At each level i, first ``corrector_steps``
Langevin steps at (a_i, b_i) (``langevin_correct``), then the predictor, the reverse-diffusion (Euler-Maruyama) step
of the reverse SDE dx = -(dM/dt) grad log p dt + (dM/dt)^1/2 dw_bar, discretised as score-SDE's
ReverseDiffusionPredictor per block (grad log p = M^-1 (D - x), edm_aniso.path):

    x_{i+1} = x_i + (M_i - M_{i+1}) M_i^-1 (D_i - x_i) + (M_i - M_{i+1})^1/2 z
            = x_i + apply(D_i - x_i, 1 - a_{i+1}^2/a_i^2, 1 - b_{i+1}^2/b_i^2) + apply(z, sqrt(a_i^2 - a_{i+1}^2),
              sqrt(b_i^2 - b_{i+1}^2)),

without noise on the last step, which is then x_N = D_{N-1} (score-SDE's noise-free final mean). NFE =
N (corrector_steps + 1); ``corrector_steps=0`` is the plain reverse-SDE sampler.

**The corrector (``langevin_correct``)**: Langevin dynamics on p(x; M) with score-SDE's signal-to-noise rule applied
**per subspace**: with g = grad log p and a fresh z = randn_like(x), per sample and block (P, P_perp)

    eps_P = 2 (snr ||P z|| / ||P g||)^2,   eps_perp = 2 (snr ||P_perp z|| / ||P_perp g||)^2,
    x <- x + eps_P P g + eps_perp P_perp g + sqrt(2 eps_P) P z + sqrt(2 eps_perp) P_perp z.

This is Langevin dynamics preconditioned by E = eps_P P + eps_perp P_perp, which commutes with M, so p(x; M) is its
invariant law in the small-step limit; per block the rule is score-SDE's (alpha = 1 for VE). A block of dimension 0
(P on an isotropic path) takes no step, so with g = h and one step per level this is score-SDE's Langevin corrector
on the whole vector, with two deliberate deviations from score-SDE's code:

- the norms are per sample, not averaged over the batch (so an image depends only on its seed), and per block (the
  blocks' scores differ by the ratio a^2/b^2: one step size for both would be too large on the less noisy block);
- within one corrector run (several steps at one level) the rule sets the step sizes at the run's first step and
  they are kept for its other steps. A step size recomputed from the current state at every step makes the chain
  state-dependent without the matching drift correction: measured on the exact Gaussian (1x16x16, 100 steps at one
  level), it moved the marginal's variance by +0.3..1.1 % whatever the snr, an O(1/dim) bias. With the run's step
  sizes fixed, what is left beyond the unadjusted-Langevin bias below is the first step's correlation of the step
  size with its state and noise, O(eps/dim) per run (+0.2 % after 10 steps at snr = 0.05, bench/RESULTS.md).

As any unadjusted Langevin step it has a bias of order eps: on a Gaussian marginal of variance v a step of size eps
changes the variance by eps^2/v, and many steps approach v/(1 - eps/(2v)); with the rule eps/v ~ 2 snr^2, so at
score-SDE's snr = 0.16 the corrector alone moves the marginal by a few per cent, and pc's FD stops falling with N at a
floor that scales as snr^4 (bench/RESULTS.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import click
import torch

from edm_aniso.path import NoisePath, SigmaPath
from edm_aniso.sampler import GRID_OPTION, TRAJECTORY_OPTION, _opt, check_options, heun_step, start_on_grid

try:
    from training import registry as _registry
    from training.registry import SamplerEntry
except ImportError:      # inside upstream NVlabs/edm (patches/), whose training package has no registry
    _registry, SamplerEntry = None, None

Level = Union[float, torch.Tensor, tuple]
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# ----------------------------------------------------------------------------------------------------------------------
# Per-block helpers.


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _blocks(path: NoisePath, v: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(P v, P_perp v); P v is None for a block P of dimension 0 (then P_perp v = v)."""
    if path.dims[0] == 0:
        return None, v
    pv = path.project(v)
    return pv, v - pv


def _sq(v: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if v is None:
        return torch.zeros(like.shape[0], dtype=torch.float64, device=like.device)
    return v.to(torch.float64).square().flatten(1).sum(1)


def block_sq_norms(path: NoisePath, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||P v||^2, ||P_perp v||^2) per sample [B] float64 (0 for a block of dimension 0)."""
    pv, qv = _blocks(path, v.to(torch.float64))
    return _sq(pv, v), _sq(qv, v) if path.dims[1] > 0 else _sq(None, v)


def _split_level(path: NoisePath, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(level, (tuple, list)):
        a, b = level
        return path.levels(a), path.levels(b)
    return path.split(level)


def _rule(z2: torch.Tensor, g2: torch.Tensor, snr: float) -> torch.Tensor:
    """eps = 2 snr^2 ||z||^2 / ||g||^2 (0 where ||g|| = 0, e.g. an empty block)."""
    return torch.where(g2 > 0, 2 * snr ** 2 * z2 / g2.clamp_min(1e-300), torch.zeros_like(g2))


def snr_step_sizes(path: NoisePath, grad: torch.Tensor, noise: torch.Tensor, snr: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """score-SDE's step rule per block and sample: eps = 2 (snr ||z_block|| / ||g_block||)^2 ([B] each; 0 where a
    block has dimension 0 or a zero score)."""
    g_p, g_q = block_sq_norms(path, grad)
    z_p, z_q = block_sq_norms(path, noise)
    return _rule(z_p, g_p, snr), _rule(z_q, g_q, snr)


# ----------------------------------------------------------------------------------------------------------------------
# The corrector.


def langevin_correct(path: NoisePath, denoise: Denoise, x: torch.Tensor, level: Level, *,
                     snr: float,                                   # score-SDE's signal-to-noise ratio r > 0
                     steps: int,                                   # Langevin steps (0: x unchanged, no evaluation)
                     randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,  # per-seed noise
                     step_size: Optional[tuple[Any, Any]] = None,  # fixed (eps_P, eps_perp) instead of the snr rule
                     callback: Optional[Callable[[dict], None]] = None,  # {'j', 'x', 'denoised', 'eps_a', 'eps_b'}
                     ) -> torch.Tensor:
    """``steps`` Langevin steps at one level of ``path``, per-subspace snr rule (module docstring), float64 result.

    ``path``: the batch's NoisePath (``edm_aniso.path.noise_path``). ``denoise(x, a, b) -> D`` float64, the
    PathDenoiser convention (a PathDenoiser is one; an inverse-problem solver may pass a wrapped one). ``level``: the
    effective sigma (a scalar or [B] per sample, split by the path), or a pair (a, b) of per-sample levels on P and
    P_perp (e.g. a column of ``NoisePath.grid``). Each step draws one ``randn_like(x)`` and evaluates ``denoise``
    once; score g = M^-1 (D - x). The snr rule is applied at the run's first step and its step sizes are kept for the
    run's other steps (module docstring: a step size recomputed from the state at every step biases the marginal by
    O(1/dim)). ``step_size`` replaces the rule by fixed step sizes (scalars or [B]), e.g. the deterministic step sizes
    of an exact law (edm_aniso.gaussian.pc_law)."""
    if steps < 0:
        raise ValueError(f'corrector steps must be >= 0, got {steps}')
    if not snr > 0:
        raise ValueError(f'snr must be > 0, got {snr}')
    a, b = _split_level(path, level)
    inv_a2, inv_b2 = a.square().reciprocal(), b.square().reciprocal()
    x = x.to(torch.float64)
    eps_a = eps_b = None
    if step_size is not None:
        eps_a, eps_b = path.levels(step_size[0]), path.levels(step_size[1])
    for j in range(int(steps)):
        D = denoise(x, a, b)
        (pr, qr), z = _blocks(path, D - x), randn_like(x)
        pz, qz = _blocks(path, z)
        # score g = M^-1 (D - x): P g = P(D - x)/a^2, P_perp g = P_perp(D - x)/b^2.
        pg = None if pr is None else pr * _bcast(inv_a2, x)
        qg = qr * _bcast(inv_b2, x)
        if eps_a is None:                     # the rule at the run's first step sets its step size (docstring)
            eps_a, eps_b = _rule(_sq(pz, x), _sq(pg, x), snr), _rule(_sq(qz, x), _sq(qg, x), snr)
        if callback is not None:
            callback(dict(j=j, x=x, denoised=D, eps_a=eps_a, eps_b=eps_b))
        x = x + _bcast(eps_b, x) * qg + _bcast((2 * eps_b).sqrt(), x) * qz
        if pg is not None:
            x = x + _bcast(eps_a, x) * pg + _bcast((2 * eps_a).sqrt(), x) * pz
    return x


# ----------------------------------------------------------------------------------------------------------------------
# aniso_sde.


def churn_gamma(sigma: torch.Tensor, num_steps: int, S_churn: float, S_min: float, S_max: float) -> torch.Tensor:
    """EDM's gamma_i = min(S_churn/N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0 (per sample)."""
    g = min(float(S_churn) / num_steps, math.sqrt(2) - 1)
    inside = (sigma >= S_min) & (sigma <= S_max)
    return torch.where(inside, torch.full_like(sigma, g), torch.zeros_like(sigma))


def churn_levels(net: Any, path: NoisePath, sigma: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_hat, a_hat, b_hat) per sample for one churn step from (sigma, a, b) [B] (module docstring):
    sigma_hat = sigma (1 + gamma) (the network's round_sigma on an EDM network), (a_hat, b_hat) = split(sigma_hat);
    unchanged levels where gamma = 0 (so a schedule grid's own a_i, b_i are kept exactly)."""
    sig_hat = sigma + gamma * sigma
    if isinstance(path, SigmaPath):
        rnd = getattr(net, 'round_sigma', None)
        if rnd is not None:
            sig_hat = torch.as_tensor(rnd(sig_hat), dtype=torch.float64, device=sigma.device).reshape(sigma.shape)
        return sig_hat, sig_hat, sig_hat
    a_hat, b_hat = path.split(sig_hat)
    moved = gamma > 0
    return torch.where(moved, sig_hat, sigma), torch.where(moved, a_hat, a), torch.where(moved, b_hat, b)


@torch.no_grad()
def aniso_sde(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              randn_like: Callable = torch.randn_like,
              num_steps: int = 18,                 # N: levels, NFE = 2N - 1
              sigma_min: Optional[float] = 0.002,  # lowest level (None: 0.002), clamped to net.sigma_min
              sigma_max: Optional[float] = 80.0,   # highest level (None: 80), clamped to net.sigma_max
              rho: float = 7.0,                    # rho of the Karras grid
              grid: str = 'karras',                # 'karras' | 'schedule' (edm_aniso.path.NoisePath.grid)
              S_churn: float = 0.0,                # EDM's stochasticity strength; 0 = deterministic (aniso_heun)
              S_min: float = 0.0,                  # churn only where S_min <= sigma_i <= S_max (effective level)
              S_max: float = float('inf'),
              S_noise: float = 1.0,                # noise inflation
              trajectory: Optional[str] = None,    # directory for per-sample strips of denoised images (None: off)
              seeds: Optional[list[int]] = None,   # strip names (None: seeds of generate.py's generators)
              callback: Optional[Callable[[dict], None]] = None,  # {'i', 'x', 'denoised', 'a', 'b', 'a_hat', 'b_hat'}
              **unused) -> torch.Tensor:
    """EDM's stochastic Heun sampler (Algorithm 2) on the network's noise path, float64 output (module docstring).

    Step i: gamma_i from the effective level, (a_hat, b_hat) = split(sigma_i (1 + gamma_i)), x_hat = x_i + S_noise
    (sqrt(a_hat^2 - a_i^2) P + sqrt(b_hat^2 - b_i^2) P_perp) eps, then the Heun step of aniso_heun from (a_hat, b_hat)
    to (a_{i+1}, b_{i+1}) (Euler on the last step). Start x_0 = M_0^1/2 z."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if S_churn < 0 or S_min < 0 or S_max < 0:
        raise ValueError(f'S_churn, S_min and S_max must be >= 0, got {S_churn}, {S_min}, {S_max}')
    path, den, a, b, x, record, sig = start_on_grid(net, latents, class_labels, randn_like, num_steps, grid,
                                                    sigma_min, sigma_max, rho, trajectory, seeds)
    # One level for the whole batch on an EDM network: 0-d levels, so that the network sees a 0-d sigma as in EDM's
    # sampler (a [B] sigma runs the network's float32 embedding on another kernel, which changes the last bits).
    lv = (lambda v: v[0]) if isinstance(path, SigmaPath) else (lambda v: v)      # noqa: E731
    for i in range(num_steps):
        a_i, b_i, a_next, b_next = lv(a[:, i]), lv(b[:, i]), lv(a[:, i + 1]), lv(b[:, i + 1])
        gamma = churn_gamma(sig[:, i], num_steps, S_churn, S_min, S_max)
        _, a_hat, b_hat = churn_levels(net, path, sig[:, i], a[:, i], b[:, i], gamma)
        a_hat, b_hat = lv(a_hat), lv(b_hat)
        x_hat = x
        if S_churn > 0:
            eps = randn_like(x)
            x_hat = x + path.apply(eps, S_noise * (a_hat.square() - a_i.square()).clamp_min(0).sqrt(),
                                   S_noise * (b_hat.square() - b_i.square()).clamp_min(0).sqrt())
        f = den.flow(x_hat, a_hat, b_hat)
        if record is not None or callback is not None:
            denoised = den.denoised_from_flow(x_hat, f, a_hat, b_hat)
            if record is not None:
                record(denoised)
            if callback is not None:
                callback(dict(i=i, x=x_hat, denoised=denoised, a=a[:, i], b=b[:, i], a_hat=path.levels(a_hat),
                              b_hat=path.levels(b_hat)))
        x = heun_step(den, path, x_hat, f, a_hat, b_hat, a_next, b_next, i == num_steps - 1)
    if record is not None:
        record.save(x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# pc.


def reverse_sde_step(path: NoisePath, x: torch.Tensor, denoised: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     a_next: torch.Tensor, b_next: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """The predictor (module docstring): x + (M_i - M_{i+1}) M_i^-1 (D - x) + (M_i - M_{i+1})^1/2 noise per block;
    ``noise`` None gives the mean (the last step: D)."""
    x_mean = x + path.apply(denoised - x, 1 - a_next.square() / a.square(), 1 - b_next.square() / b.square())
    if noise is None:
        return x_mean
    return x_mean + path.apply(noise, (a.square() - a_next.square()).clamp_min(0).sqrt(),
                               (b.square() - b_next.square()).clamp_min(0).sqrt())


@torch.no_grad()
def pc(net: Any, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
       randn_like: Callable = torch.randn_like,
       num_steps: int = 18,                 # N: levels; NFE = N (corrector_steps + 1)
       sigma_min: Optional[float] = 0.002,  # lowest level (None: 0.002), clamped to net.sigma_min
       sigma_max: Optional[float] = 80.0,   # highest level (None: 80), clamped to net.sigma_max
       rho: float = 7.0,                    # rho of the Karras grid
       grid: str = 'karras',                # 'karras' | 'schedule' (edm_aniso.path.NoisePath.grid)
       corrector_steps: int = 1,            # Langevin steps per level (score-SDE's n_steps_each); 0: reverse SDE only
       snr: float = 0.16,                   # signal-to-noise ratio of the step rule (score-SDE's VE default)
       trajectory: Optional[str] = None,    # directory for per-sample strips of denoised images (None: off)
       seeds: Optional[list[int]] = None,   # strip names (None: seeds of generate.py's generators)
       callback: Optional[Callable[[dict], None]] = None,  # called with {'i', 'x', 'denoised', 'a', 'b'}
       corrector_step_size: Optional[Callable[[int], tuple]] = None,  # level i -> fixed (eps_P, eps_perp)
       **unused) -> torch.Tensor:
    """Predictor-corrector sampling per subspace on the network's noise path, float64 output (module docstring).

    Level i: ``corrector_steps`` Langevin steps at (a_i, b_i), then the reverse-diffusion step to (a_{i+1}, b_{i+1})
    (noise-free on the last, x_N = D_{N-1}). Start x_0 = M_0^1/2 z. Noise order per level: the corrector's draws,
    then the predictor's. ``corrector_step_size`` (tests and exact laws) fixes the corrector's step sizes at level i
    instead of the snr rule."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f'corrector_steps must be an integer >= 0, got {corrector_steps}')
    if not snr > 0:
        raise ValueError(f'snr must be > 0, got {snr}')
    path, den, a, b, x, record, _ = start_on_grid(net, latents, class_labels, randn_like, num_steps, grid, sigma_min,
                                               sigma_max, rho, trajectory, seeds)
    for i in range(num_steps):
        ai, bi = a[:, i], b[:, i]
        if corrector_steps > 0:
            fixed = None if corrector_step_size is None else corrector_step_size(i)
            x = langevin_correct(path, den, x, (ai, bi), snr=snr, steps=int(corrector_steps), randn_like=randn_like,
                                 step_size=fixed)
        D = den(x, ai, bi)
        if record is not None:
            record(D)
        if callback is not None:
            callback(dict(i=i, x=x, denoised=D, a=ai, b=bi))
        last = i == num_steps - 1
        x = reverse_sde_step(path, x, D, ai, bi, a[:, i + 1], b[:, i + 1], None if last else randn_like(x))
    if record is not None:
        record.save(x)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Options and registry entries (registered by edm_aniso.plugin).


def _edm_churn_options() -> list[click.Option]:
    """EDM's --S_churn/--S_min/--S_max/--S_noise: the very click.Option objects of generate.py's ``edm`` entry when it
    is registered (so --help lists them once, under aniso_sde|edm), else equal ones (same names, types, defaults)."""
    edm = _registry.SAMPLERS.get('edm') if _registry is not None else None
    own = {o.name: o for o in (edm.options if edm is not None else [])}

    def opt(name: str, help: str, type: Any) -> click.Option:
        return own.get(name) or click.Option([f'--{name}', name], help=help, metavar='FLOAT', type=type, default=None)
    return [opt('S_churn', 'Stochasticity strength  [default: 0]', click.FloatRange(min=0)),
            opt('S_min', 'Stoch. min noise level  [default: 0]', click.FloatRange(min=0)),
            opt('S_max', 'Stoch. max noise level  [default: inf]', click.FloatRange(min=0)),
            opt('S_noise', 'Stoch. noise inflation  [default: 1]', float)]


CHURN_OPTIONS = _edm_churn_options()
CORRECTOR_STEPS_OPTION = click.Option(['--corrector-steps', 'corrector_steps'], metavar='INT',
                                      help='Langevin corrector steps per level  [default: 1]',
                                      type=click.IntRange(min=0), default=None)
SNR_OPTION = click.Option(['--snr'], metavar='FLOAT', help='Signal-to-noise ratio of the corrector\'s step rule '
                          '(score-SDE)  [default: 0.16]', type=click.FloatRange(min=0, min_open=True), default=None)


def _check_sde(net: Any, opts: Any) -> None:
    check_options(net, opts, needs_aniso=False, sampler='aniso_sde', min_steps=1)
    s_min, s_max = _opt(opts, 'S_min', 0.0), _opt(opts, 'S_max', float('inf'))
    if s_min > s_max:
        raise click.ClickException(f'--S_min must not exceed --S_max for --sampler=aniso_sde, got {s_min} > {s_max}')


def _check_pc(net: Any, opts: Any) -> None:
    check_options(net, opts, needs_aniso=False, sampler='pc', min_steps=1)
    if _opt(opts, 'snr') is not None and _opt(opts, 'corrector_steps', 1) == 0:
        raise click.ClickException('--snr sets the corrector\'s step size: it needs --corrector-steps >= 1 '
                                   '(--corrector-steps=0 runs the reverse SDE alone)')


SAMPLER_ENTRIES: list = [] if SamplerEntry is None else [
    SamplerEntry(name='aniso_sde', sample=aniso_sde, options=CHURN_OPTIONS + [GRID_OPTION, TRAJECTORY_OPTION],
                 check=_check_sde,
                 help='EDM\'s stochastic sampler (S_churn) on the network\'s noise path, noise raised per subspace '
                      '(NFE 2N-1)'),
    SamplerEntry(name='pc', sample=pc, options=[CORRECTOR_STEPS_OPTION, SNR_OPTION, GRID_OPTION, TRAJECTORY_OPTION],
                 check=_check_pc,
                 help='predictor-corrector: reverse-SDE step + Langevin corrector per subspace (NFE N(K+1), K = '
                      '--corrector-steps)'),
]

__all__ = ['aniso_sde', 'pc', 'langevin_correct', 'snr_step_sizes', 'block_sq_norms', 'churn_gamma', 'churn_levels',
           'reverse_sde_step', 'CHURN_OPTIONS', 'CORRECTOR_STEPS_OPTION', 'SNR_OPTION', 'SAMPLER_ENTRIES']
