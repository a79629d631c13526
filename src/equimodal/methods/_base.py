"""The method contract: a small object with a fixed set of optional hooks, each a no-op by default.

The loop that calls them (our ``Trainer`` or a user's own) looks like this; each hook's docstring
says exactly where it runs and what state the gradients are in::

    for stage in method.stages():            # most methods: one supervised stage
        runner = stage.method or method
        runner.on_stage_start(stage.name, resumed=False)
        runner.setup(model, optimizer, seed=seed)   # a fresh optimizer per stage
        for epoch in ...:                    # counted from 0 within the stage
            method.on_epoch_start(epoch)
            for inputs, targets in loader:
                out = model(inputs)
                terms = method.loss(out, targets)         # named loss terms
                sum(terms.values()).backward()
                method.before_step(model)                 # gradient modulation happens here
                optimizer.step(); method.after_step(model); optimizer.zero_grad()
            method.on_epoch_end(epoch, metrics)
    predictions = method.predict(model(inputs)).argmax(1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.multimodal import ModelOutput


@dataclass
class Stage:
    """One phase of training. ``epochs=None`` means the run's configured epochs.

    ``method=None`` means the method that declared the stage runs it; a multi-phase method (e.g.
    pre-training, then supervised training with another method) returns stages with their own methods.
    """

    name: str = "supervised"
    epochs: int | None = None
    method: "Method | None" = None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class Method:
    """Base class: plain joint training (cross-entropy on the fused logits) with no-op hooks.

    Class-level capability flags are checked in ``setup``; a missing capability is a named error.
    """

    #: needs per-modality logits from the model output
    needs_unimodal_logits: bool = False
    #: changes gradients in ``before_step``
    modifies_gradients: bool = False
    #: handles ``torch.distributed`` (statistics all-reduced before decisions)
    supports_distributed: bool = True
    #: smallest number of modalities the method works with
    min_modalities: int = 1
    #: registry name, filled in by ``register_method``
    name: str = "method"

    def __init__(self) -> None:
        self.epoch = 0
        self.seed = 0

    # --- hooks -----------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        """Before training (and again at the start of each later stage the method runs, with that
        stage's fresh optimizer, so it must be idempotent): check the model offers what the method
        needs, cache what it uses, build owned heads, add own parameters to the optimizer.

        ``model`` may be wrapped (DDP); methods read only the multimodal contract of the inner model.
        """
        self.seed = int(seed)
        inner = unwrap(model)
        for attr in ("modalities", "encoder", "encoder_parameters"):
            if not hasattr(inner, attr):
                raise TypeError(f"method {self.name!r} needs a multimodal model with '{attr}' "
                                f"(see equimodal.models.MultimodalModel); got {type(inner).__name__}")
        if len(inner.modalities) < self.min_modalities:
            raise ValueError(f"method {self.name!r} needs at least {self.min_modalities} modalities; "
                             f"the model has {list(inner.modalities)}")

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms for one micro-batch (the caller sums them and calls ``backward``).

        Runs in training mode, before ``backward``; a method records this micro-batch's
        statistics here. Default: cross-entropy on the fused logits plus the estimator's own terms.
        """
        return {"ce": F.cross_entropy(output.logits.float(), targets), **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        """Once per optimizer step: after ``backward`` (and gradient accumulation, the data-parallel
        gradient average and AMP unscaling), before clipping and ``optimizer.step()``.
        ``.grad`` holds the full step's gradient. All gradient modulation happens here."""

    def after_step(self, model: nn.Module) -> None:
        """Right after ``optimizer.step()``, before ``zero_grad``. Undo per-step optimizer changes."""

    def on_stage_start(self, stage: str, resumed: bool = False) -> None:
        """At the start of each stage this method runs, before ``setup`` for that stage.
        ``resumed`` is True when a run restarts inside the stage (do not re-initialise weights then)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of ``epoch`` (counted from 0 within the stage), after the trainer
        put the model in training mode (a method may switch frozen parts back to eval here)."""
        self.epoch = int(epoch)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After the last step of ``epoch`` and its validation; ``metrics`` holds that epoch's figures."""

    def predict(self, output: ModelOutput) -> torch.Tensor:
        """Logits used for evaluation. Default: the fused logits."""
        return output.logits

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """Per-modality logits used to report per-modality accuracy. Default: the model's estimator."""
        return output.unimodal_logits

    def stages(self) -> list[Stage]:
        """Training phases, run in order. Default: one supervised stage run by this method."""
        return [Stage()]

    def parameters(self) -> list[nn.Parameter]:
        """The method's own learnable values (auxiliary heads, log-variances), built in ``setup``.

        They live outside the model (and outside a DDP wrapper): ``attach_parameters`` adds them to
        the optimizer, and a distributed user must all-reduce their gradients (``before_step`` does
        it for the methods here)."""
        return []

    def attach_parameters(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Move the method's own parameters to the model's device and add them to ``optimizer``
        as one parameter group (call at the end of ``setup``)."""
        params = self.parameters()
        if not params:
            return
        device = next(unwrap(model).parameters()).device
        for p in params:
            p.data = p.data.to(device)
        if optimizer is not None:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            fresh = [p for p in params if id(p) not in known]
            if fresh:
                optimizer.add_param_group({"params": fresh, "modality": None})

    def log(self) -> dict[str, float]:
        """Figures gathered since the last call (the trainer calls it once per epoch), then reset."""
        return {}

    def log_stage(self) -> dict[str, Any]:
        """Extra figures for the end-of-stage report of a multi-stage method (e.g. the chosen teacher)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors, numbers, strings only: loaded weights-only)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
