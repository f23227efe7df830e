"""LoRA over 31 architectures built tiny from their transformers configs: dense, MoE and hybrid SSM.

For each, the matrices that must be adapted are written out by hand from the architecture (shapes from the config
numbers below, not read from the model), and the test checks against them: the adapted parameter count and its
split by role, that routers, norms and embeddings stay frozen, the FullFT and LoRA FLOPs per token (active experts
only), and that the adapter survives regretless -> PEFT and regretless -> regretless with the same logits.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_model

from regretless.counts import count_params, flops_per_token
from regretless.lora import LoRAConfig, apply_lora, load_adapter, lora_parameters, save_adapter, unload

H, V, NH, KV, HD, I, MI, SI, E, K = 32, 512, 4, 2, 8, 48, 16, 24, 4, 2  # hidden, vocab, heads, kv heads, head
# dim, MLP intermediate, expert intermediate, shared-expert intermediate, experts, active experts
Q, KVD = NH * HD, KV * HD  # 32, 16
RANK = 4
BASE = {"vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2,
        "num_attention_heads": NH, "num_key_value_heads": KV, "head_dim": HD, "max_position_embeddings": 128,
        "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1, "tie_word_embeddings": False}
MOE = {"moe_intermediate_size": MI, "num_experts": E, "num_experts_per_tok": K}


def attn(q=Q, kv=KVD, h=H):  # q, k, v, o
    return [("attn", h, q), ("attn", h, kv), ("attn", h, kv), ("attn", q, h)]


def gated(i=I, role="mlp"):  # gate, up, down
    return [(role, H, i), (role, H, i), (role, i, H)]


def experts(i=MI, e=E, k=K, gated_=True):  # (role, d_in, d_out, n_experts, top_k): gate, up, down per expert
    mats = [(H, i), (H, i), (i, H)] if gated_ else [(H, i), (i, H)]
    return [("experts", a, b, e, k) for a, b in mats] + [("router", H, e)]


def mamba2(inner, heads, state=8, groups=1):  # in_proj -> [z, x, B, C, dt], out_proj
    return [("ssm", H, 2 * inner + 2 * groups * state + heads), ("ssm", inner, H)]


def _cfg(model_type, **kw):
    import transformers

    return transformers.CONFIG_MAPPING[model_type](**kw)


def llama_like(mt, **kw):
    return lambda: _cfg(mt, **{**BASE, **kw}), lambda: 2 * (attn() + gated())


ARCHS = {
    # ---- dense
    "llama": llama_like("llama"),
    "qwen3": llama_like("qwen3"),
    "gemma3": llama_like("gemma3_text"),
    "qwen2": llama_like("qwen2"),
    "olmo2": llama_like("olmo2"),
    "phi3": (lambda: _cfg("phi3", **BASE),  # fused qkv_proj and gate_up_proj: one matrix each, as stored
             lambda: 2 * [("attn", H, Q + 2 * KVD), ("attn", Q, H), ("mlp", H, 2 * I), ("mlp", I, H)]),
    "opt": (lambda: _cfg("opt", vocab_size=V, hidden_size=H, ffn_dim=I, num_hidden_layers=2, num_attention_heads=NH,
                         word_embed_proj_dim=H, max_position_embeddings=128, pad_token_id=0),
            lambda: 2 * (attn(kv=Q) + [("mlp", H, I), ("mlp", I, H)])),  # fc1, fc2 held by the layer itself
    "gpt2": (lambda: _cfg("gpt2", vocab_size=V, n_embd=H, n_layer=2, n_head=NH, n_positions=128),  # Conv1D
             lambda: 2 * [("attn", H, 3 * H), ("attn", H, H), ("mlp", H, 4 * H), ("mlp", 4 * H, H)]),
    "gpt_neox": (lambda: _cfg("gpt_neox", **{**BASE, "num_key_value_heads": NH}),
                 lambda: 2 * [("attn", H, 3 * H), ("attn", H, H), ("mlp", H, I), ("mlp", I, H)]),
    "falcon": (lambda: _cfg("falcon", vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=NH,
                            num_kv_heads=KV, new_decoder_architecture=True, pad_token_id=0),
               lambda: 2 * [("attn", H, Q + 2 * KVD), ("attn", H, H), ("mlp", H, 4 * H), ("mlp", 4 * H, H)]),
    "bloom": (lambda: _cfg("bloom", vocab_size=V, hidden_size=H, n_layer=2, n_head=NH, pad_token_id=0),
              lambda: 2 * [("attn", H, 3 * H), ("attn", H, H), ("mlp", H, 4 * H), ("mlp", 4 * H, H)]),
    "gptj": (lambda: _cfg("gptj", vocab_size=V, n_embd=H, n_layer=2, n_head=NH, rotary_dim=4, n_positions=128),
             lambda: 2 * (attn(kv=Q) + [("mlp", H, 4 * H), ("mlp", 4 * H, H)])),
    "starcoder2": (lambda: _cfg("starcoder2", **BASE), lambda: 2 * (attn() + [("mlp", H, I), ("mlp", I, H)])),
    "phi": (lambda: _cfg("phi", **BASE), lambda: 2 * (attn() + [("mlp", H, I), ("mlp", I, H)])),
    # ---- MoE
    "qwen3_moe": (lambda: _cfg("qwen3_moe", **BASE, **MOE, decoder_sparse_step=1),
                  lambda: 2 * (attn() + experts())),
    "mixtral": (lambda: _cfg("mixtral", **BASE, num_local_experts=E, num_experts_per_tok=K),
                lambda: 2 * (attn() + experts(i=I))),
    "olmoe": (lambda: _cfg("olmoe", **BASE, num_experts=E, num_experts_per_tok=K),
              lambda: 2 * (attn() + experts(i=I))),
    "gpt_oss": (lambda: _cfg("gpt_oss", **BASE, num_local_experts=E, num_experts_per_tok=K,  # (E, in, out), biases
                             layer_types=["full_attention"] * 2), lambda: 2 * (attn() + experts(i=I))),
    "granitemoe": (lambda: _cfg("granitemoe", **BASE, num_local_experts=E, num_experts_per_tok=K),
                   lambda: 2 * (attn() + experts(i=I))),
    "qwen2_moe": (lambda: _cfg("qwen2_moe", **BASE, **MOE, shared_expert_intermediate_size=SI),
                  lambda: 2 * (attn() + experts() + gated(SI) + [("router", H, 1)])),  # + shared-expert gate
    "deepseek_v3": (lambda: _cfg("deepseek_v3", **{**BASE, "head_dim": 4}, moe_intermediate_size=MI,
                                 n_routed_experts=E,
                                 num_experts_per_tok=K, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                                 kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                                 topk_group=1),
                    lambda: 2 * [("attn", H, 16), ("attn", 16, NH * 8), ("attn", H, 16 + 4),
                                 ("attn", 16, NH * (4 + 8)), ("attn", NH * 8, H)]  # MLA: q_a, q_b, kv_a, kv_b, o
                    + gated() + experts() + gated(MI)),  # layer 0 dense; layer 1 routed + shared expert
    "llama4": (lambda: _cfg("llama4_text", **{**BASE, "intermediate_size": MI}, intermediate_size_mlp=I,
                            num_local_experts=E, num_experts_per_tok=1, interleave_moe_layer_step=1),
               lambda: 2 * (attn() + experts(k=1) + gated(MI))),  # experts (E, in, out) fed pre-grouped
    "nemotron_h": (lambda: _cfg("nemotron_h", **{**BASE, "num_hidden_layers": 4},
                                layers_block_type=["mamba", "moe", "attention", "mlp"], n_routed_experts=E,
                                num_experts_per_tok=K, moe_intermediate_size=MI,
                                moe_shared_expert_intermediate_size=SI, ssm_state_size=8, mamba_num_heads=4,
                                mamba_head_dim=8, n_groups=1, expand=1, chunk_size=8),
                   lambda: mamba2(32, 4) + experts(gated_=False) + [("mlp", H, SI), ("mlp", SI, H)] + attn()
                   + [("mlp", H, I), ("mlp", I, H)]),  # every block is a `mixer`; relu² experts: up, down only
    "qwen3_next": (lambda: _cfg("qwen3_next", **BASE, **MOE, shared_expert_intermediate_size=SI,
                                layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                                linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
                   lambda: [("ssm", H, 2 * 16 + 2 * 32), ("ssm", H, 2 * 4), ("ssm", 32, H)]  # gated delta net
                   + [("attn", H, 2 * Q)] + attn()[1:]  # q_proj also gives the output gate
                   + 2 * (experts() + gated(SI) + [("router", H, 1)])),
    # multimodal: the text decoder's blocks only (the vision tower is left alone), and num_experts_per_tok = 4 read
    # from text_config: expert rank 4 // 4 = 1
    "qwen3_vl_moe": (lambda: _cfg("qwen3_vl_moe", text_config={**BASE, **MOE, "num_experts_per_tok": 4,
                                                               "decoder_sparse_step": 1},
                                  vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32,
                                                 "num_heads": 2, "out_hidden_size": H, "patch_size": 4,
                                                 "spatial_merge_size": 2, "temporal_patch_size": 1,
                                                 "deepstack_visual_indexes": [0]}),
                     lambda: 2 * (attn() + experts(k=4))),
    # ---- hybrid SSM
    "jamba": (lambda: _cfg("jamba", **BASE, num_experts=E, num_experts_per_tok=K, attn_layer_period=2,
                           attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4,
                           mamba_dt_rank=4, mamba_expand=2),
              lambda: [("ssm", H, 4 * H), ("ssm", 2 * H, 4 + 2 * 4), ("ssm", 4, 2 * H), ("ssm", 2 * H, H)]
              + gated() + attn() + experts(i=I)),  # mamba in_proj, x_proj, dt_proj, out_proj
    "zamba2": (lambda: _cfg("zamba2", **{**BASE, "num_hidden_layers": 4},
                            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=8,
                            n_mamba_heads=4, mamba_expand=2, chunk_size=8, num_mem_blocks=1, adapter_rank=4,
                            mamba_ngroups=1),
               lambda: 4 * mamba2(2 * H, 4) + 2 * (
                   [("other", H, H)]  # the hybrid layer's own projection of the shared block's output
                   + attn(h=2 * H)[:3] + [("attn", Q, H)]  # attention reads [x, x_embed] (2H)
                   + [("mlp", H, 2 * I), ("mlp", I, H)]  # fused gate_up, down
                   # the model's own rank-4 adapters of the shared block, one per hybrid layer; a layer runs
                   # only its own, but both sit in it (counted in the FLOPs as if used: a small overcount)
                   + 2 * [("mlp", H, 4), ("mlp", 4, 2 * I)])),
    "falcon_h1": (lambda: _cfg("falcon_h1", **BASE, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                               mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8),
                  lambda: 2 * (gated() + mamba2(32, 4) + attn())),  # attention and mamba side by side
    "bamba": (lambda: _cfg("bamba", **BASE, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16,
                           mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8),
              lambda: 2 * gated() + mamba2(64, 4) + attn()),
    "granitemoehybrid": (lambda: _cfg("granitemoehybrid", **BASE, layer_types=["mamba", "attention"],
                                      num_local_experts=E, num_experts_per_tok=K, shared_intermediate_size=SI,
                                      mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                                      mamba_chunk_size=8),
                         lambda: 2 * (experts(i=I) + [("mlp", H, 2 * SI), ("mlp", SI, H)]) + mamba2(64, 4) + attn()),
    "lfm2": (lambda: _cfg("lfm2", **BASE, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
             lambda: [("ssm", H, 3 * H), ("ssm", H, H)] + attn() + 2 * gated()),  # short conv: in_proj, out_proj
}


# What PEFT 0.21 cannot take, so the PEFT comparison leaves it out (regretless adapts it, and round-trips it itself):
# it refuses out_proj on Mamba-2 model types, and its LoRA wrapper is bypassed where the model reads
# `dt_proj.weight` directly (Jamba); regretless's wrapper gives such readers W + s·B·A.
PEFT_EXCLUDE = {"falcon_h1": r".*mamba\.out_proj", "nemotron_h": r".*mixer\.out_proj", "jamba": "dt_proj"}
# adapters that get no gradient by design: each Zamba2 hybrid layer holds the shared block's adapter list and
# runs only its own entry (layer 1 -> 0, layer 3 -> 1)
NO_GRAD = {"zamba2": r"model\.layers\.(1\..*adapter_list\.1|3\..*adapter_list\.0)\..*"}


def _expected(entries) -> dict:
    """LoRA parameters by role, FullFT and LoRA FLOPs per token, from the hand-written matrices."""
    by_role: dict[str, int] = {}
    full = lora = 0.0
    for e in entries + [("head", H, V)]:
        role, d_in, d_out = e[:3]
        n, k = (e[3], e[4]) if role == "experts" else (1, 1)
        adapted = role not in ("router", "head")
        r = max(1, RANK // k) if role == "experts" else RANK
        if adapted:
            by_role[role] = by_role.get(role, 0) + n * r * (d_in + d_out)
        full += k * 6 * d_in * d_out
        lora += k * (4 * d_in * d_out + (6 * r * (d_in + d_out) if adapted else 0))
    return {"roles": by_role, "full": full, "lora": lora}


def _build(arch: str):
    cfg = ARCHS[arch][0]()
    if arch == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeForConditionalGeneration

        torch.manual_seed(0)
        return Qwen3VLMoeForConditionalGeneration(cfg).eval()
    return build_model(cfg)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))


def test_at_least_twenty_architectures():
    assert len(ARCHS) >= 20


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapted_parameters_flops_and_peft_round_trip(arch, ids, tmp_path):
    from peft import PeftModel

    entries = ARCHS[arch][1]
    want = _expected(entries())
    model = _build(arch)
    base_logits = model(ids).logits.detach()
    cfg = LoRAConfig(rank=RANK)
    assert flops_per_token(model, None) == want["full"]
    assert flops_per_token(model, cfg) == want["lora"]
    report = apply_lora(model, cfg)
    roles = {r["group"]: r["trainable"] for r in report.rows()}
    assert roles == want["roles"]
    assert report.trainable == sum(want["roles"].values()) == sum(p.numel() for _, p in lora_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in lora_parameters(model)}
    left = {w["reason"] for w in report.left_rows()}
    assert "unsupported" not in left and "preset" not in left
    assert count_params(_build(arch), cfg)["total"] == report.trainable

    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.3)
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()  # every adapter is on the path of the loss
    for n, p in lora_parameters(model):
        if "lora_A" in n:
            used = not (arch in NO_GRAD and re.fullmatch(NO_GRAD[arch], n))
            assert (p.grad is not None and p.grad.abs().sum() > 0) == used, n
    want_logits = logits.detach()
    assert (want_logits - base_logits).abs().max() > 1e-3
    save_adapter(model, tmp_path / "a", cfg)
    with torch.no_grad():
        fresh = _build(arch)
        load_adapter(fresh, tmp_path / "a")
        assert (fresh(ids).logits - want_logits).abs().max() <= 1e-5
        merged = unload(fresh, merge=True)
        assert (merged(ids).logits - want_logits).abs().max() <= 1e-4
    if arch in PEFT_EXCLUDE:  # see PEFT_EXCLUDE: compare with PEFT on the rest
        _peft_limit(arch, tmp_path / "a", ids, want_logits)
        model = _build(arch)
        cfg = LoRAConfig(rank=RANK, exclude=PEFT_EXCLUDE[arch])
        apply_lora(model, cfg)
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in lora_parameters(model):
                if "lora_B" in n:
                    p.normal_(0, 0.3)
            want_logits = model(ids).logits
        save_adapter(model, tmp_path / "b", cfg)
    peft_model = PeftModel.from_pretrained(_build(arch), tmp_path / ("b" if arch in PEFT_EXCLUDE else "a"))
    with torch.no_grad():
        assert (peft_model(ids).logits - want_logits).abs().max() <= 1e-4


def _peft_limit(arch, adapter, ids, want_logits) -> None:
    """The full adapter is what PEFT cannot take: it refuses it, or (Jamba) runs it without dt_proj's LoRA."""
    from peft import PeftModel

    if arch == "jamba":
        with torch.no_grad():
            got = PeftModel.from_pretrained(_build(arch), adapter)(ids).logits
        assert (got - want_logits).abs().max() > 1e-3
    else:
        with pytest.raises(ValueError, match="incompatible with Mamba-based models"):
            PeftModel.from_pretrained(_build(arch), adapter)
