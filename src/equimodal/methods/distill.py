"""Cross-modal knowledge distillation from the strong modality to the weak; docs/methods.md, "distill"."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, Stage, unwrap
from ._heads import encoder_dims, linear_heads, reset_module, seeded, set_trainable
from ._registry import register_method

_FUSE = ("frozen", "finetune")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)), averaged over the batch (Hinton et al.)."""
    t = temperature
    return (t * t) * F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                              F.log_softmax(teacher_logits.float() / t, dim=1), log_target=True, reduction="batchmean")


@register_method("distill")
class Distill(Method):
    """Cross-modal distillation (Hinton et al. 2015): a teacher on the strong modality teaches the weak modality's encoder, then fuse.

    Stages: ``teacher`` trains every encoder alone with its own linear head (so each modality's
    unimodal validation accuracy is known) and picks the teacher: the modality with the best
    validation accuracy at the end of the stage, unless ``teacher`` names one. ``student``
    re-initialises the other encoders and their heads (``reinit_student``) and trains each with
    L = (1 - weight) CE(z_w, y) + weight T^2 KL(softmax(z_t/T) || softmax(z_w/T)) (+ ``align`` *
    ||P h_w - h_t||^2 through a learned projection P, Valverde et al. 2021), the teacher frozen.
    ``fuse`` trains the model's fusion head on both encoders (``fuse``: frozen | finetune) with CE on
    the fused logits. Each stage runs ``<stage>_epochs`` epochs (default: the run's epochs, so the
    whole method costs three runs). A run reports the teacher alone, the student alone and the fused
    model (``stages`` in summary.json). Works with N >= 2 modalities: every non-teacher modality is a
    student. Frozen encoders are kept in eval mode so their BatchNorm statistics do not drift.
    Hooks: stages, on_stage_start, setup, on_epoch_start, loss, predict, unimodal_logits, on_epoch_end.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"weight": (0.5, 0.2, 0.8, 1.0)}

    def __init__(self, teacher: str = "auto", temperature: float = 4.0, weight: float = 0.5, align: float = 0.0,
                 fuse: str = "frozen", reinit_student: bool = True, teacher_epochs: int | None = None,
                 student_epochs: int | None = None, fuse_epochs: int | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= weight <= 1:
            raise ValueError(f"weight (lambda) must be in [0, 1], got {weight}")
        if align < 0:
            raise ValueError(f"align must be >= 0, got {align}")
        if fuse not in _FUSE:
            raise ValueError(f"fuse must be one of {list(_FUSE)}, got {fuse!r}")
        for key, value in (("teacher_epochs", teacher_epochs), ("student_epochs", student_epochs),
                           ("fuse_epochs", fuse_epochs)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{key} must be a positive integer or null, got {value!r}")
        self.teacher_option = teacher
        self.temperature, self.weight, self.align = float(temperature), float(weight), float(align)
        self.fuse, self.reinit_student = fuse, bool(reinit_student)
        self.stage_epochs = {"teacher": teacher_epochs, "student": student_epochs, "fuse": fuse_epochs}
        self.stage = "teacher"
        self.teacher: str | None = None if teacher == "auto" else teacher
        self.heads: nn.ModuleDict | None = None
        self.projections: nn.ModuleDict | None = None
        self._model: nn.Module | None = None

    def stages(self) -> list[Stage]:
        return [Stage(name, self.stage_epochs[name]) for name in ("teacher", "student", "fuse")]

    def check_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        super().check_modalities(modalities)
        if self.teacher_option != "auto" and self.teacher_option not in modalities:
            raise ValueError(f"teacher {self.teacher_option!r} is not one of data.modalities {list(modalities)} "
                             "(or 'auto': chosen on validation)")

    @property
    def students(self) -> list[str]:
        return [m for m in self._model.modalities if m != self.teacher] if self._model is not None else []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = unwrap(model)
        if self.teacher is not None and self.teacher not in inner.modalities:
            raise ValueError(f"distill: teacher {self.teacher!r} is not a modality of the model {list(inner.modalities)}")
        if self.heads is None:
            dims = encoder_dims(inner, self.name)
            self.heads = linear_heads(inner, self.name, self.seed + 11)
            self.projections = seeded(lambda: nn.ModuleDict(
                {f"{w}_to_{t}": nn.Linear(dims[w], dims[t]) for w in dims for t in dims if w != t}), self.seed + 13)
        self.attach_parameters(model, optimizer)
        self._apply_freezing()

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the method's own heads live outside the DDP wrapper

    def parameters(self) -> list[nn.Parameter]:
        if self.heads is None:
            return []
        return [*self.heads.parameters(), *self.projections.parameters()]

    def on_stage_start(self, stage: str, resumed: bool = False) -> None:
        self.stage = stage
        if stage == "student" and self.teacher is None:
            raise RuntimeError("distill: the student stage started before a teacher was chosen")
        if stage == "student" and self.reinit_student and not resumed and self._model is not None:
            for i, w in enumerate(self.students):
                reset_module(self._model.encoder(w), self.seed + 101 + i)
                reset_module(self.heads[w], self.seed + 201 + i)
        if self._model is not None:
            self._apply_freezing()

    def _apply_freezing(self) -> None:
        """Teacher stage: all encoders and heads train. Student: only students (+ projections).
        Fuse: the fusion head (and the encoders with ``fuse='finetune'``)."""
        model = self._model
        for m in model.modalities:
            if self.stage == "teacher":
                trainable = True
            elif self.stage == "student":
                trainable = m != self.teacher
            else:
                trainable = self.fuse == "finetune"
            set_trainable(model.encoder(m), trainable)
            set_trainable(self.heads[m], self.stage == "teacher" or (self.stage == "student" and m != self.teacher))
        set_trainable(self.projections, self.stage == "student")

    def _frozen_encoders(self) -> list[str]:
        return [m for m in self._model.modalities
                if not any(p.requires_grad for p in self._model.encoder(m).parameters())]

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        for m in self._frozen_encoders():
            self._model.encoder(m).eval()  # keep BatchNorm statistics of frozen encoders fixed

    def _head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](h) for m, h in output.features.items()}

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage == "fuse":
            return super().loss(output, targets)
        logits = self._head_logits(output)
        if self.stage == "teacher":
            return {f"ce/{m}": F.cross_entropy(z.float(), targets) for m, z in logits.items()}
        teacher_logits = logits[self.teacher].detach()
        teacher_features = output.features[self.teacher].detach()
        terms = {}
        for w in self.students:
            terms[f"ce/{w}"] = (1 - self.weight) * F.cross_entropy(logits[w].float(), targets)
            terms[f"kd/{w}"] = self.weight * kd_loss(logits[w], teacher_logits, self.temperature)
            if self.align > 0:
                projected = self.projections[f"{w}_to_{self.teacher}"](output.features[w])
                terms[f"align/{w}"] = self.align * (projected - teacher_features).pow(2).sum(1).mean()
        return terms

    def predict(self, output: ModelOutput) -> torch.Tensor:
        if self.stage == "fuse":
            return output.logits
        logits = self._head_logits(output)
        if self.stage == "teacher":
            return logits[self.teacher] if self.teacher is not None else torch.stack(list(logits.values())).mean(0)
        return torch.stack([logits[w] for w in self.students]).mean(0)

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return output.unimodal_logits if self.stage == "fuse" else self._head_logits(output)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.stage == "teacher" and self.teacher_option == "auto":
            acc = metrics["val_acc_by_modality"]  # validation split, never test
            self.teacher = max(acc, key=lambda m: (acc[m], m))

    def log_stage(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "students": self.students}

    def log(self) -> dict[str, Any]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "stage": self.stage, "teacher": self.teacher}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
            state["projections"] = self.projections.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.stage = state.get("stage", "teacher")
        self.teacher = state.get("teacher")
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
            self.projections.load_state_dict(state["projections"])
        if self._model is not None:
            self._apply_freezing()
