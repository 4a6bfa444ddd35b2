"""Fréchet Inception Distance (EDM's fid.py, edm-interface.md §1.4, §4.4, §4.5).

`fid.py calc` compares a folder or zip of images with reference statistics; `fid.py ref` computes those statistics for
a dataset. Both run as one process or under torchrun (features are extracted in parallel and the sums are reduced).
The detector is EDM's Inception-v3 pickle, or any pickle given with --detector / $EDM_FID_DETECTOR that is called as
``detector(uint8 NCHW, return_features=True) -> [N, D]``.

``--detector=pixels`` needs no download: the features are the pixels themselves (C·H·W values in EDM's scale
v/127.5 − 1, grey images kept at one channel), so the distance is the Fréchet distance in pixel space, the *pixel FD*
(not FID). An orthogonal transform of the pixels (such as the DCT) leaves it unchanged. It is refused with one line
unless there are at least PIXEL_IMAGES_PER_DIM images per pixel value (otherwise the D x D covariance cannot be
estimated). Pixel statistics record it (``detector`` = 'pixels' in the .npz; Inception statistics stay EDM's two
arrays), and pixel and Inception statistics are never compared with each other.
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Any, Optional, Union

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc

__all__ = ['DETECTOR_URL', 'DETECTOR_ENV', 'PIXELS', 'PIXEL_IMAGES_PER_DIM', 'load_detector', 'pixel_features',
           'pixel_stats', 'check_pixel_size', 'calculate_inception_stats', 'frechet_distance',
           'calculate_fid_from_inception_stats', 'load_reference_stats', 'check_same_detector', 'is_pixels',
           'save_reference_stats', 'main']

DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                'inception-2015-12-05.pkl')     # StyleGAN3's PyTorch port of TF inception-2015-12-05 (2048-d pool3)
DETECTOR_ENV = 'EDM_FID_DETECTOR'              # environment override of the detector path or URL
PIXELS = 'pixels'                              # --detector=pixels: the pixel FD (features = pixels), no download
PIXEL_IMAGES_PER_DIM = 10                      # the pixel FD needs N >= 10 * C*H*W images

# ---------------------------------------------------------------------------------------------------------------------
# Detector


def detector_location(detector: Optional[str] = None) -> str:
    """The detector to use: the argument, else $EDM_FID_DETECTOR, else EDM's Inception-v3 URL."""
    return detector or os.environ.get(DETECTOR_ENV) or DETECTOR_URL


def load_detector(detector: Optional[str] = None, device: Union[str, torch.device] = 'cpu',
                  verbose: bool = True) -> torch.nn.Module:
    """Unpickle the feature detector (plain pickle through dnnlib.util.open_url, as EDM) and move it to ``device``."""
    location = detector_location(detector)
    try:
        with dnnlib.util.open_url(location, verbose=verbose) as f:
            net = pickle.load(f)
    except Exception as err:
        reason = (str(err).splitlines() or [''])[0]
        raise ValueError(f'cannot load the feature detector from "{location}" ({type(err).__name__}: {reason}); '
                         f'download {DETECTOR_URL} and pass --detector=PATH (or set {DETECTOR_ENV})') from err
    if not callable(net) or not hasattr(net, 'to'):
        raise ValueError(f'"{location}" does not hold a detector module (got {type(net).__name__})')
    return net.to(device)


def is_pixels(detector: Optional[str]) -> bool:
    """True when the detector (argument or $EDM_FID_DETECTOR) is the pixel-space one."""
    return detector_location(detector) == PIXELS


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The pixel detector: uint8 [N, C, H, W] -> float64 [N, C*H*W] in EDM's data scale, v / 127.5 - 1."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f'pixel features need uint8 NCHW images, got {images.dtype} {list(images.shape)}')
    return images.flatten(1).to(torch.float64) / 127.5 - 1


def check_pixel_size(image_shape: Any, num_images: int, where: str = 'the images') -> None:
    """Refuse the pixel FD when N < PIXEL_IMAGES_PER_DIM * C*H*W: the covariance cannot be estimated from N images."""
    dim = int(np.prod(list(image_shape)))
    if num_images < PIXEL_IMAGES_PER_DIM * dim:
        shape = 'x'.join(str(int(v)) for v in image_shape)
        raise ValueError(f'--detector=pixels: {where} are {shape} = {dim} values, too many for {num_images} images '
                         f'(the pixel FD needs at least {PIXEL_IMAGES_PER_DIM} images per value, '
                         f'{PIXEL_IMAGES_PER_DIM * dim}); use smaller images or more of them')


def pixel_stats(images: torch.Tensor, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of the pixel features of uint8 NCHW images (in memory).

    The same sums as ``calculate_inception_stats(..., detector='pixels')``; refuses sets that are too small.
    """
    check_pixel_size(images.shape[1:], images.shape[0])
    dim = int(np.prod(images.shape[1:]))
    total, outer = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
    for start in range(0, images.shape[0], batch):
        f = pixel_features(images[start:start + batch].cpu())
        total += f.sum(0)
        outer += f.T @ f
    n = images.shape[0]
    mu = total / n
    return mu.numpy(), ((outer - n * torch.outer(mu, mu)) / (n - 1)).numpy()


class _PixelDetector(torch.nn.Module):
    """The ``--detector=pixels`` module, called like EDM's Inception pickle."""

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return pixel_features(images)


# ---------------------------------------------------------------------------------------------------------------------
# Images


class _GuardedImages(torch.utils.data.Dataset):
    """Wraps an image dataset so that a bad file becomes a message in the batch instead of a worker traceback."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> tuple[Optional[np.ndarray], str]:
        try:
            return self.dataset[idx][0], ''
        except Exception as err:  # decoding errors, mixed sizes, ...
            return None, (str(err).splitlines() or [type(err).__name__])[0]


def _collate(items: list) -> tuple[Optional[torch.Tensor], str]:
    """Stack uint8 CHW images, or return the first error found in the batch."""
    for image, error in items:
        if error:
            return None, error
    shapes = {tuple(image.shape) for image, _ in items}
    if len(shapes) > 1:
        return None, f'images of different shapes in one batch: {sorted(shapes)}; all images must have the same size'
    return torch.from_numpy(np.stack([image for image, _ in items])), ''


def open_images(image_path: str, num_expected: Optional[int] = None, seed: int = 0) -> Any:
    """EDM's image set for FID: an ImageFolderDataset, limited to a seeded random subset of ``num_expected`` images."""
    from training import dataset as dataset_module   # imported here: only needed when images are read
    try:
        images = dataset_module.ImageFolderDataset(path=image_path, max_size=num_expected, random_seed=seed)
    except (OSError, ValueError) as err:
        raise ValueError(f'cannot read images from "{image_path}": {err}') from err
    if num_expected is not None and len(images) < num_expected:
        raise ValueError(f'Found {len(images)} images, but expected at least {num_expected}')
    if len(images) < 2:
        raise ValueError(f'Found {len(images)} images, but need at least 2 to compute statistics')
    channels = images.image_shape[0]
    if channels not in (1, 3):
        raise ValueError(f'images in "{image_path}" have {channels} channels; the detector needs 1 (grey) or 3 (RGB)')
    return images


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def calculate_inception_stats(
    image_path: str,                            # folder (searched recursively) or zip of images
    num_expected: Optional[int] = None,         # use this many images (random subset); None = all
    seed: int = 0,                              # seed of that subset
    max_batch_size: int = 64,                   # images per detector call and process
    num_workers: int = 3,                       # DataLoader workers
    prefetch_factor: int = 2,                   # batches prefetched per worker
    device: Union[str, torch.device, None] = None,  # None: cuda if available, else cpu
    detector: Optional[str] = None,             # pickle path or URL, or 'pixels'; None: $EDM_FID_DETECTOR or EDM's URL
    progress: bool = True,                      # tqdm bar on rank 0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (fp64) of the detector features of the images (edm-interface §1.4).

    With ``detector='pixels'`` the features are the pixels (:func:`pixel_features`; grey stays one channel), and too
    few images for their number of values is an error (:func:`check_pixel_size`).

    Under torchrun every rank extracts the features of its share of the batches; the sums Σf and Σffᵀ are reduced.
    """
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size must be at least 1 (got {max_batch_size})')
    device = misc.pick_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()

    # Rank 0 goes first so that only it downloads; every rank fails alike on bad input.
    if rank != 0:
        dist.barrier()
    try:
        pixels = is_pixels(detector)
        dist.print0('Features: the pixels (pixel FD, not FID)' if pixels else 'Loading feature detector...')
        net = _PixelDetector() if pixels else load_detector(detector, device=device, verbose=(rank == 0))
        dist.print0(f'Loading images from "{image_path}"...')
        images = open_images(image_path, num_expected, seed)
        if pixels:
            check_pixel_size(images.image_shape, len(images), f'the images in "{image_path}"')
    finally:
        if rank == 0:
            dist.barrier()

    # EDM's split: ⌈n/(batch·world)⌉·world near-equal chunks, dealt round-robin to the ranks.
    num_batches = ((len(images) - 1) // (max_batch_size * world) + 1) * world
    batches = [b.tolist() for b in np.array_split(np.arange(len(images)), num_batches)[rank::world] if len(b)]
    loader = torch.utils.data.DataLoader(_GuardedImages(images), batch_sampler=batches, collate_fn=_collate,
                                         num_workers=num_workers,
                                         prefetch_factor=(prefetch_factor if num_workers > 0 else None))

    dist.print0(f'Calculating statistics for {len(images)} images...')
    feature_sum: Optional[torch.Tensor] = None
    outer_sum: Optional[torch.Tensor] = None
    with torch.no_grad():
        for batch, error in tqdm.tqdm(loader, unit='batch', disable=(rank != 0 or not progress)):
            if batch is None:
                raise ValueError(f'cannot read images from "{image_path}": {error}')
            if batch.shape[1:] != tuple(images.image_shape):
                raise ValueError(f'images in "{image_path}" differ in size: {list(batch.shape[1:])} vs '
                                 f'{images.image_shape}; all images must have the same size')
            if batch.shape[1] == 1 and not pixels:
                batch = batch.repeat([1, 3, 1, 1])
            features = net(batch.to(device), return_features=True)
            if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != batch.shape[0]:
                raise ValueError(f'the detector must return [N, D] features; got '
                                 f'{getattr(features, "shape", type(features).__name__)}')
            features = features.to(torch.float64)
            if feature_sum is None:
                feature_sum = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
                outer_sum = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=device)
            feature_sum += features.sum(0)
            outer_sum += features.T @ features

    # Grand totals over ranks (a rank without images learns the feature size from the others).
    dim = torch.tensor([0 if feature_sum is None else feature_sum.shape[0]], dtype=torch.int64, device=device)
    if dist.is_initialized():
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
    dim = int(dim.item())
    if feature_sum is None:
        feature_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    if dist.is_initialized():
        torch.distributed.all_reduce(feature_sum)
        torch.distributed.all_reduce(outer_sum)

    n = len(images)
    mu = feature_sum / n
    sigma = (outer_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _sqrtm_checked(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's matrix square root, and whether it is trustworthy (finite, no singular/ill-conditioned warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        root = scipy.linalg.sqrtm(a)       # no disp=: removed in SciPy 1.18
    trouble = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return root, bool(np.isfinite(root).all()) and not trouble


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}), the Fréchet distance of two Gaussians, in float64.

    When the product is singular or ill-conditioned, the square root is taken of (Σ₁ + εI)(Σ₂ + εI) instead. A tiny
    imaginary part from round-off is dropped; a large one (the covariances are not positive semi-definite) is an error.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f'means must be vectors of the same length, got shapes {mu1.shape} and {mu2.shape}')
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'covariances must be [{d}, {d}] to match the means, got {sigma1.shape} and {sigma2.shape}')
    for name, value in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f'{name} contains NaN or infinite values')

    root, ok = _sqrtm_checked(sigma1 @ sigma2)
    if not ok:
        offset = np.eye(d) * eps
        root, ok = _sqrtm_checked((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(root).all():
            raise ValueError('the matrix square root of the covariance product is not finite, even with an '
                             f'offset of {eps:g} on the diagonal')
    if np.iscomplexobj(root):
        diag = np.diagonal(root)
        limit = 1e-3 * max(1.0, float(np.abs(diag.real).max()))
        worst = float(np.abs(diag.imag).max())
        if worst > limit:
            raise ValueError(f'the square root of the covariance product has an imaginary part of {worst:g} on its '
                             f'diagonal; are both covariances positive semi-definite?')
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def calculate_fid_from_inception_stats(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray,
                                       sigma_ref: np.ndarray) -> float:
    """EDM's name for the FID of two sets of feature statistics (see :func:`frechet_distance`)."""
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics (.npz with mu [D] and sigma [D, D], float64)


def load_reference_stats(path: str, verbose: bool = True, with_detector: bool = False) -> tuple:
    """Read and check EDM's reference ``.npz`` (path or URL): (mu, sigma), and with ``with_detector`` also the
    detector it records (``'pixels'``, a detector location, or None for files without one, such as EDM's)."""
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            with np.load(f, allow_pickle=False) as data:
                contents = {key: data[key] for key in data.files}
    except Exception as err:
        reason = (str(err).splitlines() or [''])[0]
        raise ValueError(f'cannot read reference statistics "{path}" ({type(err).__name__}: {reason})') from err
    if 'mu' not in contents or 'sigma' not in contents:
        raise ValueError(f'reference statistics "{path}" must contain arrays "mu" and "sigma"; found '
                         f'{sorted(contents) or "none"}')
    mu, sigma = contents['mu'], contents['sigma']
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'reference statistics "{path}" have mu {list(mu.shape)} and sigma {list(sigma.shape)}; '
                         f'expected [D] and [D, D]')
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise ValueError(f'reference statistics "{path}" are not numeric ({mu.dtype}, {sigma.dtype})')
    if not with_detector:
        return mu.astype(np.float64), sigma.astype(np.float64)
    recorded = contents.get('detector')
    recorded = None if recorded is None or recorded.ndim != 0 else str(recorded)
    return mu.astype(np.float64), sigma.astype(np.float64), recorded


def check_same_detector(recorded: Optional[str], detector: Optional[str], ref_path: str) -> None:
    """Refuse comparing pixel statistics with detector (Inception) statistics, either way round."""
    ref_pixels, now_pixels = recorded == PIXELS, is_pixels(detector)
    if ref_pixels and not now_pixels:
        raise ValueError(f'reference statistics "{ref_path}" are pixel statistics (--detector=pixels); '
                         f'pass --detector=pixels to compare with them')
    if now_pixels and not ref_pixels:
        raise ValueError(f'reference statistics "{ref_path}" are not pixel statistics (detector: '
                         f'{recorded or "Inception, not recorded"}); make them with fid.py ref --detector=pixels')


def save_reference_stats(path: str, mu: np.ndarray, sigma: np.ndarray, detector: Optional[str] = None) -> None:
    """Write ``np.savez(path, mu=mu, sigma=sigma[, detector=...])``, creating parent folders. As np.savez, a name
    without ``.npz`` gets it appended. ``detector`` (a string, e.g. 'pixels') is stored as a 0-d array; EDM's readers
    ignore it. The file is written atomically: into a temporary file in the same folder (through an open file object,
    so np.savez adds no suffix to it), then renamed into place."""
    if not path.endswith('.npz'):
        path += '.npz'
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    extra = {} if detector is None else {'detector': np.array(str(detector))}
    dnnlib.util.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **extra))


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@click.group()
def main() -> None:
    """Calculate Fréchet Inception Distance (FID), EDM-compatible; or, with --detector=pixels, the pixel FD.

    Examples:

    \b
    # Generate 50000 images, then compare them with CIFAR-10's reference statistics
    torchrun --standalone --nproc_per_node=1 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs \\
        --network=NET.pkl
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz

    \b
    # Under torchrun, '--' after the script name stops torchrun from taking --num=N for its own --numa-binding
    torchrun --standalone --nproc_per_node=2 fid.py -- calc --images=fid-tmp --ref=REF.npz --num=10000

    \b
    # Offline: a local copy of the Inception detector
    python fid.py calc --images=fid-tmp --ref=REF.npz --detector=inception-2015-12-05.pkl

    \b
    # No detector at all, small images: the pixel FD (Frechet distance of the pixels in [-1, 1]; not FID). Needs at
    # least 10 images per pixel value (C*H*W): 1920 for 8x8 RGB, 2560 for 16x16 grey, 7680 for 16x16 RGB
    python fid.py ref --data=datasets/patches-8x8.zip --dest=fid-refs/patches-8x8-pixels.npz --detector=pixels
    python fid.py calc --images=out --ref=fid-refs/patches-8x8-pixels.npz --num=10000 --detector=pixels
    """


def _cli_workers() -> int:
    """EDM's 3 DataLoader workers, or fewer on a machine with fewer cores available to this process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(3, cores))


def _detector_option() -> Any:
    return click.option('--detector', help=f'Feature detector pickle, or "pixels" for the pixel FD (no download)  '
                                          f'[default: ${DETECTOR_ENV} or EDM\'s Inception-v3 URL]',
                        metavar='PKL|URL|pixels', type=str, default=None)


def _device_option() -> Any:
    return click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str,
                        default=None)


@main.command()
@click.option('--images', 'image_path', help='Path to the images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', 'num_expected', help='Number of images to use', metavar='INT', type=click.IntRange(min=2),
              default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_detector_option()
@_device_option()
def calc(image_path: str, ref_path: str, num_expected: int, seed: int, batch: int, detector: Optional[str],
         device: Optional[str]) -> None:
    """Calculate FID for a given set of images."""
    try:
        dev = dist.init(device)
        ref = None
        if dist.get_rank() == 0:
            print(f'Loading dataset reference statistics from "{ref_path}"...')
            ref = load_reference_stats(ref_path, with_detector=True)
            check_same_detector(ref[2], detector, ref_path)
        mu, sigma = calculate_inception_stats(image_path, num_expected=num_expected, seed=seed, max_batch_size=batch,
                                              num_workers=_cli_workers(), device=dev, detector=detector)
        dist.print0('Calculating pixel FD (Frechet distance of the pixels, not FID)...' if is_pixels(detector)
                    else 'Calculating FID...')
        if ref is not None:
            if ref[0].shape != mu.shape:
                raise ValueError(f'reference statistics "{ref_path}" are {ref[0].shape[0]}-dimensional but the '
                                 f'detector gives {mu.shape[0]} features')
            print(f'{calculate_fid_from_inception_stats(mu, sigma, ref[0], ref[1]):g}')
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    dist.barrier()


@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_detector_option()
@_device_option()
def ref(dataset_path: str, dest_path: str, batch: int, detector: Optional[str], device: Optional[str]) -> None:
    """Calculate dataset reference statistics needed by 'calc'."""
    try:
        dev = dist.init(device)
        mu, sigma = calculate_inception_stats(dataset_path, max_batch_size=batch, num_workers=_cli_workers(),
                                              device=dev, detector=detector)
        dist.print0(f'Saving dataset reference statistics to "{dest_path}"...')
        if dist.get_rank() == 0:
            save_reference_stats(dest_path, mu, sigma, detector=PIXELS if is_pixels(detector) else None)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
    dist.barrier()
    dist.print0('Done.')


if __name__ == '__main__':
    main()
