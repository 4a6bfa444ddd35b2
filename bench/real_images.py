"""Real-image benchmark: photo patches, the tiny EDM model, stage 1 and stage 2 from it; pixel FD vs NFE and bits/dim.

    flock /tmp/cpu-heavy-b.lock python bench/real_images.py --workdir=/tmp/real-images [--phase=all|train|eval]

Data: 10,000 random 8x8 RGB crops of the photographs shipped with scikit-learn and scikit-image
(``dataset_tool.py --source=photo-patches:zoom=2 --resolution=8x8``: 16x16 crops averaged 2x2), unlabelled. At 16x16
the tiny DDPM++ (cbase 16, cres 1,2) has self-attention over 256 positions and evaluates ~13x slower on one CPU thread,
which does not fit the budget with 10k samples per row.

Train (one process, one thread, ``train.py --device=cpu``): EDM (--duration 0.1 Mimg), then --precond=aniso stage 1
(0.01 Mimg, --transfer from EDM) and stage 2 (DCT split, --schedule-lr 1e-2, 0.02 Mimg, --transfer from stage 1), as
the README quick start does.

Eval: ``fid.py ref --detector=pixels`` of the 10k training patches; 10k samples (seeds 0-9999, EDM's per-seed
generators, quantised to 8 bits as generate.py writes them) per row, for EDM's Heun sampler on the EDM model,
``aniso_heun`` on the stage-2 model and ``dpmpp_2m`` / ``ipndm`` (edm_aniso.multistep) on both, at NFE 5, 9, 15, 35;
the pixel FD (Frechet distance of the pixels in EDM's [-1, 1] scale: not FID) against the data. Then bits/dim
(likelihood.py, ODE and bound) of the first --likelihood (128) patches under the EDM and the stage-2 model. Rows
already in results.json are skipped, so eval processes with different --rows/--nfe can share a workdir.

Writes ``--workdir``/results.json, and with --publish the plots into bench/: real_images_fd.png (pixel FD vs NFE),
real_images_ratio.png (learned g/h, from python -m edm_aniso.plot), real_images_samples.png (data / EDM / stage 2).
Timings are process CPU seconds (this process plus its children) and wall seconds.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RES = 8
NUM_PATCHES = 10000
NUM_SAMPLES = 10000
NFES = (5, 9, 15, 35)
NET = ['--arch=ddpmpp', '--cbase=16', '--cres=1,2', '--batch=64', '--device=cpu', '--seed=1']
TRAIN = {
    'edm': ['--duration=0.1', '--lr=2e-3', '--lr-rampup=0', '--augment=0', '--tick=10', '--snap=5', '--dump=100'],
    'stage1': ['--duration=0.01', '--precond=aniso', '--stage=1', '--tick=5', '--snap=2', '--dump=100'],
    'stage2': ['--duration=0.02', '--precond=aniso', '--stage=2', '--subspace=dct', '--schedule-lr=1e-2',
               '--tick=5', '--snap=4', '--dump=100'],
    # The same stage 2 with a 10x smaller schedule learning rate (a milder departure from isotropy).
    'stage2b': ['--duration=0.02', '--precond=aniso', '--stage=2', '--subspace=dct', '--schedule-lr=1e-3',
                '--tick=5', '--snap=4', '--dump=100'],
}
ROWS = [('edm', 'edm'), ('edm', 'dpmpp_2m'), ('edm', 'ipndm'),
        ('stage2', 'aniso_heun'), ('stage2', 'dpmpp_2m'), ('stage2', 'ipndm'), ('stage2b', 'aniso_heun')]


def cpu_seconds() -> float:
    """Process CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
    return e


def run(cmd: list[str], log: str) -> dict:
    """Run a command (output to `log`), return its wall and CPU seconds."""
    print('$', ' '.join(cmd), flush=True)
    c0, w0 = cpu_seconds(), time.time()
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise click.ClickException(f'{cmd[1]} failed (exit {proc.returncode}); see {log}')
    t = dict(cmd=' '.join(cmd), wall_s=time.time() - w0, cpu_s=cpu_seconds() - c0)
    print(f'  {t["cpu_s"]:.0f} s CPU, {t["wall_s"]:.0f} s wall', flush=True)
    return t


def last_snapshot(workdir: str, desc: str) -> str:
    found = sorted(glob.glob(os.path.join(workdir, 'runs', f'*-{desc}', 'network-snapshot-*.pkl')))
    if not found:
        raise click.ClickException(f'no snapshot of the {desc} run in {workdir}/runs')
    return found[-1]


def load(workdir: str) -> dict:
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
        return dict(timing={}, fd=[], bpd={})
    with open(path) as f:
        return json.load(f)


def save(workdir: str, results: dict) -> None:
    """Merge `results` into results.json (several eval processes may share a workdir), atomically."""
    import fcntl
    with open(os.path.join(workdir, 'results.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = load(workdir)
        merged['timing'].update(results['timing'])
        merged['bpd'].update(results['bpd'])
        keys = {(r['model'], r['sampler'], r['nfe']) for r in merged['fd']}
        merged['fd'] += [r for r in results['fd'] if (r['model'], r['sampler'], r['nfe']) not in keys]
        path = os.path.join(workdir, 'results.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(merged, f, indent=1)
        os.replace(path + '.tmp', path)
    results.update(merged)


def train_phase(workdir: str, results: dict) -> None:
    py = sys.executable
    data = os.path.join(workdir, f'patches-{RES}x{RES}.zip')
    if not os.path.exists(data):
        results['timing']['data'] = run([py, 'dataset_tool.py', '--source=photo-patches:zoom=2',
                                         f'--resolution={RES}x{RES}', f'--max-images={NUM_PATCHES}',
                                         f'--dest={data}'], os.path.join(workdir, 'data.log'))
    transfer = {'stage1': 'edm', 'stage2': 'stage1', 'stage2b': 'stage1'}
    for desc in TRAIN:
        if glob.glob(os.path.join(workdir, 'runs', f'*-{desc}', 'network-snapshot-*.pkl')) and \
                desc in results['timing']:
            continue
        extra = [f'--transfer={last_snapshot(workdir, transfer[desc])}'] if desc in transfer else []
        cmd = [py, 'train.py', f'--outdir={os.path.join(workdir, "runs")}', f'--data={data}', *NET, *TRAIN[desc],
               *extra, f'--desc={desc}']
        results['timing'][desc] = run(cmd, os.path.join(workdir, f'train-{desc}.log'))
        save(workdir, results)


def load_net(pkl: str) -> torch.nn.Module:
    from generate import load_network
    return load_network(pkl, device='cpu', verbose=False).eval()


def sample_uint8(net, sampler: str, nfe: int, num: int, batch: int = 1000) -> torch.Tensor:
    """`num` samples (seeds 0..num-1) as uint8 NCHW, exactly as generate.py would write them."""
    from generate import StackedRandomGenerator
    from training import registry
    registry.load_plugins()
    entry = registry.SAMPLERS[sampler]
    steps = (nfe + 1) // 2 if sampler in ('edm', 'aniso_heun') else nfe   # Heun: NFE = 2N - 1; multistep: NFE = N
    out = []
    for start in range(0, num, batch):
        seeds = list(range(start, min(num, start + batch)))
        rnd = StackedRandomGenerator(torch.device('cpu'), seeds)
        latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
        with torch.no_grad():
            x = entry.sample(net, latents, None, randn_like=rnd.randn_like, num_steps=steps)
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8))
    return torch.cat(out)


def eval_phase(workdir: str, results: dict, num_samples: int, nfes: tuple, rows: list, lik_num: int) -> None:
    import fid
    py = sys.executable
    data = os.path.join(workdir, f'patches-{RES}x{RES}.zip')
    ref = os.path.join(workdir, 'patches-pixels.npz')
    if not os.path.exists(ref):
        results['timing']['ref'] = run([py, 'fid.py', 'ref', f'--data={data}', f'--dest={ref}', '--detector=pixels',
                                        '--device=cpu'], os.path.join(workdir, 'ref.log'))
    mu_ref, sigma_ref = fid.load_reference_stats(ref, verbose=False)
    nets = {m: load_net(last_snapshot(workdir, m)) for m in sorted({model for model, _ in rows})}
    for model, sampler in rows:
        for nfe in nfes:
            if any((r['model'], r['sampler'], r['nfe']) == (model, sampler, nfe) for r in load(workdir)['fd']):
                continue
            c0, w0 = time.process_time(), time.time()
            images = sample_uint8(nets[model], sampler, nfe, num_samples)
            mu, sigma = fid.pixel_stats(images)
            fd = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
            row = dict(model=model, sampler=sampler, nfe=nfe, samples=num_samples, pixel_fd=fd, cpu_s=time.process_time() - c0,
                       wall_s=time.time() - w0)
            print(f'  {model:7s} {sampler:10s} NFE {nfe:2d}: pixel FD {fd:.5f}  ({row["cpu_s"]:.0f} s CPU)', flush=True)
            results['fd'].append(row)
            save(workdir, results)
            if nfe == max(nfes):
                torch.save(images[:64].clone(), os.path.join(workdir, f'samples-{model}-{sampler}.pt'))
    for model in ('edm', 'stage2') if lik_num > 0 else ():
        if model in load(workdir)['bpd']:
            continue
        out = os.path.join(workdir, f'likelihood-{model}.json')
        t = run([py, 'likelihood.py', f'--network={last_snapshot(workdir, model)}', f'--data={data}', f'--num={lik_num}',
                 '--method=both', '--batch=64', f'--outfile={out}', '--device=cpu'],
                os.path.join(workdir, f'likelihood-{model}.log'))
        with open(out) as f:
            summary = json.load(f)
        results['bpd'][model] = dict(num_images=summary['num_images'], cpu_seconds_per_image=summary.get(
            'cpu_seconds_per_image'), **{k: {q: v for q, v in summary[k].items() if q != 'per_image_bpd'}
                                         for k in ('ode', 'elbo') if k in summary}, **t)
        save(workdir, results)


def band_errors(net, num: int = 256, steps: int = 18) -> tuple[np.ndarray, np.ndarray, list]:
    """aniso_heun (EDM's Heun on an EDM network) from seeds 0..num-1: per step, the relative distance of the denoised
    estimate D_i to the final sample, ||B(D_i - x_N)|| / ||B x_N|| averaged over samples, for B = the low 4x4 DCT block
    (per channel) and for the rest. Also returns the first 4 samples' denoised estimates (strips)."""
    import scipy.fft
    from generate import StackedRandomGenerator
    from training import registry
    registry.load_plugins()
    rnd = StackedRandomGenerator(torch.device('cpu'), list(range(num)))
    latents = rnd.randn([num, net.img_channels, RES, RES])
    frames = []
    with torch.no_grad():
        final = registry.SAMPLERS['aniso_heun'].sample(net, latents, None, randn_like=rnd.randn_like, num_steps=steps,
                                                      callback=lambda d: frames.append(d['denoised'].clone()))
    low = np.zeros([RES, RES], bool)
    low[:RES // 2, :RES // 2] = True

    def split(x):
        c = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm='ortho')
        return c[..., low].reshape(len(c), -1), c[..., ~low].reshape(len(c), -1)

    fl, fh = split(final)
    errs = []
    for d in frames:
        dl, dh = split(d)
        errs.append([np.mean(np.linalg.norm(dl - fl, axis=1) / np.linalg.norm(fl, axis=1)),
                     np.mean(np.linalg.norm(dh - fh, axis=1) / np.linalg.norm(fh, axis=1))])
    strips = [torch.stack([f[k] for f in frames] + [final[k]]) for k in range(4)]
    return np.array(errs)[:, 0], np.array(errs)[:, 1], strips


def markdown(results: dict) -> str:
    """The pixel-FD table (rows: sampler and model, columns: NFE) and the bits/dim table, as Markdown."""
    nfes = sorted({r['nfe'] for r in results['fd']})
    lines = ['| sampler (model) | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' | CPU s per 10k samples at NFE 35 |',
             '| --- |' + ' ---: |' * (len(nfes) + 1)]
    for model, sampler in ROWS:
        got = {r['nfe']: r for r in results['fd'] if (r['model'], r['sampler']) == (model, sampler)}
        if not got:
            continue
        cells = [f'{got[n]["pixel_fd"]:.3f}' if n in got else '' for n in nfes]
        cost = f'{got[35]["cpu_s"]:.0f}' if 35 in got else ''
        lines.append(f'| {sampler} ({model}) | ' + ' | '.join(cells) + f' | {cost} |')
    if results['bpd']:
        lines += ['', '| model | ODE bits/dim | bound bits/dim | NFE per image (ODE) | images |',
                  '| --- | ---: | ---: | ---: | ---: |']
        for model, b in results['bpd'].items():
            ode, elbo = b.get('ode', {}), b.get('elbo', {})
            lines.append(f'| {model} | {ode.get("bits_per_dim", float("nan")):.3f} ± {ode.get("standard_error", 0):.3f} '
                         f'| {elbo.get("bits_per_dim", float("nan")):.3f} ± {elbo.get("standard_error", 0):.3f} '
                         f'| {ode.get("nfe_per_image", 0):.0f} | {b.get("num_images", "")} |')
    return '\n'.join(lines)


def publish(workdir: str, results: dict) -> None:
    """Plots into bench/: pixel FD vs NFE, learned g/h, a sample grid."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import PIL.Image

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, sampler in ROWS:
        rows = sorted((r['nfe'], r['pixel_fd']) for r in results['fd'] if (r['model'], r['sampler']) == (model, sampler))
        if rows:
            ax.semilogy(*zip(*rows), 'o-' if model == 'stage2' else 's--', label=f'{sampler} ({model} model)')
    ax.set_xlabel('NFE')
    ax.set_ylabel('pixel FD (not FID)')
    ax.set_title(f'photo patches {RES}x{RES} RGB, {NUM_SAMPLES} samples per point')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, 'bench', 'real_images_fd.png'), dpi=110)
    plt.close(fig)

    plots = os.path.join(workdir, 'plots')
    subprocess.run([sys.executable, '-m', 'edm_aniso.plot', f'--network={last_snapshot(workdir, "stage2")}',
                    f'--out={plots}'], cwd=ROOT, env=env(), check=True)
    shutil.copyfile(os.path.join(plots, 'ratio.png'), os.path.join(ROOT, 'bench', 'real_images_ratio.png'))

    from training.dataset import ImageFolderDataset
    data = ImageFolderDataset(os.path.join(workdir, f'patches-{RES}x{RES}.zip'))
    panels = [torch.from_numpy(np.stack([data[i][0] for i in range(64)]))]
    for model, sampler in (('edm', 'edm'), ('stage2', 'aniso_heun')):
        panels.append(torch.load(os.path.join(workdir, f'samples-{model}-{sampler}.pt')))
    tiles = []
    for p in panels:   # 8x8 grid of images, 4x nearest-neighbour
        g = p.reshape(8, 8, *p.shape[1:]).permute(0, 3, 1, 4, 2).reshape(8 * RES, 8 * RES, p.shape[1])
        tiles.append(g.repeat_interleave(4, 0).repeat_interleave(4, 1).numpy())
    gap = np.full([tiles[0].shape[0], 8, 3], 255, np.uint8)
    grid = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
    PIL.Image.fromarray(grid).save(os.path.join(ROOT, 'bench', 'real_images_samples.png'))

    # Low frequencies first: band errors of the denoised estimate per step, and trajectory strips (seeds 0-3).
    fig, ax = plt.subplots(figsize=(6, 4))
    rows_img, bands = [], {}
    for model, style in (('edm', '--'), ('stage2', '-')):
        lo, hi, strips = band_errors(load_net(last_snapshot(workdir, model)))
        bands[model] = dict(low=lo.tolist(), high=hi.tolist())
        steps = np.arange(1, len(lo) + 1)
        ax.semilogy(steps, lo, style, color='C0', label=f'low 4x4 DCT block ({model})')
        ax.semilogy(steps, hi, style, color='C3', label=f'rest ({model})')
        for strip in strips:
            pix = (strip * 127.5 + 128).clip(0, 255).to(torch.uint8)           # [S, C, H, W]
            row = torch.cat(list(pix), dim=-1).permute(1, 2, 0).numpy()
            rows_img.append(row.repeat(4, 0).repeat(4, 1))
        rows_img.append(np.full([8, rows_img[-1].shape[1], 3], 255, np.uint8))
    ax.set_xlabel('sampler step i (18 steps, aniso_heun)')
    ax.set_ylabel('||B(D_i - x_N)|| / ||B x_N||')
    ax.set_title('denoised estimate vs final sample, per DCT band')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, 'bench', 'real_images_bands.png'), dpi=110)
    plt.close(fig)
    PIL.Image.fromarray(np.concatenate(rows_img[:-1], axis=0)).save(
        os.path.join(ROOT, 'bench', 'real_images_trajectory.png'))
    results['bands'] = bands
    with open(os.path.join(workdir, 'bands.json'), 'w') as f:
        json.dump(bands, f)
    with open(os.path.join(workdir, 'table.md'), 'w') as f:
        f.write(markdown(results) + '\n')
    print(markdown(results))


@click.command()
@click.option('--workdir', default='/tmp/real-images', show_default=True, help='Runs, data and results go here')
@click.option('--phase', type=click.Choice(['all', 'train', 'eval', 'publish']), default='all', show_default=True)
@click.option('--samples', 'num_samples', type=click.IntRange(min=2), default=NUM_SAMPLES, show_default=True,
              help='Samples per pixel-FD row')
@click.option('--nfe', 'nfes', type=str, default=','.join(map(str, NFES)), show_default=True, help='NFE values')
@click.option('--rows', 'row_ids', type=str, default='all', show_default=True,
              help='Comma-separated MODEL/SAMPLER rows, e.g. edm/edm,stage2/aniso_heun')
@click.option('--likelihood', 'lik_num', type=click.IntRange(min=0), default=128, show_default=True,
              help='Images for bits/dim (0: skip)')
def main(workdir: str, phase: str, num_samples: int, nfes: str, row_ids: str, lik_num: int) -> None:
    """Train on photo patches and measure pixel FD vs NFE and bits/dim (see the module docstring)."""
    torch.set_num_threads(1)
    os.makedirs(workdir, exist_ok=True)
    results = load(workdir)
    c0, w0 = cpu_seconds(), time.time()
    if phase in ('all', 'train'):
        train_phase(workdir, results)
    if phase in ('all', 'eval'):
        rows = ROWS if row_ids == 'all' else [tuple(r.split('/')) for r in row_ids.split(',')]
        eval_phase(workdir, results, num_samples, tuple(int(v) for v in nfes.split(',')), rows, lik_num)
    results['timing'][f'phase-{phase}-{int(w0)}'] = dict(cpu_s=cpu_seconds() - c0, wall_s=time.time() - w0)
    save(workdir, results)
    if phase in ('all', 'publish'):
        publish(workdir, results)
    print(json.dumps(results['timing'], indent=1))


if __name__ == '__main__':
    main()
