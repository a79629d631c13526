"""Is my model imbalanced? Train each modality alone and the joint model with the same encoders and
budget; compare each encoder's linear-probe accuracy jointly trained vs alone (the OGM-GE paper's
under-optimisation measure) and show the discrepancy-ratio trace of the joint run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..config import load_config
from ..data import dataset_modalities
from ..errors import EquimodalError
from .bench import run_grid
from .stats import mean_std

#: joint training that also records rho and k: OGM with a modulation window that never opens
OBSERVED_JOINT = "ogm:params=all:modulation_starts=1000000000:modulation_ends=1000000000"


def diagnose(dataset: str, out: str | Path, seeds: list[int], overrides: list[str] | None = None,
             threshold: float = 0.02, echo=print) -> dict[str, Any]:
    out = Path(out)
    data = load_config(overrides=[f"data.name={dataset}", *(overrides or [])])["data"]
    modalities = dataset_modalities(data["name"], data)
    if len(modalities) < 2:
        raise ValueError(f"diagnose needs two or more modalities; {dataset} has {modalities}")
    specs = [OBSERVED_JOINT, *(f"alone:{m}" for m in modalities)]
    results = run_grid(dataset, specs, seeds, out, overrides, echo=echo)
    if results.failures:
        first = results.failures[0]
        raise EquimodalError(f"diagnose: {len(results.failures)} run(s) failed, e.g. {first['label']} seed "
                             f"{first['seed']}: {first['error']} (all in {out / 'failures.json'})")
    joint = [r for r in results if r["label"] == OBSERVED_JOINT]
    report: dict[str, Any] = {"dataset": dataset, "seeds": seeds, "modalities": {}, "threshold": threshold}
    for m in modalities:
        alone = [r["probe_acc_by_modality"][m] for r in results if r["label"] == f"alone:{m}"]
        together = [r["probe_acc_by_modality"][m] for r in joint]
        (ma, sa), (mj, sj) = mean_std(alone), mean_std(together)
        rho = [np.mean([rec[f"rho/{m}"] for rec in r["history"]]) for r in joint]
        report["modalities"][m] = {"probe_alone": ma, "probe_alone_sd": sa, "probe_joint": mj, "probe_joint_sd": sj,
                                   "gap": ma - mj, "mean_rho": float(np.mean(rho))}
    mods = report["modalities"]
    dominant = max(mods, key=lambda m: mods[m]["mean_rho"])
    under = [m for m, v in mods.items() if v["gap"] > threshold and v["gap"] > 2 * max(v["probe_alone_sd"], v["probe_joint_sd"])]
    report["dominant"], report["under_trained"] = dominant, under
    report["fused_joint"] = mean_std([r["test_acc"] for r in joint])
    lines = [f"Diagnosis on {dataset} ({len(seeds)} seed(s): {seeds}); linear-probe test accuracy of each encoder:",
             f"{'modality':<12}{'alone':>16}{'in joint':>16}{'gap (pts)':>11}{'mean rho':>10}"]
    for m, v in mods.items():
        lines.append(f"{m:<12}{100 * v['probe_alone']:>9.1f} ± {100 * v['probe_alone_sd']:<4.1f}"
                     f"{100 * v['probe_joint']:>9.1f} ± {100 * v['probe_joint_sd']:<4.1f}"
                     f"{100 * v['gap']:>11.1f}{v['mean_rho']:>10.2f}")
    if under:
        worst = max(under, key=lambda m: mods[m]["gap"])
        verdict = (f"IMBALANCED: {dominant} dominates the joint objective (mean rho {mods[dominant]['mean_rho']:.2f}); "
                   f"{', '.join(under)} {'is' if len(under) == 1 else 'are'} under-trained — {worst}'s encoder reaches "
                   f"{100 * mods[worst]['probe_joint']:.1f}% jointly vs {100 * mods[worst]['probe_alone']:.1f}% alone "
                   f"(gap {100 * mods[worst]['gap']:.1f} points). A balancing method (e.g. ogm-ge) may help.")
    else:
        verdict = (f"NOT IMBALANCED by this measure: no encoder loses more than {100 * threshold:.0f} points of "
                   f"linear-probe accuracy (and more than twice the seed spread) when trained jointly; "
                   f"{dominant} has the larger ratio (mean rho {mods[dominant]['mean_rho']:.2f}).")
    report["verdict"] = verdict
    lines += ["", verdict]
    text = "\n".join(lines)
    (out / "diagnosis.txt").write_text(text + "\n")
    _figure(report, joint, modalities, out / "diagnosis.png")
    return report | {"text": text}


def _figure(report: dict[str, Any], joint: list[dict[str, Any]], modalities: list[str], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    mods = report["modalities"]
    x = np.arange(len(modalities))
    ax1.bar(x - 0.2, [100 * mods[m]["probe_alone"] for m in modalities], 0.4,
            yerr=[100 * mods[m]["probe_alone_sd"] for m in modalities], capsize=3, label="trained alone")
    ax1.bar(x + 0.2, [100 * mods[m]["probe_joint"] for m in modalities], 0.4,
            yerr=[100 * mods[m]["probe_joint_sd"] for m in modalities], capsize=3, label="trained jointly")
    ax1.set_xticks(x, modalities)
    ax1.set_ylabel("linear-probe test accuracy (%)")
    ax1.set_title("Encoder quality: alone vs in the joint model")
    ax1.legend()
    low = min(min(mods[m]["probe_alone"], mods[m]["probe_joint"]) for m in modalities)
    ax1.set_ylim(max(0, 100 * low - 15), 100)
    for m in modalities:
        curves = [[rec[f"rho/{m}"] for rec in r["history"]] for r in joint]
        n = min(map(len, curves))
        ax2.plot(np.arange(1, n + 1), np.mean([c[:n] for c in curves], axis=0), label=m)
    ax2.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("rho (epoch mean)")
    ax2.set_title("Discrepancy ratio in joint training")
    ax2.legend()
    fig.suptitle(report["verdict"][:110] + ("…" if len(report["verdict"]) > 110 else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
