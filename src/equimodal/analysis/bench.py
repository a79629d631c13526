"""The benchmark grid: methods x seeds on one dataset, resumable, with tables and plots.

``equimodal bench --dataset avdigits --methods joint,ogm-ge,ogm-boost:mode=both --seeds 0,1,2 --out DIR``
writes ``DIR/runs/<label>-seed<k>/`` (one ordinary run folder each; a finished one is not run again),
``DIR/results.csv`` (one row per run), ``DIR/results.md`` (one row per method) and PNG plots.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import load_config
from .._dist import is_main_process
from ..errors import ConfigError, RunFolderError
from .stats import fmt_pct, mean_std, paired_difference


@dataclass
class BenchRun:
    label: str
    seed: int
    overrides: list[str]
    folder: Path


def parse_method_spec(spec: str) -> tuple[str, list[str]]:
    """``"ogm-boost:mode=both:noise=sgn"`` -> ("ogm-boost", ["method.name=ogm-boost", "method.mode=both", ...]).
    ``"alone:audio"`` -> joint on that modality only (``"alone:audio:optim.lr=0.02"`` with an
    option). An option with a dot is a config key (``joint:optim.lr=0.02``); method options have none."""
    name, *opts = spec.split(":")
    extra = []
    if name == "alone":
        if not opts or "=" in opts[0]:
            raise ValueError(f"'alone' takes one modality: alone:<modality>, got {spec!r}")
        extra, opts = ["method.name=joint", f"data.modalities=[{opts[0]}]"], opts[1:]
    else:
        extra = [f"method.name={name}"]
    for o in opts:
        if "=" not in o:
            raise ValueError(f"method option {o!r} in {spec!r} is not key=value")
    return spec, [*extra, *(o if "." in o.split("=", 1)[0] else f"method.{o}" for o in opts)]


#: learning-rate multipliers tried for the baseline and for methods without a search space
#: (the configured rate first), so that every row gets the same number of trials
LR_FACTORS = (1.0, 0.5, 2.0, 4.0)


def tuning_settings(spec: str, base_lr: float) -> list[str]:
    """The specs ``bench --tune`` runs for one row: the row itself (its defaults) first, then the
    other points of the method's ``search_space``, or of the learning rate (``LR_FACTORS``) for a
    method without one (``joint``, ``alone:...``)."""
    from ..methods._registry import method_class

    name = spec.split(":")[0]
    space = {} if name == "alone" else dict(method_class(name).search_space)
    given = {o.split("=", 1)[0] for o in spec.split(":")[1:] if "=" in o}
    space = {k: v for k, v in space.items() if k not in given}  # options fixed in the spec stay fixed
    if not space:
        if "optim.lr" in given:
            return [spec]
        return [spec] + [f"{spec}:optim.lr={base_lr * f:g}" for f in LR_FACTORS[1:]]
    from ..methods._space import Choice, dimension
    dims = {k: dimension(v) for k, v in space.items()}
    ranged = [k for k, d in dims.items() if not isinstance(d, Choice)]
    if ranged:
        raise ConfigError(f"{spec}: search_space declares ranges ({', '.join(ranged)}); the fixed grid (--tune-grid) "
                          "needs value lists: use --tune")
    combos = list(itertools.product(*(d.values for d in dims.values())))
    return [spec] + [spec + "".join(f":{k}={v}" for k, v in zip(space, c)) for c in combos[1:]]


def plan_grid(dataset: str, methods: list[str], seeds: list[int], out: Path, overrides: list[str],
              aliases: dict[str, str] | None = None) -> list[BenchRun]:
    """One run per (method spec, seed); ``aliases`` give a spec a readable label (and folder name)."""
    runs = []
    for spec in methods:
        label, extra = parse_method_spec(spec)
        name = label.replace(':', '_').replace('=', '-')
        if aliases and spec in aliases:
            label = aliases[spec]
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
        for seed in seeds:
            folder = out / "runs" / f"{name}-seed{seed}"
            runs.append(BenchRun(label, seed, [f"data.name={dataset}", *overrides, *extra, f"train.seed={seed}",
                                               f"train.out={folder}"], folder))
    for run in runs:  # check every config before training anything
        load_config(overrides=run.overrides)
    return runs


class GridResults(list):
    """The summaries of the runs that finished, plus ``failures`` (one dict per run that raised)
    and ``missing`` (the cells that had no summary when the grid started)."""

    failures: list[dict[str, Any]]
    missing: list[BenchRun]


#: keys that do not change what a run computes (so a stored run with other values is still reusable)
_DISPLAY_KEYS = {("train", "progress"), ("train", "out"), ("train", "loggers")}


def config_differences(stored: dict, wanted: dict) -> list[str]:
    """``key: stored -> wanted`` for every config key that differs (display-only keys ignored; a key
    the stored run predates counts as equal when the wanted value is that key's default, which by
    construction reproduces the behaviour from before the key existed)."""
    from ..config import DEFAULTS

    diffs = []
    for section in sorted(set(stored) | set(wanted)):
        a, b = stored.get(section) or {}, wanted.get(section) or {}
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                diffs.append(f"{section}: {a!r} -> {b!r}")
            continue
        for key in sorted(set(a) | set(b)):
            if key not in a and key in DEFAULTS.get(section, {}) and b.get(key) == DEFAULTS[section][key]:
                continue
            if (section, key) not in _DISPLAY_KEYS and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def check_reusable(run: BenchRun, cfg: dict) -> None:
    """A cell folder that holds a run of another configuration is refused, never silently reused."""
    stored_path = run.folder / "config.yaml"
    if not stored_path.is_file():
        return
    stored = yaml.safe_load(stored_path.read_text()) or {}
    diffs = config_differences(stored, cfg)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise RunFolderError(f"{run.folder} holds a run of {run.label} seed {run.seed} with another config ({shown}); "
                             "use a new --out folder (or delete that run folder to rerun it)")


def cell_command(run: BenchRun) -> list[str]:
    """The self-contained command that trains (or resumes) one grid cell into its run folder."""
    if (run.folder / "checkpoint.pt").is_file():
        return [sys.executable, "-m", "equimodal", "train", "--resume", str(run.folder), "--no-progress"]
    sets = [a for o in run.overrides if not o.startswith(("train.out=", "train.progress=")) for a in ("--set", o)]
    return [sys.executable, "-m", "equimodal", "train", "--out", str(run.folder), "--overwrite", "--no-progress", *sets]


def _run_cells_in_processes(cells: list[BenchRun], jobs: int, devices: list[str] | None,
                            echo: Callable[[str], None]) -> dict[Path, str]:
    """Train ``cells`` as ``jobs`` concurrent ``equimodal train`` processes (each its own run folder,
    so the results are those of a sequential grid); with ``devices``, cell i sees only device
    i mod len(devices) (CUDA_VISIBLE_DEVICES). Returns folder -> error for the cells that failed."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def one(index_cell: tuple[int, BenchRun]) -> tuple[Path, str | None]:
        index, cell = index_cell
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
        cell.folder.mkdir(parents=True, exist_ok=True)
        with open(cell.folder / "train.log", "w") as log:
            code = subprocess.run(cell_command(cell), env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code == 0 and (cell.folder / "summary.json").is_file():
            echo(f"{cell.label} seed {cell.seed}: finished (process)")
            return cell.folder, None
        tail = (cell.folder / "train.log").read_text().strip().splitlines()[-1:] or [""]
        return cell.folder, f"exit {code}: {tail[0]} (log: {cell.folder / 'train.log'})"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return {folder: err for folder, err in pool.map(one, enumerate(cells)) if err is not None}


def run_grid(dataset: str, methods: list[str], seeds: list[int], out: str | Path, overrides: list[str] | None = None,
             echo: Callable[[str], None] = print, progress: bool = False,
             aliases: dict[str, str] | None = None, jobs: int = 1, devices: list[str] | None = None,
             collect_only: bool = False) -> GridResults:
    """Run (or reuse) every (method, seed) and return their summaries with their label and history.

    A finished run is reused, an interrupted one resumed, only if its stored config equals the
    requested one (else ``RunFolderError`` before anything runs). A run that raises is recorded in
    ``failures`` (and ``out/failures.json``) with its error, and the grid goes on. ``jobs`` > 1: the
    unfinished cells run as that many concurrent processes (``devices``: one GPU each, round
    robin). ``collect_only``: run nothing; the cells without a summary are listed in ``missing``."""
    from ..train import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not is_main_process():
        echo = lambda text: None  # noqa: E731 - only rank 0 prints
    base = list(overrides or []) + [f"train.progress={'true' if progress else 'false'}"]
    runs = plan_grid(dataset, methods, seeds, out, base, aliases)
    configs = [load_config(overrides=run.overrides) for run in runs]
    for run, cfg in zip(runs, configs):
        check_reusable(run, cfg)
    results, failures = GridResults(), []
    results.missing = [run for run in runs if not (run.folder / "summary.json").is_file()]
    process_errors: dict[Path, str] = {}
    if jobs > 1 and not collect_only and results.missing:
        process_errors = _run_cells_in_processes(results.missing, jobs, devices, echo)
    for i, (run, cfg) in enumerate(zip(runs, configs), 1):
        summary_path = run.folder / "summary.json"
        if collect_only and not summary_path.is_file():
            continue
        if run.folder in process_errors:
            failures.append({"label": run.label, "seed": run.seed, "folder": str(run.folder),
                             "error": process_errors[run.folder]})
            echo(f"[{i}/{len(runs)}] {run.label} seed {run.seed}: FAILED: {process_errors[run.folder]}")
            continue
        try:
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text())
                echo(f"[{i}/{len(runs)}] {run.label} seed {run.seed}: done before, reused")
            else:
                trainer = (Trainer.resume(run.folder, echo=lambda s: None) if (run.folder / "checkpoint.pt").is_file()
                           else Trainer(cfg, echo=lambda s: None, overwrite=True))
                summary = trainer.fit()
                echo(f"[{i}/{len(runs)}] {run.label} seed {run.seed}: test acc {summary['test_acc']:.4f}, "
                     f"{summary['seconds']:.0f}s")
            history = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines() if line]
        except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the grid
            error = f"{type(exc).__name__}: {exc}"
            failures.append({"label": run.label, "seed": run.seed, "folder": str(run.folder), "error": error})
            echo(f"[{i}/{len(runs)}] {run.label} seed {run.seed}: FAILED: {error}")
            continue
        results.append({**summary, "label": run.label, "history": history, "folder": str(run.folder)})
    results.failures = failures
    failures_path = out / "failures.json"
    if not is_main_process() or collect_only:  # under torchrun every rank runs the grid; rank 0 writes
        return results
    if failures:
        failures_path.write_text(json.dumps(failures, indent=2))
    elif failures_path.exists():
        failures_path.unlink()
    return results


def pick_tuned(results: list[dict[str, Any]], settings: dict[str, list[str]], out: str | Path) -> list[dict[str, Any]]:
    """For each row, the setting with the highest mean validation accuracy over seeds (test never
    looked at; ties: the earlier setting, i.e. the default), its runs relabelled with the row's
    label and ``tuned`` = the picked setting. Writes ``tuning.md``: every setting's validation and
    test means, the pick marked. A setting with a failed seed cannot be picked."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    seeds = sorted({r["seed"] for r in results})
    picked, lines = [], ["| row | setting | seeds | val acc (%) | test acc (%) | picked |", "| --- | --- | --- | --- | --- | --- |"]
    for row, specs in settings.items():
        complete = [sp for sp in specs if len(by_label.get(sp, [])) == len(seeds)]
        if not complete:
            continue
        val = {sp: mean_std([r["val_acc"] for r in by_label[sp]])[0] for sp in complete}
        best = max(complete, key=lambda sp: (val[sp], -specs.index(sp)))
        for sp in specs:
            rs = by_label.get(sp, [])
            shown = sp[len(row):].lstrip(":") or "(default)"
            lines.append(f"| {row} | {shown} | {len(rs)} | {fmt_pct(*mean_std([r['val_acc'] for r in rs]))} | "
                         f"{fmt_pct(*mean_std([r['test_acc'] for r in rs]))} | {'**yes**' if sp == best else ''} |")
        choice = best[len(row):].lstrip(":") or "default"
        picked += [{**r, "label": row, "tuned": choice, "tuned_spec": best} for r in by_label[best]]
    note = (f"Each row's settings, run with seed(s) {seeds}; the pick maximises the mean validation accuracy "
            "(validation carved from the training data); the test column is shown for the record only.")
    if is_main_process():
        (Path(out) / "tuning.md").write_text("\n".join(lines) + f"\n\n{note}\n")
    return picked


def grid_specs(methods: list[str], lr: float, tune: bool) -> tuple[dict[str, list[str]], list[str]]:
    """Each row's settings (``tuning_settings`` with ``tune``, else the row alone) and every
    distinct spec the grid runs, in order."""
    settings = {spec: (tuning_settings(spec, lr) if tune else [spec]) for spec in methods}
    return settings, list(dict.fromkeys(sp for specs in settings.values() for sp in specs))


def bench_grid(dataset: str, methods: list[str], seeds: list[int], out: str | Path, overrides: list[str],
               tune: bool | str = False, tune_seeds: list[int] | None = None, baseline: str = "joint",
               echo: Callable[[str], None] = print, tuning: Any = None, tune_only: bool = False,
               **grid_opts: Any) -> GridResults:
    """The whole ``bench``: every row (``methods``) x seed. ``tune=True``: one Optuna study per row
    first (``equimodal.analysis.tuning``; ``tuning`` a ``TuningOptions``, ``tune_seeds`` its seeds
    when not given there), then each row's pick on every seed; ``tune_only``: the studies only.
    ``tune="grid"``: the fixed-grid protocol of the grids committed before it (every row's
    ``tuning_settings`` on ``tune_seeds``, default all, picked by ``pick_tuned``). Returns the rows'
    results (the picks, labelled with their row and ``tuned``), with every phase's ``failures``
    and ``missing``. ``grid_opts`` go to ``run_grid`` (``jobs``, ``devices``, ``collect_only``,
    ``progress``)."""
    from ..config import load_config

    if tune and tune != "grid":
        return bench_tuned(dataset, methods, seeds, out, overrides, tuning, tune_seeds, echo, tune_only, **grid_opts)
    tune = bool(tune)

    lr = load_config(overrides=[f"data.name={dataset}", *overrides])["optim"]["lr"]
    settings, grid = grid_specs(methods, lr, tune)
    tune_seeds = list(tune_seeds or seeds)
    if tune and not set(tune_seeds) <= set(seeds):
        raise ConfigError(f"--tune-seeds {tune_seeds} must be among --seeds {seeds}")
    results = run_grid(dataset, grid, tune_seeds if tune else seeds, out, overrides, echo=echo, **grid_opts)
    failures, missing = list(results.failures), list(results.missing)
    if tune and results:  # every rank picks the same (from the same files) and runs the same
        picked = pick_tuned(results, settings, out)
        if tune_seeds != list(seeds):  # the picked settings, now with every seed (the tuning runs are reused)
            specs = list(dict.fromkeys(r["tuned_spec"] for r in picked))
            final = run_grid(dataset, specs, seeds, out, overrides, echo=echo, **grid_opts)
            failures += final.failures
            missing += final.missing
            choice = {r["tuned_spec"]: (r["label"], r["tuned"]) for r in picked}
            picked = [{**r, "label": choice[r["label"]][0], "tuned": choice[r["label"]][1]} for r in final]
        elif is_main_process():
            summarise([r for r in results if r["label"] in settings], out, baseline=baseline, stem="results_default")
            echo(f"wrote {Path(out) / 'results_default.md'} (every row at its defaults, untuned)")
        echo(f"wrote {Path(out) / 'tuning.md'} (every setting, the picks)")
        results = GridResults(picked)
    results.failures, results.missing = failures, missing
    if failures and is_main_process():
        (Path(out) / "failures.json").write_text(json.dumps(failures, indent=2))  # every phase's, together
    return results


def bench_tuned(dataset: str, rows: list[str], seeds: list[int], out: str | Path, overrides: list[str],
                tuning: Any = None, tune_seeds: list[int] | None = None, echo: Callable[[str], None] = print,
                tune_only: bool = False, **grid_opts: Any) -> GridResults:
    """``bench --tune``: every row's study (``Tuner``; ``jobs`` local workers), ``tuning.md``, then
    each finished row's pick with the reporting ``seeds`` (ordinary grid cells, labelled with the
    row, ``tuned`` = the pick and ``tuning`` = the study's counts and compute)."""
    from .tuning import Tuner, TuningOptions, header_line, tuning_table

    from .._dist import launched_by_torchrun

    if launched_by_torchrun():
        raise ConfigError("bench --tune runs its trials in separate processes (--jobs, or --plan's worker commands), "
                          "not under torchrun")
    options = tuning or TuningOptions(seeds=tuple(tune_seeds or (100,)))
    shared = sorted(set(options.seeds) & set(seeds))
    if shared:
        raise ConfigError(f"tuning seed(s) {shared} are also reporting seeds (--seeds {list(seeds)}): a setting "
                          "picked on a seed must not be reported on it; use other --tune-seeds (default 100)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tuner = Tuner(dataset, rows, out, overrides, options, echo=echo)
    jobs, collect_only = int(grid_opts.get("jobs", 1)), bool(grid_opts.get("collect_only"))
    if not collect_only:
        if jobs > 1 and not tune_only:
            tuner.run_workers(jobs, seeds, rows, grid_opts.get("devices"))
        else:
            tuner.tune(wait=not tune_only)
    if tune_only:
        echo(f"tuning: {sum(tuner.finished(r) for r in rows)} of {len(rows) * options.trials} trial(s) finished "
             f"in {tuner.url}")
        done = GridResults()
        done.failures, done.missing = [], []
        return done
    picks = tuner.results()
    if is_main_process():
        (out / "tuning.md").write_text(tuning_table(picks, options, seeds, tuner.url) + "\n")
        echo(f"wrote {out / 'tuning.md'} (each row's study: trials, pruned, compute, pick)")
    ready = [p for p in picks if p.params is not None and p.trials >= options.trials]
    by_spec = {p.spec: p for p in ready}
    results = run_grid(dataset, list(by_spec), seeds, out, overrides, echo=echo, **grid_opts)
    header = header_line(options, seeds)
    final = GridResults(
        {**r, "label": by_spec[r["label"]].row,
         "tuned": by_spec[r["label"]].setting() + (" ‡" if by_spec[r["label"]].lr_edge else ""),
         "tuned_spec": r["label"],
         "tuning": {"trials": by_spec[r["label"]].trials, "pruned": by_spec[r["label"]].pruned,
                    "epochs": by_spec[r["label"]].epochs, "passes": by_spec[r["label"]].passes,
                    "lr_edge": by_spec[r["label"]].lr_edge, "header": header}}
        for r in results)
    final.failures = list(results.failures)
    final.missing = list(results.missing) + [
        BenchRun(f"{p.row} (tuning: {p.trials} of {options.trials} trials finished)", options.seeds[0], [],
                 tuner.trial_folder(p.row, 0).parent) for p in picks if p not in ready]
    return final


def plan_tuned(dataset: str, rows: list[str], seeds: list[int], out: str | Path, overrides: list[str],
               tuning: Any, jobs: int = 1) -> tuple[list[list[str]], str]:
    """``bench --tune --plan``: while the studies are unfinished, ``jobs`` copies of the worker
    command (every copy shares the storage; run them anywhere that reaches it); once they are
    finished, one command per unfinished reporting cell of the picks. Returns (commands, note)."""
    from .tuning import Tuner

    shared = sorted(set(tuning.seeds) & set(seeds))
    if shared:
        raise ConfigError(f"tuning seed(s) {shared} are also reporting seeds (--seeds {list(seeds)}); "
                          "use other --tune-seeds (default 100)")
    tuner = Tuner(dataset, rows, out, overrides, tuning, echo=lambda s: None)
    if not tuner.done():
        done = sum(min(tuner.finished(r), tuning.trials) for r in rows)
        return ([tuner.worker_command(seeds, rows)] * max(1, jobs),
                f"# tuning: {done} of {len(rows) * tuning.trials} trial(s) finished in {tuner.url}; run these "
                "worker commands (any number, on any machine that reaches the storage), then --plan again "
                "for the reporting cells, or run the same bench command without --plan")
    specs = [p.spec for p in tuner.results() if p.params is not None]
    runs = plan_grid(dataset, specs, seeds, Path(out), [*overrides, "train.progress=false"])
    for run in runs:
        check_reusable(run, load_config(overrides=run.overrides))
    pending = [run for run in runs if not (run.folder / "summary.json").is_file()]
    return ([cell_command(run) for run in pending],
            f"# tuning finished; {len(pending)} of {len(runs)} reporting cell(s) to run; then: equimodal bench ... "
            "--collect (same options)")


def encoder_passes(summary: dict[str, Any]) -> float | None:
    """Counted training cost of a run: encoder passes (forward with or without autograd = 1,
    backward = 2, the usual FLOP ratio) summed over the run; None for runs recorded before counting."""
    cost = summary.get("cost")
    if not cost or "forward_per_step" not in cost:
        return None
    per_step = cost["forward_per_step"] + cost["forward_no_grad_per_step"] + 2 * cost["backward_per_step"]
    return per_step * cost["optimizer_steps"]


def predictor(run: dict[str, Any]) -> str:
    """What a run's fused accuracy scores (``Method.predicts``): from its summary, or, for runs
    written before summaries recorded it, from the method's declaration (a single modality alone
    is scored with its own model's head: "fused")."""
    if run.get("predicts"):
        return str(run["predicts"])
    from ..methods import available_methods, method_class
    name = run.get("method", "")
    return method_class(name).predicts if name in available_methods() else "fused"


def summarise(results: list[dict[str, Any]], out: str | Path, baseline: str = "joint", stem: str = "results") -> str:
    """Write ``<stem>.csv`` and ``<stem>.md``; return the markdown table."""
    out = Path(out)
    modalities = sorted({m for r in results for m in r["test_acc_by_modality"]},
                        key=lambda m: [m for r in results for m in r["modalities"]].index(m))
    fields = ["label", "method", "predicts", "seed", "tuned", "val_acc", "test_acc", "last_epoch_test_acc", "test_macro_f1",
              "epochs", "seconds", "seconds_per_epoch",
              *(f"acc_{m}" for m in modalities), *(f"probe_{m}" for m in modalities), "selection", "estimator",
              "optimizer_steps", "forward_per_step", "forward_no_grad_per_step", "backward_per_step",
              "tuning_trials", "tuning_pruned", "tuning_epochs", "tuning_passes"]
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({"label": r["label"], "method": r["method"], "predicts": predictor(r),
                             "seed": r["seed"], "tuned": r.get("tuned", ""),
                             "val_acc": r.get("val_acc", ""), "test_acc": r["test_acc"],
                             "last_epoch_test_acc": r.get("last_epoch_test_acc", ""),
                             "test_macro_f1": r["test_macro_f1"], "epochs": r["epochs"], "seconds": r["seconds"],
                             "seconds_per_epoch": r["seconds"] / max(1, r["epochs"]), "selection": r["selection"],
                             "estimator": r["estimator"],
                             **{f"acc_{m}": r["test_acc_by_modality"].get(m, "") for m in modalities},
                             **{f"probe_{m}": r["probe_acc_by_modality"].get(m, "") for m in modalities},
                             **{k: (r.get("cost") or {}).get(k, "") for k in
                                ("optimizer_steps", "forward_per_step", "forward_no_grad_per_step", "backward_per_step")},
                             **{f"tuning_{k}": (r.get("tuning") or {}).get(k, "") for k in
                                ("trials", "pruned", "epochs", "passes")}})
    labels = list(dict.fromkeys(r["label"] for r in results))
    by_label = {lab: [r for r in results if r["label"] == lab] for lab in labels}
    base = {r["seed"]: r["test_acc"] for r in by_label.get(baseline, [])}
    alone = [lab for lab in labels if lab.startswith("alone:")]
    # the reference single modality is the best on validation (test only reports)
    best_alone = max(alone, key=lambda lab: mean_std([r["val_acc"] for r in by_label[lab]])[0]) if alone else None
    tuned = any("tuned" in r for r in results)
    best_val = any(r.get("selection") == "best_val" for r in results)
    tuning = any("tuning" in r for r in results)  # bench --tune (Optuna): each row's study
    header = (["method", "seeds"] + (["tuned setting"] if tuned else [])
              + (["tuning trials (pruned)", "tuning epochs", f"tuning passes × {baseline}'s"] if tuning else [])
              + ["predicts", "fused acc (%)"]
              + (["last-epoch acc (%)"] if best_val else []) + ["macro-F1 (%)"] + [f"acc {m} (%)" for m in modalities]
              + [f"probe {m} (%)" for m in modalities] + ["epochs", f"cost × {baseline}", "s / epoch",
                                                         f"Δ acc vs {baseline} (95% CI, paired)"]
              + ([f"Δ vs best alone ({best_alone[6:]})"] if best_alone else []))
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    base_known = [x for x in (encoder_passes(r) for r in by_label.get(baseline, [])) if x]
    unequal = False
    for lab, rs in by_label.items():
        cells = [lab, str(len(rs))]
        if tuned:
            cells.append(rs[0].get("tuned", "-"))
        if tuning:
            tu, bt = rs[0].get("tuning") or {}, (by_label.get(baseline, [{}])[0].get("tuning") or {})
            cells += [f"{tu['trials']} ({tu['pruned']})" if tu else "-", str(tu.get("epochs", "-")),
                      f"{tu['passes'] / bt['passes']:.2f}" if tu and bt.get("passes") else "-"]
        cells.append(predictor(rs[0]))
        cells.append(fmt_pct(*mean_std([r["test_acc"] for r in rs])))
        if best_val:
            cells.append(fmt_pct(*mean_std([r.get("last_epoch_test_acc", float("nan")) for r in rs])))
        cells.append(fmt_pct(*mean_std([r["test_macro_f1"] for r in rs])))
        for key in ("test_acc_by_modality", "probe_acc_by_modality"):
            for m in modalities:
                vals = [r[key][m] for r in rs if m in r[key]]
                cells.append(fmt_pct(*mean_std(vals)) if vals else "-")
        cells.append(str(rs[0]["epochs"]))
        known = [x for x in (encoder_passes(r) for r in rs) if x]
        ratio = (sum(known) / len(known)) / (sum(base_known) / len(base_known)) if known and base_known else float("nan")
        cells.append("-" if math.isnan(ratio) else f"{ratio:.2f}")
        cells.append(f"{mean_std([r['seconds'] / max(1, r['epochs']) for r in rs])[0]:.1f}")
        mark = " †" if ratio > 1.1 and not lab.startswith("alone:") else ""
        unequal |= bool(mark)
        cells.append("-" if lab == baseline or not base else _paired_cell(rs, base) + mark)
        if best_alone:
            cells.append("-" if lab.startswith("alone:") else
                         _paired_cell(rs, {r["seed"]: r["test_acc"] for r in by_label[best_alone]}) + mark)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    note = ("Mean ± standard deviation over seeds; test split evaluated once per run, on the epoch named in "
            "results.csv `selection` (never chosen on test). Probe = linear probe of the frozen encoder. "
            "Per-modality accuracy uses each run's estimator (results.csv `estimator`). Predicts: what a row's "
            "test accuracy scores, the model's fused head (as joint), the method's own per-modality heads "
            "combined, or both mixed (declared by each method, `Method.predicts`). Epochs: all stages. "
            f"Cost × {baseline}: counted encoder passes of the whole run (forward 1, backward 2, the method's "
            f"own no-grad passes included) relative to {baseline}; '-' where a run predates the counting.")
    if unequal:
        note += (f" †: not at equal compute — the row used more than 1.1 × the training passes of {baseline}, "
                 f"so its Δ mixes the method with the extra budget.")
    if tuning:
        note += (" Tuned: each row's setting was picked on validation accuracy by an Optuna study of the "
                 "learning rate and the method's own search space, the same trials, sampler and pruner for every "
                 "row (tuning.md); tuning epochs / passes: what its trials trained (pruned trials stopped early), "
                 f"passes relative to {baseline}'s study. ‡: the picked learning rate is in the outer tenth of the "
                 "searched range (log scale).")
    elif tuned:
        note += (" Tuned: each row is the setting picked on validation accuracy among its search space "
                 "(tuning.md lists every setting); every row had the same number of trials.")
    if best_alone:
        note += (f" Best alone: the single-modality model with the highest mean validation accuracy ({best_alone}); "
                 "a method that does not beat it has not earned its second modality.")
    top = next((r["tuning"]["header"] for r in results if "tuning" in r), None)
    (out / f"{stem}.md").write_text((f"{top}\n\n" if top else "") + f"{table}\n\n{note}\n")
    return f"{top}\n\n{table}" if top else table


def _paired_cell(rows: list[dict[str, Any]], reference: dict[int, float]) -> str:
    diff, half, n = paired_difference({r["seed"]: r["test_acc"] for r in rows}, reference)
    return f"{100 * diff:+.1f} ± {100 * half:.1f} (n={n})" if n > 1 else (f"{100 * diff:+.1f} (n=1)" if n else "-")
