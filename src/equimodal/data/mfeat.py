"""UCI Multiple Features (mfeat): six views of the same 2,000 handwritten digits (200 per class).

Real data with more than two modalities, for checking the N-modality rules (ratios over the mean
of the others, N-way fusion) outside synthetic data. Each view is a feature vector (MLP encoders):

===== ======== ===============================================
view  features what it measures
===== ======== ===============================================
fac   216      profile correlations
fou   76       Fourier coefficients of the character shape
kar   64       Karhunen-Loeve coefficients
mor   6        morphological features
pix   240      pixel averages in 2 x 3 windows
zer   47       Zernike moments
===== ======== ===============================================

Files: ``<source>/mfeat/mfeat-<view>.csv`` (a header line, 2,000 rows, the label last; row i of
every view is the same digit). ``source`` defaults to ``$EQUIMODAL_DATA`` or ``../shared/data``.
There is no official split: a seeded stratified one (``test_per_class`` digits per class for test,
then ``val_fraction`` of the rest for validation). Each view is standardised with the mean and
standard deviation of the training part only (validation and test never inform it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DataSplits, TensorMultimodalDataset, stratified_split
from ..errors import DataError, DataNotFoundError

VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
FEATURES = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
ROWS, CLASSES = 2000, 10


def read_view(folder: Path, view: str) -> tuple[np.ndarray, np.ndarray]:
    """One view's features (2000 x d, float32) and labels (2000, int64), checked for shape and labels."""
    path = folder / f"mfeat-{view}.csv"
    if not path.is_file():
        raise DataNotFoundError(f"mfeat view {view!r}: {path} not found (set EQUIMODAL_DATA or data.source to the "
                                "folder holding mfeat/; see shared/data/mfeat/SOURCE.md for where the files come from)")
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: not a numeric CSV ({exc})") from exc
    if table.shape != (ROWS, FEATURES[view] + 1):
        raise DataError(f"{path}: expected {ROWS} rows x {FEATURES[view] + 1} columns (features + label), "
                        f"found {table.shape[0]} x {table.shape[1]}")
    labels = table[:, -1]
    if not np.all(np.isfinite(table)) or np.any(labels != np.round(labels)) or labels.min() < 0 or labels.max() >= CLASSES:
        raise DataError(f"{path}: non-finite values or labels outside 0-{CLASSES - 1}")
    return table[:, :-1].astype(np.float32), labels.astype(np.int64)


def split_indices(labels: torch.Tensor, test_per_class: int, val_fraction: float, split_seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of train / validation / test: ``test_per_class`` rows per class for test, then a
    stratified ``val_fraction`` of the rest for validation (seeded; disjoint; together every row)."""
    rest, test_idx = stratified_split(labels, test_per_class / (ROWS // CLASSES), seed=10_000 + split_seed)
    train_idx, val_idx = stratified_split(labels[rest], val_fraction, seed=split_seed)
    return rest[train_idx], rest[val_idx], test_idx


def mfeat_splits(source: str = "", modalities: list[str] = VIEWS, test_per_class: int = 50,
                 val_fraction: float = 0.1, split_seed: int = 0) -> DataSplits:
    """Train / validation / test of mfeat with the chosen views (``modalities``, any subset, in order)."""
    from .avdigits import default_source

    unknown = [m for m in modalities if m not in VIEWS]
    if unknown or not modalities:
        raise DataError(f"mfeat has no view(s) {unknown or '[]'}; available: {list(VIEWS)}")
    if not 0 < test_per_class < ROWS // CLASSES:
        raise DataError(f"mfeat option test_per_class must be in 1..{ROWS // CLASSES - 1}, got {test_per_class}")
    folder = Path(source) / "mfeat" if source else default_source() / "mfeat"
    if source and not folder.is_dir() and Path(source).name == "mfeat":
        folder = Path(source)
    views, labels = {}, None
    for view in modalities:
        x, y = read_view(folder, view)
        if labels is not None and not np.array_equal(labels, y):
            raise DataError(f"{folder}/mfeat-{view}.csv: labels differ from those of the other views (rows not aligned)")
        views[view], labels = torch.from_numpy(x), y
    labels_t = torch.from_numpy(labels)
    train_idx, val_idx, test_idx = split_indices(labels_t, test_per_class, val_fraction, split_seed)
    for view, x in views.items():  # standardise with training statistics only
        mean, std = x[train_idx].mean(0), x[train_idx].std(0)
        views[view] = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    full = TensorMultimodalDataset({m: views[m] for m in modalities}, labels_t, CLASSES)
    return DataSplits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx), name="mfeat")
