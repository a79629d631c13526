"""Numeric and categorical columns of a table as one modality, fitted on the training split only.

``TableCodec(categorical=[...], numeric=[...]).fit(train_rows)`` learns each categorical column's
values (code 1..K in sorted order; 0 is "missing or not seen in training") and each numeric column's
mean and standard deviation over the training rows; ``transform(rows)`` writes one float row per
record, ``[codes..., standardised numbers...]`` (a missing or unreadable number becomes 0, the
training mean), which ``TabularEncoder`` (``model.encoder=tabular``, or the ``table`` kind that
``kind()`` declares) embeds and reads. ``to_json`` / ``from_json`` keep the fitted state with a run.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import torch

from ..errors import DataError


def _number(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


class TableCodec:
    """Category codes and standardised numbers of a table's rows (see the module docstring)."""

    def __init__(self, categorical: Sequence[str], numeric: Sequence[str]) -> None:
        self.categorical, self.numeric = list(categorical), list(numeric)
        self.categories: dict[str, list[str]] = {}
        self.stats: dict[str, tuple[float, float]] = {}

    @property
    def fitted(self) -> bool:
        return len(self.categories) == len(self.categorical) and len(self.stats) == len(self.numeric)

    def fit(self, rows: Sequence[Mapping[str, Any]]) -> "TableCodec":
        """Learn the categories and the numbers' statistics from ``rows`` (the training split only)."""
        if not rows:
            raise DataError("TableCodec.fit: no training rows")
        for c in self.categorical:
            self.categories[c] = sorted({str(r.get(c) or "").strip() for r in rows} - {""})
        for c in self.numeric:
            values = torch.tensor([_number(r.get(c)) for r in rows], dtype=torch.float64)
            seen = values[~torch.isnan(values)]
            mean = float(seen.mean()) if seen.numel() else 0.0
            std = float(seen.std()) if seen.numel() > 1 else 0.0
            self.stats[c] = (mean, std if std > 0 else 1.0)
        return self

    def transform(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """``len(rows) x (categorical + numeric)`` float32: codes, then standardised numbers."""
        if not self.fitted:
            raise DataError("TableCodec.transform before fit (or from_json)")
        lookup = {c: {v: i + 1 for i, v in enumerate(vals)} for c, vals in self.categories.items()}
        out = []
        for r in rows:
            codes = [float(lookup[c].get(str(r.get(c) or "").strip(), 0)) for c in self.categorical]
            numbers = []
            for c in self.numeric:
                value, (mean, std) = _number(r.get(c)), self.stats[c]
                numbers.append(0.0 if math.isnan(value) else (value - mean) / std)
            out.append(codes + numbers)
        return torch.tensor(out, dtype=torch.float32).reshape(len(rows), len(self.categorical) + len(self.numeric))

    def kind(self) -> dict[str, Any]:
        """The ``modality_kinds`` entry of this table (``TabularEncoder``'s layout)."""
        return {"kind": "table", "categories": [len(self.categories[c]) + 1 for c in self.categorical],
                "numeric": len(self.numeric)}

    def to_json(self) -> str:
        return json.dumps({"categorical": self.categorical, "numeric": self.numeric, "categories": self.categories,
                           "stats": {c: list(v) for c, v in self.stats.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "table.json") -> "TableCodec":
        try:
            state = json.loads(text)
            codec = cls(state["categorical"], state["numeric"])
            codec.categories = {c: list(map(str, state["categories"][c])) for c in codec.categorical}
            codec.stats = {c: (float(state["stats"][c][0]), float(state["stats"][c][1])) for c in codec.numeric}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise DataError(f"{where}: not a fitted table codec ({exc})") from None
        return codec
