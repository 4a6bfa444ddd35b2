"""dnnlib: small helpers shared by every script (EDM-compatible import path, edm-interface.md §2.7, §7.1)."""

from . import util
from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path', 'util']
