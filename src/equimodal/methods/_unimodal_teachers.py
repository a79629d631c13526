"""The unimodal stage shared by UMT and UME (Du et al., ICML 2023): every encoder trained alone with
its own linear head, and the (weighted) average of those heads' logits.

Not a registered method: ``umt.py`` and ``ume.py`` subclass ``UnimodalTeachers``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import linear_heads, set_trainable

#: the name of the stage that trains the unimodal models
UNIMODAL_STAGE = "unimodal"


def check_epochs(**values: int | None) -> None:
    """Stage-length options: a positive integer, or None (the run's epochs)."""
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be a positive integer or null (the run's epochs), got {value!r}")


def weighted_average(logits: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """sum_m w_m z_m / sum_m w_m over the modalities of ``logits`` (equal weights when ``weights`` is None)."""
    names = list(logits)
    w = [1.0 if weights is None else float(weights[m]) for m in names]
    total = sum(w)
    return sum(wm * logits[m] for wm, m in zip(w, names)) / total


class UnimodalTeachers(Method):
    """Base for UMT and UME: stage ``unimodal`` trains each encoder with its own linear head.

    The heads belong to the method (built in ``setup`` from a seeded initialisation, outside the
    model and outside a DDP wrapper: their gradients are averaged in ``before_step``). The stage's
    loss is sum_m CE(g_m(h_m), y): encoders and heads are disjoint, so each (encoder, head) pair
    receives exactly the gradient of its own unimodal training; the M trainings share the batch
    order and the optimizer settings (and a global gradient-norm clip, if configured, couples them).
    During the stage ``predict`` is the average of the heads' logits and ``unimodal_logits`` are
    the heads' logits.
    """

    def __init__(self, teacher_epochs: int | None = None) -> None:
        super().__init__()
        check_epochs(teacher_epochs=teacher_epochs)
        self.teacher_epochs = teacher_epochs
        self.stage = UNIMODAL_STAGE
        self.heads: nn.ModuleDict | None = None
        self._model: nn.Module | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = unwrap(model)
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 11)
        self.attach_parameters(model, optimizer)
        set_trainable(self.heads, self.stage == UNIMODAL_STAGE)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters()) if self.heads is not None else []

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the method's own heads live outside the DDP wrapper

    def head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """g_m(h_m) for every modality: the unimodal models' logits."""
        if self.heads is None:
            raise RuntimeError(f"method {self.name!r}: call setup(model, optimizer) before using it")
        return {m: self.heads[m](h) for m, h in output.features.items()}

    def unimodal_loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One cross-entropy per modality, each on its own head: the unimodal trainings."""
        return {f"ce/{m}": F.cross_entropy(z.float(), targets) for m, z in self.head_logits(output).items()}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "stage": self.stage}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.stage = state.get("stage", UNIMODAL_STAGE)
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
            set_trainable(self.heads, self.stage == UNIMODAL_STAGE)
