"""ARL: asymmetric representation learning (Wei, Luo, Luo, ICCV 2025). peers_2025.md C2."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum
from ..models.multimodal import ModelOutput
from ._base import Method, fusing_model
from ._registry import register_method
from ._scores import trace_means
from ._unimodal_probe_logits import single_modality_logits

_WEIGHTS = ("paper", "released")


def arl_coefficients(magnitude: torch.Tensor, entropy: torch.Tensor, temperature: float,
                     floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kappa, c_bar, w) from per-modality logit magnitudes c_m and mean prediction entropies H_m.

    c_bar_m = c_m / sum_j c_j (dependence share); H_bar_m = max(H_m / sum_j H_j, floor);
    w_m = (1 / H_bar_m) / sum_j (1 / H_bar_j) (inverse-entropy share);
    kappa = softmax_m(T * w_m * (1 - c_bar_m)). For two modalities 1 - c_bar_a = c_bar_v, which is
    the released ``softmax(T * [c_bar_v * w_a, c_bar_a * w_v])``."""
    tiny = torch.finfo(torch.float32).tiny
    magnitude, entropy = magnitude.float(), entropy.float()
    c_bar = magnitude / magnitude.sum().clamp_min(tiny)
    h_bar = (entropy / entropy.sum().clamp_min(tiny)).clamp_min(floor)
    inv = 1.0 / h_bar
    w = inv / inv.sum()
    return torch.softmax(temperature * w * (1 - c_bar), dim=0), c_bar, w


@register_method("arl")
class ARL(Method):
    """ARL (Wei et al., ICCV 2025): shared-head unimodal losses; encoder gradients scaled by 1 + kappa (entropy, logit size).

    Rule (our notation; encoders h_m, the model's fusion head g). Unimodal logits through the
    shared head with the other modalities zeroed: z_m = g(0, .., h_m, .., 0) (full bias, as the
    released ``ConcatFusion_AUXI``). Per optimizer step, over the step's samples: logit magnitude
    c_m = mean_i sum_k |z_m,ik| and mean prediction entropy H_m = mean_i H(softmax z_m,i) (natural
    log), both summed across ranks; c_bar_m = c_m / sum_j c_j; H_bar_m = max(H_m / sum_j H_j,
    floor) with floor = ``entropy_floor`` * 2 / M; w_m = (1 / H_bar_m) / sum_j (1 / H_bar_j);
    kappa = softmax_m(T * w_m * (1 - c_bar_m)) (for two modalities exactly the code's
    softmax(T [c_bar_v w_a, c_bar_a w_v])). Loss L = CE(g(h), y) + gamma_e * sum_m CE(z_m, y) with
    gamma_e = ``gamma`` for epochs e > ``start`` and 1 before. For e > ``start``, ``before_step``
    multiplies every gradient of encoder m by (1 + kappa_m), which equals the code's GradScale on
    the encoder output (backward g <- g + g * kappa_m) for every loss term through h_m.

    Paper: Shicai Wei, Chunbo Luo, Yang Luo, ICCV 2025, "Improving Multimodal Learning via
    Imbalanced Learning" (arXiv 2507.10203); official code shicaiwei123/ICCV2025-ARL
    (``main_arl_variance.py``, ``models/backbone.py``, ``models/fusion_modules.py``). Defaults:
    gamma 4 (the paper's "for all datasets", and the CREMA-D script), temperature 8 (CREMA-D; the
    paper uses 4 for AVE / KS / MOSI / UCF101), start 5, entropy_floor 0.3, weights "paper". The
    code's SGD lr 1e-3, momentum 0.9, wd 1e-4, MultiStepLR [70, 150], grad-norm clip 40
    (optim.clip_grad_norm) are trainer settings.

    Options: ``weights`` "paper" (kappa as above, applied) | "released" (what the released code
    runs: kappa is computed but never used, the scale stays at the warm-up's 0.5, i.e. a flat x1.5
    on both encoders' gradients after ``start``, with the gamma-weighted unimodal losses).

    Departures: the code applies the scale per batch inside the encoder; we scale the encoder
    gradients once per optimizer step with kappa from the step's pooled statistics (identical
    without gradient accumulation). Entropies use log-softmax (the code adds 1e-16 inside the log).
    The code's unused guard "validation accuracies not both 0" is dropped. More than two
    modalities is ours (the code has two): the softmax over M and the floor scaled to 2/M (a fixed
    0.3 would bind for most modalities once M >= 4). Zero-filled features suit concat and sum
    heads; for FiLM / gated fusion z_m is an out-of-distribution probe. Statistics are all-reduced
    across ranks (one collective per step) so every rank applies the same kappa.

    Cost: M extra fusion-head evaluations per micro-batch (negligible); no extra forward or
    backward pass through the encoders. Hooks: setup, loss, before_step, log, state_dict.
    """

    min_modalities = 2
    modifies_gradients = True

    #: what ``bench --tune`` tries (the default first)
    search_space = {"gamma": (4.0, 1.0, 2.0, 8.0)}

    def __init__(self, gamma: float = 4.0, temperature: float = 8.0, start: int = 5, entropy_floor: float = 0.3,
                 weights: str = "paper") -> None:
        super().__init__()
        for key, value in (("gamma", gamma), ("temperature", temperature)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if not isinstance(start, int) or isinstance(start, bool) or start < -1:
            raise ValueError(f"start must be an integer >= -1 (the scaling acts in epochs > start), got {start!r}")
        if not isinstance(entropy_floor, (int, float)) or isinstance(entropy_floor, bool) or not 0 <= entropy_floor < 1:
            raise ValueError(f"entropy_floor must be a number in [0, 1), got {entropy_floor!r}")
        if weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {list(_WEIGHTS)}, got {weights!r}")
        self.gamma, self.temperature, self.start = float(gamma), float(temperature), start
        self.entropy_floor, self.weights = float(entropy_floor), weights
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        self._params: dict[str, list[nn.Parameter]] = {}
        self._stats: torch.Tensor | None = None  # [sum_i sum_k |z_m| (M), sum_i H_m (M), count] since the last step
        self._trace: torch.Tensor | None = None  # [sum kappa (M), sum c_bar (M), sum w (M), steps] since log()
        self.last_kappa: torch.Tensor | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = fusing_model(model, self.name, "zeroes features before fusion")
        self._modalities = tuple(inner.modalities)
        self._params = {m: [p for p in inner.encoder_parameters(m) if p.requires_grad] for m in self._modalities}

    def active(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) is after ``start`` (gamma and the scale act)."""
        return (self.epoch if epoch is None else epoch) > self.start

    # --- per micro-batch -------------------------------------------------------------------
    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._model is None:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) before loss()")
        z = single_modality_logits(self._model, output.features, self._modalities)
        weight = self.gamma if self.active() else 1.0
        terms = {"ce": F.cross_entropy(output.logits.float(), targets),
                 **{f"ce/{m}": weight * F.cross_entropy(z[m].float(), targets) for m in self._modalities},
                 **output.estimator_losses(targets)}
        if output.logits.requires_grad:  # training step: record this micro-batch's statistics
            stack = torch.stack([z[m].detach().float() for m in self._modalities])  # M x B x C
            logp = stack.log_softmax(-1)
            magnitude = stack.abs().sum((1, 2))
            entropy = -(logp.exp() * logp).sum(-1).sum(1)
            stats = torch.cat([magnitude, entropy, magnitude.new_tensor([targets.numel()])])
            self._stats = stats if self._stats is None else self._stats + stats
        return terms

    # --- per optimizer step ----------------------------------------------------------------
    def coefficients(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kappa, c_bar, w) from the summed statistics [sum |z| (M), sum H (M), count]."""
        n = len(self._modalities)
        count = stats[-1].clamp_min(1)
        return arl_coefficients(stats[:n] / count, stats[n:2 * n] / count, self.temperature,
                                self.entropy_floor * 2 / n)

    def before_step(self, model: nn.Module) -> None:
        if self._stats is None:
            raise RuntimeError(f"{self.name}.before_step() called with no loss() since the last step; "
                               "call method.loss(output, targets) on each micro-batch first")
        stats = all_reduce_sum(self._stats)
        self._stats = None
        kappa, c_bar, w = self.coefficients(stats)
        row = torch.cat([kappa, c_bar, w, kappa.new_ones(1)])
        self._trace = row if self._trace is None else self._trace + row
        applied = torch.full_like(kappa, 0.5) if self.weights == "released" else kappa
        self.last_kappa = applied
        if not self.active():
            return
        for i, m in enumerate(self._modalities):
            grads = [p.grad for p in self._params[m] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, (1 + applied[i]).to(device=grads[0].device, dtype=grads[0].dtype))

    # --- logging and state -----------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """Per-epoch means of ``kappa/<m>`` (the computed coefficient; applied after ``start``
        unless ``weights="released"``, which applies 0.5), ``c/<m>``
        (logit-magnitude share) and ``w/<m>`` (inverse-entropy share)."""
        out = trace_means(self._trace, self._modalities, ("kappa", "c", "w"))
        self._trace = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "trace": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self._trace = state.get("trace")
