"""LoRA for fused MoE experts (transformers 5 stores all experts of a layer as 3-D parameters).

`LoRAExperts` wraps an experts module with `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) (or the
transposed layout, with optional biases) and gives every expert e its own A_e (r_e, d_in) and B_e (d_out, r_e).
Per-expert rank r_e defaults to rank / top_k, the paper's rule, so LoRA:FullFT parameter ratios match the dense
layers. The router is never adapted.

The forward never forms ΔW_e = B_e·A_e: tokens are sorted by expert and each expert's low-rank path runs on its
routed tokens only, (x_e·A_eᵀ)·B_eᵀ, costing 2·r_e·(d_in + d_out) FLOPs per routed token. On CUDA the grouped
matmuls go through `torch._grouped_mm` (one kernel for all experts, no host sync); elsewhere a loop over the
experts that received tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from regretless.lora.layer import init_lora_A

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    d = getattr(module, "down_proj", None)
    return isinstance(p, nn.Parameter) and isinstance(d, nn.Parameter) and p.dim() == 3 and d.dim() == 3


def expert_dims(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(n_experts, d_in, d_out) of a fused expert parameter."""
    E, a, b = getattr(module, name).shape
    return (E, a, b) if getattr(module, "is_transposed", False) else (E, b, a)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0)


def grouped_linear(x_N_in: torch.Tensor, w_E_in_out: torch.Tensor, counts_E: torch.Tensor,
                   offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of x are sorted by expert (counts_E rows each); row n of the result is x[n] @ w[expert(n)]."""
    if _grouped_mm_ok(x_N_in, w_E_in_out):
        return torch._grouped_mm(x_N_in, w_E_in_out, offs=offsets_E)
    out = x_N_in.new_empty(x_N_in.shape[0], w_E_in_out.shape[-1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out[start:start + n] = x_N_in[start:start + n] @ w_E_in_out[e]
            start += n
    return out


class LoRAExperts(nn.Module):
    def __init__(self, base_layer: nn.Module, ranks: dict[str, int], scales: dict[str, float]):
        super().__init__()
        self.base_layer = base_layer
        self.ranks = dict(ranks)
        self.scales = dict(scales)
        self.num_experts = base_layer.gate_up_proj.shape[0]
        self.adapted = [n for n in EXPERT_PARAMS if n in ranks]  # registration order of the base parameters
        for name in self.adapted:
            E, d_in, d_out = expert_dims(base_layer, name)
            w = getattr(base_layer, name)
            # adapter weights stay fp32 (they are the trained master copy) whatever the base dtype
            A = nn.Parameter(torch.empty(E, ranks[name], d_in, device=w.device, dtype=torch.float32))
            if w.device.type != "meta":
                for e in range(E):
                    init_lora_A(A.data[e])
            setattr(self, f"lora_A_{name}", A)  # (E, r, d_in)
            setattr(self, f"lora_B_{name}", nn.Parameter(torch.zeros(E, d_out, ranks[name], device=w.device,
                                                                      dtype=torch.float32)))  # (E, d_out, r)
        self.enabled = True
        self.merged = False
        self._backup: dict[str, torch.Tensor] = {}

    def lora_A(self, name: str) -> nn.Parameter:
        return getattr(self, f"lora_A_{name}")

    def lora_B(self, name: str) -> nn.Parameter:
        return getattr(self, f"lora_B_{name}")

    def _weight_in_out(self, name: str) -> torch.Tensor:
        w = getattr(self.base_layer, name)
        return w if getattr(self.base_layer, "is_transposed", False) else w.transpose(-2, -1)  # (E, in, out)

    def _proj(self, name: str, x_N: torch.Tensor, counts_E, offsets_E, expert_N) -> torch.Tensor:
        base = self.base_layer
        w = self._weight_in_out(name)  # (E, in, out)
        x_N = x_N.to(w.dtype)
        y = grouped_linear(x_N, w, counts_E, offsets_E)  # (N, out)
        if getattr(base, "has_bias", False):
            y = y + getattr(base, f"{name}_bias")[expert_N]
        if self.enabled and not self.merged and name in self.ranks:
            A = self.lora_A(name).transpose(-2, -1).to(w.dtype)  # (E, in, r)
            B = self.lora_B(name).transpose(-2, -1).to(w.dtype)  # (E, r, out)
            pad = -A.shape[-1] % 8
            if pad and _grouped_mm_ok(x_N, w):  # grouped_mm wants 16-byte rows: zero-pad the rank (exact)
                A = torch.nn.functional.pad(A, (0, pad))
                B = torch.nn.functional.pad(B, (0, 0, 0, pad))
            h = grouped_linear(x_N, A, counts_E, offsets_E)  # (N, r)
            y = y + self.scales[name] * grouped_linear(h, B, counts_E, offsets_E)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        T, H = hidden_states.shape  # (T, H)
        K = top_k_index.shape[-1]
        E = self.num_experts
        expert_S = top_k_index.reshape(-1)  # (S,) S = T*K
        order_S = torch.argsort(expert_S, stable=True)
        expert_S = expert_S[order_S]
        keep = expert_S < E  # sentinel ids (>= E) mark slots that go to no local expert
        order_N, expert_N = order_S[keep], expert_S[keep]  # (N,)
        token_N = order_N // K
        weight_N = top_k_weights.reshape(-1)[order_N]
        counts_E = torch.bincount(expert_N, minlength=E)
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        x_N = hidden_states[token_N]  # (N, H)
        h = self._proj("gate_up_proj", x_N, counts_E, offsets_E, expert_N)  # (N, 2I)
        h = self.base_layer._apply_gate(h) if hasattr(self.base_layer, "_apply_gate") else self._gate(h)
        y = self._proj("down_proj", h, counts_E, offsets_E, expert_N)  # (N, H)
        if getattr(self.base_layer, "has_post_expert_norm", False):
            y = self.base_layer.post_expert_norm(y)
        y = y * weight_N.unsqueeze(-1).to(y.dtype)
        out = torch.zeros(T, H, device=y.device, dtype=torch.float32)
        out.index_add_(0, token_N, y.float())
        return out.to(hidden_states.dtype)

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.base_layer.act_fn(gate) * up

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base parameter's own layout (E, out, in) or (E, in, out) if transposed. Merge/export only."""
        d = self.scales[name] * torch.bmm(self.lora_B(name).float(), self.lora_A(name).float())  # (E, out, in)
        return d.transpose(-2, -1) if getattr(self.base_layer, "is_transposed", False) else d

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for name in self.adapted:
            w = getattr(self.base_layer, name)
            self._backup[name] = w.detach().to("cpu", copy=True)
            w.add_(self.delta_weight(name).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for name in self.adapted:
            getattr(self.base_layer, name).copy_(self._backup.pop(name))
        self.merged = False

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, ranks={self.ranks}"


@torch.no_grad()
def check_supported(module: nn.Module) -> str | None:
    """Run the wrapper (LoRA off) and the original module on a few random tokens; None if they agree, else why."""
    w = module.gate_up_proj
    if w.device.type == "meta":
        return None
    E = w.shape[0]
    H = expert_dims(module, "gate_up_proj")[1]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(6, H, generator=g).to(device=w.device, dtype=w.dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[: min(2, E)] for _ in range(6)]).to(w.device)
    wts = torch.rand(idx.shape, generator=g).to(device=w.device, dtype=w.dtype)
    probe = LoRAExperts(module, {}, {})
    try:
        ref = module(x, idx, wts)
        got = probe(x, idx, wts)
    except Exception as e:  # noqa: BLE001 - any failure means the layout is not the one we implement
        return f"{type(e).__name__}: {e}"
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    err = (ref.float() - got.float()).abs().max().item()
    return None if err <= tol * max(1.0, ref.abs().max().item()) else f"output differs by {err:.3g}"
