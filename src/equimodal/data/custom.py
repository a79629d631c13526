"""A user's own data in the trainer, ``bench`` and ``diagnose``.

Any map-style ``torch.utils.data.Dataset`` whose items are ``(dict of tensors, label)`` works: the
modalities are the dict's keys, the shapes those of the first item, the class count the largest
label + 1 over all splits (or a ``num_classes`` attribute). Give the splits as a dict
``{"train": ..., "val": ..., "test": ...}`` (``val`` optional: then a stratified ``val_fraction`` of
train is held out, as for the built-in data), or a builder ``build(**options)`` that returns one::

    from equimodal.data import register_dataset
    register_dataset("mine", {"train": train_ds, "test": test_ds})      # data.name=mine
    register_dataset("mine-built", build)                               # data.<option>=... reach build

The CLI takes a builder by import path, ``--dataset my_pkg.data:build`` (``--set data.<option>=...``
for its keyword options). The labels are read once per split: from a ``labels`` or ``targets``
attribute when the dataset has one (fast), else by reading every item once.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import DataError
from .base import DataSplits, TensorMultimodalDataset, stratified_split

#: the options every user dataset takes on top of its builder's own keyword parameters
COMMON_OPTIONS: dict[str, Any] = {"val_fraction": 0.1, "split_seed": 0, "modalities": None}
SPLIT_KEYS = ("train", "val", "test")


_LARGEST_LABEL = 2 ** 62


def _as_label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise DataError(f"{where}: the label must be one integer, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise DataError(f"{where}: the label must be an integer class index, got {value!r}")
    if isinstance(value, numbers.Integral):
        number = int(value)
    else:
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{where}: the label must be an integer class index, got {value!r}") from None
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise DataError(f"{where}: the label must be an integer class index, got {value!r}")
        number = int(as_float)
    if abs(number) > _LARGEST_LABEL:
        raise DataError(f"{where}: the label {number} is not a class index (labels are 0 .. classes - 1)")
    return number


def _labels_from(held: Any, name: str, indices: torch.Tensor) -> torch.Tensor:
    """A ``labels`` / ``targets`` attribute as one integer tensor, checked as item labels are: whole
    numbers (fractions are refused, not truncated), not strings or None; the first bad one is named."""
    try:
        full = torch.as_tensor(held)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        full = None
    if full is None or full.dtype == torch.bool or full.is_complex() or full.numel() != len(held):
        for i, value in enumerate(held):  # name the first value that is not a class index
            _as_label(value, f"{name}.labels[{i}]")
        raise DataError(f"{name}: the labels attribute must hold one integer per sample, got {type(held).__name__}")
    full = full.flatten()
    if full.is_floating_point():
        bad = torch.nonzero(~torch.isfinite(full) | (full != full.round())).flatten()
        if bad.numel():
            i = int(bad[0])
            raise DataError(f"{name}.labels[{i}]: the label must be an integer class index, got {full[i].item()!r}")
        if full.numel() and float(full.abs().max()) > _LARGEST_LABEL:
            i = int(full.abs().argmax())
            raise DataError(f"{name}.labels[{i}]: the label {full[i].item():.0f} is not a class index")
    return full.long()[indices]


def _check_modality_name(m: Any, where: str) -> None:
    """A modality name becomes a key of ``nn.ModuleDict`` (encoders, heads): a non-empty string
    without '.', and not a name ``nn.ModuleDict`` already uses (``items``, ``training``)."""
    if not isinstance(m, str) or not m or "." in m or (hasattr(_PROBE, m) and m not in _PROBE._modules):
        raise DataError(f"{where}: {m!r} cannot name a modality (a non-empty name without '.', "
                        "and not one of nn.ModuleDict's own attributes)")


_PROBE = nn.ModuleDict()


def _check_item(item: Any, where: str) -> None:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping)):
        raise DataError(f"{where}: an item must be (dict of tensors, label), got {type(item).__name__}"
                        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
    inputs = item[0]
    if not inputs:
        raise DataError(f"{where}: the inputs dict is empty; name at least one modality")
    for m, x in inputs.items():
        _check_modality_name(m, where)
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{where}: inputs must map modality names to tensors; {m!r} holds {type(x).__name__}")
        if x.dim() == 0:
            raise DataError(f"{where}: modality {m!r} is a 0-dim tensor; give each sample at least one dimension "
                            "(e.g. x.reshape(1))")
        if x.numel() == 0:
            raise DataError(f"{where}: modality {m!r} has no values (shape {tuple(x.shape)}); a zero-width "
                            "modality carries nothing to learn from")
        if x.dtype == torch.bool or x.is_complex():
            raise DataError(f"{where}: modality {m!r} holds {x.dtype} values; give real numbers")


Layout = dict  # modality -> (shape of one sample, dtype)


def _layout_of(inputs: Mapping) -> Layout:
    return {m: (tuple(x.shape), x.dtype) for m, x in inputs.items()}


def _check_layout(inputs: Mapping, layout: Layout, where: str, first: str) -> None:
    """Every item has the modalities, shapes and dtypes of the split's first one (``first`` names it)."""
    for m, (shape, dtype) in layout.items():
        if m not in inputs:
            raise DataError(f"{where}: no modality {m!r}; the item has {sorted(inputs)}, {first} has {sorted(layout)}")
        x = inputs[m]
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise DataError(f"{where}: modality {m!r} is {x.dtype} of shape {tuple(x.shape)}, but {first}'s is "
                            f"{dtype} of shape {shape}; every item must match")


class UserDataset(Dataset):
    """A user's map-style dataset seen through what the trainer needs: ``labels`` (one tensor),
    ``num_classes``, ``modalities``, ``subset(indices)``, ``select(modalities)``, and
    ``dataset[list of indices]`` returning a stacked batch. Nothing is copied or loaded ahead: an
    item is read from the wrapped dataset when the loader asks for it.

    Checked as the data is first read: the first item fixes the split's ``layout`` (modalities,
    each one's shape and dtype); every item read later, in the label pass (which reads every item
    when there is no ``labels`` attribute) or in a batch, must match it, else a ``DataError`` names
    the split and index. A ``__getitem__`` that fails (an ``IndexError`` below its ``__len__``) is
    named the same way."""

    def __init__(self, base: Dataset, name: str = "dataset", indices: torch.Tensor | None = None,
                 modalities: tuple[str, ...] | None = None, labels: torch.Tensor | None = None,
                 num_classes: int | None = None, layout: Layout | None = None) -> None:
        self.base, self.name = base, name
        try:
            n = len(base)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the user's __len__: name it
            raise DataError(f"{name}: len() of the dataset failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(n, int) or n < 0:
            raise DataError(f"{name}: __len__ must return a count, got {n!r}")
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if layout is None:
            if not len(self.indices):
                raise DataError(f"{name}: the split is empty")
            first = int(self.indices[0])
            item = self._read(first)
            layout = {m: v for m, v in _layout_of(item[0]).items() if modalities is None or m in modalities}
        self.layout = layout
        self._first = f"{name}[{int(self.indices[0])}]" if len(self.indices) else name
        self._modalities = tuple(modalities) if modalities is not None else tuple(layout)
        self.labels = self._read_labels() if labels is None else labels
        if num_classes is None:
            declared = getattr(base, "num_classes", None)
            if declared is not None and (isinstance(declared, bool) or not isinstance(declared, numbers.Integral)):
                raise DataError(f"{name}: the num_classes attribute must be an integer, got {declared!r}")
            num_classes = int(declared or 0) or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        self.num_classes = int(num_classes)

    def _read(self, where: int) -> Any:
        """Item ``where`` of the wrapped dataset, its form checked; a failing read is named."""
        try:
            item = self.base[where]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's __getitem__: name the split and index
            text = " ".join(str(exc).split())[:200]
            raise DataError(f"{self.name}[{where}]: reading the item failed ({type(exc).__name__}: {text}); "
                            f"the dataset's __len__ is {len(self.base)}") from None  # type: ignore[arg-type]
        _check_item(item, f"{self.name}[{where}]")
        return item

    def _read_labels(self) -> torch.Tensor:
        for attr in ("labels", "targets"):
            held = getattr(self.base, attr, None)
            if held is not None and hasattr(held, "__len__") and len(held) == len(self.base):  # type: ignore[arg-type]
                return _labels_from(held, self.name, self.indices)
        labels = []
        for i in self.indices.tolist():  # every item is read once here: check its layout too
            item = self._read(i)
            _check_layout(item[0], self.layout, f"{self.name}[{i}]", self._first)
            labels.append(_as_label(item[1], f"{self.name}[{i}]"))
        return torch.tensor(labels, dtype=torch.long)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities kept (all of the first item's keys unless ``select`` chose some)."""
        return self._modalities

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, index):
        if isinstance(index, (list, tuple, torch.Tensor)):  # a batch: one stacked tensor per modality
            items = [self[int(i)] for i in index]
            return ({m: torch.stack([it[0][m] for it in items]) for m in self._modalities},
                    torch.stack([it[1] for it in items]))
        where = int(self.indices[index])
        item = self._read(where)
        inputs = item[0]
        _check_layout(inputs, {m: self.layout[m] for m in self._modalities}, f"{self.name}[{where}]", self._first)
        label = _as_label(item[1], f"{self.name}[{where}]")
        if not 0 <= label < self.num_classes:
            raise DataError(f"{self.name}[{where}]: label {label} is outside [0, {self.num_classes})")
        return {m: inputs[m] for m in self._modalities}, torch.tensor(label, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the wrapped dataset, for per-epoch augmentation (if it has ``set_epoch``)."""
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def subset(self, indices: torch.Tensor) -> "UserDataset":
        """A view of the samples at ``indices`` (nothing is read or copied)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        view = UserDataset(self.base, self.name, self.indices[idx], self._modalities, self.labels[idx],
                           self.num_classes, self.layout)
        view._first = self._first
        return view

    def select(self, modalities: list[str] | tuple[str, ...]) -> "UserDataset":
        """A view with only the named modalities (in that order)."""
        unknown = [m for m in modalities if m not in self._modalities]
        if unknown:
            raise KeyError(f"unknown modalities {unknown}; this dataset has {list(self._modalities)}")
        view = UserDataset(self.base, self.name, self.indices, tuple(modalities), self.labels, self.num_classes,
                           self.layout)
        view._first = self._first
        return view


def _split_layout(ds: Any) -> Layout:
    """A split's modalities -> (shape of one sample, dtype)."""
    if isinstance(ds, UserDataset):
        return {m: ds.layout[m] for m in ds.modalities}
    return {m: (tuple(x.shape[1:]), x.dtype) for m, x in ds.inputs.items()}


def _wrap(dataset: Any, where: str) -> TensorMultimodalDataset | UserDataset:
    if isinstance(dataset, (TensorMultimodalDataset, UserDataset)):
        return dataset
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(f"{where}: expected a map-style Dataset (with __getitem__ and __len__), "
                        f"got {type(dataset).__name__}")
    return UserDataset(dataset, where)


def as_splits(data: Any, name: str = "custom", val_fraction: float = 0.1, split_seed: int = 0,
              modalities: list[str] | tuple[str, ...] | None = None) -> DataSplits:
    """``DataSplits`` from a dict ``{"train", "val" (optional), "test"}`` of map-style Datasets (or
    ``DataSplits`` as is). Without ``val`` a stratified ``val_fraction`` of train is held out
    (``split_seed``), exactly as for the built-in data; ``modalities`` keeps those, in that order."""
    if isinstance(data, DataSplits):
        parts: dict[str, Any] = {"train": data.train, "val": data.val, "test": data.test}
    elif isinstance(data, Mapping):
        extra = sorted(set(data) - set(SPLIT_KEYS))
        if extra:
            raise DataError(f"dataset {name!r}: unknown split(s) {extra}; give 'train', 'test' and optionally 'val'")
        missing = [k for k in ("train", "test") if data.get(k) is None]
        if missing:
            raise DataError(f"dataset {name!r}: no {' or '.join(repr(k) for k in missing)} split; give 'train', "
                            "'test' and optionally 'val' (then carved from train)")
        parts = {k: data[k] for k in SPLIT_KEYS if data.get(k) is not None}
    else:
        raise DataError(f"dataset {name!r}: expected a dict of 'train', 'val' (optional) and 'test' Datasets, "
                        f"got {type(data).__name__}")
    wrapped = {k: _wrap(ds, f"{name}:{k}") for k, ds in parts.items()}
    mods = {k: tuple(ds.modalities) for k, ds in wrapped.items()}
    if len(set(mods.values())) > 1:
        raise DataError(f"dataset {name!r}: the splits have different modalities {mods}")
    for m in mods["train"]:  # a DataSplits of tensors is not read item by item: its names are checked here
        _check_modality_name(m, f"dataset {name!r}")
    layouts = {k: _split_layout(ds) for k, ds in wrapped.items()}
    for k, layout in layouts.items():  # a test split shaped unlike train used to crash after an epoch
        for m in layout:
            if layout[m] != layouts["train"][m]:
                (shape, dtype), (want, want_dtype) = layout[m], layouts["train"][m]
                raise DataError(f"dataset {name!r}: modality {m!r} is {dtype} of shape {shape} in split {k!r} "
                                f"but {want_dtype} of shape {want} in 'train'; every split must match")
    for k, ds in wrapped.items():
        if len(ds) and int(ds.labels.max()) >= ds.num_classes:  # a num_classes attribute below the labels
            raise DataError(f"dataset {name!r}: split {k!r} has label {int(ds.labels.max())}, but it declares "
                            f"num_classes={ds.num_classes}")
    classes = max(ds.num_classes for ds in wrapped.values())
    for k, ds in wrapped.items():
        if len(ds) and (int(ds.labels.min()) < 0):
            raise DataError(f"dataset {name!r}: split {k!r} has a negative label {int(ds.labels.min())}")
    total = sum(len(ds) for ds in wrapped.values())
    if classes > total:
        raise DataError(f"dataset {name!r}: {classes} classes (largest label + 1, or num_classes) for {total} "
                        "samples in all; labels must be class indices 0 .. classes - 1")
    seen = torch.unique(wrapped["train"].labels)
    if classes < 2 or seen.numel() < 2:
        raise DataError(f"dataset {name!r}: the train split has a single class "
                        f"({int(seen[0]) if seen.numel() else 'none'}); a classifier needs at least 2")
        if isinstance(ds, UserDataset):
            ds.num_classes = classes
        elif ds.num_classes != classes:
            wrapped[k] = TensorMultimodalDataset(ds.inputs, ds.labels, classes, ds.modality_kinds)
    if "val" not in wrapped:
        keep, held = stratified_split(wrapped["train"].labels, val_fraction, split_seed)
        wrapped["val"] = wrapped["train"].subset(held)
        wrapped["train"] = wrapped["train"].subset(keep)
    if modalities:
        available = list(wrapped["train"].modalities)
        unknown = [m for m in modalities if m not in available]
        if unknown:
            raise DataError(f"data.modalities: dataset {name!r} has no modality {unknown}; it has {available}")
        wrapped = {k: ds.select(list(modalities)) for k, ds in wrapped.items()}
    for k in SPLIT_KEYS:
        if not len(wrapped[k]):
            raise DataError(f"dataset {name!r}: the {k} split is empty")
    return DataSplits(wrapped["train"], wrapped["val"], wrapped["test"], name=name,
                      fitted=dict(data.fitted) if isinstance(data, DataSplits) else {})


def make_loader(name: str, source: Any, on_load: Callable[[DataSplits], None] | None = None) -> Callable[..., DataSplits]:
    """A loader for ``DATASETS``: ``source`` is the data (a dict of splits, ``DataSplits``) or a
    builder ``build(**options)`` returning it. The loader's options (its signature, which the config
    checks keys against) are the builder's keyword parameters plus ``val_fraction``, ``split_seed``
    and ``modalities`` (``None``: all the data's modalities)."""
    builder = source if callable(source) and not isinstance(source, (Mapping, DataSplits, Dataset)) else None
    params: list[inspect.Parameter] = []
    if builder is not None:
        try:
            sig = inspect.signature(builder)
        except (TypeError, ValueError):
            sig = inspect.Signature()
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is inspect.Parameter.empty:
                raise DataError(f"dataset {name!r}: the builder {getattr(builder, '__name__', builder)!r} has a "
                                f"parameter {p.name!r} without a default; every option needs one")
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    own = {p.name for p in params}
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
               for k, v in COMMON_OPTIONS.items() if k not in own]

    def load(**options: Any) -> DataSplits:
        common = {k: options.get(k, COMMON_OPTIONS[k]) for k in COMMON_OPTIONS}
        if builder is None:
            data = source
        else:
            data = builder(**{k: v for k, v in options.items() if k in own})
            if data is None:
                raise DataError(f"dataset {name!r}: the builder returned None; it must return a dict of "
                                "'train', 'val' (optional) and 'test' Datasets")
        full = as_splits(data, name, common["val_fraction"], common["split_seed"])
        if on_load is not None:
            on_load(full)
        if common["modalities"]:
            return as_splits(full, name, modalities=common["modalities"])
        return full

    load.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    load.__name__ = f"load_{name}"
    load.__doc__ = getattr(builder, "__doc__", None) or f"The user dataset {name!r}."
    return load
