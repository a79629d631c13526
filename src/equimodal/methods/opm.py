"""OPM: on-the-fly prediction modulation by adaptive modality dropout. peers.md B2 (adaptive form)."""
from __future__ import annotations

from typing import Any

import torch

from .. import _dist
from ..models.multimodal import ModelOutput
from ._feature_masks import FeatureMaskingMethod, keep_masks
from ._registry import register_method
from ._scores import discrepancy_ratios, true_class_scores

_RATIOS = ("mean", "balancemm")
_BALANCEMM_EPS = 1e-5


@register_method("opm")
class OPM(FeatureMaskingMethod):
    """OPM (Wei et al., TPAMI 2024): per-sample dropout of the dominant modality's features, stronger the more it dominates.

    Each training micro-batch (in the window): OGM scores s_m = sum over the batch of
    softmax(z_m)[y] from the unimodal logits, summed across data-parallel ranks; ratios
    rho_m = s_m / mean_{v != m} s_v; discrepancy d_m = tanh(relu(rho_m - 1)); drop probability
    q_m = clip(q_base * (1 + alpha * d_m), 0, 1) if d_m > 0 else 0. With probability p_exe (one
    draw per micro-batch, the same on every rank) the micro-batch is masked: sample i keeps
    modality m iff a Bernoulli(1 - q_m) draw says so, every feature is multiplied by 1 / (1 - theta)
    with theta = sum_m dim_m q_m / sum_m dim_m (dim_m: feature size), samples left with no
    modality are left out, and the loss is CE(model.fuse(masked features), y) averaged over the
    remaining samples. Otherwise (and outside the window) the loss is the plain CE on the fused
    logits. Evaluation uses every modality. The same paper's gradient rule (OGM) is our
    ``ogm-ge coefficient=continuous`` (k = 1 - tanh(alpha * relu(rho - 1))).

    Paper: Yake Wei, Di Hu, Henghui Du, Ji-Rong Wen, "On-the-fly Modulation for Balanced
    Multimodal Learning", IEEE TPAMI 2024. Official code: GeWu-Lab/BML_TPAMI2024
    (``code/models/Classifier.py``); port: GeWu-Lab/BalanceBenchmark ``OPM_trainer.py``.

    Options and defaults (those of the peers spec / BalanceBenchmark): alpha (0.5, the paper's
    lambda), p_exe (0.7), q_base (0.4; the official script uses 0.5), modulation_starts (0) and
    modulation_ends (None: to the end), epochs inclusive (the official code trains plainly for
    epochs 0-5, i.e. modulation_starts=6), ratio ("mean" | "balancemm").

    Departures: any N >= 2 modalities with our N-modality ratio (s_m over the mean of the others,
    as in our OGM-GE; for two modalities it is the paper's s_m / s_v). ``ratio="balancemm"`` is
    the port's form: rho_m = s_m / (sum_{v != m} s_v + 1e-5) and rescale 1/(1 - theta + 1e-5)
    (the same as ours for two modalities up to the 1e-5). No epsilon is needed in our rescale: the
    modality with the smallest score has rho <= 1, so q = 0 there and theta < 1. When p_exe
    selects a micro-batch and every sample loses all modalities, the loss is 0 (the optimizer still
    steps, so momentum and weight decay act) where the official code skips the batch. The decision
    is per micro-batch (the mask must exist before the loss), with one all-reduce of N scores per
    micro-batch under data parallelism; the official code is single-process. Random draws come
    from CPU generators seeded by (seed, step, micro-batch, rank) (the p_exe draw without the
    rank), never the global RNG, so resume is exact.

    Cost per step: one extra forward of the fusion head on masked micro-batches, one all-reduce of
    N numbers per micro-batch in the window; no extra backward. Hooks: setup, loss, before_step, log.
    ``log()``: ``drop_prob/<m>`` (mean q_m over the window's micro-batches), ``drop_rate/<m>``
    (realised fraction of training samples with m dropped), ``executed`` (fraction of window
    micro-batches masked), ``discarded`` (fraction of samples with no modality left).
    """

    needs_unimodal_logits = True

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (0.5, 0.1, 0.3, 0.8)}

    def __init__(self, alpha: float = 0.5, p_exe: float = 0.7, q_base: float = 0.4, modulation_starts: int = 0,
                 modulation_ends: int | None = None, ratio: str = "mean") -> None:
        super().__init__()
        for key, value in (("alpha", alpha), ("p_exe", p_exe), ("q_base", q_base)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        for key, value in (("p_exe", p_exe), ("q_base", q_base)):
            if value > 1:
                raise ValueError(f"{key} is a probability and must be in [0, 1], got {value!r}")
        if not isinstance(modulation_starts, int) or isinstance(modulation_starts, bool) or modulation_starts < 0:
            raise ValueError(f"modulation_starts must be an integer >= 0, got {modulation_starts!r}")
        if modulation_ends is not None and (not isinstance(modulation_ends, int) or isinstance(modulation_ends, bool)
                                            or modulation_ends < modulation_starts):
            raise ValueError(f"modulation_ends must be null or an integer >= modulation_starts "
                             f"({modulation_starts}), got {modulation_ends!r}")
        if ratio not in _RATIOS:
            raise ValueError(f"ratio must be one of {list(_RATIOS)}, got {ratio!r}")
        self.alpha, self.p_exe, self.q_base = float(alpha), float(p_exe), float(q_base)
        self.modulation_starts, self.modulation_ends = modulation_starts, modulation_ends
        self.ratio = ratio
        self._eps = _BALANCEMM_EPS if ratio == "balancemm" else 0.0
        self._decisions: torch.Tensor | None = None  # [sum q_1..N, executed, decisions] since the last log()
        self.last_ratios: torch.Tensor | None = None
        self.last_drop_probabilities: torch.Tensor | None = None

    def in_window(self, epoch: int | None = None) -> bool:
        e = self.epoch if epoch is None else epoch
        return self.modulation_starts <= e and (self.modulation_ends is None or e <= self.modulation_ends)

    def ratios(self, scores: torch.Tensor) -> torch.Tensor:
        """rho_m from the (all-reduced) scores: over the mean of the others, or BalanceMM's form."""
        if self.ratio == "mean":
            return discrepancy_ratios(scores)
        return scores / (scores.sum() - scores + self._eps)

    def drop_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """q_m = clip(q_base (1 + alpha d_m), 0, 1) where d_m = tanh(relu(rho_m - 1)) > 0, else 0."""
        rho = self.ratios(scores)
        d = torch.tanh(torch.relu(rho - 1))
        q = torch.where(d > 0, (self.q_base * (1 + self.alpha * d)).clamp(0, 1), torch.zeros_like(d))
        self.last_ratios, self.last_drop_probabilities = rho, q
        return q

    def keep_plan(self, output: ModelOutput, targets: torch.Tensor) -> tuple[torch.Tensor | None, Any]:
        if not self.in_window():
            return None, 1.0
        scores = true_class_scores(output.unimodal_logits, targets, self._modalities)
        q = self.drop_probabilities(_dist.all_reduce_sum(scores))
        execute = torch.rand((), generator=self.generator(per_rank=False), dtype=torch.float64).item() < self.p_exe
        row = torch.cat([q, q.new_tensor([float(execute), 1.0])])
        self._decisions = row if self._decisions is None else self._decisions.to(row.device) + row
        if not execute:
            return None, 1.0
        u = torch.rand(targets.numel(), len(self._modalities), generator=self.generator())
        keep = keep_masks(q, u.to(q.device, non_blocking=True))
        dims = q.new_tensor([output.features[m][0].numel() for m in self._modalities])
        theta = (dims * q).sum() / dims.sum()
        return keep, 1 / (1 - theta + self._eps)

    def log(self) -> dict[str, float]:
        out = super().log()
        if self._decisions is not None:
            t = self._decisions.tolist()
            self._decisions = None
            out.update({f"drop_prob/{m}": t[j] / t[-1] for j, m in enumerate(self._modalities)})
            out["executed"] = t[-2] / t[-1]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decisions": self._decisions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._decisions = state.get("decisions")
