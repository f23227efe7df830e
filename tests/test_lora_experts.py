"""MoE LoRA: LoRAExperts on fused 3-D experts against a naive per-expert loop written out by hand (outputs and
gradients; the eager CPU loop and the sync-free grouped path), gate and up each at the full expert rank, non-gated
(NemotronH) and pre-grouped (Llama4) layouts, a graph-break-free compile of the routed path, the per-expert rank
rule, an old-style ModuleList MoE, and the MoE families transformers ships."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config
from torch import nn

import regretless.lora.experts as experts_mod
from regretless.errors import UserError
from regretless.lora import LoRAConfig, LoRAExperts, apply_lora, find_targets, lora_modules
from regretless.lora.experts import ExpertsLayout, experts_layout

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


# rows of the fused gate_up output that hold the gate and the up projection, written out per family
GATE_ROWS = {"qwen3_moe": lambda i: (slice(0, i), slice(i, 2 * i)),  # concatenated [gate; up]
             "gpt_oss": lambda i: (slice(0, None, 2), slice(1, None, 2))}  # interleaved gate0, up0, gate1, ...


def naive_moe(lora: LoRAExperts, family: str, x_T_H, idx_T_K, w_T_K):
    """One token, one routed slot, one expert at a time: y_t = Σ_k w_tk · expert_e(x_t), with
    h = W_gu,e·x + b + [s_g·B_g,e·A_g,e·x on the gate rows; s_u·B_u,e·A_u,e·x on the up rows] (or one fused
    s·B·A·x), expert_e(x) = W_down,e·gate(h) + b + s_d·B_d,e·A_d,e·gate(h)."""
    base = lora.base_layer
    E, I = base.gate_up_proj.shape[0], base.down_proj.shape[-1 if not getattr(base, "is_transposed", False) else 1]
    g_rows, u_rows = GATE_ROWS[family](I)
    bias = getattr(base, "has_bias", False)
    rows = []
    for t in range(x_T_H.shape[0]):
        acc = torch.zeros_like(x_T_H[t])
        for k in range(idx_T_K.shape[1]):
            e = int(idx_T_K[t, k])
            if e == E:  # sentinel: a slot routed to no (local) expert
                continue
            v = x_T_H[t]
            h = _w_out_in(base, "gate_up_proj", e) @ v
            if bias:
                h = h + base.gate_up_proj_bias[e]
            delta = torch.zeros_like(h)
            for key, rows_k in (("gate", g_rows), ("up", u_rows), ("gate_up", slice(None))):
                if key in lora.ranks:
                    A, B = lora.lora_A(key)[e], lora.lora_B(key)[e]  # (r, in), (out_k, r)
                    delta[rows_k] = delta[rows_k] + lora.scales[key] * (B @ (A @ v))
            v = base._apply_gate((h + delta)[None])[0]
            h = _w_out_in(base, "down_proj", e) @ v
            if bias:
                h = h + base.down_proj_bias[e]
            if "down" in lora.ranks:
                h = h + lora.scales["down"] * (lora.lora_B("down")[e] @ (lora.lora_A("down")[e] @ v))
            acc = acc + w_T_K[t, k] * h
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


def _lora(base, ranks: dict, scales: dict) -> LoRAExperts:
    layout = experts_layout(base)
    assert isinstance(layout, ExpertsLayout), layout
    return LoRAExperts(base, layout, ranks, scales)


SPLIT = ({"gate": 3, "up": 2, "down": 2}, {"gate": 2.5, "up": 1.5, "down": 4.0})
FUSED = ({"gate_up": 3, "down": 2}, {"gate_up": 2.5, "down": 4.0})


@pytest.mark.parametrize("space", ["tokens", "slots"])  # first A and down B in token space, or per slot
@pytest.mark.parametrize("mode", ["loop", "grouped", "masked"])
@pytest.mark.parametrize("ranks", [SPLIT, FUSED], ids=["split", "fused"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_experts_output_and_grads_match_naive_loop(family, top_k, ranks, mode, space, monkeypatch):
    cfg = (tiny_qwen3_moe_config(num_experts_per_tok=top_k) if family == "qwen3_moe"
           else tiny_gpt_oss_config(num_experts_per_tok=top_k))
    base = _experts_module(build_model(cfg))
    E = base.gate_up_proj.shape[0]
    lora = _lora(base, *ranks)
    lora.a_in_token_space = lora.down_in_token_space = space == "tokens"
    # loop: eager CPU; grouped (CUDA, compiled bf16) and masked (compiled otherwise): sync-free
    monkeypatch.setattr(experts_mod, "routing_mode", lambda x, w: mode)
    if mode == "grouped":  # grouped_mm leaves the rows of slots routed to no local expert unwritten: make them NaN
        mm = experts_mod.Routing.mm

        def poisoned_mm(self, x_S, w_E):
            return torch.where(self.valid_S[:, None], mm(self, x_S, w_E), float("nan"))

        monkeypatch.setattr(experts_mod.Routing, "mm", poisoned_mm)
    torch.manual_seed(top_k)
    with torch.no_grad():
        for key in lora.ranks:
            lora.lora_B(key).normal_(0, 0.5)
    T = 9
    x = torch.randn(T, cfg.hidden_size, requires_grad=True)
    idx, w = _routing(T, min(top_k, E), E, seed=top_k, sentinel=True)
    w.requires_grad_(True)
    g = torch.randn(T, cfg.hidden_size)  # upstream gradient
    keys = list(lora.ranks)
    leaves = [x, w] + [p for k in keys for p in (lora.lora_A(k), lora.lora_B(k))]

    got = lora(x, idx, w)
    want = naive_moe(lora, family, x, idx, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.1
    grads_got = torch.autograd.grad((got * g).sum(), leaves)
    grads_want = torch.autograd.grad((want * g).sum(), leaves)
    names = ["x", "w"] + [f"{ab}_{k}" for k in keys for ab in ("A", "B")]
    for name, a, b in zip(names, grads_got, grads_want):
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
    lora = _lora(base, {"gate": 2, "up": 2, "down": 2}, {"gate": 1.0, "up": 1.0, "down": 1.0})
    x = torch.randn(7, cfg.hidden_size)
    idx, w = _routing(7, 2, E, seed=0, sentinel=True)
    base._is_expert_parallel = True  # HF's kernels skip sentinel ids only in expert-parallel mode
    with torch.no_grad():
        torch.testing.assert_close(lora(x, idx, w), base(x, idx, w), atol=1e-5, rtol=1e-5)  # B = 0
        for key in lora.ranks:
            lora.lora_B(key).normal_()
        assert (lora(x, idx, w) - base(x, idx, w)).abs().max() > 1e-3
        lora.enabled = False
        torch.testing.assert_close(lora(x, idx, w), base(x, idx, w), atol=1e-5, rtol=1e-5)


def test_split_gate_up_gives_each_half_its_own_rank():
    """The paper's separate gate and up matrices: the fused storage must not halve the rank. Hand-placed B_gate
    changes only the gate rows of gate_up_proj, B_up only the up rows; each at the full expert rank."""
    model = build_model(tiny_qwen3_moe_config())
    apply_lora(model, LoRAConfig(rank=8))  # top-2: expert rank 4 for gate, up and down
    lora = _experts_module(model)
    assert lora.ranks == {"gate": 4, "up": 4, "down": 4}
    assert lora.lora_A("gate").shape == (8, 4, 32) and lora.lora_B("gate").shape == (8, 16, 4)
    with torch.no_grad():
        lora.lora_B("gate")[3, 5, 1] = 1.0  # expert 3, gate row 5
        lora.lora_B("up")[6, 2, 0] = 1.0  # expert 6, up row 2 = fused row 16 + 2
        d = lora.delta_weight("gate_up_proj")  # (E, 2I, H)
    nz = d.abs().sum(-1).nonzero().tolist()
    assert nz == [[3, 5], [6, 18]]
    torch.testing.assert_close(d[3, 5], lora.scales["gate"] * lora.lora_A("gate")[3, 1])
    torch.testing.assert_close(d[6, 18], lora.scales["up"] * lora.lora_A("up")[6, 0])


def test_non_gated_experts_nemotron_h():
    """NemotronH's experts store up_proj and down_proj only (relu² MLP): both adapted, against a naive loop."""
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(vocab_size=512, hidden_size=32, layers_block_type=["moe"], num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, n_groups=1,
                          mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, expand=1, chunk_size=8,
                          max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    base = build_model(cfg).model.layers[0].mixer.experts
    lora = _lora(base, {"up": 3, "down": 2}, {"up": 2.0, "down": 3.0})
    torch.manual_seed(0)
    with torch.no_grad():
        for k in lora.ranks:
            lora.lora_B(k).normal_(0, 0.5)
    x = torch.randn(5, 32)
    idx, w = _routing(5, 2, 4, seed=1, sentinel=False)
    got = lora(x, idx, w)
    want = torch.zeros_like(x)
    for t in range(5):
        for k in range(2):
            e = int(idx[t, k])
            h = base.up_proj[e] @ x[t] + 2.0 * lora.lora_B("up")[e] @ (lora.lora_A("up")[e] @ x[t])
            h = base.act_fn(h)
            y = base.down_proj[e] @ h + 3.0 * lora.lora_B("down")[e] @ (lora.lora_A("down")[e] @ h)
            want[t] += w[t, k] * y
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batched_experts_llama4():
    """Llama4's experts take tokens already grouped per expert, (E·T, H), weights stored (E, in, out)."""
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=512, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                           max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    base = build_model(cfg).model.layers[0].feed_forward.experts
    layout = experts_layout(base)
    assert layout.batched and layout.transposed and layout.inter == 16
    lora = LoRAExperts(base, layout, {"gate": 2, "up": 3, "down": 2}, {"gate": 2.0, "up": 1.0, "down": 3.0})
    torch.manual_seed(0)
    with torch.no_grad():
        for k in lora.ranks:
            lora.lora_B(k).normal_(0, 0.5)
    x = torch.randn(4 * 3, 32)  # 3 tokens per expert
    got = lora(x)
    want = []
    for e in range(4):
        xe = x[3 * e: 3 * e + 3]
        gu = xe @ base.gate_up_proj[e]  # (3, 2I): [gate | up]
        gate = gu[:, :16] + 2.0 * (xe @ lora.lora_A("gate")[e].T) @ lora.lora_B("gate")[e].T
        up = gu[:, 16:] + 1.0 * (xe @ lora.lora_A("up")[e].T) @ lora.lora_B("up")[e].T
        h = up * base.act_fn(gate)
        want.append(h @ base.down_proj[e] + 3.0 * (h @ lora.lora_A("down")[e].T) @ lora.lora_B("down")[e].T)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    lora.enabled = False
    torch.testing.assert_close(lora(x), base(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-masked", "bf16-grouped_mm"])
def test_routed_path_compiles_without_graph_breaks(dtype):
    """torch.compile(fullgraph=True) of an adapted MoE block: dynamo traces the sync-free routed path whole."""
    import torch._dynamo

    model = build_model(tiny_qwen3_moe_config()).to(dtype)
    apply_lora(model, LoRAConfig(rank=8))
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        for k in moe.experts.ranks:
            moe.experts.lora_B(k).normal_(0, 0.3)
    x = torch.randn(1, 6, 32, dtype=dtype)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(moe)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled(x)[0] if isinstance(compiled(x), tuple) else compiled(x),
                               moe(x)[0] if isinstance(moe(x), tuple) else moe(x), atol=tol, rtol=tol)


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
    assert len(experts) == 2 * 3  # gate, up, down per layer
    assert {(t.param, t.part) for t in experts} == {("gate_up_proj", "gate"), ("gate_up_proj", "up"),
                                                    ("down_proj", None)}
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
    assert rows["experts"]["modules"] == 2 and rows["experts"]["matrices"] == 2 * 3 * n_experts
    assert rows["experts"]["ranks"] == [2] and rows["attn"]["ranks"] == [4]
    wrapped = [n for n, m in lora_modules(model) if isinstance(m, LoRAExperts)]
    assert wrapped == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not any("router" in n or n.endswith(".gate") for n, _ in lora_modules(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable
    # the paper's budget: per layer E·(r/k)·3·(H + I)
    assert rows["experts"]["trainable"] == 2 * n_experts * 2 * 3 * (32 + 16)


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


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("top_k", [1, 3])
def test_routing_moves_rows_by_gathers_in_both_directions(top_k, compiled):
    """Routing.to_slots (tokens -> slots in expert order) and combine (slots -> tokens, each token's K rows
    weighted by its routing weights and summed, unrouted slots left out) against plain indexing in float64, values
    and gradients (torch.autograd.gradcheck), eager and traced by torch.compile (which writes the K-row sums
    another way); their backward runs gathers, not indexing's scatter-add into zeros (IndexBackward)."""
    from regretless.lora.experts import Routing

    T, E, H = 7, 4, 5
    g = torch.Generator().manual_seed(top_k)
    idx = torch.stack([torch.randperm(E + 1, generator=g)[:top_k] for _ in range(T)])  # E: an unrouted sentinel
    route = Routing(idx, E, "loop")
    to_slots, combine = route.to_slots, route.combine
    if compiled:
        torch._dynamo.reset()
        to_slots = torch.compile(route.to_slots, backend="aot_eager", fullgraph=True)
        combine = torch.compile(route.combine, backend="aot_eager", fullgraph=True)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    y = torch.randn(T * top_k, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, top_k, dtype=torch.float64, requires_grad=True)
    slots = to_slots(x)
    torch.testing.assert_close(slots, x[route.order_S // top_k], rtol=0, atol=0)
    unsorted = torch.empty_like(y)
    unsorted[route.order_S] = y  # row s of y belongs to slot order_S[s] = t·K + k
    kept = (idx < E).double()
    want = (unsorted.view(T, top_k, H) * (w * kept)[..., None]).sum(1)
    torch.testing.assert_close(combine(y, w), want)
    assert (idx == E).any()  # the sentinel is there: its rows must not count, whatever they hold
    y_nan = y.detach().clone()
    y_nan[~route.valid_S] = float("nan")
    torch.testing.assert_close(combine(y_nan, w), want)
    assert torch.autograd.gradcheck(to_slots, (x,))
    assert torch.autograd.gradcheck(combine, (y, w))
    if compiled:
        return
    for out in (route.to_slots(x), route.combine(y, w)):
        names, todo = set(), [out.grad_fn]
        while todo:
            f = todo.pop()
            names.add(type(f).__name__)
            todo += [n for n, _ in f.next_functions if n is not None]
        assert not any(n.startswith("Index") for n in names), names
