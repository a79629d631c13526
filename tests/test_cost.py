"""Training cost is counted, not declared: passes through each encoder per optimizer step."""
import pytest

from equimodal.config import load_config
from equimodal.train import Trainer


@pytest.mark.parametrize("name, forward, no_grad, backward, epochs", [
    ("joint", 1.0, 0.0, 1.0, 2),
    ("mmpareto", 1.0, 0.0, 2.0, 2),   # a separate backward pass of each unimodal loss
    ("agm", 1.0, 2.0, 1.0, 2),        # 2^M - 1 zero-padded coalitions (M = 2) from one real and one
                                      # zeroed no-grad pass per encoder
    ("distill", None, None, None, 6),  # three stages
])
def test_counted_passes_per_step(tmp_path, tiny_overrides, name, forward, no_grad, backward, epochs):
    cfg = load_config(overrides=tiny_overrides + [f"method.name={name}", "train.probe=false"])
    summary = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    cost = summary["cost"]
    steps_per_epoch = -(-540 // 50)  # 600 samples, 10% validation, batches of 50
    assert cost["epochs"] == epochs and cost["optimizer_steps"] == epochs * steps_per_epoch
    if forward is not None:
        assert cost["forward_per_step"] == pytest.approx(forward)
        assert cost["forward_no_grad_per_step"] == pytest.approx(no_grad)
        assert cost["backward_per_step"] == pytest.approx(backward)
    passes = cost["encoder_passes"]
    assert set(passes) == {"visual", "audio"}
