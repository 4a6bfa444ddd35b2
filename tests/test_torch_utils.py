"""Tests for torch_utils.misc, torch_utils.distributed and torch_utils.training_stats (one process and two gloo
processes)."""

import itertools
import math
import os
import socket
import sys
import warnings

import numpy as np
import pytest
import torch

from torch_utils import distributed as dist
from torch_utils import misc, training_stats

# ---------------------------------------------------------------------------------------------------------------------
# pick_device


def test_pick_device():
    assert misc.pick_device('cpu') == torch.device('cpu')
    assert misc.pick_device(torch.device('cpu')) == torch.device('cpu')
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert misc.pick_device(None).type == expected
    with pytest.raises(ValueError, match='unknown device'):
        misc.pick_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            misc.pick_device('cuda')
    else:
        with pytest.raises(ValueError, match='CUDA device'):
            misc.pick_device(f'cuda:{torch.cuda.device_count()}')


# ---------------------------------------------------------------------------------------------------------------------
# constant, assert_shape, profiled_function, suppress_tracer_warnings


def test_constant_is_cached_and_broadcast():
    a = misc.constant([1.0, 2.0], shape=[3, 2])
    assert a.shape == (3, 2) and a.dtype == torch.get_default_dtype() and a.is_contiguous()
    assert torch.equal(a, torch.tensor([[1.0, 2.0]] * 3))
    assert misc.constant([1.0, 2.0], shape=[3, 2]) is a
    assert misc.constant([1.0, 2.0]) is not a
    b = misc.constant(np.eye(2), dtype=torch.float64)
    assert b.dtype == torch.float64 and torch.equal(b, torch.eye(2, dtype=torch.float64))
    assert misc.constant(np.eye(2), dtype=torch.float32) is not b


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, None, 4])
    with pytest.raises(AssertionError, match='dimensions'):
        misc.assert_shape(x, [2, 3])
    with pytest.raises(AssertionError, match='dimension 2'):
        misc.assert_shape(x, [2, 3, 5])


def test_profiled_function_and_tracer_warnings():
    @misc.profiled_function
    def add_one(x):
        return x + 1
    assert add_one.__name__ == 'add_one' and add_one(1) == 2
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with misc.suppress_tracer_warnings():
            warnings.warn('hidden', torch.jit.TracerWarning)
        warnings.warn('shown', torch.jit.TracerWarning)
    assert [str(w.message) for w in caught] == ['shown']
    assert warnings.filters == before
    assert misc.nan_to_num(torch.tensor([float('nan'), 1.0])).tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# InfiniteSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_infinite_sampler_without_window_repeats_one_permutation():
    n = 20
    stream = _take(misc.InfiniteSampler(range(n), seed=3, window_size=0), 3 * n)
    first = stream[:n]
    assert sorted(first) == list(range(n))
    assert first != list(range(n))  # shuffled
    assert stream[n:2 * n] == first and stream[2 * n:] == first
    assert _take(misc.InfiniteSampler(range(n), shuffle=False), 2 * n) == list(range(n)) * 2


def test_infinite_sampler_covers_dataset_and_is_reproducible():
    n = 25
    stream = _take(misc.InfiniteSampler(range(n), seed=1), 400 * n)
    assert all(isinstance(i, int) and 0 <= i < n for i in stream)
    assert set(stream[:10 * n]) == set(range(n))  # every item shows up
    counts = np.bincount(stream, minlength=n)
    assert counts.min() > 0.8 * 400 and counts.max() < 1.2 * 400  # long-run frequencies are near uniform
    assert stream == _take(misc.InfiniteSampler(range(n), seed=1), 400 * n)
    assert stream[:100] != _take(misc.InfiniteSampler(range(n), seed=2), 100)


def test_infinite_sampler_ranks_partition_the_global_stream():
    n, replicas, length = 17, 3, 300
    whole = _take(misc.InfiniteSampler(range(n), seed=5), length * replicas)
    for rank in range(replicas):
        part = _take(misc.InfiniteSampler(range(n), rank=rank, num_replicas=replicas, seed=5), length)
        assert part == whole[rank::replicas]


def test_infinite_sampler_reproduces_edm_streams():
    """tests/data/edm_sampler_streams.json holds the first 400 indices NVlabs/edm's own InfiniteSampler yields for each
    configuration (seed, size, window, rank of num_replicas, shuffle): the same data order as EDM, hence the same runs
    and exact resumes."""
    import json
    with open(os.path.join(os.path.dirname(__file__), 'data', 'edm_sampler_streams.json')) as f:
        records = json.load(f)
    assert len(records) >= 5
    for rec in records:
        config = dict(rec['config'])
        n = config.pop('n')
        assert _take(misc.InfiniteSampler(range(n), **config), len(rec['stream'])) == rec['stream'], rec['config']


def test_infinite_sampler_works_in_dataloader_and_validates():
    data = torch.arange(10).float()
    loader = torch.utils.data.DataLoader(data, sampler=misc.InfiniteSampler(data, seed=0), batch_size=4)
    batches = list(itertools.islice(iter(loader), 6))  # more than one pass
    assert all(b.shape == (4,) for b in batches)
    for bad in [dict(rank=2, num_replicas=2), dict(num_replicas=0), dict(window_size=1.5)]:
        with pytest.raises(ValueError):
            misc.InfiniteSampler(data, **bad)
    with pytest.raises(ValueError):
        misc.InfiniteSampler([])


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and buffers


def _tiny_net(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.SiLU(),
                              torch.nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[1].running_mean.normal_()
    return net


def test_params_and_buffers_lists():
    net = _tiny_net(0)
    pb = misc.params_and_buffers(net)
    named = misc.named_params_and_buffers(net)
    assert len(pb) == len(list(net.parameters())) + len(list(net.buffers()))
    assert [id(t) for t in pb] == [id(t) for _, t in named]
    assert named[0][0] == '0.weight' and named[-1][0] == '1.num_batches_tracked'
    with pytest.raises(ValueError):
        misc.params_and_buffers('not a module')


def test_copy_params_and_buffers():
    src, dst = _tiny_net(0), _tiny_net(1)
    assert not torch.equal(src[0].weight, dst[0].weight)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr()  # a copy, not shared storage

    # Destination with a tensor the source lacks: kept unless require_all.
    bigger = _tiny_net(2)
    bigger.register_buffer('extra', torch.full([3], 7.0))
    misc.copy_params_and_buffers(src, bigger)
    assert torch.equal(bigger[0].weight, src[0].weight) and torch.equal(bigger.extra, torch.full([3], 7.0))
    with pytest.raises(ValueError, match='extra'):
        misc.copy_params_and_buffers(src, bigger, require_all=True)

    wrong = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3))
    with pytest.raises(ValueError, match='shape mismatch'):
        misc.copy_params_and_buffers(src, wrong)


def test_ddp_helpers_single_process():
    net = _tiny_net(0)
    with misc.ddp_sync(net, sync=False):
        pass
    misc.check_ddp_consistency(net)  # no process group: nothing to compare, must not fail


def test_print_module_summary(capsys):
    net = _tiny_net(0)
    x = torch.randn(2, 3, 8, 8)
    out = misc.print_module_summary(net, [x])
    assert torch.equal(out, net(x))
    lines = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0] == ['Sequential', 'Parameters', 'Buffers', 'Output', 'shape', 'Datatype']
    rows = {r[0]: r for r in lines[2:-2]}
    assert rows['0'][1] == str(sum(p.numel() for p in net[0].parameters()))
    assert rows['1'][2] == str(sum(b.numel() for b in net[1].buffers()))
    assert ''.join(rows['3'][3:7]) == '[2,2,8,8]' and rows['3'][7] == 'float32'
    assert rows['2'][1:3] == ['-', '-']  # SiLU: no parameters or buffers, but a new output
    total = lines[-1]
    assert total[0] == 'Total'
    assert int(total[1]) == sum(p.numel() for p in net.parameters())
    assert int(total[2]) == sum(b.numel() for b in net.buffers())


# ---------------------------------------------------------------------------------------------------------------------
# training_stats (one process)


def test_collector_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=37), rng.normal(3.0, 2.0, size=(4, 5))
    collector = training_stats.Collector(regex=r'TestStats/.*')
    training_stats.report('TestStats/x', torch.as_tensor(a[:20]))
    training_stats.report('TestStats/x', a[20:].tolist())
    training_stats.report('TestStats/y', torch.as_tensor(b, dtype=torch.float32))
    training_stats.report('TestStats/empty', [])
    training_stats.report('Other/z', 1.0)
    collector.update()
    assert collector.names() == ['TestStats/x', 'TestStats/y', 'TestStats/empty']
    assert collector.num('TestStats/x') == 37
    assert collector.mean('TestStats/x') == pytest.approx(np.mean(a), rel=1e-12)
    assert collector.std('TestStats/x') == pytest.approx(np.std(a), rel=1e-10)
    b32 = b.astype(np.float32).astype(np.float64)
    assert collector['TestStats/y'] == pytest.approx(np.mean(b32), rel=1e-12)
    assert collector.std('TestStats/y') == pytest.approx(np.std(b32), rel=1e-10)
    assert collector.num('TestStats/empty') == 0 and np.isnan(collector.mean('TestStats/empty'))
    d = collector.as_dict()
    assert set(d) == {'TestStats/x', 'TestStats/y', 'TestStats/empty'}
    assert set(d['TestStats/x']) == {'num', 'mean', 'std'} and d['TestStats/x'].num == 37
    with pytest.raises(ValueError):
        collector.mean('Other/z')

    # Next interval: only the new values count; an idle statistic keeps its previous values.
    training_stats.report('TestStats/x', [5.0])
    collector.update()
    assert collector.num('TestStats/x') == 1 and collector.mean('TestStats/x') == 5.0
    assert collector.std('TestStats/x') == 0.0
    assert collector.num('TestStats/y') == 20

    fresh = training_stats.Collector(regex=r'TestStats/.*', keep_previous=False)
    training_stats.report('TestStats/x', [1.0, 3.0])
    fresh.update()
    collector.update()
    assert fresh.num('TestStats/y') == 0 and np.isnan(fresh.std('TestStats/y'))
    assert fresh.mean('TestStats/x') == 2.0 and fresh.std('TestStats/x') == 1.0
    assert collector.mean('TestStats/x') == 2.0  # both collectors see the same interval
    assert training_stats.report('TestStats/x', 4) == 4 and training_stats.report0('TestStats/x', 6) == 6
    fresh.update()
    assert fresh.num('TestStats/x') == 2  # report0 counts on rank 0


def test_nonfinite_std_is_nan():
    collector = training_stats.Collector(regex=r'TestNonFinite/.*')
    training_stats.report('TestNonFinite/v', [1.0, float('inf')])
    collector.update()
    assert collector.num('TestNonFinite/v') == 2 and np.isnan(collector.std('TestNonFinite/v'))


# ---------------------------------------------------------------------------------------------------------------------
# distributed (one process)


def test_distributed_single_process(monkeypatch):
    keys = ['MASTER_ADDR', 'MASTER_PORT', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE']
    monkeypatch.setattr(os, 'environ', {k: v for k, v in os.environ.items() if k not in keys})
    device = dist.init('cpu')
    assert device == torch.device('cpu') and dist.device() == device
    assert os.environ['WORLD_SIZE'] == '1' and os.environ['MASTER_PORT'] == '29500'
    assert os.environ['MASTER_ADDR'] == 'localhost' and os.environ['RANK'] == '0'
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and not dist.should_stop()
    assert not dist.is_initialized()  # one process: no process group, no port bound
    dist.update_progress(1, 2)
    dist.barrier()
    t = torch.tensor([1.0, 2.0])
    dist.all_reduce_mean_([t, None])
    dist.broadcast_(t)
    assert t.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        dist.all_reduce_mean_(torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        dist.init('no-such-device')


def test_print0(capsys):
    dist.print0('from rank zero')
    assert capsys.readouterr().out == 'from rank zero\n'


# ---------------------------------------------------------------------------------------------------------------------
# Two gloo processes


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, world_size):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    if sys.platform.startswith('linux'):
        os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')  # stay on loopback whatever the hostname resolves to
    torch.set_num_threads(1)
    try:
        assert dist.init('cpu') == torch.device('cpu')
        assert dist.is_initialized() and torch.distributed.get_backend() == 'gloo'
        assert dist.get_rank() == rank and dist.get_world_size() == world_size

        # training_stats: reduction over ranks equals numpy over the union of all ranks' values.
        values = [np.arange(5.0) * (r + 1) + r for r in range(world_size)]
        collector = training_stats.Collector(regex=r'Dist/.*')
        training_stats.report('Dist/v', torch.as_tensor(values[rank]))
        training_stats.report0('Dist/only0', [10.0 + rank, 20.0])
        training_stats.report('Dist/some', [3.0] if rank == 1 else [])
        collector.update()
        union = np.concatenate(values)
        assert collector.num('Dist/v') == union.size
        assert collector.mean('Dist/v') == pytest.approx(union.mean(), rel=1e-12)
        assert collector.std('Dist/v') == pytest.approx(union.std(), rel=1e-10)
        assert collector.num('Dist/only0') == 2 and collector.mean('Dist/only0') == 15.0
        assert collector.num('Dist/some') == 1 and collector.mean('Dist/some') == 3.0

        # all_reduce_mean_: averages in place, across dtypes and shapes.
        a = torch.full([2, 3], float(rank))
        b = torch.arange(4, dtype=torch.float64) * (rank + 1)
        dist.all_reduce_mean_([a, None, b])
        mean_rank = sum(range(world_size)) / world_size
        assert torch.equal(a, torch.full([2, 3], mean_rank))
        assert torch.allclose(b, torch.arange(4, dtype=torch.float64) * (world_size + 1) / 2)

        # broadcast_ (incl. bool and non-contiguous) then check_ddp_consistency.
        torch.manual_seed(rank)
        net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        net.register_buffer('flag', torch.tensor([rank == 0, True]))
        mat = torch.full([3, 4], float(rank)).t()
        dist.broadcast_(list(net.parameters()) + list(net.buffers()) + [mat])
        assert net.flag.tolist() == [True, True] and torch.equal(mat, torch.zeros(4, 3))
        misc.check_ddp_consistency(net)
        with torch.no_grad():
            net[0].bias[0] += rank
        if rank == 0:
            misc.check_ddp_consistency(net)  # rank 0 is always consistent with itself
        else:
            with pytest.raises(RuntimeError, match=r'Sequential\.0\.bias'):
                misc.check_ddp_consistency(net)
        misc.check_ddp_consistency(net, ignore_regex=r'.*\.bias')
        dist.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo():
    world_size = 2
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), world_size), nprocs=world_size, join=True)


def test_training_stats_reset_forgets_an_earlier_nan():
    """A NaN reported by an earlier run poisons the cumulative totals; reset() (called at the start of every
    training_loop) lets the next run's intervals read finite again."""
    from torch_utils import training_stats as ts
    ts.reset()
    ts.report('Test/reset_loss', [float('nan'), 1.0])
    ts.default_collector.update()
    ts.report('Test/reset_loss', [2.0, 4.0])
    ts.default_collector.update()
    assert math.isnan(ts.default_collector.mean('Test/reset_loss'))       # the poisoned totals, without reset
    ts.reset()
    ts.report('Test/reset_loss', [2.0, 4.0])
    ts.default_collector.update()
    assert ts.default_collector.mean('Test/reset_loss') == 3.0 and ts.default_collector.num('Test/reset_loss') == 2
    ts.reset()
