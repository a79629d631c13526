"""OGM-GE in a Hugging Face Accelerate loop (``pip install "equimodal[accelerate]"``).

The method's hooks go where ``equimodal.methods.run_stages`` (the documented plain loop) puts them;
Accelerate adds three things the hooks must respect:

- ``accelerator.accumulate(model)``: ``method.loss`` sums its statistics over the micro-batches of
  an accumulation group, so ``before_step`` must run once per *optimizer* step, on the group's last
  micro-batch: only when ``accelerator.sync_gradients`` is true (then the gradients are complete and,
  under several processes, already all-reduced);
- ``accelerator.backward``: with fp16 the gradients are scaled; ``accelerator.unscale_gradients()``
  before ``before_step`` hands the method the true gradients (a no-op without a scaler);
- ``accelerator.prepare``: the model may come back wrapped (DistributedDataParallel); methods read
  the multimodal model inside any wrapper, and sum their statistics over processes themselves.

Run (the default data, tiny model, a few seconds on a CPU)::

    python examples/accelerate_ogm_ge.py --epochs 2 --accumulate 2
    accelerate launch --num_processes 2 examples/accelerate_ogm_ge.py         # 2 GPUs
    torchrun --nproc_per_node 2 examples/accelerate_ogm_ge.py --cpu           # 2 CPU processes (gloo)

(``accelerate launch --cpu`` starts one process whatever ``--num_processes`` says; several CPU
processes need a launcher such as torchrun, which Accelerate joins, and ``Accelerator(cpu=True)``.)

``--out DIR`` writes each process's final parameters and per-step coefficients to
``DIR/rank<r>.pt`` (``tests/test_accelerate.py`` compares them).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator

from equimodal import MultimodalModel, build_method
from equimodal.data import load_dataset
from equimodal.models import SmallCNN


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process and micro-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--n-train", type=int, default=640)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--norm", choices=("batch", "group"), default="batch",
                        help="group: per-sample normalisation, so K micro-batches equal one batch of K*b")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--cpu", action="store_true",
                        help="use the CPU even with a GPU; under torchrun, several CPU processes (gloo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, mixed_precision=args.precision,
                              cpu=args.cpu)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    data = load_dataset("synthetic", n_train=args.n_train, n_test=200)
    model = MultimodalModel({m: SmallCNN(width=args.width, out_dim=16, norm=args.norm) for m in ("visual", "audio")},
                            num_classes=10)
    optimizer = torch.optim.SGD(model.param_groups(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    method = build_method("ogm-ge", alpha=0.8)
    method.setup(model, optimizer, seed=args.seed)

    coefficients = []
    for epoch in range(args.epochs):
        model.train()
        method.on_epoch_start(epoch)
        for inputs, labels in loader:
            with accelerator.accumulate(model):
                output = model(inputs)
                loss = sum(method.loss(output, labels).values())
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the group's last micro-batch: gradients complete
                    accelerator.unscale_gradients()
                    method.before_step(model)  # scale the dominant encoder's grads, add GE noise
                    coefficients.append(method.last_coefficients.detach().cpu().clone())
                optimizer.step()  # Accelerate steps only when sync_gradients
                if accelerator.sync_gradients:
                    method.after_step(model)
                optimizer.zero_grad()
        figures = method.log()
        accelerator.print(f"epoch {epoch + 1}: loss {loss.item():.4f} | "
                          + " ".join(f"{k} {v:.3f}" for k, v in figures.items()))

    result = {"params": {n: p.detach().cpu() for n, p in accelerator.unwrap_model(model).named_parameters()},
              "ks": coefficients, "processes": accelerator.num_processes}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(result, args.out / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
