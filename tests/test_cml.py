"""CML (Ma et al., ICML 2023) against peers.md B16: hand-checked calibration penalty and partial predictions."""
import math

import pytest
import torch
from torch import nn

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.cml import all_subset_pairs, calibration_penalty
from equimodal.models.multimodal import ModelOutput


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


class SumOfFeatures(nn.Module):
    """A model whose 'features' are already 2-class logits and whose fusion sums them: partial
    predictions are then easy to write down by hand."""

    def __init__(self, modalities=("a", "v")):
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Identity() for m in modalities})
        self.num_classes = 2

    @property
    def modalities(self):
        return tuple(self.encoders)

    def encoder(self, m):
        return self.encoders[m]

    def encoder_parameters(self, m):
        return []

    def fuse(self, features):
        return torch.stack(list(features.values())).sum(0)


def output_of(features):
    model = SumOfFeatures(tuple(features))
    return model, ModelOutput(logits=model.fuse(features), unimodal_logits=dict(features), features=features)


def test_penalty_hand_values():
    sub, sup = torch.tensor([0.9, 0.4]), torch.tensor([0.6, 0.7])
    assert calibration_penalty(sub, sup, "sum").item() == pytest.approx(0.3)
    assert calibration_penalty(sub, sup, "mean").item() == pytest.approx(0.15)
    assert calibration_penalty(sub, sup, "batch").item() == pytest.approx(0.0)  # relu of the summed difference
    assert calibration_penalty(sub, sup, "sum", weight=torch.tensor([0.0, 1.0])).item() == 0.0
    # the partial prediction less confident than the fuller one: no penalty at all
    assert calibration_penalty(torch.tensor([0.2, 0.5]), torch.tensor([0.7, 0.5]), "sum").item() == 0.0


def test_loss_hand_checked_on_two_modalities():
    # full = [1, 0] (conf sigmoid(1)); without v: [2, 0] (conf sigmoid(2), MORE confident: penalised);
    # without a: [-1, 0] (conf sigmoid(1), equal: not penalised)
    model, out = output_of({"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[-1.0, 0.0]])})
    method = build_method("cml", lam=0.1, subsets="all")
    method.setup(model)
    y = torch.tensor([0])
    terms = method.loss(out, y)
    assert terms["cml"].item() == pytest.approx(0.1 * (sigmoid(2) - sigmoid(1)), abs=1e-6)
    ce = [-math.log(sigmoid(1)), -math.log(sigmoid(2)), -math.log(sigmoid(-1))]  # full, drop v, drop a
    assert terms["ce"].item() == pytest.approx(sum(ce) / 3, abs=1e-6)


def test_skip_corrected_is_the_official_trick():
    # full = [-1, 0]: predicts class 1, wrong for y = 0. Without v: [2, 0], right and more confident
    # -> skipped by the trick. Without a: [-3, 0], wrong and more confident -> always penalised.
    model, out = output_of({"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[-3.0, 0.0]])})
    y = torch.tensor([0])
    plain, trick = build_method("cml", lam=1.0, subsets="all"), build_method("cml", lam=1.0, subsets="all",
                                                                             skip_corrected=True)
    plain.setup(model)
    trick.setup(model)
    drop_v, drop_a = sigmoid(2) - sigmoid(1), sigmoid(3) - sigmoid(1)
    assert plain.loss(out, y)["cml"].item() == pytest.approx(drop_v + drop_a, abs=1e-6)
    assert trick.loss(out, y)["cml"].item() == pytest.approx(drop_a, abs=1e-6)


def test_penalty_is_zero_and_has_no_gradient_when_partials_are_less_confident():
    feats = {"a": torch.tensor([[1.0, 0.0]], requires_grad=True), "v": torch.tensor([[1.0, 0.0]], requires_grad=True)}
    model, out = output_of(feats)
    method = build_method("cml", subsets="all")
    method.setup(model)
    cml = method.loss(out, torch.tensor([0]))["cml"]
    assert cml.item() == 0.0
    cml.backward()
    assert all(h.grad is None or torch.all(h.grad == 0) for h in feats.values())


def test_concat_partials_equal_the_ports_sliced_logits():
    """Port: out_p = out_full - z_removed + b/N with z_m = W_m h_m + b/N (BalanceBenchmark CML_trainer)."""
    model = make_model(classes=5)
    x, y = fake_batch(classes=5)
    out = model(x)
    method = build_method("cml", subsets="all")
    method.setup(model)
    keep, _ = method.keep_masks(6, torch.device("cpu"))
    partials = method.partial_logits(out.features, keep)
    b = model.fusion.fc.bias
    mods = model.modalities
    for k, p in enumerate(partials, start=1):
        dropped = [m for i, m in enumerate(mods) if not keep[k, 0, i]]
        expected = out.logits - sum(out.unimodal_logits[m] for m in dropped) + len(dropped) * b / len(mods)
        assert torch.allclose(p, expected, atol=1e-5)


def test_nondecomposable_fusion_uses_fuse_with_zeroed_features():
    model = make_model(("audio", "visual", "text"), fusion="film", classes=5)
    x, y = fake_batch(("audio", "visual", "text"), classes=5)
    out = model(x)
    method = build_method("cml", subsets="all")
    method.setup(model)
    keep, pairs = method.keep_masks(6, torch.device("cpu"))
    partials = method.partial_logits(out.features, keep)
    assert len(partials) == 6 and len(pairs) == 9  # 3 pairs (full, pair) + 6 (pair, single)
    ref = model.fuse({"audio": out.features["audio"], "visual": torch.zeros_like(out.features["visual"]),
                      "text": out.features["text"]})
    k = next(i for i in range(1, 7) if keep[i, 0].tolist() == [True, False, True])
    assert torch.allclose(partials[k - 1], ref)
    terms = method.loss(out, y)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.encoder_parameters("visual"))


def test_all_subsets_enumeration():
    keep, pairs = all_subset_pairs(3)
    assert keep.shape == (7, 3) and keep[0].all()
    assert {tuple(r) for r in keep.int().tolist()} == {(1, 1, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1),
                                                       (1, 0, 0), (0, 1, 0), (0, 0, 1)}
    for sup, sub in pairs:  # each pair: one modality fewer, nested
        assert keep[sup].sum() == keep[sub].sum() + 1 and torch.all(keep[sub] <= keep[sup])
    assert len(pairs) == 9


def test_chain_drops_one_more_modality_each_time_in_random_per_sample_order():
    model = make_model(("audio", "visual", "text"))
    method = build_method("cml")
    method.setup(model, seed=3)
    keep, pairs = method.keep_masks(64, torch.device("cpu"))
    assert keep.shape == (3, 64, 3) and pairs == [(0, 1), (1, 2)]
    assert keep[0].all()
    assert torch.all(keep.sum(-1) == torch.tensor([3, 2, 1]).view(3, 1))
    assert torch.all(keep[2] <= keep[1])  # nested
    assert len({tuple(r) for r in keep[1].int().tolist()}) == 3  # every leave-one-out set occurs
    again, _ = method.keep_masks(64, torch.device("cpu"))
    assert torch.equal(keep, again), "same (seed, step, micro-batch): same orders"
    method.before_step(model)
    assert not torch.equal(keep, method.keep_masks(64, torch.device("cpu"))[0]), "a new step draws new orders"


def test_chain_with_two_modalities_equals_removing_one_modality_per_sample():
    feats = {"a": torch.tensor([[2.0, 0.0], [2.0, 0.0]]), "v": torch.tensor([[-1.0, 0.0], [-1.0, 0.0]])}
    model, out = output_of(feats)
    method = build_method("cml", lam=1.0)
    method.setup(model)
    keep, _ = method.keep_masks(2, torch.device("cpu"))
    dropped_v = (~keep[1, :, 1]).float()  # per sample: was v the dropped modality?
    expected = float((dropped_v * (sigmoid(2) - sigmoid(1))).sum())  # dropping a gives equal conf
    assert method.loss(out, torch.tensor([0, 0]))["cml"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("opts, word", [({"lam": -1}, "lam"), ({"lam": True}, "lam"), ({"subsets": "some"}, "subsets"),
                                        ({"penalty": "max"}, "penalty"), ({"skip_corrected": 1}, "skip_corrected")])
def test_invalid_options_are_named(opts, word):
    with pytest.raises(ValueError, match=word):
        build_method("cml", **opts)


def test_one_modality_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        build_method("cml").setup(make_model(("audio",)))


def test_log_reports_penalty_and_violations():
    model, out = output_of({"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[-1.0, 0.0]])})
    out.logits.requires_grad_(True)
    method = build_method("cml", subsets="all")
    method.setup(model)
    method.loss(out, torch.tensor([0]))
    figures = method.log()
    assert figures["cml/penalty"] == pytest.approx(sigmoid(2) - sigmoid(1), abs=1e-6)
    assert figures["cml/violation_rate"] == pytest.approx(0.5)  # one of the two pairs
    assert method.log() == {}
