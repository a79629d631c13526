"""One self-contained HTML page from a bench folder: the table, the plots (embedded as data URIs)
and the run list, readable offline and attachable to an e-mail."""
from __future__ import annotations

import base64
import csv
import html
from datetime import datetime
from pathlib import Path

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


def build_report(folder: str | Path, out: str | Path | None = None) -> Path:
    folder = Path(folder)
    md_path = folder / "results.md"
    if not md_path.is_file():
        raise FileNotFoundError(f"{md_path} not found: run `equimodal bench --out {folder}` first")
    md = md_path.read_text()
    table_md = "\n".join(line for line in md.splitlines() if line.startswith("|"))
    notes = [line for line in md.splitlines() if line.strip() and not line.startswith("|")]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>equimodal report: {html.escape(folder.name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>equimodal benchmark report: {html.escape(folder.name)}</h1>",
             f"<p class='note'>Generated {datetime.now().strftime('%Y-%m-%d %H:%M')} from {html.escape(str(folder))}.</p>",
             "<h2>Results</h2>", markdown_table_to_html(table_md),
             *(f"<p class='note'>{html.escape(n)}</p>" for n in notes)]
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
        rows = list(csv.DictReader(open(csv_path)))
        cols = ["label", "seed", "test_acc", "test_macro_f1", "seconds", "selection"]
        parts += ["<h2>Runs</h2>", "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
        for r in rows:
            cells = [r[c] if c not in ("test_acc", "test_macro_f1") else f"{100 * float(r[c]):.1f}" for c in cols]
            cells[4] = f"{float(r['seconds']):.0f}"
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out = Path(out) if out else folder / "report.html"
    out.write_text("\n".join(parts))
    return out
