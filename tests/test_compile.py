"""train.compile: the model's parts compiled in place; same training as eager, same checkpoint keys."""
import json

import pytest
import torch

from equimodal.config import load_config
from equimodal.methods import MethodData, build_method
from equimodal.methods._registry import _REGISTRY
from equimodal.train import Trainer, build_optimizer, load_checkpoint
from equimodal.train.compile import compile_model, compiled_parts, is_compiled

from conftest import fake_batch, make_model

#: the smallest run that still trains every part: 1 epoch, a few batches, narrow encoders
SMALL = ["data.n_train=200", "data.n_test=60", "model.width=8", "model.feature_dim=16", "train.epochs=1",
         "train.batch_size=50", "train.progress=false", "train.device=cpu", "train.probe=false"]


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["joint", "ogm-ge"])
def test_compiled_run_matches_eager_and_keeps_checkpoint_keys(tmp_path, method):
    runs = {}
    for flag in (False, True):
        cfg = load_config(overrides=SMALL + [f"method.name={method}", f"train.compile={str(flag).lower()}"])
        trainer = Trainer(cfg, out_dir=tmp_path / str(flag), echo=lambda s: None)
        assert all(is_compiled(p) for p in compiled_parts(trainer.model)) == flag
        trainer.fit()
        runs[flag] = (trainer, _metrics(tmp_path / str(flag))[-1], load_checkpoint(tmp_path / str(flag) / "checkpoint.pt"))
    (eager, rec_e, ck_e), (comp, rec_c, ck_c) = runs[False], runs[True]
    assert list(ck_c["model"]) == list(ck_e["model"])  # no _orig_mod. prefix
    assert not any("_orig_mod" in k for k in ck_c["model"])
    for key, value in ck_e["model"].items():
        torch.testing.assert_close(ck_c["model"][key], value, rtol=1e-4, atol=1e-5)
    assert rec_c["train_loss"] == pytest.approx(rec_e["train_loss"], rel=1e-4)
    ks = [k for k in rec_e if k.startswith(("k/", "rho/"))]
    assert bool(ks) == (method == "ogm-ge")
    for k in ks:  # the OGM coefficients and ratios, from compiled per-modality logits
        assert rec_c[k] == pytest.approx(rec_e[k], rel=1e-4, abs=1e-6), k
    # the compiled model loads its own checkpoint and an eager one (same keys)
    comp.model.load_state_dict(ck_e["model"])


def test_every_single_stage_method_steps_on_a_compiled_model():
    """The hook loop of each single-stage method on a model compiled in place (the methods call
    encoder(name), fuse, switch parts to eval, zero-pad inputs): it runs and the weights change."""
    inputs, y = fake_batch(n=8)
    data_inputs, data_y = fake_batch(n=24, seed=1)

    class Split:  # the few dataset features the data-reading methods use
        def __init__(self, x, labels):
            self.x, self.labels, self.num_classes = x, labels, 5

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, idx):
            return {m: v[idx] for m, v in self.x.items()}, self.labels[idx]

    split = Split(data_inputs, data_y)
    failures = {}
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never a silent fall-back to eager
        _step_every_method(split, inputs, y, failures)
    assert not failures, failures


def _step_every_method(split, inputs, y, failures):
    for name in sorted(_REGISTRY):
        method = build_method(name)
        if len(method.stages()) > 1:
            continue
        model = compile_model(make_model())
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer({"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}, model, method)
        try:
            method.on_stage_start("supervised")
            method.attach_data(MethodData(train=split, val=split, holdout=split))
            method.setup(model, opt)
            model.train()
            method.on_epoch_start(0)
            for _ in range(2):
                for sub in range(method.substeps()):
                    method.on_substep(sub)
                    sum(method.loss(method.forward(model, inputs), y).values()).backward()
                    method.before_step(model)
                    opt.step()
                    method.after_step(model)
                    opt.zero_grad()
        except Exception as exc:  # collect every failure, report them together
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        if all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
            failures[name] = "no parameter changed"
