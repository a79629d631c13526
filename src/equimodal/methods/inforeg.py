"""InfoReg: adaptive unimodal regulation in the prime learning window (Huang et al., CVPR 2025). peers.md B12."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._registry import register_method
from ._scores import trace_means, true_class_scores

_PADS = ("zeros", "none")
DOMINANT = "dominant"


def fisher_weights(encoder: nn.Module) -> list[nn.Parameter]:
    """The weight tensors of an encoder's convolution and linear modules (what the trace sums over)."""
    return [m.weight for m in encoder.modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.weight.requires_grad]


def fisher_trace(grads: list[torch.Tensor]) -> torch.Tensor:
    """Trace proxy of the Fisher information of one step: sum over tensors of mean(g^2), in float32.

    Summed over the steps of an epoch this equals the official code's per-epoch figure (the mean
    over elements of the accumulated g^2, summed over tensors), since both are linear in g^2."""
    if not grads:
        return torch.zeros(())
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    sizes = torch.tensor([g.numel() for g in grads], dtype=torch.float32, device=norms.device)
    return (norms.pow(2) / sizes).sum()


def window_growth(traces: list[float], window: int = 10, pad: str = "zeros") -> float:
    """The prime-window statistic k from the per-epoch traces so far (oldest first).

    A = mean of the last ``window`` traces, A' = the same window shifted back one epoch,
    k = (A - A') / A. ``pad="zeros"`` (the official code): the list starts with ``window`` zeros,
    so early windows include them (after e epochs, e <= window: k = t_e / (t_1 + ... + t_e)).
    ``pad="none"``: the windows hold only the traces that exist (A over the last min(window, n),
    A' over the min(window, n - 1) before the newest). k = 1 before there are enough traces
    (no trace yet, or one trace with ``pad="none"``): the official "k = 1 in epoch 0". A window
    whose mean is 0 gives k = 0 (the official code divides by zero there).
    """
    if pad not in _PADS:
        raise ValueError(f"pad must be one of {list(_PADS)}, got {pad!r}")
    seq = [0.0] * window + [float(t) for t in traces] if pad == "zeros" else [float(t) for t in traces]
    if not traces or len(seq) < 2:
        return 1.0
    new, old = seq[-window:], seq[-window - 1:-1]
    a, a_prev = sum(new) / len(new), sum(old) / len(old)
    return (a - a_prev) / a if a > 0 else 0.0


def _number(key: str, value: Any, low: float = 0.0) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise ValueError(f"{key} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


@register_method("inforeg")
class InfoReg(Method):
    """InfoReg (Huang et al., CVPR 2025): pull the dominant encoder back to its epoch-start weights in the prime window.

    Rule (our notation). Loss per micro-batch: CE(z, y) + sum_m CE(z_m, y), z_m the model's
    unimodal logits (for concat fusion the sliced head, z_m = W_m h_m + b/M, as in the code).
    Prime-window detector, per modality m and epoch: tr_m = sum over the conv/linear weight
    tensors of encoder m of the mean over elements of g^2 summed over the epoch's steps (g: the
    step's gradient after the pull below, as in the code); A = mean of the last ``window`` epoch
    traces, A' = the window one epoch earlier, k_m = (A - A') / A (``window_growth``; the trace
    list starts with ``window`` zeros, k = 1 in the first epoch). At each epoch start the anchor
    theta_bar = a copy of the encoders' parameters. Each step, s_m = sum over the step's samples of
    softmax(z_m)[y] (all micro-batches, all ranks); the dominant modality d has the largest s; if
    s_d is strictly the largest and k > ``threshold``, beta = c_d * exp(tanh(s_d - mean_{m != d}
    s_m)) and every gradient of encoder d gets += beta * (theta - theta_bar). Other encoders and
    the fusion head are untouched.

    Paper: Chengxiang Huang, Yake Wei, Zequn Yang, Di Hu, "Adaptive Unimodal Regulation for
    Balanced Multimodal Information Acquisition", CVPR 2025. Code: GeWu-Lab/InfoReg_CVPR2025
    (``main.py``). Defaults: scale 0.95, threshold 0.05, window 10, pad "zeros" (the code's).

    Choices and departures. (1) Constants: the code uses 0.95 when audio dominates and 0.1 when
    visual dominates (CREMA-D, keyed by modality name). Here ``scale`` is c of whichever modality
    dominates at the step (the role that is regulated); ``scale_by_modality`` maps names to their
    own c (``{"audio": 0.95, "visual": 0.1}`` reproduces the code on CREMA-D; unnamed modalities
    keep ``scale``). (2) Window: the code tracks only the audio encoder's trace for every
    decision; by default (``window_from="dominant"``) each modality has its own trace and the
    k of the dominant modality decides, i.e. an encoder is slowed only while it is itself in its
    prime window (on CREMA-D, where audio dominates, that is the code's rule); ``window_from=<name>``
    uses that modality's k for every decision (``"audio"``: the code). (3) N > 2 modalities: the
    gap is s_d minus the mean of the others (for two it is the code's s_a - s_v); a tie for the
    largest s regulates nothing (the code's else branch). (4) The gap is a difference of sums over
    the step's samples, so it grows with the batch: tanh saturates and beta is close to c*e for
    any clear lead (as in the code with batch 64). (5) With the ``probe`` estimator the unimodal
    logits read detached features: the unimodal CE terms are then the probes' own losses (not
    added twice) and train no encoder; the scores and the pull still work. (6) A window mean of
    0 gives k = 0 (the code would divide by zero). (7) ``pad="none"`` (ours) drops the leading
    zeros: the window means then cover only the epochs that exist. Distributed: the scores are all-reduced (one
    tensor) before the decision; the trace uses the already averaged gradient, so every rank
    keeps the same traces.

    Extra cost per step: no extra forward or backward pass; one host sync (which modality, if
    any, to pull), a few foreach ops over the encoders' weights. Memory: a copy of the encoders'
    parameters (the anchor, also in the checkpoint). Hooks: setup, on_epoch_start, loss,
    before_step, on_epoch_end, log.
    """

    needs_unimodal_logits = True
    modifies_gradients = True
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"scale": (0.95, 0.8, 0.9, 0.99)}

    def __init__(self, scale: float = 0.95, scale_by_modality: dict | None = None, threshold: float = 0.05,
                 window: int = 10, pad: str = "zeros", window_from: str = DOMINANT) -> None:
        super().__init__()
        self.scale = _number("scale", scale)
        if scale_by_modality is not None and not isinstance(scale_by_modality, dict):
            raise ValueError(f"scale_by_modality must be a mapping modality -> number >= 0 or null, "
                             f"got {scale_by_modality!r}")
        self.scale_by_modality = {}
        for m, c in (scale_by_modality or {}).items():
            if not isinstance(m, str):
                raise ValueError(f"scale_by_modality keys must be modality names, got {m!r}")
            self.scale_by_modality[m] = _number(f"scale_by_modality[{m!r}]", c)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        self.window = window
        if pad not in _PADS:
            raise ValueError(f"pad must be one of {list(_PADS)}, got {pad!r}")
        self.pad = pad
        if not isinstance(window_from, str) or not window_from:
            raise ValueError(f"window_from must be {DOMINANT!r} or a modality name, got {window_from!r}")
        self.window_from = window_from
        self.step = 0
        self.traces: dict[str, list[float]] = {}  # per modality: one Fisher trace per finished epoch
        self.k: dict[str, float] = {}  # this epoch's prime-window statistic per modality
        self.anchor: dict[str, list[torch.Tensor]] | None = None
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        self._fisher_params: dict[str, list[nn.Parameter]] = {}
        self._fisher: torch.Tensor | None = None  # this epoch's running trace per modality
        self._stats: torch.Tensor | None = None  # [s_1..s_N, count] since the last step
        self._trace: torch.Tensor | None = None  # [regulated_1..N, beta_1..N, steps] since last log()

    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        super().check_modalities(modalities)
        unknown = sorted(set(self.scale_by_modality) - set(modalities))
        if unknown:
            raise ValueError(f"inforeg: scale_by_modality names {unknown}, which are not modalities of the data "
                             f"{list(modalities)}")
        if self.window_from != DOMINANT and self.window_from not in modalities:
            raise ValueError(f"inforeg: window_from {self.window_from!r} is neither {DOMINANT!r} nor a modality "
                             f"of the data {list(modalities)}")

    # --- setup and epochs ----------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = unwrap(model)
        self._modalities = tuple(inner.modalities)
        self.check_modalities(self._modalities)
        self._fisher_params = {m: fisher_weights(inner.encoder(m)) for m in self._modalities}
        empty = [m for m, ps in self._fisher_params.items() if not ps]
        if empty:
            raise ValueError(f"inforeg: the encoder(s) of {empty} have no trainable convolution or linear "
                             "weights, so their Fisher trace (the prime-window detector) is undefined")
        for m in self._modalities:
            self.traces.setdefault(m, [])
        if self.anchor is None:  # a loop that never calls on_epoch_start still has an anchor and k
            self._start_epoch()

    def _start_epoch(self) -> None:
        device = next(self._model.parameters()).device
        self.anchor = {m: [p.detach().clone() for p in self._model.encoder_parameters(m)] for m in self._modalities}
        self.k = {m: window_growth(self.traces.get(m, []), self.window, self.pad) for m in self._modalities}
        self._fisher = torch.zeros(len(self._modalities), device=device)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self._model is None:
            raise RuntimeError("inforeg: call method.setup(model, optimizer) before training")
        self._start_epoch()

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self._fisher is None:
            return
        for m, t in zip(self._modalities, self._fisher.tolist()):
            self.traces[m].append(t)
        self._fisher = torch.zeros_like(self._fisher)

    # --- per micro-batch -----------------------------------------------------------------
    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().loss(output, targets)  # CE(fused) (+ the probes' CE with the probe estimator)
        if output.estimator != "probe":
            for m, z in output.unimodal_logits.items():
                terms[f"ce/{m}"] = F.cross_entropy(z.float(), targets)
        if output.logits.requires_grad:  # training step: record this micro-batch's scores
            scores = true_class_scores(output.unimodal_logits, targets, self._modalities or None)
            stats = torch.cat([scores, scores.new_tensor([targets.numel()])])
            self._stats = stats if self._stats is None else self._stats + stats
        return terms

    # --- per optimizer step --------------------------------------------------------------
    def decide(self, scores: torch.Tensor) -> tuple[int, bool, float]:
        """(dominant index, whether the pull applies, beta) from the step's summed scores s."""
        n = scores.numel()
        top2 = scores.topk(2)
        d = top2.indices[0]
        gap = scores[d] - (scores.sum() - scores[d]) / (n - 1)
        d, lead, gap = torch.stack([d.to(scores.dtype), (top2.values[0] > top2.values[1]).to(scores.dtype),
                                    gap]).tolist()  # the step's one host sync
        d, name = int(d), self._modalities[int(d)]
        k = self.k[name if self.window_from == DOMINANT else self.window_from]
        active = bool(lead) and k > self.threshold
        beta = self.scale_by_modality.get(name, self.scale) * math.exp(math.tanh(gap)) if active else 0.0
        return d, active, beta

    def before_step(self, model: nn.Module) -> None:
        if self._model is None:
            raise RuntimeError("inforeg: call method.setup(model, optimizer) before training")
        if self._stats is None:
            raise RuntimeError("inforeg.before_step() called with no loss() since the last step; "
                               "call method.loss(output, targets) on each micro-batch first")
        stats = all_reduce_sum(self._stats)
        self._stats = None
        n = len(self._modalities)
        d, active, beta = self.decide(stats[:n].float())
        if active:
            m = self._modalities[d]
            pairs = [(p, a) for p, a in zip(self._model.encoder_parameters(m), self.anchor[m])
                     if p.requires_grad and p.grad is not None]
            if pairs:
                diff = torch._foreach_sub([p.detach() for p, _ in pairs], [a for _, a in pairs])
                torch._foreach_add_([p.grad for p, _ in pairs], diff, alpha=beta)
        traces = torch.stack([fisher_trace([p.grad for p in self._fisher_params[m] if p.grad is not None])
                              .to(self._fisher.device) for m in self._modalities])
        # after the pull, as in the official code; a non-finite step (skipped by the trainer) adds nothing
        self._fisher += torch.where(torch.isfinite(traces), traces, torch.zeros_like(traces))
        row = torch.zeros(2 * n + 1, device=self._fisher.device)
        if active:
            row[d], row[n + d] = 1.0, beta
        row[-1] = 1.0
        self._trace = row if self._trace is None else self._trace + row
        self.step += 1

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """Per modality: this epoch's k, its Fisher trace so far, the fraction of steps regulated
        and the mean beta over all steps (0 where not regulated)."""
        out = {f"k/{m}": self.k[m] for m in self._modalities if m in self.k}
        if self._fisher is not None:
            out.update({f"fisher/{m}": t for m, t in zip(self._modalities, self._fisher.tolist())})
        out.update(trace_means(self._trace, self._modalities, ("regulated", "beta")))
        self._trace = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "traces": {m: list(t) for m, t in self.traces.items()},
                "k": dict(self.k), "fisher": self._fisher, "trace": self._trace, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.traces = {m: [float(x) for x in t] for m, t in (state.get("traces") or {}).items()}
        self.k = {m: float(v) for m, v in (state.get("k") or {}).items()}
        self._trace = state.get("trace")
        device = next(self._model.parameters()).device if self._model is not None else "cpu"
        fisher = state.get("fisher")
        self._fisher = fisher.to(device).clone() if fisher is not None else None
        anchor = state.get("anchor")
        if anchor is not None:
            self.anchor = {m: [t.to(device).clone() for t in ts] for m, ts in anchor.items()}
