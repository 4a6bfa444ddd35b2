"""Issue 12: every bad input ends in one line before anything is written, finished runs stay finished, and the
training files are what they claim to be. One test (or a few) per defect of the issue, on tiny CPU networks."""

import hashlib
import importlib
import io
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import datagen
import dataset_tool
import dnnlib
import train
from torch_utils import distributed as dist
from training import training_loop as loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cbase=8', '--cres=1', '--batch=32', '--tick=1', '--snap=1', '--dump=1', '--lr-rampup=0', '--device=cpu',
        '--workers=1', '--augment=0']


def cli(args, command=None):
    """Run a click command in-process; returns (exit code, output)."""
    result = CliRunner().invoke(command or train.main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_line_error(output):
    lines = output.strip().splitlines()
    assert lines and lines[-1].startswith('Error:') and 'Traceback' not in output, output
    return lines[-1]


def digest(folder):
    """{name: sha256} of every file in a folder (to show that nothing changed)."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), 'rb').read()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'tiny-8x8.zip')
    datagen.make_dataset_zip(path, 24, 8, num_classes=3)
    return path


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, data_zip):
    """A finished 1-kimg CLI run (32 steps of 32 images): its folder and command line."""
    out = tmp_path_factory.mktemp('runs')
    args = [f'--outdir={out}', f'--data={data_zip}', '--cond=1', '--duration=0.001', '--seed=17', *TINY]
    code, output = cli(args)
    assert code == 0, output
    run_dir = str(out / '00000-tiny-8x8-cond-ddpmpp-edm-gpus1-batch32-fp32')
    assert os.path.isfile(os.path.join(run_dir, 'training-state-000001.pt'))
    return run_dir, args


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return str(dest)


# ---------------------------------------------------------------------------------------------------------------------
# 1. A finished run stays finished.


def test_resume_from_final_state_changes_nothing_and_exits_0(finished_run, tmp_path):
    run_dir, args = finished_run
    run = copy_run(run_dir, tmp_path / 'run')
    before = digest(run)
    state = os.path.join(run, 'training-state-000001.pt')
    for extra in [[], ['--nosubdir', f'--outdir={run}']]:   # a new run folder, or the same folder
        code, output = cli(args + [f'--resume={state}'] + extra)
        assert code == 0, output
        assert 'Training already finished' in output and 'nothing written' in output
        assert f'Newest snapshot: {os.path.join(run, "network-snapshot-000001.pkl")}' in output
        assert digest(run) == before
    assert sorted(os.listdir(os.path.dirname(run_dir))) == [os.path.basename(run_dir)]  # no new run folder


def test_loop_returns_at_once_when_the_state_is_at_total_kimg(finished_run, tmp_path):
    run_dir, _ = finished_run
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    options.update(run_dir=str(tmp_path / 'again'), resume_state_dump=os.path.join(run_dir, 'training-state-000001.pt'),
                   resume_pkl=None, resume_kimg=1)
    os.makedirs(options['run_dir'])
    loop.training_loop(**options, device='cpu')
    assert os.listdir(options['run_dir']) == []


# ---------------------------------------------------------------------------------------------------------------------
# 2. Resume reads the seed (and length, ramps) from the state's own record; training_options.json is atomic.


def test_resume_takes_the_seed_from_the_state_without_training_options(finished_run, tmp_path, data_zip):
    run_dir, args = finished_run
    moved = tmp_path / 'moved'
    moved.mkdir()
    shutil.copy(os.path.join(run_dir, 'training-state-000001.pt'), moved)     # without training_options.json
    result = CliRunner().invoke(train.main, [a for a in args if not a.startswith(('--seed', '--duration'))] +
                                [f'--resume={moved / "training-state-000001.pt"}', '--duration=0.002', '-n'])
    assert result.exit_code == 0, result.output
    text = result.output.split('Training options:')[1]
    config = json.loads(text[:text.index('\n}\n') + 2])
    assert config['seed'] == 17
    assert config['lr_rampup_kimg'] == 0 and config['total_kimg'] == 2


def test_state_records_the_training_options(finished_run):
    run_dir, _ = finished_run
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), map_location='cpu', weights_only=False)
    record = state['training_options']
    assert record['seed'] == 17 and record['total_kimg'] == 1 and record['batch_size'] == 32
    assert record['network_kwargs'] == json.load(open(os.path.join(run_dir, 'training_options.json')))[
        'network_kwargs']


def test_training_options_json_is_written_atomically(tmp_path, data_zip, monkeypatch):
    written = []
    real = loop.atomic_write
    monkeypatch.setattr(loop, 'atomic_write', lambda path, fn: (written.append(os.path.basename(path)),
                                                                 real(path, fn)))
    monkeypatch.setattr(loop, 'training_loop', lambda **kwargs: None)     # only train.py's own writes matter here
    code, output = cli([f'--outdir={tmp_path}', f'--data={data_zip}', '--duration=0.001', '--seed=1', *TINY])
    assert code == 0, output
    assert written == ['training_options.json']


# ---------------------------------------------------------------------------------------------------------------------
# 3. Bad datasets are refused before training starts.


def _zip_of(path, files):
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in files.items():
            z.writestr(name, data)
    return str(path)


def _png(shape, mode=None):
    arr = np.random.RandomState(0).randint(0, 256, size=shape, dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr, mode).save(buf, format='png')
    return buf.getvalue()


def _good(n=4):
    return {f'img{i}.png': _png((8, 8, 3)) for i in range(n)}


BAD_DATASETS = {
    'mixed-sizes': (dict(_good(), **{'img9.png': _png((16, 16, 3))}), 'all images must have the same size'),
    'mixed-channels': (dict(_good(), **{'img9.png': _png((8, 8))}), 'all images must have the same size'),
    'corrupt-png': (dict(_good(), **{'img9.png': _png((8, 8, 3))[:60]}), 'cannot read image'),
    'garbage-png': (dict(_good(), **{'img9.png': b'not an image at all'}), 'cannot read image'),
    'non-square': (dict(_good(), **{'img9.png': _png((8, 16, 3))}), 'images must be square'),
    'rgba': ({f'img{i}.png': _png((8, 8, 4)) for i in range(3)}, 'has mode RGBA'),
    'json-not-json': (dict(_good(), **{'dataset.json': b'{labels'}), 'dataset.json is not valid JSON'),
    'json-a-list': (dict(_good(), **{'dataset.json': b'[1, 2]'}), 'dataset.json must be an object'),
    'json-labels-dict': (dict(_good(), **{'dataset.json': b'{"labels": {"a": 1}}'}), '"labels" must be a list'),
    'json-bad-pair': (dict(_good(), **{'dataset.json': b'{"labels": [["img0.png"]]}'}), 'must be a [path, label]'),
    'json-missing-label': (dict(_good(), **{'dataset.json': json.dumps(
        {'labels': [['img0.png', 1]]}).encode()}), 'has no label for img1.png'),
    'json-negative-label': (dict(_good(), **{'dataset.json': json.dumps(
        {'labels': [[f'img{i}.png', -1] for i in range(4)]}).encode()}), 'non-negative class id'),
}


@pytest.mark.parametrize('case', sorted(BAD_DATASETS))
def test_bad_dataset_is_one_line_before_the_run_folder(tmp_path, case):
    files, message = BAD_DATASETS[case]
    data = _zip_of(tmp_path / 'bad.zip', files)
    out = tmp_path / 'runs'
    code, output = cli([f'--outdir={out}', f'--data={data}', '--duration=0.001', '--seed=1', *TINY])
    assert code == 1
    line = one_line_error(output)
    assert message in line and line.startswith('Error: --data:'), line
    assert not out.exists()


def test_bad_image_in_a_folder_dataset_is_named(tmp_path):
    folder = tmp_path / 'images'
    datagen.make_image_folder(str(folder), 4, 8)
    target = sorted(folder.rglob('*.png'))[-1]
    target.write_bytes(target.read_bytes()[:50])
    with pytest.raises(Exception) as info:
        importlib.import_module('training.preflight').scan_dataset(str(folder))
    assert 'cannot read image' in str(info.value) and str(target.name) in str(info.value)


def test_scan_accepts_what_dataset_tool_writes(tmp_path, data_zip):
    from training import preflight
    summary = preflight.scan_dataset(data_zip)
    assert (summary.num_images, summary.channels, summary.resolution, summary.labels) == (24, 3, 8, 'classes')


# ---------------------------------------------------------------------------------------------------------------------
# 4. --transfer and --resume files are checked before the run folder exists.


def _transfer_cases(tmp_path, finished_run):
    run_dir, _ = finished_run
    snap = os.path.join(run_dir, 'network-snapshot-000001.pkl')
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(open(snap, 'rb').read()[:1000])
    foreign = tmp_path / 'foreign.pkl'
    foreign.write_bytes(pickle.dumps({'weights': [1, 2, 3]}))
    not_a_net = tmp_path / 'not-a-net.pkl'
    not_a_net.write_bytes(pickle.dumps({'ema': torch.nn.Linear(2, 2)}))
    return {
        'missing': (tmp_path / 'nope.pkl', 'cannot read network pickle'),
        'truncated': (truncated, 'is not a readable network pickle'),
        'foreign': (foreign, "expected a dict with an 'ema' entry"),
        'not-a-denoiser': (not_a_net, 'is not a denoiser network'),
        'other-architecture': (snap, 'does not fit this network'),      # --cbase=16 below
    }


@pytest.mark.parametrize('case', ['missing', 'truncated', 'foreign', 'not-a-denoiser', 'other-architecture'])
def test_bad_transfer_is_one_line_before_the_run_folder(finished_run, tmp_path, data_zip, case):
    path, message = _transfer_cases(tmp_path, finished_run)[case]
    out = tmp_path / 'runs'
    code, output = cli([f'--outdir={out}', f'--data={data_zip}', '--cond=1', '--duration=0.001', *TINY,
                        f'--transfer={path}'] + (['--cbase=16'] if case == 'other-architecture' else []))
    assert code == 1
    line = one_line_error(output)
    assert message in line and line.startswith('Error: --transfer'), line
    assert not out.exists()


@pytest.mark.parametrize('extra, message', [
    (['--cond=0'], 'label_dim=3, these options give label_dim=0 (check --cond)'),
    (['--augment=0.2'], 'augment_dim=0, these options give augment_dim=9 (check --augment)'),
    (['--precond=vp'], 'holds a network of class EDMPrecond, these options build VPPrecond (check --precond)'),
    (['--cbase=16'], 'model_channels=8, these options give model_channels=16 (check --cbase)'),
])
def test_resume_from_another_configuration_is_one_line(finished_run, tmp_path, extra, message):
    run_dir, args = finished_run
    out = tmp_path / 'runs'
    state = os.path.join(run_dir, 'training-state-000001.pt')
    code, output = cli([a for a in args if not a.startswith('--outdir')] + [f'--outdir={out}', f'--resume={state}',
                                                                             '--duration=0.002'] + extra)
    assert code == 1
    line = one_line_error(output)
    assert message in line, line
    assert not out.exists()


def test_truncated_or_foreign_state_is_one_line(finished_run, tmp_path):
    run_dir, args = finished_run
    good = open(os.path.join(run_dir, 'training-state-000001.pt'), 'rb').read()
    for content, message in [(good[:len(good) // 2], 'is not a readable training state'),
                             (b'', 'is not a readable training state'),
                             (pickle.dumps([1, 2]), 'is not a readable training state'),
                             (None, "expected a dict with 'net'")]:
        folder = tmp_path / f'case{len(os.listdir(tmp_path))}'
        folder.mkdir()
        state = folder / 'training-state-000001.pt'
        if content is None:
            torch.save({'weights': 1}, state)
        else:
            state.write_bytes(content)
        out = tmp_path / 'runs'
        code, output = cli([a for a in args if not a.startswith('--outdir')] + [f'--outdir={out}',
                                                                                 f'--resume={state}'])
        assert code == 1
        assert message in one_line_error(output)
        assert not out.exists()


def test_edm_style_state_with_a_truncated_snapshot_is_one_line(finished_run, tmp_path):
    """EDM's states carry no EMA: the snapshot beside the state is read, and checked, too."""
    run_dir, args = finished_run
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), map_location='cpu', weights_only=False)
    folder = tmp_path / 'edm'
    folder.mkdir()
    torch.save(dict(net=state['net'], optimizer_state=state['optimizer_state']), folder / 'training-state-000001.pt')
    snap = open(os.path.join(run_dir, 'network-snapshot-000001.pkl'), 'rb').read()
    (folder / 'network-snapshot-000001.pkl').write_bytes(snap[:len(snap) // 2])
    out = tmp_path / 'runs'
    code, output = cli([a for a in args if not a.startswith('--outdir')] + [
        f'--outdir={out}', f'--resume={folder / "training-state-000001.pt"}', '--duration=0.002'])
    assert code == 1
    line = one_line_error(output)
    assert 'is not a readable network pickle' in line and 'EDM-style state' in line, line
    assert not out.exists()


def test_generate_uses_the_same_loader(tmp_path):
    import generate
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(b'\x80\x04garbage')
    with pytest.raises(ValueError) as a:
        generate.load_network(str(bad))
    from training import preflight
    with pytest.raises(ValueError) as b:
        preflight.read_network_pickle(str(bad))
    assert str(a.value) == str(b.value)


# ---------------------------------------------------------------------------------------------------------------------
# 5. File modes honour the umask.


def test_snapshots_states_and_atomic_files_honour_the_umask(finished_run, tmp_path):
    run_dir, _ = finished_run   # written under the test process's umask
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ['network-snapshot-000001.pkl', 'training-state-000001.pt', 'training_options.json']:
        assert stat.S_IMODE(os.stat(os.path.join(run_dir, name)).st_mode) == 0o666 & ~mask, name
    old = os.umask(0o022)
    try:
        dnnlib.util.atomic_write(str(tmp_path / 'a.bin'), lambda f: f.write(b'x'))
        os.umask(0o077)
        dnnlib.util.atomic_write(str(tmp_path / 'b.bin'), lambda f: f.write(b'x'))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'a.bin').st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / 'b.bin').st_mode) == 0o600


def test_fid_refs_and_pca_bases_honour_the_umask(tmp_path):
    import fid
    from edm_aniso import pca
    old = os.umask(0o022)
    try:
        fid.save_reference_stats(str(tmp_path / 'ref.npz'), np.zeros(4), np.eye(4))
        bases = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))[0][None]
        pca.save_pca_file(str(tmp_path / 'bases.pt'), bases, None, 4, 4)
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ---------------------------------------------------------------------------------------------------------------------
# 6. Nothing is saved from a tick with a non-finite loss or weights; the error names the last good state.


class SometimesNaNLoss:
    """EDM-style squared error of a HookNet-like net; NaN on the listed steps, or NaN weights from `poison_step`."""

    def __init__(self, nan_steps=(), poison_step=None):
        self.nan_steps, self.poison_step, self.step = set(nan_steps), poison_step, None

    def begin_step(self, step):
        self.step = step

    def __call__(self, net, images, labels, augment_pipe=None):
        out = (net(images, 1.0) - images).square()
        if self.step == self.poison_step:
            with torch.no_grad():
                net.conv.bias[0] = float('nan')     # after the forward pass: this step's loss stays finite
        return out * float('nan') if self.step in self.nan_steps else out


class PlainNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.conv(x)


def _nan_kwargs(run_dir, data, **loss):
    os.makedirs(run_dir, exist_ok=True)
    # 8 images per step, 2 steps per tick after tick 0 (which is step 0): ticks = [0], [1, 2], [3, 4], [5].
    return dict(run_dir=str(run_dir), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
                data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='test_hardening.PlainNet'),
                loss_kwargs=dict(class_name='test_hardening.SometimesNaNLoss', **loss),
                optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), seed=1, batch_size=8,
                total_kimg=0.048, ema_halflife_kimg=0.01, lr_rampup_kimg=0, kimg_per_tick=0.016, snapshot_ticks=1,
                state_dump_ticks=1, device='cpu')


@pytest.mark.parametrize('loss, what', [(dict(nan_steps=[3]), 'the loss was NaN or infinite in 1 of 2'),
                                        (dict(poison_step=4), 'the weights became NaN or infinite')])
def test_no_snapshot_or_state_from_a_nonfinite_tick(tmp_path, data_zip, loss, what):
    run_dir = tmp_path / 'run'
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.training_loop(**_nan_kwargs(run_dir, data_zip, **loss))
    message = str(info.value)
    assert what in message and 'of tick 2' in message
    # Ticks 0 and 1 wrote (the names count whole kimg: both are 000000); tick 2 wrote nothing.
    good = str(run_dir / 'training-state-000000.pt')
    assert f'the last good training state is {good}' in message
    state = torch.load(good, map_location='cpu', weights_only=False)
    assert state['cur_nimg'] == 24 and torch.isfinite(state['net'].conv.weight).all()
    with open(run_dir / 'network-snapshot-000000.pkl', 'rb') as f:
        assert torch.isfinite(pickle.load(f)['ema'].conv.weight).all()
    assert len(open(run_dir / 'stats.jsonl').readlines()) == 2


def test_nonfinite_before_any_state_says_so(tmp_path, data_zip):
    with pytest.raises(loop.NonFiniteLossError, match='no training state was written yet'):
        loop.training_loop(**_nan_kwargs(tmp_path / 'run', data_zip, nan_steps=[1]))


# ---------------------------------------------------------------------------------------------------------------------
# 7. Temporary files that a kill left behind are removed at start.


def test_stale_temporary_files_of_the_run_are_removed(finished_run, tmp_path, monkeypatch):
    run_dir, args = finished_run
    run = copy_run(run_dir, tmp_path / 'run')
    old = time.time() - 3600
    stale = [os.path.join(run, '.training-state-000002.pt.k3j2h1.tmp'),
             os.path.join(run, '.network-snapshot-000002.pkl.x9y8z7.tmp')]
    fresh = os.path.join(run, '.training-state-000003.pt.aaaaaa.tmp')        # a write in progress: kept
    other = os.path.join(run, '.my-notes.txt.tmp')                            # not ours: kept
    for path in stale + [fresh, other]:
        open(path, 'wb').write(b'\0' * 100)
    for path in stale + [other]:
        os.utime(path, (old, old))
    out = tmp_path / 'runs'
    monkeypatch.setattr(loop, 'training_loop', lambda **kwargs: None)     # the clean-up happens before training
    code, output = cli([a for a in args if not a.startswith('--outdir')] + [
        f'--outdir={out}', f'--resume={os.path.join(run, "training-state-000001.pt")}', '--duration=0.002'])
    assert code == 0, output
    assert 'Removed 2 temporary file(s) left by an interrupted run' in output
    assert not any(os.path.exists(p) for p in stale) and os.path.exists(fresh) and os.path.exists(other)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Filesystem errors are one line naming the path; earlier files stay intact.


def test_outdir_that_is_a_file(tmp_path, data_zip):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    for outdir in [blocker, blocker / 'sub']:
        code, output = cli([f'--outdir={outdir}', f'--data={data_zip}', '--duration=0.001', '--seed=1', *TINY])
        assert code == 1
        assert f'--outdir: {blocker} is a file, not a folder' in one_line_error(output)


def test_unwritable_outdir(tmp_path, data_zip, monkeypatch):
    from training import preflight
    monkeypatch.setattr(preflight.os, 'access', lambda path, mode: False)   # we run as root: chmod would not stop us
    code, output = cli([f'--outdir={tmp_path / "runs"}', f'--data={data_zip}', '--duration=0.001', '--seed=1', *TINY])
    assert code == 1 and 'is not writable' in one_line_error(output)


def test_disk_full_during_a_snapshot(tmp_path, data_zip, monkeypatch):
    real = loop.atomic_write
    calls = []

    def fill_up(path, write):
        calls.append(path)
        if os.path.basename(path) == 'network-snapshot-000001.pkl':
            def partial(f):
                f.write(b'partial')
                raise OSError(28, 'No space left on device')
            return real(path, partial)
        return real(path, write)
    monkeypatch.setattr(loop, 'atomic_write', fill_up)
    out = tmp_path / 'runs'
    code, output = cli([f'--outdir={out}', f'--data={data_zip}', '--duration=0.001', '--seed=1', *TINY])
    assert code == 1
    run_dir = out / '00000-tiny-8x8-uncond-ddpmpp-edm-gpus1-batch32-fp32'
    line = one_line_error(output)
    assert f'cannot write {run_dir / "network-snapshot-000001.pkl"}: No space left on device' in line
    assert sorted(os.listdir(run_dir)) == ['log.txt', 'network-snapshot-000000.pkl', 'stats.jsonl',
                                           'training_options.json']
    with open(run_dir / 'network-snapshot-000000.pkl', 'rb') as f:
        assert 'ema' in pickle.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Stage 2 without stage 1 warns; dataset_tool refuses an empty source and an existing --dest.


def _dry(args):
    code, output = cli(args + ['-n'])
    assert code == 0, output
    return output


def test_stage2_without_transfer_or_from_an_edm_pickle_warns(tmp_path, data_zip):
    args = [f'--outdir={tmp_path}', f'--data={data_zip}', '--cond=1', '--duration=0.001', '--precond=aniso', *TINY]
    out = _dry(args + ['--stage=2'])
    assert 'Warning: --stage=2 without --transfer trains the U-Net and both schedules from random' in out
    assert 'Warning' not in _dry(args + ['--stage=1'])
    text = _dry(args).split('Training options:')[1]
    config = json.loads(text[:text.index('\n}\n') + 2])
    kwargs = dict(config['network_kwargs'])
    kwargs.update(class_name='training.networks.EDMPrecond')
    for key in ['stage', 'subspace', 'per_class', 'num_knots']:
        kwargs.pop(key, None)
    edm = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=8, img_channels=3, label_dim=3)
    pkl = tmp_path / 'edm.pkl'
    pkl.write_bytes(pickle.dumps({'ema': edm}))
    out = _dry(args + ['--stage=2', f'--transfer={pkl}'])
    assert 'Warning: --stage=2 from a EDMPrecond pickle skips stage 1' in out
    assert 'Warning' not in _dry(args + ['--stage=1', f'--transfer={pkl}'])


def test_dataset_tool_refuses_an_empty_source(tmp_path):
    (tmp_path / 'empty').mkdir()
    code, output = cli([f'--source={tmp_path / "empty"}', f'--dest={tmp_path / "out.zip"}'], dataset_tool.main)
    assert code == 1 and 'holds no images' in one_line_error(output)
    assert not (tmp_path / 'out.zip').exists()


def test_dataset_tool_refuses_an_existing_dest_unless_overwrite(tmp_path):
    datagen.make_image_folder(str(tmp_path / 'src'), 4, 8)
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'precious')
    code, output = cli([f'--source={tmp_path / "src"}', f'--dest={dest}'], dataset_tool.main)
    assert code == 1 and 'already exists; pass --overwrite' in one_line_error(output)
    assert dest.read_bytes() == b'precious'
    code, output = cli([f'--source={tmp_path / "src"}', f'--dest={dest}', '--overwrite'], dataset_tool.main)
    assert code == 0, output
    with zipfile.ZipFile(dest) as z:
        assert len([n for n in z.namelist() if n.endswith('.png')]) == 4


# ---------------------------------------------------------------------------------------------------------------------
# 10. DDP: a process-group timeout, and workers that exit when the torchrun agent dies.


WORKER = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {root!r})
    from torch_utils import distributed as dist
    import torch
    dist.init('cpu', timeout={timeout})
    with open(os.path.join({out!r}, f'pid{{dist.get_rank()}}'), 'w') as f:
        f.write(str(os.getpid()))
    if {freeze} and dist.get_rank() == 1:
        time.sleep(60)                      # a frozen rank
    t0 = time.time()
    try:
        dist.barrier()
        time.sleep(60)
    except Exception as err:
        print(f'rank {{dist.get_rank()}} failed after {{time.time() - t0:.1f}} s: {{type(err).__name__}}', flush=True)
        os._exit(3)
''')


def _torchrun(tmp_path, timeout, freeze):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER.format(root=ROOT, out=str(tmp_path), timeout=timeout, freeze=freeze))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(script)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(paths, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and not all(os.path.exists(p) for p in paths):
        time.sleep(0.2)
    return all(os.path.exists(p) for p in paths)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead for our purposes
        return open(f'/proc/{pid}/stat').read().split()[2] != 'Z'
    except OSError:
        return False


@pytest.mark.slow
def test_workers_exit_when_the_torchrun_agent_dies(tmp_path):
    agent = _torchrun(tmp_path, None, False)
    try:
        pids = [str(tmp_path / 'pid0'), str(tmp_path / 'pid1')]
        assert _wait_for(pids, 120), agent.communicate(timeout=10)[0] if agent.poll() is not None else 'no workers'
        time.sleep(1)
        workers = [int(open(p).read()) for p in pids]
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers)
    finally:
        for p in [tmp_path / 'pid0', tmp_path / 'pid1']:
            if p.exists() and _alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()


@pytest.mark.slow
def test_pg_timeout_fails_a_frozen_run(tmp_path):
    agent = _torchrun(tmp_path, 4, True)
    try:
        output = agent.communicate(timeout=120)[0]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert 'rank 0 failed after' in output, output[-3000:]
    seconds = float(output.split('rank 0 failed after ')[1].split(' s')[0])
    assert 3 <= seconds < 30


def test_train_has_a_pg_timeout_option(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, 'init', lambda device=None, timeout=None: seen.update(timeout=timeout) or
                        (_ for _ in ()).throw(ValueError('stop here')))
    code, output = cli(['--outdir=x', '--data=y', '--pg-timeout=90'])
    assert seen['timeout'] == 90 and code == 1


@pytest.mark.slow
def test_bad_input_under_torchrun_is_one_line_from_rank_0(tmp_path, data_zip):
    """Rank 0 checks the dataset and prints the line; rank 1 exits quietly (no second line, no traceback of ours)."""
    bad = _zip_of(tmp_path / 'bad.zip', BAD_DATASETS['mixed-sizes'][0])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(ROOT, 'train.py'), f'--outdir={tmp_path / "runs"}', f'--data={bad}',
                             '--duration=0.001', *TINY], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count('Error: --data:') == 1 and 'all images must have the same size' in output, output[-3000:]
    assert 'preflight.py' not in output and 'train.py", line' not in output
    assert not (tmp_path / 'runs').exists()


# ---------------------------------------------------------------------------------------------------------------------
# Also: the newest snapshot without run numbers.


def test_latest_snapshot_tool(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import latest_snapshot
    for run, files in [('00000-a-edm', ['network-snapshot-000004.pkl', 'training-state-000004.pt']),
                       ('00001-b-stage1', ['network-snapshot-000002.pkl', 'network-snapshot-000010.pkl',
                                           'training-state-000002.pt']),
                       ('00002-c-edm', []),                        # a run that wrote nothing yet
                       ('notes', ['network-snapshot-000099.pkl'])]:   # not a run folder
        (tmp_path / run).mkdir()
        for name in files:
            (tmp_path / run / name).write_bytes(b'')
    assert latest_snapshot.latest(str(tmp_path)) == str(tmp_path / '00001-b-stage1' / 'network-snapshot-000010.pkl')
    assert latest_snapshot.latest(str(tmp_path), desc='-edm') == str(tmp_path / '00000-a-edm' /
                                                                      'network-snapshot-000004.pkl')
    assert latest_snapshot.latest(str(tmp_path), kind='state') == str(tmp_path / '00001-b-stage1' /
                                                                       'training-state-000002.pt')
    code, output = cli([str(tmp_path / '00002-c-edm')], latest_snapshot.main)
    assert code == 1 and 'no network-snapshot-*.pkl in' in one_line_error(output)
