"""Parameter and FLOP counts against numbers worked out by hand for the tiny models, and the paper's ~2/3 LoRA to
FullFT compute ratio on a large model built on the meta device."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

from regretless.counts import count_params, flops_per_token
from regretless.errors import UserError
from regretless.lora import LoRAConfig

# tiny Llama: hidden 32, MLP 64, 4 heads of 8, 2 KV heads (k, v: 32 -> 16), vocab 512 (tied), 2 layers
#   per layer  q 32·32 + k 32·16 + v 32·16 + o 32·32 = 3072;  gate, up 32·64, down 64·32 = 6144
#   norms      2 per layer · 32 + final 32 = 160;   embeddings 512·32 = 16384 (the head shares them)
LLAMA_MATMUL = 2 * (3072 + 6144) + 512 * 32  # every matrix a token passes through, the head included = 34816


def test_full_params_by_group():
    counts = count_params(build_model(tiny_llama_config()), None)
    assert counts == {"attn": 2 * 3072, "mlp": 2 * 6144, "embed": 16384, "other": 160, "total": 34976,
                      "model_total": 34976}


def test_full_params_untied_head():
    counts = count_params(build_model(tiny_llama_config(tie_word_embeddings=False)), None)
    assert counts["head"] == 16384 and counts["embed"] == 16384 and counts["total"] == 34976 + 16384
    assert counts["total"] == counts["model_total"]


def test_lora_params_by_group():
    counts = count_params(build_model(tiny_llama_config()), LoRAConfig(rank=4))
    # r·(d_in + d_out): attention 4·(64 + 48 + 48 + 64) = 896, MLP 3·4·(32 + 64) = 1152, per layer
    assert counts == {"attn": 2 * 896, "mlp": 2 * 1152, "total": 4096, "model_total": 34976}
    counts = count_params(build_model(tiny_llama_config()), LoRAConfig(rank=4, targets="attn"))
    assert counts["total"] == 2 * 896 and "mlp" not in counts


def test_moe_lora_params():
    # 8 experts, top-2, expert rank 8 // 2 = 4; gate, up and down each their own adapter (the paper's separate
    # matrices, though gate and up are stored fused): per layer E·r·3·(H + I) = 8·4·3·(32 + 16) = 4608
    counts = count_params(build_model(tiny_qwen3_moe_config()), LoRAConfig(rank=8))
    assert counts["experts"] == 2 * 4608
    assert counts["attn"] == 2 * 8 * (64 + 48 + 48 + 64)
    with pytest.raises(UserError):
        count_params(build_model(tiny_qwen3_moe_config()), LoRAConfig(rank=0))


def test_flops_tiny_llama():
    model = build_model(tiny_llama_config())
    assert flops_per_token(model, None) == 6 * LLAMA_MATMUL == 208896
    # LoRA: every matrix 4·d_in·d_out (forward + input gradient), adapted ones + 6·r·(d_in + d_out); head frozen
    assert flops_per_token(model, LoRAConfig(rank=4)) == 4 * LLAMA_MATMUL + 6 * 4096 == 163840


def test_flops_moe_counts_active_experts_only():
    model = build_model(tiny_qwen3_moe_config())  # top-2 of 8 experts, untied head
    # per layer: attention 3072; router 32·8; 2 active experts of gate_up 32·32 + down 16·32 = 1536 each;
    # head 32·512
    active = 2 * (3072 + 32 * 8 + 2 * 1536) + 32 * 512
    assert flops_per_token(model, None) == 6 * active
    # LoRA rank 4 (experts 2): attention 4·224 = 896 per layer, each active expert gate, up, down 3·2·(32 + 16) = 288
    assert flops_per_token(model, LoRAConfig(rank=4)) == 4 * active + 6 * 2 * (896 + 2 * 288)


def test_lora_vs_full_flops_ratio_is_about_two_thirds():
    """The paper: per N×N matrix LoRA costs 2N² + 6Nr vs FullFT 3N² multiply-adds: slightly over 2/3."""
    from transformers import AutoModelForCausalLM

    N, V, r, L = 4096, 1024, 8, 4
    cfg = tiny_llama_config(hidden_size=N, intermediate_size=N, num_attention_heads=32, num_key_value_heads=32,
                            num_hidden_layers=L, vocab_size=V, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    full = flops_per_token(model, None)
    lora = flops_per_token(model, LoRAConfig(rank=r))
    assert full == 6 * (7 * L * N * N + N * V)
    assert lora == 4 * (7 * L * N * N + N * V) + 7 * L * 6 * r * 2 * N
    assert 2 / 3 < lora / full < 2 / 3 + 2 * r / N + 1e-9
    assert lora / full == pytest.approx(2 / 3, abs=0.005)


def test_flops_modulelist_moe_counts_active_experts_only():
    """An old-style MoE (router + ModuleList of expert MLPs): each token runs top-2 of the 4 experts."""
    from test_lora_experts import build_list_moe

    model = build_list_moe()  # tiny Llama, tied head; per layer router 32 -> 4, experts gate/up 32 -> 16, down 16 -> 32
    expert = 3 * 32 * 16
    active = 2 * (3072 + 32 * 4 + 2 * expert) + 512 * 32
    assert flops_per_token(model, None) == 6 * active
    # LoRA rank 8: attention 8·224 per layer; experts rank 8 // 2 = 4: 3·4·(32 + 16) per active expert
    assert flops_per_token(model, LoRAConfig(rank=8)) == 4 * active + 6 * 2 * (8 * 224 + 2 * 3 * 4 * 48)


def test_moe_budget_on_a_real_size_model():
    """Qwen3-30B-A3B's shapes on the meta device: per MoE layer E·(r/k)·3·(H + I) expert LoRA parameters,
    128·(256/8)·3·(2048 + 768), and no router parameters."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                         num_experts_per_tok=8, vocab_size=151936)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    counts = count_params(model, LoRAConfig(rank=256))
    assert counts["experts"] == 48 * 128 * (256 // 8) * 3 * (2048 + 768) == 1_660_944_384
    assert counts["attn"] == 48 * 256 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048))
    assert "router" not in counts
