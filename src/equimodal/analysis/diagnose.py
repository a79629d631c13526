"""Is my model imbalanced, and which method would help it?

Train each modality alone and the joint model with the same encoders and budget; compare each
encoder's linear-probe accuracy jointly trained vs alone (the OGM-GE paper's under-optimisation
measure) and show the discrepancy-ratio trace of the joint run. Every figure behind the verdict is
a validation figure (probes fitted on the training split, scored on the validation split carved
from it); the test split is never read for a decision. ``compare``: a short, equal-budget run of a
few methods on the same data, the best on validation recommended.
"""
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
from .stats import mean_std, paired_difference

#: joint training that also records rho and k: OGM with a modulation window that never opens
OBSERVED_JOINT = "ogm:params=all:modulation_starts=1000000000:modulation_ends=1000000000"
#: how the observed joint run is named in the output and its folders
JOINT_LABEL = "joint (observed)"
#: the methods ``--compare`` tries by default, from our own tables (docs/findings.md, fair protocol),
#: all at about joint's cost: arl (+6.4 on the default data, the one method shown above the lr-tuned
#: joint on AV-Digits), mbsd (+6.4 on the default data, the best fused accuracy on AV-Digits, 13-16
#: points in the imbalance sweep), mmcosine (+4.8 on the default data; level with joint on AV-Digits)
DEFAULT_SHORTLIST = ("arl", "mbsd", "mmcosine")


def _spread(values: list[float]) -> str:
    return f"± {100 * mean_std(values)[1]:<4.1f}" if len(values) > 1 else "(1 seed)"


def diagnose(dataset: str, out: str | Path, seeds: list[int] = (0, 1, 2), overrides: list[str] | None = None,
             threshold: float = 0.02, echo=print, compare: list[str] | None = None) -> dict[str, Any]:
    """Each modality alone vs jointly (validation probes), the verdict, and with ``compare`` a
    recommendation among those methods (plus plain joint training) on validation accuracy."""
    out = Path(out)
    seeds = list(seeds)
    data = load_config(overrides=[f"data.name={dataset}", *(overrides or [])])["data"]
    modalities = dataset_modalities(data["name"], data)
    if len(modalities) < 2:
        raise ValueError(f"diagnose needs two or more modalities; {dataset} has {modalities}")
    compare = [c for c in (compare or []) if c != "joint"]
    specs = [OBSERVED_JOINT, *(f"alone:{m}" for m in modalities), *compare]
    results = run_grid(dataset, specs, seeds, out, overrides, echo=echo, aliases={OBSERVED_JOINT: JOINT_LABEL})
    if results.failures:
        first = results.failures[0]
        raise EquimodalError(f"diagnose: {len(results.failures)} run(s) failed, e.g. {first['label']} seed "
                             f"{first['seed']}: {first['error']} (all in {out / 'failures.json'})")
    joint = [r for r in results if r["label"] == JOINT_LABEL]
    report: dict[str, Any] = {"dataset": dataset, "seeds": seeds, "modalities": {}, "threshold": threshold,
                              "split": "validation"}
    for m in modalities:
        alone_by_seed = {r["seed"]: r["probe_val_acc_by_modality"][m] for r in results if r["label"] == f"alone:{m}"}
        joint_by_seed = {r["seed"]: r["probe_val_acc_by_modality"][m] for r in joint}
        alone, together = list(alone_by_seed.values()), list(joint_by_seed.values())
        (ma, sa), (mj, sj) = mean_std(alone), mean_std(together)
        # the same seed gives both runs the same data order and encoder initialisation: paired
        _, half, n = paired_difference(alone_by_seed, joint_by_seed)
        rho = [np.mean([rec[f"rho/{m}"] for rec in r["history"]]) for r in joint]
        report["modalities"][m] = {"probe_alone": ma, "probe_alone_sd": sa, "probe_joint": mj, "probe_joint_sd": sj,
                                   "gap": ma - mj, "gap_half_width": half if n > 1 else None,
                                   "mean_rho": float(np.mean(rho)), "alone_values": alone, "joint_values": together}
    mods = report["modalities"]
    dominant = max(mods, key=lambda m: mods[m]["mean_rho"])
    spread_known = len(seeds) > 1
    # a gap counts above the threshold and, with several seeds, when its paired 95% interval excludes 0
    under = [m for m, v in mods.items() if v["gap"] > threshold
             and (not spread_known or v["gap"] - v["gap_half_width"] > 0)]
    report["dominant"], report["under_trained"] = dominant, under
    report["fused_joint_val"] = mean_std([r["val_acc"] for r in joint])
    lines = [f"Diagnosis on {dataset} ({len(seeds)} seed(s): {seeds}); linear-probe accuracy of each encoder on the "
             "validation split (probes fitted on train; test not used):",
             f"{'modality':<12}{'alone':>12}{'':6}{'in joint':>12}{'':6}{'gap (pts, 95% CI)':>20}{'mean rho':>10}"]
    for m, v in mods.items():
        lines.append(f"{m:<12}{100 * v['probe_alone']:>9.1f} {_spread(v['alone_values']):<8}"
                     f"{100 * v['probe_joint']:>9.1f} {_spread(v['joint_values']):<8}"
                     + (f"{100 * v['gap']:>12.1f} ± {100 * v['gap_half_width']:<5.1f}" if v["gap_half_width"] is not None
                        else f"{100 * v['gap']:>12.1f}{'':8}") + f"{v['mean_rho']:>10.2f}")
    caveat = ("" if spread_known else " With one seed no spread is known, so the gap is not tested against seed "
              "noise: run 3 seeds (the default) before acting on it.")
    if under:
        worst = max(under, key=lambda m: mods[m]["gap"])
        verdict = (f"IMBALANCED: {dominant} dominates the joint objective (mean rho {mods[dominant]['mean_rho']:.2f}); "
                   f"{', '.join(under)} {'is' if len(under) == 1 else 'are'} under-trained — {worst}'s encoder reaches "
                   f"{100 * mods[worst]['probe_joint']:.1f}% jointly vs {100 * mods[worst]['probe_alone']:.1f}% alone "
                   f"on validation (gap {100 * mods[worst]['gap']:.1f} points)." + caveat)
    elif any(v["gap"] > threshold for v in mods.values()):  # a gap the seeds cannot separate from noise
        worst = max(mods, key=lambda m: mods[m]["gap"])
        v = mods[worst]
        verdict = (f"NOT SHOWN: {worst}'s encoder reaches {100 * v['probe_joint']:.1f}% jointly vs "
                   f"{100 * v['probe_alone']:.1f}% alone on validation (gap {100 * v['gap']:.1f} ± "
                   f"{100 * v['gap_half_width']:.1f} points, paired 95% interval over {len(seeds)} seeds), so the "
                   f"gap may be seed noise: run more seeds (--seeds 0,1,2,3,4) or give a larger validation split "
                   f"before acting on it; {dominant} has the larger ratio (mean rho {mods[dominant]['mean_rho']:.2f}).")
    else:
        verdict = (f"NOT IMBALANCED by this measure: no encoder loses more than {100 * threshold:.0f} points of "
                   f"validation linear-probe accuracy when trained jointly; {dominant} has the larger ratio "
                   f"(mean rho {mods[dominant]['mean_rho']:.2f})." + caveat)
    report["verdict"] = verdict
    lines += ["", verdict]
    shares = _decision_layer(joint)
    if shares:
        for m in modalities:
            mods[m].update(shares[m])
        lines += ["", "Decision layer of the joint model (validation, mean over seeds): each modality's share of the "
                  "fused head's sensitivity to its features (weight) and of its logit scale:",
                  *(f"{m:<12} weight {100 * shares[m]['weight_share']:5.1f}%   logits {100 * shares[m]['logit_share']:5.1f}%"
                    for m in modalities)]
    if compare:
        report["comparison"], advice = _compare(results, compare, seeds)
        lines += ["", *advice]
    else:
        lines += ["", "Which method would help? Rerun with --compare (default shortlist: "
                  f"{','.join(DEFAULT_SHORTLIST)}) for a short equal-budget comparison on validation."]
    text = "\n".join(lines)
    (out / "diagnosis.txt").write_text(text + "\n")
    _figure(report, joint, modalities, out / "diagnosis.png")
    return report | {"text": text}


def _decision_layer(joint: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``decision_layer_shares`` of each joint run (rebuilt from its folder, as ``eval`` does), on
    its validation split, averaged over seeds; empty when a run's model lacks ``fuse``."""
    from ..train.trainer import Trainer
    from .decision import decision_layer_shares
    per_run = []
    for r in joint:
        if not r.get("folder"):
            return {}
        trainer = Trainer.from_run(r["folder"], echo=lambda s: None)
        if not hasattr(trainer.model, "fuse") or not len(trainer.splits.val):
            return {}
        per_run.append(decision_layer_shares(trainer.model, trainer.splits.val, trainer.device))
    if not per_run:
        return {}
    return {m: {k: float(np.mean([s[m][k] for s in per_run])) for k in ("weight_share", "logit_share")}
            for m in per_run[0]}


def _compare(results: list[dict[str, Any]], methods: list[str], seeds: list[int]) -> tuple[dict[str, Any], list[str]]:
    """Validation accuracy of each method and of plain joint training (same budget, same seeds);
    the recommendation is the best, if its paired gain over joint is positive."""
    val = {lab: {r["seed"]: r["val_acc"] for r in results if r["label"] == lab} for lab in [JOINT_LABEL, *methods]}
    rows = {}
    lines = [f"Equal-budget comparison on validation ({len(seeds)} seed(s), the same epochs for every row; "
             "Δ = paired difference to joint, 95% interval):",
             f"{'method':<20}{'val acc (%)':>12}{'':6}{'Δ vs joint':>16}"]
    for lab, by_seed in val.items():
        values = list(by_seed.values())
        diff, half, n = paired_difference(by_seed, val[JOINT_LABEL]) if lab != JOINT_LABEL else (0.0, float("nan"), 0)
        rows[lab] = {"val_acc": mean_std(values)[0], "val_acc_sd": mean_std(values)[1], "delta": diff, "half": half}
        delta = "-" if lab == JOINT_LABEL else (f"{100 * diff:+.1f} ± {100 * half:.1f}" if n > 1 else f"{100 * diff:+.1f}")
        lines.append(f"{lab:<20}{100 * rows[lab]['val_acc']:>9.1f} {_spread(values):<8}{delta:>16}")
    best = max(methods, key=lambda m: rows[m]["val_acc"])
    gain, half = rows[best]["delta"], rows[best]["half"]
    if gain <= 0:
        advice = (f"RECOMMENDATION: plain joint training — none of {', '.join(methods)} beat it on validation "
                  f"(best: {best}, {100 * gain:+.1f} points).")
    elif len(seeds) > 1 and gain - half <= 0:
        advice = (f"RECOMMENDATION: {best} is best on validation ({100 * gain:+.1f} points over joint), but the "
                  "interval includes 0: the gain is not shown at these seeds; more seeds or a tuned comparison "
                  "(equimodal bench --tune) would settle it.")
    else:
        advice = f"RECOMMENDATION: {best} ({100 * gain:+.1f} points over joint on validation)."
    return {"rows": rows, "best": best, "recommendation": advice}, lines + ["", advice]


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
