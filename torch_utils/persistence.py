"""Self-contained pickles in EDM's format (edm-interface.md §4.1).

An instance of a class decorated with :func:`persistent_class` pickles as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` is a plain dict

    {'type': 'class', 'version': 6, 'module_src': <full text of the defining module>,
     'class_name': <name>, 'state': <the instance's __dict__>}

so a pickle carries the source of every class it needs and loads in a process that lacks (or has a different version
of) the code that wrote it. Loading runs that source: only unpickle files you trust.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types
import uuid
from typing import Any, Callable

FORMAT_VERSION = 6  # EDM's loader accepts exactly this value.


class _SourceTable:
    """Two-way map between module objects and the source text they were built from.

    A module imported the ordinary way is read with `inspect.getsource` once, on first use. A source text that arrives
    inside a pickle and is not known yet is run in a fresh module named `_imported_module_<hex>`; the same text later
    maps back to that module, so loading many pickles of one version defines its classes once.
    """

    def __init__(self) -> None:
        self.text: dict[types.ModuleType, str] = {}
        self.module: dict[str, types.ModuleType] = {}

    def remember(self, module: types.ModuleType, text: str) -> None:
        self.text[module] = text
        self.module.setdefault(text, module)

    def text_of(self, module: types.ModuleType) -> str:
        if module not in self.text:
            self.remember(module, inspect.getsource(module))
        return self.text[module]

    def module_for(self, text: str) -> types.ModuleType:
        known = self.module.get(text)
        if known is not None:
            return known
        fresh = types.ModuleType(f'_imported_module_{uuid.uuid4().hex}')
        sys.modules[fresh.__name__] = fresh
        self.remember(fresh, text)  # before running it: persistent_class() inside the text looks the module up
        exec(compile(text, f'<persistent source {fresh.__name__}>', 'exec'), fresh.__dict__)  # noqa: S102
        return fresh


_sources = _SourceTable()
_persistent_classes: set[type] = set()                     # every class produced by persistent_class
_import_hooks: list[Callable[[Any], Any]] = []


def _recorded_args(self) -> tuple:
    return copy.deepcopy(self._init_args)


def _recorded_kwargs(self) -> dict:
    return copy.deepcopy(self._init_kwargs)


def _persistent_reduce(self, protocol: Any = None) -> tuple:
    """Pickle as `_reconstruct_persistent_obj(meta)`: the module's source, the class name and the instance state."""
    getstate = getattr(self, '__getstate__', None)
    state = (getstate() if callable(getstate) else self.__dict__) or {}
    meta = dict(type='class', version=FORMAT_VERSION, module_src=self._orig_module_src,
                class_name=self._orig_class_name, state=dict(state))
    return _reconstruct_persistent_obj, (meta,)


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances remember their constructor arguments and pickle with their module's source.

    The returned class is a subclass of ``orig_class`` with the same name and module, and exposes ``init_args`` and
    ``init_kwargs`` (deep copies of what the constructor received).
    """
    if not isinstance(orig_class, type):
        raise TypeError('persistent_class() expects a class')
    if orig_class in _persistent_classes:
        return orig_class

    def __init__(self, *args, **kwargs):
        super(wrapped, self).__init__(*args, **kwargs)
        self._init_args = copy.deepcopy(args)
        self._init_kwargs = copy.deepcopy(kwargs)

    namespace = {
        '__init__': __init__,
        '__module__': orig_class.__module__,
        '__qualname__': orig_class.__qualname__,
        '__doc__': orig_class.__doc__,
        '__reduce__': _persistent_reduce,
        '__reduce_ex__': _persistent_reduce,
        'init_args': property(_recorded_args),
        'init_kwargs': property(_recorded_kwargs),
        '_orig_module_src': _sources.text_of(sys.modules[orig_class.__module__]),
        '_orig_class_name': orig_class.__name__,
    }
    wrapped = type(orig_class)(orig_class.__name__, (orig_class,), namespace)
    _persistent_classes.add(wrapped)
    return wrapped


def is_persistent(obj: Any) -> bool:
    """True for a persistent class or an instance of one."""
    try:
        if obj in _persistent_classes:
            return True
    except TypeError:
        pass
    return type(obj) in _persistent_classes


def import_hook(hook: Callable[[Any], Any]) -> None:
    """Register ``hook(meta) -> meta``, called on every persistent object before its source is run.

    A hook may patch ``meta.module_src`` (e.g. to fix code in old pickles) and must return the meta it wants used.
    """
    if not callable(hook):
        raise TypeError('import_hook() expects a callable')
    _import_hooks.append(hook)


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Unpickling entry point: rebuild one persistent object from its meta (the only global pickles reference)."""
    from dnnlib import EasyDict  # deferred: dnnlib imports nothing from here, but keep start-up light
    meta = EasyDict(meta)
    meta.state = EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise ValueError('a persistence import hook returned None instead of the meta')
    if meta.version != FORMAT_VERSION:
        raise ValueError(f'unsupported persistent object version {meta.version!r} (expected {FORMAT_VERSION})')
    if meta.type != 'class':
        raise ValueError(f'unsupported persistent object type {meta.type!r}')
    module = _sources.module_for(meta.module_src)
    try:
        orig_class = module.__dict__[meta.class_name]
    except KeyError:
        raise ValueError(f'pickled source does not define class {meta.class_name!r}') from None
    cls = persistent_class(orig_class)
    obj = cls.__new__(cls)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj
