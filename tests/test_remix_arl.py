"""Remix (Data Remixing, ICML 2025) and ARL (ICCV 2025) against peers_2025.md C1 / C2, on hand-checkable cases."""
import math

import pytest
import torch
import torch.nn.functional as F

import equimodal._dist as dist
from conftest import fake_batch, make_model
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods.arl import arl_coefficients
from equimodal.methods.remix import assign_least_confident, kl_to_uniform, with_assignment
from equimodal.methods.valuation import KEEP_KEY

AV = ("audio", "visual")


def tiny_set(n=8, modalities=AV, seed=3):
    x, _ = fake_batch(modalities, n=n, seed=seed)
    return TensorMultimodalDataset(x, torch.arange(n) % 5, 5)


def remix(model, data=None, **options):
    method = build_method("remix", **options)
    method.attach_data(MethodData(train=data if data is not None else tiny_set()))
    method.setup(model, torch.optim.SGD([*model.parameters()], lr=0.1), seed=0)
    return method


# --- Remix ------------------------------------------------------------------------------------
def test_kl_to_uniform_and_assignment_rule_by_hand():
    # p = (0.75, 0.25): KL = 0.75 log2(1.5) + 0.25 log2(0.5); p uniform: 0
    kl = kl_to_uniform(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]))
    assert kl[0].item() == pytest.approx(0.75 * math.log2(1.5) + 0.25 * math.log2(0.5), abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    # each sample goes to its least confident modality (smallest KL); ties to the later one (code: audio iff <)
    kls = torch.tensor([[0.1, 0.2], [0.3, 0.3], [0.5, 0.1]])
    assert assign_least_confident(kls).tolist() == [0, 1, 1]
    assert assign_least_confident(torch.tensor([[0.2, 0.1, 0.1], [0.0, 0.5, 0.9]])).tolist() == [2, 0]


def test_assignment_is_an_eval_mode_no_grad_argmin_over_the_training_split():
    model = make_model(AV)
    data = tiny_set(9)
    method = remix(model, data, warmup_epochs=1)
    with torch.no_grad():  # by hand: eval mode, heads on features, KL per sample in plain Python
        model.eval()
        out = model(data.inputs)
        expected = []
        for i in range(9):
            kls = []
            for m in AV:
                p = torch.softmax(method.heads[m](out.features[m][i]), 0).clamp_min(1e-9).tolist()
                kls.append(sum(pc * math.log2(pc * 5) for pc in p))
            expected.append(0 if kls[0] < kls[1] else 1)
        model.train()
    assert method.training_set(0, data) is data  # warm-up: untouched
    assert method.substeps() == 1
    method.on_epoch_start(1)
    remixed = method.training_set(1, data)
    assert method.last_assignment.tolist() == expected
    assert model.training and all(mod.training for mod in model.modules())  # modes restored
    assert torch.equal(remixed[torch.arange(9)][0][KEEP_KEY], F.one_hot(torch.tensor(expected), 2).bool())
    assert method.substeps() == 2
    figures = method.log()
    assert figures["assigned/audio"] == pytest.approx(expected.count(0) / 9)


def test_assignment_shares_are_split_across_ranks_and_summed(monkeypatch):
    model = make_model(AV)
    data = tiny_set(7)
    full = remix(model, data, warmup_epochs=0).assignment(data)
    sent = []
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: sent.append(t.clone()) or t)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        parts.append(remix(model, data, warmup_epochs=0).assignment(data))
    assert (parts[0][:4] >= 0).all() and (parts[0][4:] == -1).all()  # rank 0 valued samples 0-3 only
    assert ((sent[0] + sent[1]) - 1).long().tolist() == full.tolist()  # the reduced sum is the full assignment


def test_substep_trains_only_its_samples_with_the_other_features_zeroed():
    model = make_model(AV)
    data = tiny_set(6)
    method = remix(model, data, warmup_epochs=0, gamma=0.7)
    assign = torch.tensor([0, 1, 1, 0, 1, 1])
    inputs, y = with_assignment(data, assign, 2, AV)[torch.arange(6)]
    method.on_epoch_start(0)
    method.on_substep(1)  # visual
    terms = method.loss(method.forward(model, inputs), y)
    sum(terms.values()).backward()
    # by hand on rows 1, 2, 4, 5: z = W [0; h_v] + b, plus gamma * CE(W_v h_v)
    rows = torch.tensor([1, 2, 4, 5])
    h_v = model.encoder("visual")(inputs["visual"][rows])
    fc = model.fusion.fc
    z = h_v @ fc.weight[:, 12:].T + fc.bias
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(z, y[rows]).item(), rel=1e-5)
    z_v = method.heads["visual"](h_v)
    assert terms["ce/visual"].item() == pytest.approx(0.7 * F.cross_entropy(z_v, y[rows]).item(), rel=1e-5)
    # one modality per step: the audio encoder and the audio columns of the head get no gradient
    assert all(p.grad is None or not p.grad.any() for p in model.encoder("audio").parameters())
    assert not fc.weight.grad[:, :12].any() and fc.weight.grad[:, 12:].any()
    assert any(p.grad.any() for p in model.encoder("visual").parameters())
    assert method.heads["audio"].weight.grad is None


def test_warmup_loss_is_joint_plus_weighted_unimodal_heads():
    model = make_model(AV)
    method = remix(model, warmup_epochs=2, warmup_weight=0.5)
    x, y = fake_batch(AV)
    method.on_epoch_start(0)
    out = method.forward(model, x)
    terms = method.loss(out, y)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(out.logits, y).item())
    for m in AV:
        assert terms[f"ce/{m}"].item() == pytest.approx(0.5 * F.cross_entropy(method.heads[m](out.features[m]), y).item())


def test_empty_substep_takes_no_optimizer_step(monkeypatch):
    model = make_model(AV)
    data = tiny_set(4)
    method = build_method("remix", warmup_epochs=0)
    method.attach_data(MethodData(train=data))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    method.setup(model, opt, seed=0)
    inputs, y = with_assignment(data, torch.zeros(4, dtype=torch.long), 2, AV)[torch.arange(4)]
    method.on_epoch_start(0)
    for sub in (0, 1):  # audio (all 4 samples: builds momentum), then visual (empty)
        method.on_substep(sub)
        sum(method.loss(method.forward(model, inputs), y).values()).backward()
        method.before_step(model)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the empty step moved nothing
    assert method.log()["empty_substeps"] == 1


def test_remix_options_are_validated():
    for bad in ({"warmup_epochs": -1}, {"warmup_epochs": 1.5}, {"gamma": -0.1}, {"warmup_weight": float("nan")},
                {"estimate": "dropout"}, {"eval_batch_size": 0}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            build_method("remix", **bad)


# --- ARL --------------------------------------------------------------------------------------
def test_arl_coefficients_by_hand():
    # c = (3, 1) -> c_bar = (0.75, 0.25); H = (1, 3) -> shares (0.25, 0.75) -> floor 0.3 -> (0.3, 0.75)
    # w = (1/0.3, 1/0.75) normalised; kappa = softmax(8 * [c_bar_v w_a, c_bar_a w_v])
    kappa, c_bar, w = arl_coefficients(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0]), 8.0, 0.3)
    wa, wv = (1 / 0.3) / (1 / 0.3 + 1 / 0.75), (1 / 0.75) / (1 / 0.3 + 1 / 0.75)
    ea, ev = math.exp(8 * 0.25 * wa), math.exp(8 * 0.75 * wv)
    assert c_bar.tolist() == pytest.approx([0.75, 0.25])
    assert w.tolist() == pytest.approx([wa, wv])
    assert kappa.tolist() == pytest.approx([ea / (ea + ev), ev / (ea + ev)], rel=1e-6)
    k3, _, _ = arl_coefficients(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]), 4.0, 0.2)
    assert k3.sum().item() == pytest.approx(1.0) and k3.argmax().item() == 0  # the least relied-on is pushed most


def _arl_step(epoch, **options):
    model = make_model(AV)
    method = build_method("arl", **options)
    method.setup(model, seed=0)
    method.on_epoch_start(epoch)
    x, y = fake_batch(AV, n=8)
    out = model(x)
    terms = method.loss(out, y)
    sum(terms.values()).backward()
    method.before_step(model)
    return model, method, out, terms, y


def test_arl_scales_each_encoder_gradient_by_one_plus_kappa_after_start():
    plain, _, _, _, _ = _arl_step(epoch=1, gamma=1.0, start=1)  # epoch 1 is not > start: no scaling
    model, method, out, terms, y = _arl_step(epoch=2, gamma=1.0, start=1)
    # kappa by hand from the shared head with the other modality zeroed (full bias)
    fc = model.fusion.fc
    with torch.no_grad():
        z = {"audio": out.features["audio"] @ fc.weight[:, :12].T + fc.bias,
             "visual": out.features["visual"] @ fc.weight[:, 12:].T + fc.bias}
        c = torch.stack([z[m].abs().sum(1).mean() for m in AV])
        H = torch.stack([-(z[m].softmax(1) * z[m].log_softmax(1)).sum(1).mean() for m in AV])
        kappa, _, _ = arl_coefficients(c, H, 8.0, 0.3)
    assert method.last_kappa.tolist() == pytest.approx(kappa.tolist(), rel=1e-5)
    assert terms["ce/audio"].item() == pytest.approx(F.cross_entropy(z["audio"], y).item(), rel=1e-5)
    for i, m in enumerate(AV):
        for p, q in zip(model.encoder(m).parameters(), plain.encoder(m).parameters()):
            torch.testing.assert_close(p.grad, (1 + kappa[i]) * q.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fc.weight.grad, plain.fusion.fc.weight.grad)  # the head is not scaled


def test_arl_released_mode_is_a_flat_1_5_and_gamma_weights_the_unimodal_terms():
    plain, _, _, _, _ = _arl_step(epoch=0, gamma=3.0, start=0, weights="released")
    model, method, out, terms, y = _arl_step(epoch=1, gamma=3.0, start=0, weights="released")
    assert method.last_kappa.tolist() == [0.5, 0.5]
    assert "kappa/audio" in method.log()  # the computed kappa is still logged
    _, _, _, before, _ = _arl_step(epoch=0, gamma=3.0, start=0)
    assert terms["ce/visual"].item() == pytest.approx(3.0 * before["ce/visual"].item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(before["ce"].item(), rel=1e-6)


def test_arl_statistics_are_summed_across_ranks(monkeypatch):
    other = torch.tensor([0.0, 900.0, 30.0, 0.0, 10.0])  # another rank: large visual logits, confident-free audio
    monkeypatch.setattr("equimodal.methods.arl.all_reduce_sum", lambda t: t.add_(other))
    model = make_model(AV)
    method = build_method("arl", start=-1)
    method.setup(model, seed=0)
    method.on_epoch_start(0)
    x, y = fake_batch(AV, n=8)
    sum(method.loss(model(x), y).values()).backward()
    local = method._stats.clone()
    method.before_step(model)
    total = local + other
    kappa, _, _ = arl_coefficients(total[:2] / total[4], total[2:4] / total[4], 8.0, 0.3)
    assert method.last_kappa.tolist() == pytest.approx(kappa.tolist(), rel=1e-6)


def test_arl_options_are_validated():
    for bad in ({"gamma": -1}, {"temperature": float("inf")}, {"start": -2}, {"start": True},
                {"entropy_floor": 1.0}, {"weights": "code"}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            build_method("arl", **bad)


def test_a_one_sample_substep_is_skipped_not_fed_to_batchnorm():
    """Vector encoders with BatchNorm1d fail on one sample in training mode (found on mfeat)."""
    from equimodal.models import MLPEncoder, MultimodalModel
    torch.manual_seed(0)
    model = MultimodalModel({m: MLPEncoder(in_dim=8, hidden=16, out_dim=6) for m in AV}, num_classes=3)
    method = build_method("remix", warmup_epochs=0)
    method.attach_data(MethodData(train=None))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method.setup(model, opt, seed=0)
    inputs = {m: torch.randn(4, 8) for m in AV}
    inputs[KEEP_KEY] = F.one_hot(torch.tensor([0, 0, 0, 1]), 2).bool()  # visual gets one sample
    y = torch.tensor([0, 1, 2, 0])
    method.on_epoch_start(0)
    for sub in (0, 1):
        method.on_substep(sub)
        out = method.forward(model, inputs)
        assert out.logits.shape[0] == (3 if sub == 0 else 0)
        sum(method.loss(out, y).values()).backward()
        method.before_step(model)
        opt.step()
        opt.zero_grad()
    log = method.log()
    assert log["single_sample_substeps"] == 1 and log["empty_substeps"] == 1
