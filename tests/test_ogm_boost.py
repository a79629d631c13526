"""OGM-boost against methods.md section 2."""
import math

import pytest
import torch

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.ogm_boost import boost_coefficients


def test_boost_coefficients_hand_values_and_only_weak_modality():
    k = boost_coefficients(torch.tensor([0.5, 2.0]), alpha=0.8)
    assert k[0].item() == pytest.approx(1 + math.tanh(0.8 * (2 - 1)))
    assert k[1].item() == 1.0
    k3 = boost_coefficients(torch.tensor([0.25, 1.0, 3.0]), alpha=0.1)
    assert k3.tolist() == pytest.approx([1 + math.tanh(0.1 * 3), 1.0, 1.0])
    assert torch.all(boost_coefficients(torch.tensor([0.2, 0.999]), 1.0) < 2)


def _coefficients(mode, **kw):
    model = make_model()
    method = build_method("ogm-boost", mode=mode, **kw)
    method.setup(model)
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    method.before_step(model)
    return method.last_ratios, method.last_coefficients


@pytest.mark.parametrize("mode", ["boost", "suppress", "both", "fixed"])
def test_modes(mode):
    rho, k = _coefficients(mode)
    weak, strong = int(rho.argmin()), int(rho.argmax())
    if mode == "boost":
        assert k[weak] > 1 and k[strong] == 1
    if mode == "suppress":
        assert k[weak] == 1 and k[strong] < 1
    if mode == "both":
        assert k[weak] > 1 and k[strong] < 1
    if mode == "fixed":
        assert k[weak] == 4.0 and k[strong] == 1


def test_boost_scales_weak_encoder_gradient():
    model = make_model()
    method = build_method("ogm-boost", params="all")
    method.setup(model)
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    method.before_step(model)
    k = method.last_coefficients
    for i, m in enumerate(model.modalities):
        assert all(torch.allclose(p.grad, torch.full_like(p, k[i].item())) for p in model.encoder_parameters(m))
    assert all(torch.all(p.grad == 1) for p in model.head_parameters())


def test_sgn_noise_only_where_the_boost_acts():
    model = make_model()
    method = build_method("ogm-boost", noise="sgn", beta=1.0)
    method.setup(model)
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    raw = {m: [p.grad.clone() for p in method._params[m]] for m in model.modalities}
    method.before_step(model)
    k = method.last_coefficients
    for i, m in enumerate(model.modalities):
        diff = torch.cat([(p.grad - k[i] * g).flatten() for p, g in zip(method._params[m], raw[m])])
        if k[i] <= 1:
            assert torch.allclose(diff, torch.zeros_like(diff), atol=1e-7), "no noise where there is no boost"
        else:
            assert diff.abs().max() > 0


def test_bad_options():
    for bad in (dict(mode="x"), dict(noise="y"), dict(fixed_factor=0.5)):
        with pytest.raises(ValueError):
            build_method("ogm-boost", **bad)
