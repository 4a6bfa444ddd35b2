"""Row-masked Adam for class banks of schedules (method.md §2, §5).

The reference runs one Adam per class and steps it only when the class occurs in the batch. ``RowMaskedAdam`` does
the same for a bank parameter [R, ...] in one optimizer: every row has its own step counter and moments, and a row is
updated only when it is *present*. Presence is either given explicitly (``step(present=...)``, a bool tensor [R] per
parameter or one shared by all) or, by default, taken from the gradient: a row is present iff its (all-reduced) gradient
row has a nonzero entry. Since a row's gradient comes only from the samples of its classes, with gradients averaged over
the global batch this is "the class occurs in the global batch" (barring an exactly zero gradient). Parameters with
fewer than two dimensions are treated as one row.

The update of a present row is torch.optim.Adam's (no weight decay, no amsgrad) with that row's step count.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

Presence = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


class RowMaskedAdam(torch.optim.Optimizer):
    """Adam with per-row step counters; absent rows keep their parameters and moments untouched."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if not lr >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps >= 0:
            raise ValueError(f'RowMaskedAdam: invalid lr={lr}, betas={betas} or eps={eps}')
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @staticmethod
    def _rows(p: torch.Tensor) -> torch.Tensor:
        return p.reshape(p.shape[0], -1) if p.ndim >= 2 else p.reshape(1, -1)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, present: Presence = None) -> Any:
        """One step. present: None (rows with a nonzero gradient), a bool tensor [R] for every parameter, or a list
        with one entry per parameter (in param-group order)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                mask = present[index] if isinstance(present, (list, tuple)) else present
                index += 1
                if p.grad is None:
                    continue
                grad = self._rows(p.grad)
                if mask is None:
                    mask = (grad != 0).any(dim=1)
                mask = torch.as_tensor(mask, dtype=torch.bool, device=p.device).flatten()
                if mask.shape[0] != grad.shape[0]:
                    raise ValueError(f'presence mask has {mask.shape[0]} rows, parameter has {grad.shape[0]}')
                state = self.state[p]
                if not state:
                    state['step'] = torch.zeros(grad.shape[0], dtype=torch.float32, device=p.device)
                    state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state['step'].device != p.device:
                    # Optimizer.load_state_dict keeps 'step' where it was saved (our states load on the CPU).
                    state['step'] = state['step'].to(p.device)
                if not bool(mask.any()):
                    continue
                rows = mask.nonzero().flatten()
                m, v = self._rows(state['exp_avg']), self._rows(state['exp_avg_sq'])
                data = self._rows(p)
                g_r = grad[rows]
                step = state['step'][rows] + 1
                state['step'][rows] = step
                m_r = m[rows].mul(beta1).add_(g_r, alpha=1 - beta1)
                v_r = v[rows].mul(beta2).addcmul_(g_r, g_r, value=1 - beta2)
                bc1 = (1 - beta1 ** step.double()).to(p.dtype).unsqueeze(1)
                bc2 = (1 - beta2 ** step.double()).to(p.dtype).unsqueeze(1)
                denom = (v_r.sqrt() / bc2.sqrt()).add_(group['eps'])
                m[rows], v[rows] = m_r, v_r
                data[rows] = data[rows] - group['lr'] * (m_r / bc1) / denom
                if data.data_ptr() != p.data_ptr():   # reshape made a copy (non-contiguous parameter)
                    p.copy_(data.reshape(p.shape))
        return loss
