"""EDM's embedded-source pickle format (edm-interface.md §4.1)."""

import copy
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap

import pytest
import torch

from torch_utils import persistence

MODULE_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Scaler(torch.nn.Module):
        def __init__(self, channels, gain=2.0):
            super().__init__()
            self.gain = gain
            self.weight = torch.nn.Parameter(torch.arange(channels, dtype=torch.float32))
            self.register_buffer('offset', torch.ones(channels))

        def forward(self, x):
            return x * self.weight * self.gain + self.offset
''')


def _import_module_from(path, name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def scaler_module(tmp_path_factory):
    path = tmp_path_factory.mktemp('src') / 'tmp_scaler_mod.py'
    path.write_text(MODULE_SRC)
    module = _import_module_from(str(path), 'tmp_scaler_mod')
    yield module
    sys.modules.pop('tmp_scaler_mod', None)


def test_meta_layout_and_globals(scaler_module):
    obj = scaler_module.Scaler(3, gain=0.5)
    assert persistence.is_persistent(obj) and persistence.is_persistent(type(obj))
    assert obj.init_args == (3,) and obj.init_kwargs == {'gain': 0.5}
    func, (meta,) = obj.__reduce__()
    assert func is persistence._reconstruct_persistent_obj
    assert set(meta) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert meta['version'] == 6 and meta['type'] == 'class' and meta['class_name'] == 'Scaler'
    assert meta['module_src'] == MODULE_SRC
    assert meta['state']['_init_kwargs'] == {'gain': 0.5}
    # The pickle names no module of ours except the reconstruct function (the class itself is not referenced).
    data = pickle.dumps({'ema': obj})
    globals_used = {arg for op, arg, _ in pickletools.genops(data) if op.name in ('GLOBAL', 'STACK_GLOBAL') and arg}
    strings = [arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    assert 'tmp_scaler_mod' not in strings
    assert not any('tmp_scaler_mod' in str(g) for g in globals_used)


def test_round_trip_and_deepcopy_same_process(scaler_module):
    obj = scaler_module.Scaler(4)
    x = torch.randn(2, 4)
    clone = pickle.loads(pickle.dumps(obj))
    assert type(clone) is type(obj)  # the same source maps back to the already loaded module
    torch.testing.assert_close(clone(x), obj(x), rtol=0, atol=0)
    dup = copy.deepcopy(obj)
    assert type(dup) is type(obj) and dup.weight is not obj.weight
    torch.testing.assert_close(dup(x), obj(x), rtol=0, atol=0)


def test_loads_in_fresh_process_without_the_defining_module(scaler_module, tmp_path, repo_root):
    obj = scaler_module.Scaler(3, gain=3.0)
    with torch.no_grad():
        obj.weight.add_(0.25)
    pkl = tmp_path / 'net.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'ema': obj, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}}, f)
    os.remove(scaler_module.__file__)  # the defining code is gone
    sys.modules.pop('tmp_scaler_mod')
    script = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {repo_root!r})
        net = pickle.load(open({str(pkl)!r}, 'rb'))['ema']
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        print(net(torch.ones(1, 3)).tolist())
        print(net.init_kwargs)
    ''')
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, check=True)
    expected = obj(torch.ones(1, 3)).tolist()
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(expected)
    assert lines[1] == str({'gain': 3.0})


def test_import_hook_can_patch_source(scaler_module, monkeypatch):
    obj = scaler_module.Scaler(2)
    data = pickle.dumps(obj)
    seen = []

    def hook(meta):
        seen.append(meta.class_name)
        meta.module_src = meta.module_src.replace('* self.gain', '* self.gain * 10')
        return meta

    monkeypatch.setattr(persistence, '_import_hooks', [hook])
    patched = pickle.loads(data)
    assert seen == ['Scaler']
    x = torch.ones(1, 2)
    torch.testing.assert_close(patched(x) - obj.offset, (obj(x) - obj.offset) * 10)


def test_bad_version_is_refused(scaler_module):
    _, (meta,) = scaler_module.Scaler(2).__reduce__()
    meta['version'] = 5
    with pytest.raises(ValueError, match='version'):
        persistence._reconstruct_persistent_obj(meta)


@pytest.mark.skipif(not os.environ.get('EDM_UPSTREAM'), reason='set EDM_UPSTREAM to an NVlabs/edm checkout')
def test_our_pickle_loads_with_upstream_edm_persistence(scaler_module, tmp_path):
    obj = scaler_module.Scaler(3)
    pkl = tmp_path / 'net.pkl'
    pkl.write_bytes(pickle.dumps({'ema': obj}))
    script = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {os.environ['EDM_UPSTREAM']!r})
        import torch_utils.persistence as p
        assert 'edm' in p.__file__ or {os.environ['EDM_UPSTREAM']!r} in p.__file__
        net = pickle.load(open({str(pkl)!r}, 'rb'))['ema']
        print(net(torch.ones(1, 3)).tolist())
    ''')
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(obj(torch.ones(1, 3)).tolist())


@pytest.mark.skipif(not os.environ.get('EDM_UPSTREAM'), reason='set EDM_UPSTREAM to an NVlabs/edm checkout')
def test_upstream_edm_pickle_loads_with_our_persistence(tmp_path, repo_root):
    """A snapshot written by EDM's own code (tiny EDMPrecond) loads and runs through our torch_utils."""
    pkl = tmp_path / 'edm.pkl'
    make = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {os.environ['EDM_UPSTREAM']!r})
        from training.networks import EDMPrecond
        torch.manual_seed(0)
        net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet',
                         model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]).eval()
        x = torch.randn(2, 3, 8, 8); sigma = torch.tensor([0.5, 3.0])
        with torch.no_grad():
            ref = net(x, sigma)
        pickle.dump({{'ema': net, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {{}}}}, open({str(pkl)!r}, 'wb'))
        torch.save({{'x': x, 'sigma': sigma, 'ref': ref}}, {str(tmp_path / 'io.pt')!r})
    ''')
    subprocess.run([sys.executable, '-c', make], cwd=tmp_path, check=True, capture_output=True)
    use = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {repo_root!r})
        import torch_utils.persistence as p
        assert p.__file__.startswith({repo_root!r})
        net = pickle.load(open({str(pkl)!r}, 'rb'))['ema']
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            out = net(io['x'], io['sigma'])
        print(float((out - io['ref']).abs().max()))
    ''')
    out = subprocess.run([sys.executable, '-c', use], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) == 0.0


def test_wrapped_class_identity_and_recorded_arguments(scaler_module):
    cls = scaler_module.Scaler
    assert cls.__name__ == 'Scaler' and cls.__qualname__ == 'Scaler' and cls.__module__ == 'tmp_scaler_mod'
    assert persistence.persistent_class(cls) is cls                      # decorating twice is a no-op
    assert issubclass(cls, torch.nn.Module) and cls.__mro__[1].__name__ == 'Scaler'
    assert cls._orig_module_src == MODULE_SRC and cls._orig_class_name == 'Scaler'
    gains = [1.0, 2.0]
    obj = cls(2, gain=gains)
    gains.append(3.0)                                                    # recorded arguments are deep copies
    assert obj.init_kwargs == {'gain': [1.0, 2.0]}
    obj.init_kwargs['gain'].append(9.0)                                  # and so is what the properties hand out
    assert obj.init_kwargs == {'gain': [1.0, 2.0]} and obj.init_args == (2,)
    # Unpickling the same source twice defines the class once; a different source gets its own module.
    again = pickle.loads(pickle.dumps(cls(2)))
    assert type(again) is cls
    _, (meta,) = cls(2).__reduce__()
    meta['module_src'] = MODULE_SRC + '\n# another version\n'
    other = persistence._reconstruct_persistent_obj(meta)
    assert type(other) is not cls and type(other).__module__.startswith('_imported_module_')
    assert type(persistence._reconstruct_persistent_obj(dict(meta))) is type(other)


def test_persistent_class_refuses_non_classes():
    with pytest.raises(TypeError):
        persistence.persistent_class(lambda: None)
