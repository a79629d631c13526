"""Diagnosing & Re-learning against peers.md B11 (and the official code/ours.py)."""
import math

import pytest
import torch

import equimodal.methods.relearn as relearn_mod
from conftest import fake_batch, make_model
from equimodal.config import load_config
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods.relearn import interpolate_, kmeans, minmax_scale, purity, relearn_strength
from equimodal.train import Trainer


def test_minmax_scale_per_column_to_minus_one_one():
    x = torch.tensor([[0.0, 5.0, -2.0], [2.0, 5.0, 0.0], [4.0, 5.0, 6.0]])
    expected = torch.tensor([[-1.0, -1.0, -1.0], [0.0, -1.0, -0.5], [1.0, -1.0, 1.0]])  # constant column -> -1
    assert torch.allclose(minmax_scale(x), expected)


def test_purity_is_the_majority_vote_accuracy():
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([1, 1, 2, 0, 0, 2])
    # cluster 0 votes 1 (2 of 3), cluster 1 votes 0 (2 of 2), cluster 2 votes 2 (1 of 1): 5 of 6
    assert purity(clusters, labels) == pytest.approx(5 / 6)
    assert purity(torch.zeros(4, dtype=torch.long), torch.tensor([3, 3, 3, 0])) == pytest.approx(3 / 4)
    assert purity(torch.arange(4), torch.tensor([0, 1, 0, 1])) == 1.0  # one sample per cluster


def test_tiny_labelled_clustering_end_to_end():
    # two well separated groups in 1-D; the labels disagree with the groups on one sample
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    y = torch.tensor([0, 0, 1, 1, 1, 1])
    c = kmeans(minmax_scale(x), 2, seed=0)
    assert c[:3].unique().numel() == 1 and c[3:].unique().numel() == 1 and c[0] != c[3]
    assert purity(c, y) == pytest.approx(5 / 6)  # (2 + 3) / 6


def test_kmeans_is_deterministic_and_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    y = torch.arange(3).repeat_interleave(20)
    x = centers[y] + 0.3 * torch.randn(60, 2, generator=g)
    a, b = kmeans(x, 3, seed=5), kmeans(x, 3, seed=5)
    assert torch.equal(a, b)
    assert purity(a, y) == 1.0
    assert kmeans(x[:2], 3).tolist() in ([0, 1], [1, 0])  # k capped at N


def test_strength_and_interpolation_by_hand():
    a = relearn_strength(torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.7]), 3.0)
    assert a.tolist() == pytest.approx([math.tanh(0.9), math.tanh(0.6)])
    p = [torch.nn.Parameter(torch.full((2, 2), 3.0)), torch.nn.Parameter(torch.tensor([-1.0, 5.0]))]
    theta0 = [torch.ones(2, 2), torch.tensor([1.0, 1.0])]
    interpolate_(p, theta0, 0.25)
    assert torch.allclose(p[0], torch.full((2, 2), 0.25 * 1 + 0.75 * 3))  # 2.5
    assert torch.allclose(p[1], torch.tensor([0.25 - 0.75, 0.25 + 3.75]))


def _data(n_train=20, n_val=10, n_test=10, seed=0):
    x, _ = fake_batch(n=n_train + n_val + n_test, seed=seed)
    y = torch.arange(n_train + n_val + n_test) % 5
    full = TensorMultimodalDataset(x, y, 5)
    train = full.subset(torch.arange(n_train))
    val = full.subset(torch.arange(n_train, n_train + n_val))
    test = full.subset(torch.arange(n_train + n_val, n_train + n_val + n_test))
    return train, val, test


def test_reinit_interpolates_every_encoder_parameter_with_its_computed_strength(monkeypatch):
    """Fixed clusterings (train: perfect, val: one cluster) make the purities known by hand."""
    train, val, test = _data()
    seen = []

    def fake_kmeans(x, k, seed=0, restarts=10, iters=300):
        seen.append(x.shape[0])
        n = x.shape[0]
        return (torch.arange(n) % 5) if n == 20 else torch.zeros(n, dtype=torch.long)

    monkeypatch.setattr(relearn_mod, "kmeans", fake_kmeans)
    model = make_model()
    method = build_method("relearn", reinit_epoch=2)
    method.attach_data(MethodData(train=train, val=val))
    method.setup(model)
    theta0 = {m: [p.detach().clone() for p in model.encoder_parameters(m)] for m in model.modalities}
    with torch.no_grad():  # "training": move every parameter away from theta0
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = {m: [p.detach().clone() for p in model.encoder_parameters(m)] for m in model.modalities}
    head_before = [p.detach().clone() for p in model.head_parameters()]
    buffers_before = [b.clone() for b in model.buffers()]
    method.on_epoch_end(1, {})  # not a re-init epoch
    assert seen == []
    method.on_epoch_end(2, {})
    assert seen == [20, 10, 20, 10]  # per modality: train (20) then val (10)
    # train purity 1 (clusters = labels); val labels 0..4 twice in one cluster: purity 2/10
    a = math.tanh(3.0 * abs(1.0 - 0.2))
    for m in model.modalities:
        for p, p0, pb in zip(model.encoder_parameters(m), theta0[m], before[m]):
            assert torch.allclose(p, a * p0 + (1 - a) * pb, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.head_parameters(), head_before)), "head untouched"
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers_before)), "BN statistics untouched"
    figures = method.log()
    assert figures["relearn/a/audio"] == pytest.approx(a) and figures["relearn/purity_val/visual"] == pytest.approx(0.2)
    assert method.log() == {}  # logged once


@pytest.fixture
def read(monkeypatch):
    """Every dataset a method iterates through ``MethodData.batches``, in order."""
    seen = []
    original = MethodData.batches

    def recording(self, dataset, *a, **k):
        seen.append(dataset)
        return original(self, dataset, *a, **k)

    monkeypatch.setattr(MethodData, "batches", recording)
    return seen


def test_reads_train_and_validation_never_test(read):
    train, val, test = _data()
    model = make_model()
    method = build_method("relearn", reinit_epoch=1, kmeans_restarts=2)
    method.attach_data(MethodData(train=train, val=val))
    method.setup(model)
    method.on_epoch_end(1, {})
    assert [d is train for d in read] == [True, False] and read[1] is val
    assert all(d is not test for d in read)


def test_trainer_gives_validation_not_test(tmp_path, tiny_overrides, read):
    cfg = load_config(overrides=tiny_overrides + ["method.name=relearn", "method.reinit_epoch=1",
                                                  "method.kmeans_restarts=1", "train.epochs=3", "data.n_train=200",
                                                  "train.probe=false"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    trainer.fit()
    splits = trainer.splits
    # one re-init, after epoch 1 (0-based): train then validation; epoch 2 is due too but is the
    # run's last, after which nothing is validated again, so it does not re-learn
    assert len(read) == 2
    assert read[0] is splits.train and read[1] is splits.val
    assert all(d is not splits.test for d in read)
    assert method_figures(trainer.history[0]) == {} and method_figures(trainer.history[1]) == {}
    assert trainer.method.done == 1 and method_figures(trainer.history[2])  # logged with the next epoch's record


def method_figures(record):
    return {k: v for k, v in record.items() if k.startswith("relearn/")}


def test_schedule_follows_the_official_code(monkeypatch):
    calls = []
    method = build_method("relearn", reinit_epoch=2, reinit_num=2)
    method.setup(make_model())
    method.attach_data(MethodData(train="train split", val="validation split"))
    monkeypatch.setattr(method, "relearn", lambda train, val: calls.append((method.epoch, train, val)))
    for epoch in range(10):
        method.on_epoch_start(epoch)
        method.on_epoch_end(epoch, {})
    # epoch % 2 == 0 and epoch > 0 (0-based), at most twice
    assert calls == [(2, "train split", "validation split"), (4, "train split", "validation split")]
    assert method.done == 4


def test_missing_validation_is_a_named_error():
    method = build_method("relearn", reinit_epoch=1)
    method.setup(make_model())
    with pytest.raises(RuntimeError, match="attach_data"):
        method.on_epoch_end(1, {})
    method.attach_data(MethodData(train=_data()[0]))
    method.done = 0
    with pytest.raises(RuntimeError, match="validation split"):
        method.on_epoch_end(1, {})


def test_theta0_is_kept_across_setup_and_restored_by_state():
    model = make_model()
    method = build_method("relearn")
    method.setup(model)
    theta0 = [t.clone() for t in method.theta0["audio"]]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    method.setup(model)  # a second setup (later stage, resume) must not re-snapshot
    assert all(torch.equal(a, b) for a, b in zip(method.theta0["audio"], theta0))
    method.done = 2
    fresh = build_method("relearn")
    fresh.setup(model)  # snapshots the moved weights, then the checkpoint restores theta0
    fresh.load_state_dict(method.state_dict())
    assert fresh.done == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.theta0["audio"], theta0))


@pytest.mark.parametrize("bad", [dict(move_lambda=-1), dict(reinit_epoch=0), dict(reinit_num=-1),
                                 dict(kmeans_restarts=0), dict(kmeans_iters=1.5)])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        build_method("relearn", **bad)


def test_best_validation_copy_holds_the_weights_that_scored(tmp_path, tiny_overrides):
    """train.select=best_val keeps the weights validated, not those re-initialised right after."""
    from equimodal.config import load_config
    from equimodal.train import Trainer
    cfg = load_config(overrides=tiny_overrides + ["method.name=relearn", "method.reinit_epoch=1",
                                                  "train.select=best_val", "train.probe=false", "train.epochs=2"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    snapshots = []
    original = trainer.method.on_epoch_end

    def record(epoch, metrics):
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        original(epoch, metrics)

    trainer.method.on_epoch_end = record
    trainer.fit()
    best = trainer.best
    assert all(torch.equal(best["model"][k], snapshots[best["epoch"]][k]) for k in best["model"])
