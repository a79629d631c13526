"""In-memory multimodal datasets and seeded, stratified splits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Dataset
from ..errors import DataError


def describe(exc: BaseException, limit: int = 200) -> str:
    """An exception from a decoder (wave, PIL, numpy, zlib, torch) as one short line, for the
    "<path>: <what is wrong>" messages of ``DataError``."""
    text = " ".join(str(exc).split())
    if not text:
        text = "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class TensorMultimodalDataset(Dataset):
    """Named input tensors (same first dimension) and integer labels, all in memory.

    ``dataset[indices]`` with a list or tensor of indices returns a whole batch at once
    (``(dict of tensors, labels)``), so a loader can fetch a batch with one gather instead of a
    per-sample Python loop (see ``equimodal.train.trainer.batches``).
    """

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> None:
        n = labels.shape[0]
        for name, x in inputs.items():
            if x.shape[0] != n:
                raise DataError(f"modality {name!r} has {x.shape[0]} samples but there are {n} labels")
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"labels must lie in [0, {num_classes}); got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.inputs = dict(inputs)
        self.labels = labels.long()
        self.num_classes = int(num_classes)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in the order of the inputs dict."""
        return tuple(self.inputs)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index):
        return {m: x[index] for m, x in self.inputs.items()}, self.labels[index]

    def subset(self, indices: torch.Tensor) -> "TensorMultimodalDataset":
        """The samples at ``indices`` (a copy), as the splits and hold-outs are made."""
        return TensorMultimodalDataset({m: x[indices] for m, x in self.inputs.items()},
                                       self.labels[indices], self.num_classes)

    def select(self, modalities: list[str] | tuple[str, ...]) -> "TensorMultimodalDataset":
        """A view with only the named modalities (in that order)."""
        unknown = [m for m in modalities if m not in self.inputs]
        if unknown:
            raise KeyError(f"unknown modalities {unknown}; this dataset has {list(self.inputs)}")
        return TensorMultimodalDataset({m: self.inputs[m] for m in modalities}, self.labels, self.num_classes)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, held_out) with ``fraction`` of every class held out (seeded).

    Each class with at least two samples contributes round(fraction * count) >= 1 samples.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_held = int(round(fraction * idx.numel()))
        if fraction > 0 and idx.numel() >= 2:
            n_held = max(1, n_held)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


@dataclass
class DataSplits:
    """train / validation (carved from train) / test. Test is for reporting only."""

    train: TensorMultimodalDataset
    val: TensorMultimodalDataset
    test: TensorMultimodalDataset
    name: str

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities of the data (those of train)."""
        return self.train.modalities

    @property
    def num_classes(self) -> int:
        """The number of classes (that of train; the same for every split)."""
        return self.train.num_classes


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """How many (global) batches ``iterate_batches`` yields for ``n`` samples over ``world`` processes:
    a final batch with fewer samples than processes is dropped."""
    return sum(1 for start in range(0, n, batch_size) if min(batch_size, n - start) >= world)


@dataclass(frozen=True)
class EpochBatch:
    """What a persistent worker receives for a dataset with ``set_epoch``: the indices of one batch
    and the epoch the main process set, since a worker's copy of the dataset never sees the main
    process's later ``set_epoch`` calls (the epoch seeds the random crops and frame choices)."""

    epoch: int
    indices: list[int]


class _Order:
    """The batches of the current pass, replaced before each pass of a loader that is kept."""

    def __init__(self) -> None:
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(dataset, num_workers: int, pin_memory: bool, persistent: bool):
    """A ``DataLoader`` over ``dataset`` that yields whole batches (the dataset takes a list of
    indices); with ``persistent`` it is made once per (dataset, settings) and kept on the dataset, so
    its worker processes survive from one pass to the next. Only datasets that declare
    ``keeps_loaders = True`` (and leave ``_equimodal_loaders`` out of their pickled state, for
    workers started by spawn) keep one; others get a fresh loader per pass."""
    if not persistent or num_workers == 0 or not getattr(type(dataset), "keeps_loaders", False):
        order = _Order()
        return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=num_workers,
                                           pin_memory=pin_memory), order
    kept = dataset.__dict__.setdefault("_equimodal_loaders", {})
    key = (num_workers, pin_memory)
    if key not in kept:
        order = _Order()
        kept[key] = (torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=num_workers,
                                                 pin_memory=pin_memory, persistent_workers=True), order)
    return kept[key]


def iterate_batches(dataset, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False,
                    num_workers: int = 0, limit: int | None = None, shard: tuple[int, int] = (0, 1),
                    pin_memory: bool = False, persistent_workers: bool = False
                    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Mini-batches in a seeded order (shuffled when a generator is given); at most ``limit`` samples.

    ``shard=(rank, world)``: every process draws the same order and takes its contiguous share of
    each global batch of ``batch_size`` samples (a final batch with fewer samples than processes is
    dropped, since every process must take part in each step).

    In-memory datasets: one vectorised index gather per batch. Datasets read from disk go through a
    ``DataLoader`` (``num_workers`` processes) over the same order; ``pin_memory`` (for CUDA: faster,
    asynchronous copies) and ``persistent_workers`` (the worker processes are started once per
    dataset and kept, instead of once per pass; the dataset's epoch travels with each batch as an
    ``EpochBatch``) apply to those."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if limit is not None:
        order = order[:max(0, int(limit))]
        n = order.numel()
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    chunks = [order[start:start + batch_size] for start in range(0, stop, batch_size)]
    rank, world = shard
    if world > 1:
        chunks = [c.tensor_split(world)[rank] for c in chunks[:num_batches(stop, batch_size, world)]]
    if isinstance(dataset, TensorMultimodalDataset):
        for chunk in chunks:
            yield dataset[chunk]
        return
    persistent = persistent_workers and num_workers > 0 and getattr(type(dataset), "keeps_loaders", False)
    loader, sampler = _loader(dataset, num_workers, pin_memory, persistent)
    if persistent and hasattr(dataset, "set_epoch"):
        epoch = int(getattr(dataset, "epoch", 0))
        sampler.batches = [EpochBatch(epoch, c.tolist()) for c in chunks]
    else:
        sampler.batches = [c.tolist() for c in chunks]
    yield from loader
