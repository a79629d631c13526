"""Pretrained backbones as encoders (models/pretrained.py), from tiny random configurations saved to
local folders: loading, freezing, the learning-rate factor and the errors for missing weights."""
import pytest
import torch

from equimodal.config import load_config
from equimodal.data import TensorMultimodalDataset
from equimodal.errors import ConfigError
from equimodal.models.auto import build_encoders
from equimodal.train import Trainer

MODEL = {"encoder": "auto", "width": 8, "feature_dim": 8, "norm": "batch"}
SMALL = ["train.epochs=1", "train.batch_size=16", "train.progress=false", "train.device=cpu", "model.width=8",
         "model.feature_dim=8", "train.probe=false", "optim.lr=0.1"]


def token_data(n=48, seed=0, vocab=30):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(2, vocab, (n, 8), generator=g)
    ids[:, 6:] = 0
    return TensorMultimodalDataset({"text": ids, "vec": torch.randn(n, 5, generator=g) + y[:, None]}, y, 2)


@pytest.fixture
def tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                                              "(pip install 'equimodal[transformers]')")
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", model


def test_hf_model_loads_its_weights_and_reads_token_ids(tiny_bert):
    folder, reference = tiny_bert
    data = token_data()
    enc = build_encoders({**MODEL, "encoder": {"text": {"name": f"hf:{folder}"}}}, data, ("text", "vec"))["text"]
    assert enc.out_dim == 16
    for (name, p), q in zip(enc.backbone.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), f"{name} loaded from the folder"
    assert enc(data[[0, 1, 2]][0]["text"]).shape == (3, 16)
    scratch = build_encoders({**MODEL, "encoder": {"text": {"name": f"hf:{folder}", "checkpoint": "scratch"}}},
                             data, ("text",))["text"]
    assert not torch.equal(next(scratch.backbone.parameters()), next(reference.parameters()))


def test_hf_freeze_and_lr_factor_in_training(tiny_bert, tmp_path):
    folder, reference = tiny_bert
    data = {"train": token_data(), "test": token_data(24, 1)}
    cfg = load_config(overrides=[*SMALL, f"model.encoder={{text: {{name: 'hf:{folder}', lr_factor: 0.1}}}}"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run", echo=lambda s: None, data=data)
    lrs = {g["modality"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["text"] == pytest.approx(0.01) and lrs["vec"] == pytest.approx(0.1)
    trainer.fit()
    assert not torch.equal(trainer.model.encoder("text").backbone.embeddings.word_embeddings.weight,
                           reference.embeddings.word_embeddings.weight), "fine-tuned"
    cfg = load_config(overrides=[*SMALL, f"model.encoder={{text: {{name: 'hf:{folder}', freeze: true}}}}"])
    frozen = Trainer(cfg, out_dir=tmp_path / "frozen", echo=lambda s: None, data=data)
    frozen.fit()
    backbone = frozen.model.encoder("text").backbone
    assert not backbone.training, "a frozen backbone stays in eval mode"
    for p, q in zip(backbone.parameters(), reference.parameters()):
        assert torch.equal(p, q), "frozen weights do not move"


def test_missing_weights_are_a_clear_error(tmp_path, tiny_bert):
    folder, _ = tiny_bert
    data = token_data()
    with pytest.raises(ConfigError, match="must be a local folder saved by save_pretrained"):
        build_encoders({**MODEL, "encoder": {"text": f"hf:{tmp_path / 'nowhere'}"}}, data, ("text",))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights in .*nothing is downloaded"):
        build_encoders({**MODEL, "encoder": {"text": f"hf:{folder}"}}, data, ("text",))


def test_timm_model_from_a_local_weights_file(tmp_path):
    try:
        import timm
    except Exception as exc:  # not installed, or a torchvision that does not match torch
        pytest.skip(f"timm is not usable here ({type(exc).__name__}: {exc}); pip install 'equimodal[timm]'")
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0, in_chans=3)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    g = torch.Generator().manual_seed(0)
    data = TensorMultimodalDataset({"image": torch.randn(8, 3, 32, 32, generator=g)}, torch.arange(8) % 2, 2)
    spec = {"image": {"name": "timm:test_resnet", "checkpoint": str(tmp_path / "w.pth"), "freeze": True}}
    enc = build_encoders({**MODEL, "encoder": spec}, data, ("image",))["image"]
    assert enc(data[[0, 1]][0]["image"]).shape == (2, reference.num_features)
    assert all(torch.equal(p, q) for p, q in zip(enc.backbone.parameters(), reference.parameters()))
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ConfigError, match="not found"):
        build_encoders({**MODEL, "encoder": {"image": {"name": "timm:test_resnet", "checkpoint": "missing.pth"}}},
                       data, ("image",))
    with pytest.raises(ConfigError, match="needs checkpoint"):
        build_encoders({**MODEL, "encoder": {"image": "timm:test_resnet"}}, data, ("image",))


def test_without_the_library_the_error_says_what_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name.split(".")[0] == "timm":
            raise ImportError("No module named 'timm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    data = TensorMultimodalDataset({"image": torch.randn(4, 3, 8, 8)}, torch.arange(4) % 2, 2)
    with pytest.raises(ConfigError, match=r"pip install 'equimodal\[timm\]'"):
        build_encoders({**MODEL, "encoder": {"image": {"name": "timm:resnet18", "checkpoint": "scratch"}}},
                       data, ("image",))
