"""training.dataset: EDM's Dataset / ImageFolderDataset semantics (edm-interface.md §2.5)."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from tests.datagen import make_dataset_zip, make_image_folder, png_bytes, random_images
from training.dataset import ImageFolderDataset


def test_zip_pixels_labels_and_properties(tmp_path):
    ref = make_dataset_zip(str(tmp_path / 'tiny-8x8.zip'), n=7, res=8, num_classes=3)
    ds = ImageFolderDataset(str(tmp_path / 'tiny-8x8.zip'), use_labels=True)
    assert ds.name == 'tiny-8x8'
    assert len(ds) == 7 and ds.image_shape == [3, 8, 8]
    assert ds.num_channels == 3 and ds.resolution == 8
    assert ds.label_shape == [3] and ds.label_dim == 3 and ds.has_labels and ds.has_onehot_labels
    for i in range(7):
        img, lab = ds[i]
        assert img.dtype == np.uint8 and np.array_equal(img, ref['images'][i])
        assert lab.dtype == np.float32 and np.array_equal(lab, np.eye(3, dtype=np.float32)[ref['labels'][i]])
    ds.close()


def test_without_use_labels_label_is_empty(tmp_path):
    make_dataset_zip(str(tmp_path / 'd.zip'), n=3, res=8, num_classes=4)
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'))
    assert ds[0][1].shape == (0,) and not ds.has_labels and ds.label_dim == 0


def test_folder_grayscale_and_backslash_labels(tmp_path):
    imgs = random_images(3, 8, channels=1)
    os.makedirs(tmp_path / 'sub')
    names = ['a.png', 'sub/b.png', 'sub/c.png']
    for nm, im in zip(names, imgs):
        (tmp_path / nm).write_bytes(png_bytes(im))
    # Windows-style separators in dataset.json must still match.
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 2], ['sub\\b.png', 0], ['sub\\c.png', 1]]}))
    ds = ImageFolderDataset(str(tmp_path), use_labels=True)
    assert ds.image_shape == [1, 8, 8]
    assert [int(np.argmax(ds.get_label(i))) for i in range(3)] == [2, 0, 1]
    assert np.array_equal(ds[1][0][0], imgs[1][:, :, 0])


def test_vector_labels(tmp_path):
    make_image_folder(str(tmp_path), n=2, res=8)
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['img0000.png', [0.5, -1.0]],
                                                                  ['img0001.png', [2.0, 3.0]]]}))
    ds = ImageFolderDataset(str(tmp_path), use_labels=True)
    assert not ds.has_onehot_labels and ds.label_shape == [2]
    assert np.array_equal(ds[1][1], np.array([2.0, 3.0], np.float32))


def test_xflip_doubles_and_mirrors(tmp_path):
    ref = make_dataset_zip(str(tmp_path / 'd.zip'), n=4, res=8)
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), xflip=True)
    assert len(ds) == 8
    for i in range(4):
        assert np.array_equal(ds[i][0], ref['images'][i])
        assert np.array_equal(ds[i + 4][0], ref['images'][i][:, :, ::-1])
        assert ds.get_details(i + 4).xflip and not ds.get_details(i).xflip
        assert ds.get_details(i + 4).raw_idx == i


def test_max_size_subset_is_seeded_sorted_and_before_xflip(tmp_path):
    make_dataset_zip(str(tmp_path / 'd.zip'), n=10, res=8)
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), max_size=4, random_seed=3 + 2**31, xflip=True)
    raw = [ds.get_details(i).raw_idx for i in range(len(ds))]
    perm = np.arange(10)
    np.random.RandomState(3).shuffle(perm)  # seed is taken modulo 2**31
    expected = sorted(perm[:4].tolist())
    assert len(ds) == 8 and raw == expected + expected
    assert ImageFolderDataset(str(tmp_path / 'd.zip'), max_size=20).__len__() == 10


def test_cache_and_pickling_reopen_zip(tmp_path):
    ref = make_dataset_zip(str(tmp_path / 'd.zip'), n=3, res=8, num_classes=2)
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), use_labels=True, cache=True)
    ds[0]
    assert 0 in ds._cached_images
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[2][0], ref['images'][2])
    assert np.array_equal(clone[2][1], ds[2][1])


def test_dataloader_workers(tmp_path):
    ref = make_dataset_zip(str(tmp_path / 'd.zip'), n=4, res=8)
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'))
    ds[0]  # open the zip in the parent first: workers must not reuse that handle
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat([x for x, _ in loader]).numpy()
    assert np.array_equal(got, ref['images'])


def test_errors(tmp_path):
    with pytest.raises(IOError, match='does not exist'):
        ImageFolderDataset(str(tmp_path / 'nope'))
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(IOError, match='Path must point to a directory or zip'):
        ImageFolderDataset(str(tmp_path / 'file.txt'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(IOError, match='No image files'):
        ImageFolderDataset(str(tmp_path / 'empty'))
    make_dataset_zip(str(tmp_path / 'd.zip'), n=2, res=8)
    with pytest.raises(IOError, match='do not match the specified resolution'):
        ImageFolderDataset(str(tmp_path / 'd.zip'), resolution=16)


def test_mixed_sizes_name_the_file(tmp_path):
    (tmp_path / 'a.png').write_bytes(png_bytes(random_images(1, 8)[0]))
    (tmp_path / 'b.png').write_bytes(png_bytes(random_images(1, 16)[0]))
    ds = ImageFolderDataset(str(tmp_path))
    ds[0]
    with pytest.raises(ValueError, match=r'b\.png.*same size'):
        ds[1]


def test_missing_label_entry(tmp_path):
    make_image_folder(str(tmp_path), n=2, res=8)
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['img0000.png', 1]]}))
    with pytest.raises(ValueError, match='img0001.png'):
        ImageFolderDataset(str(tmp_path), use_labels=True)
    assert len(ImageFolderDataset(str(tmp_path))) == 2  # labels are not read without use_labels
