"""AMCo (Zhou et al., ICASSP 2023) against peers.md B16: ramp, masking condition, masked loss, by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods.amco import mask_ratio, masked_count, modality_masses
from equimodal.models.multimodal import ModelOutput


def test_ramp_hand_values():
    assert mask_ratio(0.0, 0.3) == 0.0
    assert mask_ratio(0.1, 0.3) == pytest.approx(0.5)                 # sin(pi/6)
    assert mask_ratio(0.15, 0.3) == pytest.approx(math.sqrt(0.5))     # sin(pi/4)
    assert mask_ratio(0.3, 0.3) == 1.0 and mask_ratio(7.0, 0.3) == 1.0
    assert masked_count(math.sin(math.pi / 6), 6) == 3  # float sin(pi/6) = 0.4999..., still 3 of 6
    assert masked_count(math.sqrt(0.5), 5) == 3 and masked_count(1.0, 4) == 4 and masked_count(0.0, 4) == 0


@pytest.mark.parametrize("schedule, epoch, steps, expected", [
    ("epoch", 0, 0, 0.0), ("epoch", 1, 5, 0.5), ("epoch", 2, 0, 1.0),             # t = e(e+1)/20
    ("step", 0, 9, 0.0), ("step", 2, 1, math.sin(math.pi / 3)), ("step", 1, 3, 1.0),  # t = steps * e / 10
])
def test_ramp_time_per_schedule(schedule, epoch, steps, expected):
    method = build_method("amco", schedule=schedule)
    method.on_epoch_start(epoch)
    method.epoch_step = steps
    assert method.current_ratio() == pytest.approx(expected)


def test_softmax_mass_hand_values():
    # softmax over [1, 0 | 0, 0]: audio holds (e + 1) / (e + 3), visual 2 / (e + 3)
    masses = modality_masses([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    e = math.e
    assert masses.tolist() == pytest.approx([(e + 1) / (e + 3), 2 / (e + 3)])
    three = modality_masses([torch.randn(7, 5), torch.randn(7, 5), torch.randn(7, 5)])
    assert three.sum().item() == pytest.approx(7.0)  # each sample's masses sum to 1


def _output(za, zv):
    return ModelOutput(logits=za + zv, unimodal_logits={"audio": za, "visual": zv}, features={}, estimator="exact")


def test_masking_condition_decides_the_next_step():
    model = make_model(classes=2)
    method = build_method("amco", sigma=0.5)
    method.setup(model)
    method.on_epoch_start(0)
    za = torch.tensor([[1.0, 0.0]], requires_grad=True)
    method.loss(_output(za, torch.zeros(1, 2, requires_grad=True)), torch.tensor([0]))
    assert method.dependent.tolist() == [False, False]  # nothing dependent before the first decision
    method.before_step(model)
    assert method.dependent.tolist() == [True, False]   # audio mass (e+1)/(e+3) = 0.650 > 0.5
    strict = build_method("amco", sigma=0.66)
    strict.setup(model)
    strict.loss(_output(za, torch.zeros(1, 2, requires_grad=True)), torch.tensor([0]))
    strict.before_step(model)
    assert strict.dependent.tolist() == [False, False]  # 0.650 < 0.66
    method.on_epoch_start(1)
    assert method.dependent.tolist() == [False, False]  # reset at every epoch start (as the port)


def test_masked_loss_by_hand():
    model = make_model(classes=4)
    method = build_method("amco")
    method.setup(model, seed=5)
    method.on_epoch_start(1)                      # p = sin(pi/6) = 1/2: 2 of 4 classes masked
    method.dependent = torch.tensor([True, False])
    za = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]])
    zv = torch.tensor([[0.1, 0.2, -0.3, 0.4], [1.0, 1.0, 0.0, -2.0]])
    y = torch.tensor([3, 0])
    mask = method.class_mask(torch.device("cpu"))
    assert sorted(mask.tolist()) == [0.0, 0.0, 1.0, 1.0]
    terms = method.loss(_output(za, zv), y)
    za_masked = za * mask
    head = method.head
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(head(za_masked + zv), y).item(), abs=1e-6)
    assert terms["ce/audio"].item() == pytest.approx(F.cross_entropy(za_masked, y).item(), abs=1e-6)
    assert terms["ce/visual"].item() == pytest.approx(F.cross_entropy(zv, y).item(), abs=1e-6)
    # the masked classes of audio carry no gradient to its logits
    za.requires_grad_(True)
    sum(method.loss(_output(za, zv), y).values()).backward()
    assert torch.all(za.grad[:, mask == 0] == 0) and torch.all(za.grad[:, mask == 1] != 0)
    # evaluation: no mask, A on the summed logits
    assert torch.allclose(method.predict(_output(za, zv)), head(za + zv))


def test_mask_is_seeded_by_seed_and_step_and_fixed_within_a_step():
    model = make_model(classes=10)
    method = build_method("amco")
    method.setup(model, seed=1)
    method.on_epoch_start(1)
    first = method.class_mask(torch.device("cpu"))
    assert torch.equal(first, method.class_mask(torch.device("cpu")))
    assert int((first == 0).sum()) == 5
    other = build_method("amco")
    other.setup(make_model(classes=10), seed=1)
    other.on_epoch_start(1)
    assert torch.equal(first, other.class_mask(torch.device("cpu"))), "same (seed, step, rank): same mask"
    draws = set()
    for _ in range(6):
        method.step += 1
        draws.add(tuple(method.class_mask(torch.device("cpu")).tolist()))
    assert len(draws) > 1, "new steps draw new masks"


def test_no_mask_in_epoch_zero_and_full_mask_after_the_ramp():
    model = make_model(classes=4)
    method = build_method("amco")
    method.setup(model)
    method.dependent = torch.tensor([True, False])
    method.epoch = 0
    assert method.class_mask(torch.device("cpu")).tolist() == [1.0] * 4
    method.epoch, method.step = 2, 1
    assert method.class_mask(torch.device("cpu")).tolist() == [0.0] * 4


def test_trains_through_a_real_model_and_the_own_layer():
    model = make_model(("audio", "visual", "text"))
    opt = torch.optim.SGD(model.param_groups(), lr=0.1)
    method = build_method("amco")
    method.setup(model, opt)
    assert any(p is method.head.weight for g in opt.param_groups for p in g["params"])
    x, y = fake_batch(("audio", "visual", "text"))
    before = method.head.weight.detach().clone()
    sum(method.loss(model(x), y).values()).backward()
    method.before_step(model)
    opt.step()
    assert not torch.equal(before, method.head.weight)
    assert set(method.log()) == {"mass/audio", "mass/visual", "mass/text", "dependent/audio",
                                 "dependent/visual", "dependent/text", "mask_ratio"}


def test_probe_estimator_is_refused():
    model = make_model(fusion="film")  # auto -> probe estimator (detached features)
    method = build_method("amco")
    method.setup(model)
    x, y = fake_batch()
    with pytest.raises(ValueError, match="probe"):
        method.loss(model(x), y)


@pytest.mark.parametrize("opts, word", [({"sigma": 0}, "sigma"), ({"sigma": 1.5}, "sigma"), ({"eps": 0}, "eps"),
                                        ({"eps": "x"}, "eps"), ({"schedule": "batch"}, "schedule")])
def test_invalid_options_are_named(opts, word):
    with pytest.raises(ValueError, match=word):
        build_method("amco", **opts)
