"""Checkpoints: crash-safe writes, weights-only loads (never unpickle arbitrary objects).

A write goes to a temporary file with a name unique to the writer (process id and a random
suffix), is flushed and fsync'ed, then atomically renamed over the previous checkpoint, and the
folder is fsync'ed: at every instant ``checkpoint.pt`` is either the previous complete checkpoint or
the new complete one, whoever else writes into the folder and wherever the process is killed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files of ``path`` left by writers that no longer run (killed mid-write);
    a live writer's file (its process id still exists) is left alone. Returns what was removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (a file, or a run folder holding ``checkpoint.pt``) with ``weights_only=True``.

    Every failure is a ``CheckpointError`` naming the file: missing, empty, truncated, not a torch
    file, or holding objects other than tensors and plain containers (a pickle that would run code
    is refused without running it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(64)
        if not head.startswith(b"\x80"):  # neither torch's zip format nor its legacy pickle format
            kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
            raise CheckpointError(f"{path}: not a torch checkpoint ({size} bytes of {kind}, e.g. a config.yaml); "
                                  "give the run folder or its checkpoint.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain containers "
                              f"(loaded weights-only, nothing was executed): {first}") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file is a named error
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: truncated or damaged checkpoint ({size} bytes): {detail}") from None
        raise CheckpointError(f"{path}: not a torch checkpoint ({size} bytes; truncated or another kind of file): "
                              f"{detail}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, found {type(state).__name__}")
    return state


def load_run_state(path: str | Path) -> dict[str, Any]:
    """A training checkpoint written by ``Trainer``: its keys are checked, so a model-only file or
    another program's checkpoint is a named error instead of a ``KeyError`` later."""
    state = load_checkpoint(path)
    missing = [k for k in ("config", "epoch", "model", "method") if k not in state]
    if missing:
        where = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
        raise CheckpointError(f"{where}: not an equimodal training checkpoint (no {missing})")
    return state
