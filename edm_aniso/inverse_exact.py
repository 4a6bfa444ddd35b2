"""The exact error of ``edm_aniso.inverse.solve_inverse`` on Gaussian data (tests/test_inverse.py and
bench/inverse_gaussian.py).

With the exact denoiser of ``edm_aniso.gaussian`` and fixed corrector step sizes every step of the solver is affine in
its Gaussian draws, so its output law is Gaussian with moments (mu, C) computed exactly by
``gaussian.affine_sampler_moments`` (no Monte-Carlo error). The exact answer is the conditional law N(mu*, C*) of x
given K x = K x_true (``gaussian.gaussian_conditional``). The corrector runs at the deterministic-equivalent step
sizes of the snr rule (``gaussian.conditional_snr_step_sizes``). Reported, on the unknown component U = I - K:

    mean   ||U (mu - mu*)|| / sqrt(tr C*)        cov   ||U (C - C*) U||_F / ||C*||_F
"""

from __future__ import annotations

from typing import Any

import torch

from edm_aniso import gaussian as G
from edm_aniso import inverse as inv
from edm_aniso.path import noise_path


def exact_gap(net: Any, obs: inv.Observation, cov: torch.Tensor, x_true: torch.Tensor, steps: int, predictor: str,
              corrector_steps: int = 0, snr: float = 0.16, leak: bool = False) -> dict:
    """{'mean', 'cov' (module docstring), 'fd' (Fréchet distance to the exact law / tr C*), 'known_err' (max |K x - y|
    of the last output), 'nfe'} of one setting, for data N(0, ``cov``) of the shape of ``x_true`` [1, C, H, W].
    ``leak`` runs the corrector on the full score instead of the conditional score (an ablation: the known
    component's score then reaches the unknown one through the preconditioner)."""
    shape = tuple(x_true.shape[1:])
    dim = x_true[0].numel()
    y = obs.project(x_true)
    known = G.projector_matrix(obs.project, shape)
    mu_ex, cov_ex = G.gaussian_conditional(cov, known, y.reshape(-1))
    path = noise_path(net, None, y)
    lev = path.grid(steps)
    sub = G.projector_matrix(path.project, shape) if path.dims[0] else torch.zeros(dim, dim, dtype=torch.float64)
    eps = {i: G.conditional_snr_step_sizes(cov, torch.zeros_like(known) if leak else known, sub,
                                           float(lev.a[0, i]), float(lev.b[0, i]), snr) for i in range(steps)}
    outs = []

    def run(latents: torch.Tensor, randn_like: Any) -> torch.Tensor:
        out = inv.solve_inverse(net, obs, y.expand(latents.shape[0], *shape), latents, randn_like=randn_like,
                                num_steps=steps, predictor=predictor, corrector_steps=corrector_steps,
                                snr=snr if corrector_steps else None, corrector_step_size=eps.get)
        outs.append(out)
        return out
    original = inv.conditional_score
    if leak:
        inv.conditional_score = lambda den, path, observation: (
            lambda x, a, b: path.apply(den(x, a, b) - x, a.square().reciprocal(), b.square().reciprocal()))
    try:
        mu, cov_out = G.affine_sampler_moments(run, shape)
    finally:
        inv.conditional_score = original
    unknown = torch.eye(dim, dtype=torch.float64) - known
    return dict(mean=float((unknown @ (mu - mu_ex)).norm() / cov_ex.trace().sqrt()),
                cov=float((unknown @ (cov_out - cov_ex) @ unknown).norm() / cov_ex.norm()),
                fd=G.frechet_gaussians(mu, cov_out, mu_ex, cov_ex) / float(cov_ex.trace()),
                known_err=float((obs.project(outs[-1].detach()) - y).abs().max()),
                nfe=inv.network_evaluations(steps, predictor, corrector_steps))


__all__ = ['exact_gap']
