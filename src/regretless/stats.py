"""Effects with intervals, and verdicts from them: the statistics every claim of `reproduce` rests on.

Pure functions on numbers (numpy and scipy only), so each is tested against values computed by hand:

- `verdict(interval, region)`: a claim is a region of effect sizes (e.g. the LR ratio in [5, 20], or a loss gap
  above 0). `held` when the whole 95% interval lies in the region, `did not hold` when none of it does,
  `inconclusive` otherwise. No verdict ever comes from a point estimate alone.
- `pooled_sd(groups)`: the seed-to-seed standard deviation pooled over every (condition, LR) point that ran with
  several seeds, with its degrees of freedom. With two seeds per point one pair says little; many pairs pooled
  give a usable noise estimate for every comparison of the experiment.
- `diff_interval(...)`: an effect that is a signed sum of seed means (a difference, or a difference of
  differences), with the t interval from the pooled SD.
- `lr_optimum(obs)`: the optimal LR of one condition from its U-curve: a parabola in log10(LR) fitted to the
  best point and its neighbours, with a residual-bootstrap interval for the vertex (clipped to the fitted
  window, so the interval never claims more than the points show). `bracketed` is False when the best LR has no
  worse neighbour on one side: the optimum may lie outside what was run.
- `ratio_interval(a, b)`: 10^(x_a - x_b) from independent bootstrap draws of two optima.
- `proportion_interval(k, n)`: Wilson's interval for an accuracy measured on n problems.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _st

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
LEVEL = 0.95
N_BOOT = 2000
# the fit uses the best LR and its neighbours within half a grid step (after refinement), else one grid step:
# the narrower window keeps the parabola's bias on skewed U-curves small
WINDOWS_DECADES = (1 / 6 + 0.02, 1 / 3 + 0.02)  # + tolerance: grid LRs are rounded to 4 significant digits


def verdict(interval: Sequence[float], region: Sequence[float]) -> str:
    """`held` if [lo, hi] lies inside region [a, b] (either end may be +-inf), `did not hold` if it lies
    wholly outside, else `inconclusive`. An interval with a NaN end decides nothing."""
    lo, hi = float(interval[0]), float(interval[1])
    a, b = float(region[0]), float(region[1])
    if math.isnan(lo) or math.isnan(hi):
        return INCONCLUSIVE
    if a <= lo and hi <= b:
        return HELD
    if hi < a or lo > b:
        return NOT_HELD
    return INCONCLUSIVE


def combine(verdicts: Iterable[str]) -> str:
    """A claim with several parts: held if every part held, did not hold if any part did not, else
    inconclusive."""
    vs = list(verdicts)
    if vs and all(v == HELD for v in vs):
        return HELD
    if any(v == NOT_HELD for v in vs):
        return NOT_HELD
    return INCONCLUSIVE


def t_quantile(df: float, level: float = LEVEL) -> float:
    """Two-sided critical value of Student's t (normal when df is infinite)."""
    q = 0.5 + level / 2
    return float(_st.norm.ppf(q) if not math.isfinite(df) else _st.t.ppf(q, df))


def pooled_sd(groups: Iterable[Sequence[float]]) -> tuple[float, int]:
    """(SD, degrees of freedom) pooled over groups of replicate values; groups of one value add nothing.
    (nan, 0) when no group has two values."""
    ss, df = 0.0, 0
    for g in groups:
        v = np.asarray([x for x in g if math.isfinite(x)], dtype=float)
        if len(v) >= 2:
            ss += float(((v - v.mean()) ** 2).sum())
            df += len(v) - 1
    return (math.sqrt(ss / df), df) if df else (math.nan, 0)


def satterthwaite(parts: Iterable[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of independent variance estimates, each (variance, its
    df): (sum v)^2 / sum(v^2 / df). A term with infinite df (a known variance) or zero variance adds nothing to
    the denominator; inf when no term does."""
    parts = list(parts)
    den = sum(v * v / df for v, df in parts if v > 0 and math.isfinite(df))
    return float(sum(v for v, _ in parts) ** 2 / den) if den > 0 else math.inf


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(variance of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom) from each group's own spread;
    needs 2+ values in each. Both spreads zero: df = n_a + n_b - 2."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(x), len(y)) < 2:
        raise ValueError("welch needs at least two values in each group")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    df = satterthwaite([(va, len(x) - 1), (vb, len(y) - 1)])
    return float(va + vb), df if math.isfinite(df) else float(len(x) + len(y) - 2)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def diff_interval(terms: Sequence[tuple[float, float, int]], sd: float, df: int, level: float = LEVEL
                  ) -> Interval:
    """Effect = sum(sign * mean) over `terms` of (sign, mean, n_seeds); its SE is sd * sqrt(sum(1/n)) with the
    pooled `sd` and `df` (no pooled SD: the interval is (-inf, inf) around the value)."""
    value = float(sum(s * m for s, m, _ in terms))
    if not (math.isfinite(sd) and df > 0):
        return Interval(value, -math.inf, math.inf)
    se = sd * math.sqrt(sum(1.0 / n for _, _, n in terms))
    h = t_quantile(df, level) * se
    return Interval(value, value - h, value + h)


def proportion_interval(k: float, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval for k successes in n trials."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    p = k / n
    z = t_quantile(math.inf, level)
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return Interval(p, max(0.0, mid - h), min(1.0, mid + h))


# ---- optimal LR ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LrOptimum:
    lr: float  # the fitted optimum (vertex of the log-LR parabola, clipped to the window)
    low: float  # 95% interval of the optimum, in LR units
    high: float
    best_lr: float  # the tried LR with the best mean score
    best_score: float  # its mean score (lower is better)
    bracketed: bool  # the best LR has a worse finite neighbour on both sides
    n_lrs: int  # distinct LRs tried
    n_obs: int  # observations in the fit window
    samples: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))  # bootstrap draws of log10(lr)

    def as_dict(self) -> dict[str, float | bool | int | list[float]]:
        return {"lr": self.lr, "interval": [self.low, self.high], "best_lr": self.best_lr,
                "best_score": self.best_score, "bracketed": self.bracketed, "n_lrs": self.n_lrs}


def _means(obs: Mapping[float, Sequence[float]]) -> dict[float, float]:
    """Mean score per LR; any non-finite replicate (a diverged run) makes that LR's score +inf."""
    out = {}
    for lr, ys in obs.items():
        ys = [float(y) for y in ys]
        if ys:
            out[float(lr)] = float(np.mean(ys)) if all(math.isfinite(y) for y in ys) else math.inf
    return out


def best_and_neighbours(obs: Mapping[float, Sequence[float]]) -> tuple[float, float | None, float | None]:
    """(best LR, next lower tried LR, next higher tried LR) by mean score; ties go to the lower LR."""
    means = _means(obs)
    lrs = sorted(means)
    b = min(lrs, key=lambda x: (means[x], x))
    i = lrs.index(b)
    return b, (lrs[i - 1] if i > 0 else None), (lrs[i + 1] if i + 1 < len(lrs) else None)


def _vertex(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """argmin over [lo, hi] of the least-squares parabola through (x, y)."""
    a, b, _ = np.polyfit(x, y, 2)
    if a > 0:
        return float(np.clip(-b / (2 * a), lo, hi))
    grid = np.linspace(lo, hi, 65)
    return float(grid[np.argmin(np.polyval([a, b, _], grid))])


def lr_optimum(obs: Mapping[float, Sequence[float]], maximize: bool = False, n_boot: int = N_BOOT,
               seed: int = 0, level: float = LEVEL, noise_sd: float | None = None, noise_df: int = 30
               ) -> LrOptimum:
    """The optimum of a U-curve given as {lr: [score per seed]} (lower is better unless `maximize`).
    `noise_sd` (with `noise_df` degrees of freedom): a seed-noise SD known from elsewhere (e.g. pooled over the
    experiment), used when larger than what this curve's own points show."""
    sign = -1.0 if maximize else 1.0
    obs = {float(k): [sign * float(v) for v in vs] for k, vs in obs.items() if len(vs)}
    if not obs:
        raise ValueError("lr_optimum: no observations")
    means = _means(obs)
    b, left, right = best_and_neighbours(obs)
    finite = lambda lr: lr is not None and math.isfinite(means[lr])
    bracketed = math.isfinite(means[b]) and finite(left) and finite(right)
    xb = math.log10(b)
    lo_w = math.log10(left) if left is not None else xb
    hi_w = math.log10(right) if right is not None else xb
    fits = [f for w in WINDOWS_DECADES
            if (f := _window_fit(obs, means, b, w, noise_sd, noise_df, n_boot, seed, level))]
    if not fits or not math.isfinite(means[b]):
        # too few points to fit, or no estimate of the noise: all the points say is that the optimum lies
        # between the neighbours of the best point (drawn uniformly there when combined into a ratio)
        n_obs = sum(len(v) for v in obs.values())
        draws = np.random.default_rng(seed).uniform(lo_w, hi_w, n_boot) if hi_w > lo_w else np.full(1, xb)
        return LrOptimum(b, 10 ** lo_w, 10 ** hi_w, b, sign * means[b], bracketed, len(means), n_obs, draws)
    x0, lo, hi, draws, n_obs = fits[0]
    for _, lo2, hi2, d2, _ in fits[1:]:  # the wider window's interval too: a skewed curve biases the narrow one
        lo, hi, draws = min(lo, lo2), max(hi, hi2), np.concatenate([draws, d2])
    return LrOptimum(10 ** x0, 10 ** lo, 10 ** hi, b, sign * means[b], bracketed, len(means), n_obs, draws)


def _window_fit(obs: Mapping[float, Sequence[float]], means: Mapping[float, float], b: float, w: float,
                noise_sd: float | None, noise_df: int, n_boot: int, seed: int, level: float
                ) -> tuple[float, float, float, np.ndarray, int] | None:
    """Vertex of the parabola fitted within `w` decades of `b`, and its parametric-bootstrap interval:
    y* = fit + noise with the noise SD from the replicates (seeds) or the fit's residuals, whichever is
    larger, inflated by t/z for the few degrees of freedom behind it. None without 3 LRs around b."""
    xb = math.log10(b)
    window = [lr for lr in means if abs(math.log10(lr) - xb) <= w and math.isfinite(means[lr])]
    if len(window) < 3 or not (min(window) < b < max(window)):
        return None
    xs = np.array([math.log10(lr) for lr in window for _ in obs[lr]])
    ys = np.array([y for lr in window for y in obs[lr]])
    x_lo, x_hi = float(xs.min()), float(xs.max())
    coef = np.polyfit(xs, ys, 2)
    fitted = np.polyval(coef, xs)
    dof = len(ys) - 3
    resid_sd = math.sqrt(float(((ys - fitted) ** 2).sum()) / dof) if dof > 0 else 0.0
    rep_sd, rep_df = pooled_sd([obs[lr] for lr in window])
    sd, df = max((resid_sd, dof), (0.0 if math.isnan(rep_sd) else rep_sd, rep_df))
    if noise_sd is not None and math.isfinite(noise_sd):
        sd, df = max((sd, df), (noise_sd, noise_df))
    if df <= 0:
        return None  # an exact fit through 3 single points and no noise estimate: no interval to give
    sd *= t_quantile(max(df, 1), level) / t_quantile(math.inf, level)
    rng = np.random.default_rng(seed)
    draws = np.array([_vertex(xs, fitted + sd * rng.standard_normal(len(ys)), x_lo, x_hi) for _ in range(n_boot)])
    x0 = _vertex(xs, ys, x_lo, x_hi)
    q = (1 - level) / 2
    lo, hi = np.quantile(draws, [q, 1 - q])
    return x0, min(float(lo), x0), max(float(hi), x0), draws, len(ys)


def ratio_interval(num: Sequence[LrOptimum] | LrOptimum, den: LrOptimum, seed: int = 1, level: float = LEVEL
                   ) -> Interval:
    """Ratio of optimal LRs num/den with a bootstrap interval. Several `num` optima (e.g. LoRA at several
    ranks) enter as their geometric mean."""
    nums = [num] if isinstance(num, LrOptimum) else list(num)
    rng = np.random.default_rng(seed)
    n = max(len(den.samples), *(len(o.samples) for o in nums), 1)

    def draw(o: LrOptimum) -> np.ndarray:
        return rng.choice(o.samples, size=n, replace=True) if len(o.samples) else np.full(n, math.log10(o.lr))

    x = np.mean([draw(o) for o in nums], axis=0) - draw(den)
    value = 10 ** (float(np.mean([math.log10(o.lr) for o in nums])) - math.log10(den.lr))
    q = (1 - level) / 2
    lo, hi = (10 ** np.quantile(x, [q, 1 - q])).tolist()
    return Interval(value, min(lo, value), max(hi, value))


__all__ = ["HELD", "INCONCLUSIVE", "NOT_HELD", "Interval", "LrOptimum", "best_and_neighbours", "combine",
           "diff_interval", "lr_optimum", "pooled_sd", "proportion_interval", "ratio_interval", "t_quantile",
           "verdict"]
