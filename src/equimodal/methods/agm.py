"""AGM: adaptive gradient modulation from Shapley responses over zero-padded inputs (peers.md B5)."""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from ..models.multimodal import ModelOutput, MultimodalModel
from ._base import Method, unwrap
from ._registry import register_method

_EMPTY = ("paper", "zero")
_BN = ("eval", "batch")
_LEVELS = ("encoder", "response")
_VALUES = "agm/values"  # key of ModelOutput.extra: the 2^M x B x C coalition logits


def shapley_matrix(m: int) -> torch.Tensor:
    """W (M x 2^M) with phi = W @ v: phi_i = sum_{S not containing i} w(|S|) (v(S + i) - v(S)),
    w(s) = s! (M - s - 1)! / M!. Coalition S is the bitmask whose bit i is set when modality i is in S."""
    w = torch.zeros(m, 2 ** m, dtype=torch.float64)
    for i in range(m):
        for mask in range(2 ** m):
            if mask >> i & 1:
                continue
            s = bin(mask).count("1")
            weight = math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
            w[i, mask | 1 << i] += weight
            w[i, mask] -= weight
    return w


def shapley_responses(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """phi (M x B x C) from coalition logits ``values`` (2^M x B x C, index = bitmask)."""
    return torch.einsum("ms,sbc->mbc", weights.to(values), values)


def response_scores(phi: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per modality, the summed cross-entropy -log max(softmax(phi_m)[y], 1e-8) over the batch (M-vector)."""
    p = phi.float().softmax(-1).gather(-1, targets.view(1, -1, 1).expand(phi.shape[0], -1, 1)).squeeze(-1)
    return -p.clamp_min(1e-8).log().sum(1)


def agm_ratio(scores: torch.Tensor) -> torch.Tensor:
    """r_m = exp(M / (M - 1) * (mean_j u_j - u_m)): above 1 for a modality with a lower (better) loss
    than average (the official code's sign; for two modalities r_a = exp(u_v - u_a))."""
    n = scores.numel()
    return torch.exp(n / (n - 1) * (scores.mean() - scores))


def agm_coefficients(scores: torch.Tensor, mean_scores: torch.Tensor, alpha: float,
                     cap: float | None) -> torch.Tensor:
    """kappa_m = exp(alpha * min(rbar_m - r_m, cap)), r from this step's scores u, rbar from the
    running means of past steps' scores (all zero before the first step, so rbar = 1)."""
    gap = agm_ratio(mean_scores) - agm_ratio(scores)
    if cap is not None:
        gap = gap.clamp_max(cap)
    return torch.exp(alpha * gap)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``k`` (the official hook)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


@register_method("agm")
class AGM(Method):
    """AGM (Li et al., ICCV 2023): boost encoders whose Shapley response on zero-padded inputs falls behind.

    Rule (M >= 2 modalities; f(S) = fused logits with the inputs of modalities outside S set to
    zero): phi_m = sum_{S not containing m} |S|!(M-|S|-1)!/M! [f(S + m) - f(S)] (full Shapley);
    u_m = mean over the step's batch of -log max(softmax(phi_m)[y], 1e-8) (sums all-reduced across
    ranks); r_m = exp(M/(M-1) (mean_j u_j - u_m)); rbar_m the same formula on the running means of
    u over all past steps (0 before the first, so rbar = 1); kappa_m = exp(alpha min(rbar_m - r_m,
    cap)). In ``before_step`` every encoder-m gradient is multiplied by kappa_m (epochs in
    [modulation_starts, modulation_ends]); then the running means take this step's u. A modality
    whose loss grows relative to the others (r_m falls below its past level) gets kappa_m > 1.

    Paper: Li, Li, Hu, Lei, Li, Zhou, ICCV 2023, "Boosting Multi-modal Model Performance with
    Adaptive Gradient Modulation". Official code: lihong2303/AGM_ICCV2023.

    Options: alpha (1.5, the paper's CREMA-D value; 2.5 AV-MNIST, 4.0 UR-Funny), cap (10.0, the
    official CREMA-D code; 7 UR-Funny; None = no cap, as its AVE/AV-MNIST/MOSEI code),
    empty_set ("paper": v(empty) = f(all inputs zero) | "zero": v(empty) = 0, the official code,
    which then adds f(empty)/M to every phi_m), padded_bn ("eval": the padded passes run the model
    in eval mode, as the official code does, so BatchNorm uses and keeps its running statistics |
    "batch": train mode with batch statistics, every BatchNorm buffer saved before and restored
    after, so zeroed inputs never reach the running statistics), level ("encoder": scale encoder
    gradients in before_step, the rule above | "response": the official code's form, the loss is
    CE(f(empty) + sum_m phi_m) with the backward of phi_m scaled by kappa_m, so the padded passes
    keep their gradients; kappa comes from each micro-batch's scores, all-reduced in ``loss``),
    clip_grad (None | c: the official code's rule, if any head gradient entry exceeds c in absolute
    value, clip the model's total gradient norm to c; it uses 1.0), modulation_starts (0),
    modulation_ends (None = to the end; the authors modulate over all epochs).

    Departures: the ratio's sign is the authors' code's (a weaker modality, higher u, gets the
    larger kappa); the BalanceMM port and our spec's first summary have it reversed, which swaps
    the two kappas. The official gradient clipping is off by default (the trainer's own
    optim.clip_grad_norm applies after before_step). The default scales encoder
    gradients (per-encoder form) rather than the official backward hook on phi, which also scales
    the other modalities' shared f(all) term; with that form a gradient through the padded passes
    would change nothing, so they run under no_grad (level="response" keeps them). f(empty) is
    included by default (the paper's Shapley value). Any fusion and any M >= 2 (the code has M = 2).

    Cost per micro-batch: 2^M - 1 extra forward passes (2^M - 2 with empty_set="zero"), no-grad
    unless level="response"; on a ``MultimodalModel`` at level="encoder" they share encoder passes
    (each encoder runs once on its real and once on its zeroed input: 2M encoder passes, then one
    fusion per coalition; the same values). Needs ``method.forward`` (a loop that calls ``model(inputs)`` itself
    gets a warning and no modulation). Hooks: setup, forward, loss, before_step, log.
    """

    modifies_gradients = True
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (1.5, 0.5, 1.0, 2.5)}

    def __init__(self, alpha: float = 1.5, cap: float | None = 10.0, empty_set: str = "paper",
                 padded_bn: str = "eval", level: str = "encoder", clip_grad: float | None = None,
                 modulation_starts: int = 0, modulation_ends: int | None = None) -> None:
        super().__init__()
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        for key, value in (("cap", cap), ("clip_grad", clip_grad)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{key} must be a number > 0 or None, got {value!r}")
        for key, value, allowed in (("empty_set", empty_set, _EMPTY), ("padded_bn", padded_bn, _BN),
                                    ("level", level, _LEVELS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if not isinstance(modulation_starts, int) or isinstance(modulation_starts, bool) or modulation_starts < 0:
            raise ValueError(f"modulation_starts must be an integer >= 0, got {modulation_starts!r}")
        if modulation_ends is not None and (not isinstance(modulation_ends, int) or isinstance(modulation_ends, bool)
                                            or modulation_ends < modulation_starts):
            raise ValueError(f"modulation_ends must be None or an integer >= modulation_starts "
                             f"({modulation_starts}), got {modulation_ends!r}")
        self.alpha = float(alpha)
        self.cap = None if cap is None else float(cap)
        self.empty_set, self.padded_bn, self.level = empty_set, padded_bn, level
        self.clip_grad = None if clip_grad is None else float(clip_grad)
        self.modulation_starts, self.modulation_ends = modulation_starts, modulation_ends
        self.step = 0
        self.seen = 0  # steps whose scores entered the running means
        self.mean_scores: torch.Tensor | None = None
        self._modalities: tuple[str, ...] = ()
        self._weights: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None  # [sum u_1..M, count] since the last step
        self._reduced = False  # level="response": the stats were all-reduced in loss()
        self._trace: torch.Tensor | None = None  # [sum u, sum r, sum kappa, steps] since the last log()
        self._warned = False
        self.last_coefficients: torch.Tensor | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        self._modalities = tuple(unwrap(model).modalities)
        self._weights = shapley_matrix(len(self._modalities)).float()
        if self.mean_scores is None or self.mean_scores.numel() != len(self._modalities):
            self.mean_scores, self.seen = torch.zeros(len(self._modalities)), 0

    def in_window(self) -> bool:
        ends = self.modulation_ends
        return self.modulation_starts <= self.epoch and (ends is None or self.epoch <= ends)

    # --- per micro-batch -----------------------------------------------------------------
    @contextmanager
    def _padded_mode(self, model: nn.Module) -> Iterator[None]:
        """Keep zero-padded passes out of the BatchNorm running statistics (``padded_bn``)."""
        if self.padded_bn == "eval":
            flags = [(mod, mod.training) for mod in model.modules()]
            model.eval()
            try:
                yield
            finally:
                for mod, flag in flags:
                    mod.training = flag
            return
        # the padded passes update clones; the originals (saved for the normal pass's backward) are
        # put back untouched, so no in-place write reaches a tensor autograd still needs
        saved = [(mod, dict(mod._buffers)) for mod in model.modules()
                 if isinstance(mod, nn.modules.batchnorm._NormBase)]
        for mod, buffers in saved:
            for name, b in buffers.items():
                if b is not None:
                    setattr(mod, name, b.clone())
        try:
            yield
        finally:
            for mod, buffers in saved:
                for name, b in buffers.items():
                    setattr(mod, name, b)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """The normal forward, plus one forward per other coalition S (inputs outside S zeroed);
        the coalition logits go to ``output.extra["agm/values"]`` (2^M x B x C, index = bitmask)."""
        out = model(inputs)
        if not (torch.is_grad_enabled() and out.logits.requires_grad):
            return out
        inner, names = unwrap(model), self._modalities or tuple(unwrap(model).modalities)
        full = 2 ** len(names) - 1
        keep = self.level == "response"
        values: list[torch.Tensor | None] = [None] * (full + 1)
        masks = [mask for mask in range(full) if mask or self.empty_set != "zero"]
        with self._padded_mode(inner), torch.set_grad_enabled(keep):
            if self._shares_encoder_passes(inner, keep):
                # each encoder once on its real and once on its zeroed input (the coalitions only
                # recombine them): 2M encoder passes instead of M per coalition; the same values
                need = {(m, bool(mask >> i & 1)) for mask in masks for i, m in enumerate(names)}
                feats = {(m, real): inner.encoder(m)(inputs[m] if real else torch.zeros_like(inputs[m]))
                         for m, real in need}
                for mask in masks:
                    values[mask] = inner.fuse({m: feats[m, bool(mask >> i & 1)]
                                               for i, m in enumerate(names)}).float()
            else:
                for mask in masks:
                    padded = {m: (inputs[m] if mask >> i & 1 else torch.zeros_like(inputs[m]))
                              for i, m in enumerate(names)}
                    padded.update({k: x for k, x in inputs.items() if k not in names})
                    values[mask] = inner(padded).logits.float()
        values[full] = out.logits.float() if keep else out.logits.detach().float()
        if values[0] is None:
            values[0] = torch.zeros_like(values[full])
        out.extra[_VALUES] = torch.stack(values)
        return out

    #: reuse encoder passes across coalitions where that gives the same values (see forward)
    share_encoder_passes: bool = True

    def _shares_encoder_passes(self, inner: nn.Module, keep: bool) -> bool:
        """Whether the padded logits may be built from one pass per (encoder, real | zeroed input):
        only without gradients through them (level="encoder"), and only for a model whose forward is
        ``MultimodalModel``'s (fuse of the per-modality encoder outputs); anything else runs the
        model once per coalition."""
        return (self.share_encoder_passes and not keep
                and getattr(type(inner), "forward", None) is MultimodalModel.forward)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().loss(output, targets)
        values = output.extra.get(_VALUES)
        if values is None:
            if output.logits.requires_grad and not self._warned:
                warnings.warn(f"{self.name}: the output has no zero-padded responses; call method.forward(model, "
                              "inputs) instead of model(inputs) in training, else AGM modulates nothing")
                self._warned = True
            return terms
        phi = shapley_responses(values, self._weights)
        stats = torch.cat([response_scores(phi.detach(), targets), phi.new_tensor([targets.numel()])])
        if self.level == "response":
            stats = _dist.all_reduce_sum(stats)
            k = self._coefficients(stats) if self.in_window() else torch.ones_like(stats[:-1])
            self.last_coefficients = k
            fused = values[0] + sum(_ScaleGrad.apply(phi[i], k[i]) for i in range(len(k)))
            terms["ce"] = F.cross_entropy(fused, targets)
            self._reduced = True
        self._stats = stats if self._stats is None else self._stats + stats
        return terms

    def _coefficients(self, stats: torch.Tensor) -> torch.Tensor:
        return agm_coefficients(stats[:-1] / stats[-1], self.mean_scores.to(stats), self.alpha, self.cap)

    # --- per optimizer step --------------------------------------------------------------
    def before_step(self, model: nn.Module) -> None:
        if self._stats is None:  # no padded responses this step (see the warning in loss)
            return
        stats = self._stats if self._reduced else _dist.all_reduce_sum(self._stats)
        self._stats, self._reduced = None, False
        inner = unwrap(model)
        u = stats[:-1] / stats[-1]
        mean = self.mean_scores.to(u)
        k = self._coefficients(stats)
        if self.level == "encoder":
            self.last_coefficients = k
            if self.in_window():
                for i, m in enumerate(self._modalities):
                    grads = [p.grad for p in inner.encoder_parameters(m) if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, k[i].to(device=grads[0].device, dtype=grads[0].dtype))
        if self.clip_grad is not None:
            self._clip(inner)
        row = torch.cat([u, agm_ratio(u), self.last_coefficients.to(u), u.new_ones(1)])
        self._trace = row if self._trace is None else self._trace + row
        self.mean_scores = (mean + (u - mean) / (self.seen + 1)).detach()
        self.seen += 1
        self.step += 1

    def step_log(self) -> dict[str, torch.Tensor]:
        """This step's coefficient per modality (on the device; no host sync here)."""
        if self.last_coefficients is None:
            return {}
        return {f"k/{m}": self.last_coefficients[i] for i, m in enumerate(self._modalities)}

    def _clip(self, model: nn.Module) -> None:
        """The official rule, without a host sync: if any head gradient entry exceeds ``clip_grad``
        in absolute value, scale every gradient so the total norm is at most ``clip_grad``."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        heads = [p.grad for p in model.head_parameters() if p.grad is not None]
        if not grads or not heads:
            return
        over = torch.stack([g.abs().max() for g in heads]).max() > self.clip_grad
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.where(over, (self.clip_grad / (norm + 1e-6)).clamp_max(1.0), torch.ones_like(norm))
        torch._foreach_mul_(grads, coef)

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """Per modality, means over the steps since the last call of u, r and kappa."""
        if self._trace is None:
            return {}
        means = (self._trace[:-1] / self._trace[-1]).view(3, len(self._modalities)).tolist()
        self._trace = None
        return {f"{name}/{m}": means[j][i] for j, name in enumerate(("u", "r", "kappa"))
                for i, m in enumerate(self._modalities)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seen": self.seen, "mean_scores": self.mean_scores,
                "trace": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.seen = int(state.get("seen", 0))
        if state.get("mean_scores") is not None:
            self.mean_scores = state["mean_scores"].detach().clone()
        self._trace = state.get("trace")
