"""Benchmark grids beyond one process: --jobs, --plan + the printed commands + --collect give the
same tables as a direct bench."""
import csv
import shlex
import subprocess

from equimodal.cli import main

TINY = ["data.n_train=200", "data.n_test=100", "model.width=8", "train.epochs=1", "train.probe=false"]


def _args(out, *extra):
    args = ["bench", "--dataset", "synthetic", "--methods", "joint,ogm-ge", "--seeds", "0", "--out", str(out),
            "--no-progress", *extra]
    for o in TINY:
        args += ["--set", o]
    return args


def _accuracies(out):
    return {(r["label"], r["seed"]): r["test_acc"] for r in csv.DictReader(open(out / "results.csv"))}


def test_plan_then_commands_then_collect_and_jobs_equal_a_direct_bench(tmp_path, capsys):
    assert main(_args(tmp_path / "direct")) == 0
    direct = _accuracies(tmp_path / "direct")
    capsys.readouterr()

    assert main(_args(tmp_path / "planned", "--plan")) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(commands) == 2 and all(" train --out " in c for c in commands)
    subprocess.run(shlex.split(commands[0]), check=True, capture_output=True)
    assert main(_args(tmp_path / "planned", "--collect")) == 0  # one cell done: a table of it, the other named
    printed = capsys.readouterr().out
    assert "not finished yet (1 cell(s)" in printed and "ogm-ge seed 0" in printed
    assert set(_accuracies(tmp_path / "planned")) == {("joint", "0")}
    subprocess.run(shlex.split(commands[1]), check=True, capture_output=True)
    assert main(_args(tmp_path / "planned", "--collect")) == 0
    assert _accuracies(tmp_path / "planned") == direct

    assert main(_args(tmp_path / "jobs", "--jobs", "2")) == 0
    assert _accuracies(tmp_path / "jobs") == direct
    assert main(_args(tmp_path / "jobs", "--jobs", "0")) == 2
