"""Tiny synthetic datasets for tests: image folders, EDM-layout zips and a fake CIFAR-10 tarball.

The zip writer is independent of dataset_tool.py so that tests of the tool compare against a separate
implementation of the layout (edm-interface.md §4.3).
"""

import io
import json
import os
import pickle
import tarfile
import zipfile
from typing import Optional

import numpy as np
import PIL.Image


def random_images(n: int, res: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 images [n, res, res, channels] (HWC), every value 0..255."""
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=[n, res, res, channels], dtype=np.uint8)


def random_labels(n: int, num_classes: int, seed: int = 0) -> Optional[np.ndarray]:
    """Class ids [n] covering 0..num_classes-1 (each class at least once if n allows), or None."""
    if num_classes <= 0:
        return None
    rng = np.random.RandomState(seed + 1)
    labels = rng.randint(0, num_classes, size=n)
    labels[:min(n, num_classes)] = np.arange(min(n, num_classes))
    return labels


def png_bytes(img: np.ndarray) -> bytes:
    """PNG encoding of an HWC uint8 image with 1 or 3 channels."""
    arr = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
    buf = io.BytesIO()
    PIL.Image.fromarray(arr, 'L' if arr.ndim == 2 else 'RGB').save(buf, format='png')
    return buf.getvalue()


def make_image_folder(path: str, n: int, res: int, channels: int = 3, num_classes: int = 0, seed: int = 0,
                      label_source: str = 'json') -> dict:
    """Write n random PNGs under `path`.

    Labels (when num_classes > 0) come from `dataset.json` (label_source='json', files `img{i:04d}.png` at the
    root) or from class subfolders (label_source='folders', files `class{k}/img{i:04d}.png`).
    Returns {relpath: (HWC image, label or None)} in sorted relpath order.
    """
    if label_source not in ('json', 'folders'):
        raise ValueError(f"label_source must be 'json' or 'folders', got {label_source!r}")
    images = random_images(n, res, channels, seed)
    labels = random_labels(n, num_classes, seed)
    os.makedirs(path, exist_ok=True)
    out = {}
    for i in range(n):
        lab = None if labels is None else int(labels[i])
        rel = f'class{lab}/img{i:04d}.png' if (lab is not None and label_source == 'folders') else f'img{i:04d}.png'
        full = os.path.join(path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, 'wb') as f:
            f.write(png_bytes(images[i]))
        out[rel] = (images[i], lab)
    if labels is not None and label_source == 'json':
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[rel, lab] for rel, (_img, lab) in out.items()]}, f)
    return dict(sorted(out.items()))


def make_dataset_zip(path: str, n: int, res: int, channels: int = 3, num_classes: int = 0, seed: int = 0) -> dict:
    """Write an EDM-layout zip (`00000/img00000000.png`, ZIP_STORED, dataset.json last).

    Returns {'images': [n, C, H, W] uint8, 'labels': [n] int or None, 'names': [relpath]}.
    """
    images = random_images(n, res, channels, seed)
    labels = random_labels(n, num_classes, seed)
    names = [f'{i:08d}'[:5] + f'/img{i:08d}.png' for i in range(n)]
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for name, img in zip(names, images):
            z.writestr(name, png_bytes(img))
        meta = None if labels is None else [[nm, int(lab)] for nm, lab in zip(names, labels)]
        z.writestr('dataset.json', json.dumps({'labels': meta}))
    return dict(images=images.transpose(0, 3, 1, 2), labels=labels, names=names)


def make_cifar_tarball(path: str, n: int, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """Write a tiny `cifar-10-python.tar.gz` in the real format (python pickles, 5 training batches + test batch).

    `path` is the target directory, or a file path ending in cifar-10-python.tar.gz. The n training images are split
    over data_batch_1..5. Returns (tarball path, images [n, 32, 32, 3] HWC uint8, labels [n]).
    """
    if path.endswith('.tar.gz'):
        tar_path = path
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        tar_path = os.path.join(path, 'cifar-10-python.tar.gz')
    images = random_images(n, 32, 3, seed)
    labels = random_labels(n, 10, seed)
    flat = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR rows: R plane, G plane, B plane

    def add(tar: tarfile.TarFile, name: str, obj: dict) -> None:
        data = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(tar_path, 'w:gz') as tar:
        for b, part in enumerate(np.array_split(np.arange(n), 5), start=1):
            add(tar, f'data_batch_{b}', {'batch_label': f'training batch {b} of 5', 'labels': labels[part].tolist(),
                                         'data': flat[part], 'filenames': [f'img{i}.png' for i in part]})
        add(tar, 'test_batch', {'batch_label': 'testing batch 1 of 1', 'labels': [0],
                                'data': np.zeros([1, 3072], np.uint8), 'filenames': ['t.png']})
        add(tar, 'batches.meta', {'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                                                  'horse', 'ship', 'truck'], 'num_cases_per_batch': 10000,
                                  'num_vis': 3072})
    return tar_path, images, labels
