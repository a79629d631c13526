"""Training cost, counted rather than declared: passes through each encoder.

A forward hook on every encoder counts its calls (split into calls with and without autograd), and
a tensor hook on each output that requires grad counts the backward passes that reach it (the
trainer's ``backward`` and any ``torch.autograd.grad`` a method runs, e.g. MMPareto's separate
unimodal pass). Pausing the meter keeps evaluation, probes and checkpoints out of the count.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


class CostMeter:
    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "module", model)
        self.modalities = tuple(inner.modalities)
        self.counts: dict[str, dict[str, int]] = {m: {"forward": 0, "forward_no_grad": 0, "backward": 0}
                                                  for m in self.modalities}
        self.active = False
        self._handles = [inner.encoder(m).register_forward_hook(self._hook(m)) for m in self.modalities]

    def _hook(self, modality: str):
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active:
                return
            counts = self.counts[modality]
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                counts["forward"] += 1

                def on_backward(grad: torch.Tensor) -> None:
                    counts["backward"] += 1

                output.register_hook(on_backward)
            else:
                counts["forward_no_grad"] += 1
        return on_forward

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the passes made inside the ``with`` block only."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {m: dict(c) for m, c in self.counts.items()}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        for m, c in (state or {}).items():
            if m in self.counts:
                self.counts[m].update({k: int(v) for k, v in c.items()})

    def summary(self, optimizer_steps: int) -> dict[str, Any]:
        """Totals and per-optimizer-step means, averaged over the modalities' encoders, so plain
        joint training is 1 forward and 1 backward per step."""
        n, steps = len(self.modalities), max(1, optimizer_steps)
        total = {k: sum(c[k] for c in self.counts.values()) for k in ("forward", "forward_no_grad", "backward")}
        return {"optimizer_steps": optimizer_steps, "encoder_passes": self.state_dict(),
                "forward_per_step": total["forward"] / n / steps,
                "forward_no_grad_per_step": total["forward_no_grad"] / n / steps,
                "backward_per_step": total["backward"] / n / steps}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
