"""PCA bases for the anisotropic subspace (method.md §3).

Images in [-1, 1] (with training-time x-flips) are averaged over channels to grayscale, flattened to res*res and
accumulated into a streamed float64 covariance per group (global, per class, or per group of classes via a
class -> group map), centred by the group mean; the top-k eigenvectors, explicitly orthonormalised, are the basis.

Command line:  python -m edm_aniso.pca --data=ZIP --dest=bases.pt --rank=K [--per-class] [--groups=JSON]
"""

from __future__ import annotations

import json
import os

import click
import numpy as np
import torch

import dnnlib
from edm_aniso.subspace import orthonormalize

__all__ = ['orthonormalize', 'compute_pca_bases', 'save_pca_file', 'load_pca_file', 'main']

# ----------------------------------------------------------------------------------------------------------------------
# Library.


def _class_indices(labels, batch: int) -> torch.Tensor:
    """Class index per sample from one-hot / score vectors [B, L] (argmax) or integer labels [B]."""
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if labels.ndim == 2 and labels.shape[1] > 0:
        return labels.argmax(dim=1)
    if labels.ndim == 1 and labels.shape[0] == batch and not labels.is_floating_point():
        return labels.long()
    raise ValueError('per-class or per-group PCA needs a dataset with labels')


class _CovarianceAccumulator:
    """Streamed float64 sums per group: count n_g, sum_g, sum of outer products S_g."""

    def __init__(self, num_groups: int, dim: int, device: torch.device) -> None:
        self.count = torch.zeros(num_groups, dtype=torch.float64, device=device)
        self.total = torch.zeros(num_groups, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_groups, dim, dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, group: torch.Tensor) -> None:
        for g in torch.unique(group).tolist():
            xs = x[group == g]
            self.count[g] += xs.shape[0]
            self.total[g] += xs.sum(dim=0)
            self.outer[g] += xs.T @ xs

    def covariance(self) -> torch.Tensor:
        """Covariance per group, centred by the group mean: S_g / n_g - mu_g mu_g^T."""
        n = self.count.view(-1, 1)
        mean = self.total / n
        cov = self.outer / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        return (cov + cov.transpose(-1, -2)) / 2


def top_eigenvectors(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` eigenvectors [G, D, rank] of symmetric matrices [G, D, D], by decreasing eigenvalue, each
    column's sign fixed (largest-magnitude entry positive) and explicitly orthonormalised."""
    _, vecs = torch.linalg.eigh(cov)
    top = vecs[..., -rank:].flip(-1)
    pivot = top.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(top.gather(-2, pivot))
    top = top * torch.where(sign == 0, torch.ones_like(sign), sign)
    return orthonormalize(top)


def compute_pca_bases(
    dataset,                                        # torch Dataset yielding (uint8 [C, H, W] image, label).
    rank:       int,                                # k: basis vectors per group.
    groups:     torch.Tensor | None = None,         # [label_dim] long class -> group map; None = one global basis.
    xflip:      bool                = True,         # Also count the horizontally flipped images (training flips).
    batch:      int                 = 256,          # Images per step.
    device:     str | torch.device  = 'cpu',        # Where the covariance is accumulated.
    progress:   bool                = True,         # Show a tqdm bar.
) -> torch.Tensor:
    """PCA bases [num_groups, res*res, rank] (float64, orthonormal columns) of grayscale training images in
    [-1, 1], per group, centred by the group mean (method.md §3)."""
    if len(dataset) == 0:
        raise ValueError('the dataset is empty')
    if batch < 1:
        raise ValueError(f'batch must be >= 1, got {batch}')
    device = torch.device(device)
    if groups is not None:
        groups = torch.as_tensor(groups).to(device)
        if groups.ndim != 1 or groups.dtype != torch.long or groups.numel() == 0 or bool((groups < 0).any()):
            raise ValueError('groups must be a 1-D long tensor mapping each class to a group id >= 0')
    num_groups = 1 if groups is None else int(groups.max()) + 1

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0)
    acc, res = None, None
    if progress:
        import tqdm
        loader = tqdm.tqdm(loader, desc='PCA covariance', unit='batch')
    for images, labels in loader:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f'expected square images [B, C, H, W], got {tuple(images.shape)}')
        if res is None:
            res = images.shape[-1]
            if not 1 <= rank <= res * res:
                raise ValueError(f'rank must be in [1, {res * res}] at resolution {res}, got {rank}')
            acc = _CovarianceAccumulator(num_groups, res * res, device)
        elif images.shape[-1] != res:
            raise ValueError(f'all images must be {res}x{res}, got {tuple(images.shape[-2:])}')
        gray = (images.to(device, torch.float64) / 127.5 - 1).mean(dim=1)   # [B, H, W] in [-1, 1]
        if groups is None:
            group = torch.zeros(gray.shape[0], dtype=torch.long, device=device)
        else:
            cls = _class_indices(labels, gray.shape[0]).to(device)
            if bool((cls >= groups.numel()).any()):
                raise ValueError(f'class index out of range of the group map ({groups.numel()} classes)')
            group = groups[cls]
        if xflip:
            gray = torch.cat([gray, gray.flip(-1)])
            group = torch.cat([group, group])
        acc.add(gray.reshape(gray.shape[0], -1), group)

    empty = (acc.count == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f'no images for group(s) {empty}')
    return top_eigenvectors(acc.covariance(), rank).cpu()


def save_pca_file(path: str, bases: torch.Tensor, groups: torch.Tensor | None, rank: int, resolution: int,
                  source: dict | None = None) -> None:
    """Write a bases file (read by `load_pca_file`) atomically: torch.save into a temporary file in the same folder,
    then rename it into place, so a crash or a concurrent reader never sees a truncated file. The bases are stored
    as float32. `source` (optional): what the bases were computed from (e.g. dataset path, image count), so a cached
    file can be checked against the current dataset before reuse."""
    data = {'bases': torch.as_tensor(bases).to(torch.float32), 'groups': groups, 'rank': int(rank),
            'resolution': int(resolution)}
    if source is not None:
        data['source'] = dict(source)
    dnnlib.util.atomic_write(path, lambda f: torch.save(data, f))


def load_pca_file(path: str) -> dict:
    """Load a file written by `python -m edm_aniso.pca`, checking its keys and shapes."""
    data = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(data, dict) or not {'bases', 'groups', 'rank', 'resolution'} <= set(data):
        raise ValueError(f'{path}: not a PCA bases file (expected keys bases, groups, rank, resolution)')
    bases, groups, rank, res = data['bases'], data['groups'], data['rank'], data['resolution']
    if bases.ndim != 3 or tuple(bases.shape[1:]) != (res * res, rank):
        raise ValueError(f'{path}: bases of shape {tuple(bases.shape)} do not match rank={rank}, resolution={res}')
    if groups is not None and (groups.ndim != 1 or int(groups.max()) >= bases.shape[0]):
        raise ValueError(f'{path}: group map does not match the {bases.shape[0]} bases')
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def _parse_groups(spec: str, label_dim: int) -> torch.Tensor:
    """--groups: a JSON file or inline JSON, either a list [label_dim] of group ids or {"class": group}."""
    text = open(spec, encoding='utf-8').read() if os.path.isfile(spec) else spec
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise click.ClickException(f'--groups: not a JSON file or JSON text ({err.msg})')
    if isinstance(obj, dict):
        try:
            pairs = {int(k): int(v) for k, v in obj.items()}
        except (TypeError, ValueError):
            raise click.ClickException('--groups: keys and values must be integers')
        missing = sorted(set(range(label_dim)) - set(pairs))
        if missing:
            raise click.ClickException(f'--groups: no group for class(es) {missing[:10]}')
        obj = [pairs[c] for c in range(label_dim)]
    if not isinstance(obj, list) or not all(isinstance(v, int) and v >= 0 for v in obj):
        raise click.ClickException('--groups: expected a list of non-negative integer group ids')
    if len(obj) != label_dim:
        raise click.ClickException(f'--groups: {len(obj)} entries for a dataset with {label_dim} classes')
    return torch.tensor(obj, dtype=torch.long)


@click.command()
@click.option('--data',      help='Dataset zip or folder', metavar='ZIP|DIR', type=str, required=True)
@click.option('--dest',      help='Output file (torch.save)', metavar='PT', type=str, required=True)
@click.option('--rank',      help='Basis vectors per group [default: res*res/4]', metavar='INT',
              type=click.IntRange(min=1), default=None)
@click.option('--per-class', help='One basis per class', is_flag=True)
@click.option('--groups',    help='Class -> group map (JSON list or {"class": group}, file or text)', metavar='JSON',
              type=str, default=None)
@click.option('--xflip',     help='Count x-flipped images too', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--batch',     help='Images per step', metavar='INT', type=click.IntRange(min=1), default=256,
              show_default=True)
@click.option('--device',    help='Device for the covariance [default: cuda if available, else cpu]', type=str,
              default=None)
def main(data: str, dest: str, rank: int | None, per_class: bool, groups: str | None, xflip: bool, batch: int,
         device: str | None) -> None:
    """Compute PCA bases of a dataset for --subspace=pca.

    \b
    python -m edm_aniso.pca --data=datasets/cifar10-32x32.zip --dest=pca-cifar10.pt --rank=256 --per-class
    """
    if per_class and groups is not None:
        raise click.ClickException('--per-class and --groups are mutually exclusive')
    if not os.path.exists(data):
        raise click.ClickException(f'--data: {data} does not exist')
    from torch_utils.misc import pick_device
    from training.dataset import ImageFolderDataset
    try:
        device = pick_device(device)
    except ValueError as err:
        raise click.ClickException(f'--device: {err}')
    labelled = per_class or groups is not None
    try:
        dataset = ImageFolderDataset(path=data, use_labels=labelled)
    except Exception as err:  # noqa: BLE001 - report any loading problem as one line
        raise click.ClickException(f'--data: cannot open dataset ({err})')
    if labelled and not dataset.has_labels:
        raise click.ClickException('--per-class/--groups need a dataset with labels')
    group_map = None
    if per_class:
        group_map = torch.arange(dataset.label_dim)
    elif groups is not None:
        group_map = _parse_groups(groups, dataset.label_dim)
    res = dataset.resolution
    rank = rank if rank is not None else max(res * res // 4, 1)
    if rank > res * res:
        raise click.ClickException(f'--rank must be at most {res * res} at resolution {res}')
    try:
        bases = compute_pca_bases(dataset, rank, groups=group_map, xflip=xflip, batch=batch, device=device)
    except ValueError as err:
        raise click.ClickException(str(err))
    save_pca_file(dest, bases, group_map, rank, res,
                  source=dict(dataset=os.path.abspath(data), num_images=len(dataset), resolution=res, rank=rank,
                              xflip=bool(xflip)))
    print(f'Saved {bases.shape[0]} basis(es) of rank {rank} at {res}x{res} to {dest}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
