"""Output paths checked before any work starts: every command that writes (``train --out``,
``bench --out``, ``diagnose --out``, ``report --output``, ``data prepare --out``) calls one of these
first, so an unusable path ends in ``error: cannot write PATH: <reason>`` instead of an ``OSError``
after the data and model are built (or a run's first epoch).

Nothing is created: the nearest existing folder above the path must be a folder we can create
files in (tried with a temporary file, removed at once: permission bits alone do not tell, e.g. for
root or a read-only mount), and every part still to be made must be a name the file system takes.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import OutputError

__all__ = ["check_writable_dir", "check_writable_file"]


def _show(path: Path | str, limit: int = 120) -> str:
    """A path for a one-line message (a 300-character name is cut)."""
    text = str(path)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower() if isinstance(exc, OSError) else str(exc)


def _existing_parent(path: Path) -> tuple[Path, list[str]]:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) and the parts below it to make."""
    missing: list[str] = []
    node = path
    while True:
        try:
            os.stat(node)
            return node, missing[::-1]
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            pass  # a file in the middle: reported below, where the walk stops at it
        except OSError as exc:
            raise OutputError(f"cannot write {_show(path)}: {_reason(exc)}") from None
        if node.parent == node:
            return node, missing[::-1]
        missing.append(node.name)
        node = node.parent


def _probe(folder: Path, target: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".equimodal-write-check-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {_show(target)}: {_show(folder)} does not take new files ({_reason(exc)})") from None
    os.close(fd)
    os.unlink(name)


def _check_names(base: Path, missing: list[str], target: Path) -> None:
    try:
        longest = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        longest = 255
    for part in missing:
        if len(os.fsencode(part)) > longest:
            raise OutputError(f"cannot write {_show(target)}: a name of {len(os.fsencode(part))} bytes, "
                              f"where this file system takes at most {longest} (file name too long)")
    if len(os.fsencode(str(target.absolute()))) >= 4096:
        raise OutputError(f"cannot write {_show(target)}: {os.strerror(errno.ENAMETOOLONG).lower()}")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is (or can be made as) a folder to write into; else ``OutputError``."""
    target = Path(path)
    if not str(path).strip():
        raise OutputError("cannot write '': an empty path")
    base, missing = _existing_parent(target)
    if not base.is_dir():
        raise OutputError(f"cannot write {_show(target)}: {_show(base)} is not a folder")
    _check_names(base, missing, target)
    _probe(base, target)
    return target


def check_writable_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if a file can be written there (its folder exists or can be made, and
    it is not itself a folder); else ``OutputError``."""
    target = Path(path)
    if not str(path).strip():
        raise OutputError("cannot write '': an empty path")
    parent = target.parent if str(target.parent) else Path(".")
    try:
        check_writable_dir(parent)
    except OutputError as exc:
        raise OutputError(str(exc).replace(f"cannot write {_show(parent)}", f"cannot write {_show(target)}", 1)) from None
    _check_names(parent, [target.name], target)
    if target.is_dir():
        raise OutputError(f"cannot write {_show(target)}: it is a folder; give a file name (e.g. {target / 'report.html'})")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"cannot write {_show(target)}: {os.strerror(errno.EACCES).lower()}")
    return target
