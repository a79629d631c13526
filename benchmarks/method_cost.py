"""What every registered method costs relative to ``joint`` (default data and model, CPU).

Single-stage methods: one training step (one batch: every sub-step's forward, loss, backward,
before_step, optimizer step, after_step) on the same model (same initial weights) and batch. Each
method's step is timed right after a ``joint`` step, pair after pair, rounds repeated; the figure
is the median of the per-pair ratios. As the anchor, the official OGM-GE code's step logic
(GeWu-Lab/OGM-GE_CVPR2022 ``main.py``: a Python loop over the samples for the scores, a host sync
on the ratio, ``.item()`` per gradient for the noise std, ``.item()`` per loss) runs on the same
model in the same rounds.

Every method (single- and multi-stage): the trainer's whole run (``fit``, probes off) at the same
``train.epochs`` against a ``joint`` run timed just before it, divided per trained epoch
(a multi-stage method trains several stages, each of the run's epochs unless it fixes its own);
this includes the methods' end-of-epoch work (prototypes, held-out estimates, re-learning) that a
step does not show.

Writes ``method_cost.md`` and ``method_cost.json`` to ``--out`` (docs/results/method-cost) and
prints the OGM-GE/official ratio last.

    python benchmarks/method_cost.py [--reps 40] [--run-reps 2] [--epochs 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from equimodal.config import load_config
from equimodal.data import load_dataset
from equimodal.methods import MethodData, build_method
from equimodal.methods._registry import _REGISTRY
from equimodal.train import Trainer, build_model, build_optimizer

OGM_FAMILY = ("ogm", "ogm-ge", "ogm-boost")
OFFICIAL = "official OGM-GE step"


def method_step(model, method, optimizer):
    """One batch of the hook contract (``_base.py``), as the trainer runs it without extras."""
    def step(inputs, y):
        n = method.substeps()
        for sub in range(n):
            if n > 1:
                method.on_substep(sub)
            out = method.forward(model, inputs)
            sum(method.loss(out, y).values()).backward()
            method.before_step(model)
            optimizer.step()
            method.after_step(model)
            optimizer.zero_grad(set_to_none=True)
    return step


def official_ogm_ge_step(model, optimizer, alpha: float = 0.8, epoch: int = 0, starts: int = 0, ends: int = 50):
    """The official OGM-GE training step (main.py, ``train_epoch``, modulation OGM_GE) on our model.

    Per-modality logits come from the model's estimator (for concat fusion the same weight slices
    the official code multiplies by hand); parameters are those of each encoder with 4-D gradients
    (the official name rule ``'audio' in layer and len(grad.size()) == 4``)."""
    audio, visual = model.modalities[0], model.modalities[1]
    owner = {id(p): m for m in (audio, visual) for p in model.encoder(m).parameters()}
    criterion = nn.CrossEntropyLoss()
    softmax, relu, tanh = nn.Softmax(dim=1), nn.ReLU(inplace=True), nn.Tanh()

    def step(inputs, label):
        optimizer.zero_grad()
        output = model(inputs)
        out, out_a, out_v = output.logits, output.unimodal_logits[audio], output.unimodal_logits[visual]
        loss = criterion(out, label)
        loss_v = criterion(out_v, label)
        loss_a = criterion(out_a, label)
        loss.backward()
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff_v, coeff_a = 1 - tanh(alpha * relu(ratio_v)), 1
        else:
            coeff_a, coeff_v = 1 - tanh(alpha * relu(ratio_a)), 1
        if starts <= epoch <= ends:
            for _, parms in model.named_parameters():
                m = owner.get(id(parms))
                if m is None or parms.grad is None or len(parms.grad.size()) != 4:
                    continue
                coeff = coeff_a if m == audio else coeff_v
                parms.grad = parms.grad * coeff + torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
        optimizer.step()
        loss.item(), loss_a.item(), loss_v.item()
    return step


def stage_count(name: str) -> int:
    return len(build_method(name).stages())


def build_steps(cfg, splits, base, inputs, y, names):
    steps = {}
    data = MethodData(train=splits.train, val=splits.val, holdout=splits.val, device="cpu")
    for name in names:
        model = copy.deepcopy(base)
        method = build_method(name)
        optimizer = build_optimizer(cfg["optim"], model, method)
        method.on_stage_start("supervised", resumed=False)
        method.attach_data(data)
        method.setup(model, optimizer, seed=0)
        model.train()
        method.on_epoch_start(0)
        steps[name] = method_step(model, method, optimizer)
    model = copy.deepcopy(base)
    steps[OFFICIAL] = official_ogm_ge_step(model, build_optimizer(cfg["optim"], model, build_method("joint")))
    return steps


def time_steps(steps, inputs, y, reps: int, warmup: int) -> dict[str, dict[str, float]]:
    joint = steps["joint"]
    for _ in range(warmup):
        for s in steps.values():
            s(inputs, y)
    ratios = {n: [] for n in steps if n != "joint"}
    times = {n: [] for n in steps}
    for _ in range(reps):
        for name, s in steps.items():
            if name == "joint":
                continue
            t0 = time.perf_counter()
            joint(inputs, y)
            t1 = time.perf_counter()
            s(inputs, y)
            t2 = time.perf_counter()
            times["joint"].append(t1 - t0)
            times[name].append(t2 - t1)
            ratios[name].append((t2 - t1) / (t1 - t0))
    out = {"joint": {"ms": 1e3 * statistics.median(times["joint"]), "ratio": 1.0}}
    for n, r in ratios.items():
        out[n] = {"ms": 1e3 * statistics.median(times[n]), "ratio": statistics.median(r),
                  "q25": statistics.quantiles(r, n=4)[0], "q75": statistics.quantiles(r, n=4)[2]}
    return out


RUN_DATA = ["data.n_train=1000", "data.n_test=200"]


def time_runs(names, epochs: int, reps: int) -> dict[str, dict[str, float]]:
    """Trainer runs (probes and progress off) of each method against a joint run timed just before."""
    overrides = ["train.progress=false", "train.device=cpu", "train.probe=false", f"train.epochs={epochs}", *RUN_DATA]

    def run(name):
        cfg = load_config(overrides=overrides + [f"method.name={name}"])
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(cfg, out_dir=out, echo=lambda s: None)
            t0 = time.perf_counter()
            trainer.fit()
            return time.perf_counter() - t0, trainer.total_epochs

    run("joint")  # warm-up
    ratios = {n: [] for n in names}
    seconds = {n: [] for n in names}
    joint_s, trained = [], {}
    for _ in range(reps):
        for name in names:
            j, je = run("joint")
            s, e = run(name)
            joint_s.append(j / je)
            seconds[name].append(s / e)
            trained[name] = e
            ratios[name].append((s / e) / (j / je))
            print(f"  run {name}: {s / e:.2f} s/epoch vs joint {j / je:.2f}", flush=True)
    out = {"joint": {"epoch_s": statistics.median(joint_s), "ratio": 1.0, "epochs": epochs}}
    for n in names:
        out[n] = {"epoch_s": statistics.median(seconds[n]), "ratio": statistics.median(ratios[n]),
                  "epochs": trained[n], "run_ratio": statistics.median(ratios[n]) * trained[n] / epochs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40, help="rounds of (joint, method) step pairs")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--run-reps", type=int, default=2, help="rounds of (joint, method) trainer runs; 0 skips them")
    ap.add_argument("--epochs", type=int, default=1, help="train.epochs of the trainer runs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--methods", help="comma-separated subset (default: all registered)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier ratios when other jobs share the cores)")
    ap.add_argument("--out", default="docs/results/method-cost")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    started = time.time()
    names = sorted(_REGISTRY) if not args.methods else [n.strip() for n in args.methods.split(",")]
    single = [n for n in names if n != "joint" and stage_count(n) == 1]
    multi = [n for n in names if n != "joint" and stage_count(n) > 1]

    cfg = load_config(overrides=["train.device=cpu"])
    splits = load_dataset("synthetic", **{k: v for k, v in cfg["data"].items() if k != "name"})
    inputs, y = splits.train[torch.arange(args.batch_size)]
    torch.manual_seed(0)
    base = build_model(cfg["model"], splits)
    steps = build_steps(cfg, splits, base, inputs, y, ["joint", *single])
    step_res = time_steps(steps, inputs, y, args.reps, args.warmup)
    for n in ["joint", *single, OFFICIAL]:
        print(f"step {n:<22} {step_res[n]['ms']:7.2f} ms  x joint {step_res[n]['ratio']:.3f}", flush=True)
    run_res = time_runs([*single, *multi], args.epochs, args.run_reps) if args.run_reps > 0 else {}
    for n, r in run_res.items():
        print(f"run  {n:<22} {r['epoch_s']:7.3f} s/epoch x joint {r['ratio']:.3f} ({r['epochs']} epochs)", flush=True)

    official = step_res[OFFICIAL]["ratio"]
    family_ok = {n: step_res[n]["ratio"] <= 1.05 and step_res[n]["ratio"] < official for n in OGM_FAMILY if n in step_res}
    elapsed = time.time() - started
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other "
               f"users' jobs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = {"machine": machine, "load_at_start": load, "seconds": elapsed, "reps": args.reps,
              "run_reps": args.run_reps, "epochs": args.epochs, "batch_size": args.batch_size,
              "step": step_res, "run": run_res, "ogm_family_within_goal": family_ok}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "method_cost.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Method cost relative to joint",
        "",
        f"Command: `python benchmarks/method_cost.py --reps {args.reps} --run-reps {args.run_reps} "
        f"--epochs {args.epochs} --threads {args.threads}`; {elapsed:.0f} s in all.",
        f"Machine: {machine}. Timings were taken on a shared 2-core machine: load average at the start "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min); every figure is a ratio to a `joint` "
        "step or run timed right before it, so load changes hit both sides alike.",
        "Data: the default synthetic data and model (SmallCNN encoders, concat fusion), batch "
        f"{args.batch_size}, SGD, CPU, float32.",
        "",
        "**Step** (single-stage methods): one batch (all its sub-steps), median of "
        f"{args.reps} per-pair ratios (interquartile range in brackets). **Epoch** (every method): "
        f"`Trainer.fit` with `train.epochs={args.epochs}` on {' '.join(RUN_DATA)}, probes off, seconds per trained epoch "
        "(validation and the method's end-of-epoch work included) over those of `joint`, median of "
        f"{args.run_reps} pairs; multi-stage methods train each stage for the run's epochs unless they "
        "fix their own, so *run × joint* = epoch ratio × trained epochs / configured epochs.",
        "",
        "| method | stages | step ms | step × joint | epoch × joint | trained epochs | run × joint |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in ["joint", *single, *multi, OFFICIAL]:
        s, r = step_res.get(n), run_res.get(n)
        step_cells = (f"{s['ms']:.1f}", f"{s['ratio']:.2f}" + (f" [{s['q25']:.2f}, {s['q75']:.2f}]" if "q25" in s else "")) \
            if s else ("-", "-")
        run_cells = (f"{r['ratio']:.2f}", str(r["epochs"]), f"{r.get('run_ratio', 1.0):.2f}") if r else ("-", "-", "-")
        stages = "-" if n == OFFICIAL else str(stage_count(n))
        label = f"**{n}**" if n in OGM_FAMILY or n == OFFICIAL else n
        lines.append(f"| {label} | {stages} | {step_cells[0]} | {step_cells[1]} | " + " | ".join(run_cells) + " |")
    lines += ["", f"OGM family within 1.05 × joint and below the official step: "
              + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in family_ok.items()), ""]
    (out / "method_cost.md").write_text("\n".join(lines))
    print(f"wrote {out / 'method_cost.md'}")
    print(f"ogm-ge step / official OGM-GE step: {step_res['ogm-ge']['ratio'] / official:.2f}")


if __name__ == "__main__":
    main()
