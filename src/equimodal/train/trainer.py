"""The training loop: builds data, model, method and optimizer from a resolved config, trains,
selects on validation, reports on test, and checkpoints every epoch so a run can resume exactly.

Order of one optimizer step (as in nanoGPT's train.py): forward under autocast -> method.loss ->
backward -> method.before_step (gradient modulation) -> clip -> optimizer.step -> method.after_step
-> zero_grad. The test split is evaluated once, at the end, for reporting only.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _dist
from .._outputs import check_writable_dir
from .._progress import show_progress
from ..config import dump_config
from ..errors import CheckpointError, ConfigError, DataError, EquimodalError, NonFiniteError, RunFolderError
from ..data import DataSplits, TensorMultimodalDataset, load_dataset
from ..data.base import batch_bounds, iterate_batches, merged_samples, stratified_split
from ..methods import Method, MethodData, build_method
from ..models import MultimodalModel
from ..models.auto import build_encoders
from ..models.factory import build_user_model
from .compile import compile_model
from .cost import CostMeter
from .checkpoint import load_run_state, remove_stale_temporaries, save_checkpoint
from .loggers import RunLoggers
from .metrics import accuracy, linear_probe_scores, macro_f1



# --- builders ------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device of this machine; anything else is a
    ``ConfigError`` naming the value."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or
                                         (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"device {name!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine (use auto or cpu)")
    if name.startswith("cuda:") and int(name.split(":", 1)[1]) >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def build_model(model_cfg: dict, splits: DataSplits) -> MultimodalModel:
    """One encoder per modality, chosen by ``model.encoder``, the dataset's declared kinds or the
    shape rule of ``equimodal.models.auto``; or the model ``model.factory`` builds from the data's
    modalities, class count and input shapes (``equimodal.models.factory``)."""
    if model_cfg.get("factory"):
        first = splits.train[[0]][0]
        shapes = {m: tuple(first[m].shape[1:]) for m in splits.modalities}
        return build_user_model(model_cfg["factory"], model_cfg, tuple(splits.modalities), splits.num_classes, shapes)
    from ..data import DATASET_MODALITIES
    encoders = build_encoders(model_cfg, splits.train, tuple(splits.modalities),
                              known=DATASET_MODALITIES.get(splits.name, ()))
    return MultimodalModel(encoders, splits.num_classes, fusion=model_cfg["fusion"], estimator=model_cfg["estimator"])


def share_budget(stage_epochs: list[int], budget: int) -> list[int]:
    """Stage lengths rescaled to sum to ``budget`` epochs (``train.stage_budget: shared``), in
    proportion to the method's own lengths, each at least 1 (largest remainders get the rounding),
    so that a multi-stage method trains as many epochs in all as a single-stage one."""
    if budget < len(stage_epochs):
        raise ConfigError(f"train.stage_budget=shared: train.epochs={budget} cannot hold {len(stage_epochs)} stages "
                          "of at least one epoch each; raise train.epochs")
    total = sum(stage_epochs)
    spare = budget - len(stage_epochs)  # one epoch per stage first, the rest in proportion
    exact = [spare * e / total for e in stage_epochs]
    out = [1 + int(x) for x in exact]
    by_remainder = sorted(range(len(out)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in by_remainder[:budget - sum(out)]:
        out[i] += 1
    return out


def build_optimizer(optim_cfg: dict, model: MultimodalModel, method: Method) -> torch.optim.Optimizer:
    """One parameter group per encoder (tagged ``modality``; a pretrained backbone's ``lr_factor``
    scales its group's rate) and one for the head; a method adds a group for its own parameters in
    ``setup`` (``Method.attach_parameters``)."""
    groups = model.param_groups() if hasattr(model, "param_groups") else contract_param_groups(model)
    name, lr, wd = optim_cfg["name"], optim_cfg["lr"], optim_cfg["weight_decay"]
    for group in groups:  # a pretrained backbone's own learning-rate factor (models/pretrained.py)
        factor = getattr(model.encoder(group["modality"]), "lr_factor", 1.0) if group.get("modality") else 1.0
        if factor != 1.0:
            group["lr"] = lr * factor
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg["momentum"], weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)


def contract_param_groups(model: nn.Module) -> list[dict]:
    """``MultimodalModel.param_groups`` for any model that follows the contract: one group per
    encoder (tagged ``modality``) and one for every other parameter."""
    groups, seen = [], set()
    for m in model.modalities:
        params = [p for p in model.encoder_parameters(m) if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append({"params": params, "modality": m})
    groups.append({"params": [p for p in model.parameters() if id(p) not in seen], "modality": None})
    return groups


def build_scheduler(optim_cfg: dict, optimizer: torch.optim.Optimizer, epochs: int):
    if optim_cfg["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim_cfg["step_size"], gamma=optim_cfg["gamma"])
    if optim_cfg["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def batches(dataset, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False,
            num_workers: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Mini-batches in a seeded order (shuffled when a generator is given); see
    ``equimodal.data.base.iterate_batches``."""
    return iterate_batches(dataset, batch_size, generator, drop_last=drop_last, num_workers=num_workers)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {m: x.to(device, non_blocking=True) for m, x in inputs.items()}


def resolve_precision(train_cfg: dict, device: torch.device) -> str:
    """``train.precision`` of a config: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere; bf16
    and fp16 autocast also run on the CPU. Configs written before that key had ``train.bf16``."""
    name = train_cfg.get("precision", "auto" if train_cfg.get("bf16", True) else "fp32")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast_for(device: torch.device, precision: str | bool):
    """The autocast context of a precision (``True``/``False`` = the old bf16 flag, CUDA only)."""
    if isinstance(precision, bool):
        precision = "bf16" if precision and device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def make_grad_scaler(device: torch.device):
    """``torch.amp.GradScaler`` for fp16 (the CUDA-only class on torch versions that lack it)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


@torch.no_grad()
def evaluate(model: MultimodalModel, method: Method, dataset: TensorMultimodalDataset, device: torch.device,
             batch_size: int = 256, bf16: bool = False, precision: str | None = None) -> dict[str, Any]:
    """Fused accuracy / macro-F1 / loss (from ``method.predict``) and per-modality accuracy."""
    was_training = model.training
    model.eval()
    preds, uni, losses = [], {}, []
    for inputs, y in batches(dataset, batch_size):
        with autocast_for(device, precision if precision is not None else bf16):
            out = model(to_device(inputs, device))
        logits = method.predict(out).float().cpu()
        preds.append(logits.argmax(1))
        losses.append(F.cross_entropy(logits, y, reduction="sum"))
        for m, z in method.unimodal_logits(out).items():
            uni.setdefault(m, []).append(z.float().argmax(1).cpu())
    model.train(was_training)
    pred, labels = torch.cat(preds), dataset.labels
    return {"acc": accuracy(pred, labels), "macro_f1": macro_f1(pred, labels, dataset.num_classes),
            "loss": float(torch.stack(losses).sum()) / max(1, len(dataset)),
            "acc_by_modality": {m: accuracy(torch.cat(p), labels) for m, p in uni.items()}}


@torch.no_grad()
def extract_features(model: MultimodalModel, dataset: TensorMultimodalDataset, device: torch.device,
                     batch_size: int = 256) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    feats = {m: [] for m in model.modalities}
    encode = model.encode if hasattr(model, "encode") else (lambda x: model(x).features)
    for inputs, _ in batches(dataset, batch_size):
        for m, h in encode(to_device(inputs, device)).items():
            feats[m].append(h.float().cpu())
    model.train(was_training)
    return {m: torch.cat(v) for m, v in feats.items()}


def linear_probes(model: MultimodalModel, splits: DataSplits, device: torch.device) -> dict[str, float]:
    """Test accuracy of a fresh linear classifier per frozen encoder, fitted on the training split."""
    return linear_probes_by_split(model, splits, device)["test"]


def linear_probes_by_split(model: MultimodalModel, splits: DataSplits, device: torch.device
                           ) -> dict[str, dict[str, float]]:
    """Per frozen encoder, one linear probe fitted on the training split and scored on validation
    (what decisions such as ``diagnose``'s verdict may use) and on test (reporting only)."""
    tr = extract_features(model, splits.train, device)
    va = extract_features(model, splits.val, device) if len(splits.val) else None
    te = extract_features(model, splits.test, device)
    out: dict[str, dict[str, float]] = {"test": {}, "val": {}}
    for m in model.modalities:
        evals = {"test": (te[m], splits.test.labels)}
        if va is not None:
            evals["val"] = (va[m], splits.val.labels)
        scores = linear_probe_scores(tr[m], splits.train.labels, evals, splits.num_classes)
        for split, acc in scores.items():
            out[split][m] = acc
    return out


class TrainStep(nn.Module):
    """One micro-batch's forward and loss terms (``method.forward`` then ``method.loss``), as a
    module so that DistributedDataParallel can wrap exactly what produces the loss. The method is a
    plain attribute (its own heads are averaged across ranks by the method itself)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.method.loss(self.method.forward(self.model, inputs), targets)


# --- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Runs one configured training job and writes its output folder.

    Output folder: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one object per epoch),
    ``summary.json`` and ``checkpoint.pt`` (saved every epoch; ``resume()`` continues from it), and
    ``data/`` when the data fitted preprocessing on its training split (a tokenizer; read back on
    resume and by ``eval``).
    """

    #: files whose presence means a folder holds a run
    RUN_FILES = ("checkpoint.pt", "summary.json")

    def __init__(self, cfg: dict, out_dir: str | Path | None = None, echo: Callable[[str], None] = print,
                 overwrite: bool = False, data: Any = None, model_factory: Any = None) -> None:
        """``data``: your own data instead of ``cfg``'s ``data.name`` (a dict of ``train``, ``val``
        (optional), ``test`` Datasets, or a builder; see ``equimodal.data.register_dataset``);
        ``model_factory``: a function that builds your model (see ``equimodal.models.factory``).
        Both are registered in this process and recorded in the run's config."""
        if data is not None or model_factory is not None:
            from ..config import with_user_parts
            cfg = with_user_parts(cfg, data, model_factory)
        self.cfg = copy.deepcopy(cfg)
        self.overwrite = overwrite
        self.resumed = False
        t = self.cfg["train"]
        if out_dir is None and t["out"]:
            out_dir = t["out"]
        if out_dir is None:  # runs/<timestamp>, never reusing a folder of another run
            stamp = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
            out_dir, n = stamp, 1
            while out_dir.exists():
                out_dir, n = stamp.with_name(f"{stamp.name}-{n}"), n + 1
        self.out_dir = check_writable_dir(out_dir)  # before the data and model are built
        if _dist.launched_by_torchrun() or _dist.is_distributed():
            self.device = _dist.init_from_env(resolve_device(t["device"]).type)  # joins torchrun's group
        else:
            self.device = resolve_device(t["device"])
        self.world, self.rank = _dist.world_size(), _dist.rank()
        if t["batch_size"] % self.world:
            raise ConfigError(f"train.batch_size={t['batch_size']} is the global batch and must split evenly over "
                              f"{self.world} processes")
        self.echo = echo if self.rank == 0 else (lambda text: None)  # only rank 0 prints
        if self.world > 1:  # every rank writes nowhere but must agree on rank 0's folder name
            names = [str(self.out_dir)]
            torch.distributed.broadcast_object_list(names, src=0)
            self.out_dir = Path(names[0])
        self.precision = resolve_precision(t, self.device)
        self.scaler = make_grad_scaler(self.device) if self.precision == "fp16" else None
        self.scaler_skips = 0
        self.loggers = RunLoggers(t.get("loggers", ["jsonl"]), enabled=self.rank == 0)  # train.loggers
        torch.manual_seed(t["seed"])
        data_opts = {k: v for k, v in self.cfg["data"].items() if k != "name"}
        if "progress" in data_opts:  # a loader that builds a cache shows bars only when the run does
            data_opts["progress"] = show_progress(data_opts["progress"] and t["progress"])
        # a folder that holds a run (resume) gives back the preprocessing the run fitted (data/)
        fitted = self.out_dir / "data" if (self.out_dir / "checkpoint.pt").is_file() and not overwrite else None
        self.splits = load_dataset(self.cfg["data"]["name"], fitted_dir=fitted, **data_opts)
        self.model = build_model(self.cfg["model"], self.splits).to(self.device)
        if t["batch_size"] // self.world < 2 and any(isinstance(m, nn.BatchNorm1d) for m in self.model.modules()):
            raise ConfigError(f"train.batch_size={t['batch_size']} leaves each of {self.world} process(es) 1 sample "
                              "per batch, which BatchNorm1d (the vector encoders' default norm) cannot train on; "
                              "use a larger batch or model.norm=group")
        if t.get("compile"):  # in place, per part: checkpoint keys and the model contract stay as they are
            compile_model(self.model)
        self.method = build_method(**self.cfg["method"])
        # the plan: (stage name, method that runs it, epochs); one supervised stage for most methods
        self.plan = [(st.name, st.method or self.method, st.epochs if st.epochs is not None else t["epochs"])
                     for st in self.method.stages()]
        if t.get("stage_budget", "each") == "shared":
            self.plan = [(n, m, e) for (n, m, _), e in zip(self.plan, share_budget([e for _, _, e in self.plan],
                                                                                   t["epochs"]))]
        # schedules given as a share of the budget resolved against each stage's epochs; what
        # cannot act within them is said once at the start of fit
        self.notes = [note for _, m, e in self.plan for note in m.plan_epochs(e)]
        self.holdout = self._carve_holdout(max(m.holdout_fraction for _, m, _ in self.plan))
        if len(self.splits.train) < 2 * self.world:  # BatchNorm cannot train on one sample per process
            raise DataError(f"dataset {self.cfg['data']['name']!r}: the training split has {len(self.splits.train)} "
                            f"sample(s) once validation{' and held-out' if self.holdout is not None else ''} "
                            f"samples are carved; training needs at least {2 * self.world}")
        self.total_epochs = sum(e for _, _, e in self.plan)
        self.epoch = 0  # global epoch, across stages
        self.history: list[dict[str, Any]] = []
        self.stage_reports: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": -1, "val_acc": -1.0, "model": None}
        self.elapsed = 0.0
        self.meter = CostMeter(self.model)  # passes through the encoders while training (counted)
        self.optimizer_steps = 0
        self.stage_index = -1
        self._enter_stage(0, resumed=False)

    def _carve_holdout(self, fraction: float):
        """A stratified part of the training split, withheld from training, for methods that
        estimate something on held-out *training* data (never validation or test)."""
        if fraction <= 0:
            return None
        keep, held = stratified_split(self.splits.train.labels, fraction, seed=self.cfg["train"]["seed"] + 7919)
        holdout = self.splits.train.subset(held)
        self.splits = DataSplits(self.splits.train.subset(keep), self.splits.val, self.splits.test, self.splits.name,
                                 self.splits.fitted)
        return holdout

    def _stage_at(self, epoch: int) -> tuple[int, int]:
        """(stage index, epoch within the stage) of a global epoch."""
        start = 0
        for i, (_, _, n) in enumerate(self.plan):
            if epoch < start + n:
                return i, epoch - start
            start += n
        return len(self.plan) - 1, epoch - (start - self.plan[-1][2])

    def _enter_stage(self, index: int, resumed: bool) -> None:
        """Fresh optimizer and scheduler for the stage, then the stage method's hooks."""
        name, method, epochs = self.plan[index]
        self.stage_index, self.active = index, method
        self.optimizer = build_optimizer(self.cfg["optim"], self.model, method)
        method.on_stage_start(name, resumed=resumed)
        method.attach_data(MethodData(train=self.splits.train, val=self.splits.val, holdout=self.holdout,
                                      device=self.device))
        try:
            method.setup(self.model, self.optimizer, seed=self.cfg["train"]["seed"])
        except (ValueError, TypeError) as exc:  # the method refuses this model (ogm-ge params=conv on MLPs)
            if isinstance(exc, EquimodalError):
                raise
            raise ConfigError(f"method {method.name!r}: {' '.join(str(exc).split())}") from None
        if method.substeps() > 1 and self.cfg["train"]["accumulate"] != 1:
            raise ConfigError(f"method {method.name!r} takes {method.substeps()} optimizer steps per batch "
                              f"(stage {name!r}); train.accumulate must be 1, got {self.cfg['train']['accumulate']}")
        # after setup: a method may add its own parameter group, and the scheduler must know every group
        self.scheduler = build_scheduler(self.cfg["optim"], self.optimizer, epochs)
        self.train_step = self._wrap(TrainStep(self.model, method))

    def _wrap(self, step: nn.Module) -> nn.Module:
        """DistributedDataParallel around the forward *and* the loss under a process group, so DDP
        sees only the loss terms and finds the parameters a stage leaves unused (the fused head
        while distill trains its teachers) from the loss itself. Rebuilt per stage: a stage may
        freeze encoders, and DDP registers the parameters that require grad when it is built."""
        if not _dist.is_distributed():
            return step
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything ``checkpoint.pt`` holds to resume exactly (tensors and plain values only)."""
        return {"config": self.cfg, "epoch": self.epoch, "stage_index": self.stage_index,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "method": self.method.state_dict(),
                "stage_method": self.active.state_dict() if self.active is not self.method else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "history": self.history, "stage_reports": self.stage_reports, "best": self.best,
                "elapsed": self.elapsed, "cost": self.meter.state_dict(), "optimizer_steps": self.optimizer_steps,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "scaler_skips": self.scaler_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (``resume`` does this after rebuilding the run from its config)."""
        self.method.load_state_dict(state["method"])
        index = state.get("stage_index", 0)
        if index != self.stage_index:
            self._enter_stage(index, resumed=True)
        if state.get("stage_method") is not None:
            self.active.load_state_dict(state["stage_method"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage_reports = state.get("stage_reports", [])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.elapsed = float(state["elapsed"])
        self.meter.load_state_dict(state.get("cost", {}))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.scaler_skips = int(state.get("scaler_skips", 0))

    @classmethod
    def from_run(cls, run: str | Path, echo: Callable[[str], None] = print, data: Any = None,
                 model_factory: Any = None, device: str | None = None) -> "Trainer":
        """The one way to rebuild a run from its folder (or its ``checkpoint.pt``): splits, model,
        method and the runner of the stage it was in, with every state restored, exactly as
        training left them after its last finished epoch. ``resume``, ``equimodal eval`` and
        ``equimodal.evaluate_run`` all go through here, so they cannot drift apart.

        The stored config is checked as a fresh one is (``config.resolve``); a checkpoint whose
        config or weights do not fit this version of equimodal is a ``CheckpointError`` naming the
        file and the key. ``device`` replaces the run's ``train.device`` (evaluation elsewhere)."""
        from ..config import resolve, with_user_parts
        run = Path(run)
        run_dir = run.parent if run.is_file() else run
        path = run if run.is_file() else run / "checkpoint.pt"
        state = load_run_state(path)
        stored = state["config"]
        if not isinstance(stored, dict) or not isinstance(stored.get("train"), dict):
            raise CheckpointError(f"{path}: its stored config is not a full equimodal config "
                                  f"(expected a mapping with a 'train' section, got {type(stored).__name__})")
        stored = copy.deepcopy(stored)
        if device is not None:
            resolve_device(device)  # a bad --device is named as such, not as the checkpoint's fault
            stored["train"]["device"] = device
        try:  # a user's own data or model is registered again first, so its name resolves
            cfg = with_user_parts(stored, data, model_factory) if data is not None or model_factory is not None \
                else resolve(stored)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its stored config does not fit this version of equimodal: {exc}") from None
        if cfg != stored and device is None and data is None and model_factory is None:
            changed = _first_difference(stored, cfg)
            if changed is not None:
                echo(f"note: {path} was written by another version of equimodal; {changed}")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise CheckpointError(f"{path}: 'epoch' must be a whole number >= 0, got {epoch!r}")
        trainer = cls(cfg, out_dir=run_dir, echo=echo)
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, EquimodalError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: its weights or state do not fit the model and method its config "
                                  f"builds ({cfg['method']['name']} on {cfg['data']['name']}): {first}") from None
        return trainer

    @classmethod
    def resume(cls, run_dir: str | Path, echo: Callable[[str], None] = print, data: Any = None,
               model_factory: Any = None) -> "Trainer":
        """Rebuild a run (``from_run``: a folder or its ``checkpoint.pt``) and continue after its last
        finished epoch (``data`` / ``model_factory``: give your own again when they were not
        importable by name)."""
        trainer = cls.from_run(run_dir, echo=echo, data=data, model_factory=model_factory)
        trainer.resumed = True
        return trainer

    def select_reported(self, last: bool = False) -> tuple[int, str]:
        """Load the weights and method state that the run reports (``finish`` does the same): the
        best validation epoch's under ``train.select=best_val`` (unless ``last``), else the last
        trained epoch's. Returns (that epoch, counted from 0; which it is, in words)."""
        best = self.best or {}
        if self.cfg["train"]["select"] == "best_val" and best.get("model") is not None and not last:
            if best["epoch"] != self.epoch - 1:
                self.model.load_state_dict(best["model"])
                if best.get("method") is not None:  # runs saved before this key score with the last heads
                    self.active.load_state_dict(best["method"])
            return int(best["epoch"]), "best validation epoch (train.select=best_val)"
        return self.epoch - 1, "last trained epoch"

    # --- the loop -----------------------------------------------------------------------
    def _shuffle_generator(self, epoch: int) -> torch.Generator:
        # a fresh generator per epoch: batch order depends on (seed, epoch) only, so resume is exact
        return torch.Generator().manual_seed(self.cfg["train"]["seed"] * 100_003 + epoch)

    def train_epoch(self, epoch: int, stage_epoch: int) -> dict[str, float]:
        """One pass over the training split with the active stage's method."""
        t = self.cfg["train"]
        clip = self.cfg["optim"]["clip_grad_norm"]
        method = self.active
        self.model.train()
        getattr(self.train_step, "module", self.train_step).method = method  # the stage's runner, as active now
        method.on_epoch_start(stage_epoch)
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        train_set = method.training_set(stage_epoch, self.splits.train)  # a method may resample (valuation)
        bounds = batch_bounds(len(train_set), t["batch_size"], self.world)  # the global batches' sizes
        n_batches = len(bounds)
        name = self.plan[self.stage_index][0]
        label = f"{name} " if len(self.plan) > 1 else ""
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)  # per-epoch random crops and frame choices
        bar = tqdm(iterate_batches(train_set, t["batch_size"], self._shuffle_generator(epoch),
                                   num_workers=t["num_workers"], shard=(self.rank, self.world),
                                   pin_memory=self.device.type == "cuda", persistent_workers=True), total=n_batches,
                   desc=f"{label}epoch {epoch + 1}/{self.total_epochs}", leave=False, disable=self.rank != 0 or not show_progress(t["progress"]),
                   dynamic_ncols=True)
        accumulate = t["accumulate"]
        substeps = method.substeps()
        skipped = 0
        for i, (inputs, y) in enumerate(bar):
            inputs, y = to_device(inputs, self.device), y.to(self.device)
            for sub in range(substeps):  # most methods: one step per batch; alternating methods: several
                if substeps > 1:
                    method.on_substep(sub)
                with autocast_for(self.device, self.precision):  # the method's own heads run under autocast too
                    terms = self.train_step(inputs, y)  # method.forward, then method.loss
                loss = sum(terms.values())
                group = 1 if substeps > 1 else min(accumulate, n_batches - (i // accumulate) * accumulate)
                scaled = loss / group  # a final, shorter accumulation group is averaged over its own size
                if self.world > 1:  # DDP averages rank means: weigh each by its share of an uneven last batch
                    start, stop = bounds[i]
                    scaled = scaled * (y.numel() * self.world / (stop - start))
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0) + v.detach()
                steps += 1
                if substeps == 1 and (i + 1) % accumulate and i + 1 < n_batches:
                    continue  # accumulate gradients over micro-batches; one optimizer step per group
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)  # methods see unscaled gradients
                loss_ok, grads_ok = self._finite(loss)
                if not loss_ok or (not grads_ok and self.scaler is None):
                    if t["on_nan"] == "stop":
                        raise NonFiniteError(self._nonfinite_message(epoch, i, method))
                    skipped += 1  # on_nan=skip: drop this step's gradients, keep going
                    if self.scaler is not None:
                        self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                # fp16: a step the scaler will skip (overflow) must not advance the method's state
                snapshot = copy.deepcopy(method.state_dict()) if self.scaler is not None else None
                method.before_step(self.model)
                if clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                if self.scaler is not None:
                    scale = self.scaler.get_scale()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    if self.scaler.get_scale() < scale:  # skipped: restore the method's state
                        method.load_state_dict(snapshot)
                        self.scaler_skips += 1
                        method.after_step(self.model)
                        self.optimizer.zero_grad(set_to_none=True)
                        continue
                else:
                    self.optimizer.step()
                self.optimizer_steps += 1
                method.after_step(self.model)
                self.loggers.step(self.optimizer_steps, epoch, name, method.step_log)  # per-step traces
                self.optimizer.zero_grad(set_to_none=True)
        bar.close()
        stats = {k: float(v) / max(1, steps) for k, v in sums.items()}
        if skipped:
            stats["skipped_nonfinite_steps"] = skipped
        merged = merged_samples(len(train_set), t["batch_size"], self.world)
        if merged:  # a final batch too small for BatchNorm went into the batch before it (batch_bounds)
            stats["merged_final_batch_samples"] = merged
        if self.scaler is not None:
            stats["fp16_scale"] = float(self.scaler.get_scale())
        return stats

    def _finite(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """Whether the step's loss, and every gradient, are finite (one host sync per step; summed
        over ranks so every rank takes the same decision)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else loss.new_zeros(())
        both = _dist.all_reduce_sum(torch.stack([loss.detach().float().sum(), norm.to(loss.device)]))
        ok = torch.isfinite(both).tolist()
        return bool(ok[0]), bool(ok[1])

    def _nonfinite_message(self, epoch: int, step: int, method: Method) -> str:
        figures = {k: v for k, v in method.log().items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in list(figures.items())[:8]) or "none logged"
        kept = (f"the last good checkpoint (after epoch {self.epoch}) is kept in {self.out_dir}"
                if self.epoch else "no epoch finished, so there is no checkpoint")
        return (f"non-finite loss or gradient in epoch {epoch + 1}, batch {step + 1}, method {method.name!r} "
                f"(its figures this epoch: {shown}); {kept}. Lower optim.lr, set optim.clip_grad_norm, "
                "or set train.on_nan=skip to drop such steps")

    def check_out_dir(self) -> None:
        """A fresh run never writes into a folder that holds another run, unless ``overwrite``."""
        if self.resumed or self.epoch > 0:
            return
        held = [f for f in self.RUN_FILES if (self.out_dir / f).exists()]
        if not held:
            return
        if not self.overwrite:
            raise RunFolderError(f"{self.out_dir} already holds a run ({', '.join(held)}); continue it with "
                                 f"`equimodal train --resume {self.out_dir}`, choose another --out, or pass --overwrite")
        for f in held:
            (self.out_dir / f).unlink()

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs of every stage, checkpointing each, then ``finish``; returns the
        summary also written to ``summary.json``."""
        t = self.cfg["train"]
        self.check_out_dir()
        _dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if self.rank == 0:  # only rank 0 writes the run folder
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir / "checkpoint.pt")  # left by a writer killed mid-write
            (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
            self._save_fitted()
            self._rewrite_metrics()
            self.loggers.open(self.out_dir, self.cfg, self.history, self.optimizer_steps, resumed=self.epoch > 0)
        last_stage = len(self.plan) - 1
        if self.epoch < self.total_epochs:
            for note in self.notes:
                self.echo(f"note: {note}")
        while self.epoch < self.total_epochs:
            epoch = self.epoch
            index, stage_epoch = self._stage_at(epoch)
            if index != self.stage_index:
                self._enter_stage(index, resumed=False)
            name, method, stage_epochs = self.plan[index]
            start = time.perf_counter()
            with self.meter.counting():  # training passes only (the method's own no-grad passes included)
                train_stats = self.train_epoch(epoch, stage_epoch)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
            self.scheduler.step()
            val = evaluate(self.model, method, self.splits.val, self.device, precision=self.precision)
            record = {"epoch": epoch, "stage": name, "stage_epoch": stage_epoch,
                      "lr": lr,
                      **{f"train_{k}": v for k, v in train_stats.items()},
                      "val_acc": val["acc"], "val_macro_f1": val["macro_f1"], "val_loss": val["loss"],
                      "val_acc_by_modality": val["acc_by_modality"], **method.log()}
            # the weights that scored val["acc"], copied before on_epoch_end may change them (relearn)
            if index == last_stage and val["acc"] > self.best["val_acc"]:
                keep = t["select"] == "best_val"  # the method's own heads scored too, so they are kept with the weights
                self.best = {"epoch": epoch, "val_acc": val["acc"],
                             "model": copy.deepcopy(self.model.state_dict()) if keep else None,
                             "method": copy.deepcopy(method.state_dict()) if keep else None}
            with self.meter.counting():  # a method's own end-of-epoch passes (estimates, re-learning) count too
                # "final": nothing changed after the run's last validation is ever validated (AUG's growth)
                method.on_epoch_end(stage_epoch, {**record, "final": index == last_stage and
                                                  stage_epoch == stage_epochs - 1})
            if last_stage > 0 and stage_epoch == stage_epochs - 1:  # report each stage of a multi-stage method
                self.stage_reports.append(self._stage_report(name, method, val))
            self.elapsed += time.perf_counter() - start
            record["seconds"] = time.perf_counter() - start
            self.history.append(record)
            self.epoch = epoch + 1
            if self.rank == 0:
                self._append_metrics(record)
                self.loggers.epoch(record, self.optimizer_steps)
                save_checkpoint(self.state_dict(), self.out_dir / "checkpoint.pt")
            self.echo(format_epoch(record, self.total_epochs))
            if self.stage_reports and self.stage_reports[-1]["stage"] == name and stage_epoch == stage_epochs - 1:
                self.echo(format_stage(self.stage_reports[-1]))
        return self.finish()

    def _stage_report(self, name: str, method: Method, val: dict[str, Any]) -> dict[str, Any]:
        """End-of-stage figures (test evaluated for reporting only; nothing is selected on it)."""
        test = evaluate(self.model, method, self.splits.test, self.device, precision=self.precision)
        probes = (linear_probes_by_split(self.model, self.splits, self.device) if self.cfg["train"]["probe"]
                  else {"test": {}, "val": {}})
        return {"stage": name, "val_acc": val["acc"], "val_acc_by_modality": val["acc_by_modality"],
                "test_acc": test["acc"], "test_acc_by_modality": test["acc_by_modality"],
                "probe_acc_by_modality": probes["test"], "probe_val_acc_by_modality": probes["val"],
                **method.log_stage()}

    def finish(self) -> dict[str, Any]:
        """Pick the reported model (last epoch, or best validation epoch of the last stage) and
        evaluate it on test once."""
        t = self.cfg["train"]
        selected = self.epoch - 1
        start = time.perf_counter()
        last = self.stage_reports[-1] if self.stage_reports else None
        # the last epoch's test accuracy, reported beside the selected epoch's (never used to choose)
        last_test = last["test_acc"] if last is not None and last["stage"] == self.plan[-1][0] else None
        if t["select"] == "best_val" and self.best["model"] is not None and self.best["epoch"] != self.epoch - 1:
            if last_test is None:
                last_test = evaluate(self.model, self.active, self.splits.test, self.device, precision=self.precision)["acc"]
            selected, _ = self.select_reported()
        test = evaluate(self.model, self.active, self.splits.test, self.device, precision=self.precision)
        if last_test is None:
            last_test = test["acc"]  # the selected epoch is the last one
        if last is not None and last["stage"] == self.plan[-1][0] and selected == self.epoch - 1:
            # same final model: the last stage report already fitted them
            probes = {"test": last["probe_acc_by_modality"], "val": last.get("probe_val_acc_by_modality", {})}
        else:
            probes = linear_probes_by_split(self.model, self.splits, self.device) if t["probe"] else {"test": {}, "val": {}}
        summary = {
            "method": self.cfg["method"]["name"], "predicts": self.method.predicts,
            "dataset": self.cfg["data"]["name"], "seed": t["seed"],
            "epochs": self.total_epochs, "fusion": self.cfg["model"]["fusion"], "estimator": getattr(self.model, "estimator", "custom"),
            "modalities": list(self.model.modalities),
            "selection": t["select"], "selected_epoch": selected,
            "val_acc": self.history[selected]["val_acc"] if self.history else float("nan"),
            "test_acc": test["acc"], "test_macro_f1": test["macro_f1"], "test_loss": test["loss"],
            "test_acc_by_modality": test["acc_by_modality"], "probe_acc_by_modality": probes["test"],
            "probe_val_acc_by_modality": probes["val"],
            # the last epoch's figures beside the selected ones, so that a collapse hidden by
            # best-validation selection shows
            "last_epoch_val_acc": self.history[-1]["val_acc"] if self.history else float("nan"),
            "last_epoch_test_acc": last_test,
            "stages": self.stage_reports,
            "holdout": len(self.holdout) if self.holdout is not None else 0,
            # epochs whose final training batch was too small for BatchNorm and was merged into the
            # batch before it (each epoch's count of such samples: train_merged_final_batch_samples)
            "merged_final_batches": sum(1 for r in self.history if r.get("train_merged_final_batch_samples")),
            "cost": {"epochs": self.total_epochs,
                     "stage_epochs": {name: epochs for name, _, epochs in self.plan},
                     **self.meter.summary(self.optimizer_steps)},
            "seconds": self.elapsed + time.perf_counter() - start,
        }
        if self.notes:
            summary["notes"] = list(self.notes)
        summary["processes"] = self.world
        summary["peak_rss_mib_by_rank"] = peak_rss_by_rank()
        summary["precision"] = self.precision
        if self.scaler is not None:
            summary["fp16_skipped_steps"] = self.scaler_skips
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.loggers.finish(summary, self.optimizer_steps)
        self.echo(format_summary(summary))
        return summary

    def _save_fitted(self) -> None:
        """The data's preprocessing fitted on the training split (``DataSplits.fitted``) into
        ``data/`` of the run folder, where ``eval`` and ``--resume`` read it back."""
        fitted = getattr(self.splits, "fitted", None) or {}
        if not fitted:
            return
        folder = self.out_dir / "data"
        folder.mkdir(exist_ok=True)
        for name, text in fitted.items():
            tmp = folder / f"{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(folder / name)

    def _rewrite_metrics(self) -> None:
        with open(self.out_dir / "metrics.jsonl", "w") as fh:
            for rec in self.history:
                fh.write(json.dumps(rec) + "\n")

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _first_difference(stored: Any, resolved: Any, prefix: str = "") -> str | None:
    """The first key where a stored config and its resolved form differ, in words (a checkpoint
    from another version: a key added since is filled with its default)."""
    if isinstance(stored, dict) and isinstance(resolved, dict):
        for k in resolved:
            key = f"{prefix}{k}"
            if k not in stored:
                return f"{key} is not in its config (now {resolved[k]!r}, the default)"
            found = _first_difference(stored[k], resolved[k], key + ".")
            if found:
                return found
        return None
    if stored != resolved:
        return f"{prefix.rstrip('.')} is read as {resolved!r} (stored {stored!r})"
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_rss_by_rank() -> list[float]:
    """Every rank's peak resident memory (one gather under a process group)."""
    mine = round(peak_rss_mib(), 1)
    if not _dist.is_distributed():
        return [mine]
    gathered: list = [None] * _dist.world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


# --- pretty output -----------------------------------------------------------------------------
def format_epoch(rec: dict[str, Any], total: int) -> str:
    mods = rec["val_acc_by_modality"]
    parts = [f"epoch {rec['epoch'] + 1:>3}/{total}" + (f" [{rec['stage']}]" if rec.get("stage", "supervised") != "supervised" else ""), f"loss {rec['train_loss']:.4f}", f"val acc {rec['val_acc']:.4f}",
             "per-modality " + " ".join(f"{m} {a:.3f}" for m, a in mods.items())]
    ks = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("k/")}
    if ks:
        parts.append("k " + " ".join(f"{m} {v:.3f}" for m, v in ks.items()))
    parts.append(f"{rec['seconds']:.1f}s")
    return " | ".join(parts)


def format_stage(r: dict[str, Any]) -> str:
    uni = " ".join(f"{m} {a:.3f}" for m, a in r["test_acc_by_modality"].items())
    probes = " ".join(f"{m} {a:.3f}" for m, a in r["probe_acc_by_modality"].items())
    return f"== end of stage {r['stage']}: test acc {r['test_acc']:.4f} | per-modality {uni} | linear probe {probes}"


def format_summary(s: dict[str, Any]) -> str:
    rows = [("method", s["method"]), ("dataset", s["dataset"]), ("fusion / estimator", f"{s['fusion']} / {s['estimator']}"),
            ("reported epoch", f"{s['selected_epoch'] + 1} ({s['selection']})"),
            ("test accuracy (fused)", f"{s['test_acc']:.4f}"), ("test macro-F1", f"{s['test_macro_f1']:.4f}")]
    for m, a in s["test_acc_by_modality"].items():
        rows.append((f"test accuracy [{m}]", f"{a:.4f}"))
    for m, a in s["probe_acc_by_modality"].items():
        rows.append((f"linear probe [{m}]", f"{a:.4f}"))
    rows.append(("seconds", f"{s['seconds']:.1f}"))
    width = max(len(r[0]) for r in rows)
    line = "-" * (width + 14)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])
