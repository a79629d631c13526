"""Balancing methods, one file each, registered by name.

Every non-underscore module in this package is imported here, so a new method is one new file.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ._base import Method, MethodData, Stage, unwrap
from ._loop import run_stages
from ._registry import available_methods, build_method, method_class, method_options, register_method

for _info in _pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MethodData", "Stage", "unwrap", "available_methods", "build_method", "method_class",
           "method_options", "register_method", "run_stages"]
