"""UMT: uni-modal teachers distil their features into the multimodal model (Du et al., ICML 2023). Peer spec B7."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.multimodal import ModelOutput
from ._base import Stage
from ._heads import reset_module, set_trainable
from ._registry import register_method
from ._unimodal_teachers import UNIMODAL_STAGE, UnimodalTeachers, check_epochs, weighted_average

#: the name of the stage that trains the multimodal model under the teachers
MULTIMODAL_STAGE = "multimodal"


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that never trains: no gradients, always in eval mode."""
    clone = copy.deepcopy(module)
    set_trainable(clone, False)
    return clone.eval()


@register_method("umt")
class UMT(UnimodalTeachers):
    """Uni-Modal Teacher (Du et al., ICML 2023): unimodal encoders, frozen, teach the multimodal model's features.

    Stage ``unimodal`` trains every encoder alone with its own linear head g_m (CE(g_m(h_m), y),
    as ``ume``; its end-of-stage report is the unimodal ensemble). At the start of stage
    ``multimodal`` the trained encoders are copied into the method as frozen teachers T_m (no
    gradients, eval mode, saved in ``state_dict``), the model's encoders are re-initialised
    (``reinit``; the model's fusion head was never trained in stage 1, so it is still at its
    initialisation), and the model is trained on
    L = CE(z, y) + weight * sum_m MSE(h_m, T_m(x_m)),
    with MSE the mean over batch and feature entries and T_m(x_m) computed without gradients on the
    same batch (``forward`` adds them to ``ModelOutput.extra``). Gradients reach only the model
    (student); the teachers never change.
    Paper: Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, "On Uni-Modal Feature Learning in Supervised
    Multi-Modal Learning", ICML 2023. We found no official code; reference port: BalanceBenchmark
    (GeWu-Lab) ``balancemm/trainer/UMT_trainer.py``.
    Defaults: weight 10 (the port's ``scaling``), reinit true (the port builds a fresh multimodal
    model; the paper trains the multimodal model from scratch with distillation, and argues that
    merely initialising from unimodal encoders loses their features during joint training);
    ``teacher_epochs`` and ``student_epochs`` = the run's epochs, so the method costs two runs.
    Departures: the unimodal models are trained inside this run (stage 1, sharing batch order and
    optimizer settings) instead of being loaded from separate runs; the teachers run in eval mode
    (the port leaves them in training mode, so their BatchNorm statistics drift and their features
    depend on the batch); no ``modulation_starts/ends`` window (the port's default window covers
    the whole run). The paper's rule for choosing UME or UMT is not automated (see ``ume``). Any
    number of modalities.
    Cost per step in stage 2: one extra forward pass (no backward) through each teacher encoder.
    Hooks: stages, on_stage_start, setup, forward, loss, before_step, predict, unimodal_logits,
    log_stage, state_dict.
    """

    #: what ``bench --tune`` tries (the default first)
    search_space = {"weight": (10.0, 1.0, 3.0, 30.0)}

    def __init__(self, weight: float = 10.0, reinit: bool = True, teacher_epochs: int | None = None,
                 student_epochs: int | None = None) -> None:
        super().__init__(teacher_epochs=teacher_epochs)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"weight (lambda, the feature-distillation weight) must be a number >= 0, got {weight!r}")
        if not isinstance(reinit, bool):
            raise ValueError(f"reinit must be true or false, got {reinit!r}")
        check_epochs(student_epochs=student_epochs)
        self.weight, self.reinit, self.student_epochs = float(weight), reinit, student_epochs
        self.teachers: nn.ModuleDict | None = None
        self._resumed = False

    def stages(self) -> list[Stage]:
        return [Stage(UNIMODAL_STAGE, self.teacher_epochs), Stage(MULTIMODAL_STAGE, self.student_epochs)]

    def on_stage_start(self, stage: str, resumed: bool = False) -> None:
        if stage not in (UNIMODAL_STAGE, MULTIMODAL_STAGE):
            raise ValueError(f"umt has stages {UNIMODAL_STAGE!r} and {MULTIMODAL_STAGE!r}, got {stage!r}")
        self.stage, self._resumed = stage, bool(resumed)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        if self.stage == MULTIMODAL_STAGE and self.teachers is None:
            if self._resumed:
                raise RuntimeError("umt: resuming inside the multimodal stage needs the teachers saved in the "
                                   "method's state_dict; load it before entering the stage")
            self._make_teachers()

    def _make_teachers(self) -> None:
        """Freeze copies of the unimodal-stage encoders, then (``reinit``) restart the model's encoders."""
        model = self._model
        self.teachers = nn.ModuleDict({m: frozen_copy(model.encoder(m)) for m in model.modalities})
        if self.reinit:
            for i, m in enumerate(model.modalities):
                reset_module(model.encoder(m), self.seed + 301 + i)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        out = model(inputs)
        if self.stage == MULTIMODAL_STAGE:
            with torch.no_grad():
                out.extra["teacher_features"] = {m: t(inputs[m]) for m, t in self.teachers.items()}
        return out

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage == UNIMODAL_STAGE:
            return self.unimodal_loss(output, targets)
        teacher = output.extra.get("teacher_features")
        if teacher is None:
            raise RuntimeError("umt: the multimodal stage needs the teachers' features: run the training forward "
                               "pass with method.forward(model, inputs), not model(inputs)")
        terms = super().loss(output, targets)  # CE on the fused logits (+ the estimator's probe terms)
        for m, h in output.features.items():
            terms[f"feature_mse/{m}"] = self.weight * F.mse_loss(h.float(), teacher[m].detach().float())
        return terms

    def predict(self, output: ModelOutput) -> torch.Tensor:
        if self.stage == UNIMODAL_STAGE:
            return weighted_average(self.head_logits(output))  # the unimodal ensemble (UME)
        return output.logits

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return self.head_logits(output) if self.stage == UNIMODAL_STAGE else output.unimodal_logits

    def log_stage(self) -> dict[str, Any]:
        return {"prediction": "unimodal ensemble" if self.stage == UNIMODAL_STAGE else "fused"}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.teachers is not None:
            state["teachers"] = self.teachers.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "teachers" in state:
            if self._model is None:
                raise RuntimeError("umt: call setup(model) before load_state_dict (the teachers copy the encoders)")
            if self.teachers is None:  # same architecture as the model's encoders; weights from the state
                self.teachers = nn.ModuleDict({m: frozen_copy(self._model.encoder(m)) for m in self._model.modalities})
            self.teachers.load_state_dict(state["teachers"])
