"""The paper's five figures, one function each, drawn from the arms of the comparisons (matplotlib Agg,
PNG + SVG, no pyplot). The paper's axes: log steps for learning curves, log LR for U-curves.

Each `fig_*(all_arms, stem)` returns the files written, or [] when it has nothing to draw (the report then
says the figure is missing). Seed bands: min to max over the seeds of the LR drawn; every seed's final value
is a dot on the U-curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from regretless.report import analysis as A

FULL_COLOR = "black"
ROLE_COLORS = {"attn": "tab:red", "mlp": "tab:blue", "all": "tab:green"}


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.4) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p)
    return paths


def _rank_colors(names: list[str]) -> dict[str, object]:
    import matplotlib

    ranks = sorted((n for n in names if n != "full"), key=A.rank_of)
    cmap = matplotlib.colormaps["viridis"]
    out: dict[str, object] = {n: cmap(i / max(1, len(ranks) - 1) * 0.9) for i, n in enumerate(ranks)}
    out["full"] = FULL_COLOR
    return out


def _label(name: str) -> str:
    if name in ("full", "rl-full") or name.startswith("full-"):
        return "FullFT" + name[4:].replace("-", " ") if name.startswith("full") else "FullFT"
    return "LoRA " + name.replace("rl-", "").replace("-", " ")


def _best_lr(arm: A.Arm) -> float | None:
    sc = arm.scores()
    if not sc:
        return None
    key = (lambda lr: -np.mean(sc[lr])) if arm.maximize else (lambda lr: np.mean(sc[lr]))
    return min(sc, key=key)


def _seed_band(ax, arm: A.Arm, lr: float, metric: str, color, label: str, x_scale: float = 1.0) -> bool:
    runs = arm.at_lr(lr)
    parts = [r.series(metric) for r in runs]
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return False
    steps, mean, _ = A.eval_curve(runs, metric)
    if not len(steps):
        return False
    stack = np.stack([[v[list(s).index(t)] for t in steps] for s, v in parts])
    x = np.maximum(steps, 0.5) * x_scale
    ax.plot(x, mean, color=color, label=label, marker=".")
    if len(parts) > 1:
        ax.fill_between(x, stack.min(0), stack.max(0), color=color, alpha=0.2, linewidth=0)
    return True


def fig_capacity(all_arms: dict[str, A.Arm], stem: Path) -> list[Path]:
    """(1) Capacity: held-out eval loss vs step (log), pointwise minimum over LRs, FullFT and each rank."""
    arms = A.base_arms(all_arms)
    fig, (ax,) = _figure()
    colors = _rank_colors(list(arms))
    drawn = False
    for name in sorted(arms, key=lambda n: (n == "full", A.rank_of(n))):
        c = A.pointwise_min(arms[name])
        if len(c["steps"]) < 2:
            continue
        x = np.maximum(c["steps"], 0.5)
        ax.plot(x, c["value"], color=colors[name], label=_label(name), marker=".", lw=2 if name == "full" else 1.5)
        lr = _best_lr(arms[name])
        runs = arms[name].at_lr(lr) if lr is not None else []
        if len(runs) > 1:  # seed band of the LR that is best at the end
            s, _, _ = A.eval_curve(runs)
            vals = np.stack([[r.series("eval_loss")[1][list(r.series("eval_loss")[0]).index(t)] for t in s]
                             for r in runs])
            ax.fill_between(np.maximum(s, 0.5), vals.min(0), vals.max(0), color=colors[name], alpha=0.15, lw=0)
        drawn = True
    if not drawn:
        return []
    ax.set_xscale("log")
    ax.set(xlabel="step (log; step 0 drawn at 0.5)", ylabel="held-out eval loss (min over LRs)",
           title="Capacity: LoRA ranks vs FullFT")
    ax.legend(fontsize=8)
    return _save(fig, stem)


def _u_curve(ax, arm: A.Arm, color, label: str) -> bool:
    sc = arm.scores()
    pts = [(lr, v) for lr, vs in sc.items() for v in vs if math.isfinite(v)]
    if not pts:
        return False
    lrs = sorted(sc)
    means = [np.mean(sc[lr]) if all(math.isfinite(v) for v in sc[lr]) else np.nan for lr in lrs]
    ax.plot(lrs, means, color=color, label=label, lw=1.5)
    ax.scatter(*zip(*pts), color=color, s=10, alpha=0.6)
    div = [lr for lr in lrs if not all(math.isfinite(v) for v in sc[lr])]
    if div:
        ax.scatter(div, [np.nanmax(means)] * len(div), marker="x", color=color, s=30)
    return True


def fig_lr(all_arms: dict[str, A.Arm], stem: Path, optima: dict | None = None, predicted: dict | None = None
           ) -> list[Path]:
    """(2) LR ratio: final eval loss vs LR (log) per arm, every seed a dot, fitted optima dashed, the
    recipe's LRs as triangles (x: diverged)."""
    arms = A.base_arms(all_arms)
    fig, (ax,) = _figure()
    colors = _rank_colors(list(arms))
    drawn = False
    for name in sorted(arms, key=lambda n: (n == "full", A.rank_of(n))):
        if _u_curve(ax, arms[name], colors[name], _label(name)):
            drawn = True
            o = (optima or {}).get(name)
            if o:
                ax.axvline(o["lr"], color=colors[name], ls="--", lw=0.8)
                ax.axvspan(o["interval"][0], o["interval"][1], color=colors[name], alpha=0.08)
    if not drawn:
        return []
    for key, color in (("full", FULL_COLOR), ("lora", "tab:purple")):
        if predicted and predicted.get(key):
            ax.scatter([predicted[key]], [ax.get_ylim()[0]], marker="^", color=color, s=60, zorder=5,
                       label=f"recipe {'FullFT' if key == 'full' else 'LoRA'} LR")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log)", ylabel="final held-out eval loss", title="LR ratio: U-curves")
    ax.legend(fontsize=8)
    return _save(fig, stem)


def fig_batch(all_arms: dict[str, A.Arm], stem: Path) -> list[Path]:
    """(3) Batch size: eval loss vs examples seen (log) at each arm's best LR, small and large batch."""
    sft = [a for a in all_arms.values() if a.command == "sft" and a.targets in ("all", "full") and a.examples]
    top = max((a.rank for a in sft if a.rank is not None), default=None)
    sft = [a for a in sft if a.method == "full" or a.rank == top]
    sizes = sorted({a.batch_size for a in sft})
    if len(sizes) < 2:
        return []
    fig, (ax,) = _figure()
    styles = {b: ("-" if i == 0 else "--") for i, b in enumerate(sizes)}
    drawn = False
    for a in sorted(sft, key=lambda a: (a.batch_size, a.method)):
        lr = _best_lr(a)
        if lr is None:
            continue
        color = FULL_COLOR if a.method == "full" else "tab:green"
        runs = a.at_lr(lr)
        steps, mean, _ = A.eval_curve(runs)
        if not len(steps):
            continue
        x = np.maximum(steps * a.batch_size, 0.5 * a.batch_size)
        ax.plot(x, mean, color=color, ls=styles[a.batch_size], marker=".",
                label=f"{'FullFT' if a.method == 'full' else f'LoRA r={a.rank}'} batch {a.batch_size} (lr {lr:.2g})")
        drawn = True
    if not drawn:
        return []
    ax.set_xscale("log")
    ax.set(xlabel="examples seen (log)", ylabel="held-out eval loss", title="Batch size: LoRA vs FullFT")
    ax.legend(fontsize=8)
    return _save(fig, stem)


def fig_placement(all_arms: dict[str, A.Arm], stem: Path) -> list[Path]:
    """(4) Where to apply: final eval loss vs LR (log) for MLP-only, attention-only and all matrices."""
    sft = {k: a for k, a in all_arms.items() if a.command == "sft" and "-bs" not in k}
    mlp = [a for a in sft.values() if a.targets == "mlp"]
    attn = [a for a in sft.values() if a.targets == "attn"]
    if not mlp or not attn:
        return []
    chosen = [*mlp, *attn]
    alls = [sft[f"r{m.rank}"] for m in mlp if f"r{m.rank}" in sft]
    fig, (ax,) = _figure()
    for a in [*chosen, *alls]:
        role = a.targets if a.targets in ROLE_COLORS else "all"
        _u_curve(ax, a, ROLE_COLORS[role], f"{role} r={a.rank} ({a.trainable_params or 0:,} params)")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log)", ylabel="final held-out eval loss", title="Where to apply LoRA")
    ax.legend(fontsize=8)
    return _save(fig, stem)


def fig_rl(all_arms: dict[str, A.Arm], stem: Path) -> list[Path]:
    """(5) RL: held-out greedy accuracy vs step at each arm's best LR (left), final accuracy vs LR (right)."""
    arms = {k: a for k, a in all_arms.items() if a.command == "rl"}
    if not arms:
        return []
    fig, (ax, ax2) = _figure(ncols=2)
    drawn = False
    for i, (name, a) in enumerate(sorted(arms.items())):
        color = FULL_COLOR if name == "rl-full" else ["tab:orange", "tab:green", "tab:blue"][i % 3]
        lr = _best_lr(a)
        if lr is not None and _seed_band(ax, a, lr, "eval_accuracy", color, f"{_label(name)} (lr {lr:.2g})"):
            drawn = True
        _u_curve(ax2, a, color, _label(name))
    if not drawn:
        return []
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="step (symlog)", ylabel="held-out greedy accuracy", title="RL: learning curves")
    ax2.set_xscale("log")
    ax2.set(xlabel="learning rate (log)", ylabel="final held-out accuracy", title="RL: accuracy vs LR")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    return _save(fig, stem)


FIGURES: dict[str, tuple[str, Callable[..., list[Path]]]] = {
    "capacity": ("capacity", fig_capacity), "lr_curves": ("lr_ratio", fig_lr), "batch": ("batch", fig_batch),
    "placement": ("placement", fig_placement), "rl": ("rl", fig_rl)}
