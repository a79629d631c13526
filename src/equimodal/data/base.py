"""In-memory multimodal datasets and seeded, stratified splits."""
from __future__ import annotations

from dataclasses import dataclass, field
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

    ``kinds``: the ``modality_kinds`` of the data (modality -> ``image``, ``sequence``, ``vector``,
    ``tokens`` or ``table``, or ``{"kind": ..., options}``), which the automatic encoder reads before
    its shape rule (``equimodal.models.auto``); kept by ``subset`` and ``select``.
    """

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                 kinds: dict | None = None) -> None:
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
        self.modality_kinds = dict(kinds or {})

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
                                       self.labels[indices], self.num_classes, self.modality_kinds)

    def select(self, modalities: list[str] | tuple[str, ...]) -> "TensorMultimodalDataset":
        """A view with only the named modalities (in that order)."""
        unknown = [m for m in modalities if m not in self.inputs]
        if unknown:
            raise KeyError(f"unknown modalities {unknown}; this dataset has {list(self.inputs)}")
        return TensorMultimodalDataset({m: self.inputs[m] for m in modalities}, self.labels, self.num_classes,
                                       self.modality_kinds)


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
    """train / validation (carved from train) / test. Test is for reporting only.

    ``fitted``: preprocessing fitted on the training split (file name -> text, e.g. a tokenizer's
    ``tokenizer.json``), which the Trainer saves in the run folder's ``data/`` so that ``eval`` and
    ``--resume`` read the data with the same vocabulary (``load_dataset(..., fitted_dir=...)``)."""

    train: TensorMultimodalDataset
    val: TensorMultimodalDataset
    test: TensorMultimodalDataset
    name: str
    fitted: dict = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities of the data (those of train)."""
        return self.train.modalities

    @property
    def num_classes(self) -> int:
        """The number of classes (that of train; the same for every split)."""
        return self.train.num_classes


def batch_bounds(n: int, batch_size: int, world: int = 1) -> list[tuple[int, int]]:
    """The (start, stop) of each (global) batch ``iterate_batches`` makes of ``n`` samples over
    ``world`` processes. A final batch that would leave some process fewer than 2 samples (BatchNorm
    cannot train on one) is *merged* into the one before it, which then holds up to
    ``batch_size + 2 * world - 1`` samples: no sample is dropped. Only when there is no batch before
    it does a final batch with fewer samples than processes get dropped (every process must take
    part in each step)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2 * world:
        bounds[-2:] = [(bounds[-2][0], n)]
    return [(a, b) for a, b in bounds if b - a >= world]


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """How many (global) batches ``iterate_batches`` yields for ``n`` samples over ``world``
    processes (see ``batch_bounds``: a final batch too small for BatchNorm is merged)."""
    return len(batch_bounds(n, batch_size, world))


def merged_samples(n: int, batch_size: int, world: int = 1) -> int:
    """How many samples of a final, too small batch ``iterate_batches`` merges into the batch
    before it (0: none), for the run's figures."""
    last = n % batch_size
    return last if n > batch_size and 0 < last < 2 * world else 0


#: strong references to a storage (``None`` on a torch without it: then batch buffers are not reused)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, shared: bool = False) -> torch.Tensor:
    """An uninitialised tensor, allocated in shared memory when ``shared`` (what a worker process
    returns travels to the main process without a copy; ``share_memory_()`` on an ordinary tensor
    would copy it, which costs as much as filling it)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(max(1, int(torch.Size(shape).numel())))
    return proto.new(storage)[:torch.Size(shape).numel()].view(shape)


def _uses(tensor: torch.Tensor) -> int:
    return _storage_use_count(tensor.untyped_storage()._cdata)


class BatchPool:
    """Batch buffers reused from one batch to the next, for datasets that fill a batch in place
    (``batch_layout()`` and ``fill_batch(indices, out)``).

    Writing 50 MB of fresh memory per batch costs page faults (and, in a worker, a shared-memory
    segment) that take longer than the decoding itself; a slot's memory is written again once
    nothing outside the pool refers to it any more. A slot is lent out as views (``lend``) and
    counts as free only when the strong references to each of its storages are back at the count
    taken while the pool alone held it (``torch._C._storage_Use_Count``), so a batch the consumer
    keeps (in a list, a method's cache, a view of it) is never overwritten: when every slot is in
    use, ``acquire`` returns None and the caller allocates a fresh batch. Slots live in shared
    memory when worker processes fill them (allocated up front: the workers map them when they
    start); in one process a slot is allocated when first needed. Only the main process lends and
    reclaims.
    """

    FREE, FILLING, LENT = "free", "filling", "lent"

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], batch_size: int, slots: int,
                 shared: bool) -> None:
        self.layout, self.batch_size, self.shared = layout, batch_size, shared
        self.inputs: list[dict[str, torch.Tensor] | None] = [None] * slots
        self.labels: list[torch.Tensor | None] = [None] * slots
        self.state = [self.FREE] * slots
        self._baseline: list[list[int] | None] = [None] * slots
        if shared:
            for k in range(slots):
                self._allocate(k)

    def _allocate(self, k: int) -> None:
        self.inputs[k] = {m: empty_batch((self.batch_size, *shape), dtype, self.shared)
                          for m, (shape, dtype) in self.layout.items()}
        self.labels[k] = empty_batch((self.batch_size,), torch.long, self.shared)

    def __getstate__(self) -> dict:  # workers need the buffers only (a spawned worker maps them once)
        return {**self.__dict__, "state": [], "_baseline": []}

    def _counts(self, k: int) -> list[int]:
        return [_uses(t) for t in (*self.inputs[k].values(), self.labels[k])]

    def acquire(self) -> int | None:
        """A slot to fill (marked as filling), or None when every slot is filling or still referenced."""
        for k, state in enumerate(self.state):
            if state == self.LENT and all(c <= b for c, b in zip(self._counts(k), self._baseline[k])):
                self.state[k] = state = self.FREE
            if state == self.FREE:
                if self._baseline[k] is None:  # taken while nothing but the pool refers to the slot
                    if self.inputs[k] is None:
                        self._allocate(k)
                    self._baseline[k] = self._counts(k)
                self.state[k] = self.FILLING
                return k
        return None

    def reclaim_unfinished(self) -> None:
        """Slots of tasks whose results were dropped (a pass abandoned part-way; a persistent loader
        drains those tasks before it starts the next pass, so no process writes to them any more)."""
        self.state = [self.FREE if s == self.FILLING else s for s in self.state]

    def fill(self, dataset, k: int, indices: list[int]) -> None:
        """Fill slot ``k`` with the samples at ``indices`` (in whichever process runs the dataset)."""
        n = len(indices)
        self.labels[k][:n] = dataset.fill_batch(indices, {m: t[:n] for m, t in self.inputs[k].items()})

    def lend(self, k: int, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Views of slot ``k``'s first ``n`` samples; the slot is reused once they are all gone."""
        self.state[k] = self.LENT
        return {m: t[:n] for m, t in self.inputs[k].items()}, self.labels[k][:n]


def pools_batches(dataset, pin_memory: bool) -> bool:
    """Whether ``iterate_batches`` fills reused buffers for ``dataset``: it fills batches in place, this
    torch counts storage references, and no pinned copies are wanted (the pinning thread of a
    ``DataLoader`` copies each batch anyway)."""
    return (hasattr(dataset, "fill_batch") and hasattr(dataset, "batch_layout") and not pin_memory
            and _storage_use_count is not None)


@dataclass(frozen=True)
class _Task:
    """One batch for a kept or pooled loader: indices, the epoch the main process set (a persistent
    worker's copy of the dataset never sees the main process's later ``set_epoch`` calls, and the
    epoch seeds the random crops and frame choices), and the slot to fill (None: no pool, or no slot
    was free; return a freshly allocated batch)."""

    epoch: int | None
    indices: list[int]
    slot: int | None


@dataclass(frozen=True)
class _Filled:
    """What a pooled loader's dataset returns: slot ``slot`` holds ``n`` samples."""

    slot: int
    n: int


class _TaskDataset(Dataset):
    """The ``DataLoader``'s dataset for a kept or pooled loader: sets the task's epoch, then fills
    the task's slot and returns its number, or returns a fresh batch."""

    def __init__(self, dataset, pool: BatchPool | None) -> None:
        self.dataset, self.pool = dataset, pool

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, task: _Task):
        if task.epoch is not None:
            self.dataset.set_epoch(task.epoch)
        if task.slot is None:
            return self.dataset[task.indices]
        self.pool.fill(self.dataset, task.slot, task.indices)
        return _Filled(task.slot, len(task.indices))


class _Order:
    """The batches of the current pass, replaced before each pass of a loader that is kept. With
    ``tasks``, each batch goes out as a ``_Task`` with the epoch and, with a pool, the slot it is
    given when the loader asks for it (after a kept loader has drained the tasks of an abandoned
    pass, so slots still marked as filling can be reclaimed)."""

    def __init__(self, pool: BatchPool | None = None, tasks: bool = False) -> None:
        self.batches: list = []
        self.epoch: int | None = None
        self.pool, self.tasks = pool, tasks

    def __iter__(self):
        if not self.tasks:
            yield from self.batches
            return
        if self.pool is not None:
            self.pool.reclaim_unfinished()
        for indices in self.batches:
            yield _Task(self.epoch, indices, self.pool.acquire() if self.pool is not None else None)

    def __len__(self) -> int:
        return len(self.batches)


def _pool_slots(num_workers: int, prefetch_factor: int = 2) -> int:
    """Slots for the batches in flight (``prefetch_factor`` per worker), the one being handed over
    and the one the consumer's loop variable still holds."""
    return prefetch_factor * num_workers + 2


def _loader(dataset, num_workers: int, pin_memory: bool, persistent: bool, batch_size: int):
    """A ``DataLoader`` over ``dataset`` that yields whole batches (the dataset takes a list of
    indices), its order and its pool (or None); with ``persistent`` it is made once per (dataset,
    settings) and kept on the dataset, so its worker processes survive from one pass to the next
    (with 0 workers, only a pool is worth keeping). Only datasets that declare ``keeps_loaders =
    True`` (and leave ``_equimodal_loaders`` out of their pickled state, for workers started by
    spawn) keep one; others get a fresh loader per pass."""
    pooled = pools_batches(dataset, pin_memory)

    def make(keep: bool):
        # with workers, only a kept loader gets a pool: its shared slots are allocated before the workers start
        pool = BatchPool(dataset.batch_layout(), batch_size, _pool_slots(num_workers), shared=num_workers > 0) \
            if pooled and (keep or num_workers == 0) else None
        tasks = pool is not None or (keep and num_workers > 0)  # kept workers need the epoch with each batch
        order = _Order(pool, tasks)
        source = _TaskDataset(dataset, pool) if tasks else dataset
        loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=order, num_workers=num_workers,
                                             pin_memory=pin_memory, persistent_workers=keep and num_workers > 0)
        return loader, order, pool

    if not persistent or not getattr(type(dataset), "keeps_loaders", False) or (num_workers == 0 and not pooled):
        return make(False)
    kept = dataset.__dict__.setdefault("_equimodal_loaders", {})
    key = (num_workers, pin_memory, batch_size if pooled else None)
    if key not in kept:
        kept[key] = make(True)
    return kept[key]


def iterate_batches(dataset, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False,
                    num_workers: int = 0, limit: int | None = None, shard: tuple[int, int] = (0, 1),
                    pin_memory: bool = False, persistent_workers: bool = False
                    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Mini-batches in a seeded order (shuffled when a generator is given); at most ``limit`` samples.

    ``shard=(rank, world)``: every process draws the same order and takes its contiguous share of
    each global batch of ``batch_size`` samples. A final batch that would give a process fewer than
    2 samples is merged into the batch before it (``batch_bounds``: BatchNorm cannot train on one
    sample, and no sample is dropped).

    In-memory datasets: one vectorised index gather per batch. Datasets read from disk go through a
    ``DataLoader`` (``num_workers`` processes) over the same order; ``pin_memory`` (for CUDA: faster,
    asynchronous copies) and ``persistent_workers`` (the worker processes are started once per
    dataset and kept, instead of once per pass; the dataset's epoch travels with each batch) apply to
    those. A dataset that fills batches in place (``batch_layout`` and ``fill_batch``, as the
    paper-dataset loaders do) is filled into a ``BatchPool`` of reused buffers (shared memory with
    workers) unless ``pin_memory``: the batches yielded are views of those buffers, reused only
    once nothing refers to them any more."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if limit is not None:
        order = order[:max(0, int(limit))]
        n = order.numel()
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    rank, world = shard
    chunks = [order[a:b] for a, b in batch_bounds(stop, batch_size, world)]
    if world > 1:
        chunks = [c.tensor_split(world)[rank] for c in chunks]
    if isinstance(dataset, TensorMultimodalDataset):
        for chunk in chunks:
            yield dataset[chunk]
        return
    persistent = persistent_workers and getattr(type(dataset), "keeps_loaders", False)
    # a pool's slots hold the largest batch batch_bounds makes (a merged final batch)
    loader, sampler, pool = _loader(dataset, num_workers, pin_memory, persistent, batch_size + 2 * world - 1)
    epoch = getattr(dataset, "epoch", None) if hasattr(dataset, "set_epoch") else None
    epoch = None if epoch is None else int(epoch)  # None: the dataset has no epoch yet (nothing to carry)
    sampler.epoch = epoch
    sampler.batches = [c.tolist() for c in chunks]
    for item in loader:
        yield pool.lend(item.slot, item.n) if isinstance(item, _Filled) else item
