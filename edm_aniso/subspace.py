"""Orthogonal projectors P onto subspace 1 of the anisotropic noise (method.md §3).

Every subspace acts per channel (no colour mixing) on [B, C, H, W] tensors and offers one interface:
`project(x, basis_id)` = P x and `apply(x, a, b, basis_id)` = a P x + b (x - P x), the psi(M) identity of §1.
Projections run in float32 (or float64 for float64 inputs) whatever the network precision.
"""

from __future__ import annotations

import math

import torch

from torch_utils import persistence

SUBSPACE_KINDS = ('iso', 'dct', 'pca')

# ----------------------------------------------------------------------------------------------------------------------
# Helpers.


def dct_matrix(res: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix C[u, i] = alpha_u cos((2i + 1) u pi / (2 res)), alpha_0 = sqrt(1/res),
    alpha_{u>0} = sqrt(2/res) (method.md §3)."""
    if res < 1:
        raise ValueError(f'dct_matrix needs res >= 1, got {res}')
    u = torch.arange(res, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(res, dtype=torch.float64).unsqueeze(0)
    mat = torch.cos((2 * i + 1) * u * math.pi / (2 * res)) * math.sqrt(2 / res)
    mat[0] = math.sqrt(1 / res)
    return mat.to(dtype)


def orthonormalize(U: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the columns of U [..., n, k] (QR in float64, diag(R) > 0, so an already
    orthonormal U comes back unchanged up to rounding). Raises ValueError if the columns are (nearly) dependent."""
    if U.ndim < 2 or U.shape[-2] < U.shape[-1]:
        raise ValueError(f'orthonormalize needs [..., n, k] with n >= k, got {tuple(U.shape)}')
    A = U.to(torch.float64)
    if not bool(torch.isfinite(A).all()):
        raise ValueError('basis contains non-finite values')
    Q, R = torch.linalg.qr(A, mode='reduced')
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    scale = A.norm(dim=-2).amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    if bool((diag.abs() <= 1e-10 * scale).any()):
        raise ValueError('basis columns are linearly dependent (rank-deficient basis)')
    Q = Q * torch.sign(diag).unsqueeze(-2)  # Householder QR: Q is orthonormal to float64 rounding
    return Q.to(U.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(v: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
    """A scalar stays a scalar; a per-sample tensor [B] broadcasts over C, H, W."""
    if isinstance(v, torch.Tensor) and v.ndim > 0:
        if v.ndim != 1 or v.shape[0] != x.shape[0]:
            raise ValueError(f'per-sample coefficients must have shape [{x.shape[0]}], got {tuple(v.shape)}')
        return v.reshape(-1, *([1] * (x.ndim - 1)))
    return v


def _check_images(x: torch.Tensor, res: int) -> None:
    if x.ndim != 4 or x.shape[-1] != res or x.shape[-2] != res:
        raise ValueError(f'expected images [B, C, {res}, {res}], got {tuple(x.shape)}')


# ----------------------------------------------------------------------------------------------------------------------
# Subspaces.


class Subspace(torch.nn.Module):
    """Base: subclasses define `_project(x, basis_id)` on the compute dtype; attributes rank, num_bases, kind."""

    kind: str = ''
    rank: int = 0
    num_bases: int = 1

    def _project(self, x: torch.Tensor, basis_id: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x: torch.Tensor, basis_id: torch.Tensor | None = None) -> torch.Tensor:
        """P x per channel for x [B, C, H, W]; basis_id [B] long picks each sample's basis (PCA banks)."""
        return self._project(x.to(_compute_dtype(x)), basis_id).to(x.dtype)

    def apply(self, x: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor,
              basis_id: torch.Tensor | None = None) -> torch.Tensor:
        """a P x + b (x - P x) = b x + (a - b) P x (method.md §1), a and b scalars or per-sample [B]."""
        xc = x.to(_compute_dtype(x))
        a, b = _per_sample(a, x), _per_sample(b, x)
        out = b * xc + (a - b) * self._project(xc, basis_id)
        return out.to(x.dtype)

    def perp(self, x: torch.Tensor, basis_id: torch.Tensor | None = None) -> torch.Tensor:
        """P_perp x = x - P x."""
        return x - self.project(x, basis_id)


@persistence.persistent_class
class IsoSubspace(Subspace):
    """P = 0: isotropic noise M = h I (stage 1 and the EDM reduction, method.md §3)."""

    kind = 'iso'

    def __init__(self) -> None:
        super().__init__()
        self.rank = 0
        self.num_bases = 1

    def _project(self, x: torch.Tensor, basis_id: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(x)


@persistence.persistent_class
class DCTSubspace(Subspace):
    """Low DCT block u, v < m per channel (method.md §3): P X_c = L X_c L with L = C_m^T C_m [res, res]."""

    kind = 'dct'

    def __init__(self,
        resolution: int,                # Image side res (H = W = res).
        cutoff:     int | None = None,  # m: keep frequencies u, v < m; None = res // 2.
    ) -> None:
        super().__init__()
        cutoff = resolution // 2 if cutoff is None else int(cutoff)
        if resolution < 1 or not 1 <= cutoff <= resolution:
            raise ValueError(f'DCT cutoff must be in [1, {resolution}], got {cutoff}')
        self.resolution, self.cutoff = int(resolution), cutoff
        self.rank = cutoff * cutoff
        self.num_bases = 1
        C_m = dct_matrix(resolution, torch.float64)[:cutoff]
        self.register_buffer('L', C_m.T @ C_m)  # float64: tiny, cast to the compute dtype per call

    def _project(self, x: torch.Tensor, basis_id: torch.Tensor | None) -> torch.Tensor:
        _check_images(x, self.resolution)
        L = self.L.to(x.dtype)
        y = x @ L                                   # rows: X_c L (one GEMM over all B*C*res rows)
        return (y.transpose(-1, -2) @ L).transpose(-1, -2)  # L X_c L, as L is symmetric


@persistence.persistent_class
class PCASubspace(Subspace):
    """PCA subspace per channel (method.md §3): P X_c = U U^T vec(X_c), one basis U per basis id.

    Buffer `bases` [num_bases, res*res, rank], orthonormalised whenever set. Built without bases, the subspace is
    unfilled (zeros) until `set_bases` or a state dict holding `bases` fills it; projecting before that is an error.
    """

    kind = 'pca'

    def __init__(self,
        resolution: int,                            # Image side res.
        rank:       int,                            # k: dimension of P per channel.
        num_bases:  int                 = 1,        # Number of bases (1 = global, else per class/group).
        bases:      torch.Tensor | None = None,     # [num_bases, res*res, rank] or [res*res, rank]; None = set later.
        dtype:      torch.dtype         = torch.float32,  # Storage dtype of the bases.
    ) -> None:
        super().__init__()
        if resolution < 1 or not 1 <= rank <= resolution * resolution or num_bases < 1:
            raise ValueError(f'PCA subspace needs 1 <= rank <= {resolution * resolution} and num_bases >= 1, '
                             f'got rank={rank}, num_bases={num_bases}')
        self.resolution, self.rank, self.num_bases = int(resolution), int(rank), int(num_bases)
        self.register_buffer('bases', torch.zeros(num_bases, resolution * resolution, rank, dtype=dtype))
        self.bases_set = False
        if bases is not None:
            self.set_bases(bases)

    @torch.no_grad()
    def set_bases(self, U: torch.Tensor) -> None:
        """Orthonormalise and store U ([num_bases, res*res, rank], or one [res*res, rank] for every id)."""
        U = torch.as_tensor(U)
        expected = tuple(self.bases.shape)
        if tuple(U.shape) not in (expected, expected[1:]):
            raise ValueError(f'PCA bases must have shape {expected} or {expected[1:]}, got {tuple(U.shape)}')
        Q = orthonormalize(U.to(self.bases.device, torch.float64))  # one QR per distinct basis
        self.bases.copy_(Q.to(self.bases.dtype).expand(expected))
        self.bases_set = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + 'bases' in state_dict:   # load_state_dict fills the bases as set_bases does
            self.bases_set = True

    def _check_ids(self, basis_id: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if self.num_bases == 1:
            return None
        if basis_id is None:
            raise ValueError('a PCA basis bank needs per-sample basis ids')
        basis_id = torch.as_tensor(basis_id)
        if basis_id.shape != (batch,) or basis_id.dtype != torch.long:
            raise ValueError(f'basis_id must be a long tensor of shape [{batch}], got {basis_id.dtype} '
                             f'{tuple(basis_id.shape)}')
        return basis_id

    def _project(self, x: torch.Tensor, basis_id: torch.Tensor | None) -> torch.Tensor:
        _check_images(x, self.resolution)
        if not getattr(self, 'bases_set', True):   # pickles from before the flag always held real bases
            raise ValueError('PCA subspace has no bases yet: pass bases=... or call set_bases() '
                             '(e.g. with a file from python -m edm_aniso.pca)')
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        basis_id = self._check_ids(basis_id, B)
        if basis_id is None:
            U = self.bases[0].to(x.dtype)
            return ((flat @ U) @ U.T).reshape(x.shape)
        ids = torch.unique(basis_id)
        if bool((ids < 0).any()) or bool((ids >= self.num_bases).any()):
            raise ValueError(f'basis ids must be in [0, {self.num_bases}), got {ids.tolist()}')
        out = torch.empty_like(flat)
        for i in ids.tolist():  # one matmul pair per basis id present, no per-sample copies
            sel = (basis_id == i).nonzero(as_tuple=True)[0]
            U = self.bases[i].to(x.dtype)
            out = out.index_copy(0, sel, (flat.index_select(0, sel) @ U) @ U.T)
        return out.reshape(x.shape)


def make_subspace(kind: str, resolution: int, cutoff: int | None = None, rank: int | None = None,
                  num_bases: int = 1, bases: torch.Tensor | None = None) -> Subspace:
    """Build a subspace by name: 'iso', 'dct' (cutoff m, default res // 2) or 'pca' (rank k, default res^2 // 4
    or the bases' width; num_bases; bases)."""
    if kind == 'iso':
        return IsoSubspace()
    if kind == 'dct':
        return DCTSubspace(resolution, cutoff)
    if kind == 'pca':
        if rank is None:
            rank = int(bases.shape[-1]) if bases is not None else max(resolution * resolution // 4, 1)
        return PCASubspace(resolution, rank, num_bases=num_bases, bases=bases)
    raise ValueError(f'unknown subspace kind {kind!r}; expected one of {", ".join(SUBSPACE_KINDS)}')
