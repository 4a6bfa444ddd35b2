"""fid.py --detector=pixels: the Fréchet distance in pixel space ("pixel FD"), its size limit and its statistics files."""

import io
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.fft
import torch
from click.testing import CliRunner

import fid
from tests.datagen import make_dataset_zip


def run_fid(*args: str):
    return CliRunner().invoke(fid.main, list(args))


def one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert 'Traceback' not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith('Error:')]
    assert len(lines) == 1, result.output
    return lines[0]


def write_zip(path, images):
    """uint8 NCHW -> an EDM-layout zip of PNGs."""
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, img in enumerate(images):
            hwc = img.transpose(1, 2, 0)
            buf = io.BytesIO()
            PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format='png')
            z.writestr(f'00000/img{i:08d}.png', buf.getvalue())
        z.writestr('dataset.json', '{"labels": null}')
    return str(path)


def dct_gaussian_images(n, res, variances, shift, seed):
    """n grey res x res images: x = shift + U diag(sqrt(variances)) z with U the orthonormal 2-D DCT basis, quantised
    to 8 bits in EDM's scale. Returns (uint8 [n, 1, res, res], pixel mean [D], pixel covariance [D, D])."""
    rng = np.random.default_rng(seed)
    coef = rng.standard_normal((n, res, res)) * np.sqrt(variances)
    x = scipy.fft.idctn(coef, axes=(1, 2), norm='ortho') + shift
    images = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)[:, None]
    basis = scipy.fft.idctn(np.eye(res * res).reshape(-1, res, res), axes=(1, 2), norm='ortho').reshape(res * res, -1)
    cov = basis.T @ np.diag(variances.ravel()) @ basis
    return images, np.full(res * res, shift), cov


def test_same_set_is_zero_cli(tmp_path):
    data = make_dataset_zip(str(tmp_path / 'a.zip'), n=200, res=4, channels=1)
    ref = str(tmp_path / 'ref.npz')
    res = run_fid('ref', f'--data={tmp_path / "a.zip"}', f'--dest={ref}', '--detector=pixels', '--device=cpu')
    assert res.exit_code == 0, res.output
    assert 'not FID' in res.output
    with np.load(ref) as z:
        assert sorted(z.files) == ['detector', 'mu', 'sigma'] and str(z['detector']) == 'pixels'
        assert z['mu'].shape == (16,) and z['sigma'].shape == (16, 16)
        mu_ref, sigma_ref = z['mu'], z['sigma']
    # The statistics are those of the pixels in [-1, 1] (grey stays one channel).
    feats = data['images'].reshape(200, -1).astype(np.float64) / 127.5 - 1
    assert np.allclose(mu_ref, feats.mean(0)) and np.allclose(sigma_ref, np.cov(feats, rowvar=False))
    res = run_fid('calc', f'--images={tmp_path / "a.zip"}', f'--ref={ref}', '--num=200', '--detector=pixels',
                  '--device=cpu')
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert 'pixel FD' in lines[-2] and 'FID' not in lines[-2].replace('not FID', '')
    assert abs(float(lines[-1])) < 1e-6


def test_two_gaussians_match_closed_form():
    res = 4
    k = np.add.outer(np.arange(res), np.arange(res)) + 1.0
    var1, var2 = 0.05 / k ** 2, 0.02 / k ** 1.5        # 1/f^2-like spectra on the DCT coefficients
    a, mu1, cov1 = dct_gaussian_images(40000, res, var1, 0.0, seed=1)
    b, mu2, cov2 = dct_gaussian_images(40000, res, var2, 0.1, seed=2)
    # Closed form of two Gaussians diagonal in the same (DCT) basis: ||mu1 - mu2||^2 + sum (sqrt l1 - sqrt l2)^2.
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))
    assert np.isclose(fid.frechet_distance(mu1, cov1, mu2, cov2), closed, rtol=1e-6)   # pixel basis, exact moments
    est = fid.frechet_distance(*fid.pixel_stats(torch.from_numpy(a)), *fid.pixel_stats(torch.from_numpy(b)))
    assert est == pytest.approx(closed, rel=0.02)
    # A set against itself is ~0, and a fresh draw of the same Gaussian is far closer than the other one.
    assert abs(fid.frechet_distance(*fid.pixel_stats(torch.from_numpy(a)), *fid.pixel_stats(torch.from_numpy(a)))) \
        < 1e-8
    a2, _, _ = dct_gaussian_images(40000, res, var1, 0.0, seed=3)
    same = fid.frechet_distance(*fid.pixel_stats(torch.from_numpy(a)), *fid.pixel_stats(torch.from_numpy(a2)))
    assert 0 <= same < 0.01 * closed


def test_pixel_stats_match_the_cli(tmp_path):
    images, _, _ = dct_gaussian_images(500, 4, np.full((4, 4), 0.05), 0.0, seed=4)
    rgb = np.concatenate([images, images // 2, 255 - images], axis=1)   # 3x4x4 = 48 values
    path = write_zip(tmp_path / "rgb.zip", rgb)
    ref = str(tmp_path / 'rgb.npz')
    assert run_fid('ref', f'--data={path}', f'--dest={ref}', '--detector=pixels', '--device=cpu').exit_code == 0
    mu, sigma = fid.load_reference_stats(ref, verbose=False)
    mu2, sigma2 = fid.pixel_stats(torch.from_numpy(np.ascontiguousarray(rgb)))
    assert mu.shape == (48,) and np.allclose(mu, mu2) and np.allclose(sigma, sigma2)


@pytest.mark.parametrize('command', ['ref', 'calc'])
def test_too_large_is_refused_in_one_line(tmp_path, command):
    make_dataset_zip(str(tmp_path / 'big.zip'), n=100, res=8, channels=3)       # 192 values, 100 images
    small = make_dataset_zip(str(tmp_path / 'small.zip'), n=200, res=4, channels=1)
    assert small['images'].shape == (200, 1, 4, 4)
    ref = str(tmp_path / 'ref.npz')
    assert run_fid('ref', f'--data={tmp_path / "small.zip"}', f'--dest={ref}', '--detector=pixels').exit_code == 0
    dest = tmp_path / 'out.npz'
    if command == 'ref':
        result = run_fid('ref', f'--data={tmp_path / "big.zip"}', f'--dest={dest}', '--detector=pixels')
    else:
        result = run_fid('calc', f'--images={tmp_path / "big.zip"}', f'--ref={ref}', '--num=100', '--detector=pixels')
    line = one_error_line(result)
    assert '3x8x8 = 192 values' in line and '100 images' in line and '1920' in line
    assert not dest.exists()
    with pytest.raises(ValueError, match='too many for 150 images'):
        fid.pixel_stats(torch.zeros([150, 1, 4, 4], dtype=torch.uint8))
    fid.pixel_stats(torch.zeros([160, 1, 4, 4], dtype=torch.uint8))           # exactly 10 per value is enough


def test_detectors_are_never_mixed(tmp_path):
    make_dataset_zip(str(tmp_path / 'a.zip'), n=200, res=4, channels=1)
    pixel_ref = str(tmp_path / 'pixels.npz')
    assert run_fid('ref', f'--data={tmp_path / "a.zip"}', f'--dest={pixel_ref}', '--detector=pixels').exit_code == 0
    line = one_error_line(run_fid('calc', f'--images={tmp_path / "a.zip"}', f'--ref={pixel_ref}', '--num=200',
                                  '--detector=some-inception.pkl'))
    assert 'pixel statistics' in line and '--detector=pixels' in line
    inception_ref = str(tmp_path / 'inception.npz')          # EDM's format: mu and sigma only
    mu, sigma = fid.load_reference_stats(pixel_ref, verbose=False)
    np.savez(inception_ref, mu=mu, sigma=sigma)
    line = one_error_line(run_fid('calc', f'--images={tmp_path / "a.zip"}', f'--ref={inception_ref}', '--num=200',
                                  '--detector=pixels'))
    assert 'not pixel statistics' in line
    os.environ[fid.DETECTOR_ENV] = 'pixels'                  # the environment selects it as well
    try:
        result = run_fid('calc', f'--images={tmp_path / "a.zip"}', f'--ref={pixel_ref}', '--num=200')
    finally:
        del os.environ[fid.DETECTOR_ENV]
    assert result.exit_code == 0, result.output
    assert abs(float(result.output.strip().splitlines()[-1])) < 1e-6
