"""CUDA paths (run on the device machine: `pytest -m gpu tests/test_gpu.py`)."""

from __future__ import annotations

import pytest
import torch

from regretless.lora import LoRAConfig, apply_lora, lora_modules

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _randomize_b(model):
    g = torch.Generator().manual_seed(1)
    for _, m in lora_modules(model):
        for n, p in m.named_parameters(recurse=False):
            if "lora_B" in n:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


@needs_cuda
def test_moe_lora_grouped_mm_matches_cpu_fp32():
    from conftest import build_model, tiny_qwen3_moe_config

    cfg = tiny_qwen3_moe_config(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    ref = build_model(cfg)
    apply_lora(ref, LoRAConfig(rank=16))
    _randomize_b(ref)
    gpu = build_model(cfg).to("cuda", torch.bfloat16)
    apply_lora(gpu, LoRAConfig(rank=16))
    gpu.load_state_dict(ref.state_dict())
    x = torch.randint(0, 512, (4, 64))
    want = ref(x).logits
    got = gpu(x.cuda()).logits.float().cpu()
    rel = (got - want).norm() / want.norm()
    assert rel < 5e-2  # bf16 weights and activations through a whole (tiny) model vs fp32
    # gradients reach the expert adapters through torch._grouped_mm
    gpu(x.cuda()).logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in gpu.named_parameters() if "lora_B_gate" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@needs_cuda
def test_sft_step_bf16_autocast_lowers_loss(tiny_llama_dir, tmp_path):
    import json

    from regretless.config import SFTConfig
    from regretless.train import run_sft

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(64)))
    s = run_sft(SFTConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "r"), steps=20,
                          batch_size=8, seq_len=32, lr=3e-3, lora=LoRAConfig(rank=4), eval_size=8, eval_every=10,
                          device="cuda"))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert s["status"] == "done" and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["peak_mem_mb"] > 0


@needs_cuda
@pytest.mark.parametrize("rank", [4, 16])
def test_grouped_linear_matches_loop_on_same_bf16_inputs(rank):
    from conftest import build_model, tiny_qwen3_moe_config

    from regretless.lora.experts import LoRAExperts

    cfg = tiny_qwen3_moe_config(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    model = build_model(cfg).to("cuda", torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=8, expert_rank=rank))
    _randomize_b(model)
    experts = next(m for _, m in lora_modules(model) if isinstance(m, LoRAExperts))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(16, device="cuda", generator=g)[:4] for _ in range(256)])
    w = torch.rand(256, 4, device="cuda", generator=g, dtype=torch.bfloat16)
    fast = experts(x, idx, w).float()
    ref = experts.float()(x.float(), idx, w.float())  # fp32: the per-expert loop path
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-2


@needs_cuda
def test_sft_with_compile_matches_eager_first_steps(tiny_llama_dir, tmp_path):
    import json

    from regretless.config import SFTConfig
    from regretless.train import run_sft

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(64)))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"r{int(compiled)}"
        run_sft(SFTConfig(model=str(tiny_llama_dir), data=str(data), out=str(out), steps=4, batch_size=8,
                          seq_len=32, lr=3e-3, lora=LoRAConfig(rank=4), eval_size=8, eval_every=2, device="cuda",
                          compile=compiled))
        runs[compiled] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[False], runs[True]):
        if "loss" in a:
            assert abs(a["loss"] - b["loss"]) < 5e-2 * abs(a["loss"])


@needs_cuda
def test_rl_loop_on_cuda_bf16(tiny_llama_dir, tmp_path):
    import json

    from regretless.config import RLConfig
    from regretless.rl.loop import run_rl

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(24)))
    (tmp_path / "rw.py").write_text("def has_e(completion, answer):\n    return float('e' in completion[:6])\n")
    s = run_rl(RLConfig(model=str(tiny_llama_dir), env=f"{data},reward={tmp_path / 'rw.py'}:has_e",
                        out=str(tmp_path / "r"), lora=LoRAConfig(rank=2), lr=2e-2, steps=3, problems_per_step=2,
                        group_size=4, max_new_tokens=6, eval_size=3, eval_every=2, train_size=16, device="cuda"))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert s["status"] == "done" and len([r for r in rows if "reward" in r]) == 3
    # bf16 sampling vs bf16-autocast learner: the importance ratio stays near 1
    assert all(abs(r["ratio_mean"] - 1) < 0.1 for r in rows if "ratio_mean" in r)


def _cuda_group(d_in=2048, outs=(2048, 512, 512), rank=64):
    from test_lora_fused import _grouped, _members

    ms = _members(d_in=d_in, outs=outs, ranks=(rank,) * len(outs), scales=(0.5,) * len(outs))
    for m in ms:
        m.to("cuda", torch.bfloat16)
        m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float() * 0.05  # fp32 adapters
    _grouped(ms)
    return ms


@needs_cuda
@pytest.mark.parametrize("outs", [(2048, 512, 512), (8192, 8192)])  # Llama-3.2-1B q/k/v and gate/up
def test_group_fusion_matches_own_path_cuda_bf16(outs):
    """The fused q/k/v (gate/up) node against each member's own path, both against float64: outputs, dx, dA, dB."""
    from test_lora_fused import _fused, _reference, _rel, _run

    ms = _cuda_group(outs=outs)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 2048, 2048, device="cuda", generator=g).to(torch.bfloat16)
    up = [torch.randn(2, 2048, m.out_features, device="cuda", generator=g, dtype=torch.float64) for m in ms]
    ref = _reference(ms, x, up)
    errs = {}
    for fused in (True, False):
        ys, dx, grads = _run(ms, x, fused, up)
        assert all(_fused(y) == fused for y in ys)
        errs[fused] = [_rel(y, w) for y, w in zip(ys, ref[0])] + [_rel(dx, ref[1])] + \
            [_rel(gr, w) for gs, ws in zip(grads, ref[2]) for gr, w in zip(gs, ws)]
    assert max(errs[True]) < 2e-2, errs[True]
    for e_fused, e_own in zip(errs[True], errs[False]):
        assert e_fused <= 1.5 * e_own + 1e-3


@needs_cuda
def test_dense_lora_paths_have_no_host_sync():
    """q/k/v group, its members' own paths and a lone LoRALinear: forward and backward never wait for the host."""
    ms = _cuda_group(d_in=256, outs=(256, 64, 64), rank=16)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for fused in (True, False):
        for m in ms:
            m.group_fusion = fused
        sum(m(x).float().sum() for m in ms).backward()  # warm-up (lazy init may sync once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ys = [m(x) for m in ms]
            sum(y.float().sum() for y in ys).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@needs_cuda
def test_llama_lora_step_fused_equals_unfused_cuda_bf16():
    """A whole (small) Llama under bf16 autocast: logits and every LoRA gradient with the group fusion on and off."""
    from conftest import build_model, tiny_llama_config

    model = build_model(tiny_llama_config(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                          num_key_value_heads=2, num_hidden_layers=2)).to("cuda", torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=16))
    for _, m in lora_modules(model):
        for p in m.parameters(recurse=False):
            p.data = p.data.float()
    _randomize_b(model)
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    out = {}
    for fused in (True, False):
        for _, m in lora_modules(model):
            m.group_fusion = fused
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        out[fused] = (logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
    assert ((out[True][0] - out[False][0]).norm() / out[False][0].norm()).item() < 1e-2
    assert out[True][1].keys() == out[False][1].keys() and out[True][1]
    for n, gr in out[True][1].items():
        want = out[False][1][n]
        assert ((gr - want).norm() / want.norm().clamp_min(1e-12)).item() < 3e-2, n


@needs_cuda
def test_expert_gate_up_fused_matches_separate_grouped_bf16():
    """The fused gate/up expert adapter pair through grouped_mm (bf16) against the two separate adapters."""
    from conftest import build_model, tiny_qwen3_moe_config

    from regretless.lora.experts import LoRAExperts, routing_mode

    cfg = tiny_qwen3_moe_config(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    model = build_model(cfg).to("cuda", torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=16, expert_rank=8))
    _randomize_b(model)
    experts = next(m for _, m in lora_modules(model) if isinstance(m, LoRAExperts))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(16, device="cuda", generator=g)[:4] for _ in range(256)])
    w = torch.rand(256, 4, device="cuda", generator=g, dtype=torch.bfloat16)
    assert routing_mode(x, experts._w_in_out("gate_up_proj")) == "grouped"
    res = {}
    for fused in (True, False):
        experts.fuse_gate_up = fused
        experts.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y = experts(xr, idx, w)
        y.float().pow(2).mean().backward()
        res[fused] = (y.float(), xr.grad.float(), {n: p.grad.float() for n, p in experts.named_parameters()
                                                   if p.grad is not None})
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert rel(res[True][0], res[False][0]) < 1e-2 and rel(res[True][1], res[False][1]) < 2e-2
    assert res[True][2].keys() == res[False][2].keys() and any("lora_B_up" in n for n in res[True][2])
    for n in res[True][2]:
        assert rel(res[True][2][n], res[False][2][n]) < 3e-2, n


def _fused_nll_vs_plain(device: str, N: int, H: int, V: int) -> dict:
    """(loss, dh, dW, bytes held from forward to backward) of lm.head_nll_sum with each softmax pass (`fused`: the
    Triton kernels, CUDA's default; `eager`; `compiled`) and of the plain chunked path (logits kept), all under
    bf16 autocast on bf16 h and a trainable fp32 W (FullFT's tied head)."""
    import torch.nn.functional as F

    from regretless import lm

    g = torch.Generator(device=device).manual_seed(0)
    h0 = torch.randn(N, H, device=device, generator=g).to(torch.bfloat16)
    W = (torch.randn(V, H, device=device, generator=g) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device=device, generator=g)

    def plain(h):
        out = []
        for s in range(0, N, lm.CHUNK):
            z = F.linear(h[s:s + lm.CHUNK], W).float()
            out.append(torch.logsumexp(z, -1) - z.gather(-1, y[s:s + lm.CHUNK, None])[:, 0])
        return torch.cat(out).sum()

    def softmax_by(triton: bool, compiled: bool):
        def run(h):
            old, lm.TRITON_SOFTMAX = lm.TRITON_SOFTMAX, triton
            try:
                return lm.head_nll_sum(h, W, None, y, compiled=compiled)
            finally:
                lm.TRITON_SOFTMAX = old
        return run

    res = {}
    # twice, the first time unmeasured: a process's first GEMMs allocate cuBLAS's workspaces through the caching
    # allocator (28 MiB on an H200), which would count as held by whichever path runs first
    for name, fn in 2 * (("fused", softmax_by(True, False)), ("plain", plain), ("eager", softmax_by(False, False)),
                         ("compiled", softmax_by(False, True))):
        W.grad = None
        h = h0.clone().requires_grad_()
        cuda = device == "cuda"
        before = torch.cuda.memory_allocated() if cuda else 0
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fn(h)
        held = torch.cuda.memory_allocated() - before if cuda else None
        (loss / N).backward()
        res[name] = (loss.item(), h.grad.float(), W.grad.clone(), held)
    return res


@needs_cuda
def test_fused_nll_matches_plain_chunks_and_keeps_no_logits_cuda_bf16():
    """lm.head_nll_sum on CUDA under bf16 autocast at the Llama-3.2-1B head's shape (V = 128,256, H = 2048), 8,192
    positions: the plain chunked path's loss and gradients, and what waits for backward is dh (N, H) and dW (V, H)
    in fp32 (1.1 GB), not the (N, V) fp32 logits (4.2 GB) the plain path keeps."""
    N, H, V = 8192, 2048, 128256
    torch.cuda.empty_cache()
    res = _fused_nll_vs_plain("cuda", N, H, V)
    (lf, dhf, dWf, held_f), (lp, dhp, dWp, held_p) = res["fused"], res["plain"]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert abs(lf - lp) <= 1e-4 * abs(lp)
    assert rel(dhf, dhp) < 1e-2 and rel(dWf, dWp) < 1e-2
    assert held_p >= N * V * 4
    assert held_f <= (N * H + V * H) * 4 + 4 * 2**20, held_f  # dh and dW in fp32; slack: the allocator rounds
    for other in ("eager", "compiled"):  # the other softmax passes (a cap, no Triton): same loss and gradients
        lc, dhc, dWc, held_c = res[other]
        assert abs(lc - lp) <= 1e-4 * abs(lp) and rel(dhc, dhp) < 1e-2 and rel(dWc, dWp) < 1e-2, other
        assert held_c <= (N * H + V * H) * 4 + 4 * 2**20, (other, held_c)


@needs_cuda
@pytest.mark.parametrize("dtype,C,V", [(torch.bfloat16, 37, 1000), (torch.bfloat16, 64, 128256),
                                       (torch.float32, 5, 4099), (torch.float16, 3, 7)])
def test_triton_softmax_nll_grad_matches_float64(dtype, C, V):
    """kernels.softmax_nll_grad (the fused head's softmax pass on CUDA) against float64 torch: the NLL sum and
    softmax − onehot, for V below, across and far above one block, one row shifted by +3000 and one row's
    target at the last column (exp range and the tail block); the gradient is written over the logits."""
    from regretless import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(C, V, device="cuda", generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (C,), device="cuda", generator=g)
    y[-1] = V - 1
    if dtype != torch.float16:
        z[0] += 3000.0
    zd = z.double()
    want_nll = (torch.logsumexp(zd, -1) - zd.gather(-1, y[:, None])[:, 0]).sum()
    want_g = torch.softmax(zd, -1) - torch.nn.functional.one_hot(y, V).double()
    buf = z.clone()
    got_nll, got_g = kernels.softmax_nll_grad(buf, y)
    assert got_g.data_ptr() == buf.data_ptr() and got_g.dtype == dtype and got_nll.dtype == torch.float32
    torch.testing.assert_close(got_nll.double(), want_nll, rtol=1e-5, atol=1e-3)
    tol = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (4e-3, 8e-3), torch.float16: (1e-3, 1e-3)}[dtype]
    torch.testing.assert_close(got_g.double(), want_g, atol=tol[0], rtol=tol[1])


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@needs_cuda
def test_autocast_experts_cuda_bf16_matches_fp32_reference_and_keeps_fp32_grads():
    """FullFT of a Qwen3-MoE under bf16 autocast on CUDA with `models.autocast_experts`: the loss and every
    gradient agree with the fp32 model within bf16 tolerance, the expert gradients stay fp32, and the expert
    GEMMs run in bf16 (the same loss as a copy whose 3-D expert weights are stored in bf16)."""
    import copy

    from conftest import build_model, tiny_qwen3_moe_config

    from regretless.models import autocast_experts

    cfg = tiny_qwen3_moe_config(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    ref = build_model(cfg).cuda().train()
    model = copy.deepcopy(ref)
    assert autocast_experts(model) == cfg.num_hidden_layers
    ids = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    loss_ref = ref(input_ids=ids, labels=ids, use_cache=False).loss
    loss_ref.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    bf = copy.deepcopy(ref)
    for m in bf.modules():
        for _, p in m.named_parameters(recurse=False):
            if p.dim() == 3:
                p.data = p.data.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        loss_bf = bf(input_ids=ids, labels=ids, use_cache=False).loss
    loss, loss_ref = loss.item(), loss_ref.item()
    assert abs(loss - float(loss_bf)) < 1e-3 * float(loss_bf)
    assert abs(loss - loss_ref) < 2e-2 * loss_ref
    grads_ref = dict(ref.named_parameters())
    n3 = 0
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        assert _rel(p.grad, grads_ref[n].grad) < 0.1, n
        n3 += p.dim() == 3
    assert n3 == 2 * cfg.num_hidden_layers


@needs_cuda
@pytest.mark.parametrize("moe", [True, False], ids=["qwen3-moe", "llama"])
def test_compile_blocks_inductor_matches_eager_on_moe_lora_cuda(moe):
    """`train.compile_blocks` with inductor on CUDA (the trainer's compile=true) on a Qwen3-MoE with routed-expert
    LoRA and on a dense Llama (the q/k/v and gate/up groups on concatenated weights, `SharedInputGroup.traced`):
    the loss and every adapter gradient as eager, within float32-kernel tolerance."""
    import copy

    from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

    from regretless import lm
    from regretless.train import compile_blocks

    config = tiny_qwen3_moe_config if moe else tiny_llama_config
    model = build_model(config(_attn_implementation="sdpa")).cuda()
    apply_lora(model, LoRAConfig(rank=4))
    _randomize_b(model)
    eager = copy.deepcopy(model)
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"input_ids": ids, "labels": ids.clone()}

    def run(m, compiled):
        m.train()
        s, n = lm.nll_sum(m, batch, compiled=compiled)
        (s / n).backward()
        return s.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}

    torch._dynamo.reset()
    try:
        assert compile_blocks(model, dynamic=False) == model.config.num_hidden_layers
        s1, g1 = run(model, True)
    finally:
        torch._dynamo.reset()
    s0, g0 = run(eager, False)
    assert abs(float(s1) - float(s0)) < 1e-3 * abs(float(s0))
    assert g1.keys() == g0.keys() and any("experts" in k for k in g0) == moe
    for k in g0:
        assert _rel(g1[k], g0[k]) < 1e-2, k


@needs_cuda
def test_merged_decoding_on_cuda_bf16_matches_the_adapter_path():
    """The RL sampler's decoding path on a GPU: W + s·B·A merged in bf16 gives the adapter path's logits to bf16
    rounding, with the base model's GEMM count (test_lora_decode_merge.py checks the same on CPU)."""
    from conftest import build_model, tiny_llama_config
    from test_lora_decode_merge import CountGemms

    from regretless.lora import adapters_disabled, merged_for_decoding

    model = build_model(tiny_llama_config(hidden_size=256, intermediate_size=512)).cuda()
    apply_lora(model, LoRAConfig(rank=8))
    _randomize_b(model)
    ids = torch.randint(3, 512, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with adapters_disabled(model), CountGemms() as base:
            model(input_ids=ids)
        ref = model(input_ids=ids).logits.float()
        with merged_for_decoding(model, low_precision_only=True):
            assert {m._decode_weight.dtype for _, m in lora_modules(model)} == {torch.bfloat16}
            with CountGemms() as merged:
                got = model(input_ids=ids).logits.float()
    assert merged.n == base.n
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
