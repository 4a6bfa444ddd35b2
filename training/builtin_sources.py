"""Built-in dataset_tool.py sources: real images that ship inside scikit-learn and scikit-image (no download).

``--source=NAME[:key=value,...]`` (the options after the colon are specific to each source):

- ``sklearn-digits``: scikit-learn's 1,797 handwritten digits (8x8, grey levels 0..16, mapped to 0..255 as
  round(255 v / 16)) with their class labels 0-9, in scikit-learn's order. ``size=8`` (default) keeps 8x8;
  ``size=16`` makes 16x16, by ``mode=pad`` (default: the 8x8 digit centred on a black 16x16 canvas) or ``mode=nearest``
  (each pixel repeated 2x2, so the 8x8 image is exactly recoverable).
- ``photo-patches``: random square crops of the photographs shipped with scikit-learn (``load_sample_images``: china,
  flower) and scikit-image (``skimage.data``: astronaut, camera, chelsea, coffee, coins, rocket, moon, ...), at
  ``--resolution`` (required, square). Each patch picks a photograph uniformly and a position uniformly from a
  generator seeded with ``seed`` (default 0), so the same options always give the same zip. Options:
  ``color=rgb`` (default; grey photographs are repeated on three channels) or ``color=grey`` (ITU-R 601 luma, PIL's
  'L'); ``zoom=K`` (default 1) crops K·R x K·R pixels and averages K x K blocks down to R x R; ``labels=1`` stores the
  photograph's index (in the ``photos`` order) as the class label (default 0: unlabelled); ``photos=a+b+...``
  chooses a subset (default: all of :data:`PHOTOS`). ``--max-images`` is the number of patches (default 10000).

Only :func:`open_builtin` is used by dataset_tool.py; scikit-learn / scikit-image are imported when a source needs them.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterator, Optional

import click
import numpy as np

Record = dict  # {'img': HWC or HW uint8 array, 'label': int | None, 'name': str}

NAMES = ('sklearn-digits', 'photo-patches')
DEFAULT_PATCHES = 10000

# Photographs, in label order: (name, package). All are files inside the installed wheels (no network fetch).
PHOTOS: tuple[tuple[str, str], ...] = (
    ('china', 'sklearn'), ('flower', 'sklearn'),
    ('astronaut', 'skimage'), ('camera', 'skimage'), ('chelsea', 'skimage'), ('coffee', 'skimage'),
    ('coins', 'skimage'), ('rocket', 'skimage'), ('moon', 'skimage'), ('hubble_deep_field', 'skimage'),
    ('immunohistochemistry', 'skimage'), ('clock', 'skimage'), ('brick', 'skimage'), ('grass', 'skimage'),
    ('gravel', 'skimage'),
)


def _import(module: str, package: str) -> object:
    try:
        return __import__(module, fromlist=['_'])
    except ImportError:
        raise click.ClickException(f'this --source needs {package} (pip install -r requirements.txt)')


def parse_spec(source: str) -> Optional[tuple[str, dict[str, str]]]:
    """'photo-patches:color=grey,seed=3' -> ('photo-patches', {'color': 'grey', 'seed': '3'}); None if not built-in.

    A path that exists on disk is never taken for a built-in source.
    """
    m = re.fullmatch(r'([a-z-]+)(?::(.*))?', source)
    if not m or m.group(1) not in NAMES or os.path.exists(source):
        return None
    opts: dict[str, str] = {}
    for item in filter(None, (m.group(2) or '').split(',')):
        key, sep, value = item.partition('=')
        if not sep or not key or not value:
            raise click.ClickException(f'--source={source}: options must be key=value, separated by commas; '
                                       f'got {item!r}')
        opts[key.strip()] = value.strip()
    return m.group(1), opts


def _take(opts: dict[str, str], where: str, key: str, default: str, choices: Optional[tuple[str, ...]] = None) -> str:
    value = opts.pop(key, default)
    if choices is not None and value not in choices:
        raise click.ClickException(f'{where}: {key} must be one of {"|".join(choices)}, got {value!r}')
    return value


def _take_int(opts: dict[str, str], where: str, key: str, default: int, low: int) -> int:
    value = opts.pop(key, str(default))
    if not re.fullmatch(r'-?\d+', value) or int(value) < low:
        raise click.ClickException(f'{where}: {key} must be an integer >= {low}, got {value!r}')
    return int(value)


def _no_more(opts: dict[str, str], where: str, known: str) -> None:
    if opts:
        raise click.ClickException(f'{where}: unknown option(s) {", ".join(sorted(opts))}; known: {known}')


# ---------------------------------------------------------------------------------------------------------------------
# sklearn-digits


def digits_images(size: int = 8, mode: str = 'pad') -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, size, size] and their labels int64 [N] (see the module docstring)."""
    datasets = _import('sklearn.datasets', 'scikit-learn')
    bunch = datasets.load_digits()
    imgs = np.round(np.asarray(bunch.images, dtype=np.float64) * (255 / 16)).astype(np.uint8)
    if size == 16 and mode == 'pad':
        imgs = np.pad(imgs, [(0, 0), (4, 4), (4, 4)])
    elif size == 16:
        imgs = imgs.repeat(2, axis=1).repeat(2, axis=2)
    return imgs, np.asarray(bunch.target, dtype=np.int64)


def _open_digits(opts: dict[str, str], where: str, max_images: Optional[int],
                 resolution: Optional[tuple[int, int]]) -> tuple[int, Iterator[Record]]:
    size = int(_take(opts, where, 'size', '8', ('8', '16')))
    mode = _take(opts, where, 'mode', 'pad', ('pad', 'nearest'))
    _no_more(opts, where, 'size=8|16, mode=pad|nearest')
    imgs, labels = digits_images(size, mode)
    count = len(imgs) if max_images is None else min(len(imgs), max_images)

    def iterate() -> Iterator[Record]:
        for i in range(count):
            yield dict(img=imgs[i], label=int(labels[i]), name=f'sklearn-digits[{i}]')

    return count, iterate()


# ---------------------------------------------------------------------------------------------------------------------
# photo-patches


def load_photo(name: str) -> np.ndarray:
    """One shipped photograph as uint8 HxW (grey) or HxWx3 (RGB)."""
    package = dict(PHOTOS).get(name)
    if package is None:
        raise click.ClickException(f'unknown photograph {name!r}; known: {"+".join(n for n, _ in PHOTOS)}')
    if package == 'sklearn':
        datasets = _import('sklearn.datasets', 'scikit-learn')
        return np.asarray(datasets.load_sample_image(f'{name}.jpg'), dtype=np.uint8)
    data = _import('skimage.data', 'scikit-image')
    img = np.asarray(getattr(data, name)())
    if img.dtype != np.uint8:
        raise click.ClickException(f'skimage.data.{name} is {img.dtype}, expected uint8')
    return img[:, :, :3] if img.ndim == 3 else img


def _colour(img: np.ndarray, color: str) -> np.ndarray:
    if color == 'rgb':
        return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img
    if img.ndim == 2:
        return img
    import PIL.Image
    return np.asarray(PIL.Image.fromarray(img, 'RGB').convert('L'))


def patch_plan(shapes: list[tuple[int, int]], count: int, side: int, seed: int) -> np.ndarray:
    """[count, 3] int64 rows (photo, top, left) of the crops: photo uniform, then top/left uniform within it."""
    rng = np.random.default_rng(seed)
    photo = rng.integers(len(shapes), size=count)
    h = np.array([s[0] for s in shapes])[photo]
    w = np.array([s[1] for s in shapes])[photo]
    top = np.floor(rng.random(count) * (h - side + 1)).astype(np.int64)
    left = np.floor(rng.random(count) * (w - side + 1)).astype(np.int64)
    return np.stack([photo, top, left], axis=1)


def _open_patches(opts: dict[str, str], where: str, max_images: Optional[int],
                  resolution: Optional[tuple[int, int]]) -> tuple[int, Iterator[Record]]:
    color = _take(opts, where, 'color', 'rgb', ('rgb', 'grey'))
    zoom = _take_int(opts, where, 'zoom', 1, 1)
    seed = _take_int(opts, where, 'seed', 0, 0)
    labelled = _take(opts, where, 'labels', '0', ('0', '1')) == '1'
    names = _take(opts, where, 'photos', '+'.join(n for n, _ in PHOTOS)).split('+')
    _no_more(opts, where, 'color=rgb|grey, zoom=K, seed=N, labels=0|1, photos=a+b+...')
    if resolution is None or resolution[0] != resolution[1]:
        raise click.ClickException(f'{where} needs a square --resolution=RxR (e.g. 16x16)')
    if len(set(names)) != len(names):
        raise click.ClickException(f'{where}: photos lists a photograph twice')
    res = resolution[0]
    side = res * zoom
    photos = [_colour(load_photo(n), color) for n in names]
    small = [n for n, p in zip(names, photos) if min(p.shape[:2]) < side]
    if small:
        raise click.ClickException(f'{where}: crops of {side}x{side} do not fit in {", ".join(small)}')
    count = DEFAULT_PATCHES if max_images is None else max_images
    plan = patch_plan([p.shape[:2] for p in photos], count, side, seed)

    def iterate() -> Iterator[Record]:
        for i, (k, top, left) in enumerate(plan):
            crop = photos[k][top:top + side, left:left + side].astype(np.float64)
            if zoom > 1:
                crop = crop.reshape(res, zoom, res, zoom, *crop.shape[2:]).mean(axis=(1, 3))
            img = np.round(crop).astype(np.uint8)
            yield dict(img=img, label=int(k) if labelled else None, name=f'photo-patches[{i}] ({names[k]})')

    return count, iterate()


_OPENERS: dict[str, Callable] = {'sklearn-digits': _open_digits, 'photo-patches': _open_patches}


def open_builtin(source: str, *, max_images: Optional[int],
                 resolution: Optional[tuple[int, int]]) -> Optional[tuple[int, Iterator[Record]]]:
    """(count, records) for a built-in ``--source`` spec, or None when `source` is not one (then it is a path).

    Every option is checked here, before dataset_tool writes anything.
    """
    spec = parse_spec(source)
    if spec is None:
        return None
    name, opts = spec
    return _OPENERS[name](dict(opts), f'--source={source}', max_images, resolution)
