"""When is a balancing method worth it? An imbalance sweep on AV-Digits.

Gaussian noise of growing strength on the image (``data.visual_noise``, in standard deviations of
the standardised pixels) moves the dominance from the image to the audio. At each level every
method runs with every seed (one resumable bench grid per level, ``OUT/noise-<level>/``); the
script then writes ``OUT/sweep.md`` (fused accuracy, each encoder's linear probe and the paired
difference to joint, per level) and ``OUT/sweep.png`` (the same against the level).

    python benchmarks/imbalance_sweep.py --levels 0,1.5,3,4.5 --seeds 0,1,2 \
        --methods joint,ogm-ge:alpha=0.3,mbsd,mmcosine --out docs/results/avdigits-sweep

Runs on the CPU (about a minute per AV-Digits run on 2 cores); rerun to continue.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from equimodal.analysis.bench import run_grid  # noqa: E402
from equimodal.analysis.stats import fmt_pct, mean_std, paired_difference  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0,1.5,3,4.5")
    parser.add_argument("--methods", default="joint,ogm-ge,mbsd,mmcosine")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="docs/results/avdigits-sweep")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    levels = [float(x) for x in args.levels.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    start = time.time()
    by_level = {}
    failed = 0
    for level in levels:
        results = run_grid("avdigits", methods, seeds, out / f"noise-{level:g}",
                           [*args.overrides, f"data.visual_noise={level}"])
        failed += len(results.failures)
        by_level[level] = results
    write_table(by_level, methods, seeds, out, time.time() - start, args)
    plot(by_level, methods, out / "sweep.png")
    print(f"wrote {out / 'sweep.md'} and {out / 'sweep.png'}")
    return 1 if failed else 0


def _values(results, label, key, modality=None):
    rows = [r for r in results if r["label"] == label]
    return {r["seed"]: (r[key][modality] if modality else r[key]) for r in rows}


def write_table(by_level, methods, seeds, out: Path, seconds: float, args) -> None:
    lines = ["| visual noise | method | fused acc (%) | probe audio (%) | probe visual (%) | "
             "acc audio slice (%) | acc visual slice (%) | Δ acc vs joint (95% CI, paired) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for level, results in by_level.items():
        joint = _values(results, "joint", "test_acc")
        for label in methods:
            acc = _values(results, label, "test_acc")
            if not acc:
                lines.append(f"| {level:g} | {label} | (failed) | | | | | |")
                continue
            cells = [fmt_pct(*mean_std(list(acc.values())))]
            for key, m in (("probe_acc_by_modality", "audio"), ("probe_acc_by_modality", "visual"),
                           ("test_acc_by_modality", "audio"), ("test_acc_by_modality", "visual")):
                cells.append(fmt_pct(*mean_std(list(_values(results, label, key, m).values()))))
            if label == "joint" or not joint:
                delta = "-"
            else:
                diff, half, n = paired_difference(acc, joint)
                delta = f"{100 * diff:+.1f} ± {100 * half:.1f} (n={n})"
            lines.append(f"| {level:g} | {label} | " + " | ".join(cells) + f" | {delta} |")
    note = (f"Ran `python benchmarks/imbalance_sweep.py --levels {args.levels} --methods {args.methods} "
            f"--seeds {args.seeds}` ({time.strftime('%Y-%m-%d')}, {seconds:.0f} s wall for the runs not reused, "
            "2 CPU cores shared with other jobs). Each level is its own bench grid (run folders under "
            "`noise-<level>/runs/`); the noise is added to every split's images. Mean ± standard deviation "
            "over seeds; the test split is evaluated once per run on the last epoch and never used to choose "
            "anything. 'acc <modality> slice': the joint model's per-modality logits (its estimator), which "
            "show which modality dominates the fused decision at each level.")
    (out / "sweep.md").write_text("\n".join(lines) + f"\n\n{note}\n")


def plot(by_level, methods, path: Path) -> None:
    levels = list(by_level)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label in methods:
        means, sds = [], []
        for level in levels:
            vals = list(_values(by_level[level], label, "test_acc").values())
            m, s = mean_std(vals) if vals else (np.nan, np.nan)
            means.append(100 * m)
            sds.append(100 * s)
        line = ax1.errorbar(levels, means, yerr=sds, marker="o", capsize=3, label=label)
        colour = line[0].get_color()  # the same colour per method in both panels
        for modality, style in (("audio", "-"), ("visual", "--")):
            vals = [mean_std(list(_values(by_level[lv], label, "probe_acc_by_modality", modality).values()) or [np.nan])[0]
                    for lv in levels]
            ax2.plot(levels, [100 * v for v in vals], style, marker="o", color=colour, label=f"{label} · {modality}")
    ax1.set_xlabel("Gaussian noise on the image (std)")
    ax1.set_ylabel("fused test accuracy (%)")
    ax1.set_title("Fused accuracy as the image weakens")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("Gaussian noise on the image (std)")
    ax2.set_ylabel("linear-probe test accuracy (%)")
    ax2.set_title("Each encoder (solid: audio, dashed: image)")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
