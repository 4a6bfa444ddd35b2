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

_module_src_by_module: dict[types.ModuleType, str] = {}   # module object -> its source text
_module_by_src: dict[str, types.ModuleType] = {}          # source text -> module (exec'd or original)
_persistent_classes: set[type] = set()                     # every class produced by persistent_class
_import_hooks: list[Callable[[Any], Any]] = []


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances remember their constructor arguments and pickle with their module's source.

    The returned class is a subclass of ``orig_class`` with the same name and module, and exposes ``init_args`` and
    ``init_kwargs`` (deep copies of what the constructor received).
    """
    if not isinstance(orig_class, type):
        raise TypeError('persistent_class() expects a class')
    if orig_class in _persistent_classes:
        return orig_class
    module = sys.modules[orig_class.__module__]
    module_src = _source_of_module(module)

    class Persistent(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self) -> tuple:
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dict:
            return copy.deepcopy(self._init_kwargs)

        def __reduce__(self):
            getstate = getattr(self, '__getstate__', None)
            state = getstate() if callable(getstate) else self.__dict__
            state = {} if state is None else state
            meta = dict(type='class', version=FORMAT_VERSION, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=dict(state))
            return _reconstruct_persistent_obj, (meta,)

        def __reduce_ex__(self, protocol):
            return self.__reduce__()

    Persistent.__name__ = orig_class.__name__
    Persistent.__qualname__ = orig_class.__qualname__
    Persistent.__module__ = orig_class.__module__
    Persistent.__doc__ = orig_class.__doc__
    _persistent_classes.add(Persistent)
    return Persistent


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
    module = _module_from_source(meta.module_src)
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


def _source_of_module(module: types.ModuleType) -> str:
    src = _module_src_by_module.get(module)
    if src is None:
        src = inspect.getsource(module)
        _module_src_by_module[module] = src
        _module_by_src.setdefault(src, module)
    return src


def _module_from_source(src: str) -> types.ModuleType:
    """The module for this exact source text: the already loaded one if any, else a fresh module running it."""
    module = _module_by_src.get(src)
    if module is None:
        name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(name)
        sys.modules[name] = module
        # Register before running, so persistent_class() inside the source finds it.
        _module_src_by_module[module] = src
        _module_by_src[src] = module
        exec(compile(src, f'<persistent source {name}>', 'exec'), module.__dict__)  # noqa: S102 (trusted pickles)
    return module
