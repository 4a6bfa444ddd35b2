"""Write a small folder of class-structured toy images, for the README quick start (no download needed).

Each class is a colour; each image is one soft blob of that colour at a random place and size on a dark background.
Images go into one subfolder per class, so `dataset_tool.py` numbers the classes from the folder names.

    python tools/make_toy_images.py --dest=toy-images --num=256 --res=16 --classes=4
"""

import os

import click
import numpy as np
import PIL.Image

PALETTE = np.array([[230, 60, 50], [60, 200, 80], [60, 90, 230], [240, 200, 40],
                    [200, 70, 210], [50, 210, 220], [250, 140, 40], [180, 180, 180]], dtype=np.float64)


def toy_image(rng: np.random.RandomState, res: int, colour: np.ndarray) -> np.ndarray:
    """One uint8 HWC image: a Gaussian blob of `colour` on a dark, slightly noisy background."""
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    cy, cx = rng.uniform(0.25, 0.75, size=2) * res
    radius = rng.uniform(0.12, 0.3) * res
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))[..., None]
    background = 20 + 10 * rng.rand(res, res, 1)
    img = background * (1 - blob) + colour * blob
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@click.command()
@click.option('--dest', help='Output folder (created)', metavar='DIR', type=str, required=True)
@click.option('--num', help='Number of images', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--res', help='Resolution (power of two)', metavar='INT', type=click.IntRange(min=4), default=16,
              show_default=True)
@click.option('--classes', help='Number of classes', metavar='INT', type=click.IntRange(1, len(PALETTE)), default=4,
              show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def main(dest: str, num: int, res: int, classes: int, seed: int) -> None:
    """Write toy images into DEST/<class>/<index>.png."""
    rng = np.random.RandomState(seed)
    for i in range(num):
        label = i % classes
        folder = os.path.join(dest, f'class{label}')
        os.makedirs(folder, exist_ok=True)
        PIL.Image.fromarray(toy_image(rng, res, PALETTE[label])).save(os.path.join(folder, f'{i:05d}.png'))
    print(f'Wrote {num} images of {res}x{res} in {classes} classes to {dest}')


if __name__ == '__main__':
    main()
