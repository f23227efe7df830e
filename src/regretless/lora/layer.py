"""Dense LoRA: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with s = α/r (or α/√r for rsLoRA).

The wrapper holds the original `nn.Linear` as `base_layer` (weights load and save unchanged) and two trainable
matrices: A (r, d_in) initialised like PEFT (kaiming-uniform with a=√5, i.e. U(±1/√d_in)) and B (d_out, r) = 0,
so training starts exactly at the base model. As in the paper, A and B share one learning rate unless LoRA+
(`lr_b_mult`) is asked for. No dropout: the paper uses none.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def init_lora_A(A: torch.Tensor) -> None:
    """PEFT's default: kaiming_uniform_(a=√5) on a (r, d_in) matrix = U(-1/√d_in, 1/√d_in)."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scale = scale
        w = base_layer.weight
        # adapter weights stay fp32 (they are the trained master copy) whatever the base dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, device=w.device, dtype=torch.float32))
        if w.device.type != "meta":
            init_lora_A(self.lora_A.data)
        self.enabled = True
        self.merged = False
        self._backup: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (e.g. tied heads, dtype probes) sees the base
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        y = self.base_layer(x)  # (..., d_out)
        if not self.enabled or self.merged:
            return y
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        return y + (self.scale * (h @ self.lora_A.T) @ self.lora_B.T).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())  # (d_out, d_in)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
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
