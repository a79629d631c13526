"""Data Remixing (Ma, Chen, Deng, ICML 2025). peers_2025.md C1."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from ..data.base import TensorMultimodalDataset
from ..models.multimodal import ModelOutput
from ._budget import check_epoch_option, share_of_budget, warmup_notes
from ._base import Method, fusing_model, unwrap
from ._heads import linear_heads
from ._registry import register_method
from ._unimodal_probe_logits import single_modality_logits
from .valuation import KEEP_KEY, ResampledDataset, inference_passes

_ESTIMATES = ("heads", "mask")


def kl_to_uniform(logits: torch.Tensor, clip: float = 1e-9) -> torch.Tensor:
    """KL(p || uniform) in bits per row of ``logits`` (... x C): sum_c p_c log2(p_c * C), with p =
    softmax(logits) clipped below at ``clip`` (not renormalised), as the released ``kl_divergence``."""
    p = logits.float().softmax(-1).clamp_min(clip)
    return (p * torch.log2(p * logits.shape[-1])).sum(-1)


def assign_least_confident(kl: torch.Tensor) -> torch.Tensor:
    """Index of the modality whose prediction is closest to uniform, per sample, from B x M KLs.
    Ties go to the later modality (the released rule for two: audio only if KL_a < KL_v)."""
    m = kl.shape[-1]
    return (m - 1) - kl.flip(-1).argmin(-1)


def with_assignment(dataset: Any, assign: torch.Tensor, n_modalities: int,
                    modalities: tuple[str, ...]) -> Any:
    """``dataset`` with each sample's assignment (a one-hot B x M keep mask) carried in the inputs
    under ``KEEP_KEY`` (in-memory data: no copy of the inputs; other datasets: a view)."""
    keep = F.one_hot(assign.long().cpu(), n_modalities).bool()
    if isinstance(dataset, TensorMultimodalDataset):
        return TensorMultimodalDataset({**dataset.inputs, KEEP_KEY: keep}, dataset.labels, dataset.num_classes)
    return ResampledDataset(dataset, torch.arange(len(dataset)), keep, "features", modalities)


#: the official warm-up as a share of its budget: 10 of 60 epochs (CREMA-D)
_WARMUP_SHARE = (1, 6)

@register_method("remix")
class Remix(Method):
    """Data Remixing (Ma et al., ICML 2025): each sample trains its least confident modality alone, one modality per step.

    Rule (our notation; M modalities, features h_m, the model's fusion head g, a linear head W_m per
    modality owned by the method). Warm-up, epochs e < ``warmup_epochs``: ordinary joint steps with
    L = CE(g(h), y) + ``warmup_weight`` * sum_m CE(W_m h_m, y). Each later epoch, before training
    (``training_set``): one no-grad pass over the training split with the model in eval mode gives
    p_m = softmax(W_m h_m) per sample and KL_m = sum_c p_m,c log2(p_m,c C) (probabilities clipped at
    1e-9); the sample is assigned to a(i) = argmin_m KL_m, the modality whose prediction is closest
    to uniform (ties: the later modality, as the code's "audio only if KL_a < KL_v"). Every sample
    goes to exactly one modality; none is dropped. Training in that epoch: each batch is split into
    M single-modality sub-batches, one optimizer step each (``substeps()`` = M); sub-step m forwards
    only the samples with a(i) = m, zeroes every other modality's features after the encoders and
    uses L = CE(g(0, .., h_m, .., 0), y) + ``gamma`` * CE(W_m h_m, y). A rank's sub-batch of a single
    sample is dropped from its step (logged as ``single_sample_substeps``): BatchNorm cannot
    normalise one sample in training mode (vector encoders fail outright), and the code's full-size
    single-modality batches never meet the case. A sub-batch that is empty on
    every rank takes no optimizer step (its gradients are set to None, so momentum and weight decay
    do not move anything either).

    Paper: Xiaoyu Ma, Hao Chen, Yongjian Deng, ICML 2025, "Improving Multimodal Learning Balance and
    Sufficiency through Data Remixing" (arXiv 2506.11550); official code MatthewMaxy/Remix_ICML2025
    (``train.py``, ``models/models.py``). Defaults: warmup_epochs null (a sixth of the run's epochs,
    rounded: the code's 10 of 60, so a short run is not all warm-up; 10 when the loop does not tell
    the budget), warmup_weight 0.5 (the code's
    alpha = beta), gamma 1.0 (gamma1 = gamma2), estimate "heads", eval_batch_size 256. The code's
    optimiser (Adam lr 5e-5, wd 1e-4, StepLR(30, 0.1), 60 epochs, batch 64) is a trainer setting.

    Options: ``estimate`` "heads" (the method's unimodal heads W_m, the code) | "mask" (the fusion
    head with the other modalities zeroed, the paper's "dropout" estimate); the unimodal-head loss
    terms are kept in both.

    Departures. (1) Batch order: the code trains on full-size single-modality batches, all video
    batches of the epoch first, then all audio batches. Our trainer draws mixed batches and a method
    cannot order them, so each mixed batch is split into its single-modality sub-batches, taken one
    after the other (the spec's "interleaved homogeneous batches"): every optimizer step still sees
    one modality only, but steps are smaller (about B/M samples) and M times as many. (2) Any number
    of modalities (argmin over M; the code has two, and hard-codes 6 classes). (3) The assignment
    pass reads the training samples as the loop serves them (for on-disk data with random crops
    those are training crops; the code uses eval transforms). (4) Distributed: each rank assigns a
    contiguous share of the training split and the assignments are summed across ranks (one
    all-reduce), so all ranks agree; the per-sub-step sample count is all-reduced for the
    empty-step decision; the heads' gradients are averaged; a rank whose share of a sub-batch is
    empty contributes a zero gradient to DDP's average. Zero-filled features suit concat and sum
    heads; for FiLM / gated fusion they are out-of-distribution inputs (no learned mask token here).
    As in the code, the masked encoders of a sub-step still run forward (BatchNorm statistics move)
    and get zero gradients (momentum and weight decay still move them). With train.accumulate > 1
    the post-warm-up epochs take one step per sub-batch (no accumulation).

    Cost: per post-warm-up epoch one extra no-grad forward pass over the training split; per batch
    M optimizer steps whose forward passes together cover the batch once (the same encoder work as
    a joint step), plus M small linear heads. Hooks: setup, on_epoch_start, training_set, substeps,
    on_substep, forward, loss, before_step, log, state_dict.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"warmup_epochs": (None, 2, 4, 6)}

    def __init__(self, warmup_epochs: int | None = None, warmup_weight: float = 0.5, gamma: float = 1.0,
                 estimate: str = "heads", eval_batch_size: int = 256) -> None:
        super().__init__()
        check_epoch_option("warmup_epochs", warmup_epochs, 0)
        for key, value, low in (("eval_batch_size", eval_batch_size, 1),):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        for key, value in (("warmup_weight", warmup_weight), ("gamma", gamma)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if estimate not in _ESTIMATES:
            raise ValueError(f"estimate must be one of {list(_ESTIMATES)}, got {estimate!r}")
        self.warmup_option = warmup_epochs  # as given: None follows the run's budget
        self.warmup_epochs = share_of_budget(warmup_epochs, 0, _WARMUP_SHARE, paper=10, low=0)
        self.eval_batch_size = eval_batch_size
        self.warmup_weight, self.gamma, self.estimate = float(warmup_weight), float(gamma), estimate
        self.heads: nn.ModuleDict | None = None
        self.substep = 0
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        self._plan: tuple[int, torch.Tensor] | None = None  # (modality index, rows) of this sub-step
        self._rows: torch.Tensor | None = None  # samples in this sub-step (local), for before_step
        self._figures: dict[str, float] = {}
        self._empty = 0  # sub-steps skipped (empty on every rank) since the last log()
        self._single = 0  # one-sample sub-batches skipped since the last log()
        self.last_assignment: torch.Tensor | None = None

    # --- setup ----------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = fusing_model(model, self.name, "zeroes features before fusion")
        self._modalities = tuple(inner.modalities)
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 23)
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else list(self.heads.parameters())

    def plan_epochs(self, epochs: int) -> list[str]:
        self.warmup_epochs = share_of_budget(self.warmup_option, epochs, _WARMUP_SHARE, paper=10, low=0)
        return warmup_notes("remix", self.warmup_epochs, epochs,
                            "it never re-assigns a sample (it trains as joint plus unimodal losses)")

    def _require_setup(self) -> None:
        if self._model is None:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) first (it builds the unimodal heads)")

    def remixing(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) is past the warm-up."""
        return (self.epoch if epoch is None else epoch) >= self.warmup_epochs

    # --- the per-epoch assignment ---------------------------------------------------------
    def unimodal_predictions(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """The per-modality logits the assignment reads (``estimate``)."""
        if self.estimate == "mask":
            return single_modality_logits(self._model, output.features, self._modalities)
        return {m: self.heads[m](output.features[m]) for m in self._modalities}

    def assignment(self, dataset: Any) -> torch.Tensor:
        """a(i) for every sample of ``dataset`` (long, CPU): eval mode, no gradients. Each rank
        values a contiguous share; the shares are summed across ranks."""
        self._require_setup()
        n, rank, world = len(dataset), _dist.rank(), _dist.world_size()
        device = self.require_data().device
        share = torch.arange(n).tensor_split(world)[rank]
        part = dataset if world == 1 else (dataset.subset(share) if isinstance(dataset, TensorMultimodalDataset)
                                           else ResampledDataset(dataset, share, None, "features"))
        chunks = []
        for out, _ in inference_passes(self._model, self.require_data(), part, self.eval_batch_size):
            logits = self.unimodal_predictions(out)
            kl = torch.stack([kl_to_uniform(logits[m]) for m in self._modalities], -1)
            chunks.append(assign_least_confident(kl))
        full = torch.zeros(n, device=device)
        if chunks:
            full[share.to(device)] = torch.cat(chunks).to(device).float() + 1
        return (_dist.all_reduce_sum(full) - 1).round().long().cpu()

    def training_set(self, epoch: int, dataset: Any) -> Any:
        if not self.remixing(epoch):
            return dataset
        assign = self.last_assignment = self.assignment(dataset)
        counts = torch.bincount(assign, minlength=len(self._modalities)).tolist()
        total = max(1, len(assign))
        self._figures = {f"assigned/{m}": counts[j] / total for j, m in enumerate(self._modalities)}
        return with_assignment(dataset, assign, len(self._modalities), self._modalities)

    # --- training steps -------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.substep = 0

    def substeps(self) -> int:
        return len(self._modalities) if self._modalities and self.remixing() else 1

    def on_substep(self, index: int) -> None:
        if self._modalities and not 0 <= index < len(self._modalities):
            raise ValueError(f"{self.name}: sub-step {index} out of range; there are {len(self._modalities)} modalities")
        self.substep = int(index)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """Warm-up (no assignment in the inputs): the plain forward. Later: only the rows assigned
        to this sub-step's modality (no model call if there are none)."""
        if KEEP_KEY not in inputs:
            self._plan = None
            return model(inputs)
        self._require_setup()
        inputs = dict(inputs)
        keep = inputs.pop(KEEP_KEY).bool()
        rows = keep[:, self.substep].nonzero().flatten()
        if rows.numel() == 1:  # BatchNorm cannot normalise one sample in training mode: skipped
            rows, self._single = rows[:0], self._single + 1
        self._plan = (self.substep, rows)
        if rows.numel() == 0:
            empty = torch.zeros(0, int(self._model.num_classes), device=keep.device)
            return ModelOutput(logits=empty, unimodal_logits={}, features={})
        return model({m: x[rows.to(x.device)] for m, x in inputs.items()})

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        plan, self._plan = self._plan, None
        if plan is None:  # warm-up step (or an evaluation call): joint loss + weighted unimodal heads
            terms = super().loss(output, targets)
            self._rows = None
            if self.heads is not None and output.features:
                for m in self._modalities:
                    z = self.heads[m](output.features[m])
                    terms[f"ce/{m}"] = self.warmup_weight * F.cross_entropy(z.float(), targets)
            return terms
        j, rows = plan
        m = self._modalities[j]
        self._rows = rows
        if rows.numel() == 0:  # keeps a graph so the loop's backward works; before_step decides
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return {"ce": zero, f"ce/{m}": zero.detach().clone()}
        y = targets[rows.to(targets.device)]
        z = single_modality_logits(self._model, output.features, (m,))[m]
        z_m = self.heads[m](output.features[m])
        return {"ce": F.cross_entropy(z.float(), y), f"ce/{m}": self.gamma * F.cross_entropy(z_m.float(), y),
                **output.estimator_losses(y)}

    def before_step(self, model: nn.Module) -> None:
        _dist.average_gradients(self.parameters())  # the method's heads live outside the DDP wrapper
        rows, self._rows = self._rows, None
        if rows is None:
            return
        count = _dist.all_reduce_sum(torch.tensor([float(rows.numel())], device=rows.device))
        if count.item() == 0:  # empty on every rank: no step at all (the code has no such batch)
            for p in [*unwrap(model).parameters(), *self.parameters()]:
                p.grad = None
            self._empty += 1

    # --- logging and state ----------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """Once per remixing epoch: ``assigned/<m>``, the fraction of training samples assigned to m;
        ``empty_substeps``: sub-steps with no sample (no optimizer step taken)."""
        out = dict(self._figures)
        if self._empty:
            out["empty_substeps"] = self._empty
        if self._single:
            out["single_sample_substeps"] = self._single
        self._figures, self._empty, self._single = {}, 0, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "substep": self.substep, "empty": self._empty,
                                 "single": self._single}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.substep = int(state.get("substep", 0))
        self._empty = int(state.get("empty", 0))
        self._single = int(state.get("single", 0))
        if self.heads is not None and "heads" in state:
            self.heads.load_state_dict(state["heads"])
