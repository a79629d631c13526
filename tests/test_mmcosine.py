"""MMCosine against peers.md B16: z_m = s * cos(h_m, W_m rows), fused = sum_m z_m, CE on the fused logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.models.multimodal import ModelOutput


def _hand_case(scaling=15.0):
    model = make_model(classes=2, dim=2)
    method = build_method("mmcosine", scaling=scaling)
    method.setup(model, seed=0)
    with torch.no_grad():
        method.heads["audio"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        method.heads["visual"].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    return model, method


def _output(audio, visual):
    feats = {"audio": torch.tensor([audio]), "visual": torch.tensor([visual])}
    return ModelOutput(logits=torch.zeros(1, 2), unimodal_logits={}, features=feats)


def test_logits_on_a_2d_hand_case():
    _, method = _hand_case()
    out = _output([3.0, 4.0], [1.0, 0.0])
    z = method.unimodal_logits(out)
    # audio: h/|h| = (0.6, 0.8); class rows (1, 0) and (0, 1) after normalising -> cos 0.6, 0.8
    assert z["audio"][0].tolist() == pytest.approx([15 * 0.6, 15 * 0.8])
    # visual: h = (1, 0); rows (1, 1)/sqrt(2) and (-1, 0) -> cos 1/sqrt(2), -1
    assert z["visual"][0].tolist() == pytest.approx([15 / math.sqrt(2), -15.0])
    fused = method.predict(out)
    assert fused[0].tolist() == pytest.approx([9 + 15 / math.sqrt(2), 12 - 15.0])
    loss = method.loss(out, torch.tensor([1]))["ce"]
    f0, f1 = 9 + 15 / math.sqrt(2), -3.0
    assert loss.item() == pytest.approx(math.log(math.exp(f0) + math.exp(f1)) - f1, rel=1e-6)


def test_logits_ignore_feature_and_weight_norms_and_scale_with_s():
    _, method = _hand_case(scaling=10.0)
    base = method.predict(_output([3.0, 4.0], [1.0, 0.0]))
    assert torch.allclose(method.predict(_output([30.0, 40.0], [0.01, 0.0])), base, atol=1e-5)
    with torch.no_grad():
        method.heads["visual"].weight.mul_(torch.tensor([[7.0], [0.1]]))  # rescale each class row
    assert torch.allclose(method.predict(_output([3.0, 4.0], [1.0, 0.0])), base, atol=1e-5)
    assert base.abs().max() <= 2 * 10.0 + 1e-5, "|z| <= M * s"


def test_training_updates_encoders_and_own_heads_not_the_fusion_head():
    model = make_model(("audio", "visual", "text"))
    opt = torch.optim.SGD(model.param_groups(), lr=0.5)
    method = build_method("mmcosine")
    method.setup(model, opt, seed=0)
    assert {id(p) for p in method.parameters()} <= {id(p) for g in opt.param_groups for p in g["params"]}
    method.setup(model, opt, seed=0)  # idempotent: the heads are added once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters())) + 3
    x, y = fake_batch(("audio", "visual", "text"))
    out = model(x)
    z = method.unimodal_logits(out)
    assert torch.allclose(method.predict(out), z["audio"] + z["visual"] + z["text"])
    method.loss(out, y)["ce"].backward()
    assert all(p.grad is None for p in model.head_parameters()), "the model's fusion head is unused"
    assert all(p.grad is not None for m in model.modalities for p in model.encoder_parameters(m)
               if p.requires_grad)
    heads_before = [p.detach().clone() for p in method.parameters()]
    method.before_step(model)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, method.parameters()))


def test_heads_are_seeded_bias_free_and_resume_exactly():
    model = make_model()
    state_before = torch.get_rng_state()
    a = build_method("mmcosine")
    a.setup(model, seed=3)
    assert torch.equal(torch.get_rng_state(), state_before), "head construction leaves the global RNG alone"
    assert all(h.bias is None for h in a.heads.values())
    with torch.no_grad():
        a.heads["audio"].weight.add_(1.0)
    b = build_method("mmcosine")
    b.setup(make_model(), seed=3)
    b.load_state_dict(a.state_dict())
    x, _ = fake_batch()
    out = model(x)
    assert torch.equal(a.predict(out), b.predict(out))
    same, other = build_method("mmcosine"), build_method("mmcosine")
    same.setup(make_model(), seed=3)
    other.setup(make_model(), seed=4)
    assert torch.equal(same.heads["visual"].weight, a.heads["visual"].weight), "seeded by the run seed"
    assert not torch.equal(other.heads["visual"].weight, a.heads["visual"].weight)


def test_matches_the_official_formula_on_random_features():
    """main_CD.py: mm(normalize(h, dim=1), normalize(W.T, dim=0)) * s per modality, summed."""
    model = make_model(classes=4, dim=6)
    method = build_method("mmcosine", scaling=10)
    method.setup(model, seed=0)
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(5, 6, generator=g) for m in ("audio", "visual")}
    out = ModelOutput(logits=torch.zeros(5, 4), unimodal_logits={}, features=feats)
    ref = sum(torch.mm(F.normalize(feats[m], dim=1), F.normalize(method.heads[m].weight.t(), dim=0)) * 10
              for m in feats)
    assert torch.allclose(method.predict(out), ref, atol=1e-5)


def test_head_gradients_are_averaged_across_ranks(monkeypatch):
    import equimodal._dist as dist
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.mul_(3))  # as if the other rank had twice ours
    model = make_model()
    method = build_method("mmcosine")
    method.setup(model)
    x, y = fake_batch()
    method.loss(model(x), y)["ce"].backward()
    before = [p.grad.clone() for p in method.parameters()]
    method.before_step(model)
    assert all(torch.allclose(p.grad, 1.5 * b) for p, b in zip(method.parameters(), before))


@pytest.mark.parametrize("scaling", [0, -1.0, float("inf"), float("nan"), True, "15"])
def test_bad_scaling_is_named(scaling):
    with pytest.raises(ValueError, match="scaling"):
        build_method("mmcosine", scaling=scaling)


def test_using_heads_before_setup_is_a_named_error():
    with pytest.raises(RuntimeError, match="setup"):
        build_method("mmcosine").predict(_output([1.0, 0.0], [0.0, 1.0]))
