"""bench --tune on Optuna: equal studies per row, the learning rate searched everywhere, pruning
with its compute counted, tuning seeds apart from reporting seeds and validation-only figures in
the sampler and pruner, shared and resumable storages, mismatches refused."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from equimodal.analysis import tuning
from equimodal.analysis.tuning import Tuner, TuningOptions, row_space
from equimodal.cli import main
from equimodal.errors import ConfigError
from equimodal.methods import available_methods
from equimodal.methods._registry import method_class

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.n_train=100", "data.n_test=50", "model.width=4", "model.feature_dim=8", "optim.lr=0.1",
         "train.batch_size=50", "train.probe=false", "train.device=cpu", "train.progress=false"]


def _trials(url, row, states=("COMPLETE", "PRUNED")):
    study = optuna.load_study(study_name=row, storage=tuning.open_storage(url))
    return study.get_trials(states=tuple(getattr(optuna.trial.TrialState, s) for s in states))


class _Seen:
    """What the sampler and pruner are shown: every finished or running trial they could read."""

    def __init__(self):
        self.trials = {}
        self.sampler_seeds = []

    def record(self, study):
        for t in study.get_trials(deepcopy=False):
            self.trials[(study.study_name, t.number)] = (dict(t.intermediate_values),
                                                         t.value if t.state.name == "COMPLETE" else None,
                                                         dict(t.user_attrs), dict(t.params))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuned bench (joint and a 3-stage distill, 2 trials each, tuning seed 100, reporting seed
    0), with the sampler and pruner wrapped to record everything they are given."""
    from equimodal import bench

    seen = _Seen()
    real_sampler, real_pruner = tuning.make_sampler, tuning.make_pruner

    def sampler(seed, trials):
        seen.sampler_seeds.append(seed)
        inner = real_sampler(seed, trials)
        real_before = inner.before_trial

        def before_trial(study, trial):
            seen.record(study)
            return real_before(study, trial)
        inner.before_trial = before_trial
        return inner

    def pruner(name, epochs):
        inner = real_pruner(name, epochs)

        class Recording(optuna.pruners.BasePruner):
            def prune(self, study, trial):
                seen.record(study)
                return inner.prune(study, trial)
        return Recording()

    out = tmp_path_factory.mktemp("tune") / "grid"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "make_sampler", sampler)
        mp.setattr(tuning, "make_pruner", pruner)
        result = bench("synthetic", methods=["joint", "distill"], seeds=[0], out=out, tune=True, trials=2,
                       overrides=[*SMALL, "train.epochs=3", "train.stage_budget=shared"], plots=False,
                       echo=lambda s: None)
    return out, result, seen


def test_every_row_gets_exactly_n_trials_and_searches_the_learning_rate(tuned):
    out, result, _ = tuned
    url = f"sqlite:///{out.resolve() / 'tuning.db'}"
    for row in ("joint", "distill"):
        finished = _trials(url, row)
        assert len(finished) == 2
        lrs = [t.params["optim.lr"] for t in finished]
        assert len(set(lrs)) == 2, f"{row}: every trial at one learning rate {lrs}"
        for t in finished:  # the run trained at the sampled rate (as the pick's spec names it)
            cfg = (out / "tuning" / row / f"trial{t.number}" / "seed100" / "config.yaml").read_text()
            assert f"lr: {float(tuning._fmt(t.params['optim.lr']))}" in cfg
    assert "method.weight" in _trials(url, "distill")[0].params  # and the method's own option
    table = (out / "results.md").read_text()
    assert "tuning seed(s) 100; reported on seed(s) 0" in table.splitlines()[0]
    assert {r["label"] for r in result.runs} == {"joint", "distill"}


@pytest.mark.parametrize("name", [*available_methods(), "alone:audio"])
def test_every_row_searches_the_same_learning_rate_range_on_a_log_scale(name):
    space = row_space(name, 0.01, TuningOptions())
    lr = space["optim.lr"]
    assert lr.log and (lr.low, lr.high) == pytest.approx((0.01 / 30, 1.0))
    own = {} if name.startswith("alone") else method_class(name).search_space
    assert set(space) - {"optim.lr"} == {f"method.{k}" for k in own}


def test_multi_stage_methods_report_every_epoch_of_every_stage(tuned):
    out, _, _ = tuned
    url = f"sqlite:///{out.resolve() / 'tuning.db'}"
    for t in _trials(url, "distill", ("COMPLETE",)):
        assert sorted(t.intermediate_values) == [1, 2, 3]  # teacher, student, fuse: one epoch each
        history = [json.loads(x) for x in (out / "tuning" / "distill" / f"trial{t.number}" / "seed100" /
                                           "metrics.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in history] == ["teacher", "student", "fuse"]


def test_only_tuning_seeds_and_validation_figures_reach_the_sampler_and_the_pruner(tuned):
    out, result, seen = tuned
    assert seen.trials, "the sampler and pruner were called"
    assert set(seen.sampler_seeds) == {100}  # the sampler is seeded from the tuning seed, never a reporting one
    for (row, number), (intermediate, value, attrs, params) in seen.trials.items():
        folder = out / "tuning" / row / f"trial{number}" / "seed100"
        history = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        val = {i + 1: r["val_acc"] for i, r in enumerate(history)}
        assert all(intermediate[s] == val[s] for s in intermediate), "per-epoch validation accuracy only"
        if value is not None:
            assert value == json.loads((folder / "summary.json").read_text())["val_acc"]
        assert not any("test" in k for k in attrs) and not any("test" in k for k in params)
        assert attrs.get("tune_seeds", [100]) == [100]
        assert json.loads((folder / "summary.json").read_text() if (folder / "summary.json").is_file()
                          else '{"seed": 100}')["seed"] == 100
    assert {r["seed"] for r in result.runs} == {0}  # the picks, reported on the reporting seed only
    for run in result.runs:
        assert "seed0" in run["folder"] and "tuning" not in run["folder"]


def test_a_tuning_seed_that_is_a_reporting_seed_is_refused(tmp_path, capsys):
    args = ["bench", "--methods", "joint", "--seeds", "0,1", "--tune", "--tune-seeds", "1,100",
            "--out", str(tmp_path / "b")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tuning seed(s) [1] are also reporting seeds" in err
    assert not (tmp_path / "b" / "tuning").exists()


def test_a_storage_of_another_grid_configuration_is_refused_in_one_line(tuned, capsys):
    out, _, _ = tuned
    base = ["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "0", "--tune", "--out", str(out)]
    sets = [a for o in [*SMALL, "train.epochs=2", "train.stage_budget=shared"] for a in ("--set", o)]
    assert main([*base, "--trials", "2", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another grid configuration" in err and "train.epochs: 3 -> 2" in err
    sets = [a for o in [*SMALL, "train.epochs=3", "train.stage_budget=shared"] for a in ("--set", o)]
    assert main([*base, "--trials", "5", *sets]) == 2
    assert "trials: 2 -> 5" in capsys.readouterr().err


def test_a_pruned_trial_stops_early_and_its_compute_is_counted(tmp_path, monkeypatch):
    class OddTrialsAfterOneEpoch(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number % 2 == 1 and trial.last_step == 1

    monkeypatch.setattr(tuning, "make_pruner", lambda name, epochs: OddTrialsAfterOneEpoch())
    tuner = Tuner("synthetic", ["joint"], tmp_path, [*SMALL, "train.epochs=2"], TuningOptions(trials=3),
                  echo=lambda s: None)
    tuner.tune()
    (row,) = tuner.results()
    assert (row.trials, row.pruned) == (3, 1)
    assert row.epochs == 2 + 1 + 2  # the pruned trial trained one epoch of two
    pruned = _trials(tuner.url, "joint", ("PRUNED",))[0]
    folder = tmp_path / "tuning" / "joint" / f"trial{pruned.number}" / "seed100"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1 and not (folder / "summary.json").exists()
    full = _trials(tuner.url, "joint", ("COMPLETE",))[0].user_attrs["encoder_passes"]
    assert pruned.user_attrs["epochs"] == 1
    assert pruned.user_attrs["encoder_passes"] == pytest.approx(full / 2)
    assert row.passes == pytest.approx(2 * full + full / 2)


def _worker(out, trials, epochs, pruner="halving"):
    sets = [a for o in [*SMALL, f"train.epochs={epochs}"] for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "equimodal", "bench", "--dataset", "synthetic", "--methods", "joint",
                             "--seeds", "0", "--out", str(out), "--tune", "--tune-only", "--trials", str(trials),
                             "--pruner", pruner, *sets],
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_on_one_sqlite_storage_finish_n_trials_together_none_repeated(tmp_path):
    workers = [_worker(tmp_path, 4, 1), _worker(tmp_path, 4, 1)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    url = f"sqlite:///{tmp_path.resolve() / 'tuning.db'}"
    finished = _trials(url, "joint")
    assert len(finished) == 4
    assert len({t.params["optim.lr"] for t in finished}) == 4  # no setting run twice
    assert not _trials(url, "joint", ("RUNNING", "WAITING"))
    trained = sorted((tmp_path / "tuning" / "joint").glob("trial*/seed100/summary.json"))
    assert len(trained) == len(_trials(url, "joint", ("COMPLETE",)))  # each trial trained once, in its own folder


def test_a_killed_workers_study_resumes_where_it_stopped(tmp_path):
    worker = _worker(tmp_path, 2, 3, pruner="none")
    last = tmp_path / "tuning" / "joint" / "trial1" / "seed100"
    deadline = time.time() + 180
    while time.time() < deadline:  # kill it inside its last trial, after that trial's first checkpoint
        half = (last / "checkpoint.pt").is_file() and not (last / "summary.json").is_file()
        if half:
            break
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert half, "the worker never reached a checkpoint"
    url = f"sqlite:///{tmp_path.resolve() / 'tuning.db'}"
    killed = _trials(url, "joint", ("RUNNING",))
    assert len(killed) == 1
    tuner = Tuner("synthetic", ["joint"], tmp_path, [*SMALL, "train.epochs=3"], TuningOptions(trials=2, pruner="none"),
                  echo=lambda s: None)
    tuner.tune(wait=False)  # no other worker: it must take the dead one's trial over itself
    finished = _trials(url, "joint")
    assert len(finished) == 2
    failed = _trials(url, "joint", ("FAIL",))
    assert [t.number for t in failed] == [killed[0].number] and failed[0].user_attrs["failed"] == "worker gone"
    retry = next(t for t in finished if t.user_attrs.get("retry_of") == killed[0].number)
    assert retry.params == killed[0].params and sorted(retry.intermediate_values) == [1, 2, 3]
    folder = tmp_path / "tuning" / "joint" / f"trial{killed[0].number}" / "seed100"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 3  # continued, not retrained
    assert retry.user_attrs["epochs"] == 3


def test_plan_prints_worker_commands_that_share_the_storage_then_the_reporting_cells(tuned, tmp_path, capsys):
    sets = [a for o in [*SMALL, "train.epochs=1"] for a in ("--set", o)]
    args = ["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "0", "--tune", "--trials", "2",
            "--out", str(tmp_path / "p"), "--storage", f"journal:{tmp_path / 'studies.log'}", "--plan", "--jobs", "3",
            *sets]
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3 and len(set(lines)) == 1
    assert f"--storage journal:{tmp_path / 'studies.log'}" in lines[0] and "--tune-only" in lines[0]
    assert "0 of 2 trial(s) finished" in captured.err
    out, _, _ = tuned  # finished studies: the picks' reporting cells (already run there: none left)
    sets = [a for o in [*SMALL, "train.epochs=3", "train.stage_budget=shared"] for a in ("--set", o)]
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint,distill", "--seeds", "0,1", "--tune",
                 "--trials", "2", "--out", str(out), "--plan", *sets]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2 and "seed1" in captured.out  # the new reporting seed only
    assert "tuning finished; 2 of 4 reporting cell(s)" in captured.err


def test_a_method_declaring_ranges_is_searched_over_them(monkeypatch):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from equimodal.methods import _registry
    from equimodal.methods._space import Choice, FloatRange, IntRange

    class Declared:
        search_space = {"alpha": FloatRange(0.1, 3.0, log=True), "warmup": IntRange(1, 6), "mode": Choice("a", "b"),
                        "old": (1, 2, 3)}

    monkeypatch.setattr(_registry, "method_class", lambda name: Declared)
    space = row_space("declared:mode=b", 0.1, TuningOptions(lr_range=(1e-3, 1.0)))
    assert space == {"optim.lr": FloatDistribution(1e-3, 1.0, log=True),
                     "method.alpha": FloatDistribution(0.1, 3.0, log=True), "method.warmup": IntDistribution(1, 6),
                     "method.old": CategoricalDistribution([1, 2, 3])}  # mode is fixed by the row
    assert tuning.setting_spec("declared", {"optim.lr": 0.012345, "method.alpha": 0.5}) == \
        "declared:optim.lr=0.01235:alpha=0.5"
    with pytest.raises(ConfigError, match="--lr-range"):
        TuningOptions(lr_range=(1.0, 0.1))


def test_a_pick_in_the_outer_tenth_of_the_learning_rate_range_is_flagged(tmp_path):
    from equimodal.analysis.tuning import tuning_table

    options = TuningOptions(trials=2, lr_range=(1e-3, 1.0))
    tuner = Tuner("synthetic", ["joint", "alone:audio"], tmp_path, [*SMALL, "train.epochs=1"], options,
                  echo=lambda s: None)
    lr = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    for row, best in (("joint", 0.7), ("alone:audio", 0.03)):  # 0.7: 95% up the log range; 0.03: 51%
        for value, rate in ((0.9, best), (0.5, 0.01)):
            tuner.studies[row].add_trial(optuna.trial.create_trial(
                params={"optim.lr": rate}, distributions={"optim.lr": lr}, value=value,
                user_attrs={"epochs": 1, "encoder_passes": 10.0}))
    joint, alone = tuner.results()
    assert joint.lr_edge and joint.lr_position == pytest.approx(0.948, abs=1e-3) and joint.params == {"optim.lr": 0.7}
    assert not alone.lr_edge and (alone.trials, alone.epochs, alone.passes) == (2, 2, 20.0)
    text = tuning_table([joint, alone], options, [0, 1], tuner.url)
    assert "0.95 ‡ edge" in next(x for x in text.splitlines() if x.startswith("| joint |"))
    assert "‡" not in next(x for x in text.splitlines() if x.startswith("| alone:audio |"))
    assert "tuning seed(s) 100; reported on seed(s) 0, 1" in text.splitlines()[0]


def test_a_trial_made_surplus_by_a_concurrent_worker_is_given_back_untrained(tmp_path):
    """Two workers count N-1 live trials at once and both ask: the later trial is failed (marked
    surplus) before it trains, so the study still ends with N; a live worker's trial is left alone."""
    tuner = Tuner("synthetic", ["joint"], tmp_path, [*SMALL, "train.epochs=1"], TuningOptions(trials=1),
                  echo=lambda s: None)
    study = tuner.studies["joint"]
    real_ask = study.ask

    def ask_after_another_worker(*args, **kwargs):
        other = real_ask(*args, **kwargs)  # the other worker's trial, asked a moment earlier
        other.set_user_attr("host", socket.gethostname())
        other.set_user_attr("pid", os.getpid())  # alive
        other.set_user_attr("heartbeat", time.time())
        return real_ask(*args, **kwargs)

    study.ask = ask_after_another_worker
    tuner._tune_row("joint")
    study.ask = real_ask
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["RUNNING", "FAIL"] and trials[1].user_attrs["surplus"] is True
    assert not (tmp_path / "tuning").exists()  # nothing trained
    tuner._tune_row("joint")  # the study is full (one live trial): nothing more is asked
    assert len(study.get_trials()) == 2
