"""equimodal bench: the grid, its resumability, the tables and plots."""
import csv
from pathlib import Path

import pytest

from equimodal.analysis.bench import parse_method_spec
from equimodal.analysis.stats import paired_difference, t95
from equimodal.cli import main


def test_paired_difference_by_hand():
    mean, half, n = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.8, 2: 0.6, 3: 0.1})
    diffs = [0.1, 0.0, 0.1]
    sd = (sum((d - 0.2 / 3) ** 2 for d in diffs) / 2) ** 0.5
    assert n == 3 and mean == pytest.approx(0.2 / 3)
    assert half == pytest.approx(4.303 * sd / 3 ** 0.5)
    assert t95(1) == 12.706 and t95(35) == 2.042


def test_method_specs():
    assert parse_method_spec("ogm-boost:mode=both:noise=sgn")[1] == ["method.name=ogm-boost", "method.mode=both",
                                                                       "method.noise=sgn"]
    assert parse_method_spec("alone:audio")[1] == ["method.name=joint", "data.modalities=[audio]"]
    with pytest.raises(ValueError):
        parse_method_spec("ogm:alpha")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from conftest import TINY
    out = tmp_path_factory.mktemp("bench") / "bench"
    args = ["bench", "--dataset", "synthetic", "--methods", "joint,ogm-ge:alpha=0.5", "--seeds", "0,1",
            "--out", str(out), "--alone", "--no-progress"]
    for o in TINY:
        args += ["--set", o]
    args += ["--set", "train.epochs=1"]
    return out, args


def test_bench_grid_tables_plots_and_resume(bench_run, capsys):
    out, args = bench_run
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 4 and {r["label"] for r in rows} == {"joint", "ogm-ge:alpha=0.5", "alone:visual",
                                                                  "alone:audio"}
    md = (out / "results.md").read_text()
    assert "Δ acc vs joint" in md and "(n=2)" in md
    for png in ("accuracy_per_epoch.png", "coefficients.png", "linear_probe.png"):
        assert (out / png).stat().st_size > 5000
    assert "ogm-ge:alpha=0.5" in printed
    assert main(args) == 0  # everything finished: reused, nothing retrained
    assert capsys.readouterr().out.count("reused") == 8


def test_bench_rejects_a_bad_method_option_before_training(tmp_path, capsys):
    assert main(["bench", "--methods", "joint,ogm-ge:beta=1", "--out", str(tmp_path / "b"), "--seeds", "0"]) == 2
    assert "method.beta" in capsys.readouterr().err
    assert not (tmp_path / "b" / "runs").exists()


def test_diagnose_reports_per_modality_gap_ratio_trace_and_verdict_from_validation(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "diag"
    args = ["diagnose", "--dataset", "synthetic", "--out", str(out), "--seeds", "0", "--compare", "mmcosine"]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main(args) == 0
    text = (out / "diagnosis.txt").read_text()
    import json
    alone = json.loads((out / "runs" / "alone_audio-seed0" / "summary.json").read_text())
    joint = json.loads((out / "runs" / "joint-observed-seed0" / "summary.json").read_text())
    audio_line = next(line for line in text.splitlines() if line.startswith("audio"))
    # validation probes (the verdict's evidence), not the test ones
    assert f"{100 * alone['probe_val_acc_by_modality']['audio']:.1f}" in audio_line
    assert f"{100 * joint['probe_val_acc_by_modality']['audio']:.1f}" in audio_line
    assert "(1 seed)" in audio_line and "± 0.0" not in text and "ogm:params" not in text
    gap = alone["probe_val_acc_by_modality"]["audio"] - joint["probe_val_acc_by_modality"]["audio"]
    verdict = next(line for line in text.splitlines() if line.startswith(("IMBALANCED", "NOT IMBALANCED")))
    assert "no spread is known" in verdict
    if gap > 0.02:  # a gap above the threshold (one seed: no spread) must be called out
        assert verdict.startswith("IMBALANCED") and "audio" in verdict
    assert "joint (observed)" in text and "mmcosine" in text and "RECOMMENDATION:" in text
    weights = [float(line.split()[2].rstrip("%")) for line in text.splitlines()
               if line.startswith(("audio ", "visual ")) and " weight " in line]
    assert "Decision layer" in text and len(weights) == 2 and sum(weights) == pytest.approx(100, abs=0.2)
    mm = json.loads((out / "runs" / "mmcosine-seed0" / "summary.json").read_text())
    best = "mmcosine" if mm["val_acc"] > joint["val_acc"] else "plain joint training"
    assert text.strip().splitlines()[-1].startswith(f"RECOMMENDATION: {best}")
    assert (out / "diagnosis.png").stat().st_size > 5000
    rec = json.loads((out / "runs" / "joint-observed-seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rho/audio" in rec and rec["k/audio"] <= 1  # ratios observed, never applied (window closed)


def test_report_is_self_contained_and_renders_in_chromium(bench_run, tmp_path, capsys):
    import base64
    import re
    import shutil
    import subprocess

    out, args = bench_run
    if not (out / "results.md").is_file():
        assert main(args) == 0
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<table>" in page and "ogm-ge:alpha=0.5" in page
    budget = page.split("<h2>Budget</h2>", 1)[1].split("<h2>", 1)[0]
    for text in ("<td>epochs</td><td style='text-align:left'>1 per stage", "sgd, lr 0.1, momentum 0.9",
                 "synthetic (n_train=600, n_test=300", "<td>batch size</td><td style='text-align:left'>50<",
                 "8 (2 seed(s): 0, 1)"):
        assert text in budget, text
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 3 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "src='http" not in page and "href=" not in page, "nothing fetched from elsewhere"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it where apt can reach the registry)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    (out / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    hist = img.histogram()
    assert sum(hist[:200]) > 0.01 * img.size[0] * img.size[1], "the page rendered text and plots, not a blank page"


def test_accuracy_plot_draws_one_panel_per_row_when_there_are_many(tmp_path):
    """Few rows: one plot with a legend; many rows: small multiples over the joint row (a PNG either
    way, with as many panels as rows besides joint)."""
    import matplotlib
    from equimodal.analysis import plots

    made = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def record(fig, path, *a, **k):
        made[Path(path).name] = len([ax for ax in fig.axes if ax.axison])
        return real_savefig(fig, path, *a, **k)

    def runs(n):
        return [{"label": "joint" if i == 0 else f"m{i}", "history": [{"val_acc": 0.1 * e + 0.01 * i} for e in range(4)]}
                for i in range(n)]

    matplotlib.figure.Figure.savefig = record
    try:
        plots.accuracy_per_epoch(runs(3), tmp_path / "few.png")
        plots.accuracy_per_epoch(runs(14), tmp_path / "many.png")
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
    assert made == {"few.png": 1, "many.png": 13}
    assert (tmp_path / "few.png").stat().st_size > 0 and (tmp_path / "many.png").stat().st_size > 0
