"""training/training_loop.py and train.py: batch arithmetic, LR/EMA rules, run folders, CLI options and errors, a
tiny CPU training run, exact resume, --transfer and the plugin hooks of docs/architecture.md."""

import copy
import json
import os
import pickle

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import datagen
import dnnlib
import train
from training import registry
from training import training_loop as loop

# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize('batch, batch_gpu, world, expected', [
    (512, None, 8, (64, 64, 1)),
    (512, 16, 8, (64, 16, 4)),
    (512, 1000, 8, (64, 64, 1)),   # the cap never exceeds the per-rank share
    (12, 2, 2, (6, 2, 3)),
    (7, None, 1, (7, 7, 1)),
])
def test_batch_layout(batch, batch_gpu, world, expected):
    total, gpu, rounds = loop.batch_layout(batch, batch_gpu, world)
    assert (total, gpu, rounds) == expected
    assert gpu * rounds * world == batch


@pytest.mark.parametrize('batch, batch_gpu, world', [(10, None, 3), (8, 3, 1), (2, None, 4), (12, 5, 2)])
def test_batch_layout_refuses_uneven_splits(batch, batch_gpu, world):
    with pytest.raises(ValueError, match='does not split'):
        loop.batch_layout(batch, batch_gpu, world)


def test_lr_multiplier_ramp_and_decay():
    assert loop.lr_multiplier(0, 10) == 0                     # first step at LR 0
    assert loop.lr_multiplier(5000, 10) == pytest.approx(0.5)
    assert loop.lr_multiplier(20000, 10) == 1
    # Constant until the decay start, then halving every half-life.
    kw = dict(lr_rampup_kimg=1, lr_decay_start_kimg=100, lr_halflife_kimg=50)
    assert loop.lr_multiplier(100_000, **kw) == 1
    assert loop.lr_multiplier(150_000, **kw) == pytest.approx(0.5)
    assert loop.lr_multiplier(250_000, **kw) == pytest.approx(0.125)
    # The pitfall of method.md §5: a 10 Mimg ramp in a 1.2 Mimg run peaks at 0.06.
    assert loop.lr_multiplier(600_000, 10000) == pytest.approx(0.06)
    assert loop.lr_multiplier(10**9, 10, lr_decay_start_kimg=5) == 1     # no half-life: no decay
    with pytest.raises(ValueError):
        loop.lr_multiplier(0, 10, lr_decay_start_kimg=5, lr_halflife_kimg=0)


def test_ema_beta():
    assert loop.ema_beta(0, 512, 500, 0.05) == 0              # EMA equals the weights after step 0
    assert loop.ema_beta(10_000, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 500))
    assert loop.ema_beta(10**8, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert loop.ema_beta(0, 512, 500, None) == pytest.approx(0.5 ** (512 / 500_000))


def test_update_ema_averages_parameters_copies_raw_prefixes_and_keeps_buffers():
    net = torch.nn.BatchNorm1d(3)
    net.add_module('sched', torch.nn.Linear(1, 1))
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.running_mean.add_(5.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    loop.update_ema(ema, net, 0.25, raw_prefixes=('sched',))
    torch.testing.assert_close(ema.weight, 0.25 * before['weight'] + 0.75 * net.weight.detach())
    torch.testing.assert_close(ema.sched.weight, net.sched.weight.detach())
    torch.testing.assert_close(ema.running_mean, before['running_mean'])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / 'x.pkl')
    loop.atomic_write(path, lambda f: f.write(b'abc'))
    assert open(path, 'rb').read() == b'abc'

    def broken(f):
        f.write(b'partial')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        loop.atomic_write(path, broken)
    assert open(path, 'rb').read() == b'abc'
    assert sorted(os.listdir(tmp_path)) == ['x.pkl']


def test_run_dir_naming(tmp_path):
    out = str(tmp_path / 'runs')
    assert train.next_run_dir(out, 'a') == os.path.join(out, '00000-a')
    os.makedirs(os.path.join(out, '00003-old'))
    os.makedirs(os.path.join(out, 'notes'))
    open(os.path.join(out, '00009-file.txt'), 'w').close()       # files do not count
    assert train.next_run_dir(out, 'b') == os.path.join(out, '00004-b')
    assert train.run_desc('cifar10-32x32', True, 'ddpmpp', 'edm', 8, 512, False) == \
        'cifar10-32x32-cond-ddpmpp-edm-gpus8-batch512-fp32'
    assert train.run_desc('ffhq', False, 'ncsnpp', 've', 1, 64, True, 'x') == \
        'ffhq-uncond-ncsnpp-ve-gpus1-batch64-fp16-x'


# ---------------------------------------------------------------------------------------------------------------------
# Command line: --help, --dry-run, errors

EDM_OPTIONS = ['--outdir', '--data', '--cond', '--arch', '--precond', '--duration', '--batch', '--batch-gpu', '--cbase',
               '--cres', '--lr', '--ema', '--dropout', '--augment', '--xflip', '--fp16', '--ls', '--bench', '--cache',
               '--workers', '--desc', '--nosubdir', '--tick', '--snap', '--dump', '--seed', '--transfer', '--resume',
               '--dry-run']


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'tiny-8x8.zip')
    datagen.make_dataset_zip(path, 24, 8, num_classes=3)
    return path


@pytest.fixture(scope='module')
def unlabeled_zip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'plain-8x8.zip')
    datagen.make_dataset_zip(path, 8, 8)
    return path


def invoke(args, command=None):
    return CliRunner().invoke(command or train.main, args, catch_exceptions=False)


def test_help_lists_edm_options_with_defaults():
    result = invoke(['--help'])
    assert result.exit_code == 0
    for name in EDM_OPTIONS + ['--device']:
        assert name in result.output
    for default in ['[default: 200', '[default: 512', '[default: 0.001', '[default: 0.13', '[default: 0.12',
                    '[default: 50', '[default: 500', 'ddpmpp|ncsnpp|adm']:
        assert default in result.output


def test_option_defaults_and_types_match_edm():
    params = {p.name: p for p in train.main.params}
    assert params['lr'].default == pytest.approx(1e-3) and params['batch'].default == 512
    assert params['duration'].default == 200 and params['ema'].default == 0.5
    assert params['dump'].default == 500 and params['snap'].default == 50 and params['tick'].default == 50
    assert params['bench'].default is True and params['cache'].default is True and params['workers'].default == 1
    for name in ['cond', 'xflip', 'fp16', 'bench', 'cache']:
        assert params[name].type is click.BOOL and not params[name].is_flag
    for name in ['nosubdir', 'dry_run']:
        assert params[name].is_flag
    assert set(params['precond'].type.choices) >= {'vp', 've', 'edm'}


def test_dry_run_prints_edm_config_and_creates_nothing(tmp_path, data_zip):
    out = str(tmp_path / 'runs')
    result = invoke([f'--outdir={out}', f'--data={data_zip}', '--cond=1', '--batch=8', '--seed=5', '--cres=1,2',
                     '--cbase=16', '--device=cpu', '-n'])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    assert not os.path.exists(out)
    text = result.output.split('Training options:')[1]
    config = json.loads(text[:text.index('\n}\n') + 2])
    assert list(config) == ['dataset_kwargs', 'data_loader_kwargs', 'network_kwargs', 'loss_kwargs',
                            'optimizer_kwargs', 'augment_kwargs', 'total_kimg', 'ema_halflife_kimg', 'batch_size',
                            'batch_gpu', 'loss_scaling', 'cudnn_benchmark', 'kimg_per_tick', 'snapshot_ticks',
                            'state_dump_ticks', 'seed', 'run_dir']
    assert list(config['dataset_kwargs']) == ['class_name', 'path', 'use_labels', 'xflip', 'cache', 'resolution',
                                              'max_size']
    assert config['dataset_kwargs']['resolution'] == 8 and config['dataset_kwargs']['max_size'] == 24
    net = config['network_kwargs']
    assert list(net)[-4:] == ['class_name', 'augment_dim', 'dropout', 'use_fp16']
    assert net['class_name'] == 'training.networks.EDMPrecond' and net['model_type'] == 'SongUNet'
    assert net['model_channels'] == 16 and net['channel_mult'] == [1, 2] and net['augment_dim'] == 9
    assert config['loss_kwargs'] == {'class_name': 'training.loss.EDMLoss'}
    assert config['optimizer_kwargs'] == {'class_name': 'torch.optim.Adam', 'lr': 0.001, 'betas': [0.9, 0.999],
                                          'eps': 1e-8}
    assert config['augment_kwargs']['p'] == 0.12 and config['augment_kwargs']['xflip'] == 1e8
    assert config['total_kimg'] == 200000 and config['ema_halflife_kimg'] == 500 and config['seed'] == 5
    assert config['run_dir'] == os.path.join(out, '00000-tiny-8x8-cond-ddpmpp-edm-gpus1-batch8-fp32')


def dry_run_config(args):
    result = invoke(args + ['-n'])
    assert result.exit_code == 0, result.output
    text = result.output.split('Training options:')[1]
    return json.loads(text[:text.index('\n}\n') + 2])


def pickle_for(config, path, label_dim=0):
    """A network pickle holding the network of a dry run's config (what --transfer is checked against)."""
    net = dnnlib.util.construct_class_by_name(**config['network_kwargs'], img_resolution=8, img_channels=3,
                                              label_dim=label_dim)
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net.eval().requires_grad_(False)), f)
    return str(path)


def test_dry_run_presets_precond_and_transfer(tmp_path, data_zip):
    args = [f'--outdir={tmp_path}', f'--data={data_zip}', '--arch=ncsnpp', '--precond=vp', '--augment=0',
            '--duration=0.0001', '--ema=0.05', '--device=cpu', '--desc=t', '--cbase=8', '--cres=1']
    pkl = pickle_for(dry_run_config(args), tmp_path / 'some.pkl')
    config = dry_run_config(args + [f'--transfer={pkl}'])
    assert config['network_kwargs']['embedding_type'] == 'fourier'
    assert config['network_kwargs']['resample_filter'] == [1, 3, 3, 1]
    assert config['network_kwargs']['class_name'] == 'training.networks.VPPrecond'
    assert config['loss_kwargs']['class_name'] == 'training.loss.VPLoss'
    assert 'augment_kwargs' not in config and 'augment_dim' not in config['network_kwargs']
    assert config['total_kimg'] == 1 and config['ema_halflife_kimg'] == 50
    assert config['resume_pkl'] == pkl and config['ema_rampup_ratio'] is None
    assert config['run_dir'].endswith('00000-tiny-8x8-uncond-ncsnpp-vp-gpus1-batch512-fp32-t')


@pytest.mark.parametrize('extra, message', [
    (['--data=/nonexistent/data.zip'], '--data'),
    (['--cond=1'], '--cond=True requires labels'),
    (['--batch=8', '--batch-gpu=3'], 'does not split'),
    (['--resume=model.pkl'], '--resume must point to training-state-*.pt'),
    (['--resume=training-state-000100.pt'], '--resume must point to training-state-*.pt'),
    (['--transfer=a.pkl', '--resume=training-state-000100.pt'], '--transfer and --resume'),
    (['--device=nonsense'], '--device'),
])
def test_cli_errors_are_one_line(tmp_path, unlabeled_zip, extra, message):
    args = [f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--seed=0', '-n'] + extra
    if not any(a.startswith('--device') for a in extra):
        args.append('--device=cpu')
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1
    assert message in result.output
    assert 'Traceback' not in result.output
    assert result.output.strip().startswith('Error:') and len(result.output.strip().splitlines()) == 1


@pytest.fixture
def fake_entry():
    """A plugin-style --precond entry with one option of its own, removed again after the test."""
    calls = []

    def configure(c, opts):
        calls.append((copy.deepcopy(dict(c)), dict(opts)))
        c.network_kwargs.class_name = 'training.networks.EDMPrecond'
        c.loss_kwargs.class_name = 'training.loss.EDMLoss'
        c.lr_rampup_kimg = 1

    option = click.Option(['--fake-knob'], type=float, default=None, help='A knob of the fake entry')
    entry = registry.register_precond(registry.PrecondEntry('fake', configure, options=[option], help='test'))
    command = copy.copy(train.main)
    command.params = list(train.main.params) + [option]
    yield entry, command, calls
    del registry.PRECONDS['fake']


def test_plugin_options_get_their_own_help_heading(fake_entry):
    _, command, _ = fake_entry
    result = invoke(['--help'], command)
    assert 'Options for --precond=fake:' in result.output
    head, tail = result.output.split('Options for --precond=fake:')
    assert '--fake-knob' in tail and '--fake-knob' not in head


def test_foreign_plugin_option_is_refused(tmp_path, unlabeled_zip, fake_entry):
    _, command, _ = fake_entry
    result = CliRunner().invoke(command, [f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--seed=0', '-n',
                                          '--device=cpu', '--fake-knob=2'])
    assert result.exit_code == 1
    assert '--fake-knob applies only to --precond=fake' in result.output


def test_plugin_configure_sees_filled_config(tmp_path, unlabeled_zip, fake_entry):
    _, command, calls = fake_entry
    ctx = command.make_context('train', [f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--seed=3',
                                         '--batch=4', '--fake-knob=2', '-n'])
    opts = dnnlib.EasyDict(ctx.params, precond='fake')
    c, name, _ = train.build_config(opts, torch.device('cpu'))
    seen, seen_opts = calls[0]
    assert seen['batch_size'] == 4 and seen['seed'] == 3 and seen['total_kimg'] == 200000
    assert seen['dataset_kwargs']['resolution'] == 8 and seen_opts['fake_knob'] == 2
    assert c.lr_rampup_kimg == 1 and name == 'plain-8x8-uncond-ddpmpp-fake-gpus1-batch4-fp32'


# ---------------------------------------------------------------------------------------------------------------------
# A real (tiny) run through the command line


@pytest.mark.slow
def test_cli_training_run_writes_edm_files(tmp_path, data_zip):
    out = str(tmp_path / 'runs')
    result = invoke([f'--outdir={out}', f'--data={data_zip}', '--cond=1', '--cbase=8', '--cres=1',
                     '--augment=0', '--batch=500', '--duration=0.0005', '--tick=1', '--seed=1', '--device=cpu',
                     '--workers=1'])
    assert result.exit_code == 0, result.output
    run_dir = os.path.join(out, '00000-tiny-8x8-cond-ddpmpp-edm-gpus1-batch500-fp32')
    files = sorted(os.listdir(run_dir))
    assert files == ['log.txt', 'network-snapshot-000000.pkl', 'network-snapshot-000001.pkl', 'stats.jsonl',
                     'training-state-000001.pt', 'training_options.json']
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert log.startswith('Loading dataset...') and 'tick 0 ' in log and 'tick 1 ' in log and 'Exiting...' in log
    lines = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(lines) == 2
    assert lines[0]['Loss/loss']['num'] == 500 * 3 * 8 * 8       # per-pixel statistics of one 500-image step
    assert lines[1]['Loss/loss']['num'] == 500 * 3 * 8 * 8
    assert np.isfinite(lines[1]['Loss/loss']['mean'])
    assert lines[0]['Progress/lr']['mean'] == 0                  # the first step runs at LR 0
    assert lines[1]['Progress/kimg']['mean'] == 1.0
    for key in ['Progress/tick', 'Timing/total_sec', 'Timing/sec_per_kimg', 'Resources/cpu_mem_gb', 'timestamp']:
        assert key in lines[1]
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['total_kimg'] == 1 and options['batch_size'] == 500 and options['run_dir'] == run_dir
    with open(os.path.join(run_dir, 'network-snapshot-000001.pkl'), 'rb') as f:
        snap = pickle.load(f)
    assert sorted(snap) == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
    ema = snap['ema']
    assert not ema.training and all(not p.requires_grad for p in ema.parameters())
    assert all(p.device.type == 'cpu' for p in ema.parameters())
    assert type(ema).__name__ == 'EDMPrecond' and type(snap['loss_fn']).__name__ == 'EDMLoss'
    assert snap['augment_pipe'] is None and snap['dataset_kwargs']['path'] == data_zip
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), map_location='cpu', weights_only=False)
    assert {'net', 'optimizer_state'} <= set(state)
    assert state['cur_nimg'] == 1000 and state['net'].training
    with torch.no_grad():
        x = torch.zeros([2, 3, 8, 8])
        assert torch.isfinite(ema(x, torch.ones([2]), torch.eye(3)[:2])).all()


# ---------------------------------------------------------------------------------------------------------------------
# In-process training_loop runs on a tiny network


TINY_NET = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1, augment_dim=9)


def loop_kwargs(run_dir, data, **overrides):
    kw = dict(run_dir=str(run_dir),
              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                                  cache=True),
              data_loader_kwargs=dict(num_workers=0),
              network_kwargs=TINY_NET,
              loss_kwargs=dict(class_name='training.loss.EDMLoss'),
              optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
              augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                                  rotate_frac=1, aniso=1, translate_frac=1),
              seed=7, batch_size=8, batch_gpu=4, total_kimg=0.048, ema_halflife_kimg=0.01, lr_rampup_kimg=0.016,
              kimg_per_tick=0.016, snapshot_ticks=1, state_dump_ticks=1, device='cpu')
    kw.update(overrides)
    os.makedirs(kw['run_dir'], exist_ok=True)
    return kw


def load_state(run_dir, name='training-state-000000.pt'):
    return torch.load(os.path.join(run_dir, name), map_location='cpu', weights_only=False)


def assert_same_module(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_resume_is_exact(tmp_path, data_zip):
    """Six steps in one go equal three steps, a resume from the state, and three more (data order, dropout,
    augmentation and loss noise all continue where they stopped; gradient accumulation over two rounds)."""
    loop.training_loop(**loop_kwargs(tmp_path / 'full', data_zip))
    loop.training_loop(**loop_kwargs(tmp_path / 'part1', data_zip, total_kimg=0.024))
    first = load_state(tmp_path / 'part1')
    assert first['cur_nimg'] == 24 and first['step'] == 3
    loop.training_loop(**loop_kwargs(tmp_path / 'part2', data_zip, resume_kimg=0,
                                     resume_pkl=str(tmp_path / 'part1' / 'network-snapshot-000000.pkl'),
                                     resume_state_dump=str(tmp_path / 'part1' / 'training-state-000000.pt')))
    full, resumed = load_state(tmp_path / 'full'), load_state(tmp_path / 'part2')
    assert full['cur_nimg'] == resumed['cur_nimg'] == 48
    assert_same_module(full['net'], resumed['net'])
    for key in full['ema_state']:
        torch.testing.assert_close(full['ema_state'][key], resumed['ema_state'][key], rtol=0, atol=0)
    assert full['optimizer_state']['state'][0]['step'] == resumed['optimizer_state']['state'][0]['step'] == 6
    # The parameters did move, so the comparison above is not vacuous.
    assert not torch.equal(first['net'].state_dict()['model.enc.8x8_conv.weight'],
                           full['net'].state_dict()['model.enc.8x8_conv.weight'])
    with open(tmp_path / 'full' / 'network-snapshot-000000.pkl', 'rb') as f:
        ema_full = pickle.load(f)['ema']
    with open(tmp_path / 'part2' / 'network-snapshot-000000.pkl', 'rb') as f:
        ema_resumed = pickle.load(f)['ema']
    assert_same_module(ema_full, ema_resumed)


def test_resume_from_edm_style_state(tmp_path, data_zip):
    """A state with only EDM's keys still resumes (weights from the snapshot and state, data order restarts)."""
    loop.training_loop(**loop_kwargs(tmp_path / 'a', data_zip, total_kimg=0.016, augment_kwargs=None))
    state = load_state(tmp_path / 'a')
    edm_state = os.path.join(tmp_path, 'a', 'training-state-000000.pt')
    torch.save(dict(net=state['net'], optimizer_state=state['optimizer_state']), edm_state)
    loop.training_loop(**loop_kwargs(tmp_path / 'b', data_zip, total_kimg=0.024, augment_kwargs=None,
                                     resume_pkl=str(tmp_path / 'a' / 'network-snapshot-000000.pkl'),
                                     resume_state_dump=edm_state, resume_kimg=0))
    resumed = load_state(tmp_path / 'b')
    assert state['cur_nimg'] == 16
    assert resumed['cur_nimg'] == 24       # EDM: progress restarts at resume_kimg * 1000 = 0, three steps to 24
    assert resumed['optimizer_state']['state'][0]['step'] == state['optimizer_state']['state'][0]['step'] + 3


def test_transfer_initialises_from_snapshot(tmp_path, data_zip):
    loop.training_loop(**loop_kwargs(tmp_path / 'src', data_zip, total_kimg=0.016, augment_kwargs=None))
    src_pkl = str(tmp_path / 'src' / 'network-snapshot-000000.pkl')
    with open(src_pkl, 'rb') as f:
        src = pickle.load(f)['ema']
    # One step at LR 0 (the ramp) leaves the weights as transferred; the EMA (no ramp) then equals them too.
    loop.training_loop(**loop_kwargs(tmp_path / 'dst', data_zip, total_kimg=0.008, augment_kwargs=None,
                                     resume_pkl=src_pkl, ema_rampup_ratio=None, seed=99))
    with open(tmp_path / 'dst' / 'network-snapshot-000000.pkl', 'rb') as f:
        dst = pickle.load(f)['ema']
    assert_same_module(src, dst)
    assert not os.path.exists(tmp_path / 'dst' / 'training-state-000000.pt')   # no state at tick 0


# ---------------------------------------------------------------------------------------------------------------------
# Plugin hooks with a tiny stand-in network and loss


class HookNet(torch.nn.Module):
    """A minimal preconditioner with a 'schedule' parameter group, raw-copied EMA prefix and transfer_from."""
    ema_raw_prefixes = ('sched',)

    def __init__(self, img_resolution, img_channels, label_dim=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 1)
        self.sched = torch.nn.Parameter(torch.zeros([3]))
        self.transferred = False

    def network_parameters(self):
        return self.conv.parameters()

    def schedule_parameters(self):
        return [self.sched]

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.conv(x) * (1 + self.sched.sum())

    def transfer_from(self, src):
        with torch.no_grad():
            self.conv.weight.fill_(0.5)
        self.transferred = True


class HookLoss:
    """Records begin_step calls; asks for explicit gradient sync; NaN on the steps listed in `nan_steps`."""
    explicit_grad_sync = True
    steps: list = []

    def __init__(self, nan_steps=()):
        self.nan_steps = set(nan_steps)
        self.step = None

    def begin_step(self, step_index):
        HookLoss.steps.append(step_index)
        self.step = step_index

    def __call__(self, net, images, labels, augment_pipe=None):
        assert isinstance(net, HookNet)            # never a DDP wrapper
        out = (net(images, 1.0) - images).square()
        return out * float('nan') if self.step in self.nan_steps else out


def hook_kwargs(run_dir, data, **overrides):
    kw = loop_kwargs(run_dir, data, network_kwargs=dict(class_name='test_train.HookNet'),
                     loss_kwargs=dict(class_name='test_train.HookLoss'), augment_kwargs=None,
                     schedule_optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.1), lr_rampup_kimg=0)
    kw.update(overrides)
    return kw


def test_plugin_hooks(tmp_path, data_zip):
    HookLoss.steps = []
    loop.training_loop(**hook_kwargs(tmp_path / 'h', data_zip))
    assert HookLoss.steps == [0, 1, 2, 3, 4, 5]
    state = load_state(tmp_path / 'h')
    assert 'schedule_optimizer_state' in state and 'optimizer_state' in state
    assert len(state['optimizer_state']['param_groups'][0]['params']) == 2      # conv weight + bias
    assert len(state['schedule_optimizer_state']['param_groups'][0]['params']) == 1
    net = state['net']
    assert not torch.equal(net.sched.detach(), torch.zeros(3))                   # schedules were trained
    torch.testing.assert_close(state['ema_state']['sched'], net.sched.detach(), rtol=0, atol=0)  # raw in EMA
    lines = [json.loads(line) for line in open(tmp_path / 'h' / 'stats.jsonl')]
    assert lines[-1]['Progress/schedule_lr']['mean'] == pytest.approx(0.1)
    assert lines[-1]['Progress/lr']['mean'] == pytest.approx(2e-3)

    # Resume restores both optimizers and the step counter handed to begin_step.
    HookLoss.steps = []
    loop.training_loop(**hook_kwargs(tmp_path / 'r', data_zip, total_kimg=0.064,
                                     resume_state_dump=str(tmp_path / 'h' / 'training-state-000000.pt')))
    assert HookLoss.steps == [6, 7]
    resumed = load_state(tmp_path / 'r')
    assert resumed['schedule_optimizer_state']['state'][0]['step'] == 8


def test_transfer_uses_network_hook(tmp_path, data_zip):
    HookLoss.steps = []
    loop.training_loop(**hook_kwargs(tmp_path / 'src', data_zip, total_kimg=0.008))
    loop.training_loop(**hook_kwargs(tmp_path / 'dst', data_zip, total_kimg=0.008, lr_rampup_kimg=1,
                                     resume_pkl=str(tmp_path / 'src' / 'network-snapshot-000000.pkl')))
    with open(tmp_path / 'dst' / 'network-snapshot-000000.pkl', 'rb') as f:
        ema = pickle.load(f)['ema']
    assert torch.equal(ema.conv.weight, torch.full_like(ema.conv.weight, 0.5))


def test_nonfinite_loss_for_a_whole_tick_stops(tmp_path, data_zip):
    HookLoss.steps = []
    # NaN on every step of tick 1 (steps 1 and 2): stop with a clear error, nothing saved for that tick (a tick with
    # only some NaN steps stops the same way: tests/test_hardening.py).
    with pytest.raises(loop.NonFiniteLossError, match='NaN or infinite in 2 of 2 iteration'):
        loop.training_loop(**hook_kwargs(tmp_path / 'bad', data_zip, loss_kwargs=dict(
            class_name='test_train.HookLoss', nan_steps=[1, 2])))
    assert len(open(tmp_path / 'bad' / 'stats.jsonl').readlines()) == 1


def test_schedule_optimizer_needs_parameter_groups(tmp_path, data_zip):
    with pytest.raises(ValueError, match='network_parameters'):
        loop.training_loop(**loop_kwargs(tmp_path / 'x', data_zip, augment_kwargs=None,
                                         schedule_optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.1)))


def edm_style_state(folder, args, options, **extra):
    """A training state with only EDM's keys (no record of the run) for the dry run of `args`, and
    training_options.json beside it; `extra` adds keys to the state."""
    folder.mkdir()
    (folder / 'training_options.json').write_text(json.dumps(options))
    net = dnnlib.util.construct_class_by_name(**dry_run_config(args)['network_kwargs'], img_resolution=8,
                                              img_channels=3, label_dim=0)
    state = folder / 'training-state-000001.pt'
    torch.save(dict(net=net, optimizer_state={}, **extra), state)
    with open(folder / 'network-snapshot-000001.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    return state


def test_resume_without_seed_keeps_the_runs_seed(tmp_path, unlabeled_zip):
    """--resume without --seed takes the seed of the run being resumed (so its data order continues): from an EDM
    state's training_options.json (ours record it themselves: tests/test_hardening.py)."""
    args = [f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--device=cpu', '--cbase=8', '--cres=1']
    state = edm_style_state(tmp_path / 'prev', args, {'seed': 1234})
    config = dry_run_config(args + [f'--resume={state}'])
    assert config['seed'] == 1234 and config['resume_state_dump'] == str(state)


def test_lr_and_ema_ramp_options_reach_the_config(tmp_path, data_zip):
    """Our additions to EDM's CLI: absent they leave EDM's JSON as it is; given, they set the loop's kwargs."""
    def dry(*extra):
        result = invoke([f'--outdir={tmp_path}', f'--data={data_zip}', '-n', '--device=cpu', *extra])
        assert result.exit_code == 0, result.output
        text = result.output.split('Training options:')[1]
        return json.loads(text[:text.index('\n}\n') + 2])
    plain = dry()
    assert not {'lr_rampup_kimg', 'lr_decay_start_kimg', 'lr_halflife_kimg', 'ema_rampup_ratio'} & set(plain)
    c = dry('--lr-rampup=0', '--lr-decay-start=5', '--lr-halflife=2.5', '--ema-rampup=0')
    assert c['lr_rampup_kimg'] == 0 and c['lr_decay_start_kimg'] == 5 and c['lr_halflife_kimg'] == 2.5
    assert c['ema_rampup_ratio'] is None


def test_resume_keeps_the_runs_lr_and_ema_ramps(tmp_path, unlabeled_zip):
    """A resumed run continues with the ramps of the run it resumes (e.g. no EMA ramp after --transfer)."""
    args = [f'--outdir={tmp_path}', f'--data={unlabeled_zip}', '--device=cpu', '--cbase=8', '--cres=1']
    state = edm_style_state(tmp_path / 'prev', args, {'seed': 5, 'ema_rampup_ratio': None, 'lr_rampup_kimg': 120,
                                                      'lr_decay_start_kimg': 600, 'lr_halflife_kimg': 150})
    c = dry_run_config(args + [f'--resume={state}'])
    assert c['ema_rampup_ratio'] is None and c['lr_rampup_kimg'] == 120
    assert c['lr_decay_start_kimg'] == 600 and c['lr_halflife_kimg'] == 150
    c = dry_run_config(args + [f'--resume={state}', '--lr-rampup=7', '--ema-rampup=0.1'])  # given again: it wins
    assert c['lr_rampup_kimg'] == 7 and c['ema_rampup_ratio'] == 0.1 and c['lr_halflife_kimg'] == 150
