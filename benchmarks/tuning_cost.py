"""What pruning saves in ``bench --tune``, and what it costs in picks.

For each row (joint and the named methods), the same Optuna study twice: with the pruner
(``--pruner``, default successive halving) and without (``none``), the same sampler, seeds and
trial count. Writes ``OUT/tuning_cost.md`` (and ``.csv``): tuning compute of each (encoder passes
and epochs actually trained) and their ratio, whether the picks agree, and the test accuracy of
each pick over the reporting seeds with the paired difference. The two searches live in
``OUT/pruned`` and ``OUT/unpruned`` (ordinary tuned bench folders, resumable: rerun to continue).

    python benchmarks/tuning_cost.py --dataset synthetic --out docs/results/tuning-cost-synthetic \\
        --methods joint,ogm-ge,mmcosine,mbsd,arl,distill --trials 12 --set train.epochs=12 --equal-epochs
"""
from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from pathlib import Path

from equimodal.analysis.bench import bench_grid
from equimodal.analysis.stats import fmt_pct, mean_std, paired_difference
from equimodal.analysis.tuning import TuningOptions


def run(dataset: str, methods: list[str], seeds: list[int], out: Path, overrides: list[str], options: TuningOptions,
        jobs: int) -> dict[str, list[dict]]:
    """The tuned grid of each search, keyed ``pruned`` / ``unpruned``."""
    grids = {}
    for key, pruner in (("pruned", options.pruner), ("unpruned", "none")):
        opts = TuningOptions(trials=options.trials, seeds=options.seeds, lr_range=options.lr_range, pruner=pruner)
        grids[key] = bench_grid(dataset, methods, seeds, out / key, overrides, tune=True, tuning=opts, jobs=jobs,
                                echo=lambda s: print(f"[{key}] {s}", flush=True))
        if grids[key].failures:
            print(f"[{key}] {len(grids[key].failures)} run(s) failed; see {out / key / 'failures.json'}",
                  file=sys.stderr)
    return grids


def table(grids: dict[str, list[dict]], methods: list[str]) -> tuple[str, list[dict]]:
    rows, lines = [], ["| row | passes pruned / unpruned | epochs pruned / unpruned | pick pruned | pick unpruned | "
                       "picks agree | test acc pruned (%) | test acc unpruned (%) | Δ pruned − unpruned (95% CI) |",
                       "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in methods:
        p = [r for r in grids["pruned"] if r["label"] == row]
        u = [r for r in grids["unpruned"] if r["label"] == row]
        if not p or not u:
            lines.append(f"| {row} | - | - | - | - | - | - | - | (not finished) |")
            continue
        tp, tu = p[0]["tuning"], u[0]["tuning"]
        ratio = tp["passes"] / tu["passes"] if tu["passes"] else math.nan
        agree = p[0]["tuned_spec"] == u[0]["tuned_spec"]
        diff, half, n = paired_difference({r["seed"]: r["test_acc"] for r in p}, {r["seed"]: r["test_acc"] for r in u})
        delta = f"{100 * diff:+.1f} ± {100 * half:.1f} (n={n})" if n > 1 else f"{100 * diff:+.1f} (n={n})"
        lines.append(f"| {row} | {ratio:.2f} | {tp['epochs']} / {tu['epochs']} | {p[0]['tuned']} | {u[0]['tuned']} | "
                     f"{'yes' if agree else 'no'} | {fmt_pct(*mean_std([r['test_acc'] for r in p]))} | "
                     f"{fmt_pct(*mean_std([r['test_acc'] for r in u]))} | {delta} |")
        rows.append({"row": row, "passes_pruned": tp["passes"], "passes_unpruned": tu["passes"], "passes_ratio": ratio,
                     "epochs_pruned": tp["epochs"], "epochs_unpruned": tu["epochs"], "pick_pruned": p[0]["tuned_spec"],
                     "pick_unpruned": u[0]["tuned_spec"], "agree": agree,
                     "test_acc_pruned": mean_std([r["test_acc"] for r in p])[0],
                     "test_acc_unpruned": mean_std([r["test_acc"] for r in u])[0], "delta": diff, "delta_half_ci": half})
    total_p = sum(r["passes_pruned"] for r in rows)
    total_u = sum(r["passes_unpruned"] for r in rows)
    if total_u:
        lines.append(f"| **all rows** | **{total_p / total_u:.2f}** | | | | {sum(r['agree'] for r in rows)} of "
                     f"{len(rows)} | | | |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--methods", default="joint,ogm-ge,mmcosine,mbsd,arl,distill")
    ap.add_argument("--seeds", default="0,1,2", help="reporting seeds")
    ap.add_argument("--tune-seeds", default="100")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--pruner", default="halving", choices=("halving", "hyperband"))
    ap.add_argument("--equal-epochs", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = list(args.overrides) + (["train.stage_budget=shared"] if args.equal_epochs else [])
    options = TuningOptions(trials=args.trials, seeds=tuple(int(s) for s in args.tune_seeds.split(",")),
                            pruner=args.pruner)
    out = Path(args.out)
    start = time.time()
    grids = run(args.dataset, methods, seeds, out, overrides, options, args.jobs)
    text, rows = table(grids, methods)
    wall = time.time() - start
    note = (f"Pruned (`{args.pruner}`) vs unpruned search, the same TPE sampler, {args.trials} trials per row on tuning "
            f"seed(s) {args.tune_seeds}; each pick then trained on reporting seeds {args.seeds} (test read only there). "
            "Passes: encoder passes the trials actually trained (forward 1, backward 2); picks agree: the same setting. "
            f"Δ: paired over the reporting seeds. Command: `python benchmarks/tuning_cost.py {' '.join(argv or sys.argv[1:])}`; "
            f"{wall:.0f} s wall for the runs not reused, on {platform.machine()} with "
            f"{__import__('os').cpu_count()} CPU cores, Python {platform.python_version()}.")
    (out / "tuning_cost.md").write_text(f"{text}\n\n{note}\n")
    with open(out / "tuning_cost.csv", "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(text)
    print(f"wrote {out / 'tuning_cost.md'} and {out / 'tuning_cost.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
