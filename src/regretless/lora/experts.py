"""LoRA for MoE experts stored as 3-D parameters (transformers 5's fused layout), each expert its own adapter.

`ExpertsLayout` says how an experts module stores its weights: `gate_up_proj` (E, 2I, H) + `down_proj` (E, H, I)
(gated), `up_proj` + `down_proj` (not gated, e.g. NemotronH), transposed (E, in, out) (GPT-OSS, Llama4), gate and
up concatenated or interleaved, biases, and whether the module routes tokens itself (`forward(x, top_k_index,
top_k_weights)`) or receives them already grouped by expert (Llama4: `forward(x_(E*T), H)`).

`LoRAExperts` gives every expert e of every adapted matrix its own A_e (r, d_in), B_e (d_out, r). The paper adapts
an expert's gate, up and down projections as separate matrices, each at rank = total rank / active experts; here
the gate and up halves of a fused `gate_up_proj` are adapted separately too (keys `gate` and `up`), so the fused
storage does not halve the rank: per layer E·r_e·3·(H + I) LoRA parameters. A PEFT adapter on the fused matrix
(key `gate_up`, one rank for both halves) is supported as well. The router is never adapted here.

The forward never forms ΔW_e = B_e·A_e: tokens are sorted by expert and each expert's low-rank path runs on its
routed tokens only, (x_e·A_eᵀ)·B_eᵀ. Where an adapter touches token space it is computed there, as dense GEMMs
over all experts' adapters at once (E/K times the FLOPs, at ~35x the rate of rank-r grouped GEMMs on an H200;
used while E <= 32·K): the first projection's x·A_eᵀ from the T token rows instead of the T·K slot rows
(`_a_in_token_space`), and the down adapter's up-projection after the tokens' weighted sum
(`_down_in_token_space`). The routed path has no host sync: sorted routing, expert counts kept on the
device, `grouped_mm`, masks instead of boolean indexing; under torch.compile, where grouped_mm cannot run (fp32),
a static loop over the experts. Only eager shapes or dtypes grouped_mm cannot take (fp32 on CUDA, unaligned
dims) use a loop over the experts that got tokens (one sync). grouped_mm also beat that loop on CPU (measured:
E=64, top-8, H=512, I=256, 512 tokens, forward+backward 1.4 s vs 2.5 s of CPU time), so CPU uses it too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from regretless.lora.layer import init_lora_A


@dataclass(frozen=True)
class ExpertsLayout:
    n_experts: int
    hidden: int  # H: input of the first projection, output of down_proj
    inter: int  # I: one expert's intermediate size
    gated: bool  # gate_up_proj (gate and up) or up_proj alone
    transposed: bool  # stored (E, in, out) instead of (E, out, in)
    concatenated: bool  # gate rows [:I], up rows [I:]; else interleaved (gate 0::2, up 1::2)
    bias: bool  # <param>_bias (E, out)
    batched: bool  # forward(x_(E*T, H)) with tokens grouped per expert (Llama4) instead of routing itself

    @property
    def first(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    def matrices(self, fused_gate_up: bool = False) -> dict[str, tuple[str, str | None, int, int]]:
        """key -> (parameter, part, d_in, d_out) of every matrix the layout holds (parts split gate/up)."""
        H, I = self.hidden, self.inter
        if not self.gated:
            return {"up": ("up_proj", None, H, I), "down": ("down_proj", None, I, H)}
        first = {"gate_up": ("gate_up_proj", None, H, 2 * I)} if fused_gate_up else {
            "gate": ("gate_up_proj", "gate", H, I), "up": ("gate_up_proj", "up", H, I)}
        return {**first, "down": ("down_proj", None, I, H)}

    def rows(self, part: str) -> slice:
        """Output rows of the fused gate_up matrix that belong to `part` (gate or up)."""
        I = self.inter
        if self.concatenated:
            return slice(0, I) if part == "gate" else slice(I, 2 * I)
        return slice(0, None, 2) if part == "gate" else slice(1, None, 2)


def matrix_key(param: str, part: str | None) -> str:
    if part:
        return part
    return {"gate_up_proj": "gate_up", "down_proj": "down", "up_proj": "up"}[param]


def experts_layout(module: nn.Module) -> ExpertsLayout | str:
    """The module's expert layout, or a one-line reason why it is not one regretless implements."""
    three = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    if "gate_up_proj" in three and "down_proj" in three:
        gated = True
    elif set(three) == {"up_proj", "down_proj"}:
        gated = False
    else:
        return f"3-D weights {sorted(three)} are not a gate_up_proj (or up_proj) + down_proj expert layout"
    if getattr(module, "has_gate", gated) != gated:
        return f"has_gate={module.has_gate} disagrees with its weights {sorted(three)}"
    first = three["gate_up_proj" if gated else "up_proj"]
    down = three["down_proj"]
    E, a, b = first.shape
    _, c, d = down.shape
    m = 2 if gated else 1
    plain = b == c and a == m * d  # first (E, m·I, H), down (E, H, I)
    trans = a == d and b == m * c  # first (E, H, m·I), down (E, I, H)
    if hasattr(module, "is_transposed"):
        transposed = bool(module.is_transposed)
        if not (trans if transposed else plain):
            return f"is_transposed={transposed} disagrees with shapes {tuple(first.shape)}, {tuple(down.shape)}"
    elif plain != trans:
        transposed = trans
    else:
        return f"cannot tell the orientation of shapes {tuple(first.shape)}, {tuple(down.shape)}"
    H, I = (a, c) if transposed else (b, d)
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= 3:
        batched = False
    elif len(params) == 1 and not hasattr(module, "has_gate"):
        batched = True
    else:
        return f"forward{inspect.signature(module.forward)} is neither (x, top_k_index, top_k_weights) nor (x)"
    bias = bool(getattr(module, "has_bias", False))
    if bias and not all(hasattr(module, f"{n}_bias") for n in three):
        return "has_bias=True without <weight>_bias parameters"
    if getattr(module, "has_post_expert_norm", False) and batched:
        return "post-expert norm on a batched layout"
    return ExpertsLayout(E, H, I, gated, transposed, bool(getattr(module, "is_concatenated", True)), bias, batched)


TOKEN_SPACE_MAX_E_PER_K = 32  # the dense token-space GEMM does E/K x the grouped one's FLOPs at ~35x its rate


def _pad_rank(A: torch.Tensor, B: torch.Tensor, mult: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A (E, in, r) and B (E, r, out) to a rank that is a multiple of `mult` (exact)."""
    pad = -A.shape[-1] % mult
    if pad:
        A = nn.functional.pad(A, (0, pad))
        B = nn.functional.pad(B, (0, 0, 0, pad))
    return A, B


def routing_mode(x: torch.Tensor, w: torch.Tensor) -> str:
    """How the routed path multiplies: `grouped` (grouped_mm: sync-free, and on CPU also faster than the loop,
    measured), `loop` (eager, where grouped_mm cannot take the shapes or dtype: one matmul per expert that got
    tokens, one host sync) or `masked` (under torch.compile where grouped_mm cannot run: a static loop over all
    experts, sync-free, E x the compute)."""
    compiling = torch.compiler.is_compiling()
    if _grouped_mm_ok(x, w, compiling):
        return "grouped"
    return "masked" if compiling else "loop"


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor, compiling: bool = False) -> bool:
    """grouped_mm needs 16-byte aligned strides and fp32/bf16/fp16; its CUDA kernels and compiled form bf16."""
    if not hasattr(torch.nn.functional, "grouped_mm") or x.dtype != w.dtype:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if (x.is_cuda or compiling) and x.dtype != torch.bfloat16:
        return False
    align = 16 // x.element_size()
    return all(s % align == 0 for s in (*x.stride()[:-1], *[st for st in w.stride() if st != 1])) and \
        x.shape[-1] % align == 0 and w.shape[-1] % align == 0


def _gather_sum(src_S_H: torch.Tensor, idx_T_K: torch.Tensor, w_T_K: torch.Tensor | None = None,
                keep_T_K: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_k w[t, k]·src[idx[t, k]] in fp32 (float64 for float64), k in order; w = 1 where None, and a
    term whose `keep` is False is 0 whatever its row holds. Under torch.compile it is written as K gathered terms,
    which inductor fuses into one element-wise kernel whose threads run along H: written as a gather of all S rows
    and a sum over K, inductor makes a reduction over the K axis that reads each row in short strided pieces
    (measured on the H200: ~0.9 ms a layer at Qwen3-30B-A3B's shape). Eager: one gather of the S rows, then one
    sum (two kernels, not 2K)."""
    T, K = idx_T_K.shape
    acc = torch.promote_types(src_S_H.dtype, torch.float32)
    if torch.compiler.is_compiling():
        out = None
        for k in range(K):
            term = src_S_H[idx_T_K[:, k]].to(acc)
            if w_T_K is not None:
                term = term * w_T_K[:, k, None].to(acc)
            if keep_T_K is not None:
                term = torch.where(keep_T_K[:, k, None], term, 0.0)
            out = term if out is None else out + term
        return out
    rows = src_S_H[idx_T_K.reshape(-1)].view(T, K, -1).to(acc)
    if w_T_K is not None:
        rows = rows * w_T_K[..., None].to(acc)
    if keep_T_K is not None:
        rows = torch.where(keep_T_K[..., None], rows, 0.0)
    return rows.sum(1)


class _SlotsByExpert(torch.autograd.Function):
    """x_S[s] = x[order[s] // K]: each token's row copied to its K slots, slots in expert order. The backward
    gathers each token's K gradient rows and sums them in fp32 (`_gather_sum`), where indexing's own backward
    scatter-adds into zeros (atomics on CUDA: a fill, a scatter, and an order-dependent sum)."""

    @staticmethod
    def forward(ctx, x_T_H, order_S, inverse_T_K):
        ctx.save_for_backward(inverse_T_K)
        return x_T_H[order_S // inverse_T_K.shape[1]]

    @staticmethod
    def backward(ctx, g_S_H):
        (inverse_T_K,) = ctx.saved_tensors
        return _gather_sum(g_S_H, inverse_T_K).to(g_S_H.dtype), None, None


class _CombineSlots(torch.autograd.Function):
    """out[t] = Σ_k w[t, k]·y[inverse[t, k]] in fp32 over the slots kept (rows of the others are unspecified):
    each token's K expert outputs, weighted by its routing weights, in token order. The backward is gathers and
    one reduction along H: dy[s] = w(s)·g[token(s)] in expert order, dw[t, k] = <g[t], y[inverse[t, k]]>; no
    scatter, and the routing weights need no permutation either way."""

    @staticmethod
    def forward(ctx, y_S_H, w_T_K, inverse_T_K, order_S, keep_T_K):
        ctx.save_for_backward(y_S_H, w_T_K, inverse_T_K, order_S, keep_T_K)
        return _gather_sum(y_S_H, inverse_T_K, w_T_K, keep_T_K)

    @staticmethod
    def backward(ctx, g_T_H):
        y_S_H, w_T_K, inverse_T_K, order_S, keep_T_K = ctx.saved_tensors
        T, K = inverse_T_K.shape
        g = g_T_H.to(torch.promote_types(y_S_H.dtype, torch.float32))
        dy = dw = None
        if ctx.needs_input_grad[0]:
            w_S = torch.where(keep_T_K, w_T_K.to(g.dtype), 0.0).reshape(-1)[order_S]
            dy = (g[order_S // K] * w_S[:, None]).to(y_S_H.dtype)
        if ctx.needs_input_grad[1]:
            rows = y_S_H[inverse_T_K.reshape(-1)].view(T, K, -1).to(g.dtype)
            dw = torch.where(keep_T_K, (rows * g[:, None]).sum(-1), 0.0).to(w_T_K.dtype)
        return dy, dw, None, None, None


class Routing:
    """Slots (token, k) sorted by expert, with the counts that grouped matmuls need.

    In the `grouped` and `masked` modes the counts stay on the device (no .tolist(), no bincount, no boolean
    indexing): nothing waits for the host. `loop` reads them once to the host."""

    def __init__(self, top_k_index: torch.Tensor, n_experts: int, mode: str):
        E = n_experts
        self.K = top_k_index.shape[-1]
        expert_S = top_k_index.reshape(-1)  # (S,) S = T·K
        self.expert_S, self.order_S = torch.sort(expert_S, stable=True)  # sentinel ids (>= E) sort last
        self.valid_S = self.expert_S < E  # (S,) slots routed to a local expert
        self.expert_c = self.expert_S.clamp(max=E - 1)  # in-bounds ids for gathers (invalid rows are masked)
        inverse_S = torch.empty_like(self.order_S)  # slot j of the input order sits at row inverse_S[j]
        inverse_S[self.order_S] = torch.arange(self.order_S.shape[0], device=self.order_S.device)
        self.inverse_T_K = inverse_S.view(-1, self.K)  # rows of token t's K slots
        self.valid_T_K = expert_S.view(-1, self.K) < E  # the slots routed to a local expert, in token order
        counts = torch.zeros(E + 1, dtype=torch.int64, device=expert_S.device)
        counts.scatter_add_(0, self.expert_S.clamp(0, E), torch.ones_like(self.expert_S))
        self.offsets_E = torch.cumsum(counts[:E], 0).to(torch.int32)  # end row of each expert's group
        self.mode = mode
        self.counts: list[int] | None = counts[:E].tolist() if mode == "loop" else None
        self.n_experts = E

    def to_slots(self, x_T_H: torch.Tensor) -> torch.Tensor:
        """(T, H) token rows -> (S, H) rows in expert order (row s: token order_S[s] // K)."""
        return _SlotsByExpert.apply(x_T_H, self.order_S, self.inverse_T_K)

    def combine(self, y_S_H: torch.Tensor, w_T_K: torch.Tensor) -> torch.Tensor:
        """(S, H) rows in expert order -> (T, H) fp32: Σ_k w[t, k]·(token t's k-th row), unrouted slots left out
        (their rows may hold anything), summed in the order of each token's slots, so deterministically."""
        return _CombineSlots.apply(y_S_H, w_T_K.reshape(-1, self.K), self.inverse_T_K, self.order_S, self.valid_T_K)

    def mm(self, x_S: torch.Tensor, w_E_in_out: torch.Tensor) -> torch.Tensor:
        """Row s of the result is x[s] @ w[expert(s)]; rows of invalid slots are unspecified (mask them)."""
        if self.counts is not None:  # one matmul per expert that got tokens; split/cat keep the backward cheap
            tail = x_S.shape[0] - sum(self.counts)  # unrouted (sentinel) rows sort last
            chunks = x_S.split([*self.counts, tail])
            parts = [c @ w_E_in_out[e] for e, c in enumerate(chunks[:-1]) if c.shape[0]]
            return torch.cat([*parts, x_S.new_zeros(tail, w_E_in_out.shape[-1])])
        if self.mode == "grouped" and _grouped_mm_ok(x_S, w_E_in_out, torch.compiler.is_compiling()):
            return torch.nn.functional.grouped_mm(x_S, w_E_in_out, offs=self.offsets_E)
        out = x_S.new_zeros(x_S.shape[0], w_E_in_out.shape[-1])
        for e in range(self.n_experts):  # static loop: no data-dependent shapes
            out = torch.where((self.expert_S == e).unsqueeze(-1), x_S @ w_E_in_out[e], out)
        return out


class LoRAExperts(nn.Module):
    def __init__(self, base_layer: nn.Module, layout: ExpertsLayout, ranks: dict[str, int],
                 scales: dict[str, float]):
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.num_experts = layout.n_experts
        specs = layout.matrices(fused_gate_up="gate_up" in ranks)
        unknown = set(ranks) - set(specs)
        if unknown:
            raise ValueError(f"unknown expert matrices {sorted(unknown)}; this layout has {sorted(specs)}")
        self.specs = {k: v for k, v in specs.items() if k in ranks}  # key -> (param, part, d_in, d_out)
        self.ranks = {k: int(ranks[k]) for k in self.specs}
        self.scales = {k: float(scales[k]) for k in self.specs}
        for key, (param, _part, d_in, d_out) in self.specs.items():
            w = getattr(base_layer, param)
            E, r = layout.n_experts, self.ranks[key]
            # adapter weights stay fp32 (they are the trained master copy) whatever the base dtype
            A = nn.Parameter(torch.empty(E, r, d_in, device=w.device, dtype=torch.float32))  # (E, r, d_in)
            if w.device.type != "meta":
                for e in range(E):
                    init_lora_A(A.data[e])
            setattr(self, f"lora_A_{key}", A)
            setattr(self, f"lora_B_{key}", nn.Parameter(torch.zeros(E, d_out, r, device=w.device,
                                                                      dtype=torch.float32)))  # (E, d_out, r)
        self.enabled = True
        self.merged = False
        self.fuse_gate_up = True  # gate and up adapters in one pair of GEMMs (`_delta_gate_up`)
        self.a_in_token_space = True  # the first projection's x·Aᵀ from the tokens (`_a_in_token_space`)
        self.down_in_token_space = True  # the down adapter's up-projection after the tokens' sum (`_down_in_token_space`)
        self._backup: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str):  # the MoE block may read attributes of its experts (num_experts, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "layout") or name.startswith("lora_"):
                raise
            return getattr(self.base_layer, name)

    @property
    def adapted(self) -> list[str]:
        """Base parameters that carry an adapter, in registration order."""
        used = {p for p, *_ in self.specs.values()}
        return [n for n, _ in self.base_layer.named_parameters(recurse=False) if n in used]

    def lora_A(self, key: str) -> nn.Parameter:
        return getattr(self, f"lora_A_{key}")

    def lora_B(self, key: str) -> nn.Parameter:
        return getattr(self, f"lora_B_{key}")

    def _w_in_out(self, param: str) -> torch.Tensor:
        w = getattr(self.base_layer, param)
        return w if self.layout.transposed else w.transpose(-2, -1)  # (E, in, out)

    def _active(self) -> bool:
        return self.enabled and not self.merged

    def _lora_in_out(self, key: str, dtype: torch.dtype, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """A (E, in, r) and scale·B (E, r, out) in `dtype`: the scale rides on the small B, not on (S, out)."""
        A = self.lora_A(key).transpose(-2, -1).to(dtype)  # (E, in, r)
        B = (self.lora_B(key) * scale).transpose(-2, -1).to(dtype)  # (E, r, out)
        return A, B

    def _delta_gate_up(self, x: torch.Tensor, mm, a_mm=None) -> torch.Tensor:
        """Gate and up adapters of a fused gate_up_proj as one low-rank pair: x·[A_g; A_u]ᵀ (x read once) times a
        block matrix [[s_g·B_gᵀ, 0], [0, s_u·B_uᵀ]] whose columns follow the layout (concatenated or interleaved),
        so the (S, 2I) delta comes out of one GEMM with no cat."""
        Ag, Bg = _pad_rank(*self._lora_in_out("gate", x.dtype, self.scales["gate"]), 8)  # (E, H, rg), (E, rg, I)
        Au, Bu = _pad_rank(*self._lora_in_out("up", x.dtype, self.scales["up"]), 8)  # (E, H, ru), (E, ru, I)
        zg, zu = Bg.new_zeros(Bg.shape), Bu.new_zeros(Bu.shape)
        if self.layout.concatenated:
            rows_g, rows_u = torch.cat([Bg, zg], -1), torch.cat([zu, Bu], -1)  # (E, r, 2I): gate | up columns
        else:
            rows_g, rows_u = torch.stack([Bg, zg], -1).flatten(-2), torch.stack([zu, Bu], -1).flatten(-2)
        A = torch.cat([Ag, Au], -1)
        return mm(mm(x, A) if a_mm is None else a_mm(A), torch.cat([rows_g, rows_u], -2))  # (S, 2I)

    def _delta(self, param: str, x: torch.Tensor, mm, a_mm=None) -> torch.Tensor | None:
        """s·(x·Aᵀ)·Bᵀ for every adapted matrix of `param`, laid out as the base parameter's outputs; a_mm(A), if
        given, computes x·Aᵀ (A as (E, in, r)) another way."""
        keys = [k for k, (p, *_) in self.specs.items() if p == param] if self._active() else []
        if not keys:
            return None
        if self.fuse_gate_up and sorted(keys) == ["gate", "up"]:
            return self._delta_gate_up(x, mm, a_mm)
        parts = {}
        for k in keys:
            A, B = self._lora_in_out(k, x.dtype)
            A, B = _pad_rank(A, B, 8)  # 16-byte rows for grouped_mm (zero padding: exact)
            parts[self.specs[k][1]] = self.scales[k] * mm(mm(x, A) if a_mm is None else a_mm(A), B)
        if None in parts:  # a whole-matrix adapter (down, up, or PEFT's fused gate_up)
            return parts[None]
        zero = x.new_zeros(x.shape[:-1] + (self.layout.inter,))
        gate, up = parts.get("gate", zero), parts.get("up", zero)
        if self.layout.concatenated:
            return torch.cat([gate, up], dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)  # interleaved: gate 0::2, up 1::2

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self.layout.gated:
            return base.act_fn(h)
        if hasattr(base, "_apply_gate"):
            return base._apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return base.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout.batched:
            return self._forward_batched(hidden_states)
        return self._forward_routed(hidden_states, top_k_index, top_k_weights)

    def _forward_routed(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:  # hidden_states (T, H)
        base, lay = self.base_layer, self.layout
        w_first = self._w_in_out(lay.first)
        dtype = w_first.dtype
        x_T = hidden_states.to(dtype)  # (T, H)
        route = Routing(top_k_index, lay.n_experts, routing_mode(x_T, w_first))
        valid = route.valid_S.unsqueeze(-1)  # (S, 1); masks (not boolean indexing) keep shapes static
        x_S = torch.where(valid, route.to_slots(hidden_states).to(dtype), 0)  # (S, H) in expert order
        h = route.mm(x_S, w_first)  # (S, m·I)
        if lay.bias:
            h = h + getattr(base, f"{lay.first}_bias")[route.expert_c]
        d = self._delta(lay.first, x_S, route.mm, self._a_in_token_space(x_T, route))
        if d is not None:
            h = h + d
        h = self._act(torch.where(valid, h, 0))  # (S, I); rows of unrouted slots -> 0 (grouped_mm leaves them)
        y = route.mm(h, self._w_in_out("down_proj"))  # (S, H)
        if lay.bias:
            y = y + base.down_proj_bias[route.expert_c]
        post_norm = getattr(base, "has_post_expert_norm", False)
        tokens = self._down_in_token_space(h, route, top_k_index, top_k_weights) if not post_norm else None
        if tokens is None:
            d = self._delta("down_proj", h, route.mm)
            if d is not None:
                y = y + d
        if post_norm:
            y = base.post_expert_norm(y)
        out = route.combine(y, top_k_weights)  # (T, H) fp32
        return (out if tokens is None else out + tokens).to(hidden_states.dtype)

    def _token_space_pays(self, top_k: int) -> bool:
        return self.layout.n_experts <= TOKEN_SPACE_MAX_E_PER_K * top_k

    def _a_in_token_space(self, x_T: torch.Tensor, route: Routing):
        """For the first projection's adapters: A (E, H, r) -> x_S·A_e per slot computed in token space, one dense
        GEMM U = x_T·[A_1 | ... | A_E] (T, E·r) and a gather of each slot's r columns of its token's row. Every
        slot of a token shares x_t, so this reads the T token rows instead of the S = T·K slot rows, its backward
        writes dx in token space (T, H) instead of an (S, H) term added to the slots' gradient, and the slot rows
        need not be kept for dA; E/K times the grouped GEMM's FLOPs (used while E <= TOKEN_SPACE_MAX_E_PER_K·K).
        None: not used (grouped over the slots)."""
        if not (self.a_in_token_space and self._token_space_pays(route.K)):
            return None
        E = self.layout.n_experts
        token_S = route.order_S // route.K

        def a_mm(A: torch.Tensor) -> torch.Tensor:  # (E, H, r) -> (S, r)
            H, r = A.shape[1], A.shape[2]
            U = x_T @ A.permute(1, 0, 2).reshape(H, E * r)  # (T, E·r)
            u_S = U.view(-1, E, r)[token_S, route.expert_c]
            return torch.where(route.valid_S[:, None], u_S, 0)  # slots of no local expert: 0, and no gradient

        return a_mm

    def _down_in_token_space(self, h_S: torch.Tensor, route: Routing, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor | None:
        """The down adapter's share of the tokens' weighted sum, Σ_k w_tk·s·B_e(t,k)·A_e(t,k)·h_(t,k), computed in
        token space: u = h·A_eᵀ per slot (grouped, r columns), then each token's K rows w_tk·u placed at their
        experts' columns of a (T, (E + 1)·r) matrix Z (the extra block takes slots routed to no local expert) and
        one dense GEMM Z·[s·B_1ᵀ; ...; s·B_Eᵀ; 0]. It replaces the grouped up-projection that wrote an (S, H)
        delta (S = T·K rows) and read it back, whose rank-r GEMMs run far below the GPU's rate (measured on the
        H200 at Qwen3-30B-A3B's shape, forward + backward: 0.82 ms a layer grouped, 0.36 ms in token space), at
        E/K times its FLOPs: used while E <= TOKEN_SPACE_MAX_E_PER_K·K. None: not used (the per-slot path runs)."""
        if not (self.down_in_token_space and self._active() and "down" in self.specs
                and self._token_space_pays(route.K)):
            return None
        E, K = self.layout.n_experts, route.K
        A, B = _pad_rank(*self._lora_in_out("down", h_S.dtype, self.scales["down"]), 8)  # (E, I, r), (E, r, H)
        r = A.shape[-1]
        u_S = route.mm(h_S, A)  # (S, r), rows in expert order
        T = top_k_index.shape[0]
        w = top_k_weights.reshape(T, K).to(h_S.dtype)
        # masked before the weights multiply: the rows of slots routed to no local expert are unspecified (may be
        # NaN), and the product's backward would carry them into dw as 0·NaN
        z_T_K = torch.where(route.valid_T_K[..., None], u_S[route.inverse_T_K], 0) * w[..., None]  # (T, K, r)
        cols = top_k_index.reshape(T, K).clamp(0, E)[..., None].expand(T, K, r)  # expert id; E: no local expert
        Z = z_T_K.new_zeros(T, E + 1, r).scatter(1, cols, z_T_K)  # a token's experts are distinct
        B_all = torch.cat([B.reshape(E * r, -1), B.new_zeros(r, B.shape[-1])])  # ((E + 1)·r, H)
        return Z.reshape(T, (E + 1) * r) @ B_all

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        E = lay.n_experts
        dtype = getattr(self.base_layer, lay.first).dtype
        x_E = x.reshape(E, -1, lay.hidden).to(dtype)  # (E, T, H): tokens already grouped per expert

        def bmm(a, w):
            return torch.bmm(a, w)

        h = bmm(x_E, self._w_in_out(lay.first))  # (E, T, m·I)
        d = self._delta(lay.first, x_E, bmm)
        if d is not None:
            h = h + d
        h = self._act(h)
        y = bmm(h, self._w_in_out("down_proj"))  # (E, T, H)
        d = self._delta("down_proj", h, bmm)
        if d is not None:
            y = y + d
        return y.reshape(-1, lay.hidden)

    def delta_weight(self, param: str) -> torch.Tensor:
        """ΔW of one base parameter in its own layout ((E, out, in), or (E, in, out) if transposed). Merge only."""
        E = self.layout.n_experts
        w = getattr(self.base_layer, param)
        d_out, d_in = (w.shape[2], w.shape[1]) if self.layout.transposed else (w.shape[1], w.shape[2])
        d = torch.zeros(E, d_out, d_in, device=w.device, dtype=torch.float32)  # (E, out, in)
        for k, (p, part, *_) in self.specs.items():
            if p != param:
                continue
            dk = self.scales[k] * torch.bmm(self.lora_B(k).float(), self.lora_A(k).float())  # (E, out_k, in)
            if part is None:
                d += dk
            else:
                d[:, self.layout.rows(part)] += dk
        return d.transpose(-2, -1) if self.layout.transposed else d

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
def check_supported(module: nn.Module, layout: ExpertsLayout) -> str | None:
    """Run the wrapper (B = 0) and the original module on a few random tokens; None if they agree, else why."""
    w = getattr(module, layout.first)
    if w.device.type == "meta":
        return None
    E, H = layout.n_experts, layout.hidden
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = LoRAExperts(module, layout, {}, {})
    try:
        if layout.batched:
            x = torch.randn(E * 3, H, generator=g).to(device=w.device, dtype=w.dtype)
            ref, got = module(x), probe(x)
        else:
            x = torch.randn(6, H, generator=g).to(device=w.device, dtype=w.dtype)
            idx = torch.stack([torch.randperm(E, generator=g)[: min(2, E)] for _ in range(6)]).to(w.device)
            wts = torch.rand(idx.shape, generator=g).to(device=w.device, dtype=w.dtype)
            ref, got = module(x, idx, wts), probe(x, idx, wts)
        if isinstance(ref, tuple):
            ref = ref[0]
    except Exception as e:  # noqa: BLE001 - any failure means the layout is not the one we implement
        return f"{type(e).__name__}: {e}"
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    err = (ref.float() - got.float()).abs().max().item()
    return None if err <= tol * max(1.0, ref.abs().max().item()) else f"output differs by {err:.3g}"
