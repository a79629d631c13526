"""Uncertainty-weighted unimodal auxiliary losses (Kendall et al. 2018); docs/methods.md, "uncertainty"."""
from __future__ import annotations

from typing import Any

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import linear_heads
from ._registry import register_method
from .ogm_ge import OGMGE


def uncertainty_weighted_loss(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """L = sum_t exp(-s_t) * L_t + s_t / 2 (classification form; s_t = log sigma_t^2)."""
    return (torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


@register_method("uncertainty")
class Uncertainty(Method):
    """Uncertainty-weighted unimodal auxiliary losses (Kendall et al., CVPR 2018): each encoder also trains its own classifier.

    Tasks: the fused prediction and one linear head per modality on its (not detached) features.
    With learnable s_t = log sigma_t^2 (initialised at 0) the loss is
    L = sum_t exp(-s_t) L_t + s_t / 2, so the weak modality gets its own gradient signal through its
    auxiliary head and the network learns how much each task weighs. ``modulation`` = ``ogm`` or
    ``ogm-ge`` adds OGM(-GE) gradient modulation (alpha, params as in ``ogm-ge``) on top, with the
    ratio from the model's unimodal logits. Logged per epoch: the weights exp(-s_t) as ``weight/<task>``.
    The heads and log-variances are the method's own parameters (``parameters()``), added to the
    optimizer in ``setup``; under torch.distributed their gradients are all-reduced in
    ``before_step``. Evaluation predicts from the fused logits. Hooks: setup, loss, before_step,
    after_step, log.

    Departure from Kendall et al. (for stability; measured, see docs/findings.md): the unconstrained
    optimum of exp(-s) L + s/2 is exp(-s) = 1/(2L), which grows without bound as a task's training
    loss falls, multiplying that task's effective learning rate; with the log-variances in the
    model's SGD group (momentum 0.9, lr 0.05) a run on mfeat diverged to chance at epoch 6. So the
    weights are bounded, exp(-s_t) <= ``max_weight`` (default 1: weighting may only down-weight a
    task, never raise the step size above the plain sum of losses), by projecting s after every
    step, and the log-variances get their own optimizer group without momentum or weight decay
    (``weight_lr_scale`` x the model's learning rate). ``max_weight=inf`` with ``weight_lr_scale=1``
    and the model's momentum is the paper's unconstrained form (``plain_optimizer=true``).
    """

    needs_unimodal_logits = False
    min_modalities = 1

    #: what ``bench --tune`` tries (the default first)
    search_space = {"max_weight": (1.0, 0.5, 2.0, 4.0)}

    def __init__(self, learn_weights: bool = True, modulation: str = "none", alpha: float = 0.8,
                 params: str = "conv", max_weight: float = 1.0, weight_lr_scale: float = 1.0,
                 plain_optimizer: bool = False) -> None:
        super().__init__()
        if modulation not in ("none", "ogm", "ogm-ge"):
            raise ValueError(f"modulation must be one of ['none', 'ogm', 'ogm-ge'], got {modulation!r}")
        if not max_weight > 0:
            raise ValueError(f"max_weight must be > 0 (a bound on exp(-s); inf for none), got {max_weight!r}")
        if not weight_lr_scale > 0:
            raise ValueError(f"weight_lr_scale must be > 0, got {weight_lr_scale!r}")
        self.max_weight, self.weight_lr_scale = float(max_weight), float(weight_lr_scale)
        self.plain_optimizer = bool(plain_optimizer)
        self.learn_weights = bool(learn_weights)
        self.modulation = modulation
        self._ogm = OGMGE(alpha=alpha, params=params, ge=modulation == "ogm-ge",
                          modulation_ends=10**9) if modulation != "none" else None
        self.heads: nn.ModuleDict | None = None
        self.log_vars: nn.Parameter | None = None
        self._modalities: tuple[str, ...] = ()
        self._weight_sum: torch.Tensor | None = None
        self._weight_n = 0

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._modalities = tuple(inner.modalities)
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 7)
            self.log_vars = nn.Parameter(torch.zeros(1 + len(self._modalities)), requires_grad=self.learn_weights)
        self.attach_parameters(model, optimizer)
        self.setup_lr(optimizer)
        self.project()
        if self._ogm is not None:
            self._ogm.setup(model, optimizer, seed)

    def parameters(self) -> list[nn.Parameter]:
        if self.heads is None:
            return []
        return [*self.heads.parameters(), *([self.log_vars] if self.learn_weights else [])]

    def parameter_groups(self) -> list[dict[str, Any]]:
        if self.heads is None:
            return []
        groups: list[dict[str, Any]] = [{"params": list(self.heads.parameters())}]
        if self.learn_weights:
            own = {} if self.plain_optimizer else {"momentum": 0.0, "weight_decay": 0.0}
            groups.append({"params": [self.log_vars], **own, "lr_scale": self.weight_lr_scale})
        return groups

    def setup_lr(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The log-variances' group takes ``weight_lr_scale`` x the model's learning rate."""
        if optimizer is None:
            return
        base = optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            if "lr_scale" in group and any(p is self.log_vars for p in group["params"]):
                group["lr"] = base * group["lr_scale"]

    def project(self) -> None:
        """Keep exp(-s) <= max_weight (s >= -log max_weight)."""
        if self.log_vars is not None and math.isfinite(self.max_weight):
            with torch.no_grad():
                self.log_vars.clamp_(min=-math.log(self.max_weight))

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("fused", *self._modalities)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        per_task = [F.cross_entropy(output.logits.float(), targets)]
        per_task += [F.cross_entropy(self.heads[m](output.features[m]).float(), targets) for m in self._modalities]
        losses = torch.stack(per_task)
        terms = {f"task/{t}": (torch.exp(-self.log_vars[i]) * losses[i] + 0.5 * self.log_vars[i])
                 for i, t in enumerate(self.tasks)}
        if output.logits.requires_grad:
            w = torch.exp(-self.log_vars.detach())
            self._weight_sum = w if self._weight_sum is None else self._weight_sum + w
            self._weight_n += 1
        if self._ogm is not None:
            self._ogm.loss(output, targets)  # records the scores for the modulation
        return {**terms, **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())
        if self._ogm is not None:
            self._ogm.before_step(model)

    def after_step(self, model: nn.Module) -> None:
        self.project()
        if self._ogm is not None:
            self._ogm.after_step(model)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self._ogm is not None:
            self._ogm.on_epoch_start(epoch)

    def log(self) -> dict[str, float]:
        out = self._ogm.log() if self._ogm is not None else {}
        if self._weight_sum is not None:
            w = (self._weight_sum / self._weight_n).tolist()
            out.update({f"weight/{t}": w[i] for i, t in enumerate(self.tasks)})
            self._weight_sum, self._weight_n = None, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
            state["log_vars"] = self.log_vars.detach().clone()
        if self._ogm is not None:
            state["ogm"] = self._ogm.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
            with torch.no_grad():
                self.log_vars.copy_(state["log_vars"])
        if "ogm" in state and self._ogm is not None:
            self._ogm.load_state_dict(state["ogm"])
