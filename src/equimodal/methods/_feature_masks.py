"""Per-sample modality masks on encoder features, shared by ``modality-dropout`` and ``opm``.

A mask is a B x N boolean tensor ``keep`` (sample i keeps modality j). The methods here draw it
from uniforms of a fresh CPU ``torch.Generator`` per micro-batch, seeded by (run seed, optimizer
step, micro-batch index within the step, data-parallel rank): a resumed run and a CPU/GPU run draw
the same masks, and each rank (which holds different samples) draws its own. The masked features
are re-fused with the model's ``fuse`` (the model contract) and the loss is cross-entropy averaged
over the samples that kept at least one modality.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from ..models.multimodal import ModelOutput
from ._base import Method, fusing_model

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def mask_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a stable 63-bit hash of the integers in ``key``."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def keep_masks(drop: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Independent Bernoulli(1 - drop_j) keep masks from uniforms ``u`` (B x N): keep iff u >= drop_j."""
    return u >= drop


def keep_masks_at_least_one(drop: torch.Tensor, u_first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Keep masks with independent drops of probability ``drop_j`` (N, each < 1), conditioned on at
    least one modality kept per sample, sampled exactly and without rejection loops.

    The distribution is that of re-drawing a sample's whole mask until some modality is kept: the
    first kept modality k is drawn with P(k) = prod_{j<k} drop_j * (1 - drop_k) / (1 - prod_j drop_j)
    (inverse CDF of ``u_first``, B), modalities before k are dropped, k is kept, and each modality
    after k is kept independently iff u[:, j] >= drop_j (``u``: B x N).
    """
    n = drop.numel()
    before = torch.cat([drop.new_ones(1), torch.cumprod(drop, 0)[:-1]])  # prod_{j<k} drop_j
    cdf = torch.cumsum(before * (1 - drop), 0)  # cdf[-1] = 1 - prod_j drop_j
    first = torch.searchsorted(cdf, (u_first * cdf[-1]).unsqueeze(1), right=True).clamp_max(n - 1)  # B x 1
    index = torch.arange(n, device=drop.device)
    return (index == first) | ((index > first) & keep_masks(drop, u))


def apply_keep(features: dict[str, torch.Tensor], modalities: tuple[str, ...], keep: torch.Tensor,
               scale: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
    """h_j <- h_j * keep[:, j] * scale for every modality (same dtype as h_j; dropped rows become 0)."""
    out = {}
    for j, m in enumerate(modalities):
        h = features[m]
        factor = keep[:, j].to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        out[m] = h * (factor * scale)
    return out


def fuse_features(model: nn.Module, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model.fuse(features)``, under autocast of the features' low precision when they come from an
    autocast forward (the loss runs outside the trainer's autocast, the fusion weights are float32)."""
    low = [h for h in features.values() if h.dtype in _LOW_PRECISION]
    if low and not torch.is_autocast_enabled(low[0].device.type):
        with torch.autocast(low[0].device.type, dtype=low[0].dtype):
            return model.fuse(features)
    return model.fuse(features)


def kept_mean_ce(logits: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the samples with ``kept`` True (0, with its graph, if none is):
    the same as dropping the other samples, without a data-dependent shape (no host sync)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    w = kept.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1)


class FeatureMaskingMethod(Method):
    """Base of the feature-masking methods: subclasses say in ``keep_plan`` which modality each
    training sample keeps and the rescale factor; this class re-fuses, forms the loss, counts the
    drops for ``log`` and keeps the step counters that seed the masks. Not registered itself."""

    min_modalities = 2

    def __init__(self) -> None:
        super().__init__()
        self.step = 0  # optimizer steps (before_step calls) since the start of training
        self._micro = 0  # training micro-batches since the last optimizer step
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        self._drops: torch.Tensor | None = None  # [dropped_1..N, discarded, samples] since the last log()
        self.last_keep: torch.Tensor | None = None  # the last training micro-batch's mask (None: unmasked)
        self.last_scale: Any = 1.0

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = fusing_model(model, self.name, "re-fuses masked features")
        self._modalities = tuple(inner.modalities)

    def generator(self, per_rank: bool = True) -> torch.Generator:
        """This micro-batch's generator: seeded by (seed, step, micro-batch, rank), or without the rank
        (``per_rank=False``) for a draw every rank must agree on."""
        return mask_generator(self.seed, self.step, self._micro, _dist.rank() if per_rank else -1)

    def keep_plan(self, output: ModelOutput, targets: torch.Tensor) -> tuple[torch.Tensor | None, Any]:
        """(keep B x N bool on the features' device, scale) for this training micro-batch, or
        (None, 1) to train this micro-batch on the unmasked fused logits."""
        raise NotImplementedError

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if not output.logits.requires_grad:  # not a training step: the plain loss, no draw
            return super().loss(output, targets)
        if self._model is None:
            raise RuntimeError(f"{self.name}: call setup(model, ...) before loss()")
        keep, scale = self.keep_plan(output, targets)
        self._micro += 1
        self.last_keep, self.last_scale = keep, scale
        n = len(self._modalities)
        if keep is None:
            self._record(torch.tensor([0.0] * (n + 1) + [targets.numel()], device=targets.device))
            return super().loss(output, targets)
        kept = keep.any(1)
        logits = fuse_features(self._model, apply_keep(output.features, self._modalities, keep, scale))
        counts = torch.cat([(~keep).sum(0), (~kept).sum().view(1)]).float()
        self._record(torch.cat([counts, counts.new_full((1,), kept.numel())]).to(targets.device))
        return {"ce": kept_mean_ce(logits, targets, kept), **output.estimator_losses(targets)}

    def _record(self, row: torch.Tensor) -> None:
        self._drops = row if self._drops is None else self._drops.to(row.device) + row

    def before_step(self, model: nn.Module) -> None:
        self.step += 1
        self._micro = 0

    def log(self) -> dict[str, float]:
        """``drop_rate/<m>``: fraction of training samples whose modality m was dropped;
        ``discarded``: fraction left with no modality (not in the loss)."""
        if self._drops is None:
            return {}
        t = self._drops.tolist()
        self._drops = None
        total = max(t[-1], 1.0)
        out = {f"drop_rate/{m}": t[j] / total for j, m in enumerate(self._modalities)}
        out["discarded"] = t[-2] / total
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "drops": self._drops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self._micro = 0
        self._drops = state.get("drops")
