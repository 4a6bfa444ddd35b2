"""Bits/dim of a dataset under a trained network: the probability-flow ODE and the variational bound.

Works for EDM pickles (VP/VE/iDDPM/EDM preconditioners) and AnisoPrecond pickles alike, on each network's own noise
path (edm_aniso.path); the formulas, the dequantisation and the bits/dim conversion are in edm_aniso.likelihood.

    python likelihood.py --network=NET.pkl --data=datasets/toy-16x16.zip --num=256 --method=both
    torchrun --standalone --nproc_per_node=2 likelihood.py -- --network=NET.pkl --data=DATA.zip --num=1000

Library first: :func:`compute_likelihood` does the work (and yields one record per batch); the click command drives
it. The first ``num`` images of the dataset (in its sorted order) are split into fixed batches of ``batch`` images,
dealt round-robin to the processes, so every image's value is the same whatever the number of processes. Each image
has its own random generator (seeded by ``seed`` and its index): dequantisation noise, Hutchinson probes and the
bound's draws depend only on the image, not on batching.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterator, Optional

import click
import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist

METHODS = ('ode', 'elbo', 'both')

# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of one image: its draws depend only on (seed, index)."""
    state = np.random.SeedSequence([int(seed) % (1 << 32), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def open_dataset(path: str, net: Any, num: Optional[int]) -> Any:
    """Open an EDM dataset (zip or folder) and check it against the network before any work: resolution, channels,
    8-bit pixels, labels for a conditional network, and --num."""
    from training.dataset import ImageFolderDataset
    try:
        data = ImageFolderDataset(path=path, use_labels=True)
    except (OSError, ValueError) as err:
        raise ValueError(f'--data: {err}') from err
    first = data._load_raw_image(0)
    if first.dtype != np.uint8:
        raise ValueError(f'--data: "{path}" holds {first.dtype} images; likelihood in bits/dim needs 8-bit images')
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    if tuple(data.image_shape) != shape:
        raise ValueError(f'--data: images are {"x".join(map(str, data.image_shape))} (CxHxW) but the network expects '
                         f'{"x".join(map(str, shape))}')
    if int(net.label_dim) > 0 and not data.has_labels:
        raise ValueError('--data: the network is class-conditional but the dataset has no labels (dataset.json)')
    if int(net.label_dim) > 0 and data.label_dim != int(net.label_dim):
        raise ValueError(f'--data: the dataset has {data.label_dim} classes, the network {int(net.label_dim)}')
    if num is not None and num > len(data):
        raise ValueError(f'--num={num} but the dataset has only {len(data)} images')
    return data


def _load_batch(data: Any, indices: list[int], label_dim: int, device: torch.device
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    images, labels = [], []
    for i in indices:
        image, label = data[i]                         # the dataset refuses non-8-bit and odd-sized images
        images.append(torch.from_numpy(np.ascontiguousarray(image)))
        labels.append(torch.as_tensor(label))
    x = torch.stack(images).to(device)
    y = torch.stack(labels).to(device=device, dtype=torch.float32) if label_dim > 0 else None
    return x, y


# ---------------------------------------------------------------------------------------------------------------------
# Library


def compute_likelihood(
    net:         Any,                               # the network (EDM or AnisoPrecond), on `device`
    data:        Any,                               # a training.dataset.Dataset of uint8 images (open_dataset)
    num:         Optional[int]   = None,            # first `num` images (None: all)
    method:      str             = 'both',          # 'ode' | 'elbo' | 'both'
    trace:       str             = 'hutchinson',    # divergence of the ODE: 'exact' | 'hutchinson'
    probes:      int             = 1,               # Hutchinson probes per image
    samples:     int             = 64,              # network evaluations per image for the bound (even)
    rtol:        float           = 1e-5,            # ODE solver tolerances
    atol:        float           = 1e-5,
    batch:       int             = 16,              # images per batch (fixed batches, dealt round-robin to ranks)
    seed:        int             = 0,               # per-image generators: seed and image index
    sigma_min:   Optional[float] = None,            # data end (None: 0.002, raised to net.sigma_min)
    sigma_max:   Optional[float] = None,            # prior end (None: 80, lowered to net.sigma_max)
    device:      Any             = 'cpu',
) -> Iterator[dict]:
    """Yield one record per batch of this rank: image indices and per-image bits/dim, nats and NFE per method."""
    from edm_aniso import likelihood as L
    if method not in METHODS:
        raise ValueError(f'unknown method {method!r}; choose one of {", ".join(METHODS)}')
    num = len(data) if num is None else int(num)
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = [list(range(s, min(s + batch, num))) for s in range(0, num, batch)]
    d = int(np.prod(data.image_shape))
    label_dim = int(net.label_dim)
    for indices in chunks[rank::world]:
        t0 = time.process_time()
        pixels, labels = _load_batch(data, indices, label_dim, device)
        gens = [image_generator(seed, i) for i in indices]
        shape = tuple(pixels.shape[1:])
        u = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in gens]).to(device)
        x = L.dequantize(pixels, u)
        record = dict(index=indices)
        if method in ('ode', 'both'):
            pr = torch.stack([L.rademacher((probes, *shape), generator=g) for g in gens], dim=1).to(device)
            res = L.ode_nll(net, x, labels, trace=trace, probes=pr if trace == 'hutchinson' else None, rtol=rtol,
                            atol=atol, sigma_min=sigma_min, sigma_max=sigma_max)
            record.update(ode_nats=res.nll.tolist(), ode_bpd=L.bits_per_dim(res.nll, d).tolist(),
                          ode_nfe=res.nfe.tolist())
        if method in ('elbo', 'both'):
            off = torch.stack([torch.rand([samples // 2], generator=g, dtype=torch.float64) for g in gens],
                              dim=1).to(device)
            eps = torch.stack([torch.randn((samples // 2, *shape), generator=g, dtype=torch.float64) for g in gens],
                              dim=1).to(device)
            res = L.elbo_nll(net, x, labels, samples=samples, offsets=off, noise=eps, sigma_min=sigma_min,
                             sigma_max=sigma_max)
            record.update(elbo_nats=res.nll.tolist(), elbo_bpd=L.bits_per_dim(res.nll, d).tolist(),
                          elbo_nfe=res.nfe.tolist(), elbo_se_bpd=(res.terms['diff_se'] / (d * math.log(2))).tolist())
        record['cpu_seconds'] = time.process_time() - t0
        yield record


def summarize(records: list[dict], methods: tuple[str, ...]) -> dict:
    """Mean bits/dim, its standard error over images, and mean NFE per method, from all ranks' records."""
    out: dict[str, Any] = dict(num_images=sum(len(r['index']) for r in records))
    order = np.argsort(np.concatenate([r['index'] for r in records]))
    for m in methods:
        bpd = np.concatenate([r[f'{m}_bpd'] for r in records])[order]
        nfe = np.concatenate([r[f'{m}_nfe'] for r in records])[order]
        se = float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float('nan')
        out[m] = dict(bits_per_dim=float(bpd.mean()), standard_error=se, nfe_per_image=float(nfe.mean()),
                      per_image_bpd=bpd.tolist())
        if m == 'elbo':
            out[m]['mean_mc_se_bpd'] = float(np.concatenate([r['elbo_se_bpd'] for r in records]).mean())
    out['cpu_seconds_per_image'] = sum(r['cpu_seconds'] for r in records) / max(out['num_images'], 1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _writable(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


@click.command()
@click.option('--network', 'network_pkl', help='Network pickle filename', metavar='PATH|URL', type=str, required=True)
@click.option('--data', 'data_path', help='Dataset of 8-bit images (EDM zip or folder)', metavar='ZIP|DIR', type=str,
              required=True)
@click.option('--num', help='Number of images (the first N)  [default: all]', metavar='INT',
              type=click.IntRange(min=1), default=None)
@click.option('--method', help='Probability-flow ODE, variational bound, or both', type=click.Choice(METHODS),
              default='both', show_default=True)
@click.option('--trace', help='Divergence of the ODE: exact (d products, tiny images) or Hutchinson probes',
              type=click.Choice(['exact', 'hutchinson']), default='hutchinson', show_default=True)
@click.option('--probes', help='Hutchinson probes per image (ODE)', metavar='INT', type=click.IntRange(min=1),
              default=1, show_default=True)
@click.option('--elbo-samples', 'samples', help='Network evaluations per image for the bound (even)', metavar='INT',
              type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--rtol', help='ODE relative tolerance', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=1e-5, show_default=True)
@click.option('--atol', help='ODE absolute tolerance', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=1e-5, show_default=True)
@click.option('--sigma_min', help='Data end of the path  [default: 0.002, raised to the network\'s]', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_max', help='Prior end of the path  [default: 80, lowered to the network\'s]', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--batch', help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=16,
              show_default=True)
@click.option('--seed', help='Seed of the per-image random draws', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--outfile', help='Write the results (per image and summary) as JSON', metavar='JSON', type=str,
              default=None)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
def main(network_pkl: str, data_path: str, num: Optional[int], method: str, trace: str, probes: int, samples: int,
         rtol: float, atol: float, sigma_min: Optional[float], sigma_max: Optional[float], batch: int, seed: int,
         outfile: Optional[str], device: Optional[str]) -> None:
    """Likelihood of a dataset in bits/dim under a trained network (EDM or anisotropic).

    \b
    Examples:
      python likelihood.py --network=NET.pkl --data=datasets/toy-16x16.zip --num=256
      torchrun --standalone --nproc_per_node=2 likelihood.py -- --network=NET.pkl --data=DATA.zip --num=512

    Under torchrun put -- after likelihood.py (torchrun reads --num as its own --numa-binding).
    """
    from generate import load_network
    if samples % 2:
        raise click.ClickException(f'--elbo-samples must be even (antithetic pairs), got {samples}')
    if outfile is not None and not _writable(outfile):
        raise click.ClickException(f'--outfile: cannot write to "{outfile}" (folder not writable)')
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise click.ClickException(f'--sigma_min must be below --sigma_max, got {sigma_min} and {sigma_max}')
    try:
        dev = dist.init(device)
        if dist.get_rank() != 0:
            dist.barrier()
        try:
            net = load_network(network_pkl, device=dev, verbose=(dist.get_rank() == 0))
        finally:
            if dist.get_rank() == 0:
                dist.barrier()
        net.eval().requires_grad_(False)
        data = open_dataset(data_path, net, num)
        methods = ('ode', 'elbo') if method == 'both' else (method,)
        total = len(data) if num is None else num
        dist.print0(f'Likelihood of {total} images of "{data_path}" ({", ".join(methods)}; '
                    f'{dist.get_world_size()} process(es))...')
        records = []
        chunks = (total + batch - 1) // batch
        mine = len(range(dist.get_rank(), chunks, dist.get_world_size()))
        bar = tqdm.tqdm(total=mine, unit='batch', disable=dist.get_rank() != 0)
        for rec in compute_likelihood(net, data, num=total, method=method, trace=trace, probes=probes,
                                      samples=samples, rtol=rtol, atol=atol, batch=batch, seed=seed,
                                      sigma_min=sigma_min, sigma_max=sigma_max, device=dev):
            records.append(rec)
            bar.update(1)
            if 'ode_bpd' in rec:
                bar.set_postfix(ode=f'{np.mean(rec["ode_bpd"]):.3f}')
        bar.close()
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    if dist.get_rank() == 0:
        summary = summarize(records, methods)
        for m in methods:
            s = summary[m]
            name = 'probability-flow ODE' if m == 'ode' else 'variational bound'
            dist.print0(f'{name}: {s["bits_per_dim"]:.4f} bits/dim +- {s["standard_error"]:.4f} (s.e. over '
                        f'{summary["num_images"]} images), {s["nfe_per_image"]:.1f} network evaluations per image')
        if outfile is not None:
            settings = dict(network=network_pkl, data=data_path, num=total, method=method, trace=trace, probes=probes,
                            elbo_samples=samples, rtol=rtol, atol=atol, sigma_min=sigma_min, sigma_max=sigma_max,
                            batch=batch, seed=seed, world_size=dist.get_world_size())
            text = json.dumps(dict(settings=settings, **summary), indent=2)
            dnnlib.util.atomic_write(outfile, lambda f: f.write(text.encode('utf-8')))
            dist.print0(f'Wrote "{outfile}".')
    dist.barrier()


if __name__ == '__main__':
    # Under torchrun write `likelihood.py -- --num=...`: torchrun 2.13 takes --num for its own --numa-binding. The
    # leading `--` is dropped here so that the command line parses as without torchrun.
    import sys
    main(args=sys.argv[2:] if sys.argv[1:2] == ['--'] else sys.argv[1:])
