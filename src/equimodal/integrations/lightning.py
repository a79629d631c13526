"""Run equimodal methods inside a Lightning 2.x ``Trainer``.

``EquimodalCallback(method)`` calls the method's hooks where our own trainer calls them (the order
of ``equimodal.methods._base``'s docstring), at the matching points of Lightning's loop:

==========================  =====================================================================
method hook                 Lightning hook
==========================  =====================================================================
``on_stage_start``,         ``on_fit_start`` (the model is on its device and ``configure_optimizers``
``attach_data``, ``setup``  has run, so the method can add its own parameter group)
``on_epoch_start``          ``on_train_epoch_start`` (``trainer.current_epoch``)
``loss`` (and ``forward``)  your ``training_step``: ``sum(method.loss(method.forward(model, x), y).values())``
``before_step``             ``on_before_optimizer_step``: after the whole accumulation group's
                            backward passes, DDP's gradient all-reduce and AMP unscaling, before
                            Lightning's gradient clipping
``after_step``              right after ``optimizer.step()`` (an optimizer step post-hook), before
                            a step-interval LR scheduler and ``zero_grad``; on a step the fp16
                            ``GradScaler`` skips (overflow) the method's state is restored first,
                            as in our trainer, so it does not advance
``step_log``                ``on_train_batch_end`` after a step: ``step/<name>`` (OGM's k and rho per
                            modality) through ``pl_module.log_dict(on_step=True)``
``log`` / ``on_epoch_end``  ``on_train_epoch_end``: ``method.log()`` goes to ``pl_module.log_dict``
==========================  =====================================================================

Methods that train in several stages (``distill``, ``ssl``, ``umt``, ``dimml``, ``reconboost``)
run each stage as its own fit with a fresh optimizer: ``fit_stages`` (or one
``EquimodalCallback(method, stage=i)`` per fit). Methods that take several optimizer steps per
batch (``mla``, ``aug``, ``remix``) run under manual optimisation: the module sets
``automatic_optimization = False`` and its ``training_step`` returns ``substep_training_step``.
A method that rebuilds its training set every epoch (``valuation``, ``remix``) trains from
``callback.train_loader(batch_size)``, which serves each epoch's ``training_set`` (built in
``on_train_epoch_start``; the loader has no length, so Lightning ends an epoch when it runs out).

Install with ``pip install "equimodal[lightning]"``.
"""
from __future__ import annotations

import copy
import warnings
import dataclasses
from typing import Any, Iterator

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("equimodal.integrations.lightning needs Lightning 2.x: "
                      "pip install 'equimodal[lightning]' (or pip install lightning)") from exc

from .. import _dist
from ..data.base import batch_bounds, num_batches
from ..errors import UnsupportedMethodError
from ..methods import Method, MethodData
from ..methods._base import unwrap
from ..methods._loop import _val_by_modality

__all__ = ["EquimodalCallback", "SeededBatches", "seeded_loader", "check_supported", "fit_stages",
           "resamples", "steps_several_times", "substep_training_step"]

_CONTRACT = ("modalities", "encoder", "encoder_parameters")


def check_supported(method: Method, stage: int | None = None) -> None:
    """Refuse, with a named error saying what to use instead, what the callback cannot drive as
    asked: a multi-stage method without a ``stage`` (each stage is its own ``fit``: use
    ``fit_stages``), or a stage that does not exist. A method that steps several times per batch
    runs under manual optimisation and one that resamples trains from ``train_loader`` (both
    checked when the fit starts)."""
    name = method.name
    stages = method.stages()
    if stage is None and (len(stages) > 1 or any(s.method is not None and s.method is not method for s in stages)):
        names = ", ".join(s.name for s in stages)
        raise UnsupportedMethodError(
            f"method {name!r} trains in {len(stages)} stages ({names}), each with a fresh optimizer: run each "
            "stage as its own fit with equimodal.integrations.lightning.fit_stages (or "
            "EquimodalCallback(method, stage=i) per fit), or train it with equimodal.train.Trainer")
    if stage is not None and not 0 <= stage < len(stages):
        raise UnsupportedMethodError(f"method {name!r} has {len(stages)} stage(s); stage={stage} does not exist")


def resamples(method: Method) -> bool:
    """Whether ``method`` rebuilds its training set every epoch (it overrides ``training_set``): it
    then trains from ``EquimodalCallback.train_loader``, which serves that epoch's set."""
    return type(method).training_set is not Method.training_set


def steps_several_times(method: Method) -> bool:
    """Whether ``method`` may take more than one optimizer step per batch (it overrides
    ``substeps``; the count itself may depend on the model or the epoch): it then runs under manual
    optimisation."""
    return type(method).substeps is not Method.substeps


def substep_training_step(module: pl.LightningModule, runner: Method, model: nn.Module,
                          batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The ``training_step`` of a module with ``automatic_optimization = False`` for a method that
    takes ``runner.substeps()`` optimizer steps per batch (mla, aug, remix): per sub-step,
    ``on_substep``, forward, loss, ``manual_backward``, ``optimizer.step()`` (the callback calls
    ``before_step`` / ``after_step`` around it, as for automatic optimisation) and ``zero_grad``.
    Returns the mean loss of the sub-steps (detached), for logging. Under DDP use
    ``strategy="ddp_find_unused_parameters_true"``: a sub-step runs only some encoders (so does a
    stage of a multi-stage method), and DDP must be told to look for parameters left unused."""
    inputs, targets = batch
    optimizer = module.optimizers()
    n = runner.substeps()
    total = torch.zeros(())
    for sub in range(n):
        if n > 1:
            runner.on_substep(sub)
        loss = sum(runner.loss(runner.forward(model, inputs), targets).values())
        module.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        total = total + loss.detach().cpu()
    return total / n


def fit_stages(method: Method, module: pl.LightningModule, make_trainer, fit, epochs: int,
               model: nn.Module | None = None, data: MethodData | None = None, seed: int = 0,
               **callback_options: Any) -> list["EquimodalCallback"]:
    """Train every stage of ``method`` as its own Lightning fit, each with a fresh optimizer (its
    ``configure_optimizers`` runs again) as our trainer does: ``make_trainer(max_epochs,
    callback)`` returns the ``pl.Trainer`` of a stage (``stage.epochs`` or ``epochs``),
    ``fit(trainer, module)`` runs it (``trainer.fit(module, loader)``). Before each fit
    ``module.runner`` is set to the stage's runner, so ``training_step`` calls
    ``self.runner.loss(...)`` (for most methods the method itself; ``ssl``'s supervised stage
    runs another method). Returns the stages' callbacks."""
    callbacks = []
    for index, stage in enumerate(method.stages()):
        callback = EquimodalCallback(method, model=model, data=data, seed=seed, stage=index, **callback_options)
        module.runner = callback.runner
        fit(make_trainer(stage.epochs or epochs, callback), module)
        callbacks.append(callback)
    return callbacks


class _CurrentTrainingSet(torch.utils.data.Dataset):
    """The training set of the epoch being trained (``runner.training_set``), read at each batch."""

    def __init__(self, callback: "EquimodalCallback") -> None:
        self.callback = callback

    def __getitem__(self, indices: torch.Tensor) -> Any:
        return self.callback.current_train[indices]


class _CurrentBatches(torch.utils.data.Sampler):
    """``SeededBatches`` over the epoch's training set, drawn when the epoch's first batch is: after
    ``on_train_epoch_start`` built the set. No ``__len__`` (the set's size changes per epoch), so
    Lightning ends each epoch when the batches run out."""

    def __init__(self, callback: "EquimodalCallback", batch_size: int, seed: int, shuffle: bool) -> None:
        self.callback, self.batch_size, self.seed, self.shuffle = callback, int(batch_size), int(seed), shuffle

    def __iter__(self) -> Iterator[torch.Tensor]:
        current = self.callback.current_train
        if current is None:
            raise RuntimeError("EquimodalCallback.train_loader is read before the epoch started: give it to "
                               "trainer.fit as the training loader of this callback's fit")
        batches = SeededBatches(len(current), self.batch_size, self.seed, self.shuffle)
        batches.set_epoch(self.callback.epoch)
        yield from batches


class SeededBatches(torch.utils.data.Sampler):
    """Batches of indices in the order ``equimodal train`` draws them: a permutation seeded by
    ``seed * 100003 + epoch`` (Lightning calls ``set_epoch``), cut into global batches of
    ``batch_size``; under a process group each rank takes its contiguous share of every global
    batch (so ``batch_size`` is global, as in our trainer; pass ``use_distributed_sampler=False``
    to Lightning). Use it to compare a Lightning run with ours step by step."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        rank, world = _dist.rank(), _dist.world_size()
        for start, stop in batch_bounds(self.n, self.batch_size, world):  # as equimodal train cuts them
            chunk = order[start:stop]
            yield chunk.tensor_split(world)[rank] if world > 1 else chunk

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, _dist.world_size())


def seeded_loader(dataset: Any, batch_size: int, seed: int = 0, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over an equimodal dataset (``dataset[indices]`` returns a whole batch) in
    ``equimodal train``'s order (see ``SeededBatches``): one gather per batch, no collation."""
    return torch.utils.data.DataLoader(dataset, sampler=SeededBatches(len(dataset), batch_size, seed, shuffle),
                                       batch_size=None)


class EquimodalCallback(pl.Callback):
    """Drives ``method``'s hooks from Lightning's loop (table in this module's docstring).

    ``model``: the multimodal model the method reads (``modalities``, ``encoder``,
    ``encoder_parameters``); default: the ``LightningModule`` itself if it has them, else its
    ``model`` attribute. ``data``: a ``MethodData`` for methods that read data outside the steps
    (``pmr``, ``gblend``) and, with ``data.val``, the per-modality validation accuracy passed to
    ``on_epoch_end`` (``mslr`` decides on it); its ``device`` is set to the module's. ``seed``:
    seeds the method's own generators (OGM-GE's noise), as ``train.seed`` does in our trainer.
    ``prefix``: put before every logged name (``k/audio`` -> ``{prefix}k/audio``). ``log_steps``:
    also log the method's per-step figures (``Method.step_log``) as ``step/<name>`` at every step.

    After fitting, ``optimizer_steps`` counts the steps taken and ``skipped_steps`` those the fp16
    scaler skipped. The method's state is saved in Lightning checkpoints and restored on resume.
    """

    def __init__(self, method: Method, model: nn.Module | None = None, data: MethodData | None = None,
                 seed: int = 0, prefix: str = "", log_steps: bool = True, stage: int | None = None) -> None:
        super().__init__()
        check_supported(method, stage)
        self.method = method
        self.stage = stage  # the stage this fit runs (multi-stage methods; fit_stages sets it)
        chosen = method.stages()[stage if stage is not None else 0]
        self.stage_name = chosen.name
        self.runner = chosen.method or method  # whose hooks this fit calls
        self.model = model
        self.data = data
        self.seed = int(seed)
        self.prefix = prefix
        self.log_steps = log_steps
        self._step_figures: dict[str, Any] = {}
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._pending = False  # before_step ran, after_step not yet
        self._snapshot: dict[str, Any] | None = None
        self._handle = None
        self._restored: dict[str, Any] | None = None
        self.current_train: Any = None  # this epoch's training set (methods that resample)
        self.epoch = 0
        self._started: int | None = None  # the epoch whose on_epoch_start has run

    # --- setup ----------------------------------------------------------------------------
    def _resolve_model(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model is not None:
            return unwrap(self.model)
        for candidate in (pl_module, getattr(pl_module, "model", None)):
            if candidate is not None and all(hasattr(candidate, a) for a in _CONTRACT):
                return candidate
        raise TypeError(f"EquimodalCallback: {type(pl_module).__name__} has no multimodal model: give the "
                        "LightningModule a `model` attribute (an equimodal.MultimodalModel or any module with "
                        "modalities, encoder(name), encoder_parameters(name)), or pass "
                        "EquimodalCallback(method, model=...)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise UnsupportedMethodError(f"EquimodalCallback: configure_optimizers returned {len(trainer.optimizers)} "
                                         "optimizers; the method needs exactly one")
        runner = self.runner
        several = steps_several_times(runner)
        if several and pl_module.automatic_optimization:
            raise UnsupportedMethodError(
                f"method {runner.name!r} takes several optimizer steps per batch: set "
                "`self.automatic_optimization = False` in the LightningModule and return "
                "equimodal.integrations.lightning.substep_training_step(self, runner, model, batch) "
                "from training_step")
        if not several and not pl_module.automatic_optimization:
            raise UnsupportedMethodError("EquimodalCallback needs automatic optimization for a method that steps "
                                         "once per batch; with manual optimization call the method's hooks "
                                         "yourself (see README)")
        if resamples(runner) and self.data is None:
            raise UnsupportedMethodError(
                f"method {runner.name!r} rebuilds its training set every epoch: pass "
                "EquimodalCallback(..., data=MethodData(train=..., val=...)) and train from callback.train_loader(...)")
        self.model = self._resolve_model(pl_module)
        optimizer = trainer.optimizers[0]
        for note in runner.plan_epochs(int(trainer.max_epochs or 0) if (trainer.max_epochs or 0) > 0 else 0):
            warnings.warn(note, stacklevel=2)  # a schedule that cannot act within max_epochs
        runner.on_stage_start(self.stage_name, resumed=self._restored is not None)
        if self.data is not None:
            runner.attach_data(dataclasses.replace(self.data, device=pl_module.device))
        if runner.holdout_fraction > 0 and (self.data is None or self.data.holdout is None):
            raise UnsupportedMethodError(
                f"method {runner.name!r} estimates on a held-out part of the training split: pass "
                "EquimodalCallback(..., data=MethodData(train=..., val=..., holdout=...)) with a stratified "
                f"{runner.holdout_fraction:.0%} of the training data withheld from the loader "
                "(equimodal.data.base.stratified_split)")
        runner.setup(self.model, optimizer, seed=self.seed)
        if self._restored is not None:
            self.method.load_state_dict(self._restored["method"])
            if self._restored.get("runner") is not None and runner is not self.method:
                runner.load_state_dict(self._restored["runner"])
            self.optimizer_steps = int(self._restored.get("optimizer_steps", 0))
            self.skipped_steps = int(self._restored.get("skipped_steps", 0))
            self._restored = None
        self._handle = optimizer.register_step_post_hook(self._after_optimizer_step)
        if resamples(runner):  # Lightning draws the first batch of a fit before on_train_epoch_start
            self._start_epoch(trainer.current_epoch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)  # a failed fit leaves no hook on the optimizer

    # --- per epoch ------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started == trainer.current_epoch:
            return  # the fit's first epoch was started in on_fit_start (its set was needed early)
        self._start_epoch(trainer.current_epoch)

    def _start_epoch(self, epoch: int) -> None:
        """``on_epoch_start``, then (methods that resample) the epoch's ``training_set``, which
        ``train_loader`` serves."""
        self.epoch, self._started = epoch, epoch
        self.runner.on_epoch_start(epoch)
        if resamples(self.runner):
            self.current_train = self.runner.training_set(epoch, self.data.train)

    def train_loader(self, batch_size: int, seed: int = 0, shuffle: bool = True) -> torch.utils.data.DataLoader:
        """The training loader for a method that rebuilds its training set every epoch (``valuation``
        adds copies, ``remix`` assigns each sample a modality): each epoch's batches come from
        ``training_set(epoch, data.train)``, built in ``on_train_epoch_start``, in ``equimodal
        train``'s order (``SeededBatches``; ``batch_size`` global). Needs ``data=MethodData(train=...)``."""
        if self.data is None:
            raise UnsupportedMethodError(f"method {self.runner.name!r} rebuilds its training set every epoch: pass "
                                         "EquimodalCallback(..., data=MethodData(train=..., val=...))")
        return torch.utils.data.DataLoader(_CurrentTrainingSet(self), sampler=_CurrentBatches(self, batch_size, seed,
                                                                                              shuffle), batch_size=None)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        figures = self.runner.log()
        numbers = {f"{self.prefix}{k}": float(v) for k, v in figures.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   or isinstance(v, torch.Tensor) and v.numel() == 1}
        if numbers:  # already identical on every rank (methods all-reduce their statistics)
            pl_module.log_dict(numbers, on_step=False, on_epoch=True, sync_dist=False)
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch == trainer.max_epochs - 1
        self.runner.on_epoch_end(trainer.current_epoch, {**self._validation(trainer), **figures, "final": last})

    def _validation(self, trainer: pl.Trainer) -> dict[str, Any]:
        """``val_acc`` and ``val_acc_by_modality`` for ``on_epoch_end``: computed on ``data.val``
        when given, else whatever the module logged as ``val_acc`` / ``val_acc_by_modality/<m>``."""
        if self.data is not None and self.data.val is not None:
            data = dataclasses.replace(self.data, device=next(self.model.parameters()).device)
            return _val_by_modality(self.runner, self.model, data.batches(data.val))
        logged = trainer.callback_metrics
        out: dict[str, Any] = {}
        if "val_acc" in logged:
            out["val_acc"] = float(logged["val_acc"])
        by = {k.split("/", 1)[1]: float(v) for k, v in logged.items() if k.startswith("val_acc_by_modality/")}
        if by:
            out["val_acc_by_modality"] = by
        return out

    # --- per optimizer step ---------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # fp16: a step the scaler will skip (overflow) must not advance the method's state
        if self._pending:  # manual sub-steps: the previous step of this batch was skipped by the fp16 scaler
            self._skipped()
        self._snapshot = copy.deepcopy(self.runner.state_dict()) if scaler is not None else None
        self.runner.before_step(self.model)
        self._pending = True

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending:
            self._pending = False
            self.optimizer_steps += 1
            self.runner.after_step(self.model)
            if self.log_steps:
                self._step_figures = self.runner.step_log()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._pending:  # before_step ran but optimizer.step() did not: the fp16 scaler skipped it
            self._skipped()
        self._snapshot = None
        if self._step_figures:  # 0-d tensors on the device: Lightning copies them when its logger writes
            pl_module.log_dict({f"{self.prefix}step/{k}": v for k, v in self._step_figures.items()},
                               on_step=True, on_epoch=False)
            self._step_figures = {}

    def _skipped(self) -> None:
        """A step the fp16 scaler skipped leaves no trace in the method's state."""
        self._pending = False
        if self._snapshot is not None:
            self.runner.load_state_dict(self._snapshot)
        self.skipped_steps += 1
        self.runner.after_step(self.model)

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(),
                "runner": self.runner.state_dict() if self.runner is not self.method else None,
                "optimizer_steps": self.optimizer_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_fit_start, after the method's setup
