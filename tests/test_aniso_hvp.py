"""The finite-difference Hessian-vector product (edm_aniso.hvp) against the double backward, and the unbiased
--estimator-every (issue 11)."""

import pytest
import torch

from edm_aniso import hvp
from edm_aniso.loss import AnisoStage2Loss
from edm_aniso.precond import AnisoPrecond
from test_aniso_loss import TINY, Mixture, _batch, _grads, _net, _point

CIFAR = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
             channel_mult_noise=1, resample_filter=[1, 1], channel_mult=[2, 2, 2], dropout=0.13)


def _unit(shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    e = torch.randn(shape, generator=gen, dtype=dtype)
    return e / e.flatten(1).norm(dim=1).reshape(-1, *([1] * (len(shape) - 1)))


def _rel(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample relative error |u - v| / |v|."""
    return (u - v).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1)


def _cifar_net(cbase: int = 32) -> AnisoPrecond:
    """EDM's CIFAR-10 DDPM++ architecture (32 px, attention at 16 px, dropout 0.13) at model_channels=32, in train
    mode. The layers EDM initialises at (or near) zero, the last conv of each residual branch and the output conv,
    get He-scaled weights, so that the net is as nonlinear as a trained one can be (its Hessian is not ~0)."""
    torch.manual_seed(0)
    net = AnisoPrecond(32, 3, label_dim=0, stage=2, subspace='dct', model_channels=cbase, **CIFAR).train()
    with torch.no_grad():
        for p in net.model.parameters():
            if p.ndim > 1 and p.abs().max() < 1e-3:
                p.normal_(0, p[0].numel() ** -0.5)
        net.schedule_h.u.add_(0.3 * torch.randn_like(net.schedule_h.u))
    return net


# ----------------------------------------------------------------------------------------------------------------------


def test_rng_replay_repeats_dropout_masks_and_keeps_the_stream():
    torch.manual_seed(3)
    drop = torch.nn.Dropout(0.5).train()
    x = torch.ones(1000)
    rng = hvp.RngReplay(x.device)
    first = drop(x)
    after_first = torch.get_rng_state()
    with rng.replay():
        again = drop(x)
    assert torch.equal(first, again)                                  # same masks
    assert torch.equal(torch.get_rng_state(), after_first)            # the stream continues as if not replayed
    assert not torch.equal(drop(x), first)                            # a plain second call draws new masks


def test_fd_hvp_matches_autograd_on_float64_mixture():
    mix = Mixture(seed=2)
    x, b = _point(mix, 6, seed=4)
    gen = torch.Generator().manual_seed(5)
    g = torch.tensor([0.05, 0.3, 1.0, 2.0, 0.7, 4.0], dtype=torch.float64)
    h = torch.tensor([0.5, 0.1, 3.0, 0.2, 0.7, 1.5], dtype=torch.float64)
    flow = lambda z: mix.flow(z, g, h)                                 # noqa: E731
    xl = x.clone().requires_grad_(True)
    a = torch.autograd.grad((b * flow(xl)).sum(), xl, create_graph=True)[0]
    delta = hvp.fd_delta(x, torch.minimum(g, h).sqrt())
    for _ in range(3):
        e = _unit(x.shape, gen, torch.float64)
        exact = hvp.autograd_hvp(a, e, xl)
        assert exact.abs().max() > 1e-3                                # a real Hessian
        q = hvp.fd_hvp(lambda z: hvp.input_vjp(flow, z, b), x, a, e, delta)
        err = (q - exact).norm() / exact.norm()                        # over the batch (far from the means H ~ 0)
        assert err < 1e-5, float(err)


class _CifarPoint:
    """A noisy batch of 2 on the CIFAR-sized net at one noise level (h = g/2, 2g), dropout on: a = grad_x <b, f> with
    its graph, the double-backward and the fd HVP (default step, masks replayed) for any probe."""

    def __init__(self, net: AnisoPrecond, sigma: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
        g = torch.full((2,), sigma ** 2)
        h = g * torch.tensor([0.5, 2.0])
        self.net, self.g, self.h = net, g, h
        self.x = (y + net.subspace.apply(torch.randn(y.shape, generator=gen), g.sqrt(), h.sqrt())).requires_grad_(True)
        self.b = torch.randn(y.shape, generator=gen)
        self.e = _unit(y.shape, gen)
        self.flow = lambda z: net.flow(z, g, h)                        # noqa: E731
        self.rng = hvp.RngReplay(self.x.device)
        self.a = torch.autograd.grad(hvp.dot(self.b, self.flow(self.x)).sum(), self.x, create_graph=True)[0]
        self.delta = hvp.fd_delta(self.x, torch.minimum(g, h).sqrt())

    def exact(self, e: torch.Tensor) -> torch.Tensor:
        return hvp.autograd_hvp(self.a, e, self.x).detach()

    def fd(self, e: torch.Tensor) -> torch.Tensor:
        def vjp(z):
            with self.rng.replay():
                return hvp.input_vjp(self.flow, z, self.b, self.net.network_parameters())
        return hvp.fd_hvp(vjp, self.x, self.a, e, self.delta)


@pytest.mark.parametrize('sigma', [0.05, 2.0, 40.0])
def test_fd_hvp_on_cifar_sized_net(sigma):
    """The one-sided float32 difference against the double backward, dropout on: within 1e-2 relative (measured
    3e-3 to 4e-3 at sigma 0.05, 2 and 40: truncation and rounding balance there, so the issue's 1e-3 is out of a
    one-sided float32 difference's reach on this net). Without replaying the dropout masks it is useless."""
    pt = _CifarPoint(_cifar_net(), sigma, seed=1)
    exact, q = pt.exact(pt.e), pt.fd(pt.e)
    err = float((q - exact).norm() / exact.norm())
    assert err < 1e-2, err
    fresh = hvp.fd_hvp(lambda z: hvp.input_vjp(pt.flow, z, pt.b, pt.net.network_parameters()), pt.x, pt.a, pt.e,
                       pt.delta)                                       # new masks in the second call
    assert float((fresh - exact).norm() / exact.norm()) > 0.5


# ----------------------------------------------------------------------------------------------------------------------
# Stage-2 gradients with fd against autograd.


def _stage2_grads(net, hvp_name: str, y, labels, t, eps, probes, **kw):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(7)                                               # the same dropout masks for both
    loss = AnisoStage2Loss(hvp=hvp_name, **kw).compute(net, y, labels, t, eps, probe_noise=probes, estimator=True)
    loss.sum().backward()
    flat = lambda ps: torch.cat([g.flatten() for g in _grads(ps)])    # noqa: E731
    return loss.detach(), flat(net.network_parameters()), flat(net.schedule_parameters())


def _theta_estimator_part(net, y, labels, t, eps, probes, hvp_name: str, **kw):
    """The theta-gradient of the surrogate alone (iii): estimator on minus estimator off."""
    _, _, on = _stage2_grads(net, hvp_name, y, labels, t, eps, probes, **kw)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    AnisoStage2Loss(hvp=hvp_name, **kw).compute(net, y, labels, t, eps, estimator=False).sum().backward()
    return on - torch.cat([g.flatten() for g in _grads(net.schedule_parameters())])


@pytest.mark.parametrize('fused', [True, False])
def test_stage2_gradients_fd_match_autograd(fused):
    """Tiny net with dropout: same loss, phi- and theta-gradients with hvp=fd as with the double backward (1e-3
    relative), and the surrogate's own theta-gradient (iii), where the HVP enters, to 1e-2."""
    torch.manual_seed(0)
    net = AnisoPrecond(8, 3, stage=2, subspace='dct', **dict(TINY, dropout=0.2)).train()
    with torch.no_grad():
        for p in net.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.schedule_h.u.add_(0.3 * torch.randn_like(net.schedule_h.u))
    y, labels, t, eps, probes = _batch()
    out = {name: _stage2_grads(net, name, y, labels, t, eps, probes, fused=fused) for name in ('autograd', 'fd')}
    assert torch.equal(out['fd'][0], out['autograd'][0])
    for i in (1, 2):
        err = float((out['fd'][i] - out['autograd'][i]).norm() / out['autograd'][i].norm())
        assert err < 1e-3, (i, err)
    part = {name: _theta_estimator_part(net, y, labels, t, eps, probes, name, fused=fused)
            for name in ('autograd', 'fd')}
    assert part['autograd'].norm() > 1e-3 * out['autograd'][2].norm()  # the surrogate matters
    assert float((part['fd'] - part['autograd']).norm() / part['autograd'].norm()) < 1e-2


def test_stage2_gradients_fd_match_autograd_on_cifar_sized_net():
    """The CIFAR-sized net (dropout on), batch 2 at t = 30 and 2000: phi- and theta-gradients to 1e-3."""
    net = _cifar_net()
    gen = torch.Generator().manual_seed(2)
    y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    t = torch.tensor([30.0, 2000.0])
    eps = torch.randn(y.shape, generator=gen)
    probes = torch.randn(1, *y.shape, generator=gen)
    out = {name: _stage2_grads(net, name, y, None, t, eps, probes) for name in ('autograd', 'fd')}
    for i in (1, 2):
        err = float((out['fd'][i] - out['autograd'][i]).norm() / out['autograd'][i].norm())
        assert err < 1e-3, (i, err)


# ----------------------------------------------------------------------------------------------------------------------
# --estimator-every=k: unbiased, and no estimator graph on the off steps.


def _theta_grad_per_step(loss_fn, net, steps: int, seed: int) -> torch.Tensor:
    """theta-gradient [steps, n_theta] of ``steps`` consecutive training steps (begin_step schedule) on one batch,
    time and noise: what varies between steps is the Hutchinson probe and whether the estimator runs."""
    y, labels, t, eps, _ = _batch(2, seed=4)
    theta = net.schedule_parameters()
    rows = []
    torch.manual_seed(seed)
    for step in range(steps):
        loss_fn.begin_step(step)
        net.zero_grad(set_to_none=True)
        loss_fn.compute(net, y, labels, t, eps).sum().backward()
        rows.append(torch.cat([g.flatten() for g in _grads(theta)]))
    return torch.stack(rows)


def test_estimator_every_k_is_unbiased():
    """Mean theta-gradient over many steps: every 4th step (the surrogate scaled by 4) within 3 s.e. of every step,
    on the components the surrogate moves; the unscaled every-4 (the old behaviour) is far off there."""
    net = _net(2, subspace='dct')
    with torch.no_grad():
        net.schedule_h.u.add_(0.3 * torch.randn_like(net.schedule_h.u))
    k, groups = 4, 24
    every = _theta_grad_per_step(AnisoStage2Loss(), net, k * groups, seed=1)
    sparse = _theta_grad_per_step(AnisoStage2Loss(estimator_every=k), net, k * groups, seed=2)
    off = _theta_grad_per_step(AnisoStage2Loss(estimator_every=k), net, 2, seed=3)[1]   # a step without: (i) + (ii)
    unit = sparse.reshape(groups, k, -1).mean(dim=1)                    # k consecutive steps: independent units
    m_every, m_sparse = every.mean(0), unit.mean(0)
    se = (every.var(0) / every.shape[0] + unit.var(0) / groups).sqrt()
    strong = (m_every - off).abs() > 4 * se                             # where the test has power
    assert strong.sum() >= 5
    z = ((m_sparse - m_every) / se)[strong]
    assert z.abs().max() < 3.5, z                                       # the max of a few |N(0, 1)|
    assert z.abs().median() < 2.0, z
    z_old = ((off + (m_sparse - off) / k - m_every) / se)[strong]      # every-k without the factor k
    assert z_old.abs().median() > 3, z_old


def test_off_steps_build_no_estimator_graph(monkeypatch):
    """Off steps of --estimator-every call no autograd.grad (no VJP, no create_graph, no second network call)."""
    net = _net(2, subspace='dct')
    y, labels, t, eps, probes = _batch()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, 'grad', lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    loss_fn = AnisoStage2Loss(estimator_every=4)
    for step, expect in ((1, 0), (2, 0), (0, 2)):                       # active: the VJP and the fd's input VJP
        calls.clear()
        loss_fn.begin_step(step)
        loss_fn(net, y, labels).sum().backward()
        assert len(calls) == expect, (step, calls)
        assert not any(kw.get('create_graph') for kw in calls)


def test_fd_checkpointed_second_call_gives_the_same_gradients():
    """fd_checkpoint recomputes blocks of the second call in its backward, replaying their dropout masks."""
    torch.manual_seed(0)
    net = AnisoPrecond(8, 3, stage=2, subspace='dct', **dict(TINY, dropout=0.2)).train()
    with torch.no_grad():
        for p in net.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y, labels, t, eps, probes = _batch()
    plain = _stage2_grads(net, 'fd', y, labels, t, eps, probes, fd_checkpoint=0)
    ckpt = _stage2_grads(net, 'fd', y, labels, t, eps, probes, fd_checkpoint=2)
    blocks = [m for m in net.model.modules() if type(m).__name__ == 'UNetBlock']
    assert len(blocks) > 2 and all('forward' not in vars(m) for m in blocks)   # restored afterwards
    for u, v in zip(plain[1:], ckpt[1:]):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-9)


def test_loss_checks_hvp_option():
    with pytest.raises(ValueError):
        AnisoStage2Loss(hvp='forward')
    with pytest.raises(ValueError):
        AnisoStage2Loss(fd_checkpoint=-1)
    assert AnisoStage2Loss().hvp == 'fd'
