"""Women's E-Commerce Clothing Reviews: text + table in one CSV (``../shared/data/reviews/``).

23,486 reviews. Two modalities: ``text`` (title and review body joined, as token ids of a
word-level tokenizer trained on the training split only, ``equimodal.data.text``) and ``table``
(product id, division, department and class as categories; age and positive-feedback count as
standardised numbers, ``equimodal.data.table``; both fitted on the training split only). Target
``recommended`` (``Recommended IND``, 2 classes, the default) or ``rating`` (1-5 stars -> classes 0-4).

File: ``<source>/reviews/reviews.csv`` (``source``: ``data.source``, else ``$EQUIMODAL_DATA``, else
``../shared/data``); ``source`` may also name the CSV file or its folder. Read with Python's
``csv`` module (the texts hold commas, quotes and newlines). A row whose target is not a valid
value stops the load with its line number (nothing is skipped); an empty text or cell is kept (an
empty text is all padding).

Split: no official one; a seeded stratified ``test_fraction`` of every class for test, then
``val_fraction`` of the rest for validation (``split_seed``), the same on every machine.

The fitted preprocessing (``tokenizer.json``, ``table.json``) travels in ``DataSplits.fitted``: the
Trainer saves it in the run folder's ``data/``, and ``eval`` / ``--resume`` read it back through the
``fitted`` option, so a run is always evaluated with its own vocabulary. ``tokenizer``: a
pretrained model's ``tokenizer.json`` (or its folder) to use instead of training one (for
``model.encoder={text: hf:<folder>}``).
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from .base import DataSplits, TensorMultimodalDataset, stratified_split
from .table import TableCodec
from .text import encode, load_tokenizer, padding_id, tokenizer_from_json, train_tokenizer
from ..errors import DataError, DataNotFoundError

FILE = "reviews/reviews.csv"
TEXT_COLUMNS = ("Title", "Review Text")
CATEGORICAL = ("Clothing ID", "Division Name", "Department Name", "Class Name")
NUMERIC = ("Age", "Positive Feedback Count")
TARGETS = {"recommended": ("Recommended IND", ("0", "1")), "rating": ("Rating", ("1", "2", "3", "4", "5"))}
MODALITIES = ("text", "table")


def reviews_file(source: str = "") -> Path:
    """The CSV: ``source`` as a file, a folder holding ``reviews.csv``, or a data root holding ``reviews/``."""
    from .avdigits import default_source

    root = Path(source).expanduser() if source else default_source()
    for candidate in (root, root / "reviews.csv", root / FILE):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(f"reviews: {root / FILE} not found (set data.source or EQUIMODAL_DATA to the folder "
                            "holding reviews/; see shared/data/reviews/SOURCE.md for where the file comes from)")


def read_rows(path: Path, target: str) -> tuple[list[dict[str, str]], torch.Tensor]:
    """Every row of the CSV (a dict of strings) and its class index; ``DataError`` naming the file and
    line for a missing column or a row whose target is not one of the target's values."""
    column, values = TARGETS[target]
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in (*TEXT_COLUMNS, *CATEGORICAL, *NUMERIC, column) if c not in header]
            if missing:
                raise DataError(f"{path}: no column(s) {missing}; the header has {header}")
            rows, labels = [], []
            for row in reader:
                raw = (row.get(column) or "").strip()
                if raw.endswith(".0"):
                    raw = raw[:-2]
                if raw not in values:
                    raise DataError(f"{path}, line {reader.line_num}: {column} is {row.get(column)!r}, not one of "
                                    f"{list(values)}")
                rows.append(row)
                labels.append(values.index(raw))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, torch.tensor(labels, dtype=torch.long)


def review_text(row: dict[str, str]) -> str:
    """Title and body joined by a newline (either may be empty)."""
    return "\n".join(t for t in ((row.get(c) or "").strip() for c in TEXT_COLUMNS) if t)


def reviews_splits(source: str = "", target: str = "recommended", max_len: int = 128, vocab_size: int = 20000,
                   min_frequency: int = 2, tokenizer: str = "", fitted: str = "", test_fraction: float = 0.2,
                   val_fraction: float = 0.1, split_seed: int = 0,
                   modalities: list[str] = MODALITIES) -> DataSplits:
    """Train / validation / test of the reviews (see the module docstring)."""
    if target not in TARGETS:
        raise DataError(f"reviews: data.target={target!r} is not one of {list(TARGETS)}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise DataError(f"reviews has no modality {unknown or '[]'}; available: {list(MODALITIES)}")
    if max_len < 1 or vocab_size < 3 or min_frequency < 1:
        raise DataError(f"reviews: max_len ({max_len}) and min_frequency ({min_frequency}) must be >= 1, "
                        f"vocab_size ({vocab_size}) >= 3")
    path = reviews_file(source)
    rows, labels = read_rows(path, target)
    rest, test_idx = stratified_split(labels, test_fraction, seed=10_000 + split_seed)
    keep, held = stratified_split(labels[rest], val_fraction, seed=split_seed)
    train_idx, val_idx = rest[keep], rest[held]
    train_rows = [rows[i] for i in train_idx.tolist()]

    saved = Path(fitted) if fitted else None
    if saved is not None and not saved.is_dir():
        raise DataNotFoundError(f"reviews: data.fitted={fitted} is not a folder (a run's data/ folder)")

    def read_saved(name: str) -> str | None:
        if saved is None:
            return None
        if not (saved / name).is_file():
            raise DataNotFoundError(f"reviews: {saved / name} not found (the run's fitted preprocessing)")
        return (saved / name).read_text(encoding="utf-8")

    inputs, kinds, state = {}, {}, {}
    if "text" in modalities:
        text = read_saved("tokenizer.json")
        if text is not None:
            tok = tokenizer_from_json(text, str(saved / "tokenizer.json"))
        elif tokenizer:
            tok = load_tokenizer(tokenizer)
        else:
            tok = train_tokenizer((review_text(r) for r in train_rows), vocab_size=vocab_size,
                                  min_frequency=min_frequency)
        inputs["text"] = encode(tok, [review_text(r) for r in rows], max_len)
        kinds["text"] = {"kind": "tokens", "vocab_size": tok.get_vocab_size(), "padding_id": padding_id(tok)}
        state["tokenizer.json"] = tok.to_str()
    if "table" in modalities:
        text = read_saved("table.json")
        codec = (TableCodec.from_json(text, str(saved / "table.json")) if text is not None
                 else TableCodec(CATEGORICAL, NUMERIC).fit(train_rows))
        inputs["table"] = codec.transform(rows)
        kinds["table"] = codec.kind()
        state["table.json"] = codec.to_json()
    full = TensorMultimodalDataset({m: inputs[m] for m in modalities}, labels, len(TARGETS[target][1]), kinds)
    return DataSplits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx), name="reviews",
                      fitted=state)
