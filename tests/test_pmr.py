"""PMR against peers.md B4: prototypes, prototype logits, the switch on rho, EMA, absent classes."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from equimodal.data.base import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods.pmr import class_means, prototype_logits
from equimodal.models.multimodal import ModelOutput

MODS = ("audio", "visual")


def _dataset(n, seed, classes=5, mods=MODS, labels=None):
    g = torch.Generator().manual_seed(seed)
    y = labels if labels is not None else torch.randint(0, classes, (n,), generator=g)
    return TensorMultimodalDataset({m: torch.randn(n, 1, 12, 12, generator=g) for m in mods}, y, classes)


def _method(data=None, mods=MODS, classes=5, **options):
    model = make_model(mods, classes=classes)
    method = build_method("pmr", **options)
    if data is not None:
        method.attach_data(data)
    method.setup(model, seed=0)
    return model, method


def _features(model, dataset):
    model.eval()
    with torch.no_grad():
        x, y = dataset[torch.arange(len(dataset))]
        feats = model(x).features
    model.train()
    return feats, y


def _output(features, classes=2):
    b = next(iter(features.values())).shape[0]
    return ModelOutput(logits=torch.zeros(b, classes, requires_grad=True), unimodal_logits={}, features=features)


# --- the building blocks on hand numbers -----------------------------------------------------
def test_class_means_on_a_tiny_batch():
    h = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    sums, counts = class_means(h, torch.tensor([0, 1, 0]), 3)
    assert sums.tolist() == [[6.0, 8.0], [3.0, 4.0], [0.0, 0.0]]
    assert counts.tolist() == [2.0, 1.0, 0.0]


def test_prototype_logits_are_negative_euclidean_distances():
    h = {"a": torch.tensor([[0.0, 0.0], [3.0, 4.0]])}
    c = {"a": torch.tensor([[0.0, 0.0], [3.0, 0.0]])}
    assert prototype_logits(h, c)["a"].tolist() == [[0.0, -3.0], [-5.0, -4.0]]
    masked = prototype_logits(h, c, torch.tensor([True, False]))["a"]
    assert masked[:, 0].tolist() == [0.0, -5.0] and torch.isinf(masked[:, 1]).all()


# --- prototypes ------------------------------------------------------------------------------
def test_prototypes_are_class_means_of_eval_features():
    train = _dataset(30, 1)
    model, method = _method(MethodData(train=train), proto_fraction=1.0)
    modes = []
    model.encoder("audio").register_forward_hook(lambda mod, i, o: modes.append(mod.training))
    method.on_epoch_start(0)
    assert modes and not any(modes), "prototypes are computed in eval mode (as the official code)"
    assert model.training and model.encoder("audio").training, "training mode restored"
    feats, y = _features(model, train)
    for m in MODS:
        for k in range(5):
            expected = feats[m][y == k].mean(0)
            assert torch.allclose(method.prototypes[m][k], expected, atol=1e-5), (m, k)
    assert method.valid.all() and method.computed == 1


def test_a_tenth_of_the_training_data_and_one_all_reduce(monkeypatch):
    import equimodal.methods.pmr as pmr_mod
    calls = []

    def fake(t):
        calls.append(t.clone())
        return t

    monkeypatch.setattr(pmr_mod, "all_reduce_sum", fake)
    labels = torch.arange(50) % 5
    model, method = _method(MethodData(train=_dataset(50, 2, labels=labels)))
    method.on_epoch_start(0)
    # one packed collective per pass: [C x D sums per modality, C counts]; 5 samples = ceil(0.1 * 50)
    counts = calls[0][-5:]
    assert counts.sum().item() == math.ceil(0.1 * 50)
    assert calls[0].numel() == 2 * 5 * 12 + 5
    # classes absent from the tenth on the first computation: one more pass, over all of train
    assert len(calls) == (2 if (counts == 0).any() else 1)
    assert calls[-1][-5:].sum().item() == (50 if len(calls) == 2 else 5)
    calls.clear()
    method.on_epoch_start(1)  # later computations never take the extra pass
    assert len(calls) == 1 and calls[0][-5:].sum().item() == 5


def test_ema_and_absent_classes():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    train = _dataset(10, 3, classes=4, labels=labels)  # class 3 never occurs
    model, method = _method(MethodData(train=train), classes=4, proto_fraction=1.0, momentum=0.2)
    method.on_epoch_start(0)
    assert method.valid.tolist() == [True, True, True, False]
    old = {m: c.clone() for m, c in method.prototypes.items()}
    with torch.no_grad():  # move the encoders so the fresh means differ from the old ones
        for p in model.parameters():
            p.add_(0.05)
    method.on_epoch_start(1)
    feats, y = _features(model, train)
    for m in MODS:
        for k in range(3):
            fresh = feats[m][y == k].mean(0)
            assert torch.allclose(method.prototypes[m][k], 0.8 * fresh + 0.2 * old[m][k], atol=1e-5)
    assert method.valid.tolist() == [True, True, True, False]
    logits = prototype_logits(feats, method.prototypes, method.valid)
    assert torch.isinf(logits["audio"][:, 3]).all(), "a class with no sample gets no probability mass"


def test_classes_absent_from_the_part_keep_their_previous_prototype():
    labels = torch.tensor([0, 1] * 10)
    train = _dataset(20, 4, classes=2, labels=labels)
    model, method = _method(MethodData(train=train), classes=2, proto_fraction=1.0, momentum=0.5)
    method.on_epoch_start(0)
    before = {m: c.clone() for m, c in method.prototypes.items()}
    method.data = MethodData(train=train.subset(torch.arange(0, 20, 2)))  # only class 0 now
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    method.on_epoch_start(1)
    for m in MODS:
        assert torch.equal(method.prototypes[m][1], before[m][1]), "absent: kept"
        assert not torch.allclose(method.prototypes[m][0], before[m][0]), "present: updated"


def test_first_computation_fills_absent_classes_from_all_of_train(monkeypatch):
    import equimodal.methods.pmr as pmr_mod
    passes = []
    monkeypatch.setattr(pmr_mod, "all_reduce_sum", lambda t: passes.append(t[-2:].tolist()) or t)
    labels = torch.tensor([0] * 19 + [1])
    train = _dataset(20, 5, classes=2, labels=labels)
    model, method = _method(MethodData(train=train), classes=2, proto_fraction=0.1)
    method.on_epoch_start(0)
    assert passes == [[2.0, 0.0], [19.0, 1.0]], "the 10% part lacks class 1: a second pass over all of train"
    assert method.valid.tolist() == [True, True]
    feats, _ = _features(model, train)
    for m in MODS:
        assert torch.allclose(method.prototypes[m][1], feats[m][19], atol=1e-5)


# --- the switch on rho -----------------------------------------------------------------------
def _switch_case(audio_close):
    """Two classes, prototypes at 0 and 10. The close modality's features sit on their class
    prototype (high score); the other's halfway (score 1/2)."""
    _, method = _method(classes=2, alpha=2.0)
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    method.prototypes = {m: protos.clone() for m in MODS}
    method.valid = torch.tensor([True, True])
    y = torch.tensor([0, 1])
    close = torch.tensor([[0.0, 0.0], [10.0, 0.0]], requires_grad=True)
    far = torch.tensor([[5.0, 0.0], [5.0, 0.0]], requires_grad=True)
    feats = {"audio": close, "visual": far} if audio_close else {"audio": far, "visual": close}
    return method, feats, y


@pytest.mark.parametrize("audio_close", [True, False])
def test_only_the_slower_modality_gets_the_prototypical_ce(audio_close):
    method, feats, y = _switch_case(audio_close)
    terms = method.loss(_output(feats), y)
    logits = prototype_logits(feats, method.prototypes)
    s = {m: torch.softmax(logits[m], 1)[torch.arange(2), y].sum().item() for m in MODS}
    rho_a = s["audio"] / s["visual"]
    assert (rho_a > 1) == audio_close
    slow, fast = ("visual", "audio") if audio_close else ("audio", "visual")
    assert terms[f"pce/{slow}"].item() == pytest.approx(2.0 * F.cross_entropy(logits[slow], y).item(), rel=1e-5)
    assert terms[f"pce/{fast}"].item() == 0.0
    assert method.last_ratios.tolist() == pytest.approx([rho_a, 1 / rho_a], rel=1e-5)
    sum(terms.values()).backward()
    assert feats[slow].grad.abs().sum() > 0 and feats[fast].grad.abs().sum() == 0
    assert method.log() == pytest.approx({"rho/audio": rho_a, "rho/visual": 1 / rho_a,
                                          "boosted/audio": float(not audio_close),
                                          "boosted/visual": float(audio_close)}, rel=1e-5)


def test_tie_and_modulation_window():
    method, feats, y = _switch_case(True)
    tie = {"audio": feats["audio"], "visual": feats["audio"]}
    terms = method.loss(_output(tie), y)
    assert terms["pce/audio"].item() == 0 and terms["pce/visual"].item() == 0
    method.modulation_starts, method.modulation_ends = 2, 3
    for epoch, inside in [(1, False), (2, True), (3, True), (4, False)]:
        method.epoch = epoch
        terms = method.loss(_output(feats), y)
        assert (terms["pce/visual"].item() > 0) == inside, epoch


def test_three_modalities_every_modality_below_the_mean_of_the_others():
    mods = ("a", "b", "c")
    _, method = _method(mods=mods, classes=2, alpha=1.0)
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    method.prototypes = {m: protos.clone() for m in mods}
    method.valid = torch.tensor([True, True])
    y = torch.tensor([0, 1])
    feats = {"a": protos.clone(), "b": torch.tensor([[4.9, 0.0], [5.1, 0.0]]), "c": torch.full((2, 2), 5.0)}
    terms = method.loss(_output(feats), y)
    logits = prototype_logits(feats, method.prototypes)
    s = torch.stack([torch.softmax(logits[m], 1)[torch.arange(2), y].sum() for m in mods])
    rho = s / ((s.sum() - s) / 2)
    assert torch.allclose(method.last_ratios, rho, atol=1e-6)
    for i, m in enumerate(mods):
        expected = F.cross_entropy(logits[m], y).item() if rho[i] < 1 else 0.0
        assert terms[f"pce/{m}"].item() == pytest.approx(expected, rel=1e-5), m
    assert (rho < 1).sum() == 2


def test_scores_are_all_reduced_before_the_switch(monkeypatch):
    import equimodal.methods.pmr as pmr_mod
    method, feats, y = _switch_case(True)  # locally audio is faster
    monkeypatch.setattr(pmr_mod, "all_reduce_sum", lambda t: t * torch.tensor([1.0, 100.0]))  # other ranks: visual
    terms = method.loss(_output(feats), y)
    assert terms["pce/audio"].item() > 0 and terms["pce/visual"].item() == 0


def test_entropy_regulariser_is_off_by_default_and_acts_on_the_dominant_modality_early():
    method, feats, y = _switch_case(True)
    assert not any(k.startswith("entropy") for k in method.loss(_output(feats), y))
    method.entropy_weight, method.entropy_epochs = 0.5, 2
    method.epoch = 1
    terms = method.loss(_output(feats), y)
    p = torch.softmax(prototype_logits(feats, method.prototypes)["audio"], 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert terms["entropy/audio"].item() == pytest.approx(-0.5 * entropy.item(), rel=1e-4)
    assert terms["entropy/visual"].item() == 0.0
    method.epoch = 2
    assert not any(k.startswith("entropy") for k in method.loss(_output(feats), y))


# --- state, data, options --------------------------------------------------------------------
def test_prototypes_are_in_the_state_dict():
    model, method = _method(MethodData(train=_dataset(30, 6)), proto_fraction=1.0)
    method.on_epoch_start(0)
    state = method.state_dict()
    fresh = build_method("pmr")
    fresh.setup(make_model(MODS))
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.prototypes[m], method.prototypes[m]) for m in MODS)
    assert torch.equal(fresh.valid, method.valid) and fresh.computed == 1


def test_without_data_the_loss_is_plain_ce_with_a_warning():
    model, method = _method(None)
    with pytest.warns(UserWarning, match="no data attached"):
        method.on_epoch_start(0)
    x, y = _dataset(6, 7)[torch.arange(6)]
    assert set(method.loss(model(x), y)) == {"ce"}


@pytest.mark.parametrize("bad", [dict(alpha=-1), dict(momentum=1.0), dict(proto_fraction=0), dict(entropy_weight=-0.1),
                                 dict(modulation_starts=5, modulation_ends=2), dict(proto_batch_size=0),
                                 dict(entropy_epochs=-1)])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=list(bad)[-1]):
        build_method("pmr", **bad)
