import pytest
import torch

from equimodal.models import MultimodalModel, SmallCNN

#: a run small enough for the CPU test suite (a few seconds), on the real default data generator
TINY = ["data.n_train=600", "data.n_test=300", "model.width=16", "model.feature_dim=32", "optim.lr=0.1",
        "train.epochs=2", "train.batch_size=50", "train.progress=false", "train.device=cpu"]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def recomputed_test_acc(trainer) -> float:
    """The test accuracy of the model and runner a finished trainer holds, computed again from
    scratch (what a summary's ``test_acc`` must equal for a run that reports its last epoch)."""
    from equimodal.train import evaluate
    return evaluate(trainer.model, trainer.active, trainer.splits.test, trainer.device,
                    precision=trainer.precision)["acc"]


def make_model(modalities=("audio", "visual"), fusion="concat", estimator="auto", classes=5, width=8, dim=12):
    torch.manual_seed(0)
    encoders = {m: SmallCNN(width=width, out_dim=dim) for m in modalities}
    return MultimodalModel(encoders, classes, fusion=fusion, estimator=estimator)


def fake_batch(modalities=("audio", "visual"), n=6, classes=5, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({m: torch.randn(n, 1, size, size, generator=g) for m in modalities},
            torch.randint(0, classes, (n,), generator=g))
