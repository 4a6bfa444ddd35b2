"""Tests for fid.py: statistics, the Fréchet distance, the reference .npz format and the calc/ref CLI (§1.4, §4.4)."""

import importlib
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import fid

FEATURE_DIM = 16

# A stand-in for EDM's Inception pickle: a persistent module computing fixed random-projection features of uint8 NCHW
# images, pickled in EDM's format so that it loads (source and all) in another process.
DETECTOR_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class ProjectionDetector(torch.nn.Module):
        def __init__(self, feature_dim, pool=4, seed=0):
            super().__init__()
            self.pool = pool
            g = torch.Generator().manual_seed(seed)
            self.register_buffer('weight', torch.randn([3 * pool * pool, feature_dim], generator=g))

        def forward(self, images, return_features=False):
            assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
            assert return_features
            x = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, self.pool).flatten(1)
            return torch.tanh(x @ self.weight)
''')


@pytest.fixture(scope='module')
def detector_pkl(tmp_path_factory):
    folder = tmp_path_factory.mktemp('detector')
    (folder / 'fid_test_detector.py').write_text(DETECTOR_SRC)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module('fid_test_detector')
        net = module.ProjectionDetector(FEATURE_DIM)
    finally:
        sys.path.remove(str(folder))
    path = folder / 'detector.pkl'
    with open(path, 'wb') as f:
        pickle.dump(net, f)
    return str(path)


def write_images(folder, count, seed, brightness=0.0, size=8, channels=3, start=0):
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        base = rng.uniform(0, 1, size=[1, 1, channels]) * 0.5 + brightness
        pixels = np.clip(base + rng.normal(0, 0.2, size=[size, size, channels]), 0, 1)
        image = (pixels * 255).astype(np.uint8)
        path = os.path.join(folder, f'{start + i:04d}.png')
        PIL.Image.fromarray(image[:, :, 0] if channels == 1 else image).save(path)
    return str(folder)


@pytest.fixture(scope='module')
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    return write_images(root / 'a', 40, seed=1), write_images(root / 'b', 40, seed=2, brightness=0.2)


def features_of(folder, detector_pkl, names=None):
    """Features computed here, independently of fid.py: PIL decode, NCHW uint8, the detector, float64."""
    names = names or sorted(os.listdir(folder))
    images = np.stack([np.asarray(PIL.Image.open(os.path.join(folder, n)).convert('RGB')) for n in names])
    with open(detector_pkl, 'rb') as f:
        net = pickle.load(f)
    with torch.no_grad():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), return_features=True).double().numpy()


def fid_scipy(f1, f2):
    """Textbook FID in float64 with scipy.linalg.sqrtm."""
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def trace_sqrt_product(s1, s2):
    """tr((Σ₁Σ₂)^{1/2}) via the symmetric form Σ₁^{1/2} Σ₂ Σ₁^{1/2} (eigh only; no general sqrtm)."""
    w, v = np.linalg.eigh(s1)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(half @ s2 @ half), 0, None)).sum())


def run(args):
    return CliRunner().invoke(fid.main, args)


def last_line(output):
    return output.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.RandomState(0)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Commuting covariances: the same rotation of both leaves the distance unchanged.
    q, _ = np.linalg.qr(rng.normal(size=[6, 6]))
    got = fid.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_general_covariances():
    rng = np.random.RandomState(1)
    x, y = rng.normal(size=[12, 12]), rng.normal(size=[12, 12])
    s1, s2 = x @ x.T + 0.1 * np.eye(12), y @ y.T + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.calculate_fid_from_inception_stats(mu1, s1, mu2, s2) == fid.frechet_distance(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_singular_and_invalid():
    s = np.diag([1.0, 2.0, 0.0, 0.0])                           # rank-deficient: sqrtm flags it, the offset rescues it
    assert abs(fid.frechet_distance(np.zeros(4), s, np.zeros(4), s)) < 1e-4
    with pytest.raises(ValueError, match='imaginary'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(ValueError, match='covariances must be'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match='NaN'):
        fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def test_stats_equal_numpy_mean_and_unbiased_cov(image_sets, detector_pkl):
    mu, sigma = fid.calculate_inception_stats(image_sets[0], max_batch_size=7, num_workers=0, device='cpu',
                                              detector=detector_pkl, progress=False)
    feats = features_of(image_sets[0], detector_pkl)
    assert mu.dtype == np.float64 and mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)


def test_num_picks_seeded_subset(image_sets, detector_pkl):
    kw = dict(max_batch_size=64, num_workers=0, device='cpu', detector=detector_pkl, progress=False)
    mu, _ = fid.calculate_inception_stats(image_sets[0], num_expected=10, seed=3, **kw)
    names = sorted(os.listdir(image_sets[0]))
    order = np.arange(len(names))
    np.random.RandomState(3).shuffle(order)
    chosen = [names[i] for i in np.sort(order[:10])]
    np.testing.assert_allclose(mu, features_of(image_sets[0], detector_pkl, chosen).mean(0), rtol=1e-6, atol=1e-9)
    other, _ = fid.calculate_inception_stats(image_sets[0], num_expected=10, seed=4, **kw)
    assert not np.allclose(mu, other)


def test_greyscale_images_are_repeated_to_rgb(tmp_path, detector_pkl):
    folder = write_images(tmp_path / 'grey', 6, seed=5, channels=1)
    mu, _ = fid.calculate_inception_stats(folder, num_workers=0, device='cpu', detector=detector_pkl, progress=False)
    np.testing.assert_allclose(mu, features_of(folder, detector_pkl).mean(0), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def test_ref_then_calc_same_images_is_zero(tmp_path, image_sets, detector_pkl):
    dest = tmp_path / 'refs' / 'a.npz'
    res = run(['ref', f'--data={image_sets[0]}', f'--dest={dest}', '--batch=16', f'--detector={detector_pkl}',
               '--device=cpu'])
    assert res.exit_code == 0, res.output
    with np.load(dest) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        assert data['mu'].dtype == np.float64 and data['sigma'].shape == (FEATURE_DIM, FEATURE_DIM)
    res = run(['calc', f'--images={image_sets[0]}', f'--ref={dest}', '--num=40', f'--detector={detector_pkl}',
               '--device=cpu'])
    assert res.exit_code == 0, res.output
    assert abs(float(last_line(res.output))) < 1e-6


def test_calc_matches_independent_fid(tmp_path, image_sets, detector_pkl, monkeypatch):
    dest = tmp_path / 'a.npz'
    monkeypatch.setenv(fid.DETECTOR_ENV, detector_pkl)           # the environment override, no --detector
    assert run(['ref', f'--data={image_sets[0]}', f'--dest={dest}', '--device=cpu']).exit_code == 0
    res = run(['calc', f'--images={image_sets[1]}', f'--ref={dest}', '--num=40', '--device=cpu'])
    assert res.exit_code == 0, res.output
    printed = last_line(res.output)
    expected = fid_scipy(features_of(image_sets[1], detector_pkl), features_of(image_sets[0], detector_pkl))
    assert expected > 0.01
    assert float(printed) == pytest.approx(expected, rel=2e-5)
    assert printed == f'{float(printed):g}'


def test_calc_from_zip(tmp_path, image_sets, detector_pkl):
    dest = tmp_path / 'a.npz'
    assert run(['ref', f'--data={image_sets[0]}', f'--dest={dest}', f'--detector={detector_pkl}',
                '--device=cpu']).exit_code == 0
    archive = shutil.make_archive(str(tmp_path / 'b'), 'zip', image_sets[1])
    res = run(['calc', f'--images={archive}', f'--ref={dest}', '--num=40', f'--detector={detector_pkl}',
               '--device=cpu'])
    assert res.exit_code == 0, res.output
    expected = fid_scipy(features_of(image_sets[1], detector_pkl), features_of(image_sets[0], detector_pkl))
    assert float(last_line(res.output)) == pytest.approx(expected, rel=2e-5)


def test_save_reference_stats_is_atomic(tmp_path, monkeypatch):
    mu, sigma = np.arange(3.0), np.eye(3)
    fid.save_reference_stats(str(tmp_path / 'r.npz'), mu, sigma)
    fid.save_reference_stats(str(tmp_path / 'plain'), mu, sigma)        # as np.savez: '.npz' appended
    assert sorted(os.listdir(tmp_path)) == ['plain.npz', 'r.npz']         # no temp file left behind
    assert np.array_equal(fid.load_reference_stats(str(tmp_path / 'plain.npz'))[0], mu)

    def broken(f, **arrays):
        f.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(np, 'savez', broken)
    with pytest.raises(OSError, match='disk full'):
        fid.save_reference_stats(str(tmp_path / 'r.npz'), mu + 1, sigma)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['plain.npz', 'r.npz']         # the old file is intact
    assert np.array_equal(fid.load_reference_stats(str(tmp_path / 'r.npz'))[0], mu)


@pytest.fixture
def good_ref(tmp_path, image_sets, detector_pkl):
    dest = tmp_path / 'good.npz'
    mu, sigma = fid.calculate_inception_stats(image_sets[0], num_workers=0, device='cpu', detector=detector_pkl,
                                              progress=False)
    fid.save_reference_stats(str(dest), mu, sigma)
    return str(dest)


def _bad_inputs(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    mixed = write_images(tmp_path / 'mixed', 4, seed=7)
    write_images(mixed, 1, seed=8, size=16, start=100)
    corrupt = write_images(tmp_path / 'corrupt', 3, seed=9)
    (tmp_path / 'corrupt' / '0001.png').write_bytes(b'not a png')
    np.savez(tmp_path / 'keys.npz', mean=np.zeros(FEATURE_DIM), cov=np.eye(FEATURE_DIM))
    np.savez(tmp_path / 'shape.npz', mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM + 1))
    np.savez(tmp_path / 'dim.npz', mu=np.zeros(8), sigma=np.eye(8))
    (tmp_path / 'text.npz').write_text('hello')
    return dict(empty=str(empty), mixed=mixed, corrupt=corrupt, missing=str(tmp_path / 'nowhere'),
                keys=str(tmp_path / 'keys.npz'), shape=str(tmp_path / 'shape.npz'), dim=str(tmp_path / 'dim.npz'),
                text=str(tmp_path / 'text.npz'))


def test_bad_inputs_give_one_line_errors(tmp_path, image_sets, detector_pkl, good_ref):
    bad = _bad_inputs(tmp_path)
    det = f'--detector={detector_pkl}'
    cases = [
        (['calc', f'--images={bad["empty"]}', f'--ref={good_ref}', '--num=2', det], 'No image files'),
        (['calc', f'--images={bad["missing"]}', f'--ref={good_ref}', '--num=2', det], 'does not exist'),
        (['calc', f'--images={bad["mixed"]}', f'--ref={good_ref}', '--num=5', det], 'same size'),
        (['calc', f'--images={bad["corrupt"]}', f'--ref={good_ref}', '--num=3', det], '0001.png'),
        (['calc', f'--images={image_sets[0]}', f'--ref={good_ref}', '--num=41', det],
         'Found 40 images, but expected at least 41'),
        (['calc', f'--images={image_sets[0]}', f'--ref={bad["keys"]}', '--num=40', det], '"mu" and "sigma"'),
        (['calc', f'--images={image_sets[0]}', f'--ref={bad["shape"]}', '--num=40', det], 'expected [D] and [D, D]'),
        (['calc', f'--images={image_sets[0]}', f'--ref={bad["dim"]}', '--num=40', det], '8-dimensional'),
        (['calc', f'--images={image_sets[0]}', f'--ref={bad["text"]}', '--num=40', det], 'cannot read reference'),
        (['calc', f'--images={image_sets[0]}', f'--ref={good_ref}', '--num=40', f'--detector={bad["missing"]}'],
         '--detector=PATH'),
        (['ref', f'--data={bad["empty"]}', f'--dest={tmp_path / "x.npz"}', det], 'No image files'),
    ]
    for args, message in cases:
        res = run(args + ['--device=cpu'])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output, (args, res.output)
        error_lines = [line for line in res.output.splitlines() if line.startswith('Error:')]
        assert len(error_lines) == 1 and 'Traceback' not in res.output, res.output
    assert not os.path.exists(tmp_path / 'x.npz')


def test_missing_detector_names_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.DETECTOR_ENV, raising=False)
    assert fid.detector_location() == fid.DETECTOR_URL
    with pytest.raises(ValueError) as info:
        fid.load_detector(f'file://{tmp_path}/absent.pkl')
    assert fid.DETECTOR_URL in str(info.value) and '--detector' in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process


@pytest.mark.slow
def test_two_process_calc_equals_one_process(tmp_path, image_sets, detector_pkl, repo_root):
    """torchrun with 2 CPU processes (gloo) prints the same FID as one process.

    The '--' after the script keeps torchrun from reading --num=40 as an abbreviation of its own --numa-binding.
    """
    dest = tmp_path / 'a.npz'
    assert run(['ref', f'--data={image_sets[0]}', f'--dest={dest}', f'--detector={detector_pkl}',
                '--device=cpu']).exit_code == 0
    args = ['calc', f'--images={image_sets[1]}', f'--ref={dest}', '--num=40', '--batch=8',
            f'--detector={detector_pkl}', '--device=cpu']
    single = run(args)
    assert single.exit_code == 0, single.output
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(repo_root, 'fid.py'), '--'] + args, cwd=repo_root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [line for line in res.stdout.splitlines() if line.strip()]
    assert float(printed[-1]) == pytest.approx(float(last_line(single.output)), rel=1e-5)
    assert sum(line == printed[-1] for line in printed) == 1     # only rank 0 prints the FID
