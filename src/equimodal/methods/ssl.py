"""Cross-modal contrastive pre-training of the encoders, then any other method; docs/methods.md, "ssl"."""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, Stage, unwrap
from ._heads import encoder_dims, seeded
from ._registry import build_method, register_method


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings: row i of ``a`` and ``b`` are a positive
    pair, the other rows of the batch the negatives; mean of the a->b and b->a cross-entropies."""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@register_method("ssl")
class SSL(Method):
    """Self-supervised encoder pre-training: cross-modal contrastive (symmetric InfoNCE), then supervised training with another method.

    Stage ``pretrain`` (``pretrain_epochs``, default the run's epochs) trains the encoders without
    labels: per modality a projection g_u (Linear-ReLU-Linear to ``projection_dim``), L2-normalised,
    symmetric InfoNCE with temperature ``temperature`` between the two modalities of the same sample
    (positives) and the other samples of the batch (negatives); with N > 2 modalities the loss sums
    over all pairs. Stage ``supervised`` runs the method named by ``then`` (default ``joint``;
    e.g. ``ogm-ge``) with ``then_options``, from the pre-trained encoders. The end-of-stage reports
    give each encoder's linear-probe accuracy after pre-training and at the end. Negatives come from
    the local batch only (under torch.distributed each rank contrasts its own batch).
    Hooks: stages, setup, loss, state_dict.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"temperature": (0.1, 0.05, 0.2, 0.5)}

    def __init__(self, then: str = "joint", then_options: dict | None = None, temperature: float = 0.1,
                 projection_dim: int = 64, pretrain_epochs: int | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}")
        if pretrain_epochs is not None and (not isinstance(pretrain_epochs, int) or pretrain_epochs < 1):
            raise ValueError(f"pretrain_epochs must be a positive integer or null, got {pretrain_epochs!r}")
        if then_options is not None and not isinstance(then_options, dict):
            raise ValueError(f"then_options must be a mapping of the '{then}' method's options, got {then_options!r}")
        self.then_name = then
        self.then_method = build_method(then, **(then_options or {}))
        if len(self.then_method.stages()) != 1 or self.then_method.stages()[0].method is not None:
            raise ValueError(f"ssl: then={then!r} is a multi-stage method; choose a single-stage method")
        self.temperature, self.projection_dim = float(temperature), int(projection_dim)
        self.pretrain_epochs = pretrain_epochs
        self.projections: nn.ModuleDict | None = None
        self._pairs: list[tuple[str, str]] = []
        self._skipped = 0

    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        super().check_modalities(modalities)
        self.then_method.check_modalities(modalities)

    def stages(self) -> list[Stage]:
        return [Stage("pretrain", self.pretrain_epochs), Stage("supervised", None, self.then_method)]

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._pairs = list(itertools.combinations(inner.modalities, 2))
        if self.projections is None:
            dims, p = encoder_dims(inner, self.name), self.projection_dim
            self.projections = seeded(lambda: nn.ModuleDict(
                {m: nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, p)) for m, d in dims.items()}),
                self.seed + 17)
        self.attach_parameters(model, optimizer)

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the method's own heads live outside the DDP wrapper

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters()) if self.projections is not None else []

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Labels are not used: pre-training is self-supervised.

        A batch of one sample has no negatives (the last batch of an epoch can be that small): it
        contributes a zero loss that still reaches every parameter (so the step is a no-op for the
        gradients, momentum aside) and is counted in ``log()`` as ``skipped_batches``."""
        if targets.shape[0] < 2:
            self._skipped += 1
            zero = sum(h.sum() for h in output.features.values()) * 0.0
            zero = zero + sum(p.sum() for p in self.parameters()) * 0.0
            return {f"infonce/{a}-{b}": zero for a, b in self._pairs[:1]}
        z = {m: self.projections[m](h) for m, h in output.features.items()}
        return {f"infonce/{a}-{b}": info_nce(z[a], z[b], self.temperature) for a, b in self._pairs}

    def log(self) -> dict[str, float]:
        out = {"skipped_batches": float(self._skipped)} if self._skipped else {}
        self._skipped = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch}
        if self.projections is not None:
            state["projections"] = self.projections.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if "projections" in state and self.projections is not None:
            self.projections.load_state_dict(state["projections"])
