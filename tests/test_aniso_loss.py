"""Stage-1/stage-2 losses and the theta-gradient estimator (method.md §5, §9.5, §9.7, §9.9)."""

import copy
import os

import pytest
import torch

from edm_aniso.loss import AnisoStage1Loss, AnisoStage2Loss, theta_surrogate
from edm_aniso.precond import AnisoPrecond
from edm_aniso.schedule import KnotSchedule

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)

# ----------------------------------------------------------------------------------------------------------------------
# A 5-D Gaussian mixture with closed-form score: p_t = sum_k pi_k N(mu_k, Sigma_k + M_t), M = g P + h (I - P).


class Mixture:
    def __init__(self, dim: int = 5, comps: int = 3, rank: int = 2, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        dt = torch.float64
        self.dim = dim
        self.log_pi = torch.log_softmax(torch.randn(comps, generator=gen, dtype=dt), 0)
        self.mu = torch.randn(comps, dim, generator=gen, dtype=dt)
        L = torch.randn(comps, dim, dim, generator=gen, dtype=dt) * 0.5
        self.sigma = L @ L.transpose(1, 2) + 0.1 * torch.eye(dim, dtype=dt)
        Q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=dt))
        self.P = Q @ Q.T

    def apply(self, v: torch.Tensor, a, b) -> torch.Tensor:
        """a P v + b (I - P) v for v [B, dim], a, b scalars or [B]."""
        a = a.reshape(-1, 1) if torch.is_tensor(a) and a.ndim else a
        b = b.reshape(-1, 1) if torch.is_tensor(b) and b.ndim else b
        pv = v @ self.P
        return a * pv + b * (v - pv)

    def log_p(self, x: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=x.dtype)
        M = g.reshape(-1, 1, 1) * self.P + h.reshape(-1, 1, 1) * (eye - self.P)
        C = self.sigma.unsqueeze(0) + M.unsqueeze(1)                      # [B, K, d, d]
        diff = x.unsqueeze(1) - self.mu.unsqueeze(0)                      # [B, K, d]
        sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)
        quad = (diff * sol).sum(-1)
        logdet = torch.linalg.slogdet(C)[1]
        return torch.logsumexp(self.log_pi - 0.5 * quad - 0.5 * logdet, dim=1)

    def flow(self, x: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """f* = M^(1/2) grad_x log p_t, differentiable in x (create_graph) and in g, h."""
        if not x.requires_grad:
            x = x.requires_grad_(True)
        s = torch.autograd.grad(self.log_p(x, g, h).sum(), x, create_graph=True)[0]
        return self.apply(s, g.sqrt(), h.sqrt())


def _point(mix: Mixture, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, mix.dim, generator=gen, dtype=torch.float64) * 1.5
    b = torch.randn(batch, mix.dim, generator=gen, dtype=torch.float64)
    return x, b


def _surrogate(mix: Mixture, x: torch.Tensor, b: torch.Tensor, g: torch.Tensor, h: torch.Tensor, **kw) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    f = mix.flow(x, g.detach(), h.detach())
    return theta_surrogate(x, f, b, mix.apply, g, h, **kw)


def _bf(mix: Mixture, x: torch.Tensor, b: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """<b, f*(x; M)> per sample at fixed x."""
    return (b * mix.flow(x.detach().clone(), g, h)).sum(1).detach()


def test_estimator_matches_finite_difference_for_A_equal_P():
    mix = Mixture()
    x, b = _point(mix, 6)
    g = torch.tensor([0.05, 0.3, 1.0, 2.0, 0.7, 4.0], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.5, 0.1, 3.0, 0.2, 0.7, 1.5], dtype=torch.float64)
    grad = torch.autograd.grad(_surrogate(mix, x, b, g, h, exact_trace=True).sum(), g)[0]
    delta = 1e-5
    fd = (_bf(mix, x, b, g.detach() + delta, h) - _bf(mix, x, b, g.detach() - delta, h)) / (2 * delta)
    assert fd.abs().min() > 1e-3                 # the derivative is not trivially zero
    assert torch.allclose(grad, fd, rtol=1e-3, atol=0)


def test_estimator_matches_finite_difference_for_knot_parameters():
    mix = Mixture(seed=3)
    x, b = _point(mix, 4, seed=5)
    torch.manual_seed(0)
    sg, sh = KnotSchedule(dtype=torch.float64), KnotSchedule(dtype=torch.float64)
    with torch.no_grad():
        sg.u.add_(0.3 * torch.randn_like(sg.u))
        sh.u.add_(0.3 * torch.randn_like(sh.u))
    t = sg.inverse(torch.tensor([0.1, 0.5, 2.0, 5.0], dtype=torch.float64)).detach()
    g, _ = sg(t)
    h, _ = sh(t)
    S = _surrogate(mix, x, b, g, h, exact_trace=True).sum()
    grad_g, grad_h = torch.autograd.grad(S, [sg.u, sh.u])
    delta = 1e-5
    for sched, grad in [(sg, grad_g), (sh, grad_h)]:
        for j in (10, 18, 25):
            vals = []
            for sign in (1, -1):
                with torch.no_grad():
                    sched.u[0, j] += sign * delta
                    gg, _ = sg(t)
                    hh, _ = sh(t)
                    sched.u[0, j] -= sign * delta
                vals.append(_bf(mix, x, b, gg, hh).sum())
            fd = (vals[0] - vals[1]) / (2 * delta)
            assert abs(fd) > 1e-6
            assert abs(grad[0, j] - fd) <= 1e-3 * abs(fd), (j, float(grad[0, j]), float(fd))


def test_hutchinson_trace_is_unbiased():
    mix = Mixture(seed=7)
    x1, b1 = _point(mix, 1, seed=2)
    g0, h0 = torch.tensor([0.4], dtype=torch.float64), torch.tensor([1.3], dtype=torch.float64)
    g = g0.clone().requires_grad_(True)
    exact = torch.autograd.grad(_surrogate(mix, x1, b1, g, h0, exact_trace=True).sum(), g)[0]
    n = 4000
    gs = g0.repeat(n).requires_grad_(True)
    torch.manual_seed(11)
    per = torch.autograd.grad(_surrogate(mix, x1.repeat(n, 1), b1.repeat(n, 1), gs, h0.repeat(n)).sum(), gs)[0]
    se = per.std() / n ** 0.5
    assert per.std() > 1e-6                     # the probe really is random
    assert abs(per.mean() - exact[0]) <= 3 * se
    # Several probes per sample average: a smaller spread around the same mean.
    gs2 = g0.repeat(n).requires_grad_(True)
    per4 = torch.autograd.grad(_surrogate(mix, x1.repeat(n, 1), b1.repeat(n, 1), gs2, h0.repeat(n), probes=4).sum(),
                               gs2)[0]
    assert per4.std() < 0.75 * per.std()
    assert abs(per4.mean() - exact[0]) <= 3 * per4.std() / n ** 0.5


def test_surrogate_is_zero_valued_and_gives_no_network_gradient():
    mix = Mixture(seed=4)
    x, b = _point(mix, 3, seed=9)
    phi = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)      # a stand-in "network" weight
    g = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([1.0, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
    xl = x.clone().requires_grad_(True)
    f = phi * mix.flow(xl, g.detach(), h.detach())
    S = theta_surrogate(xl, f, b, mix.apply, g, h, exact_trace=True)
    total = (S - S.detach()).sum()
    assert total.item() == 0.0
    d_phi, d_g, d_h = torch.autograd.grad(total, [phi, g, h], allow_unused=True)
    assert d_phi is None or d_phi.abs().item() == 0.0
    assert d_g.abs().min() > 0 and d_h.abs().min() > 0
    # Same theta-gradient as the finite difference of <b, f*> in g.
    delta = 1e-5
    fd = (_bf(mix, x, b, g.detach() + delta, h.detach()) - _bf(mix, x, b, g.detach() - delta, h.detach())) / (2 * delta)
    assert torch.allclose(d_g, fd, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# The losses on a tiny network.


def _net(stage: int = 1, label_dim: int = 0, seed: int = 0, **kw) -> AnisoPrecond:
    torch.manual_seed(seed)
    net = AnisoPrecond(8, 3, label_dim=label_dim, stage=stage, **TINY, **kw)
    with torch.no_grad():   # the output layer starts at ~1e-5 scale; make the net's output matter
        for p in net.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _batch(n: int = 4, label_dim: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.rand(n, generator=gen) * 6400
    eps = torch.randn(n, 3, 8, 8, generator=gen)
    probes = torch.randn(1, n, 3, 8, 8, generator=gen)
    labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return y, labels, t, eps, probes


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_stage1_loss_is_the_weighted_denoising_error():
    net = _net(1)
    y, labels, t, eps, _ = _batch()
    loss = AnisoStage1Loss(kappa=0.5).compute(net, y, labels, t, eps)
    with torch.no_grad():
        g, g_dot = net.schedule_g(t)
        D = net(y + g.sqrt().reshape(-1, 1, 1, 1) * eps, g.sqrt())
        expect = g_dot ** 2 / (g ** 2 * (g + 0.5)) * (D - y).square().flatten(1).sum(1)
    assert torch.allclose(loss.flatten(1).sum(1), expect, rtol=1e-5)


@pytest.mark.parametrize('subspace', ['iso', 'dct'])
def test_stage2_loss_forms_agree(subspace):
    """||W^1/2 (f + eps)||^2 = sum_k g_k_dot^2 / (g_k^2 (g_k + kappa)) ||P_k (D - x0)||^2 (method.md §5)."""
    net = _net(2, subspace=subspace)
    with torch.no_grad():
        net.schedule_h.u.add_(0.5 * torch.randn_like(net.schedule_h.u))
    y, labels, t, eps, _ = _batch()
    loss = AnisoStage2Loss(kappa=2.0).compute(net, y, labels, t, eps, estimator=False)
    with torch.no_grad():
        g, gd, h, hd = net.schedules(t)
        x_t = y + net.subspace.apply(eps, g.sqrt(), h.sqrt())
        err = net(x_t, g=g, h=h) - y
        p_err = net.subspace.project(err)
        wp, wq = gd ** 2 / (g ** 2 * (g + 2)), hd ** 2 / (h ** 2 * (h + 2))
        expect = wp * p_err.square().flatten(1).sum(1) + wq * (err - p_err).square().flatten(1).sum(1)
    assert torch.allclose(loss.flatten(1).sum(1), expect, rtol=1e-4)


def test_stage2_surrogate_adds_zero_value_and_only_theta_gradient():
    """Estimator on/off: same value, same phi-gradient, different theta-gradient; the fused backward (phi and
    pathwise gradients from the estimator's own VJP) gives the plain wiring's gradients."""
    net = _net(2, subspace='dct')
    y, labels, t, eps, probes = _batch()
    out = {}
    for key, est, fused in [('off', False, True), ('plain', True, False), ('fused', True, True)]:
        net.zero_grad(set_to_none=True)
        loss = AnisoStage2Loss(fused=fused).compute(net, y, labels, t, eps, probe_noise=probes, estimator=est)
        loss.sum().backward()
        out[key] = (loss.detach(), _grads(net.network_parameters()), _grads(net.schedule_parameters()))
    for key in ('plain', 'fused'):
        assert torch.equal(out[key][0], out['off'][0])                      # surrogate value is exactly 0
        for a, b in zip(out[key][1], out['off'][1]):                        # phi: no surrogate gradient
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
        diff = sum((a - b).abs().sum() for a, b in zip(out[key][2], out['off'][2]))
        assert diff > 0                                                     # theta: the surrogate contributes
    for a, b in zip(out['fused'][2], out['plain'][2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-10)


def test_flow_linear_in_x_has_no_hessian_term():
    """A flow linear in x (stand-in: f = -w x with a parameter w) gives a = grad_x <b, f> that needs grad (through w)
    but whose graph misses x: T1 is zero, in the surrogate itself and in the fused and plain stage-2 losses."""
    mix = Mixture()
    x, b = _point(mix, 3)
    x.requires_grad_(True)
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.5, 0.2, 1.5], dtype=torch.float64)
    f = -w * x
    a = torch.autograd.grad((b * f).sum(), x, create_graph=True)[0]
    assert a.requires_grad
    ref = theta_surrogate(x, f, b, mix.apply, g, h, a=a.detach())          # detached a: T1 skipped
    for kw in (dict(probes=2), dict(exact_trace=True)):
        S = theta_surrogate(x, f, b, mix.apply, g, h, a=a, **kw)
        assert torch.equal(S.detach(), ref.detach())

    net = _net(2, subspace='dct')
    net.lin = torch.nn.Parameter(torch.tensor(0.7))
    net.flow = lambda x_t, g_, h_, labels, basis_id=None, augment_labels=None: -net.lin * x_t   # noqa: E731
    y, labels, t, eps, probes = _batch()
    out = {}
    for fused in (True, False):
        net.zero_grad(set_to_none=True)
        loss = AnisoStage2Loss(fused=fused).compute(net, y, labels, t, eps, probe_noise=probes, estimator=True)
        loss.sum().backward()
        out[fused] = _grads([net.lin] + net.schedule_parameters())
    for p, q in zip(out[True], out[False]):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-10)
    assert out[True][0].abs() > 0


@pytest.mark.parametrize('stage', [1, 2])
def test_smoke_step_updates_and_ema_keeps_raw_schedules(stage):
    from training.training_loop import update_ema
    net = _net(stage, subspace='dct' if stage == 2 else 'iso')
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = AnisoStage1Loss() if stage == 1 else AnisoStage2Loss()
    y, labels, _, _, _ = _batch()
    loss = loss_fn(net, y, labels)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    theta, phi = net.schedule_parameters(), net.network_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in theta)
    assert sum(p.grad.abs().sum() for p in phi if p.grad is not None) > 0
    opt_phi = torch.optim.Adam(phi, lr=1e-3)
    opt_theta = torch.optim.Adam(theta, lr=1e-2)
    before = [p.detach().clone() for p in theta]
    opt_phi.step()
    opt_theta.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, theta))
    update_ema(ema, net, 0.9, net.ema_raw_prefixes)
    for (name, pe), (_, pn) in zip(ema.named_parameters(), net.named_parameters()):
        if name.startswith(('schedule_g.', 'schedule_h.')):
            assert torch.equal(pe, pn), name                                # raw theta in the EMA copy
    w_net, w_ema = net.model.enc['8x8_conv'].weight, ema.model.enc['8x8_conv'].weight
    assert not torch.equal(w_net, w_ema)                                    # phi is averaged


@pytest.mark.parametrize('stage', [1, 2])
def test_class_bank_uses_each_samples_own_row(stage):
    """A class-1 batch with a bank (row 1 perturbed) equals the single-row net holding row 1's schedule."""
    bank = _net(stage, label_dim=3, per_class=True)
    single = _net(stage, label_dim=3)
    single.model.load_state_dict(bank.model.state_dict())
    with torch.no_grad():
        for s in {id(bank.schedule_g): bank.schedule_g, id(bank.schedule_h): bank.schedule_h}.values():
            s.u[1].add_(torch.linspace(-1, 1, s.u.shape[1]))
        single.schedule_g.u.copy_(bank.schedule_g.u[1:2])
        single.schedule_h.u.copy_(bank.schedule_h.u[1:2])
    y, _, t, eps, probes = _batch()
    labels = torch.eye(3)[[1, 1, 1, 1]]
    loss_fn = AnisoStage1Loss() if stage == 1 else AnisoStage2Loss()
    kw = {} if stage == 1 else dict(probe_noise=probes, estimator=True)
    a = loss_fn.compute(bank, y, labels, t, eps, **kw)
    b = loss_fn.compute(single, y, labels, t, eps, **kw)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)
    c = loss_fn.compute(bank, y, torch.eye(3)[[0, 0, 0, 0]], t, eps, **kw)
    assert not torch.allclose(a.sum(), c.sum(), rtol=1e-3)                  # class 0's row gives another loss


@pytest.mark.parametrize('stage,hvp,rtol', [(1, None, 1e-4), (2, 'autograd', 1e-4), (2, 'fd', 3e-3)])
def test_gradients_independent_of_accumulation_and_class_split(stage, hvp, rtol):
    """Per-sample sums: a batch of 4 equals two rounds of 2 (also split by class), after dividing by 4. The fd HVP
    differs between batch sizes by its float32 rounding (~1e-3 of T1), hence its looser tolerance."""
    net = _net(stage, label_dim=2, per_class=True, **({'subspace': 'dct'} if stage == 2 else {}))
    y, labels, t, eps, probes = _batch(4, label_dim=2)
    loss_fn = AnisoStage1Loss() if stage == 1 else AnisoStage2Loss(hvp=hvp)
    kw = lambda idx: {} if stage == 1 else dict(probe_noise=probes[:, idx], estimator=True)   # noqa: E731
    params = list(net.parameters())

    def run(splits):
        net.zero_grad(set_to_none=True)
        for idx in splits:
            idx = torch.tensor(idx)
            loss_fn.compute(net, y[idx], labels[idx], t[idx], eps[idx], **kw(idx)).sum().div(4).backward()
        return _grads(params)

    full = run([[0, 1, 2, 3]])
    for split in ([[0, 1], [2, 3]], [[0, 2], [1, 3]]):   # labels alternate: the second split is by class
        for a, b in zip(full, run(split)):
            assert torch.allclose(a, b, rtol=rtol, atol=1e-10)


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = _net(2, subspace='dct')
    y, labels, t, eps, probes = _batch(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)   # linear in the gradients: no Adam amplification of rounding
    loss_fn = AnisoStage2Loss()
    for step in range(2):
        idx = torch.arange(rank * 2, rank * 2 + 2)
        net.zero_grad(set_to_none=True)
        loss_fn.compute(net, y[idx], None, t[idx], eps[idx], probe_noise=probes[:, idx] + step,
                        estimator=True).sum().div(2).backward()
        for p in net.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    torch.save({k: v.detach() for k, v in net.named_parameters()}, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    net = _net(2, subspace='dct')
    y, labels, t, eps, probes = _batch(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)   # linear in the gradients: no Adam amplification of rounding
    for step in range(2):
        net.zero_grad(set_to_none=True)
        loss = AnisoStage2Loss().compute(net, y, None, t, eps, probe_noise=probes + step, estimator=True)
        loss.sum().div(4).backward()
        opt.step()
    init = dict(_net(2, subspace='dct').named_parameters())
    assert any(not torch.equal(init[name], p) for name, p in net.named_parameters())   # the steps moved something
    for name, p in net.named_parameters():
        assert torch.equal(r0[name], r1[name]), name
        assert torch.allclose(r0[name], p, rtol=1e-4, atol=1e-6), name
