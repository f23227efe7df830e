"""Dense LoRA: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with s = α/r (or α/√r for rsLoRA).

`LoRALinear` holds the original `nn.Linear` (or transformers' `Conv1D`, whose weight is stored (d_in, d_out):
PEFT's fan_in_fan_out) as `base_layer`, so weights load and save unchanged, and two trainable matrices: A (r, d_in)
initialised like PEFT (kaiming-uniform with a=√5, i.e. U(±1/√d_in)) and B (d_out, r) = 0, so training starts
exactly at the base model. As in the paper, A and B share one learning rate unless LoRA+ (`lr_b_mult`) is asked
for. No dropout: the paper uses none.

`LoRAParam` adapts one bare 2-D weight of a module that is not a Linear (a MoE router such as Qwen3-MoE's
`mlp.gate.weight`) by calling the module with W + s·B·A. It exists for adapters that PEFT saved with
`target_parameters=[..."gate.weight"]`; regretless's presets leave routers alone, as the paper does.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _LoRALinearFn(torch.autograd.Function):
    """y = x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ with the LoRA term accumulated inside the second GEMM (addmm), and the
    backward dx = g·W + s·(g·B)·A likewise: no separate element-wise passes over (N, d_out) or (N, d_in).
    W is frozen (no weight gradient: the 2/3-of-FullFT FLOP count). All inputs share one dtype."""

    @staticmethod
    def forward(ctx, x_N_in, W, bias, A, B, scale: float):
        xa_N_r = x_N_in @ A.T
        y = torch.addmm(bias, x_N_in, W.T) if bias is not None else x_N_in @ W.T
        y = torch.addmm(y, xa_N_r, B.T, alpha=scale)
        ctx.save_for_backward(x_N_in, W, A, B, xa_N_r)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g_N_out):
        x, W, A, B, xa = ctx.saved_tensors
        s = ctx.scale
        gb_N_r = g_N_out @ B
        dx = torch.addmm(g_N_out @ W, gb_N_r, A, alpha=s) if ctx.needs_input_grad[0] else None
        dA = (gb_N_r.T @ x).mul_(s) if ctx.needs_input_grad[3] else None
        dB = (g_N_out.T @ xa).mul_(s) if ctx.needs_input_grad[4] else None
        return dx, None, None, dA, dB, None


def init_lora_A(A: torch.Tensor) -> None:
    """PEFT's default: kaiming_uniform_(a=√5) on a (r, d_in) matrix = U(-1/√d_in, 1/√d_in)."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a linear layer whose weight is stored (d_in, d_out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, rank: int, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scale = scale
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D: weight (d_in, d_out)
        w = base_layer.weight
        d_out, d_in = w.shape[::-1] if self.fan_in_fan_out else w.shape
        # adapter weights stay fp32 (they are the trained master copy) whatever the base dtype
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=w.device, dtype=torch.float32))
        if w.device.type != "meta":
            init_lora_A(self.lora_A.data)
        self.enabled = True
        self.merged = False
        self.tied_to: str | None = None  # set when the base weight is shared with another module (merge unties)
        self._backup: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """What model code that reads `.weight` directly gets: W + s·B·A while the adapter is active (e.g. Jamba's
        `dt_proj.weight @ x`, or the out_proj weight the fused Mamba-2 kernel takes), so the adapter is never
        bypassed; the base weight when disabled or merged. The forward never builds it."""
        w = self.base_layer.weight
        if not self.enabled or self.merged:
            return w
        d = self.scale * (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype))  # (d_out, d_in)
        return w + (d.T if self.fan_in_fan_out else d)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str):  # other attributes of the wrapped layer (nx, nf, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer",) or name.startswith("lora_"):
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        if self.merged and not self.enabled:
            raise RuntimeError("LoRA disabled on a merged layer: its weight holds W + ΔW; unmerge it first "
                               "(adapters_disabled does)")
        if not self.enabled or self.merged:
            return self.base_layer(x)  # (..., d_out)
        dev = x.device.type
        W, bias = self.base_layer.weight, self.base_layer.bias
        if self.fan_in_fan_out:
            W = W.T  # (d_out, d_in) view
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype
        if (W.requires_grad or (bias is not None and bias.requires_grad)  # base also trained
                or torch.compiler.is_compiling()):  # let inductor fuse the plain ops into its own kernels
            h = x.to(dt)
            return self.base_layer(x) + (self.scale * (h @ self.lora_A.to(dt).T) @ self.lora_B.to(dt).T)
        with torch.autocast(dev, enabled=False):
            y = _LoRALinearFn.apply(x.reshape(-1, x.shape[-1]).to(dt), W.to(dt),
                                    None if bias is None else bias.to(dt), self.lora_A.to(dt),
                                    self.lora_B.to(dt), self.scale)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's own layout: (d_out, d_in), or (d_in, d_out) for Conv1D."""
        d = self.scale * (self.lora_B.float() @ self.lora_A.float())  # (d_out, d_in)
        return d.T if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.tied_to is not None:
            raise RuntimeError(f"the base weight is shared with {self.tied_to}: merging would change both; "
                               "merge through regretless.lora.merge_lora(model), which unties it first")
        w = self.base_layer.weight
        self._backup = w.detach().to("cpu", copy=True)  # unmerge restores these exact bits
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._backup)
        self._backup = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class LoRAParam(nn.Module):
    """LoRA on one bare 2-D parameter (d_out, d_in) of `base_layer`: the module runs with W + s·B·A."""

    def __init__(self, base_layer: nn.Module, param: str, rank: int, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.param = param
        self.rank = rank
        self.scale = scale
        w = getattr(base_layer, param)
        d_out, d_in = w.shape
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=w.device, dtype=torch.float32))
        if w.device.type != "meta":
            init_lora_A(self.lora_A.data)
        self.enabled = True
        self.merged = False
        self.tied_to: str | None = None
        self._backup: torch.Tensor | None = None

    def __getattr__(self, name: str):  # the parent may read the router's attributes (top_k, weight, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "param") or name.startswith("lora_"):
                raise
            return getattr(self.base_layer, name)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())  # (d_out, d_in)

    def forward(self, *args, **kwargs):
        if self.merged and not self.enabled:
            raise RuntimeError("LoRA disabled on a merged layer; unmerge it first (adapters_disabled does)")
        if not self.enabled or self.merged:
            return self.base_layer(*args, **kwargs)
        w = getattr(self.base_layer, self.param)
        w_eff = w + (self.scale * (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)))
        return torch.func.functional_call(self.base_layer, {self.param: w_eff}, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = getattr(self.base_layer, self.param)
        self._backup = w.detach().to("cpu", copy=True)
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        getattr(self.base_layer, self.param).copy_(self._backup)
        self._backup = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"param={self.param}, rank={self.rank}, scale={self.scale:g}"
