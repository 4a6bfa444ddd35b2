"""Discretisation-aware schedule objective: the trajectory (energy) objective plus the error of one sampler step (or of
a window of them, up to the whole solve) along the learned path (docs/discretisation-objective.md; train.py
``--objective=energy+disc``).

With ``--grid=schedule`` the sampler takes K uniform steps of schedule time, t_i = T (1 - i/K), so a learned g (stage 1)
is a learned time grid and a learned (g, h) (stage 2) a learned grid and split. The energy objective (method.md §5) is
blind to that: it is the same whatever K. The term added here measures what the sampler does with the schedule:

    L_disc = w_d E_{x0, eps, K, j} [ (K/L) (K/K1)^p ||Phi_K(x_j) - Phi_ref(x_j)||^2_W ]

- K uniform on {K1, ..., K2} (``--disc-steps``); a window of L = min(span, K) consecutive steps (``--disc-span``,
  default 1; 'all': L = K, the whole solve to t = 0); j uniform on {0, ..., K-L}, its first step, from
  t_j = T (1 - j/K); x_j = x0 + M(t_j)^1/2 eps, a sample of the path's marginal there (live in theta).
- Phi_K: the L aniso_heun steps of the window (method.md §6) with levels a = sqrt(g(t)), b = sqrt(h(t)) at both ends
  of each, Euler on the last step of the grid (to a = b = 0), as the sampler. Phi_ref: ``substeps`` steps of the
  same kind over each of them (a finer solve of the same network), the stand-in for the exact flow map.
- ||e||^2_W, the error in data units (what the window leaves in the output), ``metric`` at the window's end level:
  'denoiser' (default): <e, D(Phi_K) - D(Phi_ref)> at the end level ~ e^T J_D e; for Gaussian data whose covariance
  commutes with M this is exactly the squared error carried to the data by the PF-ODE (J_D = Lambda (Lambda + M)^-1);
  ||e||^2 where the window ends at level 0.
  'data': ||W_e e||^2, W_e = sigma_data (M(t_end) + sigma_data^2)^-1/2, the same for data of variance sigma_data^2
  in every direction.
- (K/L) E_j[...]: span 1, the expected sum over the K steps of the squared local errors (it cannot use cancellation
  between steps); span 'all', the squared error of the K-step sample against the fine solve from the same start
  (errors of opposite sign in different steps cancel in it, as in the sampler). (K/K1)^p (``k_power``, default 3)
  balances a range of K: the term falls as K^-5 for span 1 (p = 5 weighs every K alike) and K^-4 for span 'all'.

theta-gradient: autograd through the whole term (start point, levels, step sizes, the network's conditioning where
the network lets theta reach it: stage-1 AnisoPrecond and the exact oracles; stage-2 AnisoPrecond detaches (g, h) in
its conditioning, method.md §4); the energy term keeps its own estimator (edm_aniso.loss). ``detach_net``: the
network weights phi get no gradient from the error term (they learn from the regression only, method.md §5).
Per-sample sums spread over each sample's elements, as every loss here (method.md §8.4), so accumulation rounds and
processes sum exactly.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional

import torch

import dnnlib
from edm_aniso.loss import spread
from torch_utils import persistence

OBJECTIVES = ('energy', 'energy+disc')
METRICS = ('data', 'denoiser')    # W_e = sigma_data (M + sigma_data^2)^-1/2, or e^T J_D e by <e, D(x_c) - D(x_f)>


def parse_steps(text: Any) -> tuple[int, int]:
    """``--disc-steps``: 'K' or 'K1-K2' (1 <= K1 <= K2) -> (K1, K2); an int or a pair passes through."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        lo, hi = int(text[0]), int(text[1])
    elif isinstance(text, int):
        lo = hi = int(text)
    else:
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', str(text))
        if m is None:
            raise ValueError(f'disc steps must be K or K1-K2 (integers), got {text!r}')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
    if not 1 <= lo <= hi:
        raise ValueError(f'disc steps need 1 <= K1 <= K2, got {lo}-{hi}')
    return lo, hi


def parse_span(text: Any) -> int:
    """``--disc-span``: L >= 1 consecutive sampler steps per error term, or 'all' (the whole K-step solve to t = 0,
    stored as 0)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif str(text).strip().lower() == 'all':
        return 0
    else:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f'disc span must be a step count >= 1 or all, got {text!r}') from None
    if value < 0 or (value == 0 and not isinstance(text, int)):
        raise ValueError(f'disc span must be a step count >= 1 or all, got {text!r}')
    return int(value)


@contextlib.contextmanager
def _frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Parameters that require grad are treated as constants inside the block (their requires_grad restored after)."""
    live = [p for p in params if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


@persistence.persistent_class
class DiscTerm:
    """The weighted error of a window of sampler steps (one by default) along the learned path against its fine solve
    (module docstring), per sample [B]."""

    def __init__(self, weight: float = 1.0, steps: Any = (5, 18), substeps: int = 4, detach_net: bool = True,
                 sigma_data: Optional[float] = None, k_power: float = 3.0, metric: str = 'denoiser',
                 span: Any = 1) -> None:
        if not weight >= 0 or substeps < 2 or not (sigma_data is None or sigma_data > 0):
            raise ValueError(f'DiscTerm needs weight >= 0, substeps >= 2 and sigma_data > 0, got {weight}, '
                             f'{substeps}, {sigma_data}')
        self.weight = float(weight)
        self.steps = parse_steps(steps)
        self.substeps = int(substeps)
        self.detach_net = bool(detach_net)
        self.sigma_data = None if sigma_data is None else float(sigma_data)   # None: the network's (else 0.5)
        self.k_power = float(k_power)          # extra factor (K / K1)^k_power: balances the K of a range
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
        self.metric = metric
        self.span = parse_span(span)           # L consecutive sampler steps per error (0: all K, to t = 0)

    def window(self, k: torch.Tensor) -> torch.Tensor:
        """L per sample: min(span, K) steps (K where span is 'all')."""
        span = getattr(self, 'span', 1)      # a DiscTerm pickled in a snapshot from before --disc-span has none
        return k if span == 0 else k.clamp(max=span)

    def draw(self, batch: int, device: torch.device | str = 'cpu', generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, j) per sample: K uniform on {K1..K2}, j uniform on {0..K-L}, the first of the L = min(span, K) steps
        of the window (long tensors [B]; span 1: j uniform on {0..K-1})."""
        lo, hi = self.steps
        k = torch.randint(lo, hi + 1, [batch], generator=generator, device=device)
        free = k - self.window(k) + 1
        j = (torch.rand([batch], generator=generator, device=device, dtype=torch.float64) * free).floor().long()
        return k, j.clamp(max=free - 1)

    # -- the step ------------------------------------------------------------------------------------------------------

    def _levels(self, net: Any, t: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) = (sqrt g(t), sqrt h(t)) per sample, live in theta; exactly 0 where t = 0 (the sampler's last level)."""
        g, _, h, _ = net.schedules(t, labels)
        end = t <= 0
        safe = lambda v: torch.where(end, torch.ones_like(v), v).sqrt()   # noqa: E731 - no NaN gradient at 0
        zero = torch.zeros_like(g)
        return torch.where(end, zero, safe(g)), torch.where(end, zero, safe(h))

    def _heun(self, flow: Any, apply: Any, x: torch.Tensor, start: tuple, end: tuple, last: torch.Tensor
              ) -> torch.Tensor:
        """One aniso_heun step from levels ``start`` = (a, b) to ``end``; Euler where ``last`` (end levels 0)."""
        (a0, b0), (a1, b1) = start, end
        f0 = flow(x, a0, b0)
        x_euler = x - apply(f0, a1 - a0, b1 - b0)
        # The corrector's network call needs positive levels: on last steps it is evaluated at the start levels and
        # discarded (torch.where keeps its gradient out), as the sampler's final Euler step makes no second call.
        a1s, b1s = torch.where(last, a0, a1), torch.where(last, b0, b1)
        f1 = flow(x_euler, a1s, b1s)
        x_heun = x - apply((f0 + f1) / 2, a1 - a0, b1 - b0)
        return torch.where(_col(last, x), x_euler, x_heun)

    def _apply_flow(self, net: Any, y: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple[Any, Any]:
        _, basis_id = net.rows_for(labels, y.shape[0])
        apply = lambda v, a, b: net.subspace.apply(v, _to(a, v), _to(b, v), basis_id=basis_id)   # noqa: E731

        def flow(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return net.flow(x, a.square(), b.square(), labels, basis_id=basis_id).to(x.dtype)
        return apply, flow

    def step_times(self, net: Any, k: torch.Tensor, j: torch.Tensor, like: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_j, t_{j+1}, last) per sample on the K-step schedule grid t_i = T (1 - i/K) (``--grid=schedule``)."""
        T = float(net.schedule_g.T)
        kf = k.to(device=like.device, dtype=torch.float64)
        jf = j.to(device=like.device, dtype=torch.float64)
        t_s = (T * (1 - jf / kf)).to(like.dtype)
        last = (j + 1 >= k).to(like.device)
        t_e = torch.where(last, torch.zeros_like(t_s), (T * (1 - (jf + 1) / kf)).to(like.dtype))
        return t_s, t_e, last

    def step(self, net: Any, x: torch.Tensor, labels: Optional[torch.Tensor], k: torch.Tensor, j: torch.Tensor,
             substeps: int = 1, count: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Steps j .. j+L-1 of the K-step schedule grid from x (L = ``count`` per sample, default 1), each in
        ``substeps`` uniform pieces of schedule time: 1 is the sampler's own step (aniso_heun on --grid=schedule),
        more give the reference solve. A sample whose window is shorter than the batch's longest keeps its state
        (its extra steps are computed on its window's last step and discarded)."""
        apply, flow = self._apply_flow(net, x, labels)
        count = torch.ones_like(k) if count is None else count
        for i in range(int(count.max())):
            live = i < count
            t_s, t_e, last = self.step_times(net, k, j + (count - 1).clamp(max=i), x)
            y, lev = x, self._levels(net, t_s, labels)
            for m in range(1, substeps + 1):
                t_m = t_e if m == substeps else t_s + (t_e - t_s) * (m / substeps)
                nxt = self._levels(net, t_m, labels)
                y = self._heun(flow, apply, y, lev, nxt, last if m == substeps else torch.zeros_like(last))
                lev = nxt
            x = y if bool(live.all()) else torch.where(_col(live.to(x.device), x), y, x)
        return x

    def compute(self, net: Any, y: torch.Tensor, labels: Optional[torch.Tensor], k: torch.Tensor, j: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
        """weight (K/L) (K/K1)^p ||Phi_K(x_j) - Phi_ref(x_j)||^2_W per sample [B] for given draws K, j [B] and noise
        eps, over the window of L = min(span, K) steps from t_j."""
        apply, _ = self._apply_flow(net, y, labels)
        count = self.window(k)
        t_s, _, _ = self.step_times(net, k, j, y)
        _, t_e, _ = self.step_times(net, k, j + count - 1, y)
        params = list(net.network_parameters()) if (self.detach_net and hasattr(net, 'network_parameters')) else []
        with _frozen(params):
            x = y + apply(eps, *self._levels(net, t_s, labels))      # a sample of the marginal at t_j (live in theta)
            coarse = self.step(net, x, labels, k, j, count=count)
            fine = self.step(net, x, labels, k, j, self.substeps, count=count)
        a_e, b_e = self._levels(net, t_e, labels)
        if self.metric == 'denoiser':
            with _frozen(params):
                sq = self._denoiser_metric(net, coarse, fine, a_e, b_e, labels, apply)
        else:
            sd = self.sigma_data if self.sigma_data is not None else float(getattr(net, 'sigma_data', 0.5))
            w_a = sd * (a_e.square() + sd * sd).rsqrt()
            w_b = sd * (b_e.square() + sd * sd).rsqrt()
            sq = apply(coarse - fine, w_a, w_b).square().flatten(1).sum(1)
        kk = k.to(device=y.device, dtype=y.dtype)
        scale = self.weight * (kk / count.to(device=y.device, dtype=y.dtype)) * (kk / self.steps[0]) ** self.k_power
        return scale * sq

    def _denoiser_metric(self, net: Any, coarse: torch.Tensor, fine: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         labels: Optional[torch.Tensor], apply: Any) -> torch.Tensor:
        """<e, D(x_c) - D(x_f)> ~ e^T J_D e at the end level (e = x_c - x_f); e^T e where the end level is 0. For
        Gaussian data diagonal with M, J_D = Lambda (Lambda + M)^-1 is the square of the exact PF-ODE's propagation
        factor to the data, so this is the squared error the step leaves in the output (see the docs page)."""
        _, flow = self._apply_flow(net, coarse, labels)
        end = (a <= 0)
        a_s, b_s = torch.where(end, torch.ones_like(a), a), torch.where(end, torch.ones_like(b), b)
        d_c = coarse + apply(flow(coarse, a_s, b_s), a_s, b_s)
        d_f = fine + apply(flow(fine, a_s, b_s), a_s, b_s)
        e = coarse - fine
        inner = (e * (d_c - d_f)).flatten(1).sum(1)
        return torch.where(end, e.square().flatten(1).sum(1), inner)


def _to(v: Any, like: torch.Tensor) -> Any:
    return v.to(like.dtype) if torch.is_tensor(v) else v


@persistence.persistent_class
class EnergyDiscLoss:
    """``--objective=energy+disc``: the energy loss of the stage (AnisoStage1Loss or AnisoStage2Loss, unchanged,
    with its estimator) plus ``DiscTerm`` spread over each sample's elements. With weight 0 the disc term is not
    computed and nothing extra is drawn: the loss is the energy loss bit for bit (same random stream)."""

    explicit_grad_sync = True   # both terms query the schedules outside forward (and stage 2 double-backwards)

    def __init__(self, energy: dict, disc_weight: float = 1.0, disc_steps: Any = (5, 18), disc_substeps: int = 4,
                 disc_detach_net: bool = True, sigma_data: Optional[float] = None, disc_k_power: float = 3.0,
                 disc_metric: str = 'denoiser', disc_span: Any = 1) -> None:
        self.energy = dnnlib.util.construct_class_by_name(**energy)
        self.disc = DiscTerm(disc_weight, disc_steps, disc_substeps, disc_detach_net, sigma_data, disc_k_power,
                             disc_metric, disc_span)

    def begin_step(self, step_index: int) -> None:
        if hasattr(self.energy, 'begin_step'):
            self.energy.begin_step(step_index)

    def __call__(self, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Any = None) -> torch.Tensor:
        loss = self.energy(net, images, labels, augment_pipe)
        if self.disc.weight == 0:
            return loss
        k, j = self.disc.draw(images.shape[0], images.device)
        per_sample = self.disc.compute(net, images, labels, k, j, torch.randn_like(images))
        return loss + spread(per_sample, loss)


__all__ = ['OBJECTIVES', 'DiscTerm', 'EnergyDiscLoss', 'parse_span', 'parse_steps']
