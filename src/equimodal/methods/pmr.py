"""PMR: Prototypical Modal Rebalance (Fan et al., CVPR 2023). peers.md B4."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._registry import register_method
from ._scores import discrepancy_ratios, trace_means, true_class_scores


def prototype_logits(features: dict[str, torch.Tensor], prototypes: dict[str, torch.Tensor],
                     valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """p_m[i, k] = -||h_m,i - c_m,k||_2 (float32), for every modality; classes without a prototype
    (``valid`` False) get -inf, so they take no probability mass."""
    out = {}
    for m, c in prototypes.items():
        h = features[m].float()
        z = -torch.cdist(h, c.to(h.device), compute_mode="donot_use_mm_for_euclid_dist")
        if valid is not None and not bool(valid.all()):
            z = z.masked_fill(~valid.to(z.device), float("-inf"))
        out[m] = z
    return out


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C x D per-class sums, C counts) of one batch, vectorised (index_add_)."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    return sums, counts


@register_method("pmr")
class PMR(Method):
    """PMR (Fan et al., CVPR 2023): prototypical CE on the slower modality, chosen by prototype-classifier scores.

    At the start of each epoch, class prototypes c_m,k = mean of modality m's encoder features over
    the training samples of class k in a random tenth of the training data (``proto_fraction``;
    the model in eval mode and without gradients, as in the official code), then
    c <- (1 - momentum) c_new + momentum c_old when earlier prototypes exist. Each step, prototype
    logits p_m = -||h_m - c_m,k||_2, scores s_m = sum_i softmax(p_m,i)[y_i], ratios
    rho_m = s_m / mean_{j != m} s_j (for two modalities rho_a = s_a / s_v), and
    L = CE(fused) + alpha * sum_{m: rho_m < 1} CE(p_m, y) within epochs
    [modulation_starts, modulation_ends]: the binary switch of the released code (only the slower
    modality gets the prototypical CE; at an exact tie neither does).

    Paper: Fan, Xu, Wang, Wang, Guo, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
    CVPR 2023. Code: fanyunfeng-bit/Modal-Imbalance-PMR (``main_Prototype_grad.py``).
    Defaults: alpha 2.0 (the released CREMA-D / AVE concat commands), momentum 0.2 (the script's
    default; its released commands pass 0.0), modulation epochs 0-70 (both inclusive, as the code's
    ``<=``), proto_fraction 0.1, proto_batch_size 64.

    Entropy regulariser (``entropy_weight`` > 0, off by default because the released script does
    not contain it): the paper adds a prototype-based entropy term on the dominant modality early
    in training; we could not retrieve its exact equation, so this is our reading:
    - entropy_weight * mean_i H(softmax(p_m,i)) for each modality with rho_m > 1 and epochs <
    ``entropy_epochs`` (maximises the entropy of the dominant modality's prototype predictions to
    delay its premature convergence), over the classes that have a prototype.

    Departures: with N > 2 modalities the term goes to every modality with rho_m < 1 (ours; the
    paper has two; BalanceMM's N-modality variant instead scales gradients). Scores are all-reduced
    across ranks before the switch, and prototype sums and class counts before the means. Classes
    absent from the tenth keep their previous prototype; on the very first computation they are
    taken from the whole training split (one extra pass, only then); a class with no training
    sample at all gets no prototype (logit -inf). The official code divides by a zero count there
    (NaN prototypes). The official code skips the EMA at the second computation as well (it tests
    the index of the epoch just trained, ``epoch <= 0``); we apply it whenever previous prototypes
    exist. The official script computes prototypes of AVE and CG-MNIST on the validation loader;
    we never read validation or test data. Without attached data (a plain loop that never calls
    ``attach_data``) there are no prototypes and the loss is the plain CE, with a warning.

    Extra cost: per epoch one no-grad forward pass over a tenth of the training data; per step a
    B x C distance matrix per modality, no extra forward or backward pass.
    Hooks: setup, on_epoch_start, loss, log, state_dict.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (2.0, 0.5, 1.0, 4.0)}

    def __init__(self, alpha: float = 2.0, momentum: float = 0.2, modulation_starts: int = 0,
                 modulation_ends: int = 70, proto_fraction: float = 0.1, proto_batch_size: int = 64,
                 entropy_weight: float = 0.0, entropy_epochs: int = 10) -> None:
        super().__init__()
        for key, value in (("alpha", alpha), ("entropy_weight", entropy_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(proto_fraction, (int, float)) or isinstance(proto_fraction, bool) \
                or not 0 < proto_fraction <= 1:
            raise ValueError(f"proto_fraction must be in (0, 1], got {proto_fraction!r}")
        for key, value, low in (("modulation_starts", modulation_starts, 0), ("modulation_ends", modulation_ends, 0),
                                ("proto_batch_size", proto_batch_size, 1), ("entropy_epochs", entropy_epochs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if modulation_ends < modulation_starts:
            raise ValueError(f"modulation_ends ({modulation_ends}) is before modulation_starts ({modulation_starts})")
        self.alpha, self.momentum = float(alpha), float(momentum)
        self.modulation_starts, self.modulation_ends = int(modulation_starts), int(modulation_ends)
        self.proto_fraction, self.proto_batch_size = float(proto_fraction), int(proto_batch_size)
        self.entropy_weight, self.entropy_epochs = float(entropy_weight), int(entropy_epochs)
        self.prototypes: dict[str, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None  # C: classes that have a prototype
        self.computed = 0  # how many times the prototypes were computed
        self._modalities: tuple[str, ...] = ()
        self._model: nn.Module | None = None
        self._trace: torch.Tensor | None = None  # [sum rho_1..N, sum boosted_1..N, steps] since the last log()
        self.last_ratios: torch.Tensor | None = None
        self._warned = False

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        self._model = unwrap(model)
        self._modalities = tuple(self._model.modalities)

    def in_window(self, epoch: int | None = None) -> bool:
        e = self.epoch if epoch is None else epoch
        return self.modulation_starts <= e <= self.modulation_ends

    def entropy_active(self, epoch: int | None = None) -> bool:
        e = self.epoch if epoch is None else epoch
        return self.entropy_weight > 0 and e < self.entropy_epochs

    # --- prototypes ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if not (epoch <= self.modulation_ends or self.entropy_active(epoch)):
            return  # no term will read them any more
        if self.data is None:
            if not self._warned:
                warnings.warn(f"{self.name}: no data attached (method.attach_data(MethodData(...))); "
                              "no prototypes, the loss is the plain cross-entropy")
                self._warned = True
            return
        self.update_prototypes(epoch)

    def _class_sums(self, limit: int | None, seed: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-class feature sums of every modality and class counts over the first ``limit`` samples
        of the training data in a seeded order, all-reduced across ranks (one collective)."""
        data, model = self.require_data(), self._model
        classes = model.num_classes
        sums: dict[str, torch.Tensor] = {}
        counts = None
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                for inputs, y in data.batches(data.train, self.proto_batch_size, seed=seed, limit=limit):
                    feats = model(inputs).features
                    for m in self._modalities:
                        s, c = class_means(feats[m].float(), y, classes)
                        sums[m] = sums[m] + s if m in sums else s
                    counts = c if counts is None else counts + c
        finally:
            for m, training in modes:
                m.train(training)
        if counts is None:
            raise RuntimeError(f"{self.name}: the training data is empty; no prototypes can be computed")
        packed = all_reduce_sum(torch.cat([*(sums[m].flatten() for m in self._modalities), counts]))
        out, offset = {}, 0
        for m in self._modalities:
            n = sums[m].numel()
            out[m] = packed[offset:offset + n].view_as(sums[m])
            offset += n
        return out, packed[offset:]

    def update_prototypes(self, epoch: int) -> None:
        """Prototypes from a random ``proto_fraction`` of the training data (see the class docstring
        for the EMA and for classes absent from that part)."""
        n = len(self.require_data().train)
        limit = max(1, math.ceil(self.proto_fraction * n)) if self.proto_fraction < 1 else None
        sums, counts = self._class_sums(limit, seed=self.seed * 1_000_003 + epoch)
        present = counts > 0
        if not self.prototypes:  # first computation: fill classes absent from the tenth from all of train
            if not bool(present.all()) and limit is not None:
                full_sums, full_counts = self._class_sums(None, seed=None)
                fill = ~present & (full_counts > 0)
                for m in self._modalities:
                    sums[m][fill] = full_sums[m][fill]
                counts = torch.where(fill, full_counts, counts)
                present = counts > 0
            self.prototypes = {m: (sums[m] / counts.clamp_min(1).unsqueeze(1)) for m in self._modalities}
            self.valid = present.clone()
        else:
            old_valid = self.valid.to(present.device)
            for m in self._modalities:
                fresh = sums[m] / counts.clamp_min(1).unsqueeze(1)
                old = self.prototypes[m].to(fresh.device)
                ema = (1 - self.momentum) * fresh + self.momentum * old
                mixed = torch.where((present & old_valid).unsqueeze(1), ema, fresh)
                self.prototypes[m] = torch.where(present.unsqueeze(1), mixed, old)  # absent: keep the old one
            self.valid = present | old_valid
        self.computed += 1

    # --- the loss ------------------------------------------------------------------------
    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().loss(output, targets)
        if not self.prototypes:
            return terms
        logits = prototype_logits(output.features, self.prototypes, self.valid)
        scores = all_reduce_sum(true_class_scores(logits, targets, self._modalities))
        rho = discrepancy_ratios(scores)
        boosted = (rho < 1) & self.in_window()
        coef = boosted.to(rho.dtype) * self.alpha
        for i, m in enumerate(self._modalities):
            terms[f"pce/{m}"] = coef[i] * F.cross_entropy(logits[m], targets)
        if self.entropy_active():
            dominant = (rho > 1).to(rho.dtype)
            cols = self.valid.to(rho.device)
            for i, m in enumerate(self._modalities):
                logp = logits[m][:, cols].log_softmax(dim=1)
                entropy = -(logp.exp() * logp).sum(dim=1).mean()
                terms[f"entropy/{m}"] = -self.entropy_weight * dominant[i] * entropy
        if output.logits.requires_grad:  # a training step: keep figures for log()
            self.last_ratios = rho
            row = torch.cat([rho, boosted.to(rho.dtype), rho.new_ones(1)])
            self._trace = row if self._trace is None else self._trace + row
        return terms

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        out = trace_means(self._trace, self._modalities, ("rho", "boosted"))
        self._trace = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "prototypes": dict(self.prototypes), "valid": self.valid,
                "computed": self.computed, "trace": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        device = next(self._model.parameters()).device if self._model is not None else "cpu"
        self.prototypes = {m: c.to(device).clone() for m, c in (state.get("prototypes") or {}).items()}
        self.valid = state["valid"].to(device) if state.get("valid") is not None else None
        self.computed = int(state.get("computed", 0))
        self._trace = state.get("trace")
