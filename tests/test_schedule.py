"""Schedule invariants (method.md §2, §9.4)."""

import math

import pytest
import torch

from edm_aniso.schedule import (G0, T_MAX, KnotSchedule, evaluate_log_knots, geometric_mean_log_knots,
                                inverse_log_knots, inverse_log_knots_bisection, karras_sigmas, softplus_inverse)

F64 = torch.float64


def random_schedule(num_rows: int = 1, seed: int = 0, scale: float = 1.0) -> KnotSchedule:
    sched = KnotSchedule(num_rows=num_rows, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sched.u.add_(torch.randn(sched.u.shape, generator=gen, dtype=F64) * scale)
    return sched


def test_karras_sigmas_formula():
    sig = karras_sigmas(18)
    assert sig.dtype == F64 and sig.shape == (18,)
    assert sig[0].item() == pytest.approx(80.0, rel=1e-14) and sig[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert bool((sig[1:] < sig[:-1]).all())
    # rho-th root is linear in the index
    root = sig ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff()[0].expand(17), rtol=1e-10)
    with pytest.raises(ValueError):
        karras_sigmas(1)


def test_softplus_inverse_round_trip():
    y = torch.tensor([1e-12, 1e-6, 0.3, 5.0, 50.0, 800.0], dtype=F64)
    x = softplus_inverse(y)
    assert torch.isfinite(x).all()
    assert torch.allclose(torch.nn.functional.softplus(x), y, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        softplus_inverse(torch.tensor([0.0]))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_endpoints_and_monotonicity(seed):
    sched = random_schedule(num_rows=3, seed=seed, scale=3.0)
    lk = sched.log_knots()
    assert lk.shape == (3, 32)
    assert bool((lk[:, 1:] > lk[:, :-1]).all())
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.tensor([0.0, 0.0, 0.0, T_MAX, T_MAX, T_MAX], dtype=F64)
    g, _ = sched(t, rows)
    assert torch.allclose(g[:3], torch.full((3,), G0, dtype=F64), rtol=1e-14, atol=0)
    assert torch.allclose(g[3:], torch.full((3,), T_MAX, dtype=F64), rtol=1e-14, atol=0)
    # Strictly increasing on a fine grid that includes every knot, for every row.
    tt = torch.linspace(0, T_MAX, 3101, dtype=F64)
    for r in range(3):
        g, gdot = sched(tt, torch.full_like(tt, r, dtype=torch.long))
        assert bool((g.diff() > 0).all())
        assert bool((gdot > 0).all())
    # Queries outside [0, T] clamp to the endpoints.
    g, _ = sched(torch.tensor([-5.0, 1e5], dtype=F64), torch.tensor([0, 0]))
    assert torch.allclose(g, torch.tensor([G0, T_MAX], dtype=F64), rtol=1e-14)


def test_derivative_matches_finite_differences():
    sched = random_schedule(seed=3)
    tau = sched.tau
    # Points strictly inside segments (at least 1e-3 of a segment width from each knot).
    gen = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 31, (200,), generator=gen)
    frac = 0.01 + 0.98 * torch.rand(200, generator=gen, dtype=F64)
    t = tau[seg] + frac * (tau[seg + 1] - tau[seg])
    g, gdot = sched(t)
    eps = 1e-4
    gp, _ = sched(t + eps)
    gm, _ = sched(t - eps)
    fd = (gp - gm) / (2 * eps)
    assert torch.allclose(gdot, fd, rtol=1e-6, atol=0)


def test_derivative_uses_left_segment_at_knots():
    sched = random_schedule(seed=4)
    lk, tau = sched.log_knots().detach()[0], sched.tau
    i = 10
    g, gdot = sched(tau[i:i + 1])
    left_slope = (lk[i] - lk[i - 1]) / (tau[i] - tau[i - 1])
    assert torch.allclose(gdot, g * left_slope, rtol=1e-12)
    _, gdot0 = sched(torch.zeros(1, dtype=F64))
    assert torch.allclose(gdot0, G0 * (lk[1] - lk[0]) / tau[1], rtol=1e-12)


def test_karras_init_reproduces_knots():
    sched = KnotSchedule(dtype=F64)
    knots = sched.log_knots().exp()[0]
    expected = karras_sigmas(32).flip(0) ** 2
    expected[0], expected[-1] = G0, T_MAX
    assert torch.allclose(knots, expected, rtol=1e-12, atol=0)
    # At the knot times, g equals the knot values.
    g, _ = sched(sched.tau)
    assert torch.allclose(g, expected, rtol=1e-12, atol=0)
    # float32 parameters reproduce them to float32 accuracy.
    knots32 = KnotSchedule().log_knots().double().exp()[0]
    assert torch.allclose(knots32, expected, rtol=1e-4)


def test_init_uniform_grid_close_to_edm_grid():
    # method.md §1: with the init, an 18-point uniform t-grid gives EDM's rho = 7 levels except the last one.
    sched = KnotSchedule(dtype=F64)
    t = torch.linspace(T_MAX, 0, 18, dtype=F64)
    g, _ = sched(t)
    rel = (g.sqrt() / karras_sigmas(18) - 1).abs()
    assert rel[:-1].max().item() < 0.01
    assert g[-1].sqrt().item() == pytest.approx(math.sqrt(G0), rel=1e-12)


def test_geometric_mean_is_sqrt_gh():
    sg, sh = random_schedule(2, seed=5), random_schedule(2, seed=6)
    lf = geometric_mean_log_knots(sg.log_knots(), sh.log_knots())
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(300, generator=gen, dtype=F64) * T_MAX
    rows = torch.randint(0, 2, (300,), generator=gen)
    g, _ = sg(t, rows)
    h, _ = sh(t, rows)
    F, _ = evaluate_log_knots(lf, sg.tau, t, rows)
    assert torch.allclose(F, (g * h).sqrt(), rtol=1e-12, atol=0)
    assert bool((lf[:, 1:] > lf[:, :-1]).all())


def test_inverse_round_trips():
    sg, sh = random_schedule(3, seed=7), random_schedule(3, seed=8)
    lf = geometric_mean_log_knots(sg.log_knots(), sh.log_knots()).detach()
    tau = sg.tau
    gen = torch.Generator().manual_seed(2)
    v = torch.exp(math.log(G0) + (math.log(T_MAX) - math.log(G0)) * torch.rand(500, generator=gen, dtype=F64))
    v = torch.cat([v, torch.tensor([G0, T_MAX], dtype=F64), lf[0].exp()])  # include endpoints and knot values
    rows = torch.randint(0, 3, v.shape, generator=gen)
    t = inverse_log_knots(lf, tau, v, rows)
    back, _ = evaluate_log_knots(lf, tau, t, rows)
    assert torch.allclose(back, v, rtol=1e-12, atol=0)
    # F^{-1}(F(t)) = t.
    t0 = torch.rand(500, generator=gen, dtype=F64) * T_MAX
    r0 = torch.randint(0, 3, (500,), generator=gen)
    F0, _ = evaluate_log_knots(lf, tau, t0, r0)
    assert torch.allclose(inverse_log_knots(lf, tau, F0, r0), t0, rtol=1e-9, atol=1e-9)
    # Values outside [g0, T] clamp to the ends.
    tt = inverse_log_knots(lf, tau, torch.tensor([0.0, 1e-20, 1e9], dtype=F64), torch.tensor([0, 1, 2]))
    assert tt.tolist() == [0.0, 0.0, T_MAX]


def test_analytic_inverse_matches_bisection():
    sched = random_schedule(2, seed=9, scale=2.0)
    lk = sched.log_knots().detach()
    gen = torch.Generator().manual_seed(3)
    v = torch.exp(math.log(G0) + (math.log(T_MAX) - math.log(G0)) * torch.rand(200, generator=gen, dtype=F64))
    rows = torch.randint(0, 2, (200,), generator=gen)
    a = inverse_log_knots(lk, sched.tau, v, rows)
    b = inverse_log_knots_bisection(lk, sched.tau, v, rows)
    assert torch.allclose(a, b, rtol=0, atol=1e-9)
    assert torch.allclose(sched.inverse(v, rows), a)


def test_bank_equals_per_class_queries():
    bank = random_schedule(4, seed=10)
    gen = torch.Generator().manual_seed(4)
    t = torch.rand(64, generator=gen, dtype=F64) * T_MAX
    rows = torch.randint(0, 4, (64,), generator=gen)
    g, gdot = bank(t, rows)
    for r in range(4):
        single = KnotSchedule(num_rows=1, dtype=F64)
        with torch.no_grad():
            single.u.copy_(bank.u[r:r + 1])
        sel = rows == r
        gs, gds = single(t[sel])
        assert torch.equal(gs, g[sel]) and torch.equal(gds, gdot[sel])


def test_bank_needs_rows():
    bank = KnotSchedule(num_rows=3)
    with pytest.raises(ValueError, match='per-sample rows'):
        bank(torch.rand(4))
    with pytest.raises(ValueError, match='per-sample rows'):
        bank.inverse(torch.rand(4))
    with pytest.raises(ValueError, match='per-sample rows'):
        evaluate_log_knots(bank.log_knots(), bank.tau, torch.rand(4))
    with pytest.raises(ValueError, match='rows must be in'):
        bank(torch.rand(2), torch.tensor([0, 3]))


def test_gradients_reach_only_used_rows():
    bank = random_schedule(3, seed=11)
    t = torch.tensor([100.0, 3000.0, 5000.0], dtype=F64)
    g, gdot = bank(t, torch.tensor([0, 2, 2]))
    (g.log().sum() + gdot.sum()).backward()
    grad = bank.u.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[1].abs().sum() == 0


def test_load_rows_from():
    src = random_schedule(1, seed=12)
    dst = KnotSchedule(num_rows=3, dtype=F64)
    dst.load_rows_from(src)
    assert torch.equal(dst.u, src.u.expand(3, -1))
    with pytest.raises(ValueError):
        KnotSchedule(num_rows=2, num_knots=16).load_rows_from(src)
