"""Data-parallel training on PyTorch's own engine: 2 real processes (torchrun, gloo on the CPU)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["data.n_train=400", "data.n_test=100", "model.width=16", "model.feature_dim=32", "optim.lr=0.1",
        "train.batch_size=40", "train.progress=false", "train.device=cpu", "train.probe=false"]

# each rank trains, then saves its own copy of the weights and the per-step OGM coefficients
WORKER = """
import sys, torch
from equimodal.config import load_config
from equimodal.train import Trainer
out, *overrides = sys.argv[1:]
trainer = Trainer(load_config(overrides=overrides), out_dir=out, echo=lambda s: None, overwrite=True)
ks = []
method = trainer.method
if hasattr(method, "before_step"):
    original = method.before_step
    def recording(model):
        original(model)
        if getattr(method, "last_coefficients", None) is not None:
            ks.append(method.last_coefficients.clone())
    method.before_step = recording
trainer.fit()
params = {n: p.detach() for n, p in trainer.model.named_parameters()}  # BatchNorm buffers are per rank
torch.save({"model": params, "ks": ks}, f"{out}/rank{trainer.rank}.pt")
from equimodal import _dist
_dist.exit_worker(0)  # as the CLI ends a torchrun worker: no interpreter teardown of the gloo backend
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def torchrun(nproc: int, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    cmd = [*launcher(nproc), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


def run_worker(tmp_path: Path, name: str, nproc: int, overrides: list[str]) -> Path:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun(nproc, [str(script), str(out), *TINY, *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["ogm-ge", "distill"])
def test_parameters_stay_bit_identical_across_ranks(tmp_path, method):
    out = run_worker(tmp_path, method, 2, [f"method.name={method}", "train.epochs=1"])
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if method == "ogm-ge":  # the same k on both ranks at every step (scores all-reduced first)
        assert len(a["ks"]) == 9 and all(torch.equal(x, y) for x, y in zip(a["ks"], b["ks"]))
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == (3 if method == "distill" else 1)


@pytest.mark.parametrize("method", ["joint", "ogm"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, method):
    """Per-sample normalisation (model.norm=group), so the split over ranks is the only difference."""
    extra = [f"method.name={method}", "train.epochs=2", "model.norm=group"]
    one = run_worker(tmp_path, "one", 1, extra)
    two = run_worker(tmp_path, "two", 2, extra)
    a = torch.load(one / "rank0.pt", weights_only=True)
    b = torch.load(two / "rank0.pt", weights_only=True)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5), k
    if method == "ogm":
        assert len(a["ks"]) == len(b["ks"]) == 18
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a["ks"], b["ks"]))


def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path):
    args = [a for kv in TINY + ["method.name=ogm-ge", "train.epochs=5", "data.n_train=800"] for a in ("--set", kv)]
    full = tmp_path / "full"
    proc = torchrun(2, ["-m", "equimodal", "train", "--out", str(full), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = tmp_path / "cut"
    cmd = [*launcher(2), "-m", "equimodal", "train", "--out", str(cut), *args]
    group = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (cut / "checkpoint.pt").is_file():
        time.sleep(0.02)
    os.killpg(group.pid, signal.SIGKILL)  # the launcher and both workers
    group.wait(timeout=60)
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert 1 <= state["epoch"] < 5
    proc = torchrun(2, ["-m", "equimodal", "train", "--resume", str(cut)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # rank 0's weights and BatchNorm buffers


def test_accumulation_under_two_processes_uses_the_whole_effective_batch(tmp_path):
    """2 processes x 2 micro-batches of a global 40 = one process with one batch of 80."""
    extra = ["method.name=ogm", "train.epochs=1", "model.norm=group"]
    one = run_worker(tmp_path, "one", 1, extra + ["train.batch_size=80"])
    two = run_worker(tmp_path, "two", 2, extra + ["train.batch_size=40", "train.accumulate=2"])
    a = torch.load(one / "rank0.pt", weights_only=True)
    b = torch.load(two / "rank1.pt", weights_only=True)
    assert len(a["ks"]) == len(b["ks"]) == 5
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a["ks"], b["ks"]))
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5), k


EXIT_SCRIPT = """
import atexit, sys, time
atexit.register(lambda: open(f"{sys.argv[1]}/exit{rank}", "w").write(repr(time.time())))  # runs last
from equimodal import _dist
_dist.init_from_env("cpu")  # joins torchrun's group and registers the leave-at-exit handler
rank = _dist.rank()
if rank == 1:
    time.sleep(3)  # rank 0 reaches exit 3 s earlier
open(f"{sys.argv[1]}/done{rank}", "w").write(repr(time.time()))
"""


def test_ranks_leave_the_group_together_at_exit(tmp_path):
    """A script that ends without calling shutdown: the exit handler waits for the other rank (a
    rank closing its gloo connections while another was still finishing aborted that one now and
    then), then leaves; both exit cleanly."""
    script = tmp_path / "ends.py"
    script.write_text(EXIT_SCRIPT)
    proc = torchrun(2, [str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    done1 = float((tmp_path / "done1").read_text())
    exit0 = float((tmp_path / "exit0").read_text())
    assert exit0 >= done1 - 0.05, "rank 0 left before rank 1 had finished"
