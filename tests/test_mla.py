"""MLA against peers.md B8 (and the note on the official code at the spec's end)."""
import math

import pytest
import torch

from conftest import fake_batch, make_model
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods import mla as mla_module
from equimodal.methods.mla import entropy_weights, update_projector
from equimodal.models import MultimodalModel, SmallCNN


def _fro(rows):
    norm = math.sqrt(sum(x * x for row in rows for x in row))
    return [[x / norm for x in row] for row in rows]


def test_projector_update_by_hand_both_forms():
    P = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([1.0, 1.0])
    # k = P r = (2, 1); k k^T = [[4, 2], [2, 1]]; r.k = 3; k r^T = [[2, 2], [1, 1]]
    owm = _fro([[2 - 4 / 3.1, -2 / 3.1], [-2 / 3.1, 1 - 1 / 3.1]])
    official = _fro([[2 - 4 / 2.1, -2 / 2.1], [-2 / 1.1, 1 - 1 / 1.1]])
    assert torch.allclose(update_projector(P, r, 0.1, "owm"), torch.tensor(owm), atol=1e-6)
    assert torch.allclose(update_projector(P, r, 0.1, "official"), torch.tensor(official), atol=1e-6)
    # from the identity (k = r): OWM removes r's direction almost entirely (P r = a r / (a + r.r),
    # before the norm); the element-wise form divides by a + r r^T entry by entry
    eye, r2 = torch.eye(2), torch.tensor([1.0, 2.0])
    owm2 = update_projector(eye, r2, 0.1, "owm")
    assert torch.linalg.matrix_norm(owm2).item() == pytest.approx(1.0)
    unnormed = eye - torch.outer(r2, r2) / 5.1
    assert torch.allclose(owm2 @ r2, (0.1 / 5.1) * r2 / torch.linalg.matrix_norm(unnormed), atol=1e-6)
    official2 = _fro([[1 - 1 / 1.1, -2 / 2.1], [-2 / 2.1, 1 - 4 / 4.1]])
    assert torch.allclose(update_projector(eye, r2, 0.1, "official"), torch.tensor(official2), atol=1e-6)


def test_entropy_weights_by_hand():
    # modality a: uniform predictions (entropy ln 2 per sample); v: 0.9 / 0.1 (entropy h)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    z = torch.tensor([[[0.0, 0.0], [0.0, 0.0]],
                      [[math.log(0.9), math.log(0.1)], [math.log(0.5), math.log(0.5)]]])
    # per batch: E_a = 2 ln2, E_v = h + ln2; w_m = exp(maxE - E_m) / sum
    ea, ev = 2 * math.log(2), h + math.log(2)
    w = entropy_weights(z, "batch", "class")
    assert w.shape == (2, 1, 1)
    assert w.flatten().tolist() == pytest.approx([1 / (1 + math.exp(ea - ev)), 1 / (1 + math.exp(ev - ea))], rel=1e-6)
    # per sample: sample 0 has E = (ln2, h), sample 1 ties -> (0.5, 0.5)
    ws = entropy_weights(z, "sample", "class")
    assert ws.shape == (2, 2, 1)
    assert ws[:, 0, 0].tolist() == pytest.approx([1 / (1 + math.exp(math.log(2) - h)), 1 / (1 + math.exp(h - math.log(2)))])
    assert ws[:, 1, 0].tolist() == pytest.approx([0.5, 0.5])
    # the official softmax over dim 0 (the batch): a's columns are uniform over 2 samples (entropy 2 ln2);
    # v's column 0 is softmax(ln .9, ln .5) = (9/14, 5/14), column 1 softmax(ln .1, ln .5) = (1/6, 5/6)
    col = lambda ps: -sum(p * math.log(p) for p in ps)  # noqa: E731
    ev0 = col([9 / 14, 5 / 14]) + col([1 / 6, 5 / 6])
    wb = entropy_weights(z, "batch", "batch_axis")
    assert wb.flatten().tolist() == pytest.approx([1 / (1 + math.exp(ea - ev0)), 1 / (1 + math.exp(ev0 - ea))], rel=1e-6)


def _setup(alpha=0.1, **options):
    model = make_model()
    opt = torch.optim.SGD([*model.parameters()], lr=0.0)  # lr 0: parameters stay put, easy to recompute
    method = build_method("mla", alpha=alpha, **options)
    method.setup(model, opt, seed=0)
    return model, opt, method


def _substep(method, model, batch, index):
    method.on_substep(index)
    x, y = batch
    out = method.forward(model, x)
    sum(method.loss(out, y).values()).backward()
    return out


def test_head_gradient_is_replaced_by_g_times_projector_transpose():
    model, opt, method = _setup(alpha=0.1)
    batch = fake_batch()
    # first update of the run: neither P nor the gradient changes
    _substep(method, model, batch, 0)
    g0 = method.head.weight.grad.clone()
    method.before_step(model)
    assert torch.equal(method.head.weight.grad, g0) and torch.equal(method.P, torch.eye(12))
    opt.zero_grad(set_to_none=True)
    for p in method.parameters():
        p.grad = None
    # second update (visual): P from r = batch mean of h_visual, then G <- G P^T
    out = _substep(method, model, batch, 1)
    assert set(out.features) == {"visual"}
    r = out.features["visual"].detach().mean(0)
    g = method.head.weight.grad.clone()
    bias_g = method.head.bias.grad.clone()
    method.before_step(model)
    P = update_projector(torch.eye(12), r, 0.1, "owm")
    assert torch.allclose(method.P, P, atol=1e-6)
    assert torch.allclose(method.head.weight.grad, g @ P.T, atol=1e-6)
    assert not torch.allclose(method.head.weight.grad, g + g @ P.T, atol=1e-4), "added instead of replaced"
    assert torch.equal(method.head.bias.grad, bias_g), "the bias is not projected"
    assert method.updates == 2 and method.batch_in_epoch == 1


def test_substep_encodes_only_its_modality():
    model, opt, method = _setup()
    _substep(method, model, fake_batch(), 1)
    assert all(p.grad is None for p in model.encoder("audio").parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder("visual").parameters())
    assert method.substeps() == 2


def test_a_follows_the_batch_index():
    x, y = fake_batch(n=16)
    method = build_method("mla")
    method.attach_data(MethodData(train=TensorMultimodalDataset(x, y, 5)))
    model = make_model()
    method.setup(model, seed=0)
    method.on_epoch_start(0)
    xb, yb = fake_batch(n=6)  # 16 samples in batches of 6 -> n = 3
    for batch_index in range(2):
        for i in range(2):
            _substep(method, model, (xb, yb), i)
            method.before_step(model)
            if batch_index == 0 and i == 1:
                assert method.last_a == pytest.approx(0.1)  # batch 0: 0.1^(1 + 0/3)
    assert method.last_a == pytest.approx(0.1 ** (1 + 1 / 3))
    assert method.batch_in_epoch == 2
    method.on_epoch_start(1)
    assert method.batch_in_epoch == 0


def test_without_data_a_needs_the_constant_option():
    model = make_model()
    method = build_method("mla")
    method.setup(model, seed=0)
    for i in range(2):
        _substep(method, model, fake_batch(), i)
        if i == 0:
            method.before_step(model)
    with pytest.raises(RuntimeError, match="alpha"):
        method.before_step(model)


def test_mean_feature_is_all_reduced(monkeypatch):
    """The statistics [sum h, count] are summed across ranks before r is formed."""
    model, opt, method = _setup(alpha=0.1)
    method.updates = 1
    other = torch.cat([torch.full((12,), 5.0), torch.tensor([4.0])])  # another rank: 4 samples, sum 5 each
    monkeypatch.setattr(mla_module, "all_reduce_sum", lambda t: t.add_(other))
    out = _substep(method, model, fake_batch(), 0)
    method.before_step(model)
    h = out.features["audio"].detach()
    r = (h.sum(0) + 5.0) / (h.shape[0] + 4)
    assert torch.allclose(method.P, update_projector(torch.eye(12), r, 0.1, "owm"), atol=1e-6)


def test_predict_is_entropy_weighted_sum_of_shared_head():
    model, _, method = _setup()
    x, _ = fake_batch()
    with torch.no_grad():
        out = model(x)
        z = torch.stack([method.head(out.features[m]) for m in ("audio", "visual")])
        w = entropy_weights(z)
        assert torch.allclose(method.predict(out), w[0] * z[0] + w[1] * z[1], atol=1e-6)
        assert torch.allclose(method.unimodal_logits(out)["visual"], z[1])
    _, _, fixed = _setup(fusion="fixed", fixed_weights=[3.0, 1.0])
    fixed.head.load_state_dict(method.head.state_dict())
    with torch.no_grad():
        assert torch.allclose(fixed.predict(out), 0.75 * z[0] + 0.25 * z[1], atol=1e-6)


def test_state_round_trip_keeps_projector_and_counters():
    model, _, method = _setup()
    method.P = torch.randn(12, 12)
    method.updates, method.batch_in_epoch = 7, 3
    state = method.state_dict()
    fresh = build_method("mla", alpha=0.1)
    fresh.setup(make_model(), seed=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.P, method.P) and fresh.updates == 7 and fresh.batch_in_epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.head.parameters(), method.head.parameters()))


def test_encoders_of_different_sizes_are_refused():
    model = MultimodalModel({"audio": SmallCNN(width=4, out_dim=8), "visual": SmallCNN(width=4, out_dim=6)}, 5)
    with pytest.raises(ValueError, match="same feature size"):
        build_method("mla").setup(model)


@pytest.mark.parametrize("options, word", [
    ({"projector": "scalar"}, "projector"), ({"fusion": "mean"}, "fusion"), ({"entropy": "all"}, "entropy"),
    ({"entropy_softmax": "rows"}, "entropy_softmax"), ({"alpha": 0}, "alpha"), ({"alpha": True}, "alpha"),
    ({"project_head": "yes"}, "project_head"), ({"fixed_weights": [1, -1]}, "fixed_weights"),
    ({"fixed_weights": [0, 0]}, "fixed_weights")])
def test_bad_options_are_named(options, word):
    with pytest.raises(ValueError, match=word):
        build_method("mla", **options)


def test_fixed_weights_must_match_the_modalities():
    method = build_method("mla", fusion="fixed", fixed_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="fixed_weights"):
        method.setup(make_model(), seed=0)


def test_project_head_false_leaves_gradient_alone():
    model, _, method = _setup(project_head=False)
    method.updates = 5
    _substep(method, model, fake_batch(), 0)
    g = method.head.weight.grad.clone()
    method.before_step(model)
    assert torch.equal(method.head.weight.grad, g) and torch.equal(method.P, torch.eye(12))
