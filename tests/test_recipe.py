"""The recipe's rules against hand-computed values and the paper's published example LRs."""

from __future__ import annotations

import itertools
import math

import pytest

from regretless import recipe
from regretless.errors import UserError
from regretless.known_models import KNOWN_MODELS, canonical_name, known_config

# PAPER.md, "The LR formula": example LoRA LRs of the authors' tooling
PUBLISHED_LORA_LR = {
    "Llama-3.2-1B": 4.91e-4,
    "Llama-3.1-8B": 2.86e-4,
    "Llama-3.1-70B": 1.66e-4,
    "Qwen3-8B": 4.73e-4,
    "Qwen3-32B": 4.65e-4,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_LORA_LR))
def test_published_lora_lrs(name):
    lr, reason = recipe.default_lr(known_config(name), "lora")
    assert lr == pytest.approx(PUBLISHED_LORA_LR[name], rel=0.01)
    assert "WARNING" not in reason and "10 x" in reason
    full, _ = recipe.default_lr(known_config(name), "full")
    assert lr / full == pytest.approx(10.0)


def test_hidden_sizes_behind_published_lrs():
    # the published LRs pin these hidden sizes; the table must hold them
    assert {n: KNOWN_MODELS[n]["hidden_size"] for n in PUBLISHED_LORA_LR} == {
        "Llama-3.2-1B": 2048, "Llama-3.1-8B": 4096, "Llama-3.1-70B": 8192, "Qwen3-8B": 4096, "Qwen3-32B": 5120}


def test_lr_formula_hand_values():
    # (2000/4000)^1 = 0.5; (2000/2000)^p = 1
    assert recipe.lr_formula(4000, 1.0) == pytest.approx(2.5e-5)
    assert recipe.lr_formula(2000, 0.781, 10) == pytest.approx(5e-4)
    assert recipe.lr_formula(1000, 0.5) == pytest.approx(5e-5 * math.sqrt(2))
    with pytest.raises(UserError, match="hidden_size"):
        recipe.lr_formula(0, 0.5)


def test_lora_lr_multiplier_curve():
    assert recipe.lora_lr_multiplier(None) == 10.0
    assert recipe.lora_lr_multiplier(300) == pytest.approx(12.5)  # midpoint
    assert recipe.lora_lr_multiplier(100) == pytest.approx(10 + 5 / (1 + 1 / 27))  # 14.82
    assert recipe.lora_lr_multiplier(1) == pytest.approx(15.0, abs=1e-3)
    assert recipe.lora_lr_multiplier(1000) == pytest.approx(10 + 5 / (1 + (10 / 3) ** 3))  # 10.13
    vals = [recipe.lora_lr_multiplier(s) for s in (1, 10, 50, 100, 200, 500, 1000, 10000)]
    assert all(a > b for a, b in itertools.pairwise(vals))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(UserError, match="steps"):
            recipe.lora_lr_multiplier(bad)


def test_default_lr_short_run_and_full_ignores_steps():
    cfg = known_config("Qwen3-8B")
    full, _ = recipe.default_lr(cfg, "full", steps=50)
    lora, reason = recipe.default_lr(cfg, "lora", steps=100)
    assert full == pytest.approx(5e-5 * (2000 / 4096) ** 0.0775)
    assert lora / full == pytest.approx(recipe.lora_lr_multiplier(100))
    assert "implicit warm-up" in reason


def test_unknown_family_warns_with_default_exponent():
    lr, reason = recipe.default_lr(known_config("Gemma-2-2B"), "full")
    assert lr == pytest.approx(5e-5 * (2000 / 2304) ** 0.429)
    assert reason.startswith("WARNING") and "gemma2" in reason and "0.429" in reason
    # llama architecture but not Llama 3 (SmolLM2): not silently treated as Llama
    lr, reason = recipe.default_lr(known_config("SmolLM2-135M"), "lora")
    assert lr == pytest.approx(10 * 5e-5 * (2000 / 576) ** 0.429)
    assert reason.startswith("WARNING") and "not Llama 3" in reason
    # an explicit family overrides the detection
    lr, reason = recipe.default_lr(known_config("SmolLM2-135M"), "full", family="llama")
    assert lr == pytest.approx(5e-5 * (2000 / 576) ** 0.781) and "WARNING" not in reason


def test_qwen2_counts_as_qwen():
    assert recipe.model_family(known_config("Qwen2.5-7B"))[0] == "qwen"
    assert recipe.model_family(known_config("Qwen3-30B-A3B"))[0] == "qwen"
    assert recipe.model_family(known_config("Llama-3.2-3B"))[0] == "llama"
    assert recipe.model_family(known_config("Mistral-7B"))[0] is None


def test_default_lr_bad_inputs():
    cfg = known_config("Qwen3-8B")
    with pytest.raises(UserError, match="method"):
        recipe.default_lr(cfg, "qlora")
    with pytest.raises(UserError, match="steps"):
        recipe.default_lr(cfg, "lora", steps=-1)
    with pytest.raises(UserError, match="family"):
        recipe.default_lr(cfg, "lora", family="gpt")


def test_bits_per_token_and_information():
    assert recipe.bits_per_token_from_nll(math.log(2)) == pytest.approx(1.0)
    assert recipe.bits_per_token_from_nll(1.3862943611198906) == pytest.approx(2.0)
    assert recipe.information_bits("sft", tokens=1000) == 1000.0
    assert recipe.information_bits("sft", tokens=1000, bits_per_token=0.5) == 500.0
    # MATH: ~10,000 problems x 32 samples = 320k bits
    assert recipe.information_bits("rl", episodes=320_000) == 320_000.0
    with pytest.raises(UserError, match="tokens"):
        recipe.information_bits("sft")
    with pytest.raises(UserError, match="episodes"):
        recipe.information_bits("rl", episodes=0)
    with pytest.raises(UserError, match="mean NLL"):
        recipe.bits_per_token_from_nll(-1.0)


def test_capacity_verdicts():
    c = recipe.capacity_check(1e6, 1_000_000)  # 2e6 bits vs 1e6 bits
    assert (c.capacity_bits, c.margin, c.verdict) == (2e6, 2.0, "fits")
    c = recipe.capacity_check(1.5e6, 1_000_000)
    assert c.margin == pytest.approx(4 / 3) and c.verdict == "tight"
    c = recipe.capacity_check(4e6, 1_000_000)
    assert c.margin == 0.5 and c.verdict == "exceeds" and "0.5x" in c.reason
    # the paper's RL example: rank-1 LoRA on Llama-3.1-8B (~3M params) vs MATH's 320k bits
    assert recipe.capacity_check(320_000, 3_000_000).margin == pytest.approx(18.75)
    with pytest.raises(UserError, match="lora_params"):
        recipe.capacity_check(1e6, 0)


def test_smallest_passing_rank():
    def params(r):  # 1000 params per unit of rank
        return 1000 * r

    # need 2*1000*r >= 50_000 -> r >= 25 -> 32 among powers of two
    assert recipe.smallest_passing_rank(50_000, params) == 32
    assert recipe.smallest_passing_rank(50_000, params, ranks=range(1, 100)) == 25
    assert recipe.smallest_passing_rank(50_000, params, min_margin=2.0) == 64
    assert recipe.smallest_passing_rank(1e12, params) is None
    assert recipe.smallest_passing_rank(1.0, params) == 1
    with pytest.raises(UserError, match="rank"):
        recipe.smallest_passing_rank(10.0, params, ranks=[0, 4])


def test_batch_size_advice():
    assert recipe.batch_size_advice(32)[0] == "good"
    assert recipe.batch_size_advice(256)[0] == "ok"
    assert recipe.batch_size_advice(512)[0] == "large"
    level, reason = recipe.batch_size_advice(1024)
    assert level == "too-large" and "whatever the rank" in reason
    assert recipe.batch_size_advice(None)[0] == "advice"
    with pytest.raises(UserError, match="batch_size"):
        recipe.batch_size_advice(0)


def test_moe_rank_scale_flops():
    assert recipe.moe_expert_rank(256, 8) == 32
    assert recipe.moe_expert_rank(100, 8) == 12
    assert recipe.moe_expert_rank(4, 8) == 1  # floored at 1
    with pytest.raises(UserError, match="rank"):
        recipe.moe_expert_rank(0, 8)
    assert recipe.lora_scale(16) == 2.0 and recipe.lora_scale(64, alpha=16) == 0.25
    # (2N^2 + 6Nr) / 3N^2 at N=4096, r=128: 2/3 + 2*128/4096
    assert recipe.lora_flops_ratio_square(4096, 128) == pytest.approx(2 / 3 + 0.0625)


def test_known_model_names():
    assert canonical_name("meta-llama/Llama-3.1-8B") == "Llama-3.1-8B"
    assert canonical_name("llama-3.1-8b") == "Llama-3.1-8B"
    assert canonical_name("meta-llama/Meta-Llama-3.1-8B-Instruct") == "Llama-3.1-8B"
    assert canonical_name("Qwen/Qwen3-30B-A3B-Base") == "Qwen3-30B-A3B"
    assert canonical_name("gpt2") is None
    cfg = known_config("qwen/qwen3-30b-a3b")
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        "qwen3_moe", 128, 8, 768)
    with pytest.raises(UserError, match="known models: .*Llama-3.2-1B"):
        known_config("gpt2")


def test_known_configs_build_on_meta():
    # every row is a real transformers config; spot-check total parameter counts against the model cards
    import torch
    from transformers import AutoModelForCausalLM

    expected_b = {"Qwen3-30B-A3B": 30.5, "Llama-3.2-1B": 1.24, "SmolLM2-135M": 0.135, "Qwen2.5-0.5B": 0.494}
    for name, billions in expected_b.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(known_config(name))
        n = sum(p.numel() for p in model.parameters())
        assert n / 1e9 == pytest.approx(billions, rel=0.01), name


def test_rl_lora_lr_is_five_times_fullft_whatever_the_run_length():
    from regretless.known_models import known_config

    for name in ("SmolLM2-135M", "Llama-3.1-8B", "Qwen3-8B"):
        cfg = known_config(name)
        full, _ = recipe.default_lr(cfg, "full")
        for steps in (None, 30, 5000):
            lr, reason = recipe.default_lr(cfg, "lora", steps, task="rl")
            assert lr == pytest.approx(5.0 * full, rel=1e-12) and "RL LoRA LR = 5 x" in reason
        assert recipe.default_lr(cfg, "full", 30, task="rl")[0] == full
    assert recipe.default_lr(known_config("SmolLM2-135M"), "lora", task="rl")[0] == pytest.approx(4.265e-4, rel=1e-3)
    assert recipe.RL_RANK == 1
    with pytest.raises(UserError, match="task"):
        recipe.default_lr(known_config("Qwen3-8B"), "lora", task="pretrain")
