"""OGM and OGM-GE: on-the-fly gradient modulation (with generalisation enhancement); docs/methods.md, "ogm, ogm-ge"."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .._dist import all_reduce_sum
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._registry import register_method
from ._scores import RATIO_RULES, discrepancy_ratios, ogm_coefficients, trace_means, true_class_scores

_PARAMS = ("conv", "all")
_LEVELS = ("gradient", "update")
_FORMS = ("paper", "continuous")


def modulated_parameters(encoder: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters of one encoder that OGM modulates.

    ``conv``: the weights of convolution modules only (the official code's rule, which keeps 4-D
    tensors; we select by module type, so Conv1d/Conv3d count too and nothing depends on names).
    ``all``: every parameter of the encoder.
    """
    if which == "all":
        return [p for p in encoder.parameters() if p.requires_grad]
    if which == "conv":
        return [m.weight for m in encoder.modules()
                if isinstance(m, nn.modules.conv._ConvNd) and m.weight.requires_grad]
    raise ValueError(f"unknown params selection {which!r}; choose one of {list(_PARAMS)}")


@register_method("ogm-ge")
class OGMGE(Method):
    """OGM-GE (Peng et al., CVPR 2022): damp the dominant modality's encoder gradients, add Gaussian noise.

    Each step the scores s_u (summed true-class softmax of the per-modality logits) give ratios
    rho_u = s_u / mean_{v != u} s_v and coefficients k_u = 1 - tanh(alpha * rho_u) where rho_u > 1.
    In ``before_step``, for epochs in [modulation_starts, modulation_ends], each modulated gradient
    g of encoder u becomes k_u * g + N(0, std(g)^2) (the noise only with ``ge=True``).

    Options: alpha (0.8, the paper's CREMA-D value; 0.1 for VGGSound), params ("conv": conv weights
    only, the paper's default | "all"), modulation_starts/ends (0, 50, both inclusive), coefficient
    ("paper" | "continuous"), level ("gradient", the paper's | "update": scale the modality's step
    instead, ours, for Adam/AdamW where a scaled gradient barely changes the step), ge, ratio
    (N-modality rule, peers.md B0: "mean" = s_u over the mean of the others, ours | "min" = s_u over
    the smallest score | "pairwise" = mean of s_u / s_v over v != u; all equal the paper's for two).

    Differences from the official code (GeWu-Lab/OGM-GE_CVPR2022): any number of modalities (the
    N-modality ratio, which reduces to the paper's for two); parameters chosen by module type, not
    by a DataParallel name prefix (which made the official code modulate nothing unwrapped); the
    ratio and noise std stay on the device (no ``.item()`` per tensor); the noise std has no
    +1e-8; at an exact tie neither modality is damped; scores are all-reduced across ranks before
    rho is formed, and the noise comes from a generator seeded by (seed, step), so every rank and a
    resumed run draw the same noise. Hooks: setup, loss, before_step, after_step, log.
    """

    needs_unimodal_logits = True
    modifies_gradients = True
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (0.8, 0.1, 0.3, 0.5)}

    def __init__(self, alpha: float = 0.8, params: str = "conv", modulation_starts: int = 0,
                 modulation_ends: int = 50, coefficient: str = "paper", level: str = "gradient",
                 ge: bool = True, ratio: str = "mean") -> None:
        super().__init__()
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        for key, value, allowed in (("params", params, _PARAMS), ("coefficient", coefficient, _FORMS),
                                    ("level", level, _LEVELS), ("ratio", ratio, RATIO_RULES)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if int(modulation_ends) < int(modulation_starts):
            raise ValueError(f"modulation_ends ({modulation_ends}) is before modulation_starts ({modulation_starts})")
        self.alpha = float(alpha)
        self.params = params
        self.modulation_starts = int(modulation_starts)
        self.modulation_ends = int(modulation_ends)
        self.coefficient = coefficient
        self.ratio = ratio
        self.level = level
        self.ge = bool(ge)
        self.step = 0
        self._modalities: tuple[str, ...] = ()
        self._params: dict[str, list[nn.Parameter]] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._saved_lrs: list[tuple[dict, float, float]] = []
        self._warned_after_step = False
        self._stats: torch.Tensor | None = None  # [s_1..s_N, count] since the last step
        self._trace: torch.Tensor | None = None  # [sum rho_1..N, sum k_1..N, steps] since last log()
        self.last_ratios: torch.Tensor | None = None
        self.last_coefficients: torch.Tensor | None = None

    # --- setup ---------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._modalities = tuple(inner.modalities)
        self._params = {m: modulated_parameters(inner.encoder(m), self.params) for m in self._modalities}
        empty = [m for m, ps in self._params.items() if not ps]
        if empty:
            raise ValueError(f"{self.name}: params={self.params!r} selects no parameter in the encoder(s) "
                             f"of {empty} (no convolution layers?); use params='all'")
        self._optimizer = optimizer
        if self.level == "update":
            if optimizer is None:
                raise ValueError(f"{self.name}: level='update' needs the optimizer in setup()")
            tagged = {g.get("modality") for g in optimizer.param_groups}
            missing = [m for m in self._modalities if m not in tagged]
            if missing:
                raise ValueError(f"{self.name}: level='update' needs one optimizer parameter group per "
                                 f"modality tagged 'modality' (build it from model.param_groups()); "
                                 f"none for {missing}")

    # --- per micro-batch -----------------------------------------------------------------
    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().loss(output, targets)
        if output.logits.requires_grad:  # training step: record this micro-batch's scores
            scores = true_class_scores(output.unimodal_logits, targets, self._modalities or None)
            stats = torch.cat([scores, scores.new_tensor([targets.numel()])])
            self._stats = stats if self._stats is None else self._stats + stats
        return terms

    def in_window(self, epoch: int | None = None) -> bool:
        e = self.epoch if epoch is None else epoch
        return self.modulation_starts <= e <= self.modulation_ends

    # --- per optimizer step --------------------------------------------------------------
    def before_step(self, model: nn.Module) -> None:
        if not self._modalities:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) before training "
                               "(it caches the encoders' parameters the method modulates)")
        if self._saved_lrs:  # after_step was not called after the last step: restore the lrs now
            self._restore_lrs(by_ratio=True)
        if self._stats is None:
            raise RuntimeError(f"{self.name}.before_step() called with no loss() since the last step; "
                               "call method.loss(output, targets) on each micro-batch first")
        stats = all_reduce_sum(self._stats)
        self._stats = None
        n = len(self._modalities)
        rho = discrepancy_ratios(stats[:n], self.ratio)
        k = self.coefficients(rho)
        self.last_ratios, self.last_coefficients = rho, k
        row = torch.cat([rho, k, rho.new_ones(1)])
        self._trace = row if self._trace is None else self._trace + row
        if self.in_window():
            if self.level == "update":
                self._scale_updates(k)
            self._modulate(k)
        self.step += 1

    def coefficients(self, ratios: torch.Tensor) -> torch.Tensor:
        """k_u from rho_u (docs/methods.md, "ogm, ogm-ge": k = 1 - tanh(alpha rho) where rho > 1); subclasses change the rule here."""
        return ogm_coefficients(ratios, self.alpha, self.coefficient)

    def noise_scales(self, k: torch.Tensor) -> torch.Tensor | None:
        """Per-modality multiplier of the N(0, std(g)^2) noise, or None for no noise.
        GE (docs/methods.md, "ogm, ogm-ge"): 1 for every modality, also where k_u = 1."""
        return torch.ones_like(k) if self.ge else None

    def _modulate(self, k: torch.Tensor) -> None:
        """Gradient level: g <- k_u * g + c_u * N(0, std(g)^2), std of the unmodulated g, c_u from
        ``noise_scales``. Update level: only the noise here (the step is scaled through the lr)."""
        scales = self.noise_scales(k)
        generators: dict[torch.device, torch.Generator] = {}
        for i, m in enumerate(self._modalities):
            grads = [p.grad for p in self._params[m] if p.grad is not None]
            if not grads:
                continue
            stds = [g.std() if g.numel() > 1 else g.new_zeros(()) for g in grads] if scales is not None else []
            if self.level == "gradient":
                torch._foreach_mul_(grads, k[i].to(device=grads[0].device, dtype=grads[0].dtype))
            for g, std in zip(grads, stds):
                gen = generators.get(g.device)
                if gen is None:  # one generator per device, seeded by (run seed, step)
                    gen = generators[g.device] = torch.Generator(device=g.device)
                    gen.manual_seed(self.seed * 1_000_003 + self.step)
                g.add_(torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype) * (std * scales[i]))

    def _scale_updates(self, k: torch.Tensor) -> None:
        ks = k.tolist()  # one host sync per step: the learning rate is a Python number
        by_modality = dict(zip(self._modalities, ks))
        for group in self._optimizer.param_groups:
            m = group.get("modality")
            if m in by_modality:
                self._saved_lrs.append((group, group["lr"], by_modality[m]))
                group["lr"] = group["lr"] * by_modality[m]

    def after_step(self, model: nn.Module) -> None:
        self._restore_lrs(by_ratio=False)

    def _restore_lrs(self, by_ratio: bool) -> None:
        """Undo ``level="update"``'s scaling. Normally in ``after_step`` (exact: the saved value);
        a loop that never calls ``after_step`` gets it at the next ``before_step`` instead, by
        dividing by the applied factor (so a scheduler step in between is kept), with a warning."""
        if by_ratio and not self._warned_after_step:
            warnings.warn(f"{self.name}: level='update' scales learning rates for one step and restores them in "
                          "after_step(); call method.after_step(model) right after optimizer.step() "
                          "(restored at the next before_step instead)", RuntimeWarning, stacklevel=3)
            self._warned_after_step = True
        for group, lr, factor in self._saved_lrs:
            group["lr"] = group["lr"] / factor if by_ratio and factor > 0 else lr
        self._saved_lrs = []

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        out = trace_means(self._trace, self._modalities, ("rho", "k"))
        self._trace = None
        return out

    def step_log(self) -> dict[str, torch.Tensor]:
        """This step's rho and k per modality (on the device; no host sync here)."""
        if self.last_coefficients is None:
            return {}
        return {**{f"rho/{m}": self.last_ratios[i] for i, m in enumerate(self._modalities)},
                **{f"k/{m}": self.last_coefficients[i] for i, m in enumerate(self._modalities)}}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "trace": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self._trace = state.get("trace")


@register_method("ogm")
class OGM(OGMGE):
    """OGM (Peng et al., CVPR 2022) without the Gaussian noise: damp the dominant modality's encoder gradients.

    Same options as ``ogm-ge`` except ``ge`` (always off). See ``OGMGE`` for the formulas.
    """

    def __init__(self, alpha: float = 0.8, params: str = "conv", modulation_starts: int = 0,
                 modulation_ends: int = 50, coefficient: str = "paper", level: str = "gradient",
                 ratio: str = "mean") -> None:
        super().__init__(alpha=alpha, params=params, modulation_starts=modulation_starts,
                         modulation_ends=modulation_ends, coefficient=coefficient, level=level, ge=False,
                         ratio=ratio)
