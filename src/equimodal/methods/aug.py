"""AUG: sustained boosting with adaptive classifier assignment (Jiang et al., NeurIPS 2025). Spec peers_2025.md C3."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum, average_gradients
from ..models.multimodal import ModelOutput
from ._budget import check_epoch_option, share_of_budget
from ._base import Method, unwrap
from ._heads import encoder_dims, seeded
from ._registry import register_method

_LAYER1 = ("trained", "frozen")
_ENSEMBLES = ("logits", "probabilities")
_ASSIGN = ("weaker", "algorithm")


def boosting_loss(logits: list[torch.Tensor], targets: torch.Tensor, lam: float,
                  ensemble: str = "logits") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """AUG's loss of one modality with t = len(logits) classifiers (logits_j, B x C each).

    Returns (epsilon_all, epsilon_pre, residual); the last two are None when t = 1.
    ``ensemble="logits"`` (the released code): F_t = sum_j logits_j, epsilon_all = CE(F_t, y),
    epsilon_pre = CE(F_{t-1}, y), p = softmax(F_{t-1}). ``"probabilities"`` (the paper's sums of
    per-classifier probabilities, taken as means so that they stay probabilities; a sum only adds
    the constant -log t to the two CE terms): P_t = mean_{j<=t} softmax(logits_j),
    epsilon_all = -log P_t[y], epsilon_pre = -log P_{t-1}[y], p = P_{t-1}.
    residual = CE(logits_t, y - lam * y * p.detach()) = -(1 - lam p[y]) log softmax(logits_t)[y].
    """
    z = [x.float() for x in logits]
    onehot = F.one_hot(targets, z[0].shape[1]).float()
    if ensemble == "logits":
        total = torch.stack(z).sum(0)
        if len(z) == 1:
            return F.cross_entropy(total, targets), None, None
        before = total - z[-1]
        eps_all, eps_pre = F.cross_entropy(total, targets), F.cross_entropy(before, targets)
        p_before = before.detach().softmax(1)
    elif ensemble == "probabilities":
        probs = torch.stack(z).softmax(-1)  # t x B x C
        tiny = torch.finfo(probs.dtype).tiny
        eps_all = -(probs.mean(0) * onehot).sum(1).clamp_min(tiny).log().mean()
        if len(z) == 1:
            return eps_all, None, None
        p_before = probs[:-1].mean(0)
        eps_pre = -(p_before * onehot).sum(1).clamp_min(tiny).log().mean()
        p_before = p_before.detach()
    else:
        raise ValueError(f"ensemble must be one of {list(_ENSEMBLES)}, got {ensemble!r}")
    residual_target = onehot - lam * onehot * p_before
    residual = -(residual_target * F.log_softmax(z[-1], dim=1)).sum(1).mean()
    return eps_all, eps_pre, residual


def assign_classifiers(scores: torch.Tensor, sigma: float = 1.0, tau: float = 0.01, assign: str = "weaker",
                       threshold: float = 0.4) -> list[int]:
    """Indices of the modalities that get a new classifier, from the summed true-class
    confidences S_m (one per modality, summed across ranks).

    Two modalities: r = S_0 / S_1; ``assign="weaker"`` (paper text and released code): r > sigma +
    tau -> modality 1, r < sigma - tau -> modality 0; ``"algorithm"`` (the paper's Algorithm 1)
    the other way round. More modalities (the April release's rule): r_m = S_m / sum_{j != m} S_j,
    every m with r_m < ``threshold`` grows ("weaker" only).
    """
    s = scores.double()
    if s.numel() == 2:
        r = float(s[0] / s[1].clamp_min(1e-300))
        if r > sigma + tau:
            chosen = 1
        elif r < sigma - tau:
            chosen = 0
        else:
            return []
        return [chosen if assign == "weaker" else 1 - chosen]
    ratios = s / (s.sum() - s).clamp_min(1e-300)
    return [i for i, r in enumerate(ratios.tolist()) if r < threshold]


@register_method("aug")
class AUG(Method):
    """AUG (Jiang et al., NeurIPS 2025): per-modality boosted classifier stacks; the weaker modality gets more classifiers.

    Rule (our notation). Per modality m a stack of classifiers on the encoder feature h_m:
    logits_{m,j} = W2 relu(A_{m,j} h_m + b_{m,j}), with one Layer2 W2 = Linear(hidden, C) shared by
    every classifier of every modality (the released ``fc_out``) and a Layer1 A_{m,j} =
    Linear(d_m, hidden) per classifier (classifier 1: PyTorch's default init; later ones:
    Xavier-normal weight, zero bias, as the code). With t_m active classifiers
    F_m = sum_{j<=t_m} logits_{m,j} and, for t = t_m >= 2,
    L_m = CE(F_t, y) + CE(F_{t-1}, y) + CE(logits_t, y - lam * y * softmax(F_{t-1}).detach())
    (t = 1: L_m = CE(F_1, y)). Each batch takes M optimizer steps (``substeps()`` = M): in sub-step
    i only encoder i runs, L_i is back-propagated and stepped (the code's audio step, then video
    step). The true-class confidences S_m = sum_i softmax(F_m)_i[y_i] are summed over the epoch's
    training sub-steps (outputs before each step, as the code) and across ranks; at the end of
    epoch 0 and of every ``check_every``-th epoch (the code's ``(epoch + 1) % check == 0``) the
    adaptive classifier assignment (ACA) runs: two modalities, r = S_0 / S_1 (S_audio / S_video in
    the code's order): r > sigma + tau adds a classifier to modality 1, r < sigma - tau to modality 0.
    Inference: z = sum_m w_m F_m (``merge_weights``).

    Paper: Qing-Yuan Jiang, Longfei Huang, Yang Yang, NeurIPS 2025, "Rethinking Multimodal Learning
    from the Perspective of Mitigating Classification Ability Disproportion" (arXiv 2502.20120);
    official code github.com/njustkmg/NeurIPS25-AUG (``train_CREMAD.py``, ``model/AudioVideo.py``).

    Options (defaults): lam (0.5, the May release; the April release 0.2; the paper searches
    {0.1, 0.2, 0.33, 0.5, 1.0}); sigma (1.0) and tau (0.01); check_every (null: a tenth of the run's
    epochs, rounded, at least 1, as the code's t_N = epochs / 10 (20 of CREMA-D's 200 epochs); 20 when
    the loop does not tell the budget); max_classifiers (11 per modality: one plus one per check of
    a 200-epoch run); hidden (256); merge_weights (null: for two modalities 0.6 on the weaker modality
    and 0.4 on the stronger, by the method's own confidence estimate at its last ACA check (r = S_0 /
    S_1 > 1: modality 1 is the weaker), which is the code's 0.4 audio / 0.6 video on CREMA-D, where
    audio dominates; before the first check, or at r = 1, 0.4 on the first modality as the code's
    ``--merge_alpha``; equal weights for more modalities; a list: one number per modality, in the
    data's modality order, whatever their roles);
    layer1 ("trained": every added classifier is trained, as the paper says | "frozen": the added
    classifiers' Layer1 keeps its random initialisation, which is what the released code does, since
    its optimizer is built before ``add_layer`` and never sees the new layers; W2 and the encoders
    still learn); ensemble ("logits": softmax of summed logits, the code's, consistent with
    inference | "probabilities": the paper's per-classifier probability sums, as means, see
    ``boosting_loss``); assign ("weaker": the classifier goes to the weaker modality, the paper's
    text and the code | "algorithm": the paper's Algorithm 1, which gives it to the stronger one);
    threshold (0.4: more than two modalities, the April release's NVGesture rule).

    Departures: the trainer builds its optimizer once per stage, so all ``max_classifiers`` Layer1
    blocks per modality are pre-allocated in ``setup`` and registered with the optimizer; an
    inactive classifier is not in the graph, so it has no gradient and neither SGD nor Adam(W)
    touches it (no weight decay, no momentum) until ACA activates it, and its momentum starts fresh
    then. A modality already at ``max_classifiers`` does not grow further (counted in ``log``).
    Confidences use the pre-step training outputs, as the code (stale within an epoch). The
    model's own fusion head is not used (AUG is late fusion by construction). More than two
    modalities: r_m = S_m / sum_{j != m} S_j and every modality with r_m < ``threshold`` grows (the
    April release, ``train_NVGesture.py``); ``assign="algorithm"`` is refused there. The code's
    selection on the test split is not reproduced (the trainer selects on validation).

    Cost per batch: M optimizer steps, each one encoder forward/backward (the encoder work of one
    joint step) plus t_m small (d_m x hidden) classifier passes; inference grows linearly with the
    number of classifiers. Hooks: substeps, on_substep, setup, on_epoch_start, forward, loss,
    before_step, on_epoch_end, predict, unimodal_logits, log, state_dict.
    """

    predicts = "own heads"
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"check_every": (None, 2, 4, 8)}

    def __init__(self, lam: float = 0.5, sigma: float = 1.0, tau: float = 0.01, check_every: int | None = None,
                 max_classifiers: int = 11, hidden: int = 256, merge_weights: list[float] | None = None,
                 layer1: str = "trained", ensemble: str = "logits", assign: str = "weaker",
                 threshold: float = 0.4) -> None:
        super().__init__()
        for key, value in (("lam", lam), ("sigma", sigma), ("tau", tau), ("threshold", threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        check_epoch_option("check_every", check_every, 1)
        for key, value in (("max_classifiers", max_classifiers), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key, value, allowed in (("layer1", layer1, _LAYER1), ("ensemble", ensemble, _ENSEMBLES),
                                    ("assign", assign, _ASSIGN)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if merge_weights is not None:
            ok = isinstance(merge_weights, (list, tuple)) and len(merge_weights) > 0 and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in merge_weights) and sum(merge_weights) > 0
            if not ok:
                raise ValueError(f"merge_weights must be null or a list of numbers >= 0 with a positive sum, "
                                 f"got {merge_weights!r}")
        self.lam, self.sigma, self.tau, self.threshold = float(lam), float(sigma), float(tau), float(threshold)
        self.check_option = check_every  # as given: None follows the run's budget
        self.check_every = share_of_budget(check_every, 0, (1, 10), paper=20)
        self.max_classifiers, self.hidden = max_classifiers, hidden
        self.merge_weights = None if merge_weights is None else [float(w) for w in merge_weights]
        self.layer1, self.ensemble, self.assign = layer1, ensemble, assign
        self.stacks: nn.ModuleDict | None = None  # modality -> ModuleList of Layer1 blocks
        self.shared: nn.Linear | None = None  # Layer2, shared by every classifier
        self._modalities: tuple[str, ...] = ()
        self.counts: list[int] = []
        self.substep = 0
        self._scores: torch.Tensor | None = None  # [S_1..S_M, n_1..n_M] since the epoch began
        self.last_ratio: float | None = None
        self.refused = 0  # growths refused because a stack was full

    # --- setup ---------------------------------------------------------------------------
    def plan_epochs(self, epochs: int) -> list[str]:
        self.check_every = share_of_budget(self.check_option, epochs, (1, 10), paper=20)
        if self.check_every >= epochs - 1 and epochs > 1:
            return [f"aug: check_every={self.check_every} with {epochs} epochs: classifiers are assigned only "
                    "after the first epoch (no check falls before the last epoch); lower method.check_every"]
        return []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        mods = tuple(inner.modalities)
        if len(mods) > 2 and self.assign == "algorithm":
            raise ValueError(f"aug: assign='algorithm' (the paper's Algorithm 1) is defined for two modalities; "
                             f"the model has {list(mods)}; use assign='weaker'")
        if self.merge_weights is not None and len(self.merge_weights) != len(mods):
            raise ValueError(f"aug: merge_weights has {len(self.merge_weights)} numbers; the model has "
                             f"{len(mods)} modalities {list(mods)}")
        self._modalities = mods
        if self.stacks is None:
            dims, classes = encoder_dims(inner, self.name), int(inner.num_classes)
            self.stacks, self.shared = seeded(lambda: self._build(dims, classes), self.seed + 23)
            self.counts = [1] * len(mods)
        device = next(inner.parameters()).device
        self.stacks.to(device)  # frozen blocks too (attach_parameters moves only the trained ones)
        self.shared.to(device)
        self.attach_parameters(model, optimizer)

    def _build(self, dims: dict[str, int], classes: int) -> tuple[nn.ModuleDict, nn.Linear]:
        stacks = nn.ModuleDict()
        for m, d in dims.items():
            blocks = nn.ModuleList(nn.Linear(d, self.hidden) for _ in range(self.max_classifiers))
            for j, block in enumerate(blocks):
                if j > 0:  # added classifiers: Xavier-normal weight, zero bias (the code's add_layer)
                    nn.init.xavier_normal_(block.weight)
                    nn.init.zeros_(block.bias)
                    block.requires_grad_(self.layer1 == "trained")
            stacks[m] = blocks
        return stacks, nn.Linear(self.hidden, classes)

    def parameters(self) -> list[nn.Parameter]:
        if self.stacks is None:
            return []
        return [p for p in [*self.stacks.parameters(), *self.shared.parameters()] if p.requires_grad]

    def _require_setup(self) -> None:
        if self.stacks is None:
            raise RuntimeError("aug: call setup(model, optimizer) first")

    # --- the classifiers -----------------------------------------------------------------
    def classifier_logits(self, m: str, h: torch.Tensor) -> list[torch.Tensor]:
        """logits_{m,j} for the active classifiers j = 1..t_m of modality m."""
        t = self.counts[self._modalities.index(m)]
        return [self.shared(F.relu(block(h))) for block in list(self.stacks[m])[:t]]

    def modality_logits(self, m: str, h: torch.Tensor) -> torch.Tensor:
        """F_m = sum of the active classifiers' logits."""
        return torch.stack(self.classifier_logits(m, h)).sum(0)

    # --- schedule ------------------------------------------------------------------------
    def substeps(self) -> int:
        return max(1, len(self._modalities))

    def on_substep(self, index: int) -> None:
        self.substep = int(index)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.substep = 0
        self._scores = None  # checkpoints fall on epoch ends, so an epoch always starts here

    # --- per step ------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """Sub-step i: only encoder i runs; logits = F_i."""
        self._require_setup()
        m = self._modalities[self.substep]
        h = unwrap(model).encoder(m)(inputs[m])
        z = self.modality_logits(m, h)
        return ModelOutput(logits=z, unimodal_logits={m: z}, features={m: h})

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        self._require_setup()
        i = self.substep
        m = self._modalities[i]
        logits = self.classifier_logits(m, output.features[m])
        eps_all, eps_pre, residual = boosting_loss(logits, targets, self.lam, self.ensemble)
        terms = {f"all/{m}": eps_all}
        if eps_pre is not None:
            terms[f"pre/{m}"] = eps_pre
            terms[f"residual/{m}"] = residual
        if eps_all.requires_grad:  # a training step: S_m and the sample count, before the step
            with torch.no_grad():
                total = torch.stack([z.detach().float() for z in logits]).sum(0)
                s = total.softmax(1).gather(1, targets.view(-1, 1)).sum()
                n = len(self._modalities)
                row = torch.zeros(2 * n, device=s.device)
                row[i], row[n + i] = s, float(targets.numel())
                self._scores = row if self._scores is None else self._scores + row.to(self._scores.device)
        return terms

    def before_step(self, model: nn.Module) -> None:
        self._require_setup()
        m = self._modalities[self.substep]
        # the forward went around any DDP wrapper: average this encoder's and the classifiers' gradients
        average_gradients([*unwrap(model).encoder_parameters(m), *self.parameters()])

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """ACA after epoch 0 and after every ``check_every``-th epoch, from this epoch's confidences;
        never after the run's last validation (``metrics["final"]``): a classifier added then would
        be scored on test untrained and unvalidated (the official code scores before adding it)."""
        self._require_setup()
        if metrics.get("final") or not (epoch == 0 or (epoch + 1) % self.check_every == 0):
            return
        n = len(self._modalities)
        scores = self._scores.clone() if self._scores is not None else torch.zeros(2 * n)
        scores = all_reduce_sum(scores.to(self.shared.weight.device)).cpu()
        if bool((scores[n:] == 0).any()):
            return  # some modality was never trained this epoch (no decision without its confidence)
        s = scores[:n]
        if n == 2:
            self.last_ratio = float(s[0] / s[1].clamp_min(1e-30))
        for k in assign_classifiers(s, self.sigma, self.tau, self.assign, self.threshold):
            if self.counts[k] < self.max_classifiers:
                self.counts[k] += 1
            else:
                self.refused += 1

    # --- inference -----------------------------------------------------------------------
    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        self._require_setup()
        return {m: self.modality_logits(m, output.features[m]) for m in self._modalities}

    def fusion_weights(self) -> list[float]:
        n = len(self._modalities)
        if self.merge_weights is not None:
            w = self.merge_weights
        elif n == 2:  # 0.6 on the weaker by the last confidence check (the code: on video, CREMA-D's weak one)
            w = [0.6, 0.4] if self.last_ratio is not None and self.last_ratio < 1 else [0.4, 0.6]
        else:
            w = [1.0] * n
        return [x / sum(w) for x in w]

    def predict(self, output: ModelOutput) -> torch.Tensor:
        uni = self.unimodal_logits(output)
        return sum(w * uni[m].float() for w, m in zip(self.fusion_weights(), self._modalities))

    # --- state ---------------------------------------------------------------------------
    def log(self) -> dict[str, float]:
        out = {f"classifiers/{m}": float(t) for m, t in zip(self._modalities, self.counts)}
        if self.last_ratio is not None:
            out["aug/ratio"] = self.last_ratio
        if self.refused:
            out["aug/refused"] = float(self.refused)
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "substep": self.substep, "counts": list(self.counts),
                                 "scores": self._scores,
                                 "last_ratio": self.last_ratio, "refused": self.refused}
        if self.stacks is not None:
            state["stacks"] = self.stacks.state_dict()
            state["shared"] = self.shared.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.substep = int(state.get("substep", 0))
        self.counts = [int(t) for t in state.get("counts", self.counts)]
        self._scores = state.get("scores")
        self.last_ratio = state.get("last_ratio")
        self.refused = int(state.get("refused", 0))
        if "stacks" in state and self.stacks is not None:
            self.stacks.load_state_dict(state["stacks"])
            self.shared.load_state_dict(state["shared"])
