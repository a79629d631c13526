"""Config: defaults, YAML, overrides, and errors that name the key before any training."""
import pytest

from equimodal.cli import main
from equimodal.config import ConfigError, load_config


def test_defaults_resolve_and_fill_method_and_data_options():
    cfg = load_config(overrides=["method.name=ogm-ge"])
    assert cfg["method"]["alpha"] == 0.8 and cfg["method"]["params"] == "conv"
    assert cfg["data"]["visual_noise"] >= 0 and cfg["data"]["modalities"] == ["visual", "audio"]


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: ogm\n  alpha: 0.3\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.epochs=5", "optim.lr=1e-3"])
    assert cfg["method"] == {**cfg["method"], "name": "ogm", "alpha": 0.3}
    assert cfg["train"]["epochs"] == 5 and cfg["optim"]["lr"] == 0.001


@pytest.mark.parametrize("override,named", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epoch=3", "train.epoch"),
    ("nosuch.key=1", "nosuch"),
    ("model.fusion=attention", "model.fusion"),
    ("optim.name=rmsprop", "optim.name"),
    ("method.name=nosuch", "nosuch"),
    ("data.name=nosuch", "nosuch"),
    ("data.bogus=1", "data.bogus"),
    ("method.name=ogm-ge", None),
    ("train.batch_size=0", "train.batch_size"),
    ("train.device=tpu", "train.device"),
])
def test_errors_name_the_key(override, named):
    if named is None:
        load_config(overrides=[override])
        return
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_method_value_and_unknown_method_option():
    with pytest.raises(ConfigError, match="params"):
        load_config(overrides=["method.name=ogm-ge", "method.params=bias"])
    with pytest.raises(ConfigError, match=r"method\.beta"):
        load_config(overrides=["method.name=ogm-ge", "method.beta=1"])
    with pytest.raises(ConfigError, match=r"method\.alpha"):  # joint has no alpha
        load_config(overrides=["method.alpha=1"])


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_stops_before_training_on_bad_config(tmp_path, capsys):
    rc = main(["train", "--set", "train.epochz=2", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
