"""Each method declares what its evaluation predicts with (``Method.predicts``, shown in every
results table); the declaration is checked against what ``predict`` of its last stage does."""
import pytest
import torch

from conftest import fake_batch, make_model
from equimodal.methods import available_methods, build_method
from test_method_contract import tiny_data

PREDICTORS = ("fused", "own heads", "mixed")


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_declared_predictor_matches_predict(name):
    method = build_method(name)
    assert method.predicts in PREDICTORS
    last = method.stages()[-1]
    runner = last.method or method
    model = make_model(("audio", "visual", "text"))
    runner.on_stage_start(last.name, resumed=False)
    runner.attach_data(tiny_data())
    runner.setup(model, torch.optim.SGD(model.param_groups(), lr=0.01), seed=0)
    model.eval()
    x, _ = fake_batch(("audio", "visual", "text"))
    with torch.no_grad():
        out = model(x)
        is_fused = torch.equal(runner.predict(out), out.logits)
    assert is_fused == (method.predicts == "fused"), f"{name} declares predicts={method.predicts!r}"
