"""Checks that train.py runs before it creates a run folder, so that a bad input ends in one line and writes nothing.

- `scan_dataset`: every image of a dataset zip or folder by its header (size, mode; PNGs also by chunk CRCs), and the
  structure of dataset.json. On 50,000 32x32 PNGs in a zip this takes seconds (measured: docs/bad-inputs.md).
- `read_network_pickle`: the one reader of EDM network pickles (generate.py loads through it, train.py checks
  --transfer with it).
- `read_training_state`: a training-state-*.pt, with a one-line error for a truncated or foreign file.
- `check_transfer`, `check_resume`: the configured network against the --transfer pickle / the --resume state, by a
  dry run of the very copy the training loop does (and, for a resume, by the network's recorded constructor
  arguments, which name the option that differs).
- `remove_stale_temps`: temporary files that a killed run left behind (atomic writes in progress).
- `on_rank0`: run a check on rank 0 only and give its outcome (or its error) to every rank.

Every error is a `click.ClickException` with one line.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import click
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import training_loop as loop

T = TypeVar('T')

# Modes the tools read and write: ImageFolderDataset decodes them to 1 or 3 uint8 channels, generate.py saves those.
IMAGE_MODES = {'L': 1, 'RGB': 3}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f'{type(err).__name__}: {text.splitlines()[0]}' if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Running a check once


def on_rank0(check: Callable[[], T]) -> T:
    """Run `check()` on rank 0 and hand its result to every rank (collective when a process group exists).

    A `click.ClickException` on rank 0 is raised on rank 0 and ends the other ranks quietly (exit status 1), so that
    the line is printed once; any other exception is re-raised on rank 0 the same way.
    """
    if dist.get_world_size() == 1:
        return check()
    box: list = [None]
    failure: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            box[0] = ('ok', check())
        except BaseException as err:   # noqa: BLE001 - handed on below, after the other ranks are told
            failure = err
            box[0] = ('error', None)
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == 'ok':
        return value
    if failure is not None:
        raise failure
    raise SystemExit(1)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class DatasetSummary:
    """What `scan_dataset` found."""
    path: str
    num_images: int
    channels: int
    resolution: int
    labels: str                 # 'none', 'classes' or 'vectors'
    seconds: float              # wall time of the scan


class _Source:
    """The files of a dataset folder or zip, by relative path with '/' separators."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.zip: Optional[zipfile.ZipFile] = None
        if os.path.isdir(path):
            self.names = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/')
                                for root, _dirs, files in os.walk(path) for f in files)
        elif os.path.isfile(path):
            if os.path.splitext(path)[1].lower() != '.zip':
                raise click.ClickException(f'--data: {path} is neither a folder nor a .zip file')
            try:
                self.zip = zipfile.ZipFile(path)
                self.names = sorted(n for n in self.zip.namelist() if not n.endswith('/'))
            except (zipfile.BadZipFile, OSError) as err:
                raise click.ClickException(f'--data: {path} is not a readable zip file ({_first_line(err)})')
        else:
            raise click.ClickException(f'--data: {path} does not exist')

    def where(self, name: str) -> str:
        return f'{self.path}:{name}' if self.zip is not None else os.path.join(self.path, name)

    def open(self, name: str) -> Any:
        if self.zip is not None:
            return self.zip.open(name)
        return open(os.path.join(self.path, name), 'rb')

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _image_header(source: _Source, name: str) -> tuple[int, int, str]:
    """(width, height, mode) of one image; a PNG is also walked chunk by chunk (CRCs), which finds truncation."""
    try:
        with source.open(name) as f:
            data = f.read() if source.zip is not None else None
            stream = io.BytesIO(data) if data is not None else f
            with PIL.Image.open(stream) as im:
                size, mode, fmt = im.size, im.mode, im.format
                if fmt == 'PNG':
                    im.verify()
    except PIL.UnidentifiedImageError:
        raise click.ClickException(f'--data: cannot read image {source.where(name)} (not a recognised image file: '
                                   f'corrupt, truncated or misnamed)')
    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise click.ClickException(f'--data: cannot read image {source.where(name)} ({_first_line(err)})')
    return size[0], size[1], mode


def _check_labels(source: _Source, images: list[str]) -> str:
    """Validate dataset.json's structure; returns 'none', 'classes' or 'vectors'."""
    if 'dataset.json' not in source.names:
        return 'none'
    where = source.where('dataset.json')
    try:
        with source.open('dataset.json') as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data: {where} is not valid JSON ({_first_line(err)})')
    if not isinstance(meta, dict) or 'labels' not in meta:
        raise click.ClickException(f'--data: {where} must be an object {{"labels": [[path, label], ...] or null}}')
    entries = meta['labels']
    if entries is None:
        return 'none'
    if not isinstance(entries, list):
        raise click.ClickException(f'--data: {where}: "labels" must be a list of [path, label] pairs or null, '
                                   f'got {type(entries).__name__}')
    table: dict = {}
    kinds = set()
    width = set()
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise click.ClickException(f'--data: {where}: labels[{i}] must be a [path, label] pair, got {entry!r:.60}')
        label = entry[1]
        if isinstance(label, int) and not isinstance(label, bool) and label >= 0:
            kinds.add('classes')
        elif isinstance(label, list) and label and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in label):
            kinds.add('vectors')
            width.add(len(label))
        else:
            raise click.ClickException(f'--data: {where}: label of {entry[0]} must be a non-negative class id or a '
                                       f'list of numbers, got {label!r:.60}')
        table[entry[0].replace('\\', '/')] = label
    if len(kinds) > 1 or len(width) > 1:
        raise click.ClickException(f'--data: {where}: labels mix class ids and vectors, or vectors of different '
                                   f'lengths')
    missing = [n for n in images if n not in table]
    if missing:
        raise click.ClickException(f'--data: {where} has no label for {missing[0]} ({len(missing)} of {len(images)} '
                                   f'images unlabelled)')
    return kinds.pop() if kinds else 'none'


def scan_dataset(path: str, progress: bool = True) -> DatasetSummary:
    """Check every image header of a dataset folder or zip, and its dataset.json, before any training starts.

    Refused: no images; an unreadable or truncated image; a mode other than L (greyscale) or RGB (RGBA, palette,
    16-bit, ...: ImageFolderDataset and generate.py handle 1 or 3 8-bit channels only); non-square images; images that
    differ in size or mode from the first; a dataset.json that is not {"labels": [[path, label], ...] | null} or
    lacks a label for an image.
    """
    start = time.time()
    source = _Source(path)
    try:
        PIL.Image.init()
        images = [n for n in source.names if os.path.splitext(n)[1].lower() in PIL.Image.EXTENSION]
        if not images:
            raise click.ClickException(f'--data: no image files in {path}')
        if progress and len(images) >= 10000:
            dist.print0(f'Checking the headers of {len(images)} dataset images...')
        first = None
        for name in images:
            w, h, mode = _image_header(source, name)
            if mode not in IMAGE_MODES:
                raise click.ClickException(f'--data: image {source.where(name)} has mode {mode}; only greyscale (L) '
                                           f'and RGB 8-bit images can be trained on and saved (convert it, e.g. with '
                                           f'dataset_tool.py)')
            if w != h:
                raise click.ClickException(f'--data: image {source.where(name)} is {w}x{h}; images must be square')
            if first is None:
                first = (w, mode, name)
            elif (w, mode) != first[:2]:
                raise click.ClickException(f'--data: image {source.where(name)} is {w}x{w} {mode} but {first[2]} is '
                                           f'{first[0]}x{first[0]} {first[1]}; all images must have the same size '
                                           f'and channels')
        labels = _check_labels(source, images)
    finally:
        source.close()
    assert first is not None
    return DatasetSummary(path=path, num_images=len(images), channels=IMAGE_MODES[first[1]], resolution=first[0],
                          labels=labels, seconds=time.time() - start)


# ---------------------------------------------------------------------------------------------------------------------
# Network pickles and training states


DENOISER_ATTRS = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma')


def read_network_pickle(path: str, verbose: bool = True) -> dict:
    """An EDM network pickle (path or URL) as its dict, with a checked denoiser under 'ema'.

    Raises ValueError with one line for a missing, truncated or foreign file."""
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            data = pickle.load(f)
    except OSError as err:
        raise ValueError(f'cannot read network pickle "{path}": {err}') from err
    except Exception as err:  # anything unpickling can raise: truncated data, foreign globals, bad opcodes
        raise ValueError(f'"{path}" is not a readable network pickle ({_first_line(err)})') from err
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'"{path}" is not a network pickle: expected a dict with an \'ema\' entry')
    net = data['ema']
    missing = [a for a in DENOISER_ATTRS if not hasattr(net, a)]
    if missing or not isinstance(net, torch.nn.Module):
        lacks = f' (lacks {", ".join(missing)})' if missing else ''
        raise ValueError(f'the \'ema\' object in "{path}" is not a denoiser network{lacks}')
    return data


STATE_NAME = re.compile(r'training-state-(\d+)\.pt')


def read_training_state(path: str) -> dict:
    """A training-state-*.pt (ours or EDM's) as its dict; one-line ClickException for anything else."""
    if not STATE_NAME.fullmatch(os.path.basename(path)) or not os.path.isfile(path):
        raise click.ClickException('--resume must point to training-state-*.pt from a previous training run')
    try:
        state = torch.load(path, map_location=torch.device('cpu'), weights_only=False)
    except Exception as err:  # noqa: BLE001 - truncated zip, not a torch file, foreign pickle
        raise click.ClickException(f'--resume: {path} is not a readable training state ({_first_line(err)}); '
                                   f'resume from an earlier training-state-*.pt') from err
    if not isinstance(state, dict) or not isinstance(state.get('net'), torch.nn.Module) or \
            'optimizer_state' not in state:
        raise click.ClickException(f'--resume: {path} is not a training state (expected a dict with \'net\' and '
                                   f'\'optimizer_state\')')
    return state


# Constructor arguments that may change on resume without changing the network's tensors.
RESUME_FREE_KWARGS = {'dropout', 'use_fp16'}
# The option that sets each constructor argument (for the error line).
KWARG_OPTIONS = {'label_dim': '--cond', 'augment_dim': '--augment', 'model_channels': '--cbase',
                 'channel_mult': '--cres', 'model_type': '--arch', 'embedding_type': '--arch',
                 'encoder_type': '--arch', 'decoder_type': '--arch', 'img_resolution': '--data',
                 'img_channels': '--data'}


def _build_network(c: dnnlib.EasyDict, summary: DatasetSummary, label_dim: int) -> torch.nn.Module:
    interface = dict(img_resolution=summary.resolution, img_channels=summary.channels, label_dim=label_dim)
    try:
        return dnnlib.util.construct_class_by_name(**c.network_kwargs, **interface)
    except (ValueError, TypeError, AssertionError) as err:
        raise click.ClickException(f'cannot build the network for this dataset and options ({_first_line(err)})')


def _class_name(net: torch.nn.Module) -> str:
    return type(net).__name__


def check_transfer(src: torch.nn.Module, path: str, c: dnnlib.EasyDict, summary: DatasetSummary,
                   label_dim: int) -> Optional[str]:
    """Dry-run --transfer into the configured network; returns the network class's advice line, if any."""
    net = _build_network(c, summary, label_dim)
    try:
        with torch.no_grad():
            loop.transfer_weights(src, net, copy.deepcopy(net).eval().requires_grad_(False))
    except (ValueError, RuntimeError, AttributeError) as err:
        reason = _first_line(err).replace('ValueError: --transfer: ', '')
        raise click.ClickException(f'--transfer: {path} does not fit this network ({reason})')
    return transfer_note(c, src)


def transfer_note(c: dnnlib.EasyDict, src: Optional[torch.nn.Module]) -> Optional[str]:
    """The configured network class's `transfer_note(network_kwargs, src)` (plugin hook), or None."""
    try:
        cls = dnnlib.util.get_obj_by_name(c.network_kwargs.class_name)
    except Exception:  # noqa: BLE001 - a bad class name fails later with its own message
        return None
    hook = getattr(cls, 'transfer_note', None)
    return hook(dict(c.network_kwargs), src) if callable(hook) else None


def check_resume(state: dict, path: str, c: dnnlib.EasyDict, summary: DatasetSummary, label_dim: int) -> None:
    """The state's network must be the configured one (same class and constructor arguments but dropout/fp16)."""
    old = state['net']
    want_class = c.network_kwargs.class_name.split('.')[-1]
    if _class_name(old) != want_class:
        raise click.ClickException(f'--resume: {path} holds a network of class {_class_name(old)}, '
                                   f'these options build {want_class} (check --precond)')
    recorded = getattr(old, 'init_kwargs', None)
    if isinstance(recorded, dict):
        wanted = dict(c.network_kwargs, img_resolution=summary.resolution, img_channels=summary.channels,
                      label_dim=label_dim)
        wanted.pop('class_name', None)
        for key in sorted(set(recorded) | set(wanted)):
            if key in RESUME_FREE_KWARGS:
                continue
            a, b = recorded.get(key), wanted.get(key)
            if key == 'augment_dim':
                a, b = a or 0, b or 0
            if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
                a, b = list(a), list(b)
            if a != b:
                option = KWARG_OPTIONS.get(key, f'the option that sets {key}')
                raise click.ClickException(f'--resume: {path} was trained with {key}={a!r}, these options give '
                                           f'{key}={b!r} (check {option})')
    net = _build_network(c, summary, label_dim)
    try:
        with torch.no_grad():
            misc.copy_params_and_buffers(src_module=old, dst_module=net, require_all=True)
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(f'--resume: {path} does not fit this network ({_first_line(err)})')


def check_outdir(outdir: str) -> None:
    """--outdir must be a folder (or not exist yet) that this process may write into."""
    probe = os.path.abspath(outdir)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise click.ClickException(f'--outdir: {probe} is a file, not a folder')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise click.ClickException(f'--outdir: {probe} is not writable (permission denied or read-only)')


# ---------------------------------------------------------------------------------------------------------------------
# Leftovers of killed runs


# `.<final name>.<random>.tmp` as dnnlib.util.atomic_write names its temporary files, for the files a run writes.
TEMP_NAME = re.compile(r'\.(network-snapshot-\d+\.pkl|training-state-\d+\.pt|training_options\.json|'
                       r'pca-bases-.+-k\d+\.pt)\.[a-z0-9_]+\.tmp')


def remove_stale_temps(folder: str, min_age_s: float = 60) -> list[str]:
    """Delete the temporary files of interrupted atomic writes of a run folder; returns their paths.

    Only files named like the run's own (snapshots, states, training_options.json, the plugin's automatic PCA bases in
    --outdir) and untouched for `min_age_s`
    seconds are removed, so that a write still in progress elsewhere is left alone."""
    removed: list[str] = []
    if not os.path.isdir(folder):
        return removed
    now = time.time()
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if TEMP_NAME.fullmatch(name) and os.path.isfile(full) and now - os.path.getmtime(full) >= min_age_s:
            os.remove(full)
            removed.append(full)
    return removed
