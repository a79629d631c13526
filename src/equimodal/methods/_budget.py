"""Schedules that the papers give as a share of their training budget (a warm-up of 10 of 70
epochs), resolved against the run's own budget, so that a short run keeps the paper's proportions
instead of spending every epoch in warm-up."""
from __future__ import annotations


def share_of_budget(option: int | None, epochs: int, share: tuple[int, int], paper: int, low: int = 1) -> int:
    """``option`` when the user set it; else ``share`` (numerator, denominator) of ``epochs``, at
    least ``low``; ``paper`` (the paper's fixed value) when the budget is not known (``epochs`` 0)."""
    if option is not None:
        return int(option)
    if epochs <= 0:
        return paper
    numerator, denominator = share
    return max(low, int(epochs * numerator / denominator + 0.5))


def warmup_notes(method: str, warmup: int, epochs: int, consequence: str) -> list[str]:
    """The one line a loop prints when a warm-up of ``warmup`` epochs covers a whole stage of
    ``epochs`` (``consequence``: what the method then never does), else none."""
    if warmup < epochs:
        return []
    return [f"{method}: warmup_epochs={warmup} covers all {epochs} epochs of the stage, so {consequence}; "
            "lower method.warmup_epochs or raise train.epochs"]


def check_epoch_option(key: str, value: object, low: int) -> None:
    """An epoch-count option: null (a share of the run's budget) or an integer >= ``low``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"{key} must be null (a share of the run's epochs) or an integer >= {low}, got {value!r}")
