"""examples/accelerate_ogm_ge.py: OGM-GE in a Hugging Face Accelerate loop, one and two CPU processes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import accelerate  # noqa: F401  (in the `test` extra: the example needs it)
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_ogm_ge.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# per-sample normalisation, so K micro-batches (or K processes) of b equal one batch of K*b
ARGS = ["--cpu", "--epochs", "2", "--norm", "group", "--n-train", "640"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, *extra: str, processes: int = 1) -> list[dict]:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, str(EXAMPLE), *ARGS, *extra, "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2:" in proc.stdout and "k/audio" in proc.stdout
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]


def close(a: dict, b: dict) -> None:
    assert len(a["ks"]) == len(b["ks"]) == 2 * 9  # 576 training samples, 64 per optimizer step
    for x, y in zip(a["ks"], b["ks"]):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], rtol=1e-4, atol=1e-6), k


def test_accumulation_one_process_and_two_processes_give_the_same_steps(tmp_path):
    big, = run(tmp_path / "big", "--batch-size", "64")
    accumulated, = run(tmp_path / "acc", "--batch-size", "32", "--accumulate", "2")
    # before_step runs once per optimizer step (sync_gradients) and sees the whole effective batch
    close(big, accumulated)
    assert not torch.allclose(big["ks"][0], big["ks"][-1])
    rank0, rank1 = run(tmp_path / "ddp", "--batch-size", "32", processes=2)
    assert rank0["processes"] == rank1["processes"] == 2
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    assert all(torch.equal(x, y) for x, y in zip(rank0["ks"], rank1["ks"]))
    close(accumulated, rank0)  # 2 processes x 32 = 2 micro-batches x 32 (Accelerate shards batches in turn)
