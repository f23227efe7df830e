"""CUDA checks of the MoE LoRA routed path (run on the device machine: `pytest -m gpu tests/test_lora_gpu.py`):
no host sync in forward and backward (CUDA's sync debug mode turned to errors), and torch.compile(fullgraph=True)
of an adapted MoE block with inductor, matching eager."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_qwen3_moe_config

from regretless.lora import LoRAConfig, apply_lora, lora_parameters

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _moe_block():
    cfg = tiny_qwen3_moe_config(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    model = build_model(cfg).to("cuda", torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=16))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.model.layers[0].mlp


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@needs_cuda
def test_routed_path_has_no_host_sync():
    from regretless.lora.experts import routing_mode

    moe = _moe_block()
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = moe.experts._w_in_out("gate_up_proj")
    assert routing_mode(x.reshape(-1, 64), w) == "grouped"
    _out(moe(x)).float().sum().backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = _out(moe.experts(x.reshape(-1, 64), *_routing(moe, x)))
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(p.grad is not None for _, p in lora_parameters(moe))


def _routing(moe, x):
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(-1, 64), moe.gate.weight)
        w, idx = logits.softmax(-1).topk(4, dim=-1)
    return idx, w


@needs_cuda
def test_compiled_fullgraph_moe_block_matches_eager():
    moe = _moe_block()
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    want = _out(moe(x))
    want.float().pow(2).mean().backward()
    want_g = {n: p.grad.clone() for n, p in lora_parameters(moe)}
    moe.zero_grad()
    compiled = torch.compile(moe, fullgraph=True)
    got = _out(compiled(x))
    got.float().pow(2).mean().backward()
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2
    for n, p in lora_parameters(moe):
        rel = ((p.grad.float() - want_g[n].float()).norm() / want_g[n].float().norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, n
