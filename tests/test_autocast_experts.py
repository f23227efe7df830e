"""`models.autocast_experts` (FullFT under autocast): transformers' fused MoE experts run their 3-D weights in
the autocast dtype instead of casting the routed tokens up to the fp32 master weights' dtype; gradients reach
the fp32 weights; without autocast nothing changes; a deep copy (RL's frozen reference) runs its own weights."""

from __future__ import annotations

import copy

import torch
from conftest import build_model, tiny_qwen3_moe_config

from regretless.models import autocast_experts


def _experts(model):
    return [m for m in model.modules() if getattr(m, "_amp_expert_params", None)]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def test_experts_compute_in_bf16_under_autocast_and_grads_reach_fp32_weights():
    model = build_model(tiny_qwen3_moe_config()).train()
    ref = copy.deepcopy(model)
    assert autocast_experts(model) == model.config.num_hidden_layers
    seen = []
    for m in _experts(model):
        m.register_forward_hook(lambda mod, args, out: seen.append(mod.gate_up_proj.dtype))
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, ids)
    loss.backward()
    assert seen.count(torch.bfloat16) == len(_experts(model))  # each layer's inner call ran the cast weights
    # the same math as the expert weights stored in bf16 (what transformers' bf16 FullFT computes)
    bf = copy.deepcopy(ref)
    for m in bf.modules():
        for n, p in list(m.named_parameters(recurse=False)):
            if p.dim() == 3:
                p.data = p.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf = _loss(bf, ids)
        loss_fp32_experts = _loss(ref, ids)  # unchanged experts: fp32 grouped GEMMs
    assert torch.allclose(loss, loss_bf, rtol=1e-3) and not torch.equal(loss.detach(), loss_fp32_experts.detach())
    for m in _experts(model):
        for n in m._amp_expert_params:
            g = getattr(m, n).grad
            assert getattr(m, n).dtype == torch.float32 and g is not None and g.dtype == torch.float32
            assert float(g.abs().sum()) > 0


def test_without_autocast_the_forward_is_unchanged_and_a_deep_copy_uses_its_own_weights():
    model = build_model(tiny_qwen3_moe_config()).eval()
    ref = copy.deepcopy(model)
    autocast_experts(model)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        twin = copy.deepcopy(model)
        for m in _experts(twin):
            m.gate_up_proj.data.zero_()  # changing the copy's experts must not change the original's output
        out, out_twin = model(input_ids=ids).logits, twin(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_out, amp_twin = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.equal(out, ref(input_ids=ids).logits) and not torch.equal(out, out_twin)
    assert not torch.equal(amp_out, amp_twin)
