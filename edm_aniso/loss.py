"""Training losses of the anisotropic method (method.md §5).

Both losses keep EDM's call contract ``loss_fn(net, images, labels, augment_pipe=None) -> [N, C, H, W]``: the loop
sums the elements, divides by the global batch and backpropagates, so every per-sample quantity below is a sum over
that sample's pixels (method.md §8.4). Both query the schedules outside the network's forward and are therefore called
with the unwrapped network (``explicit_grad_sync = True``: the loop all-reduces every gradient itself).

Stage 1: L_iso = || g_dot / (g sqrt(g + kappa)) (D(x_t; g) - x0) ||^2, plain autograd.
Stage 2: L = || W^(1/2) (f(x_t; sg M) + eps) ||^2 with W = M_dot^2 M^-1 (M + kappa)^-1, plus the zero-valued
surrogate S - sg(S) that carries the theta-gradient of the true flow (Theorem 4.1-type estimator, wiring (1)-(4)).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from torch_utils import persistence
from edm_aniso import hvp as hvp_lib

ApplyFn = Callable[[torch.Tensor, Any, Any], torch.Tensor]   # apply(v, a, b) = a P v + b P_perp v

# ----------------------------------------------------------------------------------------------------------------------
# The theta-gradient surrogate, written for any projector (images or plain vectors; tests use a 5-D mixture).


_dot = hvp_lib.dot
HvpFn = Callable[[torch.Tensor], Optional[torch.Tensor]]   # hvp(e) = q = grad_x <a, e>, or None where it is zero


def _normalise(e: torch.Tensor) -> torch.Tensor:
    return e / e.flatten(1).norm(dim=1).reshape(-1, *([1] * (e.ndim - 1)))


def _unit_probe(like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian probe normalised to unit length per sample (tr(B) ~ d e^T B e)."""
    return _normalise(torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator))


def theta_surrogate(x: torch.Tensor, f: torch.Tensor, b: torch.Tensor, apply: ApplyFn,
                    g: torch.Tensor, h: torch.Tensor, probes: int = 1, exact_trace: bool = False,
                    generator: Optional[torch.Generator] = None,
                    probe_noise: Optional[torch.Tensor] = None, a: Optional[torch.Tensor] = None,
                    hvp: Optional[HvpFn] = None) -> torch.Tensor:
    """Per-sample S [B] whose theta-gradient is b . d_theta f at fixed x (method.md §5, wiring (1)-(3)).

    x: the point where f was evaluated (requires grad; f's graph reaches it). f: the flow there, with (g, h) detached
    inside. b: detached dL/df. g, h [B]: live in theta. With A = d_theta M (commutes with M):
      T1 = 1/2 tr(A grad_x^2 <b, f>)   -> 1/2 d <q, M(theta) e>, q = sg(grad_x <a, e>), a = grad_x <b, f>
      T2 = <grad_x <b, f>, A M^-1/2 f> -> <sg(a), M(theta) sg(M)^-1/2 sg(f)>
      T3 = 1/2 b^T A M^-1 f            -> 1/2 <b, M(theta) sg(M)^-1 sg(f)>
    T1's trace uses ``probes`` Hutchinson probes (averaged), or every basis vector when ``exact_trace`` (tiny d only).
    Only M(theta) is live in S, so S gives no gradient to the network. ``probe_noise`` [probes, B, ...] fixes the
    Gaussian probes (normalised here), for reproducible tests; otherwise they are drawn with ``generator``.
    ``a``: grad_x <b, f> already computed with create_graph=True (else computed here). ``hvp``: q for a probe e
    computed some other way (``edm_aniso.hvp.fd_hvp``); then ``a`` need not carry a graph and T1 is built whenever
    ``hvp`` is given (default: the double backward ``edm_aniso.hvp.autograd_hvp`` through a's graph).
    """
    if probes < 1:
        raise ValueError(f'probes must be >= 1, got {probes}')
    if a is None:
        a = torch.autograd.grad(_dot(b, f).sum(), x, create_graph=True)[0]
    if hvp is None:
        hessian = a.requires_grad                                 # a flow linear in x has no Hessian: T1 = 0
        hvp = lambda e: hvp_lib.autograd_hvp(a, e, x)             # noqa: E731
    else:
        hessian = True
    gs, hs = g.detach(), h.detach()
    fs, a_s = f.detach(), a.detach()
    s2 = _dot(a_s, apply(fs, g / gs.sqrt(), h / hs.sqrt()))
    s3 = 0.5 * _dot(b, apply(fs, g / gs, h / hs))
    d = x[0].numel()
    if exact_trace:
        s1 = torch.zeros_like(s2)
        flat = torch.eye(d, dtype=x.dtype, device=x.device)
        for i in range(d if hessian else 0):
            e = flat[i].reshape(x.shape[1:]).expand_as(x)
            q = hvp(e)
            if q is not None:
                s1 = s1 + 0.5 * _dot(q, apply(e, g, h))
    else:
        s1 = torch.zeros_like(s2)
        if probe_noise is not None:
            probes = probe_noise.shape[0]
        for k in range(probes if hessian else 0):
            e = _unit_probe(x, generator) if probe_noise is None else _normalise(probe_noise[k].to(x.dtype))
            q = hvp(e)
            if q is not None:
                s1 = s1 + (0.5 * d / probes) * _dot(q, apply(e, g, h))
    return s1 + s2 + s3


def spread(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Spread a per-sample value [B] evenly over the elements of each sample (sums back to the value)."""
    n = like[0].numel()
    return (per_sample / n).reshape(-1, *([1] * (like.ndim - 1))).expand_as(like)


def _times(net: Any, batch: int, t_min: float, device: torch.device) -> torch.Tensor:
    """t ~ U(t_min, T) per sample (method.md §5)."""
    T = float(getattr(net.schedule_g, 'T', getattr(net, 'T', 6400.0)))
    return t_min + (T - t_min) * torch.rand(batch, device=device)


def _augment(images: torch.Tensor, augment_pipe: Any) -> tuple[torch.Tensor, Any]:
    return augment_pipe(images) if augment_pipe is not None else (images, None)


def _draw_and_compute(loss: Any, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor],
                      augment_pipe: Any) -> torch.Tensor:
    """EDM's call contract for both losses: draw t ~ U(t_min, T), augment, draw eps, then ``loss.compute``."""
    t = _times(net, images.shape[0], loss.t_min, images.device)
    y, aug = _augment(images, augment_pipe)
    return loss.compute(net, y, labels, t, torch.randn_like(y), aug)


# ----------------------------------------------------------------------------------------------------------------------


@persistence.persistent_class
class AnisoStage1Loss:
    """Stage 1 (method.md §5): L_iso = || g_dot / (g sqrt(g + kappa)) (D(x0 + sqrt(g) eps; g) - x0) ||^2."""

    explicit_grad_sync = True   # schedules are queried outside forward: the loop syncs gradients itself.

    def __init__(self, t_min: float = 1e-9, kappa: float = 1.0) -> None:
        if not t_min >= 0 or not kappa > 0:
            raise ValueError(f'AnisoStage1Loss needs t_min >= 0 and kappa > 0, got {t_min}, {kappa}')
        self.t_min = float(t_min)
        self.kappa = float(kappa)

    def __call__(self, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Any = None) -> torch.Tensor:
        return _draw_and_compute(self, net, images, labels, augment_pipe)

    def compute(self, net: Any, y: torch.Tensor, labels: Optional[torch.Tensor], t: torch.Tensor,
                eps: torch.Tensor, aug: Any = None) -> torch.Tensor:
        """The loss for given times t [B] and noise eps (the random draws of __call__), per element."""
        g, g_dot, _, _ = net.schedules(t, labels)
        n = eps * g.sqrt().reshape(-1, 1, 1, 1)
        D = net(y + n, None, labels, g=g, h=g, augment_labels=aug)
        weight = g_dot.square() / (g.square() * (g + self.kappa))
        return weight.reshape(-1, 1, 1, 1) * (D - y).square()


class _GradInjection(torch.autograd.Function):
    """A zero scalar whose backward hands precomputed gradients to parameters, times the incoming gradient.

    The fused wiring gets phi's gradient from the estimator's own VJP; carrying it as <sg(grad), p> would keep a
    second copy of every gradient alive next to p.grad during the loop's backward. Here the stored gradients are
    scaled in place and handed over (then dropped), so they become p.grad without a copy. One backward only."""

    @staticmethod
    def forward(ctx: Any, grads: list, *params: torch.Tensor) -> torch.Tensor:   # noqa: D102
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:                     # noqa: D102
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError('the stage-2 loss supports one backward only')
        out = tuple(None if gp is None else gp.mul_(grad_out.to(gp.dtype)) for gp in grads)
        grads.clear()
        return (None,) + out


def inject_gradients(params: list, grads: list) -> torch.Tensor:
    """Zero-valued scalar whose gradient w.r.t. params[i] is grads[i] (None: no gradient); consumes ``grads``."""
    return _GradInjection.apply(list(grads), *params)


@persistence.persistent_class
class AnisoStage2Loss:
    """Stage 2 (method.md §5): trajectory objective with flow target -eps and the theta-gradient estimator.

    Per sample: L = sum_pixels (W^(1/2) (f + eps))^2, W = g_dot^2/(g(g+kappa)) on P and h_dot^2/(h(h+kappa)) on
    P_perp. theta gets (i) the explicit gradient through W, (ii) the pathwise gradient through x_t = x0 + M^(1/2) eps
    into the network, and (iii) the surrogate S - sg(S) (value 0). ``probes`` > 1 averages Hutchinson probes.

    ``hvp`` (``--hvp``): how wiring step (2) gets q = grad_x <a, e>: 'fd' (default), a one-sided difference of the VJP
    with a second network call that replays the first one's randomness, no create_graph (``edm_aniso.hvp``); or
    'autograd', the double backward (the reference). ``fd_scale``: c of the fd's step rule (``hvp.fd_delta``).
    ``fd_checkpoint = N``: the fd's second call runs its first N residual blocks under activation checkpointing
    (``hvp.checkpoint_blocks``): less peak memory for one more forward of those blocks (default 3: on EDM's CIFAR-10
    DDPM++ net, three of the four full-resolution encoder blocks; bench/RESULTS.md "Training-step cost").

    ``estimator_every = k`` (``--estimator-every``): the surrogate runs only on steps with step_index % k == 0 (set by
    ``begin_step``) and is multiplied by k there, so that over any k consecutive steps the theta-gradient (iii) has the
    every-step expectation (unbiased); the other steps keep (i) + (ii), the plain loss with no estimator graph.

    ``fused`` (estimator steps only): the estimator's VJP of wiring step (1) also returns grad_phi <b, f>, and with
    a = grad_x <b, f> that is all the regression term's backward needs (phi: <b, df/dphi>; pathwise theta:
    <a, dx_t/dtheta>). The loss then carries them as zero-valued terms instead of a second backward through the
    network: the same gradients (tested against fused=False) for about one backward less. With hvp='fd' the fused VJP
    is a plain backward that frees the forward graph before the second call; unfused, the forward graph stays alive
    for the loop's backward.
    """

    explicit_grad_sync = True   # double backward: the loop calls the unwrapped net and all-reduces gradients.

    def __init__(self, kappa: float = 1.0, t_min: float = 1e-9, probes: int = 1, estimator_every: int = 1,
                 fused: bool = True, hvp: str = 'fd', fd_scale: float = hvp_lib.FD_SCALE,
                 fd_checkpoint: int = hvp_lib.FD_CHECKPOINT) -> None:
        if not kappa > 0 or not t_min >= 0 or probes < 1 or estimator_every < 1:
            raise ValueError(f'AnisoStage2Loss needs kappa > 0, t_min >= 0, probes >= 1 and estimator_every >= 1, '
                             f'got {kappa}, {t_min}, {probes}, {estimator_every}')
        if hvp not in hvp_lib.HVP_METHODS or not fd_scale > 0 or fd_checkpoint < 0:
            raise ValueError(f'AnisoStage2Loss needs hvp in {hvp_lib.HVP_METHODS}, fd_scale > 0 and '
                             f'fd_checkpoint >= 0, got {hvp!r}, {fd_scale}, {fd_checkpoint}')
        self.kappa = float(kappa)
        self.t_min = float(t_min)
        self.probes = int(probes)
        self.estimator_every = int(estimator_every)
        self.fused = bool(fused)
        self.hvp = str(hvp)
        self.fd_scale = float(fd_scale)
        self.fd_checkpoint = int(fd_checkpoint)
        self.step_index = 0

    def begin_step(self, step_index: int) -> None:
        """Called by the training loop before each iteration's accumulation rounds."""
        self.step_index = int(step_index)

    @property
    def estimator_active(self) -> bool:
        return self.step_index % self.estimator_every == 0

    def __call__(self, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Any = None) -> torch.Tensor:
        return _draw_and_compute(self, net, images, labels, augment_pipe)

    def compute(self, net: Any, y: torch.Tensor, labels: Optional[torch.Tensor], t: torch.Tensor,
                eps: torch.Tensor, aug: Any = None, probe_noise: Optional[torch.Tensor] = None,
                estimator: Optional[bool] = None) -> torch.Tensor:
        """The loss for given times t [B], noise eps and optional probes [probes, B, C, H, W], per element.
        estimator: force the surrogate on/off (None: the begin_step schedule; forcing it on keeps the factor k)."""
        g, g_dot, h, h_dot = net.schedules(t, labels)
        _, basis_id = net.rows_for(labels, y.shape[0])
        apply = lambda v, a, b: net.subspace.apply(v, a, b, basis_id=basis_id)   # noqa: E731
        flow = lambda x: net.flow(x, g.detach(), h.detach(), labels, basis_id=basis_id,   # noqa: E731
                                  augment_labels=aug)

        x_t = y + apply(eps, g.sqrt(), h.sqrt())                      # live in theta: the pathwise part (ii)
        w_p = g_dot.square() / (g * (g + self.kappa))                 # explicit part (i)
        w_q = h_dot.square() / (h * (h + self.kappa))
        run_estimator = self.estimator_active if estimator is None else bool(estimator)
        if not run_estimator:
            r = flow(x_t) + eps
            return apply(r, w_p.sqrt(), w_q.sqrt()).square()           # (W^1/2 r)^2 per element
        weight = float(self.estimator_every)                           # unbiased over k steps
        surrogate = lambda x, f, b, **kw: weight * theta_surrogate(    # noqa: E731
            x, f, b, apply, g, h, probes=self.probes, probe_noise=probe_noise, **kw)
        if self.hvp == 'fd':
            return self._fd(net, flow, apply, x_t, eps, w_p, w_q, g, h, surrogate)
        if not x_t.requires_grad:
            x_t = x_t.detach().requires_grad_(True)
        f = flow(x_t)
        r = f + eps
        b = 2 * apply(r.detach(), w_p.detach(), w_q.detach())          # b = sg(2 W r) = dL/df
        if not self.fused:
            loss = apply(r, w_p.sqrt(), w_q.sqrt()).square()
            S = surrogate(x_t, f, b)
            return loss + spread(S - S.detach(), loss)
        params = _phi_parameters(net)
        grads = torch.autograd.grad(_dot(b, f).sum(), [x_t] + params, create_graph=True, allow_unused=True)
        a = grads[0]
        phi_grads = [None if gp is None else gp.detach() for gp in grads[1:]]
        del grads
        S = surrogate(x_t, f, b, a=a)
        return self._fused_loss(r, a, x_t, S, params, phi_grads, apply, w_p, w_q)

    def _fd(self, net: Any, flow: Callable, apply: ApplyFn, x_t: torch.Tensor, eps: torch.Tensor,
            w_p: torch.Tensor, w_q: torch.Tensor, g: torch.Tensor, h: torch.Tensor, surrogate: Callable
            ) -> torch.Tensor:
        """Estimator step with the finite-difference HVP (``edm_aniso.hvp``)."""
        params = _phi_parameters(net)
        x = x_t.detach().requires_grad_(True)
        rng = hvp_lib.RngReplay(x.device)                              # the masks of this first call
        if self.fused:
            f = flow(x)
            r = f.detach() + eps
            b = 2 * apply(r, w_p.detach(), w_q.detach())
            grads = torch.autograd.grad(_dot(b, f).sum(), [x] + params, allow_unused=True)   # frees f's graph
            a, phi_grads = grads[0], list(grads[1:])
            del grads, f
        else:                                                          # forward graph kept for the loop's backward
            x_live = x_t if x_t.requires_grad else x
            f = flow(x_live)
            r = f + eps
            b = 2 * apply(r.detach(), w_p.detach(), w_q.detach())
            a = torch.autograd.grad(_dot(b, f).sum(), x_live, retain_graph=True)[0]

        def vjp(x2: torch.Tensor) -> torch.Tensor:
            with rng.replay(), hvp_lib.checkpoint_blocks(net, self.fd_checkpoint):
                return hvp_lib.input_vjp(flow, x2, b, params)

        delta = hvp_lib.fd_delta(x, torch.minimum(g, h).detach().sqrt(), self.fd_scale)
        S = surrogate(x, r.detach() - eps, b, a=a.detach(), hvp=lambda e: hvp_lib.fd_hvp(vjp, x, a, e, delta))
        if not self.fused:
            loss = apply(r, w_p.sqrt(), w_q.sqrt()).square()
            return loss + spread(S - S.detach(), loss)
        return self._fused_loss(r, a, x_t, S, params, phi_grads, apply, w_p, w_q)

    @staticmethod
    def _fused_loss(r: torch.Tensor, a: torch.Tensor, x_t: torch.Tensor, S: torch.Tensor, params: list,
                    phi_grads: list, apply: ApplyFn, w_p: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        """Value and explicit theta-gradient (i) from the detached residual, pathwise theta-gradient (ii) as
        <sg(a), x_t>, the surrogate (iii), and phi's gradient handed over from the estimator's VJP."""
        path = _dot(a.detach(), x_t)
        loss = apply(r.detach(), w_p.sqrt(), w_q.sqrt()).square()
        zero = S - S.detach() + path - path.detach()
        if any(gp is not None for gp in phi_grads):
            zero = zero + inject_gradients(params, phi_grads) / zero.shape[0]
        return loss + spread(zero, loss)


def _phi_parameters(net: Any) -> list:
    """Parameters that want a gradient, except theta's (theta's pathwise part comes from <sg(a), x_t>)."""
    theta_ids = {id(p) for p in net.schedule_parameters()}
    return [p for p in net.parameters() if p.requires_grad and id(p) not in theta_ids]
