"""The automatic encoder reads each modality's kind: the shape rule, declared kinds, the per-modality
``model.encoder`` mapping, and a one-line error for what it cannot place (models/auto.py)."""
import json
import textwrap

import pytest
import torch

from equimodal.cli import main
from equimodal.config import load_config
from equimodal.data import TensorMultimodalDataset
from equimodal.errors import ConfigError
from equimodal.models.auto import build_encoders, infer_kind
from equimodal.models.encoders import CNN1d, MLPEncoder, SmallCNN, TabularEncoder, TokenTransformer
from equimodal.train import Trainer

SMALL = ["train.epochs=1", "train.batch_size=32", "train.progress=false", "train.device=cpu", "optim.lr=0.05",
         "model.width=8", "model.feature_dim=16", "train.probe=false"]
MODEL = {"encoder": "auto", "width": 8, "feature_dim": 16, "norm": "batch"}


@pytest.mark.parametrize("shape,dtype,kind", [
    ((3, 100), torch.float32, "sequence"),     # a smartwatch window, channels x time (the case)
    ((6, 128), torch.float32, "sequence"),     # accelerometer + gyroscope
    ((1, 8000), torch.float32, "sequence"),    # a raw waveform
    ((100, 3), torch.float32, "sequence"),     # too narrow for the image CNN either way
    ((40, 63), torch.float32, "image"),        # a log-mel spectrogram
    ((28, 28), torch.uint8, "image"),          # a grey image as bytes
    ((3, 32, 32), torch.float32, "image"),
    ((7,), torch.float32, "vector"),
    ((784,), torch.uint8, "vector"),           # flattened pixels are numbers, not token ids
    ((12,), torch.int64, "tokens"),
    ((12,), torch.int32, "tokens"),
])
def test_rule_reads_each_shape(shape, dtype, kind):
    assert infer_kind("m", shape, dtype)[0] == kind


@pytest.mark.parametrize("shape,dtype,what", [
    ((), torch.float32, "places 1-D"),                      # one number per sample (0-d)
    ((3, 4, 16, 16), torch.float32, "places 1-D"),          # video frames
    ((8,), torch.complex64, "real numbers"),
    ((3, 2, 100), torch.float32, "too small for the image CNN"),
])
def test_refused_shapes_name_modality_shape_dtype_and_way_out(shape, dtype, what):
    with pytest.raises(ConfigError) as info:
        infer_kind("wrist", shape, dtype)
    msg = str(info.value)
    assert "\n" not in msg and what in msg and "'wrist'" in msg and str(tuple(shape)) in msg
    assert str(dtype).replace("torch.", "") in msg and "model.encoder" in msg and "model.factory" in msg


def _data(n, seed, **mods):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    inputs = {}
    for m, shape in mods.items():
        if m == "tokens":
            ids = torch.randint(3, 40, (n, *shape), generator=g) + 10 * y[:, None]
            ids[:, shape[0] // 2:] = 0  # padded
            ids[0] = 0  # one empty text: padding only
            inputs[m] = ids
        elif m == "table":  # two categorical columns (codes 0-3, 0-2) then two numbers
            inputs[m] = torch.cat([y[:, None].float(), torch.randint(0, 3, (n, 1), generator=g).float(),
                                   torch.randn(n, 2, generator=g) + y[:, None]], 1)
        else:
            inputs[m] = torch.randn(n, *shape, generator=g) + y.view(-1, *[1] * len(shape)).float()
    kinds = {"table": {"kind": "table", "categories": [4, 3], "numeric": 2}} if "table" in mods else {}
    return TensorMultimodalDataset(inputs, y, 3, kinds)


def test_every_kind_trains_one_epoch_with_sensible_shapes(tmp_path):
    shapes = {"sensor": (3, 100), "spec": (20, 24), "image": (1, 12, 12), "vec": (7,), "tokens": (10,),
              "table": (4,)}
    data = {"train": _data(96, 0, **shapes), "test": _data(48, 1, **shapes)}
    cfg = load_config(overrides=SMALL)
    trainer = Trainer(cfg, out_dir=tmp_path / "run", echo=lambda s: None, data=data)
    types = {m: type(trainer.model.encoder(m)) for m in shapes}
    assert types == {"sensor": CNN1d, "spec": SmallCNN, "image": SmallCNN, "vec": MLPEncoder,
                     "tokens": TokenTransformer, "table": TabularEncoder}
    assert trainer.model.encoder("tokens").vocab_size == int(data["train"].inputs["tokens"].max()) + 1
    summary = trainer.fit()
    assert set(summary["test_acc_by_modality"]) == set(shapes) and 0 <= summary["test_acc"] <= 1
    out = trainer.model(trainer.splits.test[list(range(5))][0])
    assert out.logits.shape == (5, 3) and all(f.shape == (5, 16) for f in out.features.values())
    assert all(torch.isfinite(f).all() for f in out.features.values()), "an all-padding text gives finite features"


def test_unseen_token_ids_share_the_unknown_row():
    enc = TokenTransformer(vocab_size=20, max_len=6, width=8, out_dim=4).eval()
    a = enc(torch.tensor([[5, 25, 0, 0, 0, 0]]))
    b = enc(torch.tensor([[5, 999, 0, 0, 0, 0]]))
    assert torch.allclose(a, b), "ids outside the training vocabulary read as one unknown token"


def test_model_encoder_mapping_and_declared_kinds_override_the_rule():
    ds = _data(8, 0, a=(8, 64), b=(8, 64))  # 8 x 64 reads as 8 channels x 64 steps
    assert {m: type(e) for m, e in build_encoders(MODEL, ds, ("a", "b")).items()} == {"a": CNN1d, "b": CNN1d}
    ds.modality_kinds = {"b": "image"}
    assert type(build_encoders(MODEL, ds, ("a", "b"))["b"]) is SmallCNN
    mapped = build_encoders({**MODEL, "encoder": {"a": "mlp"}}, ds, ("a", "b"))
    assert type(mapped["a"]) is MLPEncoder and type(mapped["b"]) is SmallCNN
    with pytest.raises(ConfigError, match="model.encoder names modality \\['c'\\]"):
        build_encoders({**MODEL, "encoder": {"c": "mlp"}}, ds, ("a", "b"))


def test_an_encoder_that_cannot_read_the_input_is_a_clear_error():
    ds = _data(8, 0, wrist=(3, 100), vec=(7,))
    with pytest.raises(ConfigError, match=r"'wrist'.*image CNN \(cnn\) reads H x W.*model.factory"):
        build_encoders({**MODEL, "encoder": {"wrist": "cnn"}}, ds, ("wrist", "vec"))
    with pytest.raises(ConfigError, match="transformer reads padded integer token ids"):
        build_encoders({**MODEL, "encoder": {"vec": "transformer"}}, ds, ("wrist", "vec"))


def test_config_checks_model_encoder():
    assert load_config(overrides=["model.encoder={audio: cnn1d, visual: cnn}"])["model"]["encoder"] == {
        "audio": "cnn1d", "visual": "cnn"}
    assert load_config(overrides=["model.encoder.audio=mlp"])["model"]["encoder"] == {"audio": "mlp"}
    for bad, what in [("model.encoder=cnn2", "is not one of"), ("model.encoder={audio: [1]}", "expected an encoder"),
                      ("model.encoder={audio: {name: cnn, freeze: true}}", "pretrained backbone"),
                      ("model.encoder={audio: {name: 'timm:resnet18', lr_factor: -1}}", "lr_factor"),
                      ("model.encoder=5", "expected an encoder name or a mapping")]:
        with pytest.raises(ConfigError, match=what):
            load_config(overrides=[bad])


def test_sensor_windows_train_from_the_cli_with_the_default_encoder(tmp_path, monkeypatch, capsys):
    """The issue's reproduction: 3 x 100 windows through --dataset my_pkg:build, model.encoder=auto
    (a traceback in max_pool2d before)."""
    (tmp_path / "watch_data.py").write_text(textwrap.dedent('''
        import torch
        from equimodal.data import TensorMultimodalDataset

        def part(n, seed):
            g = torch.Generator().manual_seed(seed)
            y = torch.randint(0, 4, (n,), generator=g)
            t = torch.linspace(0, 6.28, 100)
            acc = torch.sin(t * (1 + y[:, None, None])) + 0.5 * torch.randn(n, 3, 100, generator=g)
            gyro = torch.randn(n, 3, 100, generator=g) + 0.3 * y[:, None, None]
            return TensorMultimodalDataset({"acc": acc, "gyro": gyro}, y, 4)

        def build():
            return {"train": part(160, 0), "test": part(80, 1)}
        '''))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "watch_data:build", "--out", str(out), *[a for s in SMALL for a in ("--set", s)]])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test_acc_by_modality"]) == {"acc", "gyro"}
    assert main(["eval", "--checkpoint", str(out)]) == 0


class _Windows(torch.utils.data.Dataset):
    """A user's Dataset declaring its kinds; 8 x 64 would read as channels x time by the rule."""

    modality_kinds = {"grid": "image"}

    def __init__(self, n):
        self.x, self.y = torch.randn(n, 8, 64), torch.arange(n) % 2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"grid": self.x[i], "v": self.x[i, 0]}, int(self.y[i])


def test_a_users_dataset_declares_kinds_through_the_wrapper(tmp_path):
    cfg = load_config(overrides=SMALL)
    trainer = Trainer(cfg, out_dir=tmp_path / "run", echo=lambda s: None,
                      data={"train": _Windows(40), "test": _Windows(20)})
    assert type(trainer.model.encoder("grid")) is SmallCNN and type(trainer.model.encoder("v")) is MLPEncoder


def test_a_refused_shape_is_one_error_line_from_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "flat_data.py").write_text(textwrap.dedent('''
        import torch
        from equimodal.data import TensorMultimodalDataset

        def build():
            part = lambda n: TensorMultimodalDataset({"wrist": torch.randn(n, 3, 2, 100), "v": torch.randn(n, 4)},
                                                     torch.arange(n) % 2, 2)
            return {"train": part(20), "test": part(10)}
        '''))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["train", "--dataset", "flat_data:build", "--out", str(tmp_path / "run"),
               *[a for s in SMALL for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "'wrist'" in err[0]
    assert "(3, 2, 100)" in err[0] and "model.factory" in err[0]


def test_trailing_padding_does_not_change_the_token_features():
    torch.manual_seed(0)
    enc = TokenTransformer(vocab_size=50, max_len=20, width=8, out_dim=4).eval()
    ids = torch.randint(1, 50, (3, 20))
    ids[:, 7:] = 0
    ids[1, 3:] = 0
    longer = torch.cat([ids, torch.randint(1, 50, (1, 20))])  # a full-length row: nothing is trimmed
    assert torch.allclose(enc(ids), enc(longer)[:3], atol=1e-5)
