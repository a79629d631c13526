"""PNG figures for a benchmark folder (matplotlib, headless)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _by_label(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["label"], []).append(r)
    return out


def _mean_curve(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> np.ndarray:
    curves = []
    for r in runs:
        vals = [(rec[key][sub] if sub else rec[key]) if key in rec else np.nan for rec in r["history"]]
        curves.append(vals)
    n = min(len(c) for c in curves)
    with warnings.catch_warnings():  # epochs where a key is absent (e.g. a pre-training stage) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.array([c[:n] for c in curves], dtype=float), axis=0)


#: above this many rows one plot is a tangle: one small panel per row, each over the reference row
SMALL_MULTIPLES_FROM = 9


def accuracy_per_epoch(results: list[dict[str, Any]], path: Path) -> Path:
    """Validation accuracy per epoch, mean over seeds: one plot for a few rows; for many, one
    panel per row with the first row (joint, where the grid has it) drawn in grey in each."""
    groups = _by_label(results)
    curves = {label: 100 * _mean_curve(runs, "val_acc") for label, runs in groups.items()}
    marker = "." if max(len(c) for c in curves.values()) < 40 else None
    if len(curves) < SMALL_MULTIPLES_FROM:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, curve in curves.items():
            ax.plot(np.arange(1, len(curve) + 1), curve, label=label, marker=marker)
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel("validation accuracy, fused (%)")
        ax.set_title("Validation accuracy per epoch (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    else:
        reference = "joint" if "joint" in curves else next(iter(curves))
        others = [label for label in curves if label != reference]
        cols = 6
        rows = -(-len(others) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows + 0.6), sharex=True, sharey=True,
                                 squeeze=False)
        ref = curves[reference]
        for ax, label in zip(axes.flat, others):
            ax.plot(np.arange(1, len(ref) + 1), ref, color="0.6", lw=1.2)
            curve = curves[label]
            ax.plot(np.arange(1, len(curve) + 1), curve, color="C0", lw=1.4, marker=marker, ms=3)
            ax.set_title(label, fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(others):]:
            ax.axis("off")
        fig.suptitle(f"Validation accuracy per epoch, fused (%; mean over seeds); grey: {reference}", fontsize=10)
        fig.supxlabel("epoch (all stages)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coefficient_traces(results: list[dict[str, Any]], path: Path) -> Path | None:
    """k_u and rho_u per epoch for every method that logs them (the OGM family)."""
    groups = {lab: runs for lab, runs in _by_label(results).items() if any(k.startswith("k/") for k in runs[0]["history"][-1])}
    if not groups:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, runs in groups.items():
        for key in sorted(k for k in runs[0]["history"][-1] if k.startswith(("k/", "rho/"))):
            ax = axes[0] if key.startswith("k/") else axes[1]
            curve = _mean_curve(runs, key)
            ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{label}: {key.split('/')[1]}")
    axes[0].set_title("modulation coefficient k (epoch mean)")
    axes[1].set_title("discrepancy ratio rho (epoch mean)")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_bars(results: list[dict[str, Any]], path: Path) -> Path | None:
    groups = _by_label(results)
    modalities = list(dict.fromkeys(m for r in results for m in r.get("probe_acc_by_modality", {})))
    if not modalities:
        return None
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.45 * len(groups) * len(modalities))), 4.6))
    width = 0.8 / len(modalities)
    x = np.arange(len(groups))
    for j, m in enumerate(modalities):
        means, sds = [], []
        for runs in groups.values():
            vals = [100 * r["probe_acc_by_modality"][m] for r in runs if m in r["probe_acc_by_modality"]]
            means.append(np.mean(vals) if vals else np.nan)
            sds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
        ax.bar(x + (j - (len(modalities) - 1) / 2) * width, means, width, yerr=sds, capsize=2, label=m)
    ax.set_xticks(x, list(groups), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_title("How well each encoder was trained (mean ± sd over seeds)")
    finite = [v for r in results for v in r.get("probe_acc_by_modality", {}).values()]
    ax.set_ylim(max(0, 100 * min(finite) - 10), 100)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_plots(results: list[dict[str, Any]], out: Path) -> list[Path]:
    made = [accuracy_per_epoch(results, out / "accuracy_per_epoch.png"),
            coefficient_traces(results, out / "coefficients.png"),
            probe_bars(results, out / "linear_probe.png")]
    return [p for p in made if p is not None]
