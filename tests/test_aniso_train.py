"""Training integration of the plugin: RowMaskedAdam, --precond=aniso configuration, and runs through the training
loop and train.py (method.md §5, §8.1, §8.6, §9.4, §9.7)."""

import copy
import json
import os
import subprocess
import sys

import click
import pytest
import torch

import datagen
import dnnlib
from edm_aniso import plugin
from edm_aniso.optim import RowMaskedAdam
from edm_aniso.schedule import KnotSchedule
from training import training_loop as loop

# ----------------------------------------------------------------------------------------------------------------------
# RowMaskedAdam


@pytest.mark.parametrize('explicit', [False, True])
def test_row_masked_adam_equals_per_class_adams(explicit):
    """A bank [3, 5] stepped with row presence equals three torch Adams, each stepping only when its row is present."""
    torch.manual_seed(0)
    init = torch.randn(3, 5)
    bank = torch.nn.Parameter(init.clone())
    opt = RowMaskedAdam([bank], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    rows = [torch.nn.Parameter(init[r].clone()) for r in range(3)]
    ref = [torch.optim.Adam([p], lr=0.05, betas=(0.8, 0.95), eps=1e-6) for p in rows]
    presence = [[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    for step, pres in enumerate(presence):
        grad = torch.randn(3, 5) * torch.tensor(pres, dtype=torch.float32).unsqueeze(1)
        bank.grad = grad.clone()
        opt.step(present=torch.tensor(pres, dtype=torch.bool) if explicit else None)
        for r in range(3):
            if pres[r]:
                rows[r].grad = grad[r].clone()
                ref[r].step()
    for r in range(3):
        torch.testing.assert_close(bank[r].detach(), rows[r].detach(), rtol=1e-6, atol=1e-7)
    assert opt.state[bank]['step'].tolist() == [4, 3, 5]
    # The bank differs from a plain Adam that steps every row each time (absent rows would decay their moments).
    plain = torch.nn.Parameter(init.clone())
    popt = torch.optim.Adam([plain], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    torch.manual_seed(0)
    torch.randn(3, 5)
    for pres in presence:
        plain.grad = torch.randn(3, 5) * torch.tensor(pres, dtype=torch.float32).unsqueeze(1)
        popt.step()
    assert not torch.allclose(plain, bank)


def test_row_masked_adam_state_dict_round_trip():
    sched = KnotSchedule(num_rows=4, num_knots=6)
    opt = RowMaskedAdam(sched.parameters(), lr=0.01)
    sched.u.grad = torch.zeros_like(sched.u)
    sched.u.grad[2] = 1.0
    opt.step()
    clone = RowMaskedAdam(copy.deepcopy(sched).parameters(), lr=0.01)
    clone.load_state_dict(opt.state_dict())
    state = next(iter(clone.state.values()))
    assert state['step'].tolist() == [0, 0, 1, 0]


# ----------------------------------------------------------------------------------------------------------------------
# configure(c, opts) without a command line (every base option at its default)


def _config(**opts):
    c = dnnlib.EasyDict(network_kwargs=dnnlib.EasyDict(model_type='SongUNet', augment_dim=9, dropout=0.13,
                                                       use_fp16=False),
                        loss_kwargs=dnnlib.EasyDict(), augment_kwargs=dnnlib.EasyDict(p=0.12),
                        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=1e-3), total_kimg=1200,
                        batch_size=512)
    base = dict(cond=False, duration=1.2, transfer=None, outdir='.', dry_run=False)
    base.update(opts)
    plugin.configure(c, dnnlib.EasyDict(base))
    return c


def test_configure_defaults_per_stage():
    c1 = _config()
    assert c1.network_kwargs.class_name == 'edm_aniso.precond.AnisoPrecond'
    assert c1.network_kwargs.stage == 1 and c1.network_kwargs.subspace == 'iso'
    assert c1.loss_kwargs.class_name == 'edm_aniso.loss.AnisoStage1Loss'
    assert c1.optimizer_kwargs.lr == 1e-5 and c1.schedule_optimizer_kwargs.lr == 1e-2
    assert c1.schedule_optimizer_kwargs.class_name == 'torch.optim.Adam'
    assert 'augment_kwargs' not in c1 and 'augment_dim' not in c1.network_kwargs
    assert c1.lr_rampup_kimg == 120 and c1.lr_decay_start_kimg == 600 and c1.lr_halflife_kimg == 150
    assert c1.lr_rampup_kimg < c1.total_kimg                        # the ramp completes within the run
    assert c1.ema_rampup_ratio == 0.05
    c2 = _config(stage=2, cond=True, per_class=True, kappa=0.5, probes=2, estimator_every=4, transfer='x.pkl')
    assert c2.network_kwargs.subspace == 'dct' and c2.network_kwargs.per_class
    assert c2.loss_kwargs == dict(class_name='edm_aniso.loss.AnisoStage2Loss', kappa=0.5, probes=2, estimator_every=4)
    assert c2.schedule_optimizer_kwargs.class_name == 'edm_aniso.optim.RowMaskedAdam'
    assert c2.schedule_optimizer_kwargs.lr == 1e-4 and c2.ema_rampup_ratio is None


def test_configure_reference_preset():
    c = _config(preset='reference', stage=2)
    assert c.total_kimg == 1200 and c.batch_size == 256
    assert c.lr_rampup_kimg == 10000 and c.lr_decay_start_kimg == 600 and c.lr_halflife_kimg == 150
    assert c.optimizer_kwargs.lr == 1e-5 and c.schedule_optimizer_kwargs.lr == 1e-4 and c.ema_rampup_ratio is None
    # The pitfall the preset reproduces: the LR multiplier peaks at 0.06 and ends at 0.0075 (method.md §5).
    mults = [loop.lr_multiplier(k * 1000, c.lr_rampup_kimg, c.lr_decay_start_kimg, c.lr_halflife_kimg)
             for k in (600, 1200)]
    assert abs(mults[0] - 0.06) < 1e-9 and abs(mults[1] - 0.12 / 2 ** 4) < 1e-9


@pytest.mark.parametrize('opts, message', [
    (dict(subspace='dct'), '--stage=2'),
    (dict(per_class=True), '--cond'),
    (dict(stage=2, class_groups='[0, 1]'), '--per-class'),
    (dict(stage=2, cond=True, per_class=True, class_groups='{bad'), 'JSON'),
    (dict(stage=2, dct_cutoff=3, subspace='pca'), '--dct-cutoff'),
    (dict(probes=3), '--stage=2'),
    (dict(kappa=0.5), '--kappa applies only to --stage=2'),          # method.md §5: stage 1 uses kappa = 1
    (dict(stage=2, subspace='pca', pca_bases='/nonexistent.pt'), 'no such file'),
])
def test_configure_errors(opts, message):
    with pytest.raises(click.ClickException, match=message):
        _config(**opts)


def test_configure_computes_pca_bases_once(tmp_path, data_zip):
    """--subspace=pca without --pca-bases: global bases from --data, saved in --outdir, loadable by AnisoPrecond."""
    c = dnnlib.EasyDict(network_kwargs=dnnlib.EasyDict(TINY), loss_kwargs=dnnlib.EasyDict(),
                        optimizer_kwargs=dnnlib.EasyDict(lr=1e-3), total_kimg=10,
                        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data_zip,
                                                       use_labels=True, xflip=False))
    plugin.configure(c, dnnlib.EasyDict(stage=2, subspace='pca', pca_rank=5, outdir=str(tmp_path), cond=True))
    path = c.network_kwargs.pca_bases
    assert os.path.dirname(path) == str(tmp_path) and os.path.isfile(path)
    mtime = os.path.getmtime(path)
    plugin.configure(c, dnnlib.EasyDict(stage=2, subspace='pca', pca_rank=5, outdir=str(tmp_path), cond=True))
    assert os.path.getmtime(path) == mtime                # reused, not recomputed
    from edm_aniso.precond import AnisoPrecond
    kw = {k: v for k, v in c.network_kwargs.items() if k != 'class_name'}
    net = AnisoPrecond(8, 3, label_dim=2, **kw)
    assert net.subspace.kind == 'pca' and net.subspace.rank == 5 and net.subspace.num_bases == 1
    U = net.subspace.bases[0].double()
    assert torch.allclose(U.T @ U, torch.eye(5, dtype=torch.float64), atol=1e-5)



def test_configure_pca_cache_checked_against_dataset_and_written_by_rank_0(tmp_path, data_zip, monkeypatch):
    """Automatic PCA bases: a cached file from another dataset/rank or a corrupt one is recomputed, not reused; the
    file is float32 and written atomically; only rank 0 writes while the other ranks wait at the barrier."""
    from edm_aniso import pca
    from torch_utils import distributed as dist

    def config():
        c = dnnlib.EasyDict(network_kwargs=dnnlib.EasyDict(TINY), loss_kwargs=dnnlib.EasyDict(),
                            optimizer_kwargs=dnnlib.EasyDict(lr=1e-3), total_kimg=10,
                            dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset',
                                                           path=data_zip, use_labels=False, xflip=False))
        plugin.configure(c, dnnlib.EasyDict(stage=2, subspace='pca', pca_rank=4, outdir=str(tmp_path)))
        return c.network_kwargs.pca_bases

    barriers = []
    monkeypatch.setattr(dist, 'barrier', lambda: barriers.append(dist.get_rank()))
    monkeypatch.setattr(dist, 'get_rank', lambda: 1)
    path = config()
    assert not os.path.exists(path) and barriers == [1]          # rank 1 waits, never computes or writes
    monkeypatch.setattr(dist, 'get_rank', lambda: 0)
    assert config() == path and barriers == [1, 0]
    good = pca.load_pca_file(path)
    assert good['bases'].dtype == torch.float32 and good['source']['rank'] == 4
    assert good['source']['dataset'] == os.path.abspath(data_zip)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # atomic write: no temp file left
    # A file of the same name computed from another dataset (here: another image count) is recomputed.
    pca.save_pca_file(path, torch.zeros_like(good['bases']), None, 4, good['resolution'],
                      source={**good['source'], 'num_images': good['source']['num_images'] + 1})
    config()
    assert torch.equal(pca.load_pca_file(path)['bases'], good['bases'])
    with open(path, 'wb') as f:                                     # a corrupt file too
        f.write(b'not a torch file')
    config()
    assert torch.equal(pca.load_pca_file(path)['bases'], good['bases'])


# ----------------------------------------------------------------------------------------------------------------------
# Runs through training_loop (in process) and train.py (subprocess, so the plugin is registered before train.py builds
# its command, whether or not the package's entry point is installed).

TINY = dict(model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
            dropout=0.0)
WRAPPER = """import sys
sys.path.insert(0, {root!r})
import edm_aniso.plugin  # registers --precond=aniso
import train
train.main()
"""


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'tiny-8x8.zip')
    datagen.make_dataset_zip(path, 16, 8, num_classes=2)
    return path


@pytest.fixture(scope='module')
def wrapper(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path_factory.mktemp('bin') / 'train_aniso.py'
    path.write_text(WRAPPER.format(root=root))
    return str(path)


def _run(args, cwd, torchrun=0):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}']
                              if torchrun else []) + args
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_dry_run_and_foreign_option(tmp_path, data_zip, wrapper):
    res = _run([wrapper, '--help'], tmp_path)
    assert res.returncode == 0 and 'Options for --precond=aniso' in res.stdout and '--estimator-every' in res.stdout
    res = _run([wrapper, f'--outdir={tmp_path}', f'--data={data_zip}', '--precond=aniso', '--stage=2', '--cond=1',
                '--per-class=1', '--kappa=0.5', '--lr=2e-4', '--seed=0', '--device=cpu', '--dry-run'], tmp_path)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    cfg = json.loads(text[text.index('{'):text.index('\n}\n') + 2])
    assert cfg['network_kwargs']['class_name'] == 'edm_aniso.precond.AnisoPrecond'
    assert cfg['optimizer_kwargs']['lr'] == 2e-4                   # an explicit --lr wins over the 1e-5 default
    assert cfg['schedule_optimizer_kwargs']['class_name'] == 'edm_aniso.optim.RowMaskedAdam'
    assert cfg['loss_kwargs']['kappa'] == 0.5 and 'augment_kwargs' not in cfg
    res = _run([wrapper, f'--outdir={tmp_path}', f'--data={data_zip}', '--kappa=2', '--seed=0', '--device=cpu',
                '--dry-run'], tmp_path)
    assert res.returncode != 0 and '--kappa applies only to --precond=aniso' in res.stderr
    assert 'Traceback' not in res.stderr


def _loop_kwargs(run_dir, data, stage, **over):
    kw = dict(run_dir=str(run_dir),
              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
              data_loader_kwargs=dict(num_workers=0),
              network_kwargs=dict(class_name='edm_aniso.precond.AnisoPrecond', stage=stage, per_class=True,
                                  subspace='dct' if stage == 2 else 'iso', **TINY),
              loss_kwargs=dict(class_name=f'edm_aniso.loss.AnisoStage{stage}Loss'),
              optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8),
              schedule_optimizer_kwargs=dict(class_name='edm_aniso.optim.RowMaskedAdam', lr=1e-2),
              seed=3, batch_size=4, batch_gpu=2, total_kimg=0.016, ema_halflife_kimg=0.01, lr_rampup_kimg=0.004,
              kimg_per_tick=0.008, snapshot_ticks=1, state_dump_ticks=1, device='cpu')
    kw.update(over)
    os.makedirs(kw['run_dir'], exist_ok=True)
    return kw


def _state(run_dir, name):
    return torch.load(os.path.join(run_dir, name), map_location='cpu', weights_only=False)


@pytest.mark.slow
def test_stage2_resume_is_exact(tmp_path, data_zip):
    """Four stage-2 steps in one go equal two steps, a resume, and two more (both optimizers, schedules, EMA)."""
    loop.training_loop(**_loop_kwargs(tmp_path / 'full', data_zip, 2))
    loop.training_loop(**_loop_kwargs(tmp_path / 'a', data_zip, 2, total_kimg=0.008))
    loop.training_loop(**_loop_kwargs(tmp_path / 'b', data_zip, 2,
                                      resume_pkl=str(tmp_path / 'a' / 'network-snapshot-000000.pkl'),
                                      resume_state_dump=str(tmp_path / 'a' / 'training-state-000000.pt')))
    full, part, resumed = (_state(tmp_path / d, 'training-state-000000.pt') for d in ('full', 'a', 'b'))
    assert full['cur_nimg'] == resumed['cur_nimg'] == 16
    sf, sr = full['net'].state_dict(), resumed['net'].state_dict()
    for key in sf:
        torch.testing.assert_close(sf[key], sr[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(sf['schedule_h.u'], part['net'].state_dict()['schedule_h.u'])   # theta moved
    for key in ('schedule_g.u', 'schedule_h.u'):                                              # EMA holds raw theta
        assert torch.equal(full['ema_state'][key], sf[key]), key
    key = 'model.enc.8x8_conv.weight'
    assert not torch.equal(full['ema_state'][key], sf[key])                                   # phi is averaged
    for a, b in zip(full['schedule_optimizer_state']['state'].values(),
                    resumed['schedule_optimizer_state']['state'].values()):
        for key in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(a[key], b[key]), key


_CHECK = r'''
import pickle, sys, torch
with open(sys.argv[1], 'rb') as f:
    s1 = pickle.load(f)['ema']
with open(sys.argv[2], 'rb') as f:
    s2 = pickle.load(f)
net = s2['ema']
from edm_aniso.schedule import KnotSchedule
init = KnotSchedule(num_rows=2).u
assert type(net).__name__ == 'AnisoPrecond' and net.stage == 2 and s1.stage == 1, (net.stage, s1.stage)
assert type(s2['loss_fn']).__name__ == 'AnisoStage2Loss'
assert not torch.equal(s1.schedule_g.u, init), 'stage 1 did not learn g'
assert not torch.equal(net.schedule_g.u, s1.schedule_g.u), 'stage 2 did not move g'
assert not torch.equal(net.schedule_h.u, net.schedule_g.u), 'stage 2 did not separate h from g'
x = torch.randn(2, 3, 8, 8)
with torch.no_grad():
    d = net(x, torch.tensor([1.0, 2.0]), torch.eye(2))
    a, b = net.levels(torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), torch.eye(2))
assert torch.isfinite(d).all() and torch.allclose(a[:, :3] * b[:, :3], torch.tensor([6400.0, 1.0, 4e-6],
                                                                                   dtype=torch.float64), rtol=1e-8)
print('OK')
'''


@pytest.mark.slow
def test_end_to_end_edm_transfer_stage1_stage2(tmp_path, data_zip, wrapper, repo_root):
    """EDM run -> --transfer stage 1 (2 ranks) -> --transfer stage 2 (2 ranks, explicit gradient sync), two steps of
    500 images each (train.py's shortest run is 1 kimg); snapshots are checked identical across ranks by the loop,
    and load in a fresh process holding the learned g, h."""
    common = [f'--data={data_zip}', '--cond=1', '--cbase=8', '--cres=1,2', '--augment=0', '--dropout=0',
              '--batch=500', '--duration=0.001', '--tick=1', '--snap=1', '--seed=1', '--device=cpu']
    res = _run([wrapper, f'--outdir={tmp_path / "edm"}', '--nosubdir', *common, '--lr=1e-3'], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    edm_pkl = str(tmp_path / 'edm' / 'network-snapshot-000001.pkl')
    res = _run([wrapper, f'--outdir={tmp_path / "s1"}', '--nosubdir', *common, '--precond=aniso', '--stage=1',
                '--per-class=1', f'--transfer={edm_pkl}', '--lr-rampup=0.001'], tmp_path, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    s1_pkl = str(tmp_path / 's1' / 'network-snapshot-000001.pkl')
    res = _run([wrapper, f'--outdir={tmp_path / "s2"}', '--nosubdir', *common, '--precond=aniso', '--stage=2',
                '--per-class=1', f'--transfer={s1_pkl}', '--lr-rampup=0.001', '--schedule-lr=1e-2'],
               tmp_path, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    check = tmp_path / 'check.py'
    check.write_text(_CHECK)
    res = subprocess.run([sys.executable, str(check), s1_pkl, str(tmp_path / 's2' / 'network-snapshot-000001.pkl')],
                         cwd=str(tmp_path), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo_root))
    assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]
