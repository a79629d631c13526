"""G-Blending against peers.md B1: the weight rule on hand numbers, held-out data, modes, trainer holdout."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from equimodal.config import load_config
from equimodal.data.base import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods.gblend import blend_weights
from equimodal.train import Trainer

MODS = ("audio", "visual")


def _dataset(n, seed, classes=5, mods=MODS):
    g = torch.Generator().manual_seed(seed)
    return TensorMultimodalDataset({m: torch.randn(n, 1, 12, 12, generator=g) for m in mods},
                                   torch.randint(0, classes, (n,), generator=g), classes)


def _data(holdout=True):
    return MethodData(train=_dataset(40, 1), val=_dataset(20, 2), holdout=_dataset(12, 3) if holdout else None)


def _method(data=None, **options):
    model = make_model(MODS)
    opt = torch.optim.SGD(model.param_groups(), lr=0.05)
    method = build_method("gblend", **options)
    if data is not None:
        method.attach_data(data)
    method.setup(model, opt, seed=0)
    return model, opt, method


# --- the weight rule on hand numbers -------------------------------------------------------
def test_delta_rule_on_hand_numbers():
    # rows: heads; columns: [L^T, L^V] at the start (N) and the end (N+n) of the super-epoch
    before = torch.tensor([[1.0, 1.2], [0.9, 1.5], [0.8, 1.0]])
    after = torch.tensor([[0.6, 1.0], [0.3, 1.4], [0.5, 0.8]])
    # dG = L^V_N - L^V_N+n = 0.2, 0.1, 0.2; O = L^V - L^T: 0.2->0.4, 0.6->1.1, 0.2->0.3; dO = 0.2, 0.5, 0.1
    raw = [0.2 / 0.2 ** 2, 0.1 / 0.5 ** 2, 0.2 / 0.1 ** 2]  # 5, 0.4, 20
    w, ok = blend_weights(before, after, "delta", min_overfit=1e-3)
    assert ok
    assert w.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-5)
    assert w.sum().item() == pytest.approx(1.0)


def test_multibench_rule_on_hand_numbers():
    before = torch.tensor([[1.0, 1.2], [0.9, 1.5], [0.8, 1.0]])
    after = torch.tensor([[0.6, 1.0], [0.3, 1.4], [0.5, 0.8]])
    # MultiBench (delta=False): |L^V_N+n| / O_N+n^2 with O_N+n = 0.4, 1.1, 0.3; "before" is not used
    raw = [1.0 / 0.4 ** 2, 1.4 / 1.1 ** 2, 0.8 / 0.3 ** 2]
    w, _ = blend_weights(before, after, "multibench", min_overfit=1e-3)
    assert w.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-5)
    w2, _ = blend_weights(torch.zeros(3, 2), after, "multibench", min_overfit=1e-3)
    assert torch.allclose(w, w2)


def test_degenerate_overfitting_is_floored_and_gain_is_absolute():
    before = torch.tensor([[1.0, 1.5], [1.0, 1.5], [1.0, 1.5]])
    after = torch.tensor([[0.5, 1.2], [0.9, 1.1], [0.4, 1.7]])
    # head 0: dG 0.3, dO 0.7-0.5 = 0.2; head 1: dG 0.4, dO 0.2-0.5 = -0.3 -> floor 0.1;
    # head 2: dG -0.2 (held-out loss rose) -> |dG| 0.2, dO 1.3-0.5 = 0.8
    raw = [0.3 / 0.04, 0.4 / 0.01, 0.2 / 0.64]
    w, ok = blend_weights(before, after, "delta", min_overfit=0.1)
    assert ok and w.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-5)
    # all gains zero, or a non-finite loss: uniform weights, flagged
    w, ok = blend_weights(before, before.clone(), "delta")
    assert not ok and w.tolist() == pytest.approx([1 / 3] * 3)
    bad = after.clone()
    bad[0, 1] = float("nan")
    w, ok = blend_weights(before, bad, "delta")
    assert not ok and w.tolist() == pytest.approx([1 / 3] * 3)


# --- the loss --------------------------------------------------------------------------------
def test_loss_is_the_weighted_sum_of_each_head_and_the_fused_ce():
    model, _, method = _method()
    method.weights = torch.tensor([0.5, 0.2, 0.3])
    x, y = _dataset(6, 9)[torch.arange(6)]
    out = model(x)
    terms = method.loss(out, y)
    assert set(terms) == {"ce/audio", "ce/visual", "ce/fused"}
    for m in MODS:
        expected = 0.5 if m == "audio" else 0.2
        direct = F.cross_entropy(method.heads[m](out.features[m]), y)
        assert terms[f"ce/{m}"].item() == pytest.approx(expected * direct.item(), rel=1e-5)
    assert terms["ce/fused"].item() == pytest.approx(0.3 * F.cross_entropy(out.logits, y).item(), rel=1e-5)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in method.parameters()), "the unimodal heads are trained"
    assert all(p.grad is not None for m in MODS for p in model.encoder_parameters(m))


# --- held-out data --------------------------------------------------------------------------
def _independent_losses(model, method, dataset):
    model.eval()
    with torch.no_grad():
        x, y = dataset[torch.arange(len(dataset))]
        out = model(x)
        z = [method.heads[m](out.features[m]) for m in MODS] + [out.logits]
    model.train()
    return torch.stack([F.cross_entropy(v, y) for v in z])


def test_held_out_losses_come_from_the_holdout_never_from_val(monkeypatch):
    data = _data()
    model, _, method = _method(data, super_epoch=1)
    seen = []
    original = data.batches

    def spy(dataset, *args, **kwargs):
        seen.append(dataset)
        return original(dataset, *args, **kwargs)

    monkeypatch.setattr(data, "batches", spy)
    method.on_epoch_start(0)
    losses = method.last_losses
    assert all(d is data.train or d is data.holdout for d in seen) and any(d is data.holdout for d in seen)
    assert not any(d is data.val for d in seen)
    held = _independent_losses(model, method, data.holdout)
    assert torch.allclose(losses[:, 1], held, atol=1e-5)
    assert torch.allclose(losses[:, 0], _independent_losses(model, method, data.train), atol=1e-5)
    val = _independent_losses(model, method, data.val)
    assert not torch.allclose(losses[:, 1], val, atol=1e-3), "the test would catch a switch to val"
    assert model.training, "the model is back in training mode"


def test_online_mode_reestimates_from_the_trajectory_each_super_epoch():
    data = _data()
    model, opt, method = _method(data, super_epoch=2)
    method.on_epoch_start(0)
    assert method.estimates == 0 and method.weights.tolist() == pytest.approx([1 / 3] * 3), "uniform first"
    start = method.last_losses.clone()
    for epoch in (0, 1):
        if epoch:
            method.on_epoch_start(epoch)  # inside the super-epoch: nothing measured
            assert method.estimates == 0 and torch.equal(method.last_losses, start)
        for x, y in data.batches(data.train, 10, seed=epoch):
            sum(method.loss(model(x), y).values()).backward()
            method.before_step(model)
            opt.step()
            opt.zero_grad()
    end = torch.stack([_independent_losses(model, method, data.train),
                       _independent_losses(model, method, data.holdout)], dim=1)
    method.on_epoch_start(2)
    assert method.estimates == 1
    expected, _ = blend_weights(start, end, "delta", 1e-2)
    assert torch.allclose(method.weights, expected, atol=1e-4)
    assert torch.allclose(method.last_losses, end, atol=1e-5)
    assert method.log()["w/fused"] == pytest.approx(expected[-1].item(), abs=1e-4)


@pytest.mark.parametrize("mode", ["offline", "online-copies"])
def test_copy_modes_train_copies_only(mode):
    data = _data()
    model, _, method = _method(data, mode=mode, super_epoch=1)
    params = [p.detach().clone() for p in [*model.parameters(), *method.parameters()]]
    rng = torch.get_rng_state()
    method.on_epoch_start(0)
    assert method.estimates == 1
    assert all(torch.equal(a, b) for a, b in zip(params, [*model.parameters(), *method.parameters()]))
    assert torch.equal(rng, torch.get_rng_state()), "the copies do not move the run's random stream"
    assert method.weights.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(method.weights, torch.full((3,), 1 / 3)), "estimated before the first step"
    first = method.weights.clone()
    method.on_epoch_start(1)
    assert method.estimates == (1 if mode == "offline" else 2)
    if mode == "offline":
        assert torch.equal(method.weights, first)


def test_estimation_statistics_are_all_reduced_once_per_measurement(monkeypatch):
    import equimodal.methods.gblend as gb
    calls = []

    def fake(t):
        calls.append(t.clone())
        return t

    monkeypatch.setattr(gb, "all_reduce_sum", fake)
    _, _, method = _method(_data())
    method.on_epoch_start(0)
    assert len(calls) == 1 and calls[0].numel() == 2 * (3 + 1)  # [3 train sums, n, 3 holdout sums, n]
    assert calls[0][3].item() == 40 and calls[0][7].item() == 12


def test_missing_holdout_is_a_named_error_and_no_data_keeps_uniform_weights():
    _, _, method = _method(_data(holdout=False))
    with pytest.raises(RuntimeError, match="held-out part of the training data"):
        method.on_epoch_start(0)
    _, _, method = _method(None)
    with pytest.warns(UserWarning, match="no data attached"):
        method.on_epoch_start(0)
    assert method.weights.tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("bad", [dict(mode="x"), dict(formula="y"), dict(super_epoch=0), dict(holdout_fraction=0),
                                 dict(holdout_fraction=1.0), dict(train_fraction=1.5), dict(min_overfit=0),
                                 dict(batch_size=0)])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        build_method("gblend", **bad)


# --- through the trainer ---------------------------------------------------------------------
def _rows(dataset):
    return torch.cat([x.flatten(1) for x in dataset.inputs.values()], dim=1)


def _overlap(a, b):
    return int((_rows(a)[:, None, :] == _rows(b)[None]).all(-1).any(1).sum())


def test_trainer_withholds_the_holdout_and_reestimates(tmp_path, tiny_overrides):
    base = tiny_overrides + ["train.epochs=2", "data.n_train=300", "train.probe=false"]
    plain = Trainer(load_config(overrides=base + ["method.name=joint"]), out_dir=tmp_path / "j", echo=lambda s: None)
    cfg = load_config(overrides=base + ["method.name=gblend", "method.super_epoch=1"])
    trainer = Trainer(cfg, out_dir=tmp_path / "g", echo=lambda s: None)
    holdout = trainer.holdout
    assert holdout is not None and len(holdout) > 0
    assert len(trainer.splits.train) + len(holdout) == len(plain.splits.train)
    assert len(holdout) == pytest.approx(0.08 * len(plain.splits.train), abs=6)  # stratified, rounded per class
    assert _overlap(holdout, plain.splits.train) == len(holdout), "carved from the training split"
    assert _overlap(holdout, trainer.splits.train) == 0, "withheld from training"
    assert _overlap(holdout, trainer.splits.val) == 0 and _overlap(holdout, trainer.splits.test) == 0
    assert trainer.method.data.holdout is holdout
    trainer.fit()
    assert trainer.method.estimates == 1
    first, second = trainer.history
    assert first["w/fused"] == pytest.approx(1 / 3) and first["gblend/estimates"] == 0
    assert second["gblend/estimates"] == 1
    weights = [second[f"w/{k}"] for k in (*trainer.model.modalities, "fused")]
    assert sum(weights) == pytest.approx(1.0) and weights != pytest.approx([1 / 3] * 3)
