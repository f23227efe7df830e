"""`write_report(DIR)`: figures under DIR/figures/, the claims in DIR/report.html, DIR/claims.json (a list, one
object per finding) and DIR/report.json (claims, context, figures, run counts).

Reads only run folders and ledgers under DIR (any depth: a `reproduce` folder holds one sweep per finding).
Figures are linked (PNG shown, SVG one click away), so the HTML stays small and diffable.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from pathlib import Path
from typing import Any

from regretless.config import atomic_write_text
from regretless.errors import UserError
from regretless.report import analysis as A
from regretless.report import claims as C
from regretless.report.figures import FIGURES

VERDICT_COLORS = {C.HELD: "#1a7f37", C.NOT_HELD: "#cf222e", C.INCONCLUSIVE: "#9a6700"}
CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;width:100%;font-size:14px}td,th{border:1px solid #d0d7de;padding:6px;
vertical-align:top;text-align:left}th{background:#f6f8fa}.verdict{font-weight:bold}
.finding{display:flex;gap:16px;border-top:1px solid #d0d7de;padding:12px 0}.finding>div{flex:1}
.finding img{width:100%}.note{background:#f6f8fa;padding:8px 12px;font-size:14px}.missing{color:#9a6700}"""


def _context(root: Path, records: list[A.RunRecord]) -> dict[str, Any]:
    """The header: reproduce.json when `reproduce` wrote one, else what the run configs say."""
    ctx = A._read_json(root / "reproduce.json") or {}
    if not ctx:
        models = sorted({str(r.config.get("model")) for r in records})
        ctx = {"preset": None, "model": {"name": ", ".join(models)}, "data": ", ".join(sorted(
            {str(r.config.get("data")) for r in records if r.command == "sft"})), "seeds": sorted(
            {r.seed for r in records})}
    steps = sorted({r.steps for r in records if r.steps})
    ctx["steps"] = steps
    return ctx


def build(root: str | Path) -> dict[str, Any]:
    """Claims, figures, run counts and context for every run under `root` (figures written to root/figures)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (expected a sweep or reproduce output folder)")
    records = A.load_runs(root)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    all_arms = A.arms(records)
    context = _context(root, records)
    claims = C.evaluate(records, {c["name"] for c in context.get("conditions", []) if c.get("search") == "searching"})
    lr_claim = next(c for c in claims if c["finding"] == "lr_ratio")
    figures = []
    for name, (finding, fn) in FIGURES.items():
        kw = {"optima": lr_claim.get("optimal_lr"), "predicted": (lr_claim.get("predicted") or {})} \
            if finding == "lr_ratio" else {}
        paths = fn(all_arms, root / "figures" / name, **kw) if records else []
        figures.append({"name": name, "finding": finding, "files": [str(p.relative_to(root)) for p in paths],
                        "doc": (fn.__doc__ or "").strip().splitlines()[0],
                        "missing": None if paths else "no runs to draw"})
    failed = [{"id": r.id, "name": r.name, "path": str(r.path), "error": r.error}
              for r in records if r.status == "failed"]
    return {"generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "root": str(root),
            "context": context, "runs": {"total": len(records), **counts}, "claims": claims,
            "figures": figures, "failed_runs": failed}


def _header(report: dict[str, Any]) -> str:
    e = html.escape
    c = report["context"]
    m = c.get("model") or {}
    model = e(str(m.get("name", "?")))
    if m.get("params"):
        model += (f" ({m['params'] / 1e6:.1f}M parameters, hidden {m.get('hidden_size')}, {m.get('layers')} "
                  f"layers, vocab {m.get('vocab')}; embeddings+head {m.get('embed_share', 0):.0%})")
    runs = ", ".join(f"{k} {v}" for k, v in report["runs"].items())
    rows = [("preset", e(f"{c.get('preset')}: {c.get('description', '')}") if c.get("preset") else "-"),
            ("model", model), ("SFT data", e(str(c.get("data", "-")))), ("RL environment", e(str(c.get("env", "-")))),
            ("seeds", e(str(c.get("seeds")))), ("optimizer steps per run", e(", ".join(map(str, c.get("steps", [])))
                                                                            or "-")),
            ("runs", e(runs)), ("wall time", _wall(c)),
            ("FullFT baseline", "embeddings and LM head frozen (they are a large share of this model; LoRA never "
                                "trains them)" if c.get("freeze_embeddings") else "trains every parameter")]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    note = (f"<p class=note><b>What this scale can and cannot show.</b> {e(c['scale_note'])} A verdict is "
            "<i>held</i> when the whole 95% interval lies inside the paper's claim, <i>did not hold</i> when it "
            "lies wholly outside, <i>inconclusive</i> otherwise; a finding that did not hold here says how this "
            "model and budget behave, not that the paper is wrong at its scale.</p>") if c.get("scale_note") else ""
    return f"<table>{table}</table>{note}"


def _wall(c: dict[str, Any]) -> str:
    """Runs active (the union of the runs' start-to-finish spans over every invocation), else this invocation's
    wall time; the preset's budget beside it."""
    budget = f" (budget: {html.escape(str(c['budget']))})" if c.get("budget") else ""
    if c.get("runs_wall_s"):
        return f"{c['runs_wall_s'] / 60:.1f} min with runs active, over every invocation{budget}"
    return f"{c['wall_s'] / 60:.1f} min{budget}" if c.get("wall_s") else "-"


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    figs = {f["finding"]: f for f in report["figures"]}
    blocks = []
    for c in report["claims"]:
        color = VERDICT_COLORS.get(c["verdict"], "black")
        f = figs.get(c["finding"])
        img = ""
        if f and f["files"]:
            png = next((p for p in f["files"] if p.endswith(".png")), f["files"][0])
            svg = next((p for p in f["files"] if p.endswith(".svg")), png)
            img = f"<a href='{e(svg)}'><img src='{e(png)}' alt='{e(f['name'])}'></a><br><small>{e(f['doc'])}</small>"
        elif f:
            img = f"<p class=missing>figure: {e(f['missing'] or '')}</p>"
        pred = ""
        if c["finding"] == "lr_ratio" and c.get("optimal_lr"):
            p = c.get("predicted") or {}
            pred = "<br>optimal LRs (95% interval): " + "; ".join(
                f"{e(k)} {o['lr']:.3g} [{o['interval'][0]:.3g}, {o['interval'][1]:.3g}]"
                + ("" if o.get("bracketed") else " (not bracketed)") for k, o in c["optimal_lr"].items())
            if p.get("full"):
                pred += (f"<br>recipe's prediction: FullFT {p['full']:.3g}, LoRA {p.get('lora', 0):.3g} "
                         f"({p.get('multiplier', 0):.3g}x)")
        blocks.append(f"<div class=finding><div><h3>{e(c['title'])}: <span class=verdict style='color:{color}'>"
                      f"{e(c['verdict'])}</span></h3><p><b>Paper:</b> {e(c['paper'])}</p><p><b>Measured:</b> "
                      f"{e(c['measured'])}{pred}</p><p><b>Why:</b> {e(c['reason'])}</p><p><small>{c['runs']} runs, "
                      f"up to {c['seeds']} seeds per LR</small></p></div><div>{img}</div></div>")
    failed = "".join(f"<li><code>{e(r['name'])}</code> [{e(r['id'])}]: <pre>{e(r['error'] or '')}</pre></li>"
                     for r in report["failed_runs"])
    return (f"<!doctype html><html><head><meta charset=utf-8><title>regretless report</title><style>{CSS}"
            f"</style></head><body><h1>LoRA Without Regret: which findings held here</h1>{_header(report)}"
            f"{''.join(blocks)}" + (f"<h2>Failed runs</h2><ul>{failed}</ul>" if failed else "")
            + f"<p><small>Runs under <code>{e(report['root'])}</code>; generated {e(report['generated'])}."
            "</small></p></body></html>\n")


def _finite(o: Any) -> Any:
    """JSON has no infinity: open ends of intervals and claim regions are written as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_report(root: str | Path) -> dict[str, Any]:
    """Write root/report.html, root/claims.json (the list of claims) and root/figures/*; returns the report."""
    report = build(root)
    root = Path(root)
    atomic_write_text(root / "claims.json", json.dumps(_finite(report["claims"]), indent=2, default=_json_default) + "\n")
    atomic_write_text(root / "report.json", json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    atomic_write_text(root / "report.html", render_html(report))
    return report


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
