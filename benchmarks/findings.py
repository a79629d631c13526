"""The tables of docs/findings.md, computed from the committed grids' results.csv (never typed by
hand): for each setting and each method, what it predicts with, the paired difference to joint (and to
joint-aux, where the grid has it) in fused test accuracy
with its 95% interval, the verdict (helps / hurts / not shown), the difference to the best single
modality (picked on validation), the counted cost and the tuned pick; and, for the encoder that
joint training under-trains most, the same for its linear probe.

    python benchmarks/findings.py            # rewrites the block between the markers in docs/findings.md
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

from equimodal.analysis.bench import predictor
from equimodal.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "docs" / "findings.md"
BEGIN, END = "<!-- findings-tables: begin (python benchmarks/findings.py) -->", "<!-- findings-tables: end -->"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}

#: setting title -> (results folder, rows to report: label in the grid -> name in the findings)
SETTINGS = {
    "The embedded default data (2 modalities; tuned, equal epochs)": ("synthetic-fair", None),
    "AV-Digits (2 modalities; tuned, equal epochs)": ("avdigits-fair", None),
    "mfeat, 6 views (tuned, equal epochs)": ("mfeat", None),
    "mfeat, 6 views: the published peers (tuned with seed 0, equal epochs)": ("mfeat-peers", None),
    "mfeat, the 4 weakest views (tuned, equal epochs)": ("mfeat-hard", None),
    "mfeat, the 3 weakest views (tuned, equal epochs)": ("mfeat-weak3", None),
}
ROWS = {"ogm-ge": "OGM-GE", "ogm-ge:params=all": "OGM-GE", "ogm-boost": "boost (ours)",
        "ogm-boost:params=all": "boost (ours)", "uncertainty": "uncertainty (ours)", "distill": "distill (ours)",
        "ssl": "ssl (ours)"}


def paired(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int]:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, len(diffs)
    return statistics.mean(diffs), T95[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


def verdict(mean: float, half: float) -> str:
    if math.isnan(half):
        return "one seed: no interval"
    if mean - half > 0:
        return "**helps**"
    if mean + half < 0:
        return "**hurts**"
    return "not shown"


def cell(mean: float, half: float) -> str:
    return f"{100 * mean:+.1f} ± {100 * half:.1f}"


def passes(row: dict[str, str]) -> float:
    try:
        per_step = float(row["forward_per_step"]) + float(row["forward_no_grad_per_step"]) + 2 * float(row["backward_per_step"])
        return per_step * float(row["optimizer_steps"])
    except (KeyError, ValueError):
        return math.nan


def table(folder: Path, extra_rows: list[str]) -> list[str]:
    rows = defaultdict(list)
    for r in csv.DictReader(open(folder / "results.csv")):
        rows[r["label"]].append(r)
    acc = {lab: {r["seed"]: float(r["test_acc"]) for r in rs} for lab, rs in rows.items()}
    val = {lab: statistics.mean(float(r["val_acc"]) for r in rs if r.get("val_acc")) for lab, rs in rows.items()
           if all(r.get("val_acc") for r in rs)}
    alone = [lab for lab in rows if lab.startswith("alone:")]
    best_alone = max(alone, key=lambda lab: val.get(lab, -1)) if alone else None
    modalities = [lab.split(":", 1)[1] for lab in alone]
    probe = {lab: {m: {r["seed"]: float(r[f"probe_{m}"]) for r in rs if r.get(f"probe_{m}")} for m in modalities}
             for lab, rs in rows.items()}
    # the encoder joint training under-trains most: the largest gap alone -> joint in probe accuracy
    gaps = {m: statistics.mean(probe[f"alone:{m}"][m].values()) - statistics.mean(probe["joint"][m].values())
            for m in modalities if probe.get(f"alone:{m}", {}).get(m) and probe["joint"][m]}
    weak = max(gaps, key=gaps.get) if gaps else None
    joint_cost = statistics.mean(passes(r) for r in rows["joint"])
    tuned = {lab: (rs[0].get("tuned") or "") for lab, rs in rows.items()}
    out = [f"Joint: {100 * statistics.mean(acc['joint'].values()):.1f}% fused"
           + (f"; best single modality on validation: {best_alone[6:]} "
              f"({100 * statistics.mean(acc[best_alone].values()):.1f}%)" if best_alone else "")
           + (f"; most under-trained encoder in joint: **{weak}** (probe {100 * statistics.mean(probe['joint'][weak].values()):.1f}"
              f" jointly vs {100 * statistics.mean(probe[f'alone:{weak}'][weak].values()):.1f} alone)" if weak else "") + ".",
           "",
           "| method | predicts | pick | fused acc (%) | Δ vs joint | verdict | Δ vs joint-aux | Δ vs best alone | "
           + (f"Δ probe {weak} vs joint | " if weak else "") + "cost × joint |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | " + ("--- | " if weak else "") + "--- |"]
    if "joint-aux" not in acc:
        out.insert(1, "(joint-aux, joint plus one loss per modality, has not run in this grid: its column is empty.)")
    labels = [lab for lab in rows if lab in ROWS or lab in extra_rows]
    for lab in labels:
        d, h, n = paired(acc[lab], acc["joint"])
        cells = [ROWS.get(lab, lab), predictor(rows[lab][0]), tuned.get(lab) or "-",
                 f"{100 * statistics.mean(acc[lab].values()):.1f} ± {100 * statistics.stdev(acc[lab].values()):.1f}",
                 cell(d, h), verdict(d, h)]
        if "joint-aux" in acc and lab != "joint-aux":
            dx, hx, _ = paired(acc[lab], acc["joint-aux"])
            cells.append(f"{cell(dx, hx)} ({verdict(dx, hx).strip('*')})")
        else:
            cells.append("-")
        if best_alone:
            da, ha, _ = paired(acc[lab], acc[best_alone])
            cells.append(f"{cell(da, ha)} ({verdict(da, ha).strip('*')})")
        else:
            cells.append("-")
        if weak:
            dp, hp, _ = paired(probe[lab][weak], probe["joint"][weak])
            cells.append(f"{cell(dp, hp)} ({verdict(dp, hp).strip('*')})")
        cost = statistics.mean(passes(r) for r in rows[lab]) / joint_cost
        cells.append(f"{cost:.2f}" + (" †" if cost > 1.1 else ""))
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> int:
    blocks = []
    for title, (name, _) in SETTINGS.items():
        folder = ROOT / "docs" / "results" / name
        if not (folder / "results.csv").is_file():
            blocks += [f"### {title}", "", f"(not run yet: docs/results/{name})", ""]
            continue
        extra = [m for m in available_methods() if m != "joint" and m not in ROWS]  # every other method
        blocks += [f"### {title}", "", f"From [docs/results/{name}](results/{name}/results.md).", "",
                   *table(folder, extra), ""]
    text = FINDINGS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    FINDINGS.write_text(text[:start] + "\n" + "\n".join(blocks) + text[end:])
    print(f"wrote the tables in {FINDINGS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
