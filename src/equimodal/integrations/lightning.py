"""Run any single-stage equimodal method inside a Lightning 2.x ``Trainer``.

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

Methods that train in several stages (``distill``, ``ssl``, ``umt``, ``dimml``,
``reconboost``), take several optimizer steps per batch (``mla``) or resample the training set
(``valuation``) need a fresh optimizer per stage or control of the data loop; they are refused with
``UnsupportedMethodError`` (use ``equimodal.train.Trainer`` or ``equimodal.methods.run_stages``).

Install with ``pip install "equimodal[lightning]"``.
"""
from __future__ import annotations

import copy
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

__all__ = ["EquimodalCallback", "SeededBatches", "seeded_loader", "check_supported"]

_CONTRACT = ("modalities", "encoder", "encoder_parameters")


def check_supported(method: Method) -> None:
    """Refuse, with a named error saying what to use instead, a method the callback cannot drive:
    several stages (each needs a fresh optimizer), several optimizer steps per batch, or a
    per-epoch resampled training set (the data loop belongs to Lightning)."""
    name = method.name
    stages = method.stages()
    if len(stages) > 1 or any(s.method is not None and s.method is not method for s in stages):
        names = ", ".join(s.name for s in stages)
        raise UnsupportedMethodError(
            f"method {name!r} trains in {len(stages)} stages ({names}), each with a fresh optimizer; "
            "EquimodalCallback runs single-stage methods. Train it with equimodal.train.Trainer "
            f"(`equimodal train --method {name}`) or equimodal.methods.run_stages")
    if type(method).substeps is not Method.substeps:
        raise UnsupportedMethodError(
            f"method {name!r} takes one optimizer step per modality on each batch, which Lightning's "
            "automatic optimization cannot express; train it with equimodal.train.Trainer "
            f"(`equimodal train --method {name}`) or equimodal.methods.run_stages")
    if type(method).training_set is not Method.training_set:
        raise UnsupportedMethodError(
            f"method {name!r} rebuilds the training set every epoch, and the data loop belongs to "
            f"Lightning; train it with equimodal.train.Trainer (`equimodal train --method {name}`) "
            "or equimodal.methods.run_stages")


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
                 seed: int = 0, prefix: str = "", log_steps: bool = True) -> None:
        super().__init__()
        check_supported(method)
        self.method = method
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
        if not pl_module.automatic_optimization:
            raise UnsupportedMethodError("EquimodalCallback needs automatic optimization; with manual "
                                         "optimization call the method's hooks yourself (see README)")
        self.model = self._resolve_model(pl_module)
        optimizer = trainer.optimizers[0]
        method = self.method
        method.on_stage_start(method.stages()[0].name, resumed=self._restored is not None)
        if self.data is not None:
            method.attach_data(dataclasses.replace(self.data, device=pl_module.device))
        if method.holdout_fraction > 0 and (self.data is None or self.data.holdout is None):
            raise UnsupportedMethodError(
                f"method {method.name!r} estimates on a held-out part of the training split: pass "
                "EquimodalCallback(..., data=MethodData(train=..., val=..., holdout=...)) with a stratified "
                f"{method.holdout_fraction:.0%} of the training data withheld from the loader "
                "(equimodal.data.base.stratified_split)")
        method.setup(self.model, optimizer, seed=self.seed)
        if self._restored is not None:
            method.load_state_dict(self._restored["method"])
            self.optimizer_steps = int(self._restored.get("optimizer_steps", 0))
            self.skipped_steps = int(self._restored.get("skipped_steps", 0))
            self._restored = None
        self._handle = optimizer.register_step_post_hook(self._after_optimizer_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)  # a failed fit leaves no hook on the optimizer

    # --- per epoch ------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.on_epoch_start(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        figures = self.method.log()
        numbers = {f"{self.prefix}{k}": float(v) for k, v in figures.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   or isinstance(v, torch.Tensor) and v.numel() == 1}
        if numbers:  # already identical on every rank (methods all-reduce their statistics)
            pl_module.log_dict(numbers, on_step=False, on_epoch=True, sync_dist=False)
        self.method.on_epoch_end(trainer.current_epoch, {**self._validation(trainer), **figures})

    def _validation(self, trainer: pl.Trainer) -> dict[str, Any]:
        """``val_acc`` and ``val_acc_by_modality`` for ``on_epoch_end``: computed on ``data.val``
        when given, else whatever the module logged as ``val_acc`` / ``val_acc_by_modality/<m>``."""
        if self.data is not None and self.data.val is not None:
            data = dataclasses.replace(self.data, device=next(self.model.parameters()).device)
            return _val_by_modality(self.method, self.model, data.batches(data.val))
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
        self._snapshot = copy.deepcopy(self.method.state_dict()) if scaler is not None else None
        self.method.before_step(self.model)
        self._pending = True

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending:
            self._pending = False
            self.optimizer_steps += 1
            self.method.after_step(self.model)
            if self.log_steps:
                self._step_figures = self.method.step_log()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._pending:  # before_step ran but optimizer.step() did not: the fp16 scaler skipped it
            self._pending = False
            if self._snapshot is not None:
                self.method.load_state_dict(self._snapshot)
            self.skipped_steps += 1
            self.method.after_step(self.model)
        self._snapshot = None
        if self._step_figures:  # 0-d tensors on the device: Lightning copies them when its logger writes
            pl_module.log_dict({f"{self.prefix}step/{k}": v for k, v in self._step_figures.items()},
                               on_step=True, on_epoch=False)
            self._step_figures = {}

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "optimizer_steps": self.optimizer_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_fit_start, after the method's setup
