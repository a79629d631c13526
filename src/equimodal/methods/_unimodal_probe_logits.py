"""Single-modality logits through the model's own fusion head (the other modalities' features zeroed).

Shared by ``remix`` (its single-modality steps, and its ``estimate="mask"`` assignment) and ``arl``
(its unimodal logits z_m = W[.., h_m, .., 0] + b, with the full bias, as the released
``ConcatFusion_AUXI`` computes them). For concat and sum heads the zeros simply remove the other
modalities' terms; for FiLM or gated fusion a zeroed modality is an input the head never saw, so
these logits are out of distribution there (the methods' docstrings say so).
"""
from __future__ import annotations

import torch
from torch import nn

from ._feature_masks import fuse_features


def only(features: dict[str, torch.Tensor], keep: str) -> dict[str, torch.Tensor]:
    """The features with every modality but ``keep`` replaced by zeros (same shapes and dtypes)."""
    return {m: h if m == keep else torch.zeros_like(h) for m, h in features.items()}


def single_modality_logits(model: nn.Module, features: dict[str, torch.Tensor],
                           modalities: tuple[str, ...] | list[str] | None = None) -> dict[str, torch.Tensor]:
    """m -> fuse(features with all modalities but m zeroed), for each m in ``modalities`` (default:
    every modality of ``features``). ``model`` is the unwrapped multimodal model (``fuse``).
    Gradients flow into the fusion head and encoder m only."""
    names = tuple(features) if modalities is None else tuple(modalities)
    return {m: fuse_features(model, only(features, m)) for m in names}
