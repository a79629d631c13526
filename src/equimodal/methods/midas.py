"""MIDAS: misalignment-based data augmentation (Hwang, Choi, Whang, NeurIPS 2025). Spec peers_2025.md C4."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum, average_gradients
from ..models.multimodal import ModelOutput
from ._budget import check_epoch_option, share_of_budget, warmup_notes
from ._base import Method, unwrap
from ._heads import linear_heads
from ._registry import register_method

_PARTNERS = ("different_label", "permutation")
_ALPHA_RULES = ("paper", "code")
_REDUCTIONS = ("sum", "mean")


def draw_sources(targets: torch.Tensor, n_modalities: int, generator: torch.Generator,
                 partner: str = "different_label") -> torch.Tensor:
    """B x M source indices: column 0 is the anchor i, columns 1..M-1 its partners.

    ``different_label`` (the paper): the first partner is uniform over the samples with y_j != y_i
    (over every j != i when the batch has no such sample; i itself only for a batch of one); further
    partners uniform over the samples not yet drawn for that row. ``permutation`` (the released
    code): every partner column is a random permutation of the batch (fixed points allowed).
    Drawn on the CPU from ``generator``, returned on ``targets.device``.
    """
    b = targets.numel()
    y = targets.detach().cpu()
    cols = [torch.arange(b)]
    if partner == "permutation":
        cols += [torch.randperm(b, generator=generator) for _ in range(n_modalities - 1)]
        return torch.stack(cols, 1).to(targets.device)
    if partner != "different_label":
        raise ValueError(f"partner must be one of {list(_PARTNERS)}, got {partner!r}")
    scores = torch.rand(b, b, generator=generator)  # random priorities, in [0, 1)
    taken = torch.eye(b, dtype=torch.bool)
    if b > 1:
        scores = scores.masked_fill(taken, -1.0)  # i itself only when nothing else exists
    first = scores + 2.0 * (y.view(-1, 1) != y.view(1, -1)).float()  # a different label wins if any
    for k in range(n_modalities - 1):
        pick = (first if k == 0 else scores).argmax(1)
        cols.append(pick)
        taken[torch.arange(b), pick] = True
        scores = scores.masked_fill(taken, -1.0)  # a row with nothing left repeats its first index
    return torch.stack(cols, 1).to(targets.device)


def misaligned_terms(features: dict[str, torch.Tensor], targets: torch.Tensor, confidences: torch.Tensor,
                     sources: torch.Tensor, fuse, alpha: torch.Tensor, hard: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_mis and the statistics of the alpha update, for M modalities (M = 2: the paper's x~1, x~2).

    For each cyclic shift k = 0..M-1, misaligned sample k of anchor i takes modality m's feature from
    source ``sources[i, (m + k) mod M]`` (M = 2: k = 0 is (f_a,i, f_v,j), k = 1 is (f_a,j, f_v,i)).
    Soft label: c~_m = c_m(source) / sum_m' c_m'(source') with c_m the detached unimodal
    true-class confidence (M x B ``confidences``); target sum_m c~_m e_{y(source_m)}; loss
    l = sum_m alpha_m c~_m CE(fuse(f~), y(source_m)); times 1 + (s + 1) / 2 with s the mean cosine
    (detached) between the anchor's feature and the replacing one over the replaced modalities
    (``hard``). L_mis = mean over samples and shifts.
    Returns (L_mis, conf, fused): M x K x B c~ and M x K x B fused probabilities of each modality's
    source label, both detached (K = M shifts).
    """
    names = list(features)
    n, b = len(names), targets.numel()
    anchor = torch.arange(b, device=targets.device)
    losses, confs, fused = [], [], []
    for k in range(n):
        idx = [sources[:, (i + k) % n] for i in range(n)]
        z = fuse({m: features[m][idx[i]] for i, m in enumerate(names)}).float()
        logp = F.log_softmax(z, dim=1)
        c = torch.stack([confidences[i][idx[i]] for i in range(n)])  # M x B
        c = c / c.sum(0, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)
        nll = torch.stack([-logp.gather(1, targets[idx[i]].view(-1, 1)).squeeze(1) for i in range(n)])  # M x B
        loss = (alpha.view(-1, 1).to(c) * c * nll).sum(0)
        if hard:
            sims, replaced = [], []
            for i, m in enumerate(names):
                h = features[m].detach().float()
                sims.append(F.cosine_similarity(h, h[idx[i]], dim=1))
                replaced.append((idx[i] != anchor).float())
            sims, replaced = torch.stack(sims), torch.stack(replaced)
            s = (sims * replaced).sum(0) / replaced.sum(0).clamp_min(1.0)
            loss = loss * (1 + (s + 1) / 2)
        losses.append(loss)
        confs.append(c.detach())
        fused.append((-nll).detach().exp())
    return torch.stack(losses).mean(), torch.stack(confs, 1), torch.stack(fused, 1)


#: the paper's warm-up as a share of its budget: 10 of 70 epochs (CREMA-D, KS)
_WARMUP_SHARE = (1, 7)

@register_method("midas")
class MIDAS(Method):
    """MIDAS (Hwang et al., NeurIPS 2025): train on feature-level misaligned pairs with confidence-weighted soft labels.

    Rule (our notation). Unimodal heads g_m (linear, owned by the method) on the encoder features
    f_m; c_m,i = softmax(g_m f_m,i)[y_i], detached. Warm-up (epoch < ``warmup_epochs``):
    L = L_uni = sum_m CE(g_m f_m, y) only. Afterwards L = CE(fuse(f), y) + lam * L_mis + L_uni.
    L_mis: each sample i gets partners (M = 2: one partner j, y_j != y_i) and M misaligned samples,
    the cyclic assignments of the sources to the modalities (M = 2: x~1 = (f_a,i, f_v,j),
    x~2 = (f_a,j, f_v,i)), built from the features already computed (no re-encoding) and fused by the
    model's ``fuse``. Soft label sum_m c~_m e_{y(source of m)} with c~_m = c_m / sum c (for x~1:
    w_a = c_a,i / (c_a,i + c_v,j)); the loss sum_m alpha_m c~_m CE(., y(source of m)) is multiplied
    by 1 + (s + 1) / 2 (s: cosine between the anchor's and the replacing feature of the replaced
    modalities, detached, averaged over them) and averaged over samples and assignments.
    alpha (``alpha_rule="paper"``, §3.4 / Alg. 1): after each step's loss, m^ = argmin_m mean c~_m
    over the misaligned batch, Delta = mean c~_m^ - mean p~[y_m^] / sum_m p~[y_m] (p~: the fused
    head's probabilities on the misaligned samples), alpha_m^ <- max(1, alpha_m^ + eta Delta); every
    alpha is reset to 1 at the start of each epoch.

    Paper: Seong-Hyeon Hwang, Soyoung Choi, Steven Euijong Whang, NeurIPS 2025, "MIDAS:
    Misalignment-based Data Augmentation Strategy for Imbalanced Multimodal Learning" (arXiv
    2509.25831); official code github.com/Seong-HyeonHwang/MIDAS_NeurIPS2025
    (``models/model_midas_cremad.py``).

    Options (defaults): warmup_epochs (null: a seventh of the run's epochs, rounded (0 up to 3 epochs): the
    paper's 10 of 70 on CREMA-D / KS, so a short run is not all warm-up; 10 when the loop does not
    tell the budget; an integer fixes it: 2 Food-101, 0 UCF-101); lam (1.0; 5 for KS);
    eta (0.05); partner ("different_label": the paper's y_j != y_i | "permutation": the code's
    ``randperm``, fixed points allowed); alpha_rule ("paper" | "code": the released rule, two
    modalities only: one shared alpha (never reset) on the weaker modality's label term, the weaker
    being modality 1 when uni_ratio = mean c_0 / mean c_1 > 1 else modality 0, then alpha += eta when
    (uni_ratio > 1 and mm_ratio > uni_ratio) or (uni_ratio <= 1 and mm_ratio < uni_ratio), else
    alpha -= eta, alpha >= 1; mm_ratio = mean over x~1, x~2 of mean p~(modality-0 source label) /
    mean p~(modality-1 source label)); alpha_max (null; the KS file clips alpha to 10); hard_weight
    (True: the similarity weighting); uni_reduction ("sum": the paper | "mean": the code averages the
    unimodal losses).

    Departures: the paper's "random permutation" of sources over modalities is taken as all M
    cyclic shifts of the drawn sources (M = 2: both swaps, as the code; partners are drawn at random,
    so each shift is a random assignment); with alpha_rule "paper" alpha is kept per modality and
    only alpha_m^ moves (m^ may change between steps; the paper describes one alpha moving while
    the others stay 1); a batch whose labels are all equal falls back to partners with the same
    label. Statistics of the alpha update (and, for the code rule, the unimodal ratio used in the
    loss) are summed across ranks before the decision. Random partners come from a generator seeded
    by (seed, step). More than two modalities: the paper's App. A.2 rule (M sources with >= 2
    distinct labels, c~ normalised over M, alpha for the least confident modality, mean cosine
    over the replaced modalities); alpha_rule "code" is refused there.

    Cost per step: encoders run once; M extra fused-head passes on swapped features, M unimodal
    heads, M^2 cosine similarities (about 1.0x joint training). Hooks: setup, on_epoch_start, loss,
    before_step, log, state_dict.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"warmup_epochs": (None, 1, 3, 6)}

    def __init__(self, warmup_epochs: int | None = None, lam: float = 1.0, eta: float = 0.05,
                 partner: str = "different_label", alpha_rule: str = "paper", alpha_max: float | None = None,
                 hard_weight: bool = True, uni_reduction: str = "sum") -> None:
        super().__init__()
        check_epoch_option("warmup_epochs", warmup_epochs, 0)
        for key, value in (("lam", lam), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if alpha_max is not None and (isinstance(alpha_max, bool) or not isinstance(alpha_max, (int, float))
                                      or not math.isfinite(alpha_max) or alpha_max < 1):
            raise ValueError(f"alpha_max must be null or a finite number >= 1, got {alpha_max!r}")
        for key, value, allowed in (("partner", partner, _PARTNERS), ("alpha_rule", alpha_rule, _ALPHA_RULES),
                                    ("uni_reduction", uni_reduction, _REDUCTIONS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if not isinstance(hard_weight, bool):
            raise ValueError(f"hard_weight must be true or false, got {hard_weight!r}")
        self.warmup_option = warmup_epochs  # as given: None follows the run's budget
        self.warmup_epochs = share_of_budget(warmup_epochs, 0, _WARMUP_SHARE, paper=10)
        self.lam, self.eta = float(lam), float(eta)
        self.partner, self.alpha_rule, self.uni_reduction = partner, alpha_rule, uni_reduction
        self.alpha_max = None if alpha_max is None else float(alpha_max)
        self.hard_weight = hard_weight
        self.heads: nn.ModuleDict | None = None
        self._modalities: tuple[str, ...] = ()
        self.alpha = torch.ones(0)  # one per modality ("code": [1, a] or [a, 1] as the weaker one says)
        self.shared_alpha = 1.0  # the code rule's single alpha
        self.step = 0
        self._pending: torch.Tensor | None = None  # statistics of the alpha update since the last step
        self._weak: int | None = None  # the code rule: which modality's label term alpha weighs
        self._trace: torch.Tensor | None = None  # [sum alpha_1..M, steps] for log()

    # --- setup ---------------------------------------------------------------------------
    def plan_epochs(self, epochs: int) -> list[str]:
        self.warmup_epochs = share_of_budget(self.warmup_option, epochs, _WARMUP_SHARE, paper=10, low=0)
        return warmup_notes("midas", self.warmup_epochs, epochs,
                            "the fused head is never trained (test accuracy at chance)")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        mods = tuple(inner.modalities)
        if self.alpha_rule == "code" and len(mods) != 2:
            raise ValueError(f"midas: alpha_rule='code' (the release's ratio rule) is defined for two modalities; "
                             f"the model has {list(mods)}; use alpha_rule='paper'")
        if not hasattr(inner, "fuse"):
            raise TypeError(f"midas needs a model with fuse(features) (misaligned features are fused); "
                            f"got {type(inner).__name__}")
        self._modalities = mods
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 29)
            self.alpha = torch.ones(len(mods))
        self._fuse = inner.fuse
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else list(self.heads.parameters())

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.alpha_rule == "paper":
            self.alpha = torch.ones(len(self._modalities))  # Alg. 1 l.9: reset every epoch

    # --- per step ------------------------------------------------------------------------
    def current_alpha(self) -> torch.Tensor:
        """alpha per modality for this step's loss."""
        if self.alpha_rule == "paper":
            return self.alpha.clone()
        alpha = torch.ones(2)
        if self._weak is not None:
            alpha[self._weak] = self.shared_alpha
        return alpha

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.heads is None:
            raise RuntimeError("midas: call setup(model, optimizer) first")
        feats = {m: output.features[m] for m in self._modalities}
        uni = {m: self.heads[m](feats[m]).float() for m in self._modalities}
        terms = {f"uni/{m}": F.cross_entropy(z, targets) / (len(uni) if self.uni_reduction == "mean" else 1)
                 for m, z in uni.items()}
        terms.update(output.estimator_losses(targets))
        if self.epoch < self.warmup_epochs:
            return terms  # warm-up: the unimodal heads (and encoders through them) only
        conf = torch.stack([z.detach().softmax(1).gather(1, targets.view(-1, 1)).squeeze(1) for z in uni.values()])
        training = output.logits.requires_grad and torch.is_grad_enabled()
        if self.alpha_rule == "code":
            stats = torch.cat([conf.sum(1), conf.new_tensor([float(targets.numel())])])
            stats = all_reduce_sum(stats) if training else stats
            self._weak = 1 if float(stats[0]) > float(stats[1]) else 0  # uni_ratio > 1: modality 1 is weaker
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        sources = draw_sources(targets, len(self._modalities), gen, self.partner)
        mis, c_tilde, fused = misaligned_terms(feats, targets, conf, sources, self._fuse, self.current_alpha(),
                                               self.hard_weight)
        terms["ce"] = F.cross_entropy(output.logits.float(), targets)
        terms["mis"] = self.lam * mis
        if training:
            self.step += 1
            if self.alpha_rule == "paper":  # [sum c~_m, sum p~_m / sum_m' p~_m', count]
                norm = fused / fused.sum(0, keepdim=True).clamp_min(torch.finfo(fused.dtype).tiny)
                row = torch.cat([c_tilde.sum((1, 2)), norm.sum((1, 2)), c_tilde.new_tensor([c_tilde[0].numel()])])
            else:  # per shift: sum p~(modality-0 source label), sum p~(modality-1 source label); then the
                # all-reduced sum c_0, sum c_1 of the aligned batch (uni_ratio)
                row = torch.cat([fused.sum(2).t().flatten(), stats[:2].to(fused)])
            row = row.float()
            # gradient accumulation: the micro-batches' sums, one update per optimizer step
            self._pending = row if self._pending is None else self._pending + row.to(self._pending.device)
        return terms

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the unimodal heads live outside the DDP wrapper
        pending, self._pending = self._pending, None
        if pending is None:
            return
        n = len(self._modalities)
        if self.alpha_rule == "paper":
            stats = all_reduce_sum(pending.clone())
            count = stats[-1].clamp_min(1.0)
            mean_c, mean_fused = stats[:n] / count, stats[n:2 * n] / count
            k = int(torch.argmin(mean_c))
            value = float(self.alpha[k]) + self.eta * float(mean_c[k] - mean_fused[k])
            self.alpha[k] = self._clip(value)
        else:
            stats = all_reduce_sum(pending[:4].clone())  # the two shifts' sums (the c sums are global already)
            uni_ratio = float(pending[4] / pending[5].clamp_min(1e-30))
            per_shift = stats.view(2, 2)  # shift x (modality-0 label, modality-1 label)
            mm_ratio = float((per_shift[:, 0] / per_shift[:, 1].clamp_min(1e-30)).mean())
            up = mm_ratio > uni_ratio if uni_ratio > 1 else mm_ratio < uni_ratio
            self.shared_alpha = self._clip(self.shared_alpha + (self.eta if up else -self.eta))
        row = torch.cat([self.current_alpha(), torch.ones(1)])
        self._trace = row if self._trace is None else self._trace + row

    def _clip(self, value: float) -> float:
        value = max(1.0, value)
        return min(self.alpha_max, value) if self.alpha_max is not None else value

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """Mean alpha per modality over the steps since the last call."""
        trace, self._trace = self._trace, None
        if trace is None:
            return {}
        return {f"alpha/{m}": float(v) for m, v in zip(self._modalities, (trace[:-1] / trace[-1]).tolist())}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "step": self.step, "alpha": self.alpha.clone(),
                 "shared_alpha": self.shared_alpha, "weak": self._weak, "pending": self._pending,
                 "trace": self._trace}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        if "alpha" in state:
            self.alpha = state["alpha"].clone().float()
        self.shared_alpha = float(state.get("shared_alpha", 1.0))
        self._weak = state.get("weak")
        self._pending = state.get("pending")
        self._trace = state.get("trace")
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
