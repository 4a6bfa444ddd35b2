"""Train a diffusion model: EDM's train.py command line (edm-interface.md §1.2) with pluggable --precond recipes.

The command only turns options into the configuration dict of `training.training_loop.training_loop` (also written
as training_options.json) and calls it. `--precond` entries come from `training.registry`: vp, ve and edm are
registered below; plugins add theirs (with their own options) through the `edm_aniso.plugins` entry points.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Optional

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import registry
from training import training_loop as loop

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

# Backbone presets of --arch (edm-interface.md §1.2); every other backbone argument keeps its class default.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}


# ---------------------------------------------------------------------------------------------------------------------
# Built-in --precond recipes


def _builtin(precond_class: str, loss_class: str):
    def configure(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> None:
        c.network_kwargs.class_name = f'training.networks.{precond_class}'
        c.loss_kwargs.class_name = f'training.loss.{loss_class}'
    return configure


registry.register_precond(registry.PrecondEntry('vp', _builtin('VPPrecond', 'VPLoss'), help='VP (Song et al.)'))
registry.register_precond(registry.PrecondEntry('ve', _builtin('VEPrecond', 'VELoss'), help='VE (Song et al.)'))
registry.register_precond(registry.PrecondEntry('edm', _builtin('EDMPrecond', 'EDMLoss'), help='EDM (Karras et al.)'))
registry.load_plugins()


# ---------------------------------------------------------------------------------------------------------------------
# Library part: options -> configuration


class IntList(click.ParamType):
    """Comma-separated integers and inclusive ranges: 1,2,5-10."""
    name = 'list'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[int]:
        try:
            return dnnlib.util.parse_int_list(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def next_run_dir(outdir: str, desc: str) -> str:
    """`<outdir>/<NNNNN>-<desc>`, NNNNN one more than the largest leading number of an existing subfolder."""
    ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = re.match(r'^\d+', name)
            if m and os.path.isdir(os.path.join(outdir, name)):
                ids.append(int(m.group()))
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def run_desc(dataset_name: str, cond: bool, arch: str, precond: str, world_size: int, batch: int, fp16: bool,
             desc: Optional[str] = None) -> str:
    """EDM's run name: `<dataset>-<cond|uncond>-<arch>-<precond>-gpus<N>-batch<B>-<fp16|fp32>[-<desc>]`."""
    name = (f'{dataset_name}-{"cond" if cond else "uncond"}-{arch}-{precond}-gpus{world_size}-batch{batch}-'
            f'{"fp16" if fp16 else "fp32"}')
    return f'{name}-{desc}' if desc is not None else name


# training_loop kwargs that --resume takes from the resumed run's options, keyed to the option that overrides each.
RESUMED_RAMP_KEYS = {'lr_rampup_kimg': 'lr_rampup', 'lr_decay_start_kimg': 'lr_decay_start',
                     'lr_halflife_kimg': 'lr_halflife', 'ema_rampup_ratio': 'ema_rampup'}


def _random_seed(device: torch.device) -> int:
    """A fresh seed drawn by rank 0 and shared with every rank."""
    seed = torch.tensor(int.from_bytes(os.urandom(4), 'little') % (1 << 31), dtype=torch.int64, device=device)
    dist.broadcast_(seed)
    return int(seed)


def build_config(opts: dnnlib.EasyDict, device: torch.device) -> tuple[dnnlib.EasyDict, str]:
    """The training_loop kwargs for parsed options (key order as EDM's training_options.json) and the run name.

    Raises click.ClickException for a bad dataset, --cond without labels, --resume/--transfer misuse and a batch
    that does not split over processes.
    """
    registry.check_foreign_options(registry.PRECONDS, opts.precond, opts, '--precond')
    entry = registry.PRECONDS[opts.precond]
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(device.type == 'cuda'), num_workers=opts.workers,
                                           prefetch_factor=2)
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Dataset: explicit resolution and size.
    if not os.path.exists(opts.data):
        raise click.ClickException(f'--data: {opts.data} does not exist')
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    except (IOError, ValueError) as err:
        raise click.ClickException(f'--data: {err}')
    if opts.cond and not dataset_obj.has_labels:
        raise click.ClickException('--cond=True requires labels specified in dataset.json')
    dataset_name = dataset_obj.name
    c.dataset_kwargs.resolution = dataset_obj.resolution
    c.dataset_kwargs.max_size = len(dataset_obj)
    del dataset_obj

    # Network: arch preset, then the recipe's classes (filled by entry.configure below, keys placed here).
    c.network_kwargs.update(ARCH_PRESETS[opts.arch])
    c.network_kwargs.class_name = None
    c.loss_kwargs.class_name = None
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment,
                                           xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Training length, EMA, batch, ticks.
    c.update(
        total_kimg=max(int(opts.duration * 1000), 1),   # --duration is in Mimg; at least one kimg
        ema_halflife_kimg=int(opts.ema * 1000),         # --ema is in Mimg
        batch_size=opts.batch,
        batch_gpu=opts.batch_gpu,
        loss_scaling=opts.ls,
        cudnn_benchmark=opts.bench,
        kimg_per_tick=opts.tick,
        snapshot_ticks=opts.snap,
        state_dump_ticks=opts.dump,
    )
    c.seed = opts.seed if opts.seed is not None else _random_seed(device)

    # Transfer or resume.
    previous = {}   # training_options.json of the run being resumed
    if opts.transfer is not None:
        if opts.resume is not None:
            raise click.ClickException('--transfer and --resume cannot be used together')
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        m = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(opts.resume))
        if not m or not os.path.isfile(opts.resume):
            raise click.ClickException('--resume must point to training-state-*.pt from a previous training run')
        snapshot = os.path.join(os.path.dirname(opts.resume), f'network-snapshot-{m.group(1)}.pkl')
        c.resume_pkl = snapshot if os.path.isfile(snapshot) else None  # states we write also carry the EMA
        c.resume_kimg = int(m.group(1))
        c.resume_state_dump = opts.resume
        previous = _previous_options(opts.resume)
        if opts.seed is None:  # keep the run's seed (data order) so that the resumed run continues exactly
            c.seed = previous.get('seed', c.seed)

    # Our additions (EDM fixes these): LR ramp and decay, EMA ramp. Absent = EDM's values (or the recipe's).
    if opts.get('lr_rampup') is not None:
        c.lr_rampup_kimg = opts.lr_rampup
    if opts.get('lr_decay_start') is not None:
        c.lr_decay_start_kimg = opts.lr_decay_start
    if opts.get('lr_halflife') is not None:
        c.lr_halflife_kimg = opts.lr_halflife if opts.lr_halflife > 0 else None
    if opts.get('ema_rampup') is not None:
        c.ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None

    entry.configure(c, opts)
    # A resumed run keeps the LR and EMA ramps of the run it continues (unless given again), so that it goes on exactly
    # as an uninterrupted run would (recipes derive some of them from --duration or --transfer).
    for key, option in RESUMED_RAMP_KEYS.items():
        if key in previous and opts.get(option) is None:
            c[key] = previous[key]
    try:
        loop.batch_layout(c.batch_size, c.batch_gpu, dist.get_world_size())
    except ValueError as err:
        raise click.ClickException(f'--batch: {err}')
    name = run_desc(dataset_name, c.dataset_kwargs.use_labels, opts.arch, opts.precond, dist.get_world_size(),
                    c.batch_size, c.network_kwargs.use_fp16, opts.desc)
    return c, name


def _previous_options(state_path: str) -> dict:
    """training_options.json beside a training state ({} if absent or unreadable)."""
    path = os.path.join(os.path.dirname(state_path), 'training_options.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def print_options(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, device: torch.device) -> None:
    """Rank 0 prints the configuration and a summary (before logging to log.txt starts, as in EDM)."""
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    for label, value in [('Output directory', c.run_dir), ('Dataset path', c.dataset_kwargs.path),
                         ('Class-conditional', c.dataset_kwargs.use_labels), ('Network architecture', opts.arch),
                         ('Preconditioning & loss', opts.precond), ('Number of GPUs', dist.get_world_size()),
                         ('Device', device), ('Batch size', c.batch_size),
                         ('Mixed-precision', c.network_kwargs.use_fp16)]:
        dist.print0(f'{label + ":":<25s}{value}')
    dist.print0()


# ---------------------------------------------------------------------------------------------------------------------
# Command line


class TrainCommand(click.Command):
    """Lists each --precond entry's own options under a heading of their own in --help."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        owners = registry.option_owners(registry.PRECONDS)
        base, extra = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.name in owners:
                extra.setdefault(owners[param.name][0], []).append(record)
            else:
                base.append(record)
        with formatter.section('Options'):
            formatter.write_dl(base)
        for owner, records in extra.items():
            with formatter.section(f'Options for --precond={owner}'):
                formatter.write_dl(records)


@click.command(cls=TrainCommand)
# Main options.
@click.option('--outdir', help='Parent folder of the run folders', metavar='DIR', type=str, required=True)
@click.option('--data', help='Dataset zip or folder', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Class-conditional model', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--arch', help='Backbone preset', metavar='ddpmpp|ncsnpp|adm', type=click.Choice(list(ARCH_PRESETS)),
              default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning and loss', metavar='|'.join(registry.PRECONDS),
              type=click.Choice(list(registry.PRECONDS)), default='edm', show_default=True)
# Hyperparameters.
@click.option('--duration', help='Training length', metavar='MIMG', type=click.FloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Per-GPU batch limit (gradient accumulation)', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=int)
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=IntList())
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=10e-4,
              show_default=True)
@click.option('--lr-rampup', help='LR ramp-up length  [default: 10000, or the recipe\'s]', metavar='KIMG',
              type=click.FloatRange(min=0))
@click.option('--lr-decay-start', help='Start LR halving here  [default: never, or the recipe\'s]', metavar='KIMG',
              type=click.FloatRange(min=0))
@click.option('--lr-halflife', help='LR half-life after --lr-decay-start, 0 = no decay  [default: the recipe\'s]',
              metavar='KIMG', type=click.FloatRange(min=0))
@click.option('--ema-rampup', help='EMA half-life ramp ratio, 0 = off  [default: 0.05, off with --transfer]',
              metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=click.FloatRange(min=0), default=0.5,
              show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--augment', help='Augmentation probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Add x-flipped copies of the dataset', metavar='BOOL', type=bool, default=False,
              show_default=True)
# Performance.
@click.option('--fp16', help='Mixed precision (CUDA only)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1,
              show_default=True)
@click.option('--bench', help='cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--cache', help='Keep decoded images in CPU memory', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=1), default=1,
              show_default=True)
@click.option('--device', help='cpu, cuda, cuda:N  [default: cuda if available]', metavar='STR', type=str)
# Input/output.
@click.option('--desc', help='Suffix of the run folder name', metavar='STR', type=str)
@click.option('--nosubdir', help='Write into --outdir itself, no run folder', is_flag=True)
@click.option('--tick', help='Progress interval', metavar='KIMG', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--snap', help='Snapshot interval', metavar='TICKS', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--dump', help='Training-state interval', metavar='TICKS', type=click.IntRange(min=1), default=500,
              show_default=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Initialise from a network pickle', metavar='PKL|URL', type=str)
@click.option('--resume', help='Resume from a training state', metavar='PT', type=str)
@click.option('-n', '--dry-run', help='Print the options and exit', is_flag=True)
def main(**kwargs: Any) -> None:
    """Train a diffusion model (EDM, Karras et al. 2022, or a plugin --precond such as aniso).

    Examples:

    \b
    # Class-conditional CIFAR-10, DDPM++ backbone, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # A tiny CPU run
    python train.py --outdir=runs --data=tiny.zip --device=cpu --batch=16 --duration=0.001
    """
    opts = dnnlib.EasyDict(kwargs)
    try:
        device = dist.init(opts.device)
    except ValueError as err:
        raise click.ClickException(f'--device: {err}')
    if device.type == 'cuda' and torch.multiprocessing.get_start_method(allow_none=True) is None:
        torch.multiprocessing.set_start_method('spawn')  # DataLoader workers must not fork a CUDA process

    c, desc = build_config(opts, device)
    if dist.get_rank() != 0:
        c.run_dir = None
    elif opts.nosubdir:
        c.run_dir = opts.outdir
    else:
        c.run_dir = next_run_dir(opts.outdir, desc)
    print_options(c, opts, device)
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    dist.print0('Creating output directory...')
    logger = None
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with open(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    try:
        loop.training_loop(**c, device=device)
    except (loop.NonFiniteLossError, ValueError) as err:
        raise click.ClickException(str(err))
    finally:
        if logger is not None:
            logger.close()


def _add_plugin_options(command: click.Command) -> None:
    """Append every registered --precond entry's own options to the command."""
    taken = {p.name for p in command.params}
    for entry in registry.PRECONDS.values():
        for option in entry.options:
            if option.name in taken:
                raise ValueError(f'--precond={entry.name} option {option.opts[0]} clashes with an existing option')
            taken.add(option.name)
            command.params.append(option)


_add_plugin_options(main)

if __name__ == '__main__':
    main()
