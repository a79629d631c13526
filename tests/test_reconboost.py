"""ReconBoost (Hua et al., ICML 2024) against peer spec B9 and its end note, on hand-checkable cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.reconboost import reconcile_loss

MODS = ("a", "b", "c")


def test_reconcile_loss_on_a_two_sample_three_class_hand_case():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])           # learner m
    others = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])  # F_-m: softmax 1/3 each; (1/2, 1/4, 1/4)
    y = torch.tensor([0, 2])
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(2 + math.e)]   # log softmax(z)[y] per sample
    q = [1 / 3, 1 / 4]                                               # softmax(F_-m)[y] per sample
    w1, w2 = 5.0, 1.0
    fit_hand = -w1 * (log_p[0] + log_p[1]) / 2
    rec_hand = w2 * (q[0] * log_p[0] + q[1] * log_p[1]) / 2
    fit, rec = reconcile_loss(z, others, y, w1, w2)
    assert fit.item() == pytest.approx(fit_hand, rel=1e-6)
    assert rec.item() == pytest.approx(rec_hand, rel=1e-6)
    # per sample: -(w1 - w2 q_i) log p_i, so samples the others already solve weigh less
    total = -((w1 - w2 * q[0]) * log_p[0] + (w1 - w2 * q[1]) * log_p[1]) / 2
    assert (fit + rec).item() == pytest.approx(total, rel=1e-6)
    # the released code's .mean(-1) over classes: a 1/C factor on both terms
    fit_c, rec_c = reconcile_loss(z, others, y, w1, w2, class_mean=True)
    assert fit_c.item() == pytest.approx(fit_hand / 3, rel=1e-6)
    assert rec_c.item() == pytest.approx(rec_hand / 3, rel=1e-6)
    # F_-m is a fixed target: no gradient flows into it
    others_req = others.clone().requires_grad_(True)
    z_req = z.clone().requires_grad_(True)
    sum(reconcile_loss(z_req, others_req, y, w1, w2)).backward()
    assert others_req.grad is None and z_req.grad is not None


def _setup(stage="round1-learn", modalities=MODS, **options):
    model = make_model(modalities)
    method = build_method("reconboost", **options)
    opt = torch.optim.SGD(model.param_groups(), lr=0.5, weight_decay=0.1)
    method.setup(model, opt, seed=0)
    method.on_stage_start(stage)
    method.setup(model, opt, seed=0)
    return model, method, opt


def _snapshot(model, method):
    parts = {f"enc/{m}": model.encoder_parameters(m) for m in model.modalities}
    parts.update({f"head/{m}": list(method.heads[m].parameters()) for m in model.modalities})
    parts["beta"] = [method.beta]
    parts["fusion"] = model.head_parameters()
    return {k: [p.detach().clone() for p in ps] for k, ps in parts.items()}, parts


def _one_step(model, method, opt, seed=0):
    x, y = fake_batch(MODS, seed=seed)
    terms = method.loss(method.forward(model, x), y)
    sum(terms.values()).backward()
    method.before_step(model)
    opt.step()
    opt.zero_grad()
    return terms


@pytest.mark.parametrize("stage, learner", [("round2-learn", "b"), ("round4-learn", "a"), ("round3-learn", "c")])
def test_learn_phase_changes_only_the_chosen_modalitys_learner(stage, learner):
    model, method, opt = _setup(stage)
    assert method.modality() == learner  # modalities cycle in the model's order
    before, params = _snapshot(model, method)
    _one_step(model, method, opt)
    changed = {k for k, ps in params.items() if any(not torch.equal(a, b) for a, b in zip(before[k], ps))}
    assert changed == {f"enc/{learner}", f"head/{learner}"}


def test_correct_phase_trains_every_learner_and_beta_on_the_ensemble_ce():
    model, method, opt = _setup("round1-correct")
    x, y = fake_batch(MODS)
    out = model(x)
    terms = method.loss(out, y)
    f = {m: method.heads[m](out.features[m]) for m in MODS}
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(method.beta * (f["a"] + f["b"] + f["c"]), y).item(),
                                               rel=1e-6)
    before, params = _snapshot(model, method)
    _one_step(model, method, opt)
    changed = {k for k, ps in params.items() if any(not torch.equal(a, b) for a, b in zip(before[k], ps))}
    assert changed == set(params) - {"fusion"}


def test_learn_phase_loss_uses_the_ensemble_without_m_and_the_ga_term():
    model, method, _ = _setup("round2-learn", alpha=0.7)
    with torch.no_grad():
        method.beta.fill_(2.0)
    x, y = fake_batch(MODS)
    out = model(x)
    f = {m: method.heads[m](out.features[m]) for m in MODS}
    terms = method.loss(out, y)
    fit, rec = reconcile_loss(f["b"], 2.0 * (f["a"] + f["c"]), y, 5.0, 1.0)
    assert terms["fit/b"].item() == pytest.approx(fit.item(), rel=1e-6)
    assert terms["reconcile/b"].item() == pytest.approx(rec.item(), rel=1e-6)
    # GA: alpha * MSE(softmax f_b, softmax f_prev), f_prev = the learner of round 1 ("a")
    ga = 0.7 * ((torch.softmax(f["b"], 1) - torch.softmax(f["a"], 1)) ** 2).mean()
    assert terms["ga/b"].item() == pytest.approx(ga.item(), rel=1e-6)
    assert torch.allclose(method.predict(out), 2.0 * (f["a"] + f["b"] + f["c"]))
    first = _setup("round1-learn")[1]
    assert not any(k.startswith("ga/") for k in first.loss(model(x), y)), "round 1 has no previous learner"


def test_ga_term_has_a_gradient_in_the_paper_form_and_none_in_the_code_form():
    x, y = fake_batch(MODS)
    for ga_gradient in (True, False):
        model, method, _ = _setup("round2-learn", ga_gradient=ga_gradient)
        ga = method.loss(model(x), y)["ga/b"]
        assert ga.item() > 0
        if ga_gradient:
            grads = torch.autograd.grad(ga, [method.heads["b"].weight, *model.encoder_parameters("b")])
            assert all(g.abs().sum() > 0 for g in grads[:2])
        else:
            assert not ga.requires_grad  # both inputs detached, as in the released code: zero gradient


def test_schedule_epochs_and_state():
    method = build_method("reconboost", rounds=3, epochs_per_stage=2, correct_epochs=1)
    stages = method.stages()
    assert [(s.name, s.epochs) for s in stages] == [("round1-learn", 2), ("round1-correct", 1), ("round2-learn", 2),
                                                    ("round2-correct", 1), ("round3-learn", 2), ("round3-correct", 1)]
    assert sum(s.epochs for s in build_method("reconboost").stages()) == 12  # the defaults' total
    model, method, opt = _setup("round3-correct", modalities=("a", "b"))
    with torch.no_grad():
        method.beta.fill_(1.5)
    fresh = build_method("reconboost")
    fresh.setup(make_model(("a", "b")), seed=0)
    fresh.load_state_dict(method.state_dict())
    assert (fresh.round, fresh.phase, fresh.modality(), fresh.beta.item()) == (3, "correct", "a", 1.5)
    assert fresh.beta.requires_grad


def test_shared_head_option_trains_one_head_in_the_learn_phase():
    model, method, opt = _setup("round1-learn", shared_head=True)
    assert list(method.heads) == ["shared"]
    w = method.heads["shared"].weight.detach().clone()
    enc_b = [p.detach().clone() for p in model.encoder_parameters("b")]
    _one_step(model, method, opt)
    assert not torch.equal(w, method.heads["shared"].weight)
    assert all(torch.equal(a, b) for a, b in zip(enc_b, model.encoder_parameters("b")))


def test_options_are_checked():
    for key, bad in (("rounds", 0), ("epochs_per_stage", 1.5), ("correct_epochs", True), ("weight1", -1.0),
                     ("weight2", "x"), ("alpha", -0.1), ("boost_rate", 0.0), ("ga_gradient", 1),
                     ("class_mean", "no"), ("shared_head", None)):
        with pytest.raises(ValueError, match=key):
            build_method("reconboost", **{key: bad})
    with pytest.raises(ValueError, match="round<t>"):
        build_method("reconboost").on_stage_start("supervised")
    with pytest.raises(ValueError, match="at least 2"):
        build_method("reconboost").check_modalities(["audio"])
