"""Datasets and preparation (imports nothing from methods/, models/ or train/).

``load_dataset(name, **options)`` builds train/val/test splits; options are checked against the
loader's signature, so an unknown key names itself and the valid ones.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from .base import DataSplits, TensorMultimodalDataset, stratified_split
from .avclips import PRESETS, AVClipDataset, av_clip_splits
from .avdigits import avdigits_splits
from .mfeat import VIEWS as MFEAT_VIEWS, mfeat_splits
from .synthetic import synthetic_splits
from ..errors import DataError

#: name -> (loader, default options that differ from the loader's own defaults)
DATASETS: dict[str, tuple[Callable[..., DataSplits], dict[str, Any]]] = {
    "synthetic": (synthetic_splits, {}),
    "synthetic3": (synthetic_splits, {"modalities": ["visual", "audio", "tactile"]}),
    "avdigits": (avdigits_splits, {}),
    "mfeat": (mfeat_splits, {}),
    **{name: (functools.partial(av_clip_splits, name), {}) for name in PRESETS},  # the paper's datasets
}


#: name -> every modality the dataset can provide (``data.modalities`` picks among them, in order)
DATASET_MODALITIES: dict[str, tuple[str, ...]] = {
    "synthetic": ("visual", "audio", "tactile"), "synthetic3": ("visual", "audio", "tactile"),
    "avdigits": ("audio", "visual"), "mfeat": MFEAT_VIEWS, **{name: ("audio", "visual") for name in PRESETS},
}


def dataset_modalities(name: str, options: dict[str, Any] | None = None) -> list[str]:
    """The modalities a configured dataset yields: ``options["modalities"]`` where the loader takes
    that option, else all of ``DATASET_MODALITIES[name]``."""
    opts = {**dataset_options(name), **(options or {})}
    if "modalities" in opts:
        return list(opts["modalities"])
    return list(DATASET_MODALITIES.get(name, ()))


def dataset_options(name: str) -> dict[str, Any]:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    fn, overrides = DATASETS[name]
    opts = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
    opts.update(overrides)
    return opts


def load_dataset(name: str, **options: Any) -> DataSplits:
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"dataset {name!r} has no option(s) {unknown}; valid options: {sorted(valid)}")
    fn, overrides = DATASETS[name]
    splits = fn(**{**overrides, **options})
    splits.name = name
    return splits


__all__ = ["AVClipDataset", "DATASETS", "DATASET_MODALITIES", "dataset_modalities", "DataSplits", "TensorMultimodalDataset", "dataset_options", "load_dataset",
           "stratified_split", "synthetic_splits"]
