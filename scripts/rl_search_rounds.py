"""How many rounds would a reproduce sweep's RL searches take with another first-round span? Replays
`regretless.sweep.search.next_runs` on the sweep's own finished RL runs (their scores as `reproduce` reads them
from the ledger).

    python3 scripts/rl_search_rounds.py docs/results/full --spans 1,2,3

A run the replay asks for that the sweep does not have is filled in, and counted as such: another seed's mean
at that LR, else log-linear interpolation between the nearest LRs tried, else (beyond them) the nearest edge's
mean. Only runs of the sweep's current design count (the ledger's current rows). Rounds, not runs, are what a
search waits for when the GPU has free slots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from regretless.reproduce.plan import ledger_scores
from regretless.reproduce.presets import PRESETS
from regretless.sweep.ledger import current_rows
from regretless.sweep.search import SearchConfig, next_runs


def load(sweep: Path) -> tuple[dict[str, dict[float, dict[int, float]]], dict[str, float], dict]:
    ctx = json.loads((sweep / "reproduce.json").read_text())
    starts = {c["axes"]["method"]: c["start_lr"] for c in ctx["conditions"] if c["command"] == "rl"}
    data: dict[str, dict[float, dict[int, float]]] = {m: {} for m in starts}
    scores = ledger_scores(sweep / "rl", "rl")  # as reproduce scores them: lower is better, +inf diverged
    for r in current_rows(sweep / "rl"):  # the ledger's current design only (older specs' rows are stale)
        if scores.get(r["id"]) is not None:
            axes = r["axes"]
            data[axes["method"]].setdefault(axes["lr"], {})[axes["seed"]] = scores[r["id"]]
    return data, starts, ctx


def oracle(d: dict[float, dict[int, float]], lr: float, seed: int) -> tuple[float, bool]:
    if lr in d and seed in d[lr]:
        return d[lr][seed], True
    mean = {x: sum(v.values()) / len(v) for x, v in d.items()}
    if lr in d:
        return mean[lr], False
    lrs = sorted(d)
    if lr < lrs[0] or lr > lrs[-1]:
        return mean[lrs[0] if lr < lrs[0] else lrs[-1]], False
    lo, hi = max(x for x in lrs if x < lr), min(x for x in lrs if x > lr)
    w = math.log(lr / lo) / math.log(hi / lo)
    return (1 - w) * mean[lo] + w * mean[hi], False


def replay(d: dict[float, dict[int, float]], start: float, cfg: SearchConfig) -> dict:
    scores: dict[float, dict[int, float]] = {}
    rounds = runs = filled = 0
    status, todo = next_runs(scores, start, cfg)
    while todo:
        rounds += 1
        for lr, seed in todo:
            v, real = oracle(d, lr, seed)
            scores.setdefault(lr, {})[seed] = v
            runs, filled = runs + 1, filled + (not real)
        status, todo = next_runs(scores, start, cfg)
    best = min(scores, key=lambda x: sum(scores[x].values()) / len(scores[x]))
    return {"rounds": rounds, "runs": runs, "filled_in": filled, "status": status, "best_lr": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="a reproduce output folder (reproduce.json, rl/runs/)")
    ap.add_argument("--spans", default="1,2,3", help="first-round spans to compare")
    args = ap.parse_args()
    data, starts, ctx = load(args.sweep)
    for span in (int(x) for x in args.spans.split(",")):
        cfg = SearchConfig(max_decades=PRESETS[ctx["preset"]].max_decades, seeds=tuple(ctx["seeds"]),
                           confirm=tuple(ctx.get("rl_confirm_seeds", ())), first_span=span)
        res = {m: replay(data[m], starts[m], cfg) for m in starts}
        arms = "; ".join(f"{m}: {r['rounds']} rounds, {r['runs']} runs ({r['filled_in']} filled in), "
                         f"{r['status']}, best {r['best_lr']:.4g}" for m, r in res.items())
        print(f"first_span {span}: {max(r['rounds'] for r in res.values())} rounds  ({arms})")


if __name__ == "__main__":
    main()
