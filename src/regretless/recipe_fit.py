"""Fit the recipe's constants from your own LR sweeps: optimal LR per condition, LoRA/FullFT ratio, exponent p.

Input is rows of `condition, lr, final_loss` (extra keys such as `seed` are ignored): a list of dicts, so the
sweep ledger can hand its rows over, or a CSV file (`read_sweep_csv`). Pure numpy.

- Optimal LR: the paper reads it off the U-curve of final loss versus LR. We interpolate: a quadratic in
  log10 LR fitted by least squares to every row (all seeds) within `half_width` grid points of the best grid
  point (by mean loss over seeds), its vertex clamped to the best point's neighbours. Its uncertainty comes
  from the fit's curvature: the delta method on the least-squares covariance, residual variance from the fit
  (so it needs more rows than 3; with fewer it is None). Diverged runs (NaN/inf loss) are dropped.
- Ratio: LoRA LR* / FullFT LR*, with the log10 errors added in quadrature; over several models the geometric
  mean with the spread between models (the paper's "fit over 14 models: 9.8").
- Exponent: log-log least squares of LR* against 2000/hidden_size: LR* = base * (2000/hidden)^p.
`summarize_sweep(rows)` does all three when rows also carry `model`, `method` (lora|full) and `hidden_size`.
Departures: the paper does not say how it interpolated or what uncertainty it attached; these are our choices.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from regretless.errors import UserError

Z95 = 1.96


@dataclass(frozen=True)
class OptimalLR:
    condition: str
    lr: float  # interpolated optimum
    loss: float  # fitted (or best mean) loss at the optimum
    log10_lr_se: float | None  # standard error of log10(lr); None when it cannot be estimated
    best_grid_lr: float
    n_points: int  # finite rows used for the grid search
    method: str  # quadratic | grid (no usable curvature) | edge (best point at the grid's edge)
    note: str = ""


@dataclass(frozen=True)
class RatioFit:
    ratio: float
    log10_se: float | None
    low: float | None  # 95% interval
    high: float | None
    n: int = 1  # models / condition pairs behind it
    note: str = ""


@dataclass(frozen=True)
class ExponentFit:
    p: float
    base: float  # LR* at hidden size 2000
    p_se: float | None
    log10_base_se: float | None
    n: int


def _float(value: Any, where: str) -> float:
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in ("nan", "none", "null", "diverged"):
            return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a number, got {value!r}") from None


def fit_optimal_lr(lrs: Sequence[float], losses: Sequence[float], condition: str = "",
                   half_width: int = 2) -> OptimalLR:
    """Optimal LR of one condition from (lr, final_loss) points; repeated LRs (seeds) are all used."""
    lr_a = np.asarray([_float(v, f"{condition or 'sweep'}: lr") for v in lrs], dtype=float)
    loss_a = np.asarray([_float(v, f"{condition or 'sweep'}: final_loss") for v in losses], dtype=float)
    if lr_a.shape != loss_a.shape:
        raise UserError(f"{condition or 'sweep'}: {len(lr_a)} LRs but {len(loss_a)} losses")
    if np.any(~np.isfinite(lr_a)) or np.any(lr_a <= 0):
        raise UserError(f"{condition or 'sweep'}: every lr must be a finite number > 0, got {lr_a.tolist()}")
    if half_width < 1:
        raise UserError(f"half_width: expected an integer >= 1, got {half_width!r}")
    ok = np.isfinite(loss_a)
    lr_a, loss_a = lr_a[ok], loss_a[ok]
    if lr_a.size == 0:
        raise UserError(f"{condition or 'sweep'}: no finite final_loss (every run diverged?)")
    x = np.log10(lr_a)
    grid = np.unique(x)
    means = np.array([loss_a[x == g].mean() for g in grid])
    i = int(np.argmin(means))
    best_lr, best_loss = float(10 ** grid[i]), float(means[i])
    edge = grid.size > 1 and i in (0, grid.size - 1)
    note = "best LR is at the edge of the grid: extend the sweep" if edge else ""
    if grid.size < 3:
        return OptimalLR(condition, best_lr, best_loss, None, best_lr, int(lr_a.size), "grid",
                         note or "fewer than 3 LRs: no interpolation")
    lo, hi = max(0, i - half_width), min(grid.size - 1, i + half_width)
    if hi - lo < 2:  # at an edge with half_width 1: take the 3 nearest grid points
        lo, hi = (0, 2) if i == 0 else (grid.size - 3, grid.size - 1)
    sel = (x >= grid[lo]) & (x <= grid[hi])
    xs, ys = x[sel], loss_a[sel]
    design = np.stack([xs**2, xs, np.ones_like(xs)], axis=1)  # (n, 3)
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    a, b, c = coef
    if not a > 0:
        return OptimalLR(condition, best_lr, best_loss, None, best_lr, int(lr_a.size), "grid",
                         note or "loss is not convex around the best LR: used the best grid point")
    x_lo, x_hi = grid[max(0, i - 1)], grid[min(grid.size - 1, i + 1)]
    x_star = float(np.clip(-b / (2 * a), x_lo, x_hi))
    se = None
    dof = xs.size - 3
    if dof > 0:
        resid = ys - design @ coef
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.pinv(design.T @ design)
        g = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])  # d x* / d(a, b, c)
        se = float(math.sqrt(max(float(g @ cov @ g), 0.0)))
    fitted = float(a * x_star**2 + b * x_star + c)
    return OptimalLR(condition, float(10**x_star), fitted, se, best_lr, int(lr_a.size),
                     "edge" if edge else "quadratic", note)


def _check_rows(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    out = list(rows)
    if not out:
        raise UserError("sweep rows: none given; expected rows with " + ", ".join(keys))
    for n, row in enumerate(out):
        missing = [k for k in keys if k not in row]
        if missing:
            raise UserError(f"sweep row {n}: missing {', '.join(missing)}; expected keys {', '.join(keys)}")
    return out


def fit_sweep(rows: Iterable[dict[str, Any]], half_width: int = 2) -> dict[str, OptimalLR]:
    """Optimal LR per condition from rows with keys condition, lr, final_loss."""
    rows = _check_rows(rows, ("condition", "lr", "final_loss"))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["condition"]), []).append(row)
    return {cond: fit_optimal_lr([r["lr"] for r in rs], [r["final_loss"] for r in rs], cond, half_width)
            for cond, rs in groups.items()}


def fit_optimal_lrs(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """condition -> interpolated optimal LR (the plain-number view of `fit_sweep`, for report/analysis)."""
    return {cond: fit.lr for cond, fit in fit_sweep(rows).items()}


def read_sweep_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV with a header holding at least condition, lr, final_loss."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such sweep CSV")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = ("condition", "lr", "final_loss")
        missing = [k for k in need if k not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}:1: missing column(s) {', '.join(missing)}; expected {', '.join(need)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = dict(row)
            row["lr"] = _float(row["lr"], f"{path}:{line}: lr")
            row["final_loss"] = _float(row["final_loss"], f"{path}:{line}: final_loss")
            rows.append(row)
    return rows


def _interval(log10_ratio: float, se: float | None) -> tuple[float | None, float | None]:
    if se is None:
        return None, None
    return float(10 ** (log10_ratio - Z95 * se)), float(10 ** (log10_ratio + Z95 * se))


def lr_ratio(lora: OptimalLR, full: OptimalLR) -> RatioFit:
    """LoRA LR* / FullFT LR* with the two fits' log10 errors added in quadrature."""
    r = lora.lr / full.lr
    se = None
    if lora.log10_lr_se is not None and full.log10_lr_se is not None:
        se = math.hypot(lora.log10_lr_se, full.log10_lr_se)
    low, high = _interval(math.log10(r), se)
    notes = [f"{o.condition}: {o.note}" for o in (lora, full) if o.method == "edge"]
    return RatioFit(r, se, low, high, 1, "; ".join(notes))


def mean_ratio(ratios: Sequence[RatioFit]) -> RatioFit:
    """Geometric mean over several models; its error from the spread between them (n >= 2)."""
    if not ratios:
        raise UserError("ratios: expected at least one LoRA/FullFT ratio")
    logs = np.log10([r.ratio for r in ratios])
    m = float(logs.mean())
    if len(ratios) >= 2:
        se: float | None = float(logs.std(ddof=1) / math.sqrt(len(ratios)))
    else:
        se = ratios[0].log10_se
    low, high = _interval(m, se)
    return RatioFit(float(10**m), se, low, high, len(ratios))


def fit_exponent(hidden_sizes: Sequence[int], lrs: Sequence[float]) -> ExponentFit:
    """p and base of LR* = base * (2000 / hidden)^p by least squares in log-log (>= 2 distinct sizes)."""
    h = np.asarray(hidden_sizes, dtype=float)
    y = np.asarray(lrs, dtype=float)
    if h.shape != y.shape or h.ndim != 1:
        raise UserError(f"fit_exponent: {h.size} hidden sizes but {y.size} LRs")
    if np.any(~np.isfinite(h)) or np.any(h <= 0) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise UserError("fit_exponent: hidden sizes and LRs must be finite numbers > 0")
    if np.unique(h).size < 2:
        raise UserError("fit_exponent: need optimal LRs at >= 2 different hidden sizes")
    x = np.log10(2000.0 / h)
    design = np.stack([x, np.ones_like(x)], axis=1)  # (n, 2)
    coef, *_ = np.linalg.lstsq(design, np.log10(y), rcond=None)
    p, log_base = (float(v) for v in coef)
    p_se = base_se = None
    if x.size > 2:
        resid = np.log10(y) - design @ coef
        cov = float(resid @ resid) / (x.size - 2) * np.linalg.inv(design.T @ design)
        p_se, base_se = float(math.sqrt(cov[0, 0])), float(math.sqrt(cov[1, 1]))
    return ExponentFit(p, float(10**log_base), p_se, base_se, int(x.size))


def summarize_sweep(rows: Iterable[dict[str, Any]], half_width: int = 2) -> dict[str, Any]:
    """Everything the rows support: optimal LR per condition; with `model` and `method` (lora|full) keys the
    LoRA/FullFT ratio per model and over models; with `hidden_size` too, the exponent p per method.

    Each condition must hold one (model, method, hidden_size); returns plain dataclasses in a dict.
    """
    rows = _check_rows(rows, ("condition", "lr", "final_loss"))
    fits = fit_sweep(rows, half_width)
    meta: dict[str, dict[str, Any]] = {}
    for row in rows:
        info = {k: row[k] for k in ("model", "method", "hidden_size") if row.get(k) not in (None, "")}
        prev = meta.setdefault(str(row["condition"]), info)
        if prev != info:
            raise UserError(f"condition {row['condition']!r}: rows disagree on model/method/hidden_size "
                            f"({prev} vs {info})")
    out: dict[str, Any] = {"optimal_lr": fits}
    by_model: dict[str, dict[str, OptimalLR]] = {}
    for cond, info in meta.items():
        if "model" in info and info.get("method") in ("lora", "full"):
            slot = by_model.setdefault(str(info["model"]), {})
            if info["method"] in slot:
                raise UserError(f"model {info['model']!r}: two {info['method']} conditions "
                                f"({slot[info['method']].condition!r} and {cond!r}); expected one of each")
            slot[info["method"]] = fits[cond]
    ratios = {m: lr_ratio(s["lora"], s["full"]) for m, s in by_model.items() if len(s) == 2}
    if ratios:
        out["ratio_by_model"] = ratios
        out["ratio"] = mean_ratio(list(ratios.values()))
    exponents = {}
    for method in ("lora", "full"):
        pts = [(float(meta[c]["hidden_size"]), f.lr) for c, f in fits.items()
               if meta[c].get("method") == method and "hidden_size" in meta[c]]
        if len({h for h, _ in pts}) >= 2:
            exponents[method] = fit_exponent([h for h, _ in pts], [lr for _, lr in pts])
    if exponents:
        out["exponent"] = exponents
    return out
