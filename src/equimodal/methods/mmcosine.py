"""MMCosine: multi-modal cosine loss (Xu et al., ICASSP 2023). peers.md B16."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import encoder_dims, seeded
from ._registry import register_method


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * cos(h_i, w_c): B x D features and C x D class weights, both L2-normalised (rows), in float32."""
    return scaling * F.normalize(features.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()


@register_method("mmcosine")
class MMCosine(Method):
    """MMCosine (Xu et al., ICASSP 2023): cosine logits per modality, L2-normalised features and class weights, summed.

    Rule (our notation): each modality m has a bias-free linear head W_m (C x D_m) owned by the
    method; its logits are z_m = s * cos(h_m, W_m rows), i.e. s * (h_m / |h_m|) . (w_c / |w_c|) for
    every class c; the fused logits are z = sum_m z_m, trained with CE(z, y). Normalising both
    features and weights per modality removes the norm advantage the dominant modality builds up
    in an ordinary linear head. ``predict`` returns z and ``unimodal_logits`` the z_m, so reported
    per-modality accuracy is that of the cosine heads. The model's own fusion head is unused
    (it receives no gradient and plays no part in evaluation).

    Paper: Ruize Xu, Ruoxuan Feng, Shi-Xiong Zhang, Di Hu, "MMCosine: Multi-Modal Cosine Loss
    Towards Balanced Audio-Visual Fine-Grained Learning", ICASSP 2023. Official code:
    GeWu-Lab/MMCosine_ICASSP23 (``main_CD.py``); port: GeWu-Lab/BalanceBenchmark
    ``MMCosine_trainer.py``. Default scaling s = 15 (BalanceBenchmark's setting and peers.md B16;
    the official script's default is 10, its README example also uses 10: pass ``scaling=10``).

    Departures: the official code and the port take W_m as modality m's columns of the fusion
    head's weight matrix (concat fusion), and for gated/FiLM fusion apply it to the fused-modified
    features; here a method never reads a model attribute, so W_m is a separate seeded head on the
    encoder's features, which works with every fusion and any number of modalities (the sum runs
    over all of them). The official NCE term (``lam``, default 0) and the port's modulation window
    (default: every epoch) are left out. Evaluation: the official ``valid`` scores the plain
    (unnormalised) linear fusion head; we score z = sum_m z_m, the cosine heads training optimised
    (the model's own fusion head is never trained here, so scoring it would score an untrained
    layer).

    Extra cost per step: M small matrix products and normalisations, no extra forward or backward
    pass of the encoders. The heads' gradients are averaged across ranks in ``before_step``.
    Hooks: setup, loss, before_step, predict, unimodal_logits.
    """

    predicts = "own heads"
    min_modalities = 1

    #: what ``bench --tune`` tries (the default first)
    search_space = {"scaling": (15.0, 5.0, 10.0, 30.0)}

    def __init__(self, scaling: float = 15.0) -> None:
        super().__init__()
        ok = isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling)
        if not ok or scaling <= 0:
            raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
        self.scaling = float(scaling)
        self.heads: nn.ModuleDict | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        if self.heads is None:
            dims, classes = encoder_dims(inner, self.name), inner.num_classes
            self.heads = seeded(lambda: nn.ModuleDict(
                {m: nn.Linear(d, classes, bias=False) for m, d in dims.items()}), self.seed + 17)
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else list(self.heads.parameters())

    def _require_heads(self) -> nn.ModuleDict:
        if self.heads is None:
            raise RuntimeError("mmcosine builds its heads in setup(): call method.setup(model, optimizer) first")
        return self.heads

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        heads = self._require_heads()
        return {m: cosine_logits(h, heads[m].weight, self.scaling) for m, h in output.features.items()}

    def predict(self, output: ModelOutput) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(output).values())).sum(0)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(self.predict(output), targets)}

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the heads live outside the DDP wrapper

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "heads": None if self.heads is None else self.heads.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if state.get("heads") is not None:  # setup() builds the heads first (resume order)
            self._require_heads().load_state_dict(state["heads"])
