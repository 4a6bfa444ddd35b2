"""dataset_tool.py: conversions, layout and one-line errors (edm-interface.md §1.5, §4.3)."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from tests.datagen import make_cifar_tarball, make_dataset_zip, make_image_folder, png_bytes, random_images
from training.dataset import ImageFolderDataset


def run_tool(*args: str):
    return CliRunner().invoke(dataset_tool.main, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    out = result.output
    assert result.exit_code != 0, out
    assert 'Traceback' not in out
    errors = [ln for ln in out.splitlines() if ln.startswith('Error:')]
    assert len(errors) == 1, out
    assert not isinstance(result.exception, AssertionError)
    for frag in fragments:
        assert frag in errors[0], errors[0]
    return errors[0]


def test_folder_to_zip_round_trip(tmp_path):
    src = make_image_folder(str(tmp_path / 'src'), n=5, res=8, num_classes=3)
    dest = str(tmp_path / 'out.zip')
    res = run_tool('--source', str(tmp_path / 'src'), '--dest', dest)
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(dest) as z:
        infos = z.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert infos[-1].filename == 'dataset.json'
        assert [i.filename for i in infos[:-1]] == [f'00000/img{i:08d}.png' for i in range(5)]
        meta = json.loads(z.read('dataset.json'))
    assert meta['labels'] == [[f'00000/img{i:08d}.png', lab] for i, (_im, lab) in enumerate(src.values())]
    ds = ImageFolderDataset(dest, use_labels=True)
    for i, (img, lab) in enumerate(src.values()):
        got, onehot = ds[i]
        assert np.array_equal(got, img.transpose(2, 0, 1))
        assert int(np.argmax(onehot)) == lab


def test_zip_to_folder_grayscale_and_max_images(tmp_path):
    ref = make_dataset_zip(str(tmp_path / 'in.zip'), n=6, res=8, channels=1, num_classes=2)
    out = tmp_path / 'out'
    res = run_tool('--source', str(tmp_path / 'in.zip'), '--dest', str(out), '--max-images', '4')
    assert res.exit_code == 0, res.output
    files = sorted(os.listdir(out / '00000'))
    assert files == [f'img{i:08d}.png' for i in range(4)]
    with PIL.Image.open(out / '00000' / 'img00000002.png') as im:
        assert im.mode == 'L'
        assert np.array_equal(np.array(im), ref['images'][2][0])
    labels = json.loads((out / 'dataset.json').read_text())['labels']
    assert [lab for _n, lab in labels] == ref['labels'][:4].tolist()


def test_folder_name_labels(tmp_path):
    src = make_image_folder(str(tmp_path / 'src'), n=6, res=8, num_classes=3, label_source='folders')
    dest = str(tmp_path / 'o.zip')
    assert run_tool('--source', str(tmp_path / 'src'), '--dest', dest).exit_code == 0
    with zipfile.ZipFile(dest) as z:
        labels = json.loads(z.read('dataset.json'))['labels']
    # Subfolders class0..class2 sort to ids 0..2, which equal the generated class ids.
    assert [lab for _n, lab in labels] == [lab for _img, lab in src.values()]


def test_single_folder_gives_null_labels(tmp_path):
    make_image_folder(str(tmp_path / 'src' / 'only'), n=2, res=8)
    dest = str(tmp_path / 'o.zip')
    assert run_tool('--source', str(tmp_path / 'src'), '--dest', dest).exit_code == 0
    with zipfile.ZipFile(dest) as z:
        assert json.loads(z.read('dataset.json')) == {'labels': None}


def test_cifar_tarball(tmp_path):
    tar, imgs, labels = make_cifar_tarball(str(tmp_path), n=12)
    dest = str(tmp_path / 'cifar.zip')
    res = run_tool('--source', tar, '--dest', dest)
    assert res.exit_code == 0, res.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 12 and ds.image_shape == [3, 32, 32]
    for i in range(12):
        img, onehot = ds[i]
        assert np.array_equal(img, imgs[i].transpose(2, 0, 1))
        assert int(np.argmax(onehot)) == labels[i]


def test_mnist_idx(tmp_path):
    import gzip
    import struct
    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, [5, 28, 28], dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 2051, 5, 28, 28) + imgs.tobytes())
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, 5) + labels.tobytes())
    dest = str(tmp_path / 'mnist.zip')
    res = run_tool('--source', str(tmp_path / 'train-images-idx3-ubyte.gz'), '--dest', dest)
    assert res.exit_code == 0, res.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert ds.image_shape == [1, 32, 32] and ds.label_dim == 6
    img, onehot = ds[2]
    assert np.array_equal(img[0, 2:30, 2:30], imgs[2]) and img[0, :2].max() == 0 and img[0, :, 30:].max() == 0
    assert int(np.argmax(onehot)) == 4


@pytest.mark.parametrize('transform,size,expect', [
    ('center-crop', (20, 12), (8, 8)),
    ('center-crop-wide', (24, 16), (16, 16)),
])
def test_center_crops(tmp_path, transform, size, expect):
    w, h = size
    src = tmp_path / 'src'
    os.makedirs(src)
    img = np.random.RandomState(0).randint(0, 256, [h, w, 3], dtype=np.uint8)
    (src / 'a.png').write_bytes(png_bytes(img))
    res_arg = '8x8' if transform == 'center-crop' else '16x8'
    out = tmp_path / 'out'
    res = run_tool('--source', str(src), '--dest', str(out), '--transform', transform, '--resolution', res_arg)
    assert res.exit_code == 0, res.output
    with PIL.Image.open(out / '00000' / 'img00000000.png') as im:
        got = np.array(im)
    assert got.shape == expect + (3,)
    if transform == 'center-crop-wide':
        # 16x8 band pasted into a 16x16 black canvas: rows 0-3 and 12-15 stay black.
        assert got[:4].max() == 0 and got[12:].max() == 0 and got[4:12].max() > 0


def test_center_crop_wide_skips_small_images_and_keeps_index_gaps(tmp_path):
    src = tmp_path / 'src'
    os.makedirs(src)
    (src / 'a.png').write_bytes(png_bytes(random_images(1, 8)[0]))   # too small for 16 wide: skipped
    (src / 'b.png').write_bytes(png_bytes(random_images(1, 32)[0]))
    out = tmp_path / 'out'
    assert run_tool('--source', str(src), '--dest', str(out), '--transform', 'center-crop-wide',
                    '--resolution', '16x16').exit_code == 0
    assert sorted(os.listdir(out / '00000')) == ['img00000001.png']


def test_resize_and_grayscale_to_rgb(tmp_path):
    src = tmp_path / 'src'
    os.makedirs(src)
    (src / 'a.png').write_bytes(png_bytes(random_images(1, 12, channels=1)[0]))
    out = tmp_path / 'out'
    assert run_tool('--source', str(src), '--dest', str(out), '--transform', 'center-crop',
                    '--resolution', '8,8').exit_code == 0
    with PIL.Image.open(out / '00000' / 'img00000000.png') as im:
        assert im.mode == 'RGB' and im.size == (8, 8)


# -- bad inputs: one clear line each ----------------------------------------------------------------------------------


def test_error_missing_source(tmp_path):
    assert_one_line_error(run_tool('--source', str(tmp_path / 'nope'), '--dest', str(tmp_path / 'o.zip')),
                          'Missing input', 'nope')


def test_error_unknown_source_type(tmp_path):
    (tmp_path / 'data.bin').write_bytes(b'123')
    assert_one_line_error(run_tool('--source', str(tmp_path / 'data.bin'), '--dest', str(tmp_path / 'o.zip')),
                          'Unknown source type')


def test_error_corrupt_image_is_named(tmp_path):
    make_image_folder(str(tmp_path / 'src'), n=2, res=8)
    (tmp_path / 'src' / 'img0001.png').write_bytes(b'not a png at all')
    dest = tmp_path / 'o.zip'
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(dest)),
                          'Cannot read image', 'img0001.png')
    assert not dest.exists()  # no half-written archive


def test_error_mixed_sizes(tmp_path):
    src = tmp_path / 'src'
    os.makedirs(src)
    (src / 'a.png').write_bytes(png_bytes(random_images(1, 8)[0]))
    (src / 'b.png').write_bytes(png_bytes(random_images(1, 16)[0]))
    assert_one_line_error(run_tool('--source', str(src), '--dest', str(tmp_path / 'o.zip')),
                          'b.png', '16x16x3', '8x8x3')


def test_error_mixed_channels(tmp_path):
    src = tmp_path / 'src'
    os.makedirs(src)
    (src / 'a.png').write_bytes(png_bytes(random_images(1, 8)[0]))
    (src / 'b.png').write_bytes(png_bytes(random_images(1, 8, channels=1)[0]))
    assert_one_line_error(run_tool('--source', str(src), '--dest', str(tmp_path / 'o.zip')), 'b.png', '8x8x1')


def test_error_label_missing_for_file(tmp_path):
    make_image_folder(str(tmp_path / 'src'), n=3, res=8, num_classes=2)
    meta = tmp_path / 'src' / 'dataset.json'
    data = json.loads(meta.read_text())
    data['labels'] = data['labels'][:2]
    meta.write_text(json.dumps(data))
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'o.zip')),
                          'no label', 'img0002.png')


@pytest.mark.parametrize('bad', ['cat', 1.5, True])
def test_error_non_int_label(tmp_path, bad):
    make_image_folder(str(tmp_path / 'src'), n=2, res=8, num_classes=2)
    meta = tmp_path / 'src' / 'dataset.json'
    data = json.loads(meta.read_text())
    data['labels'][1][1] = bad
    meta.write_text(json.dumps(data))
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'o.zip')),
                          'label must be an integer', 'img0001.png')


def test_error_corrupt_zip_and_json(tmp_path):
    (tmp_path / 'bad.zip').write_bytes(b'PK not really')
    assert_one_line_error(run_tool('--source', str(tmp_path / 'bad.zip'), '--dest', str(tmp_path / 'o.zip')),
                          'Cannot read zip', 'bad.zip')
    make_image_folder(str(tmp_path / 'src'), n=1, res=8)
    (tmp_path / 'src' / 'dataset.json').write_text('{"labels": [["img0000.png", 1]')
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'o.zip')),
                          'dataset.json', 'not a valid')


def test_error_non_power_of_two(tmp_path):
    make_image_folder(str(tmp_path / 'src'), n=1, res=12)
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'o.zip')),
                          'power of two', '12x12')


def test_error_not_square(tmp_path):
    src = tmp_path / 'src'
    os.makedirs(src)
    (src / 'a.png').write_bytes(png_bytes(np.zeros([8, 16, 3], np.uint8)))
    assert_one_line_error(run_tool('--source', str(src), '--dest', str(tmp_path / 'o.zip')), 'square', '16x8')


def test_error_rgba(tmp_path):
    src = tmp_path / 'src'
    os.makedirs(src)
    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros([8, 8, 4], np.uint8), 'RGBA').save(buf, format='png')
    (src / 'a.png').write_bytes(buf.getvalue())
    assert_one_line_error(run_tool('--source', str(src), '--dest', str(tmp_path / 'o.zip')), 'RGB or grayscale', '4')


def test_error_dest_not_empty(tmp_path):
    make_image_folder(str(tmp_path / 'src'), n=1, res=8)
    out = tmp_path / 'out'
    os.makedirs(out)
    (out / 'junk.txt').write_text('x')
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(out)), 'must be empty')


def test_error_crop_without_resolution(tmp_path):
    make_image_folder(str(tmp_path / 'src'), n=1, res=8)
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'o.zip'),
                                   '--transform', 'center-crop'), '--resolution')


def test_error_bad_resolution_syntax(tmp_path):
    make_image_folder(str(tmp_path / 'src'), n=1, res=8)
    assert_one_line_error(run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'o.zip'),
                                   '--resolution', 'big'), 'WxH')


@pytest.mark.slow
def test_subprocess_error_has_no_traceback(tmp_path, repo_root):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(repo_root, 'dataset_tool.py'), '--source',
                           str(tmp_path / 'missing'), '--dest', str(tmp_path / 'o.zip')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith('Error:')] == \
        [f'Error: Missing input file or directory: {tmp_path / "missing"}']
