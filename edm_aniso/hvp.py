"""Hessian-vector products for the theta-gradient estimator (method.md §5, wiring step (2)).

With a(x) = grad_x <b, f(x)> (b fixed), step (2) needs q = grad_x <a, e> = H_x<b, f> e for a unit probe e per sample.
Two ways, chosen by ``--hvp``:

- ``autograd`` (the reference): a is computed with create_graph=True and q by a second backward through that graph
  (double backward). Exact, but it keeps the forward graph, the graph of the VJP and the double backward alive.
- ``fd`` (the default): a one-sided difference of the VJP, q ~ (a(x + delta e) - a(x)) / delta. a(x) comes from a
  plain backward (no create_graph; the forward graph is freed at once) and a(x + delta e) from a second forward and an
  input-only backward of the same network, with the same randomness (dropout masks): ``RngReplay``.

Step rule (``fd_delta``): per sample, delta = c * sqrt(eps_mach) * sqrt(d) * s with s = max(rms(x), sigma_min),
sigma_min = sqrt(min(g, h)) the smaller noise level of the sample, d the dimension and eps_mach the machine epsilon of
x's dtype. So each coordinate moves by about c * sqrt(eps_mach) * s: above the rounding of x (|x_i| <~ s) and small
against the scale sigma_min on which the flow bends. The one-sided difference then has truncation error
O(delta) and rounding error O(eps_mach / delta), both ~ sqrt(eps_mach) relative. c = ``FD_SCALE`` = 1 minimised the
error on the CIFAR-10 DDPM++ architecture of tests/test_aniso_hvp.py (float32, dropout on, output layers at full
scale): 3e-3 to 4e-3 relative per probe at sigma 0.05, 2 and 40, against about 1e-2 at c = 0.3 and 6e-3 at c = 3; on
the float64 mixture it is below 1e-6. That per-probe error is far below the Hutchinson probe's own spread, and its
leading (truncation) part (delta/2) T[e, e] is even in e, so it adds nothing to the mean of T1 = d/2 <q, A e> to
first order. (A central difference around x reached 3e-4 at c = 10 in the same test, but it needs either a third
network call or the regression term evaluated at x - delta e / 2, which moved phi's gradient by 4e-3 to 5e-2.)
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, Sequence

import torch

FD_SCALE = 1.0          # c of the step rule above.
FD_CHECKPOINT = 3       # residual blocks of the second call run under activation checkpointing (memory).
HVP_METHODS = ('fd', 'autograd')


def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over all but the first dimension."""
    return (u * v).flatten(1).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Replaying the randomness of a network call.


class RngReplay:
    """Snapshot of the default CPU generator and of ``device``'s CUDA generator (if any), taken at construction.

    ``with rng.replay(): ...`` runs the block from the snapshot (so dropout draws the same masks as the call that
    followed the snapshot) and afterwards puts back the generator states found on entry, so the replayed call leaves
    the random stream of the rest of the step untouched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == 'cuda' else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        cpu_now = torch.get_rng_state()
        cuda_now = torch.cuda.get_rng_state(self.device) if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            torch.set_rng_state(cpu_now)
            if cuda_now is not None:
                torch.cuda.set_rng_state(cuda_now, self.device)


@contextlib.contextmanager
def frozen(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Turn off requires_grad of ``params`` inside the block (so a forward saves nothing for their gradients)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _checkpointed_forward(forward: Callable, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


@contextlib.contextmanager
def checkpoint_blocks(model: torch.nn.Module, count: int) -> Iterator[None]:
    """Inside the block, the first ``count`` residual blocks of ``model`` (modules of class ``UNetBlock``, in
    registration order: SongUNet's encoder starts at full resolution, where activations are largest) run under
    activation checkpointing: their forward keeps only its inputs and is recomputed, with the same random numbers,
    during the backward. Trades one more forward of those blocks for their activations."""
    blocks = [m for m in model.modules() if type(m).__name__ == 'UNetBlock'][:max(int(count), 0)]
    for m in blocks:
        m.forward = functools.partial(_checkpointed_forward, m.forward)
    try:
        yield
    finally:
        for m in blocks:
            del m.forward                                              # back to the class's forward


# ----------------------------------------------------------------------------------------------------------------------
# The two Hessian-vector products.


def autograd_hvp(a: torch.Tensor, e: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
    """q = grad_x <a, e> by double backward; a must carry its create_graph graph. None (zero) where a's graph does
    not reach x (a flow linear in x: a then depends only on the parameters)."""
    return torch.autograd.grad(dot(a, e).sum(), x, retain_graph=True, allow_unused=True)[0]


def fd_delta(x: torch.Tensor, sigma_min: torch.Tensor, scale: float = FD_SCALE) -> torch.Tensor:
    """Per-sample step delta [B] of the one-sided difference for unit probes (the step rule of the module docstring).

    x [B, ...]: the point; sigma_min [B]: sqrt(min(g, h)) of each sample."""
    flat = x.detach().flatten(1)
    d = flat.shape[1]
    eps = torch.finfo(x.dtype).eps
    rms = flat.square().mean(dim=1).sqrt()
    s = torch.maximum(rms, sigma_min.detach().to(rms.dtype))
    return scale * (eps ** 0.5) * (d ** 0.5) * s


def fd_hvp(vjp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, a: torch.Tensor, e: torch.Tensor,
           delta: torch.Tensor) -> torch.Tensor:
    """q ~ (vjp(x + delta e) - a) / delta per sample, with a = vjp(x) already computed.

    vjp(x') must return grad_x' <b, f(x')> for the same b and the same randomness as a (see ``RngReplay``)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    d = delta.detach().to(x.dtype).reshape(shape)
    a2 = vjp((x.detach() + d * e.detach()).requires_grad_(True))
    return (a2.detach() - a.detach()) / d


def input_vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, b: torch.Tensor,
              params: Sequence[torch.nn.Parameter] = ()) -> torch.Tensor:
    """grad_x <b, fn(x)> without create_graph, the parameters ``params`` frozen during the call (their gradients are
    not wanted, so no weight-gradient kernels run in the backward)."""
    with torch.enable_grad(), frozen(params):
        out = fn(x)
        return torch.autograd.grad(dot(b, out).sum(), x)[0]
