"""The paper's five findings as effects with 95% intervals, and a verdict from each (regretless.stats.verdict):
`held` when the interval lies inside the paper's claim, `did not hold` when it lies wholly outside,
`inconclusive` when it straddles the edge, or when the runs cannot decide (an optimum not bracketed, a
baseline that learned nothing, runs missing). Every arm is compared at its own best LR.

Claims (D = the FullFT arm's eval-loss drop from the base model to its best final value):
1. capacity: (a) the highest rank tracks FullFT: final gap (L_hi - L_full)/D in (-inf, CAP_TRACK];
   (b) the lowest rank falls off as training goes on: its gap grows from the first eval point past
   CAP_EARLY of training to the end, growth in (0, inf). Curves are the pointwise minimum over LRs.
2. lr_ratio: optimal LoRA LR / optimal FullFT LR (geometric mean over ranks >= LR_RATIO_MIN_RANK) in
   [m/2, 2m], m the paper's multiplier for this run length (10, rising to ~15 for short runs).
3. batch: at equal examples seen, LoRA's gap to FullFT grows from the small to the large batch:
   ((L_lora - L_full)_large - (L_lora - L_full)_small)/D in (0, inf).
4. placement: attention-only LoRA with at least as many parameters as MLP-only is worse:
   (L_attn - L_mlp)/D_mlp in (0, inf), D_mlp the MLP arm's drop. (All matrices vs MLP-only is reported.)
5. rl: rank-1 LoRA's final held-out accuracy minus FullFT's, in [-RL_MARGIN * G, inf), G = FullFT's gain over
   the base model (its best final accuracy minus the base's): rank 1 learns at least 90% of what FullFT learns.
   The margin scales with G as the SFT claims' scale with D: a fixed margin in accuracy points would let a LoRA
   that learned a third less than FullFT count as matching it whenever FullFT learned 0.3 points. Needs FullFT to
   have improved on the base model (interval above 0), else inconclusive.
Noise: the seed SD pooled over every (arm, LR) run with 2+ seeds, t interval; RL adds the binomial variance
of an accuracy measured on the eval set (t quantile at the Welch-Satterthwaite df of the sum). RL's seed noise
is the two compared cells' own spread (Welch) when each arm's best LR has RL_CELL_SEEDS+ seeds (the search's
confirmation seeds): an RL arm's spread differs by LR (FullFT collapses in some seeds at high LRs and not at its
optimum), so a pooled SD would charge the comparison at the optima with the instability of LRs far from them.
With fewer seeds, the pooled SD.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from regretless import stats as S
from regretless.report import analysis as A

HELD, NOT_HELD, INCONCLUSIVE = S.HELD, S.NOT_HELD, S.INCONCLUSIVE
CAP_TRACK, CAP_EARLY = 0.10, 0.10
LR_RATIO_MIN_RANK = 4
RL_CELL_SEEDS = 3  # seeds at both compared LRs from which their own spread is the RL comparison's seed noise
RL_MARGIN = 0.10  # fraction of FullFT's accuracy gain over the base model; when the interval is too wide to ever
# decide at this margin (the binomial term of a few hundred problems alone), the claim says so (`eval_size_needed`)

PAPER = {
    "capacity": "FullFT and high-rank LoRA track each other; low ranks fall off the curve as training goes on.",
    "lr_ratio": "Optimal LoRA LR is about 10x the optimal FullFT LR (about 15x for runs of <= 100 steps).",
    "batch": "LoRA matches FullFT at small batch but lags at large batch, whatever the rank.",
    "placement": "Attention-only LoRA is worse than MLP-only, even at matched parameter count; all ~ MLP-only.",
    "rl": "In RL, even rank-1 LoRA matches FullFT.",
}
TITLES = {"capacity": "1. Capacity", "lr_ratio": "2. LR ratio", "batch": "3. Batch size",
          "placement": "4. Where to apply", "rl": "5. RL"}


def _claim(finding: str, verdict: str, effect: float | None, interval: list[float] | None, reason: str,
           measured: str, arms: list[A.Arm], **extra: Any) -> dict[str, Any]:
    runs = [r for a in arms for r in a.runs if r.finished]
    seeds = max((len(a.at_lr(lr)) for a in arms for lr in a.scores()), default=0)
    return {"finding": finding, "title": TITLES[finding], "paper": PAPER[finding], "verdict": verdict,
            "effect": effect, "interval": interval, "runs": len(runs), "seeds": seeds, "reason": reason,
            "measured": measured, "arms": [a.name for a in arms], **extra}


def _none(finding: str, reason: str, arms: list[A.Arm] | None = None) -> dict[str, Any]:
    return _claim(finding, INCONCLUSIVE, None, None, reason, "-", arms or [])


def _fmt_iv(iv: S.Interval, pct: bool = False) -> str:
    f = (lambda x: f"{x:+.1%}") if pct else (lambda x: f"{x:.3g}")
    return f"{f(iv.value)} [{f(iv.low)}, {f(iv.high)}]"


def sft_arms(all_arms: dict[str, A.Arm]) -> list[A.Arm]:
    """The SFT arms: whose seeds measure the SFT claims' noise (RL's accuracies are other units)."""
    return [a for a in all_arms.values() if a.command == "sft"]


def optimum(arm: A.Arm, noise: tuple[float, int]) -> S.LrOptimum | None:
    obs = arm.scores()
    return S.lr_optimum(obs, maximize=arm.maximize, noise_sd=noise[0], noise_df=noise[1]) if obs else None


def best(arm: A.Arm) -> tuple[float, float, int] | None:
    """(best LR, seed-mean score there, seeds there) by the arm's own U-curve."""
    obs = {lr: v for lr, v in arm.scores().items()}
    if not obs:
        return None
    sign = -1 if arm.maximize else 1
    lr, _, _ = S.best_and_neighbours({k: [sign * x for x in v] for k, v in obs.items()})
    vals = obs[lr]
    return lr, float(np.mean(vals)), len(vals)


def base_loss(arm: A.Arm) -> float:
    """The base model's eval loss (step 0 of any run of the arm)."""
    for r in arm.runs:
        s, v = r.series("eval_loss")
        if len(s) and s[0] == 0:
            return float(v[0])
    return math.nan


def _unbracketed(opts: dict[str, S.LrOptimum | None]) -> list[str]:
    return [k for k, o in opts.items() if o is None or not o.bracketed]


def predicted_lrs(records: list[A.RunRecord]) -> dict[str, float]:
    """The recipe's LRs for the runs' model (FullFT, and LoRA for the runs' length)."""
    from transformers import AutoConfig

    from regretless.recipe import default_lr

    r = next((r for r in records if r.command == "sft"), None)
    if r is None:
        return {}
    try:
        mc = AutoConfig.from_pretrained(r.config["model"])
    except (OSError, ValueError, KeyError):
        return {}
    return {"full": default_lr(mc, "full", r.steps)[0], "lora": default_lr(mc, "lora", r.steps)[0]}


# ---- the five claims -------------------------------------------------------------------------------------
def lr_ratio(all_arms: dict[str, A.Arm], records: list[A.RunRecord]) -> dict[str, Any]:
    arms = A.base_arms(all_arms)
    if "full" not in arms or len(arms) < 2:
        return _none("lr_ratio", "needs LR searches of FullFT and at least one LoRA rank", list(arms.values()))
    noise = A.pooled_seed_sd(sft_arms(all_arms))
    opts = {k: optimum(a, noise) for k, a in arms.items()}
    lora = {k: o for k, o in opts.items() if k != "full" and o is not None}
    use = {k: o for k, o in lora.items() if A.rank_of(k) >= LR_RATIO_MIN_RANK} or lora
    from regretless.recipe import lora_lr_multiplier

    steps = arms["full"].steps
    m = lora_lr_multiplier(steps)
    region = (m / 2, 2 * m)
    per_rank = {k: S.ratio_interval(o, opts["full"]) for k, o in lora.items()} if opts["full"] else {}
    extra = {"optimal_lr": {k: {"lr": o.lr, "interval": [o.low, o.high], "bracketed": o.bracketed,
                                "best_tried_lr": o.best_lr, "lrs_tried": o.n_lrs}
                            for k, o in opts.items() if o is not None},
             "ratio_by_rank": {k: {"ratio": iv.value, "interval": iv.as_list()} for k, iv in per_rank.items()},
             "predicted": {"multiplier": m, **predicted_lrs(records)}, "claim_region": list(region)}
    bad = _unbracketed({"full": opts["full"], **use})
    if bad:
        return _claim("lr_ratio", INCONCLUSIVE, None, None, f"optimum not bracketed for {', '.join(bad)} (the "
                      "search reached its cap or ran too few LRs)", "-", list(arms.values()), **extra)
    iv = S.ratio_interval(list(use.values()), opts["full"])
    v = S.verdict(iv.as_list(), region)
    ranks = ", ".join(sorted(use, key=A.rank_of))
    measured = (f"LoRA/FullFT optimal-LR ratio {_fmt_iv(iv)} ({ranks}); FullFT optimum "
                f"{opts['full'].lr:.3g} [{opts['full'].low:.3g}, {opts['full'].high:.3g}]")
    why = {HELD: f"the 95% interval lies inside [{region[0]:g}, {region[1]:g}] (paper: {m:.3g}x for {steps} steps)",
           NOT_HELD: f"the 95% interval lies outside [{region[0]:g}, {region[1]:g}] (paper: {m:.3g}x)",
           INCONCLUSIVE: f"the 95% interval straddles the edge of [{region[0]:g}, {region[1]:g}]"}[v]
    return _claim("lr_ratio", v, iv.value, iv.as_list(), why, measured, list(arms.values()), ratio=iv.value,
                  ratio_interval=iv.as_list(), **extra)


def low_rank_budget(arm: A.Arm) -> tuple[int | None, int | None]:
    """(LoRA parameters, tokens trained on) of an arm's runs, from their summaries (None where unknown)."""
    params = [r.trainable_params for r in arm.runs if r.trainable_params]
    tokens = [int(t) for r in arm.runs if (t := (r.summary or {}).get("tokens"))]
    return (max(params) if params else None), (max(tokens) if tokens else None)


def capacity(all_arms: dict[str, A.Arm]) -> dict[str, Any]:
    """(b) is tested only where the lowest rank can run out: the paper's practical rule (PAPER.md, capacity in
    bits) has LoRA working while its parameters are at least the trained tokens, so with fewer tokens than
    parameters the paper itself predicts no fall-off and the part is `inconclusive`, never `did not hold`."""
    arms = A.base_arms(all_arms)
    ranks = sorted((k for k in arms if k != "full"), key=A.rank_of)
    if "full" not in arms or len(ranks) < 2:
        return _none("capacity", "needs FullFT and at least two LoRA ranks", list(arms.values()))
    curves = {k: A.pointwise_min(arms[k]) for k in ["full", *ranks]}
    full = curves["full"]
    if len(full["steps"]) < 3:
        return _none("capacity", "needs eval-loss curves (eval_points) with at least 3 points", list(arms.values()))
    drop = base_loss(arms["full"]) - float(full["value"][-1])
    if not drop > 0:
        return _none("capacity", "FullFT's eval loss did not fall", list(arms.values()))
    steps = full["steps"]
    last = int(steps[-1])
    early_i = int(np.searchsorted(steps, CAP_EARLY * last))
    early_i = min(max(early_i, 1), len(steps) - 2)
    sd_t, df_t = A.pooled_seed_sd(arms.values(), "eval_loss", len(steps) - 1)
    sd_e, df_e = A.pooled_seed_sd(arms.values(), "eval_loss", early_i)
    hi, lo = ranks[-1], ranks[0]

    def at(k: str, i: int) -> tuple[float, int]:
        c = curves[k]
        j = list(c["steps"]).index(steps[i]) if steps[i] in c["steps"] else None
        return (float(c["value"][j]), int(c["n"][j])) if j is not None else (math.nan, 1)

    (l_hi, n_hi), (l_f, n_f) = at(hi, -1), at("full", -1)
    track = S.diff_interval([(1, l_hi, n_hi), (-1, l_f, n_f)], sd_t, df_t)
    track = S.Interval(track.value / drop, track.low / drop, track.high / drop)
    (l_lo_e, n_lo_e), (l_f_e, n_f_e) = at(lo, early_i), at("full", early_i)
    (l_lo, n_lo) = at(lo, -1)
    growth_raw = (l_lo - l_f) - (l_lo_e - l_f_e)
    sd_g = math.hypot(sd_t, sd_e) if math.isfinite(sd_t) and math.isfinite(sd_e) else math.nan
    g = S.diff_interval([(1, growth_raw, 1)], sd_g * math.sqrt(1 / min(n_lo, n_lo_e) + 1 / min(n_f, n_f_e))
                        if math.isfinite(sd_g) else math.nan, min(df_t, df_e))
    growth = S.Interval(g.value / drop, g.low / drop, g.high / drop)
    v_track = S.verdict(track.as_list(), (-math.inf, CAP_TRACK))
    v_fall = S.verdict(growth.as_list(), (0.0, math.inf))
    params, tokens = low_rank_budget(arms[lo])
    roomy = params is not None and tokens is not None and params >= tokens
    if roomy:  # the paper's own rule says this rank has room for the data: no fall-off to test
        v_fall = INCONCLUSIVE
    v = S.combine([v_track, v_fall])
    gaps = {k: {"steps": steps.tolist(), "gap": [float((at(k, i)[0] - at("full", i)[0]) / drop)
                                                  for i in range(len(steps))]} for k in ranks}
    measured = (f"r={A.rank_of(hi)} final gap to FullFT {_fmt_iv(track, True)} of FullFT's drop {drop:.3g}; "
                f"r={A.rank_of(lo)} gap grew by {_fmt_iv(growth, True)} from step {int(steps[early_i])} to {last}")
    parts = [f"high rank tracks FullFT: {v_track}", f"low rank falls off: {v_fall}" + (
        f" (r={A.rank_of(lo)}'s {params:,} parameters are at least the {tokens:,} tokens trained on: by the paper's "
        "capacity rule it has room for this data, so this data cannot show it running out)" if roomy else "")]
    return _claim("capacity", v, growth.value, growth.as_list(), "; ".join(parts), measured, list(arms.values()),
                  parts={"high_rank_gap": {"effect": track.value, "interval": track.as_list(),
                                           "region": [-math.inf, CAP_TRACK], "verdict": v_track},
                         "low_rank_gap_growth": {"effect": growth.value, "interval": growth.as_list(),
                                                 "region": [0.0, math.inf], "verdict": v_fall,
                                                 "lora_params": params, "trained_tokens": tokens,
                                                 "testable": not roomy}},
                  gaps=gaps, fullft_drop=drop)


def batch(all_arms: dict[str, A.Arm]) -> dict[str, Any]:
    sft = [a for a in all_arms.values() if a.command == "sft" and a.targets in ("all", "full")]
    top = max((a.rank for a in sft if a.rank is not None), default=None)
    by_n: dict[int, dict[tuple[str, int], A.Arm]] = {}
    for a in sft:
        if a.examples and (a.method == "full" or a.rank == top):
            by_n.setdefault(a.examples, {})[(a.method, a.batch_size)] = a
    pick = None
    for n, d in sorted(by_n.items()):
        sizes = sorted(b for (m, b) in d if m == "lora" and ("full", b) in d)
        if len(sizes) >= 2:
            pick = (n, d, sizes[0], sizes[-1])
    if pick is None:
        return _none("batch", "needs FullFT and LoRA at two batch sizes with equal examples seen")
    n, d, small, large = pick
    used = [d[("full", small)], d[("lora", small)], d[("full", large)], d[("lora", large)]]
    bests = [best(a) for a in used]
    if any(b is None for b in bests):
        return _none("batch", "an arm of the batch comparison has no finished runs", used)
    sd, df = A.pooled_seed_sd(sft_arms(all_arms))
    opts = {a.name: optimum(a, (sd, df)) for a in used}
    drop = base_loss(used[0]) - bests[0][1]
    (_, fs, nfs), (_, ls, nls), (_, fl, nfl), (_, ll, nll) = bests
    iv = S.diff_interval([(1, ll, nll), (-1, fl, nfl), (-1, ls, nls), (1, fs, nfs)], sd, df)
    iv = S.Interval(iv.value / drop, iv.low / drop, iv.high / drop)
    v = S.verdict(iv.as_list(), (0.0, math.inf))
    bad = _unbracketed(opts)
    reason = {HELD: f"LoRA falls further behind FullFT at batch {large} than at {small}",
              NOT_HELD: f"LoRA's gap to FullFT is not larger at batch {large} than at {small}",
              INCONCLUSIVE: "the interval includes no change"}[v]
    if bad:
        v, reason = INCONCLUSIVE, f"optimum not bracketed for {', '.join(bad)}"
    measured = (f"LoRA-FullFT gap (fraction of FullFT's drop {drop:.3g}): batch {small} {(ls - fs) / drop:+.1%}, "
                f"batch {large} {(ll - fl) / drop:+.1%}; change {_fmt_iv(iv, True)} (r={top}, {n} examples each, "
                f"{used[2].steps} steps at batch {large})")
    return _claim("batch", v, iv.value, iv.as_list(), reason, measured, used,
                  gaps={str(small): (ls - fs) / drop, str(large): (ll - fl) / drop},
                  optimal_lr={k: o.as_dict() for k, o in opts.items() if o})


def placement(all_arms: dict[str, A.Arm]) -> dict[str, Any]:
    sft = {k: a for k, a in all_arms.items() if a.command == "sft" and "-bs" not in k}
    mlp = [a for a in sft.values() if a.targets == "mlp"]
    attn = [a for a in sft.values() if a.targets == "attn"]
    if not mlp or not attn:
        return _none("placement", "needs attention-only and MLP-only LoRA runs")
    m = max(mlp, key=lambda a: a.rank or 0)
    pairs = [a for a in attn if (a.trainable_params or 0) >= (m.trainable_params or math.inf)]
    a = min(pairs, key=lambda x: x.trainable_params or 0) if pairs else max(attn, key=lambda x: x.trainable_params or 0)
    alls = sft.get(f"r{m.rank}")
    used = [x for x in (m, a, alls) if x is not None]
    if any(best(x) is None for x in (m, a)):
        return _none("placement", "attention-only or MLP-only has no finished runs", used)
    sd, df = A.pooled_seed_sd(sft_arms(all_arms))
    (_, lm, nm), (_, la, na) = best(m), best(a)
    drop = base_loss(m) - lm
    iv = S.diff_interval([(1, la, na), (-1, lm, nm)], sd, df)
    iv = S.Interval(iv.value / drop, iv.low / drop, iv.high / drop)
    v = S.verdict(iv.as_list(), (0.0, math.inf))
    opts = {x.name: optimum(x, (sd, df)) for x in used}
    bad = _unbracketed({m.name: opts[m.name], a.name: opts[a.name]})
    matched = (a.trainable_params or 0) >= (m.trainable_params or math.inf)
    more = " with at least as many parameters" if matched else ""
    reason = {HELD: "attention-only ends worse than MLP-only" + more,
              NOT_HELD: "attention-only ends better than MLP-only",
              INCONCLUSIVE: "the interval includes no difference"}[v]
    if bad:
        v, reason = INCONCLUSIVE, f"optimum not bracketed for {', '.join(bad)}"
    elif not matched:
        reason += " (no attention arm had as many parameters as MLP-only)"
    measured = (f"attn r={a.rank} ({a.trainable_params or 0:,} params) vs mlp r={m.rank} "
                f"({m.trainable_params or 0:,}): gap {_fmt_iv(iv, True)} of MLP's drop {drop:.3g}")
    extra: dict[str, Any] = {"optimal_lr": {k: o.as_dict() for k, o in opts.items() if o},
                             "params": {x.name: x.trainable_params for x in used}}
    if alls is not None and best(alls) is not None:
        _, l_all, n_all = best(alls)
        ia = S.diff_interval([(1, l_all, n_all), (-1, lm, nm)], sd, df)
        ia = S.Interval(ia.value / drop, ia.low / drop, ia.high / drop)
        measured += f"; all r={alls.rank} vs mlp: {_fmt_iv(ia, True)}"
        extra["all_vs_mlp"] = {"effect": ia.value, "interval": ia.as_list()}
    return _claim("placement", v, iv.value, iv.as_list(), reason, measured, used, **extra)


def eval_problems(arm: A.Arm) -> int:
    """Held-out problems each eval scored: the trainer's count (summary.json), else the config's eval_size."""
    for r in arm.runs:
        n = (r.summary or {}).get("eval_problems")
        if isinstance(n, int) and n > 0:
            return n
    return int(arm.runs[0].config.get("eval_size") or 0)


def rl(all_arms: dict[str, A.Arm]) -> dict[str, Any]:
    arms = {k: a for k, a in all_arms.items() if a.command == "rl"}
    lora = sorted((k for k in arms if k != "rl-full"), key=lambda k: int(k.split("-r")[-1]))
    if "rl-full" not in arms or not lora:
        return _none("rl", "needs RL runs of FullFT and low-rank LoRA", list(arms.values()))
    f, lo = arms["rl-full"], arms[lora[0]]
    bf, bl = best(f), best(lo)
    if bf is None or bl is None:
        return _none("rl", "an RL arm has no finished runs", [f, lo])
    n_eval = eval_problems(f)
    base = next((float(r.series("eval_accuracy")[1][0]) for r in f.runs if len(r.series("eval_accuracy")[0])
                 and r.series("eval_accuracy")[0][0] == 0), math.nan)
    sd, df = A.pooled_seed_sd(arms.values())
    (lr_f, pf, nf), (lr_l, pl, nl) = bf, bl
    binom_parts = [(p * (1 - p) / max(n_eval, 1), max(n_eval - 1, 1)) for p in (pf, pl)]  # (variance, df)
    binom = sum(v for v, _ in binom_parts)
    d = pl - pf

    def interval(seed_var: float, seed_df: float) -> tuple[S.Interval, float]:
        """The difference's t interval, and its t quantile: the seeds' and the eval set's variances add, with
        the Welch-Satterthwaite df of the sum (the few seeds' small df does not stretch the binomial term)."""
        z = S.t_quantile(max(S.satterthwaite([*binom_parts, (seed_var, max(seed_df, 1))]), 1))
        h = z * math.sqrt(binom + seed_var)
        return S.Interval(d, d - h, d + h), z

    pooled_var, pooled_df = (sd * sd * (1 / nf + 1 / nl), df) if math.isfinite(sd) else (0.0, math.inf)
    pooled, _ = interval(pooled_var, pooled_df)
    if min(nf, nl) >= RL_CELL_SEEDS:  # each optimum's own seeds
        seed_var, seed_df = S.welch(f.scores()[lr_f], lo.scores()[lr_l])
        noise = f"seed spread at the two best LRs, {nf}+{nl} seeds; with the SD pooled over all LRs {_fmt_iv(pooled)}"
    else:
        seed_var, seed_df, noise = pooled_var, pooled_df, None
    iv, z = interval(seed_var, seed_df)
    base_iv = S.proportion_interval(base * n_eval, n_eval) if math.isfinite(base) else S.Interval(*[math.nan] * 3)
    h = 1.96 * math.sqrt((pf * (1 - pf) + base * (1 - base)) / max(n_eval, 1)) if math.isfinite(base) else math.nan
    learn = S.Interval(pf - base, pf - base - h, pf - base + h)
    opts = {x.name: optimum(x, (sd, df)) for x in (f, lo)}
    measured = (f"held-out greedy accuracy ({n_eval} problems): base {_fmt_iv(base_iv)}, FullFT {pf:.3f}, "
                f"r={lo.rank} {pl:.3f}; difference {_fmt_iv(iv)}" + (f" ({noise})" if noise else ""))
    extra = {"base_accuracy": base_iv.value, "base_interval": base_iv.as_list(), "eval_size": n_eval,
             "optimal_lr": {k: o.as_dict() for k, o in opts.items() if o}}
    if noise:
        extra["seed_noise"] = {"kind": "welch", "df": seed_df, "interval_pooled_sd": pooled.as_list()}
    if not learn.low > 0:
        return _claim("rl", INCONCLUSIVE, d, iv.as_list(), "FullFT did not clearly improve on the base model: "
                      "nothing learned to compare", measured, [f, lo], **extra)
    margin = RL_MARGIN * learn.value  # in accuracy points
    measured += f"; margin {margin:.3f} = {RL_MARGIN:.0%} of FullFT's gain {learn.value:.3f} over the base"
    extra.update(fullft_gain=learn.value, margin=margin)
    v = S.verdict(iv.as_list(), (-margin, math.inf))
    bad = _unbracketed(opts)
    reason = {HELD: f"rank-{lo.rank} LoRA ends within {RL_MARGIN:.0%} of FullFT's gain below FullFT, or above it",
              NOT_HELD: f"rank-{lo.rank} LoRA ends more than {RL_MARGIN:.0%} of FullFT's gain below FullFT",
              INCONCLUSIVE: f"the interval straddles -{margin:.3f} ({RL_MARGIN:.0%} of FullFT's gain)"}[v]
    half = (iv.high - iv.low) / 2
    extra["interval_half_width"] = half
    if v == INCONCLUSIVE and half >= margin:  # say when the design, not the result, left it open
        room = (margin / 2 / z) ** 2 - seed_var  # variance left for the eval set at half-width margin/2
        p_bar = (pf + pl) / 2
        n_need = math.ceil(2 * p_bar * (1 - p_bar) / room) if room > 0 else None
        if n_need is not None and n_need > 20 * n_eval:  # the seeds' spread, not the eval set, is the limit
            n_need = None
        need = (f"about {n_need:,} held-out problems would" if n_need else
                "more seeds per LR as well as more held-out problems would")
        reason += (f"; the interval's half-width {half:.3f} is at least the margin {margin:.3f} itself, so "
                   f"{n_eval} held-out problems and {nf}+{nl} seeds cannot decide it ({need} bring it to "
                   f"{margin / 2:.3f})")
        extra["eval_size_needed"] = n_need
    if bad:
        v, reason = INCONCLUSIVE, f"optimum not bracketed for {', '.join(bad)}"
    return _claim("rl", v, d, iv.as_list(), reason, measured, [f, lo], **extra)


def evaluate(records: list[A.RunRecord], unfinished: frozenset[str] | set[str] = frozenset()) -> list[dict[str, Any]]:
    """All five claims, in the paper's order. `unfinished`: arms whose LR search has not finished (`reproduce`
    stopped before their decisive runs ran): a claim that uses one is `inconclusive`, whatever its runs say."""
    all_arms = A.arms(records)
    claims = [capacity(all_arms), lr_ratio(all_arms, records), batch(all_arms), placement(all_arms), rl(all_arms)]
    for c in claims:
        left = [a for a in c["arms"] if a in unfinished]
        if left:
            c["verdict"] = INCONCLUSIVE
            c["reason"] = (f"the LR search of {', '.join(left)} has not finished (decisive runs missing), so no "
                           f"verdict yet; so far: {c['reason']}")
    return claims
