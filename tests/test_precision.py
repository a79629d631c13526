"""Mixed precision (bf16, fp16 with a gradient scaler) and gradient accumulation through the trainer."""
import pytest
import torch

from equimodal.config import load_config
from equimodal.train import Trainer


def trainer(tmp_path, tiny_overrides, *extra):
    cfg = load_config(overrides=tiny_overrides + ["train.probe=false", *extra])
    return Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(tmp_path, tiny_overrides, precision):
    t = trainer(tmp_path, tiny_overrides, "method.name=ogm-ge", f"train.precision={precision}", "train.epochs=3")
    summary = t.fit()
    assert summary["precision"] == precision
    assert summary["test_acc"] > 0.3, summary["test_acc"]  # chance is 0.1


def test_a_step_the_scaler_skips_leaves_the_method_state_unchanged(tmp_path, tiny_overrides):
    t = trainer(tmp_path, tiny_overrides, "method.name=ogm-ge", "train.precision=fp16", "train.epochs=1")
    param = next(t.model.encoder("audio").parameters())
    calls = {"n": 0}

    def overflow_on_third_step(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad

    param.register_hook(overflow_on_third_step)
    seen = []
    original = t.method.before_step

    def record(model):
        seen.append((t.method.step, t.method._trace.clone() if t.method._trace is not None else None))
        original(model)

    t.method.before_step = record
    scales = []
    original_update = t.scaler.update

    def recording_update(*a, **k):
        original_update(*a, **k)
        scales.append(t.scaler.get_scale())

    t.scaler.update = recording_update
    t.fit()
    # the 3rd step overflowed: the scale halved, and the 4th step saw the state the 3rd step saw
    assert scales[2] == scales[1] / 2
    assert seen[3][0] == seen[2][0] and torch.equal(seen[3][1], seen[2][1])
    assert t.scaler_skips == 1
    steps = -(-540 // 50)
    assert t.optimizer_steps == steps - 1 and t.method.step == steps - 1


def test_accumulation_uses_the_statistics_of_the_whole_effective_batch(tmp_path, tiny_overrides):
    """K micro-batches of b give the same OGM coefficients as one batch of K*b (per-sample norm)."""
    ks = {}
    for name, extra in (("big", ["train.batch_size=60"]), ("acc", ["train.batch_size=30", "train.accumulate=2"])):
        t = trainer(tmp_path / name, tiny_overrides, "method.name=ogm", "model.norm=group", "train.epochs=1",
                    "data.n_train=400", *extra)
        seen = []
        original = t.method.before_step

        def record(model, original=original, seen=seen, t=t):
            original(model)
            seen.append(t.method.last_coefficients.clone())

        t.method.before_step = record
        t.fit()
        ks[name] = seen
    assert len(ks["big"]) == len(ks["acc"]) == 6
    for a, b in zip(ks["big"], ks["acc"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
