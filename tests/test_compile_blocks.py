"""`train.compile_blocks` (the trainer's compile=true) on adapted models: every decoder block compiled, and the
loss and every adapter gradient the same as eager, for a dense Llama and a Qwen3-MoE with routed-expert LoRA
(CPU, the aot_eager backend: the traced graphs run, no C++ build)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

from regretless import distributed, lm
from regretless.lora import LoRAConfig, apply_lora, lora_modules
from regretless.train import compile_blocks


@pytest.mark.parametrize("fused", ["plain", "node"], ids=["plain-ops", "fused-node"])
@pytest.mark.parametrize("config", [tiny_llama_config, tiny_qwen3_moe_config], ids=["llama", "qwen3-moe"])
def test_compiled_blocks_match_eager_loss_and_adapter_gradients(config, fused, monkeypatch):
    """The two ways a dense adapter runs in a compiled block: plain ops, or its own fused autograd node
    (`LoRALinear.fused_when_compiled`), traced by dynamo."""
    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    model = build_model(config(_attn_implementation="sdpa"))
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets="all"))
    for _, m in lora_modules(model):
        if hasattr(m, "fused_when_compiled"):
            m.fused_when_compiled = fused == "node"
    gen = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B = 0 at init would leave A's gradient zero: give B values so every term counts
            p.data.normal_(0, 0.1, generator=gen)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}

    def run(m, compiled):
        m.train()
        m.zero_grad(set_to_none=True)
        s, n = lm.nll_sum(m, batch, compiled=compiled)
        (s / n).backward()
        return s.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}

    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    try:
        n_blocks = compile_blocks(model, backend="aot_eager", dynamic=False)
        assert n_blocks == len(distributed.decoder_blocks(model)) == model.config.num_hidden_layers
        s1, g1 = run(model, True)
    finally:
        torch._dynamo.reset()
    s0, g0 = run(eager, False)
    assert torch.allclose(s1, s0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys() and any("experts" in k for k in g0) == (config is tiny_qwen3_moe_config)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
