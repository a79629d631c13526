"""Trainer and CLI on the real default data generator, with a tiny budget."""
import json

import pytest
import torch

from equimodal.cli import main
from equimodal.config import load_config
from equimodal.train import Trainer, load_checkpoint
from conftest import recomputed_test_acc


def _strip(history):
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


def test_short_run_improves_over_chance_and_writes_outputs(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["method.name=ogm-ge", "train.epochs=4"])
    summary = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    chance = 1 / cfg["data"]["num_classes"]
    assert summary["test_acc"] > chance + 0.25, summary
    for key in ("test_acc", "test_macro_f1", "test_acc_by_modality", "method", "dataset", "seed", "epochs", "seconds"):
        assert key in summary
    assert set(summary["test_acc_by_modality"]) == {"visual", "audio"}
    assert set(summary["probe_acc_by_modality"]) == {"visual", "audio"}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_acc"] == summary["test_acc"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    rec = json.loads(lines[-1])
    assert {"k/visual", "k/audio", "rho/visual", "rho/audio", "val_acc", "train_loss"} <= set(rec)
    assert load_config(tmp_path / "config.yaml") == cfg
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # weights-only load works
    assert state["epoch"] == 4


def test_same_seed_same_numbers_on_cpu(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["method.name=ogm-ge"])
    a = Trainer(cfg, out_dir=tmp_path / "a", echo=lambda s: None).fit()
    b = Trainer(cfg, out_dir=tmp_path / "b", echo=lambda s: None).fit()
    assert a["test_acc"] == b["test_acc"] and a["probe_acc_by_modality"] == b["probe_acc_by_modality"]
    c = Trainer(load_config(overrides=tiny_overrides + ["method.name=ogm-ge", "train.seed=1"]),
                out_dir=tmp_path / "c", echo=lambda s: None)
    c.fit()
    assert _strip(c.history) != _strip(Trainer.resume(tmp_path / "a", echo=lambda s: None).history)


@pytest.mark.parametrize("extra", [["method.name=ogm-ge"], ["method.name=ogm", "optim.name=adam", "optim.lr=1e-3",
                                                             "method.level=update", "optim.schedule=cosine"]])
def test_interrupted_and_resumed_run_ends_with_the_same_metrics(tmp_path, tiny_overrides, extra):
    cfg = load_config(overrides=tiny_overrides + extra + ["train.epochs=3", "optim.step_size=2"])
    full = Trainer(cfg, out_dir=tmp_path / "full", echo=lambda s: None)
    full_summary = full.fit()

    interrupted = Trainer(cfg, out_dir=tmp_path / "cut", echo=lambda s: None)
    original = interrupted.method.before_step
    calls = {"n": 0}
    steps_per_epoch = -(-len(interrupted.splits.train) // cfg["train"]["batch_size"])

    def crash_midway(model):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:  # three steps into the second epoch
            raise KeyboardInterrupt
        return original(model)

    interrupted.method.before_step = crash_midway
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1

    resumed = Trainer.resume(tmp_path / "cut", echo=lambda s: None)
    resumed_summary = resumed.fit()
    assert _strip(resumed.history) == _strip(full.history)
    for key in ("test_acc", "test_macro_f1", "test_acc_by_modality", "probe_acc_by_modality"):
        assert resumed_summary[key] == full_summary[key], key
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_best_val_selection_reports_the_chosen_epoch(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["train.select=best_val", "train.epochs=3", "train.probe=false"])
    t = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    s = t.fit()
    best = max(range(3), key=lambda e: (t.history[e]["val_acc"], -e))
    assert s["selected_epoch"] == best and s["selection"] == "best_val"
    assert s["val_acc"] == t.history[best]["val_acc"]


@pytest.mark.parametrize("fusion", ["sum", "late", "film", "gated"])
def test_ogm_ge_trains_with_every_fusion(tmp_path, tiny_overrides, fusion):
    cfg = load_config(overrides=tiny_overrides + ["method.name=ogm-ge", f"model.fusion={fusion}", "train.epochs=1",
                                                  "train.probe=false"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    s = trainer.fit()
    assert s["estimator"] == ("exact" if fusion in ("sum", "late") else "probe")
    assert s["test_acc"] == pytest.approx(recomputed_test_acc(trainer), abs=1e-12)


def test_three_modality_variant(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["data.name=synthetic3", "method.name=ogm-ge", "train.epochs=1"])
    t = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    s = t.fit()
    assert s["modalities"] == ["visual", "audio", "tactile"]
    assert {"k/tactile", "rho/tactile"} <= set(t.history[-1])


def test_cli_train_eval_resume_and_methods(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "ogm-ge", "--out", str(out), "--no-progress"]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "test accuracy (fused)" in printed and "k visual" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acc"] == pytest.approx(summary["test_acc"])
    assert main(["train", "--resume", str(out)]) == 0  # already finished: re-reports, trains nothing
    assert json.loads((out / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    capsys.readouterr()
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    for name in ("joint", "ogm", "ogm-ge"):
        assert any(line.split()[0] == name for line in listed.splitlines())
