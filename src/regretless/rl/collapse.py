"""When an RL run has collapsed: pure rules on the per-step metrics, so a run that destroyed its policy ends as
`diverged` (exit 3), never `done`. Not from the paper (it reports only its good runs); the thresholds are ours:

1. Entropy towards uniform. The mean per-token entropy of the sampled tokens (temperature-1 policy, nats) above
   `ENTROPY_FRAC` · ln V for `ENTROPY_STEPS` consecutive steps, V the LM head's size. A language model's entropy
   on its own samples is a few nats at most (measured: SmolLM2-135M in rank-1 RL on chain_sum, 2.1 falling to
   0.1, with ln V = 10.8, docs/training.md; tiny-base, 0.8 at the start, ln V = 7.6); above 0.9·ln V its
   next-token distribution has a perplexity over V^0.9 (16,800 of SmolLM2's 49,152 tokens): it emits noise and
   is not rewarded again. Two tiny-base runs of the first quick preset (docs/results/quick before 2026-12-02,
   in git history) went from 0.8 to 7.1-7.2 nats (> 6.86) within
   a few steps at LR 3e-3 and 1e-2 and never recovered. Applies only to a policy whose first step was below
   `ENTROPY_START_FRAC` · ln V: a randomly initialised model starts near ln V and cannot collapse *to* it.
2. Reward gone. No sample with a positive reward for k consecutive steps, after steps with a mean fraction `a`
   of positive samples. k is the smallest streak that a policy still solving a fraction `a` of problems would
   produce with probability below `CHANCE`: each of the P problems of a step has at least a chance `a` that one
   of its G samples succeeds, so P(an all-zero step) <= (1 - a)^P, and k = ceil(log CHANCE / (P·log(1 - a))),
   at least `MIN_ZERO_STEPS`. A policy that never earned a reward never triggers it.
3. Held-out accuracy gone. A greedy eval at accuracy 0 when the base's (step-0) accuracy a0 on the same n
   problems makes that a chance below `CHANCE`: (1 - a0)^n < CHANCE (e.g. a0 >= 0.11 on 64 problems).
Once collapsed, a policy stays so: all-zero groups have zero advantage, so no gradient can bring it back.
"""

from __future__ import annotations

import math

ENTROPY_FRAC = 0.9
ENTROPY_START_FRAC = 0.75
ENTROPY_STEPS = 2
MIN_ZERO_STEPS = 3
CHANCE = 1e-3


def new_tracker() -> dict:
    """The rules' memory across steps (JSON, kept in checkpoints so a resumed run judges the same way)."""
    return {"first_entropy": None, "high_entropy": 0, "zero_streak": 0, "acc_sum": 0.0, "acc_steps": 0}


def zero_streak_needed(mean_accuracy: float, problems_per_step: int) -> int | None:
    """Consecutive all-zero steps that count as a collapse after `mean_accuracy`; None when it is 0 (no rule)."""
    if mean_accuracy <= 0:
        return None
    if mean_accuracy >= 1:
        return MIN_ZERO_STEPS
    k = math.log(CHANCE) / (problems_per_step * math.log1p(-mean_accuracy))
    return max(MIN_ZERO_STEPS, math.ceil(k))


def check_step(tracker: dict, entropy: float, accuracy: float, problems_per_step: int, vocab_size: int
               ) -> str | None:
    """Update `tracker` with one step's metrics; the reason when the run has collapsed, else None."""
    log_v = math.log(vocab_size)
    if tracker["first_entropy"] is None:
        tracker["first_entropy"] = entropy
    high = entropy > ENTROPY_FRAC * log_v and tracker["first_entropy"] < ENTROPY_START_FRAC * log_v
    tracker["high_entropy"] = tracker["high_entropy"] + 1 if high else 0
    if tracker["high_entropy"] >= ENTROPY_STEPS:
        return (f"policy entropy {entropy:.2f} nats > {ENTROPY_FRAC} ln V = {ENTROPY_FRAC * log_v:.2f} for "
                f"{ENTROPY_STEPS} steps (it started at {tracker['first_entropy']:.2f}): near-uniform output")
    if accuracy > 0:
        tracker["acc_sum"] += accuracy
        tracker["acc_steps"] += 1 + tracker["zero_streak"]
        tracker["zero_streak"] = 0
        return None
    tracker["zero_streak"] += 1
    mean = tracker["acc_sum"] / tracker["acc_steps"] if tracker["acc_steps"] else 0.0
    need = zero_streak_needed(mean, problems_per_step)
    if need is not None and tracker["zero_streak"] >= need:
        return (f"no sample rewarded for {tracker['zero_streak']} steps after a mean of {mean:.3f} positive "
                f"samples a step (chance < {CHANCE:g} for a policy that good): reward collapsed")
    return None


def check_eval(initial_accuracy: float | None, accuracy: float, n: int) -> str | None:
    """The reason when held-out accuracy fell to 0 from a start that makes that implausible by chance."""
    if initial_accuracy is None or not initial_accuracy > 0 or accuracy > 0 or n < 1:
        return None
    if initial_accuracy >= 1 or (1 - initial_accuracy) ** n < CHANCE:
        return (f"held-out accuracy 0 on {n} problems after {initial_accuracy:.3f} at step 0: the policy "
                "collapsed")
    return None
