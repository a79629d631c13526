"""LFM against peers.md B13 (and the note on the official code at the spec's end)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods.lfm import heuristic_alpha_cls, pairwise_divergence


def _logits(*dists):
    return torch.log(torch.tensor(dists, dtype=torch.float32)).unsqueeze(1)  # M x 1 x C


def test_js_and_code_form_on_hand_distributions():
    p, q, m = [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    z = _logits(p, q)
    js = 0.5 * (kl(p, m) + kl(q, m))
    code = 0.5 * (kl(m, p) + kl(m, q))
    assert js == pytest.approx(0.5 * (0.5 * math.log(5 / 7) + 0.5 * math.log(5 / 3)
                                      + 0.9 * math.log(9 / 7) + 0.1 * math.log(1 / 3)))
    assert pairwise_divergence(z, "js").item() == pytest.approx(js, rel=1e-5)
    assert pairwise_divergence(z, "code").item() == pytest.approx(code, rel=1e-5)
    assert abs(js - code) > 1e-3  # the two forms really differ
    # the code form is what the released Alignment() computes with F.kl_div
    pt, qt = torch.tensor([p]), torch.tensor([q])
    mt = 0.5 * (pt + qt)
    released = 0.5 * (F.kl_div(pt.log(), mt, reduction="batchmean") + F.kl_div(qt.log(), mt, reduction="batchmean"))
    assert pairwise_divergence(z, "code").item() == pytest.approx(released.item(), rel=1e-5)
    # identical distributions: 0; JS is bounded by ln 2
    assert pairwise_divergence(_logits(p, p)).item() == pytest.approx(0.0, abs=1e-7)
    assert pairwise_divergence(_logits([1 - 1e-6, 1e-6], [1e-6, 1 - 1e-6])).item() <= math.log(2) + 1e-6


def test_three_modalities_average_the_pairs():
    d = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]
    z = _logits(*d)
    pairs = [pairwise_divergence(_logits(d[i], d[j])).item() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert pairwise_divergence(z).item() == pytest.approx(sum(pairs) / 3, rel=1e-5)


def test_polynomial_schedule_at_a_few_epochs():
    assert heuristic_alpha_cls(0) == pytest.approx(0.204623704)
    assert heuristic_alpha_cls(100) == pytest.approx(0.539155196, abs=1e-6)  # spec: ~0.54
    assert heuristic_alpha_cls(200) == pytest.approx(0.902075758, abs=1e-6)  # spec: ~0.9
    assert heuristic_alpha_cls(50) == pytest.approx(0.436680697, abs=1e-6)
    assert heuristic_alpha_cls(300) == heuristic_alpha_cls(200)  # held beyond the fitted range
    assert heuristic_alpha_cls(15, schedule_epochs=30) == pytest.approx(heuristic_alpha_cls(100))
    method = build_method("lfm")
    method.on_epoch_start(100)
    assert method.alpha_align == pytest.approx(1 - 0.539155196, abs=1e-6)


def test_loss_is_twice_the_weighted_sum():
    model = make_model()
    method = build_method("lfm", schedule="fixed", alpha_align=0.3)
    method.setup(model, seed=0)
    x, y = fake_batch()
    out = model(x)
    terms = method.loss(out, y)
    z = torch.stack([method.heads[m](out.features[m]) for m in ("audio", "visual")])
    ce = F.cross_entropy(z.mean(0), y)
    assert terms["ce"].item() == pytest.approx(2 * 0.7 * ce.item(), rel=1e-5)
    assert terms["align"].item() == pytest.approx(2 * 0.3 * pairwise_divergence(z).item(), rel=1e-5)
    assert torch.allclose(method.predict(out), z.mean(0), atol=1e-6)


def test_clipped_alpha_step_and_halving_lr():
    method = build_method("lfm", schedule="learnable", alpha_align=0.5, lr_alpha=0.1)
    assert method.alpha_step(0, 1.0) == pytest.approx(0.4)           # 0.5 - 0.1 * 1
    assert method.alpha_step(20, 1.0) == pytest.approx(0.35)          # lr halved at epoch 20
    assert method.alpha_step(45, -2.0) == pytest.approx(0.4)          # lr / 4 from epoch 40
    assert method.alpha_step(0, -100.0) == 0.95                       # clipped above
    assert method.alpha_step(0, 100.0) == 0.05                        # clipped below
    assert method.lr_alpha_at(19) == 0.1 and method.lr_alpha_at(39) == 0.05


def _learnable(hypergradient="unrolled", double=False):
    x, y = fake_batch(n=8, size=8, seed=3)
    if double:
        x = {m: v.double() for m, v in x.items()}
    data = TensorMultimodalDataset(x, y, 5)
    model = make_model(width=4, dim=6)
    method = build_method("lfm", schedule="learnable", alpha_align=0.5, hypergradient=hypergradient,
                          alpha_batch_size=8)
    method.attach_data(MethodData(train=data.subset(torch.arange(4)), val=data.subset(torch.arange(4, 8))))
    if double:
        model = model.double()
    method.setup(model, seed=0)
    if double:
        method.heads.double()
    return model, method


def test_unrolled_hypergradient_matches_finite_difference_of_one_step():
    """g = d/dalpha CE(theta - eta grad L(theta, alpha)) / eta for a small eta (float64, eval mode)."""
    model, method = _learnable(double=True)
    inputs, targets = method._alpha_batch(0)
    g = method.hypergradient_value(0)
    model.eval()
    params = [*model.encoder_parameters("audio"), *model.encoder_parameters("visual"), *method.parameters()]
    start = [p.detach().clone() for p in params]

    def losses():
        out = model(inputs)
        z = torch.stack([method.heads[m](out.features[m]) for m in ("audio", "visual")])
        return F.cross_entropy(z.mean(0), targets), pairwise_divergence(z.double())

    def ce_after_step(alpha, eta=1e-7):
        ce, j = losses()
        grads = torch.autograd.grad(2 * ((1 - alpha) * ce + alpha * j), params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p.sub_(eta * gr)
            after = losses()[0].item()
            for p, s in zip(params, start):
                p.copy_(s)
        return after

    eps, eta = 0.25, 1e-7
    fd = (ce_after_step(0.5 + eps) - ce_after_step(0.5 - eps)) / (2 * eps) / eta
    assert g == pytest.approx(fd, rel=1e-3)
    assert model.training is False  # we set eval above; the method restores the mode it found
    model.train()
    method.hypergradient_value(0)
    assert model.training


def test_learnable_epoch_start_moves_alpha_deterministically_and_leaves_model_alone():
    model, method = _learnable()
    bn_before = {k: v.clone() for k, v in model.state_dict().items()}
    method.on_epoch_start(0)
    first, g = method.alpha_align, method.last_hypergradient
    assert first == pytest.approx(min(0.95, max(0.05, 0.5 - 1e-4 * g)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items()), "BN statistics unchanged"
    assert all(p.grad is None for p in model.parameters())
    assert method.hypergradient_value(0) == g  # same batch for the same (seed, epoch): resumable
    method.hypergradient = "official"  # the released form: a double backward, first tensor only
    assert math.isfinite(method.hypergradient_value(0))


def test_learnable_needs_a_split():
    model, method = _learnable()
    method.data.val = None
    with pytest.raises(RuntimeError, match="validation"):
        method.on_epoch_start(0)


def test_state_round_trip():
    model, method = _learnable()
    method.alpha_align = 0.42
    state = method.state_dict()
    fresh = build_method("lfm", schedule="learnable")
    fresh.setup(make_model(width=4, dim=6), seed=0)
    fresh.load_state_dict(state)
    assert fresh.alpha_align == 0.42
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), method.parameters()))


@pytest.mark.parametrize("options, word", [
    ({"schedule": "cosine"}, "schedule"), ({"divergence": "kl"}, "divergence"), ({"alpha_batch": "test"}, "alpha_batch"),
    ({"hypergradient": "exact"}, "hypergradient"), ({"alpha_align": 1.5}, "alpha_align"),
    ({"schedule": "learnable", "alpha_align": 0.99}, "alpha_align"), ({"schedule_epochs": 0}, "schedule_epochs"),
    ({"lr_alpha": -1}, "lr_alpha"), ({"lr_alpha_halve_every": 2.5}, "lr_alpha_halve_every"),
    ({"alpha_batch_size": 0}, "alpha_batch_size")])
def test_bad_options_are_named(options, word):
    with pytest.raises(ValueError, match=word):
        build_method("lfm", **options)
