"""Image datasets in EDM's zip/folder layout (edm-interface.md §2.5, §4.3).

`Dataset` handles subsetting (`max_size`), x-flip doubling, caching and labels; `ImageFolderDataset` reads the
images and `dataset.json` from a directory tree or a zip archive.
"""

import io
import json
import os
import zipfile
from typing import IO, Any, Optional

import numpy as np
import PIL.Image
import torch

import dnnlib

try:
    import pyspng  # optional fast PNG decoder
except ImportError:
    pyspng = None


class Dataset(torch.utils.data.Dataset):
    """Base class: index bookkeeping, labels and caching; subclasses provide `_load_raw_image`/`_load_raw_labels`."""

    def __init__(self,
        name: str,                      # Name of the dataset (run-dir component in train.py).
        raw_shape: list[int],           # Shape of the raw image data, [N, C, H, W].
        max_size: Optional[int] = None, # Keep at most this many images (random subset); None = all. Before xflip.
        use_labels: bool = False,       # Return labels? False = label dimension 0.
        xflip: bool = False,            # Double the dataset with horizontally flipped copies. After max_size.
        random_seed: int = 0,           # Seed of the max_size subset.
        cache: bool = False,            # Keep decoded images in a per-process dict.
    ) -> None:
        self._name = name
        self._raw_shape = [int(v) for v in raw_shape]
        self._use_labels = bool(use_labels)
        self._cache = bool(cache)
        self._cached_images: dict[int, np.ndarray] = {}
        self._raw_labels: Optional[np.ndarray] = None
        self._label_shape: Optional[list[int]] = None

        idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and idx.size > max_size:
            rng = np.random.RandomState(random_seed % (1 << 31))
            rng.shuffle(idx)
            idx = np.sort(idx[:max_size])
        flips = np.zeros(idx.size, dtype=np.uint8)
        if xflip:
            idx = np.concatenate([idx, idx])
            flips = np.concatenate([flips, np.ones_like(flips)])
        self._raw_idx = idx
        self._xflip = flips

    # -- labels -------------------------------------------------------------------------------------------------------

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            if labels.shape[0] != self._raw_shape[0]:
                raise ValueError(f'Dataset has {self._raw_shape[0]} images but {labels.shape[0]} labels')
            if labels.dtype == np.int64:
                if labels.ndim != 1 or (labels.size and labels.min() < 0):
                    raise ValueError('Integer class labels must be non-negative scalars')
            elif labels.dtype != np.float32:
                raise ValueError(f'Labels must be int64 or float32, got {labels.dtype}')
            self._raw_labels = labels
        return self._raw_labels

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:  # overridden by subclasses
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:  # overridden by subclasses
        raise NotImplementedError

    def close(self) -> None:  # overridden by subclasses
        pass

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- items --------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._raw_idx.size)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 CHW image copy, label); the label is one-hot float32 for class ids, [0]-shaped without labels."""
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self.image_shape:
                raise ValueError(f'{self._describe(raw_idx)} has shape {list(image.shape)} (CHW), but the dataset '
                                 f'has {self.image_shape}; all images must have the same size and channel count')
            if image.dtype != np.uint8:
                raise ValueError(f'{self._describe(raw_idx)} is {image.dtype}, expected 8-bit pixels')
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def _describe(self, raw_idx: int) -> str:
        return f'Image {raw_idx}'

    def get_label(self, idx: int) -> np.ndarray:
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        """raw_idx, xflip and raw_label of item `idx`."""
        raw_idx = int(self._raw_idx[idx])
        return dnnlib.EasyDict(raw_idx=raw_idx, xflip=bool(self._xflip[idx]),
                               raw_label=self._get_raw_labels()[raw_idx].copy())

    # -- properties ---------------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list[int]:
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        if len(self.image_shape) != 3:
            raise ValueError('Images must be CHW')
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        if len(self.image_shape) != 3 or self.image_shape[1] != self.image_shape[2]:
            raise ValueError(f'Images must be square CHW, got shape {self.image_shape}')
        return self.image_shape[1]

    @property
    def label_shape(self) -> list[int]:
        if self._label_shape is None:
            labels = self._get_raw_labels()
            if labels.dtype == np.int64:
                self._label_shape = [int(labels.max()) + 1] if labels.size else [0]
            else:
                self._label_shape = list(labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        if len(self.label_shape) != 1:
            raise ValueError(f'Labels must be vectors, got shape {self.label_shape}')
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(v != 0 for v in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64


# ---------------------------------------------------------------------------------------------------------------------


def _ext(fname: str) -> str:
    return os.path.splitext(fname)[1].lower()


class ImageFolderDataset(Dataset):
    """Images (any PIL extension, sorted by relative path) and `dataset.json` from a directory tree or a `.zip`."""

    def __init__(self,
        path: str,                      # Directory or .zip file.
        resolution: Optional[int] = None,  # Required resolution; None = whatever the first image has.
        use_pyspng: bool = True,        # Decode PNGs with pyspng when it is installed.
        **super_kwargs: Any,            # Dataset arguments (max_size, use_labels, xflip, random_seed, cache).
    ) -> None:
        self._path = path
        self._use_pyspng = use_pyspng
        self._zipfile: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None

        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, f), start=path)
                                for root, _dirs, files in os.walk(path) for f in files}
        elif _ext(path) == '.zip':
            if not os.path.isfile(path):
                raise FileNotFoundError(f'Dataset zip does not exist: {path}')
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except zipfile.BadZipFile as e:
                raise IOError(f'Not a valid zip file: {path} ({e})') from e
        elif not os.path.exists(path):
            raise FileNotFoundError(f'Dataset path does not exist: {path}')
        else:
            raise IOError('Path must point to a directory or zip')

        PIL.Image.init()
        self._image_fnames = sorted(f for f in self._all_fnames if _ext(f) in PIL.Image.EXTENSION)
        if not self._image_fnames:
            raise IOError(f'No image files found in the specified path: {path}')

        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise IOError('Image files do not match the specified resolution')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)
        self._get_raw_labels()  # read dataset.json now, so a bad label file fails here rather than mid-training

    def _get_zipfile(self) -> zipfile.ZipFile:
        # One handle per process: a handle inherited through fork or pickling is never shared.
        if self._zipfile is None or self._zip_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname: str) -> IO[bytes]:
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self) -> None:
        try:
            if self._zipfile is not None and self._zip_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None
            self._zip_pid = None

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _zipfile=None, _zip_pid=None)

    def _describe(self, raw_idx: int) -> str:
        return f'Image {self._image_fnames[raw_idx]}'

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        with self._open_file(fname) as f:
            data = f.read()
        try:
            if self._use_pyspng and pyspng is not None and _ext(fname) == '.png':
                image = pyspng.load(data)
            else:
                image = np.array(PIL.Image.open(io.BytesIO(data)))
        except Exception as e:
            raise IOError(f'Cannot decode image {fname} in {self._path}: {e}') from e
        if image.ndim == 2:
            image = image[:, :, np.newaxis]
        return image.transpose(2, 0, 1)

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        if 'dataset.json' not in self._all_fnames:
            return None
        with self._open_file('dataset.json') as f:
            labels = json.load(f).get('labels')
        if labels is None:
            return None
        table = {str(k).replace('\\', '/'): v for k, v in labels}
        missing = [f for f in self._image_fnames if f.replace('\\', '/') not in table]
        if missing:
            raise ValueError(f'dataset.json has no label for {missing[0]} ({len(missing)} image(s) without a label)')
        arr = np.array([table[f.replace('\\', '/')] for f in self._image_fnames])
        if arr.ndim == 1:
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f'dataset.json: scalar labels must be integer class ids, got {arr.dtype}')
            return arr.astype(np.int64)
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.number):
            return arr.astype(np.float32)
        raise ValueError('dataset.json: labels must be integers or equal-length numeric vectors')
