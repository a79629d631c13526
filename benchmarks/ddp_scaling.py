"""Epoch time and peak memory of 1 vs 2 processes (torchrun, gloo on the CPU, NCCL on a GPU).

Runs `equimodal train` for a few epochs on the default data and on a larger input (wider encoders,
more samples), once with one process and once with `torchrun --nproc_per_node 2`, at the same global
batch, and reads the seconds per epoch (metrics.jsonl, first epoch dropped) and each rank's peak
resident memory (summary.json). Prints a table and, last, the 2-process / 1-process epoch-time
ratio on the larger input. On a 2-core CPU little or no gain is expected: it shows the path works.

    python benchmarks/ddp_scaling.py [--epochs 3] [--out bench_out/ddp_scaling]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "default data": ["data.n_train=3000"],
    "larger input": ["data.n_train=6000", "model.width=64", "model.feature_dim=128"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, nproc: int, overrides: list[str], epochs: int) -> dict:
    sets = [a for kv in [*overrides, f"train.epochs={epochs}", "train.probe=false", "train.progress=false"]
            for a in ("--set", kv)]
    head = [sys.executable, "-m", "equimodal"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "equimodal"]
    subprocess.run([*head, "train", "--out", str(out), "--overwrite", *sets], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    seconds = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    summary = json.loads((out / "summary.json").read_text())
    return {"s_per_epoch": sum(seconds) / len(seconds), "rss": summary.get("peak_rss_mib_by_rank", []),
            "test_acc": summary["test_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="bench_out/ddp_scaling")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    print(f"{'setting':<14}{'processes':>10}{'s / epoch':>11}{'peak RSS per rank (MiB)':>26}{'test acc':>10}")
    for name, overrides in SETTINGS.items():
        for nproc in (1, 2):
            r = run(out / f"{name.replace(' ', '_')}-{nproc}", nproc, overrides, args.epochs)
            results[(name, nproc)] = r
            print(f"{name:<14}{nproc:>10}{r['s_per_epoch']:>11.2f}{', '.join(f'{m:.0f}' for m in r['rss']):>26}"
                  f"{r['test_acc']:>10.3f}")
    (out / "results.json").write_text(json.dumps({f"{k[0]} / {k[1]}": v for k, v in results.items()}, indent=2))
    ratio = results[("larger input", 2)]["s_per_epoch"] / results[("larger input", 1)]["s_per_epoch"]
    print(f"2-process / 1-process epoch time (larger input): {ratio:.2f}")


if __name__ == "__main__":
    main()
