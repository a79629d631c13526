"""LFM: late fusion with a scheduled or learned alignment term (peers.md B13)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import encoder_dims, seeded
from ._registry import register_method

_SCHEDULES = ("heuristic", "learnable", "fixed")
_DIVERGENCES = ("js", "code")
_BATCHES = ("val", "train")
_HYPERGRADIENTS = ("unrolled", "official")

#: alpha_cls(e) = sum_i c_i e^i, fitted by the authors over 200 epochs (``getAlpha_Learnable_Fitted``,
#: ``Crema_epoch.py``); alpha_align(e) = 1 - alpha_cls(e) (the code's second list is exactly that)
HEURISTIC_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06,
                          2.23835486e-08, -5.39717505e-11)
HEURISTIC_EPOCHS = 200
ALPHA_RANGE = (0.05, 0.95)


def heuristic_alpha_cls(epoch: float, schedule_epochs: int = HEURISTIC_EPOCHS) -> float:
    """The fitted degree-5 polynomial at ``epoch`` mapped onto the authors' 200-epoch axis
    (e * 200 / schedule_epochs), held at its epoch-200 value beyond (it diverges after 200)."""
    e = min(float(epoch) * HEURISTIC_EPOCHS / schedule_epochs, float(HEURISTIC_EPOCHS))
    return sum(c * e ** i for i, c in enumerate(HEURISTIC_COEFFICIENTS))


def pairwise_divergence(logits: torch.Tensor, form: str = "js") -> torch.Tensor:
    """Mean over modality pairs (and the batch) of a divergence between softmax(z_i) and softmax(z_j),
    from an M x B x C stack of logits; for two modalities the single pair.

    ``js``: Jensen-Shannon, 1/2 [KL(p||m) + KL(q||m)], m = (p + q)/2 (the paper's term).
    ``code``: 1/2 [KL(m||p) + KL(m||q)], what the released ``Alignment`` computes
    (``F.kl_div(p.log(), m)`` is KL(m||p)). Per sample summed over classes, then averaged
    (``reduction="batchmean"``). Computed from log-probabilities, in float32 at least.
    """
    logp = F.log_softmax(_upcast(logits), dim=-1)
    pairs = torch.combinations(torch.arange(logits.shape[0], device=logits.device), 2)
    lp, lq = logp[pairs[:, 0]], logp[pairs[:, 1]]  # P x B x C
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    if form == "js":
        d = (lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1)
    elif form == "code":
        d = (lm.exp() * (lm - lp)).sum(-1) + (lm.exp() * (lm - lq)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {form!r}; choose one of {list(_DIVERGENCES)}")
    return 0.5 * d.mean()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@register_method("lfm")
class LFM(Method):
    """LFM (Yang et al., NeurIPS 2024): late-fused unimodal heads plus a JS alignment term with a scheduled weight.

    Rule (our notation). Method-owned linear heads f_m (one per modality) give z_m = f_m(h_m); the
    fused logits are z = mean_m z_m; J = Jensen-Shannon divergence between softmax(z_a) and
    softmax(z_v) (mean over all pairs for M > 2). L = 2 (alpha_cls CE(z, y) + alpha_align J),
    alpha_cls = 1 - alpha_align. ``schedule``: ``heuristic`` sets alpha_cls(e) to the authors'
    fitted degree-5 polynomial of the epoch (0.205 at 0, 0.539 at 100, 0.902 at 200);
    ``learnable`` updates alpha_align once per epoch, before the epoch's first step, on a small
    batch: alpha_align <- clip(alpha_align - lr_alpha(e) g, 0.05, 0.95), lr_alpha(e) = lr_alpha *
    0.5^(e // lr_alpha_halve_every), g the hypergradient of the CE w.r.t. alpha_align;
    ``fixed`` keeps ``alpha_align``. Prediction: z (the mean of the heads' logits).

    Paper: Yang Yang, Fengqiang Wan, Qing-Yuan Jiang, Yi Xu, NeurIPS 2024, "Facilitating
    Multimodal Classification via Dynamically Learning Modality Gap"; official code
    github.com/njustkmg/NeurIPS24-LFM (``Crema_epoch.py``, ``Crema_epoch_learnable.py``).

    Options (defaults): schedule ("heuristic": what the README's script runs); alpha_align (0.95:
    the official learnable start and the ``fixed`` value; BalanceMM starts at 0.05); divergence
    ("js" | "code": the released term 1/2 [KL(m||p) + KL(m||q)], from ``F.kl_div``'s argument
    order); schedule_epochs (200: the polynomial's epoch axis is rescaled by 200/schedule_epochs,
    so a shorter run sees the whole curve; held at its epoch-200 value beyond); lr_alpha (1e-4),
    lr_alpha_halve_every (20); alpha_batch ("val": a batch of the validation split, ours | "train":
    a batch of the training split, as the released scripts draw theirs from training data);
    alpha_batch_size (8: the official 16-sample batch halved); hypergradient ("unrolled" |
    "official").

    The learnable step. ``unrolled`` (default): the hypergradient of CE(theta - eta grad L) w.r.t.
    alpha_align after one inner step, -eta * d/dalpha(grad_theta L) . grad_theta CE, whose
    mixed second derivative (the Hessian-vector product of L in (theta, alpha) with the CE
    gradient) is exact and cheap here because L is linear in alpha: 2 (grad J - grad CE) .
    grad CE, from two first-order backward passes; eta is folded into lr_alpha.
    ``official``: what ``getAlpha_Learnable`` computes: the Hessian of the unscaled loss
    alpha_cls CE + alpha_align J in theta times grad CE (a double backward), and g = the mean of
    that product over the first parameter tensor only (here: the first encoder's first parameter).
    Both on the encoders and heads, with the model in eval mode (no BatchNorm statistics change),
    through the unwrapped model (identical on every rank: same parameters and the same seeded
    batch, so nothing to all-reduce).

    Departures: our own heads rather than the model's fusion head (the official model has two
    separate linear heads; the model's fusion head and probes stay unused); the alpha batch comes
    from the validation split and is redrawn each epoch from (seed, epoch), where the code reuses
    one fixed batch of training data; any M >= 2 (pairwise mean of J). The model's estimator
    probes, if any, still train on detached features (``estimator_losses``).

    Cost: no extra pass per step; with ``learnable``, once per epoch one forward and two backward
    passes (``unrolled``) or a double backward (``official``) on alpha_batch_size samples.
    Hooks: setup, on_epoch_start, loss, before_step, predict, unimodal_logits, log, state_dict.
    """

    predicts = "own heads"
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha_align": (0.95, 0.5, 0.8, 0.99)}

    def __init__(self, schedule: str = "heuristic", alpha_align: float = 0.95, divergence: str = "js",
                 schedule_epochs: int = HEURISTIC_EPOCHS, lr_alpha: float = 1e-4, lr_alpha_halve_every: int = 20,
                 alpha_batch: str = "val", alpha_batch_size: int = 8, hypergradient: str = "unrolled") -> None:
        super().__init__()
        for key, value, allowed in (("schedule", schedule, _SCHEDULES), ("divergence", divergence, _DIVERGENCES),
                                    ("alpha_batch", alpha_batch, _BATCHES),
                                    ("hypergradient", hypergradient, _HYPERGRADIENTS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if not _number(alpha_align) or not 0 <= alpha_align <= 1:
            raise ValueError(f"alpha_align must be a number in [0, 1], got {alpha_align!r}")
        if schedule == "learnable" and not ALPHA_RANGE[0] <= alpha_align <= ALPHA_RANGE[1]:
            raise ValueError(f"alpha_align must be in {list(ALPHA_RANGE)} with schedule 'learnable' "
                             f"(its step clips to that range), got {alpha_align!r}")
        for key, value in (("schedule_epochs", schedule_epochs), ("lr_alpha_halve_every", lr_alpha_halve_every),
                           ("alpha_batch_size", alpha_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not _number(lr_alpha) or lr_alpha < 0:
            raise ValueError(f"lr_alpha must be a number >= 0, got {lr_alpha!r}")
        self.schedule, self.divergence, self.alpha_batch, self.hypergradient = (
            schedule, divergence, alpha_batch, hypergradient)
        self.initial_alpha_align = float(alpha_align)
        self.alpha_align = float(alpha_align)
        self.schedule_epochs, self.lr_alpha, self.lr_alpha_halve_every = (
            schedule_epochs, float(lr_alpha), lr_alpha_halve_every)
        self.alpha_batch_size = alpha_batch_size
        self.last_hypergradient: float | None = None
        self.heads: nn.ModuleDict | None = None
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        if schedule == "heuristic":
            self.alpha_align = 1.0 - heuristic_alpha_cls(0, schedule_epochs)

    # --- setup ----------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._model = model
        self._modalities = tuple(inner.modalities)
        if self.heads is None:
            dims = encoder_dims(inner, self.name)
            self.heads = seeded(lambda: nn.ModuleDict({m: nn.Linear(d, inner.num_classes) for m, d in dims.items()}),
                                self.seed + 23)
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else list(self.heads.parameters())

    def _require_setup(self) -> None:
        if self.heads is None:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) first (it builds the unimodal heads)")

    # --- the weights ------------------------------------------------------------------------
    def lr_alpha_at(self, epoch: int) -> float:
        """lr_alpha halved every ``lr_alpha_halve_every`` epochs (the code halves at 20, 40, ...)."""
        return self.lr_alpha * 0.5 ** (int(epoch) // self.lr_alpha_halve_every)

    def alpha_step(self, epoch: int, gradient: float) -> float:
        """alpha_align <- clip(alpha_align - lr_alpha(epoch) * gradient, 0.05, 0.95)."""
        value = self.alpha_align - self.lr_alpha_at(epoch) * float(gradient)
        self.alpha_align = min(ALPHA_RANGE[1], max(ALPHA_RANGE[0], value))
        return self.alpha_align

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.schedule == "heuristic":
            self.alpha_align = 1.0 - heuristic_alpha_cls(epoch, self.schedule_epochs)
        elif self.schedule == "fixed":
            self.alpha_align = self.initial_alpha_align
        else:
            self.last_hypergradient = self.hypergradient_value(epoch)
            self.alpha_step(epoch, self.last_hypergradient)

    def _alpha_batch(self, epoch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        data = self.require_data()
        split = data.val if self.alpha_batch == "val" else data.train
        if split is None or len(split) == 0:
            raise RuntimeError(f"{self.name}: schedule 'learnable' draws a small batch from the "
                               f"{'validation' if self.alpha_batch == 'val' else 'training'} split, which is empty; "
                               "give MethodData a val split or set alpha_batch='train'")
        seed = self.seed * 1_000_003 + 7_919 * int(epoch) + 1
        return next(iter(data.batches(split, self.alpha_batch_size, seed=seed, limit=self.alpha_batch_size)))

    def hypergradient_value(self, epoch: int) -> float:
        """g for the learnable step (see the class docstring), on the epoch's alpha batch."""
        self._require_setup()
        inputs, targets = self._alpha_batch(epoch)
        inner = unwrap(self._model)  # not through DDP: every rank computes the same number
        params = [p for m in self._modalities for p in inner.encoder_parameters(m) if p.requires_grad]
        params += [p for p in self.parameters() if p.requires_grad]
        was_training = inner.training
        inner.eval()
        try:
            with torch.enable_grad():
                logits = _upcast(torch.stack([self.heads[m](inner.encoder(m)(inputs[m])) for m in self._modalities]))
                ce = F.cross_entropy(logits.mean(0), targets)
                j = pairwise_divergence(logits, self.divergence)
                if self.hypergradient == "unrolled":
                    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
                    g_j = torch.autograd.grad(j, params, allow_unused=True)
                    mixed = sum(((gj if gj is not None else 0) - gc).mul(gc).sum()
                                for gj, gc in zip(g_j, g_ce) if gc is not None)
                    value = -2.0 * mixed
                else:
                    total = (1 - self.alpha_align) * ce + self.alpha_align * j
                    theta = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
                    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
                    used = [(t, gc) for t, gc in zip(theta, g_ce) if t is not None and gc is not None]
                    first = torch.autograd.grad([t for t, _ in used], params[0], grad_outputs=[gc for _, gc in used],
                                                allow_unused=True)[0]
                    value = first.mean() if first is not None else torch.zeros(())
        finally:
            inner.train(was_training)
        return float(value)

    # --- per step ---------------------------------------------------------------------------
    def head_logits(self, output: ModelOutput) -> torch.Tensor:
        """M x B x C stack of the unimodal heads' logits."""
        self._require_setup()
        return torch.stack([self.heads[m](output.features[m]) for m in self._modalities])

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = _upcast(self.head_logits(output))
        ce = F.cross_entropy(logits.mean(0), targets)
        j = pairwise_divergence(logits, self.divergence)
        a = self.alpha_align
        return {"ce": 2 * (1 - a) * ce, "align": 2 * a * j, **output.estimator_losses(targets)}

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the heads live outside the DDP wrapper

    def predict(self, output: ModelOutput) -> torch.Tensor:
        return _upcast(self.head_logits(output)).mean(0)

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        self._require_setup()
        return {m: self.heads[m](output.features[m]) for m in self._modalities}

    # --- state ------------------------------------------------------------------------------
    def log(self) -> dict[str, float]:
        out = {"alpha_align": self.alpha_align, "alpha_cls": 1.0 - self.alpha_align}
        if self.last_hypergradient is not None:
            out["alpha_hypergradient"] = self.last_hypergradient
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "alpha_align": self.alpha_align, "last_hypergradient": self.last_hypergradient}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.alpha_align = float(state.get("alpha_align", self.alpha_align))
        self.last_hypergradient = state.get("last_hypergradient")
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
