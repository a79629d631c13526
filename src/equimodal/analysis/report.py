"""One self-contained HTML page from a bench folder: the table, the plots (embedded as data URIs)
and the run list, readable offline and attachable to an e-mail."""
from __future__ import annotations

import base64
import csv
import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.note{color:#555;font-size:.85rem}
"""


def markdown_table_to_html(md: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in md.splitlines() if line.strip().startswith("|")]
    rows = [r for r in rows if not all(c.strip().startswith("---") for c in r)]
    if not rows:
        return ""
    head, body = rows[0], rows[1:]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out + ["</table>"])


def _value(cfg: dict, key: str) -> Any:
    section, name = key.split(".", 1)
    return (cfg.get(section) or {}).get(name)


def budget_rows(folder: Path) -> list[tuple[str, str]]:
    """The training budget behind the tables, read from every run's ``config.yaml`` under
    ``folder/runs``: (what, value) rows; a value that differs between runs lists each with its runs."""
    configs = {}
    for path in sorted((folder / "runs").glob("*/config.yaml")):
        try:
            configs[path.parent.name] = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        summary = path.parent / "summary.json"
        if summary.is_file():  # the precision the run resolved (auto -> fp32 on the CPU, bf16 on CUDA)
            try:
                precision = json.loads(summary.read_text()).get("precision")
            except (OSError, ValueError):
                precision = None
            if precision:
                configs[path.parent.name].setdefault("train", {})["precision"] = precision
    if not configs:
        return []

    def show(cfg: dict, what: str) -> str:
        if what == "data":
            opts = {k: v for k, v in (cfg.get("data") or {}).items() if k not in ("name", "modalities")}
            return f"{_value(cfg, 'data.name')} ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts \
                else str(_value(cfg, "data.name"))
        if what == "optimizer":
            o = cfg.get("optim") or {}
            text = f"{o.get('name')}, lr {o.get('lr')}"
            if o.get("name") == "sgd":
                text += f", momentum {o.get('momentum')}"
            text += f", weight decay {o.get('weight_decay')}"
            if o.get("schedule") == "step":
                text += f", step schedule (x{o.get('gamma')} every {o.get('step_size')} epochs)"
            else:
                text += f", {o.get('schedule')} schedule"
            if o.get("clip_grad_norm"):
                text += f", gradient norm clipped at {o.get('clip_grad_norm')}"
            return text
        if what == "model":
            m = cfg.get("model") or {}
            if m.get("factory"):
                return f"model.factory {m['factory']}, fusion {m.get('fusion')}"
            return (f"encoders {m.get('encoder')} (width {m.get('width')}, features {m.get('feature_dim')}), "
                    f"fusion {m.get('fusion')}, estimator {m.get('estimator')}")
        if what == "epochs":
            return f"{_value(cfg, 'train.epochs')} per stage (multi-stage methods: see the epochs column)"
        if what == "batch":
            t = cfg.get("train") or {}
            return f"{t.get('batch_size')} x {t.get('accumulate', 1)} accumulated" if t.get("accumulate", 1) != 1 \
                else str(t.get("batch_size"))
        return str(_value(cfg, what))

    rows = []
    for label, what in (("data", "data"), ("epochs", "epochs"), ("optimizer", "optimizer"), ("batch size", "batch"),
                        ("model", "model"), ("precision", "train.precision"), ("reported epoch", "train.select")):
        values: dict[str, list[str]] = {}
        for run, cfg in configs.items():
            values.setdefault(show(cfg, what), []).append(run)
        if len(values) == 1:
            rows.append((label, next(iter(values))))
        else:
            rows.append((label, "; ".join(f"{v} [{', '.join(runs)}]" for v, runs in values.items())))
    seeds = sorted({_value(cfg, "train.seed") for cfg in configs.values()}, key=str)
    rows.append(("runs", f"{len(configs)} ({len(seeds)} seed(s): {', '.join(map(str, seeds))})"))
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); is it the results.md bench wrote?") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _read_runs(path: Path, cols: list[str]) -> list[dict[str, str]]:
    """The rows of a bench ``results.csv``, refused with the missing columns named."""
    import io
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    missing = [c for c in cols if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; is it the results.csv bench wrote? "
                        f"(it has {reader.fieldnames or 'no header'})")
    return [r for r in reader if any((v or "").strip() for v in r.values() if isinstance(v, str))]


def _number(text: str | None, form: str) -> str:
    try:
        return form.format(float(text))
    except (TypeError, ValueError):
        return text or "-"


def _percent(text: str | None) -> str:
    try:
        return f"{100 * float(text):.1f}"
    except (TypeError, ValueError):
        return text or "-"


def build_report(folder: str | Path, out: str | Path | None = None) -> Path:
    folder = Path(folder)
    md_path = folder / "results.md"
    if not md_path.is_file():
        raise FileNotFoundError(f"{md_path} not found: run `equimodal bench --out {folder}` first")
    md = _read_text(md_path)
    table_md = "\n".join(line for line in md.splitlines() if line.startswith("|"))
    notes = [line for line in md.splitlines() if line.strip() and not line.startswith("|")]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>equimodal report: {html.escape(folder.name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>equimodal benchmark report: {html.escape(folder.name)}</h1>",
             f"<p class='note'>Generated {datetime.now().strftime('%Y-%m-%d %H:%M')} from {html.escape(str(folder))}.</p>",
             "<h2>Results</h2>", markdown_table_to_html(table_md),
             *(f"<p class='note'>{html.escape(n)}</p>" for n in notes)]
    budget = budget_rows(folder)
    if budget:
        parts += ["<h2>Budget</h2>", "<p class='note'>The training behind every number above, read from each "
                  "run's config.yaml (runs/*/config.yaml holds the full configuration).</p>", "<table>"]
        parts += [f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in budget]
        parts.append("</table>")
    captions = {"accuracy_per_epoch.png": "Validation accuracy per epoch", "coefficients.png":
                "Modulation coefficients and discrepancy ratios", "linear_probe.png": "Linear-probe accuracy per encoder",
                "diagnosis.png": "Diagnosis"}
    for name, caption in captions.items():
        png = folder / name
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            parts += [f"<h2>{caption}</h2>", f"<img alt='{caption}' src='data:image/png;base64,{data}'>"]
    csv_path = folder / "results.csv"
    if csv_path.is_file():
        cols = ["label", "seed", "test_acc", "test_macro_f1", "seconds", "selection"]
        rows = _read_runs(csv_path, cols)
        parts += ["<h2>Runs</h2>", "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
        for r in rows:
            cells = [(r[c] or "") if c not in ("test_acc", "test_macro_f1") else _percent(r[c]) for c in cols]
            cells[4] = _number(r["seconds"], "{:.0f}")
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out = Path(out) if out else folder / "report.html"
    out.write_text("\n".join(parts))
    return out
