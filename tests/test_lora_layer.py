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


# ---- the frozen-base autograd function (the path of every real LoRA step) against float64 formulas


def _fn_case(dtype: torch.dtype, bias: bool, seed: int = 0):
    from regretless.lora.layer import _LoRALinearFn

    g = torch.Generator().manual_seed(seed)
    N, d_in, d_out, r, s = 11, 24, 20, 3, 2.5
    x, W = torch.randn(N, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, d_in, generator=g,
                                                                                 dtype=torch.float64) / 5
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    A, B = torch.randn(r, d_in, generator=g, dtype=torch.float64) / 5, torch.randn(d_out, r, generator=g,
                                                                                    dtype=torch.float64) / 2
    gy = torch.randn(N, d_out, generator=g, dtype=torch.float64)
    # the explicit formulas, in float64
    want = {"y": x @ W.T + (b if bias else 0) + s * (x @ A.T) @ B.T,
            "dx": gy @ W + s * (gy @ B) @ A,  # dL/dx = g·W + s·(g·B)·A
            "dA": s * (gy @ B).T @ x,  # dL/dA = s·(g·B)ᵀ·x
            "dB": s * gy.T @ (x @ A.T)}  # dL/dB = s·gᵀ·(x·Aᵀ)
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (x, A, B)]
    y = _LoRALinearFn.apply(leaves[0], W.to(dtype), None if b is None else b.to(dtype), leaves[1], leaves[2], s)
    y.backward(gy.to(dtype))
    got = {"y": y, "dx": leaves[0].grad, "dA": leaves[1].grad, "dB": leaves[2].grad}
    return got, want, (x, W, b, A, B, gy, s)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_lora_fn_forward_and_grads_against_float64(dtype, tol, bias):
    got, want, (x, W, b, A, B, gy, _) = _fn_case(dtype, bias)
    for k in want:
        assert got[k].dtype == dtype
        assert _rel(got[k], want[k]) <= tol, k
    # the test has the power to see a missing term: each one moves its result far beyond the tolerance
    altered = {"y": x @ W.T + (b if bias else 0), "dx": gy @ W, "dA": (gy @ B).T @ x, "dB": gy.T @ (x @ A.T)}
    for k, v in altered.items():
        assert _rel(v, want[k]) > 20 * tol, k


def test_lora_fn_no_gradient_for_the_frozen_base_and_only_what_is_asked():
    from regretless.lora.layer import _LoRALinearFn

    x = torch.randn(4, 6, requires_grad=True)
    W = torch.randn(5, 6, requires_grad=True)  # even if asked, W gets no gradient: it is frozen by contract
    A, B = torch.randn(2, 6), torch.randn(5, 2, requires_grad=True)
    _LoRALinearFn.apply(x, W, None, A, B, 1.5).sum().backward()
    assert W.grad is None and A.grad is None and x.grad is not None and B.grad is not None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_lora_linear_takes_the_fused_path_with_the_same_result(dtype, tol):
    """LoRALinear on a frozen base runs _LoRALinearFn, with the outputs and grads of the float64 formula."""
    _, want, (x, W, b, A, B, gy, s) = _fn_case(torch.float64, True, seed=3)
    base = nn.Linear(W.shape[1], W.shape[0]).to(dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(b)
    base.requires_grad_(False)
    lora = LoRALinear(base, rank=A.shape[0], scale=s)
    with torch.no_grad():
        lora.lora_A.copy_(A)
        lora.lora_B.copy_(B)
    xx = x.detach().to(dtype).requires_grad_(True)
    y = lora(xx.reshape(1, *xx.shape))[0]  # (1, N, d_in) -> the module reshapes to (N, d_in)
    fns, todo = set(), [y.grad_fn]
    while todo:
        f = todo.pop()
        fns.add(type(f).__name__)
        todo += [n for n, _ in f.next_functions if n is not None]
    assert "_LoRALinearFnBackward" in fns  # the fused autograd function ran
    y.backward(gy.to(dtype))
    assert _rel(y, want["y"]) <= tol and _rel(xx.grad, want["dx"]) <= tol
    assert _rel(lora.lora_A.grad, want["dA"]) <= tol and _rel(lora.lora_B.grad, want["dB"]) <= tol


def test_conv1d_base_fan_in_fan_out():
    """transformers' Conv1D stores W as (d_in, d_out): y = x·W + b + s·(x·Aᵀ)·Bᵀ; merge adds ΔWᵀ."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(7, 5)  # nf = d_out 7, nx = d_in 5; weight (5, 7)
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    lora = LoRALinear(base, rank=2, scale=3.0)
    assert (lora.in_features, lora.out_features) == (5, 7) and lora.lora_A.shape == (2, 5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 5)
    want = x @ base.weight + base.bias + 3.0 * (x @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora.weight, base.weight + 3.0 * (lora.lora_B @ lora.lora_A).T)
    lora.merge()
    torch.testing.assert_close(x @ base.weight + base.bias, want, atol=1e-5, rtol=1e-5)


def test_weight_read_directly_is_the_effective_weight():
    """Model code that reads `.weight` (Jamba: dt_proj.weight @ x) gets W + s·B·A, gradients included."""
    base = _linear(6, 4)
    lora = LoRALinear(base, rank=2, scale=2.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(6, 3)
    (lora.weight @ x).sum().backward()
    want_B = 2.0 * torch.ones(4, 3) @ (lora.lora_A @ x).T
    torch.testing.assert_close(lora.lora_B.grad, want_B)
    torch.testing.assert_close((lora.weight @ x).T, lora(x.T) - base.bias)
    lora.enabled = False
    assert lora.weight is base.weight
    assert lora.bias is base.bias


def test_lora_param_on_a_router_weight():
    """LoRAParam runs the wrapped module with W + s·B·A for one bare 2-D parameter (PEFT's router adapter)."""
    from regretless.lora import LoRAParam

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))
            self.top_k = 2

        def forward(self, x):
            return nn.functional.linear(x, self.weight).softmax(-1)

    r = Router()
    lora = LoRAParam(r, "weight", rank=2, scale=1.5)
    assert lora.top_k == 2  # the parent may read the router's attributes
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 6)
    want = nn.functional.linear(x, r.weight + 1.5 * lora.lora_B @ lora.lora_A).softmax(-1)
    torch.testing.assert_close(lora(x), want)
    w0 = r.weight.detach().clone()
    lora.merge()
    torch.testing.assert_close(r(x), want)
    lora.unmerge()
    assert torch.equal(r.weight, w0)
