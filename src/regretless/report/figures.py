"""The paper's five figures, one function each, drawn from run records (matplotlib, Agg, PNG + SVG).

Each `fig_*` takes run records and an output stem (`.../figures/lr_curves`) and returns the files written,
or [] when there is nothing to draw (the report then marks the figure as missing, not an error). Seeds are
drawn as bands (min to max over seeds) around the seed mean. No pyplot: each figure is its own `Figure`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from regretless.report import analysis as A
from regretless.report.analysis import RunRecord

FULL_COLOR = "black"
GROUP_COLORS = {"attn": "tab:red", "mlp": "tab:blue", "all": "tab:green"}


def _figure(width: float = 6.4, height: float = 4.4) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p)
    return paths


def _colors(conditions: list[str]) -> dict[str, object]:
    import matplotlib

    ranks = [c for c in conditions if c != "full"]
    cmap = matplotlib.colormaps["viridis"]
    out: dict[str, object] = {c: cmap(i / max(1, len(ranks) - 1) * 0.9) for i, c in enumerate(ranks)}
    out["full"] = FULL_COLOR
    return out


def _band(ax, x, c: A.Curve, color, label: str, **kw) -> None:
    ax.plot(x, c.mean, color=color, label=label, **kw)
    if c.n > 1:
        ax.fill_between(x, c.lo, c.hi, color=color, alpha=0.2, linewidth=0)


def fig_loss_curves(records: list[RunRecord], stem: Path, smooth: int | None = None) -> list[Path]:
    """(1) Training loss vs step per rank and FullFT: pointwise minimum over LRs, log-x."""
    recs = [r for r in records if r.status == "done"]
    curves = A.pointwise_min(recs, "loss", smooth=smooth or _window(recs))
    if not curves:
        return []
    fig, ax = _figure()
    colors = _colors(list(curves))
    for cond, c in curves.items():
        keep = c.steps > 0
        _band(ax, c.steps[keep], A.Curve(c.steps[keep], c.mean[keep], c.lo[keep], c.hi[keep], c.n), colors[cond],
              A.condition_label(cond), linestyle="--" if cond == "full" else "-")
    ax.set_xscale("log")
    ax.set(xlabel="step", ylabel="training loss (min over LRs)", title="Loss vs steps, best LR at each step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, stem)


def _window(recs: list[RunRecord]) -> int:
    return max(1, max((len(r.metrics) for r in recs), default=1) // 20)


def fig_lr_curves(records: list[RunRecord], stem: Path, metric: str | None = None) -> list[Path]:
    """(2) Final loss vs LR per rank and FullFT (U-curves), fitted optima marked, LoRA/FullFT ratio shown."""
    metric = metric or A.pick_metric(records, "sft")
    rows = A.final_vs_lr(records, metric)
    rows = [d for d in rows if math.isfinite(d["final_loss"])]
    if not rows:
        return []
    opt = A.optimal_lrs(rows)
    conds = sorted({d["condition"] for d in rows}, key=A.condition_order)
    colors = _colors(conds)
    fig, ax = _figure()
    for cond in conds:
        pts = [d for d in rows if d["condition"] == cond]
        x = np.array([d["lr"] for d in pts])
        y, lo, hi = (np.array([d[k] for d in pts]) for k in ("final_loss", "lo", "hi"))
        label = A.condition_label(cond)
        if cond in opt:
            label += f" (LR* {opt[cond].lr:.2g}{', edge' if opt[cond].at_edge else ''})"
        _band(ax, x, A.Curve(x, y, lo, hi, max(d["n"] for d in pts)), colors[cond], label, marker="o",
              markersize=3, linestyle="--" if cond == "full" else "-")
        if cond in opt:
            ax.plot([opt[cond].lr], [opt[cond].value], marker="*", markersize=12, color=colors[cond],
                    markeredgecolor="white")
    title = "Final loss vs LR"
    lora = [o.lr for c, o in opt.items() if c != "full" and not o.at_edge]
    if "full" in opt and lora:
        ratio = float(np.exp(np.mean(np.log(lora)))) / opt["full"].lr
        title += f": LoRA/FullFT optimal LR = {ratio:.1f}x"
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=f"final {metric.replace('_', ' ')}", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, stem)


def _best_line(ax, best: dict, xs: list, cond: str, color, label: str) -> None:
    pts = [(x, best[(cond, x)]) for x in xs if (cond, x) in best]
    if not pts:
        return
    x = np.array([p[0] for p in pts], dtype=float)
    y, lo, hi = (np.array([p[1][k] for p in pts]) for k in ("mean", "lo", "hi"))
    _band(ax, x, A.Curve(x, y, lo, hi, max(p[1]["n"] for p in pts)), color, label, marker="o")


def fig_batch(records: list[RunRecord], stem: Path, metric: str | None = None) -> list[Path]:
    """(3) Best-LR final loss vs batch size, each LoRA rank vs FullFT."""
    metric = metric or A.pick_metric(records, "sft")
    best = A.best_per_condition(records, metric, key=lambda r: (A.condition(r), r.batch_size))
    sizes = sorted({b for (_, b) in best if b is not None})
    if not sizes:
        return []
    conds = sorted({c for c, _ in best}, key=A.condition_order)
    colors = _colors(conds)
    fig, ax = _figure()
    for cond in conds:
        _best_line(ax, best, sizes, cond, colors[cond], A.condition_label(cond))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size (sequences)", ylabel=f"final {metric.replace('_', ' ')} (best LR)",
           title="Final loss vs batch size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, stem)


def fig_placement(records: list[RunRecord], stem: Path, metric: str | None = None) -> list[Path]:
    """(4) Best-LR final loss vs trainable parameters for attention-only, MLP-only and all-matrices LoRA."""
    recs = [r for r in records if r.method == "lora"]
    metric = metric or A.pick_metric(recs, "sft")
    best = A.best_per_condition(recs, metric, key=lambda r: (A.placement_group(r), r.rank))
    if not best:
        return []
    fig, ax = _figure()
    use_params = all(v["trainable_params"] for v in best.values())
    for g in sorted({g for g, _ in best}):
        pts = sorted((rk, v) for (gg, rk), v in best.items() if gg == g)
        x = np.array([v["trainable_params"] if use_params else rk for rk, v in pts], dtype=float)
        y, lo, hi = (np.array([v[k] for _, v in pts]) for k in ("mean", "lo", "hi"))
        color = GROUP_COLORS.get(g, "tab:gray")
        _band(ax, x, A.Curve(x, y, lo, hi, max(v["n"] for _, v in pts)), color, f"{g}", marker="o")
        for xi, yi, (rk, _) in zip(x, y, pts):
            ax.annotate(f"r={rk}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters" if use_params else "rank",
           ylabel=f"final {metric.replace('_', ' ')} (best LR)", title="Where to apply LoRA")
    ax.legend(fontsize=8, title="targets")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, stem)


def fig_rl_reward(records: list[RunRecord], stem: Path, smooth: int | None = None) -> list[Path]:
    """(5) RL reward vs step per rank and FullFT, each at its best LR (by final reward)."""
    recs = [r for r in records if r.status == "done"]
    if not recs:
        return []
    best = A.best_per_condition(recs, A.pick_metric(recs, "rl"), key=A.condition, maximize=True)
    conds = sorted(best, key=A.condition_order)
    colors = _colors(conds)
    fig, ax = _figure()
    drawn = 0
    for cond in conds:
        group = [r for r in recs if A.condition(r) == cond and r.lr == best[cond]["lr"]]
        c = A.seed_curve(group, "reward", smooth or _window(group))
        if c is None:
            continue
        drawn += 1
        _band(ax, c.steps, c, colors[cond], f"{A.condition_label(cond)} (LR {best[cond]['lr']:.2g})",
              linestyle="--" if cond == "full" else "-")
    if not drawn:
        return []
    ax.set(xlabel="step", ylabel="reward (best LR)", title="RL reward vs steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, stem)


FIGURES: dict[str, tuple[str, str, Callable[[list[RunRecord], Path], list[Path]]]] = {
    # name -> (finding whose runs it draws, trainer command, function)
    "loss_curves": ("capacity", "sft", fig_loss_curves),
    "lr_curves": ("lr_ratio", "sft", fig_lr_curves),
    "batch": ("batch", "sft", fig_batch),
    "placement": ("placement", "sft", fig_placement),
    "rl_reward": ("rl", "rl", fig_rl_reward),
}
