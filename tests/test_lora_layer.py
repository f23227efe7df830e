"""Dense LoRA (LoRALinear): the paper's W' = W + s·B·A, its init, scale, merge and LoRA+ parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model, tiny_llama_config
from torch import nn

from regretless.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, param_groups


def _linear(d_in: int, d_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def test_hand_placed_delta():
    # W = 0, b = 0, A = [[1, 0, 0]], B = [[0], [3]], alpha = 2, r = 1 -> s = 2, ΔW = s·B·A = [[0,0,0],[6,0,0]]
    base = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(base.weight)
    lora = LoRALinear(base, rank=1, scale=LoRAConfig(rank=1, alpha=2).scale(1))
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        lora.lora_B.copy_(torch.tensor([[0.0], [3.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 5.0, 7.0]])
    assert torch.equal(lora(x), torch.tensor([[0.0, 6.0], [0.0, -12.0]]))
    assert torch.equal(lora.delta_weight(), torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]]))


def test_output_equals_formula():
    base = _linear(12, 7)
    lora = LoRALinear(base, rank=3, scale=32 / 3)
    torch.manual_seed(1)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(2, 5, 12)  # (B, T, d_in)
    W, b, A, B = base.weight, base.bias, lora.lora_A, lora.lora_B
    want = x @ (W + (32 / 3) * B @ A).T + b  # x·(W + s·B·A)ᵀ + b
    torch.testing.assert_close(lora(x), want, atol=1e-5, rtol=1e-5)


def test_zero_B_gives_base_output_exactly():
    base = _linear(16, 8)
    lora = LoRALinear(base, rank=4, scale=8.0)
    assert torch.count_nonzero(lora.lora_A) > 0 and torch.count_nonzero(lora.lora_B) == 0
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))


def test_gradients_match_hand_formula():
    base = _linear(6, 5)
    s = 4.0
    lora = LoRALinear(base, rank=2, scale=s)
    torch.manual_seed(3)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 6)
    g = torch.randn(4, 5)  # upstream gradient dL/dy
    (lora(x) * g).sum().backward()
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    torch.testing.assert_close(lora.lora_B.grad, s * g.T @ (x @ A.T))  # dL/dB = s·gᵀ·(x·Aᵀ)
    torch.testing.assert_close(lora.lora_A.grad, s * (g @ B).T @ x)  # dL/dA = s·(g·B)ᵀ·x


def test_merge_equals_unmerged_and_unmerge_is_bit_exact():
    base = _linear(16, 8)
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, rank=4, scale=8.0)
    torch.manual_seed(2)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 16)
    y = lora(x)
    lora.merge()
    assert lora.merged and not torch.equal(base.weight, w0)
    torch.testing.assert_close(lora(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight, w0 + 8.0 * lora.lora_B @ lora.lora_A)
    lora.merge()  # idempotent: a second merge must not add ΔW twice
    torch.testing.assert_close(lora(x), y, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    assert not lora.merged and torch.equal(base.weight, w0)
    assert torch.equal(lora(x), y)


def test_bf16_base_keeps_fp32_adapter():
    base = _linear(16, 8).to(torch.bfloat16)
    lora = LoRALinear(base, rank=4, scale=8.0)
    assert lora.lora_A.dtype == torch.float32 and lora.lora_B.dtype == torch.float32
    y = lora(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_scale_default_and_rslora():
    assert LoRAConfig(rank=16).scale(16) == 2.0  # alpha/r with the paper's alpha = 32
    assert LoRAConfig(rank=16, rslora=True).scale(16) == 8.0  # alpha/sqrt(r)
    assert LoRAConfig(rank=1, alpha=32).scale(1) == 32.0
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=4, rslora=True))
    scales = {m.scale for _, m in lora_modules(model)}
    assert scales == {16.0}


def test_lora_plus_param_groups():
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=4, lr_b_mult=16))
    groups = param_groups(model, lr=1e-3, lr_b_mult=16, weight_decay=0.1)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"lora_A", "lora_B"}
    assert by["lora_A"]["lr"] == 1e-3 and by["lora_B"]["lr"] == pytest.approx(1.6e-2)
    assert all(g["weight_decay"] == 0.1 for g in groups)
    mods = [m for _, m in lora_modules(model)]
    assert {id(p) for p in by["lora_A"]["params"]} == {id(m.lora_A) for m in mods}
    assert {id(p) for p in by["lora_B"]["params"]} == {id(m.lora_B) for m in mods}
    # FullFT (no adapters): one group with every trainable parameter
    full = build_model(tiny_llama_config())
    (g,) = param_groups(full, lr=5e-5)
    assert len(g["params"]) == len(list(full.parameters())) and g["lr"] == 5e-5


def test_A_init_matches_peft():
    """A ~ U(±1/√d_in) (kaiming_uniform_, a=√5), B = 0: the same distribution PEFT's default init gives."""
    from peft import LoraConfig, get_peft_model

    d_in, d_out, r = 256, 128, 64
    bound = 1 / math.sqrt(d_in)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    peft_model = get_peft_model(Net(), LoraConfig(r=r, target_modules=["proj"]))
    peft_A = peft_model.base_model.model.proj.lora_A["default"].weight.detach()
    peft_B = peft_model.base_model.model.proj.lora_B["default"].weight.detach()
    torch.manual_seed(0)
    ours = LoRALinear(nn.Linear(d_in, d_out), rank=r, scale=0.5)
    A = ours.lora_A.detach()
    assert A.shape == peft_A.shape == (r, d_in)
    assert torch.count_nonzero(ours.lora_B) == 0 and torch.count_nonzero(peft_B) == 0
    for a in (A, peft_A):
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.99 * bound  # 16k samples of a uniform reach its edge
        assert abs(a.mean().item()) < 0.02 * bound
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    # same distribution: quantiles agree
    q = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(torch.quantile(A.flatten(), q), torch.quantile(peft_A.flatten(), q),
                               atol=0.03 * bound, rtol=0)
