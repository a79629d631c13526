"""joint-aux: joint training plus one cross-entropy per modality on its own linear head."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import linear_heads
from ._registry import register_method


def joint_aux_loss(fused: torch.Tensor, unimodal: dict[str, torch.Tensor], targets: torch.Tensor,
                   weight: float) -> dict[str, torch.Tensor]:
    """CE(fused, y) and ``weight`` * CE(z_m, y) for every modality's own logits z_m (named terms)."""
    terms = {"ce": F.cross_entropy(fused.float(), targets)}
    for m, z in unimodal.items():
        terms[f"aux/{m}"] = weight * F.cross_entropy(z.float(), targets)
    return terms


@register_method("joint-aux")
class JointAux(Method):
    """Joint training plus a cross-entropy on each modality's own linear head: the simplest baseline that gives every modality its own signal.

    Rule: L = CE(fuse(h), y) + ``weight`` * sum_m CE(W_m h_m, y), where h_m is encoder m's feature
    (not detached) and W_m a seeded linear head owned by the method. Prediction is the model's fused
    head, as ``joint``: the heads only add a training signal to each encoder.

    It is the baseline several published methods reduce to when their own mechanism is switched off:
    G-Blending's per-modality losses with uniform weights (Wang et al., CVPR 2020), the multi-task
    baseline of the uncertainty-weighting paper (Kendall et al., CVPR 2018) and so the ablation of
    our ``uncertainty`` proposal (fixed weights instead of learned ones), and InfoReg's or ARL's
    unimodal terms without their modulation. Every gain in our tables is also reported against it.

    Options: weight (1.0, > 0). The heads' gradients are averaged across ranks in ``before_step``
    (they live outside the DDP wrapper). Cost: M small linear heads per step.
    Hooks: setup, loss, before_step.
    """

    min_modalities = 1

    #: what ``bench --tune`` tries (the default first)
    search_space = {"weight": (1.0, 0.3, 0.5, 2.0)}

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        self.weight = float(weight)
        self.heads: nn.ModuleDict | None = None
        self._modalities: tuple[str, ...] = ()

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._modalities = tuple(inner.modalities)
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 29)
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else list(self.heads.parameters())

    def head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """W_m h_m for every modality (a named error when the model gives no feature for one)."""
        if self.heads is None:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) first (it builds the heads)")
        missing = [m for m in self._modalities if m not in output.features]
        if missing:
            raise ValueError(f"{self.name}: the model's output has no feature for {missing} "
                             f"(got {sorted(output.features)}); every modality needs one for its own head")
        return {m: self.heads[m](output.features[m]) for m in self._modalities}

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**joint_aux_loss(output.logits, self.head_logits(output), targets, self.weight),
                **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
