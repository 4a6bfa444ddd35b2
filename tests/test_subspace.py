"""Projector invariants (method.md §3, §9.3)."""

import math
import os
import pickle

import pytest
import torch

from edm_aniso.subspace import (DCTSubspace, IsoSubspace, PCASubspace, dct_matrix, make_subspace,
                                orthonormalize)

F64 = torch.float64
RES, CH = 8, 3


def projector_matrix(sub, basis: int | None = None) -> torch.Tensor:
    """P as a dense [C*res*res, C*res*res] matrix: column j = P e_j."""
    d = CH * RES * RES
    eye = torch.eye(d, dtype=F64).reshape(d, CH, RES, RES)
    ids = None if basis is None else torch.full((d,), basis, dtype=torch.long)
    return sub.project(eye, ids).reshape(d, d).T


def random_bases(num: int, rank: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, RES * RES, rank, generator=gen, dtype=F64)


def projector_matrix_perp(sub, basis: int | None = None) -> torch.Tensor:
    """P_perp as a dense matrix, from `perp` (independent of `project`'s matrix above)."""
    d = CH * RES * RES
    eye = torch.eye(d, dtype=F64).reshape(d, CH, RES, RES)
    ids = None if basis is None else torch.full((d,), basis, dtype=torch.long)
    return sub.perp(eye, ids).reshape(d, d).T


CASES = [
    pytest.param(DCTSubspace(RES), None, CH * (RES // 2) ** 2, id='dct'),
    pytest.param(DCTSubspace(RES, cutoff=3), None, CH * 9, id='dct-m3'),
    pytest.param(PCASubspace(RES, 10, bases=random_bases(1, 10), dtype=F64), None, CH * 10, id='pca'),
    pytest.param(PCASubspace(RES, 5, num_bases=3, bases=random_bases(3, 5), dtype=F64), 2, CH * 5, id='pca-bank'),
    pytest.param(IsoSubspace(), None, 0, id='iso'),
]


@pytest.mark.parametrize('sub,basis,trace', CASES)
def test_projector_properties(sub, basis, trace):
    P = projector_matrix(sub, basis)
    I = torch.eye(P.shape[0], dtype=F64)
    Pp = projector_matrix_perp(sub, basis)
    assert torch.allclose(P @ P, P, atol=1e-12)                          # idempotent
    assert torch.allclose(P, P.T, atol=1e-12)                            # symmetric
    assert torch.allclose(P + Pp, I, atol=1e-12)                         # P + P_perp = I
    assert torch.allclose(P @ Pp, torch.zeros_like(P), atol=1e-12)       # P P_perp = 0
    assert torch.trace(P).item() == pytest.approx(trace, abs=1e-9)      # C m^2 or C k
    assert sub.rank * CH == trace


def test_no_colour_mixing():
    sub = DCTSubspace(RES)
    x = torch.randn(2, CH, RES, RES, dtype=F64)
    x[:, 1:] = 0
    y = sub.project(x)
    assert torch.equal(y[:, 1:], torch.zeros_like(y[:, 1:]))


def test_dct_matrix_orthonormal_and_formula():
    for res in (1, 5, 8, 16):
        C = dct_matrix(res)
        assert torch.allclose(C @ C.T, torch.eye(res, dtype=F64), atol=1e-13)
        for u in range(res):
            alpha = math.sqrt(1 / res) if u == 0 else math.sqrt(2 / res)
            for i in range(res):
                assert C[u, i].item() == pytest.approx(alpha * math.cos((2 * i + 1) * u * math.pi / (2 * res)),
                                                       abs=1e-14)


def test_fast_dct_equals_explicit_basis():
    m = 3
    sub = DCTSubspace(RES, cutoff=m)
    C = dct_matrix(RES)
    # Explicit orthonormal basis of the low block: atoms outer(C[u], C[v]) with u, v < m, per channel.
    atoms = torch.stack([torch.outer(C[u], C[v]).reshape(-1) for u in range(m) for v in range(m)], dim=1)
    assert torch.allclose(atoms.T @ atoms, torch.eye(m * m, dtype=F64), atol=1e-13)
    x = torch.randn(4, CH, RES, RES, dtype=F64)
    explicit = ((x.reshape(4, CH, -1) @ atoms) @ atoms.T).reshape(x.shape)
    assert torch.allclose(sub.project(x), explicit, atol=1e-12)
    # DCT coefficients of P x vanish outside the block and equal x's inside.
    cx, cp = C @ x @ C.T, C @ sub.project(x) @ C.T
    assert torch.allclose(cp[..., :m, :m], cx[..., :m, :m], atol=1e-12)
    assert cp[..., m:, :].abs().max() < 1e-12 and cp[..., :, m:].abs().max() < 1e-12


def test_dct_float32_path():
    sub = DCTSubspace(RES)
    x = torch.randn(2, CH, RES, RES)
    y = sub.project(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), sub.project(x.double()), atol=1e-5)
    y16 = sub.project(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16


def test_grouped_application_equals_per_sample_loop():
    sub = PCASubspace(RES, 6, num_bases=4, bases=random_bases(4, 6, seed=1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, CH, RES, RES, generator=gen)
    ids = torch.tensor([3, 0, 3, 1, 1, 3, 0, 0, 1])  # mixed ids; id 2 absent
    y = sub.project(x, ids)
    for n in range(9):
        U = sub.bases[ids[n]]
        ref = (x[n].reshape(CH, -1) @ U @ U.T).reshape(CH, RES, RES)
        assert torch.allclose(y[n], ref, atol=1e-5)
    # And a bank with every sample on one id equals the single-basis subspace of that id.
    single = PCASubspace(RES, 6, bases=sub.bases[3].double())
    assert torch.allclose(sub.project(x, torch.full((9,), 3)), single.project(x), atol=1e-5)


def test_pca_bank_errors():
    sub = PCASubspace(RES, 4, num_bases=2, bases=random_bases(2, 4))
    x = torch.randn(3, CH, RES, RES)
    with pytest.raises(ValueError, match='basis ids'):
        sub.project(x)
    with pytest.raises(ValueError):
        sub.project(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        sub.project(torch.randn(3, CH, RES + 1, RES + 1), torch.tensor([0, 1, 1]))


def test_pca_bases_orthonormalised_on_set():
    raw = random_bases(2, 7, seed=2) * torch.linspace(0.1, 10, 7, dtype=F64)  # far from orthonormal
    sub = PCASubspace(RES, 7, num_bases=2, bases=raw, dtype=F64)
    U = sub.bases
    assert torch.allclose(U.transpose(1, 2) @ U, torch.eye(7, dtype=F64).expand(2, 7, 7), atol=1e-13)
    # Same span as the raw columns: projecting the raw columns leaves them unchanged.
    assert torch.allclose(U @ (U.transpose(1, 2) @ raw), raw, atol=1e-10)
    with pytest.raises(ValueError, match='dependent'):
        PCASubspace(RES, 2, bases=torch.ones(RES * RES, 2))
    with pytest.raises(ValueError, match='shape'):
        PCASubspace(RES, 3, bases=torch.randn(RES * RES, 4))


def test_orthonormalize_keeps_orthonormal_input():
    Q, _ = torch.linalg.qr(torch.randn(20, 5, dtype=F64))
    assert torch.allclose(orthonormalize(Q), Q, atol=1e-13)


@pytest.mark.parametrize('sub', [DCTSubspace(RES), PCASubspace(RES, 5, num_bases=2, bases=random_bases(2, 5)),
                                 IsoSubspace()], ids=['dct', 'pca', 'iso'])
def test_apply(sub):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, CH, RES, RES, generator=gen, dtype=F64)
    ids = torch.tensor([0, 1, 1, 0])
    a = torch.rand(4, generator=gen, dtype=F64) + 0.5
    b = torch.rand(4, generator=gen, dtype=F64) + 0.5
    # a = b: scalar multiplication (scalars and per-sample tensors).
    assert torch.allclose(sub.apply(x, 2.5, 2.5, ids), 2.5 * x, rtol=1e-15, atol=0)
    assert torch.allclose(sub.apply(x, a, a, ids), a.view(-1, 1, 1, 1) * x, rtol=1e-15, atol=0)
    # a P x + b P_perp x, per sample.
    Px = sub.project(x, ids)
    ref = a.view(-1, 1, 1, 1) * Px + b.view(-1, 1, 1, 1) * (x - Px)
    assert torch.allclose(sub.apply(x, a, b, ids), ref, atol=1e-13)
    # psi(M) composes: M^{1/2} M^{1/2} = M (method.md §9.3).
    half = sub.apply(sub.apply(x, a.sqrt(), b.sqrt(), ids), a.sqrt(), b.sqrt(), ids)
    assert torch.allclose(half, sub.apply(x, a, b, ids), atol=1e-12)
    with pytest.raises(ValueError):
        sub.apply(x, torch.ones(3, dtype=F64), 1.0, ids)


def test_apply_gradients_flow_to_coefficients():
    sub = DCTSubspace(RES)
    x = torch.randn(2, CH, RES, RES)
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    sub.apply(x, a, b).square().sum().backward()
    Px = sub.project(x)
    assert torch.allclose(a.grad, 2 * Px.square().sum(dim=(1, 2, 3)), rtol=1e-4)
    assert torch.allclose(b.grad, 2 * (x - Px).square().sum(dim=(1, 2, 3)), rtol=1e-4)


def test_make_subspace_and_pickle():
    assert make_subspace('iso', RES).kind == 'iso'
    dct = make_subspace('dct', RES)
    assert dct.kind == 'dct' and dct.rank == (RES // 2) ** 2
    pca = make_subspace('pca', RES)
    assert pca.kind == 'pca' and pca.rank == RES * RES // 4
    with pytest.raises(ValueError, match='no bases yet'):          # no hidden default basis
        pca.project(torch.randn(2, CH, RES, RES))
    pca2 = make_subspace('pca', RES, num_bases=2, bases=random_bases(2, 3))
    assert pca2.rank == 3 and pca2.num_bases == 2
    with pytest.raises(ValueError, match='iso, dct, pca'):
        make_subspace('wavelet', RES)
    x = torch.randn(2, CH, RES, RES)
    for sub in (dct, pca2):
        clone = pickle.loads(pickle.dumps(sub))
        ids = torch.tensor([1, 0])
        assert torch.equal(clone.project(x, ids), sub.project(x, ids))


@pytest.mark.slow
def test_pickle_round_trip_in_fresh_process(tmp_path):
    """Persistent classes carry their source: a fresh process that never imports edm_aniso rebuilds them."""
    import subprocess
    import sys

    from edm_aniso.schedule import KnotSchedule
    sched = KnotSchedule(num_rows=2)
    with torch.no_grad():
        sched.u.add_(torch.randn_like(sched.u))
    objs = {'sched': sched, 'pca': PCASubspace(RES, 3, num_bases=2, bases=random_bases(2, 3)),
            'dct': DCTSubspace(RES, cutoff=3)}
    x = torch.randn(2, CH, RES, RES)
    t = torch.tensor([10.0, 3000.0])
    ids = torch.tensor([1, 0])
    path = tmp_path / 'objs.pkl'
    with open(path, 'wb') as f:
        pickle.dump(objs, f)
    torch.save({'x': x, 't': t, 'ids': ids}, tmp_path / 'inputs.pt')
    script = (
        'import pickle, sys, torch\n'
        f'objs = pickle.load(open({str(path)!r}, "rb"))\n'
        'assert not any(m.startswith("edm_aniso") for m in sys.modules), "edm_aniso was imported"\n'
        f'inp = torch.load({str(tmp_path / "inputs.pt")!r})\n'
        'g, gd = objs["sched"](inp["t"], inp["ids"])\n'
        'out = {"g": g.detach(), "gd": gd.detach(), "pca": objs["pca"].project(inp["x"], inp["ids"]),\n'
        '       "dct": objs["dct"].project(inp["x"])}\n'
        f'torch.save(out, {str(tmp_path / "out.pt")!r})\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, '-c', script], check=True, cwd=str(tmp_path),
                   env={**os.environ, 'PYTHONPATH': root})
    out = torch.load(tmp_path / 'out.pt')
    g, gd = sched(t, ids)
    assert torch.equal(out['g'], g.detach()) and torch.equal(out['gd'], gd.detach())
    assert torch.equal(out['pca'], objs['pca'].project(x, ids))
    assert torch.equal(out['dct'], objs['dct'].project(x))


def test_unfilled_pca_subspace_is_filled_by_set_bases_or_state_dict():
    x = torch.randn(2, CH, RES, RES, dtype=F64)
    ref = PCASubspace(RES, 4, bases=random_bases(1, 4), dtype=F64)
    later = PCASubspace(RES, 4, dtype=F64)
    with pytest.raises(ValueError, match='set_bases'):
        later.apply(x, 1.0, 0.5)
    later.set_bases(ref.bases[0])
    assert torch.allclose(later.project(x), ref.project(x), atol=1e-12)   # set_bases re-orthonormalises
    loaded = PCASubspace(RES, 4, dtype=F64)
    loaded.load_state_dict(ref.state_dict())
    assert torch.equal(loaded.project(x), ref.project(x))
    assert torch.equal(pickle.loads(pickle.dumps(loaded)).project(x), ref.project(x))
