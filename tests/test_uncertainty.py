"""Uncertainty weighting against methods.md section 3."""
import math

import pytest
import torch

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.uncertainty import uncertainty_weighted_loss


def test_loss_value_and_log_variance_gradient_by_hand():
    losses = torch.tensor([2.0, 0.5, 1.0])
    s = torch.tensor([0.0, 1.0, -0.5], requires_grad=True)
    total = uncertainty_weighted_loss(losses, s)
    expected = sum(math.exp(-si) * li + si / 2 for li, si in zip([2.0, 0.5, 1.0], [0.0, 1.0, -0.5]))
    assert total.item() == pytest.approx(expected)
    total.backward()
    # d/ds [exp(-s) L + s/2] = -exp(-s) L + 1/2
    assert s.grad.tolist() == pytest.approx([-math.exp(-si) * li + 0.5 for li, si in zip([2.0, 0.5, 1.0], [0.0, 1.0, -0.5])])


def test_method_terms_match_the_formula_and_train_the_heads_and_encoders():
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=0.1)
    method = build_method("uncertainty")
    method.setup(model, opt)
    assert len(opt.param_groups) == 5, "heads and log-variances were added to the optimizer"
    own = opt.param_groups[-1]
    assert own["params"] == [method.log_vars] and own["momentum"] == 0 and own["weight_decay"] == 0
    x, y = fake_batch()
    out = model(x)
    terms = method.loss(out, y)
    ce = torch.nn.functional.cross_entropy
    expected = ce(out.logits, y) + sum(ce(method.heads[m](out.features[m]), y) for m in model.modalities)
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)  # s = 0 at start
    sum(terms.values()).backward()
    assert method.log_vars.grad is not None and method.log_vars.grad.shape == (3,)
    assert all(p.grad is not None for p in model.encoder_parameters("audio"))
    method.before_step(model)
    opt.step()
    log = method.log()
    assert set(log) == {"weight/fused", "weight/audio", "weight/visual"}


def test_weights_move_towards_the_harder_task():
    model = make_model()
    method = build_method("uncertainty")
    method.setup(model)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    x, y = fake_batch()
    with torch.no_grad():
        out = model(x)
    for _ in range(50):
        opt.zero_grad()
        sum(method.loss(out, y).values()).backward()
        opt.step()
    # the optimum of exp(-s) L + s/2 is s = log(2 L): larger loss -> smaller weight exp(-s)
    ce = torch.nn.functional.cross_entropy
    losses = torch.stack([ce(out.logits, y)] + [ce(method.heads[m](out.features[m]), y) for m in model.modalities])
    assert torch.argmax(losses) == torch.argmin(method.log_vars.detach().neg())


def test_with_ogm_ge_modulation():
    model = make_model()
    method = build_method("uncertainty", modulation="ogm-ge")
    method.setup(model, torch.optim.SGD(model.param_groups(), lr=0.1))
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    method.before_step(model)
    assert "k/audio" in method.log()


def _train_weights(method_options: dict, steps: int = 150, lr: float = 0.05) -> torch.Tensor:
    """Many SGD steps (momentum 0.9, as the trainer's default) on one fixed batch, so that every
    task's loss falls towards 0; returns the largest weight exp(-s) seen after any step."""
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=lr, momentum=0.9, weight_decay=1e-4)
    method = build_method("uncertainty", **method_options)
    method.setup(model, opt)
    x, y = fake_batch(n=12)
    largest = torch.zeros(3)
    for _ in range(steps):
        opt.zero_grad()
        sum(method.loss(model(x), y).values()).backward()
        method.before_step(model)
        opt.step()
        method.after_step(model)
        largest = torch.maximum(largest, torch.exp(-method.log_vars.detach()))
    return largest


def test_weights_stay_bounded_over_a_long_run_where_the_papers_form_grows_without_bound():
    bounded = _train_weights({})
    assert bool((bounded <= 1.0 + 1e-6).all()), bounded
    unconstrained = _train_weights({"max_weight": float("inf"), "plain_optimizer": True})
    # 1/(2L) as the losses fall, until the run diverges (NaN): the reported failure
    assert float(torch.nan_to_num(unconstrained, nan=float("inf")).max()) > 3.0, unconstrained
    looser = _train_weights({"max_weight": 2.0})
    assert bool((looser <= 2.0 + 1e-6).all()) and float(looser.max()) > 1.5


def test_log_variances_take_their_own_learning_rate():
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=0.2, momentum=0.9)
    method = build_method("uncertainty", weight_lr_scale=0.25)
    method.setup(model, opt)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.05) and opt.param_groups[-2]["lr"] == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [{"max_weight": 0}, {"max_weight": -1.0}, {"weight_lr_scale": 0}])
def test_bad_stability_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_method("uncertainty", **bad)
