"""UME: the uni-modal ensemble of Du et al. (ICML 2023). Peer spec B7."""
from __future__ import annotations

import torch
from torch import nn

from ..models.multimodal import ModelOutput
from ._base import Stage
from ._registry import register_method
from ._unimodal_teachers import UNIMODAL_STAGE, UnimodalTeachers, weighted_average


@register_method("ume")
class UME(UnimodalTeachers):
    """Uni-Modal Ensemble (Du et al., ICML 2023): train each encoder alone, predict with the average of their logits.

    Rule: one stage, ``unimodal``, trains every encoder m with its own linear head g_m on
    CE(g_m(h_m), y) (the M losses are summed; encoders and heads are disjoint, so each pair gets
    exactly its unimodal gradient). The prediction is z = sum_m w_m g_m(h_m) / sum_m w_m, equal
    weights unless ``weights`` ({modality: weight >= 0}, positive sum) says otherwise. There is no
    joint training and no second stage: the ensemble is the whole method, and the model's fusion
    head is never trained (the reported fused accuracy is the ensemble's).
    Paper: Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, "On Uni-Modal Feature Learning in Supervised
    Multi-Modal Learning", ICML 2023. We found no official code; BalanceBenchmark (GeWu-Lab)
    ports only UMT. The paper's choice rule (UME when cross-modal interaction adds little, i.e.
    naive joint training does not beat this ensemble; UMT otherwise) is left to the user: run
    ``ume``, ``umt`` and ``joint`` and compare on validation.
    Defaults: equal weights; ``teacher_epochs`` (the stage's length) = the run's epochs.
    Departures: the paper trains each unimodal model in its own run "to convergence"; here the M
    trainings share one run's batch order, optimizer settings and epoch budget (with
    ``optim.clip_grad_norm`` set, the global norm couples them). Any number of modalities.
    Cost per step: as joint training (every encoder forward and backward once), plus M small heads.
    Hooks: stages, setup, loss, before_step (averages the heads' gradients across ranks), predict,
    unimodal_logits, state_dict.
    """

    predicts = "own heads"

    def __init__(self, weights: dict[str, float] | None = None, teacher_epochs: int | None = None) -> None:
        super().__init__(teacher_epochs=teacher_epochs)
        if weights is not None:
            if not isinstance(weights, dict) or not weights:
                raise ValueError(f"weights must be null (equal) or a mapping {{modality: weight}}, got {weights!r}")
            bad = {m: w for m, w in weights.items()
                   if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0}
            if bad:
                raise ValueError(f"weights must be numbers >= 0; got {bad}")
            if not sum(weights.values()) > 0:
                raise ValueError(f"weights must have a positive sum, got {weights}")
            weights = {str(m): float(w) for m, w in weights.items()}
        self.weights = weights

    def stages(self) -> list[Stage]:
        return [Stage(UNIMODAL_STAGE, self.teacher_epochs)]

    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        super().check_modalities(modalities)
        if self.weights is not None and set(self.weights) != set(modalities):
            raise ValueError(f"weights name {sorted(self.weights)}; they must name exactly the modalities "
                             f"{sorted(modalities)}")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        self.check_modalities(self._model.modalities)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.unimodal_loss(output, targets)

    def predict(self, output: ModelOutput) -> torch.Tensor:
        return weighted_average(self.head_logits(output), self.weights)

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return self.head_logits(output)
