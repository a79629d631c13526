"""Equal tuning for ``bench --tune``: one Optuna study per row, the same trials, sampler and pruner.

Every row (``joint``, ``alone:<modality>``, every method) gets a study of exactly ``trials``
finished trials over the learning rate (log scale) and the method's own ``search_space``; a
seeded TPE sampler and a successive-halving (or Hyperband) pruner on the per-epoch validation
accuracy, the same for every row. Trials train with the *tuning* seeds (100 by default), never the
reporting seeds; the objective and the pruner see validation figures only (the test split is
evaluated by each trial's run, as every run does, and never read here). The picked setting is then
trained with the reporting seeds by the ordinary grid (``run_grid``).

Studies live in an Optuna storage (``<out>/tuning.db``, SQLite, by default; any RDB URL, or
``journal:PATH`` for Optuna's journal file), so a killed tuning resumes and several processes
(``--jobs``, or ``bench --plan``'s worker commands on other machines) share the studies: a worker
counts the study's live trials before and after asking for one, and gives back a trial that a
concurrent worker made surplus, so a study ends with exactly ``trials`` finished trials. A trial
whose worker died (its process gone on this host, or no heartbeat for ``stale_after`` seconds) is
failed and re-queued with the same setting, and continues from its run folder's checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, NonFiniteError

#: the protocol name stored with every study (a storage of another protocol is refused)
PROTOCOL = "equimodal-tune/1"
#: default learning-rate range, as factors of the configured rate (wide: joint's best rate on the
#: default data is 8-16x the default 0.01, so a narrower range put picks on its edge)
LR_RANGE_FACTORS = (1 / 30, 100.0)
#: a pick in this outer fraction of the log learning-rate range (either end) is flagged
EDGE_FRACTION = 0.1
PRUNERS = ("halving", "hyperband", "none")
_LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


@dataclass
class TuningOptions:
    """The tuning protocol's settings (``bench --trials/--tune-seeds/--lr-range/--pruner/--storage``).

    ``trials``: finished trials per row. ``seeds``: the tuning seeds (each trial trains every one;
    the objective is their mean validation accuracy); they must not be reporting seeds.
    ``lr_range``: (low, high), default ``LR_RANGE_FACTORS`` x the configured rate. ``pruner``:
    ``halving`` (successive halving, reduction factor 3), ``hyperband`` or ``none``.
    ``storage``: an Optuna RDB URL or ``journal:PATH``; default ``sqlite:///<out>/tuning.db``.
    ``heartbeat`` / ``stale_after``: seconds between a running trial's heartbeats, and without one
    before another worker takes the trial over."""

    trials: int = 12
    seeds: tuple[int, ...] = (100,)
    lr_range: tuple[float, float] | None = None
    pruner: str = "halving"
    storage: str | None = None
    heartbeat: float = 30.0
    stale_after: float = 300.0

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if not self.seeds:
            raise ConfigError("--tune-seeds: at least one tuning seed is needed")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.lr_range is not None:
            lo, hi = (float(x) for x in self.lr_range)
            if not 0 < lo < hi:
                raise ConfigError(f"--lr-range must be LOW,HIGH with 0 < LOW < HIGH, got {lo:g},{hi:g}")
            self.lr_range = (lo, hi)


def _optuna():
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(options: TuningOptions, out: Path) -> str:
    return options.storage or f"sqlite:///{(Path(out) / 'tuning.db').resolve()}"


def open_storage(url: str):
    """An Optuna storage for ``url``: ``journal:PATH`` is Optuna's journal file (NFS-friendly,
    no server), anything else an RDB URL (SQLite with a long lock timeout for concurrent workers)."""
    optuna = _optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        path = url[len("journal:"):].removeprefix("//")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if not url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url)
    import fcntl

    path = Path(url.split("///", 1)[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    # workers that start together would each create the schema of a new file (and all but one fail)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- the search space -------------------------------------------------------------------------
def row_space(spec: str, lr: float, options: TuningOptions) -> dict[str, Any]:
    """The Optuna distributions of one row: ``optim.lr`` (log scale; unless the spec fixes it) and
    ``method.<option>`` for each entry of the method's ``search_space`` the spec does not fix."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from ..methods._registry import method_class
    from ..methods._space import Choice, FloatRange, dimension

    name = spec.split(":")[0]
    given = {o.split("=", 1)[0] for o in spec.split(":")[1:] if "=" in o}
    lo, hi = options.lr_range or (lr * LR_RANGE_FACTORS[0], lr * LR_RANGE_FACTORS[1])
    space: dict[str, Any] = {}
    if "optim.lr" not in given:
        space["optim.lr"] = FloatDistribution(lo, hi, log=True)
    declared = {} if name == "alone" else dict(method_class(name).search_space)
    for key, entry in declared.items():
        if key in given:
            continue  # an option fixed in the row stays fixed
        dim = dimension(entry)
        if isinstance(dim, Choice):
            space[f"method.{key}"] = CategoricalDistribution(list(dim.values))
        elif isinstance(dim, FloatRange):
            space[f"method.{key}"] = FloatDistribution(dim.low, dim.high, log=dim.log)
        else:
            space[f"method.{key}"] = IntDistribution(dim.low, dim.high, log=dim.log)
    return space


def _fmt(value: Any) -> str:
    """A parameter value as a config/spec string (floats to 4 significant digits: the trial trains
    with exactly the value the pick's spec names)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def setting_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={_fmt(v)}" for k, v in params.items()]


def setting_spec(row: str, params: dict[str, Any]) -> str:
    """The method spec of a row at a setting (``ogm-ge:alpha=0.3:optim.lr=0.05``)."""
    parts = [f":{k.removeprefix('method.')}={_fmt(v)}" for k, v in params.items()]
    return row + "".join(parts)


def lr_position(lr: float, low: float, high: float) -> float:
    """Where ``lr`` lies in [low, high] on a log scale (0 = low end, 1 = high end)."""
    return (math.log(lr) - math.log(low)) / (math.log(high) - math.log(low))


# --- sampler, pruner ------------------------------------------------------------------------
def make_sampler(seed: int, trials: int):
    """A TPE sampler reseeded per trial from (``seed``, trial number): the same sequence for every
    row and every run, and concurrent workers never start from the same random state (each would
    otherwise draw the same first settings)."""
    optuna = _optuna()

    class PerTrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._inner = self._fresh(seed)

        @staticmethod
        def _fresh(s: int):
            import warnings
            with warnings.catch_warnings():  # multivariate / constant_liar were "experimental" in Optuna 4
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(seed=s, n_startup_trials=max(2, trials // 3), multivariate=True,
                                                  constant_liar=True)

        def before_trial(self, study, trial) -> None:
            self._inner = self._fresh(seed * 10_007 + trial.number)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self._inner.reseed_rng()

    return PerTrialSeededTPE()


def make_pruner(name: str, epochs: int):
    """The pruner every row shares: steps are epochs trained (every epoch of every stage)."""
    optuna = _optuna()
    if name == "none":
        return optuna.pruners.NopPruner()
    min_resource = max(1, epochs // 12)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, reduction_factor=3)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3)


# --- the grid's identity ----------------------------------------------------------------------
def grid_identity(dataset: str, row: str, overrides: list[str], options: TuningOptions, lr: float) -> dict[str, Any]:
    """What a study's trials depend on: the row's config (without seed, output folder or display
    keys), the trial count, tuning seeds, learning-rate range, pruner and search space."""
    from ..config import load_config
    from .bench import _DISPLAY_KEYS, parse_method_spec

    cfg = load_config(overrides=[f"data.name={dataset}", *overrides, *parse_method_spec(row)[1]])
    cfg = json.loads(json.dumps(cfg, default=str))
    for section, key in (*_DISPLAY_KEYS, ("train", "seed")):
        cfg.get(section, {}).pop(key, None)
    space = row_space(row, lr, options)
    return {"protocol": PROTOCOL, "config": cfg, "trials": options.trials, "tune_seeds": list(options.seeds),
            "lr_range": [float(d) for d in (space["optim.lr"].low, space["optim.lr"].high)] if "optim.lr" in space
            else None, "pruner": options.pruner, "space": {k: repr(v) for k, v in space.items()}}


def identity_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    from .bench import config_differences

    diffs = [d for d in config_differences(stored.get("config") or {}, wanted["config"])]
    for key in ("protocol", "trials", "tune_seeds", "lr_range", "pruner", "space"):
        if stored.get(key) != wanted[key]:
            diffs.append(f"{key}: {stored.get(key)!r} -> {wanted[key]!r}")
    return diffs


def open_study(storage: Any, url: str, row: str, identity: dict[str, Any], sampler: Any = None, pruner: Any = None):
    """The row's study (created if new), refused with one line when the storage holds it for
    another grid configuration."""
    optuna = _optuna()
    study = optuna.create_study(storage=storage, study_name=row, direction="maximize", load_if_exists=True,
                                sampler=sampler, pruner=pruner)
    stored = study.user_attrs.get("grid")
    if stored is None:
        study.set_user_attr("grid", identity)
    else:
        diffs = identity_differences(stored, identity)
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise ConfigError(f"tuning storage {url} holds study {row!r} of another grid configuration ({shown}); "
                              "use another --storage or --out")
    return study


# --- one worker -----------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(study: Any, stale_after: float) -> int:
    """Fail the running trials whose worker is gone (its process dead on this host, or no heartbeat
    for ``stale_after`` s) and queue each again with the same setting; returns how many."""
    optuna = _optuna()
    host, now, reaped = socket.gethostname(), time.time(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = t.user_attrs
        beat = attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
        dead = attrs.get("host") == host and attrs.get("pid") not in (None, os.getpid()) and not _alive(attrs["pid"])
        if not dead and now - beat < stale_after:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "failed", "worker gone")
            if not study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reaped it first (or it just finished)
        study.enqueue_trial(t.params, user_attrs={"retry_of": attrs.get("retry_of", t.number)})
        reaped += 1
    return reaped


class _Heartbeat:
    """Marks a running trial alive every ``interval`` s from a background thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)
        self._thread.start()

    def _beat(self, storage: Any, trial_id: int, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial finished meanwhile, or the storage is busy
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _EpochReporter:
    """A run logger (``RunLoggers.add``) that reports each epoch's validation accuracy to the trial
    and stops the run when the pruner says so. ``offset``: steps of the trial's earlier seeds."""

    wants_steps = False

    def __init__(self, trial: Any, offset: int) -> None:
        self.trial, self.offset = trial, offset

    def open(self, *args: Any) -> None: ...
    def steps(self, rows: list[dict[str, Any]]) -> None: ...
    def summary(self, summary: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...

    def report(self, record: dict[str, Any]) -> None:
        self.trial.report(float(record["val_acc"]), step=self.offset + int(record["epoch"]) + 1)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self.report(record)
        if self.trial.should_prune():
            raise _optuna().TrialPruned(f"pruned after epoch {record['epoch'] + 1}")


def _holds(run_dir: Path, cfg: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds nothing, or a run of exactly ``cfg`` (display keys aside)."""
    import yaml

    from .bench import config_differences

    stored = run_dir / "config.yaml"
    return not stored.is_file() or not config_differences(yaml.safe_load(stored.read_text()) or {}, cfg)


def _passes(cost: dict[str, Any]) -> float:
    per_step = cost["forward_per_step"] + cost["forward_no_grad_per_step"] + 2 * cost["backward_per_step"]
    return per_step * cost["optimizer_steps"]


@dataclass
class RowTuning:
    """What ``Tuner.results`` found for one row: its pick and its study's counts and compute."""

    row: str
    study: str
    params: dict[str, Any] | None = None
    value: float | None = None
    trials: int = 0
    pruned: int = 0
    epochs: int = 0
    passes: float = 0.0
    lr_edge: bool = False
    lr_position: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return setting_spec(self.row, self.params or {})

    def setting(self) -> str:
        return ", ".join(f"{k.removeprefix('method.').removeprefix('optim.')}={_fmt(v)}"
                         for k, v in (self.params or {}).items()) or "default"


class Tuner:
    """Runs the studies of a grid's rows (``tune``), and reads their picks (``results``)."""

    def __init__(self, dataset: str, rows: Sequence[str], out: str | Path, overrides: Sequence[str],
                 options: TuningOptions, echo: Callable[[str], None] = print) -> None:
        from ..config import load_config

        self.dataset, self.rows, self.out = dataset, list(rows), Path(out)
        self.overrides, self.options, self.echo = list(overrides), options, echo
        base = load_config(overrides=[f"data.name={dataset}", *self.overrides])
        self.lr, self.epochs = float(base["optim"]["lr"]), int(base["train"]["epochs"])
        self.lr_range = options.lr_range or (self.lr * LR_RANGE_FACTORS[0], self.lr * LR_RANGE_FACTORS[1])
        self.url = storage_url(options, self.out)
        self.storage = open_storage(self.url)
        self.identities = {row: grid_identity(dataset, row, self.overrides, options, self.lr) for row in self.rows}
        self.spaces = {row: row_space(row, self.lr, options) for row in self.rows}
        self.studies = {row: open_study(self.storage, self.url, row, self.identities[row],
                                        make_sampler(options.seeds[0], options.trials),
                                        make_pruner(options.pruner, self.epochs)) for row in self.rows}

    # --- counting ---
    def _count(self, row: str, states: Sequence[str]) -> list[Any]:
        optuna = _optuna()
        return self.studies[row].get_trials(deepcopy=False, states=tuple(getattr(optuna.trial.TrialState, s)
                                                                         for s in states))

    def finished(self, row: str) -> int:
        return len(self._count(row, ("COMPLETE", "PRUNED")))

    def done(self) -> bool:
        return all(self.finished(row) >= self.options.trials for row in self.rows)

    # --- running ---
    def tune(self, wait: bool = True, poll: float = 2.0) -> None:
        """Run trials until every row's study has ``trials`` finished ones. ``wait``: then wait for
        the trials other workers are running (taking over any whose worker dies)."""
        while True:
            for row in self.rows:
                self._tune_row(row)
            if not wait or self.done():
                return
            time.sleep(poll)
            for row in self.rows:
                reap_stale(self.studies[row], self.options.stale_after)

    def _tune_row(self, row: str) -> None:
        optuna = _optuna()
        study, n = self.studies[row], self.options.trials
        while True:
            reap_stale(study, self.options.stale_after)
            if len(self._count(row, _LIVE)) >= n and not self._count(row, ("WAITING",)):
                return  # full, and no queued trial (a dead worker's, to continue) left to run
            trial = study.ask(fixed_distributions=self.spaces[row])
            live = sorted(t.number for t in self._count(row, _LIVE))
            if trial.number not in live[:n]:  # a concurrent worker took the last place meanwhile
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return
            self._run_trial(row, trial)

    def trial_folder(self, row: str, number: int) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", row.replace(":", "_").replace("=", "-")).strip("-")
        return self.out / "tuning" / name / f"trial{number}"

    def _run_trial(self, row: str, trial: Any) -> None:
        """Train the trial's setting with every tuning seed, reporting each epoch's validation
        accuracy; tell the study its mean selected validation accuracy, or that it was pruned
        (a diverged run counts as pruned: it stopped early). Compute is recorded either way."""
        from ..config import load_config
        from ..train import Trainer
        from .bench import parse_method_spec

        optuna = _optuna()
        number = trial.user_attrs.get("retry_of", trial.number)
        folder = self.trial_folder(row, number)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("heartbeat", time.time())
        beat = _Heartbeat(self.storage, trial._trial_id, self.options.heartbeat)
        sets = setting_overrides(trial.params)
        values, epochs, passes, state, note = [], 0, 0.0, "complete", ""
        try:
            for i, seed in enumerate(self.options.seeds):
                run_dir = folder / f"seed{seed}"
                cfg = load_config(overrides=[f"data.name={self.dataset}", *self.overrides, *parse_method_spec(row)[1],
                                             *sets, f"train.seed={seed}", f"train.out={run_dir}",
                                             "train.progress=false"])
                if not _holds(run_dir, cfg):  # a folder left by a storage since deleted: not this setting
                    for stale in ("summary.json", "checkpoint.pt"):
                        (run_dir / stale).unlink(missing_ok=True)
                if (run_dir / "summary.json").is_file():  # this seed finished before a worker died
                    summary = json.loads((run_dir / "summary.json").read_text())
                    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
                    offset = i * summary["epochs"]
                    for rec in history:
                        _EpochReporter(trial, offset).report(rec)
                    values.append(summary["val_acc"])
                    epochs, passes = epochs + summary["epochs"], passes + _passes(summary["cost"])
                    continue
                resume = (run_dir / "checkpoint.pt").is_file()
                trainer = (Trainer.resume(run_dir, echo=lambda s: None) if resume
                           else Trainer(cfg, echo=lambda s: None, overwrite=True))
                reporter = _EpochReporter(trial, i * trainer.total_epochs)
                for rec in trainer.history:  # epochs a dead worker trained before its checkpoint
                    reporter.report(rec)
                trainer.loggers.add(reporter)
                try:
                    summary = trainer.fit()
                except (optuna.TrialPruned, NonFiniteError) as exc:
                    state = "pruned"
                    note = "diverged: " + str(exc) if isinstance(exc, NonFiniteError) else str(exc)
                    epochs += trainer.epoch
                    passes += _passes(trainer.meter.summary(trainer.optimizer_steps))
                    break
                values.append(summary["val_acc"])
                epochs, passes = epochs + summary["epochs"], passes + _passes(summary["cost"])
        except BaseException as exc:
            beat.stop()
            self.studies[row].tell(trial, state=optuna.trial.TrialState.FAIL)
            if isinstance(exc, KeyboardInterrupt):  # stopped, not wrong: the next worker continues it
                self.studies[row].enqueue_trial(trial.params, user_attrs={"retry_of": number})
            raise
        beat.stop()
        trial.set_user_attr("epochs", int(epochs))
        trial.set_user_attr("encoder_passes", float(passes))
        trial.set_user_attr("overrides", sets)
        trial.set_user_attr("tune_seeds", list(self.options.seeds))
        if state == "pruned":
            trial.set_user_attr("stopped", note)
            self.studies[row].tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.echo(f"{row} trial {trial.number} ({', '.join(sets)}): {note}")
        else:
            value = sum(values) / len(values)
            self.studies[row].tell(trial, value)
            self.echo(f"{row} trial {trial.number} ({', '.join(sets)}): val acc {value:.4f}")

    # --- reading ---
    def results(self) -> list[RowTuning]:
        """Each row's pick (the finished trial of highest value; ties: the earlier trial) and its
        tuning compute, from the storage (whichever worker ran the trials)."""
        out = []
        for row in self.rows:
            finished = sorted(self._count(row, ("COMPLETE", "PRUNED")), key=lambda t: t.number)
            complete = [t for t in finished if t.state.name == "COMPLETE"]
            r = RowTuning(row, row, trials=len(finished), pruned=len(finished) - len(complete),
                          epochs=sum(int(t.user_attrs.get("epochs", 0)) for t in finished),
                          passes=sum(float(t.user_attrs.get("encoder_passes", 0.0)) for t in finished))
            if complete:
                best = max(complete, key=lambda t: (t.value, -t.number))
                r.params, r.value = dict(best.params), float(best.value)
                r.extra["trial"] = best.number
                lr_dist = self.spaces[row].get("optim.lr")
                if lr_dist is not None:
                    r.lr_position = lr_position(best.params["optim.lr"], lr_dist.low, lr_dist.high)
                    r.lr_edge = not EDGE_FRACTION <= r.lr_position <= 1 - EDGE_FRACTION
            out.append(r)
        return out

    # --- workers ---
    def worker_command(self, seeds: Sequence[int], methods: Sequence[str]) -> list[str]:
        """The self-contained command of one more worker on these studies (it tunes, then exits)."""
        sets = [a for o in self.overrides for a in ("--set", o)]
        o = self.options
        return [sys.executable, "-m", "equimodal", "bench", "--dataset", self.dataset, "--methods", ",".join(methods),
                "--seeds", ",".join(map(str, seeds)), "--out", str(self.out), *sets, "--tune", "--tune-only",
                "--trials", str(o.trials), "--tune-seeds", ",".join(map(str, o.seeds)),
                "--lr-range", f"{self.lr_range[0]!r},{self.lr_range[1]!r}", "--pruner", o.pruner,
                "--storage", self.url, "--no-progress"]

    def run_workers(self, jobs: int, seeds: Sequence[int], methods: Sequence[str],
                    devices: Sequence[str] | None = None) -> None:
        """``jobs`` workers on this machine: ``jobs - 1`` processes plus this one; then wait for all.
        ``devices``: worker k sees only GPU k mod len(devices) (this process keeps its own)."""
        procs = []
        logs = self.out / "tuning"
        logs.mkdir(parents=True, exist_ok=True)
        for k in range(1, jobs):
            env = dict(os.environ)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[k % len(devices)]
            log = open(logs / f"worker{k}.log", "w")
            procs.append((subprocess.Popen(self.worker_command(seeds, methods), stdout=log, stderr=subprocess.STDOUT,
                                           env=env), log))
        try:
            self.tune(wait=True)
        finally:
            for proc, log in procs:
                proc.wait()
                log.close()
        bad = [f"worker {k}: exit {p.returncode} (log: {logs / f'worker{k}.log'})"
               for k, (p, _) in enumerate(procs, 1) if p.returncode]
        if bad and not self.done():
            raise RuntimeError("tuning workers failed: " + "; ".join(bad))


def tuning_table(rows: list[RowTuning], options: TuningOptions, reporting_seeds: Sequence[int], url: str,
                 baseline: str = "joint") -> str:
    """``tuning.md``: each row's trials, pruned trials, compute and pick; the header names both seed sets."""
    base = next((r for r in rows if r.row == baseline), None)
    lines = [header_line(options, reporting_seeds), "",
             "| row | trials (pruned) | tuning epochs | tuning passes × " + baseline + "'s | picked setting | "
             "val acc (%) | lr position |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r.passes / base.passes if base and base.passes else float("nan")
        pos = "-" if r.lr_position is None else f"{r.lr_position:.2f}" + (" ‡ edge" if r.lr_edge else "")
        lines.append(f"| {r.row} | {r.trials} ({r.pruned}) | {r.epochs} | "
                     f"{'-' if math.isnan(ratio) else f'{ratio:.2f}'} | {r.setting() if r.params else '(none finished)'} "
                     f"| {'-' if r.value is None else f'{100 * r.value:.1f}'} | {pos} |")
    lines += ["", f"Studies in {url}. Every row: {options.trials} trials, the same TPE sampler (seeded from tuning "
              f"seed {options.seeds[0]}), pruner `{options.pruner}` on each epoch's validation accuracy (every "
              "epoch of every stage), objective the mean validation accuracy of the tuning seeds; test never "
              "read. Tuning epochs / passes: what the trials actually trained (pruned ones stopped early; "
              "encoder passes: forward 1, backward 2). lr position: the pick on the log learning-rate range "
              "(0 = low end, 1 = high end); ‡: in the outer tenth, so the range may have cut the search short."]
    return "\n".join(lines)


def header_line(options: TuningOptions, reporting_seeds: Sequence[int]) -> str:
    return (f"Tuned with Optuna ({options.trials} trials per row, pruner {options.pruner}) on tuning seed(s) "
            f"{', '.join(map(str, options.seeds))}; reported on seed(s) {', '.join(map(str, reporting_seeds))}.")
