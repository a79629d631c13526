"""Experiment loggers of a run (``train.loggers``): every per-epoch figure, the methods' per-step
traces (``Method.step_log``: OGM's k and rho per modality at every optimizer step) and the final
summary, written to the run folder (and to TensorBoard / Weights & Biases when asked).

``metrics.jsonl`` and ``summary.json`` are always written by the trainer (bench, report and
``--resume`` read them); the loggers add:

==============  =====================================================================================
``jsonl``       ``steps.jsonl``: one object per optimizer step (``step``, ``epoch``, ``stage``, figures)
``csv``         ``metrics.csv`` (one row per epoch, nested figures flattened as ``a/b``), ``steps.csv``
                (long format: ``step,epoch,stage,name,value``), ``summary.csv`` (``name,value``)
``tensorboard`` ``tensorboard/`` event files (``pip install "equimodal[tensorboard]"``): epoch figures
                and the summary at the optimizer-step count where they were taken, traces as ``step/<name>``
``wandb``       a Weights & Biases run in ``wandb/`` (``pip install "equimodal[wandb]"``), offline
                unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it later); project from
                ``WANDB_PROJECT`` (default ``equimodal``)
==============  =====================================================================================

Every logger uses one x-axis, the number of optimizer steps taken so far, so a resumed run
continues its curves (TensorBoard purges what the killed run wrote after its last checkpoint).
Per-step figures are kept on the device during an epoch and converted once at its end: no host
sync per step. Only rank 0 of a data-parallel run logs.
"""
from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import LOGGERS
from ..errors import ConfigError

__all__ = ["RunLoggers", "flatten", "LOGGERS"]


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested figures as one level: ``{"val_acc_by_modality": {"audio": 0.8}}`` ->
    ``{"val_acc_by_modality/audio": 0.8}``; lists and strings are kept as they are."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a flattened record (booleans and NaN-free checks left to the reader)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Logger:
    #: records per-step traces
    wants_steps = True

    def open(self, out_dir: Path, cfg: dict, history: list[dict], step: int, resumed: bool) -> None:
        """Before the first epoch (or the first epoch after a resume, at optimizer step ``step``)."""

    def epoch(self, record: dict[str, Any], step: int) -> None:
        """After each epoch: its record (``metrics.jsonl``'s line), taken at optimizer step ``step``."""

    def steps(self, rows: list[dict[str, Any]]) -> None:
        """After each epoch: its per-step rows (``step``, ``epoch``, ``stage`` and the figures)."""

    def summary(self, summary: dict[str, Any], step: int) -> None:
        """Once, at the end: ``summary.json``'s content."""

    def close(self) -> None:
        """After the summary (flush and release files)."""


class _Jsonl(_Logger):
    def open(self, out_dir, cfg, history, step, resumed):
        self.path = Path(out_dir) / "steps.jsonl"
        kept = []
        if resumed and self.path.is_file():  # drop steps a killed run wrote after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def steps(self, rows):
        with open(self.path, "a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)


class _Csv(_Logger):
    def open(self, out_dir, cfg, history, step, resumed):
        self.dir = Path(out_dir)
        self.history = [flatten(r) for r in history]  # metrics.csv is rewritten from it (columns may grow)
        self._write_metrics()
        self.steps_path = self.dir / "steps.csv"
        kept: list[list[str]] = []
        if resumed and self.steps_path.is_file():
            with open(self.steps_path, newline="") as fh:
                kept = [row for row in csv.reader(fh)][1:]
            kept = [row for row in kept if int(row[0]) <= step]
        with open(self.steps_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "epoch", "stage", "name", "value"])
            writer.writerows(kept)

    def _write_metrics(self) -> None:
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        with open(self.dir / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
                             for row in self.history)

    def epoch(self, record, step):
        self.history.append(flatten(record))
        self._write_metrics()

    def steps(self, rows):
        with open(self.steps_path, "a", newline="") as fh:
            writer = csv.writer(fh)
            for row in rows:
                for name, value in row.items():
                    if name not in ("step", "epoch", "stage"):
                        writer.writerow([row["step"], row["epoch"], row["stage"], name, value])

    def summary(self, summary, step):
        with open(self.dir / "summary.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["name", "value"])
            for k, v in flatten({k: v for k, v in summary.items() if k != "stages"}).items():
                writer.writerow([k, json.dumps(v) if isinstance(v, (list, dict)) else v])


class _TensorBoard(_Logger):
    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.loggers: 'tensorboard' needs the tensorboard package: "
                              "pip install 'equimodal[tensorboard]'") from None
        self._writer_class = SummaryWriter

    def open(self, out_dir, cfg, history, step, resumed):
        # purge_step: events a killed run wrote after its last checkpoint are hidden on resume
        self.writer = self._writer_class(str(Path(out_dir) / "tensorboard"), purge_step=step + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("config", "```\n" + json.dumps(cfg, indent=2) + "\n```", 0)

    def epoch(self, record, step):
        for k, v in numbers(flatten(record)).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def steps(self, rows):
        for row in rows:
            for k, v in row.items():
                if k not in ("step", "epoch", "stage"):
                    self.writer.add_scalar(f"step/{k}", v, row["step"])

    def summary(self, summary, step):
        for k, v in numbers(flatten({k: v for k, v in summary.items() if k != "stages"})).items():
            self.writer.add_scalar(f"summary/{k}", v, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", step)

    def close(self):
        self.writer.close()


class _Wandb(_Logger):
    def __init__(self) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.loggers: 'wandb' needs the wandb package: pip install 'equimodal[wandb]'") from None
        self.wandb = wandb

    def open(self, out_dir, cfg, history, step, resumed):
        out_dir = Path(out_dir)
        id_file = out_dir / "wandb_id"  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "equimodal"), dir=str(out_dir),
                                   mode=os.environ.get("WANDB_MODE", "offline"), id=run_id, resume="allow",
                                   config=cfg, name=out_dir.name, reinit="finish_previous")

    def steps(self, rows):
        for row in rows:
            self.run.log({f"step/{k}": v for k, v in row.items() if k not in ("step", "epoch", "stage")},
                         step=row["step"])

    def epoch(self, record, step):
        self.run.log(numbers(flatten(record)), step=step)

    def summary(self, summary, step):
        self.run.summary.update(flatten({k: v for k, v in summary.items() if k != "stages"}))

    def close(self):
        self.run.finish()
        # finish() can return before W&B's service process has written the run file (offline mode);
        # teardown waits for it, so the file is complete when the run ends
        self.wandb.teardown()


_CLASSES: dict[str, Callable[[], _Logger]] = {"jsonl": _Jsonl, "csv": _Csv, "tensorboard": _TensorBoard,
                                              "wandb": _Wandb}
assert set(_CLASSES) == set(LOGGERS)


class RunLoggers:
    """The loggers named in ``train.loggers`` as one object the trainer calls at four points
    (``open`` before training, ``step`` after every optimizer step, ``epoch`` after every epoch,
    ``finish`` at the end). ``enabled=False`` (ranks other than 0) makes every call a no-op.
    A missing optional package is a ``ConfigError`` here, before any training."""

    def __init__(self, names: list[str] | tuple[str, ...], enabled: bool = True) -> None:
        self.enabled = enabled
        self.loggers = [_CLASSES[n]() for n in names] if enabled else []
        self.wants_steps = any(lg.wants_steps for lg in self.loggers)
        self._pending: list[tuple[int, int, str, dict[str, Any]]] = []

    def add(self, logger: Any) -> None:
        """One more logger of one's own (an object with ``_Logger``'s methods; e.g. the tuner's
        per-epoch reporter, which may stop the run by raising from ``epoch``)."""
        if self.enabled:
            self.loggers.append(logger)
            self.wants_steps = self.wants_steps or bool(getattr(logger, "wants_steps", False))

    def open(self, out_dir: Path, cfg: dict, history: list[dict], step: int, resumed: bool) -> None:
        self._pending = []
        for lg in self.loggers:
            lg.open(out_dir, cfg, history, step, resumed)

    def step(self, step: int, epoch: int, stage: str, figures: Callable[[], dict[str, Any]]) -> None:
        """Keep this step's figures (``figures()``, i.e. ``method.step_log``) until the epoch ends."""
        if self.wants_steps:
            values = figures()
            if values:
                self._pending.append((step, epoch, stage, values))

    def _rows(self) -> list[dict[str, Any]]:
        """The epoch's per-step figures as floats: one device-to-host copy for the whole epoch."""
        if not self._pending:
            return []
        flat = [torch.as_tensor(v).detach().float().reshape(()).cpu() if not isinstance(v, torch.Tensor)
                else v.detach().float().reshape(()) for _, _, _, figs in self._pending for v in figs.values()]
        devices = {t.device for t in flat}
        values = (torch.stack([t.to(next(iter(devices))) for t in flat]).tolist() if len(devices) == 1
                  else [float(t) for t in flat])
        rows, i = [], 0
        for step, epoch, stage, figs in self._pending:
            row: dict[str, Any] = {"step": step, "epoch": epoch, "stage": stage}
            for name in figs:
                row[name] = values[i]
                i += 1
            rows.append(row)
        self._pending = []
        return rows

    def epoch(self, record: dict[str, Any], step: int) -> None:
        rows = self._rows()
        for lg in self.loggers:
            if rows:
                lg.steps(rows)
            lg.epoch(record, step)

    def finish(self, summary: dict[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.summary(summary, step)
            lg.close()
