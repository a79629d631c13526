"""UMT and UME (Du et al., ICML 2023) against peer spec B7, on hand-checkable cases."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.config import ConfigError, load_config
from equimodal.methods import build_method


def _setup(name, modalities=("audio", "visual"), **options):
    model = make_model(modalities)
    method = build_method(name, **options)
    opt = torch.optim.SGD(model.param_groups(), lr=0.1)
    method.setup(model, opt, seed=0)
    return model, method, opt


def test_ume_prediction_is_the_weighted_average_of_the_unimodal_heads():
    model, method, _ = _setup("ume", weights={"audio": 3.0, "visual": 1.0})
    x, y = fake_batch()
    out = model(x)
    by_hand = {}
    for m in ("audio", "visual"):
        w, b = method.heads[m].weight, method.heads[m].bias
        by_hand[m] = out.features[m] @ w.t() + b  # g_m(h_m) written out
    expected = (3.0 * by_hand["audio"] + 1.0 * by_hand["visual"]) / 4.0
    assert torch.allclose(method.predict(out), expected, atol=1e-6)
    equal = build_method("ume")
    equal.setup(model, seed=0)  # same seed -> same heads
    assert torch.allclose(equal.predict(out), 0.5 * (by_hand["audio"] + by_hand["visual"]), atol=1e-6)
    assert not torch.allclose(equal.predict(out), out.logits)  # not the model's fusion head
    assert all(torch.equal(method.unimodal_logits(out)[m], method.heads[m](out.features[m])) for m in by_hand)


def test_ume_trains_each_encoder_alone_and_never_the_fusion_head():
    model, method, _ = _setup("ume")
    assert [s.name for s in method.stages()] == ["unimodal"]  # one stage: no joint training
    x, y = fake_batch()
    out = model(x)
    terms = method.loss(out, y)
    assert set(terms) == {"ce/audio", "ce/visual"}
    assert terms["ce/audio"].item() == pytest.approx(F.cross_entropy(method.heads["audio"](out.features["audio"]),
                                                                     y).item(), rel=1e-6)
    g = torch.autograd.grad(terms["ce/audio"], model.encoder_parameters("visual") + method.parameters(),
                            allow_unused=True, retain_graph=True)
    n_vis = len(model.encoder_parameters("visual"))
    assert all(t is None for t in g[:n_vis]), "audio's loss must not reach the visual encoder"
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.head_parameters()), "the fusion head is not trained"
    assert all(p.grad is not None for p in method.parameters())


def test_ume_options_are_checked():
    for bad in ({"audio": -1.0, "visual": 1.0}, {"audio": 0.0, "visual": 0.0}, {"audio": "x"}, [1, 2], {}):
        with pytest.raises(ValueError, match="weights"):
            build_method("ume", weights=bad)
    with pytest.raises(ValueError, match="teacher_epochs"):
        build_method("ume", teacher_epochs=0)
    with pytest.raises(ValueError, match="weights name"):
        build_method("ume", weights={"audio": 1.0}).check_modalities(["audio", "visual"])
    with pytest.raises(ConfigError, match="weights"):
        load_config(overrides=["method.name=ume", "method.weights={sound: 1.0}"])


def _enter_multimodal(model, method, opt):
    method.on_stage_start("multimodal")
    method.setup(model, opt, seed=0)


def test_umt_feature_mse_against_frozen_teachers_reaches_only_the_student():
    model, method, opt = _setup("umt", weight=2.5)
    trained = {m: copy.deepcopy(model.encoder(m)).eval() for m in model.modalities}  # end of stage 1
    _enter_multimodal(model, method, opt)
    assert not all(torch.equal(a, b) for a, b in zip(trained["audio"].parameters(), model.encoder("audio").parameters())
                   ), "reinit: the student starts afresh"
    before = {m: [p.detach().clone() for p in method.teachers[m].parameters()] for m in model.modalities}
    x, y = fake_batch()
    out = method.forward(model, x)
    terms = method.loss(out, y)
    assert set(terms) == {"ce", "feature_mse/audio", "feature_mse/visual"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(out.logits, y).item(), rel=1e-6)
    for m in model.modalities:
        with torch.no_grad():
            h_t = trained[m](x[m])  # an independent copy of the stage-1 encoder
        by_hand = 2.5 * ((out.features[m] - h_t) ** 2).sum() / h_t.numel()
        assert terms[f"feature_mse/{m}"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    sum(terms.values()).backward()
    assert all(p.grad is None and not p.requires_grad for t in method.teachers.values() for p in t.parameters())
    assert all(p.grad is None for p in method.parameters()), "the unimodal heads are done in stage 2"
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_parameters(m))
               for m in model.modalities)
    opt.step()
    for m in model.modalities:
        assert all(torch.equal(a, b) for a, b in zip(before[m], method.teachers[m].parameters()))
    assert not method.teachers["audio"].training  # eval mode: BatchNorm statistics fixed


def test_umt_without_reinit_starts_from_the_teachers_and_resumes_them():
    model, method, opt = _setup("umt", reinit=False)
    _enter_multimodal(model, method, opt)
    x, y = fake_batch()
    model.eval()
    terms = method.loss(method.forward(model, x), y)
    assert terms["feature_mse/audio"].item() == pytest.approx(0.0, abs=1e-10)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_method("umt", reinit=False)
    fresh.setup(make_model(), seed=0)  # trainer's resume order: setup stage 0, load, then enter the stage
    fresh.load_state_dict(state)
    fresh.on_stage_start("multimodal", resumed=True)
    fresh.setup(make_model(), seed=0)
    for m in model.modalities:
        assert all(torch.equal(a, b) for a, b in zip(fresh.teachers[m].state_dict().values(),
                                                     method.teachers[m].state_dict().values()))


def test_umt_stage_one_is_the_unimodal_ensemble_and_stage_two_needs_the_forward():
    model, method, opt = _setup("umt")
    assert [s.name for s in method.stages()] == ["unimodal", "multimodal"]
    x, y = fake_batch()
    out = model(x)
    ume = build_method("ume")
    ume.setup(model, seed=0)
    assert torch.allclose(method.predict(out), ume.predict(out))
    assert set(method.loss(out, y)) == {"ce/audio", "ce/visual"}
    _enter_multimodal(model, method, opt)
    with pytest.raises(RuntimeError, match="method.forward"):
        method.loss(model(x), y)


def test_umt_options_are_checked():
    with pytest.raises(ValueError, match="weight"):
        build_method("umt", weight=-1.0)
    with pytest.raises(ValueError, match="reinit"):
        build_method("umt", reinit="yes")
    with pytest.raises(ValueError, match="student_epochs"):
        build_method("umt", student_epochs=1.5)
    with pytest.raises(ValueError, match="stages"):
        build_method("umt").on_stage_start("student")
