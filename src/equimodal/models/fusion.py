"""Fusion heads: map named per-modality features to fused logits.

Each fusion says whether its logits decompose exactly into per-modality terms (``decomposes``) and,
if so, gives that decomposition (``decompose``), the basis of OGM's confidence scores (docs/methods.md, "ogm, ogm-ge").
Modalities are kept in the order given at construction; for FiLM and gated fusion the first one is
the modulated/gating modality, as in the OGM-GE code (audio first).
"""
from __future__ import annotations

import torch
from torch import nn


class Fusion(nn.Module):
    """Base class. ``decomposes`` is a class-level capability flag."""

    decomposes: bool = False

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        if not dims:
            raise ValueError("a fusion needs at least one modality")
        self.modalities = tuple(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes

    def decompose(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no exact logit decomposition")


class ConcatFusion(Fusion):
    """z = W [h_1; ...; h_N] + b. Exact decomposition z_u = W_u h_u + b/N (bias split equally, as
    the official OGM-GE code does), so sum_u z_u = z."""

    decomposes = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([features[m] for m in self.modalities], dim=1))

    def decompose(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, start, n = {}, 0, len(self.modalities)
        for m in self.modalities:
            d = self.dims[m]
            w = self.fc.weight[:, start:start + d]
            out[m] = features[m] @ w.t() + self.fc.bias / n
            start += d
        return out


class SumFusion(Fusion):
    """z = sum_u (W_u h_u + b_u); exact decomposition z_u = W_u h_u + b_u (each head keeps its bias)."""

    decomposes = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def decompose(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](features[m]) for m in self.modalities}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.decompose(features).values())).sum(0)


class LateFusion(SumFusion):
    """Late fusion: the average of per-modality logits, z = mean_u (W_u h_u + b_u).

    The per-modality logits are each head's own output (their mean, not their sum, is z)."""

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.decompose(features).values())).mean(0)


class FiLMFusion(Fusion):
    """FiLM (Perez et al. 2018) as in the OGM-GE code: the first modality's features are scaled and
    shifted by (gamma, beta) predicted from the others, then a linear classifier.

    z = fc_out(gamma * h_1 + beta), [gamma; beta] = fc_film([h_2; ...; h_N]). With two modalities
    this is the paper's FiLM(x_film=False-conditioned) head; with N > 2 the conditioner reads all
    other modalities concatenated (our generalisation). Not decomposable: OGM needs an estimator.
    """

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        if len(dims) < 2:
            raise ValueError("FiLM fusion needs at least two modalities")
        self.target = self.modalities[0]
        cond_dim = sum(dims[m] for m in self.modalities[1:])
        self.fc_film = nn.Linear(cond_dim, 2 * dims[self.target])
        self.fc_out = nn.Linear(dims[self.target], num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = torch.cat([features[m] for m in self.modalities[1:]], dim=1)
        gamma, beta = self.fc_film(cond).chunk(2, dim=1)
        return self.fc_out(gamma * features[self.target] + beta)


class GatedFusion(Fusion):
    """Gated fusion as in the OGM-GE code: the first modality gates the others.

    z = fc_out(sigmoid(fc_gate(h_1)) * sum_{u>1} fc_u(h_u)). With two modalities this is the paper's
    GatedFusion(x_gate=True); for N > 2 the gated term sums the other modalities' projections.
    Not decomposable: OGM needs an estimator.
    """

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 64) -> None:
        super().__init__(dims, num_classes)
        if len(dims) < 2:
            raise ValueError("gated fusion needs at least two modalities")
        self.gate_modality = self.modalities[0]
        self.fc_gate = nn.Linear(dims[self.gate_modality], hidden)
        self.fc_in = nn.ModuleDict({m: nn.Linear(dims[m], hidden) for m in self.modalities[1:]})
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.fc_gate(features[self.gate_modality]))
        gated = torch.stack([self.fc_in[m](features[m]) for m in self.fc_in]).sum(0)
        return self.fc_out(gate * gated)


FUSIONS: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "late": LateFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}
