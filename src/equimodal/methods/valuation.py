"""Sample-level modality valuation and resampling (Wei, Feng, Wang, Hu, CVPR 2024). peers.md B14."""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._dist import all_reduce_sum
from ..data.base import TensorMultimodalDataset
from ..models.multimodal import ModelOutput
from ._base import Method, fusing_model
from ._feature_masks import apply_keep, fuse_features
from ._registry import register_method

#: the input key under which a resampled in-memory dataset carries each sample's B x N keep mask
#: (``drop="features"``); ``ModalityValuation.forward`` removes it before the model sees the inputs
KEEP_KEY = "__valuation_keep__"
_LEVELS = ("sample", "modality")
_DROPS = ("features", "inputs")
_FUNCS = ("linear", "tanh", "square")
_MAX_MODALITIES = 10  # 2^N fused predictions per sample


def subset_sizes(n: int) -> torch.Tensor:
    """|S| for every subset S of n modalities, indexed by bitmask (bit j set: modality j in S)."""
    return torch.tensor([bin(mask).count("1") for mask in range(2 ** n)], dtype=torch.float64)


def shapley_matrix(n: int) -> torch.Tensor:
    """2^n x n matrix C with phi = V @ C, V holding v(S) by bitmask: the Shapley value
    phi_m = sum_{S not containing m} |S|! (n - |S| - 1)! / n! * (v(S + m) - v(S))."""
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    c = torch.zeros(2 ** n, n, dtype=torch.float64)
    for mask in range(2 ** n):
        size = bin(mask).count("1")
        for m in range(n):
            if not (mask >> m) & 1:
                c[mask | (1 << m), m] += weights[size]
                c[mask, m] -= weights[size]
    return c


def shapley_contributions(correct: torch.Tensor) -> torch.Tensor:
    """B x n contributions from B x 2^n correctness (column = subset bitmask, column 0 ignored).

    The value of a subset is v(S) = |S| if the prediction from the modalities in S alone is right,
    else 0 (v of the empty set = 0). For two modalities this is the official code's rule:
    v_av = 2 * [fused right], v_a = [audio-only right], phi_a = (v_a + v_av - v_v) / 2."""
    n = int(correct.shape[1]).bit_length() - 1
    values = correct.double() * subset_sizes(n).to(correct.device)
    values[:, 0] = 0.0
    return values @ shapley_matrix(n).to(correct.device)


def copy_counts(phi: torch.Tensor) -> torch.Tensor:
    """Copies per (sample, modality) from contributions: 1 if 0.4 < phi < 1, 2 if -0.1 < phi < 0.4,
    3 if phi < -0.1, else 0 (phi >= 1 and the exact boundaries, as in the official code)."""
    counts = torch.zeros(phi.shape, dtype=torch.long, device=phi.device)
    counts[(phi > 0.4) & (phi < 1)] = 1
    counts[(phi > -0.1) & (phi < 0.4)] = 2
    counts[phi < -0.1] = 3
    return counts


def sample_level_plan(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index, keep mask) of the resampled set: the n originals with every modality, then for
    each sample in order its copies keeping only modality 0, then only modality 1, ... (the official
    dataset's order). ``counts``: n x N copies per sample and kept modality."""
    n, k = counts.shape
    pairs = torch.repeat_interleave(torch.arange(n * k), counts.reshape(-1).cpu())
    index = torch.cat([torch.arange(n), pairs // k])
    keep = torch.ones(index.numel(), k, dtype=torch.bool)
    keep[n:] = F.one_hot(pairs % k, k).bool()
    return index, keep


def resampled_dataset(dataset: Any, index: torch.Tensor, keep: torch.Tensor | None, drop: str,
                      modalities: tuple[str, ...] = ()) -> Any:
    """The samples ``dataset[index]``; where ``keep[i, j]`` is False, modality ``modalities[j]`` of row i is dropped:
    its input zeroed (``drop="inputs"``) or, ``drop="features"``, the mask travels with the inputs
    under ``KEEP_KEY`` for the method to zero the encoder features. In-memory datasets give a new
    ``TensorMultimodalDataset``; others a ``ResampledDataset`` view (nothing is loaded here)."""
    if not isinstance(dataset, TensorMultimodalDataset):
        return ResampledDataset(dataset, index, keep, drop, modalities)
    inputs = {m: x[index] for m, x in dataset.inputs.items()}
    if keep is not None:
        inputs = _drop_rows(inputs, keep, drop, modalities)
    return TensorMultimodalDataset(inputs, dataset.labels[index], dataset.num_classes)


def _drop_rows(inputs: dict[str, torch.Tensor], keep: torch.Tensor, drop: str,
               modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One row (``keep``: N) or a batch (B x N): the mask added under ``KEEP_KEY`` or the inputs zeroed."""
    if drop == "features":
        return {**inputs, KEEP_KEY: keep}
    out = dict(inputs)
    for j, m in enumerate(modalities):
        dropped = ~keep[..., j]
        x = inputs[m]
        out[m] = torch.where(dropped.reshape(dropped.shape + (1,) * (x.dim() - dropped.dim())), torch.zeros_like(x), x)
    return out


class ResampledDataset(Dataset):
    """A map-style view of a dataset read from disk: item i is ``base[index[i]]`` with the modalities
    ``keep[i]`` marks False dropped (see ``resampled_dataset``). Supports batch indexing (a list or
    tensor of indices) when the base does, and forwards ``set_epoch``. Copies of a sample read the
    same file and, where the base draws random crops from (seed, epoch, index), get the same crop."""

    def __init__(self, base: Any, index: torch.Tensor, keep: torch.Tensor | None, drop: str,
                 modalities: tuple[str, ...] = ()) -> None:
        self.base, self.index, self.keep, self.drop, self.names = base, index.long(), keep, drop, tuple(modalities)
        self.labels = base.labels[self.index] if hasattr(base, "labels") else None
        self.num_classes = getattr(base, "num_classes", None)
        self.modalities = getattr(base, "modalities", None)

    def __len__(self) -> int:
        return int(self.index.numel())

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, i):
        batch = isinstance(i, (list, tuple, torch.Tensor))
        source = self.index[torch.as_tensor(i)] if batch else self.index[int(i)]
        inputs, label = self.base[source.tolist() if batch else int(source)]
        if self.keep is not None:
            rows = self.keep[torch.as_tensor(i)] if batch else self.keep[int(i)]
            inputs = _drop_rows(inputs, rows, self.drop, self.names)
        return inputs, label


def inference_passes(model: nn.Module, data: Any, dataset: Any,
                     batch_size: int) -> Iterator[tuple[ModelOutput, torch.Tensor]]:
    """(output, labels) for every batch of ``dataset`` in a fixed order, with ``model`` in eval mode
    and no gradients (consume the whole loop: the modes are restored at its end, or on an error)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for inputs, y in data.batches(dataset, batch_size):
                yield model(inputs), y
    finally:
        for m, training in modes:
            m.train(training)


@register_method("valuation")
class ModalityValuation(Method):
    """Modality valuation (Wei et al., CVPR 2024): each epoch, add copies training each sample's low-contributing modality alone.

    After ``warmup_epochs`` epochs of plain training, ``training_set`` values every training sample
    with the current model (eval mode, no gradients): the prediction of the fusion head from the
    features of each non-empty modality subset S (the others zeroed and re-fused with the model's
    ``fuse``) gives v(S) = |S| if right, else 0, and the Shapley value phi_m of each modality. For
    two modalities v_av = 2 * [fused right], v_a = [audio-only right], phi_a = (v_a + v_av - v_v)/2,
    the paper's and the official code's rule; with N > 2 it is the exact N-player Shapley value of
    the same game (2^N - 1 re-fusions per sample), which sums to N when the fused prediction is right.
    ``level="sample"`` (paper default): the epoch trains on the originals plus, per sample and
    modality m, 1 copy if 0.4 < phi_m < 1, 2 if -0.1 < phi_m < 0.4, 3 if phi_m < -0.1 (none for
    phi_m >= 1 or exactly on a boundary, as in the code), in which only m is kept (the other
    modalities dropped). ``level="modality"``: values only a random ``part_ratio`` of the training
    set, gap_m = 1 - mean phi_m, d = alpha * (2/3) * (max_m gap_m - min_m gap_m) (``func`` "linear";
    "tanh": tanh of it; "square": alpha * ((2/3)(max - min))^1.5, the code's variants), and adds
    floor(d * n) copies of samples drawn at random (with replacement, as the code) keeping only the
    modality with the largest gap. The loss is cross-entropy on the fused logits of every row.

    ``drop="features"`` (default, the official code's ``a[i, :] = 0``): a copy's dropped modality
    is zeroed after its encoder, before fusion; the keep mask travels in the inputs under
    ``KEEP_KEY`` and ``forward`` takes it out. ``drop="inputs"``: the copy's input tensor is
    zeroed in the dataset instead (any model, no mask; the encoder then sees zero inputs).

    Paper: Wei, Feng, Wang, Hu, CVPR 2024, "Enhancing multimodal cooperation via sample-level
    modality valuation"; code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
    (``code/sample_level.py``, ``code/modality_level.py``, ``datasets/dataloader.py``).
    Defaults: level "sample", warmup_epochs 5 (the paper's and the code's, kept although our CPU
    runs are 12 epochs: 7 resampled epochs), part_ratio 0.2, alpha 1, func "linear", drop
    "features", eval_batch_size 256. Departures: any number of modalities (above); the
    modality-level subset Z is drawn without replacement (the code draws with replacement); random
    draws come from a generator seeded by (seed, epoch), so a resumed run rebuilds the same set;
    samples are valued on the ``dataset`` the loop passes (the training split, never validation or
    test); the thresholds are fixed at the code's values. Distributed: each rank values the samples
    of its own ``dataset``; the sums behind the logged means and the modality-level decision are
    all-reduced (one collective), so every rank takes the same modality-level decision.

    Cost: per resampled epoch one inference pass over the training set (``level="modality"``:
    over ``part_ratio`` of it) plus 2^N - 1 fusion-head passes per sample, and up to 1 + 3N times
    as many training steps (sample level). No extra passes per training step.
    Hooks: setup, training_set, forward, loss, log.
    """

    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (1.0, 0.5, 2.0, 4.0)}

    def __init__(self, level: str = "sample", warmup_epochs: int = 5, part_ratio: float = 0.2, alpha: float = 1.0,
                 func: str = "linear", drop: str = "features", eval_batch_size: int = 256) -> None:
        super().__init__()
        for key, value, allowed in (("level", level, _LEVELS), ("func", func, _FUNCS), ("drop", drop, _DROPS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        for key, value, low in (("warmup_epochs", warmup_epochs, 0), ("eval_batch_size", eval_batch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if isinstance(part_ratio, bool) or not isinstance(part_ratio, (int, float)) or not 0 < part_ratio <= 1:
            raise ValueError(f"part_ratio must be a number in (0, 1], got {part_ratio!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.level, self.func, self.drop = level, func, drop
        self.warmup_epochs, self.eval_batch_size = warmup_epochs, eval_batch_size
        self.part_ratio, self.alpha = float(part_ratio), float(alpha)
        self._model: nn.Module | None = None
        self._modalities: tuple[str, ...] = ()
        self._keep: torch.Tensor | None = None  # the current micro-batch's keep mask (drop="features")
        self._figures: dict[str, float] = {}

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = self._model = fusing_model(model, self.name, "re-fuses modality subsets")
        if len(inner.modalities) > _MAX_MODALITIES:
            raise ValueError(f"method {self.name!r} values 2^N modality subsets per sample; at most "
                             f"{_MAX_MODALITIES} modalities, the model has {len(inner.modalities)}")
        self._modalities = tuple(inner.modalities)

    # --- valuation ------------------------------------------------------------------------
    def contributions(self, dataset: Any) -> torch.Tensor:
        """n x N Shapley contributions of every sample of ``dataset`` (model in eval mode, no grad)."""
        if self._model is None:
            raise RuntimeError(f"{self.name}: call setup(model, ...) before valuing samples")
        model, names, full = self._model, self._modalities, 2 ** len(self._modalities) - 1
        rows = []
        for out, y in inference_passes(model, self.require_data(), dataset, self.eval_batch_size):
            correct = torch.zeros(y.numel(), full + 1, dtype=torch.bool, device=y.device)
            h = out.features
            for mask in range(1, full + 1):
                logits = out.logits if mask == full else model.fuse(
                    {m: h[m] if (mask >> j) & 1 else torch.zeros_like(h[m]) for j, m in enumerate(names)})
                correct[:, mask] = logits.argmax(1) == y
            rows.append(correct.cpu())
        return shapley_contributions(torch.cat(rows)) if rows else torch.zeros(0, len(names), dtype=torch.float64)

    def difference(self, gaps: torch.Tensor) -> float:
        """The modality-level resampling fraction d from the gaps 1 - mean phi_m."""
        spread = float(gaps.max() - gaps.min()) / 3 * 2
        if self.func == "tanh":
            return math.tanh(spread * self.alpha)
        if self.func == "square":
            return spread ** 1.5 * self.alpha
        return spread * self.alpha

    def training_set(self, epoch: int, dataset: Any) -> Any:
        if epoch < self.warmup_epochs:
            return dataset
        n, k = len(dataset), len(self._modalities)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * int(epoch) + 1)
        if self.level == "sample":
            phi = self.contributions(dataset)
            index, keep = sample_level_plan(copy_counts(phi))
        else:
            z = max(1, int(self.part_ratio * n))
            chosen = torch.randperm(n, generator=gen)[:z]
            phi = self.contributions(resampled_dataset(dataset, chosen, None, self.drop))  # the subset Z
        device = self.require_data().device  # one collective, on the device (NCCL needs it there)
        stats = all_reduce_sum(torch.cat([phi.sum(0), phi.new_tensor([phi.shape[0]])]).to(device)).cpu()
        mean = stats[:k] / stats[k].clamp_min(1)
        if self.level == "modality":
            gaps = 1.0 - mean
            extra = int(self.difference(gaps) * n)
            picks = torch.randint(n, (extra,), generator=gen) if n else torch.zeros(0, dtype=torch.long)
            index = torch.cat([torch.arange(n), picks])
            keep = torch.ones(index.numel(), k, dtype=torch.bool)
            keep[n:] = F.one_hot(gaps.argmax(), k).bool()
        self._figures = {**{f"phi/{m}": float(mean[j]) for j, m in enumerate(self._modalities)},
                         **{f"copies/{m}": int(keep[n:, j].sum()) for j, m in enumerate(self._modalities)},
                         "train_size": int(index.numel())}
        return resampled_dataset(dataset, index, keep, self.drop, self._modalities)

    # --- training steps -------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        if KEEP_KEY in inputs:
            inputs = dict(inputs)
            self._keep = inputs.pop(KEEP_KEY).bool()
        else:
            self._keep = None
        return model(inputs)

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        keep, self._keep = self._keep, None
        if keep is None or not output.logits.requires_grad:
            return super().loss(output, targets)
        features = apply_keep(output.features, self._modalities, keep.to(output.logits.device))
        logits = fuse_features(self._model, features)
        return {"ce": F.cross_entropy(logits.float(), targets), **output.estimator_losses(targets)}

    def log(self) -> dict[str, float]:
        """Once per resampled epoch: mean contribution ``phi/<m>`` (over the valued samples, all
        ranks), copies that keep only m ``copies/<m>`` and the epoch's ``train_size``."""
        figures, self._figures = self._figures, {}
        return figures
