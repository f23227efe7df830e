"""The paper's five findings as numeric checks on measured runs: held / did not hold / inconclusive.

Criteria (constants below; each claim's `criterion` field repeats them in words):
1. capacity: with L_c(t) the pointwise-min loss curve of condition c and D = L_full(first) - L_full(last) the
   FullFT loss drop, gap_c(t) = (L_c(t) - L_full(t)) / D. Held when the highest rank ends within 10% of D
   (gap <= 0.10), the lowest rank ends >= 0.10 behind and its gap grew by >= 0.05 since 10% of training.
2. lr_ratio: optimal LoRA LR (geometric mean over ranks >= 4, else all ranks) / optimal FullFT LR in [5, 20].
   Inconclusive when an optimum sits at the edge of its LR grid.
3. batch: relative gap (L_lora - L_full) / L_full of the best-LR final losses (highest rank) is <= 0.02 at
   the smallest batch and grows by >= 0.01 (and by more than 2 seed std where seeds exist) at the largest.
4. placement: MLP-only beats attention-only at every common rank and at the closest pair where attention
   has at least as many trainable parameters; all-matrices is within 1% of MLP-only or better.
5. rl: best rank-1 (lowest rank) final reward >= 0.9 x best FullFT final reward, or within 2 seed std.
   Inconclusive when FullFT's reward did not rise by at least 0.02 over training.
A claim whose runs are absent (or none finished) is inconclusive, never an error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from regretless.report import analysis as A
from regretless.report.analysis import RunRecord

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
CAP_HIGH_MAX_GAP, CAP_LOW_MIN_GAP, CAP_MIN_GROWTH, CAP_EARLY_FRACTION = 0.10, 0.10, 0.05, 0.10
LR_RATIO_RANGE, LR_RATIO_MIN_RANK = (5.0, 20.0), 4
BATCH_SMALL_MAX_GAP, BATCH_MIN_GROWTH = 0.02, 0.01
PLACEMENT_ALL_TOL = 0.01
RL_FRACTION, RL_MIN_LEARNING = 0.9, 0.02

PAPER = {
    "capacity": "FullFT and high-rank LoRA track each other; low ranks fall off the curve as training goes on.",
    "lr_ratio": "Optimal LoRA LR is about 10x the optimal FullFT LR (about 15x for runs of <= 100 steps).",
    "batch": "LoRA matches FullFT at small batch but lags at large batch, whatever the rank.",
    "placement": "Attention-only LoRA is worse than MLP-only, even at matched parameter count; all ~ MLP-only.",
    "rl": "In RL, even rank-1 LoRA matches FullFT.",
}
CRITERIA = {
    "capacity": f"highest rank's final gap <= {CAP_HIGH_MAX_GAP:.0%} of FullFT's loss drop; lowest rank's final "
                f"gap >= {CAP_LOW_MIN_GAP:.0%} and grown by >= {CAP_MIN_GROWTH:.0%} since {CAP_EARLY_FRACTION:.0%} "
                "of training",
    "lr_ratio": f"LoRA/FullFT optimal-LR ratio in [{LR_RATIO_RANGE[0]:g}, {LR_RATIO_RANGE[1]:g}], optima "
                "inside their LR grids",
    "batch": f"relative LoRA-FullFT gap <= {BATCH_SMALL_MAX_GAP:.0%} at the smallest batch and larger by "
             f">= {BATCH_MIN_GROWTH:.0%} (and > 2 seed std) at the largest",
    "placement": f"MLP-only < attention-only (every common rank, and at matched params); all <= MLP-only "
                 f"+ {PLACEMENT_ALL_TOL:.0%}",
    "rl": f"best lowest-rank reward >= {RL_FRACTION} x best FullFT reward, or within 2 seed std; FullFT reward "
          f"must rise >= {RL_MIN_LEARNING}",
}
TITLES = {"capacity": "1. Capacity", "lr_ratio": "2. LR ratio", "batch": "3. Batch size",
          "placement": "4. Where to apply", "rl": "5. RL"}


def _claim(finding: str, verdict: str, measured: str, reason: str, value: float | None = None,
           details: dict | None = None) -> dict[str, Any]:
    return {"finding": finding, "title": TITLES[finding], "paper": PAPER[finding], "criterion": CRITERIA[finding],
            "verdict": verdict, "measured": measured, "value": value, "reason": reason, "details": details or {}}


def _missing(finding: str, recs: list[RunRecord], need: str) -> dict[str, Any] | None:
    if not recs:
        return _claim(finding, INCONCLUSIVE, "-", f"no runs ({need})")
    if not any(r.status == "done" for r in recs):
        failed = sum(r.status == "failed" for r in recs)
        return _claim(finding, INCONCLUSIVE, "-", f"no finished runs ({len(recs)} runs, {failed} failed)")
    return None


def smooth_window(recs: list[RunRecord]) -> int:
    n = max((len(r.metrics) for r in recs), default=1)
    return max(1, n // 20)


def capacity(records: list[RunRecord]) -> dict[str, Any]:
    recs = A.select(records, "capacity", "sft")
    if (m := _missing("capacity", recs, "needs an SFT sweep over ranks and FullFT")) is not None:
        return m
    curves = A.pointwise_min([r for r in recs if r.status == "done"], "loss", smooth=smooth_window(recs))
    ranks = sorted(int(c[1:]) for c in curves if c != "full")
    if "full" not in curves or len(ranks) < 2:
        return _claim("capacity", INCONCLUSIVE, "-", "needs finished FullFT runs and at least two LoRA ranks")
    full = curves["full"]
    drop = float(full.mean[0] - full.mean[-1])
    if not drop > 0:
        return _claim("capacity", INCONCLUSIVE, f"FullFT loss drop {drop:.3g}", "FullFT loss did not fall")
    early = int(np.searchsorted(full.steps, full.steps[0] + CAP_EARLY_FRACTION * (full.steps[-1] - full.steps[0])))

    def gaps(rank: int) -> tuple[float, float]:
        c = curves[f"r{rank}"]
        g = (np.interp(full.steps, c.steps, c.mean) - full.mean) / drop
        return float(g[early]), float(g[-1])

    hi, lo = ranks[-1], ranks[0]
    (_, g_hi), (g_lo0, g_lo) = gaps(hi), gaps(lo)
    measured = (f"final gap (fraction of FullFT's loss drop {drop:.3g}): r={hi} {g_hi:+.1%}; r={lo} "
                f"{g_lo0:+.1%} at 10% of training -> {g_lo:+.1%} at the end")
    details = {f"r{r}": dict(zip(("early_gap", "final_gap"), gaps(r))) for r in ranks}
    problems = []
    if g_hi > CAP_HIGH_MAX_GAP:
        problems.append(f"r={hi} ends {g_hi:.1%} behind FullFT (> {CAP_HIGH_MAX_GAP:.0%})")
    if g_lo < CAP_LOW_MIN_GAP:
        problems.append(f"r={lo} ends only {g_lo:.1%} behind (< {CAP_LOW_MIN_GAP:.0%}): no capacity limit seen")
    elif g_lo - g_lo0 < CAP_MIN_GROWTH:
        problems.append(f"r={lo}'s gap did not grow over training ({g_lo0:.1%} -> {g_lo:.1%})")
    if problems:
        return _claim("capacity", NOT_HELD, measured, "; ".join(problems), g_lo, details)
    return _claim("capacity", HELD, measured, f"r={hi} tracks FullFT; r={lo} falls off as training goes on",
                  g_lo, details)


def lr_ratio(records: list[RunRecord]) -> dict[str, Any]:
    recs = A.select(records, "lr_ratio", "sft")
    if (m := _missing("lr_ratio", recs, "needs an SFT LR sweep of LoRA and FullFT")) is not None:
        return m
    rows = A.final_vs_lr(recs, A.pick_metric(recs, "sft"))
    opt = A.optimal_lrs(rows)
    lora = {c: o for c, o in opt.items() if c != "full"}
    if "full" not in opt or not lora:
        return _claim("lr_ratio", INCONCLUSIVE, "-", "needs finished LR sweeps of both FullFT and LoRA")
    cands = {c: o for c, o in lora.items() if int(c[1:]) >= LR_RATIO_MIN_RANK} or lora
    inside = {c: o for c, o in cands.items() if not o.at_edge}
    steps = max((int((r.summary or {}).get("steps") or 0) for r in recs), default=0)
    per_rank = ", ".join(f"{A.condition_label(c)} {o.lr:.2e}" + (" (edge)" if o.at_edge else "")
                         for c, o in sorted(opt.items(), key=lambda kv: A.condition_order(kv[0])))
    details = {"optimal_lr": {c: o.lr for c, o in opt.items()},
               "at_edge": [c for c, o in opt.items() if o.at_edge], "steps": steps}
    if opt["full"].at_edge or not inside:
        edge = [A.condition_label(c) for c, o in opt.items() if o.at_edge and (c == "full" or c in cands)]
        return _claim("lr_ratio", INCONCLUSIVE, f"optimal LRs: {per_rank}",
                      f"optimum at the edge of the LR grid for {', '.join(edge)}: widen the grid", None, details)
    ratio = float(np.exp(np.mean([np.log(o.lr) for o in inside.values()])) / opt["full"].lr)
    details["ratio"] = ratio
    measured = f"ratio {ratio:.1f} (optimal LRs: {per_rank}; {steps} steps)"
    lo, hi = LR_RATIO_RANGE
    note = " (the paper expects ~15x for runs of <= 100 steps)" if 0 < steps <= 100 else ""
    if lo <= ratio <= hi:
        return _claim("lr_ratio", HELD, measured, f"{ratio:.1f} is in [{lo:g}, {hi:g}]{note}", ratio, details)
    return _claim("lr_ratio", NOT_HELD, measured, f"{ratio:.1f} is outside [{lo:g}, {hi:g}]{note}", ratio, details)


def batch(records: list[RunRecord]) -> dict[str, Any]:
    recs = A.select(records, "batch", "sft")
    if (m := _missing("batch", recs, "needs an SFT sweep over batch size for LoRA and FullFT")) is not None:
        return m
    top = max((r.rank for r in recs if r.rank is not None), default=None)
    recs = [r for r in recs if r.method == "full" or r.rank == top]
    metric = A.pick_metric(recs, "sft")
    best = A.best_per_condition(recs, metric, key=lambda r: (r.method, r.batch_size))
    sizes = sorted(b for (m, b) in best if m == "lora" and ("full", b) in best)
    if len(sizes) < 2:
        return _claim("batch", INCONCLUSIVE, "-", "needs LoRA and FullFT at two or more common batch sizes")
    gap = {b: (best[("lora", b)]["mean"] - best[("full", b)]["mean"]) / best[("full", b)]["mean"] for b in sizes}
    small, large = sizes[0], sizes[-1]
    f, lo_ = best[("full", large)], best[("lora", large)]
    noise = 2 * math.hypot(f["std"], lo_["std"]) / f["mean"] if min(f["n"], lo_["n"]) > 1 else 0.0
    measured = "relative LoRA-FullFT gap: " + ", ".join(f"bs {b}: {gap[b]:+.2%}" for b in sizes) + f" (r={top})"
    details = {"gap": {str(b): gap[b] for b in sizes}, "rank": top, "noise": noise}
    problems = []
    if gap[small] > BATCH_SMALL_MAX_GAP:
        problems.append(f"LoRA already {gap[small]:.2%} behind at batch {small}")
    growth = gap[large] - gap[small]
    if growth < max(BATCH_MIN_GROWTH, noise):
        problems.append(f"gap grew by only {growth:+.2%} from batch {small} to {large}"
                        + (f" (seed noise {noise:.2%})" if noise else ""))
    if problems:
        return _claim("batch", NOT_HELD, measured, "; ".join(problems), growth, details)
    return _claim("batch", HELD, measured, f"gap grows by {growth:+.2%} from batch {small} to {large}", growth,
                  details)


def placement(records: list[RunRecord]) -> dict[str, Any]:
    recs = [r for r in A.select(records, "placement", "sft") if r.method == "lora"]
    if (m := _missing("placement", recs, "needs an SFT sweep over lora.targets")) is not None:
        return m
    best = A.best_per_condition(recs, A.pick_metric(recs, "sft"), key=lambda r: (A.placement_group(r), r.rank))
    attn = {rk: v for (g, rk), v in best.items() if g == "attn"}
    mlp = {rk: v for (g, rk), v in best.items() if g == "mlp"}
    alls = {rk: v for (g, rk), v in best.items() if g == "all"}
    if not attn or not mlp:
        return _claim("placement", INCONCLUSIVE, "-", "needs finished attention-only and MLP-only runs")
    parts, problems = [], []
    for rk in sorted(set(attn) & set(mlp)):
        parts.append(f"r={rk}: attn {attn[rk]['mean']:.4g} vs mlp {mlp[rk]['mean']:.4g}")
        if not mlp[rk]["mean"] < attn[rk]["mean"]:
            problems.append(f"attention-only beats MLP-only at r={rk}")
    pairs = [(abs(math.log(a["trainable_params"] / m["trainable_params"])), -a["trainable_params"], ra, rm)
             for ra, a in attn.items() for rm, m in mlp.items()
             if a["trainable_params"] and m["trainable_params"] and a["trainable_params"] >= m["trainable_params"]]
    for _, _, ra, rm in sorted(pairs):
        a, m_ = attn[ra], mlp[rm]
        if len(parts) == len(set(attn) & set(mlp)):  # describe the closest (then largest) matched pair
            parts.append(f"matched: attn r={ra} ({a['trainable_params']:,} params) {a['mean']:.4g} vs mlp "
                         f"r={rm} ({m_['trainable_params']:,}) {m_['mean']:.4g}")
        if not m_["mean"] < a["mean"]:
            problems.append(f"attention r={ra} beats MLP r={rm} with at least as many parameters")
    for rk in sorted(set(alls) & set(mlp)):
        parts.append(f"r={rk}: all {alls[rk]['mean']:.4g}")
        if alls[rk]["mean"] > mlp[rk]["mean"] * (1 + PLACEMENT_ALL_TOL):
            problems.append(f"all-matrices worse than MLP-only by > {PLACEMENT_ALL_TOL:.0%} at r={rk}")
    measured = "; ".join(parts)
    details = {f"{g} r={rk}": {"final": v["mean"], "params": v["trainable_params"]} for (g, rk), v in best.items()}
    value = float(np.mean([attn[rk]["mean"] / mlp[rk]["mean"] for rk in set(attn) & set(mlp)] or [math.nan]))
    if problems:
        return _claim("placement", NOT_HELD, measured, "; ".join(problems), value, details)
    why = "MLP-only beats attention-only" + (" at matched parameters" if pairs else " (no matched pair)")
    return _claim("placement", HELD, measured, why, value, details)


def rl(records: list[RunRecord]) -> dict[str, Any]:
    recs = A.select(records, "rl", "rl")
    if (m := _missing("rl", recs, "needs an RL sweep of low-rank LoRA and FullFT")) is not None:
        return m
    metric = A.pick_metric(recs, "rl")
    best = A.best_per_condition(recs, metric, key=A.condition, maximize=True)
    ranks = sorted(int(c[1:]) for c in best if c != "full")
    if "full" not in best or not ranks:
        return _claim("rl", INCONCLUSIVE, "-", "needs finished FullFT and LoRA RL runs")
    f, lo = best["full"], best[f"r{ranks[0]}"]
    full_recs = [r for r in recs if r.method == "full" and r.lr == f["lr"]]
    start = float(np.mean([A.series(r, "reward")[1][:max(1, len(r.metrics) // 10)].mean()
                           for r in full_recs if len(A.series(r, "reward")[1])] or [math.nan]))
    ratio = lo["mean"] / f["mean"] if f["mean"] else math.nan
    measured = (f"best {metric}: r={ranks[0]} {lo['mean']:.3f} vs FullFT {f['mean']:.3f} (ratio {ratio:.2f}); "
                f"FullFT reward at start {start:.3f}")
    details = {"ratio": ratio, "best": {c: v["mean"] for c, v in best.items()}, "start_reward": start}
    if not (f["mean"] - start >= RL_MIN_LEARNING):
        return _claim("rl", INCONCLUSIVE, measured, "FullFT's reward did not rise: nothing learned to compare",
                      ratio, details)
    noise = 2 * math.hypot(f["std"], lo["std"]) if min(f["n"], lo["n"]) > 1 else 0.0
    if ratio >= RL_FRACTION or f["mean"] - lo["mean"] <= noise:
        return _claim("rl", HELD, measured, f"r={ranks[0]} reaches {ratio:.0%} of FullFT", ratio, details)
    return _claim("rl", NOT_HELD, measured, f"r={ranks[0]} reaches only {ratio:.0%} of FullFT "
                  f"(< {RL_FRACTION:.0%}, beyond seed noise)", ratio, details)


def evaluate(records: list[RunRecord]) -> list[dict[str, Any]]:
    """All five claims, in the paper's order."""
    return [capacity(records), lr_ratio(records), batch(records), placement(records), rl(records)]
