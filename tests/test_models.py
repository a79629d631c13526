"""The model contract: fusions, decompositions, estimators."""
import pytest
import torch

from conftest import fake_batch, make_model
from equimodal.models import FUSIONS


@pytest.mark.parametrize("fusion,combine", [("concat", "sum"), ("sum", "sum"), ("late", "mean")])
def test_exact_decomposition_sums_back_to_fused_logits(fusion, combine):
    for mods in [("audio", "visual"), ("a", "b", "c")]:
        model = make_model(mods, fusion=fusion)
        x, _ = fake_batch(mods)
        out = model(x)
        assert out.estimator == "exact"
        stacked = torch.stack(list(out.unimodal_logits.values()))
        back = stacked.sum(0) if combine == "sum" else stacked.mean(0)
        assert torch.allclose(back, out.logits, atol=1e-5)


def test_concat_decomposition_is_the_weight_slice_plus_split_bias():
    model = make_model(fusion="concat")
    x, _ = fake_batch()
    out = model(x)
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    d = out.features["audio"].shape[1]
    assert torch.allclose(out.unimodal_logits["audio"], out.features["audio"] @ w[:, :d].t() + b / 2, atol=1e-6)
    assert torch.allclose(out.unimodal_logits["visual"], out.features["visual"] @ w[:, d:].t() + b / 2, atol=1e-6)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_non_decomposable_fusions_default_to_probe_and_refuse_exact(fusion):
    assert make_model(fusion=fusion).estimator == "probe"
    with pytest.raises(ValueError, match="no exact logit decomposition"):
        make_model(fusion=fusion, estimator="exact")


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("estimator", ["probe", "mask"])
@pytest.mark.parametrize("mods", [("audio", "visual"), ("a", "b", "c")])
def test_every_fusion_and_estimator_gives_the_contract(fusion, estimator, mods):
    model = make_model(mods, fusion=fusion, estimator=estimator)
    x, y = fake_batch(mods)
    out = model(x)
    assert out.logits.shape == (6, 5)
    assert set(out.unimodal_logits) == set(mods) and all(z.shape == (6, 5) for z in out.unimodal_logits.values())
    losses = out.estimator_losses(y)
    assert bool(losses) == (estimator == "probe")


def test_probe_loss_never_reaches_the_encoders():
    model = make_model(fusion="film", estimator="probe")
    x, y = fake_batch()
    sum(model(x).estimator_losses(y).values()).backward()
    assert all(p.grad is None for m in model.modalities for p in model.encoder_parameters(m))
    assert all(p.grad is not None for p in model.probes.parameters())


def test_mask_estimator_zeroes_the_other_modalities():
    model = make_model(fusion="gated", estimator="mask")
    model.eval()
    x, _ = fake_batch()
    out = model(x)
    feats = out.features
    expect = model.fusion({"audio": feats["audio"], "visual": torch.zeros_like(feats["visual"])})
    assert torch.allclose(out.unimodal_logits["audio"], expect)


def test_head_parameters_exclude_every_encoder_parameter():
    model = make_model(fusion="film", estimator="probe")
    enc = {id(p) for m in model.modalities for p in model.encoder_parameters(m)}
    head = model.head_parameters()
    assert head and not any(id(p) in enc for p in head)
    assert len(enc) + len(head) == len(list(model.parameters()))


def test_missing_modality_input_is_named():
    model = make_model()
    x, _ = fake_batch(("audio",))
    with pytest.raises(KeyError, match="visual"):
        model(x)
