"""The fair-comparison protocol: tuning picks on validation only, shared stage budgets, the
equal-compute mark and the best-single-modality reference in bench tables."""
import json

import pytest

from conftest import TINY
from equimodal.analysis.bench import parse_method_spec, pick_tuned, summarise, tuning_settings
from equimodal.config import load_config
from equimodal.errors import ConfigError
from equimodal.train import Trainer
from equimodal.train.trainer import share_budget


def test_tuning_settings_come_from_the_search_space_or_the_learning_rate():
    assert tuning_settings("ogm-ge", 0.01) == ["ogm-ge", "ogm-ge:alpha=0.1", "ogm-ge:alpha=0.3", "ogm-ge:alpha=0.5"]
    assert tuning_settings("joint", 0.01) == ["joint", "joint:optim.lr=0.005", "joint:optim.lr=0.02", "joint:optim.lr=0.04"]
    assert tuning_settings("alone:audio", 0.1)[1] == "alone:audio:optim.lr=0.05"
    # an option fixed in the row stays fixed; nothing left to tune -> the learning rate
    assert tuning_settings("ogm-ge:alpha=0.2", 0.01)[1] == "ogm-ge:alpha=0.2:optim.lr=0.005"
    assert parse_method_spec("joint:optim.lr=0.02")[1] == ["method.name=joint", "optim.lr=0.02"]
    assert parse_method_spec("alone:audio:optim.lr=0.02")[1] == ["method.name=joint", "data.modalities=[audio]",
                                                                 "optim.lr=0.02"]


def _run(label, seed, val, test, passes=100, selection="last"):
    return {"label": label, "method": label.split(":")[0], "seed": seed, "val_acc": val, "test_acc": test,
            "test_macro_f1": test, "epochs": 2, "seconds": 1.0, "selection": selection, "estimator": "probe",
            "modalities": ["a", "b"], "test_acc_by_modality": {}, "probe_acc_by_modality": {},
            "last_epoch_test_acc": test - 0.1,
            "cost": {"optimizer_steps": passes, "forward_per_step": 1, "forward_no_grad_per_step": 0,
                     "backward_per_step": 0}}


def test_the_pick_is_made_on_validation_and_never_on_test(tmp_path):
    settings = {"m": ["m", "m:x=1", "m:x=2"]}
    results = [_run("m", s, 0.50, 0.90) for s in (0, 1)]           # best on test
    results += [_run("m:x=1", s, 0.70, 0.60) for s in (0, 1)]      # best on validation
    results += [_run("m:x=2", 0, 0.99, 0.99)]                      # a seed missing: not eligible
    picked = pick_tuned(results, settings, tmp_path)
    assert {r["tuned"] for r in picked} == {"x=1"} and [r["test_acc"] for r in picked] == [0.60, 0.60]
    assert all(r["label"] == "m" for r in picked)
    assert "**yes**" in (tmp_path / "tuning.md").read_text().splitlines()[3]  # the m:x=1 line
    tie = pick_tuned([_run("m", 0, 0.5, 0.1), _run("m:x=1", 0, 0.5, 0.9)], {"m": ["m", "m:x=1"]}, tmp_path)
    assert tie[0]["tuned"] == "default"  # ties keep the default


def test_table_marks_unequal_compute_and_compares_with_the_best_modality_alone(tmp_path):
    results = [_run("joint", s, 0.8, 0.80 + 0.01 * s) for s in (0, 1, 2)]
    results += [_run("slow", s, 0.8, 0.85 + 0.01 * s, passes=300) for s in (0, 1, 2)]
    results += [_run("alone:a", s, 0.70, 0.90, passes=50) for s in (0, 1, 2)]   # better on test ...
    results += [_run("alone:b", s, 0.75, 0.60, passes=50) for s in (0, 1, 2)]   # ... but b is better on validation
    table = summarise(results, tmp_path)
    header, _, joint, slow, *_ = table.splitlines()
    assert "Δ vs best alone (b)" in header
    assert slow.split("|")[-3].strip().endswith("†") and "†" not in joint
    assert "+5.0 ± 0.0 (n=3) †" in slow and "+26.0 ± 2.5 (n=3) †" in slow  # vs joint; vs alone:b
    assert "not at equal compute" in (tmp_path / "results.md").read_text()


def test_shared_budget_splits_the_epochs_over_the_stages():
    assert share_budget([12, 12, 12], 12) == [4, 4, 4]
    assert share_budget([6, 1, 1, 1, 1, 1, 1], 12) == [4, 2, 2, 1, 1, 1, 1]
    assert sum(share_budget([5, 12, 3], 13)) == 13
    with pytest.raises(ConfigError, match="train.epochs=2 cannot hold 3 stages"):
        share_budget([1, 1, 1], 2)


def test_a_multi_stage_method_trains_the_same_epochs_in_all_under_a_shared_budget(tmp_path):
    cfg = load_config(overrides=[*TINY, "method.name=distill", "train.epochs=3", "train.stage_budget=shared",
                                 "train.probe=false"])
    summary = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    assert summary["epochs"] == 3 and sum(summary["cost"]["stage_epochs"].values()) == 3
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["cost"]["stage_epochs"] == {
        "teacher": 1, "student": 1, "fuse": 1}


def test_bench_tune_with_tuning_seeds_runs_each_pick_with_every_seed(tmp_path, capsys):
    from equimodal.cli import main
    out = tmp_path / "tuned"
    args = ["bench", "--dataset", "synthetic", "--methods", "joint,ogm-ge", "--seeds", "0,1", "--tune-grid",
            "--tune-seeds", "0", "--out", str(out), "--no-progress"]
    for o in ["data.n_train=200", "data.n_test=100", "model.width=8", "train.epochs=1", "train.probe=false"]:
        args += ["--set", o]
    assert main(args) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len([r for r in runs if r.endswith("seed0")]) == 8  # 4 settings x 2 rows, tuning seed only
    tuning = (out / "tuning.md").read_text()
    picks = [line.split("|")[2].strip() for line in tuning.splitlines() if "**yes**" in line]
    assert len(picks) == 2
    table = (out / "results.md").read_text()
    for row, pick in zip(("joint", "ogm-ge"), picks):
        line = next(x for x in table.splitlines() if x.startswith(f"| {row} |"))
        assert f"| 2 | {pick if pick != '(default)' else 'default'} |" in line  # both seeds of the pick
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "0", "--tune-grid",
                 "--tune-seeds", "5", "--out", str(out)]) == 2
    assert "--tune-seeds [5] must be among --seeds [0]" in capsys.readouterr().err


def test_a_run_that_predates_a_config_key_is_reusable_only_at_that_keys_default():
    from equimodal.analysis.bench import config_differences
    wanted = load_config(overrides=["train.epochs=3"])
    stored = {k: dict(v) for k, v in wanted.items()}
    del stored["train"]["stage_budget"]
    assert config_differences(stored, wanted) == []
    wanted["train"]["stage_budget"] = "shared"
    assert config_differences(stored, wanted) == ["train.stage_budget: None -> 'shared'"]


def test_best_validation_selection_reports_the_last_epoch_beside_it(tmp_path):
    cfg = load_config(overrides=[*TINY, "train.epochs=3", "train.select=best_val", "train.probe=false"])
    summary = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["last_epoch_val_acc"] == history[-1]["val_acc"]
    from equimodal import evaluate_run
    assert summary["last_epoch_test_acc"] == pytest.approx(evaluate_run(tmp_path, last=True)["acc"], abs=1e-12)
    if summary["selected_epoch"] == 2:
        assert summary["last_epoch_test_acc"] == summary["test_acc"]
    last = load_config(overrides=[*TINY, "train.epochs=3", "train.probe=false"])
    same = Trainer(last, out_dir=tmp_path / "last", echo=lambda s: None).fit()  # same seed, last epoch
    assert summary["last_epoch_test_acc"] == same["test_acc"]


@pytest.mark.parametrize("alone, joint, expected", [
    ([0.80, 0.75, 0.85], [0.60, 0.56, 0.66], "IMBALANCED"),       # a consistent 19-point gap
    ([0.80, 0.60, 0.70], [0.62, 0.70, 0.55], "NOT SHOWN"),        # a 7.7-point mean gap, noisy across seeds
    ([0.80, 0.75, 0.85], [0.79, 0.75, 0.84], "NOT IMBALANCED"),   # no gap above the threshold
])
def test_diagnose_counts_a_gap_whose_paired_interval_excludes_zero(tmp_path, monkeypatch, alone, joint, expected):
    from equimodal.analysis import diagnose as diag
    from equimodal.analysis.bench import GridResults

    def fake_grid(dataset, specs, seeds, out, overrides, **kwargs):
        rows = GridResults()
        for s in seeds:
            hist = [{"rho/visual": 1.5, "rho/audio": 0.7, "val_acc": 0.9}]
            rows.append({"label": diag.JOINT_LABEL, "seed": s, "val_acc": 0.9, "history": hist,
                         "probe_val_acc_by_modality": {"visual": 0.9, "audio": joint[s]}})
            rows.append({"label": "alone:audio", "seed": s, "val_acc": 0.7, "history": [],
                         "probe_val_acc_by_modality": {"audio": alone[s]}})
            rows.append({"label": "alone:visual", "seed": s, "val_acc": 0.9, "history": [],
                         "probe_val_acc_by_modality": {"visual": 0.9}})
        rows.failures, rows.missing = [], []
        return rows

    monkeypatch.setattr(diag, "run_grid", fake_grid)
    monkeypatch.setattr(diag, "_figure", lambda *a, **k: None)
    report = diag.diagnose("synthetic", tmp_path, seeds=[0, 1, 2], echo=lambda s: None)
    assert report["verdict"].startswith(expected)
    assert "95% CI" in report["text"]
