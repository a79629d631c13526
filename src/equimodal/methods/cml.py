"""CML: calibrating multimodal learning by keeping confidence monotone in the modality set. peers.md B16."""
from __future__ import annotations

from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import rank
from ..models.multimodal import ModelOutput
from ._base import Method, fusing_model
from ._registry import register_method

_SUBSETS = ("chain", "all")
_PENALTIES = ("sum", "mean", "batch")
#: with ``subsets="all"`` the method builds 2^N - 2 partial logits; beyond this it refuses
_MAX_ALL_MODALITIES = 8


def calibration_penalty(conf_sub: torch.Tensor, conf_sup: torch.Tensor, reduction: str = "sum",
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """The CML term for one (fewer modalities, more modalities) pair of predictions of the same samples.

    ``conf_sub``, ``conf_sup``: B-vectors of confidences (max softmax probability) with the smaller
    and the larger modality set. ``sum``: sum_i relu(c_sub_i - c_sup_i) (paper, official code);
    ``mean``: the same divided by B; ``batch``: relu(sum_i (c_sub_i - c_sup_i)) (BalanceBenchmark port).
    ``weight`` (0/1 per sample) multiplies the differences first (the official code's "trick 1").
    """
    diff = conf_sub - conf_sup
    if weight is not None:
        diff = diff * weight
    if reduction == "sum":
        return F.relu(diff).sum()
    if reduction == "mean":
        return F.relu(diff).mean()
    if reduction == "batch":
        return F.relu(diff.sum())
    raise ValueError(f"penalty must be one of {list(_PENALTIES)}, got {reduction!r}")


def all_subset_pairs(n: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Every non-empty modality subset as a keep-mask (row 0: all modalities) and every pair
    (index of T', index of T' minus one modality) with both non-empty."""
    subsets = [tuple(range(n))]
    for size in range(n - 1, 0, -1):
        subsets += list(combinations(range(n), size))
    index = {s: i for i, s in enumerate(subsets)}
    keep = torch.zeros(len(subsets), n, dtype=torch.bool)
    for i, s in enumerate(subsets):
        keep[i, list(s)] = True
    pairs = [(index[s], index[tuple(u for u in s if u != m)]) for s in subsets if len(s) > 1 for m in s]
    return keep, pairs


@register_method("cml")
class CML(Method):
    """CML (Ma et al., ICML 2023): the prediction must not grow more confident when a modality is removed.

    Rule (ours, N modalities). A *partial* prediction z_T for a modality subset T is the model's
    fusion head applied to the features with the modalities outside T set to zero
    (``unwrap(model).fuse``). With conf(z) = max_c softmax(z)_c and K partial predictions,
    L = mean over the K+1 predictions (full and partials) of CE(z, y)
        + lam * sum over pairs (T' superset, T = T' minus one modality) of penalty(conf(z_T) - conf(z_T')).
    ``subsets="chain"`` (default; the official code's sampling): for every sample an independent random
    order of the modalities; the k-th partial drops the first k of that order (k = 1..N-1), and
    each partial is paired with the previous one (the full prediction for k = 1), so N-1 partials
    and N-1 pairs per sample. ``subsets="all"``: every non-empty proper subset (2^N - 2 partials)
    and every (T', T' minus one) pair, the same for all samples; for two modalities this compares
    each single modality with the full prediction. ``penalty``: ``sum`` over samples of the
    per-sample relu (paper's sum over samples, official code; default), ``mean`` (divided by the
    batch size), or ``batch`` = relu of the batch-summed difference (BalanceBenchmark port).
    ``skip_corrected=True`` (official code's "trick 1") leaves out samples whose smaller-set
    prediction is right while the larger-set one is wrong.

    Paper: Huan Ma, Qingyang Zhang, Changqing Zhang, Bingzhe Wu, Huazhu Fu, Joey Tianyi Zhou,
    Qinghua Hu, "Calibrating Multimodal Learning", ICML 2023 (arXiv 2306.01265). Official code:
    QingyangZhang/CML (``cpm/CPM_Nets.py`` ``rank_loss``: per-sample random removal order, nested
    inputs, per-sample relu summed over the batch, trick 1 on, classification loss averaged over
    the inputs). Port: GeWu-Lab/BalanceBenchmark ``balancemm/trainer/CML_trainer.py``.
    Defaults: lam 0.1 (port's value), subsets "chain", penalty "sum", skip_corrected False.

    Departures. (1) Partial predictions always come from the fusion head with zeroed features,
    not from sums of ``output.unimodal_logits``: for concat fusion this is exactly the port's
    sliced logit (W_T h_T + b, the full bias kept; tested), it is exact for every fusion (a sum of
    unimodal logits is not, and with the probe estimator it would carry no gradient to the
    encoders because probes read detached features), and it is what "removing a modality"
    means in the official code, which zero-fills missing views. (2) The removal order is drawn
    per sample from a generator seeded by (seed, step, micro-batch, rank), not once per epoch
    for the whole batch as in the port, and not from the global RNG. (3) The port computes but
    never applies trick 1 and applies relu to the batch sum; both are options here, off by
    default. (4) The penalty is summed over the local micro-batch (under data parallelism each
    rank's sum, gradients averaged by DDP). No modulation window (the port's 0..80 epochs covers
    whole runs). Works with N >= 2 modalities.

    Cost per step: K extra passes of the fusion head only (K = N-1 for chain, 2^N - 2 for all),
    no extra encoder pass, one backward. Hooks: setup, loss, before_step, log.
    """

    needs_unimodal_logits = False
    modifies_gradients = False
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"lam": (0.1, 0.03, 0.3, 1.0)}

    def __init__(self, lam: float = 0.1, subsets: str = "chain", penalty: str = "sum",
                 skip_corrected: bool = False) -> None:
        super().__init__()
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if subsets not in _SUBSETS:
            raise ValueError(f"subsets must be one of {list(_SUBSETS)}, got {subsets!r}")
        if penalty not in _PENALTIES:
            raise ValueError(f"penalty must be one of {list(_PENALTIES)}, got {penalty!r}")
        if not isinstance(skip_corrected, bool):
            raise ValueError(f"skip_corrected must be true or false, got {skip_corrected!r}")
        self.lam = float(lam)
        self.subsets = subsets
        self.penalty = penalty
        self.skip_corrected = skip_corrected
        self.step = 0
        self.micro = 0
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        self._trace: torch.Tensor | None = None  # [sum penalty, violating pairs, compared pairs, micro-batches]

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = fusing_model(model, self.name, "re-fuses the features left after removing modalities")
        self._modalities = tuple(inner.modalities)
        if self.subsets == "all" and len(self._modalities) > _MAX_ALL_MODALITIES:
            raise ValueError(f"{self.name}: subsets='all' builds 2^N - 2 partial predictions; with "
                             f"{len(self._modalities)} modalities use subsets='chain'")

    # --- partial predictions -------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(((self.seed * 1_000_003 + self.step) * 1_009 + self.micro) * 257 + rank())
        return gen

    def keep_masks(self, batch: int, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(K+1) x B x N boolean keep-masks (index 0: all modalities) and the compared pairs
        (index with more modalities, index with one fewer)."""
        n = len(self._modalities)
        if self.subsets == "all":
            keep, pairs = all_subset_pairs(n)
            return keep.to(device).unsqueeze(1).expand(-1, batch, -1), pairs
        # chain: a random rank of each modality per sample; depth k drops the modalities ranked < k
        scores = torch.rand(batch, n, generator=self._generator(device), device=device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        depth = torch.arange(n, device=device).view(-1, 1, 1)
        return ranks.unsqueeze(0) >= depth, [(k - 1, k) for k in range(1, n)]

    def partial_logits(self, features: dict[str, torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
        """One B x C prediction per keep-mask row 1..K: the fusion head on the features with the
        dropped modalities zeroed (per sample)."""
        out = []
        for k in range(1, keep.shape[0]):
            masked = {m: torch.where(keep[k, :, i].unsqueeze(1), features[m], torch.zeros_like(features[m]))
                      for i, m in enumerate(self._modalities)}
            out.append(self._model.fuse(masked))
        return out

    # --- loss ----------------------------------------------------------------------------
    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._model is None:
            raise RuntimeError(f"{self.name}: call setup(model) before loss()")
        keep, pairs = self.keep_masks(targets.shape[0], output.logits.device)
        logits = [output.logits] + self.partial_logits(output.features, keep)
        training = output.logits.requires_grad
        if training:
            self.micro += 1  # the next micro-batch of this step draws other removal orders
        stacked = torch.stack([z.float() for z in logits])                    # (K+1) x B x C
        ce = F.cross_entropy(stacked.flatten(0, 1), targets.repeat(len(logits)))  # mean over K+1 predictions
        conf, pred = stacked.softmax(dim=-1).max(dim=-1)                       # (K+1) x B
        sup = torch.tensor([p[0] for p in pairs], device=conf.device)
        sub = torch.tensor([p[1] for p in pairs], device=conf.device)
        weight = None
        if self.skip_corrected:
            right = pred == targets.unsqueeze(0)
            weight = (~(right[sub] & ~right[sup])).to(conf.dtype)
        penalty = sum(calibration_penalty(conf[s], conf[u], self.penalty, None if weight is None else weight[j])
                      for j, (u, s) in enumerate(pairs))
        if training:  # record figures for log()
            with torch.no_grad():
                row = torch.stack([penalty.detach().float(), (conf[sub] > conf[sup]).sum().float(),
                                   conf.new_tensor(float(conf[sub].numel())), conf.new_tensor(1.0)])
                self._trace = row if self._trace is None else self._trace + row
        return {"ce": ce, "cml": self.lam * penalty, **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        self.step += 1
        self.micro = 0

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        if self._trace is None:
            return {}
        penalty, violations, pairs, batches = self._trace.tolist()
        self._trace = None
        return {"cml/penalty": penalty / batches, "cml/violation_rate": violations / max(pairs, 1.0)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "micro": self.micro, "trace": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.micro = int(state.get("micro", 0))
        self._trace = state.get("trace")
