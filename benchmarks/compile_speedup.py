"""``train.compile``: the training step of joint and ogm-ge, eager against compiled, same model and batch.

The compiled model is a copy of the eager one with its parts compiled in place
(``equimodal.train.compile.compile_model``: each encoder and the fusion head; the methods' math
stays eager). Compilation happens in the warm-up and is timed separately. Steps are interleaved
(eager, compiled, eager, ...) and the median of per-pair ratios is printed; the last line is
``compiled speed-up (ogm-ge): X.XX`` (eager time / compiled time). Writes the figures to
``--out`` (docs/results/compile by default).

    python benchmarks/compile_speedup.py [--reps 100] [--batch-size 64] [--width 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from equimodal.config import load_config
from equimodal.data import load_dataset
from equimodal.methods import build_method
from equimodal.train import build_model, build_optimizer
from equimodal.train.compile import compile_model


def make_step(model, method, optimizer, device):
    def step(inputs, y):
        sum(method.loss(method.forward(model, inputs), y).values()).backward()
        method.before_step(model)
        optimizer.step()
        method.after_step(model)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier ratios when other jobs share the cores; 0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs/results/compile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    device = torch.device(args.device)
    cfg = load_config(overrides=[f"model.width={args.width}"])
    splits = load_dataset("synthetic", **{k: v for k, v in cfg["data"].items() if k != "name"})
    inputs, y = splits.train[torch.arange(args.batch_size)]
    inputs, y = {m: x.to(device) for m, x in inputs.items()}, y.to(device)
    torch.manual_seed(0)
    base = build_model(cfg["model"], splits).to(device)
    result = {"device": str(device), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "load_at_start": load, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "width": args.width, "reps": args.reps, "methods": {}}
    for name in ("joint", "ogm-ge"):
        steps, compile_s = {}, 0.0
        for label in ("eager", "compiled"):
            model = copy.deepcopy(base)
            if label == "compiled":
                compile_model(model)
            method = build_method(name)
            opt = build_optimizer(cfg["optim"], model, method)
            method.setup(model, opt)
            steps[label] = make_step(model, method, opt, device)
            start = time.perf_counter()
            for _ in range(args.warmup):
                steps[label](inputs, y)
            if label == "compiled":
                compile_s = time.perf_counter() - start
        times = {k: [] for k in steps}
        for _ in range(args.reps):
            for label, step in steps.items():
                t0 = time.perf_counter()
                step(inputs, y)
                times[label].append(time.perf_counter() - t0)
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
        r = {"eager_ms": 1e3 * statistics.median(times["eager"]),
             "compiled_ms": 1e3 * statistics.median(times["compiled"]),
             "speedup": statistics.median(ratios), "compile_and_warmup_s": compile_s}
        result["methods"][name] = r
        print(f"{name:>7}: eager {r['eager_ms']:.2f} ms, compiled {r['compiled_ms']:.2f} ms per step, "
              f"speed-up {r['speedup']:.2f} (compile + warm-up {compile_s:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {n} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup']:.2f} | "
                     f"{r['compile_and_warmup_s']:.0f} |" for n, r in result["methods"].items())
    (out / "compile.md").write_text(f"""# train.compile: eager vs compiled training step

Command: `python benchmarks/compile_speedup.py --reps {args.reps} --batch-size {args.batch_size} --width {args.width} --threads {args.threads}`
on {device}. Timings were taken on a shared 2-core machine ({result['machine']}, torch {torch.__version__},
{result['threads']} threads): load average at the start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}. Eager and
compiled steps are interleaved; speed-up = median of per-pair ratios eager / compiled.
Model: default synthetic data, SmallCNN encoders (width {args.width}), concat fusion, SGD.

| method | eager ms | compiled ms | speed-up | compile + warm-up (s) |
| --- | --- | --- | --- | --- |
{rows}
""")
    print(f"compiled speed-up (ogm-ge): {result['methods']['ogm-ge']['speedup']:.2f}")


if __name__ == "__main__":
    main()
