"""MMPareto against peers.md B6 and its end-of-spec corrections (official code GeWu-Lab/MMPareto_ICML2024)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.mmpareto import min_norm_weight, pareto_gradients


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_conflict_gives_min_norm_weight_by_hand():
    g_mm, g_uni = t(1.0, 0.0), t(-1.0, 1.0)  # cos = -1/sqrt(2)
    # c = (g_uni - g_mm).g_uni / ||g_mm - g_uni||^2 = (-2, 1).(-1, 1) / 5 = 0.6
    assert min_norm_weight(g_mm, g_uni).item() == pytest.approx(0.6)
    new, cos, c = pareto_gradients([g_mm], [g_uni], gamma=1.5)
    assert cos.item() == pytest.approx(-1 / math.sqrt(2)) and c.item() == pytest.approx(0.6)
    # d = 1.2 (1, 0) + 0.8 (-1, 1) = (0.4, 0.8), norm sqrt(0.8) < ||(0, 1)|| = 1: scaled up to norm 1, then x1.5
    scale = 1.5 / math.sqrt(0.8)
    assert new[0].tolist() == pytest.approx([0.4 * scale, 0.8 * scale], rel=1e-6)
    # not clipped to [0.001, 0.999]: a weight near 1 is kept as is
    assert min_norm_weight(t(1.0, 0.0), t(-100.0, 0.0)).item() == pytest.approx(100 / 101)


def test_agreement_gives_one_half():
    new, cos, c = pareto_gradients([t(1.0, 0.0)], [t(1.0, 1.0)], gamma=1.5)
    assert cos.item() > 0 and c.item() == 0.5
    assert new[0].tolist() == pytest.approx([3.0, 1.5])  # 1.5 * (g_mm + g_uni)


def test_rescale_is_per_tensor_then_gamma():
    g_mm, g_uni = [t(1.0, 0.0), t(3.0)], [t(-1.0, 1.0), t(-1.0)]
    # flat: a = (1, 0, 3), b = (-1, 1, -1): a.b = -4, |a|^2 = 10, |b|^2 = 3 -> c = 7 / 21 = 1/3
    new, cos, c = pareto_gradients(g_mm, g_uni, gamma=1.5)
    assert c.item() == pytest.approx(1 / 3)
    # tensor 1: d = (2/3)(1, 0) + (4/3)(-1, 1) = (-2/3, 4/3), norm 1.49 > ||(0, 1)||: kept, x1.5
    assert new[0].tolist() == pytest.approx([-1.0, 2.0], rel=1e-6)
    # tensor 2: d = 2 - 4/3 = 2/3 < ||3 - 1|| = 2: scaled up to 2, x1.5
    assert new[1].tolist() == pytest.approx([3.0], rel=1e-6)
    plain, _, _ = pareto_gradients(g_mm, g_uni, gamma=1.5, rescale=False)
    assert plain[1].tolist() == pytest.approx([1.0], rel=1e-6)


def test_solver_edge_cases():
    # a zero multimodal gradient: cos = 0 -> min-norm branch, solver edge case c = 0.999
    new, cos, c = pareto_gradients([t(0.0, 0.0)], [t(1.0, 2.0)], gamma=1.5)
    assert c.item() == pytest.approx(0.999)
    assert new[0].tolist() == pytest.approx([1.5, 3.0], rel=1e-5)  # 0.002 g_uni scaled up to ||g_uni||
    assert min_norm_weight(t(1.0, 2.0), t(0.0, 0.0)).item() == pytest.approx(0.001)


def _independent_gradients(model, heads, x, y, m):
    """g_mm and g_m of encoder m from two separate backward passes on copies (the reference)."""
    params = list(model.encoder(m).parameters())
    out = model(x)
    g_mm = torch.autograd.grad(F.cross_entropy(out.logits, y), params, retain_graph=True)
    g_m = torch.autograd.grad(F.cross_entropy(heads[m](out.features[m]), y), params)
    return list(g_mm), list(g_m)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_come_from_separate_backward_passes(accumulate):
    """Fails for the BalanceMM port, which captures g_mm + g_m for both (cosine always 1, grads x3)."""
    model = make_model()
    method = build_method("mmpareto")
    method.setup(model, seed=0)
    reference, ref_heads = copy.deepcopy(model), copy.deepcopy(method.heads)
    batches = [fake_batch(seed=s) for s in range(accumulate)]
    for x, y in batches:  # the trainer's accumulation: each micro-batch's loss divided by the count
        (sum(method.loss(model(x), y).values()) / accumulate).backward()
    for m in model.modalities:
        totals = [p.grad.clone() for p in model.encoder(m).parameters()]
        refs = [_independent_gradients(reference, ref_heads, x, y, m) for x, y in batches]
        g_mm = [sum(r[0][j] for r in refs) / accumulate for j in range(len(totals))]
        g_m = [sum(r[1][j] for r in refs) / accumulate for j in range(len(totals))]
        for got, want, total in zip(method._uni[m], g_m, totals):
            assert torch.allclose(got, want, atol=1e-6)
        assert any(not torch.allclose(got, total, atol=1e-4) for got, total in zip(method._uni[m], totals)), \
            "the captured unimodal gradient must not be the summed gradient"
    expected = {m: pareto_gradients(*[[sum(r[k][j] for r in refs) / accumulate for j in range(len(refs[0][k]))]
                                      for k in (0, 1)], gamma=1.5)
                for m in model.modalities
                for refs in [[_independent_gradients(reference, ref_heads, x, y, m) for x, y in batches]]}
    head_before = [p.grad.clone() for p in model.head_parameters()] + [p.grad.clone() for p in method.parameters()]
    method.before_step(model)
    for i, m in enumerate(model.modalities):
        new, cos, c = expected[m]
        assert method.last_cosines[i].item() == pytest.approx(cos.item(), abs=1e-5)
        assert method.last_cosines[i].item() < 0.999, "a cosine of 1 is the port's bug"
        for p, g in zip(model.encoder(m).parameters(), new):
            assert torch.allclose(p.grad, g, atol=1e-6)
    head_after = [p.grad for p in model.head_parameters()] + [p.grad for p in method.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(head_before, head_after)), "heads keep the plain gradient"
    log = method.log()
    assert log["cos/visual"] == pytest.approx(method.last_cosines[1].item())
    assert log["conflict/audio"] == float(method.last_cosines[0].item() <= 0)


def test_losses_and_own_heads():
    model = make_model(("audio", "visual", "text"))
    method = build_method("mmpareto")
    method.setup(model, seed=3)
    x, y = fake_batch(("audio", "visual", "text"))
    with torch.no_grad():
        out = model(x)
        terms = method.loss(out, y)
    assert set(terms) == {"ce", "ce/audio", "ce/visual", "ce/text"}
    expected = F.cross_entropy(method.heads["text"](out.features["text"]), y)
    assert terms["ce/text"].item() == pytest.approx(expected.item())
    again = build_method("mmpareto")
    again.setup(make_model(("audio", "visual", "text")), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(method.parameters(), again.parameters())), "seeded heads"
    assert method._uni is None, "no gradient capture outside training"


def test_captured_gradients_averaged_across_ranks(monkeypatch):
    import equimodal._dist as dist
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.mul_(3))  # as if the other rank had twice ours
    model = make_model()
    method = build_method("mmpareto")
    method.setup(model)
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    m = "audio"
    totals = [p.grad.clone() for p in model.encoder(m).parameters()]
    g_uni = [1.5 * g for g in method._uni[m]]
    heads_before = [p.grad.clone() for p in method.parameters()]
    method.before_step(model)
    new, _, _ = pareto_gradients([a - b for a, b in zip(totals, g_uni)], g_uni, gamma=1.5)
    for p, g in zip(model.encoder(m).parameters(), new):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert all(torch.allclose(p.grad, 1.5 * b) for p, b in zip(method.parameters(), heads_before))


def test_state_round_trip_restores_heads():
    model = make_model()
    method = build_method("mmpareto")
    method.setup(model, seed=0)
    with torch.no_grad():
        method.heads["audio"].weight.add_(1.0)
    fresh = build_method("mmpareto")
    fresh.setup(make_model(), seed=0)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.heads["audio"].weight, method.heads["audio"].weight)


@pytest.mark.parametrize("options, match", [({"gamma": 0}, "gamma"), ({"gamma": True}, "gamma"),
                                            ({"rescale": "yes"}, "rescale")])
def test_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        build_method("mmpareto", **options)
