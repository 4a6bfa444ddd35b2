"""dataset_tool.py built-in sources (training/builtin_sources.py): sklearn-digits and photo-patches in EDM's layout."""

import json
import os
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip('sklearn')
pytest.importorskip('skimage')

import dataset_tool  # noqa: E402
from training import builtin_sources  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402


def run_tool(*args: str):
    return CliRunner().invoke(dataset_tool.main, list(args))


def one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert 'Traceback' not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith('Error:')]
    assert len(lines) == 1, result.output
    return lines[0]


def read_zip(path):
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert infos[-1].filename == 'dataset.json'
        names = [i.filename for i in infos[:-1]]
        meta = json.loads(z.read('dataset.json'))
    assert names == [f'{i // 1000:05d}/img{i:08d}.png' for i in range(len(names))]
    return names, meta['labels']


@pytest.fixture(scope='module')
def sklearn_digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target


@pytest.mark.parametrize('spec,size', [('sklearn-digits', 8), ('sklearn-digits:size=16', 16),
                                       ('sklearn-digits:size=16,mode=nearest', 16)])
def test_digits_zip(tmp_path, sklearn_digits, spec, size):
    dest = str(tmp_path / 'digits.zip')
    result = run_tool('--source', spec, '--dest', dest)
    assert result.exit_code == 0, result.output
    names, labels = read_zip(dest)
    assert len(names) == 1797
    assert [lab for _name, lab in labels] == [int(t) for t in sklearn_digits[1]]
    assert sorted(set(lab for _n, lab in labels)) == list(range(10))
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 1797 and ds.image_shape == [1, size, size] and ds.label_dim == 10
    for i in (0, 17, 1796):
        img, onehot = ds[i]
        ref = np.round(sklearn_digits[0][i] * 255 / 16)
        if spec.endswith('nearest'):
            assert np.array_equal(img[0, ::2, ::2], ref) and np.array_equal(img[0, 1::2, 1::2], ref)
        elif size == 16:
            assert np.array_equal(img[0, 4:12, 4:12], ref)
            assert img[0, :4].max() == 0 and img[0, 12:].max() == 0 and img[0, :, :4].max() == 0
        else:
            assert np.array_equal(img[0], ref)
        assert int(np.argmax(onehot)) == sklearn_digits[1][i]


def test_digits_max_images(tmp_path):
    dest = str(tmp_path / 'd.zip')
    assert run_tool('--source', 'sklearn-digits', '--dest', dest, '--max-images', '25').exit_code == 0
    assert len(read_zip(dest)[0]) == 25


@pytest.mark.parametrize('color,channels', [('rgb', 3), ('grey', 1)])
def test_photo_patches_zip(tmp_path, color, channels):
    dest = str(tmp_path / 'p.zip')
    photos = 'astronaut+camera+china'
    result = run_tool('--source', f'photo-patches:color={color},labels=1,photos={photos}', '--resolution', '16x16',
                      '--max-images', '300', '--dest', dest)
    assert result.exit_code == 0, result.output
    names, labels = read_zip(dest)
    assert len(names) == 300
    ds = ImageFolderDataset(dest, use_labels=True)
    assert ds.image_shape == [channels, 16, 16] and ds.label_dim == 3
    got = np.stack([ds[i][0] for i in range(len(ds))])
    assert got.std() > 10  # real content, not a constant
    # Every patch is a crop of the photograph named by its label.
    plan = builtin_sources.patch_plan([builtin_sources.load_photo(n).shape[:2] for n in photos.split('+')], 300, 16, 0)
    assert [lab for _n, lab in labels] == plan[:, 0].tolist()
    assert set(plan[:, 0].tolist()) == {0, 1, 2}
    for i in (0, 1, 299):
        k, top, left = plan[i]
        photo = builtin_sources.load_photo(photos.split('+')[k])
        crop = builtin_sources._colour(photo, color)[top:top + 16, left:left + 16]
        crop = crop[None] if crop.ndim == 2 else crop.transpose(2, 0, 1)
        assert np.array_equal(got[i], crop)


def test_photo_patches_seeded_unlabelled_zoom(tmp_path):
    a, b, c = (str(tmp_path / f'{x}.zip') for x in 'abc')
    assert run_tool('--source', 'photo-patches:zoom=2', '--resolution=8x8', '--max-images=50', '--dest', a).exit_code == 0
    assert run_tool('--source', 'photo-patches:zoom=2', '--resolution=8x8', '--max-images=50', '--dest', b).exit_code == 0
    assert run_tool('--source', 'photo-patches:zoom=2,seed=1', '--resolution=8x8', '--max-images=50',
                    '--dest', c).exit_code == 0
    da, db, dc = (ImageFolderDataset(p) for p in (a, b, c))
    assert da.image_shape == [3, 8, 8] and not da.has_labels
    assert read_zip(a)[1] is None
    xa, xb, xc = (np.stack([d[i][0] for i in range(50)]) for d in (da, db, dc))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)


def test_photo_patches_default_count_and_all_photos_load():
    count, _records = builtin_sources.open_builtin('photo-patches', max_images=None, resolution=(16, 16))
    assert count == builtin_sources.DEFAULT_PATCHES
    for name, _package in builtin_sources.PHOTOS:
        img = builtin_sources.load_photo(name)
        assert img.dtype == np.uint8 and min(img.shape[:2]) >= 128 and img.ndim in (2, 3)


@pytest.mark.parametrize('args,fragment', [
    (['--source', 'photo-patches'], '--resolution'),
    (['--source', 'photo-patches', '--resolution', '16x8'], 'square'),
    (['--source', 'photo-patches:color=blue', '--resolution', '16x16'], 'color must be one of'),
    (['--source', 'photo-patches:photos=astronaut+nope', '--resolution', '16x16'], "unknown photograph 'nope'"),
    (['--source', 'photo-patches:zoom=0', '--resolution', '16x16'], 'zoom must be an integer >= 1'),
    (['--source', 'photo-patches:bogus', '--resolution', '16x16'], 'key=value'),
    (['--source', 'sklearn-digits:size=12'], 'size must be one of 8|16'),
    (['--source', 'sklearn-digits:colour=rgb'], 'unknown option(s) colour'),
])
def test_bad_options_one_line_nothing_written(tmp_path, args, fragment):
    dest = tmp_path / 'out.zip'
    line = one_error_line(run_tool(*args, '--dest', str(dest)))
    assert fragment in line
    assert not dest.exists()


def test_existing_path_is_not_a_builtin(tmp_path):
    folder = tmp_path / 'sklearn-digits'
    folder.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert builtin_sources.parse_spec('sklearn-digits') is None
    finally:
        os.chdir(cwd)
    assert builtin_sources.parse_spec('sklearn-digits:size=16') == ('sklearn-digits', {'size': '16'})
