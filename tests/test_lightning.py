"""EquimodalCallback: a method's hooks driven from Lightning's loop give what our trainer gives."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning.pytorch as pl  # in the `test` extra

from equimodal.config import load_config
from equimodal.errors import UnsupportedMethodError
from equimodal.integrations.lightning import EquimodalCallback, seeded_loader
from equimodal.methods import build_method
from equimodal.train import Trainer
from equimodal.train.trainer import build_model, build_optimizer

SMALL = ["data.n_train=400", "data.n_test=100", "model.width=8", "model.feature_dim=16", "optim.lr=0.1",
         "optim.schedule=none", "train.epochs=2", "train.progress=false", "train.device=cpu", "train.probe=false"]


class Module(pl.LightningModule):
    def __init__(self, model, method, optim_cfg):
        super().__init__()
        self.model, self.method, self.optim_cfg = model, method, optim_cfg

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return sum(self.method.loss(self.method.forward(self.model, inputs), targets).values())

    def configure_optimizers(self):
        return build_optimizer(self.optim_cfg, self.model, self.method)


def record_coefficients(method):
    seen = []
    original = method.before_step

    def recording(model):
        original(model)
        seen.append(method.last_coefficients.clone())

    method.before_step = recording
    return seen


def ours(tmp_path, *overrides):
    """Our trainer's per-step k, its initial weights and RNG state, and the trainer."""
    t = Trainer(load_config(overrides=[*SMALL, "method.name=ogm-ge", *overrides]), out_dir=tmp_path / "ours",
                echo=lambda s: None)
    start = copy.deepcopy(t.model.state_dict()), torch.get_rng_state()
    seen = record_coefficients(t.method)
    t.fit()
    return t, start, seen


def lightning_run(t, start, batch_size, **trainer_kwargs):
    cfg = t.cfg
    model = build_model(cfg["model"], t.splits)
    model.load_state_dict(start[0])
    method = build_method(**cfg["method"])
    seen = record_coefficients(method)
    callback = EquimodalCallback(method, seed=cfg["train"]["seed"])
    trainer = pl.Trainer(max_epochs=cfg["train"]["epochs"], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[callback], **trainer_kwargs)
    torch.set_rng_state(start[1])
    trainer.fit(Module(model, method, cfg["optim"]), seeded_loader(t.splits.train, batch_size, cfg["train"]["seed"]))
    return model, method, callback, trainer, seen


def test_two_epochs_of_ogm_ge_match_our_trainer_step_by_step(tmp_path):
    t, start, expected = ours(tmp_path, "train.batch_size=40")
    model, method, callback, trainer, seen = lightning_run(t, start, 40)
    assert len(seen) == len(expected) == 2 * 9 == callback.optimizer_steps  # 360 training samples, batches of 40
    for a, b in zip(expected, seen):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(seen[0], seen[-1])  # the coefficients do move over training
    for name, p in t.model.state_dict().items():
        assert torch.allclose(p.float(), model.state_dict()[name].float(), rtol=1e-3, atol=1e-5), name
    # method.log() went through pl_module.log: the last epoch's mean k per modality
    assert {"k/audio", "k/visual", "rho/audio", "rho/visual"} <= set(trainer.logged_metrics)
    assert float(trainer.logged_metrics["k/visual"]) == pytest.approx(t.history[-1]["k/visual"], rel=1e-4)
    assert float(trainer.logged_metrics["step/k/visual"]) == pytest.approx(float(seen[-1][0]))  # the last step's


def test_gradient_accumulation_uses_the_whole_effective_batch(tmp_path):
    """2 micro-batches of 30 through Lightning = one batch of 60 in our trainer (per-sample norm)."""
    t, start, expected = ours(tmp_path, "train.batch_size=60", "model.norm=group", "train.epochs=1")
    model, method, callback, trainer, seen = lightning_run(t, start, 30, accumulate_grad_batches=2)
    assert len(seen) == len(expected) == 6 == callback.optimizer_steps
    for a, b in zip(expected, seen):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for name, p in t.model.state_dict().items():
        assert torch.allclose(p, model.state_dict()[name], rtol=1e-3, atol=1e-5), name


def test_bf16_mixed_precision_runs(tmp_path):
    t = Trainer(load_config(overrides=[*SMALL, "method.name=ogm-ge", "train.epochs=1", "train.batch_size=40",
                                       "data.n_train=200"]),
                out_dir=tmp_path / "ours", echo=lambda s: None)  # only its data and config are used
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    model, method, callback, trainer, seen = lightning_run(t, (before, torch.get_rng_state()), 40,
                                                           precision="bf16-mixed")
    assert len(seen) == 5 == callback.optimizer_steps and callback.skipped_steps == 0  # 180 samples, batches of 40
    assert all(torch.isfinite(k).all() and (k <= 1).all() for k in seen)
    assert 0 < float(trainer.logged_metrics["k/visual"]) <= 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_the_fp16_scaler_skips_leaves_the_method_state_unchanged(tmp_path):
    t = Trainer(load_config(overrides=[*SMALL, "method.name=ogm-ge", "train.epochs=1", "train.batch_size=40",
                                       "data.n_train=200"]), out_dir=tmp_path / "ours", echo=lambda s: None)
    model = build_model(t.cfg["model"], t.splits)
    calls = {"n": 0}

    def overflow_on_third_step(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad

    next(model.encoder("audio").parameters()).register_hook(overflow_on_third_step)
    method = build_method("ogm-ge")
    seen = []
    original = method.before_step

    def record(m):
        seen.append((method.step, method._trace.clone() if method._trace is not None else None))
        original(m)

    method.before_step = record
    callback = EquimodalCallback(method)
    # Lightning turns precision="16-mixed" into bf16 on the CPU; its fp16 plugin with a scaler runs there too
    fp16 = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, plugins=[fp16],
                         callbacks=[callback])
    trainer.fit(Module(model, method, t.cfg["optim"]), seeded_loader(t.splits.train, 40))
    assert trainer.precision_plugin.scaler is not None
    assert len(seen) == 5 and callback.skipped_steps == 1 and callback.optimizer_steps == 4
    assert seen[3][0] == seen[2][0] and torch.equal(seen[3][1], seen[2][1])  # the 4th step saw the 3rd's state
    assert method.step == 4


def test_a_resumed_fit_continues_the_method_state(tmp_path):
    from equimodal.data import load_dataset
    from equimodal.models import MultimodalModel, SmallCNN
    data = load_dataset("synthetic", n_train=200, n_test=40)

    def fit(epochs, root, ckpt_path=None):
        torch.manual_seed(0)
        model = MultimodalModel({m: SmallCNN(width=8, out_dim=16) for m in ("visual", "audio")}, num_classes=10)
        method = build_method("ogm-ge")
        seen = record_coefficients(method)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[EquimodalCallback(method)])
        trainer.fit(Module(model, method, {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}),
                    seeded_loader(data.train, 40), ckpt_path=ckpt_path)
        return method, seen

    whole, expected = fit(2, tmp_path / "whole")
    fit(1, tmp_path / "cut")
    ckpt = next((tmp_path / "cut").glob("**/*.ckpt"))
    resumed, seen = fit(2, tmp_path / "cut", ckpt_path=ckpt)
    assert resumed.step == whole.step == 2 * 5  # the step counter (GE noise seed) came back from the checkpoint
    assert len(seen) == 5
    for a, b in zip(expected[5:], seen):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, what", [("distill", "stages"), ("ssl", "stages"), ("umt", "stages"), ("dimml", "stages"),
                                        ("reconboost", "stages")])
def test_methods_the_callback_cannot_drive_are_refused_by_name(name, what):
    """A multi-stage method given to one callback without a stage: each stage is its own fit."""
    with pytest.raises(UnsupportedMethodError, match=what) as info:
        EquimodalCallback(build_method(name))
    assert repr(name) in str(info.value) and "equimodal.train.Trainer" in str(info.value)
    assert "fit_stages" in str(info.value)


@pytest.mark.parametrize("name, module_kind, what", [
    ("mla", "automatic", "automatic_optimization = False"),   # several steps per batch need manual optimisation
    ("ogm-ge", "manual", "needs automatic optimization"),       # one step per batch: automatic
    ("valuation", "automatic", "MethodData"),                  # resampling needs the data and train_loader
])
def test_a_fit_the_method_cannot_run_as_set_up_says_what_to_use(name, module_kind, what):
    from equimodal.models import MultimodalModel, SmallCNN
    model = MultimodalModel({m: SmallCNN(width=8, out_dim=16) for m in ("visual", "audio")}, num_classes=10)
    method = build_method(name)
    module = Module(model, method, load_config(overrides=SMALL)["optim"])
    module.automatic_optimization = module_kind == "automatic"
    data = __import__("equimodal.data", fromlist=["load_dataset"]).load_dataset("synthetic", n_train=60, n_test=20)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[EquimodalCallback(method)])
    with pytest.raises(UnsupportedMethodError, match=what) as info:
        trainer.fit(module, seeded_loader(data.train, 20))
    assert repr(name) in str(info.value) or name == "ogm-ge"


DDP_SCRIPT = """
import sys, torch
import lightning.pytorch as pl
from equimodal.data import load_dataset
from equimodal.integrations.lightning import (EquimodalCallback, fit_stages, seeded_loader, steps_several_times,
                                              substep_training_step)
from equimodal.methods import MethodData, build_method
from equimodal.models import MultimodalModel, SmallCNN

name = sys.argv[2]
options = {"valuation": {"warmup_epochs": 1}}.get(name, {})

class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = MultimodalModel({"visual": SmallCNN(width=8, out_dim=16), "audio": SmallCNN(width=8, out_dim=16)},
                                     num_classes=10)
        self.method = self.runner = build_method(name, **options)
        self.automatic_optimization = not steps_several_times(self.method)

    def training_step(self, batch, batch_idx):
        if not self.automatic_optimization:
            return substep_training_step(self, self.runner, self.model, batch)
        inputs, targets = batch
        return sum(self.runner.loss(self.runner.forward(self.model, inputs), targets).values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.param_groups(), lr=0.1, momentum=0.9)

data = load_dataset("synthetic", n_train=240, n_test=40)
module = Module()
ks = []
if name == "ogm-ge":
    original = module.method.before_step
    def recording(model):
        original(model)
        ks.append(module.method.last_coefficients.clone())
    module.method.before_step = recording

def make_trainer(epochs, callback):
    # a sub-step or a stage that leaves parameters unused needs DDP to look for them (our trainer does too)
    strategy = "ddp" if name == "ogm-ge" else "ddp_find_unused_parameters_true"
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, strategy=strategy, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[callback])

method_data = MethodData(train=data.train, val=data.val)
if len(module.method.stages()) > 1:
    fit_stages(module.method, module, make_trainer, lambda t, m: t.fit(m, seeded_loader(data.train, 40)), epochs=1,
               data=method_data)
    rank = torch.distributed.get_rank()
else:
    callback = EquimodalCallback(module.method, data=method_data)
    trainer = make_trainer(2, callback)
    loader = callback.train_loader(40) if name == "valuation" else seeded_loader(data.train, 40)
    trainer.fit(module, loader)
    rank = trainer.global_rank
torch.save({"params": {n: p.detach() for n, p in module.model.named_parameters()}, "ks": ks},
           f"{sys.argv[1]}/rank{rank}.pt")
"""


@pytest.mark.parametrize("name", ["ogm-ge", "mla", "distill", "valuation"])  # one of each kind
def test_ddp_with_two_cpu_processes_keeps_the_parameters_identical(tmp_path, name):
    script = tmp_path / "ddp_worker.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), name], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    if name == "ogm-ge":
        assert len(a["ks"]) == len(b["ks"]) == 2 * 6  # 216 training samples, global batches of 40
        assert all(torch.equal(x, y) for x, y in zip(a["ks"], b["ks"]))
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def test_readme_lightning_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path
    readme = Path(__file__).resolve().parents[1] / "README.md"
    match = re.search(r"<!-- lightning-example -->\s*```python\n(.*?)```", readme.read_text(), re.S)
    assert match, "README lost its Lightning example"
    monkeypatch.chdir(tmp_path)  # the example's CSVLogger writes lightning_logs/ here
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(match.group(1), str(readme), "exec"), namespace)
    logged = namespace["trainer"].logged_metrics
    assert {"train_loss", "k/audio", "k/visual", "rho/audio", "rho/visual"} <= set(logged)
    assert namespace["module"].method.step == 2 * 4  # 230 training samples, batches of 64, two epochs
    csv = next(tmp_path.glob("lightning_logs/**/metrics.csv")).read_text().splitlines()
    assert "k/visual" in csv[0] and len(csv) == 1 + 2  # header, one row per epoch
