"""DI-MML (peers.md B10) against hand-computed discriminability, dimension sets, InfoNCE and mix weights."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fake_batch, make_model
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods.dimml import confidence_mix, dimension_info_nce, exclusive_dimensions
from equimodal.models import MultimodalModel

# labels [0, 0, 1, 1]; class 2 has no sample. Per dimension (columns) the values of the 4 samples.
AUDIO = torch.tensor([[0.0, 0, 4], [1, 4, 1], [4, 1, 0], [5, 2, 3]])
VISUAL = torch.tensor([[0.0, 0, 0], [4, 1, 1], [1, 4, 5], [2, 5, 4]])
LABELS = torch.tensor([0, 0, 1, 1])


def identity_model(dims=(3, 3), classes=3):
    encoders = {}
    for m, d in zip(("audio", "visual"), dims):
        enc = nn.Identity()
        enc.out_dim = d
        encoders[m] = enc
    return MultimodalModel(encoders, classes, fusion="concat")


def hand_method(**options):
    method = build_method("dimml", **options)
    data = TensorMultimodalDataset({"audio": AUDIO, "visual": VISUAL}, LABELS, 3)
    method.attach_data(MethodData(train=data))
    model = identity_model()
    method.setup(model, seed=0)
    return method, model


def test_discriminability_and_exclusive_sets_by_hand():
    # audio: dim 0 centroids 0.5 | 4.5: all 4 nearest their class -> 1.0
    #        dim 1 centroids 2 | 1.5: samples 0 (0 -> 1.5) and 3 (2 -> 2) go wrong -> 0.5
    #        dim 2 centroids 2.5 | 1.5: sample 0 (4: 1.5 vs 2.5) right, 1 (1) wrong, 2 (0) right, 3 (3) wrong -> 0.5
    # visual: dim 0 as audio dim 1 -> 0.5; dims 1 and 2 (0.5 | 4.5) -> 1.0
    # means: audio 2/3 -> top_a = {0}; visual 5/6 -> top_v = {1, 2}
    method, _ = hand_method(dim_epoch=2)
    method.on_epoch_start(1)
    assert method.top is None
    method.on_epoch_start(2)
    assert method.top.tolist() == [[True, False, False], [False, True, True]]
    ex = method.exclusive
    assert ex[0, 1].tolist() == [True, False, False]  # D_a = top_a \ top_v
    assert ex[1, 0].tolist() == [False, True, True]  # D_v = top_v \ top_a
    assert not ex[0, 0].any() and not ex[1, 1].any()
    assert method.log() == {"dims/audio": 1, "dims/visual": 2}


def test_discriminability_against_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(12, 5, generator=g) for m in ("audio", "visual")}
    labels = torch.arange(12) % 3
    method = build_method("dimml", dim_epoch=0)
    method.attach_data(MethodData(train=TensorMultimodalDataset(feats, labels, 3), device="cpu"))
    method.setup(identity_model((5, 5)), seed=0)
    method.on_epoch_start(0)
    tops = []
    for m in ("audio", "visual"):
        h = feats[m]
        cent = torch.stack([h[labels == c].mean(0) for c in range(3)])
        frac = []
        for d in range(5):
            hits = sum(int(torch.argmin((h[i, d] - cent[:, d]).abs()) == labels[i]) for i in range(12))
            frac.append(hits / 12)
        mean = sum(frac) / 5
        tops.append([f > mean for f in frac])
    assert method.top.tolist() == tops
    top = torch.tensor(tops)
    assert torch.equal(method.exclusive, exclusive_dimensions(top))
    assert method.exclusive[0, 1].tolist() == (top[0] & ~top[1]).tolist()


def test_info_nce_value_and_pull_only_on_selected_dimensions():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, requires_grad=True)
    t = torch.randn(4, 6, generator=g, requires_grad=True)
    dims = torch.tensor([True, False, True, False, False, False])
    tau = 2.0
    loss = dimension_info_nce(s, t, dims, tau)
    sim = s[:, dims] @ t[:, dims].t() / tau
    direct = -sum(sim[i, i] - torch.logsumexp(sim[i], 0) for i in range(4)) / 4
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    loss.backward()
    assert (s.grad[:, ~dims] == 0).all() and (s.grad[:, dims] != 0).all()
    assert t.grad is None  # the paired modality is the (detached) target
    empty = dimension_info_nce(s, t, torch.zeros(6, dtype=torch.bool), tau)
    assert empty.item() == pytest.approx(math.log(4))  # as the official code: constant, no gradient


def test_contrast_terms_in_the_detached_loss():
    method, model = hand_method(dim_epoch=0, temperature=3.0)
    method.on_epoch_start(0)
    x, y = {"audio": AUDIO, "visual": VISUAL}, LABELS
    out = model(x)
    terms = method.loss(out, y)
    d_a, d_v = method.exclusive[0, 1], method.exclusive[1, 0]
    # audio is pulled to visual on D_v, visual to audio on D_a
    assert terms["contrast/audio"].item() == pytest.approx(dimension_info_nce(AUDIO, VISUAL, d_v, 3.0).item())
    assert terms["contrast/visual"].item() == pytest.approx(dimension_info_nce(VISUAL, AUDIO, d_a, 3.0).item())
    heads = method.heads
    assert terms["ce/audio"].item() == pytest.approx(F.cross_entropy(heads["audio"](AUDIO), y).item())
    assert terms["shared/visual"].item() == pytest.approx(F.cross_entropy(method.shared(VISUAL), y).item())
    before = build_method("dimml")  # before dim_epoch: no contrast term
    before.setup(identity_model(), seed=0)
    assert not any(k.startswith("contrast") for k in before.loss(out, y))


def test_confidence_mix_weights_by_hand():
    z1 = torch.tensor([[0.0, 0.0]])  # max prob 0.5
    z2 = torch.tensor([[math.log(3), 0.0]])  # 0.75
    z3 = torch.tensor([[math.log(9), 0.0]])  # 0.9
    for temp in (1.0, 0.5):
        e = [math.exp(p / temp) for p in (0.5, 0.75, 0.9)]
        w = [v / sum(e) for v in e]
        mixed, weights = confidence_mix([z1, z2, z3], temp)
        assert weights[:, 0].tolist() == pytest.approx(w)
        assert mixed[0, 0].item() == pytest.approx(w[1] * math.log(3) + w[2] * math.log(9))


def test_fusion_stage_freezes_encoders_and_mixes_three_predictors():
    model = make_model()
    method = build_method("dimml")
    method.setup(model, seed=0)
    method.on_stage_start("fusion")
    method.on_epoch_start(0)
    assert not any(p.requires_grad for m in model.modalities for p in model.encoder_parameters(m))
    assert not any(p.requires_grad for p in method.parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    assert not model.encoder("audio").training
    x, y = fake_batch()
    out = model(x)
    assert set(method.loss(out, y)) == {"ce"}
    heads = method.unimodal_logits(out)
    expected = confidence_mix([heads["audio"], heads["visual"], out.logits], 1.0)[0]
    assert torch.allclose(method.predict(out), expected)
    method.on_stage_start("detached")
    assert torch.allclose(method.predict(out), confidence_mix([heads["audio"], heads["visual"]], 1.0)[0])


def test_selected_dimensions_survive_a_checkpoint():
    method, _ = hand_method(dim_epoch=0)
    method.on_epoch_start(0)
    state = method.state_dict()
    fresh, _ = hand_method(dim_epoch=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.exclusive, method.exclusive)
    fresh.on_epoch_start(1)  # already selected: not recomputed
    assert fresh.exclusive is state["exclusive"]


def test_three_modalities_every_ordered_pair():
    model = make_model(("a", "b", "c"))
    method = build_method("dimml", dim_epoch=0)
    x, y = fake_batch(("a", "b", "c"), n=10)
    method.attach_data(MethodData(train=TensorMultimodalDataset(x, torch.arange(10) % 5, 5)))
    method.setup(model, seed=0)
    method.on_epoch_start(0)
    assert method.exclusive.shape == (3, 3, 12)
    out = model(x)
    terms = method.loss(out, y)
    h, ex = out.features, method.exclusive
    expected = (dimension_info_nce(h["a"], h["b"], ex[1, 0], 50.0)
                + dimension_info_nce(h["a"], h["c"], ex[2, 0], 50.0)) / 2
    assert terms["contrast/a"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_unequal_feature_dims_are_a_named_error():
    with pytest.raises(ValueError, match="out_dim must be equal"):
        build_method("dimml").setup(identity_model((3, 4)))


@pytest.mark.parametrize("bad", [dict(weight=-1), dict(temperature=0), dict(mix_temperature=float("inf")),
                                 dict(dim_epoch=-1), dict(dim_epoch=2.5), dict(detached_epochs=0),
                                 dict(fusion_epochs="3"), dict(eval_batch_size=0)])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_method("dimml", **bad)


def test_trainer_selects_dimensions_then_trains_the_fusion_head(tmp_path, tiny_overrides):
    from equimodal.config import load_config
    from equimodal.train import Trainer
    cfg = load_config(overrides=tiny_overrides + ["method.name=dimml", "method.dim_epoch=1", "train.epochs=1",
                                                  "method.detached_epochs=2", "data.n_train=100", "data.n_test=40",
                                                  "train.probe=false"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    trainer.fit()
    stages = [r["stage"] for r in trainer.history]
    assert stages == ["detached", "detached", "fusion"]
    first, second, third = trainer.history[:3]
    assert "train_contrast/audio" not in first and "train_contrast/audio" in second
    assert second["dims/audio"] + second["dims/visual"] > 0
    assert set(k for k in third if k.startswith("train_")) >= {"train_ce"}
    assert "train_contrast/audio" not in third
