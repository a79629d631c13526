"""What equimodal's trainer adds over a minimal hand-written loop (joint, default data, progress off).

Both train the same model (same initial weights), with the same optimizer settings, on the same
seeded batch order; epochs are interleaved (trainer, bare, trainer, bare, ...) so that load on the
machine hits both alike. The training part is compared; validation, linear probes and checkpoint
writing, which the bare loop does not do, are timed separately. Prints the median epoch-time ratio
last.

    python benchmarks/trainer_overhead.py [--epochs 6]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from equimodal.config import load_config
from equimodal.data.base import iterate_batches
from equimodal.train import Trainer, build_optimizer, evaluate, linear_probes, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    cfg = load_config(overrides=["train.progress=false", "train.device=cpu", "train.probe=false",
                                 f"train.epochs={args.epochs}"])
    out = tempfile.mkdtemp()
    trainer = Trainer(cfg, out_dir=out, echo=lambda s: None)
    bare_model = copy.deepcopy(trainer.model)
    bare_opt = build_optimizer(cfg["optim"], bare_model, trainer.method)
    batch = cfg["train"]["batch_size"]

    def bare_epoch(epoch: int) -> None:
        bare_model.train()
        gen = torch.Generator().manual_seed(cfg["train"]["seed"] * 100_003 + epoch)
        for inputs, y in iterate_batches(trainer.splits.train, batch, gen):
            loss = F.cross_entropy(bare_model(inputs).logits, y)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    t_times, b_times = [], []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        with trainer.meter.counting():
            trainer.train_epoch(epoch, epoch)
        t_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare_epoch(epoch)
        b_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    evaluate(trainer.model, trainer.method, trainer.splits.val, trainer.device)
    val_s = time.perf_counter() - start
    start = time.perf_counter()
    linear_probes(trainer.model, trainer.splits, trainer.device)
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    save_checkpoint(trainer.state_dict(), f"{out}/checkpoint.pt")
    ckpt_s = time.perf_counter() - start
    same = all(torch.allclose(a, b) for a, b in zip(trainer.model.parameters(), bare_model.parameters()))
    ratios = [t / b for t, b in zip(t_times[1:], b_times[1:])] or [t_times[0] / b_times[0]]
    print(f"epochs (first dropped): trainer {statistics.median(t_times[1:] or t_times):.3f} s, "
          f"bare loop {statistics.median(b_times[1:] or b_times):.3f} s; same weights at the end: {same}")
    print(f"outside the training part, per epoch: validation {val_s:.3f} s, checkpoint {ckpt_s:.3f} s; "
          f"linear probes (once per run) {probe_s:.3f} s")
    print(f"trainer / bare loop epoch time: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
