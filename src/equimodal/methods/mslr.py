"""MSLR: modality-specific learning rates (Yao & Mihalcea, Findings of ACL 2022). peers.md B15."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._base import Method, unwrap
from ._registry import register_method

_STRATEGIES = ("keep", "dynamic")


def _positive_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def dynamic_factor(history: list[float]) -> float:
    """The dynamic rule's multiplier acc(now) / mean(acc over the window), from the window's
    accuracies (oldest first, the current one last). 1 when the window's mean is 0 (no signal)."""
    mean = sum(history) / len(history)
    return history[-1] / mean if mean > 0 else 1.0


@register_method("mslr")
class MSLR(Method):
    """MSLR (Yao & Mihalcea, ACL Findings 2022): per-modality learning rates, fixed or adapted to validation accuracy.

    Rule (our notation): every encoder m trains with lr_m = c_m * lr, where lr is the optimizer's
    (scheduled) learning rate of its parameter group and c_m a per-modality multiplier; the fusion
    head keeps lr. ``strategy="keep"``: c_m = ``lr_scale[m]`` for the whole run (the paper's "Keep":
    each encoder at the learning rate that was best for its unimodal model; set the run's lr to the
    head's rate and give the encoders' rates as ratios to it). ``strategy="dynamic"``: c_m starts
    at ``lr_scale[m]`` (1 when not given) and, after every ``every`` epochs, becomes
    c_m * acc_m(now) / mean(acc_m over the last ``window`` validation evaluations, now included),
    where acc_m is the validation accuracy of modality m's unimodal prediction, which the trainer
    passes to ``on_epoch_end`` as ``metrics["val_acc_by_modality"]`` (validation split, never
    test). A modality that is still improving gets a larger step, one that has stalled a smaller one.

    Paper: Yiqun Yao and Rada Mihalcea, "Modality-specific Learning Rates for Effective Multimodal
    Additive Late-fusion", Findings of ACL 2022, pp. 1824-1834. No official code found; the
    BalanceBenchmark toolkit (GeWu-Lab/BalanceBenchmark) has no port either. Defaults:
    strategy "dynamic", lr_scale None (all 1), window 5 (the history length of peers.md B15),
    every None (= window).

    Departures and choices: (1) the multiplier is applied around each optimizer step
    (``before_step`` sets lr_m = c_m * lr, ``after_step`` restores lr), never written into the
    optimizer for good: the scheduler keeps owning lr (a LambdaLR, our ``optim.schedule=none``,
    rewrites every group's lr from its base each epoch and would silently erase a stored
    multiplier), a checkpoint holds the unscaled lr, and calling ``setup`` again on resume cannot
    apply c_m twice; c_m and the accuracy window live in ``state_dict``. (2) The paper's third
    strategy, "Smooth", is not implemented: we could not read its exact rule (the paper text was
    not available to us), and we do not guess it; for the same reason the dynamic rule above is
    the one our spec summarises from a third-party reimplementation, not checked against the
    paper's equations. (3) The paper targets additive late fusion; the
    rule only touches learning rates, so it runs with any fusion here. (4) A window whose mean
    accuracy is 0 leaves c_m unchanged. Works with any number of modalities (each is adapted
    alone). Needs one optimizer parameter group per modality tagged ``modality`` (the trainer
    builds them with ``model.param_groups()``); a named error otherwise.

    Extra cost per step: none (no extra forward or backward pass); one Python loop over the
    parameter groups per step. Hooks: setup, before_step, after_step, on_epoch_end, log.
    """

    min_modalities = 1

    def __init__(self, strategy: str = "dynamic", lr_scale: dict | None = None, window: int = 5,
                 every: int | None = None) -> None:
        super().__init__()
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
        if lr_scale is not None:
            if not isinstance(lr_scale, dict):
                raise ValueError(f"lr_scale must be a mapping modality -> positive factor or null, got {lr_scale!r}")
            for m, c in lr_scale.items():
                ok = isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0
                if not isinstance(m, str) or not ok:
                    raise ValueError(f"lr_scale must map modality names to finite factors > 0; "
                                     f"got {m!r}: {c!r}")
        self.strategy = strategy
        self.lr_scale = {m: float(c) for m, c in (lr_scale or {}).items()}
        self.window = _positive_int("window", window)
        self.every = self.window if every is None else _positive_int("every", every)
        self.scale: dict[str, float] = {}  # current multiplier c_m per modality
        self.history: dict[str, list[float]] = {}  # last `window` validation accuracies per modality
        self._modalities: tuple[str, ...] = ()
        self._optimizer: torch.optim.Optimizer | None = None
        self._saved_lrs: list[tuple[dict, Any]] = []

    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        """Named error for an ``lr_scale`` key that is not a modality of the data."""
        if len(modalities) < self.min_modalities:
            raise ValueError(f"needs at least {self.min_modalities} modalities; got {list(modalities)}")
        unknown = sorted(set(self.lr_scale) - set(modalities))
        if unknown:
            raise ValueError(f"mslr: lr_scale names {unknown}, which are not modalities of the data "
                             f"{list(modalities)}")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        self._modalities = tuple(unwrap(model).modalities)
        self.check_modalities(self._modalities)
        for m in self._modalities:  # idempotent: a second setup (resume, later stage) keeps c_m
            self.scale.setdefault(m, self.lr_scale.get(m, 1.0))
            self.history.setdefault(m, [])
        self._optimizer = optimizer
        if optimizer is not None:
            tagged = {g.get("modality") for g in optimizer.param_groups}
            missing = [m for m in self._modalities if m not in tagged]
            if missing:
                raise ValueError(f"mslr needs one optimizer parameter group per modality tagged 'modality' "
                                 f"(build the optimizer from model.param_groups()); none for {missing}")

    def before_step(self, model: nn.Module) -> None:
        if self._optimizer is None:
            raise RuntimeError("mslr scales learning rates: pass the optimizer to method.setup(model, optimizer)")
        self.after_step(model)  # a before_step without its after_step must not compound the scale
        for group in self._optimizer.param_groups:
            c = self.scale.get(group.get("modality"))
            if c is not None and c != 1.0:
                self._saved_lrs.append((group, group["lr"]))
                group["lr"] = group["lr"] * c

    def after_step(self, model: nn.Module) -> None:
        for group, lr in self._saved_lrs:
            group["lr"] = lr
        self._saved_lrs = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.strategy != "dynamic":
            return
        acc = metrics.get("val_acc_by_modality")
        if acc is None:
            raise KeyError("mslr (dynamic) needs metrics['val_acc_by_modality'] (validation accuracy of each "
                           "modality's unimodal prediction) in on_epoch_end")
        names = self._modalities or tuple(acc)
        missing = [m for m in names if m not in acc]
        if missing:
            raise KeyError(f"mslr: metrics['val_acc_by_modality'] lacks {missing}; got {sorted(acc)}")
        for m in names:
            window = self.history.setdefault(m, [])
            window.append(float(acc[m]))
            del window[:-self.window]
        if (int(epoch) + 1) % self.every == 0:
            for m in names:
                self.scale[m] = self.scale.get(m, self.lr_scale.get(m, 1.0)) * dynamic_factor(self.history[m])

    def log(self) -> dict[str, float]:
        return {f"lr_scale/{m}": c for m, c in self.scale.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "scale": dict(self.scale),
                "history": {m: list(h) for m, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.scale = {m: float(c) for m, c in state.get("scale", {}).items()}
        self.history = {m: [float(a) for a in h] for m, h in state.get("history", {}).items()}
