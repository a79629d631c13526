"""Modality dropout (ModDrop family) on encoder features. peers.md B2, plain form."""
from __future__ import annotations

from typing import Any

import torch

from ..models.multimodal import ModelOutput
from ._feature_masks import FeatureMaskingMethod, keep_masks_at_least_one
from ._registry import register_method


@register_method("modality-dropout")
class ModalityDropout(FeatureMaskingMethod):
    """Modality dropout: zero whole modalities' features per sample while training, never all of a sample's.

    Each training micro-batch, each sample drops each modality's encoder features h_m (zeroes
    them) with probability p, independently, conditioned on keeping at least one modality; kept
    features are multiplied by 1/(1 - p) when ``rescale`` is on. The loss is the cross-entropy of
    the re-fused masked features, CE(model.fuse({h_m * keep_m * scale}), y) (plus the estimator's
    own probe terms). Evaluation and ``predict`` use every modality (the model's fused logits).

    Never all modalities: a sample's mask has the distribution of re-drawing it until some modality
    is kept, sampled exactly in one vectorised pass (``keep_masks_at_least_one``: the first kept
    modality k is drawn with probability p^k (1 - p) / (1 - p^N), the ones before it are dropped,
    the ones after it are dropped independently with probability p). Hence the realised drop rate
    per modality is below p: (p - p^N) / (1 - p^N) for every modality (1/3 for p = 0.5, N = 2);
    ``log()`` reports the realised rate as ``drop_rate/<m>``.

    Reference: the ModDrop family (Neverova, Wolf, Taylor, Nebout, "ModDrop: adaptive multi-modal
    gesture recognition", TPAMI 2016, which drops inputs); the form here, on features with the
    "never all" rule, is the one our peers spec (B2) and BalanceBenchmark (GeWu-Lab/BalanceBenchmark)
    compare against. No official code is followed line by line.

    Options: p (0.3: drop probability per modality and sample, in [0, 1); the spec gives 0.1-0.5 as
    the usual range, 0.3 is our choice), rescale (False: the 1/(1 - p) factor is optional in the
    spec; off keeps each kept modality's contribution to the fused logits on the scale it has at
    evaluation). Works with any N >= 2 modalities.

    Randomness: a CPU generator per micro-batch seeded by (seed, optimizer step, micro-batch in the
    step, data-parallel rank), so a resumed run draws the same masks and every rank (which holds
    other samples) draws its own; the global RNG is untouched.

    Cost per step: one extra forward of the fusion head (the model's own fused logits are computed
    but unused in the loss); no extra backward, no collective. Hooks: setup, loss, before_step, log.
    """

    #: what ``bench --tune`` tries (the default first)
    search_space = {"p": (0.3, 0.1, 0.2, 0.5)}

    def __init__(self, p: float = 0.3, rescale: bool = False) -> None:
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
            raise ValueError(f"p (drop probability per modality) must be a number in [0, 1), got {p!r}")
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale must be true or false, got {rescale!r}")
        self.p = float(p)
        self.rescale = rescale

    def keep_plan(self, output: ModelOutput, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        b, n = targets.numel(), len(self._modalities)
        g = self.generator()
        u_first = torch.rand(b, generator=g, dtype=torch.float64)
        u = torch.rand(b, n, generator=g, dtype=torch.float64)
        keep = keep_masks_at_least_one(torch.full((n,), self.p, dtype=torch.float64), u_first, u)
        scale = 1.0 / (1.0 - self.p) if self.rescale else 1.0
        return keep.to(targets.device, non_blocking=True), scale
