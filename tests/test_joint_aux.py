"""joint-aux: CE(fused) + weight * sum_m CE(own head of m), checked against an explicit loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.config import ConfigError, load_config
from equimodal.methods import build_method


def test_loss_is_fused_ce_plus_weighted_unimodal_ce_by_hand():
    # hand-placed logits: two samples, two classes
    fused = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    uni = {"audio": torch.tensor([[1.0, 1.0], [3.0, 0.0]]), "visual": torch.tensor([[0.0, 2.0], [0.0, 0.0]])}
    y = torch.tensor([0, 1])
    from equimodal.methods.joint_aux import joint_aux_loss
    terms = joint_aux_loss(fused, uni, y, weight=0.5)

    def ce(row, label):  # -log softmax(row)[label], written out
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    expected_fused = (ce([2.0, 0.0], 0) + ce([0.0, 1.0], 1)) / 2
    expected_audio = 0.5 * (ce([1.0, 1.0], 0) + ce([3.0, 0.0], 1)) / 2
    expected_visual = 0.5 * (ce([0.0, 2.0], 0) + ce([0.0, 0.0], 1)) / 2
    assert terms["ce"].item() == pytest.approx(expected_fused, rel=1e-6)
    assert terms["aux/audio"].item() == pytest.approx(expected_audio, rel=1e-6)
    assert terms["aux/visual"].item() == pytest.approx(expected_visual, rel=1e-6)


def test_heads_read_the_encoder_features_and_train_the_encoders():
    model = make_model()
    method = build_method("joint-aux", weight=2.0)
    opt = torch.optim.SGD(model.param_groups(), lr=0.1)
    method.setup(model, opt, seed=0)
    x, y = fake_batch()
    out = model(x)
    terms = method.loss(out, y)
    for m in ("audio", "visual"):
        z = method.heads[m](out.features[m])
        assert torch.allclose(terms[f"aux/{m}"], 2.0 * F.cross_entropy(z, y))
    assert torch.allclose(terms["ce"], F.cross_entropy(out.logits, y))
    # the auxiliary term alone reaches its encoder (features are not detached) and nothing else's
    model.zero_grad()
    terms["aux/audio"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_parameters("audio"))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder_parameters("visual"))
    assert torch.equal(method.predict(out), out.logits)  # predicts with the fused head, as joint
    assert method.predicts == "fused"


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), True])
def test_a_weight_that_is_not_positive_and_finite_is_refused_naming_the_option(weight):
    with pytest.raises(ConfigError, match="weight"):
        load_config(overrides=["method.name=joint-aux", f"method.weight={weight}"])


def test_a_model_without_a_feature_for_a_modality_is_a_named_error():
    model = make_model()
    method = build_method("joint-aux")
    method.setup(model, None, seed=0)
    x, y = fake_batch()
    out = model(x)
    out.features.pop("visual")
    with pytest.raises(ValueError, match="no feature for \\['visual'\\]"):
        method.loss(out, y)
