"""edm_aniso.likelihood and likelihood.py: PF-ODE and variational bound against closed forms on Gaussian data."""

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from edm_aniso import gaussian as G
from edm_aniso.likelihood import (BIN_WIDTH, bits_per_dim, dequantize, divergence, elbo_nll, ode_nll, rademacher)
from edm_aniso.path import noise_path

LAM = G.power_law_variances(1, 8)
DIST = G.DCTGaussian(LAM)


def knot_oracle(seed, scale=0.4, label_dim=0):
    return G.random_knot_oracle(DIST, seed, scale, label_dim)


def coefficient_noise(net, x, sigma, labels=None):
    """Per-sample noise variance of every DCT coefficient [B, 1, 8, 8] at effective level sigma."""
    path = noise_path(net, labels, x)
    a, b = path.split(sigma)
    mask = G.low_block_mask(8)
    return a[:, None, None, None] ** 2 * mask + b[:, None, None, None] ** 2 * (1 - mask)


NETS = {'edm': lambda: G.SigmaView(G.OracleNet(DIST)), 'aniso-a': lambda: knot_oracle(3),
        'aniso-b': lambda: knot_oracle(11, scale=0.8)}


@pytest.mark.parametrize('name', list(NETS))
def test_ode_likelihood_equals_exact_gaussian_density(name):
    net = NETS[name]()
    x = DIST.sample(3, torch.Generator().manual_seed(1))
    res = ode_nll(net, x, trace='exact')
    exact = G.gaussian_nll(LAM, x, coefficient_noise(net, x, 0.002))      # p at the data end of the path
    assert ((res.nll / exact - 1).abs().max() < 1e-3)
    assert ((res.nll / G.gaussian_nll(LAM, x) - 1).abs().max() < 1e-3)      # and the clean data density
    assert res.nfe.shape == (3,) and 20 < float(res.nfe[0]) < 2000


def test_two_anisotropic_paths_differ_but_both_are_exact():
    x = DIST.sample(2, torch.Generator().manual_seed(2))
    pa, pb = noise_path(NETS['aniso-a'](), None, x), noise_path(NETS['aniso-b'](), None, x)
    assert not torch.allclose(pa.split(0.5)[0], pb.split(0.5)[0], rtol=1e-2)


def test_class_bank_uses_each_samples_schedule():
    net = knot_oracle(5, scale=0.8, label_dim=2)
    labels = torch.eye(2)[[0, 1, 1]]
    x = DIST.sample(3, torch.Generator().manual_seed(3))
    res = ode_nll(net, x, labels, trace='exact')
    exact = G.gaussian_nll(LAM, x, coefficient_noise(net, x, 0.002, labels))
    assert ((res.nll / exact - 1).abs().max() < 1e-3)


def test_hutchinson_divergence_and_ode_are_unbiased():
    net = NETS['aniso-a']()
    x = DIST.sample(1, torch.Generator().manual_seed(4))
    path = noise_path(net, None, x)
    sigma = torch.full([1], 0.3, dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    from edm_aniso.path import PathDenoiser
    a, b = path.split(sigma)
    v = path.ode_derivative(xs, PathDenoiser(net, path)(xs, a, b), sigma)
    exact = divergence(v, xs, 'exact')
    est = torch.stack([divergence(v, xs, 'hutchinson', rademacher((1, 1, 1, 8, 8), torch.Generator().manual_seed(k)))
                       for k in range(400)])[:, 0]
    assert abs(float(est.mean() - exact[0])) < 3 * float(est.std() / math.sqrt(len(est)))
    assert float(est.std()) > 0                                                # the estimator is random
    # Whole ODE: one image repeated with 200 different probes in one batch.
    reps = x.expand(200, -1, -1, -1).contiguous()
    probes = rademacher((1, 200, 1, 8, 8), torch.Generator().manual_seed(7))
    hutch = ode_nll(net, reps, trace='hutchinson', probes=probes).nll
    ref = ode_nll(net, x, trace='exact').nll[0]
    assert abs(float(hutch.mean() - ref)) < 3 * float(hutch.std() / math.sqrt(200))


@pytest.mark.parametrize('name', ['edm', 'aniso-a'])
def test_bound_is_above_exact_and_tightens(name):
    torch.manual_seed(0)                                    # elbo_nll draws its strata and noise from the global RNG
    net = NETS[name]()
    x = DIST.sample(6, torch.Generator().manual_seed(5))
    exact = G.gaussian_nll(LAM, x)
    m_hi = coefficient_noise(net, x, 80.0)
    gaps = []
    for s_min in [0.2, 0.05, 0.01, 0.002]:
        closed = G.gaussian_elbo(LAM, x, coefficient_noise(net, x, s_min), m_hi)
        assert bool((closed > exact).all()), (s_min, closed - exact)           # a bound at every point
        gaps.append(float((closed - exact).mean()))
        res = elbo_nll(net, x, samples=256, sigma_min=s_min)
        z = (res.nll - closed) / res.terms['diff_se']
        assert bool((z.abs() < 4).all()), z                                    # MC estimate of the same bound
        if s_min == 0.2:
            assert bool((res.nll > exact).all())                               # gap >> MC error here
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-2 * gaps[0]
    # The Monte-Carlo error falls at least as 1/sqrt(samples) (stratification in s does better).
    se = [float(elbo_nll(net, x, samples=k, sigma_min=0.05).terms['diff_se'].mean()) for k in (32, 512)]
    assert se[0] / se[1] > 3


def test_isotropic_aniso_network_gives_the_edm_numbers():
    """A stage-1 AnisoPrecond (g = h, g learned) from an EDM network: the same path in sigma, the same numbers."""
    networks = pytest.importorskip('training.networks')
    from edm_aniso.precond import AnisoPrecond
    torch.manual_seed(0)
    kw = dict(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet', model_channels=16,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    edm = networks.EDMPrecond(**kw).eval()
    for p in edm.parameters():
        p.data += 0.05 * torch.randn_like(p)
    aniso = AnisoPrecond(stage=1, **kw).eval()
    aniso.transfer_from(edm)
    with torch.no_grad():
        aniso.schedule_g.u.add_(0.5 * torch.randn(aniso.schedule_g.u.shape))
    for net in (edm, aniso):
        net.requires_grad_(False)
    x = dequantize(torch.randint(0, 256, (2, 1, 8, 8)), torch.rand(2, 1, 8, 8))
    probes = rademacher((1, 2, 1, 8, 8), torch.Generator().manual_seed(0))
    o_edm, o_aniso = [ode_nll(n, x, probes=probes).nll for n in (edm, aniso)]
    assert ((o_edm - o_aniso).abs() / o_edm.abs()).max() < 1e-4
    noise = torch.randn(8, 2, 1, 8, 8, dtype=torch.float64)
    off = torch.rand(8, 2, dtype=torch.float64)
    e_edm, e_aniso = [elbo_nll(n, x, samples=16, offsets=off, noise=noise).nll for n in (edm, aniso)]
    assert ((e_edm - e_aniso).abs() / e_edm.abs()).max() < 1e-4
    # The exact trace (batched vector-Jacobian products) on a real net equals a plain loop over basis vectors.
    from edm_aniso.path import PathDenoiser
    path = noise_path(aniso, None, x)
    xs = x.clone().requires_grad_(True)
    a, b = path.split(0.7)
    v = path.ode_derivative(xs, PathDenoiser(aniso, path)(xs, a, b), 0.7)
    loop = torch.stack([torch.autograd.grad(v.flatten(1)[:, i].sum(), xs, retain_graph=True)[0].flatten(1)[:, i]
                        for i in range(64)], 1).sum(1)
    assert torch.allclose(divergence(v, xs, 'exact', chunk=24), loop, rtol=1e-10, atol=1e-10)


def test_dequantisation_and_bits_per_dim():
    v = torch.arange(256).reshape(1, 1, 16, 16)
    lo, hi = dequantize(v, torch.zeros_like(v, dtype=torch.float64)), dequantize(v, torch.full(v.shape, 1 - 1e-12))
    centre = v.double() / 127.5 - 1
    assert torch.allclose(lo + BIN_WIDTH / 2, centre, atol=1e-12)              # bins centred on EDM's levels
    assert torch.allclose(lo.flatten()[1:], hi.flatten()[:-1], atol=1e-9)      # and they tile the line
    # The uniform density on the union of the 256 bins is the uniform distribution over levels: exactly 8 bits/dim.
    d = 3 * 32 * 32
    nll_uniform = d * math.log(256 * BIN_WIDTH)
    assert abs(bits_per_dim(nll_uniform, d) - 8.0) < 1e-12
    # A Gaussian much wider than a bin: bits/dim of its dequantised density ~ its discretised entropy.
    s = 0.3
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    p = torch.exp(-levels ** 2 / (2 * s * s))
    p = p / p.sum()
    entropy_bits = float(-(p * p.log2()).sum())
    nll = 0.5 * (1 + math.log(2 * math.pi * s * s))                           # E[-ln N] per dimension
    assert abs(bits_per_dim(nll, 1) - entropy_bits) < 0.01


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


@pytest.fixture(scope='module')
def cli_files(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from datagen import make_image_folder
    from test_generate import tiny_edm_net
    root = tmp_path_factory.mktemp('lik')
    make_image_folder(str(root / 'imgs'), n=8, res=8, channels=3, num_classes=2)
    make_image_folder(str(root / 'imgs16'), n=8, res=16, channels=3)
    make_image_folder(str(root / 'grey'), n=8, res=8, channels=1)
    net = tiny_edm_net(label_dim=2)
    with open(root / 'cond.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    with open(root / 'uncond.pkl', 'wb') as f:
        pickle.dump(dict(ema=tiny_edm_net()), f)
    with open(root / 'nonet.pkl', 'wb') as f:
        pickle.dump(dict(loss_fn=None), f)
    import PIL.Image
    (root / 'deep').mkdir()
    for i in range(3):
        PIL.Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(root / 'deep' / f'{i}.png')
    return root


def run_in_process(args, cwd, monkeypatch):
    import click.testing
    import likelihood
    monkeypatch.chdir(cwd)
    return click.testing.CliRunner().invoke(likelihood.main, args)


def run_cli(args, cwd, env_extra=None, torchrun=False):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS='1')
    env.update(env_extra or {})
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun \
        else [sys.executable]
    script = [os.path.join(repo, 'likelihood.py')] + (['--'] if torchrun else [])   # torchrun reads --num itself
    return subprocess.run(cmd + script + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('args, message', [
    (['--network=uncond.pkl', '--data=imgs16'], 'images are 3x16x16 (CxHxW) but the network expects 3x8x8'),
    (['--network=uncond.pkl', '--data=grey'], 'images are 1x8x8'),
    (['--network=uncond.pkl', '--data=deep'], 'needs 8-bit images'),
    (['--network=uncond.pkl', '--data=imgs', '--num=9'], '--num=9 but the dataset has only 8 images'),
    (['--network=nonet.pkl', '--data=imgs'], 'is not a network pickle'),
    (['--network=missing.pkl', '--data=imgs'], 'cannot read network pickle'),
    (['--network=cond.pkl', '--data=grey'], 'images are 1x8x8'),
    (['--network=cond.pkl', '--data=imgs16'], 'expects 3x8x8'),
    (['--network=uncond.pkl', '--data=imgs', '--elbo-samples=3'], '--elbo-samples must be even'),
    (['--network=uncond.pkl', '--data=nowhere.zip'], '--data:'),
])
def test_cli_bad_input_one_line(cli_files, args, message, monkeypatch):
    out = run_in_process(args + ['--outfile=res.json'], cli_files, monkeypatch)
    assert out.exit_code != 0
    errors = [line for line in out.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and message in errors[0], out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert not (cli_files / 'res.json').exists()


def test_cli_conditional_needs_labels(cli_files, monkeypatch):
    __import__('datagen').make_image_folder(str(cli_files / 'nolabels'), n=4, res=8, channels=3)
    out = run_in_process(['--network=cond.pkl', '--data=nolabels'], cli_files, monkeypatch)
    assert 'Error: --data: the network is class-conditional but the dataset has no labels' in out.output


def test_cli_writes_summary(cli_files, monkeypatch):
    out = run_in_process(['--network=uncond.pkl', '--data=imgs', '--num=2', '--method=elbo', '--elbo-samples=4',
                          '--outfile=sub/res.json'], cli_files, monkeypatch)
    assert out.exit_code == 0, out.output
    assert 'variational bound:' in out.output and 'bits/dim' in out.output
    res = json.loads((cli_files / 'sub' / 'res.json').read_text())
    assert res['num_images'] == 2 and len(res['elbo']['per_image_bpd']) == 2 and 'ode' not in res


@pytest.mark.slow
def test_cli_two_processes_equal_one(cli_files):
    args = ['--network=cond.pkl', '--data=imgs', '--num=6', '--batch=2', '--elbo-samples=8', '--seed=3']
    one = run_cli(args + ['--outfile=one.json'], cli_files)
    two = run_cli(args + ['--outfile=two.json'], cli_files, torchrun=True)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert 'bits/dim' in one.stdout and 'network evaluations per image' in one.stdout
    r1, r2 = [json.loads((cli_files / f).read_text()) for f in ('one.json', 'two.json')]
    assert r2['settings']['world_size'] == 2
    for m in ('ode', 'elbo'):
        assert r1[m]['per_image_bpd'] == r2[m]['per_image_bpd']
        assert r1[m]['bits_per_dim'] == r2[m]['bits_per_dim']
        assert 4 < r1[m]['bits_per_dim'] < 16
