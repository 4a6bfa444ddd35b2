"""The discretisation-aware objective on a real trained network: the README's toy quick start.

    python bench/disc_real.py --workdir=/tmp/disc_real [--samples=256] [--kimg=4]

One process, CPU: 256 coloured blobs at 16x16 in 4 classes (tools/make_toy_images.py); EDM (6 kimg, as
bench/likelihood.py), then from the same EDM model four schedule runs of ``--kimg`` each: stage 1 and stage 2 with
``--objective=energy`` and with ``--objective=energy+disc --disc-steps=3-18`` (stage 2 from its own stage 1; the same
schedule LR 2e-2 for all four, phi LR 1e-5). Sampled at NFE 5..35 (N in 3, 4, 5, 6, 8, 10, 13, 18): EDM Heun on the
EDM model, aniso_heun on ``--grid=schedule`` for the four others, the same latents and labels for all. Metrics:
RMS distance per pixel of the N-step samples to a fine solve of the same network on its own path (aniso_heun
Karras grid, N = 128; EDM Heun 128 for the EDM model), and FD between Gaussians fitted to the samples and to the
training images (pixel space, 768 dimensions).
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # toy_runs
sys.path.insert(0, ROOT)                                          # first: likelihood.py is the CLI's

from toy_runs import TOY, newest_snapshot, run, toy_dataset  # noqa: E402
from edm_aniso import gaussian as G       # noqa: E402
from edm_aniso.sampler import aniso_heun  # noqa: E402

STEPS = [3, 4, 5, 6, 8, 10, 13, 18]
FINE = 128


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def has_snapshot(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.startswith('network-snapshot-') for f in os.listdir(folder))


def train_all(workdir: str, kimg: float, edm_kimg: float) -> tuple[str, dict[str, str]]:
    os.makedirs(workdir, exist_ok=True)
    data = toy_dataset(workdir)
    train = os.path.join(ROOT, 'train.py')
    edm = os.path.join(workdir, 'edm')
    if not has_snapshot(edm):
        t0 = time.time()
        run([train, f'--outdir={edm}', '--nosubdir', f'--data={data}', *TOY, f'--duration={edm_kimg / 1000}',
             '--lr-rampup=0',
             '--lr=2e-3', '--augment=0', '--dump=2'], workdir)
        log(f'EDM trained ({time.time() - t0:.0f} s wall)')
    common = [f'--data={data}', *TOY, f'--duration={kimg / 1000}', '--precond=aniso', '--schedule-lr=2e-2',
              '--nosubdir']
    out = {}
    for obj, extra in (('energy', ['--objective=energy']), ('disc', ['--objective=energy+disc', '--disc-steps=3-18'])):
        for stage in (1, 2):
            folder = os.path.join(workdir, f'{obj}-s{stage}')
            src = newest_snapshot(edm) if stage == 1 else newest_snapshot(os.path.join(workdir, f'{obj}-s1'))
            if not has_snapshot(folder):
                t0 = time.time()
                run([train, f'--outdir={folder}', *common, f'--stage={stage}', f'--transfer={src}', *extra]
                    + (['--subspace=dct'] if stage == 2 else []), workdir)
                log(f'{obj} stage {stage} trained ({time.time() - t0:.0f} s wall)')
            out[f'{obj} s{stage}'] = newest_snapshot(folder)
    return data, {'EDM': newest_snapshot(edm), **out}


def load(pkl: str) -> torch.nn.Module:
    with open(pkl, 'rb') as f:
        return pickle.load(f)['ema'].to(torch.float32).eval()


def data_images(path: str) -> torch.Tensor:
    from training.dataset import ImageFolderDataset
    ds = ImageFolderDataset(path=path, use_labels=True)
    return torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))]).to(torch.float64) / 127.5 - 1


@click.command()
@click.option('--workdir', help='Where the models are trained (reused if present)', type=str, required=True)
@click.option('--samples', help='Samples per NFE', type=click.IntRange(min=16), default=256, show_default=True)
@click.option('--kimg', help='kimg per schedule run', type=click.FloatRange(min=0.032), default=4.0,
              show_default=True)
@click.option('--edm-kimg', help='kimg of the EDM model', type=click.FloatRange(min=0.032), default=6.0,
              show_default=True)
def main(workdir: str, samples: int, kimg: float, edm_kimg: float) -> None:
    """Stage 1 and 2 with the energy and the energy+disc objectives from one EDM model, against EDM Heun."""
    torch.set_num_threads(1)
    t0 = time.process_time()
    data, pkls = train_all(workdir, kimg, edm_kimg)
    import generate
    ref_images = data_images(data)
    gen = torch.Generator().manual_seed(123)
    z = torch.randn([samples, 3, 16, 16], generator=gen)
    labels = torch.eye(4)[torch.randint(0, 4, [samples], generator=gen)]
    dist_rows, fd_rows = {}, {}
    with torch.no_grad():
        for name, pkl in pkls.items():
            net = load(pkl)
            if name == 'EDM':
                sample = lambda n: generate.edm_sampler(net, z, labels, num_steps=n).to(torch.float64)  # noqa: E731
                fine = sample(FINE)
            else:
                sample = lambda n: aniso_heun(net, z, labels, num_steps=n, grid='schedule')  # noqa: E731
                fine = aniso_heun(net, z, labels, num_steps=FINE)
            dist_rows[name], fd_rows[name] = [], []
            for n in STEPS:
                x = sample(n)
                dist_rows[name].append(float((x - fine).square().mean().sqrt()))
                fd_rows[name].append(G.frechet_samples(x.clamp(-1, 1), ref_images))
            fd_rows[name].append(G.frechet_samples(fine.clamp(-1, 1), ref_images))
            log(f'{name}: sampled ({time.process_time() - t0:.0f} CPU s)')
    head = '| model, sampler | ' + ' | '.join(f'NFE {2 * n - 1}' for n in STEPS)
    print(f'**RMS distance to a {2 * FINE - 1}-NFE solve of the same network**\n')
    print(head + ' |\n| --- |' + ' ---: |' * len(STEPS))
    for name, vals in dist_rows.items():
        sampler = 'EDM Heun' if name == 'EDM' else 'aniso_heun, schedule grid'
        print(f'| {name}, {sampler} | ' + ' | '.join(f'{v:.4f}' for v in vals) + ' |')
    print(f'\n**FD (pixels) to the {len(ref_images)} training images**\n')
    print(head + f' | fine ({2 * FINE - 1}) |\n| --- |' + ' ---: |' * (len(STEPS) + 1))
    for name, vals in fd_rows.items():
        sampler = 'EDM Heun' if name == 'EDM' else 'aniso_heun, schedule grid'
        print(f'| {name}, {sampler} | ' + ' | '.join(f'{v:.3g}' for v in vals) + ' |')
    print(f'\n_{time.process_time() - t0:.0f} CPU s in this process (training runs in subprocesses)_')


if __name__ == '__main__':
    main()
