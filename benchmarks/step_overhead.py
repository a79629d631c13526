"""Time one training step of ogm-ge against joint on the same model and batch.

Steps are interleaved (joint, ogm-ge, joint, ...) so drift in machine load hits both alike; the
median of per-pair ratios is printed last as ``ogm-ge/joint step time ratio: X.XX``.

    python benchmarks/step_overhead.py [--reps 300] [--batch-size 64] [--device cpu] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from equimodal.config import load_config
from equimodal.data import load_dataset
from equimodal.methods import build_method
from equimodal.train import build_model, build_optimizer


def make_step(model, method, optimizer, inputs, y, device):
    def step():
        out = model(inputs)
        sum(method.loss(out, y).values()).backward()
        method.before_step(model)
        optimizer.step()
        method.after_step(model)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fusion", default="concat")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = load_config(overrides=[f"model.fusion={args.fusion}"])
    splits = load_dataset("synthetic", **{k: v for k, v in cfg["data"].items() if k != "name"})
    inputs, y = splits.train[torch.arange(args.batch_size)]
    inputs, y = {m: x.to(device) for m, x in inputs.items()}, y.to(device)
    torch.manual_seed(0)
    base = build_model(cfg["model"], splits).to(device)
    steps = {}
    for name in ("joint", "ogm-ge"):
        model = copy.deepcopy(base)
        method = build_method(name)
        opt = build_optimizer(cfg["optim"], model, method)
        method.setup(model, opt)
        steps[name] = make_step(model, method, opt, inputs, y, device)
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times = {n: [] for n in steps}
    for _ in range(args.reps):
        for name, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[name].append(time.perf_counter() - t0)
    ratios = [o / j for j, o in zip(times["joint"], times["ogm-ge"])]
    result = {"device": str(device), "batch_size": args.batch_size, "reps": args.reps, "fusion": args.fusion,
              "torch_threads": torch.get_num_threads(),
              "joint_median_ms": 1e3 * statistics.median(times["joint"]),
              "ogm_ge_median_ms": 1e3 * statistics.median(times["ogm-ge"]),
              "median_ratio": statistics.median(ratios)}
    print(f"joint  step: median {result['joint_median_ms']:.2f} ms over {args.reps} reps")
    print(f"ogm-ge step: median {result['ogm_ge_median_ms']:.2f} ms over {args.reps} reps")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(f"ogm-ge/joint step time ratio: {result['median_ratio']:.2f}")


if __name__ == "__main__":
    main()
