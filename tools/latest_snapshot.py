"""Print the newest network snapshot under a training --outdir, so that commands need no run numbers.

    python tools/latest_snapshot.py training-runs                     # newest run, its newest snapshot
    python tools/latest_snapshot.py training-runs --desc=aniso        # newest run whose name contains "aniso"
    python tools/latest_snapshot.py training-runs/00003-...           # a run folder itself

"Newest" is the run folder with the largest leading number (train.py numbers them in creation order) that holds a
snapshot, and in it the snapshot with the most images (network-snapshot-<kimg>.pkl). Also `--state` for the newest
training-state-*.pt (what --resume wants). Exits 1 with one line when there is none.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

import click

KINDS = {'snapshot': re.compile(r'network-snapshot-(\d+)\.pkl'), 'state': re.compile(r'training-state-(\d+)\.pt')}


def newest_in_run(run_dir: str, kind: str = 'snapshot') -> Optional[str]:
    """The file of `kind` with the most images in one run folder, or None."""
    pattern = KINDS[kind]
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := pattern.fullmatch(name))]
    return os.path.join(run_dir, max(found)[1]) if found else None


def latest(outdir: str, desc: Optional[str] = None, kind: str = 'snapshot') -> Optional[str]:
    """The newest file of `kind` in `outdir` (a run folder itself, or the parent of NNNNN-* run folders)."""
    if not os.path.isdir(outdir):
        return None
    own = newest_in_run(outdir, kind)
    runs = []
    for name in os.listdir(outdir):
        m = re.match(r'(\d+)-', name)
        if m and os.path.isdir(os.path.join(outdir, name)) and (desc is None or desc in name):
            runs.append((int(m.group(1)), name))
    for _, name in sorted(runs, reverse=True):
        path = newest_in_run(os.path.join(outdir, name), kind)
        if path is not None:
            return path
    return own


@click.command()
@click.argument('outdir', metavar='OUTDIR')
@click.option('--desc', help='Only runs whose folder name contains this', metavar='STR', type=str)
@click.option('--state', 'kind', help='The newest training state instead', flag_value='state', default='snapshot')
def main(outdir: str, desc: Optional[str], kind: str) -> None:
    """Print the newest network snapshot (or training state) of the runs in OUTDIR."""
    path = latest(outdir, desc, kind)
    if path is None:
        what = 'network-snapshot-*.pkl' if kind == 'snapshot' else 'training-state-*.pt'
        raise click.ClickException(f'no {what} in {outdir}' + (f' (runs matching "{desc}")' if desc else ''))
    click.echo(path)


if __name__ == '__main__':
    sys.exit(main())
