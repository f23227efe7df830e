"""Adaptive LR search for one condition: which (LR, seed) runs to launch next, given the runs so far.

A pure function of the scores seen, so that a search that may find any optimum can be tested on synthetic
U-curves (tests/test_lr_search.py), and so that a rerun of `reproduce` replays the same decisions and the
sweep runner's resume skips every run already done. Rules, applied in order each round:

1. start: the starting guess and `first_span` grid points on each side of it, 3 points per decade (span 1:
   guess / 10^(1/3), guess, guess * 10^(1/3)); a wider first round costs more runs at once and fewer rounds
   when the guess is far off (rounds, not runs, are what a search on one GPU with free slots waits for);
2. extend: while the best LR (lowest mean score; a diverged run counts as +inf) is the lowest or the highest
   LR tried, add the next two grid points beyond it (two, so that a poor start costs half the rounds), up to `max_decades` from the start (then the status is
   `capped`: the claim that uses this condition says the optimum was not bracketed);
3. refine: add the half-step points on both sides of the best coarse point;
4. seeds: the best LR and its two neighbours (the decisive runs) get every seed in `seeds`; if the seed means
   move the best point, rules 2-4 apply again around the new best;
5. confirm: the best LR alone gets every seed in `confirm` (more seeds where a claim reads its value: the
   score at the optimum, whose interval rests on the seeds there); if they move the best point, rules 2-5 apply
   again.
The starting guess only decides where the search starts and so what it costs; the optimum it reports is
wherever the scores put it. LRs are kept to 4 significant digits, so the same grid point is the same run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from regretless.stats import best_and_neighbours

SEARCHING, DONE, CAPPED = "searching", "done", "capped"


@dataclass(frozen=True)
class SearchConfig:
    points_per_decade: int = 3
    max_decades: float = 2.0  # how far from the starting guess the search may go, each way
    seeds: tuple[int, ...] = (0, 1)  # seeds of the decisive runs (the first seed is used while searching)
    refine: bool = True
    confirm: tuple[int, ...] = ()  # extra seeds at the best LR once rules 1-4 are done
    first_span: int = 1  # grid points on each side of the starting guess in the first round

    def lr_at(self, start: float, k: float) -> float:
        return float(f"{start * 10 ** (k / self.points_per_decade):.4g}")

    def k_of(self, start: float, lr: float) -> float:
        """Grid position of `lr` (half-integers are refinement points)."""
        return round(2 * self.points_per_decade * math.log10(lr / start)) / 2


def next_runs(scores: Mapping[float, Mapping[int, float]], start: float, cfg: SearchConfig = SearchConfig()
              ) -> tuple[str, list[tuple[float, int]]]:
    """(status, [(lr, seed), ...] to run next). `scores`: {lr: {seed: score}} of finished runs, lower is
    better, +inf for a diverged or failed run. The list is empty when the status is `done` or `capped`."""
    s0 = cfg.seeds[0]
    if not scores:
        span = min(cfg.first_span, int(cfg.max_decades * cfg.points_per_decade))
        return SEARCHING, [(cfg.lr_at(start, k), s0) for k in range(-span, span + 1)]
    obs = {lr: list(by_seed.values()) for lr, by_seed in scores.items() if by_seed}
    b, left, right = best_and_neighbours(obs)
    kb = cfg.k_of(start, b)
    cap = cfg.max_decades * cfg.points_per_decade
    for missing_side, step in ((left is None, -1), (right is None, +1)):
        if missing_side:
            k = math.floor(kb) - 1 if step < 0 else math.ceil(kb) + 1
            if abs(k) > cap:
                return CAPPED, []
            ks = [k, k + step] if abs(k + step) <= cap else [k]
            return SEARCHING, [(cfg.lr_at(start, j), s0) for j in ks]
    if cfg.refine and kb == int(kb):
        half = [cfg.lr_at(start, kb + d) for d in (-0.5, 0.5)]
        todo = [(lr, s0) for lr in half if lr not in scores]
        if todo:
            return SEARCHING, todo
    todo = []
    for lr in (left, b, right):
        vals = scores[lr].values()
        if lr is b or all(math.isfinite(v) for v in vals):  # no extra seeds where the LR diverged
            todo += [(lr, s) for s in cfg.seeds if s not in scores[lr]]
    if not todo:
        todo = [(b, s) for s in cfg.confirm if s not in scores[b]]
    return (SEARCHING, todo) if todo else (DONE, [])


__all__ = ["CAPPED", "DONE", "SEARCHING", "SearchConfig", "next_runs"]
