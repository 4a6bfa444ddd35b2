"""patches/: the diffs apply to upstream NVlabs/edm (commit 008a4e5) and the patched CLIs offer the plugin.

Skipped unless EDM_UPSTREAM names a checkout of NVlabs/edm at that commit (e.g. EDM_UPSTREAM=/tmp/edm-upstream).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / 'patches').glob('*.patch'))
UPSTREAM = os.environ.get('EDM_UPSTREAM')

pytestmark = pytest.mark.skipif(not UPSTREAM, reason='set EDM_UPSTREAM to a checkout of NVlabs/edm 008a4e5')


@pytest.fixture(scope='module')
def patched(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp('edm') / 'edm'
    shutil.copytree(UPSTREAM, dest, symlinks=True)
    for patch in PATCHES:
        subprocess.run(['git', 'apply', '--check', str(patch)], cwd=dest, check=True, capture_output=True)
        subprocess.run(['git', 'apply', str(patch)], cwd=dest, check=True, capture_output=True)
    return dest


def test_patches_exist_and_are_small():
    assert {p.name for p in PATCHES} == {'generate-sampler-aniso.patch', 'train-precond-aniso.patch'}
    for p in PATCHES:
        added = [ln for ln in p.read_text().splitlines() if ln.startswith('+') and not ln.startswith('+++')]
        assert 0 < len(added) <= 12, (p.name, len(added))


def test_patches_apply_and_compile(patched):
    for name in ['generate.py', 'train.py', 'training/training_loop.py']:
        subprocess.run([sys.executable, '-m', 'py_compile', str(patched / name)], check=True)
    assert "from edm_aniso.sampler import aniso_heun" in (patched / 'generate.py').read_text()
    assert "'edm_aniso.precond.AnisoPrecond'" in (patched / 'train.py').read_text()


@pytest.mark.slow
def test_patched_help_lists_the_plugin(patched):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    gen = subprocess.run([sys.executable, 'generate.py', '--help'], cwd=patched, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert '--sampler edm|aniso_heun' in gen
    train = subprocess.run([sys.executable, 'train.py', '--help'], cwd=patched, env=env, capture_output=True,
                           text=True, check=True).stdout
    assert 'vp|ve|edm|aniso' in train
