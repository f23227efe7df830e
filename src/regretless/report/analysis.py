"""Analysis of sweep results, reading only run folders (config.yaml, summary.json, metrics.jsonl) and ledgers.

The paper's two views of an LR sweep:
- curves: for each condition (FullFT, LoRA rank r, ...), the pointwise minimum over LRs of the loss at each
  step (`pointwise_min`);
- U-curves: final loss versus LR per condition (`final_vs_lr`), and the optimal LR per condition
  (`optimal_lrs`: regretless.recipe_fit's parabola in log10(LR); an optimum at the grid's edge is flagged,
  since the true optimum may lie outside).
Seeds are aggregated as mean with min/max band at every point. Departure from the paper: the "final" loss is
the mean over the last 10% of logged steps (a single step's batch loss is noisy), or the final eval loss when
every run in the comparison has one.
"""

from __future__ import annotations

import importlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from regretless.sweep.ledger import Ledger

TAIL_FRACTION = 0.1
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "attn")
MLP_NAMES = ("gate", "up_proj", "down_proj", "mlp", "expert")


@dataclass
class RunRecord:
    """One run: its config, summary and per-step metrics, plus the ledger's axes/tags/status."""

    id: str
    name: str
    command: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    path: Path
    axes: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    status: str = "queued"
    error: str | None = None

    @property
    def method(self) -> str:
        return "full" if self.config.get("lora") is None else "lora"

    @property
    def rank(self) -> int | None:
        return None if self.config.get("lora") is None else int(self.config["lora"].get("rank", 0))

    @property
    def targets(self) -> str:
        lora = self.config.get("lora")
        if lora is None:
            return "full"
        t = lora.get("targets", "all")
        return t if isinstance(t, str) else "+".join(t)

    @property
    def lr(self) -> float | None:
        v = self.config.get("lr")
        if v is None and self.summary:
            v = self.summary.get("lr")
        return None if v is None else float(v)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def batch_size(self) -> int | None:
        return self.config.get("batch_size")

    @property
    def trainable_params(self) -> int | None:
        return (self.summary or {}).get("trainable_params")

    @property
    def finished(self) -> bool:
        return self.status in ("done", "diverged")


@dataclass
class Curve:
    """A seed-aggregated series: mean with a min/max band over seeds; n = seeds."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int = 1
    lr: np.ndarray | None = None  # for pointwise minima: the LR chosen at each step


@dataclass
class Optimum:
    condition: str
    lr: float
    value: float
    at_edge: bool  # best grid point is the lowest or highest LR tried: the true optimum may lie beyond
    n_lrs: int


# -- loading ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (run still writing) is skipped."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            rows.append(d)
    return rows


def _record(folder: Path, row: dict[str, Any] | None) -> RunRecord:
    cfg_path = folder / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else dict((row or {}).get("config", {}))
    command = str(cfg.pop("command", (row or {}).get("command", "sft")))
    summary = _read_json(folder / "summary.json")
    status = (row or {}).get("status") or ("queued" if summary is None else "")
    if summary is not None and summary.get("status") in ("done", "diverged"):
        status = summary["status"]
    return RunRecord(id=(row or {}).get("id", folder.name), name=(row or {}).get("name", folder.name),
                     command=command, config=cfg, summary=summary, metrics=read_metrics(folder / "metrics.jsonl"),
                     path=folder, axes=(row or {}).get("axes", {}), tags=tuple((row or {}).get("tags", ())),
                     status=status or "queued", error=(row or {}).get("error"))


def load_runs(root: str | Path) -> list[RunRecord]:
    """Every run under `root`: rows of each ledger.sqlite found, plus run folders (config.yaml) outside any."""
    root = Path(root)
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for ledger_path in sorted(root.rglob("ledger.sqlite")):
        for row in Ledger(ledger_path).runs():
            folder = (ledger_path.parent / row["path"]).resolve()
            seen.add(folder)
            records.append(_record(folder, row))
    for cfg in sorted(root.rglob("config.yaml")):
        folder = cfg.parent.resolve()
        if folder not in seen and ((folder / "metrics.jsonl").exists() or (folder / "summary.json").exists()):
            seen.add(folder)
            records.append(_record(folder, None))
    return records


def select(records: Iterable[RunRecord], finding: str, command: str) -> list[RunRecord]:
    """Runs tagged for `finding`; if no run of this command carries any tag, all runs of the command."""
    recs = [r for r in records if r.command == command]
    if any(r.tags for r in recs):
        return [r for r in recs if finding in r.tags]
    return recs


# -- conditions and aggregation --------------------------------------------------------------------------
def condition(r: RunRecord) -> str:
    return "full" if r.method == "full" else f"r{r.rank}"


def condition_label(c: str) -> str:
    return "FullFT" if c == "full" else f"LoRA r={c[1:]}" if c[1:].isdigit() else c


def condition_order(c: str) -> tuple[int, float]:
    return (1, 0.0) if c == "full" else (0, float(c[1:])) if c[1:].isdigit() else (0, math.inf)


def placement_group(r: RunRecord) -> str:
    """attn | mlp | all | full, from a preset name or from the module names targeted."""
    t = r.targets
    if t in ("attn", "mlp", "all", "full"):
        return t
    names = t.split("+")
    if all(any(a in n for a in ATTN_NAMES) for n in names):
        return "attn"
    if all(any(m in n for m in MLP_NAMES) for n in names):
        return "mlp"
    return t


def group(records: Iterable[RunRecord], key: Callable[[RunRecord], Any]) -> dict[Any, list[RunRecord]]:
    out: dict[Any, list[RunRecord]] = defaultdict(list)
    for r in records:
        out[key(r)].append(r)
    return dict(out)


def series(r: RunRecord, metric: str, smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, finite values only, trailing moving average over <= `smooth` points."""
    pts = [(m["step"], m[metric]) for m in r.metrics
           if "step" in m and isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = (np.asarray(x, dtype=float) for x in zip(*pts))
    if smooth > 1:
        c = np.cumsum(np.insert(vals, 0, 0.0))
        idx = np.arange(1, len(vals) + 1)
        # the window grows with the step (at most a fifth of it), so early points on a log-x plot stay sharp
        lo = idx - np.minimum(smooth, 1 + idx // 5)
        vals = (c[idx] - c[lo]) / (idx - lo)
    return steps, vals


def seed_curve(records: list[RunRecord], metric: str, smooth: int = 1) -> Curve | None:
    """Mean and min/max over seeds at the steps every seed logged."""
    parts = [series(r, metric, smooth) for r in records]
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return None
    common = sorted(set.intersection(*(set(p[0].tolist()) for p in parts)))
    if not common:
        return None
    stack = np.stack([np.interp(common, s, v) for s, v in parts])
    return Curve(np.asarray(common), stack.mean(0), stack.min(0), stack.max(0), n=len(parts))


def pointwise_min(records: list[RunRecord], metric: str = "loss", key: Callable = condition, smooth: int = 1,
                  maximize: bool = False) -> dict[str, Curve]:
    """Per condition: at each step, the best (seed-mean) value over LRs; band = that LR's seed min/max."""
    out = {}
    for cond, recs in group(records, key).items():
        by_lr = {lr: seed_curve(rs, metric, smooth) for lr, rs in group(recs, lambda r: r.lr).items()}
        by_lr = {lr: c for lr, c in by_lr.items() if c is not None}
        if not by_lr:
            continue
        steps = np.asarray(sorted(set().union(*(c.steps.tolist() for c in by_lr.values()))))
        mean, lo, hi, lrs = (np.full(len(steps), np.nan) for _ in range(4))
        for lr, c in by_lr.items():
            idx = np.searchsorted(steps, c.steps)
            better = np.isnan(mean[idx]) | ((c.mean > mean[idx]) if maximize else (c.mean < mean[idx]))
            sel = idx[better]
            mean[sel], lo[sel], hi[sel] = c.mean[better], c.lo[better], c.hi[better]
            lrs[sel] = lr if lr is not None else np.nan
        n = max(c.n for c in by_lr.values())
        out[cond] = Curve(steps, mean, lo, hi, n=n, lr=lrs)
    return dict(sorted(out.items(), key=lambda kv: condition_order(kv[0]) if isinstance(kv[0], str) else (0, 0)))


def final_value(r: RunRecord, metric: str = "loss") -> float:
    """Final value of a run: nan if diverged or unfinished; eval metrics from the summary or last logged;
    train metrics as the mean over the last 10% of logged steps."""
    if r.status != "done":
        return math.nan
    if metric.startswith("eval_"):
        v = (r.summary or {}).get(f"final_{metric}")
        if isinstance(v, (int, float)):
            return float(v)
    _, vals = series(r, metric)
    if not len(vals):
        return math.nan
    k = max(1, math.ceil(len(vals) * TAIL_FRACTION))
    return float(vals[-k:].mean())


def pick_metric(records: list[RunRecord], command: str = "sft") -> str:
    """eval_loss / eval_accuracy when every finished run has one, else the training loss / reward."""
    ev, train = ("eval_loss", "loss") if command == "sft" else ("eval_accuracy", "reward")
    done = [r for r in records if r.status == "done"]
    return ev if done and all(math.isfinite(final_value(r, ev)) for r in done) else train


def seed_stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "lo": float(v.min()), "hi": float(v.max()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def final_vs_lr(records: list[RunRecord], metric: str = "loss", key: Callable = condition) -> list[dict]:
    """Rows {condition, lr, final_loss (seed mean), lo, hi, std, n, diverged, values (per seed)}, sorted by
    condition then LR."""
    rows = []
    for (cond, lr), recs in group(records, lambda r: (key(r), r.lr)).items():
        if lr is None:
            continue
        values = [final_value(r, metric) for r in recs]
        st = seed_stats(values)
        rows.append({"condition": cond, "lr": lr, "final_loss": st["mean"], "lo": st["lo"], "hi": st["hi"],
                     "std": st["std"], "n": st["n"], "diverged": sum(r.status == "diverged" for r in recs),
                     "values": values})
    return sorted(rows, key=lambda d: (condition_order(str(d["condition"])), str(d["condition"]), d["lr"]))


def _fit_one(cond: str, pts: list[tuple[float, float]], maximize: bool) -> Optimum | None:
    pts = sorted((lr, v) for lr, v in pts if math.isfinite(v) and lr > 0)
    if not pts:
        return None
    xs = np.log10([p[0] for p in pts])
    ys = np.asarray([(-p[1] if maximize else p[1]) for p in pts])
    i = int(np.argmin(ys))
    at_edge = len(pts) < 3 or i in (0, len(pts) - 1)
    x_best, y_best = xs[i], ys[i]
    if not at_edge:
        a, b, c = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
        if a > 0:
            x_best = float(np.clip(-b / (2 * a), xs[i - 1], xs[i + 1]))
            y_best = float(np.polyval([a, b, c], x_best))
    return Optimum(cond, float(10**x_best), float(-y_best if maximize else y_best), at_edge, len(pts))


def optimal_lrs(rows: list[dict], maximize: bool = False) -> dict[str, Optimum]:
    """Optimal LR per condition from rows {condition, lr, final_loss[, values]} (`final_vs_lr`).

    Minimizing: `regretless.recipe_fit.fit_sweep` (least-squares parabola in log10 LR over every seed's
    value near the best grid point) when available; else, and for rewards (maximize), a parabola in log10 LR
    through the best grid point and its two neighbours. `at_edge` always comes from the grid."""
    by_cond: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for d in rows:
        by_cond[d["condition"]].append((float(d["lr"]), float(d["final_loss"])))
    out = {c: o for c, pts in by_cond.items() if (o := _fit_one(c, pts, maximize)) is not None}
    fit_sweep = _external_fit()
    if fit_sweep is None or maximize:
        return out
    raw = [{"condition": d["condition"], "lr": d["lr"], "final_loss": v}
           for d in rows if d["condition"] in out for v in d.get("values", [d["final_loss"]]) if math.isfinite(v)]
    if raw:
        for c, fit in fit_sweep(raw).items():
            out[c] = Optimum(c, float(fit.lr), float(fit.loss), out[c].at_edge, out[c].n_lrs)
    return out


def _external_fit() -> Callable | None:
    try:
        mod = importlib.import_module("regretless.recipe_fit")
    except ImportError:
        return None
    return getattr(mod, "fit_sweep", None)


def best_per_condition(records: list[RunRecord], metric: str, key: Callable, maximize: bool = False) -> dict:
    """Per condition: the LR whose seed-mean final value is best, with its seed stats."""
    out = {}
    for cond, recs in group(records, key).items():
        cands = []
        for lr, rs in group(recs, lambda r: r.lr).items():
            st = seed_stats([final_value(r, metric) for r in rs])
            if st["n"]:
                cands.append({"lr": lr, **st, "trainable_params": rs[0].trainable_params})
        if cands:
            out[cond] = (max if maximize else min)(cands, key=lambda d: d["mean"])
    return out
