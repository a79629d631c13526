"""MSLR against peers.md B15: per-modality learning-rate multipliers, fixed (keep) or adapted (dynamic)."""
import pytest
import torch

from conftest import TINY, fake_batch, make_model
from equimodal.config import load_config
from equimodal.methods import build_method
from equimodal.train import Trainer

BASE_LR = 0.1


def _setup(**options):
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=BASE_LR)
    method = build_method("mslr", **options)
    method.setup(model, opt, seed=0)
    return model, opt, method


def _lrs_during_step(model, opt, method):
    """The learning rate of each tagged group as optimizer.step() sees it, and after the step."""
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    method.before_step(model)
    during = {g["modality"]: g["lr"] for g in opt.param_groups}
    opt.step()
    method.after_step(model)
    opt.zero_grad()
    return during, {g["modality"]: g["lr"] for g in opt.param_groups}


def _epoch_end(method, epoch, audio, visual):
    method.on_epoch_end(epoch, {"val_acc_by_modality": {"audio": audio, "visual": visual}})


def test_keep_multipliers_scale_each_modality_step_and_only_during_the_step():
    model, opt, method = _setup(strategy="keep", lr_scale={"audio": 0.5, "visual": 3.0})
    x, y = fake_batch()
    sum(method.loss(model(x), y).values()).backward()
    before = {m: [p.detach().clone() for p in model.encoder_parameters(m)] for m in model.modalities}
    grads = {m: [p.grad.clone() for p in model.encoder_parameters(m)] for m in model.modalities}
    method.before_step(model)
    assert {g["modality"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"audio": 0.05, "visual": 0.3, None: 0.1})
    opt.step()
    method.after_step(model)
    assert all(g["lr"] == BASE_LR for g in opt.param_groups), "the optimizer keeps the unscaled lr"
    for m, c in (("audio", 0.5), ("visual", 3.0)):  # plain SGD: p <- p - c * lr * g
        for p, p0, g in zip(model.encoder_parameters(m), before[m], grads[m]):
            assert torch.allclose(p, p0 - c * BASE_LR * g, atol=1e-7), m
    _epoch_end(method, 0, 0.9, 0.1)  # keep: accuracies change nothing
    _epoch_end(method, 1, 0.1, 0.9)
    assert method.scale == {"audio": 0.5, "visual": 3.0}


def test_dynamic_rule_after_two_epochs_by_hand():
    model, opt, method = _setup(strategy="dynamic", lr_scale={"audio": 2.0}, window=2, every=1)
    _epoch_end(method, 0, 0.5, 0.4)  # one evaluation: acc / mean = 1 for both
    assert method.scale == pytest.approx({"audio": 2.0, "visual": 1.0})
    _epoch_end(method, 1, 0.7, 0.2)
    # audio: 2 * 0.7 / ((0.5 + 0.7) / 2) = 7/3; visual: 1 * 0.2 / ((0.4 + 0.2) / 2) = 2/3
    assert method.scale == pytest.approx({"audio": 7 / 3, "visual": 2 / 3})
    during, after = _lrs_during_step(model, opt, method)
    assert during == pytest.approx({"audio": 0.1 * 7 / 3, "visual": 0.1 * 2 / 3, None: 0.1})
    assert after == {"audio": 0.1, "visual": 0.1, None: 0.1}
    _epoch_end(method, 2, 0.7, 0.3)  # the window (2) drops epoch 0: audio [0.7, 0.7], visual [0.2, 0.3]
    assert method.scale == pytest.approx({"audio": 7 / 3, "visual": 2 / 3 * 0.3 / 0.25})


def test_dynamic_updates_every_window_epochs_by_default():
    _, _, method = _setup(window=2)
    _epoch_end(method, 0, 0.4, 0.5)
    assert method.scale == {"audio": 1.0, "visual": 1.0}, "no update before `every` (= window) epochs"
    _epoch_end(method, 1, 0.6, 0.5)
    assert method.scale == pytest.approx({"audio": 0.6 / 0.5, "visual": 1.0})
    _epoch_end(method, 2, 0.2, 0.1)
    assert method.scale == pytest.approx({"audio": 1.2, "visual": 1.0})
    _epoch_end(method, 3, 0.3, 0.3)  # window [0.2, 0.3] and [0.1, 0.3]
    assert method.scale == pytest.approx({"audio": 1.2 * 0.3 / 0.25, "visual": 0.3 / 0.2})


def test_zero_mean_window_leaves_the_scale():
    _, _, method = _setup(window=1, every=1)
    _epoch_end(method, 0, 0.0, 0.5)
    assert method.scale == {"audio": 1.0, "visual": 1.0}


@pytest.mark.parametrize("reload_method_first", [False, True])
def test_resume_does_not_apply_the_multipliers_twice(reload_method_first):
    model, opt, method = _setup(lr_scale={"audio": 0.5, "visual": 4.0}, window=2, every=1)
    _epoch_end(method, 0, 0.5, 0.5)
    _epoch_end(method, 1, 1.0, 0.25)  # audio 0.5 * 1 / 0.75 = 2/3; visual 4 * 0.25 / 0.375 = 8/3
    expected = {"audio": 0.1 * 2 / 3, "visual": 0.1 * 8 / 3, None: 0.1}
    during, _ = _lrs_during_step(model, opt, method)
    assert during == pytest.approx(expected)
    opt_state, method_state = opt.state_dict(), method.state_dict()
    assert all(g["lr"] == BASE_LR for g in opt_state["param_groups"]), "the checkpoint holds the unscaled lr"

    model2 = make_model()
    opt2 = torch.optim.SGD(model2.param_groups(), lr=BASE_LR)
    fresh = build_method("mslr", lr_scale={"audio": 0.5, "visual": 4.0}, window=2, every=1)
    if reload_method_first:  # our Trainer: setup, method state, (setup again), optimizer state
        fresh.setup(model2, opt2, seed=0)
        fresh.load_state_dict(method_state)
        fresh.setup(model2, opt2, seed=0)
        opt2.load_state_dict(opt_state)
    else:  # setup, optimizer state, setup again, method state
        fresh.setup(model2, opt2, seed=0)
        opt2.load_state_dict(opt_state)
        fresh.setup(model2, opt2, seed=0)
        fresh.load_state_dict(method_state)
    during2, after2 = _lrs_during_step(model2, opt2, fresh)
    assert during2 == pytest.approx(expected)
    assert after2 == {"audio": 0.1, "visual": 0.1, None: 0.1}
    _epoch_end(fresh, 2, 1.0, 0.25)  # the accuracy window came back too: [1.0, 1.0], [0.25, 0.25]
    assert fresh.scale == pytest.approx({"audio": 2 / 3, "visual": 8 / 3})


def test_scale_survives_a_scheduler_that_rewrites_lr():
    model, opt, method = _setup(strategy="keep", lr_scale={"audio": 0.5})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # our optim.schedule=none
    for _ in range(2):
        during, _ = _lrs_during_step(model, opt, method)
        sched.step()
        assert during["audio"] == pytest.approx(0.05)
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    step.step()
    during, _ = _lrs_during_step(model, opt, method)
    assert during["audio"] == pytest.approx(0.005) and during["visual"] == pytest.approx(0.01)


def test_before_step_twice_does_not_compound():
    model, opt, method = _setup(strategy="keep", lr_scale={"audio": 0.5})
    method.before_step(model)
    method.before_step(model)
    assert {g["modality"]: g["lr"] for g in opt.param_groups}["audio"] == pytest.approx(0.05)
    method.after_step(model)
    assert all(g["lr"] == BASE_LR for g in opt.param_groups)


@pytest.mark.parametrize("options, match", [
    ({"strategy": "smooth"}, "strategy"),
    ({"lr_scale": {"audio": 0}}, "lr_scale"),
    ({"lr_scale": {"audio": -1.0}}, "lr_scale"),
    ({"lr_scale": {"audio": True}}, "lr_scale"),
    ({"lr_scale": {"audio": float("inf")}}, "lr_scale"),
    ({"lr_scale": [0.5]}, "lr_scale"),
    ({"window": 0}, "window"),
    ({"window": 2.5}, "window"),
    ({"every": 0}, "every"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        build_method("mslr", **options)


def test_setup_errors_are_named():
    model = make_model()
    with pytest.raises(ValueError, match="lr_scale names \\['text'\\]"):
        build_method("mslr", lr_scale={"text": 2.0}).setup(model, torch.optim.SGD(model.param_groups(), lr=0.1))
    with pytest.raises(ValueError, match="one optimizer parameter group per modality"):
        build_method("mslr").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    method = build_method("mslr")
    method.setup(model)  # no optimizer: allowed (e.g. to load a state), but a step needs it
    with pytest.raises(RuntimeError, match="optimizer"):
        method.before_step(model)


def test_dynamic_reads_validation_accuracy_only():
    _, _, method = _setup(window=1, every=1)
    with pytest.raises(KeyError, match="val_acc_by_modality"):
        method.on_epoch_end(0, {"test_acc_by_modality": {"audio": 0.5, "visual": 0.5}})
    with pytest.raises(KeyError, match="lacks \\['visual'\\]"):
        method.on_epoch_end(0, {"val_acc_by_modality": {"audio": 0.5}})


def test_trainer_run_follows_the_rule(tmp_path):
    cfg = load_config(overrides=TINY + ["method.name=mslr", "method.window=2", "method.every=1",
                                        "method.lr_scale={audio: 0.5}", "train.epochs=3", "data.n_train=200",
                                        "train.probe=false"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    trainer.fit()
    h = trainer.history
    mods = list(h[0]["val_acc_by_modality"])
    for m in mods:  # each record logs the multiplier its epoch trained with (before that epoch's update)
        c0 = 0.5 if m == "audio" else 1.0
        a0, a1 = h[0]["val_acc_by_modality"][m], h[1]["val_acc_by_modality"][m]
        assert h[0][f"lr_scale/{m}"] == c0 and h[1][f"lr_scale/{m}"] == c0
        assert h[2][f"lr_scale/{m}"] == pytest.approx(c0 * a1 / ((a0 + a1) / 2))
