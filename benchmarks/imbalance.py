"""Measure the imbalance on a dataset: each modality trained alone vs jointly, and with methods.

For every seed it trains each modality alone (``joint`` on one modality), the joint model, and each
listed method, with the same encoders and budget (per stage, for multi-stage methods), then prints
mean +- std over seeds of the fused test accuracy and of each encoder's linear-probe accuracy (the
OGM-GE paper's under-training measure). Writes ``results.json`` and ``results.md`` to ``--out``;
finished runs (their ``summary.json`` exists) are not run again, so an interrupted sweep resumes.

A method entry may carry options after colons: ``ogm-boost:mode=both:noise=sgn``.

    python benchmarks/imbalance.py --seeds 0,1,2 --methods ogm,ogm-ge --out bench_out/imbalance [--set k=v ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from equimodal.config import load_config
from equimodal.train import Trainer


def mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="ogm-ge")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="bench_out/imbalance")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = [f"data.name={args.dataset}", "train.progress=false", *args.overrides]
    modalities = load_config(overrides=base)["data"]["modalities"]
    runs = {f"{m} alone": [f"data.modalities=[{m}]"] for m in modalities}
    runs["joint"] = []
    for entry in filter(None, args.methods.split(",")):
        name, *opts = entry.split(":")
        runs[entry] = [f"method.name={name}", *(f"method.{o}" for o in opts)]
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for name, extra in runs.items():
        for seed in seeds:
            run_dir = out / "runs" / f"{name.replace(' ', '_').replace(':', '_')}-seed{seed}"
            if (run_dir / "summary.json").is_file():
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                cfg = load_config(overrides=base + extra + [f"train.seed={seed}", f"train.out={run_dir}"])
                summary = Trainer(cfg, echo=lambda s: None).fit()
            results[name].append(summary)
            print(f"{name:<14} seed {seed}: fused {summary['test_acc']:.3f} probes "
                  + " ".join(f"{m} {a:.3f}" for m, a in summary["probe_acc_by_modality"].items()), flush=True)
    header = ("| run | fused test acc (%) | macro-F1 (%) | " + " | ".join(f"linear probe {m} (%)" for m in modalities)
              + " | seconds |")
    lines = [header, "|" + " --- |" * (4 + len(modalities))]
    for name, rs in results.items():
        cells = [mean_std([r["test_acc"] for r in rs]), mean_std([r["test_macro_f1"] for r in rs])]
        for m in modalities:
            vals = [r["probe_acc_by_modality"][m] for r in rs if m in r["probe_acc_by_modality"]]
            cells.append(mean_std(vals) if vals else "-")
        cells.append(f"{statistics.mean(r['seconds'] for r in rs):.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(f"Seeds {seeds}, dataset {args.dataset}, overrides {args.overrides}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
