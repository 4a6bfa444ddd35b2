"""Inverse problems with a trained network: inpainting, colourisation and super-resolution (edm_aniso.inverse).

    python inverse.py --network=NET.pkl --task=inpaint --mask=mask.png --images=datasets/toy-16x16.zip --outdir=out
    python inverse.py --network=NET.pkl --task=superres --scale=2 --images=DIR --outdir=out --seeds=0-3
    python inverse.py --network=NET.pkl --task=colorize --images=DIR --outdir=out --corrector-steps=1

Works for EDM pickles and AnisoPrecond pickles alike. The inputs are clean images at the network's resolution; the
task's observation of each (the known pixels, the low DCT block, the luminance) is what the sampler conditions on.
For every input image n (in the dataset's sorted order) and seed s the output folder gets, as EDM-style PNGs:

    <n:06d>-<s:06d>.png          the result
    <n:06d>-<s:06d>-strip.png    input | observation | result, side by side
    <n:06d>-observation.png      the observation (unknown pixels grey, the low-pass image, the luminance)

Library first: :func:`solve_images` does the work (and yields one record per batch); the click command checks the
inputs (one error line, before anything is written) and drives it. An image depends only on its input, its seed and
the options (one random generator per seed, as in EDM's generate.py), not on the batch size.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, Iterator, Optional, Sequence

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib.util import parse_int_list
from torch_utils import misc

# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def load_mask(path: str, channels: int, resolution: int) -> torch.Tensor:
    """A binary mask PNG as [1 | C, H, W] bool (white = known, black = unknown): greyscale, or colour with equal
    channels (one mask for all), or one mask per channel for a network with that many channels; alpha is ignored."""
    try:
        with PIL.Image.open(path) as img:
            arr = np.array(img)
    except (OSError, ValueError) as err:
        raise ValueError(f'--mask: cannot read "{path}" as an image ({err})') from err
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] in (2, 4):                      # greyscale or RGB with alpha: the alpha channel is not the mask
        arr = arr[:, :, :-1]
    if arr.shape[0] != resolution or arr.shape[1] != resolution:
        raise ValueError(f'--mask is {arr.shape[1]}x{arr.shape[0]} but the network makes {resolution}x{resolution} '
                         f'images')
    if arr.shape[2] > 1 and bool((arr == arr[:, :, :1]).all()):
        arr = arr[:, :, :1]
    if arr.shape[2] not in (1, channels):
        raise ValueError(f'--mask has {arr.shape[2]} different channels; give a greyscale mask or one with '
                         f'{channels} channels')
    top = 1 if arr.max() <= 1 else 255
    if not bool(((arr == 0) | (arr == top)).all()):
        raise ValueError(f'--mask must be binary (black = unknown, white = known); "{path}" has other values')
    return torch.from_numpy(arr.transpose(2, 0, 1) == top)


def open_images(path: str, net: Any, num: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``num`` images (all: None) of an EDM dataset (folder or zip) as uint8 [N, C, H, W], and their
    one-hot labels where the dataset has labels (dataset.json); every image is checked against the network."""
    from training.dataset import ImageFolderDataset
    try:
        data = ImageFolderDataset(path=path, use_labels=True)
    except (OSError, ValueError) as err:
        raise ValueError(f'--images: {err}') from err
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    count = len(data) if num is None else int(num)
    if count > len(data):
        raise ValueError(f'--num={count} but "{path}" has only {len(data)} images')
    images, labels = [], []
    for i in range(count):
        try:
            raw = data._load_raw_image(i)
        except (OSError, ValueError) as err:
            raise ValueError(f'--images: {err}') from err
        if raw.dtype != np.uint8:
            raise ValueError(f'--images: {data._image_fnames[i]} holds {raw.dtype} pixels; need 8-bit images')
        if tuple(raw.shape) != shape:
            raise ValueError(f'--images: {data._image_fnames[i]} is {"x".join(map(str, raw.shape))} (CxHxW) but the '
                             f'network makes {"x".join(map(str, shape))} images')
        images.append(torch.from_numpy(np.ascontiguousarray(raw)))
    lab = None
    if data.has_labels and int(net.label_dim) > 0:
        if data.label_dim != int(net.label_dim):
            raise ValueError(f'--images: the dataset has {data.label_dim} classes, the network {int(net.label_dim)}')
        lab = torch.from_numpy(np.stack([data.get_label(i) for i in range(count)])).to(torch.float32)
    return torch.stack(images), lab


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC as EDM's generate.py (x 127.5 + 128, clipped, truncated)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str) -> None:
    """Write one HWC uint8 image atomically (greyscale for one channel, RGB for three)."""
    pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buf = io.BytesIO()
    pil.save(buf, format='png')
    dnnlib.util.atomic_write(path, lambda f: f.write(buf.getvalue()))


def strip(*images: np.ndarray, gap: int = 1) -> np.ndarray:
    """HWC images side by side with ``gap`` white columns between them."""
    h, _, c = images[0].shape
    sep = np.full([h, gap, c], 255, dtype=np.uint8)
    parts = [images[0]]
    for img in images[1:]:
        parts += [sep, img]
    return np.concatenate(parts, axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# Library


def solve_images(
    net:             Any,                            # the network (EDM or AnisoPrecond) on `device`
    observation:     Any,                            # edm_aniso.inverse.Observation (make_observation)
    images:          torch.Tensor,                   # uint8 [N, C, H, W] inputs (open_images)
    outdir:          str,                            # where the PNGs go
    labels:          Optional[torch.Tensor] = None,  # [N, label_dim] one-hot labels of the inputs, or None
    seeds:           Sequence[int] = (0,),           # one result per input and seed
    class_idx:       Optional[int] = None,           # conditional nets: this class (None: the input's label if known,
                                                     # else a random class per seed as generate.py)
    max_batch_size:  int = 64,                       # results per sampler call
    device:          Any = 'cpu',
    **solver_kwargs: Any,                            # edm_aniso.inverse.solve_inverse options (num_steps, ...)
) -> Iterator[dict]:
    """Solve the inverse problem for every (input, seed) pair and write the PNGs; yields one record per batch with
    the written paths, the CPU seconds and the network evaluations per result."""
    from edm_aniso.inverse import solve_inverse
    from generate import StackedRandomGenerator
    label_dim = int(net.label_dim)
    x_true = images.to(device=device, dtype=torch.float64) / 127.5 - 1
    pairs = [(n, int(s)) for n in range(images.shape[0]) for s in seeds]
    shown = to_uint8(observation.project(x_true))
    inputs = images.permute(0, 2, 3, 1).cpu().numpy()
    for n in range(images.shape[0]):
        save_png(shown[n], os.path.join(outdir, f'{n:06d}-observation.png'))
    for start in range(0, len(pairs), max_batch_size):
        t0 = time.process_time()
        batch = pairs[start:start + max_batch_size]
        index = torch.tensor([n for n, _ in batch], device=device)
        rnd = StackedRandomGenerator(device, [s for _, s in batch])
        latents = rnd.randn([len(batch), *x_true.shape[1:]], device=device)
        y = None
        if label_dim > 0:
            if class_idx is not None:
                y = torch.zeros(len(batch), label_dim, device=device)
                y[:, class_idx] = 1
            elif labels is not None:
                y = labels.to(device)[index]
            else:
                y = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(batch)], device=device)]
        calls: list[int] = []
        with torch.no_grad():
            out = solve_inverse(net, observation, observation.project(x_true[index]), latents, y,
                                randn_like=rnd.randn_like, callback=lambda r: calls.append(r['nfe']),
                                **solver_kwargs)
        written = []
        for (n, s), result in zip(batch, to_uint8(out)):
            path = os.path.join(outdir, f'{n:06d}-{s:06d}.png')
            save_png(result, path)
            save_png(strip(inputs[n], shown[n], result), os.path.join(outdir, f'{n:06d}-{s:06d}-strip.png'))
            written.append(path)
        yield dict(paths=written, cpu_seconds=time.process_time() - t0, nfe=calls[-1] if calls else 0)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _writable(folder: str) -> bool:
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


@click.command()
@click.option('--network', 'network_pkl', help='Network pickle filename', metavar='PATH|URL', type=str, required=True)
@click.option('--task', help='What is known: pixels of a mask, the luminance, or the low DCT block',
              type=click.Choice(['inpaint', 'colorize', 'superres']), required=True)
@click.option('--images', 'images_path', help='Input images (EDM dataset folder or zip) at the network resolution',
              metavar='DIR|ZIP', type=str, required=True)
@click.option('--outdir', help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--mask', 'mask_path', help='Inpaint: binary PNG at the network resolution, white = known',
              metavar='PNG', type=str, default=None)
@click.option('--scale', help='Superres: known DCT block res/scale  [default: 2]', metavar='INT',
              type=click.IntRange(min=1), default=None)
@click.option('--num', help='Use the first N input images  [default: all]', metavar='INT', type=click.IntRange(min=1),
              default=None)
@click.option('--seeds', help='Random seeds: one result per input and seed (e.g. 1,2,5-10)', metavar='LIST',
              type=parse_int_list, default='0', show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: the input\'s label, else random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--steps', 'num_steps', help='Number of noise levels', metavar='INT', type=click.IntRange(min=1),
              default=18, show_default=True)
@click.option('--predictor', help='Step between levels: reverse SDE (NFE N) or Heun (NFE 2N-1)',
              type=click.Choice(['sde', 'heun']), default='heun', show_default=True)
@click.option('--corrector-steps', 'corrector_steps', help='Langevin corrector steps at each level',
              metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--snr', help='Corrector signal-to-noise ratio  [default: 0.16 with --corrector-steps]',
              metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_min', help='Lowest noise level  [default: 0.002]', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_max', help='Highest noise level  [default: 80]', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--rho', help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=7, show_default=True)
@click.option('--grid', help='Levels: karras = EDM\'s sigma grid, schedule = uniform time of a learned schedule',
              type=click.Choice(['karras', 'schedule']), default='karras', show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
def main(network_pkl: str, task: str, images_path: str, outdir: str, mask_path: Optional[str], scale: Optional[int],
         num: Optional[int], seeds: list[int], class_idx: Optional[int], max_batch_size: int, num_steps: int,
         predictor: str, corrector_steps: int, snr: Optional[float], sigma_min: Optional[float],
         sigma_max: Optional[float], rho: float, grid: str, device: Optional[str]) -> None:
    """Inpaint, colourise or super-resolve images with a trained diffusion network (EDM or anisotropic).

    \b
    Examples:
      python inverse.py --network=NET.pkl --task=inpaint --mask=mask.png --images=imgs.zip --outdir=out
      python inverse.py --network=NET.pkl --task=superres --scale=4 --images=imgs --outdir=out --seeds=0-7
      python inverse.py --network=NET.pkl --task=colorize --images=imgs --outdir=out --corrector-steps=1
    """
    from edm_aniso.inverse import check_sampler_options, check_task_options, make_observation, network_evaluations
    from generate import load_network
    try:
        check_task_options(task, mask_path is not None, scale)
        if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
            raise ValueError(f'--sigma_min must be below --sigma_max, got {sigma_min} and {sigma_max}')
        check_sampler_options(num_steps, predictor, corrector_steps, snr, grid)
        if not _writable(outdir):
            raise ValueError(f'--outdir: cannot write to "{outdir}"')
        dev = misc.pick_device(device)
        net = load_network(network_pkl, device=dev)
        net.eval().requires_grad_(False)
        label_dim = int(net.label_dim)
        if class_idx is not None and label_dim == 0:
            raise ValueError(f'--class={class_idx} given, but the network is unconditional (label_dim = 0)')
        if class_idx is not None and class_idx >= label_dim:
            raise ValueError(f'--class={class_idx} is out of range: the network has {label_dim} classes '
                             f'(0 to {label_dim - 1})')
        if grid == 'schedule' and getattr(net, 'schedule_g', None) is None:
            raise ValueError(f'--grid=schedule needs a network with a learned schedule (--precond=aniso); '
                             f'{type(net).__name__} has only the Karras grid')
        lo, hi = max(sigma_min or 0.002, float(net.sigma_min)), min(sigma_max or 80.0, float(net.sigma_max))
        if not lo < hi:
            raise ValueError(f'the network supports sigma in [{float(net.sigma_min)}, {float(net.sigma_max)}]; '
                             f'--sigma_min/--sigma_max leave an empty range')
        channels, res = int(net.img_channels), int(net.img_resolution)
        mask = load_mask(mask_path, channels, res) if mask_path is not None else None
        observation = make_observation(task, channels, res, mask=mask, scale=scale)
        images, labels = open_images(images_path, net, num)
    except ValueError as err:
        raise click.ClickException(str(err)) from err

    if corrector_steps > 0 and snr is None:
        snr = 0.16
    kwargs = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, grid=grid,
                  predictor=predictor, corrector_steps=corrector_steps, snr=snr)
    total = images.shape[0] * len(seeds)
    nfe = network_evaluations(num_steps, predictor, corrector_steps)
    print(f'Solving {observation.describe()} for {images.shape[0]} image(s) x {len(seeds)} seed(s) to "{outdir}" '
          f'({nfe} network evaluations each)...')
    os.makedirs(outdir, exist_ok=True)
    cpu = 0.0
    with tqdm.tqdm(total=total, unit='img') as bar:
        for rec in solve_images(net, observation, images, outdir, labels=labels, seeds=seeds, class_idx=class_idx,
                                max_batch_size=max_batch_size, device=dev, **kwargs):
            bar.update(len(rec['paths']))
            cpu += rec['cpu_seconds']
    print(f'Done: {total} result(s) in {cpu:.1f} s of process CPU time.')


if __name__ == '__main__':
    main()
