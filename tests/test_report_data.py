"""Builders of synthetic runs (real run folders and ledgers) for the report tests: arms whose truth is known
(optimal LR, loss drop, capacity fall-off, lag) with seeded noise. No tests here."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
from test_sweep_fake_trainer import write_run

T = 120  # optimizer steps of every synthetic SFT run
EVAL_STEPS = [0, 1, 2, 4, 8, 15, 30, 60, 120]
BASE_LOSS = 3.0
STEP6 = 10 ** (1 / 6)


def lr_grid(opt: float, n: int = 3) -> list[float]:
    return [float(f"{opt * STEP6 ** k:.4g}") for k in range(-n, n + 1)]


def noise(*key) -> float:
    """Seeded standard normal per key; crc32, not hash(): str hashes change with every process."""
    return float(np.random.default_rng(zlib.crc32(repr(key).encode())).standard_normal())


def sft_arm(root, name: str, cfg: dict, opt_lr: float, drop: float = 1.0, sd: float = 0.002,
            fall_off: float = 0.0, lag: float = 0.0, seeds=(0, 1), params: int = 1000, steps: int = T,
            lrs: list[float] | None = None, tokens: int | None = None) -> None:
    """An arm's runs: eval loss falls by `drop` (linear in log step), scaled down away from `opt_lr`
    (quadratic in log10 LR); `fall_off` is a gap that opens after step 8 (a capacity limit), `lag` a constant
    gap; seeded noise of SD `sd` per eval point."""
    for lr in lrs or lr_grid(opt_lr):
        d = math.log10(lr / opt_lr)
        for seed in seeds:
            metrics = []
            for t in [s for s in EVAL_STEPS if s <= steps]:
                frac = math.log1p(t) / math.log1p(steps)
                gap = lag * frac + fall_off * max(0.0, math.log(max(t, 1) / 8) / math.log(steps / 8))
                v = BASE_LOSS - drop * frac * (1 - 0.3 * d * d) + gap
                if t:
                    v += sd * noise(name, lr, seed, t)
                metrics.append({"step": t, "eval_loss": v})
            rid = f"{name}-{lr:.4g}-s{seed}"
            folder = write_run(root, rid, "sft", {"model": "m", "lr": lr, "seed": seed, "steps": steps, **cfg},
                               metrics, trainable_params=params)
            s = json.loads((folder / "summary.json").read_text())
            s.update(steps=steps, final_eval_loss=metrics[-1]["eval_loss"], **({"tokens": tokens} if tokens else {}))
            (folder / "summary.json").write_text(json.dumps(s))


def full(**kw) -> dict:
    return {"lora": None, "batch_size": kw.get("batch_size", 4)}


def lora(rank: int, targets: str = "all", batch_size: int = 4) -> dict:
    return {"lora": {"rank": rank, "targets": targets}, "batch_size": batch_size}



def rl_arm(root, name, rank, opt_lr, final_acc, base=0.3, sd=0.01, n_eval=400, scored=None, opt_seeds=(),
           sd_far=0.0):
    """An RL arm; `scored` = the held-out problems the trainer reports (summary eval_problems), default n_eval.
    `opt_seeds`: seeds beyond 0 and 1 at the optimal LR (the search's confirmation seeds); `sd_far`: LRs two or
    more grid steps from the optimum end `sd_far` above (seed 0) and below (seed 1) their mean: a spread that
    differs by LR, as FullFT's collapses at high LRs, with those LRs' means unchanged."""
    for lr in lr_grid(opt_lr):
        d = math.log10(lr / opt_lr)
        for seed in (0, 1, *(opt_seeds if lr == opt_lr else ())):
            far = sd_far * (1 if seed == 0 else -1) if abs(d) > 0.25 else 0.0
            acc = [base + (final_acc - base) * (1 - 0.5 * d * d) * k / 4 + (sd * noise(name, lr, seed, k) if k else 0)
                   + (far if k == 4 else 0.0) for k in range(5)]
            metrics = [{"step": 5 * k, "eval_accuracy": a, **({"reward": a} if k else {})} for k, a in enumerate(acc)]
            cfg = {"model": "m", "lora": None if rank is None else {"rank": rank}, "lr": lr, "seed": seed,
                   "eval_size": n_eval}
            folder = write_run(root, f"{name}-{lr:.4g}-s{seed}", "rl", cfg, metrics)
            s = json.loads((folder / "summary.json").read_text())
            s.update(final_eval_accuracy=acc[-1], steps=20, eval_problems=n_eval if scored is None else scored)
            (folder / "summary.json").write_text(json.dumps(s))
