"""Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020). peers.md B1."""
from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum, average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import linear_heads
from ._registry import register_method

_MODES = ("online", "offline", "online-copies")
_FORMULAS = ("delta", "multibench")
FUSED = "fused"


def blend_weights(before: torch.Tensor, after: torch.Tensor, formula: str = "delta",
                  min_overfit: float = 1e-2) -> tuple[torch.Tensor, bool]:
    """G-Blending weights of K heads from their losses at the start (N) and end (N+n) of a super-epoch.

    ``before`` and ``after`` are K x 2 tensors of [L^T, L^V] (mean training loss, mean held-out
    loss) per head. O = L^V - L^T (the overfitting gap).

    ``delta`` (the paper): gain dG_k = L^V_N - L^V_{N+n}, overfitting dO_k = O_{N+n} - O_N.
    ``multibench`` (MultiBench's default, ``delta = False``): gain L^V_{N+n}, overfitting O_{N+n}.

    w_k = |gain_k| / max(dO_k, min_overfit)^2, normalised to sum 1. The floor is our rule for a
    degenerate dO: a head whose overfitting did not grow (dO <= 0) or grew by less than the floor
    gets the largest trust per unit of gain; without it the weight is unbounded (dO -> 0) or a
    shrinking gap (dO < 0) would be punished as much as a growing one by the square. MultiBench
    sets O to 1e-4 where O < 0. Returns (weights, ok); ok is False when no head has a positive,
    finite raw weight (all gains zero, or a non-finite loss): then the weights are uniform.
    """
    if formula not in _FORMULAS:
        raise ValueError(f"unknown formula {formula!r}; choose one of {list(_FORMULAS)}")
    before, after = before.double(), after.double()
    gap_before = before[:, 1] - before[:, 0]
    gap_after = after[:, 1] - after[:, 0]
    if formula == "delta":
        gain, overfit = before[:, 1] - after[:, 1], gap_after - gap_before
    else:
        gain, overfit = after[:, 1], gap_after
    raw = gain.abs() / overfit.clamp_min(min_overfit).pow(2)
    total = raw.sum()
    if not bool(torch.isfinite(total)) or total <= 0:
        return torch.full((raw.numel(),), 1.0 / raw.numel()), False
    return (raw / total).float(), True


@register_method("gblend")
class GradientBlending(Method):
    """G-Blending (Wang et al., CVPR 2020): blend unimodal-head and fused CE by held-out generalisation/overfitting.

    Heads: one linear head per modality on its own encoder's features (owned by the method) plus
    the model's fused logits: K = M + 1 losses, L = sum_k w_k CE(z_k, y). The weights
    w_k = |dG_k| / dO_k^2 (normalised to sum 1; ``blend_weights``) come from each head's mean
    training loss L^T (on ``train_fraction`` of the training data) and held-out loss L^V measured
    at the start (N) and end (N+n) of a super-epoch of n = ``super_epoch`` epochs:
    dG = L^V_N - L^V_{N+n}, O = L^V - L^T, dO = O_{N+n} - O_N. L^V is measured on a stratified
    part of the *training split* that the trainer withholds from training (``holdout_fraction``,
    ``MethodData.holdout``), never on validation or test data.

    Modes. ``online`` (default, ours, cheapest): the losses are those of the actual training, at
    the start and end of each super-epoch; the weights of super-epoch j+1 come from super-epoch j.
    ``offline``: once, before the first epoch, copies of the model train each path alone for
    ``super_epoch`` epochs (path m: encoder m and its head on CE of that head; the fused path: the
    whole model on the fused CE), each from the current weights with a fresh optimizer of the
    trainer's type and current hyper-parameters; the weights are then fixed for the whole run
    (BalanceMM ``method='offline'``). ``online-copies``: the same copy-based estimate at the start
    of every super-epoch (MultiBench ``gradient_blend.train``, the paper's online G-Blend).
    Until the first estimate the weights are uniform (1/K): for the first super-epoch in
    ``online`` mode, and never in the copy modes (they estimate before the first step).

    Options: mode ("online"), super_epoch (10, BalanceMM; MultiBench 20), holdout_fraction (0.08,
    MultiBench's v_rate), formula ("delta": the paper's | "multibench": |L^V_{N+n}| / O_{N+n}^2,
    MultiBench's default), min_overfit (0.01: floor of dO, see ``blend_weights``; a held-out set
    of a few hundred samples cannot resolve loss changes much below that), train_fraction (1.0),
    batch_size (64, for the copies' training), eval_batch_size (256).

    Departures. MultiBench and BalanceMM take the held-out part differently: MultiBench the first
    8% of the training set (unshuffled, not stratified), BalanceMM the test set (a leak we do not
    copy); BalanceMM's unimodal paths zero the other modalities' inputs in the full model instead of
    separate heads, takes "before" after the first epoch of the super-epoch, and sums batch losses.
    MultiBench also re-trains the fusion head for 25 epochs on frozen features after each
    super-epoch; that is not part of the rule and is left out. |dG| is used as in MultiBench, so a
    head whose held-out loss rose still gets weight. Losses are measured with the model in eval
    mode (BatchNorm statistics are not touched). Under torch.distributed the loss sums and counts
    are all-reduced before the weights are formed (every rank gets the same weights); in the copy
    modes each rank trains its copies on its own shard with gradients averaged across ranks.
    Without attached data (a plain loop that never calls ``attach_data``) the weights stay uniform,
    with a warning.

    Extra cost: per step none beyond M small linear heads. Per super-epoch in ``online``: one
    no-grad pass over ``train_fraction`` of the training data and one over the held-out part. Per
    estimate in the copy modes: M + 1 trainings of ``super_epoch`` epochs (each path alone) plus
    two no-grad passes per path. Prediction uses the fused logits only.
    Hooks: setup, attach_data (base), on_epoch_start, loss, before_step, log, state_dict.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"super_epoch": (10, 2, 4, 6)}

    def __init__(self, mode: str = "online", super_epoch: int = 10, holdout_fraction: float = 0.08,
                 formula: str = "delta", min_overfit: float = 1e-2, train_fraction: float = 1.0,
                 batch_size: int = 64, eval_batch_size: int = 256) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if formula not in _FORMULAS:
            raise ValueError(f"formula must be one of {list(_FORMULAS)}, got {formula!r}")
        for key, value in (("super_epoch", super_epoch), ("batch_size", batch_size),
                           ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key, value, top in (("holdout_fraction", holdout_fraction, 1.0), ("train_fraction", train_fraction, None)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 < value <= 1 or value == top:
                allowed = "(0, 1)" if top is not None else "(0, 1]"
                raise ValueError(f"{key} must be in {allowed}, got {value!r}")
        if not isinstance(min_overfit, (int, float)) or isinstance(min_overfit, bool) or not min_overfit > 0:
            raise ValueError(f"min_overfit must be a number > 0, got {min_overfit!r}")
        self.mode, self.super_epoch, self.formula = mode, int(super_epoch), formula
        self.holdout_fraction = float(holdout_fraction)  # read by the trainer: it withholds this part of train
        self.min_overfit, self.train_fraction = float(min_overfit), float(train_fraction)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.heads: nn.ModuleDict | None = None
        self.names: tuple[str, ...] = ()
        self.weights: torch.Tensor | None = None  # K, the weights in use
        self.estimates = 0  # how many times the weights were estimated
        self.last_losses: torch.Tensor | None = None  # K x 2 [L^T, L^V] at the start of the super-epoch (online)
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._warned = False

    # --- setup ---------------------------------------------------------------------------
    def plan_epochs(self, epochs: int) -> list[str]:
        # the papers give super_epoch as a fixed count (BalanceMM 10, MultiBench 20), so it stays one
        if self.mode == "online" and self.super_epoch >= epochs:
            return [f"gblend: super_epoch={self.super_epoch} with {epochs} epochs: mode online never completes "
                    "a super-epoch, so its weights stay uniform (plain joint plus unimodal losses); lower "
                    "method.super_epoch or use mode offline"]
        return []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = unwrap(model)
        if FUSED in inner.modalities:
            raise ValueError(f"{self.name}: a modality is named {FUSED!r}, the name of the fused head's loss")
        self.names = (*inner.modalities, FUSED)
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 31)
        if self.weights is None:
            self.weights = torch.full((len(self.names),), 1.0 / len(self.names))
        self._optimizer = optimizer
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters()) if self.heads is not None else []

    # --- the loss ------------------------------------------------------------------------
    def head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """z_k for every head: the method's linear head on each modality's features, and the fused logits."""
        # float32: the trainer calls loss() outside autocast, and bf16 features would not match the heads
        logits = {m: self.heads[m](output.features[m].float()) for m in self.names[:-1]}
        logits[FUSED] = output.logits
        return logits

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.weights.tolist()
        terms = {f"ce/{k}": w[i] * F.cross_entropy(z.float(), targets)
                 for i, (k, z) in enumerate(self.head_logits(output).items())}
        return {**terms, **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the method's own heads live outside the DDP wrapper

    # --- estimation ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.data is None:
            if not self._warned:
                warnings.warn(f"{self.name}: no data attached (method.attach_data(MethodData(...)) with a "
                              "holdout); the weights stay uniform")
                self._warned = True
            return
        if self.data.holdout is None or len(self.data.holdout) == 0:
            raise RuntimeError(f"{self.name} needs a held-out part of the training data: MethodData.holdout is "
                               f"empty (the trainer withholds it when holdout_fraction > 0); never validation or test")
        if self.mode == "offline":
            if self.estimates == 0:
                self._set_weights(*self.estimate_with_copies(epoch))
            return
        if epoch % self.super_epoch:
            return
        if self.mode == "online-copies":
            self._set_weights(*self.estimate_with_copies(epoch))
            return
        now = self.measure(self._live_logits, self.names, self._model)
        if self.last_losses is not None:
            self._set_weights(self.last_losses, now)
        self.last_losses = now

    def _set_weights(self, before: torch.Tensor, after: torch.Tensor) -> None:
        self.weights, _ = blend_weights(before, after, self.formula, self.min_overfit)
        self.estimates += 1

    def _live_logits(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.head_logits(self._model(inputs))

    def measure(self, logits_fn: Callable[[dict], dict[str, torch.Tensor]], names: tuple[str, ...],
                *modules: nn.Module) -> torch.Tensor:
        """len(names) x 2 [mean CE on (a part of) the training data, mean CE on the held-out data] of
        the logits ``logits_fn`` returns, with ``modules`` in eval mode; sums and counts all-reduced."""
        data = self.require_data()
        modes = [(m, m.training) for mod in (*modules, self.heads) for m in mod.modules()]
        for mod in (*modules, self.heads):
            mod.eval()
        limit = math.ceil(self.train_fraction * len(data.train)) if self.train_fraction < 1 else None
        parts = []
        try:
            with torch.no_grad():
                for dataset, lim in ((data.train, limit), (data.holdout, None)):
                    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=data.device)
                    # a fixed seed: the same training subset at both ends of a super-epoch
                    for inputs, y in data.batches(dataset, self.eval_batch_size, seed=self.seed * 1_000_003 + 17,
                                                  limit=lim):
                        z = logits_fn(inputs)
                        losses = [F.cross_entropy(z[k].float(), y, reduction="sum") for k in names]
                        sums += torch.stack([*losses, losses[0].new_tensor(float(y.numel()))]).double()
                    parts.append(sums)
        finally:
            for m, training in modes:
                m.train(training)
        stats = all_reduce_sum(torch.cat(parts)).cpu()  # one collective: [train sums, n, holdout sums, n]
        k = len(names)
        train, held = stats[:k] / stats[k].clamp_min(1), stats[k + 1:2 * k + 1] / stats[2 * k + 1].clamp_min(1)
        return torch.stack([train, held], dim=1).float()

    def estimate_with_copies(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(before, after): K x 2 losses of each path trained alone, from a copy of the current model,
        for ``super_epoch`` epochs on the training data (MultiBench ``gb_estimate``)."""
        if self._optimizer is None:
            raise RuntimeError(f"{self.name}: mode={self.mode!r} trains copies with the trainer's optimizer "
                               "type and hyper-parameters; pass the optimizer to setup()")
        before, after = [], []
        with torch.random.fork_rng(devices=[]):  # the copies never move the run's random stream
            for i, k in enumerate(self.names):
                torch.manual_seed(self.seed * 1_000_003 + epoch * 101 + i)
                model, heads = copy.deepcopy(self._model), copy.deepcopy(self.heads)
                if k == FUSED:
                    fn = lambda x, model=model: {FUSED: model(x).logits}  # noqa: E731
                    params = list(model.parameters())
                else:
                    enc, head = model.encoder(k), heads[k]
                    fn = lambda x, enc=enc, head=head, k=k: {k: head(enc(x[k]))}  # noqa: E731
                    params = [*enc.parameters(), *head.parameters()]
                before.append(self.measure(fn, (k,), model, heads)[0])
                self._train_copy(fn, k, [p for p in params if p.requires_grad], model, heads, epoch, i)
                after.append(self.measure(fn, (k,), model, heads)[0])
        return torch.stack(before), torch.stack(after)

    def _train_copy(self, fn, name: str, params: list[nn.Parameter], model: nn.Module, heads: nn.Module,
                    epoch: int, index: int) -> None:
        group = self._optimizer.param_groups[0]
        accepted = inspect.signature(type(self._optimizer).__init__).parameters
        # the current lr and the other hyper-parameters the optimizer's constructor takes
        hyper = {key: group[key] for key in self._optimizer.defaults if key in group and key in accepted}
        optimizer = type(self._optimizer)(params, **hyper)
        model.train()
        heads.train()
        data = self.require_data()
        for e in range(self.super_epoch):
            seed = (self.seed * 1_000_003 + epoch) * 1_009 + index * 97 + e
            for inputs, y in data.batches(data.train, self.batch_size, seed=seed):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(fn(inputs)[name].float(), y).backward()
                average_gradients(params)
                optimizer.step()

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        if self.weights is None:
            return {}
        out = {f"w/{k}": float(w) for k, w in zip(self.names, self.weights.tolist())}
        out["gblend/estimates"] = self.estimates
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "weights": self.weights, "estimates": self.estimates,
                "last_losses": self.last_losses, "heads": self.heads.state_dict() if self.heads is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if state.get("weights") is not None:
            self.weights = state["weights"].clone()
        self.estimates = int(state.get("estimates", 0))
        self.last_losses = state.get("last_losses")
        if state.get("heads") is not None and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
