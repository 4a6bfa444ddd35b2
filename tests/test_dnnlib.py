"""Tests for dnnlib: EasyDict, open_url and its download cache, name lookup, Logger, formatting and parsing."""

import hashlib
import http.server
import io
import os
import socket
import sys
import threading
import time

import pytest

import dnnlib
from dnnlib import util

# ---------------------------------------------------------------------------------------------------------------------
# A local HTTP server (127.0.0.1 only) for the download path.


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}          # path -> (bytes, content-disposition name or None)
    failures_left: dict = {}  # path -> number of 500 answers still to give
    hits: dict = {}           # path -> number of requests seen

    delays: dict = {}         # path -> seconds to wait before answering, one entry used per request

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.delays.get(self.path):
            time.sleep(self.delays[self.path].pop(0))
        if self.failures_left.get(self.path, 0) > 0:
            self.failures_left[self.path] -= 1
            self.send_error(500)
            return
        if self.path not in self.files:
            self.send_error(404)
            return
        data, name = self.files[self.path]
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        if name is not None:
            self.send_header('Content-Disposition', f'attachment; filename="{name}"')
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (timeout tests)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.failures_left, _Handler.hits, _Handler.delays = {}, {}, {}, {}
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield httpd, f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# EasyDict


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing
    assert dnnlib.EasyDict is util.EasyDict


# ---------------------------------------------------------------------------------------------------------------------
# Cache directory


def test_cache_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setattr(util, '_cache_dir_override', None)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path / 'env'), 'downloads')
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path('x') == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib', 'x')
    monkeypatch.delenv('HOME')
    monkeypatch.setenv('USERPROFILE', str(tmp_path / 'prof'))
    assert util.make_cache_dir_path() == os.path.join(str(tmp_path / 'prof'), '.cache', 'dnnlib')
    monkeypatch.delenv('USERPROFILE')
    assert util.make_cache_dir_path('y').endswith(os.path.join('.cache', 'dnnlib', 'y'))
    util.set_cache_dir(str(tmp_path / 'explicit'))
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert util.make_cache_dir_path('z') == os.path.join(str(tmp_path / 'explicit'), 'z')
    assert dnnlib.make_cache_dir_path('z') == util.make_cache_dir_path('z')


# ---------------------------------------------------------------------------------------------------------------------
# open_url


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'data with space.bin'
    path.write_bytes(b'\x00\x01payload')
    with util.open_url(str(path)) as f:
        assert f.read() == b'\x00\x01payload'
    assert util.open_url(str(path), return_filename=True) == str(path)
    url = path.as_uri()  # file:///.../data%20with%20space.bin
    assert url.startswith('file://')
    with util.open_url(url) as f:
        assert f.read() == b'\x00\x01payload'
    assert os.path.samefile(util.open_url(url, return_filename=True), path)


def test_open_url_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        util.open_url(str(tmp_path / 'x'), num_attempts=0)
    with pytest.raises(ValueError):
        util.open_url('http://127.0.0.1:1/x', return_filename=True, cache=False)


def test_is_url():
    assert util.is_url('https://example.org/a.pkl')
    assert util.is_url('http://127.0.0.1:8000/a')
    assert not util.is_url('datasets/cifar.zip')
    assert not util.is_url(None)
    assert not util.is_url('file:///tmp/x')
    assert util.is_url('file:///tmp/x', allow_file_urls=True)


def test_open_url_http_download_and_cache(server, tmp_path):
    _, base = server
    _Handler.files['/net/model.pkl'] = (b'network bytes', None)
    url = base + '/net/model.pkl'
    cache_dir = tmp_path / 'cache'

    path = util.open_url(url, cache_dir=str(cache_dir), return_filename=True, verbose=False)
    # Cache entry named <md5(url)>_<url with characters outside 0-9a-zA-Z-._ replaced by '_'>.
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    sanitised = ''.join(c if (c.isascii() and c.isalnum()) or c in '-._' else '_' for c in url)
    assert os.path.basename(path) == f'{md5}_{sanitised}'
    assert os.path.dirname(path) == str(cache_dir)
    assert open(path, 'rb').read() == b'network bytes'
    assert _Handler.hits['/net/model.pkl'] == 1
    assert os.listdir(cache_dir) == [os.path.basename(path)]  # no temporary files left behind

    # Second open comes from the cache: no new request.
    with util.open_url(url, cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == b'network bytes'
    assert _Handler.hits['/net/model.pkl'] == 1


def test_open_url_default_cache_dir_and_content_disposition(server, tmp_path, monkeypatch):
    _, base = server
    monkeypatch.setattr(util, '_cache_dir_override', None)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'root'))
    _Handler.files['/dl?id=7'] = (b'abc', 'real name (1).npz')
    url = base + '/dl?id=7'
    path = util.open_url(url, return_filename=True, verbose=False)
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert path == os.path.join(str(tmp_path / 'root'), 'downloads', f'{md5}_real_name__1_.npz')


def test_open_url_without_cache_writes_nothing(server, tmp_path):
    _, base = server
    _Handler.files['/a.bin'] = (b'xyz', None)
    f = util.open_url(base + '/a.bin', cache_dir=str(tmp_path / 'c'), cache=False, verbose=False)
    assert isinstance(f, io.BytesIO) and f.read() == b'xyz'
    assert not (tmp_path / 'c').exists()


def test_open_url_retries(server, tmp_path, capsys):
    _, base = server
    _Handler.files['/flaky'] = (b'ok', None)
    _Handler.failures_left['/flaky'] = 2
    with util.open_url(base + '/flaky', cache_dir=str(tmp_path), num_attempts=3) as f:
        assert f.read() == b'ok'
    assert _Handler.hits['/flaky'] == 3
    assert 'Downloading' in capsys.readouterr().out

    _Handler.failures_left['/flaky2'] = 5
    _Handler.files['/flaky2'] = (b'ok', None)
    with pytest.raises(Exception):
        util.open_url(base + '/flaky2', cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    assert _Handler.hits['/flaky2'] == 2


def test_open_url_timeout_then_retry_succeeds(server, tmp_path):
    _, base = server
    _Handler.files['/slow'] = (b'late bytes', None)
    _Handler.delays['/slow'] = [1.5]            # the first answer comes far after the timeout; the second at once
    start = time.monotonic()
    with util.open_url(base + '/slow', cache_dir=str(tmp_path), num_attempts=3, timeout=0.2, verbose=False) as f:
        assert f.read() == b'late bytes'
    assert _Handler.hits['/slow'] == 2
    assert time.monotonic() - start < 1.2       # it did not wait for the slow answer


def test_open_url_gives_up_after_timeouts_with_one_error(server, tmp_path):
    _, base = server
    _Handler.files['/stuck'] = (b'never in time', None)
    _Handler.delays['/stuck'] = [0.6, 0.6]
    with pytest.raises(util.DownloadError, match=r'/stuck \(2 attempts\).*Timeout') as info:
        util.open_url(base + '/stuck', cache_dir=str(tmp_path), num_attempts=2, timeout=0.15, verbose=False)
    assert isinstance(info.value, IOError)
    assert _Handler.hits['/stuck'] == 2
    assert os.listdir(tmp_path) == []           # nothing cached, no temporary file left


def test_open_url_client_error_is_not_retried(server, tmp_path, capsys):
    _, base = server
    with pytest.raises(util.DownloadError, match=r'/nope \(1 attempt\): HTTP 404'):
        util.open_url(base + '/nope', cache_dir=str(tmp_path), num_attempts=5)
    assert _Handler.hits['/nope'] == 1
    assert capsys.readouterr().out.rstrip().endswith('failed')


def test_open_url_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as sock:               # a port that nothing listens on
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    with pytest.raises(util.DownloadError, match=r'\(2 attempts\).*ConnectionError'):
        util.open_url(f'http://127.0.0.1:{port}/x', cache_dir=str(tmp_path), num_attempts=2, timeout=2,
                      verbose=False)
    with pytest.raises(ValueError):
        util.open_url(f'http://127.0.0.1:{port}/x', timeout=0)


def test_open_url_without_requests_still_opens_local_files(tmp_path, monkeypatch):
    path = tmp_path / 'local.bin'
    path.write_bytes(b'here')
    monkeypatch.setitem(sys.modules, 'requests', None)  # `import requests` now raises ImportError
    with util.open_url(str(path)) as f:
        assert f.read() == b'here'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'here'
    with pytest.raises(ImportError, match='requests'):
        util.open_url('http://127.0.0.1:9/x', cache_dir=str(tmp_path / 'c'), verbose=False)


# ---------------------------------------------------------------------------------------------------------------------
# Objects by name


def test_construct_class_and_call_func_by_name():
    import collections
    import numpy as np
    import torch

    lin = util.construct_class_by_name(3, 2, class_name='torch.nn.Linear', bias=False)
    assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (2, 3) and lin.bias is None
    d = util.construct_class_by_name(class_name='dnnlib.EasyDict', x=1)
    assert isinstance(d, dnnlib.EasyDict) and d.x == 1
    assert util.get_obj_by_name('collections.OrderedDict') is collections.OrderedDict
    assert util.get_obj_by_name('np.float32') is np.float32  # 'np.' shorthand
    assert util.get_obj_by_name('dnnlib.util.EasyDict.__getattr__') is dnnlib.EasyDict.__getattr__  # nested attribute
    assert util.call_func_by_name(4, func_name='numpy.arange').tolist() == [0, 1, 2, 3]
    from training.registry import PrecondEntry
    assert util.get_obj_by_name('training.registry.PrecondEntry') is PrecondEntry
    with pytest.raises(ImportError):
        util.get_obj_by_name('training.no_such_module.Thing')
    with pytest.raises(ImportError):
        util.get_obj_by_name('dnnlib.util.NoSuchThing')
    with pytest.raises(ValueError):
        util.construct_class_by_name()
    with pytest.raises(ValueError):
        util.call_func_by_name(func_name='math.pi')  # not callable


def test_get_obj_by_name_surfaces_broken_module(tmp_path, monkeypatch):
    pkg = tmp_path / 'brokenpkg_for_dnnlib_test'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'mod.py').write_text('import a_module_that_is_not_installed_xyz\nclass C: pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match='a_module_that_is_not_installed_xyz'):
        util.get_obj_by_name('brokenpkg_for_dnnlib_test.mod.C')
    for name in [n for n in sys.modules if n.startswith('brokenpkg_for_dnnlib_test')]:
        monkeypatch.delitem(sys.modules, name)


def test_top_level_function_name():
    assert util.is_top_level_function(util.parse_int_list)
    assert util.get_top_level_function_name(util.parse_int_list) == 'dnnlib.util.parse_int_list'
    assert not util.is_top_level_function(lambda: 0)


# ---------------------------------------------------------------------------------------------------------------------
# Logger


def test_logger_tees_stdout_and_stderr(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    outer_stdout, outer_stderr = sys.stdout, sys.stderr
    logger = util.Logger(file_name=str(log), file_mode='w', should_flush=True)
    assert sys.stdout is logger and sys.stderr is logger
    print('hello stdout')
    print('hello stderr', file=sys.stderr)
    sys.stdout.write(b'bytes too\n')
    assert log.read_text() == 'hello stdout\nhello stderr\nbytes too\n'  # flushed while still open
    logger.close()
    assert sys.stdout is outer_stdout and sys.stderr is outer_stderr
    print('after close')
    assert 'after close' not in log.read_text()
    out = capsys.readouterr().out
    assert 'hello stdout' in out and 'hello stderr' in out and 'after close' in out

    with util.Logger(file_name=str(log), file_mode='a'):
        print('appended')
    assert log.read_text().endswith('bytes too\nappended\n')
    with util.Logger():  # no file: still a transparent pass-through
        print('no file')
    assert 'no file' in capsys.readouterr().out


def test_nested_loggers_restore_streams_in_order(tmp_path):
    outer_stdout, outer_stderr = sys.stdout, sys.stderr
    a = util.Logger(file_name=str(tmp_path / 'a.txt'))
    b = util.Logger(file_name=str(tmp_path / 'b.txt'))
    print('both')
    a.close()                                   # out of order: b still holds the streams and keeps them
    assert sys.stdout is b and sys.stderr is b
    print('only b')
    b.close()
    assert sys.stdout is a and a.file is None   # b hands back what it found, a closed pass-through
    print('after both')
    sys.stdout, sys.stderr = outer_stdout, outer_stderr
    assert (tmp_path / 'a.txt').read_text() == 'both\n'
    assert (tmp_path / 'b.txt').read_text() == 'both\nonly b\n'
    with util.Logger() as c:
        assert c.write('') == 0 and c.write(b'xy') == 2
    assert sys.stdout is outer_stdout


# ---------------------------------------------------------------------------------------------------------------------
# Formatting and parsing


def test_format_time():
    assert util.format_time(0) == '0s'
    assert util.format_time(59.4) == '59s'
    assert util.format_time(65) == '1m 05s'
    assert util.format_time(2 * 3600 + 3 * 60 + 7) == '2h 03m 07s'
    assert util.format_time(86400 + 2 * 3600 + 3 * 60 + 7) == '1d 02h 03m'
    assert util.format_time_brief(65) == '1m 05s'
    assert util.format_time_brief(2 * 3600 + 3 * 60 + 7) == '2h 03m'
    assert util.format_time_brief(3 * 86400 + 5 * 3600 + 59) == '3d 05h'


def test_parse_int_list():
    assert util.parse_int_list('1,2,5-10') == [1, 2] + list(range(5, 11))
    assert util.parse_int_list('0-63') == list(range(64))
    assert util.parse_int_list('7') == [7]
    assert util.parse_int_list(' 3 , 4-5 ') == [3, 4, 5]
    assert util.parse_int_list([4, 2]) == [4, 2]
    for bad in ['', '1,,2', 'a', '5-3', '1-2-3', '1.5']:
        with pytest.raises(ValueError):
            util.parse_int_list(bad)


def test_ask_yes_no_and_str_to_bool(capsys):
    answers = iter(['maybe', 'YES'])
    assert util.ask_yes_no('Overwrite?', input_fn=lambda: next(answers)) is True
    assert capsys.readouterr().out.count('Overwrite? [y/n]') == 2
    assert util.ask_yes_no('Q', input_fn=lambda: 'off') is False
    assert util.str_to_bool('t') and not util.str_to_bool('0')
    with pytest.raises(ValueError):
        util.str_to_bool('perhaps')


def test_dnnlib_does_not_need_distutils_or_requests():
    import subprocess
    code = ('import sys; sys.modules["distutils"] = None; sys.modules["requests"] = None; '
            'import dnnlib, dnnlib.util; print(dnnlib.util.parse_int_list("1-3"))')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[1, 2, 3]'
