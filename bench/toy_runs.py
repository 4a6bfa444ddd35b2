"""The toy quick-start runs that several benchmarks train in a work folder (bench/likelihood.py, bench/disc_real.py).

Each command runs in a subprocess of this Python with one thread and the repository on PYTHONPATH; a failed one
raises with the tail of its output."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py options of the toy model (the README's former blob quick start), shared by EDM and the schedule runs.
TOY = ['--cond=1', '--arch=ddpmpp', '--cbase=16', '--cres=1,2', '--batch=32', '--tick=1', '--snap=2', '--seed=1']


def run(cmd: list[str], cwd: str) -> None:
    """Run ``python *cmd`` in ``cwd``."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable] + cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}')


def newest_snapshot(folder: str) -> str:
    """The newest network-snapshot-*.pkl of a --nosubdir run folder."""
    snaps = sorted(f for f in os.listdir(folder) if f.startswith('network-snapshot-') and f.endswith('.pkl'))
    return os.path.join(folder, snaps[-1])


def toy_dataset(workdir: str) -> str:
    """``workdir``/toy-16x16.zip: 256 coloured blobs at 16x16 in 4 classes (made once, then reused)."""
    data = os.path.join(workdir, 'toy-16x16.zip')
    if not os.path.exists(data):
        run([os.path.join(ROOT, 'tools', 'make_toy_images.py'), '--dest=toy-images', '--num=256', '--res=16',
             '--classes=4'], workdir)
        run([os.path.join(ROOT, 'dataset_tool.py'), '--source=toy-images', f'--dest={data}'], workdir)
    return data
