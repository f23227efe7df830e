"""`write_report(DIR)`: figures under DIR/figures/, the claims table in DIR/report.html and DIR/claims.json.

Reads only run folders and ledgers under DIR (any depth: a `reproduce` folder holds one sweep per finding).
Figures are linked (PNG shown, SVG one click away), so the HTML stays small and diffable.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from regretless.config import atomic_write_text
from regretless.errors import UserError
from regretless.report import analysis as A
from regretless.report import claims as C
from regretless.report.figures import FIGURES

VERDICT_COLORS = {C.HELD: "#1a7f37", C.NOT_HELD: "#cf222e", C.INCONCLUSIVE: "#9a6700"}
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;width:100%;font-size:14px}td,th{border:1px solid #d0d7de;padding:6px;
vertical-align:top;text-align:left}th{background:#f6f8fa}.verdict{font-weight:bold}
figure{display:inline-block;margin:8px;width:48%}figure img{width:100%}figcaption{font-size:13px}
.missing{color:#9a6700}"""


def build(root: str | Path) -> dict[str, Any]:
    """Claims, figures and run counts for every run under `root` (figures written to root/figures)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (expected a sweep or reproduce output folder)")
    records = A.load_runs(root)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    figures = []
    for name, (finding, command, fn) in FIGURES.items():
        recs = A.select(records, finding, command)
        paths = fn(recs, root / "figures" / name) if recs else []
        figures.append({"name": name, "finding": finding, "files": [str(p.relative_to(root)) for p in paths],
                        "doc": (fn.__doc__ or "").strip().splitlines()[0],
                        "missing": None if paths else "inconclusive: no runs"})
    failed = [{"id": r.id, "name": r.name, "path": str(r.path), "error": r.error}
              for r in records if r.status == "failed"]
    return {"generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "root": str(root),
            "runs": {"total": len(records), **counts}, "claims": C.evaluate(records), "figures": figures,
            "failed_runs": failed}


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for c in report["claims"]:
        color = VERDICT_COLORS.get(c["verdict"], "black")
        rows.append(f"<tr><td>{e(c['title'])}</td><td>{e(c['paper'])}</td><td>{e(c['measured'])}</td>"
                    f"<td class=verdict style='color:{color}'>{e(c['verdict'])}</td><td>{e(c['reason'])}"
                    f"<br><small>criterion: {e(c['criterion'])}</small></td></tr>")
    figs = []
    for f in report["figures"]:
        if f["files"]:
            png = next((p for p in f["files"] if p.endswith(".png")), f["files"][0])
            svg = next((p for p in f["files"] if p.endswith(".svg")), png)
            figs.append(f"<figure><a href='{e(svg)}'><img src='{e(png)}' alt='{e(f['name'])}'></a>"
                        f"<figcaption>{e(f['doc'])}</figcaption></figure>")
        else:
            figs.append(f"<p class=missing>{e(f['name'])}: {e(f['doc'])} &mdash; {e(f['missing'])}</p>")
    runs = ", ".join(f"{k} {v}" for k, v in report["runs"].items())
    failed = "".join(f"<li><code>{e(r['name'])}</code> [{e(r['id'])}]: <pre>{e(r['error'] or '')}</pre></li>"
                     for r in report["failed_runs"])
    return (f"<!doctype html><html><head><meta charset=utf-8><title>regretless report</title><style>{CSS}"
            f"</style></head><body><h1>LoRA Without Regret: which findings held</h1>"
            f"<p>Runs under <code>{e(report['root'])}</code>: {e(runs)}. Generated {e(report['generated'])}.</p>"
            f"<table><tr><th>finding</th><th>paper</th><th>measured</th><th>verdict</th><th>why</th></tr>"
            f"{''.join(rows)}</table><h2>Figures</h2>{''.join(figs)}"
            + (f"<h2>Failed runs</h2><ul>{failed}</ul>" if failed else "") + "</body></html>\n")


def write_report(root: str | Path) -> dict[str, Any]:
    """Write root/report.html, root/claims.json and root/figures/*; returns the report dict."""
    report = build(root)
    root = Path(root)
    atomic_write_text(root / "claims.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(root / "report.html", render_html(report))
    return report


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)
