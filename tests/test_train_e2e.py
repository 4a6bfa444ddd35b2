"""End to end on CPU: image folder -> dataset_tool.py -> torchrun train.py (2 gloo processes) -> resume ->
generate.py."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import datagen

pytestmark = pytest.mark.slow


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=cwd)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f'{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def torchrun(repo_root, *args):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    return run(launcher + [os.path.join(repo_root, 'train.py'), *args], repo_root)


def test_dataset_tool_torchrun_resume_generate(tmp_path, repo_root):
    datagen.make_image_folder(str(tmp_path / 'images'), 24, 8, num_classes=3)
    data = str(tmp_path / 'tiny-8x8.zip')
    run([sys.executable, os.path.join(repo_root, 'dataset_tool.py'), f'--source={tmp_path / "images"}',
         f'--dest={data}'], repo_root)

    outdir = str(tmp_path / 'runs')
    common = [f'--outdir={outdir}', f'--data={data}', '--cond=1', '--arch=ddpmpp', '--cbase=8', '--cres=1',
              '--batch=500', '--batch-gpu=125', '--duration=0.003', '--tick=1', '--snap=1', '--dump=1', '--seed=3',
              '--device=cpu', '--workers=1']
    torchrun(repo_root, *common)
    first = os.path.join(outdir, '00000-tiny-8x8-cond-ddpmpp-edm-gpus2-batch500-fp32')
    files = set(os.listdir(first))
    assert {'log.txt', 'stats.jsonl', 'training_options.json', 'network-snapshot-000000.pkl',
            'network-snapshot-000001.pkl', 'network-snapshot-000002.pkl', 'network-snapshot-000003.pkl',
            'training-state-000001.pt', 'training-state-000002.pt', 'training-state-000003.pt'} <= files
    assert 'training-state-000000.pt' not in files
    lines = [json.loads(line) for line in open(os.path.join(first, 'stats.jsonl'))]
    assert [int(line['Progress/tick']['mean']) for line in lines] == [0, 1, 2, 3]
    assert lines[0]['Loss/loss']['num'] == 500 * 3 * 8 * 8      # both ranks, both accumulation rounds

    # Resume from an intermediate state (1500 images) in a new run folder; with the same seed it ends where the
    # first run ended.
    torchrun(repo_root, *common, f'--resume={os.path.join(first, "training-state-000001.pt")}')
    second = os.path.join(outdir, '00001-tiny-8x8-cond-ddpmpp-edm-gpus2-batch500-fp32')
    options = json.load(open(os.path.join(second, 'training_options.json')))
    assert options['resume_kimg'] == 1 and options['resume_state_dump'].endswith('training-state-000001.pt')
    assert 'training-state-000002.pt' not in os.listdir(second)     # the resumed run's tick 0: no state
    a = torch.load(os.path.join(first, 'training-state-000003.pt'), map_location='cpu', weights_only=False)
    b = torch.load(os.path.join(second, 'training-state-000003.pt'), map_location='cpu', weights_only=False)
    assert a['cur_nimg'] == b['cur_nimg'] == 3000
    for (name, x), (_, y) in zip(a['net'].state_dict().items(), b['net'].state_dict().items()):
        assert torch.equal(x, y), name

    # Sample from the final snapshot.
    images = str(tmp_path / 'images-out')
    run([sys.executable, os.path.join(repo_root, 'generate.py'),
         f'--network={os.path.join(second, "network-snapshot-000003.pkl")}', f'--outdir={images}', '--seeds=0-3',
         '--steps=4', '--device=cpu'], repo_root)
    assert sorted(os.listdir(images)) == [f'{seed:06d}.png' for seed in range(4)]
    img = np.asarray(PIL.Image.open(os.path.join(images, '000000.png')))
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
