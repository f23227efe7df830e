"""The paper's practical rules as pure functions: LR rule and formula, capacity in bits, batch and MoE advice.

Every function takes numbers (or a transformers config) and returns numbers plus a one-line reason citing the
paper, so the trainer (`default_lr`) and `regretless recommend` explain themselves. Bad inputs raise UserError.

Where this departs from the paper ("LoRA Without Regret", Schulman & Thinking Machines 2025):
- LR multiplier versus run length. The paper gives two regimes: ~10x the FullFT LR for long runs and ~15x for
  runs of about 100 steps or fewer (B starts at 0: an implicit warm-up). We join them with a smooth curve,
  `10 + 5 / (1 + (steps / 300)^3)`; see `lora_lr_multiplier`.
- Unknown families. The formula's exponent p is published only for Llama 3 (0.781) and Qwen (0.0775). Any
  other family gets the midpoint of the two, 0.429, and the returned reason says so. Llama-architecture models
  that are not Llama 3 (e.g. SmolLM2; told apart by the Llama 3 vocabulary of 128,256) count as unknown too.
- MoE per-expert rank is rank // top_k as in the paper, but never below 1.
- Capacity verdict: "fits" at >= 2x margin (the authors' tooling rule #LoRA params >= #tokens at 1 bit/token),
  "tight" between 1x and 2x, "exceeds" below 1x (LoRA then falls off FullFT's curve: worse, not a hard floor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from regretless.errors import UserError

BASE_LR = 5e-5  # FullFT LR at hidden size 2000 (authors' tooling)
REF_HIDDEN = 2000
FAMILY_EXPONENT = {"llama": 0.781, "qwen": 0.0775}
DEFAULT_EXPONENT = round((FAMILY_EXPONENT["llama"] + FAMILY_EXPONENT["qwen"]) / 2, 3)  # 0.429
LLAMA3_VOCAB = 128256
LORA_LR_MULT = 10.0  # long runs (fit over 14 models: 9.8)
SHORT_RUN_LR_MULT = 15.0  # runs of ~100 steps or fewer
SHORT_RUN_MIDPOINT_STEPS = 300.0  # where the multiplier is halfway between 15 and 10
SHORT_RUN_SHARPNESS = 3.0
ALPHA = 32.0
BITS_PER_PARAM = 2.0  # Allen-Zhu & Li
BITS_PER_TOKEN = 1.0  # LLM data, roughly (an overestimate of what must be learned)
BITS_PER_EPISODE = 1.0  # policy gradient: O(1) bits per episode
MAX_BATCH = 512  # sequences; "small to moderate (< 512)"
POW2_RANKS = tuple(2**i for i in range(13))  # 1 .. 4096
RL_RANK = 1  # "1 suffices for RL": policy gradient gives O(1) bits per episode
RL_LORA_LR_MULT = 5.0  # RL LoRA LR / FullFT LR (measured at rank 1, docs/training.md; see default_lr)

METHODS = ("lora", "full")
TASKS = ("sft", "rl")


# ---------------------------------------------------------------- validation
def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}: expected a positive integer, got {value!r}")
    return value


def check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        what = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise UserError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"{name}: expected one of {'|'.join(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------- learning rate
def lora_lr_multiplier(steps: int | None) -> float:
    """LoRA LR / FullFT LR for a run of `steps` optimizer steps (None: a long run, 10x).

    m(steps) = 10 + 5 / (1 + (steps / 300)^3). The paper measures ~15x for runs of about 100 steps or fewer and
    ~10x for long runs; it gives no curve in between. The excess over 10x comes from B starting at 0 (an
    implicit warm-up lasting a roughly fixed number of steps), so it should fade as the run grows. This Hill
    curve is smooth and monotone, keeps 96% of the short-run bonus at 100 steps (14.82x), is halfway at 300
    steps (about the geometric middle of the paper's two regimes, 100 and 1000) and has faded to 10.13x at
    1000 steps and 10.0001x at 10,000.
    """
    if steps is None:
        return LORA_LR_MULT
    check_positive_int("steps", steps)
    bonus = SHORT_RUN_LR_MULT - LORA_LR_MULT
    return LORA_LR_MULT + bonus / (1.0 + (steps / SHORT_RUN_MIDPOINT_STEPS) ** SHORT_RUN_SHARPNESS)


def lr_formula(hidden_size: int, exponent: float, multiplier: float = 1.0) -> float:
    """LR* = multiplier * 5e-5 * (2000 / hidden_size)^exponent (multiplier 1 for FullFT, 10 for LoRA)."""
    check_positive_int("hidden_size", hidden_size)
    check_positive("multiplier", multiplier)
    if not isinstance(exponent, (int, float)) or not math.isfinite(exponent):
        raise UserError(f"exponent: expected a finite number, got {exponent!r}")
    return multiplier * BASE_LR * (REF_HIDDEN / hidden_size) ** exponent


def _text_config(model_config: Any) -> Any:
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def model_family(model_config: Any) -> tuple[str | None, str]:
    """('llama' | 'qwen' | None, why). None: no published exponent for this model."""
    cfg = _text_config(model_config)
    mt = str(getattr(cfg, "model_type", "") or "")
    if mt.startswith("qwen"):
        return "qwen", f"Qwen family (model_type {mt})"
    if mt == "llama":
        vocab = getattr(cfg, "vocab_size", None)
        if vocab == LLAMA3_VOCAB:
            return "llama", "Llama 3 family (llama architecture, 128,256-token vocabulary)"
        return None, f"llama architecture but not Llama 3 (vocab {vocab})"
    return None, f"model_type {mt or '?'!r} has no published fit"


def lr_warning(model_config: Any) -> str | None:
    """The one-line warning for a model without a published LR fit (None when it has one)."""
    family, why = model_family(model_config)
    if family is not None:
        return None
    return f"WARNING: no published LR fit: {why}; p={DEFAULT_EXPONENT} assumed, sweep the LR."


def hidden_size_of(model_config: Any) -> int:
    hidden = getattr(_text_config(model_config), "hidden_size", None)
    if not isinstance(hidden, int) or hidden < 1:
        raise UserError(f"model config: expected a positive integer hidden_size, got {hidden!r}")
    return hidden


def default_lr(model_config: Any, method: str = "lora", steps: int | None = None,
               family: str | None = None, task: str = "sft") -> tuple[float, str]:
    """The recipe's LR for a transformers config: (lr, one-line reason).

    FullFT: 5e-5 * (2000/hidden)^p. LoRA SFT: that times `lora_lr_multiplier(steps)` (10 for long or unknown
    run length, up to 15 for short runs). `family` ('llama'|'qwen') overrides the detection from the config.
    An unknown family uses p = 0.429 and the reason starts with 'WARNING'.

    task="rl" (departure from the paper, measured): LoRA gets RL_LORA_LR_MULT = 5x the FullFT LR whatever the
    run length. The paper says rank 1 suffices for RL and that rank 1 prefers a somewhat lower LR; an open
    reproduction found 4.8x at rank 1 in SFT. On SmolLM2-135M, 30-step rank-1 RL at 10x and 15x rose and then
    fell back on 3 of 4 reasoning-gym tasks, while 5x improved all four (docs/training.md). FullFT RL uses the
    SFT formula (no RL fit is published).
    """
    check_choice("method", method, METHODS)
    check_choice("task", task, TASKS)
    if steps is not None:
        check_positive_int("steps", steps)
    hidden = hidden_size_of(model_config)
    if family is not None:
        check_choice("family", family, tuple(FAMILY_EXPONENT))
    else:
        family = model_family(model_config)[0]
    warn = ""
    if family is None:
        p = DEFAULT_EXPONENT
        warn = lr_warning(model_config) + " "
        fam = "default"
    else:
        p = FAMILY_EXPONENT[family]
        fam = f"{family} fit"
    full = lr_formula(hidden, p)
    formula = f"5e-5*(2000/{hidden})^{p}"
    if method == "full":
        return full, f"{warn}FullFT LR = {formula} = {full:.3g} ({fam}, LR formula of LoRA Without Regret)"
    if task == "rl":
        lr = full * RL_LORA_LR_MULT
        return lr, (f"{warn}RL LoRA LR = {RL_LORA_LR_MULT:g} x {formula} = {lr:.3g} ({fam}; RL: rank 1 prefers a "
                    "lower LR than SFT's 10-15x, which rose then collapsed in 30-step RL runs)")
    mult = lora_lr_multiplier(steps)
    lr = full * mult
    if steps is None:
        run = "long or unknown run length: optimal LoRA LR ~10x FullFT (fit over 14 models: 9.8)"
    elif mult > LORA_LR_MULT + 0.05:
        run = (f"{steps}-step run: short runs (<=100 steps) prefer ~15x since B starts at 0, an implicit "
               "warm-up")
    else:
        run = f"{steps}-step run: optimal LoRA LR ~10x FullFT"
    return lr, f"{warn}LoRA LR = {mult:.3g} x {formula} = {lr:.3g} ({fam}; {run})"


# ---------------------------------------------------------------- capacity in bits
def bits_per_token_from_nll(mean_nll_nats: float) -> float:
    """Bits per token from the base model's own mean NLL on the data (in nats): nll / ln 2.

    The first-epoch log-loss is the data's description length; what remains to learn is at most this.
    """
    check_positive("mean NLL", mean_nll_nats, allow_zero=True)
    return mean_nll_nats / math.log(2)


def information_bits(task: str, tokens: int | None = None, episodes: int | None = None,
                     bits_per_token: float = BITS_PER_TOKEN) -> float:
    """Bits the data can teach: SFT = trained (completion) tokens * bits/token; RL = episodes * 1 bit.

    Count tokens of one epoch: repeated epochs add no new information.
    """
    check_choice("task", task, TASKS)
    if task == "sft":
        if tokens is None:
            raise UserError("tokens: SFT capacity needs the number of trained tokens (--tokens or --dataset)")
        check_positive_int("tokens", tokens)
        return tokens * check_positive("bits_per_token", bits_per_token)
    if episodes is None:
        raise UserError("episodes: RL capacity needs the number of episodes (--episodes)")
    check_positive_int("episodes", episodes)
    return episodes * BITS_PER_EPISODE


@dataclass(frozen=True)
class CapacityCheck:
    info_bits: float
    capacity_bits: float
    margin: float  # capacity / information
    verdict: str  # fits | tight | exceeds
    reason: str


def capacity_check(info_bits: float, lora_params: int, bits_per_param: float = BITS_PER_PARAM) -> CapacityCheck:
    """Compare what the data can teach with what the adapter can store (2 bits per parameter)."""
    check_positive("info_bits", info_bits)
    check_positive_int("lora_params", lora_params)
    cap = lora_params * check_positive("bits_per_param", bits_per_param)
    margin = cap / info_bits
    if margin >= 2:
        verdict, why = "fits", "LoRA should track FullFT (params >= tokens rule of the authors' tooling holds)"
    elif margin >= 1:
        verdict, why = "tight", "capacity barely covers the data; a higher rank is safer"
    else:
        verdict, why = "exceeds", ("the data holds more bits than the adapter can store: expect LoRA to fall "
                                   "off FullFT's loss curve (worse efficiency, not a hard floor)")
    reason = (f"{verdict}: capacity {cap:.3g} bits (2 bits x {lora_params:,} params) vs {info_bits:.3g} bits of "
              f"data, margin {margin:.3g}x; {why}")
    return CapacityCheck(info_bits, cap, margin, verdict, reason)


def smallest_passing_rank(info_bits: float, params_at_rank: Callable[[int], int],
                          ranks: Sequence[int] = POW2_RANKS, min_margin: float = 1.0,
                          bits_per_param: float = BITS_PER_PARAM) -> int | None:
    """The smallest rank in `ranks` whose adapter stores >= min_margin x info_bits (None if none does).

    `params_at_rank(r)` returns the LoRA parameter count at rank r (e.g. from `regretless.counts`); parameters
    grow with rank, so the search is a bisection over the sorted candidates.
    """
    check_positive("info_bits", info_bits)
    check_positive("min_margin", min_margin)
    cands = sorted({check_positive_int("rank", r) for r in ranks})
    if not cands:
        raise UserError("ranks: expected at least one candidate rank")

    def ok(r: int) -> bool:
        return params_at_rank(r) * bits_per_param >= min_margin * info_bits

    lo, hi = 0, len(cands) - 1
    if not ok(cands[hi]):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(cands[mid]):
            hi = mid
        else:
            lo = mid + 1
    return cands[lo]


# ---------------------------------------------------------------- batch size, MoE, compute
def batch_size_advice(batch_size: int | None, method: str = "lora") -> tuple[str, str]:
    """(level, reason); level is one of advice | good | ok | large | too-large."""
    check_choice("method", method, METHODS)
    if batch_size is None:
        return "advice", (f"use a small-to-moderate batch (< {MAX_BATCH} sequences, e.g. 32-128): LoRA matches "
                          "FullFT at small batch and lags at 1024+, whatever the rank")
    check_positive_int("batch_size", batch_size)
    if batch_size <= 128:
        return "good", (f"batch {batch_size} is small: LoRA and FullFT are close and the gap shrinks over "
                        "training (paper: batch 32)")
    if batch_size < MAX_BATCH:
        return "ok", f"batch {batch_size} is moderate (< {MAX_BATCH}); smaller is better for both methods"
    if batch_size < 1024:
        return "large", (f"batch {batch_size} >= {MAX_BATCH}: LoRA starts to lag FullFT as batch grows; "
                         "prefer < 512")
    tail = "LoRA lags FullFT at 1024+ whatever the rank" if method == "lora" else "FullFT too is best small"
    return "too-large", f"batch {batch_size} is large: {tail}; both methods are best at small batch"


def moe_expert_rank(rank: int, top_k: int) -> int:
    """Per-expert LoRA rank = total rank // active experts (top-k), at least 1, so the LoRA:FullFT parameter
    ratio of MoE layers matches the dense layers'."""
    check_positive_int("rank", rank)
    check_positive_int("top_k (num_experts_per_tok)", top_k)
    return max(1, rank // top_k)


def lora_scale(rank: int, alpha: float = ALPHA) -> float:
    """alpha / r (the paper's parametrization, alpha = 32)."""
    return check_positive("alpha", alpha) / check_positive_int("rank", rank)


def lora_flops_ratio_square(n: int, rank: int) -> float:
    """LoRA / FullFT training multiply-adds per token for one N x N matrix: (2N^2 + 6Nr) / (3N^2)."""
    check_positive_int("n", n)
    check_positive_int("rank", rank)
    return (2 * n * n + 6 * n * rank) / (3 * n * n)
