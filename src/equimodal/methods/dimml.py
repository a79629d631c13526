"""DI-MML: detached unimodal training with dimension-wise interaction, then a confidence-mixed fusion
(Fan, Xu, Wang, Liu, Guo, ACM MM 2024). peers.md B10."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._dist import all_reduce_sum, average_gradients
from ..models.multimodal import ModelOutput
from ._base import Method, Stage, unwrap
from ._heads import encoder_dims, seeded, set_trainable
from ._registry import register_method
from .pmr import class_means
from .valuation import inference_passes

_STAGES = ("detached", "fusion")


def class_centroids(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """C x D class means from per-class feature sums (C x D) and counts (C); a class with no sample
    gets +inf, so it is never the nearest centroid."""
    centroids = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    return torch.where(counts.unsqueeze(1) > 0, centroids, torch.full_like(centroids, float("inf")))


def nearest_centroid_hits(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """D counts: for each feature dimension d, the samples whose nearest class centroid along d alone,
    argmin_c |h_d - mu_{c,d}|, is their own class (ties: the lowest class index, as ``torch.argmin``)."""
    dist = (features.unsqueeze(1).to(centroids.dtype) - centroids.unsqueeze(0)).abs()  # B x C x D (inf: absent)
    return (dist.argmin(1) == labels.unsqueeze(1)).sum(0)


def top_dimensions(discriminability: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the dimensions whose discriminability is above the mean over dimensions
    (strictly, as the official code); works row-wise on an N x D tensor."""
    return discriminability > discriminability.mean(-1, keepdim=True)


def exclusive_dimensions(top: torch.Tensor) -> torch.Tensor:
    """N x N x D: [m, k] = top_m minus top_k (the dimensions m separates well and k does not);
    for two modalities [0, 1] = D_a = top_a \\ top_v and [1, 0] = D_v. The diagonal is empty."""
    out = top.unsqueeze(1) & ~top.unsqueeze(0)
    out[torch.arange(top.shape[0]), torch.arange(top.shape[0])] = False
    return out


def dimension_info_nce(student: torch.Tensor, teacher: torch.Tensor, dims: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """InfoNCE that pulls ``student[i]`` towards the paired, detached ``teacher[i]`` against the other
    batch items' teacher features, on the dimensions ``dims`` (bool D) only: mean over i of
    -log softmax_j(<s_i[D], t_j[D]> / tau)[i], with raw dot products (no normalisation), as the
    official ``SupConLoss``. The dimensions are selected by a 0/1 mask, so no host sync; an empty set
    gives the constant log B with zero gradient (as the code)."""
    mask = dims.to(student.dtype if student.is_floating_point() else torch.float32)
    s = (student * mask).float()
    t = (teacher.detach() * mask).float()
    logits = s @ t.t() / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def confidence_mix(logits: list[torch.Tensor], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed logits B x C, weights S x B): per sample, w_s = softmax_s(max_c softmax(z_s)_c / T) over
    the S predictors and the mix sum_s w_s z_s of their logits (the official stage-2 inference)."""
    z = torch.stack([x.float() for x in logits])  # S x B x C
    weights = (z.softmax(-1).amax(-1) / temperature).softmax(0)
    return (weights.unsqueeze(-1) * z).sum(0), weights


@register_method("dimml")
class DIMML(Method):
    """DI-MML (Fan et al., ACM MM 2024): encoders trained apart, with dimension-wise contrast, then a confidence-mixed fusion.

    Stage ``detached``: every encoder with its own linear head and a shared head H (the method's):
    L = sum_m CE(head_m(h_m), y) + weight * sum_m CE(H(h_m), y) + L_c. At the start of stage epoch
    ``dim_epoch`` (once) the method computes, on the training split with the model in eval mode,
    each modality's class centroids and, per feature dimension d, the fraction of samples whose
    nearest centroid along d alone is their class; dimensions above the modality's mean fraction
    are its "top" set, and D_{m->k} = top_m \\ top_k (two modalities: D_a = top_a \\ top_v, D_v =
    top_v \\ top_a). From then on L_c = sum_k mean_{m != k} InfoNCE(h_k[D_{m->k}] -> detached
    h_m[D_{m->k}]) with temperature ``temperature``: for two modalities, h_v[D_a] is pulled
    towards its own sample's h_a[D_a] against the batch's other h_a[D_a], and symmetrically (the
    paper's rule; with N > 2 every ordered pair, averaged over the sources of each target). Stage
    ``fusion``: encoders, own heads and H frozen (encoders in eval mode), the model's fusion head
    trained with CE on the fused logits; prediction = per-sample mix sum_s w_s z_s of the unimodal
    heads' logits and the fused logits with w = softmax_s(max-prob_s / ``mix_temperature``). In the
    detached stage the prediction is the same mix over the unimodal heads only. The per-modality
    accuracies reported are those of the method's unimodal heads in both stages.

    Paper: Fan, Xu, Wang, Liu, Guo, ACM MM 2024, "Detached and Interactive Multimodal Learning";
    code fanyunfeng-bit/DI-MML (``main_CFT.py``, ``loss/contrast_loss.py``, ``main_CFT_stage2.py``).
    Defaults: weight 1 and temperature 50 (code, CREMA-D; 10 for AVE/UCF), mix_temperature 1
    (CREMA-D; 3 for AVE), dim_epoch 4 (the paper uses 20 of 150 stage-1 epochs; 4 leaves 8 epochs of
    interaction in our 12-epoch stage: set it below ``detached_epochs``, else L_c never starts),
    detached_epochs / fusion_epochs None (the run's epochs each; the paper trains 150 and 20),
    eval_batch_size 256. Departures: the dimension statistics use every training sample in one
    fixed-order pass (the code: batch size 1, shuffled; the result is the same); classes absent from
    the training split are never nearest (the code divides by zero); the fusion head is the model's
    own (any fusion of the model, not only concat), trained from its initial weights, which stage 1
    never touches; N > 2 as above. Needs equal encoder feature dimensions (dimension-wise
    comparison and one shared head): a named error otherwise. Distributed: centroid sums and counts
    and the per-dimension hit counts are all-reduced (two collectives, once per run); the method's
    head gradients are averaged in ``before_step``.

    Cost: no extra forward/backward pass per step (linear heads on the features, N(N-1) B x B
    similarity matrices from dim_epoch on); two inference passes over the training split, once.
    Hooks: stages, on_stage_start, setup, on_epoch_start, loss, before_step, predict,
    unimodal_logits, log.
    """

    predicts = "mixed"
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"weight": (1.0, 0.3, 3.0, 10.0)}

    def __init__(self, weight: float = 1.0, temperature: float = 50.0, dim_epoch: int = 4,
                 mix_temperature: float = 1.0, detached_epochs: int | None = None, fusion_epochs: int | None = None,
                 eval_batch_size: int = 256) -> None:
        super().__init__()
        for key, value, strict in (("weight", weight, False), ("temperature", temperature, True),
                                   ("mix_temperature", mix_temperature, True)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (strict and value == 0):
                raise ValueError(f"{key} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")
        counts = {"dim_epoch": (dim_epoch, 0, False), "eval_batch_size": (eval_batch_size, 1, False),
                  "detached_epochs": (detached_epochs, 1, True), "fusion_epochs": (fusion_epochs, 1, True)}
        for key, (value, low, optional) in counts.items():
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}{' or null' if optional else ''}, got {value!r}")
        self.weight, self.temperature, self.mix_temperature = float(weight), float(temperature), float(mix_temperature)
        self.dim_epoch, self.eval_batch_size = dim_epoch, eval_batch_size
        self.stage_epochs = {"detached": detached_epochs, "fusion": fusion_epochs}
        self.stage = "detached"
        self.heads: nn.ModuleDict | None = None
        self.shared: nn.Linear | None = None
        self.top: torch.Tensor | None = None  # N x D top dimensions, once computed
        self.exclusive: torch.Tensor | None = None  # N x N x D, [m, k] = top_m \ top_k
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()

    def stages(self) -> list[Stage]:
        return [Stage(name, self.stage_epochs[name]) for name in _STAGES]

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = unwrap(model)
        self._modalities = tuple(inner.modalities)
        dims = encoder_dims(inner, self.name)
        if len(set(dims.values())) > 1:
            raise ValueError(f"{self.name} compares features dimension by dimension and shares one head across "
                             f"modalities: the encoders' out_dim must be equal, got {dims}")
        if self.heads is None:
            dim, classes = next(iter(dims.values())), inner.num_classes
            self.heads = seeded(lambda: nn.ModuleDict({m: nn.Linear(dim, classes) for m in dims}), self.seed + 31)
            self.shared = seeded(lambda: nn.Linear(dim, classes), self.seed + 37)
        self.attach_parameters(model, optimizer)
        self._apply_freezing()

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else [*self.heads.parameters(), *self.shared.parameters()]

    def before_step(self, model: nn.Module) -> None:
        average_gradients(self.parameters())  # the method's heads live outside the DDP wrapper

    def on_stage_start(self, stage: str, resumed: bool = False) -> None:
        self.stage = stage
        if self._model is not None:
            self._apply_freezing()

    def _apply_freezing(self) -> None:
        """Detached stage: encoders and the method's heads train. Fusion stage: only the model's head."""
        detached = self.stage == "detached"
        for m in self._modalities:
            set_trainable(self._model.encoder(m), detached)
        set_trainable(self.heads, detached)
        set_trainable(self.shared, detached)
        if not detached:
            for p in self._model.head_parameters():
                p.requires_grad_(True)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.stage == "fusion":
            for m in self._modalities:
                self._model.encoder(m).eval()  # frozen encoders keep their BatchNorm statistics
        elif epoch >= self.dim_epoch and self.exclusive is None:
            self.select_dimensions()

    # --- dimension selection (once) -------------------------------------------------------
    def _feature_passes(self):
        """Yields (features N x B x D, labels) over the training split, model in eval mode, no grad."""
        data = self.require_data()
        for out, y in inference_passes(self._model, data, data.train, self.eval_batch_size):
            yield torch.stack([out.features[m].float() for m in self._modalities]), y

    def select_dimensions(self) -> None:
        """Top and exclusive dimensions from the current encoders (methods docstring); sets ``top``
        and ``exclusive``."""
        if self._model is None:
            raise RuntimeError(f"{self.name}: call setup(model, ...) before selecting dimensions")
        device, classes = self.require_data().device, self._model.num_classes
        sums, counts = None, None
        for h, y in self._feature_passes():
            batch = [class_means(h[j].double(), y, classes) for j in range(h.shape[0])]
            s, c = torch.stack([b[0] for b in batch]), batch[0][1]
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        if sums is None:
            raise RuntimeError(f"{self.name}: the training split is empty; no dimension can be selected")
        n, dim = sums.shape[0], sums.shape[2]
        packed = all_reduce_sum(torch.cat([sums.flatten(), counts]).to(device))
        sums, counts = packed[:-classes].view(n, classes, dim), packed[-classes:]
        centroids = [class_centroids(sums[j], counts).float() for j in range(n)]
        hits = torch.zeros(n, dim, dtype=torch.float64, device=device)
        for h, y in self._feature_passes():
            hits += torch.stack([nearest_centroid_hits(h[j], y, centroids[j]) for j in range(n)]).double()
        hits = all_reduce_sum(hits)
        discriminability = hits / counts.sum().clamp_min(1)
        self.top = top_dimensions(discriminability).cpu()
        self.exclusive = exclusive_dimensions(self.top)

    # --- steps ----------------------------------------------------------------------------
    def _head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](output.features[m]) for m in self._modalities}

    def contrast_terms(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L_c per target modality k: mean over sources m != k of InfoNCE(h_k -> h_m) on D_{m->k}."""
        names, n = self._modalities, len(self._modalities)
        terms = {}
        for k, target in enumerate(names):
            dims = self.exclusive[:, k].to(features[target].device)  # row m: D_{m->k}
            pulls = [dimension_info_nce(features[target], features[src], dims[m], self.temperature)
                     for m, src in enumerate(names) if m != k]
            terms[f"contrast/{target}"] = sum(pulls) / (n - 1)
        return terms

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage == "fusion":
            return super().loss(output, targets)
        terms = {f"ce/{m}": F.cross_entropy(z.float(), targets) for m, z in self._head_logits(output).items()}
        for m in self._modalities:
            terms[f"shared/{m}"] = self.weight * F.cross_entropy(self.shared(output.features[m]).float(), targets)
        if self.exclusive is not None:
            terms.update(self.contrast_terms(output.features))
        return {**terms, **output.estimator_losses(targets)}

    def predict(self, output: ModelOutput) -> torch.Tensor:
        sources = list(self._head_logits(output).values())
        if self.stage == "fusion":
            sources.append(output.logits)
        return confidence_mix(sources, self.mix_temperature)[0]

    def unimodal_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return self._head_logits(output)

    def log(self) -> dict[str, float]:
        """After the selection: ``dims/<m>`` = |top_m minus every other top set| (|D_a|, |D_v| for two)."""
        if self.top is None:
            return {}
        others = [self.top[[k for k in range(len(self.top)) if k != j]].any(0) for j in range(len(self.top))]
        return {f"dims/{m}": int((self.top[j] & ~others[j]).sum()) for j, m in enumerate(self._modalities)}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "stage": self.stage, "top": self.top, "exclusive": self.exclusive}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
            state["shared"] = self.shared.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.stage = state.get("stage", "detached")
        self.top, self.exclusive = state.get("top"), state.get("exclusive")
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
            self.shared.load_state_dict(state["shared"])
        if self._model is not None:
            self._apply_freezing()
