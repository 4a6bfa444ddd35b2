"""Stage-2 training on two ranks (torchrun, gloo, explicit gradient all-reduce) equals one process on the same total
batch (method.md §5, docs/architecture.md "Training-loop hooks").

The loop seeds each rank differently, so the test uses ``aniso_deterministic.DeterministicStage2Loss``, whose t, eps
and probes are functions of (image, step). Data order: ``InfiniteSampler`` walks one global stream (its swaps do not
depend on the rank count) and gives rank r the positions p with p % R == r. With batch 8 = 2 ranks x batch_gpu 4 x
1 round, step k consumes global positions 8k..8k+7 on both layouts (rank 0 the even ones, rank 1 the odd ones), so the
union of the two ranks' batches is the single process's batch of 8 at every step. The loop divides each rank's loss
sum by its 4 images and averages gradients over the 2 ranks, i.e. sum / 8 as in the single process. SGD (no momentum)
keeps the update linear in the gradient, so rounding differences stay at float32 level.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import aniso_deterministic
import datagen
from torch_utils import misc
from training import training_loop as loop

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
NET = dict(class_name='edm_aniso.precond.AnisoPrecond', stage=2, subspace='dct', per_class=True,
           model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
           dropout=0.0)


def _kwargs(run_dir, data, batch_gpu):
    os.makedirs(run_dir, exist_ok=True)
    return dict(run_dir=str(run_dir),
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                                    xflip=False),
                data_loader_kwargs=dict(num_workers=0),
                network_kwargs=NET,
                loss_kwargs=dict(class_name='aniso_deterministic.DeterministicStage2Loss'),
                # Plain SGD: the update is linear in the gradient (Adam's normalisation would amplify rounding).
                # The stage-2 gradients of this tiny net are ~1e-5, hence the large LRs.
                optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=300.0),
                schedule_optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=100.0),
                augment_kwargs=None,
                seed=0,                       # rank 0's seed is seed * world_size + rank = 0 in both layouts
                batch_size=8, batch_gpu=batch_gpu, total_kimg=0.032,          # 4 steps (the first has LR 0)
                ema_halflife_kimg=0.01, lr_rampup_kimg=0, kimg_per_tick=0.008,
                snapshot_ticks=1, state_dump_ticks=1, device='cpu')


@pytest.mark.slow
def test_stage2_two_ranks_equal_one_process(tmp_path):
    data = str(tmp_path / 'tiny-8x8.zip')
    datagen.make_dataset_zip(data, 16, 8, num_classes=2)

    # The data-order premise, on the loop's own sampler: at every step the two ranks' micro-batches of 4 interleave
    # into the single process's batch of 8 (more steps than one pass over the 16 images, so the swaps are covered).
    def indices(rank, replicas, count):
        it = iter(misc.InfiniteSampler(range(16), rank=rank, num_replicas=replicas, seed=0))
        return [next(it) for _ in range(count)]
    single, rank0, rank1 = indices(0, 1, 32), indices(0, 2, 16), indices(1, 2, 16)
    for k in range(4):
        step = single[8 * k:8 * k + 8]
        assert step[0::2] == rank0[4 * k:4 * k + 4] and step[1::2] == rank1[4 * k:4 * k + 4], k

    # Two ranks through torchrun; the helper saves each rank's live parameters after training.
    kw2 = _kwargs(tmp_path / 'two', data, batch_gpu=4)
    with open(tmp_path / 'two.json', 'w') as f:
        json.dump(kw2, f)
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([TESTS, ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(TESTS, 'aniso_deterministic.py'), str(tmp_path / 'two.json')],
                         cwd=str(tmp_path), capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    # One process, in this process, on the same total batch of 8.
    aniso_deterministic.LIVE.clear()
    kw1 = _kwargs(tmp_path / 'one', data, batch_gpu=8)
    loop.training_loop(**kw1)
    one_init = aniso_deterministic.LIVE['init']

    ranks = [torch.load(tmp_path / 'two' / f'params-rank{r}.pt', weights_only=False) for r in range(2)]
    one = torch.load(tmp_path / 'one' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    two = torch.load(tmp_path / 'two' / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    assert one['cur_nimg'] == two['cur_nimg'] == 32 and one['step'] == two['step'] == 4
    assert (one['world_size'], two['world_size']) == (1, 2)
    s1, s2 = one['net'].state_dict(), two['net'].state_dict()
    assert s1.keys() == s2.keys() == ranks[0]['final'].keys()

    for key in s1:
        # Same start: both layouts built rank 0's network from the same seed (the loop then broadcasts it).
        torch.testing.assert_close(ranks[0]['init'][key], one_init[key], rtol=0, atol=0, msg=key)
        # The two ranks hold bit-identical parameters, and rank 0's are the ones in its training state.
        torch.testing.assert_close(ranks[1]['final'][key], ranks[0]['final'][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(s2[key], ranks[0]['final'][key], rtol=0, atol=0, msg=key)
    aniso_deterministic.assert_updates_agree(s1, s2, one_init)
