"""The method contract: a small object with a fixed set of optional hooks, each a no-op by default.

The loop that calls them (our ``Trainer`` or a user's own) looks like this; each hook's docstring
says exactly where it runs and what state the gradients are in. Every hook of a stage is called on
that stage's *runner* (``stage.method or method``): a multi-stage method hands later stages to
other methods (``ssl`` then ``joint``), and calling ``method.loss`` there would keep training the
first stage's objective::

    for stage in method.stages():            # most methods: one supervised stage
        runner = stage.method or method
        notes = runner.plan_epochs(stage.epochs or epochs)   # schedules given as a share of the budget
        optimizer = make_optimizer(model)    # a fresh optimizer per stage
        runner.on_stage_start(stage.name, resumed=False)
        runner.attach_data(data)             # optional: only methods that read data use it
        runner.setup(model, optimizer, seed=seed)
        for epoch in range(stage.epochs or epochs):   # counted from 0 within the stage
            model.train()
            runner.on_epoch_start(epoch)
            train_set = runner.training_set(epoch, data.train)   # default: data.train unchanged
            for inputs, targets in loader(train_set):
                for sub in range(runner.substeps()):           # default: 1 optimizer step per batch
                    runner.on_substep(sub)                     # (alternating methods: one per modality)
                    out = runner.forward(model, inputs)       # default: model(inputs)
                    terms = runner.loss(out, targets)         # named loss terms
                    sum(terms.values()).backward()
                    runner.before_step(model)                 # gradient modulation happens here
                    optimizer.step()
                    runner.after_step(model)                  # undo per-step optimizer changes
                    optimizer.zero_grad()
            runner.on_epoch_end(epoch, metrics)  # metrics: {"val_acc_by_modality": ..., "final": last epoch of the run}
    predictions = runner.predict(model(inputs)).argmax(1)   # the last stage's runner

``equimodal.methods.run_stages`` (``_loop.py``) is this loop, runnable as written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import iterate_batches
from ..models.multimodal import ModelOutput


@dataclass
class Stage:
    """One phase of training. ``epochs=None`` means the run's configured epochs.

    ``method=None`` means the method that declared the stage runs it; a multi-phase method (e.g.
    pre-training, then supervised training with another method) returns stages with their own methods.
    """

    name: str = "supervised"
    epochs: int | None = None
    method: "Method | None" = None


@dataclass
class MethodData:
    """The data a method may read outside the training steps (``Method.attach_data``).

    ``train``: the part of the training split the model is trained on. ``holdout``: a stratified
    part of the *training* split withheld from training for the method's own estimates (only when
    the method sets ``holdout_fraction`` > 0; G-Blending). ``val``: the validation split (carved
    from training data; model selection and methods that the spec allows to read validation).
    The test split is never given to a method. ``batches`` iterates a dataset in a fixed order with
    tensors on ``device``.
    """

    train: Any
    val: Any = None
    holdout: Any = None
    device: torch.device | str = "cpu"

    def batches(self, dataset: Any, batch_size: int = 256, seed: int | None = None,
                limit: int | None = None) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """(inputs, labels) batches on ``device``; shuffled by ``seed`` when given; at most ``limit``
        samples (the first ones of that order)."""
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        for inputs, labels in iterate_batches(dataset, batch_size, generator, limit=limit):
            yield ({m: x.to(self.device, non_blocking=True) for m, x in inputs.items()},
                   labels.to(self.device, non_blocking=True))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def fusing_model(model: nn.Module, method: str, why: str) -> nn.Module:
    """``unwrap(model)``, refused with a named error unless it offers ``fuse(features)``, which
    methods that drop or zero modalities' features need to re-run the fusion (``why`` says what
    the method does with it)."""
    inner = unwrap(model)
    if not hasattr(inner, "fuse"):
        raise TypeError(f"method {method!r} {why}: the model needs 'fuse(features)' "
                        f"(see equimodal.models.MultimodalModel); got {type(inner).__name__}")
    return inner


class Method:
    """Base class: plain joint training (cross-entropy on the fused logits) with no-op hooks.

    Class-level capability flags are checked in ``setup``; a missing capability is a named error.
    """

    #: needs per-modality logits from the model output
    needs_unimodal_logits: bool = False
    #: changes gradients in ``before_step``
    modifies_gradients: bool = False
    #: handles ``torch.distributed`` (statistics all-reduced before decisions)
    supports_distributed: bool = True
    #: smallest number of modalities the method works with
    min_modalities: int = 1
    #: fraction of the training split the trainer withholds for this method's own estimates
    #: (given to ``attach_data`` as ``MethodData.holdout``); 0 for most methods
    holdout_fraction: float = 0.0
    #: what ``bench --tune`` searches (with the learning rate) for this method's main options:
    #: option name -> a tuple of values (a choice; first the default, at most 4 combinations for
    #: ``--tune-grid``) or a ``Choice``/``FloatRange``/``IntRange`` (``methods/_space.py``);
    #: empty: the learning rate alone, like the baseline
    search_space: dict[str, tuple] = {}
    #: what the method's evaluation predicts with (``predict`` of its last stage's runner), shown in
    #: every results table so rows are compared knowingly: ``"fused"`` (the model's fusion head, as
    #: joint), ``"own heads"`` (the method's own per-modality heads, combined) or ``"mixed"`` (both)
    predicts: str = "fused"
    #: registry name, filled in by ``register_method``
    name: str = "method"

    def __init__(self) -> None:
        self.epoch = 0
        self.seed = 0
        self.data: MethodData | None = None

    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        """Before anything is built (config validation): refuse modality lists the method cannot
        handle, with a named error. Default: at least ``min_modalities``; methods with options
        that name a modality (a teacher) check those too."""
        if len(modalities) < self.min_modalities:
            raise ValueError(f"needs at least {self.min_modalities} modalities; data.modalities is {list(modalities)}")

    # --- hooks -----------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        """Before training (and again at the start of each later stage the method runs, with that
        stage's fresh optimizer, so it must be idempotent): check the model offers what the method
        needs, cache what it uses, build owned heads, add own parameters to the optimizer.

        ``model`` may be wrapped (DDP); methods read only the multimodal contract of the inner model.
        """
        self.seed = int(seed)
        inner = unwrap(model)
        for attr in ("modalities", "encoder", "encoder_parameters"):
            if not hasattr(inner, attr):
                raise TypeError(f"method {self.name!r} needs a multimodal model with '{attr}' "
                                f"(see equimodal.models.MultimodalModel); got {type(inner).__name__}")
        if len(inner.modalities) < self.min_modalities:
            raise ValueError(f"method {self.name!r} needs at least {self.min_modalities} modalities; "
                             f"the model has {list(inner.modalities)}")

    def plan_epochs(self, epochs: int) -> list[str]:
        """Before the first ``setup``, once per stage this method runs: that stage's number of
        epochs. A method whose schedule the paper gives as a share of its budget (a warm-up of 10
        of 70 epochs) resolves the share here (``_budget.share_of_budget``). Returns one line per
        setting that cannot act within ``epochs`` (the loop prints them at the start, naming the
        option). Default: nothing to resolve."""
        return []

    def attach_data(self, data: MethodData) -> None:
        """Before ``setup`` of each stage the method runs: the data it may read outside the training
        steps (prototypes, held-out estimates, per-sample valuations). Default: keep a reference."""
        self.data = data

    def require_data(self) -> MethodData:
        """``self.data``, or a named error saying how to provide it (for methods that need data)."""
        if self.data is None:
            raise RuntimeError(f"method {self.name!r} reads training data outside the steps: call "
                               "method.attach_data(MethodData(train=..., val=..., device=...)) before setup()")
        return self.data

    def training_set(self, epoch: int, dataset: Any) -> Any:
        """The dataset to train on this epoch (after ``on_epoch_start``). Default: ``dataset``.

        A method that resamples (adds copies of samples, drops a modality in copies) returns a new
        map-style dataset built from it; the loop shuffles and batches it as usual."""
        return dataset

    def substeps(self) -> int:
        """Optimizer steps per batch (default 1). An alternating method (one step per modality on
        the same batch) returns more; the loop then calls ``on_substep(i)`` before each step's
        forward, and gradient accumulation must be off."""
        return 1

    def on_substep(self, index: int) -> None:
        """Before the forward of sub-step ``index`` of a batch (only when ``substeps() > 1``)."""

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """The training forward pass of one micro-batch. Default: ``model(inputs)``.

        A method that needs the inputs themselves (zero-padded passes, input-level dropout) overrides
        it; evaluation always calls ``model(inputs)`` and ``predict``."""
        return model(inputs)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms for one micro-batch (the caller sums them and calls ``backward``).

        Runs in training mode, before ``backward``; a method records this micro-batch's
        statistics here. Default: cross-entropy on the fused logits plus the estimator's own terms.
        """
        return {"ce": F.cross_entropy(output.logits.float(), targets), **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        """Once per optimizer step: after ``backward`` (and gradient accumulation, the data-parallel
        gradient average and AMP unscaling), before clipping and ``optimizer.step()``.
        ``.grad`` holds the full step's gradient. All gradient modulation happens here."""

    def after_step(self, model: nn.Module) -> None:
        """Right after ``optimizer.step()``, before ``zero_grad``. Undo per-step optimizer changes."""

    def on_stage_start(self, stage: str, resumed: bool = False) -> None:
        """At the start of each stage this method runs, before ``setup`` for that stage.
        ``resumed`` is True when a run restarts inside the stage (do not re-initialise weights then)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of ``epoch`` (counted from 0 within the stage), after the trainer
        put the model in training mode (a method may switch frozen parts back to eval here)."""
        self.epoch = int(epoch)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After the last step of ``epoch`` and its validation; ``metrics`` holds that epoch's figures
        and ``metrics["final"]``, True after the run's last validation (last epoch of the last
        stage). Nothing a method changes then is ever validated, yet the test split would be scored
        with it: a method must not change its predictor or the model when ``final`` is True."""

    def predict(self, output: ModelOutput) -> torch.Tensor:
        """Logits used for evaluation. Default: the fused logits."""
        return output.logits

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """Per-modality logits used to report per-modality accuracy. Default: the model's estimator."""
        return output.unimodal_logits

    def stages(self) -> list[Stage]:
        """Training phases, run in order. Default: one supervised stage run by this method."""
        return [Stage()]

    def parameters(self) -> list[nn.Parameter]:
        """The method's own learnable values (auxiliary heads, log-variances), built in ``setup``.

        They live outside the model (and outside a DDP wrapper): ``attach_parameters`` adds them to
        the optimizer, and a distributed user must all-reduce their gradients (``before_step`` does
        it for the methods here)."""
        return []

    def parameter_groups(self) -> list[dict[str, Any]]:
        """How ``attach_parameters`` groups the method's own parameters in the optimizer: dicts of
        ``params`` plus optimizer options that differ from the model's (e.g. no momentum for
        log-variances). Default: one group of ``parameters()`` with the model's options."""
        params = self.parameters()
        return [{"params": params}] if params else []

    def attach_parameters(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Move the method's own parameters to the model's device and add them to ``optimizer``
        (groups from ``parameter_groups``; call at the end of ``setup``)."""
        params = self.parameters()
        if not params:
            return
        device = next(unwrap(model).parameters()).device
        for p in params:
            p.data = p.data.to(device)
        if optimizer is not None:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            for group in self.parameter_groups():
                fresh = [p for p in group["params"] if id(p) not in known]
                if fresh:
                    optimizer.add_param_group({**group, "params": fresh, "modality": None})

    def log(self) -> dict[str, float]:
        """Figures gathered since the last call (the trainer calls it once per epoch), then reset."""
        return {}

    def step_log(self) -> dict[str, torch.Tensor | float]:
        """Figures of the optimizer step just taken (e.g. ``{"k/audio": k_audio}``), for per-step
        traces (``train.loggers``); the trainer calls it after ``after_step``, only when a logger
        records steps. 0-d tensors may stay on the device (the trainer converts an epoch's at once);
        return fresh values, not tensors later changed in place. Default: none."""
        return {}

    def log_stage(self) -> dict[str, Any]:
        """Extra figures for the end-of-stage report of a multi-stage method (e.g. the chosen teacher)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors, numbers, strings only: loaded weights-only)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on resume, before training continues)."""
        self.epoch = int(state.get("epoch", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
