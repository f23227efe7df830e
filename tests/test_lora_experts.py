"""MoE LoRA: LoRAExperts on fused 3-D experts against a naive per-expert loop written out by hand (outputs and
gradients), the per-expert rank rule, an old-style ModuleList MoE, and the MoE families transformers ships."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config
from torch import nn

from regretless.errors import UserError
from regretless.lora import LoRAConfig, LoRAExperts, apply_lora, find_targets, lora_modules

SMALL = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256,
         "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": None}


def tiny_mixtral_config(**kw):
    from transformers import MixtralConfig

    return MixtralConfig(**{**SMALL, "head_dim": 8, "num_local_experts": 4, "tie_word_embeddings": False, **kw})


def tiny_olmoe_config(**kw):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**SMALL, "num_experts": 8, **kw})


def tiny_gpt_oss_config(**kw):
    """GPT-OSS stores experts transposed, (E, in, out), with biases and its own clamped gate: the other layout."""
    from transformers import GptOssConfig

    return GptOssConfig(**{**SMALL, "head_dim": 8, "num_local_experts": 4, "layer_types": ["full_attention"] * 2,
                           **kw})


def _experts_module(model) -> nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.experts"))


def _w_out_in(base: nn.Module, name: str, e: int) -> torch.Tensor:
    w = getattr(base, name)[e]
    return w.T if getattr(base, "is_transposed", False) else w  # (out, in)


def naive_moe(lora: LoRAExperts, x_T_H, idx_T_K, w_T_K):
    """One token, one routed slot, one expert at a time: y_t = Σ_k w_tk · expert_e(x_t), with
    expert_e(x) = W_down,e·gate(W_gu,e·x + b + s·B_gu,e·A_gu,e·x) + b + s·B_down,e·A_down,e·(...)."""
    base = lora.base_layer
    E = base.gate_up_proj.shape[0]
    bias = getattr(base, "has_bias", False)
    rows = []
    for t in range(x_T_H.shape[0]):
        acc = torch.zeros_like(x_T_H[t])
        for k in range(idx_T_K.shape[1]):
            e = int(idx_T_K[t, k])
            if e == E:  # sentinel: a slot routed to no (local) expert
                continue
            v = x_T_H[t]
            for name in ("gate_up_proj", "down_proj"):
                h = _w_out_in(base, name, e) @ v
                if bias:
                    h = h + getattr(base, f"{name}_bias")[e]
                if name in lora.ranks:
                    A, B = lora.lora_A(name)[e], lora.lora_B(name)[e]  # (r, in), (out, r)
                    h = h + lora.scales[name] * (B @ (A @ v))
                v = base._apply_gate(h[None])[0] if name == "gate_up_proj" else h
            acc = acc + w_T_K[t, k] * v
        rows.append(acc)
    return torch.stack(rows)


def _routing(T: int, K: int, E: int, seed: int, sentinel: bool):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # (T, K), distinct per token
    if sentinel:
        idx[1, 0] = E
        idx[4, K - 1] = E
    w = torch.rand(T, K, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_experts_output_and_grads_match_naive_loop(family, top_k):
    cfg = (tiny_qwen3_moe_config(num_experts_per_tok=top_k) if family == "qwen3_moe"
           else tiny_gpt_oss_config(num_experts_per_tok=top_k))
    base = _experts_module(build_model(cfg))
    E = base.gate_up_proj.shape[0]
    lora = LoRAExperts(base, {"gate_up_proj": 3, "down_proj": 2}, {"gate_up_proj": 2.5, "down_proj": 4.0})
    torch.manual_seed(top_k)
    with torch.no_grad():
        for name in lora.adapted:
            lora.lora_B(name).normal_(0, 0.5)
    T = 9
    x = torch.randn(T, cfg.hidden_size, requires_grad=True)
    idx, w = _routing(T, min(top_k, E), E, seed=top_k, sentinel=True)
    w.requires_grad_(True)
    g = torch.randn(T, cfg.hidden_size)  # upstream gradient
    leaves = [x, w] + [p for name in lora.adapted for p in (lora.lora_A(name), lora.lora_B(name))]

    got = lora(x, idx, w)
    want = naive_moe(lora, x, idx, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.1
    grads_got = torch.autograd.grad((got * g).sum(), leaves)
    grads_want = torch.autograd.grad((want * g).sum(), leaves)
    for name, a, b in zip(["x", "w", "A_gu", "B_gu", "A_down", "B_down"], grads_got, grads_want):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # sentinel slots contribute nothing: their routing weight gets no gradient
    assert grads_got[1][1, 0] == 0 and grads_got[1][4, min(top_k, E) - 1] == 0
    # experts that received no token get zero gradients
    unused = sorted(set(range(E)) - set(idx[idx < E].tolist()))
    for e in unused:
        assert torch.count_nonzero(grads_got[2][e]) == 0


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lora_off_equals_the_original_module(family):
    cfg = tiny_qwen3_moe_config(num_experts_per_tok=2) if family == "qwen3_moe" else tiny_gpt_oss_config()
    base = _experts_module(build_model(cfg))
    E = base.gate_up_proj.shape[0]
    lora = LoRAExperts(base, {"gate_up_proj": 2, "down_proj": 2}, {"gate_up_proj": 1.0, "down_proj": 1.0})
    x = torch.randn(7, cfg.hidden_size)
    idx, w = _routing(7, 2, E, seed=0, sentinel=True)
    base._is_expert_parallel = True  # HF's kernels skip sentinel ids only in expert-parallel mode
    with torch.no_grad():
        torch.testing.assert_close(lora(x, idx, w), base(x, idx, w), atol=1e-5, rtol=1e-5)  # B = 0
        for name in lora.adapted:
            lora.lora_B(name).normal_()
        assert (lora(x, idx, w) - base(x, idx, w)).abs().max() > 1e-3
        lora.enabled = False
        torch.testing.assert_close(lora(x, idx, w), base(x, idx, w), atol=1e-5, rtol=1e-5)


def test_forward_never_forms_delta_w(monkeypatch):
    model = build_model(tiny_qwen3_moe_config())
    apply_lora(model, LoRAConfig(rank=4))

    def boom(self, name):
        raise AssertionError("forward must not materialise the per-expert ΔW")

    monkeypatch.setattr(LoRAExperts, "delta_weight", boom)
    loss = model(torch.randint(0, 512, (2, 6))).logits.sum()
    loss.backward()


def test_experts_merge_equals_unmerged_and_unmerge_is_bit_exact():
    model = build_model(tiny_qwen3_moe_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4))
    torch.manual_seed(0)
    for _, m in lora_modules(model):
        for n, p in m.named_parameters(recurse=False):
            if "lora_B" in n:
                p.data.normal_(0, 0.2)
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        y = model(ids).logits
        for _, m in lora_modules(model):
            m.merge()
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
        for _, m in lora_modules(model):
            m.unmerge()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("top_k,rank,expert_rank,want", [(2, 8, None, 4), (4, 8, None, 2), (8, 4, None, 1),
                                                         (2, 8, 3, 3), (2, 1, None, 1)])
def test_expert_rank_default_and_override(top_k, rank, expert_rank, want):
    model = build_model(tiny_qwen3_moe_config(num_experts_per_tok=top_k))
    targets = find_targets(model, LoRAConfig(rank=rank, expert_rank=expert_rank))
    experts = [t for t in targets if t.group == "experts"]
    dense = [t for t in targets if t.group != "experts"]
    assert len(experts) == 2 * 2 and {t.param for t in experts} == {"gate_up_proj", "down_proj"}
    assert {t.rank for t in experts} == {want}
    assert {t.rank for t in dense} == {rank}
    assert all(t.n_experts == 8 for t in experts)


def test_expert_rank_too_large_is_a_user_error():
    model = build_model(tiny_qwen3_moe_config())
    with pytest.raises(UserError, match=r"rank 17 .*experts\.(gate_up_proj|down_proj).*expected rank <= 16"):
        find_targets(model, LoRAConfig(rank=4, expert_rank=17))
    with pytest.raises(UserError, match="expert_rank"):
        find_targets(model, LoRAConfig(rank=4, expert_rank=0))


@pytest.mark.parametrize("make_config,n_experts", [(tiny_mixtral_config, 4), (tiny_olmoe_config, 8),
                                                   (tiny_gpt_oss_config, 4)])
def test_other_fused_families_adapt(make_config, n_experts):
    model = build_model(make_config())
    report = apply_lora(model, LoRAConfig(rank=4))
    rows = {r["group"]: r for r in report.rows()}
    assert rows["experts"]["modules"] == 2 * 2 and rows["experts"]["matrices"] == 2 * 2 * n_experts
    assert rows["experts"]["ranks"] == [2] and rows["attn"]["ranks"] == [4]
    wrapped = [n for n, m in lora_modules(model) if isinstance(m, LoRAExperts)]
    assert wrapped == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not any("router" in n or n.endswith(".gate") for n, _ in lora_modules(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable


# ---- an old-style MoE: a router plus a ModuleList of per-expert nn.Linear MLPs (transformers 5 ships none)


class ListExpert(nn.Module):
    def __init__(self, H: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ListMoE(nn.Module):
    def __init__(self, H: int, inter: int, E: int, K: int):
        super().__init__()
        self.K = K
        self.gate = nn.Linear(H, E, bias=False)  # the router
        self.experts = nn.ModuleList(ListExpert(H, inter) for _ in range(E))

    def forward(self, x):  # (B, T, H)
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(self.K, dim=-1)  # (B, T, K)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            weight = (w * (idx == e)).sum(-1, keepdim=True)  # (B, T, 1), 0 where e is not routed
            out = out + weight * expert(x)
        return out


def build_list_moe(seed: int = 0):
    model = build_model(tiny_llama_config(num_experts_per_tok=2), seed=seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.mlp = ListMoE(32, 16, E=4, K=2)
    return model.eval()


def test_old_style_modulelist_moe_gets_the_expert_rank(tmp_path):
    model = build_list_moe()
    report = apply_lora(model, LoRAConfig(rank=8))
    rows = {r["group"]: r for r in report.rows()}
    assert rows["experts"]["modules"] == 2 * 4 * 3 and rows["experts"]["ranks"] == [4]  # 8 // top_k
    assert rows["attn"]["ranks"] == [8]
    names = {n for n, _ in lora_modules(model)}
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert not any(n.endswith("mlp.gate") for n in names)  # the router is never adapted

    # and PEFT reads it back (per-expert ranks travel in rank_pattern)
    from peft import PeftModel

    from regretless.lora import save_adapter

    torch.manual_seed(5)
    for _, m in lora_modules(model):
        m.lora_B.data.normal_(0, 0.3)
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=8))
    peft_model = PeftModel.from_pretrained(build_list_moe(), tmp_path / "a")
    with torch.no_grad():
        got = peft_model(ids).logits
        base = build_list_moe()(ids).logits
    assert (want - base).abs().max() > 1e-2
    assert (want - got).abs().max() <= 1e-4
