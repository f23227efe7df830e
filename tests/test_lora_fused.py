"""Shared-input group fusion of dense LoRA (q/k/v, gate/up: one A projection for all members): the same outputs and
gradients as each member's own path and as a float64 formula, on single layers and whole tiny models; fallbacks
(another input, disabled member, no_grad mismatch) and what gets grouped."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config
from torch import nn

from regretless.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, lora_parameters
from regretless.lora.layer import SharedInputGroup


def _members(d_in=24, outs=(24, 8, 8), ranks=(4, 2, 4), scales=(8.0, 16.0, 8.0), bias=True, seed=0):
    torch.manual_seed(seed)
    ms = []
    for d_out, r, s in zip(outs, ranks, scales):
        m = LoRALinear(nn.Linear(d_in, d_out, bias=bias), rank=r, scale=s)
        m.base_layer.requires_grad_(False)
        with torch.no_grad():
            m.lora_B.normal_()
        ms.append(m)
    return ms


def _run(ms, x, fused: bool, upstream):
    """Outputs and gradients (x, every A and B) of sum(<y_i, upstream_i>)."""
    for m in ms:
        m.group_fusion = fused
        m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    ys = [m(x) for m in ms]
    sum((y.double() * u).sum() for y, u in zip(ys, upstream)).backward()
    return ys, x.grad, [(m.lora_A.grad, m.lora_B.grad) for m in ms]


def _reference(ms, x, upstream):
    """float64 formula: y_i = x·W_iᵀ + b_i + s_i·x·A_iᵀ·B_iᵀ and its gradients by hand."""
    x = x.double()
    ys, dx, grads = [], torch.zeros_like(x), []
    for m, u in zip(ms, upstream):
        W, A, B, s = m.base_layer.weight.double(), m.lora_A.double(), m.lora_B.double(), m.scale
        b = m.base_layer.bias.double() if m.base_layer.bias is not None else 0.0
        ys.append(x @ W.T + b + s * (x @ A.T) @ B.T)
        u2, x2 = u.reshape(-1, u.shape[-1]), x.reshape(-1, x.shape[-1])
        dx += (u @ W + s * (u @ B) @ A)
        grads.append((s * (u2 @ B).T @ x2, s * u2.T @ (x2 @ A.T)))
    return ys, dx, grads


def _grouped(ms):
    g = SharedInputGroup(ms)
    for m in ms:
        m._group = g
    return g


def _fused(y: torch.Tensor) -> bool:
    """Whether y came out of the group's fused node (through at most one view/reshape)."""
    fn = y.grad_fn
    for _ in range(2):
        if fn is None:
            return False
        if "LoRAGroupFn" in type(fn).__name__:
            return True
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("scales", [(8.0, 16.0, 8.0), (4.0, 4.0, 4.0)])  # per-member and shared-scale code paths
def test_group_matches_formula_and_own_paths_fp32(scales):
    ms = _members(scales=scales)
    _grouped(ms)
    torch.manual_seed(5)
    x = torch.randn(3, 5, 24)
    up = [torch.randn(3, 5, m.out_features, dtype=torch.float64) for m in ms]
    fused = _run(ms, x, True, up)
    own = _run(ms, x, False, up)
    ref = _reference(ms, x, up)
    for got in (fused, own):
        for y, w in zip(got[0], ref[0]):
            torch.testing.assert_close(y.double(), w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1].double(), ref[1], atol=1e-5, rtol=1e-5)
        for (dA, dB), (wA, wB) in zip(got[2], ref[2]):
            torch.testing.assert_close(dA.double(), wA, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(dB.double(), wB, atol=1e-4, rtol=1e-5)
    # the fused node really ran, for all three members
    assert all(_fused(y) for y in fused[0])
    assert not any(_fused(y) for y in own[0])


def test_group_bf16_autocast_error_no_larger_than_own_path():
    ms = _members(d_in=64, outs=(64, 16, 16), ranks=(8, 8, 8), scales=(4.0, 4.0, 4.0))
    _grouped(ms)
    torch.manual_seed(6)
    x = torch.randn(4, 32, 64)
    up = [torch.randn(4, 32, m.out_features, dtype=torch.float64) for m in ms]
    ref = _reference(ms, x, up)
    errs = {}
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys, dx, grads = _run(ms, x, fused, up)
        assert all(y.dtype == torch.bfloat16 for y in ys)
        errs[fused] = [_rel(y, w) for y, w in zip(ys, ref[0])] + [_rel(dx, ref[1])] + \
            [_rel(g, w) for gs, ws in zip(grads, ref[2]) for g, w in zip(gs, ws)]
    assert max(errs[True]) < 2e-2
    for e_fused, e_own in zip(errs[True], errs[False]):
        assert e_fused <= 1.5 * e_own + 1e-3


def test_unused_member_output_and_partial_calls():
    ms = _members()
    _grouped(ms)
    x = torch.randn(6, 24, requires_grad=True)
    y0, y1 = ms[0](x), ms[1](x)  # v never called: its output is left unused
    (y0.sum() + 2 * y1.sum()).backward()
    assert ms[2].lora_B.grad is None or torch.count_nonzero(ms[2].lora_B.grad) == 0
    ref = _reference(ms, x.detach(), [torch.ones(6, 24, dtype=torch.float64), 2 * torch.ones(6, 8, dtype=torch.float64),
                                      torch.zeros(6, 8, dtype=torch.float64)])
    torch.testing.assert_close(x.grad.double(), ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ms[0].lora_A.grad.double(), ref[2][0][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ms[2].lora_A.grad.double(), ref[2][2][0], atol=1e-4, rtol=1e-5)  # zero


def test_fallbacks_give_each_members_own_output():
    ms = _members()
    g = _grouped(ms)
    x, x2 = torch.randn(4, 24), torch.randn(4, 24)
    for m in ms:
        m.group_fusion = False
    want = [m(x) for m in ms]
    want2 = [m(x2) for m in ms]
    for m in ms:
        m.group_fusion = True
    # another input for k and v: the pending outputs (for x) are not handed out
    got = [ms[0](x), ms[1](x2), ms[2](x2)]
    for y, w in zip(got, [want[0], want2[1], want2[2]]):
        torch.testing.assert_close(y, w, atol=1e-5, rtol=1e-5)
    # grad mode changed between members: recomputed
    y0 = ms[0](x)
    with torch.no_grad():
        y1 = ms[1](x)
    assert y0.requires_grad and not y1.requires_grad
    torch.testing.assert_close(y1, want[1], atol=1e-5, rtol=1e-5)
    # a disabled member: the group is not used, the disabled one is its base layer
    ms[1].enabled = False
    got = [m(x) for m in ms]
    assert not _fused(got[0])
    torch.testing.assert_close(got[1], ms[1].base_layer(x))
    ms[1].enabled = True
    # a trained base weight: own paths (the group's node treats W as frozen)
    ms[0].base_layer.weight.requires_grad_(True)
    assert not _fused(ms[0](x))
    assert g._pending == {}


def test_groups_formed_on_llama_and_moe():
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=4))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj._group is attn.k_proj._group is attn.v_proj._group is not None
    assert attn.o_proj._group is None and mlp.down_proj._group is None
    assert mlp.gate_proj._group is mlp.up_proj._group is not None
    moe = build_model(tiny_qwen3_moe_config())
    apply_lora(moe, LoRAConfig(rank=4, expert_rank=2))
    a = moe.model.layers[0].self_attn
    assert a.q_proj._group is a.v_proj._group is not None
    # only some siblings adapted: they still group; a lone one does not
    m2 = build_model(tiny_llama_config())
    apply_lora(m2, LoRAConfig(rank=4, targets="q_proj,v_proj,up_proj"))
    a2 = m2.model.layers[0].self_attn
    assert a2.q_proj._group is a2.v_proj._group is not None and m2.model.layers[0].mlp.up_proj._group is None


def _model_grads(model, ids, fused: bool, ckpt: bool = False):
    for _, m in lora_modules(model):
        m.group_fusion = fused
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, use_cache=False).logits
    out.double().pow(2).mean().backward()
    return out.detach(), emb.grad, {n: p.grad.clone() for n, p in lora_parameters(model)}


@pytest.mark.parametrize("ckpt", [False, True])
def test_whole_model_fused_equals_unfused_fp32(ckpt):
    model = build_model(tiny_llama_config(num_hidden_layers=2))
    apply_lora(model, LoRAConfig(rank=4))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.1)
    if ckpt:
        from regretless.train import enable_checkpointing

        enable_checkpointing(model)
    model.train()
    ids = torch.randint(0, 512, (2, 12))
    a = _model_grads(model, ids, True)
    b = _model_grads(model, ids, False)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-4)
    assert a[2].keys() == b[2].keys() and len(a[2]) == 2 * 7 * 2
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], atol=1e-6, rtol=1e-4, msg=n)


def _experts_grads(model, ids, fused: bool):
    from regretless.lora import LoRAExperts

    for _, m in lora_modules(model):
        if isinstance(m, LoRAExperts):
            m.fuse_gate_up = fused
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, use_cache=False).logits
    out.double().pow(2).mean().backward()
    return out.detach(), emb.grad, {n: p.grad.clone() for n, p in lora_parameters(model) if "experts" in n}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gate | up concatenated; gate/up interleaved
def test_expert_gate_up_fused_equals_separate(family):
    """The expert gate and up adapters as one block pair (x·[A_g; A_u]ᵀ, block-diagonal B in the layout's column
    order) give the outputs and gradients of the two separate adapters; different gate and up ranks and scales."""
    from test_lora_experts import tiny_gpt_oss_config

    cfg = tiny_qwen3_moe_config() if family == "qwen3_moe" else tiny_gpt_oss_config()
    model = build_model(cfg)
    apply_lora(model, LoRAConfig(rank=4, expert_rank=2))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if hasattr(m, "scales") and "gate" in getattr(m, "scales", {}):
                m.scales["up"] = 3.0  # unequal scales: each block keeps its own
            for n, p in m.named_parameters(recurse=False):
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    experts = [m for _, m in lora_modules(model) if hasattr(m, "fuse_gate_up")]
    assert experts and all(set(m.specs) >= {"gate", "up"} for m in experts)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    a = _experts_grads(model, ids, True)
    b = _experts_grads(model, ids, False)
    tol = {"atol": 1e-6, "rtol": 1e-4}
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    assert a[2].keys() == b[2].keys() and any("lora_B_up" in n for n in a[2])
    for n in a[2]:
        assert torch.count_nonzero(a[2][n]) > 0, n
        torch.testing.assert_close(a[2][n], b[2][n], **tol, msg=n)


@pytest.mark.parametrize("shapes", [((9, 4), (2, 3)), ((5, 4, 3), (1, 2, 1))], ids=["two", "three"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("bias", [True, False])
def test_base_and_up_matches_the_formula_and_gradcheck(bias, x_grad, shapes):
    """`base_and_up` (the compiled path's [x | s·x·Aᵀ]·[W | blockdiag(B_1, ..., B_n)]ᵀ, one GEMM over K = d_in + Σ r)
    against the plain float64 formula x·Wᵀ + b + Σ_i s_i·(x·A_iᵀ)·B_iᵀ of two or three members with their own
    scales; and torch.autograd.gradcheck of x, A and every B through its own backward (W and b frozen), also with
    x frozen (the first block's input: its backward computes no dx)."""
    from regretless.lora.layer import base_and_up

    g = torch.Generator().manual_seed(0)
    N, d_in, (ds, rs) = 7, 6, shapes
    x = torch.randn(2, N, d_in, dtype=torch.float64, generator=g, requires_grad=x_grad)
    A = torch.randn(sum(rs), d_in, dtype=torch.float64, generator=g, requires_grad=True)
    Bs = [torch.randn(d, r, dtype=torch.float64, generator=g, requires_grad=True) for d, r in zip(ds, rs)]
    W = torch.randn(sum(ds), d_in, dtype=torch.float64, generator=g)
    b = torch.randn(sum(ds), dtype=torch.float64, generator=g) if bias else None
    scales = [8.0, 16.0, 4.0][:len(rs)]
    s = torch.tensor([sc for sc, r in zip(scales, rs) for _ in range(r)], dtype=torch.float64)
    got = torch.cat(base_and_up(x, A, Bs, s, W, b), -1)
    xa, o, terms = x @ A.T, 0, []
    for sc, r, B in zip(scales, rs, Bs):
        terms.append(sc * xa[..., o:o + r] @ B.T)
        o += r
    want = x @ W.T + (0 if b is None else b) + torch.cat(terms, -1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x_, A_, *B_: tuple(base_and_up(x_, A_, list(B_), s, W, b)), (x, A, *Bs))
