"""ReconBoost: modality-alternating boosting with reconcilement (Hua et al., ICML 2024). Peer spec B9."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, Stage, unwrap
from ._heads import encoder_dims, seeded, set_trainable
from ._registry import register_method

LEARN, CORRECT = "learn", "correct"


def reconcile_loss(logits: torch.Tensor, others: torch.Tensor, targets: torch.Tensor, weight1: float,
                   weight2: float, class_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of ReconBoost's learner objective, each averaged over the batch:

    fit = -w1 * mean_i sum_c y_ic log softmax(f)_ic            (the learner's own cross-entropy)
    reconcile = w2 * mean_i sum_c y_ic softmax(F_-m)_ic log softmax(f)_ic
    ``others`` is F_-m, the ensemble without this learner (detached here). Per sample the sum is
    -(w1 - w2 q_i) log p_i[y_i] with q_i = softmax(F_-m)_i[y_i]: samples the others already solve
    weigh less. ``class_mean`` divides both by the number of classes C (the released code's
    ``.mean(-1)`` over classes instead of a sum)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    onehot = F.one_hot(targets, logits.shape[1]).to(log_p.dtype)
    q = F.softmax(others.detach().float(), dim=1)
    scale = 1.0 / logits.shape[1] if class_mean else 1.0
    fit = -weight1 * scale * (onehot * log_p).sum(1).mean()
    reconcile = weight2 * scale * (onehot * q * log_p).sum(1).mean()
    return fit, reconcile


@register_method("reconboost")
class ReconBoost(Method):
    """ReconBoost (Hua et al., ICML 2024): alternate modalities, boost each against the others, then correct jointly.

    Learners f_m = g_m(h_m): the model's encoder m and a linear head g_m owned by the method
    (so any fusion works; the model's fusion head is not used). Ensemble F = beta * sum_m f_m, beta
    learnable (init ``boost_rate``); ``predict`` is F and ``unimodal_logits`` are the f_m.
    Round t (t = 1..``rounds``) picks m = modalities[(t - 1) mod M] and runs two stages, each with
    a fresh optimizer as in the released code:
    ``round<t>-learn`` (``epochs_per_stage`` epochs): only encoder m and g_m train, on
    L = -w1 mean(y . log softmax f_m) + w2 mean(y . softmax(F_-m).detach() . log softmax f_m)
    + alpha MSE(softmax f_m, softmax f_prev) (rounds >= 2), with F_-m = beta * sum_{k != m} f_k and
    f_prev the learner trained in the previous round (its output is the fixed target). The last
    term is the paper's memory consolidation: with ``ga_gradient`` true (default, the paper) its
    gradient reaches f_m; false reproduces the released code, which detaches both inputs so the
    term is logged but has no effect.
    ``round<t>-correct`` (``correct_epochs`` epochs): every encoder, every g_m and beta train on CE(F, y).
    Paper: Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality Reconcilement",
    ICML 2024; official code huacong/ReconBoost (``train.py``, ``models/dynamic_net.py``); also
    ported in GeWu-Lab/BalanceBenchmark (``ReconBoost_trainer.py``).
    Defaults: weight1 5 (the code's CREMA-D value; 4 for AVE), weight2 1, alpha 0.5, boost_rate 1;
    rounds 6, epochs_per_stage 1, correct_epochs 1 (BalanceBenchmark's ``T_epochs`` = 1), so the
    method runs rounds * (epochs_per_stage + correct_epochs) = 12 epochs whatever ``train.epochs``
    is. The released recipe uses 4 + 4 epochs per round and up to 1000 rounds, from pretrained
    unimodal checkpoints (``--use_pretrain``).
    Departures: per-modality linear heads, where the released code shares one MLP head across
    modalities (``common_space``; ``shared_head`` true gives a shared linear head, which the learn
    phase then also trains, changing every learner); every learner exists (randomly initialised)
    from round 1, so F_-m is never empty (the code without pretraining uses a random constant
    there, i.e. a uniform softmax); ``class_mean`` false sums over classes (the paper's
    cross-entropy), true gives the code's 1/C factor on the first two terms; modalities cycle in
    the model's order for any M >= 2 (the code hard-codes audio, visual or three named
    modalities); the frozen encoders run in training mode during the learn phase, as in the code.
    Cost per step: the model's forward computes every encoder; in the learn phase only encoder m
    is back-propagated. Hooks: stages, on_stage_start, setup, loss, before_step (averages the
    heads' and beta's gradients across ranks), predict, unimodal_logits, log, log_stage, state_dict.
    """

    predicts = "own heads"
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (0.5, 0.25, 1.0, 2.0)}

    def __init__(self, rounds: int = 6, epochs_per_stage: int = 1, correct_epochs: int = 1, weight1: float = 5.0,
                 weight2: float = 1.0, alpha: float = 0.5, boost_rate: float = 1.0, ga_gradient: bool = True,
                 class_mean: bool = False, shared_head: bool = False) -> None:
        super().__init__()
        for key, value in (("rounds", rounds), ("epochs_per_stage", epochs_per_stage),
                           ("correct_epochs", correct_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key, value in (("weight1", weight1), ("weight2", weight2), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        if isinstance(boost_rate, bool) or not isinstance(boost_rate, (int, float)) or not boost_rate > 0:
            raise ValueError(f"boost_rate (the initial beta) must be a number > 0, got {boost_rate!r}")
        for key, value in (("ga_gradient", ga_gradient), ("class_mean", class_mean), ("shared_head", shared_head)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        self.rounds, self.epochs_per_stage, self.correct_epochs = rounds, epochs_per_stage, correct_epochs
        self.weight1, self.weight2, self.alpha = float(weight1), float(weight2), float(alpha)
        self.boost_rate, self.ga_gradient = float(boost_rate), ga_gradient
        self.class_mean, self.shared_head = class_mean, shared_head
        self.round, self.phase = 1, LEARN
        self.heads: nn.ModuleDict | None = None
        self.beta: nn.Parameter | None = None
        self._model: nn.Module | None = None

    # --- schedule ------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage(f"round{t}-{phase}", epochs) for t in range(1, self.rounds + 1)
                for phase, epochs in ((LEARN, self.epochs_per_stage), (CORRECT, self.correct_epochs))]

    def on_stage_start(self, stage: str, resumed: bool = False) -> None:
        head, _, phase = stage.partition("-")
        if not (head.startswith("round") and head[5:].isdigit() and phase in (LEARN, CORRECT)):
            raise ValueError(f"reconboost stages are named round<t>-{LEARN} / round<t>-{CORRECT}, got {stage!r}")
        self.round, self.phase = int(head[5:]), phase
        if self._model is not None:
            self._apply_freezing()

    def modality(self, round_: int | None = None) -> str:
        """The modality whose learner round ``round_`` (default: the current one) trains."""
        mods = self._modalities()
        return mods[((self.round if round_ is None else round_) - 1) % len(mods)]

    def _modalities(self) -> tuple[str, ...]:
        if self._model is None:
            raise RuntimeError("reconboost: call setup(model, optimizer) first")
        return tuple(self._model.modalities)

    # --- setup ---------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = unwrap(model)
        if self.heads is None:
            dims = encoder_dims(inner, self.name)
            classes = inner.num_classes
            if self.shared_head:
                if len(set(dims.values())) != 1:
                    raise ValueError(f"reconboost: shared_head needs encoders with one feature size, got {dims}")
                build = lambda: nn.ModuleDict({"shared": nn.Linear(next(iter(dims.values())), classes)})  # noqa: E731
            else:
                build = lambda: nn.ModuleDict({m: nn.Linear(d, classes) for m, d in dims.items()})  # noqa: E731
            self.heads = seeded(build, self.seed + 11)
            self.beta = nn.Parameter(torch.tensor(self.boost_rate))
        self.attach_parameters(model, optimizer)
        self._apply_freezing()

    def head(self, modality: str) -> nn.Module:
        return self.heads["shared" if self.shared_head else modality]

    def _apply_freezing(self) -> None:
        """Learn phase: encoder m and its head only (plus the shared head). Correct phase: everything."""
        current = self.modality() if self.phase == LEARN else None
        for m in self._model.modalities:
            trainable = current is None or m == current
            set_trainable(self._model.encoder(m), trainable)
            if not self.shared_head:
                set_trainable(self.head(m), trainable)
        if self.shared_head:
            set_trainable(self.heads, True)
        self.beta.requires_grad_(self.phase == CORRECT)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.heads.parameters(), self.beta] if self.heads is not None else []

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # heads and beta live outside the DDP wrapper

    # --- the learners --------------------------------------------------------------------
    def learner_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """f_m = g_m(h_m) for every modality."""
        return {m: self.head(m)(h) for m, h in output.features.items()}

    def ensemble(self, logits: dict[str, torch.Tensor], without: str | None = None) -> torch.Tensor:
        """F = beta * sum_m f_m (F_-m with ``without=m``)."""
        return self.beta * sum(z for m, z in logits.items() if m != without)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.learner_logits(output)
        if self.phase == CORRECT:
            return {"ce": F.cross_entropy(self.ensemble(logits).float(), targets)}
        m = self.modality()
        fit, reconcile = reconcile_loss(logits[m], self.ensemble(logits, without=m).detach(), targets,
                                        self.weight1, self.weight2, self.class_mean)
        terms = {f"fit/{m}": fit, f"reconcile/{m}": reconcile}
        if self.round > 1 and self.alpha > 0:
            prev = self.modality(self.round - 1)
            p_m = F.softmax(logits[m].float(), dim=1)
            if not self.ga_gradient:
                p_m = p_m.detach()  # the released code: the term has no gradient
            target = F.softmax(logits[prev].detach().float(), dim=1)
            terms[f"ga/{m}"] = self.alpha * F.mse_loss(p_m, target)
        return terms

    def predict(self, output: ModelOutput) -> torch.Tensor:
        return self.ensemble(self.learner_logits(output))

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return self.learner_logits(output)

    def log(self) -> dict[str, Any]:
        return {"boost_rate": float(self.beta.detach())} if self.beta is not None else {}

    def log_stage(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "phase": self.phase}
        if self._model is not None:
            out["modality"] = self.modality()
        return {**out, **self.log()}

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "round": self.round, "phase": self.phase}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
            state["beta"] = self.beta.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.round, self.phase = int(state.get("round", 1)), state.get("phase", LEARN)
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
            with torch.no_grad():
                self.beta.copy_(state["beta"])
            self._apply_freezing()
