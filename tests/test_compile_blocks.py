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


@pytest.mark.parametrize(("config", "fused"), [(tiny_llama_config, "group"), (tiny_llama_config, "plain"),
                                               (tiny_llama_config, "node"), (tiny_qwen3_moe_config, "group")],
                         ids=["llama-group-ops", "llama-plain-ops", "llama-fused-node", "qwen3-moe-group-ops"])
def test_compiled_blocks_match_eager_loss_and_adapter_gradients(config, fused, monkeypatch):
    """The ways a dense adapter runs in a compiled block: the q/k/v and gate/up groups and o_proj with the LoRA
    up-projection inside the base GEMM (`SharedInputGroup.traced`, `base_and_up`: the default), each adapter's
    own plain ops (group fusion and up_in_base_gemm off), or its own fused autograd node
    (`LoRALinear.fused_when_compiled`), traced by dynamo. The routed experts of Qwen3-MoE run the same in all
    three, so it runs with the default."""
    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    model = build_model(config(_attn_implementation="sdpa"))
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets="all"))
    for _, m in lora_modules(model):
        if hasattr(m, "fused_when_compiled"):
            m.fused_when_compiled = fused == "node"
            m.group_fusion = m.up_in_base_gemm = fused != "plain"
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


def _traced_gemms(model, batch) -> list[tuple[int, int]]:
    """(forward, backward) matmul (mm, addmm) counts of each compiled block graph, as inductor's partitioner
    leaves them."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs: dict[str, list[int]] = {"fw": [], "bw": []}

    def record(kind):
        def compiler(gm, _inputs):
            graphs[kind].append(sum(
                (n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default))
                + (len(n.args[0]) if n.target == torch.ops.regretless.gemm_sum.default else 0)  # Σ of GEMMs
                for n in gm.graph.nodes if n.op == "call_function"))
            return gm.forward
        return compiler

    backend = aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    try:
        compile_blocks(model, backend=backend, dynamic=False)
        s, _n = lm.nll_sum(model, batch)
        s.backward()
    finally:
        torch._dynamo.reset()
    return list(zip(graphs["fw"], graphs["bw"]))


def test_compiled_group_runs_one_gemm_per_group_each_way():
    """Under torch.compile the q/k/v and gate/up groups, and o_proj (d_in <= d_out), run their LoRA up-projection
    inside the base GEMM ([x | s·x·Aᵀ]·[W | B]ᵀ): per Llama block, forward 2 GEMMs (A, base) for each of the two
    groups and o_proj, 3 (base, A, B) for down_proj: 9, where each adapter alone in plain ops runs 7·3 = 21;
    backward (a block whose input needs a gradient) one [dx | du] GEMM and one dB per group member (accumulating
    into one buffer), dA and the LoRA dx once per group (q/k/v 8, gate/up 6), o_proj and down_proj 5 each (dx,
    g·B, dA, dB, LoRA dx): 24, where alone 7·5 = 35 (and their sum of n input gradients)."""
    base = build_model(tiny_llama_config(_attn_implementation="sdpa"))
    apply_lora(base, LoRAConfig(rank=4, alpha=32, targets="all"))
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    counts = {}
    for grouped in (True, False):
        model = copy.deepcopy(base)
        for _, m in lora_modules(model):
            if hasattr(m, "group_fusion"):
                m.group_fusion = m.up_in_base_gemm = grouped
        counts[grouped] = _traced_gemms(model, batch)
    assert counts[False] and all(fw == 21 for fw, _ in counts[False]) and max(bw for _, bw in counts[False]) == 35
    assert counts[True] and all(fw == 9 for fw, _ in counts[True]) and max(bw for _, bw in counts[True]) == 24


def test_compiled_blocks_run_without_grad_as_eager():
    """An eval pass (no_grad, bf16 autocast as the trainer's) through compiled adapted blocks, after a training
    step traced them with grad: no graph break, the loss as eager's. (Without grad the compiled groups skip their
    autograd Function, whose *args forward dynamo binds shifted by one under no_grad: ctx gets x.)"""
    from torch._dynamo.utils import counters

    model = build_model(tiny_llama_config(_attn_implementation="sdpa"))
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets="all"))
    ids = torch.randint(3, 512, (4, 23), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    eager = copy.deepcopy(model)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_blocks(model, backend="aot_eager", dynamic=False)
        with bf16:
            lm.nll_sum(model, batch)[0].backward()
            with torch.no_grad():
                got = lm.nll_sum(model, batch)[0]
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert not breaks, breaks
    with bf16, torch.no_grad():
        want = lm.nll_sum(eager, batch)[0]
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
