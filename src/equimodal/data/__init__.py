"""Datasets and preparation (imports nothing from methods/, models/ or train/).

``load_dataset(name, **options)`` builds train/val/test splits; options are checked against the
loader's signature, so an unknown key names itself and the valid ones.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable

from .base import DataSplits, TensorMultimodalDataset, stratified_split
from .custom import UserDataset, as_splits, make_loader
from .avclips import PRESETS, AVClipDataset, av_clip_splits
from .avdigits import avdigits_splits
from .mfeat import VIEWS as MFEAT_VIEWS, mfeat_splits
from .reviews import MODALITIES as REVIEWS_MODALITIES, reviews_splits
from .synthetic import synthetic_splits
from .._imports import import_object, is_import_path
from ..errors import ConfigError, DataError

#: name -> (loader, default options that differ from the loader's own defaults)
DATASETS: dict[str, tuple[Callable[..., DataSplits], dict[str, Any]]] = {
    "synthetic": (synthetic_splits, {}),
    "synthetic3": (synthetic_splits, {"modalities": ["visual", "audio", "tactile"]}),
    "avdigits": (avdigits_splits, {}),
    "mfeat": (mfeat_splits, {}),
    "reviews": (reviews_splits, {}),
    **{name: (functools.partial(av_clip_splits, name), {}) for name in PRESETS},  # the paper's datasets
}


#: name -> every modality the dataset can provide (``data.modalities`` picks among them, in order)
DATASET_MODALITIES: dict[str, tuple[str, ...]] = {
    "synthetic": ("visual", "audio", "tactile"), "synthetic3": ("visual", "audio", "tactile"),
    "avdigits": ("audio", "visual"), "mfeat": MFEAT_VIEWS,
    "reviews": REVIEWS_MODALITIES, **{name: ("audio", "visual") for name in PRESETS},
}


#: names of the built-in datasets (``register_dataset`` may not replace them)
BUILTIN_DATASETS = frozenset(DATASETS)


def register_dataset(name: str, source: Any, modalities: list[str] | tuple[str, ...] | None = None) -> str:
    """Make a user's data available by ``name`` to ``load_dataset``, the config (``data.name``), the
    ``Trainer``, ``bench`` and ``diagnose``, in this process. Returns ``name``.

    ``source``: a dict ``{"train", "val" (optional), "test"}`` of map-style Datasets yielding
    ``(dict of tensors, label)``, a ``DataSplits``, or a builder ``build(**options) -> that dict``
    (its keyword parameters become ``data.<option>`` keys). Every user dataset also takes
    ``val_fraction`` and ``split_seed`` (the validation part carved from train when ``val`` is
    absent) and ``modalities`` (``None``: all). ``modalities`` here declares the data's modalities
    ahead, so a config can be checked without building the data; otherwise they are read from the
    data when it is first loaded. Registering a name again replaces it (a rerun notebook cell); the
    built-in names cannot be replaced."""
    if not isinstance(name, str) or not name or name in BUILTIN_DATASETS:
        raise ValueError(f"register_dataset: {name!r} is not a free dataset name (built-in: {sorted(BUILTIN_DATASETS)})")
    DATASETS[name] = (make_loader(name, source, on_load=lambda s: DATASET_MODALITIES.__setitem__(name, s.modalities)), {})
    DATASET_MODALITIES.pop(name, None)
    if modalities is not None:
        DATASET_MODALITIES[name] = tuple(modalities)
    elif isinstance(source, (dict, DataSplits)):  # the data is at hand: read its modalities now
        DATASET_MODALITIES[name] = as_splits(source, name).modalities
    return name


def _known(name: str) -> None:
    """Register ``module:function`` names on first use; a helpful error for any other unknown name."""
    if name in DATASETS:
        return
    if isinstance(name, str) and is_import_path(name):
        register_dataset(name, import_object(name, "data.name"))
        return
    raise KeyError(f"unknown dataset {name!r}; available: {sorted(DATASETS)} (your own data: "
                   "register_dataset(name, ...) in this process, or data.name=my_module:build)")


def dataset_modalities(name: str, options: dict[str, Any] | None = None) -> list[str]:
    """The modalities a configured dataset yields: ``options["modalities"]`` where set, else every
    modality the dataset has (a user dataset not declared at registration is loaded to read them)."""
    opts = {**dataset_options(name), **(options or {})}
    if opts.get("modalities"):
        return list(opts["modalities"])
    if name not in DATASET_MODALITIES and name not in BUILTIN_DATASETS:
        load_dataset(name, **{k: v for k, v in (options or {}).items() if k != "name"})
    return list(DATASET_MODALITIES.get(name, ()))


def dataset_options(name: str) -> dict[str, Any]:
    """Every option of a dataset's loader with its default (the ``data`` section of a config)."""
    _known(name)
    fn, overrides = DATASETS[name]
    opts = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
    opts.update(overrides)
    return opts


def load_dataset(name: str, fitted_dir: str | Path | None = None, **options: Any) -> DataSplits:
    """train / val / test of a built-in or registered dataset (or ``module:function``).

    ``fitted_dir``: a run folder's ``data/`` (what the Trainer saved from ``DataSplits.fitted``: a
    tokenizer, a table's categories and statistics); a loader with a ``fitted`` option reads its
    preprocessing from there instead of fitting it again, so ``eval`` and ``--resume`` see the data
    exactly as the run did. Ignored when the folder does not exist or the loader has no such option."""
    try:
        valid = dataset_options(name)
    except KeyError as exc:
        raise ConfigError(f"data.name: {exc.args[0]}") from None
    if fitted_dir is not None and "fitted" in valid and not options.get("fitted") and Path(fitted_dir).is_dir():
        options["fitted"] = str(fitted_dir)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"dataset {name!r} has no option(s) {unknown}; valid options: {sorted(valid)}")
    fn, overrides = DATASETS[name]
    splits = fn(**{**overrides, **options})
    splits.name = name
    return splits


__all__ = ["AVClipDataset", "BUILTIN_DATASETS", "DATASETS", "DATASET_MODALITIES", "dataset_modalities", "DataSplits",
           "TensorMultimodalDataset", "UserDataset", "as_splits", "dataset_options", "load_dataset", "register_dataset",
           "stratified_split", "synthetic_splits"]
