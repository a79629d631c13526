"""Your own data and model in the trainer, bench and diagnose: a dataset and models defined only here."""
import json
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import equimodal
from equimodal import ModelOutput, MultimodalModel
from equimodal.cli import main
from equimodal.config import load_config
from equimodal.data import DATASETS, DATASET_MODALITIES, load_dataset, register_dataset
from equimodal.errors import ConfigError, DataError
from equimodal.models.factory import MODEL_FACTORIES, register_model
from equimodal.train import Trainer

SMALL = ["train.epochs=2", "train.batch_size=32", "train.progress=false", "train.device=cpu", "optim.lr=0.05",
         "model.width=8", "model.feature_dim=16"]


class PairDataset(Dataset):
    """Two modalities, an 8x8 'image' and a 12-d 'signal', both carrying the class (4 classes);
    items are (dict of tensors, int label), read one at a time (no ``labels`` attribute)."""

    def __init__(self, n, seed, noise=1.0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        proto_img = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(99))
        proto_sig = torch.randn(4, 12, generator=torch.Generator().manual_seed(98))
        self.image = proto_img[self.y] + noise * torch.randn(n, 1, 8, 8, generator=g)
        self.signal = proto_sig[self.y] + 2 * noise * torch.randn(n, 12, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.image[i], "signal": self.signal[i]}, int(self.y[i])


def build(n=240, noise=1.0):
    """A builder as a user writes it: train and test, no val (carved from train)."""
    return {"train": PairDataset(n, 0, noise), "test": PairDataset(n // 2, 1, noise)}


class Flat(nn.Module):
    def __init__(self, in_dim, out_dim=16):
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def wrapped_factory(modalities, num_classes, input_shapes, fusion="concat"):
    """A factory returning MultimodalModel around encoders of our own."""
    encoders = {m: Flat(int(torch.tensor(input_shapes[m]).prod())) for m in modalities}
    return MultimodalModel(encoders, num_classes, fusion=fusion)


class OwnModel(nn.Module):
    """A model following the contract without MultimodalModel: late fusion by summed logits."""

    def __init__(self, modalities, num_classes, input_shapes):
        super().__init__()
        self.num_classes = num_classes
        self.encs = nn.ModuleDict({m: Flat(int(torch.tensor(input_shapes[m]).prod())) for m in modalities})
        self.heads = nn.ModuleDict({m: nn.Linear(16, num_classes) for m in modalities})

    @property
    def modalities(self):
        return tuple(self.encs)

    def encoder(self, name):
        return self.encs[name]

    def encoder_parameters(self, name):
        return list(self.encs[name].parameters())

    def forward(self, inputs):
        feats = {m: self.encs[m](inputs[m]) for m in self.modalities}
        uni = {m: self.heads[m](h) for m, h in feats.items()}
        return ModelOutput(logits=sum(uni.values()), unimodal_logits=uni, features=feats)


@pytest.fixture(autouse=True)
def _clean_registries():
    datasets, mods, models = dict(DATASETS), dict(DATASET_MODALITIES), dict(MODEL_FACTORIES)
    yield
    for reg, saved in ((DATASETS, datasets), (DATASET_MODALITIES, mods), (MODEL_FACTORIES, models)):
        reg.clear()
        reg.update(saved)


def test_registered_builder_reads_modalities_classes_and_carves_val():
    register_dataset("pairs", build)
    cfg = load_config(overrides=["data.name=pairs", "data.n=200"])
    assert cfg["data"] == {"name": "pairs", "n": 200, "noise": 1.0, "val_fraction": 0.1, "split_seed": 0,
                           "modalities": None}
    splits = load_dataset("pairs", n=200)
    assert splits.modalities == ("image", "signal") and splits.num_classes == 4
    assert len(splits.train) + len(splits.val) == 200 and len(splits.test) == 100
    assert set(splits.val.labels.tolist()) == {0, 1, 2, 3}  # stratified: every class held out
    inputs, labels = splits.train[[0, 1, 2]]
    assert inputs["image"].shape == (3, 1, 8, 8) and inputs["signal"].shape == (3, 12) and labels.dtype == torch.long
    only = load_dataset("pairs", n=200, modalities=["signal"])
    assert only.modalities == ("signal",) and torch.equal(only.val.labels, splits.val.labels)


def test_given_val_split_is_used_as_is():
    data = {"train": PairDataset(100, 0), "val": PairDataset(30, 2), "test": PairDataset(40, 1)}
    register_dataset("pairs-val", data)
    splits = load_dataset("pairs-val")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (100, 30, 40)
    assert DATASET_MODALITIES["pairs-val"] == ("image", "signal")


def test_trainer_with_own_data_and_default_encoders_learns(tmp_path):
    cfg = load_config(overrides=SMALL + ["train.epochs=3"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run", data=build(n=300, noise=0.8), echo=lambda s: None)
    # the encoders are chosen as for the built-in data: CNN for the image, MLP for the vector
    assert type(trainer.model.encoder("image")).__name__ == "SmallCNN"
    assert type(trainer.model.encoder("signal")).__name__ == "MLPEncoder"
    summary = trainer.fit()
    assert summary["dataset"] == "custom" and summary["modalities"] == ["image", "signal"]
    assert summary["test_acc"] > 0.5  # 4 classes: chance is 0.25
    stored = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: custom" in stored and "synthetic" not in stored


@pytest.mark.parametrize("factory", [wrapped_factory, OwnModel])
def test_trainer_with_own_model_factory(tmp_path, factory):
    cfg = load_config(overrides=SMALL + ["method.name=ogm-ge", "method.params=all"])  # linear encoders
    trainer = Trainer(cfg, out_dir=tmp_path / "run", data=build(n=160), model_factory=factory, echo=lambda s: None)
    assert isinstance(trainer.model, factory if isinstance(factory, type) else MultimodalModel)
    summary = trainer.fit()
    assert set(summary["probe_acc_by_modality"]) == {"image", "signal"}
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "k/image" in history[-1] and "k/signal" in history[-1]  # OGM-GE modulated this model
    assert trainer.cfg["model"]["factory"].endswith(factory.__qualname__)
    resumed = Trainer.resume(tmp_path / "run", echo=lambda s: None)  # same process: names still registered
    assert resumed.epoch == 2


def test_bench_and_diagnose_from_python(tmp_path):
    result = equimodal.bench(build(n=160), ["joint", "ogm-ge:params=all"], seeds=[0], out=tmp_path / "b", model=wrapped_factory,
                             overrides=SMALL, alone=True, name="pairs-bench", plots=False, echo=lambda s: None)
    assert not result.failures
    assert [r["label"] for r in result.runs] == ["joint", "ogm-ge:params=all", "alone:image", "alone:signal"]
    assert [r["modalities"] for r in result.runs][2:] == [["image"], ["signal"]]  # the factory built one encoder
    assert "| ogm-ge:params=all |" in result.table and (tmp_path / "b" / "results.md").is_file()
    report = equimodal.diagnose(build(n=160), tmp_path / "d", seeds=[0], model=wrapped_factory, overrides=SMALL,
                                name="pairs-diag", echo=lambda s: None)
    assert set(report["modalities"]) == {"image", "signal"} and report["verdict"]
    assert (tmp_path / "d" / "diagnosis.txt").is_file()


def test_cli_by_import_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "byo_cli_data.py").write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import TensorDataset

        class Pairs(torch.utils.data.Dataset):
            def __init__(self, n, seed):
                g = torch.Generator().manual_seed(seed)
                self.targets = torch.randint(0, 3, (n,), generator=g)   # read without loading items
                self.a = self.targets[:, None].float() + torch.randn(n, 5, generator=g)
                self.b = torch.randn(n, 1, 6, 6, generator=g)
            def __len__(self):
                return len(self.targets)
            def __getitem__(self, i):
                return {"a": self.a[i], "b": self.b[i]}, self.targets[i]

        def build(n=120):
            return {"train": Pairs(n, 0), "test": Pairs(60, 1)}
        '''))
    (tmp_path / "byo_cli_models.py").write_text(textwrap.dedent('''
        from torch import nn
        from equimodal import MultimodalModel

        class Enc(nn.Module):
            out_dim = 8
            def __init__(self, size):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, 8))
            def forward(self, x):
                return self.net(x)

        def build(modalities, num_classes, input_shapes):
            size = lambda s: int(__import__("math").prod(s))
            return MultimodalModel({m: Enc(size(input_shapes[m])) for m in modalities}, num_classes)
        '''))
    monkeypatch.chdir(tmp_path)  # found from the current directory, as `python -m` would
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "byo_cli_data:build", "--set", "data.n=90", "--set",
               "model.factory=byo_cli_models:build", "--out", str(out), *[a for s in SMALL for a in ("--set", s)]])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "byo_cli_data:build" and summary["modalities"] == ["a", "b"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(summary["test_acc"])
    rc = main(["bench", "--dataset", "byo_cli_data:build", "--methods", "joint", "--seeds", "0", "--alone",
               "--out", str(tmp_path / "bench"), "--no-progress", *[a for s in SMALL for a in ("--set", s)]])
    assert rc == 0 and (tmp_path / "bench" / "runs" / "alone_b-seed0" / "summary.json").is_file()


def test_mistakes_are_named_errors(tmp_path):
    with pytest.raises(ConfigError, match="no_such_module"):
        load_config(overrides=["data.name=no_such_module:build"])
    with pytest.raises(ConfigError, match="model.factory='nope'"):
        load_config(overrides=["model.factory=nope"])
    with pytest.raises(ConfigError, match="unknown dataset 'unregistered'.*register_dataset"):
        load_config(overrides=["data.name=unregistered"])
    register_dataset("pairs", build)
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['data.size'\]"):
        load_config(overrides=["data.name=pairs", "data.size=3"])
    with pytest.raises(DataError, match="no modality \\['audio'\\]"):
        load_dataset("pairs", modalities=["audio"])
    with pytest.raises(ValueError, match="not a free dataset name"):
        register_dataset("synthetic", build)

    class Bad(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3), 0  # a tensor, not a dict of tensors

    with pytest.raises(DataError, match=r"bad:train\[0\]: an item must be \(dict of tensors, label\)"):
        register_dataset("bad", {"train": Bad(), "test": Bad()})
    with pytest.raises(DataError, match="no 'test' split"):
        register_dataset("bad", {"train": PairDataset(10, 0)})

    def one_encoder(num_classes):
        return MultimodalModel({"image": Flat(64)}, num_classes)

    cfg = load_config(overrides=SMALL)
    with pytest.raises(ConfigError, match="modalities \\['image'\\], but the data has \\['image', 'signal'\\]"):
        Trainer(cfg, out_dir=tmp_path / "r", data=build(n=80), model_factory=one_encoder)
    class NoClassCount(nn.Module):
        modalities = ("image", "signal")

        def encoder(self, name):
            return nn.Identity()

        def encoder_parameters(self, name):
            return []

    with pytest.raises(ConfigError, match="without \\['num_classes'\\]"):
        Trainer(cfg, out_dir=tmp_path / "r", data=build(n=80), model_factory=lambda: NoClassCount())
    name = register_model(wrapped_factory, name="mine")
    assert load_config(overrides=SMALL + [f"model.factory={name}"])["model"]["factory"] == "mine"


def test_the_worked_example_builds_and_trains(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "own_data.py"
    spec = importlib.util.spec_from_file_location("own_data_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cfg = load_config(overrides=["train.epochs=1", "train.device=cpu", "train.progress=false", "method.name=ogm-ge"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run", data=example.build_data(n_train=240, n_test=120),
                      model_factory=example.build_model, echo=lambda s: None)
    assert trainer.splits.modalities == ("camera", "sensor") and trainer.splits.num_classes == 6
    assert set(trainer.fit()["probe_acc_by_modality"]) == {"camera", "sensor"}
