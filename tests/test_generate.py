"""Tests for generate.py: EDM's samplers (edm-interface.md §3), per-seed randomness, image output and the CLI (§1.3)."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from training import registry
from training.networks import EDMPrecond

# EDM's published level grids (edm-interface.md §3.1 and §3.2), printed there to 4 significant digits.
EDM_N18 = [80, 57.59, 40.79, 28.37, 19.35, 12.91, 8.401, 5.315, 3.257, 1.923, 1.088, 0.5853, 0.2964, 0.1395, 0.05995,
           0.02293, 0.007528, 0.002]
ABLATION_N10 = {
    'vp': [152.2, 53.31, 21.1, 9.403, 4.681, 2.549, 1.462, 0.8229, 0.3817, 0.01049],
    've': [100, 38.82, 15.07, 5.848, 2.27, 0.8811, 0.342, 0.1327, 0.05153, 0.02],
    'iddpm': [80.2, 5.376, 2.695, 1.719, 1.192, 0.8416, 0.5834, 0.3726, 0.1872, 0.006422],
}


class RecordingNet:
    """A denoiser stand-in with EDMPrecond's range that records every σ it is called with and returns D = c·x."""

    sigma_min, sigma_max = 0.0, float('inf')
    img_resolution, img_channels, label_dim = 4, 1, 0

    def __init__(self, data_std: float = 0.0) -> None:
        self.sigmas: list[float] = []
        self.data_std = data_std

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        s2 = self.data_std ** 2
        return x * (s2 / (s2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2))   # exact for N(0, s² I) data


def tiny_edm_net(label_dim: int = 0, channels: int = 3, res: int = 8, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=res, img_channels=channels, label_dim=label_dim, model_type='SongUNet',
                     model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)
    return net.eval().requires_grad_(False)


@pytest.fixture
def net_pkl(tmp_path):
    path = tmp_path / 'net.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=tiny_edm_net(), loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    return str(path)


@pytest.fixture
def cond_pkl(tmp_path):
    path = tmp_path / 'cond.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=tiny_edm_net(label_dim=4)), f)
    return str(path)


@pytest.fixture
def probe_sampler():
    """A registered sampler that records what generate_images hands it and returns blank images."""
    calls = []

    def sample(net, latents, class_labels=None, randn_like=torch.randn_like, **opts):
        calls.append(dict(latents=latents.clone(), labels=None if class_labels is None else class_labels.clone(),
                          opts=opts))
        return torch.zeros_like(latents, dtype=torch.float64)

    import click
    entry = registry.SamplerEntry(name='probe', sample=sample,
                                  options=[click.Option(['--probe-level'], type=float, default=None)])
    registry.register_sampler(entry)
    yield calls
    registry.SAMPLERS.pop('probe', None)


def cli(args):
    return CliRunner().invoke(generate.build_cli(), args)


# ---------------------------------------------------------------------------------------------------------------------
# Sampler grids and evaluation counts


def test_edm_sampler_levels_match_edm_test_vector():
    net = RecordingNet()
    generate.edm_sampler(net, torch.randn(1, 1, 4, 4), num_steps=18)
    euler_levels = net.sigmas[0::2]          # step i evaluates t_i, then (except the last step) t_{i+1}
    np.testing.assert_allclose(euler_levels, EDM_N18, rtol=6e-4)
    assert net.sigmas[1::2] == euler_levels[1:]
    np.testing.assert_allclose(generate.karras_sigmas(18, 0.002, 80, 7).numpy(), EDM_N18, rtol=6e-4)


@pytest.mark.parametrize('steps', [2, 3, 18, 40])
def test_edm_sampler_nfe_is_2n_minus_1(steps):
    net = RecordingNet()
    generate.edm_sampler(net, torch.randn(2, 1, 4, 4), num_steps=steps)
    assert len(net.sigmas) == 2 * steps - 1


@pytest.mark.parametrize('solver,nfe', [('euler', lambda n: n), ('heun', lambda n: 2 * n - 1)])
def test_ablation_sampler_nfe(solver, nfe):
    for steps in (2, 7):
        net = RecordingNet()
        generate.ablation_sampler(net, torch.randn(1, 1, 4, 4), num_steps=steps, solver=solver)
        assert len(net.sigmas) == nfe(steps)


@pytest.mark.parametrize('disc', sorted(ABLATION_N10))
def test_ablation_grids_match_edm_test_vectors(disc):
    net = RecordingNet()
    generate.ablation_sampler(net, torch.randn(1, 1, 4, 4), num_steps=10, solver='euler', discretization=disc)
    np.testing.assert_allclose(net.sigmas, ABLATION_N10[disc], rtol=6e-4)


def test_ablation_edm_linear_equals_edm_sampler():
    net = tiny_edm_net()
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = generate.edm_sampler(net, latents, num_steps=6)
    b = generate.ablation_sampler(net, latents, num_steps=6)
    assert a.dtype == torch.float64
    assert (a - b).abs().max().item() < 1e-10


def test_samplers_converge_to_exact_gaussian_flow():
    """For N(0, s²I) data the PF-ODE maps x(σ_max) to x(σ_max)·s/√(s² + σ_max²); Heun's error falls ~4× per doubling."""
    s, latents = 0.5, torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = latents * 80 * s / np.sqrt(s ** 2 + 80 ** 2)
    errors = []
    for steps in (32, 64, 128):
        x = generate.edm_sampler(RecordingNet(s), latents, num_steps=steps)
        errors.append((x - exact).abs().max().item() / exact.abs().max().item())
    assert errors[-1] < 2e-3
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3

    # The VP and VE schedules (with and without scaling) integrate the same ODE in other time variables; this checks
    # σ(t), σ'(t), σ⁻¹, s(t) and s'(t) against the closed form.
    exact = latents * 152.2 * s / np.sqrt(s ** 2 + 152.2 ** 2)
    for schedule, scaling, tol in (('vp', 'vp', 1e-3), ('linear', 'vp', 2e-3), ('ve', 'none', 3e-2)):
        errors = []
        for steps in (64, 128):
            x = generate.ablation_sampler(RecordingNet(s), latents, num_steps=steps, schedule=schedule,
                                          scaling=scaling, sigma_max=152.2)
            errors.append((x - exact).abs().max().item() / exact.abs().max().item())
        assert errors[1] < tol and errors[0] / errors[1] > 3, (schedule, scaling, errors)


def test_churn_raises_levels_as_edm_describes():
    """ImageNet settings: the first two levels are not churned, 40.79 becomes 40.79·√2 ≈ 57.68 (edm-interface §3.1)."""
    net = RecordingNet()
    gen = generate.StackedRandomGenerator('cpu', [0])
    generate.edm_sampler(net, torch.randn(1, 1, 4, 4), randn_like=gen.randn_like, num_steps=18, S_churn=40,
                         S_min=0.05, S_max=50, S_noise=1.003)
    euler = net.sigmas[0::2]
    assert euler[0] == pytest.approx(80) and euler[1] == pytest.approx(57.59, rel=1e-3)
    assert euler[2] == pytest.approx(40.79 * np.sqrt(2), rel=1e-3)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match='num_steps'):
        generate.edm_sampler(RecordingNet(), torch.randn(1, 1, 4, 4), num_steps=1)
    with pytest.raises(ValueError, match='sigma_min'):
        generate.edm_sampler(RecordingNet(), torch.randn(1, 1, 4, 4), sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match='solver'):
        generate.ablation_sampler(RecordingNet(), torch.randn(1, 1, 4, 4), solver='rk4')


# ---------------------------------------------------------------------------------------------------------------------
# Per-seed randomness


def test_stacked_generator_is_per_seed():
    a = generate.StackedRandomGenerator('cpu', [7, 3]).randn([2, 3, 4, 4])
    b = generate.StackedRandomGenerator('cpu', [3]).randn([1, 3, 4, 4])
    ref = torch.randn([3, 4, 4], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[1], b[0]) and torch.equal(b[0], ref)
    big = generate.StackedRandomGenerator('cpu', [2 ** 32 + 3]).randn([1, 3, 4, 4])
    assert torch.equal(big[0], ref)                               # seeds are taken mod 2³²
    with pytest.raises(ValueError):
        generate.StackedRandomGenerator('cpu', [1, 2]).randn([3, 4])


def test_seed_batches_follow_edm_split():
    batches = [generate.seed_batches(list(range(10)), 3, r, 2) for r in range(2)]
    flat = sorted(s for rank in batches for b in rank for s in b)
    assert flat == list(range(10))
    assert all(len(b) <= 3 for rank in batches for b in rank)
    assert batches[0][0] == [0, 1, 2] and batches[1][0] == [3, 4, 5]   # 4 chunks dealt round-robin


def test_latents_do_not_depend_on_batch_size(tmp_path, probe_sampler):
    net = tiny_edm_net()
    generate.generate_images(net, str(tmp_path / 'a'), seeds=[5, 6, 7], max_batch_size=3, sampler='probe',
                             device='cpu', progress=False)
    generate.generate_images(net, str(tmp_path / 'b'), seeds=[5, 6, 7], max_batch_size=1, sampler='probe',
                             device='cpu', progress=False)
    together = probe_sampler[0]['latents']
    one_by_one = torch.cat([c['latents'] for c in probe_sampler[1:]])
    assert together.shape == (3, 3, 8, 8) and torch.equal(together, one_by_one)


def test_class_option_keeps_latents_and_sets_labels(tmp_path, probe_sampler):
    net = tiny_edm_net(label_dim=4)
    kw = dict(seeds=[0, 1, 2, 3, 4, 5], sampler='probe', device='cpu', progress=False)
    generate.generate_images(net, str(tmp_path / 'a'), **kw)
    generate.generate_images(net, str(tmp_path / 'b'), class_idx=2, **kw)
    free, forced = probe_sampler
    assert torch.equal(free['latents'], forced['latents'])
    assert torch.equal(forced['labels'], torch.eye(4)[[2] * 6])
    # Random labels are one-hot and drawn from each seed's generator right after its latent.
    gen = torch.Generator().manual_seed(3)
    torch.randn([3, 8, 8], generator=gen)
    expected = int(torch.randint(4, size=[], generator=gen))
    assert free['labels'].sum(1).eq(1).all() and int(free['labels'][3].argmax()) == expected


def test_images_identical_across_batch_sizes(tmp_path):
    net = tiny_edm_net()
    kw = dict(seeds=[0, 1, 2], device='cpu', progress=False, num_steps=3, S_churn=5)
    generate.generate_images(net, str(tmp_path / 'a'), max_batch_size=3, **kw)
    generate.generate_images(net, str(tmp_path / 'b'), max_batch_size=2, **kw)
    for seed in range(3):
        a = np.asarray(PIL.Image.open(tmp_path / 'a' / f'{seed:06d}.png'))
        b = np.asarray(PIL.Image.open(tmp_path / 'b' / f'{seed:06d}.png'))
        assert np.array_equal(a, b)


def test_uint8_conversion_rounds_half_up():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, (100 - 127.5) / 127.5, (100.5 - 127.5) / 127.5],
                     dtype=torch.float64).view(1, 1, 1, -1)
    assert generate.to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 100, 101]


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_pngs(tmp_path, net_pkl):
    out = tmp_path / 'out'
    res = cli([f'--network={net_pkl}', f'--outdir={out}', '--seeds=0-2', '--batch=2', '--steps=2', '--device=cpu'])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == ['000000.png', '000001.png', '000002.png']
    img = PIL.Image.open(out / '000001.png')
    assert img.mode == 'RGB' and img.size == (8, 8)


def test_cli_subdirs_and_greyscale(tmp_path):
    pkl = tmp_path / 'grey.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=tiny_edm_net(channels=1)), f)
    out = tmp_path / 'out'
    res = cli([f'--network={pkl}', f'--outdir={out}', '--seeds=999-1001', '--subdirs', '--steps=2', '--device=cpu'])
    assert res.exit_code == 0, res.output
    assert os.path.isfile(out / '000000' / '000999.png')
    assert sorted(os.listdir(out / '001000')) == ['001000.png', '001001.png']
    assert PIL.Image.open(out / '001000' / '001001.png').mode == 'L'


def test_cli_ablation_options_select_ablation_sampler(tmp_path, net_pkl, monkeypatch):
    used = []
    monkeypatch.setattr(generate, 'ablation_sampler', lambda *a, **k: used.append(k) or torch.zeros_like(a[1]))
    res = cli([f'--network={net_pkl}', f'--outdir={tmp_path}', '--seeds=0', '--steps=4', '--disc=vp',
               '--device=cpu'])
    assert res.exit_code == 0, res.output
    assert used[0]['discretization'] == 'vp' and used[0]['num_steps'] == 4 and 'solver' not in used[0]


@pytest.mark.parametrize('args,message', [
    (['--steps=1'], 'NaN'),
    (['--sigma_min=5', '--sigma_max=1'], 'sigma_min must be below sigma_max'),
    (['--sigma_min=100'], 'sigma_min must be below sigma_max'),
    (['--class=0'], 'unconditional'),
    (['--sampler=probe', '--S_churn=1'], '--S_churn applies only to --sampler=aniso_sde|edm'),
    (['--probe-level=1'], '--probe-level applies only to --sampler=probe'),
])
def test_cli_bad_options(tmp_path, net_pkl, probe_sampler, args, message):
    res = cli([f'--network={net_pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0', '--device=cpu'] + args)
    assert res.exit_code != 0
    assert message in res.output and 'Traceback' not in res.output
    assert not os.path.exists(tmp_path / 'out' / '000000.png')


def test_cli_class_out_of_range(tmp_path, cond_pkl):
    res = cli([f'--network={cond_pkl}', f'--outdir={tmp_path}', '--seeds=0', '--class=4', '--device=cpu'])
    assert res.exit_code != 0 and 'out of range' in res.output and '4 classes' in res.output
    res = cli([f'--network={cond_pkl}', f'--outdir={tmp_path}', '--seeds=0', '--class=3', '--steps=2',
               '--device=cpu'])
    assert res.exit_code == 0, res.output


def test_cli_bad_pickles(tmp_path):
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(b'this is not a pickle')
    no_ema = tmp_path / 'noema.pkl'
    no_ema.write_bytes(pickle.dumps({'net': 1}))
    cases = [(tmp_path / 'missing.pkl', 'cannot read network pickle'), (junk, 'not a readable network pickle'),
             (no_ema, "'ema'")]
    for path, message in cases:
        res = cli([f'--network={path}', f'--outdir={tmp_path / "o"}', '--device=cpu'])
        assert res.exit_code != 0 and message in res.output and 'Traceback' not in res.output, res.output


def test_help_lists_sampler_options():
    res = cli(['--help'])
    assert res.exit_code == 0
    for spelled in ('--network', '--seeds', '--subdirs', '--class', '--batch', '--steps', '--sigma_min', '--sigma_max',
                    '--rho', '--S_churn', '--S_min', '--S_max', '--S_noise', '--solver', '--disc', '--schedule',
                    '--scaling', '--device', '--sampler'):
        assert spelled in res.output
    assert 'Options of --sampler=aniso_sde|edm' in res.output


# ---------------------------------------------------------------------------------------------------------------------
# Upstream EDM comparison (only with EDM_UPSTREAM=/path/to/NVlabs/edm checkout)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('EDM_UPSTREAM'), reason='set EDM_UPSTREAM to an NVlabs/edm checkout')
def test_matches_upstream_samplers(tmp_path, net_pkl):
    """Upstream's edm_sampler and ablation_sampler on our pickled tiny net (with and without churn) equal ours."""
    with open(net_pkl, 'rb') as f:
        net = pickle.load(f)['ema']
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    configs = [('edm', {}), ('edm', dict(S_churn=10, S_min=0.05, S_max=50, S_noise=1.003)), ('ablation', {}),
               ('ablation', dict(solver='euler', discretization='vp', schedule='vp', scaling='vp')),
               ('ablation', dict(discretization='ve', schedule='ve', S_churn=5)),
               ('ablation', dict(discretization='iddpm', S_churn=10)),
               ('ablation', dict(schedule='vp', scaling='vp', S_churn=20, alpha=0.5))]
    ours = []
    for kind, kw in configs:
        gen = generate.StackedRandomGenerator('cpu', [0, 1])
        fn = generate.edm_sampler if kind == 'edm' else generate.ablation_sampler
        ours.append(fn(net, latents, randn_like=gen.randn_like, num_steps=5, **kw))
    torch.save(dict(latents=latents, ours=ours, configs=configs), tmp_path / 'ours.pt')
    upstream = os.environ['EDM_UPSTREAM']
    script = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {upstream!r})
        import generate
        assert generate.__file__.startswith({upstream!r})
        with open({net_pkl!r}, 'rb') as f:
            net = pickle.load(f)['ema']
        d = torch.load({str(tmp_path / 'ours.pt')!r})
        worst = 0.0
        for (kind, kw), ours in zip(d['configs'], d['ours']):
            gen = generate.StackedRandomGenerator('cpu', [0, 1])
            fn = generate.edm_sampler if kind == 'edm' else generate.ablation_sampler
            diff = (fn(net, d['latents'], randn_like=gen.randn_like, num_steps=5, **kw) - ours).abs().max().item()
            print(kind, kw, 'max_abs_diff', diff)
            worst = max(worst, diff)
        assert worst < 1e-10, worst
    ''')
    res = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


@pytest.mark.slow
def test_two_process_generate_equals_one_process(tmp_path, net_pkl, repo_root):
    """torchrun with 2 CPU processes writes the same images as one process (seeds split over ranks as in EDM)."""
    args = [f'--network={net_pkl}', '--seeds=0-4', '--batch=2', '--steps=2', '--device=cpu']
    single = cli(args + [f'--outdir={tmp_path / "one"}'])
    assert single.exit_code == 0, single.output
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(repo_root, 'generate.py'), '--'] + args + [f'--outdir={tmp_path / "two"}'],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / 'one'))
    assert names == [f'{s:06d}.png' for s in range(5)] and sorted(os.listdir(tmp_path / 'two')) == names
    for name in names:
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'one' / name)),
                              np.asarray(PIL.Image.open(tmp_path / 'two' / name)))
