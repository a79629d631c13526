"""Evaluation measures: accuracy, macro-F1, and the linear-probe accuracy of a frozen encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if labels.numel() else float("nan")


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1; a class absent from both labels and predictions is skipped."""
    conf = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    tp = conf.diag().float()
    support = conf.sum(1).float()
    predicted = conf.sum(0).float()
    denom = support + predicted
    present = denom > 0
    f1 = torch.where(present, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1[present].mean()) if present.any() else float("nan")


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                          max_iter: int = 200) -> float:
    """Fit a fresh multinomial logistic regression on frozen training features; test accuracy.

    Features are standardised with training statistics; full-batch L-BFGS from zero weights, so the
    result is deterministic. This is the OGM-GE paper's measure of how well an encoder was trained.
    """
    return linear_probe_scores(train_x, train_y, {"test": (test_x, test_y)}, num_classes, weight_decay, max_iter)["test"]


def linear_probe_scores(train_x: torch.Tensor, train_y: torch.Tensor,
                        evaluations: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                        weight_decay: float = 1e-3, max_iter: int = 200) -> dict[str, float]:
    """One probe fitted on the training features (as ``linear_probe_accuracy``), scored on each of
    ``evaluations`` (name -> features, labels): e.g. validation for decisions, test for reporting."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    xtr = ((train_x - mean) / std).double()
    w = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return {name: accuracy((((x - mean) / std).double() @ w + b).argmax(1), y) if len(y) else float("nan")
                for name, (x, y) in evaluations.items()}
