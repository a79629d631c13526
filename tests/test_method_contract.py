"""Runs over the whole registry, so a new method is covered without editing this file."""
import inspect

import pytest
import torch

from conftest import fake_batch, make_model, recomputed_test_acc
from equimodal.config import load_config
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import Method, MethodData, available_methods, build_method, method_class
from equimodal.train import Trainer

METHODS = sorted(available_methods())


@pytest.mark.parametrize("name", METHODS)
def test_builds_with_defaults_and_documents_itself(name):
    cls = method_class(name)
    assert issubclass(cls, Method)
    doc = inspect.getdoc(cls)
    assert doc and len(doc.splitlines()[0]) > 20, "first docstring line feeds `equimodal methods`"
    params = inspect.signature(cls.__init__).parameters.values()
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params), "no **kwargs: options are checked"
    assert isinstance(build_method(name), cls)


def tiny_data(modalities=("audio", "visual", "text"), n=24) -> MethodData:
    """Train / holdout / val parts for methods that read data (prototypes, held-out estimates)."""
    x, y = fake_batch(modalities, n=n, seed=99)
    y = torch.arange(n) % 5  # every class present
    full = TensorMultimodalDataset(x, y, 5)
    return MethodData(train=full.subset(torch.arange(16)), holdout=full.subset(torch.arange(16, 20)),
                      val=full.subset(torch.arange(20, 24)))


@pytest.mark.parametrize("name", METHODS)
def test_plain_loop_two_steps(name):
    model = make_model(("audio", "visual", "text"))
    opt = torch.optim.SGD(model.param_groups(), lr=0.05)
    method = build_method(name)
    method.attach_data(tiny_data())
    method.setup(model, opt, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        method.on_epoch_start(0)
        x, y = fake_batch(("audio", "visual", "text"), seed=step)
        terms = method.loss(method.forward(model, x), y)
        assert terms and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
        sum(terms.values()).backward()
        method.before_step(model)
        opt.step()
        method.after_step(model)
        opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert method.predict(model(x)).shape == (6, 5)
    state = method.state_dict()
    fresh = build_method(name)
    fresh.setup(make_model(("audio", "visual", "text")), seed=0)  # resume order: setup, then load
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.state_dict()[key], value), key


class Recorder(Method):
    """Wraps a method and records each hook call."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def __getattribute__(self, item):
        hooks = ("loss", "before_step", "after_step", "on_epoch_start", "on_epoch_end", "log")
        if item in hooks:
            self_calls = object.__getattribute__(self, "calls")
            target = getattr(object.__getattribute__(self, "inner"), item)

            def wrapped(*a, **k):
                self_calls.append(item)
                return target(*a, **k)
            return wrapped
        return object.__getattribute__(self, item)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hook_order_and_counts(tmp_path, tiny_overrides, accumulate):
    cfg = load_config(overrides=tiny_overrides + ["method.name=ogm-ge", "train.epochs=1", "data.n_train=250",
                                                  "train.probe=false", f"train.accumulate={accumulate}"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    calls: list[str] = []
    trainer.method = trainer.active = Recorder(trainer.active, calls)
    trainer.plan = [(n, trainer.active, e) for n, _, e in trainer.plan]
    trainer.fit()
    n_batches = -(-len(trainer.splits.train) // 50)  # 225 samples -> 5 micro-batches
    n_steps = -(-n_batches // accumulate)
    assert calls[0] == "on_epoch_start" and calls[-2:] == ["log", "on_epoch_end"]
    body = calls[1:-2]
    assert body.count("loss") == n_batches
    assert body.count("before_step") == body.count("after_step") == n_steps
    # each step: its micro-batches' losses, then before_step, then after_step
    expected = []
    for s in range(n_steps):
        expected += ["loss"] * min(accumulate, n_batches - s * accumulate) + ["before_step", "after_step"]
    assert body == expected


@pytest.mark.filterwarnings("ignore:Seems like")
@pytest.mark.parametrize("name", METHODS)
def test_kill_and_resume_gives_identical_results(tmp_path, tiny_overrides, name):
    """Interrupted in the middle of the second epoch (for multi-stage methods: inside a later stage)."""
    cfg = load_config(overrides=tiny_overrides + [f"method.name={name}", "train.epochs=2", "data.n_train=300"])
    full = Trainer(cfg, out_dir=tmp_path / "full", echo=lambda s: None)
    expected = full.fit()
    cut = Trainer(cfg, out_dir=tmp_path / "cut", echo=lambda s: None)
    steps_per_epoch = -(-len(cut.splits.train) // cfg["train"]["batch_size"]) * cut.active.substeps()
    crash_at = steps_per_epoch * (full.total_epochs // 2) + 2
    count = {"n": 0}

    def counting_step(*args, **kwargs):
        count["n"] += 1
        if count["n"] == crash_at:
            raise KeyboardInterrupt
        return original_step(*args, **kwargs)

    original_step = cut.optimizer.step
    cut.optimizer.step = counting_step
    original_enter = cut._enter_stage

    def enter_and_patch(index, resumed):  # later stages build a new optimizer: patch it too
        original_enter(index, resumed)
        nonlocal original_step
        original_step = cut.optimizer.step
        cut.optimizer.step = counting_step

    cut._enter_stage = enter_and_patch
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = Trainer.resume(tmp_path / "cut", echo=lambda s: None)
    got = resumed.fit()
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for key in ("test_acc", "test_macro_f1", "test_acc_by_modality", "probe_acc_by_modality", "stages", "cost"):
        assert got[key] == expected[key], key


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_three_modalities(tmp_path, tiny_overrides, name):
    cfg = load_config(overrides=["data.name=synthetic3", *tiny_overrides, f"method.name={name}", "train.epochs=1",
                                 "data.n_train=200", "train.probe=false"])
    summary = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    assert summary["modalities"] == ["visual", "audio", "tactile"]
    assert set(summary["test_acc_by_modality"]) == {"visual", "audio", "tactile"}


def test_own_head_gradients_are_averaged_across_ranks(monkeypatch):
    """Methods with heads outside the model average those gradients (faked 2-rank reduction)."""
    import equimodal._dist as dist
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.mul_(3))  # as if the other rank had twice ours
    for name in ("uncertainty", "distill", "ssl"):
        model = make_model()
        method = build_method(name)
        method.setup(model)
        x, y = fake_batch()
        sum(method.loss(model(x), y).values()).backward()
        before = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        assert before, name
        method.before_step(model)
        after = [p.grad for p in method.parameters() if p.grad is not None]
        assert all(torch.allclose(a, 1.5 * b) for a, b in zip(after, before)), name


SCHEDULE_OPTIMIZER = [("step", "sgd"), ("cosine", "adam"), ("none", "adamw")]


@pytest.mark.parametrize("schedule, optimizer", SCHEDULE_OPTIMIZER)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_every_schedule_and_optimizer_with_a_last_batch_of_one(tmp_path, tiny_overrides, name,
                                                                            schedule, optimizer):
    """No valid combination crashes: each schedule, each optimizer, a last batch of one sample, three
    modalities where the method allows them (the default data otherwise)."""
    three = method_class(name).min_modalities <= 3
    cfg = load_config(overrides=[*(["data.name=synthetic3"] if three else []), *tiny_overrides,
                                 f"method.name={name}", f"optim.schedule={schedule}", f"optim.name={optimizer}",
                                 "optim.lr=0.01", "train.epochs=1", "train.batch_size=16", "data.n_train=92",
                                 "data.n_test=40", "train.probe=false"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    n = len(trainer.splits.train)  # a method may withhold part of train (gblend): pick the batch size from n
    if n % 16 != 1:
        cfg["train"]["batch_size"] = next(b for b in range(10, n) if n % b == 1)
        trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    assert len(trainer.splits.train) % cfg["train"]["batch_size"] == 1
    summary = trainer.fit()
    assert summary["test_acc"] == pytest.approx(recomputed_test_acc(trainer), abs=1e-12)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


#: every public member of the contract, so a hook the trainer starts calling is recorded too
CONTRACT = sorted(n for n, v in vars(Method).items() if callable(v) and not n.startswith("_"))


class FullRecorder(Method):
    """Stands in for a method from the moment the trainer builds it and records every call of a
    contract member (attributes pass through to the wrapped method)."""

    def __init__(self, inner, calls):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "calls", calls)

    def __getattribute__(self, item):
        if item in ("inner", "calls", "__class__", "__dict__"):
            return object.__getattribute__(self, item)
        inner = object.__getattribute__(self, "inner")
        if item in CONTRACT:
            target, calls = getattr(inner, item), object.__getattribute__(self, "calls")

            def wrapped(*a, **k):
                calls.append(item)
                return target(*a, **k)
            return wrapped
        return getattr(inner, item)

    def __setattr__(self, key, value):
        setattr(object.__getattribute__(self, "inner"), key, value)


def documented_order(stage_epochs, train_batches, val_batches, test_batches):
    """The calls the documented loop makes (``_base.py``'s docstring, plus the trainer's reports),
    written out as explicit loops."""
    multi = len(stage_epochs) > 1
    seq = ["stages"] + ["plan_epochs"] * len(stage_epochs)
    for epochs in stage_epochs:
        seq += ["on_stage_start", "attach_data", "setup", "substeps"]
        for epoch in range(epochs):
            seq += ["on_epoch_start", "training_set", "substeps"]
            for _ in range(train_batches):
                seq += ["forward", "loss", "before_step", "after_step", "step_log"]
            seq += ["predict", "unimodal_logits"] * val_batches + ["log", "on_epoch_end"]
            if multi and epoch == epochs - 1:  # the end-of-stage report, on test
                seq += ["predict", "unimodal_logits"] * test_batches + ["log_stage"]
            seq += ["state_dict"]  # the checkpoint
    return seq + ["predict", "unimodal_logits"] * test_batches  # the reported test accuracy


@pytest.mark.parametrize("name", ["ogm-ge", "distill"])
def test_every_hook_the_trainer_calls_in_order(tmp_path, monkeypatch, name):
    import equimodal.train.trainer as trainer_module
    calls: list[str] = []
    build = trainer_module.build_method
    monkeypatch.setattr(trainer_module, "build_method", lambda **kw: FullRecorder(build(**kw), calls))
    cfg = load_config(overrides=["data.n_train=120", "data.n_test=40", "model.width=8", "model.feature_dim=16",
                                 "train.batch_size=50", "train.progress=false", "train.device=cpu",
                                 "train.probe=false", f"method.name={name}", "train.stage_budget=shared",
                                 "train.epochs=3"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    trainer.fit()
    stage_epochs = [e for _, _, e in trainer.plan]
    assert (len(stage_epochs) > 1) == (name == "distill")
    per = -(-len(trainer.splits.train) // 50)
    val, test = -(-len(trainer.splits.val) // 256), -(-len(trainer.splits.test) // 256)
    assert calls == documented_order(stage_epochs, per, val, test)
    assert set(calls) <= set(CONTRACT)
