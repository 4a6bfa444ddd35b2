"""Run every bad input we know of through the command lines and write the table docs/bad-inputs.md.

    python tools/bad_inputs.py                       # all cases (a few minutes on CPU), writes docs/bad-inputs.md
    python tools/bad_inputs.py --only=resume         # the cases whose name contains "resume", table to stdout only
    python tools/bad_inputs.py --scan-images=50000   # also time the dataset header check on that many images

Each case runs as a user would run it (a fresh `python train.py ...` process in a scratch folder) and is recorded
with its exit status, its last output line (the error) and whether it wrote anything: a case passes when it exits
with the expected status, prints exactly one `Error:` line and no traceback, and leaves the scratch folder as it was
(apart from what the case itself expects). The table says for each case whether it passed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import click
import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cbase=8', '--cres=1', '--batch=32', '--tick=1', '--snap=1', '--dump=1', '--lr-rampup=0', '--device=cpu',
        '--workers=1', '--augment=0', '--seed=1']


@dataclass
class Case:
    name: str                       # short id
    what: str                       # the bad input, in words
    tool: str                       # train.py, generate.py, dataset_tool.py, fid.py
    args: list                      # arguments ({w} = scratch folder)
    expect: int = 1                 # expected exit status
    expect_text: str = 'Error:'     # a piece of the last line
    may_write: list = field(default_factory=list)   # paths (relative to {w}) the case may create


# ---------------------------------------------------------------------------------------------------------------------
# Materials


def _png(shape, mode=None, bits16=False) -> bytes:
    rng = np.random.RandomState(sum(shape))
    buf = io.BytesIO()
    if bits16:
        PIL.Image.fromarray(rng.randint(0, 65535, size=shape).astype(np.uint16)).save(buf, format='png')
    else:
        img = PIL.Image.fromarray(rng.randint(0, 256, size=shape, dtype=np.uint8), mode)
        img.save(buf, format='png')
    return buf.getvalue()


def _palette_png() -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert('P').save(buf, format='png')
    return buf.getvalue()


def _zip(path: str, files: dict) -> None:
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in files.items():
            z.writestr(name, data)


def _good(n: int = 24, labels: bool = True) -> dict:
    files = {f'00000/img{i:08d}.png': _png((8, 8, 3)) for i in range(n)}
    if labels:
        files['dataset.json'] = json.dumps({'labels': [[k, i % 3] for i, k in enumerate(files)]}).encode()
    return files


def _run(cmd: list, cwd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    return subprocess.run([sys.executable] + cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def make_materials(w: str) -> None:
    """Datasets, a finished tiny run, pickles and states, good and bad, in the scratch folder `w`."""
    good = _good()
    _zip(os.path.join(w, 'good.zip'), good)
    _zip(os.path.join(w, 'unlabelled.zip'), _good(labels=False))
    body = {k: v for k, v in good.items() if k != 'dataset.json'}
    bad = {
        'mixed-sizes': dict(body, **{'00000/img99.png': _png((16, 16, 3))}),
        'mixed-channels': dict(body, **{'00000/img99.png': _png((8, 8))}),
        'truncated-png': dict(body, **{'00000/img99.png': _png((8, 8, 3))[:60]}),
        'garbage-png': dict(body, **{'00000/img99.png': b'GIF89a not really'}),
        'non-square': dict(body, **{'00000/img99.png': _png((8, 16, 3))}),
        'rgba': {f'img{i}.png': _png((8, 8, 4)) for i in range(4)},
        'palette': {f'img{i}.png': _palette_png() for i in range(4)},
        '16-bit': {f'img{i}.png': _png((8, 8), bits16=True) for i in range(4)},
        'json-not-json': dict(body, **{'dataset.json': b'{"labels": [['}),
        'json-a-list': dict(body, **{'dataset.json': b'[["a.png", 1]]'}),
        'json-labels-dict': dict(body, **{'dataset.json': b'{"labels": {"00000/img00000000.png": 1}}'}),
        'json-bad-pair': dict(body, **{'dataset.json': b'{"labels": [["00000/img00000000.png"]]}'}),
        'json-missing-label': dict(body, **{'dataset.json': b'{"labels": [["00000/img00000000.png", 1]]}'}),
        'json-negative-label': dict(body, **{'dataset.json': json.dumps(
            {'labels': [[k, -1] for k in body]}).encode()}),
        'json-string-label': dict(body, **{'dataset.json': json.dumps(
            {'labels': [[k, 'cat'] for k in body]}).encode()}),
        'no-images': {'readme.txt': b'hello'},
    }
    for name, files in bad.items():
        _zip(os.path.join(w, f'{name}.zip'), files)
    with open(os.path.join(w, 'not-a-zip.zip'), 'wb') as f:
        f.write(b'this is not a zip')
    with open(os.path.join(w, 'notes.txt'), 'w') as f:
        f.write('not a dataset')
    os.makedirs(os.path.join(w, 'empty-folder'))
    os.makedirs(os.path.join(w, 'rgba-folder'))
    for i in range(2):
        with open(os.path.join(w, 'rgba-folder', f'{i}.png'), 'wb') as f:
            f.write(_png((8, 8, 4)))
    os.makedirs(os.path.join(w, 'odd-folder'))
    for i in range(2):
        with open(os.path.join(w, 'odd-folder', f'{i}.png'), 'wb') as f:
            f.write(_png((12, 12, 3)))
    with open(os.path.join(w, 'existing.zip'), 'wb') as f:
        f.write(b'precious')

    # A finished tiny run (1 kimg), then its files in good and bad variants.
    result = _run([os.path.join(ROOT, 'train.py'), '--outdir=runs', '--data=good.zip', '--cond=1', '--duration=0.001',
                   *TINY], w)
    if result.returncode != 0:
        raise RuntimeError(f'the reference run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}')
    run = os.path.join(w, 'runs', sorted(os.listdir(os.path.join(w, 'runs')))[0])
    shutil.move(run, os.path.join(w, 'run'))
    shutil.rmtree(os.path.join(w, 'runs'))
    run = os.path.join(w, 'run')
    snap = open(os.path.join(run, 'network-snapshot-000001.pkl'), 'rb').read()
    state = open(os.path.join(run, 'training-state-000001.pt'), 'rb').read()
    variants = {
        'truncated.pkl': snap[:len(snap) // 3],
        'foreign.pkl': pickle.dumps({'weights': [1, 2, 3]}),
        'text.pkl': b'hello',
    }
    for name, data in variants.items():
        with open(os.path.join(w, name), 'wb') as f:
            f.write(data)
    import torch   # noqa: PLC0415 - only the materials need it
    with open(os.path.join(w, 'not-a-denoiser.pkl'), 'wb') as f:
        pickle.dump({'ema': torch.nn.Linear(2, 2)}, f)
    for name, data in [('truncated', state[:len(state) // 2]), ('empty', b'')]:
        os.makedirs(os.path.join(w, name))
        with open(os.path.join(w, name, 'training-state-000001.pt'), 'wb') as f:
            f.write(data)
    os.makedirs(os.path.join(w, 'foreign'))
    torch.save({'weights': 1}, os.path.join(w, 'foreign', 'training-state-000001.pt'))
    full = torch.load(os.path.join(run, 'training-state-000001.pt'), map_location='cpu', weights_only=False)
    os.makedirs(os.path.join(w, 'edm-state'))
    torch.save(dict(net=full['net'], optimizer_state=full['optimizer_state']),
               os.path.join(w, 'edm-state', 'training-state-000001.pt'))
    with open(os.path.join(w, 'edm-state', 'network-snapshot-000001.pkl'), 'wb') as f:
        f.write(snap[:len(snap) // 2])


# ---------------------------------------------------------------------------------------------------------------------
# The cases


def cases() -> list[Case]:
    t = lambda *a: ['--outdir=out', *a]   # noqa: E731 - train.py with the scratch outdir
    tiny = ['--duration=0.002', *TINY]
    st = '--resume=run/training-state-000001.pt'
    out = [
        # train.py: the dataset
        Case('data-missing', '--data does not exist', 'train.py', t('--data=nope.zip', *tiny)),
        Case('data-text-file', '--data is a text file', 'train.py', t('--data=notes.txt', *tiny)),
        Case('data-not-a-zip', '--data is a .zip that is not a zip', 'train.py', t('--data=not-a-zip.zip', *tiny)),
        Case('data-empty-folder', '--data is an empty folder', 'train.py', t('--data=empty-folder', *tiny)),
        Case('data-no-images', 'a zip without images', 'train.py', t('--data=no-images.zip', *tiny)),
        Case('data-mixed-sizes', 'one 16x16 image among 8x8', 'train.py', t('--data=mixed-sizes.zip', *tiny)),
        Case('data-mixed-channels', 'one greyscale image among RGB', 'train.py', t('--data=mixed-channels.zip', *tiny)),
        Case('data-truncated-png', 'a truncated PNG', 'train.py', t('--data=truncated-png.zip', *tiny)),
        Case('data-garbage-png', 'a .png that is not an image', 'train.py', t('--data=garbage-png.zip', *tiny)),
        Case('data-non-square', 'a non-square image', 'train.py', t('--data=non-square.zip', *tiny)),
        Case('data-rgba', 'RGBA images', 'train.py', t('--data=rgba.zip', *tiny)),
        Case('data-palette', 'palette (P) images', 'train.py', t('--data=palette.zip', *tiny)),
        Case('data-16-bit', '16-bit greyscale images', 'train.py', t('--data=16-bit.zip', *tiny)),
        Case('json-not-json', 'dataset.json is not JSON', 'train.py', t('--data=json-not-json.zip', *tiny)),
        Case('json-a-list', 'dataset.json is a list', 'train.py', t('--data=json-a-list.zip', *tiny)),
        Case('json-labels-dict', '"labels" is a dict', 'train.py', t('--data=json-labels-dict.zip', *tiny)),
        Case('json-bad-pair', 'a label entry without a label', 'train.py', t('--data=json-bad-pair.zip', *tiny)),
        Case('json-missing-label', 'an image without a label', 'train.py', t('--data=json-missing-label.zip', *tiny)),
        Case('json-negative-label', 'a negative class id', 'train.py', t('--data=json-negative-label.zip', *tiny)),
        Case('json-string-label', 'a string label', 'train.py', t('--data=json-string-label.zip', *tiny)),
        Case('cond-without-labels', '--cond=1 on an unlabelled dataset', 'train.py',
             t('--data=unlabelled.zip', '--cond=1', *tiny)),
        # train.py: options and folders
        Case('batch-split', '--batch=32 --batch-gpu=5', 'train.py', t('--data=good.zip', *tiny, '--batch-gpu=5')),
        Case('outdir-is-file', '--outdir is a file', 'train.py', ['--outdir=notes.txt', '--data=good.zip', *tiny]),
        Case('outdir-under-file', '--outdir below a file', 'train.py', ['--outdir=notes.txt/x', '--data=good.zip',
                                                                        *tiny]),
        Case('device', '--device=nonsense', 'train.py', t('--data=good.zip', *tiny, '--device=nonsense')),
        Case('duration-zero', '--duration=0', 'train.py', t('--data=good.zip', '--duration=0'), expect=2),
        Case('lr-negative', '--lr=-1', 'train.py', t('--data=good.zip', '--lr=-1'), expect=2),
        Case('cres-not-a-list', '--cres=1,x', 'train.py', t('--data=good.zip', '--cres=1,x'), expect=2),
        Case('foreign-option', '--kappa without --precond=aniso', 'train.py', t('--data=good.zip', *tiny,
                                                                              '--kappa=2')),
        Case('stage1-subspace', '--precond=aniso --stage=1 --subspace=dct', 'train.py',
             t('--data=good.zip', *tiny, '--precond=aniso', '--stage=1', '--subspace=dct')),
        Case('pca-bases-missing', '--pca-bases file missing', 'train.py',
             t('--data=good.zip', *tiny, '--precond=aniso', '--stage=2', '--subspace=pca', '--pca-bases=nope.pt')),
        Case('stage2-no-transfer', '--stage=2 without --transfer (dry run)', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--precond=aniso', '--stage=2', '-n'), expect=0,
             expect_text='Dry run; exiting.'),
        Case('stage2-from-edm', '--stage=2 --transfer=EDM pickle (dry run)', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--precond=aniso', '--stage=2',
               '--transfer=run/network-snapshot-000001.pkl', '-n'), expect=0, expect_text='Dry run; exiting.'),
        # train.py: --transfer
        Case('transfer-missing', '--transfer file missing', 'train.py', t('--data=good.zip', '--cond=1', *tiny,
                                                                          '--transfer=nope.pkl')),
        Case('transfer-truncated', '--transfer pickle truncated', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--transfer=truncated.pkl')),
        Case('transfer-text', '--transfer is a text file', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--transfer=text.pkl')),
        Case('transfer-foreign', '--transfer pickle without \'ema\'', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--transfer=foreign.pkl')),
        Case('transfer-not-denoiser', '--transfer \'ema\' is a Linear', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--transfer=not-a-denoiser.pkl')),
        Case('transfer-other-arch', '--transfer from --cbase=8 into --cbase=16', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--cbase=16', '--transfer=run/network-snapshot-000001.pkl')),
        Case('transfer-and-resume', '--transfer and --resume together', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--transfer=run/network-snapshot-000001.pkl', st)),
        # train.py: --resume
        Case('resume-wrong-name', '--resume=a .pkl', 'train.py', t('--data=good.zip', *tiny,
                                                                   '--resume=run/network-snapshot-000001.pkl')),
        Case('resume-missing', '--resume state missing', 'train.py', t('--data=good.zip', *tiny,
                                                                       '--resume=training-state-000009.pt')),
        Case('resume-truncated', '--resume state truncated', 'train.py', t('--data=good.zip', '--cond=1', *tiny,
                                                                           '--resume=truncated/training-state-000001.pt')),
        Case('resume-empty', '--resume state empty', 'train.py', t('--data=good.zip', '--cond=1', *tiny,
                                                                   '--resume=empty/training-state-000001.pt')),
        Case('resume-foreign', '--resume state without \'net\'', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--resume=foreign/training-state-000001.pt')),
        Case('resume-edm-bad-snapshot', '--resume an EDM-style state whose snapshot is truncated', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--resume=edm-state/training-state-000001.pt')),
        Case('resume-other-cond', '--resume a --cond=1 state with --cond=0', 'train.py',
             t('--data=good.zip', '--cond=0', *tiny, st)),
        Case('resume-other-augment', '--resume an --augment=0 state with --augment=0.2', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--augment=0.2', st)),
        Case('resume-other-precond', '--resume an EDM state with --precond=vp', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--precond=vp', st)),
        Case('resume-other-cbase', '--resume a --cbase=8 state with --cbase=16', 'train.py',
             t('--data=good.zip', '--cond=1', *tiny, '--cbase=16', st)),
        Case('resume-finished', '--resume the final state of a finished run (same --duration)', 'train.py',
             t('--data=good.zip', '--cond=1', *TINY, '--duration=0.001', st), expect=0,
             expect_text='Newest snapshot: run/network-snapshot-000001.pkl'),
        # generate.py
        Case('network-missing', '--network missing', 'generate.py', ['--network=nope.pkl', '--outdir=out',
                                                                      '--device=cpu']),
        Case('network-truncated', '--network truncated', 'generate.py', ['--network=truncated.pkl', '--outdir=out',
                                                                          '--device=cpu']),
        Case('network-foreign', '--network without \'ema\'', 'generate.py', ['--network=foreign.pkl', '--outdir=out',
                                                                              '--device=cpu']),
        Case('steps-1-edm', '--steps=1 with the EDM sampler', 'generate.py',
             ['--network=run/network-snapshot-000001.pkl', '--outdir=out', '--device=cpu', '--steps=1']),
        Case('class-out-of-range', '--class=7 on a 3-class network', 'generate.py',
             ['--network=run/network-snapshot-000001.pkl', '--outdir=out', '--device=cpu', '--class=7']),
        Case('aniso-sampler-on-edm', '--sampler=aniso_rk2 on an EDM network', 'generate.py',
             ['--network=run/network-snapshot-000001.pkl', '--outdir=out', '--device=cpu', '--sampler=aniso_rk2']),
        Case('sigma-range', '--sigma_min=5 --sigma_max=1', 'generate.py',
             ['--network=run/network-snapshot-000001.pkl', '--outdir=out', '--device=cpu', '--sigma_min=5',
              '--sigma_max=1']),
        Case('seeds-not-a-list', '--seeds=abc', 'generate.py', ['--network=run/network-snapshot-000001.pkl',
                                                                 '--outdir=out', '--seeds=abc'], expect=2),
        # dataset_tool.py
        Case('tool-empty-source', '--source is an empty folder', 'dataset_tool.py', ['--source=empty-folder',
                                                                                     '--dest=new.zip']),
        Case('tool-existing-dest', '--dest zip exists (no --overwrite)', 'dataset_tool.py',
             ['--source=good.zip', '--dest=existing.zip']),
        Case('tool-missing-source', '--source missing', 'dataset_tool.py', ['--source=nope', '--dest=new.zip']),
        Case('tool-rgba', 'RGBA source images', 'dataset_tool.py', ['--source=rgba-folder', '--dest=new.zip']),
        Case('tool-not-power-of-two', '12x12 source images', 'dataset_tool.py', ['--source=odd-folder',
                                                                                 '--dest=new.zip']),
        Case('tool-resolution', '--resolution=abc', 'dataset_tool.py', ['--source=good.zip', '--dest=new.zip',
                                                                        '--resolution=abc']),
        Case('tool-truncated-png', 'a truncated PNG in the source zip', 'dataset_tool.py',
             ['--source=truncated-png.zip', '--dest=new.zip']),
        # fid.py
        Case('fid-ref-data-missing', 'fid.py ref --data missing', 'fid.py', ['ref', '--data=nope.zip',
                                                                             '--dest=ref.npz']),
        Case('fid-calc-ref-missing', 'fid.py calc --ref missing', 'fid.py', ['calc', '--images=good.zip',
                                                                             '--ref=nope.npz']),
    ]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Running


def _listing(w: str) -> dict:
    found = {}
    for root, _dirs, files in os.walk(w):
        for name in files:
            full = os.path.join(root, name)
            st = os.stat(full)
            found[os.path.relpath(full, w)] = (st.st_size, st.st_mtime_ns)
    for root, dirs, _files in os.walk(w):
        for name in dirs:
            found.setdefault(os.path.relpath(os.path.join(root, name), w) + '/', None)
    return found


def run_case(case: Case, w: str) -> dict:
    before = _listing(w)
    result = _run([os.path.join(ROOT, case.tool), *case.args], w)
    after = _listing(w)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not k.startswith('__pycache__') and '/__pycache__' not in k)
    text = (result.stdout + result.stderr).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('Error:')]
    last = errors[-1] if errors else (lines[-1] if lines else '')
    if case.expect == 2:   # click usage errors: "Usage: ... Try --help ... Error: ..."
        one_line = len(errors) == 1
    elif case.expect == 1:
        one_line = len(errors) == 1 and errors[0] == lines[-1]
    else:
        one_line = not errors
    passed = (result.returncode == case.expect and one_line and 'Traceback' not in text and case.expect_text in last
              and not changed)
    warnings = [line for line in lines if line.startswith('Warning:')]
    return dict(name=case.name, what=case.what, tool=case.tool, args=' '.join(case.args), code=result.returncode,
                line=(warnings[0] + ' ... ' + last) if warnings and case.expect == 0 else last, written=changed,
                passed=passed)


def measure_scan(num: int, res: int = 32, repeats: int = 3) -> dict:
    """Process CPU time of `preflight.scan_dataset` on a zip of `num` random res x res RGB PNGs (median of repeats),
    written as dataset_tool.py writes them (uncompressed PNG)."""
    sys.path.insert(0, ROOT)
    from training import preflight   # noqa: PLC0415
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'scan-{res}x{res}.zip')
        rng = np.random.RandomState(0)
        with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
            for i in range(num):
                buf = io.BytesIO()
                PIL.Image.fromarray(rng.randint(0, 256, size=(res, res, 3), dtype=np.uint8)).save(
                    buf, format='png', compress_level=0)
                z.writestr(f'{i // 1000:05d}/img{i:08d}.png', buf.getvalue())
        size = os.path.getsize(path)
        cpu, wall = [], []
        for _ in range(repeats):
            t0, w0 = time.process_time(), time.time()
            summary = preflight.scan_dataset(path, progress=False)
            cpu.append(time.process_time() - t0)
            wall.append(time.time() - w0)
        assert summary.num_images == num
    return dict(num=num, res=res, zip_mb=size / 2**20, cpu_s=statistics.median(cpu), wall_s=statistics.median(wall),
                repeats=repeats, cpu_all=cpu)


def write_table(rows: list[dict], scan: Optional[dict], path: Optional[str]) -> str:
    passed = sum(r['passed'] for r in rows)
    head = [
        '# Bad inputs and their one-line errors',
        '',
        f'Written by `python tools/bad_inputs.py` (issue 12): {len(rows)} bad inputs, each run as a user would run it '
        '(a fresh process in a scratch folder holding good and bad datasets, a finished 1-kimg tiny run, truncated and '
        'foreign pickles and states). **pass** means: the expected exit status (1 for our errors, 2 for click\'s '
        'usage errors, 0 for the warnings and the finished run), exactly one `Error:` line and no traceback, and '
        'nothing written or changed in the scratch folder.',
        '',
        f'Result: {passed} of {len(rows)} pass.',
        '',
    ]
    if scan is not None:
        head += [
            '## Cost of the dataset check',
            '',
            f'`training.preflight.scan_dataset` (every image header, PNG chunk CRCs, dataset.json) on '
            f'{scan["num"]:,} random {scan["res"]}x{scan["res"]} RGB PNGs in an uncompressed zip '
            f'({scan["zip_mb"]:.0f} MiB, as dataset_tool.py writes them): **{scan["cpu_s"]:.1f} s** process CPU time, '
            f'{scan["wall_s"]:.1f} s wall (median of {scan["repeats"]}: '
            f'{", ".join(f"{v:.1f}" for v in scan["cpu_all"])} s CPU), on the shared 2-core CPU machine. '
            f'Measured by the run that wrote this page (`python tools/bad_inputs.py --scan-images={scan["num"]}`), '
            f'under the CPU lock.',
            '',
        ]
    head += ['## The table', '', '| # | tool | bad input | exit | one-line error (last line) | written | pass |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for i, r in enumerate(rows, 1):
        line = r['line'].replace('|', '\\|')
        written = ', '.join(r['written']) if r['written'] else 'nothing'
        head.append(f'| {i} | {r["tool"]} | {r["what"]} | {r["code"]} | `{line}` | {written} | '
                    f'{"pass" if r["passed"] else "**FAIL**"} |')
    text = '\n'.join(head) + '\n'
    if path is not None:
        with open(path, 'w') as f:
            f.write(text)
    return text


@click.command()
@click.option('--only', help='Run only the cases whose name contains this (no file written)', type=str)
@click.option('--scan-images', help='Also time the dataset check on this many images', type=int, default=0)
@click.option('--out', help='Table file', default=os.path.join(ROOT, 'docs', 'bad-inputs.md'), show_default=True)
@click.option('--keep', help='Keep the scratch folder', is_flag=True)
def main(only: Optional[str], scan_images: int, out: str, keep: bool) -> None:
    """Run the bad inputs and write the table."""
    scan = measure_scan(scan_images) if scan_images else None
    if scan is not None:
        print(f'scan of {scan["num"]} images: {scan["cpu_s"]:.2f} s CPU (median), {scan["wall_s"]:.2f} s wall')
    selected = [c for c in cases() if only is None or only in c.name]
    rows = []
    if selected:
        w = tempfile.mkdtemp(prefix='bad-inputs-')
        try:
            make_materials(w)
            for case in selected:
                row = run_case(case, w)
                rows.append(row)
                print(f'{"pass" if row["passed"] else "FAIL"}  {case.name:<24s} {row["code"]}  {row["line"][:150]}',
                      flush=True)
        finally:
            if keep:
                print(f'scratch folder: {w}')
            else:
                shutil.rmtree(w, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f'{sum(r["passed"] for r in rows)} of {len(rows)} pass; children CPU {usage.ru_utime + usage.ru_stime:.0f} s')
    if only is None or scan is not None:
        write_table(rows, scan, out if only is None else None)


if __name__ == '__main__':
    main()
