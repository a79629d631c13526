"""Objects named by an import path, ``package.module:attribute`` or ``path/to/file.py:attribute``,
as the CLI takes a user's dataset builder (``--dataset``) and model factory (``model.factory``)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError


def is_import_path(text: str) -> bool:
    """Whether ``text`` looks like ``module:attribute`` (a registered name never holds a colon)."""
    module, sep, attr = text.partition(":")
    return bool(sep and module and attr)


def import_object(path: str, key: str) -> Any:
    """The object ``module:attribute`` names. A module not found on ``sys.path`` is looked for in the
    current directory too (as ``python -m`` would), so ``equimodal train --dataset my_data:build``
    works from the folder that holds ``my_data.py``. Errors name the config ``key`` and the path."""
    module_name, _, attr = path.partition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise ConfigError(f"{key}={path!r}: file {file} not found")
            spec = importlib.util.spec_from_file_location(f"_equimodal_user_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                cwd = os.getcwd()
                if exc.name != module_name.split(".")[0] or cwd in sys.path:
                    raise
                sys.path.insert(0, cwd)
                module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import: say which and why
        raise ConfigError(f"{key}={path!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
