"""OGM / OGM-GE against methods.md section 1."""
import math

import pytest
import torch
from torch import nn

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods._scores import discrepancy_ratios, ogm_coefficients, true_class_scores
from equimodal.methods.ogm_ge import modulated_parameters


def test_coefficient_matches_hand_values():
    rho = torch.tensor([0.5, 1.0, 1.0001, 2.0])
    k = ogm_coefficients(rho, alpha=0.1)
    # rho <= 1 -> 1 (tie: neither damped); just above 1 -> 1 - tanh(0.1) ~ 0.90; rho 2 -> 1 - tanh(0.2) ~ 0.80
    assert k[0] == 1 and k[1] == 1
    assert k[2].item() == pytest.approx(1 - math.tanh(0.100010), abs=1e-6)
    assert k[2].item() == pytest.approx(0.9003, abs=1e-3)
    assert k[3].item() == pytest.approx(0.8026, abs=1e-3)
    k8 = ogm_coefficients(torch.tensor([1.0001, 2.0]), alpha=0.8)
    assert k8[0].item() == pytest.approx(0.336, abs=1e-3)
    assert k8[1].item() == pytest.approx(0.0783, abs=1e-3)


def test_continuous_coefficient_has_no_jump():
    k = ogm_coefficients(torch.tensor([0.5, 1.0, 1.0001, 2.0]), alpha=0.8, form="continuous")
    assert k[:2].tolist() == [1.0, 1.0]
    assert k[2].item() == pytest.approx(1 - math.tanh(0.8 * 0.0001), abs=1e-6)
    assert k[3].item() == pytest.approx(1 - math.tanh(0.8), abs=1e-6)


def test_ratio_two_and_n_modalities():
    s = torch.tensor([6.0, 3.0])
    assert discrepancy_ratios(s).tolist() == pytest.approx([2.0, 0.5])
    s3 = torch.tensor([6.0, 3.0, 1.0])
    # rho_u = s_u / mean of the others
    assert discrepancy_ratios(s3).tolist() == pytest.approx([6 / 2.0, 3 / 3.5, 1 / 4.5])


def test_vectorised_scores_equal_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    logits = {"a": torch.randn(17, 7, generator=g), "v": torch.randn(17, 7, generator=g), "t": torch.randn(17, 7, generator=g)}
    y = torch.randint(0, 7, (17,), generator=g)
    fast = true_class_scores(logits, y)
    for j, m in enumerate(logits):
        ref = 0.0
        for i in range(17):
            p = torch.softmax(logits[m][i], dim=0)
            ref += float(p[y[i]])
        assert fast[j].item() == pytest.approx(ref, rel=1e-5)


def _step_with_ones(method, model, batch, epoch=0):
    """Forward + loss, then replace every gradient by ones so modulation is easy to read."""
    method.on_epoch_start(epoch)
    x, y = batch
    out = model(x)
    sum(method.loss(out, y).values()).backward()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    method.before_step(model)
    return method.last_coefficients


@pytest.mark.parametrize("params", ["conv", "all"])
def test_exactly_the_intended_parameters_are_modulated(params):
    model = make_model()
    method = build_method("ogm", alpha=0.8, params=params)
    method.setup(model)
    k = _step_with_ones(method, model, fake_batch())
    assert (k < 1).sum() == 1, "exactly one of two modalities is damped"
    for i, m in enumerate(model.modalities):
        selected = {id(p) for p in modulated_parameters(model.encoder(m), params)}
        for name, p in model.encoder(m).named_parameters():
            expected = k[i].item() if id(p) in selected else 1.0
            assert torch.allclose(p.grad, torch.full_like(p, expected)), (m, name)
        if params == "conv":  # the paper's rule: conv weights only, BN untouched
            assert all(p.dim() == 4 for n, p in model.encoder(m).named_parameters() if id(p) in selected)
            assert any(p.dim() == 1 for p in model.encoder(m).parameters())
    for p in model.head_parameters():
        assert torch.all(p.grad == 1), "the fusion head is never modulated"


def test_conv_selection_on_encoder_without_convs_is_a_named_error():
    from equimodal.models import MLPEncoder, MultimodalModel
    model = MultimodalModel({"a": MLPEncoder(4, 8, 6), "b": MLPEncoder(4, 8, 6)}, 3)
    with pytest.raises(ValueError, match="params='all'"):
        build_method("ogm-ge").setup(model)
    build_method("ogm-ge", params="all").setup(model)


def test_ge_noise_has_the_per_tensor_std_of_the_unmodulated_gradient():
    torch.manual_seed(0)
    enc = {m: nn.Sequential(nn.Conv2d(1, 64, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten()) for m in ("a", "v")}
    for e in enc.values():
        e.out_dim = 64
    from equimodal.models import MultimodalModel
    model = MultimodalModel(enc, 4)
    method = build_method("ogm-ge", alpha=0.8)
    method.setup(model, seed=3)
    x = {m: torch.randn(8, 1, 8, 8) for m in ("a", "v")}
    y = torch.randint(0, 4, (8,))
    sum(method.loss(model(x), y).values()).backward()
    original, stds = {}, {}
    for m in ("a", "v"):
        w = model.encoder(m)[0].weight
        w.grad = torch.randn_like(w) * (3.0 if m == "a" else 0.5)  # 1600 elements
        original[m], stds[m] = w.grad.clone(), w.grad.std().item()
    method.before_step(model)
    k = method.last_coefficients
    for i, m in enumerate(("a", "v")):
        w = model.encoder(m)[0].weight
        noise = w.grad - k[i] * original[m]
        # noise added to every encoder's modulated tensors, also where k = 1, with std(g) of the raw g
        assert noise.std().item() == pytest.approx(stds[m], rel=0.1)
        assert abs(noise.mean().item()) < 0.15 * stds[m]


def test_noise_is_reproducible_from_seed_and_step():
    def grads(seed):
        model = make_model()
        method = build_method("ogm-ge")
        method.setup(model, seed=seed)
        x, y = fake_batch()
        sum(method.loss(model(x), y).values()).backward()
        method.before_step(model)
        return torch.cat([p.grad.flatten() for p in model.encoder_parameters("audio")])
    assert torch.equal(grads(1), grads(1))
    assert not torch.equal(grads(1), grads(2))


def test_modulation_window_is_respected():
    method = build_method("ogm-ge", modulation_starts=2, modulation_ends=3)
    model = make_model()
    method.setup(model)
    for epoch, inside in [(0, False), (1, False), (2, True), (3, True), (4, False)]:
        model.zero_grad()
        _step_with_ones(method, model, fake_batch(), epoch=epoch)
        touched = any(not torch.all(p.grad == 1) for m in model.modalities for p in model.encoder_parameters(m))
        assert touched == inside, epoch


def test_update_level_scales_learning_rate_for_one_step_only():
    model = make_model()
    opt = torch.optim.Adam(model.param_groups(), lr=0.1)
    method = build_method("ogm", level="update")
    method.setup(model, opt)
    k = _step_with_ones(method, model, fake_batch())
    lrs = {g["modality"]: g["lr"] for g in opt.param_groups}
    for i, m in enumerate(model.modalities):
        assert lrs[m] == pytest.approx(0.1 * k[i].item())
        assert all(torch.all(p.grad == 1) for p in model.encoder_parameters(m)), "gradients untouched"
    assert lrs[None] == 0.1
    method.after_step(model)
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


def test_update_level_needs_tagged_groups():
    model = make_model()
    with pytest.raises(ValueError, match="parameter group per modality"):
        build_method("ogm", level="update").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_three_modalities_use_the_n_modality_ratio():
    model = make_model(("a", "b", "c"))
    method = build_method("ogm-ge")
    method.setup(model)
    x, y = fake_batch(("a", "b", "c"))
    out = model(x)
    method.loss(out, y)
    expected = discrepancy_ratios(true_class_scores(out.unimodal_logits, y, model.modalities))
    sum(method.loss(model(x), y).values()).backward()  # second micro-batch: sums accumulate
    method.before_step(model)
    assert torch.allclose(method.last_ratios, expected, atol=1e-5)


def test_scores_are_all_reduced(monkeypatch):
    """Under torch.distributed the packed scores go through one all-reduce before rho is formed."""
    import equimodal.methods.ogm_ge as ogm_mod
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        t[1] *= 4  # as if other ranks saw a much more confident second modality
        return t

    monkeypatch.setattr(ogm_mod, "all_reduce_sum", fake_all_reduce)
    model = make_model()
    method = build_method("ogm")
    method.setup(model)
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    method.before_step(model)
    assert len(calls) == 1 and calls[0].numel() == 3  # [s_a, s_v, count]
    s = calls[0][:2] * torch.tensor([1.0, 4.0])
    assert torch.allclose(method.last_ratios, torch.stack([s[0] / s[1], s[1] / s[0]]))


def test_before_step_without_loss_is_an_error():
    model = make_model()
    method = build_method("ogm-ge")
    method.setup(model)
    with pytest.raises(RuntimeError, match="no loss"):
        method.before_step(model)


def test_needs_two_modalities():
    with pytest.raises(ValueError, match="at least 2 modalities"):
        build_method("ogm-ge").setup(make_model(("audio",)))


@pytest.mark.parametrize("bad", [dict(alpha=-1), dict(params="bias"), dict(level="x"), dict(coefficient="y"),
                                 dict(modulation_starts=5, modulation_ends=2)])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=list(bad)[-1].split("_")[0]):
        build_method("ogm-ge", **bad)


def test_the_three_n_modality_ratio_rules_by_hand_and_equal_for_two():
    from equimodal.methods._scores import discrepancy_ratios
    s = torch.tensor([4.0, 2.0, 1.0])
    assert discrepancy_ratios(s, "mean").tolist() == pytest.approx([4 / 1.5, 2 / 2.5, 1 / 3.0])
    assert discrepancy_ratios(s, "min").tolist() == pytest.approx([4.0, 2.0, 1.0])
    assert discrepancy_ratios(s, "pairwise").tolist() == pytest.approx([(4 / 2 + 4 / 1) / 2, (2 / 4 + 2 / 1) / 2,
                                                                        (1 / 4 + 1 / 2) / 2])
    two = torch.tensor([3.0, 2.0])  # two modalities: the same coefficients under every rule (the weaker keeps 1)
    for rule in ("mean", "min", "pairwise"):
        k = ogm_coefficients(discrepancy_ratios(two, rule), alpha=0.8)
        assert k.tolist() == pytest.approx([1 - math.tanh(0.8 * 1.5), 1.0])
    with pytest.raises(ValueError, match="ratio"):
        build_method("ogm-ge", ratio="median")
