"""MBSD against peers.md B16 and the BalanceBenchmark port (MBSD_trainer.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.mbsd import distillation_terms
from equimodal.models.multimodal import ModelOutput


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


# two samples, two classes. Sample 0 (y=0): audio right and strong, visual wrong.
# Sample 1 (y=1): audio wrong, visual right and strong.
ZA = [[2.0, 0.0], [1.0, 0.0]]
ZV = [[0.0, 1.0], [0.0, 1.0]]
Y = [0, 1]


def _hand_output(requires_grad=False):
    za = torch.tensor(ZA, requires_grad=requires_grad)
    zv = torch.tensor(ZV, requires_grad=requires_grad)
    out = ModelOutput(logits=za + zv, unimodal_logits={"audio": za, "visual": zv},
                      features={"audio": torch.zeros(2, 1), "visual": torch.zeros(2, 1)})
    return out, za, zv


def _hand_weights_kl_rs():
    pa, pv = [_softmax(z) for z in ZA], [_softmax(z) for z in ZV]
    w = [abs(pa[0][0] - pv[0][0]), abs(pa[1][1] - pv[1][1])]
    assert w == pytest.approx([0.611856, 0.462117], abs=1e-6)
    kl0 = sum(pa[0][c] * math.log(pa[0][c] / pv[0][c]) for c in range(2))  # teacher audio
    kl1 = sum(pv[1][c] * math.log(pv[1][c] / pa[1][c]) for c in range(2))  # teacher visual
    assert kl1 == pytest.approx(0.462117, abs=1e-6)  # (0.731 - 0.269) * ln(0.731 / 0.269) = 0.462 * 1
    rs = [((0 - 2) ** 2 + (1 - 0) ** 2) / 2, ((0 - 1) ** 2 + (1 - 0) ** 2) / 2]  # 2.5, 1.0
    return pa, pv, w, [kl0, kl1], rs


def test_weights_and_loss_on_a_two_sample_hand_case():
    pa, pv, w, kl, rs = _hand_weights_kl_rs()
    out, za, zv = _hand_output()
    y = torch.tensor(Y)
    wt, klt, rst = distillation_terms(torch.stack([za, zv]), y)
    assert wt[0].tolist() == pytest.approx(w, abs=1e-6)
    assert klt[0].tolist() == pytest.approx(kl, abs=1e-6)
    assert rst[0].tolist() == pytest.approx(rs, abs=1e-6)
    terms = build_method("mbsd").loss(out, y)
    assert set(terms) == {"ce", "ce/audio", "ce/visual", "kl", "rs"}
    assert terms["kl"].item() == pytest.approx((w[0] * kl[0] + w[1] * kl[1]) / 2, abs=1e-6)
    assert terms["rs"].item() == pytest.approx((w[0] * 2.5 + w[1] * 1.0) / 2, abs=1e-6)
    assert terms["ce/audio"].item() == pytest.approx(-(math.log(pa[0][0]) + math.log(pa[1][1])) / 2, abs=1e-6)
    assert terms["ce/visual"].item() == pytest.approx(-(math.log(pv[0][0]) + math.log(pv[1][1])) / 2, abs=1e-6)
    fused = [_softmax([a + v for a, v in zip(za_i, zv_i)]) for za_i, zv_i in zip(ZA, ZV)]
    assert terms["ce"].item() == pytest.approx(-(math.log(fused[0][0]) + math.log(fused[1][1])) / 2, abs=1e-6)


def test_weight_is_zero_when_neither_modality_is_right():
    z = torch.tensor([[[0.0, 3.0]], [[0.0, 1.0]]])  # both predict class 1, label 0
    w, kl, rs = distillation_terms(z, torch.tensor([0]))
    assert w.item() == 0 and kl.item() > 0 and rs.item() > 0


def test_only_the_weak_modality_learns_from_a_detached_teacher():
    _, _, w, _, _ = _hand_weights_kl_rs()
    out, za, zv = _hand_output(requires_grad=True)
    terms = build_method("mbsd").loss(out, torch.tensor(Y))
    ga, gv = torch.autograd.grad(terms["kl"] + terms["rs"], (za, zv))
    # sample 0: audio teaches visual; sample 1: visual teaches audio. The weight is a constant too,
    # so the strong modality's logits get no gradient at all from the distillation terms.
    assert torch.equal(ga[0], torch.zeros(2)) and torch.equal(gv[1], torch.zeros(2))
    assert gv[0].abs().sum() > 0 and ga[1].abs().sum() > 0
    out, za, zv = _hand_output(requires_grad=True)
    (gv_rs,) = torch.autograd.grad(build_method("mbsd").loss(out, torch.tensor(Y))["rs"], (zv,))
    # d/dz_w of (1/B) w (1/C) |z_w - z_s|^2 = (1/B) w (2/C) (z_w - z_s); B = C = 2
    assert gv_rs[0].tolist() == pytest.approx([0.5 * w[0] * (0 - 2), 0.5 * w[0] * (1 - 0)], abs=1e-6)


def _port_reference(z, y):
    """BalanceBenchmark MBSD_trainer.training_step's distillation terms, per-sample loop as written there."""
    n, b, c = z.shape
    pred = z.softmax(-1)
    yp = z.argmax(-1)
    pairs = [(0, 1)] if n == 2 else [(0, 1), (0, 2), (1, 2)]
    kls, rss = [], []
    for j, k in pairs:
        w = torch.zeros(b)
        ps, pw = torch.zeros(b), torch.zeros(b)
        for i in range(b):
            a_, v_ = pred[j][i][y[i]], pred[k][i][y[i]]
            if yp[j][i] == y[i] or yp[k][i] == y[i]:
                w[i] = max(a_, v_) - min(a_, v_)
            ps[i], pw[i] = max(a_, v_), min(a_, v_)
        kl = F.kl_div(ps, pw, reduction="none")
        rs = ((z[j] - z[k]) ** 2).sum(1) / c if n == 2 else ((pred[j] - pred[k]) ** 2).sum(1) / c
        kls.append(torch.mm(w.reshape(1, -1), kl.reshape(-1, 1)) / b)
        rss.append(torch.mm(w.reshape(1, -1), rs.reshape(-1, 1)) / b)
    return (sum(kls) / len(pairs)).squeeze(), (sum(rss) / len(pairs)).squeeze()


@pytest.mark.parametrize("n", [2, 3])
def test_balancemm_form_reproduces_the_port(n):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, 9, 4, generator=g) * 2
    y = torch.randint(0, 4, (9,), generator=g)
    ref_kl, ref_rs = _port_reference(z, y)
    names = ["audio", "visual", "text"][:n]
    out = ModelOutput(logits=z.sum(0), unimodal_logits=dict(zip(names, z)), features={})
    terms = build_method("mbsd", form="balancemm").loss(out, y)
    assert terms["kl"].item() == pytest.approx(ref_kl.item(), abs=1e-6)
    assert terms["rs"].item() == pytest.approx(ref_rs.item(), abs=1e-6)


def test_balancemm_form_on_the_hand_case_lets_gradients_reach_both():
    _, _, w, _, rs = _hand_weights_kl_rs()
    pa, pv = [_softmax(z) for z in ZA], [_softmax(z) for z in ZV]
    ps = [pa[0][0], pv[1][1]]
    pw = [pv[0][0], pa[1][1]]
    kl = [pw[i] * (math.log(pw[i]) - ps[i]) for i in range(2)]  # F.kl_div(ps, pw): the port's "KL"
    out, za, zv = _hand_output(requires_grad=True)
    terms = build_method("mbsd", form="balancemm").loss(out, torch.tensor(Y))
    assert terms["kl"].item() == pytest.approx((w[0] * kl[0] + w[1] * kl[1]) / 2, abs=1e-6)
    assert terms["rs"].item() == pytest.approx((w[0] * rs[0] + w[1] * rs[1]) / 2, abs=1e-6)
    ga, gv = torch.autograd.grad(terms["kl"] + terms["rs"], (za, zv))
    assert ga[0].abs().sum() > 0 and gv[1].abs().sum() > 0


def test_three_modalities_average_the_pairs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    w, kl, rs = distillation_terms(z, y)
    assert w.shape == kl.shape == rs.shape == (3, 6)
    for row, (j, k) in enumerate([(0, 1), (0, 2), (1, 2)]):
        w2, kl2, rs2 = distillation_terms(z[[j, k]], y)
        assert torch.allclose(w[row], w2[0]) and torch.allclose(kl[row], kl2[0]) and torch.allclose(rs[row], rs2[0])
    out = ModelOutput(logits=z.sum(0), unimodal_logits={"a": z[0], "b": z[1], "c": z[2]}, features={})
    terms = build_method("mbsd").loss(out, y)
    assert terms["kl"].item() == pytest.approx((w * kl).mean(1).mean().item(), abs=1e-6)


def test_trains_a_model_end_to_end_with_three_modalities():
    mods = ("audio", "visual", "text")
    model = make_model(mods)
    opt = torch.optim.SGD(model.param_groups(), lr=0.05)
    method = build_method("mbsd")
    method.setup(model, opt)
    x, y = fake_batch(mods)
    terms = method.loss(model(x), y)
    assert {"ce/audio", "ce/visual", "ce/text", "kl", "rs"} <= set(terms)
    sum(terms.values()).backward()
    assert all(p.grad is not None for m in mods for p in model.encoder_parameters(m) if p.requires_grad)


def test_errors_are_named():
    with pytest.raises(ValueError, match="form"):
        build_method("mbsd", form="paper")
    with pytest.raises(ValueError, match="at least 2 modalities"):
        build_method("mbsd").setup(make_model(("audio",)))
    model = make_model(estimator="probe")
    method = build_method("mbsd")
    method.setup(model)
    x, y = fake_batch()
    with pytest.raises(ValueError, match="probe"):
        method.loss(model(x), y)
