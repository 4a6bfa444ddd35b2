"""Convert image collections into EDM's dataset layout (edm-interface.md §1.5, §4.3).

Library first: `convert_dataset(source, dest, ...)` does the work and raises `click.ClickException` with one line for
every bad input; the click command `main` only parses options.
"""

import functools
import gzip
import io
import json
import os
import pickle
import re
import tarfile
import zipfile
from typing import Callable, Iterator, Optional

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

from training import builtin_sources

Record = dict  # {'img': HWC or HW uint8 array, 'label': int | list | None, 'name': str}
Transform = Callable[[np.ndarray], Optional[np.ndarray]]

# ---------------------------------------------------------------------------------------------------------------------
# Helpers.


def parse_tuple(s: str) -> tuple[int, int]:
    """'512x384' or '512,384' -> (512, 384)."""
    m = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', s)
    if not m:
        raise click.ClickException(f'cannot parse tuple {s!r}; expected WxH, e.g. 64x64')
    return int(m.group(1)), int(m.group(2))


def _is_image(fname: str) -> bool:
    return os.path.splitext(fname)[1].lower() in PIL.Image.EXTENSION


def _decode(data: bytes, name: str) -> np.ndarray:
    """Decode one image file, naming it in the error when it is unreadable."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im)
    except PIL.UnidentifiedImageError:
        raise click.ClickException(f'Cannot read image {name}: not a recognised image file (corrupt or truncated?)')
    except Exception as e:
        raise click.ClickException(f'Cannot read image {name}: {type(e).__name__}: {e}'.replace('\n', ' '))


def _check_label(label: object, where: str) -> object:
    """Accept an int class id or a list of numbers (vector label); reject anything else."""
    if isinstance(label, bool) or not isinstance(label, (int, list)):
        raise click.ClickException(f'{where}: label must be an integer class id, got {label!r}')
    if isinstance(label, int) and label < 0:
        raise click.ClickException(f'{where}: label must be a non-negative class id, got {label}')
    if isinstance(label, list) and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label):
        raise click.ClickException(f'{where}: vector label must be a list of numbers, got {label!r}')
    return label


def _read_label_table(text: bytes, where: str) -> Optional[dict]:
    """Parse dataset.json into {relpath: label}, or None for `{"labels": null}`."""
    try:
        data = json.loads(text)
        entries = data['labels']
    except (ValueError, KeyError, TypeError) as e:
        raise click.ClickException(f'{where}: not a valid dataset.json ({type(e).__name__}: {e})')
    if entries is None:
        return None
    if not isinstance(entries, list) or not all(isinstance(x, list) and len(x) == 2 for x in entries):
        raise click.ClickException(f'{where}: "labels" must be a list of [path, label] pairs or null')
    return {str(k).replace('\\', '/'): _check_label(v, f'{where}: {k}') for k, v in entries}


def _label_for(table: Optional[dict], relpath: str, where: str) -> object:
    if table is None:
        return None
    if relpath not in table:
        raise click.ClickException(f'{where} has no label for image {relpath}')
    return table[relpath]


# ---------------------------------------------------------------------------------------------------------------------
# Sources. Each returns (number of images that will be read, iterator of records).


def open_image_folder(source_dir: str, *, max_images: Optional[int]) -> tuple[int, Iterator[Record]]:
    """All image files under `source_dir`, recursively, sorted; labels from dataset.json or top-level folders."""
    rel = []
    for root, _dirs, files in os.walk(source_dir):
        for f in files:
            if _is_image(f):
                rel.append(os.path.relpath(os.path.join(root, f), source_dir).replace('\\', '/'))
    rel.sort()
    count = len(rel) if max_images is None else min(len(rel), max_images)

    meta = os.path.join(source_dir, 'dataset.json')
    table = None
    if os.path.isfile(meta):
        with open(meta, 'rb') as f:
            table = _read_label_table(f.read(), meta)
    else:
        tops = sorted({p.split('/')[0] if '/' in p else '' for p in rel})
        if len(tops) > 1:
            ids = {t: i for i, t in enumerate(tops)}
            table = {p: ids[p.split('/')[0] if '/' in p else ''] for p in rel}

    def iterate() -> Iterator[Record]:
        for p in rel[:count]:
            full = os.path.join(source_dir, p)
            with open(full, 'rb') as f:
                img = _decode(f.read(), full)
            yield dict(img=img, label=_label_for(table, p, meta), name=full)

    return count, iterate()


def open_image_zip(source: str, *, max_images: Optional[int]) -> tuple[int, Iterator[Record]]:
    """All image entries of a zip, sorted; labels from its dataset.json."""
    try:
        with zipfile.ZipFile(source) as z:
            names = sorted(n for n in z.namelist() if _is_image(n))
            table = _read_label_table(z.read('dataset.json'), f'{source}:dataset.json') \
                if 'dataset.json' in z.namelist() else None
    except zipfile.BadZipFile as e:
        raise click.ClickException(f'Cannot read zip {source}: {e}')
    count = len(names) if max_images is None else min(len(names), max_images)

    def iterate() -> Iterator[Record]:
        with zipfile.ZipFile(source) as z:
            for n in names[:count]:
                img = _decode(z.read(n), f'{source}:{n}')
                yield dict(img=img, label=_label_for(table, n, f'{source}:dataset.json'), name=f'{source}:{n}')

    return count, iterate()


def open_cifar10(tarball: str, *, max_images: Optional[int]) -> tuple[int, Iterator[Record]]:
    """The training batches (data_batch_1..5) of the CIFAR-10 python tarball, with class labels."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for b in range(1, 6):
                member = tar.extractfile(f'cifar-10-batches-py/data_batch_{b}')
                if member is None:
                    raise KeyError(f'data_batch_{b}')
                batch = pickle.load(member, encoding='latin1')
                images.append(np.asarray(batch['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch['labels'], dtype=np.int64))
    except (tarfile.TarError, KeyError, OSError, pickle.UnpicklingError, ValueError, EOFError) as e:
        raise click.ClickException(f'Cannot read CIFAR-10 tarball {tarball}: {type(e).__name__}: {e}')
    imgs = np.concatenate(images).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    labs = np.concatenate(labels)
    if len(imgs) != len(labs) or (labs.size and (labs.min() < 0 or labs.max() > 9)):
        raise click.ClickException(f'CIFAR-10 tarball {tarball} has inconsistent images/labels')
    count = len(imgs) if max_images is None else min(len(imgs), max_images)

    def iterate() -> Iterator[Record]:
        for i in range(count):
            yield dict(img=imgs[i], label=int(labs[i]), name=f'{tarball}[{i}]')

    return count, iterate()


def open_mnist(images_gz: str, *, max_images: Optional[int]) -> tuple[int, Iterator[Record]]:
    """MNIST idx files, zero-padded from 28x28 to 32x32, with labels from the sibling labels file."""
    labels_gz = images_gz.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    try:
        with gzip.open(images_gz, 'rb') as f:
            imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels_gz, 'rb') as f:
            labs = np.frombuffer(f.read(), np.uint8, offset=8)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'Cannot read MNIST files {images_gz} / {labels_gz}: {e}')
    if len(imgs) != len(labs):
        raise click.ClickException(f'MNIST: {len(imgs)} images but {len(labs)} labels')
    imgs = np.pad(imgs, [(0, 0), (2, 2), (2, 2)])
    count = len(imgs) if max_images is None else min(len(imgs), max_images)

    def iterate() -> Iterator[Record]:
        for i in range(count):
            yield dict(img=imgs[i], label=int(labs[i]), name=f'{images_gz}[{i}]')

    return count, iterate()


def open_lmdb(lmdb_dir: str, *, max_images: Optional[int]) -> tuple[int, Iterator[Record]]:
    """LSUN LMDB directory (needs the optional `lmdb` package), unlabelled."""
    try:
        import lmdb  # type: ignore
    except ImportError:
        raise click.ClickException('Reading *_lmdb sources needs the lmdb package (pip install lmdb)')
    with lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False) as txn:
        total = txn.stat()['entries']
    count = total if max_images is None else min(total, max_images)

    def iterate() -> Iterator[Record]:
        with lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False) as txn:
            for i, (key, value) in enumerate(txn.cursor()):
                if i >= count:
                    break
                yield dict(img=_decode(value, f'{lmdb_dir}:{key!r}'), label=None, name=f'{lmdb_dir}:{key!r}')

    return count, iterate()


def open_dataset(source: str, *, max_images: Optional[int]) -> tuple[int, Iterator[Record]]:
    """Pick the reader from `--source` (edm-interface.md §1.5 table)."""
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb'):
            return open_lmdb(source, max_images=max_images)
        return open_image_folder(source, max_images=max_images)
    if os.path.isfile(source):
        base = os.path.basename(source)
        if base == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images=max_images)
        if base == 'train-images-idx3-ubyte.gz':
            return open_mnist(source, max_images=max_images)
        if source.lower().endswith('.zip'):
            return open_image_zip(source, max_images=max_images)
        raise click.ClickException(f'Unknown source type: {source} (expected a directory, a .zip, '
                                   'cifar-10-python.tar.gz or train-images-idx3-ubyte.gz)')
    raise click.ClickException(f'Missing input file or directory: {source}')


# ---------------------------------------------------------------------------------------------------------------------
# Transforms.


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] != 3:
        raise click.ClickException(f'center-crop transforms need RGB or grayscale input, got {img.shape[2]} channels')
    return img


def _scale_only(width: Optional[int], height: Optional[int], img: np.ndarray) -> np.ndarray:
    """No transform: Lanczos resize only when the size differs."""
    h, w = img.shape[:2]
    ww, hh = width or w, height or h
    return img if (ww, hh) == (w, h) else _resize(img, ww, hh)


def _center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """Largest centred square, grayscale -> RGB, Lanczos to width x height."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(_to_rgb(img[top:top + side, left:left + side]), width, height)


def _center_crop_wide(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """Crop rows to the width:height aspect, resize, paste into a black width x width canvas; None if too small."""
    h, w = img.shape[:2]
    rows = int(np.round(width * h / w))
    if w < width or rows < height:
        return None
    top = (h - rows) // 2
    band = _resize(_to_rgb(img[top:top + rows]), width, height)
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    off = (width - height) // 2
    canvas[off:off + height] = band
    return canvas


def make_transform(transform: Optional[str], width: Optional[int], height: Optional[int]) -> Transform:
    """The per-image crop/resize function for `--transform` and `--resolution`."""
    if transform is None:
        return functools.partial(_scale_only, width, height)
    if width is None or height is None:
        raise click.ClickException(f'--transform={transform} needs --resolution=WxH')
    if transform == 'center-crop':
        return functools.partial(_center_crop, width, height)
    if transform == 'center-crop-wide':
        return functools.partial(_center_crop_wide, width, height)
    raise click.ClickException(f'Unknown transform {transform!r}; expected center-crop or center-crop-wide')


# ---------------------------------------------------------------------------------------------------------------------
# Destination.


class _Writer:
    """Writes files into a ZIP_STORED archive (dest ends in .zip) or an empty/absent folder."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.is_zip = dest.lower().endswith('.zip')
        if self.is_zip:
            if os.path.isdir(dest):
                raise click.ClickException(f'--dest {dest} is a directory, not a zip file')
            parent = os.path.dirname(dest)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self.zip = zipfile.ZipFile(dest, mode='w', compression=zipfile.ZIP_STORED)
        else:
            if os.path.exists(dest) and not os.path.isdir(dest):
                raise click.ClickException(f'--dest {dest} exists and is not a directory')
            if os.path.isdir(dest) and os.listdir(dest):
                raise click.ClickException(f'--dest folder must be empty: {dest}')
            os.makedirs(dest, exist_ok=True)

    def write(self, relpath: str, data: bytes) -> None:
        if self.is_zip:
            self.zip.writestr(relpath, data)
            return
        full = os.path.join(self.dest, relpath)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, 'wb') as f:
            f.write(data)

    def close(self, failed: bool = False) -> None:
        if self.is_zip:
            self.zip.close()
            if failed and os.path.isfile(self.dest):
                os.remove(self.dest)  # never leave a half-written archive behind


# ---------------------------------------------------------------------------------------------------------------------


def _shape_str(img: np.ndarray) -> str:
    ch = img.shape[2] if img.ndim == 3 else 1
    return f'{img.shape[1]}x{img.shape[0]}x{ch}'


def convert_dataset(
    source: str,                                # Input folder, zip, CIFAR-10 tarball, MNIST idx gz or *_lmdb folder.
    dest: str,                                  # Output folder or .zip.
    max_images: Optional[int] = None,           # Stop after this many input images; None = all.
    transform: Optional[str] = None,            # None, 'center-crop' or 'center-crop-wide'.
    resolution: Optional[tuple[int, int]] = None,  # Output (width, height); None = keep the input size.
    progress: bool = True,                      # Show a tqdm bar.
    overwrite: bool = False,                    # Replace an existing --dest zip.
) -> dict:
    """Write `dest` in EDM's layout and return {'count', 'shape', 'labelled'} (edm-interface.md §1.5)."""
    if dest == '':
        raise click.ClickException('--dest output filename or directory must not be an empty string')
    if max_images is not None and max_images < 0:
        raise click.ClickException('--max-images must be >= 0')
    PIL.Image.init()
    width, height = resolution if resolution is not None else (None, None)
    transform_fn = make_transform(transform, width, height)
    total, records = (builtin_sources.open_builtin(source, max_images=max_images, resolution=resolution)
                      or open_dataset(source, max_images=max_images))
    if total == 0:
        raise click.ClickException(f'--source {source} holds no images (nothing to convert)')
    if dest.lower().endswith('.zip') and os.path.isfile(dest) and not overwrite:
        raise click.ClickException(f'--dest {dest} already exists; pass --overwrite to replace it')
    writer = _Writer(dest)

    first: Optional[tuple] = None
    entries: list = []
    ok = False
    try:
        for idx, rec in enumerate(tqdm(records, total=total, disable=not progress)):
            img = transform_fn(rec['img'])
            if img is None:
                continue  # too small for center-crop-wide; the index is still consumed
            if img.ndim == 3 and img.shape[2] == 1:
                img = img[:, :, 0]
            attrs = (img.shape[1], img.shape[0], img.shape[2] if img.ndim == 3 else 1)
            if first is None:
                w, h, ch = attrs
                if ch not in (1, 3):
                    raise click.ClickException(f'Input images must be stored as RGB or grayscale; {rec["name"]} '
                                               f'has {ch} channels')
                if w != h:
                    raise click.ClickException(f'Image dimensions after scale and crop must be square; '
                                               f'{rec["name"]} is {w}x{h} (use --resolution or --transform)')
                if w < 1 or w & (w - 1):
                    raise click.ClickException(f'Image width/height after scale and crop must be a power of two; '
                                               f'{rec["name"]} is {w}x{h} (use --resolution)')
                first = (attrs, rec['name'])
            elif attrs != first[0]:
                raise click.ClickException(f'Image {rec["name"]} is {_shape_str(img)} (WxHxC) but {first[1]} is '
                                           f'{first[0][0]}x{first[0][1]}x{first[0][2]}; all images must match')
            if img.dtype != np.uint8:
                raise click.ClickException(f'Image {rec["name"]} is {img.dtype}; only 8-bit images are supported')

            key = f'{idx:08d}'
            arch = f'{key[:5]}/img{key}.png'
            buf = io.BytesIO()
            PIL.Image.fromarray(img, 'RGB' if img.ndim == 3 else 'L').save(buf, format='png', compress_level=0,
                                                                          optimize=False)
            writer.write(arch, buf.getvalue())
            entries.append([arch, rec['label']] if rec['label'] is not None else None)

        if not entries:
            raise click.ClickException(f'no image of --source {source} survived --transform={transform} '
                                       f'(nothing to write)')
        labelled = all(e is not None for e in entries)
        writer.write('dataset.json', json.dumps({'labels': entries if labelled else None}).encode('utf8'))
        ok = True
    finally:
        writer.close(failed=not ok)
    shape = None if first is None else [first[0][2], first[0][1], first[0][0]]
    return dict(count=len(entries), shape=shape, labelled=labelled)


# ---------------------------------------------------------------------------------------------------------------------


@click.command()
@click.option('--source',     help='Input directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--dest',       help='Output directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=click.IntRange(min=0))
@click.option('--transform',  help='Input crop/resize mode', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution', help='Output resolution (e.g., 64x64)', metavar='WxH', type=parse_tuple)
@click.option('--overwrite',  help='Replace an existing --dest zip', is_flag=True)
def main(source: str, dest: str, max_images: Optional[int], transform: Optional[str],
         resolution: Optional[tuple[int, int]], overwrite: bool) -> None:
    """Convert an image dataset into EDM's zip/folder layout.

    \b
    --source path/                       all images under path/, recursively (labels: dataset.json or subfolders)
    --source dataset.zip                 all images inside the zip (labels: its dataset.json)
    --source cifar-10-python.tar.gz      CIFAR-10 training set with class labels
    --source train-images-idx3-ubyte.gz  MNIST, padded to 32x32, with class labels
    --source *_lmdb/                     LSUN LMDB (needs the lmdb package)
    --source sklearn-digits[:size=16,mode=pad|nearest]
                                         scikit-learn's 1,797 8x8 digits, labels 0-9 (size=16: padded or 2x2
                                         nearest-neighbour upscaled to 16x16)
    --source photo-patches[:color=rgb|grey,zoom=K,seed=N,labels=1,photos=a+b]
                                         random RxR crops (--resolution=RxR, required; --max-images patches,
                                         default 10000; seed 0) of the photographs shipped with scikit-learn and
                                         scikit-image; labels=1: which photograph (see training/builtin_sources.py)

    \b
    --dest /path/to/dir                  write PNGs into an empty or new folder
    --dest /path/to/dataset.zip          write an uncompressed zip

    Images are stored as uncompressed PNGs named 00000/img00000000.png (1000 per folder); labels go to dataset.json,
    written last: {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}. Output images must be square
    with a power-of-two side, 1 or 3 channels, all the same; use --resolution (and --transform=center-crop or
    center-crop-wide) to get there.
    """
    convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution,
                    overwrite=overwrite)


if __name__ == '__main__':
    main()
