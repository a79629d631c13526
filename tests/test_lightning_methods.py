"""Every registered method either trains through EquimodalCallback or is refused by name."""
import lightning.pytorch as pl  # in the `test` extra
import torch

from equimodal.data import load_dataset
from equimodal.data.base import stratified_split
from equimodal.errors import UnsupportedMethodError
from equimodal.integrations.lightning import EquimodalCallback, check_supported, seeded_loader
from equimodal.methods import MethodData, build_method
from equimodal.methods._registry import _REGISTRY
from equimodal.models import MultimodalModel, SmallCNN

REFUSED = {"aug", "dimml", "distill", "mla", "reconboost", "remix", "ssl", "umt", "valuation"}


class Module(pl.LightningModule):
    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return sum(self.method.loss(self.method.forward(self.model, inputs), targets).values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.param_groups(), lr=0.05, momentum=0.9)


def test_every_single_stage_method_trains_through_the_callback():
    data = load_dataset("synthetic", n_train=120, n_test=20)
    keep, held = stratified_split(data.train.labels, 0.1, seed=1)  # gblend's held-out part of train
    train, holdout = data.train.subset(keep), data.train.subset(held)
    ran, refused = [], []
    for name in sorted(_REGISTRY):
        method = build_method(name)
        try:
            check_supported(method)
        except UnsupportedMethodError:
            refused.append(name)
            continue
        torch.manual_seed(0)
        model = MultimodalModel({m: SmallCNN(width=8, out_dim=16) for m in ("visual", "audio")}, num_classes=10)
        before = [p.detach().clone() for p in model.parameters()]
        callback = EquimodalCallback(method, data=MethodData(train=train, val=data.val, holdout=holdout))
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(Module(model, method), seeded_loader(train, 48))
        assert callback.optimizer_steps == 2, name  # 95 training samples, batches of 48
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
        ran.append(name)
    assert set(refused) == REFUSED
    assert len(ran) == len(_REGISTRY) - len(REFUSED) >= 20

