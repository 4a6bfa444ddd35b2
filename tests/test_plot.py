"""edm_aniso.plot: schedule PNGs from a network and from a pickle on the command line."""

import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

precond = pytest.importorskip('edm_aniso.precond')
from edm_aniso import plot  # noqa: E402


def tiny_aniso(label_dim=0, per_class=False, stage=2):
    torch.manual_seed(0)
    net = precond.AnisoPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, stage=stage, subspace='dct',
                               per_class=per_class, model_channels=8, channel_mult=[1], num_blocks=1,
                               attn_resolutions=[])
    with torch.no_grad():
        net.schedule_h.u.add_(0.4 * torch.randn(net.schedule_h.u.shape))
    return net.eval()


def test_plot_writes_pngs_for_a_bank(tmp_path):
    net = tiny_aniso(label_dim=3, per_class=True)
    paths = plot.plot_schedules(net, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ['class_curves.png', 'geometric_mean.png', 'ratio.png', 'sampler_split.png', 'schedules.png']
    for p in paths:
        img = np.asarray(PIL.Image.open(p).convert('L'))
        assert img.shape[0] > 200 and img.std() > 5                # a real drawing, not a blank canvas


def test_plot_global_schedule_has_no_class_panel(tmp_path):
    paths = plot.plot_schedules(tiny_aniso(), str(tmp_path))
    assert 'class_curves.png' not in [os.path.basename(p) for p in paths] and len(paths) == 4


def test_cli_from_pickle_and_clear_error(tmp_path):
    pkl = tmp_path / 'net.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=tiny_aniso(), loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    runner = CliRunner()
    res = runner.invoke(plot.main, ['--network', str(pkl), '--out', str(tmp_path / 'out')])
    assert res.exit_code == 0, res.output
    assert os.path.isfile(tmp_path / 'out' / 'geometric_mean.png')
    bad = tmp_path / 'bad.pkl'
    with open(bad, 'wb') as f:
        pickle.dump(dict(ema=torch.nn.Linear(2, 2)), f)
    res = runner.invoke(plot.main, ['--network', str(bad), '--out', str(tmp_path / 'o2')])
    assert res.exit_code == 1 and 'no learned schedules' in res.output and 'Traceback' not in res.output

    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(pkl.read_bytes()[:100])
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'this is not a pickle')
    for path, msg in [(tmp_path / 'missing.pkl', 'cannot open network pickle'),
                      (truncated, 'cannot read network pickle'), (garbage, 'cannot read network pickle')]:
        res = runner.invoke(plot.main, ['--network', str(path), '--out', str(tmp_path / 'o3')])
        assert res.exit_code == 1 and msg in res.output and str(path) in res.output, res.output
        assert 'Traceback' not in res.output and len(res.output.strip().splitlines()) == 1
