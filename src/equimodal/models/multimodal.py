"""The multimodal model contract: a dict of named inputs -> fused logits, per-modality logits, features.

Methods talk only to this contract (``ModelOutput``, ``modalities``, ``encoder(name)``,
``encoder_parameters(name)``, ``head_parameters()``, and, for methods that drop or re-weight
features before fusion, ``fuse(features)``), never to attribute names of a particular model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .fusion import FUSIONS, Fusion

ESTIMATORS = ("auto", "exact", "probe", "mask")


@dataclass
class ModelOutput:
    """What a multimodal forward pass returns.

    logits: B x C fused logits. unimodal_logits: name -> B x C, from ``estimator``.
    features: name -> B x D encoder features (not detached).
    estimator: how the unimodal logits were obtained: "exact" (decomposition of a linear head),
    "probe" (linear heads on detached features, trained by ``estimator_losses``) or "mask"
    (the fusion applied with the other modalities' features set to zero).
    """

    logits: torch.Tensor
    unimodal_logits: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    estimator: str = "exact"
    extra: dict = field(default_factory=dict)

    def estimator_losses(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms the estimator itself needs: the probes' cross-entropy for "probe", else none.

        The probes read detached features, so these terms never change the encoders; every method's
        base ``loss`` adds them, which keeps per-modality accuracy comparable across methods.
        """
        if self.estimator != "probe":
            return {}
        return {f"probe/{m}": F.cross_entropy(z.float(), targets) for m, z in self.unimodal_logits.items()}


class MultimodalModel(nn.Module):
    """Encoders per modality + a fusion head (+ optional probe heads).

    Args:
        encoders: name -> encoder module; each must have an ``out_dim`` attribute.
        num_classes: number of classes.
        fusion: one of ``concat``, ``sum``, ``late``, ``film``, ``gated``, or a ``Fusion`` instance.
        estimator: how unimodal logits are obtained. ``auto`` (default) = ``exact`` where the fusion
            decomposes (concat, sum, late), else ``probe``. ``probe`` is the default for FiLM and
            gated fusion because ``mask`` feeds the fusion zero features it never saw in training
            (for gated fusion a zeroed gating modality gives a constant gate; for FiLM a zeroed
            conditioner gives gamma = bias), so masked logits measure an out-of-distribution
            interaction, whereas a probe measures how well each encoder alone separates the classes.
    """

    def __init__(self, encoders: dict[str, nn.Module], num_classes: int,
                 fusion: str | Fusion = "concat", estimator: str = "auto") -> None:
        super().__init__()
        if not encoders:
            raise ValueError("MultimodalModel needs at least one encoder")
        for name, enc in encoders.items():
            if not hasattr(enc, "out_dim"):
                raise TypeError(f"encoder {name!r} ({type(enc).__name__}) has no 'out_dim' attribute")
        self.encoders = nn.ModuleDict(encoders)
        self.num_classes = num_classes
        dims = {m: int(e.out_dim) for m, e in encoders.items()}
        if isinstance(fusion, str):
            if fusion not in FUSIONS:
                raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
            self.fusion_name = fusion
            fusion = FUSIONS[fusion](dims, num_classes)
        else:
            self.fusion_name = type(fusion).__name__
        self.fusion = fusion
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
        if estimator == "auto":
            estimator = "exact" if fusion.decomposes else "probe"
        if estimator == "exact" and not fusion.decomposes:
            raise ValueError(f"fusion {self.fusion_name!r} has no exact logit decomposition; "
                             "use estimator 'probe' or 'mask'")
        self.estimator = estimator
        self.probes = (nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})
                       if estimator == "probe" else None)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in the order of the encoders dict."""
        return tuple(self.encoders.keys())

    def encoder(self, name: str) -> nn.Module:
        """The encoder of one modality (methods hook or scale it by name, never by attribute)."""
        if name not in self.encoders:
            raise KeyError(f"no modality {name!r}; this model has {list(self.modalities)}")
        return self.encoders[name]

    def encoder_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of one modality's encoder (what gradient modulation scales)."""
        return list(self.encoder(name).parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Every parameter that belongs to no encoder (fusion head, probes)."""
        enc = {id(p) for p in self.encoders.parameters()}
        return [p for p in self.parameters() if id(p) not in enc]

    def param_groups(self, **group_options) -> list[dict]:
        """One optimizer parameter group per encoder (tagged ``modality``) and one for the head.

        Per-modality groups let a method scale one modality's update (OGM's ``level="update"``)."""
        groups = [dict(params=self.encoder_parameters(m), modality=m, **group_options) for m in self.modalities]
        groups.append(dict(params=self.head_parameters(), modality=None, **group_options))
        return groups

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features of every modality (B x out_dim each); the inputs must agree on the batch size."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"inputs lack modalities {missing}; got keys {sorted(inputs)}")
        sizes = {m: int(inputs[m].shape[0]) for m in self.modalities}
        if len(set(sizes.values())) > 1:
            raise DataError(f"the modalities' inputs disagree on the batch size: {sizes}")
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused logits from (possibly masked or re-weighted) features, one tensor per modality.

        Part of the model contract for methods that change features before fusion (modality
        dropout, OPM): they call it with the ``features`` of a ``ModelOutput``, modified."""
        return self.fusion(features)

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        features = self.encode(inputs)
        logits = self.fusion(features)
        if self.estimator == "exact":
            unimodal = self.fusion.decompose(features)
        elif self.estimator == "probe":
            unimodal = {m: self.probes[m](h.detach()) for m, h in features.items()}
        else:  # mask
            unimodal = {}
            for m in self.modalities:
                masked = {u: (h if u == m else torch.zeros_like(h)) for u, h in features.items()}
                unimodal[m] = self.fusion(masked)
        return ModelOutput(logits=logits, unimodal_logits=unimodal, features=features, estimator=self.estimator)
