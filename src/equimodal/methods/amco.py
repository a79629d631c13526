"""AMCo: adaptive per-class masking of the dependent modality's logits, with co-optimisation. peers.md B16."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum, average_gradients, rank
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import seeded
from ._registry import register_method

_SCHEDULES = ("epoch", "step")


def mask_ratio(t: float, eps: float) -> float:
    """p_t = sin(pi/2 * min(eps, t) / eps): 0 at t = 0, 1 from t = eps on."""
    return math.sin(math.pi / 2 * min(eps, t) / eps)


def masked_count(p: float, num_classes: int) -> int:
    """How many of ``num_classes`` logits a ratio p masks: floor(p * C), with a 1e-9 tolerance so
    that p = sin(pi/6) = 0.49999999999999994 masks 3 of 6 classes, not 2."""
    return int(p * num_classes + 1e-9)


def modality_masses(unimodal_logits: list[torch.Tensor]) -> torch.Tensor:
    """Per modality, the softmax mass its logits hold in a softmax over all modalities' logits
    concatenated (B x N*C), summed over the batch (N-vector; divide by B for the mean)."""
    z = torch.stack([u.detach().float() for u in unimodal_logits], dim=1)  # B x N x C
    p = z.flatten(1).softmax(dim=1).view_as(z)
    return p.sum(dim=(0, 2))


@register_method("amco")
class AMCo(Method):
    """AMCo (Zhou et al., ICASSP 2023): mask random classes of the dependent modality's logits; co-train fused and unimodal.

    Rule (ours, N modalities). z_m: the model's unimodal logits (``output.unimodal_logits``). A
    modality is *dependent* when its mean softmax mass exceeds sigma: with the softmax taken over
    all modalities' logits concatenated (B x N*C), M_m = mean over the batch of the mass in m's C
    entries (sum_m M_m = 1). In a step, each modality found dependent at the previous step has its
    logits multiplied by a 0/1 class mask with floor(p_t * C) zeros at random classes,
    p_t = sin(pi/2 * min(eps, t) / eps): z~_m = z_m * mask (others z~_m = z_m). The fused
    prediction is an extra linear layer A (C -> C, owned by the method) on the summed logits,
    y^ = A(sum_m z~_m), and the loss co-optimises it with every modality:
    L = CE(A(sum_m z~_m), y) + sum_m CE(z~_m, y). M_m is measured on the z~_m of the step (after
    masking, as in the port), all-reduced across ranks, and decides the next step's dependent
    set; the set is empty at the start of every epoch. Evaluation: A(sum_m z_m), no mask.
    The ramp variable t: ``schedule="epoch"`` (default) t = sum_{k<=e} k/10 = e(e+1)/20 in epoch e,
    fixed within the epoch (xushaoxuan123/new-imbalance_leaderboard, the GeWu-Lab leaderboard code
    the port came from); ``schedule="step"`` (GeWu-Lab/BalanceBenchmark port): t restarts at 0 each
    epoch and grows by e/10 after every step. With eps = 0.3 both reach p = 1 (every class of
    the dependent modality masked) quickly: "epoch" from epoch 2 on (p = 0, 0.5, 1, ...), "step"
    within 3/e steps of each epoch e >= 1 (and never in epoch 0).

    Paper: Ying Zhou, Xuefeng Liang, Shiquan Zheng, Huijun Xuan, Takatsune Kumada, "Adaptive Mask
    Co-Optimization for Modal Dependence in Multimodal Learning", ICASSP 2023. No official code
    found; rule taken from the BalanceBenchmark port (``balancemm/trainer/AMCo_trainer.py``,
    ``BaseClassifierAMCoModel`` in ``balancemm/models/avclassify_model.py``). Defaults: sigma 0.5,
    eps 0.3 (port). With sigma >= 0.5 at most one modality is dependent; with sigma < 0.5 several
    may be, and all get the same mask (as in the port).

    Departures. The port's mask is expanded to 2 rows, which only broadcasts against a batch of 2
    (a bug not copied: one class mask for the whole step, every sample). The mask comes from a
    generator seeded by (seed, step, rank), not NumPy's global RNG; one mask per step as in the port
    (the leaderboard code draws one per epoch). floor(p C) has a 1e-9
    tolerance (see ``masked_count``). The masses are all-reduced before the decision. No
    modulation window (the port's 0..80 epochs covers whole runs). The leaderboard code masks a
    U-dimensional projection of the features instead (rescaled by 1/(1-p), a shared classifier
    for fused and unimodal outputs) and, through a typo, never masks its second modality: not
    offered. The unimodal logits must carry gradients to the encoders: estimator "exact" (concat,
    sum, late fusion) or "mask"; the probe estimator (detached features) is refused with a named
    error at the first loss. A is initialised like nn.Linear, from seed + 17.

    Cost per step: no extra forward or backward pass (N + 1 cross-entropies, one C x C layer).
    Hooks: setup, on_epoch_start, loss, before_step, predict, log.
    """

    needs_unimodal_logits = True
    modifies_gradients = False
    predicts = "mixed"
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"sigma": (0.5, 0.3, 0.7, 0.9)}

    def __init__(self, sigma: float = 0.5, eps: float = 0.3, schedule: str = "epoch") -> None:
        super().__init__()
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma < 1:
            raise ValueError(f"sigma must be a number in (0, 1), got {sigma!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")
        self.sigma = float(sigma)
        self.eps = float(eps)
        self.schedule = schedule
        self.step = 0        # optimizer steps so far (seeds the masks)
        self.epoch_step = 0  # optimizer steps in the current epoch (the "step" schedule)
        self.head: nn.Linear | None = None
        self._modalities: tuple[str, ...] = ()
        self._num_classes = 0
        self.dependent: torch.Tensor | None = None  # N booleans, decided at the previous step
        self._stats: torch.Tensor | None = None     # [mass_1..N, samples] since the last step
        self._trace: torch.Tensor | None = None     # [sum mass_1..N, dependent_1..N, sum p, steps]
        self._mask_cache: tuple[int, torch.Tensor] | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._modalities = tuple(inner.modalities)
        self._num_classes = int(inner.num_classes)
        if self.head is None:
            c = self._num_classes
            self.head = seeded(lambda: nn.Linear(c, c), self.seed + 17)
        if self.dependent is None:
            self.dependent = torch.zeros(len(self._modalities), dtype=torch.bool)
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.head is None else list(self.head.parameters())

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.epoch_step = 0
        if self.dependent is not None:
            self.dependent = torch.zeros_like(self.dependent)  # the port starts each epoch with none

    # --- the mask ------------------------------------------------------------------------
    def ramp_time(self) -> float:
        e = self.epoch
        if self.schedule == "epoch":
            return e * (e + 1) / 20
        return self.epoch_step * e / 10

    def current_ratio(self) -> float:
        return mask_ratio(self.ramp_time(), self.eps)

    def class_mask(self, device: torch.device) -> torch.Tensor:
        """This step's C-vector of ones with floor(p_t C) zeros at random classes (one per step,
        shared by every micro-batch and sample; seeded by (seed, step, rank))."""
        if self._mask_cache is not None and self._mask_cache[0] == self.step:
            return self._mask_cache[1].to(device)
        c = self._num_classes
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) * 257 + rank())
        mask = torch.ones(c)
        mask[torch.randperm(c, generator=gen)[:masked_count(self.current_ratio(), c)]] = 0
        self._mask_cache = (self.step, mask)
        return mask.to(device)

    # --- loss and prediction -------------------------------------------------------------
    def _unimodal(self, output: ModelOutput) -> list[torch.Tensor]:
        if output.estimator == "probe":
            raise ValueError(f"{self.name}: the probe estimator's unimodal logits read detached features, so "
                             "masking them cannot train the encoders; use a fusion with an exact decomposition "
                             "(concat, sum, late) or model.estimator='mask'")
        return [output.unimodal_logits[m].float() for m in self._modalities]

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.head is None:
            raise RuntimeError(f"{self.name}: call setup(model) before loss()")
        logits = self._unimodal(output)
        if self.dependent.any():
            mask = self.class_mask(logits[0].device)
            logits = [z * mask if d else z for z, d in zip(logits, self.dependent.tolist())]
        fused = self.head(torch.stack(logits).sum(0))
        terms = {"ce": F.cross_entropy(fused, targets)}
        terms.update({f"ce/{m}": F.cross_entropy(z, targets) for m, z in zip(self._modalities, logits)})
        if output.logits.requires_grad:  # training step: this micro-batch's softmax masses
            stats = torch.cat([modality_masses(logits), logits[0].new_tensor([targets.numel()])])
            self._stats = stats if self._stats is None else self._stats + stats
        return terms

    def predict(self, output: ModelOutput) -> torch.Tensor:
        return self.head(torch.stack(self._unimodal(output)).sum(0))

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # A lives outside the DDP wrapper
        local, self._stats = self._stats, None
        if local is None:
            raise RuntimeError(f"{self.name}: before_step() needs this step's softmax masses; "
                               "call method.loss(output, targets) on every micro-batch before it")
        totals = all_reduce_sum(local)  # [mass_1..N, samples] summed over micro-batches and ranks
        masses = totals[:-1] / totals[-1]
        p = masses.new_tensor([self.current_ratio() if bool(self.dependent.any()) else 0.0, 1.0])
        row = torch.cat([masses, self.dependent.to(masses), p])
        self._trace = row if self._trace is None else self._trace + row
        self.dependent = (masses > self.sigma).cpu()
        self.step += 1
        self.epoch_step += 1

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        if self._trace is None:
            return {}
        n = len(self._modalities)
        t = self._trace.tolist()
        self._trace = None
        steps = t[-1]
        out = {f"mass/{m}": t[i] / steps for i, m in enumerate(self._modalities)}
        out.update({f"dependent/{m}": t[n + i] / steps for i, m in enumerate(self._modalities)})
        out["mask_ratio"] = t[2 * n] / steps
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                 "dependent": self.dependent, "trace": self._trace}
        if self.head is not None:
            state["head"] = self.head.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.epoch_step = int(state.get("epoch_step", 0))
        if state.get("dependent") is not None:
            self.dependent = state["dependent"].clone().cpu()
        self._trace = state.get("trace")
        self._mask_cache = None
        if "head" in state and self.head is not None:
            self.head.load_state_dict(state["head"])
