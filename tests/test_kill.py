"""A run killed with SIGKILL at random points (a real subprocess, a real kill), including in the
middle of a checkpoint write, resumes and ends with the same weights and metrics as a run that was
never interrupted."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY

ARGS = [a for kv in TINY for a in ("--set", kv)] + ["--set", "train.epochs=4", "--set", "data.n_train=400"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# torch.save made slow *after* writing the temporary file and before the rename, so a kill can land there
SLOW_SAVE = """
import sys, time
import equimodal.train.checkpoint as c
_save = c.torch.save
def slow_save(obj, f, *a, **k):
    _save(obj, f, *a, **k)
    f.flush()
    time.sleep(0.6)
c.torch.save = slow_save
from equimodal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def command(out: Path, resume: bool, slow: bool) -> list[str]:
    head = [sys.executable, "-c", SLOW_SAVE] if slow else [sys.executable, "-m", "equimodal"]
    return head + (["train", "--resume", str(out)] if resume else ["train", "--out", str(out), *ARGS])


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(out, resume=False, slow=False), check=True, env=ENV, capture_output=True, timeout=300)
    return out


def run_with_kills(out: Path, kill_at, slow: bool) -> int:
    """Start (or resume) the run, SIGKILL it when ``kill_at(proc, out)`` says so, repeat until it
    finishes by itself. Returns the number of kills."""
    kills = 0
    for attempt in range(12):
        resume = (out / "checkpoint.pt").is_file()
        proc = subprocess.Popen(command(out, resume, slow), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if kill_at(proc, out, attempt):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        return kills
    raise AssertionError("the run never finished")


def test_random_sigkills_resume_to_the_same_weights_and_metrics(tmp_path, reference):
    rng = random.Random(1234)
    # kill points: after epoch e's line appears (e = 0 means before any), plus a random delay
    points = [(0, rng.uniform(0.0, 1.5)), (1, rng.uniform(0.0, 0.3)), (2, rng.uniform(0.0, 0.3))]

    def kill_at(proc, out, attempt):
        if attempt >= len(points):
            return False
        epochs_done, delay = points[attempt]
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").is_file() else 0
            if lines >= epochs_done:
                break
            time.sleep(0.02)
        try:
            proc.wait(timeout=delay)
            return False  # finished before the kill
        except subprocess.TimeoutExpired:
            return True

    out = tmp_path / "run"
    kills = run_with_kills(out, kill_at, slow=False)
    assert kills >= 1
    assert metrics(out) == metrics(reference)
    got, want = weights(out), weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "summary.json").read_text())["test_acc"] == \
        json.loads((reference / "summary.json").read_text())["test_acc"]


def test_a_kill_in_the_middle_of_a_checkpoint_write_loses_nothing(tmp_path, reference):
    seen_mid_write = []

    def kill_at(proc, out, attempt):
        if attempt >= 2:
            return False
        target = 1 + attempt  # the first write of this attempt that is not the first ever
        writes = 0
        deadline = time.time() + 120
        was_writing = False
        while time.time() < deadline and proc.poll() is None:
            writing = any(out.glob(".checkpoint.pt.*.tmp"))
            if writing and not was_writing:
                writes += 1
                if writes == target:
                    seen_mid_write.append((out / "checkpoint.pt").is_file())
                    return True
            was_writing = writing
            time.sleep(0.02)
        return False

    out = tmp_path / "run"
    kills = run_with_kills(out, kill_at, slow=True)
    assert kills == 2 and len(seen_mid_write) == 2
    assert not list(out.glob(".checkpoint.pt.*.tmp")), "stale temporaries are cleaned on resume"
    assert metrics(out) == metrics(reference)
    got, want = weights(out), weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
