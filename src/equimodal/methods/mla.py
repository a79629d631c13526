"""MLA: alternating unimodal adaptation through one shared head (peers.md B8)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum, average_gradients, world_size
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import encoder_dims, seeded
from ._registry import register_method

_PROJECTORS = ("owm", "official")
_FUSIONS = ("entropy", "fixed")
_SCOPES = ("batch", "sample")
_SOFTMAX = ("class", "batch_axis")


def update_projector(P: torch.Tensor, r: torch.Tensor, a: float, form: str = "owm") -> torch.Tensor:
    """One projector update from the mean feature ``r`` (d,) of the modality just trained.

    k = P r; ``owm``: P - k k^T / (a + r.k) (a scalar denominator, OWM / recursive least squares);
    ``official``: P - (k k^T) / (a + k r^T) element-wise (a d x d denominator, as the released
    ``GSPlugin.before_update`` writes it). Then P / ||P||_F. Computed in float32.
    """
    P, r = P.float(), r.float()
    k = P @ r
    if form == "owm":
        denominator = a + torch.dot(r, k)
    elif form == "official":
        denominator = a + torch.outer(k, r)
    else:
        raise ValueError(f"unknown projector form {form!r}; choose one of {list(_PROJECTORS)}")
    P = P - torch.outer(k, k) / denominator
    return P / torch.linalg.matrix_norm(P)


def entropy_weights(logits: torch.Tensor, scope: str = "batch", softmax: str = "class") -> torch.Tensor:
    """Fusion weights w_m = exp(max_j E_j - E_m) / sum_j exp(max_j E_j - E_j) = softmax(-E) over
    modalities, from an M x B x C stack of logits; returned M x 1 x 1 (``batch``) or M x B x 1
    (``sample``), ready to multiply the stack.

    E is the prediction entropy -sum p log p: ``softmax="class"`` takes p over the classes (the
    paper's prediction entropy); ``"batch_axis"`` over the batch axis as the released code does
    (``F.softmax(output, dim=0)``). ``scope="batch"`` sums E over the batch (one weight per
    modality and batch, the released code); ``"sample"`` keeps one weight per sample (BalanceMM).
    """
    dim = -1 if softmax == "class" else 1
    logp = F.log_softmax(logits.float(), dim=dim)
    entropy = -(logp.exp() * logp).sum(-1)  # M x B
    if scope == "batch":
        entropy = entropy.sum(1, keepdim=True)
    return torch.softmax(-entropy, dim=0).unsqueeze(-1)


@register_method("mla")
class MLA(Method):
    """MLA (Zhang et al., CVPR 2024): one modality per step through a shared head, guarded by an OWM projector.

    Rule (our notation). One head H = Linear(d, C), owned by the method, shared by all M
    modalities (every encoder must output d features). Each batch takes M optimizer steps
    (``substeps()`` = M); in sub-step i only encoder i runs: z = H(h_i), L = CE(z, y), backward,
    then in ``before_step`` the gradient G of H's weight is REPLACED by G P^T, where the projector
    P (d x d, start I) is first updated from r = batch mean of h_i (all-reduced across ranks) and
    a = 0.1^(1 + b/n) (b: batch index in the epoch, n: batches per epoch):
    k = P r; P <- P - k k^T / (a + r.k); P <- P / ||P||_F. The very first update of a run changes
    neither P nor G. Inference: z = sum_m w_m H(h_m), w_m = softmax(-E)_m with E_m the prediction
    entropy of H(h_m) (``fusion="entropy"``) or fixed weights (``fusion="fixed"``).

    Paper: Xiaohui Zhang, Jaehong Yoon, Mohit Bansal, Huaxiu Yao, CVPR 2024, "Multimodal
    Representation Learning by Alternating Unimodal Adaptation"; official code
    github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation
    (``main.py --gs_flag --dynamic``, ``utils/utils.py``).

    Options (defaults): projector ("owm": the scalar denominator a + r.k of OWM, which keeps P
    symmetric and never divides by an entry near zero | "official": the released code's
    element-wise division by the d x d matrix a + k r^T); project_head (True; False gives what the
    released code actually runs: its parameter-name check ``"module.weight"`` never matches a bare
    Linear, so its projection is inactive); alpha (None: a = 0.1^(1 + b/n), n = ceil(len(train) /
    (batch size x ranks)) with the batch size taken from the epoch's first batch; a number: a
    constant a, for loops that attach no data); fusion ("entropy" | "fixed"); entropy ("batch": one
    entropy per modality per evaluation batch, summed over its samples, as the released code |
    "sample": per sample, BalanceMM); entropy_softmax ("class": the paper's entropy over classes |
    "batch_axis": the released code's softmax over dim=0); fixed_weights (None = equal; else one
    number per modality, normalised to sum 1).

    Departures: the projection replaces H's weight gradient (BalanceMM's port adds G P^T to G);
    H's bias gradient is not projected (as in the code); with ``entropy="batch"`` a sample's
    prediction depends on the other samples of its evaluation batch (the trainer evaluates in
    batches of 256) and the summed entropies make the weights close to one-hot for large batches,
    as in the released code; one projector is shared by all modalities (the code's single
    ``Pl``). Any M >= 2. The forward calls the encoder through the model contract and so bypasses a
    DDP wrapper: ``before_step`` averages the gradients of that encoder and of H across ranks.

    Cost per batch: M optimizer steps, each one encoder forward/backward (the same encoder work as
    one joint step), plus one d x d projector update (O(d^2)) and a C x d x d product per step.
    Hooks: substeps, on_substep, setup, on_epoch_start, forward, loss, before_step, predict,
    unimodal_logits, state_dict.
    """

    predicts = "own heads"
    min_modalities = 2
    modifies_gradients = True

    def __init__(self, projector: str = "owm", project_head: bool = True, alpha: float | None = None,
                 fusion: str = "entropy", entropy: str = "batch", entropy_softmax: str = "class",
                 fixed_weights: list[float] | None = None) -> None:
        super().__init__()
        for key, value, allowed in (("projector", projector, _PROJECTORS), ("fusion", fusion, _FUSIONS),
                                    ("entropy", entropy, _SCOPES), ("entropy_softmax", entropy_softmax, _SOFTMAX)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if not isinstance(project_head, bool):
            raise ValueError(f"project_head must be true or false, got {project_head!r}")
        if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
                                  or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a number > 0 or null (a = 0.1^(1 + batch/batches)), got {alpha!r}")
        if fixed_weights is not None:
            ok = isinstance(fixed_weights, (list, tuple)) and len(fixed_weights) > 0 and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in fixed_weights) and sum(fixed_weights) > 0
            if not ok:
                raise ValueError(f"fixed_weights must be null or a list of numbers >= 0 with a positive sum, "
                                 f"got {fixed_weights!r}")
        self.projector, self.project_head = projector, project_head
        self.alpha = None if alpha is None else float(alpha)
        self.fusion, self.entropy, self.entropy_softmax = fusion, entropy, entropy_softmax
        self.fixed_weights = None if fixed_weights is None else [float(w) for w in fixed_weights]
        self.head: nn.Linear | None = None
        self.P: torch.Tensor | None = None
        self.updates = 0          # head updates so far in the run (the first one is not projected)
        self.batch_in_epoch = 0   # b in a = 0.1^(1 + b/n)
        self.batch_size: int | None = None  # this epoch's first batch size (gives n)
        self.substep = 0
        self._modalities: tuple[str, ...] = ()
        self._stats: torch.Tensor | None = None  # [sum of h over the batch (d), count] since the last step
        self.last_a: float | None = None

    # --- setup ----------------------------------------------------------------------------
    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        super().check_modalities(modalities)
        if self.fixed_weights is not None and len(self.fixed_weights) != len(modalities):
            raise ValueError(f"fixed_weights has {len(self.fixed_weights)} numbers; data.modalities has "
                             f"{len(modalities)} ({list(modalities)}): give one weight per modality")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self.check_modalities(inner.modalities)
        self._modalities = tuple(inner.modalities)
        dims = encoder_dims(inner, self.name)
        if len(set(dims.values())) != 1:
            raise ValueError(f"{self.name}: one head is shared by all modalities, so every encoder must output "
                             f"the same feature size; got out_dim {dims}")
        if self.head is None:
            d = next(iter(dims.values()))
            self.head = seeded(lambda: nn.Linear(d, inner.num_classes), self.seed + 17)
            self.P = torch.eye(d)
        self.attach_parameters(model, optimizer)
        self.P = self.P.to(self.head.weight.device)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.head is None else list(self.head.parameters())

    def _require_setup(self) -> None:
        if self.head is None:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) first (it builds the shared head)")

    # --- alternation ----------------------------------------------------------------------
    def substeps(self) -> int:
        return max(1, len(self._modalities))

    def on_substep(self, index: int) -> None:
        if self._modalities and not 0 <= index < len(self._modalities):
            raise ValueError(f"{self.name}: sub-step {index} out of range; "
                             f"there are {len(self._modalities)} modalities")
        self.substep = int(index)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.batch_in_epoch = 0
        self.batch_size = None
        self.substep = 0

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """Sub-step i: only encoder i runs; logits = H(h_i)."""
        self._require_setup()
        m = self._modalities[self.substep]
        h = unwrap(model).encoder(m)(inputs[m])
        z = self.head(h)
        return ModelOutput(logits=z, unimodal_logits={m: z}, features={m: h})

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        self._require_setup()
        m = self._modalities[self.substep]
        h = output.features[m]
        z = output.logits if set(output.features) == {m} else self.head(h)  # also takes a full model output
        if z.requires_grad:  # a training step: record r's statistics and the epoch's batch size
            stats = torch.cat([h.detach().float().sum(0), h.new_tensor([h.shape[0]], dtype=torch.float32)])
            self._stats = stats if self._stats is None else self._stats + stats
            if self.batch_size is None:
                self.batch_size = int(targets.numel())
        return {f"ce/{m}": F.cross_entropy(z.float(), targets)}

    def current_a(self) -> float:
        """a = 0.1^(1 + b/n), or the constant ``alpha``."""
        if self.alpha is not None:
            return self.alpha
        data = self.data
        if data is None or self.batch_size is None:
            raise RuntimeError(f"{self.name}: a = 0.1^(1 + batch/batches) needs the number of batches per epoch: "
                               "call method.attach_data(MethodData(train=...)) before setup(), or set the "
                               "option alpha to a constant")
        n = max(1, math.ceil(len(data.train) / (self.batch_size * world_size())))
        return 0.1 ** (1 + self.batch_in_epoch / n)

    def before_step(self, model: nn.Module) -> None:
        self._require_setup()
        m = self._modalities[self.substep]
        # the forward went around any DDP wrapper: average this encoder's and H's gradients here
        average_gradients([*unwrap(model).encoder_parameters(m), *self.parameters()])
        if self._stats is None:
            raise RuntimeError(f"{self.name}.before_step() called with no loss() since the last step; "
                               "call method.loss(method.forward(model, inputs), targets) first")
        stats = all_reduce_sum(self._stats)
        self._stats = None
        g = self.head.weight.grad
        if self.project_head and self.updates > 0 and g is not None:
            r = stats[:-1] / stats[-1].clamp_min(1)
            self.last_a = self.current_a()
            self.P = update_projector(self.P, r.to(self.P.device), self.last_a, self.projector)
            g.copy_((g.float() @ self.P.T).to(g.dtype))  # replace, not add
        self.updates += 1
        if self.substep == len(self._modalities) - 1:
            self.batch_in_epoch += 1

    # --- inference ------------------------------------------------------------------------
    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        self._require_setup()
        return {m: self.head(output.features[m]) for m in self._modalities}

    def fusion_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """w (M x 1 x 1 or M x B x 1) for an M x B x C stack of H(h_m)."""
        if self.fusion == "fixed":
            n = logits.shape[0]
            w = torch.tensor(self.fixed_weights or [1.0] * n, dtype=torch.float32, device=logits.device)
            return (w / w.sum()).view(-1, 1, 1)
        return entropy_weights(logits, self.entropy, self.entropy_softmax)

    def predict(self, output: ModelOutput) -> torch.Tensor:
        logits = torch.stack([z.float() for z in self.unimodal_logits(output).values()])
        return (self.fusion_weights(logits) * logits).sum(0)

    # --- state ----------------------------------------------------------------------------
    def log(self) -> dict[str, float]:
        return {"mla/a": self.last_a} if self.last_a is not None else {}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "updates": self.updates, "batch_in_epoch": self.batch_in_epoch,
                 "batch_size": self.batch_size, "substep": self.substep, "last_a": self.last_a}
        if self.head is not None:
            state["head"] = self.head.state_dict()
            state["P"] = self.P
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.updates = int(state.get("updates", 0))
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.batch_size = state.get("batch_size")
        self.substep = int(state.get("substep", 0))
        self.last_a = state.get("last_a")
        if "head" in state and self.head is not None:
            self.head.load_state_dict(state["head"])
            self.P = state["P"].to(self.head.weight.device, torch.float32)
