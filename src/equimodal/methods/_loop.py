"""The documented hook order (``_base.py``'s module docstring) as a function a user can call.

It is the smallest complete loop: no checkpoints, no accumulation, no scheduler. Our ``Trainer``
adds those around the same calls.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ._base import Method, MethodData


@torch.no_grad()
def _val_by_modality(method: Method, model: nn.Module, val_batches: Iterable) -> dict[str, Any]:
    """Validation accuracy (fused and per modality) for ``on_epoch_end``."""
    model.eval()
    correct: dict[str, float] = {}
    total = 0
    for inputs, labels in val_batches:
        out = model(inputs)
        correct["fused"] = correct.get("fused", 0.0) + float((method.predict(out).argmax(1) == labels).sum())
        for m, z in method.unimodal_logits(out).items():
            correct[m] = correct.get(m, 0.0) + float((z.argmax(1) == labels).sum())
        total += int(labels.numel())
    model.train()
    total = max(1, total)
    fused = correct.pop("fused", 0.0) / total
    return {"val_acc": fused, "val_acc_by_modality": {m: c / total for m, c in correct.items()}}


def run_stages(method: Method, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
               train_batches: Callable[..., Iterable], epochs: int, data: MethodData | None = None,
               val_batches: Callable[[], Iterable] | None = None, seed: int = 0) -> Method:
    """Train ``model`` with every stage of ``method``; returns the last stage's runner (use its
    ``predict``). ``train_batches(epoch, dataset)`` yields (inputs, labels) for one epoch of
    ``dataset`` (``data.train``, or what the method's ``training_set`` made of it; a callable of
    ``epoch`` alone is accepted when no method resamples); ``val_batches()`` (optional) feeds
    ``on_epoch_end`` the validation figures that some methods decide on."""
    import inspect
    import warnings
    takes_dataset = len(inspect.signature(train_batches).parameters) >= 2
    runner = method
    stages = method.stages()
    for index, stage in enumerate(stages):
        runner = stage.method or method
        optimizer = make_optimizer(model)
        runner.on_stage_start(stage.name, resumed=False)
        if data is not None:
            runner.attach_data(data)
        runner.setup(model, optimizer, seed=seed)
        stage_epochs = stage.epochs or epochs
        for note in runner.plan_epochs(stage_epochs):
            warnings.warn(note, stacklevel=2)
        for epoch in range(stage_epochs):
            model.train()
            runner.on_epoch_start(epoch)
            train_set = runner.training_set(epoch, data.train) if data is not None else None
            if train_set is not None and data is not None and train_set is not data.train and not takes_dataset:
                raise TypeError(f"{runner.name} resamples the training set: pass train_batches(epoch, dataset)")
            for inputs, targets in (train_batches(epoch, train_set) if takes_dataset else train_batches(epoch)):
                for sub in range(runner.substeps()):
                    if runner.substeps() > 1:
                        runner.on_substep(sub)
                    out = runner.forward(model, inputs)
                    terms = runner.loss(out, targets)
                    sum(terms.values()).backward()
                    runner.before_step(model)
                    optimizer.step()
                    runner.after_step(model)
                    optimizer.zero_grad()
            metrics = _val_by_modality(runner, model, val_batches()) if val_batches is not None else {}
            final = index == len(stages) - 1 and epoch == stage_epochs - 1
            runner.on_epoch_end(epoch, {**metrics, "final": final})
    return runner
