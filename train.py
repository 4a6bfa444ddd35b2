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
from dataclasses import dataclass
from typing import Any, Optional

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import registry
from training import preflight
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


def _random_seed(device: torch.device) -> int:
    """A fresh seed drawn by rank 0 and shared with every rank."""
    seed = torch.tensor(int.from_bytes(os.urandom(4), 'little') % (1 << 31), dtype=torch.int64, device=device)
    dist.broadcast_(seed)
    return int(seed)


def _given(name: str) -> bool:
    """Whether option `name` came from the command line (not its default); False outside a click command."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or name not in ctx.params:
        return False
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


# ---------------------------------------------------------------------------------------------------------------------
# Where a run starts: from scratch, from a --transfer pickle, or from a --resume state. Everything here is checked on
# rank 0 before the run folder exists (training.preflight); the other ranks get the outcome.


@dataclass
class ResumeRecord:
    """What a --resume state says about the run it belongs to (small: it travels to every rank)."""
    path: str
    cur_nimg: int                # images seen at the state
    has_ema: bool                # the state carries the EMA weights (ours do; EDM's need the snapshot beside them)
    options: dict                # the run's training options: the state's own record, else training_options.json
    source: str                  # where `options` came from, for the log


# Options a resumed run keeps from the run it continues unless given again: its length, seed and the ramps (recipes
# derive some from --duration or --transfer), so that it goes on as the uninterrupted run would.
CONTINUED = {'total_kimg': 'duration', 'seed': 'seed', 'lr_rampup_kimg': 'lr_rampup',
             'lr_decay_start_kimg': 'lr_decay_start', 'lr_halflife_kimg': 'lr_halflife', 'ema_rampup_ratio': 'ema_rampup'}


def _options_beside(state_path: str) -> dict:
    """training_options.json in the state's folder ({} when absent or unreadable): EDM's states record nothing."""
    try:
        with open(os.path.join(os.path.dirname(state_path), 'training_options.json')) as f:
            options = json.load(f)
        return options if isinstance(options, dict) else {}
    except (OSError, ValueError):
        return {}


def inspect_state(state: dict, path: str) -> ResumeRecord:
    """The ResumeRecord of a loaded training state."""
    kimg = int(preflight.STATE_NAME.fullmatch(os.path.basename(path)).group(1))
    options = state.get('training_options')
    source = 'the state'
    if not isinstance(options, dict):
        options, source = _options_beside(path), 'training_options.json beside it'
    if 'seed' in state:     # our states store the seed even without the full record
        options = dict(options, seed=int(state['seed']))
    return ResumeRecord(path=path, cur_nimg=int(state.get('cur_nimg', kimg * 1000)), has_ema='ema_state' in state,
                        options=options, source=source)


def start_from(opts: dnnlib.EasyDict, c: dnnlib.EasyDict) -> Optional[ResumeRecord]:
    """Set the resume/transfer keys of the config (before the recipe configures it); returns the resume record."""
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be used together')
    if opts.transfer is not None:
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None        # as EDM: no EMA ramp when fine-tuning
        return None
    if opts.resume is None:
        return None
    resumed = preflight.on_rank0(lambda: inspect_state(_load_state(opts.resume), opts.resume))
    snapshot = os.path.join(os.path.dirname(opts.resume),
                            'network-snapshot-' + preflight.STATE_NAME.fullmatch(
                                os.path.basename(opts.resume)).group(1) + '.pkl')
    if not resumed.has_ema and not os.path.isfile(snapshot):
        raise click.ClickException(f'--resume: {opts.resume} holds no EMA weights (an EDM state) and {snapshot} is '
                                   f'missing')
    c.resume_pkl = None if resumed.has_ema else snapshot
    c.resume_kimg = resumed.cur_nimg // 1000
    c.resume_state_dump = opts.resume
    for key in ('total_kimg', 'seed'):
        if key in resumed.options and not _given(CONTINUED[key]):
            c[key] = resumed.options[key]
    return resumed


_state_cache: dict = {}   # rank 0: the --resume state, read once for all preflight checks


def _load_state(path: str) -> dict:
    if _state_cache.get('path') != path:
        _state_cache.update(path=path, state=preflight.read_training_state(path))
    return _state_cache['state']


def check_start(opts: dnnlib.EasyDict, c: dnnlib.EasyDict, summary: preflight.DatasetSummary, label_dim: int,
                resumed: Optional[ResumeRecord]) -> None:
    """Once the config is complete: dry-run the transfer or the resume into the configured network (rank 0)."""
    if resumed is not None:
        for key, option in CONTINUED.items():
            if key in resumed.options and key not in ('total_kimg', 'seed') and opts.get(option) is None:
                c[key] = resumed.options[key]

        def check() -> None:
            try:
                preflight.check_resume(_load_state(opts.resume), opts.resume, c, summary, label_dim)
            finally:
                _state_cache.clear()
            if c.get('resume_pkl') is not None:   # an EDM state: the EMA comes from the snapshot beside it
                try:
                    preflight.read_network_pickle(c.resume_pkl, verbose=False)
                except ValueError as err:
                    raise click.ClickException(f'--resume: {err} (the EMA weights of this EDM-style state)')
        preflight.on_rank0(check)
        dist.print0(f'Resuming from {opts.resume} at {resumed.cur_nimg / 1000:g} kimg (run options from '
                    f'{resumed.source}).')
        if 'seed' not in resumed.options and opts.seed is None:
            dist.print0(f'Note: {opts.resume} records no seed; the resumed run draws a new one ({c.seed}), so its '
                        f'data order differs from the original run\'s.')
        elif 'seed' in resumed.options and c.seed != resumed.options['seed']:
            dist.print0(f'Note: --seed={c.seed} differs from the seed of the resumed run ({resumed.options["seed"]}); '
                        f'the data order will differ from the original run\'s.')
        return

    def check() -> Optional[str]:
        src = None
        if opts.transfer is not None:
            try:
                src = preflight.read_network_pickle(opts.transfer, verbose=True)['ema']
            except ValueError as err:
                raise click.ClickException(f'--transfer: {err}')
            return preflight.check_transfer(src, opts.transfer, c, summary, label_dim)
        return preflight.transfer_note(c, None)
    note = preflight.on_rank0(check)
    if note:
        dist.print0(f'Warning: {note}')


def build_config(opts: dnnlib.EasyDict, device: torch.device) -> tuple[dnnlib.EasyDict, str, Optional[ResumeRecord]]:
    """The training_loop kwargs for parsed options (key order as EDM's training_options.json), the run name and the
    resume record (None unless --resume).

    Every input is checked here, before anything is written: the dataset (every image header, dataset.json), --cond
    without labels, --transfer and --resume files against the configured network, and a batch that does not split
    over processes. Raises click.ClickException with one line.
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

    # Dataset: every image header and dataset.json first, then explicit resolution and size.
    summary = preflight.on_rank0(lambda: preflight.scan_dataset(opts.data))
    if summary.num_images >= 10000:
        dist.print0(f'Checked {summary.num_images} images and dataset.json in {summary.seconds:.1f} s.')
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    except (IOError, ValueError) as err:
        raise click.ClickException(f'--data: {err}')
    if opts.cond and not dataset_obj.has_labels:
        raise click.ClickException('--cond=True requires labels specified in dataset.json')
    dataset_name = dataset_obj.name
    label_dim = dataset_obj.label_dim if opts.cond else 0
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
    resumed = start_from(opts, c)

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
    try:
        loop.batch_layout(c.batch_size, c.batch_gpu, dist.get_world_size())
    except ValueError as err:
        raise click.ClickException(f'--batch: {err}')
    check_start(opts, c, summary, label_dim, resumed)
    name = run_desc(dataset_name, c.dataset_kwargs.use_labels, opts.arch, opts.precond, dist.get_world_size(),
                    c.batch_size, c.network_kwargs.use_fp16, opts.desc)
    return c, name, resumed


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
@click.option('--pg-timeout', help='Process-group timeout: a frozen rank fails the run after this long  '
              '[default: torch\'s, 10-30 min]', metavar='SEC', type=click.FloatRange(min=0, min_open=True))
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
        run(opts)
    except click.ClickException:
        if dist.get_rank() != 0:
            raise SystemExit(1)   # rank 0 prints the line
        raise


def newest_snapshot(run_dir: str) -> Optional[str]:
    """The network-snapshot-*.pkl with the most images in a run folder, or None."""
    names = [n for n in os.listdir(run_dir) if re.fullmatch(r'network-snapshot-\d+\.pkl', n)] \
        if os.path.isdir(run_dir) else []
    return os.path.join(run_dir, max(names)) if names else None


def run(opts: dnnlib.EasyDict) -> None:
    """Body of the command: check everything, then create the run folder and train."""
    try:
        device = dist.init(opts.device, timeout=opts.get('pg_timeout'))
    except ValueError as err:
        raise click.ClickException(f'--device: {err}')
    if device.type == 'cuda' and torch.multiprocessing.get_start_method(allow_none=True) is None:
        torch.multiprocessing.set_start_method('spawn')  # DataLoader workers must not fork a CUDA process
    preflight.on_rank0(lambda: preflight.check_outdir(opts.outdir))

    c, desc, resumed = build_config(opts, device)
    if resumed is not None and resumed.cur_nimg >= c.total_kimg * 1000:
        folder = os.path.dirname(opts.resume)
        dist.print0(f'Training already finished: {opts.resume} is at {resumed.cur_nimg / 1000:g} kimg of '
                    f'{c.total_kimg:g} (--duration); nothing to do, nothing written.')
        final = newest_snapshot(folder)
        if final is not None:
            dist.print0(f'Newest snapshot: {final}')
        return
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
    try:
        if dist.get_rank() == 0:
            folders = {c.run_dir, opts.outdir} | ({os.path.dirname(opts.resume) or '.'} if opts.resume else set())
            for folder in sorted(folders):
                removed = preflight.remove_stale_temps(folder)
                if removed:
                    dist.print0(f'Removed {len(removed)} temporary file(s) left by an interrupted run in {folder}')
            os.makedirs(c.run_dir, exist_ok=True)
            loop.write_file(os.path.join(c.run_dir, 'training_options.json'),
                            lambda f: f.write(json.dumps(c, indent=2).encode('utf-8')))
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
        loop.training_loop(**c, device=device)
    except (loop.NonFiniteLossError, ValueError) as err:
        raise click.ClickException(str(err))
    except OSError as err:
        where = f'{err.filename}: ' if err.filename else ''
        raise click.ClickException(f'cannot write {where}{err.strerror or err}; files written before are intact')
    except RuntimeError as err:
        backend_error = getattr(torch.distributed, 'DistBackendError', ())
        if not (isinstance(err, backend_error) or 'timed out' in str(err).lower()):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise click.ClickException(f'rank {dist.get_rank()}: a collective failed or timed out (another rank froze or '
                                   f'died; --pg-timeout sets the limit): {first}')
    finally:
        if logger is not None:
            logger.close()
    if dist.get_rank() == 0:
        final = newest_snapshot(c.run_dir)
        if final is not None:
            print(f'Newest snapshot: {final}')


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
