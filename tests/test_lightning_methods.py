"""Every registered method trains through EquimodalCallback (multi-stage methods one fit per stage
with fit_stages, methods that step several times per batch under manual optimisation), or is
refused by name."""
import lightning.pytorch as pl  # in the `test` extra
import torch

from equimodal.data import load_dataset
from equimodal.data.base import stratified_split
from equimodal.errors import UnsupportedMethodError
from equimodal.integrations.lightning import (EquimodalCallback, check_supported, fit_stages, resamples,
                                              seeded_loader, steps_several_times, substep_training_step)
from equimodal.methods import MethodData, build_method
from equimodal.methods._registry import _REGISTRY
from equimodal.models import MultimodalModel, SmallCNN

REFUSED: set[str] = set()
#: so that the 2-epoch fit of a resampling method trains a resampled set in its second epoch
OPTIONS = {"valuation": {"warmup_epochs": 1}}


class Module(pl.LightningModule):
    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return sum(self.method.loss(self.method.forward(self.model, inputs), targets).values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.param_groups(), lr=0.05, momentum=0.9)


class StagedModule(Module):
    """Calls the runner of the stage being fitted (fit_stages sets ``self.runner``)."""

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return sum(self.runner.loss(self.runner.forward(self.model, inputs), targets).values())


class ManualModule(Module):
    """Several optimizer steps per batch: manual optimisation."""

    def __init__(self, model, method):
        super().__init__(model, method)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return substep_training_step(self, self.method, self.model, batch)


def pl_trainer(epochs, callback):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])



def test_every_method_trains_through_the_callback():
    data = load_dataset("synthetic", n_train=120, n_test=20)
    keep, held = stratified_split(data.train.labels, 0.1, seed=1)  # gblend's held-out part of train
    train, holdout = data.train.subset(keep), data.train.subset(held)
    ran, refused = [], []
    for name in sorted(_REGISTRY):
        method = build_method(name, **OPTIONS.get(name, {}))
        staged = len(method.stages()) > 1 or any(st.method is not None for st in method.stages())
        try:
            check_supported(method, 0 if staged else None)
        except UnsupportedMethodError:
            refused.append(name)
            continue
        torch.manual_seed(0)
        model = MultimodalModel({m: SmallCNN(width=8, out_dim=16) for m in ("visual", "audio")}, num_classes=10)
        before = [p.detach().clone() for p in model.parameters()]
        data_for_method = MethodData(train=train, val=data.val, holdout=holdout)
        if staged:
            callbacks = fit_stages(method, StagedModule(model, method), pl_trainer,
                                   lambda trainer, module: trainer.fit(module, seeded_loader(train, 48)), epochs=1,
                                   data=data_for_method)
            assert len(callbacks) == len(method.stages()), name
        else:
            callback = EquimodalCallback(method, data=data_for_method)
            module = ManualModule(model, method) if steps_several_times(method) else Module(model, method)
            loader = callback.train_loader(48) if resamples(method) else seeded_loader(train, 48)
            pl_trainer(2 if resamples(method) else 1, callback).fit(module, loader)
            callbacks = [callback]
        for callback in callbacks:  # 95 training samples, batches of 48, every sub-step an optimizer step
            if resamples(callback.runner):  # epoch 2 trains the resampled set (copies added, modalities assigned)
                assert callback.current_train is not train and callback.optimizer_steps >= 2, name
            else:
                assert callback.optimizer_steps == 2 * callback.runner.substeps(), name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
        ran.append(name)
    assert set(refused) == REFUSED
    assert len(ran) == len(_REGISTRY) - len(REFUSED) >= 32
