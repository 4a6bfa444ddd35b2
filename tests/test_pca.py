"""PCA bases (method.md §3, §9.3): orthonormality, planted-subspace recovery, groups, flips, CLI."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_aniso.pca import compute_pca_bases, load_pca_file, main, orthonormalize
from edm_aniso.subspace import PCASubspace

F64 = torch.float64
RES = 8


class ArrayDataset(torch.utils.data.Dataset):
    """(uint8 CHW image, one-hot float32 label) pairs from arrays, like ImageFolderDataset."""

    def __init__(self, images: np.ndarray, classes: np.ndarray | None = None, label_dim: int = 0):
        self.images, self.classes, self.label_dim = images, classes, label_dim

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        label = np.zeros(self.label_dim, dtype=np.float32)
        if self.classes is not None:
            label[self.classes[idx]] = 1
        return self.images[idx].copy(), label


def planted_images(U: torch.Tensor, n: int, mean: float, seed: int, channels: int = 3, noise: float = 0.01):
    """uint8 images whose grayscale values are mean + U z + small noise (values in [-1, 1] before quantisation)."""
    gen = torch.Generator().manual_seed(seed)
    k = U.shape[1]
    z = torch.randn(n, k, generator=gen, dtype=F64) * torch.linspace(1.0, 0.6, k, dtype=F64)
    x = mean + z @ U.T + noise * torch.randn(n, RES * RES, generator=gen, dtype=F64)
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(n, 1, RES, RES)
    return img.expand(n, channels, RES, RES).numpy().copy()


def random_orthonormal(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(RES * RES, k, generator=gen, dtype=F64))[0] * 1.2  # pixel std ~0.2


def subspace_gap(A: torch.Tensor, B: torch.Tensor) -> float:
    """Spectral norm of the difference of the projectors onto span(A) and span(B) (= sin of the largest angle)."""
    qa, qb = orthonormalize(A), orthonormalize(B)
    return torch.linalg.matrix_norm(qa @ qa.T - qb @ qb.T, ord=2).item()


def outside(A: torch.Tensor, B: torch.Tensor) -> float:
    """How far span(A) sticks out of span(B): spectral norm of (I - Q_B Q_B^T) Q_A (0 when contained)."""
    qa, qb = orthonormalize(A), orthonormalize(B)
    return torch.linalg.matrix_norm(qa - qb @ (qb.T @ qa), ord=2).item()


def test_orthonormalize():
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(3, 30, 6, generator=gen, dtype=F64) @ torch.randn(6, 6, generator=gen, dtype=F64)
    Q = orthonormalize(U)
    assert torch.allclose(Q.transpose(1, 2) @ Q, torch.eye(6, dtype=F64).expand(3, 6, 6), atol=1e-13)
    assert max(subspace_gap(U[i], Q[i]) for i in range(3)) < 1e-10
    Q32 = orthonormalize(U.float())
    assert Q32.dtype == torch.float32
    with pytest.raises(ValueError):
        orthonormalize(torch.randn(3, 5))


def test_recovers_planted_subspace():
    U = random_orthonormal(4, seed=1)
    data = ArrayDataset(planted_images(U, 600, mean=0.1, seed=2))
    bases = compute_pca_bases(data, rank=4, xflip=False, batch=128, progress=False)
    assert bases.shape == (1, RES * RES, 4) and bases.dtype == F64
    assert torch.allclose(bases[0].T @ bases[0], torch.eye(4, dtype=F64), atol=1e-12)
    assert subspace_gap(bases[0], U) < 0.05
    # A random 4-D subspace is far from it (so the check above can fail).
    assert subspace_gap(random_orthonormal(4, seed=99), U) > 0.5


def test_matches_direct_svd_of_centred_data():
    gen = np.random.default_rng(3)
    images = gen.integers(0, 256, size=(50, 3, RES, RES), dtype=np.uint8)
    bases = compute_pca_bases(ArrayDataset(images), rank=5, xflip=False, batch=7, progress=False)
    x = torch.from_numpy(images).double().div(127.5).sub(1).mean(dim=1).reshape(50, -1)
    x = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    assert s[4] > s[5] * 1.0001  # a gap, so the top-5 span is well defined
    assert subspace_gap(bases[0], vh[:5].T) < 1e-8
    # Batch size does not matter (streamed accumulation).
    again = compute_pca_bases(ArrayDataset(images), rank=5, xflip=False, batch=50, progress=False)
    assert torch.allclose(again, bases, atol=1e-9)


def test_xflip_counts_flipped_images():
    gen = np.random.default_rng(4)
    images = gen.integers(0, 256, size=(40, 3, RES, RES), dtype=np.uint8)
    flipped = ArrayDataset(np.concatenate([images, images[..., ::-1]]))
    a = compute_pca_bases(ArrayDataset(images), rank=6, xflip=True, batch=16, progress=False)
    b = compute_pca_bases(flipped, rank=6, xflip=False, batch=16, progress=False)
    assert subspace_gap(a[0], b[0]) < 1e-8
    c = compute_pca_bases(ArrayDataset(images), rank=6, xflip=False, batch=16, progress=False)
    assert subspace_gap(a[0], c[0]) > 1e-3


def test_groups_use_their_own_classes_and_means():
    U0, U1 = random_orthonormal(3, seed=5), random_orthonormal(3, seed=6)
    img0 = planted_images(U0, 300, mean=0.2, seed=7)     # class 0
    img1 = planted_images(U1, 300, mean=-0.2, seed=8)    # class 1
    img2 = planted_images(U0, 300, mean=-0.2, seed=9)    # class 2: same subspace as class 0, other mean
    images = np.concatenate([img0, img1, img2])
    classes = np.repeat(np.arange(3), 300)
    order = np.random.default_rng(0).permutation(900)    # mixed labels within batches
    data = ArrayDataset(images[order], classes[order], label_dim=3)
    flat = torch.full((RES * RES, 1), 1.0 / RES, dtype=F64)  # the constant image direction
    # Groups {0, 2} and {1}: group 0 pools classes 0 and 2 and is centred by the pooled mean, so the difference of
    # the class means (constant images 0.4 apart) is a principal direction next to U0; group 1 gives U1.
    bases = compute_pca_bases(data, rank=4, groups=torch.tensor([0, 1, 0]), xflip=False, batch=64, progress=False)
    assert bases.shape == (2, RES * RES, 4)
    assert subspace_gap(bases[0], torch.cat([U0, flat], dim=1)) < 0.1
    assert outside(U1, bases[1]) < 0.1
    assert outside(U1, bases[0]) > 0.5 and outside(U0, bases[1]) > 0.5
    # Per class: each class is centred by its own mean, so the constant direction disappears.
    per_class = compute_pca_bases(data, rank=3, groups=torch.arange(3), xflip=False, batch=64, progress=False)
    assert per_class.shape == (3, RES * RES, 3)
    assert max(subspace_gap(per_class[c], U) for c, U in [(0, U0), (1, U1), (2, U0)]) < 0.1
    # The bases plug into a PCA subspace bank.
    sub = PCASubspace(RES, 3, num_bases=3, bases=per_class, dtype=F64)
    ids = torch.tensor([2, 1])
    x = torch.randn(2, 3, RES, RES, dtype=F64)
    assert torch.allclose(sub.project(sub.project(x, ids), ids), sub.project(x, ids), atol=1e-12)


def test_errors():
    images = np.zeros((4, 3, RES, RES), dtype=np.uint8)
    with pytest.raises(ValueError, match='labels'):
        compute_pca_bases(ArrayDataset(images), rank=2, groups=torch.tensor([0, 1]), progress=False)
    with pytest.raises(ValueError, match='rank'):
        compute_pca_bases(ArrayDataset(images), rank=RES * RES + 1, progress=False)
    data = ArrayDataset(images, np.array([0, 0, 1, 1]), label_dim=2)
    with pytest.raises(ValueError, match='group'):
        compute_pca_bases(data, rank=2, groups=torch.tensor([0, 2]), progress=False)  # group 1 empty


def write_image_folder(root: str, images: np.ndarray, classes: np.ndarray) -> None:
    os.makedirs(root, exist_ok=True)
    labels = []
    for i, img in enumerate(images):
        name = f'img{i:04d}.png'
        Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(root, name))
        labels.append([name, int(classes[i])])
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)


def test_cli(tmp_path):
    U = random_orthonormal(3, seed=10)
    images = planted_images(U, 120, mean=0.0, seed=11)
    classes = np.arange(120) % 2
    data = str(tmp_path / 'data')
    write_image_folder(data, images, classes)
    runner = CliRunner()

    dest = str(tmp_path / 'out' / 'global.pt')
    res = runner.invoke(main, [f'--data={data}', f'--dest={dest}', '--rank=3', '--xflip=False', '--device=cpu'])
    assert res.exit_code == 0, res.output
    saved = load_pca_file(dest)
    assert saved['rank'] == 3 and saved['resolution'] == RES and saved['groups'] is None
    assert saved['bases'].shape == (1, RES * RES, 3)
    assert subspace_gap(saved['bases'][0].double(), U) < 0.1
    assert saved['bases'].dtype == torch.float32 and saved['source']['num_images'] == 120
    assert os.listdir(tmp_path / 'out') == ['global.pt']                 # written atomically: no temp file left

    dest2 = str(tmp_path / 'groups.pt')
    res = runner.invoke(main, [f'--data={data}', f'--dest={dest2}', '--rank=2', '--groups={"0": 1, "1": 0}',
                               '--device=cpu'])
    assert res.exit_code == 0, res.output
    saved = load_pca_file(dest2)
    assert saved['groups'].tolist() == [1, 0] and saved['bases'].shape == (2, RES * RES, 2)

    dest3 = str(tmp_path / 'per-class.pt')
    res = runner.invoke(main, [f'--data={data}', f'--dest={dest3}', '--rank=2', '--per-class', '--device=cpu'])
    assert res.exit_code == 0, res.output
    assert load_pca_file(dest3)['groups'].tolist() == [0, 1]

    for args, msg in [(['--per-class', '--groups=[0, 0]', '--device=cpu'], 'mutually exclusive'),
                      (['--groups=[0, 0, 1]', '--device=cpu'], '3 entries'),
                      (['--groups=nonsense', '--device=cpu'], 'JSON'),
                      (['--rank=65', '--device=cpu'], 'at most 64'),
                      (['--device=nonsense'], '--device')]:
        res = runner.invoke(main, [f'--data={data}', f'--dest={dest3}'] + args)
        assert res.exit_code != 0 and msg in res.output, res.output
        assert 'Traceback' not in res.output
    res = runner.invoke(main, [f'--data={tmp_path / "missing"}', f'--dest={dest3}'])
    assert res.exit_code != 0 and 'does not exist' in res.output


def test_save_pca_file_is_atomic_and_float32(tmp_path, monkeypatch):
    from edm_aniso.pca import save_pca_file
    path = str(tmp_path / 'b.pt')
    bases = random_orthonormal(3, seed=1).unsqueeze(0).double()
    save_pca_file(path, bases, None, 3, RES, source=dict(dataset='x', num_images=5))
    data = load_pca_file(path)
    assert data['bases'].dtype == torch.float32 and data['source'] == dict(dataset='x', num_images=5)

    def broken(obj, f):
        f.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken)
    with pytest.raises(OSError, match='disk full'):
        save_pca_file(path, bases * 2, None, 3, RES)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['b.pt'] and torch.equal(load_pca_file(path)['bases'], data['bases'])
