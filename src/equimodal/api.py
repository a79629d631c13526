"""``equimodal.diagnose`` and ``equimodal.bench`` from Python, with your own data and model.

``data`` is a dataset name (built-in, registered, or ``my_pkg.data:build``), or your data itself:
a dict ``{"train", "val" (optional), "test"}`` of map-style Datasets yielding ``(dict of tensors,
label)``, or a builder returning such a dict. ``model`` is a factory (see
``equimodal.models.factory``); without one the encoders are chosen from the input shapes as for the
built-in data. Both are registered in this process, and the runs are ordinary run folders.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass
class BenchResult:
    """What ``bench`` returns: one summary per finished run (with ``label``, ``history``, ``folder``),
    the markdown table written to ``out/results.md``, the runs that failed, and the output folder."""

    runs: list[dict[str, Any]]
    table: str
    failures: list[dict[str, Any]] = field(default_factory=list)
    out: Path = Path(".")


def _user_overrides(data: Any, model: Any, name: str | None, data_options: dict[str, Any] | None) -> tuple[str, list[str]]:
    """Register ``data`` / ``model`` where they are objects; the dataset name and config overrides."""
    from .data import register_dataset
    from .models.factory import register_model

    if isinstance(data, str):
        dataset = data
    else:
        dataset = register_dataset(name or "custom", data)
    overrides = [f"data.{k}={json.dumps(v)}" for k, v in (data_options or {}).items()]
    if model is not None:
        overrides.append(f"model.factory={model if isinstance(model, str) else register_model(model)}")
    return dataset, overrides


def bench(data: Any, methods: Sequence[str] = ("joint", "ogm-ge"), seeds: Sequence[int] = (0, 1, 2),
          out: str | Path = "bench_out", *, model: Callable[..., Any] | str | None = None,
          overrides: Sequence[str] = (), alone: bool = False, baseline: str = "joint", name: str | None = None,
          data_options: dict[str, Any] | None = None, plots: bool = True, progress: bool = False,
          echo: Callable[[str], None] = print, tune: bool | str = False, tune_seeds: Sequence[int] | None = None,
          equal_epochs: bool = False, jobs: int = 1, trials: int = 12, lr_range: tuple[float, float] | None = None,
          pruner: str = "halving", storage: str | None = None, tune_only: bool = False) -> BenchResult:
    """Train every method (``"ogm-boost:mode=both"`` for options) x seed on ``data`` with the same
    budget and write ``out/results.csv``, ``out/results.md`` (fused and per-modality accuracy,
    linear probes, difference to ``baseline`` with a paired 95% interval) and plots; as
    ``equimodal bench``. ``alone`` adds each modality trained alone; ``overrides`` are
    ``"section.key=value"`` strings applied to every run (``"train.epochs=5"``). ``tune``,
    ``tune_seeds``, ``equal_epochs``, ``jobs``, ``trials``, ``lr_range``, ``pruner``, ``storage`` and
    ``tune_only`` as the command's ``--tune``, ``--tune-seeds``, ``--equal-epochs``, ``--jobs``,
    ``--trials``, ``--lr-range``, ``--pruner``, ``--storage`` and ``--tune-only`` (``tune="grid"``:
    ``--tune-grid``; a dataset given as Python objects needs ``jobs=1``: the other processes cannot
    see it)."""
    from .analysis.bench import bench_grid, summarise
    from .analysis.plots import all_plots
    from .config import load_config
    from .data import dataset_modalities

    dataset, extra = _user_overrides(data, model, name, data_options)
    sets = [*extra, *overrides, *(["train.stage_budget=shared"] if equal_epochs else [])]
    specs = list(methods)
    if alone:
        cfg = load_config(overrides=[f"data.name={dataset}", *sets])["data"]
        specs += [f"alone:{m}" for m in dataset_modalities(dataset, cfg)]
    tuning = None
    if tune and tune != "grid":
        from .analysis.tuning import TuningOptions
        tuning = TuningOptions(trials=trials, seeds=tuple(tune_seeds or (100,)), lr_range=lr_range, pruner=pruner,
                               storage=storage)
    results = bench_grid(dataset, specs, list(seeds), out, sets, tune=tune, baseline=baseline, echo=echo,
                         tune_seeds=list(tune_seeds) if tune_seeds else None, progress=progress, jobs=jobs,
                         tuning=tuning, tune_only=tune_only)
    out = Path(out)
    table = ""
    if results:
        table = summarise(results, out, baseline=baseline)
        if plots:
            all_plots(results, out)
    return BenchResult(list(results), table, list(results.failures), out)


def diagnose(data: Any, out: str | Path = "diagnosis", seeds: Sequence[int] | None = None, *,
             model: Callable[..., Any] | str | None = None, overrides: Sequence[str] = (), name: str | None = None,
             data_options: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Is the model imbalanced on ``data``? Trains each modality alone and the joint model with the
    same encoders and budget and compares each encoder's linear-probe accuracy (as
    ``equimodal diagnose``); writes ``out/diagnosis.txt`` and ``out/diagnosis.png`` and returns the
    report (``verdict``, per-modality figures, ``text``). ``seeds``: default that of
    ``equimodal.analysis.diagnose.diagnose``; other keyword ``options`` (``threshold``...) go to it."""
    from .analysis.diagnose import diagnose as run_diagnosis

    dataset, extra = _user_overrides(data, model, name, data_options)
    if seeds is None:
        default = inspect.signature(run_diagnosis).parameters["seeds"].default
        seeds = [0] if default is inspect.Parameter.empty else default
    return run_diagnosis(dataset, out, seeds=list(seeds), overrides=[*extra, *overrides], **options)


def evaluate_run(run: str | Path, split: str = "test", *, last: bool = False, device: str | None = None,
                 data: Any = None, model: Callable[..., Any] | str | None = None) -> dict[str, Any]:
    """Score a saved run (its folder or ``checkpoint.pt``) on ``split`` (``train``, ``val``, ``test``)
    with the predictor it reports: the model and method rebuilt by ``Trainer.from_run`` (the same
    rebuild as ``--resume``; the last stage's runner with its own heads), at the epoch the run
    selected (``train.select``) unless ``last``. As ``equimodal eval``; ``data`` / ``model`` give a
    dataset or model factory again that was not importable by name."""
    from .train.trainer import Trainer, evaluate

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    trainer = Trainer.from_run(run, echo=lambda s: None, data=data, model_factory=model, device=device)
    epoch, which = trainer.select_reported(last=last)
    result = evaluate(trainer.model, trainer.active, getattr(trainer.splits, split), trainer.device,
                      precision=trainer.precision)
    return {"checkpoint": str(run), "split": split, "epochs_trained": trainer.epoch,
            "evaluated_epoch": epoch + 1, "evaluated": which, "method": trainer.cfg["method"]["name"], **result}

