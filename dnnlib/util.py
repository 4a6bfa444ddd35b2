"""General helpers with EDM's `dnnlib.util` interface (edm-interface.md §1.1, §2.7, §7.1).

Contents: `EasyDict`; `Logger` (tee of stdout/stderr into a file); the download cache (`set_cache_dir`,
`make_cache_dir_path`, `open_url`, `is_url`); lookup of objects by dotted name (`get_obj_by_name`,
`call_func_by_name`, `construct_class_by_name`); and small formatting/parsing helpers (`format_time`,
`format_time_brief`, `ask_yes_no`, `parse_int_list`). Imports only the standard library at import time, so it
works on Python >= 3.12 (no `distutils`); `requests` is imported only when an http(s) URL is fetched.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import types
import urllib.parse
import uuid
from typing import IO, Any, Callable, Iterable, Optional, Union

# ---------------------------------------------------------------------------------------------------------------------
# EasyDict


class EasyDict(dict):
    """A `dict` whose keys can also be read and written as attributes (`d.lr` is `d['lr']`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ---------------------------------------------------------------------------------------------------------------------
# Logger


class Logger:
    """Tee `sys.stdout` and `sys.stderr` into a log file (EDM's `dnnlib.util.Logger`).

    While active, everything printed to stdout or stderr goes to the original stdout and, if `file_name` is given, to
    that file. `close()` (or leaving a `with` block) restores the streams it replaced and closes the file.
    """

    _STREAMS = ('stdout', 'stderr')

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'w', should_flush: bool = True) -> None:
        self.should_flush = should_flush
        self.file: Optional[IO[str]] = None if file_name is None else open(file_name, file_mode)
        # Remember what stood in sys.stdout / sys.stderr (as self.stdout / self.stderr, EDM's names), then take over.
        for name in self._STREAMS:
            setattr(self, name, getattr(sys, name))
            setattr(sys, name, self)

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _sinks(self) -> list:
        """Where text goes, in order: the log file (if open), then the original stdout."""
        return [sink for sink in (self.file, self.stdout) if sink is not None]

    def write(self, text: Union[str, bytes]) -> int:
        """Write `text` to the log file and the original stdout."""
        text = text.decode() if isinstance(text, bytes) else text
        if text:  # an empty write followed by flush crashes some IDE consoles: skip both
            for sink in self._sinks():
                sink.write(text)
            if self.should_flush:
                self.flush()
        return len(text)

    def flush(self) -> None:
        """Flush the log file and the original stdout."""
        for sink in self._sinks():
            sink.flush()

    def isatty(self) -> bool:
        """Report the terminal status of the original stdout (tqdm and click ask for it)."""
        return bool(getattr(self.stdout, 'isatty', lambda: False)())

    @property
    def encoding(self) -> str:
        return getattr(self.stdout, 'encoding', None) or 'utf-8'

    def close(self) -> None:
        """Flush, hand back each stream this logger still holds (a later logger may have taken one over since; it
        keeps it), and close the file."""
        self.flush()
        for name in self._STREAMS:
            if getattr(sys, name) is self:
                setattr(sys, name, getattr(self, name))
        file, self.file = self.file, None
        if file is not None:
            file.close()


# ---------------------------------------------------------------------------------------------------------------------
# Cache directory


_cache_dir_override: Optional[str] = None


def set_cache_dir(path: Optional[str]) -> None:
    """Make `path` the dnnlib cache root for this process (None goes back to the environment-based default)."""
    global _cache_dir_override
    _cache_dir_override = path


def make_cache_dir_path(*paths: str) -> str:
    """Join `paths` onto the cache root.

    The root is, in order: the value given to `set_cache_dir`, `$DNNLIB_CACHE_DIR`, `$HOME/.cache/dnnlib`,
    `%USERPROFILE%/.cache/dnnlib`, `<tempdir>/.cache/dnnlib` (edm-interface.md §1.1).
    """
    if _cache_dir_override is not None:
        root = _cache_dir_override
    elif 'DNNLIB_CACHE_DIR' in os.environ:
        root = os.environ['DNNLIB_CACHE_DIR']
    elif 'HOME' in os.environ:
        root = os.path.join(os.environ['HOME'], '.cache', 'dnnlib')
    elif 'USERPROFILE' in os.environ:
        root = os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib')
    else:
        root = os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib')
    return os.path.join(root, *paths)


# ---------------------------------------------------------------------------------------------------------------------
# URLs and the download cache


_SCHEME_RE = re.compile(r'^[a-z]+://')


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True if `obj` is a string naming a network URL (scheme and host); `file://` counts only if allowed."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if obj.startswith('file://'):
        return allow_file_urls
    try:
        parts = urllib.parse.urlparse(obj)
    except ValueError:
        return False
    return bool(parts.scheme) and bool(parts.netloc)


def _file_url_to_path(url: str) -> str:
    """Local path of a `file://` URL; `file:///c:/x` becomes `c:/x` so Windows drive letters survive."""
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if re.match(r'^/[a-zA-Z]:', path):
        path = path[1:]
    return path


def cache_file_name(url: str, name: Optional[str] = None) -> str:
    """Base name of the cache entry for `url`: `<md5(url)>_<name>`, where `name` (default: the URL itself) keeps only
    the characters `0-9a-zA-Z-._` (others become `_`) and at most 128 of them, as EDM names its cache files."""
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    safe = re.sub(r'[^0-9a-zA-Z\-._]', '_', url if name is None else name)[:128]
    return f'{digest}_{safe}'


class DownloadError(IOError):
    """A URL could not be fetched (after all attempts, or at once for an answer that a retry cannot change)."""


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})  # answers worth asking again


def _backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): 0.1 s doubling per attempt, at most 5 s."""
    return min(0.1 * 2 ** attempt, 5.0)


def _fetch_once(session: Any, url: str, timeout: float) -> tuple[bytes, str]:
    """One GET; returns (data, name) where name comes from Content-Disposition when present, else the URL.

    Raises DownloadError with `retry` set to whether another attempt could help.
    """
    import requests  # imported here so that dnnlib (and unpickling) works where requests is missing
    try:
        with session.get(url, timeout=timeout) as res:
            status = res.status_code
            data = res.content
            disposition = res.headers.get('Content-Disposition') or ''
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        raise _download_error(f'{type(err).__name__}: {err}', retry=True) from err
    if status >= 400:
        raise _download_error(f'HTTP {status}', retry=status in _RETRY_STATUS or status >= 500)
    if not data:
        raise _download_error('no data received', retry=True)
    named = re.search(r'filename="([^"]*)"', disposition)
    return data, (named.group(1) if named else url)


def _download_error(message: str, retry: bool) -> DownloadError:
    err = DownloadError(message)
    err.retry = retry
    return err


def _download(url: str, num_attempts: int, verbose: bool, timeout: float) -> tuple[bytes, str]:
    """Fetch `url` with `requests`, trying up to `num_attempts` times (with exponential backoff) while the failure is
    one a retry can cure: no connection, a timeout (`timeout` seconds to connect and between received bytes), a 5xx,
    408 or 429 answer, an empty body. Other answers (404, 403, ...) fail at once. Returns (data, name)."""
    try:
        import requests
    except ImportError as err:
        raise ImportError(f'open_url needs the requests package to fetch {url} (pip install requests)') from err
    progress = print if verbose else (lambda *args, **kwargs: None)
    progress(f'Downloading {url} ...', end='', flush=True)
    with requests.Session() as session:
        for attempt in range(num_attempts):
            try:
                result = _fetch_once(session, url, timeout)
            except DownloadError as err:
                if attempt + 1 < num_attempts and err.retry:
                    progress('.', end='', flush=True)
                    time.sleep(_backoff(attempt))
                    continue
                progress(' failed')
                tries = f'{attempt + 1} attempt' + ('s' if attempt else '')
                raise DownloadError(f'could not download {url} ({tries}): {err}') from err
            progress(' done')
            return result
    raise AssertionError('unreachable: num_attempts >= 1')


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 10, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, timeout: float = 60.0) -> Any:
    """Open a local path, a `file://` URL or an http(s) URL for binary reading (EDM's `dnnlib.util.open_url`).

    Downloads (through `requests`) are cached as `<cache_dir>/<md5(url)>_<sanitised name>`, with `cache_dir`
    defaulting to `make_cache_dir_path('downloads')`; a cached entry is reused without network access. With
    `return_filename=True` the path is returned instead of an open file (needs `cache=True` for URLs). A failed
    download is retried up to `num_attempts` times where a retry can help (see `_download`); `timeout` bounds each
    wait for the server, in seconds. The last failure raises `DownloadError` (an `IOError`) naming the URL.
    """
    if num_attempts < 1:
        raise ValueError(f'open_url: num_attempts must be >= 1, got {num_attempts}')
    if return_filename and not cache:
        raise ValueError('open_url: return_filename=True needs cache=True')
    if not timeout > 0:
        raise ValueError(f'open_url: timeout must be positive, got {timeout}')

    # Local path or file:// URL.
    if not _SCHEME_RE.match(url):
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        return path if return_filename else open(path, 'rb')
    if not is_url(url):
        raise ValueError(f'open_url: not a valid URL: {url!r}')

    # Cache lookup.
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        hits = glob.glob(os.path.join(glob.escape(cache_dir), digest + '_*'))
        if len(hits) == 1:
            return hits[0] if return_filename else open(hits[0], 'rb')

    # Download, then store atomically (write a temporary file, then rename).
    data, name = _download(url, num_attempts=num_attempts, verbose=verbose, timeout=timeout)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        target = os.path.join(cache_dir, cache_file_name(url, name))
        tmp = os.path.join(cache_dir, f'tmp_{uuid.uuid4().hex}_{os.path.basename(target)}')
        try:
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if return_filename:
            return target
    return io.BytesIO(data)


# ---------------------------------------------------------------------------------------------------------------------
# Objects by dotted name


def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    """Follow the attribute path `obj_name` ('' = the module itself) starting at `module`."""
    obj: Any = module
    for part in filter(None, obj_name.split('.')):
        obj = getattr(obj, part)
    return obj


def get_module_from_obj_name(obj_name: str) -> tuple[types.ModuleType, str]:
    """Split a dotted name into (imported module, attribute path inside it), trying the longest module prefix first.

    `np.` and `tf.` prefixes are expanded to `numpy.` and `tensorflow.`. An import error raised *inside* an existing
    module propagates (so a broken module is not mistaken for a missing name); otherwise `ImportError` names the
    object.
    """
    if not isinstance(obj_name, str) or not obj_name:
        raise ValueError(f'expected a dotted object name, got {obj_name!r}')
    obj_name = re.sub(r'^np\.', 'numpy.', obj_name)
    obj_name = re.sub(r'^tf\.', 'tensorflow.', obj_name)
    parts = obj_name.split('.')
    for cut in range(len(parts), 0, -1):
        module_name, attr_path = '.'.join(parts[:cut]), '.'.join(parts[cut:])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Missing module: try a shorter prefix, unless a module *inside* it failed to import.
            missing = err.name or ''
            if missing and missing != module_name and not module_name.startswith(missing + '.'):
                raise
            continue
        try:
            get_obj_from_module(module, attr_path)
        except AttributeError:
            continue
        return module, attr_path
    raise ImportError(f'cannot find a Python object named {obj_name!r}')


def get_obj_by_name(name: str) -> Any:
    """The Python object with the dotted name `name` (e.g. 'training.networks.EDMPrecond')."""
    module, attr_path = get_module_from_obj_name(name)
    return get_obj_from_module(module, attr_path)


def call_func_by_name(*args: Any, func_name: Optional[str] = None, **kwargs: Any) -> Any:
    """Look up the callable named `func_name` and call it with the remaining arguments."""
    if func_name is None:
        raise ValueError('call_func_by_name: func_name is required')
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise ValueError(f'{func_name!r} is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args: Any, class_name: Optional[str] = None, **kwargs: Any) -> Any:
    """Construct the class named `class_name` with the remaining arguments (how EDM builds nets, losses, datasets)."""
    if class_name is None:
        raise ValueError('construct_class_by_name: class_name is required')
    return call_func_by_name(*args, func_name=class_name, **kwargs)


def is_top_level_function(obj: Any) -> bool:
    """True if `obj` is a callable defined at module scope of its module."""
    module = sys.modules.get(getattr(obj, '__module__', None) or '')
    return callable(obj) and module is not None and getattr(module, getattr(obj, '__name__', ''), None) is obj


def get_top_level_function_name(obj: Any) -> str:
    """Dotted name of a top-level function (`__main__` replaced by the script's file name)."""
    if not is_top_level_function(obj):
        raise ValueError(f'{obj!r} is not a top-level function')
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return f'{module}.{obj.__name__}'


# ---------------------------------------------------------------------------------------------------------------------
# Formatting and parsing


def format_time(seconds: Union[int, float]) -> str:
    """Human-readable duration: '42s', '3m 07s', '2h 03m 07s', '1d 02h 03m' (EDM's format)."""
    s = int(round(float(seconds)))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {s // 60 % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {s // 3600 % 24:02d}h {s // 60 % 60:02d}m'


def format_time_brief(seconds: Union[int, float]) -> str:
    """Like `format_time` with the smallest unit dropped above one hour: '2h 03m', '1d 02h'."""
    s = int(round(float(seconds)))
    if s < 3600:
        return format_time(s)
    if s < 86400:
        return f'{s // 3600}h {s // 60 % 60:02d}m'
    return f'{s // 86400}d {s // 3600 % 24:02d}h'


_TRUE_WORDS = ('y', 'yes', 't', 'true', 'on', '1')
_FALSE_WORDS = ('n', 'no', 'f', 'false', 'off', '0')


def str_to_bool(text: str) -> bool:
    """Parse yes/no words the way `distutils.util.strtobool` did; ValueError for anything else."""
    word = str(text).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f'not a yes/no answer: {text!r}')


def ask_yes_no(question: str, input_fn: Callable[[], str] = input) -> bool:
    """Ask `question` on stdout until the answer parses as yes or no."""
    while True:
        print(f'{question} [y/n]')
        try:
            return str_to_bool(input_fn())
        except ValueError:
            pass


_RANGE_RE = re.compile(r'^\s*(-?\d+)\s*-\s*(-?\d+)\s*$')


def parse_int_list(s: Union[str, Iterable[int]]) -> list[int]:
    """Parse '1,2,5-10' into [1, 2, 5, 6, 7, 8, 9, 10] (inclusive ranges; used by --seeds and --cres).

    A list or tuple is returned as a list unchanged. ValueError names the bad item.
    """
    if isinstance(s, (list, tuple)):
        return [int(v) for v in s]
    if not isinstance(s, str):
        raise ValueError(f'expected a comma-separated list of integers, got {s!r}')
    values: list[int] = []
    for item in s.split(','):
        if not item.strip():
            raise ValueError(f'empty item in integer list {s!r}')
        m = _RANGE_RE.match(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f'range {item.strip()!r} in {s!r} is empty (end < start)')
            values.extend(range(lo, hi + 1))
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f'{item.strip()!r} in {s!r} is neither an integer nor a range like 5-10') from None
    return values


def _current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write a file through ``write(binary_file)`` into a temporary file in the same folder (created if needed), then
    rename it into place, so that a crash never leaves a truncated file behind (snapshots, states, bases, FID refs).
    The file gets the permissions a plain ``open(path, 'w')`` would (0644 under umask 022), not mkstemp's 0600.
    A kill can leave the temporary ``.<name>.<random>.tmp`` behind; train.py removes its own at start."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())   # mkstemp makes 0600; final files get what open() would give
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
