"""The decision-layer view of imbalance: how much of the fused head each modality holds.

Probes say whether an encoder learned; these figures say how much the fusion head listens to it,
which can be lopsided even in a model trained to balance its encoders (Wei et al. 2025,
arXiv 2510.14411, find the bias in the decision layer). Both are computed through the model
contract (``encode`` and ``fuse``), so they work for any fusion, not only a linear concat head:

- *weight share*: each modality's share of the sensitivity of the fused logits to its features,
  the mean over samples of the Frobenius norm of d logits / d h_m (for a linear concat head this is
  exactly the norm of that modality's block of the weight matrix);
- *logit share*: each modality's share of the fused logits' scale, the mean norm of
  fuse(h_m alone, the others zero) - fuse(all zero).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.base import iterate_batches


def decision_layer_shares(model: nn.Module, dataset: Any, device: torch.device | str = "cpu",
                          limit: int = 512) -> dict[str, dict[str, float]]:
    """``{modality: {"weight_share", "logit_share"}}`` (each set of shares sums to 1) on at most
    ``limit`` samples of ``dataset`` (use validation: decisions are never made on test)."""
    if not (hasattr(model, "encode") and hasattr(model, "fuse")):
        raise TypeError(f"the decision-layer view needs a model with 'encode' and 'fuse'; got {type(model).__name__}")
    was_training = model.training
    model.eval()
    sens: dict[str, float] = {}
    scale: dict[str, float] = {}
    seen = 0
    for inputs, _ in iterate_batches(dataset, 256, None, limit=limit):
        inputs = {m: x.to(device) for m, x in inputs.items()}
        with torch.no_grad():
            feats = {m: h.float() for m, h in model.encode(inputs).items()}
        leaves = {m: h.clone().requires_grad_(True) for m, h in feats.items()}
        logits = model.fuse(leaves).float()
        squared = {m: torch.zeros(h.shape[0], device=h.device) for m, h in leaves.items()}
        for c in range(logits.shape[1]):  # each sample's logits depend on its own features only (eval mode)
            grads = torch.autograd.grad(logits[:, c].sum(), list(leaves.values()), retain_graph=True,
                                        allow_unused=True)
            for m, g in zip(leaves, grads):
                if g is not None:
                    squared[m] += g.flatten(1).pow(2).sum(1)
        with torch.no_grad():
            zero = {m: torch.zeros_like(h) for m, h in feats.items()}
            base = model.fuse(zero).float()
            for m in feats:
                alone = model.fuse({**zero, m: feats[m]}).float()
                scale[m] = scale.get(m, 0.0) + float((alone - base).norm(dim=1).sum())
                sens[m] = sens.get(m, 0.0) + float(squared[m].sqrt().sum())
        seen += next(iter(feats.values())).shape[0]
    model.train(was_training)
    if not seen:
        raise ValueError("the decision-layer view needs at least one sample")

    def shares(total: dict[str, float]) -> dict[str, float]:
        s = sum(total.values())
        return {m: (v / s if s > 0 else 1.0 / len(total)) for m, v in total.items()}

    w, z = shares(sens), shares(scale)
    return {m: {"weight_share": w[m], "logit_share": z[m]} for m in sens}
