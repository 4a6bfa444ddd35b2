"""Plots of a network's learned schedules: ``python -m edm_aniso.plot --network=PKL --out=DIR``.

Draws g and h against t, the ratio g/h, the geometric mean F = √(g h) against the log-linear reference and the Karras
initialisation (method.md §2), the per-level split a_i/b_i that aniso_heun uses (§6), and for class banks the per-class
g and h normalised by their own geometric mean.
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Any

import click
import matplotlib
import torch

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

from edm_aniso import schedule as sched  # noqa: E402


def _rows_curves(net: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g and h [R, len(t)] float64 for every schedule row (stage 1: h = g)."""
    sg = net.schedule_g
    lg = sg.log_knots().detach().to(torch.float64)
    lh = lg if getattr(net, 'stage', 2) == 1 else net.schedule_h.log_knots().detach().to(torch.float64)
    tau = sg.tau.to(torch.float64)
    rows = torch.arange(lg.shape[0])[:, None].expand(-1, t.shape[0])
    tt = t[None].expand_as(rows)
    g = sched.evaluate_log_knots(lg, tau, tt, rows)[0]
    h = sched.evaluate_log_knots(lh, tau, tt, rows)[0]
    return g, h


def _finish(fig, ax, path: str, title: str, xlabel: str, ylabel: str, legend: bool = True) -> str:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3)
    if legend:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_schedules(net: Any, out_dir: str, num_points: int = 400, max_rows: int = 10,
                   num_steps: int = 18) -> list[str]:
    """Write the schedule PNGs for ``net`` (an AnisoPrecond) into ``out_dir``; returns their paths."""
    if not (hasattr(net, 'schedule_g') and hasattr(net, 'schedule_h')):
        raise ValueError(f'{type(net).__name__} has no learned schedules (expected an AnisoPrecond network)')
    os.makedirs(out_dir, exist_ok=True)
    T, g0 = float(net.schedule_g.T), float(net.schedule_g.g0)
    t = torch.linspace(0, T, num_points, dtype=torch.float64)
    g, h = _rows_curves(net, t)
    rows = list(range(min(g.shape[0], max_rows)))
    tag = (lambda r: f' row {r}') if g.shape[0] > 1 else (lambda r: '')
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.semilogy(t, g[r], label=f'g{tag(r)}')
        ax.semilogy(t, h[r], '--', label=f'h{tag(r)}')
    paths.append(_finish(fig, ax, os.path.join(out_dir, 'schedules.png'), 'noise variances on P (g) and P_perp (h)',
                         't', 'variance'))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.semilogy(t, g[r] / h[r], label=f'g/h{tag(r)}')
    ax.axhline(1.0, color='k', lw=0.6)
    paths.append(_finish(fig, ax, os.path.join(out_dir, 'ratio.png'), 'anisotropy g/h', 't', 'g / h'))

    fig, ax = plt.subplots(figsize=(6, 4))
    reference = torch.exp(math.log(g0) + t / T * (math.log(T) - math.log(g0)))
    karras = sched.evaluate_log_knots(sched.karras_log_knots(net.schedule_g.num_knots, T, g0)[None].to(torch.float64),
                                      net.schedule_g.tau.to(torch.float64), t)[0]
    ax.semilogy(t, reference, 'k:', label='log-linear reference')
    ax.semilogy(t, karras, 'k--', lw=0.8, label='Karras init')
    for r in rows:
        ax.semilogy(t, (g[r] * h[r]).sqrt(), label=f'F = sqrt(g h){tag(r)}')
    paths.append(_finish(fig, ax, os.path.join(out_dir, 'geometric_mean.png'), 'geometric mean F', 't', 'variance'))

    fig, ax = plt.subplots(figsize=(6, 4))
    sigmas = sched.karras_sigmas(num_steps)
    labels = torch.eye(net.label_dim)[rows] if net.label_dim else None
    a, b = net.levels(sigmas, labels) if labels is not None else net.levels(sigmas, None)
    for k, r in enumerate(rows[:a.shape[0]]):
        ax.semilogx(sigmas, (a[k, :-1] / b[k, :-1]).cpu(), 'o-', ms=3, label=f'a/b{tag(r) if labels is not None else ""}')
    ax.axhline(1.0, color='k', lw=0.6)
    paths.append(_finish(fig, ax, os.path.join(out_dir, 'sampler_split.png'),
                         f'aniso_heun split per Karras level (N={num_steps})', 'sigma_eff', 'a_i / b_i'))

    if g.shape[0] > 1:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        f = (g * h).sqrt()
        for r in rows:
            axes[0].semilogy(t, g[r] / f[r], label=f'row {r}')
            axes[1].semilogy(t, h[r] / f[r], label=f'row {r}')
        axes[1].set_title('h / F per row')
        axes[1].set_xlabel('t')
        axes[1].grid(True, which='both', alpha=0.3)
        paths.append(_finish(fig, axes[0], os.path.join(out_dir, 'class_curves.png'),
                             'g / F per row (normalised by the row\'s geometric mean)', 't', 'ratio'))
    return paths


def _first_line(err: BaseException) -> str:
    text = (str(err).splitlines() or [''])[0]
    return f'{type(err).__name__}: {text}' if text else type(err).__name__


def load_network(path: str) -> Any:
    """The 'ema' module of an EDM-format network pickle (path or URL); a one-line ValueError if it cannot be read."""
    import dnnlib
    try:
        f = dnnlib.util.open_url(path)
    except Exception as err:  # noqa: BLE001 - a missing file or a failed download, as one line
        raise ValueError(f'cannot open network pickle "{path}" ({_first_line(err)})') from err
    try:
        with f:
            data = pickle.load(f)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or foreign pickles raise many kinds of errors
        raise ValueError(f'cannot read network pickle "{path}" ({_first_line(err)})') from err
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'"{path}" is not a network pickle (no \'ema\' entry)')
    return data['ema']


@click.command()
@click.option('--network', 'network_pkl', help='Network pickle (AnisoPrecond)', metavar='PKL|URL', type=str,
              required=True)
@click.option('--out', 'out_dir', help='Where to write the PNGs', metavar='DIR', type=str, required=True)
@click.option('--steps', 'num_steps', help='N of the sampler split plot', metavar='INT', type=click.IntRange(min=2),
              default=18, show_default=True)
def main(network_pkl: str, out_dir: str, num_steps: int) -> None:
    """Plot the learned schedules of a network pickle."""
    try:
        net = load_network(network_pkl)
        paths = plot_schedules(net, out_dir, num_steps=num_steps)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__)
    for p in paths:
        click.echo(p)


if __name__ == '__main__':
    main()
