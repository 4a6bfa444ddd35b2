"""Registers ``--precond=aniso`` with train.py and the anisotropic samplers with generate.py (docs/architecture.md).

``configure(c, opts)`` turns the plugin's options into the training config: AnisoPrecond network kwargs, the stage-1 or
stage-2 loss, the two optimizers (Adam on phi; Adam or RowMaskedAdam on theta), the LR ramp/decay and the EMA ramp.

Defaults (fine-tuning from an EDM checkpoint with --transfer, method.md §5):
  phi LR 1e-5 unless --lr is given; theta LR 1e-2 (stage 1) / 1e-4 (stage 2); LR ramp over the first 10% of the
  run, constant to mid-run, then halving every 12.5% of the run (150 kimg in a 1,200 kimg run); no EMA ramp with
  --transfer (EDM's 0.05 otherwise); no augment pipe unless --augment is given (flips via --xflip).
``--preset=reference`` reproduces the reference instead: 1,200 kimg (unless --duration), batch 256 (unless --batch),
LR ramp 10,000 kimg (it never completes: see method.md "Learning-rate ramp pitfall"), halving every 150 kimg from
mid-run, no EMA ramp.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional

import click

import dnnlib
from training import registry

STAGE_SCHEDULE_LR = {1: 1e-2, 2: 1e-4}   # theta learning rates of the reference (method.md §5)
FINETUNE_LR = 1e-5                       # phi learning rate of the reference, both stages

OPTIONS = [
    click.Option(['--stage'], help='Training stage: 1 = learned isotropic g, 2 = anisotropic g, h  [default: 1]',
                 metavar='1|2', type=click.IntRange(1, 2)),
    click.Option(['--subspace'], help='Subspace P  [default: iso in stage 1, dct in stage 2]',
                 type=click.Choice(['iso', 'dct', 'pca'])),
    click.Option(['--per-class'], help='One schedule row per class (or --class-groups group)  [default: False]',
                 metavar='BOOL', type=bool),
    click.Option(['--class-groups'], help='class -> group map for the schedule bank: a JSON list or a .json file',
                 metavar='JSON', type=str),
    click.Option(['--knots'], help='Knots per schedule  [default: 32]', metavar='INT', type=click.IntRange(min=2)),
    click.Option(['--dct-cutoff'], help='DCT low block size m  [default: resolution/2]', metavar='INT',
                 type=click.IntRange(min=1)),
    click.Option(['--pca-rank'], help='PCA rank k  [default: resolution^2/4]', metavar='INT',
                 type=click.IntRange(min=1)),
    click.Option(['--pca-bases'], help='Bases file from python -m edm_aniso.pca  [default: computed from --data]',
                 metavar='PATH', type=str),
    click.Option(['--kappa'], help='kappa of the weighting W (stage 2; stage 1 uses 1)  [default: 1]', metavar='FLOAT',
                 type=click.FloatRange(min=0, min_open=True)),
    click.Option(['--schedule-lr'], help='Schedule (theta) learning rate  [default: 1e-2 stage 1, 1e-4 stage 2]',
                 metavar='FLOAT', type=click.FloatRange(min=0, min_open=True)),
    click.Option(['--probes'], help='Hutchinson probes per sample (stage 2)  [default: 1]', metavar='INT',
                 type=click.IntRange(min=1)),
    click.Option(['--estimator-every'], help='Run the theta estimator every N-th step, scaled by N (stage 2)  '
                 '[default: 1]', metavar='INT', type=click.IntRange(min=1)),
    click.Option(['--hvp'], help='Hessian-vector product of the estimator: fd = finite difference of the VJP, '
                 'autograd = double backward (stage 2)  [default: fd]', type=click.Choice(['fd', 'autograd'])),
    click.Option(['--objective'], help='Schedule objective: energy = the trajectory objective (method.md §5); '
                 'energy+disc adds the error of sampler steps on the --grid=schedule grid '
                 '(docs/discretisation-objective.md)  [default: energy]', type=click.Choice(['energy', 'energy+disc'])),
    click.Option(['--disc-weight'], help='Weight of the discretisation term (--objective=energy+disc)  [default: 1]',
                 metavar='FLOAT', type=click.FloatRange(min=0)),
    click.Option(['--disc-steps'], help='Sampler steps K the term targets: K or a range K1-K2  [default: 5-18]',
                 metavar='K|K1-K2', type=str),
    click.Option(['--disc-substeps'], help='Heun substeps of the reference solve of each step  [default: 4]',
                 metavar='INT', type=click.IntRange(min=2)),
    click.Option(['--disc-metric'], help='Units of the step error: denoiser = e^T J_D e (the error propagated to the '
                 'data), data = sigma_data (M + sigma_data^2)^-1/2 e  [default: denoiser]',
                 type=click.Choice(['denoiser', 'data'])),
    click.Option(['--disc-k-power'], help='Extra weight (K/K1)^p over a --disc-steps range  [default: 3]',
                 metavar='FLOAT', type=click.FloatRange(min=0)),
    click.Option(['--disc-span'], help='Consecutive sampler steps per error term: L, or all = the whole K-step solve '
                 'to t = 0 against its fine solve  [default: 1]', metavar='L|all', type=str),
    click.Option(['--disc-detach-net'], help='Network weights get no gradient from the discretisation term  '
                 '[default: True]', metavar='BOOL', type=bool),
    click.Option(['--preset'], help='Hyper-parameter preset (reference: the method\'s published settings)',
                 type=click.Choice(['reference'])),
]


def _given(opts: Any, name: str) -> bool:
    """Whether a base option was set on the command line (not its default); False outside a click command."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or name not in ctx.params:
        return False
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


def parse_class_groups(text: Optional[str]) -> Optional[list[int]]:
    """--class-groups: a JSON list of ints (class -> group), inline or in a file."""
    if text is None:
        return None
    try:
        if os.path.isfile(text):
            with open(text, 'r', encoding='utf-8') as f:
                data = json.load(f)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--class-groups: not a JSON list or a readable JSON file ({err})')
    if isinstance(data, dict) and 'groups' in data:
        data = data['groups']
    if not isinstance(data, list) or not all(isinstance(v, int) and v >= 0 for v in data):
        raise click.ClickException('--class-groups: expected a JSON list of non-negative integers (class -> group)')
    return data


def _pca_source(c: Any, dataset: Any, rank: int) -> dict:
    """What automatic PCA bases are computed from; a cached file is reused only if it stores the same."""
    path = c.dataset_kwargs.get('path')
    return dict(dataset=os.path.abspath(path) if path is not None else None, num_images=len(dataset),
                resolution=int(dataset.resolution), rank=int(rank), xflip=True)


def _cached_pca_matches(path: str, source: dict) -> bool:
    """Whether `path` is a readable bases file computed from `source` (same dataset, image count, resolution, rank)."""
    from edm_aniso import pca
    if not os.path.isfile(path):
        return False
    try:
        data = pca.load_pca_file(path)
    except Exception:  # noqa: BLE001 - an unreadable or foreign file is recomputed, not reused
        return False
    return data.get('source') == source and data['rank'] == source['rank'] and \
        data['resolution'] == source['resolution'] and data['groups'] is None


def _pca_bases_path(c: Any, opts: Any, rank: Optional[int]) -> str:
    """Compute global PCA bases from --data (edm_aniso.pca) once and save them next to the run (in --outdir).

    Only rank 0 computes and writes (atomically); the other ranks wait at a barrier and then read the file. A file
    already there is reused only if it was computed from the same dataset (path, image count), resolution and rank."""
    from edm_aniso import pca   # imported lazily: only the pca subspace without --pca-bases needs it
    from torch_utils import distributed as dist
    dataset = dnnlib.util.construct_class_by_name(**{**c.dataset_kwargs, 'xflip': False, 'use_labels': False})
    res = dataset.resolution
    rank = rank if rank is not None else max(res * res // 4, 1)
    path = os.path.join(opts.outdir, f'pca-bases-{dataset.name}-k{rank}.pt')
    if opts.get('dry_run'):
        return path
    source = _pca_source(c, dataset, rank)
    if dist.get_rank() == 0 and not _cached_pca_matches(path, source):
        bases = pca.compute_pca_bases(dataset, rank, xflip=True, progress=False)
        pca.save_pca_file(path, bases, None, rank, res, source=source)
    dist.barrier()
    return path


DISC_OPTIONS = [('disc_weight', '--disc-weight'), ('disc_steps', '--disc-steps'), ('disc_substeps', '--disc-substeps'),
                ('disc_detach_net', '--disc-detach-net'), ('disc_metric', '--disc-metric'),
                ('disc_k_power', '--disc-k-power'), ('disc_span', '--disc-span')]


def objective_loss_kwargs(energy: Any, opts: Any) -> Any:
    """--objective: the stage's energy loss kwargs as they are (energy), or wrapped in
    edm_aniso.disc_loss.EnergyDiscLoss with the --disc-* options (energy+disc)."""
    from edm_aniso.disc_loss import parse_span, parse_steps
    objective = opts.get('objective') or 'energy'
    if objective == 'energy':
        for name, flag in DISC_OPTIONS:
            if opts.get(name) is not None:
                raise click.ClickException(f'{flag} applies only to --objective=energy+disc')
        return energy
    try:
        steps = parse_steps(opts.get('disc_steps') or '5-18')
    except ValueError as err:
        raise click.ClickException(f'--disc-steps: {err}')
    try:
        span = parse_span(opts.get('disc_span') or 1)
    except ValueError as err:
        raise click.ClickException(f'--disc-span: {err}')
    weight = opts.get('disc_weight')
    detach = opts.get('disc_detach_net')
    return dnnlib.EasyDict(class_name='edm_aniso.disc_loss.EnergyDiscLoss', energy=dict(energy),
                           disc_weight=1.0 if weight is None else float(weight), disc_steps=list(steps),
                           disc_substeps=opts.get('disc_substeps') or 4,
                           disc_detach_net=True if detach is None else bool(detach),
                           disc_metric=opts.get('disc_metric') or 'denoiser',
                           disc_k_power=3.0 if opts.get('disc_k_power') is None else float(opts.disc_k_power),
                           disc_span=span)


def configure(c: Any, opts: Any) -> None:
    """Fill the training config for --precond=aniso (see the module docstring for the defaults)."""
    stage = opts.get('stage') or 1
    subspace = opts.get('subspace') or ('iso' if stage == 1 else 'dct')
    if stage == 1 and subspace != 'iso':
        raise click.ClickException('--subspace applies only to --stage=2 (stage 1 is isotropic)')
    for name, flag in [('kappa', '--kappa'), ('probes', '--probes'), ('estimator_every', '--estimator-every'),
                       ('hvp', '--hvp')]:
        if stage == 1 and opts.get(name) is not None:
            raise click.ClickException(f'{flag} applies only to --stage=2')
    if subspace != 'dct' and opts.get('dct_cutoff') is not None:
        raise click.ClickException('--dct-cutoff applies only to --subspace=dct')
    if subspace != 'pca' and (opts.get('pca_rank') is not None or opts.get('pca_bases') is not None):
        raise click.ClickException('--pca-rank/--pca-bases apply only to --subspace=pca')
    per_class = bool(opts.get('per_class'))
    if per_class and not opts.get('cond'):
        raise click.ClickException('--per-class needs a class-conditional run (--cond=1)')
    groups = parse_class_groups(opts.get('class_groups'))
    if groups is not None and not per_class:
        raise click.ClickException('--class-groups needs --per-class=1')
    if opts.get('pca_bases') is not None and not os.path.isfile(opts.pca_bases):
        raise click.ClickException(f'--pca-bases: no such file: {opts.pca_bases}')
    reference = opts.get('preset') == 'reference'
    objective_loss_kwargs(dnnlib.EasyDict(), opts)      # --objective/--disc-* checked before anything is written

    # Run length first: the relative ramp/decay defaults depend on it.
    if reference and not _given(opts, 'duration'):
        c.total_kimg = 1200
    if reference and not _given(opts, 'batch'):
        c.batch_size = 256
    total_kimg = float(c.get('total_kimg') or max(int(float(opts.get('duration', 200)) * 1000), 1))

    # Network.
    net = c.network_kwargs
    net.class_name = 'edm_aniso.precond.AnisoPrecond'
    net.update(stage=stage, subspace=subspace, per_class=per_class, num_knots=opts.get('knots') or 32)
    if groups is not None:
        net.class_groups = groups
    if opts.get('dct_cutoff') is not None:
        net.dct_cutoff = opts.dct_cutoff
    if subspace == 'pca':
        net.pca_rank = opts.get('pca_rank')
        net.pca_bases = opts.get('pca_bases') or _pca_bases_path(c, opts, opts.get('pca_rank'))
    if not _given(opts, 'augment'):            # method.md §5: no augment pipe (flips only via --xflip)
        c.pop('augment_kwargs', None)
        net.pop('augment_dim', None)

    # Loss.
    kappa = opts.get('kappa') or 1.0
    if stage == 1:
        c.loss_kwargs = dnnlib.EasyDict(class_name='edm_aniso.loss.AnisoStage1Loss', kappa=kappa)
    else:
        c.loss_kwargs = dnnlib.EasyDict(class_name='edm_aniso.loss.AnisoStage2Loss', kappa=kappa,
                                        probes=opts.get('probes') or 1,
                                        estimator_every=opts.get('estimator_every') or 1)
        if opts.get('hvp') is not None:                        # else the loss's default (fd)
            c.loss_kwargs.hvp = opts.hvp
    c.loss_kwargs = objective_loss_kwargs(c.loss_kwargs, opts)

    # Optimizers: phi keeps the base Adam (fine-tuning LR unless --lr), theta gets its own.
    if reference or not _given(opts, 'lr'):
        c.optimizer_kwargs.lr = FINETUNE_LR
    schedule_lr = opts.get('schedule_lr') or STAGE_SCHEDULE_LR[stage]
    c.schedule_optimizer_kwargs = dnnlib.EasyDict(
        class_name='edm_aniso.optim.RowMaskedAdam' if per_class else 'torch.optim.Adam',
        lr=schedule_lr, betas=[0.9, 0.999], eps=1e-8)

    # LR ramp/decay and EMA ramp.
    if reference:
        ramp, start, halflife = 10000.0, total_kimg / 2, 150.0
    else:
        ramp, start, halflife = total_kimg / 10, total_kimg / 2, total_kimg / 8
    c.lr_rampup_kimg = opts.get('lr_rampup') if opts.get('lr_rampup') is not None else ramp
    c.lr_decay_start_kimg = opts.get('lr_decay_start') if opts.get('lr_decay_start') is not None else start
    halflife = opts.get('lr_halflife') if opts.get('lr_halflife') is not None else halflife
    c.lr_halflife_kimg = halflife if halflife > 0 else None
    if opts.get('ema_rampup') is not None:
        c.ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None
    elif reference or opts.get('transfer') is not None:
        c.ema_rampup_ratio = None
    else:
        c.ema_rampup_ratio = 0.05


registry.register_precond(registry.PrecondEntry(
    name='aniso', configure=configure, options=OPTIONS,
    help='learned anisotropic noise schedules (edm_aniso, method.md)'))

# Samplers: each sampler module lists its entries in SAMPLER_ENTRIES; register them all.
SAMPLER_MODULES = ['edm_aniso.sampler', 'edm_aniso.multistep', 'edm_aniso.stochastic']
for _name in SAMPLER_MODULES:
    for _entry in getattr(importlib.import_module(_name), 'SAMPLER_ENTRIES', []):
        registry.register_sampler(_entry)
