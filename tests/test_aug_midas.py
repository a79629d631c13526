"""AUG and MIDAS against peers_2025.md C3 / C4 (hand-checked rules, options, exact resume)."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.aug import assign_classifiers, boosting_loss
from equimodal.methods.midas import draw_sources, misaligned_terms


def _roundtrip(state):
    """What a checkpoint does to a method's state (weights-only load)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- AUG ------------------------------------------------------------------------------------
def test_aug_boosting_loss_by_hand():
    z1, z2, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    q = math.e / (math.e + 1)  # softmax([1, 0])[0]
    eps_all, eps_pre, res = boosting_loss([z1, z2], y, lam=0.5)
    assert eps_all.item() == pytest.approx(math.log(2))  # F_2 = [1, 1]
    assert eps_pre.item() == pytest.approx(-math.log(q))  # F_1 = [1, 0]
    assert res.item() == pytest.approx((1 - 0.5 * q) * math.log(1 + math.e))  # -(1 - lam p[y]) log p_2[y]
    # the released form: CE(z2, y) - lam * CE(z2, y * softmax(F_1))
    code = F.cross_entropy(z2, y) - 0.5 * F.cross_entropy(z2, F.one_hot(y, 2).float() * z1.softmax(1))
    assert res.item() == pytest.approx(code.item())
    eps_all, eps_pre, res2 = boosting_loss([z1, z2], y, lam=0.5, ensemble="probabilities")
    assert eps_all.item() == pytest.approx(-math.log(0.5))  # mean of (q, 1-q) and (1-q, q)
    assert eps_pre.item() == pytest.approx(-math.log(q)) and res2.item() == pytest.approx(res.item())
    one = boosting_loss([z1], y, lam=0.5)
    assert one[1] is None and one[2] is None and one[0].item() == pytest.approx(-math.log(q))


def test_aug_assignment_rule():
    assert assign_classifiers(torch.tensor([2.0, 1.0])) == [1]  # audio strong -> video grows (text, code)
    assert assign_classifiers(torch.tensor([1.0, 2.0])) == [0]
    assert assign_classifiers(torch.tensor([2.0, 1.0]), assign="algorithm") == [0]  # Algorithm 1
    assert assign_classifiers(torch.tensor([1.0, 1.005])) == []  # |r - sigma| <= tau
    assert assign_classifiers(torch.tensor([1.0, 1.02])) == [0]
    # three modalities: r_m = S_m / sum of the others < 0.4
    assert assign_classifiers(torch.tensor([1.0, 4.0, 5.0])) == [0]
    assert assign_classifiers(torch.tensor([1.0, 1.0, 8.0])) == [0, 1]


def _aug_step(method, model, opt, x, y, sub):
    method.on_substep(sub)
    terms = method.loss(method.forward(model, x), y)
    sum(terms.values()).backward()
    method.before_step(model)
    opt.step()
    opt.zero_grad()
    return terms


@pytest.mark.parametrize("layer1", ["trained", "frozen"])
def test_aug_alternates_grows_and_trains_the_new_classifier(layer1):
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    method = build_method("aug", layer1=layer1, max_classifiers=3, hidden=8)
    method.setup(model, opt, seed=0)
    x, y = fake_batch()
    method.on_epoch_start(0)
    enc_v = [p.detach().clone() for p in model.encoder_parameters("visual")]
    enc_a = [p.detach().clone() for p in model.encoder_parameters("audio")]
    _aug_step(method, model, opt, x, y, 0)  # audio sub-step: the video encoder does not move
    assert all(torch.equal(a, b) for a, b in zip(enc_v, model.encoder_parameters("visual")))
    assert any(not torch.equal(a, b) for a, b in zip(enc_a, model.encoder_parameters("audio")))
    # the sub-step's sample count and its confidence are recorded for audio only
    assert 0 < method._scores[0].item() <= 6 and method._scores[2].item() == 6 and method._scores[1].item() == 0
    _aug_step(method, model, opt, x, y, 1)
    assert method._scores[3].item() == 6 and 0 < method._scores[1].item() <= 6
    # ACA at the end of epoch 0: audio much more confident -> video gets classifier 2
    method._scores = torch.tensor([5.0, 1.0, 6.0, 6.0])
    method.on_epoch_end(0, {})
    assert method.counts == [1, 2]
    blocks = list(method.stacks["visual"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert (id(blocks[1].weight) in in_opt) == (layer1 == "trained")
    second, third = blocks[1].weight.detach().clone(), blocks[2].weight.detach().clone()
    shared = method.shared.weight.detach().clone()
    method.on_epoch_start(1)
    terms = _aug_step(method, model, opt, x, y, 1)
    assert set(terms) == {"all/visual", "pre/visual", "residual/visual"}
    assert (not torch.equal(second, blocks[1].weight)) == (layer1 == "trained")
    assert torch.equal(third, blocks[2].weight)  # inactive: no gradient, no decay, no momentum
    assert not torch.equal(shared, method.shared.weight)  # the shared Layer2 always learns
    # F_visual sums both classifiers; predict = 0.4 F_a + 0.6 F_v
    out = model(x)
    h = out.features["visual"]
    expected_v = sum(method.shared(F.relu(b(h))) for b in blocks[:2])
    uni = method.unimodal_logits(out)
    assert torch.allclose(uni["visual"], expected_v, atol=1e-6)
    assert torch.allclose(method.predict(out), 0.4 * uni["audio"] + 0.6 * uni["visual"], atol=1e-6)
    # a full stack refuses to grow
    method._scores = torch.tensor([5.0, 1.0, 6.0, 6.0])
    for _ in range(3):
        method.on_epoch_end(19, {})
    assert method.counts == [1, 3] and method.log()["aug/refused"] == 2.0


def test_aug_exact_resume_after_growth():
    x, y = fake_batch(seed=3)

    def run(model, opt, method, subs):
        for s in subs:
            _aug_step(method, model, opt, x, y, s)

    def fresh():
        model = make_model()
        opt = torch.optim.SGD(model.param_groups(), lr=0.05, momentum=0.9)
        method = build_method("aug", check_every=1, max_classifiers=3, hidden=8)
        method.setup(model, opt, seed=0)
        return model, opt, method

    model, opt, method = fresh()
    method.on_epoch_start(0)
    run(model, opt, method, [0, 1])
    method._scores = torch.tensor([1.0, 5.0, 6.0, 6.0])
    method.on_epoch_end(0, {})
    assert method.counts == [2, 1]
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    method.on_epoch_start(1)
    run(model, opt, method, [0, 1, 0])
    model2, opt2, method2 = fresh()  # resume order: setup, then load
    method2.load_state_dict(saved["method"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    method2.on_epoch_start(1)
    run(model2, opt2, method2, [0, 1, 0])
    assert method2.counts == [2, 1]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(method.parameters(), method2.parameters()))


def test_aug_options_are_checked():
    for options, word in (({"lam": -1}, "lam"), ({"check_every": 0}, "check_every"), ({"layer1": "x"}, "layer1"),
                          ({"ensemble": "sum"}, "ensemble"), ({"assign": "strong"}, "assign"),
                          ({"merge_weights": [1, -1]}, "merge_weights"), ({"max_classifiers": 1.5}, "max_classifiers")):
        with pytest.raises(ValueError, match=word):
            build_method("aug", **options)
    with pytest.raises(ValueError, match="assign"):
        build_method("aug", assign="algorithm").setup(make_model(("a", "b", "c")))
    with pytest.raises(ValueError, match="merge_weights"):
        build_method("aug", merge_weights=[1, 2, 3]).setup(make_model())


# --- MIDAS ----------------------------------------------------------------------------------
def _reference_two(fa, fv, y, ca, cv, perm, fuse, alpha_a, alpha_v, hard):
    """The spec's two-modality rule, written per sample as the released code reads (x~1, x~2)."""
    total = 0.0
    for i in range(len(y)):
        j = int(perm[i])
        for a_src, v_src in ((i, j), (j, i)):
            z = fuse({"a": fa[a_src:a_src + 1], "v": fv[v_src:v_src + 1]})[0]
            logp = torch.log_softmax(z, 0)
            wa = ca[a_src] / (ca[a_src] + cv[v_src])
            loss = -(alpha_a * wa * logp[y[a_src]] + alpha_v * (1 - wa) * logp[y[v_src]])
            if hard:  # the swapped modality: video in x~1, audio in x~2
                f = fv if a_src == i else fa
                s = F.cosine_similarity(f[i], f[j], dim=0)
                loss = loss * (1 + (s + 1) / 2)
            total += float(loss)
    return total / (2 * len(y))


@pytest.mark.parametrize("hard", [True, False])
def test_midas_misaligned_loss_matches_the_two_modality_rule(hard):
    g = torch.Generator().manual_seed(0)
    fa, fv = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 1, 1, 2])
    conf = torch.rand(2, 4, generator=g) + 0.1
    W = torch.randn(3, 6, generator=g)
    fuse = lambda f: torch.cat([f["a"], f["v"]], 1) @ W.t()  # noqa: E731
    perm = torch.tensor([2, 0, 3, 1])
    sources = torch.stack([torch.arange(4), perm], 1)
    alpha = torch.tensor([1.0, 1.7])
    mis, c_tilde, fused = misaligned_terms({"a": fa, "v": fv}, y, conf, sources, fuse, alpha, hard)
    expected = _reference_two(fa, fv, y, conf[0], conf[1], perm, fuse, 1.0, 1.7, hard)
    assert mis.item() == pytest.approx(expected, rel=1e-5)
    # tiny case by hand: z = [1, 1] for x~1 of sample 0 -> (2/3 * 1 + 1/3 * 2) ln 2
    one = misaligned_terms({"a": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "v": torch.tensor([[0.0, 0.0], [0.0, 1.0]])},
                           torch.tensor([0, 1]), torch.tensor([[0.8, 0.6], [0.2, 0.4]]),
                           torch.tensor([[0, 1], [1, 0]]), lambda f: f["a"] + f["v"], torch.tensor([1.0, 2.0]), False)
    assert one[1][:, 0, 0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert one[2][:, 0, 0].tolist() == pytest.approx([0.5, 0.5])


def test_midas_partners():
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    for seed in range(5):
        src = draw_sources(y, 2, torch.Generator().manual_seed(seed), "different_label")
        assert torch.equal(src[:, 0], torch.arange(6)) and bool((y[src[:, 1]] != y).all())
        src3 = draw_sources(y, 3, torch.Generator().manual_seed(seed), "different_label")
        assert bool((src3[:, 1] != src3[:, 2]).all() and (src3[:, 2] != src3[:, 0]).all())
        perm = draw_sources(y, 2, torch.Generator().manual_seed(seed), "permutation")[:, 1]
        assert sorted(perm.tolist()) == list(range(6))
    same = draw_sources(torch.zeros(3, dtype=torch.long), 2, torch.Generator().manual_seed(0))
    assert bool((same[:, 1] != same[:, 0]).all())  # no other label: any other sample
    assert draw_sources(torch.tensor([4]), 3, torch.Generator().manual_seed(0)).tolist() == [[0, 0, 0]]


def test_midas_alpha_updates_by_hand():
    model = make_model()
    paper = build_method("midas", warmup_epochs=0)
    paper.setup(model)
    paper.on_epoch_start(0)
    # mean c~ = (0.3, 0.7) -> m^ = 0; Delta = 0.3 - 0.1 -> alpha_0 = 1 + 0.05 * 0.2
    paper._pending = torch.tensor([3.0, 7.0, 1.0, 9.0, 10.0])
    paper.before_step(model)
    assert paper.alpha.tolist() == pytest.approx([1.01, 1.0])
    paper._pending = torch.tensor([3.0, 7.0, 9.0, 1.0, 10.0])  # Delta < 0: floored at 1
    paper.before_step(model)
    assert paper.alpha.tolist() == pytest.approx([1.0, 1.0])
    paper.alpha[1] = 1.5
    paper.on_epoch_start(1)  # reset every epoch
    assert paper.alpha.tolist() == [1.0, 1.0]
    code = build_method("midas", warmup_epochs=0, alpha_rule="code", alpha_max=1.07)
    code.setup(model)
    # uni_ratio = 4 / 2 = 2 > 1; mm_ratio = mean(3/1, 3/1) = 3 > 2 -> alpha += eta
    code._pending = torch.tensor([3.0, 1.0, 3.0, 1.0, 4.0, 2.0])
    code.before_step(model)
    assert code.shared_alpha == pytest.approx(1.05)
    code._pending = torch.tensor([3.0, 1.0, 3.0, 1.0, 4.0, 2.0])
    code.before_step(model)
    assert code.shared_alpha == pytest.approx(1.07)  # alpha_max
    code._pending = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0, 2.0])  # mm 1 < 2 -> down
    code.before_step(model)
    assert code.shared_alpha == pytest.approx(1.02)
    code._pending = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])  # uni 0.5: mm 1 >= 0.5 -> down, floor 1
    code.before_step(model)
    assert code.shared_alpha == 1.0


def _midas_step(method, model, opt, x, y):
    terms = method.loss(model(x), y)
    sum(terms.values()).backward()
    method.before_step(model)
    opt.step()
    opt.zero_grad()
    return terms


def test_midas_warmup_then_misaligned_training():
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=0.1)
    method = build_method("midas", warmup_epochs=1)
    method.setup(model, opt, seed=0)
    x, y = fake_batch()
    method.on_epoch_start(0)
    head = [p.detach().clone() for p in model.head_parameters()]
    terms = method.loss(model(x), y)
    assert set(terms) == {"uni/audio", "uni/visual"}  # warm-up: the unimodal heads only, summed (paper)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.head_parameters())  # the fused head is not trained
    assert all(p.grad is not None for p in model.encoder_parameters("visual"))
    opt.zero_grad()
    method.on_epoch_start(1)
    terms = _midas_step(method, model, opt, x, y)
    assert {"ce", "mis", "uni/audio", "uni/visual"} <= set(terms)
    assert any(not torch.equal(a, b) for a, b in zip(head, model.head_parameters()))
    assert method.step == 1 and float(method.alpha.min()) >= 1.0
    # three modalities: the paper's rule runs; the code's alpha rule is refused
    m3 = make_model(("a", "b", "c"))
    three = build_method("midas", warmup_epochs=0)
    three.setup(m3, seed=0)
    x3, y3 = fake_batch(("a", "b", "c"))
    assert torch.isfinite(sum(three.loss(m3(x3), y3).values()))
    with pytest.raises(ValueError, match="alpha_rule"):
        build_method("midas", alpha_rule="code").setup(m3)


def test_midas_exact_resume():
    def fresh():
        model = make_model()
        opt = torch.optim.SGD(model.param_groups(), lr=0.05, momentum=0.9)
        method = build_method("midas", warmup_epochs=0)
        method.setup(model, opt, seed=0)
        method.on_epoch_start(0)
        return model, opt, method

    batches = [fake_batch(seed=s) for s in range(3)]
    model, opt, method = fresh()
    _midas_step(method, model, opt, *batches[0])
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    for x, y in batches[1:]:
        _midas_step(method, model, opt, x, y)
    model2, opt2, method2 = fresh()
    method2.load_state_dict(copy.deepcopy(saved["method"]))
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x, y in batches[1:]:
        _midas_step(method2, model2, opt2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert torch.equal(method.alpha, method2.alpha) and method.step == method2.step == 3


def test_midas_options_are_checked():
    for options, word in (({"warmup_epochs": -1}, "warmup_epochs"), ({"lam": float("nan")}, "lam"),
                          ({"eta": -0.1}, "eta"), ({"partner": "any"}, "partner"), ({"alpha_rule": "x"}, "alpha_rule"),
                          ({"alpha_max": 0.5}, "alpha_max"), ({"hard_weight": 1}, "hard_weight"),
                          ({"uni_reduction": "avg"}, "uni_reduction")):
        with pytest.raises(ValueError, match=word):
            build_method("midas", **options)


def test_aug_adds_no_classifier_after_the_last_validation(tmp_path, tiny_overrides):
    """check_every=2 over 4 epochs: ACA is due after epoch 4, the last, when nothing could train or
    validate a new classifier; the test split must be scored with the stacks that validation saw."""
    from equimodal.config import load_config
    from equimodal.train import Trainer
    cfg = load_config(overrides=tiny_overrides + ["method.name=aug", "method.check_every=2", "train.epochs=4",
                                                  "train.probe=false", "method.sigma=0.0",
                                                  "method.max_classifiers=5"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    decisions = []
    original = trainer.method.on_epoch_end

    def record(epoch, metrics):
        before = list(trainer.method.counts)
        original(epoch, metrics)
        decisions.append((epoch, before, list(trainer.method.counts)))

    trainer.method.on_epoch_end = record
    trainer.fit()
    last_logged = [trainer.history[-1][f"classifiers/{m}"] for m in trainer.model.modalities]
    # sigma=0 makes every due check grow a stack; epochs 1 and 2 (0 and 1 counted from 0) grew...
    assert decisions[0][2] != decisions[0][1] and decisions[1][2] != decisions[1][1]
    # ...the last epoch (due: (3 + 1) % 2 == 0) did not
    assert decisions[-1][0] == 3 and decisions[-1][2] == decisions[-1][1]
    assert trainer.method.counts == [int(c) for c in last_logged]
