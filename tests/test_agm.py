"""AGM against peers.md B5 and its end-of-spec corrections (official code lihong2303/AGM_ICCV2023)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.agm import agm_coefficients, agm_ratio, response_scores, shapley_matrix
from equimodal.models.multimodal import ModelOutput


class Scale(nn.Module):
    out_dim = 1

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


class Toy(nn.Module):
    """Contract model with interactions: class-0 logit 5 + a + 2av (+ 6avt), class-1 logit v.

    Shapley splits a monomial equally among its factors, so at (a, v, t) = (1, 2, 3):
    M=2: phi_a = [a + av, 0] = [3, 0], phi_v = [av, v] = [2, 2];
    M=3: phi_a = [a + av + 2avt, 0] = [15, 0], phi_v = [av + 2avt, v] = [14, 2], phi_t = [2avt, 0] = [12, 0].
    The bias 5 cancels in every difference; with v(empty) = 0 (official code) each phi_m gains 5/M.
    """

    num_classes = 2

    def __init__(self, names):
        super().__init__()
        self.encoders = nn.ModuleDict({m: Scale() for m in names})
        self.bias = nn.Parameter(torch.tensor([5.0]))

    @property
    def modalities(self):
        return tuple(self.encoders)

    def encoder(self, m):
        return self.encoders[m]

    def encoder_parameters(self, m):
        return list(self.encoders[m].parameters())

    def head_parameters(self):
        return [self.bias]

    def fuse(self, h):
        names = self.modalities
        a, v = h[names[0]], h[names[1]]
        g0 = self.bias + a + 2 * a * v + (6 * a * v * h[names[2]] if len(names) > 2 else 0)
        return torch.cat([g0, v], dim=1)

    def forward(self, inputs):
        h = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        logits = self.fuse(h)
        return ModelOutput(logits=logits, unimodal_logits={m: logits for m in h}, features=h)


def toy_inputs(names):
    values = {"a": [1.0, -1.0], "v": [2.0, 0.5], "t": [3.0, 2.0]}
    return {m: torch.tensor(values[m]).view(2, 1) for m in names}


def responses(method, model, inputs):
    out = method.forward(model, inputs)
    return torch.einsum("ms,sbc->mbc", method._weights, out.extra["agm/values"])


def test_shapley_weights_by_hand():
    w2 = shapley_matrix(2)  # columns: {}, {a}, {v}, {a, v}
    assert w2.tolist() == [[-0.5, 0.5, -0.5, 0.5], [-0.5, -0.5, 0.5, 0.5]]
    w3 = shapley_matrix(3)
    # phi_a: S={} 1/3, S={v} 1/6, S={t} 1/6, S={v,t} 1/3 (|S|!(M-|S|-1)!/M!)
    assert w3[0].tolist() == pytest.approx([-1 / 3, 1 / 3, -1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 3, 1 / 3])
    assert torch.allclose(w3.sum(0)[:-1], torch.tensor([-1.0] + [0.0] * 6, dtype=torch.float64))  # efficiency


@pytest.mark.parametrize("empty_set", ["paper", "zero"])
def test_two_modality_responses_by_hand(empty_set):
    model = Toy(("a", "v"))
    method = build_method("agm", empty_set=empty_set)
    method.setup(model)
    phi = responses(method, model, toy_inputs(("a", "v")))
    extra = 0.0 if empty_set == "paper" else 2.5  # official: 0.5 * (f(a,v) - f(0,v) + f(a,0)) = 5.5 for a
    # sample 1 (a, v) = (1, 2); sample 2 (-1, 0.5): phi_a = [a + av, 0], phi_v = [av, v]
    assert torch.allclose(phi[0], torch.tensor([[3 + extra, 0], [-1.5 + extra, 0]]))
    assert torch.allclose(phi[1], torch.tensor([[2 + extra, 2], [-0.5 + extra, 0.5]]))
    if empty_set == "zero":
        assert phi[0, 0, 0].item() == pytest.approx(0.5 * (10 - 5 + 6))


@pytest.mark.parametrize("empty_set", ["paper", "zero"])
def test_three_modality_responses_use_full_shapley_weights(empty_set):
    model = Toy(("a", "v", "t"))
    method = build_method("agm", empty_set=empty_set)
    method.setup(model)
    phi = responses(method, model, toy_inputs(("a", "v", "t")))
    extra = 0.0 if empty_set == "paper" else 5 / 3
    # sample 1 (1, 2, 3): 15, 14, 12 (class 0); sample 2 (-1, .5, 2): -3.5, -2.5, -2
    assert phi[:, 0, 0].tolist() == pytest.approx([15 + extra, 14 + extra, 12 + extra])
    assert phi[:, 1, 0].tolist() == pytest.approx([-3.5 + extra, -2.5 + extra, -2 + extra])
    assert torch.allclose(phi[:, :, 1], torch.tensor([[0, 0], [2, 0.5], [0, 0]]), atol=1e-6)


def test_scores_are_mean_clamped_cross_entropy():
    phi = torch.tensor([[[0.0, 0.0], [0.0, 30.0]], [[math.log(3), 0.0], [2.0, 0.0]]])  # M=2, B=2, C=2
    y = torch.tensor([0, 0])
    s = response_scores(phi, y)
    # p = 1/2 and e^-30 < 1e-8 -> clamped; p = 3/4 and 1/(1+e^-2)
    assert s[0].item() == pytest.approx(math.log(2) + math.log(1e8), rel=1e-5)
    assert s[1].item() == pytest.approx(math.log(4 / 3) + math.log(1 + math.exp(-2)), rel=1e-5)


def test_ratio_sign_and_coefficient_by_hand():
    u = torch.tensor([0.5, 1.5])  # modality 1 has the higher loss: it is the weaker one
    r = agm_ratio(u)
    assert r.tolist() == pytest.approx([math.e, 1 / math.e])  # r_a = exp(u_v - u_a), official code
    k = agm_coefficients(u, torch.zeros(2), alpha=1.5, cap=10.0)  # no past steps: target ratio 1
    assert k.tolist() == pytest.approx([math.exp(1.5 * (1 - math.e)), math.exp(1.5 * (1 - 1 / math.e))], rel=1e-6)
    assert k[1] > 1 > k[0], "the weaker modality gets the larger kappa"
    # three modalities: M/(M-1) = 1.5
    u3 = torch.tensor([1.0, 2.0, 3.0])
    assert agm_ratio(u3).tolist() == pytest.approx([math.exp(1.5), 1.0, math.exp(-1.5)], rel=1e-6)
    # cap: target exp(2 * (1.5 - 0)) = e^3 for modality 1, gap e^3 - e^-1 = 19.7 -> capped at 10
    k = agm_coefficients(u, torch.tensor([3.0, 0.0]), alpha=1.5, cap=10.0)
    assert k[1].item() == pytest.approx(math.exp(15.0), rel=1e-5)
    k_free = agm_coefficients(u, torch.tensor([3.0, 0.0]), alpha=1.5, cap=None)
    assert k_free[1].item() == pytest.approx(math.exp(1.5 * (math.exp(3) - math.exp(-1))), rel=1e-5)


def _step(method, model, inputs, y):
    out = method.forward(model, inputs)
    sum(method.loss(out, y).values()).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.before_step(model)
    after = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return before, after


def test_encoder_gradients_scaled_by_kappa_and_running_mean():
    model = Toy(("a", "v"))
    method = build_method("agm", alpha=1.5, cap=10.0)
    method.setup(model)
    x, y = toy_inputs(("a", "v")), torch.tensor([1, 0])
    # hand phi (paper form): sample 1 phi_a = [3, 0], phi_v = [2, 2]; sample 2 phi_a = [-1.5, 0], phi_v = [-.5, .5]
    ce = lambda z, c: math.log(sum(math.exp(v) for v in z)) - z[c]  # noqa: E731
    u1 = torch.tensor([(ce([3, 0], 1) + ce([-1.5, 0], 0)) / 2, (ce([2, 2], 1) + ce([-0.5, 0.5], 0)) / 2])
    before, after = _step(method, model, x, y)
    k1 = agm_coefficients(u1, torch.zeros(2), 1.5, 10.0)
    assert method.last_coefficients.tolist() == pytest.approx(k1.tolist(), rel=1e-5)
    assert torch.allclose(after["encoders.a.scale"], k1[0] * before["encoders.a.scale"])
    assert torch.allclose(after["encoders.v.scale"], k1[1] * before["encoders.v.scale"])
    assert torch.equal(after["bias"], before["bias"]), "the fusion head is not modulated"
    assert method.mean_scores.tolist() == pytest.approx(u1.tolist(), rel=1e-5)
    # second step on other labels: the target uses the running mean of step 1 only
    y2 = torch.tensor([0, 1])
    u2 = torch.tensor([(ce([3, 0], 0) + ce([-1.5, 0], 1)) / 2, (ce([2, 2], 0) + ce([-0.5, 0.5], 1)) / 2])
    before, after = _step(method, model, x, y2)
    k2 = agm_coefficients(u2, u1, 1.5, 10.0)
    assert torch.allclose(after["encoders.v.scale"], k2[1] * before["encoders.v.scale"])
    assert method.mean_scores.tolist() == pytest.approx(((u1 + u2) / 2).tolist(), rel=1e-5)
    assert method.seen == 2
    log = method.log()
    assert log["kappa/a"] == pytest.approx((k1[0] + k2[0]).item() / 2, rel=1e-5)


def test_modulation_window():
    model = Toy(("a", "v"))
    method = build_method("agm", modulation_starts=1)
    method.setup(model)
    method.on_epoch_start(0)
    before, after = _step(method, model, toy_inputs(("a", "v")), torch.tensor([1, 0]))
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert method.seen == 1, "running means are updated outside the window too (official code)"


def test_response_level_is_the_official_hook_form():
    """level='response': CE(f(empty) + sum_m phi_m) whose backward scales phi_m by kappa_m."""
    model = Toy(("a", "v"))
    method = build_method("agm", level="response", empty_set="zero")
    method.setup(model)
    x, y = toy_inputs(("a", "v")), torch.tensor([1, 0])
    out = method.forward(model, x)
    terms = method.loss(out, y)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(model(x).logits, y).item(), rel=1e-6)
    terms["ce"].backward()
    k = method.last_coefficients
    ref = Toy(("a", "v"))
    z = ref(x).logits
    f_a0 = ref({"a": x["a"], "v": torch.zeros_like(x["v"])}).logits
    f_0v = ref({"a": torch.zeros_like(x["a"]), "v": x["v"]}).logits
    phi_a, phi_v = 0.5 * (z - f_0v + f_a0), 0.5 * (z - f_a0 + f_0v)  # official Modality_Audio / _Visual
    fused = k[0] * phi_a + k[1] * phi_v + ((1 - k[0]) * phi_a + (1 - k[1]) * phi_v).detach()
    F.cross_entropy(fused, y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert not torch.allclose(k, torch.ones(2)), "the test needs kappa != 1"


@pytest.mark.parametrize("padded_bn", ["eval", "batch"])
def test_padded_passes_leave_batchnorm_statistics_alone(padded_bn):
    model = make_model()
    reference = copy.deepcopy(model)
    method = build_method("agm", padded_bn=padded_bn)
    method.setup(model)
    x, y = fake_batch()
    model.train()
    model.encoder("visual").eval()  # a frozen part stays frozen
    reference.train()
    reference.encoder("visual").eval()
    out = method.forward(model, x)
    ref = reference(x)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    for (name, b), rb in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, rb), name
    assert model.training and model.encoder("audio").training and not model.encoder("visual").training
    values = out.extra["agm/values"]
    assert values.shape == (4, 6, 5)
    sum(method.loss(out, y).values()).backward()  # no in-place change reached a tensor autograd saved
    F.cross_entropy(ref.logits, y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), "the padded passes do not change the gradient"
    if padded_bn == "eval":
        with torch.no_grad():
            expected = reference.eval()({"audio": torch.zeros_like(x["audio"]), "visual": x["visual"]}).logits
        assert torch.allclose(values[2], expected, atol=1e-5)


def test_scores_all_reduced_before_the_ratio(monkeypatch):
    import equimodal._dist as dist
    calls = []
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: calls.append(t.clone()) or t.mul_(2))
    model = Toy(("a", "v"))
    method = build_method("agm")
    method.setup(model)
    _step(method, model, toy_inputs(("a", "v")), torch.tensor([1, 0]))
    assert len(calls) == 1 and calls[0].shape == (3,) and calls[0][-1] == 2  # [sum u_a, sum u_v, count]
    assert method.mean_scores.tolist() == pytest.approx((calls[0][:2] / 2).tolist(), rel=1e-6)


def test_clip_grad_official_rule():
    """If a head gradient entry exceeds clip_grad in absolute value, the total norm is clipped to it."""
    model = Toy(("a", "v"))
    method = build_method("agm", clip_grad=1.0, alpha=0.0)  # alpha 0: kappa = 1, only the clip acts
    method.setup(model)
    x, y = toy_inputs(("a", "v")), torch.tensor([1, 0])
    for head_grad, expected_scale in ((2.0, 1 / math.sqrt(4 + 9 + 36)), (0.5, 1.0)):
        out = method.forward(model, x)
        sum(method.loss(out, y).values()).backward()
        for p, g in zip((model.bias, model.encoders["a"].scale, model.encoders["v"].scale), (head_grad, 3.0, 6.0)):
            p.grad = torch.tensor([g])
        method.before_step(model)
        got = [model.bias.grad.item(), model.encoders["a"].scale.grad.item(), model.encoders["v"].scale.grad.item()]
        assert got == pytest.approx([head_grad * expected_scale, 3 * expected_scale, 6 * expected_scale], rel=1e-5)
        model.zero_grad()


def test_plain_model_output_warns_and_does_not_modulate():
    model = Toy(("a", "v"))
    method = build_method("agm")
    method.setup(model)
    x, y = toy_inputs(("a", "v")), torch.tensor([1, 0])
    with pytest.warns(UserWarning, match="method.forward"):
        terms = method.loss(model(x), y)
    sum(terms.values()).backward()
    before = [p.grad.clone() for p in model.parameters()]
    method.before_step(model)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))


def test_resume_state_round_trip():
    model = Toy(("a", "v"))
    method = build_method("agm")
    method.setup(model)
    _step(method, model, toy_inputs(("a", "v")), torch.tensor([1, 0]))
    fresh = build_method("agm")
    fresh.setup(Toy(("a", "v")))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.mean_scores, method.mean_scores) and fresh.seen == 1 and fresh.step == 1


@pytest.mark.parametrize("options, match", [
    ({"alpha": -1}, "alpha"), ({"cap": 0}, "cap"), ({"clip_grad": -1.0}, "clip_grad"),
    ({"empty_set": "none"}, "empty_set"), ({"padded_bn": "train"}, "padded_bn"), ({"level": "hook"}, "level"),
    ({"modulation_starts": -1}, "modulation_starts"),
    ({"modulation_starts": 3, "modulation_ends": 2}, "modulation_ends"),
])
def test_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        build_method("agm", **options)


def test_needs_two_modalities():
    with pytest.raises(ValueError, match="at least 2"):
        build_method("agm").setup(make_model(("audio",)))


@pytest.mark.parametrize("modalities", [("audio", "visual"), ("audio", "visual", "tactile")])
@pytest.mark.parametrize("empty_set, padded_bn", [("paper", "eval"), ("zero", "eval"), ("paper", "batch")])
def test_shared_encoder_passes_give_the_per_coalition_values(modalities, empty_set, padded_bn):
    """On a MultimodalModel the padded logits come from one pass per (encoder, real | zeroed input);
    they equal the model run once per coalition (same weights and buffers: the normal pass comes
    first in both)."""
    inputs, y = fake_batch(modalities, n=8)
    got = {}
    for share in (True, False):
        model = make_model(modalities)
        model.train()
        method = build_method("agm", empty_set=empty_set, padded_bn=padded_bn)
        method.share_encoder_passes = share
        method.setup(model)
        assert method._shares_encoder_passes(model, keep=False) == share
        got[share] = method.forward(model, inputs).extra["agm/values"]
        assert model.training
    assert got[True].shape == (2 ** len(modalities), 8, 5)
    torch.testing.assert_close(got[True], got[False], rtol=0, atol=0)
