"""equimodal bench: the grid, its resumability, the tables and plots."""
import csv

import pytest

from equimodal.analysis.bench import parse_method_spec
from equimodal.analysis.stats import paired_difference, t95
from equimodal.cli import main


def test_paired_difference_by_hand():
    mean, half, n = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.8, 2: 0.6, 3: 0.1})
    diffs = [0.1, 0.0, 0.1]
    sd = (sum((d - 0.2 / 3) ** 2 for d in diffs) / 2) ** 0.5
    assert n == 3 and mean == pytest.approx(0.2 / 3)
    assert half == pytest.approx(4.303 * sd / 3 ** 0.5)
    assert t95(1) == 12.706 and t95(35) == 2.042


def test_method_specs():
    assert parse_method_spec("ogm-boost:mode=both:noise=sgn")[1] == ["method.name=ogm-boost", "method.mode=both",
                                                                       "method.noise=sgn"]
    assert parse_method_spec("alone:audio")[1] == ["method.name=joint", "data.modalities=[audio]"]
    with pytest.raises(ValueError):
        parse_method_spec("ogm:alpha")


def test_bench_grid_tables_plots_and_resume(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--dataset", "synthetic", "--methods", "joint,ogm-ge:alpha=0.5", "--seeds", "0,1",
            "--out", str(out), "--alone", "--no-progress"]
    for o in tiny_overrides:
        if not o.startswith("train.progress"):
            args += ["--set", o]
    args += ["--set", "train.epochs=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 4 and {r["label"] for r in rows} == {"joint", "ogm-ge:alpha=0.5", "alone:visual",
                                                                  "alone:audio"}
    md = (out / "results.md").read_text()
    assert "Δ acc vs joint" in md and "(n=2)" in md
    for png in ("accuracy_per_epoch.png", "coefficients.png", "linear_probe.png"):
        assert (out / png).stat().st_size > 5000
    assert "ogm-ge:alpha=0.5" in printed
    assert main(args) == 0  # everything finished: reused, nothing retrained
    assert capsys.readouterr().out.count("reused") == 8


def test_bench_rejects_a_bad_method_option_before_training(tmp_path, capsys):
    assert main(["bench", "--methods", "joint,ogm-ge:beta=1", "--out", str(tmp_path / "b"), "--seeds", "0"]) == 2
    assert "method.beta" in capsys.readouterr().err
    assert not (tmp_path / "b" / "runs").exists()


def test_diagnose_reports_per_modality_gap_ratio_trace_and_verdict(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "diag"
    args = ["diagnose", "--dataset", "synthetic", "--out", str(out), "--seeds", "0"]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main(args) == 0
    text = (out / "diagnosis.txt").read_text()
    import json
    from pathlib import Path
    alone = json.loads(next((out / "runs").glob("alone_audio-seed0")).joinpath("summary.json").read_text())
    joint = json.loads(next((out / "runs").glob("ogm*seed0")).joinpath("summary.json").read_text())
    audio_line = next(line for line in text.splitlines() if line.startswith("audio"))
    assert f"{100 * alone['probe_acc_by_modality']['audio']:.1f}" in audio_line
    assert f"{100 * joint['probe_acc_by_modality']['audio']:.1f}" in audio_line
    gap = alone["probe_acc_by_modality"]["audio"] - joint["probe_acc_by_modality"]["audio"]
    verdict = text.strip().splitlines()[-1]
    if gap > 0.02:  # a gap above the threshold (one seed: no spread) must be called out
        assert verdict.startswith("IMBALANCED") and "audio" in verdict
    assert (out / "diagnosis.png").stat().st_size > 5000
    joint_hist = Path(next((out / "runs").glob("ogm*seed0"))) / "metrics.jsonl"
    rec = json.loads(joint_hist.read_text().splitlines()[-1])
    assert "rho/audio" in rec and rec["k/audio"] <= 1  # ratios observed, never applied (window closed)
