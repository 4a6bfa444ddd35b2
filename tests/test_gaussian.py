"""edm_aniso.gaussian oracles: the mixture denoiser is Tweedie's posterior mean; the exact solve's gain."""

import torch

from edm_aniso import gaussian as G


def test_mixture_denoiser_is_tweedie():
    """D = x + M grad log p(x) for p = sum_j N(mu_j, Lambda + M)/J, by autograd in DCT coordinates, per sample and
    with per-coefficient noise (an anisotropic M)."""
    gen = torch.Generator().manual_seed(0)
    lam = G.power_law_variances(2, 4)
    means = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=gen) * lam.sqrt()
    dist = G.DCTGaussianMixture(means, 0.4 * lam)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    m = torch.rand(3, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 + 0.01
    var = 0.4 * lam + m
    logp = torch.logsumexp(-0.5 * ((x[:, None] - means[None]) ** 2 / var[:, None] + var[:, None].log()).flatten(2)
                           .sum(-1), dim=1)
    grad, = torch.autograd.grad(logp.sum(), x)
    expect = x + m * grad
    assert torch.allclose(dist.denoise_dct(x.detach(), m), expect.detach(), rtol=1e-10, atol=1e-12)


def test_exact_denoised_gain_solves_the_ode():
    """The gain is the product of many tiny exact per-coefficient ODE steps followed by the denoiser."""
    lam = G.power_law_variances(1, 4)
    mask = G.low_block_mask(4)
    a = torch.logspace(torch.log10(torch.tensor(80.0)).item(), -0.5, 20001, dtype=torch.float64)
    b = a * torch.exp(0.2 * torch.sin(torch.log(a)))
    s = torch.where(mask.bool()[..., None], a, b)                      # [4, 4, K] levels per coefficient
    lam3 = lam[0][..., None]
    rate = s / (lam3 + s ** 2)                                         # d ln x / ds
    x = s[..., 0] * torch.exp(torch.trapezoid(rate, s, dim=-1))
    d = lam[0] / (lam[0] + s[..., -1] ** 2) * x
    gain = G.exact_denoised_gain(lam[0], mask, (a[0], b[0]), (a[-1], b[-1]))
    assert torch.allclose(gain, d, rtol=1e-6)


def test_frechet_samples_matches_the_sqrtm_formula():
    import numpy as np
    import scipy.linalg
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = 0.8 * x.roll(1, dims=0) + 0.5 * torch.randn(300, 2, 4, 4, dtype=torch.float64, generator=gen) + 0.1
    a, b = x.reshape(300, -1).numpy(), y.reshape(300, -1).numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(ca @ cb))
    expect = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root))
    assert abs(G.frechet_samples(x, y) - expect) <= 1e-9 * expect
    assert abs(G.frechet_samples(x, x)) < 1e-9
