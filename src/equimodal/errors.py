"""The library's own error types. The CLI turns each into one line and exit code 2; any other
exception is a bug and keeps its traceback.

Each subclasses the built-in type that older code (and users) catch, so ``except ValueError`` still
works: a ``ConfigError`` is a ``ValueError``, a missing file is a ``FileNotFoundError``.
"""
from __future__ import annotations


class EquimodalError(Exception):
    """Base class: a mistake in input, configuration, data or environment, explained in one line."""


class ConfigError(EquimodalError, ValueError):
    """A configuration key or value is invalid (the message names the key)."""


class DataError(EquimodalError, ValueError):
    """A data file or folder is missing, unreadable or inconsistent (the message names the file)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder that should exist does not."""


class CheckpointError(EquimodalError, ValueError):
    """A checkpoint is missing, truncated, not a checkpoint, or holds something other than tensors."""


class RunFolderError(EquimodalError, ValueError):
    """An output folder already holds another run (or a bench cell holds a run of another config)."""


class NonFiniteError(EquimodalError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient."""


class UnsupportedMethodError(EquimodalError, ValueError):
    """A method cannot run under a given loop or integration (the message says what to use instead)."""


class OutputError(EquimodalError, OSError):
    """An output path cannot be written (not a folder, no permission, a name too long); checked before any work."""
