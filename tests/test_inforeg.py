"""InfoReg against peers.md B12 and the official main.py (trace list padded with 10 zeros, Fisher
term accumulated after the proximal term)."""
import math

import pytest
import torch

import equimodal.methods.inforeg as inforeg_mod
from conftest import make_model
from equimodal.methods import build_method
from equimodal.methods.inforeg import fisher_trace, fisher_weights, window_growth
from equimodal.models.multimodal import ModelOutput


def test_fisher_trace_is_the_sum_of_per_tensor_mean_squares():
    grads = [torch.full((2, 2), 2.0), torch.tensor([1.0, 3.0])]
    assert fisher_trace(grads).item() == pytest.approx(4.0 + (1 + 9) / 2)


def test_window_growth_with_ten_leading_zeros():
    assert window_growth([]) == 1.0  # epoch 0: k = 1
    # after one epoch: A = (0*9 + 2)/10, A' = 0 -> k = 1
    assert window_growth([2.0]) == pytest.approx(1.0)
    # [0]*8 + [2, 2]: A = 0.4, A' = 0.2 -> 0.5
    assert window_growth([2.0, 2.0]) == pytest.approx(0.5)
    # k = t_e / (t_1 + ... + t_e) while zeros remain in the window: 4 / 8
    assert window_growth([2.0, 2.0, 4.0]) == pytest.approx(0.5)
    # 12 traces: last window [1]*9 + [3] (mean 1.2), previous [1]*10 (mean 1) -> 0.2 / 1.2
    assert window_growth([1.0] * 11 + [3.0]) == pytest.approx(1 / 6)
    # constant traces: k = 1/e for e <= 10, then 0 once the zeros have left the window
    assert window_growth([5.0] * 10) == pytest.approx(0.1)
    assert window_growth([5.0] * 11) == pytest.approx(0.0)
    assert window_growth([0.0, 0.0]) == 0.0  # zero mean: inactive (the code would divide by zero)
    assert window_growth([1.0, 3.0], window=2) == pytest.approx((2.0 - 0.5) / 2.0)


def test_window_growth_without_padding():
    assert window_growth([2.0], pad="none") == 1.0
    assert window_growth([2.0, 4.0], pad="none") == pytest.approx((3.0 - 2.0) / 3.0)
    assert window_growth([1.0, 2.0, 3.0], window=2, pad="none") == pytest.approx((2.5 - 1.5) / 2.5)


def _output(audio, visual, extra=None):
    """A hand-made training output: the fused logits need a gradient (so scores are recorded)."""
    uni = {"audio": torch.tensor(audio), "visual": torch.tensor(visual),
           **{m: torch.tensor(z) for m, z in (extra or {}).items()}}
    return ModelOutput(logits=torch.zeros(2, 2, requires_grad=True), unimodal_logits=uni, features={})


def _score(logits, y):
    return sum(torch.softmax(torch.tensor(row), 0)[t].item() for row, t in zip(logits, y))


def _prepare(method, model, shift=0.5):
    """Anchor at epoch start, then move every encoder parameter by ``shift`` and set every grad to 1."""
    method.setup(model)
    method.on_epoch_start(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
            p.grad = torch.ones_like(p)


STRONG, FLAT = [[10.0, 0.0], [0.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]]
Y = torch.tensor([0, 1])


def test_pull_is_added_to_the_dominant_encoder_only():
    model = make_model()
    method = build_method("inforeg")
    _prepare(method, model, shift=0.5)
    method.loss(_output(STRONG, FLAT), Y)
    method.before_step(model)
    gap = _score(STRONG, [0, 1]) - _score(FLAT, [0, 1])  # s_a - s_v = 2 sigmoid(10) - 1
    beta = 0.95 * math.exp(math.tanh(gap))
    for p in model.encoder_parameters("audio"):
        assert torch.allclose(p.grad, torch.full_like(p, 1 + beta * 0.5), atol=1e-6)  # g + beta (theta - anchor)
    for p in [*model.encoder_parameters("visual"), *model.head_parameters()]:
        assert torch.all(p.grad == 1)
    log = method.log()
    assert log["regulated/audio"] == 1.0 and log["regulated/visual"] == 0.0
    assert log["beta/audio"] == pytest.approx(beta, rel=1e-6)


def test_fisher_is_accumulated_after_the_pull_and_closes_the_epoch():
    model = make_model()
    method = build_method("inforeg")
    _prepare(method, model, shift=0.5)
    method.loss(_output(STRONG, FLAT), Y)
    method.before_step(model)
    beta = method.log()["beta/audio"]
    # every conv/linear weight of audio has grad 1 + beta/2 everywhere (mean square (1 + beta/2)^2); visual 1
    n_audio, n_visual = len(fisher_weights(model.encoder("audio"))), len(fisher_weights(model.encoder("visual")))
    first = [n_audio * (1 + beta / 2) ** 2, n_visual * 1.0]
    assert method._fisher.tolist() == pytest.approx(first, rel=1e-5)
    for p in model.parameters():  # a second step, regulated again: the epoch's trace is the sum
        p.grad = torch.ones_like(p)
    method.loss(_output(STRONG, FLAT), Y)
    method.before_step(model)
    method.on_epoch_end(0, {})
    assert [method.traces["audio"][0], method.traces["visual"][0]] == pytest.approx([2 * first[0], 2 * first[1]],
                                                                                    rel=1e-5)
    method.on_epoch_start(1)  # k from [0]*10 + [t]: 1
    assert method.k == {"audio": 1.0, "visual": 1.0}
    method.traces = {"audio": [1.0] * 11 + [3.0], "visual": [5.0] * 11}
    method.on_epoch_start(12)
    assert method.k["audio"] == pytest.approx(1 / 6) and method.k["visual"] == pytest.approx(0.0)


def test_weaker_modality_dominating_uses_its_own_scale_and_closed_window_stops_the_pull():
    model = make_model()
    method = build_method("inforeg", scale_by_modality={"audio": 0.95, "visual": 0.1})
    _prepare(method, model, shift=-1.0)
    method.loss(_output(FLAT, STRONG), Y)
    method.before_step(model)
    beta = 0.1 * math.exp(math.tanh(_score(STRONG, [0, 1]) - 1.0))
    for p in model.encoder_parameters("visual"):
        assert torch.allclose(p.grad, torch.full_like(p, 1 - beta), atol=1e-6)
    assert all(torch.all(p.grad == 1) for p in model.encoder_parameters("audio"))
    # the visual window closed (k <= 0.05): no pull, whatever the scores
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    method.k["visual"] = 0.05
    method.loss(_output(FLAT, STRONG), Y)
    method.before_step(model)
    assert all(torch.all(p.grad == 1) for p in model.parameters())


def test_window_from_a_named_modality_is_the_official_rule():
    model = make_model()
    method = build_method("inforeg", window_from="audio")
    _prepare(method, model)
    method.k = {"audio": 0.01, "visual": 1.0}  # visual dominates, but audio's window is closed
    method.loss(_output(FLAT, STRONG), Y)
    method.before_step(model)
    assert all(torch.all(p.grad == 1) for p in model.parameters())
    method.k = {"audio": 1.0, "visual": 0.01}
    method.loss(_output(FLAT, STRONG), Y)
    method.before_step(model)
    assert any(not torch.all(p.grad == 1) for p in model.encoder_parameters("visual"))


def test_tie_regulates_nothing():
    model = make_model()
    method = build_method("inforeg")
    _prepare(method, model)
    method.loss(_output(STRONG, STRONG), Y)
    method.before_step(model)
    assert all(torch.all(p.grad == 1) for p in model.parameters())


def test_three_modalities_gap_against_the_mean_of_the_others():
    model = make_model(("audio", "visual", "text"))
    method = build_method("inforeg")
    _prepare(method, model, shift=1.0)
    mid = [[1.0, 0.0], [0.0, 1.0]]
    method.loss(_output(FLAT, STRONG, {"text": mid}), Y)
    method.before_step(model)
    s_v, s_a, s_t = _score(STRONG, [0, 1]), _score(FLAT, [0, 1]), _score(mid, [0, 1])
    beta = 0.95 * math.exp(math.tanh(s_v - (s_a + s_t) / 2))
    for p in model.encoder_parameters("visual"):
        assert torch.allclose(p.grad, torch.full_like(p, 1 + beta), atol=1e-6)
    assert all(torch.all(p.grad == 1) for m in ("audio", "text") for p in model.encoder_parameters(m))


def test_scores_are_all_reduced_before_the_decision(monkeypatch):
    calls = []

    def fake(t):
        calls.append(t.clone())
        t[1] *= 10  # as if the other ranks were much more confident on visual
        return t

    monkeypatch.setattr(inforeg_mod, "all_reduce_sum", fake)
    model = make_model()
    method = build_method("inforeg")
    _prepare(method, model)
    method.loss(_output(STRONG, [[1.0, 0.0], [0.0, 1.0]]), Y)
    method.before_step(model)
    assert len(calls) == 1 and calls[0].numel() == 3  # [s_a, s_v, count]
    assert all(torch.all(p.grad == 1) for p in model.encoder_parameters("audio"))
    assert any(not torch.all(p.grad == 1) for p in model.encoder_parameters("visual"))


def test_loss_has_fused_and_unimodal_cross_entropy():
    from conftest import fake_batch
    model = make_model()
    method = build_method("inforeg")
    method.setup(model)
    x, y = fake_batch()
    terms = method.loss(model(x), y)
    assert set(terms) == {"ce", "ce/audio", "ce/visual"}
    probe = make_model(estimator="probe")
    method = build_method("inforeg")
    method.setup(probe)
    assert set(method.loss(probe(x), y)) == {"ce", "probe/audio", "probe/visual"}  # not counted twice


def test_state_round_trip_keeps_traces_and_anchor():
    model = make_model()
    method = build_method("inforeg")
    _prepare(method, model)
    method.traces = {"audio": [1.0, 2.0], "visual": [3.0, 4.0]}
    fresh = build_method("inforeg")
    fresh.setup(make_model())
    fresh.load_state_dict(method.state_dict())
    assert fresh.traces == method.traces
    assert all(torch.equal(a, b) for a, b in zip(fresh.anchor["audio"], method.anchor["audio"]))


@pytest.mark.parametrize("bad", [dict(scale=-1), dict(threshold=float("nan")), dict(window=0), dict(pad="ones"),
                                 dict(scale_by_modality={"audio": -0.5}), dict(scale_by_modality=[0.1]),
                                 dict(window_from="")])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        build_method("inforeg", **bad)


def test_unknown_modality_names_are_named_errors():
    with pytest.raises(ValueError, match="scale_by_modality"):
        build_method("inforeg", scale_by_modality={"depth": 0.1}).check_modalities(["audio", "visual"])
    with pytest.raises(ValueError, match="window_from"):
        build_method("inforeg", window_from="depth").setup(make_model())
    with pytest.raises(ValueError, match="at least 2"):
        build_method("inforeg").setup(make_model(("audio",)))
