"""Dense LoRA: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with s = α/r (or α/√r for rsLoRA).

`LoRALinear` holds the original `nn.Linear` (or transformers' `Conv1D`, whose weight is stored (d_in, d_out):
PEFT's fan_in_fan_out) as `base_layer`, so weights load and save unchanged, and two trainable matrices: A (r, d_in)
initialised like PEFT (kaiming-uniform with a=√5, i.e. U(±1/√d_in)) and B (d_out, r) = 0, so training starts
exactly at the base model. As in the paper, A and B share one learning rate unless LoRA+ (`lr_b_mult`) is asked
for. No dropout: the paper uses none.

Siblings that the parent calls on the same input (q/k/v of attention, gate/up of a gated MLP) can form a
`SharedInputGroup` (`group_shared_inputs`, called by `apply_lora`): the first of them to be called runs one fused
autograd node for all of them and hands the others their outputs when they are called with the same tensor. x is
read once for all the A projections (one GEMM against the concatenated A's, forward and dA), and in backward
the input gradients of all members and of the LoRA path accumulate into one buffer inside the GEMMs (beta = 1)
instead of separate tensors summed by autograd. Same math as the members' own paths; any mismatch (another
input, a disabled or merged member, a trained base) falls back to each member's own path. Under torch.compile the
group is written in plain ops (`SharedInputGroup.traced`), and there, for a group or an adapter whose d_in <=
d_out, the LoRA up-projection rides on the base GEMM: [x | s·x·Aᵀ]·[W | B]ᵀ (`base_and_up`), so the (N, d_out)
LoRA output is never written and added.

`LoRAParam` adapts one bare 2-D weight of a module that is not a Linear (a MoE router such as Qwen3-MoE's
`mlp.gate.weight`) by calling the module with W + s·B·A. It exists for adapters that PEFT saved with
`target_parameters=[..."gate.weight"]`; regretless's presets leave routers alone, as the paper does.
"""

from __future__ import annotations

import math
import weakref

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


class _LoRAGroupFn(torch.autograd.Function):
    """Members i = 1..n share x: xa = x·A_catᵀ (one GEMM, A_cat = [A_1; ...; A_n]), y_i = x·W_iᵀ (+ b_i) +
    s_i·xa_i·B_iᵀ. Backward: dx = Σ g_i·W_i + [s_i·g_i·B_i]_i·A_cat accumulated in place (addmm_, beta = 1),
    dA_cat = [s_i·g_i·B_i]_iᵀ·x (one GEMM), dB_i = s_i·g_iᵀ·xa_i. Frozen W_i, b_i. All inputs share one dtype."""

    @staticmethod
    def forward(ctx, x_N_in, A_cat, ranks: tuple, scales: tuple, *WbB):
        n = len(ranks)
        Ws, bs, Bs = WbB[:n], WbB[n:2 * n], WbB[2 * n:]
        xa_N_R = x_N_in @ A_cat.T  # (N, Σ r_i): x read once for every A
        ys, off = [], 0
        for W, b, B, r, s in zip(Ws, bs, Bs, ranks, scales):
            y = torch.addmm(b, x_N_in, W.T) if b is not None else x_N_in @ W.T
            ys.append(torch.addmm(y, xa_N_R[:, off:off + r], B.T, alpha=s))
            off += r
        ctx.save_for_backward(x_N_in, A_cat, xa_N_R, *Ws, *Bs)
        ctx.ranks, ctx.scales = ranks, scales
        ctx.set_materialize_grads(False)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *g_out):
        n = len(ctx.ranks)
        saved = ctx.saved_tensors  # read once (checkpointing unpacks each saved tensor once)
        x, A_cat, xa = saved[:3]
        Ws, Bs = saved[3:3 + n], saved[3 + n:]
        need_dx, need_dA = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        same_s = len(set(ctx.scales)) == 1
        dx, gbs, dBs, off = None, [], [], 0
        for i, (g, W, B, r, s) in enumerate(zip(g_out, Ws, Bs, ctx.ranks, ctx.scales)):
            if g is None:  # output unused
                gbs.append(xa.new_zeros(xa.shape[0], r))
                dBs.append(None)
                off += r
                continue
            gb = g @ B  # (N, r_i)
            gbs.append(gb if same_s else gb * s)
            if need_dx:
                dx = g @ W if dx is None else dx.addmm_(g, W)
            dBs.append((g.T @ xa[:, off:off + r]).mul_(s) if ctx.needs_input_grad[4 + 2 * n + i] else None)
            off += r
        gb_cat = torch.cat(gbs, 1)  # (N, Σ r_i), scaled unless every member has the same s
        alpha = ctx.scales[0] if same_s else 1.0
        if need_dx:
            dx = gb_cat @ A_cat * alpha if dx is None else dx.addmm_(gb_cat, A_cat, alpha=alpha)
        dA = (gb_cat.T @ x).mul_(alpha) if need_dA else None
        return (dx, dA, None, None, *([None] * (2 * n)), *dBs)


@torch.library.custom_op("regretless::gemm_sum", mutates_args=())
def gemm_sum(gs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i gs[i]·ws[i] into one fresh buffer: the first GEMM writes it, the others accumulate in place (addmm_,
    beta = 1). An opaque op to torch.compile, so the in-place accumulation stays in place: traced as plain
    addmm's, functionalized, each of them first copies the running sum (one (N, d) copy per extra term)."""
    out = gs[0] @ ws[0]
    for g, w in zip(gs[1:], ws[1:]):
        out.addmm_(g, w)
    return out


@gemm_sum.register_fake
def _gemm_sum_fake(gs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    return gs[0].new_empty(gs[0].shape[0], ws[0].shape[1])


class _BaseAndUpFn(torch.autograd.Function):
    """y = [x | u]·[W | B]ᵀ (+ b) with B = blockdiag(B_1, ..., B_n): the frozen base and the LoRA up-projections of
    u = [s_1·x·A_1ᵀ | ... | s_n·x·A_nᵀ] in one GEMM over K = d_in + Σ r, written for torch.compile (plain ops in
    both directions), returned as the members' outputs y_i (column blocks of y). The (N, d_out) LoRA output is
    never written and added to the base's; backward reads each member's gradient once for both input gradients,
    [dx | du] = Σ_i g_i·[W_i | B_i] accumulated inside the GEMMs (`gemm_sum`: beta = 1, in place; no concatenated
    gradient: one GEMM over [g_1 | ... | g_n] measured slower, 0.2167 vs 0.2034 s on the H200 for q/k/v, and
    inductor assembled gate/up's slowly), and once for dB_i = g_iᵀ·u_i (each member's own block, no off-diagonal
    work). One member alone (o_proj) gets dx = g·W and du = g·B from two GEMMs instead: dx then comes out
    contiguous, where a column slice of [dx | du] made the attention backward that consumes it copy it. With x
    frozen (the first block) only du. W and b frozen (no gradient); [W | B] is rebuilt in backward, not kept."""

    @staticmethod
    def forward(ctx, x_N_in, u_N_R, W, b, *Bs):
        ctx.save_for_backward(u_N_R, W, *Bs)
        return _base_and_up(x_N_in, u_N_R, W, b, Bs)

    @staticmethod
    def backward(ctx, *g_N_out):
        u, W, *Bs = ctx.saved_tensors
        d_in = W.shape[1]
        us = u.split([B.shape[1] for B in Bs], 1)
        dBs = [g.T @ u_i if ctx.needs_input_grad[4 + i] else None for i, (g, u_i) in enumerate(zip(g_N_out, us))]
        if not ctx.needs_input_grad[0]:  # x frozen (the first block's input): du = [g_1·B_1 | ... ] alone
            return None, torch.cat([g @ B for g, B in zip(g_N_out, Bs)], 1), None, None, *dBs
        if len(Bs) == 1:
            return g_N_out[0] @ W, g_N_out[0] @ Bs[0], None, None, *dBs
        Wc = torch.cat([W, torch.block_diag(*Bs)], 1)  # (Σ d_out, d_in + Σ r)
        dxu = gemm_sum(list(g_N_out), list(Wc.split([B.shape[0] for B in Bs])))  # member i's rows: [W_i | 0 .. B_i .. 0]
        return dxu[:, :d_in], dxu[:, d_in:], None, None, *dBs


def _base_and_up(x_N_in, u_N_R, W, b, Bs) -> tuple[torch.Tensor, ...]:
    xu = torch.cat([x_N_in, u_N_R], 1)  # (N, d_in + Σ r)
    Wc = torch.cat([W, torch.block_diag(*Bs)], 1)  # (Σ d_out, d_in + Σ r)
    y = torch.addmm(b, xu, Wc.T) if b is not None else xu @ Wc.T
    return y.split([B.shape[0] for B in Bs], 1)


def base_and_up(x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor], scales: torch.Tensor | float,
                W: torch.Tensor, b: torch.Tensor | None) -> list[torch.Tensor]:
    """The members' outputs y_i of x·Wᵀ (+ b) + (s·x·Aᵀ)·blockdiag(B_1, ..., B_n)ᵀ for x (..., d_in), A (Σ r, d_in),
    B_i (d_i, r_i) with Σ d_i = W's rows, s a scalar or one scale per column of x·Aᵀ, all in one dtype: the LoRA
    up-projections ride on the base GEMM (`_BaseAndUpFn`)."""
    x2 = x.reshape(-1, x.shape[-1])
    u = (x2 @ A.T) * scales
    # without grad, the same product without the autograd node: dynamo (torch 2.11 and 2.13) mis-binds the
    # arguments of a Function.forward with *args that it inlines under no_grad (the first went to ctx's place)
    ys = _BaseAndUpFn.apply(x2, u, W, b, *Bs) if torch.is_grad_enabled() else _base_and_up(x2, u, W, b, Bs)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class SharedInputGroup:
    """LoRALinear siblings called on the same input tensor. The first member called computes every member's
    output in one `_LoRAGroupFn` node; the others get theirs when called with that same tensor (identity), the
    same grad mode and autocast state. Holds a weak reference to x and the pending outputs until taken."""

    def __init__(self, members: list[LoRALinear]):
        self.members = members
        self._key: tuple | None = None  # (weakref to x, grad mode, autocast dtype)
        self._pending: dict[int, torch.Tensor] = {}
        self._traced: tuple | None = None  # (x, pending outputs) while torch.compile traces the group

    def _fusable(self, x: torch.Tensor) -> bool:
        m0 = self.members[0]
        W0 = m0.base_layer.weight
        for m in self.members:
            W, b = m.base_layer.weight, m.base_layer.bias
            if (not m.enabled or m.merged or m.fan_in_fan_out or not m.group_fusion or W.requires_grad
                    or (b is not None and b.requires_grad) or W.shape[1] != W0.shape[1] or W.dtype != W0.dtype
                    or W.device != x.device):
                return False
        return x.shape[-1] == W0.shape[1]

    def take(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """member's output for x, computed for the whole group on the first call; None: use the own path."""
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        i = next(j for j, m in enumerate(self.members) if m is member)
        if self._key is not None and self._key[0]() is x and self._key[1:] == (torch.is_grad_enabled(), amp) \
                and i in self._pending:
            y = self._pending.pop(i)
            if not self._pending:
                self._key = None
            return y
        self._key, self._pending = None, {}
        if not self._fusable(x):
            return None
        dt = amp or member.base_layer.weight.dtype
        ms = self.members
        with torch.autocast(dev, enabled=False):
            A_cat = torch.cat([m.lora_A for m in ms]).to(dt)  # (Σ r_i, d_in)
            ys = _LoRAGroupFn.apply(x.reshape(-1, x.shape[-1]).to(dt), A_cat, tuple(m.rank for m in ms),
                                    tuple(float(m.scale) for m in ms), *[m.base_layer.weight.to(dt) for m in ms],
                                    *[None if m.base_layer.bias is None else m.base_layer.bias.to(dt) for m in ms],
                                    *[m.lora_B.to(dt) for m in ms])
        ys = [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
        self._pending = {j: y for j, y in enumerate(ys) if j != i}
        self._key = (weakref.ref(x), torch.is_grad_enabled(), amp)
        return ys[i]

    def traced(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """Under torch.compile: the take() of plain ops. The first member called computes the whole group,
        y = x·[W_1; ...; W_n]ᵀ (+ b) + (x·[A_1; ...; A_n]ᵀ ⊙ s)·blockdiag(B_1, ..., B_n)ᵀ with the up-projection
        riding on the base GEMM (`base_and_up`), and keeps the other members' outputs for them (the compiler
        traces this hand-over away). So the group runs one A GEMM and one base GEMM forward; backward, per member
        one GEMM accumulating into [dx | du] and one for dB_i, then one for dA and one for the LoRA part of dx:
        x read once each way, no sum of n input gradients. The concatenated frozen weights are a
        (Σ d_out, d_in + Σ r) copy per step, small next to the (N, d_in) activations. None: use the own path."""
        i = next(j for j, m in enumerate(self.members) if m is member)
        held = self._traced
        if held is not None and held[0] is x and i in held[1]:
            y = held[1].pop(i)
            if not held[1]:
                self._traced = None
            return y
        self._traced = None
        if not self._fusable(x):
            return None
        ms, dev = self.members, x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else member.base_layer.weight.dtype
        with torch.autocast(dev, enabled=False):
            W = torch.cat([m.base_layer.weight for m in ms]).to(dt)  # (Σ d_out, d_in)
            b = None if all(m.base_layer.bias is None for m in ms) else torch.cat(
                [m.base_layer.weight.new_zeros(m.out_features) if m.base_layer.bias is None else m.base_layer.bias
                 for m in ms]).to(dt)
            A = torch.cat([m.lora_A for m in ms]).to(dt)  # (Σ r, d_in)
            s = torch.cat([torch.full((m.rank,), float(m.scale), dtype=dt, device=x.device) for m in ms])
            ys = base_and_up(x.to(dt), A, [m.lora_B.to(dt) for m in ms], s, W, b)  # each (..., d_out_i)
        self._traced = (x, {j: yj for j, yj in enumerate(ys) if j != i})
        return ys[i]


def group_shared_inputs(model: nn.Module) -> list[SharedInputGroup]:
    """Form a SharedInputGroup of the LoRALinear children of each module named as SHARED_INPUT_SIBLINGS (two or
    more present, same input size). Runtime-only: parameters, names and the saved format are unchanged."""
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT_SIBLINGS:
            ms = [getattr(parent, n, None) for n in names]
            ms = [m for m in ms if isinstance(m, LoRALinear) and not m.fan_in_fan_out]
            if len(ms) >= 2 and len({m.in_features for m in ms}) == 1:
                g = SharedInputGroup(ms)
                for m in ms:
                    m._group = g
                groups.append(g)
    return groups


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
        self.group_fusion = True  # use the SharedInputGroup path when a group is set
        self.fused_when_compiled = False  # under torch.compile: the fused node (True) or plain ops inductor fuses
        self.up_in_base_gemm = True  # compiled, alone (not in a group): the up-projection inside the base GEMM
        self._group: SharedInputGroup | None = None
        self._decode_weight: torch.Tensor | None = None  # W + s·B·A, set by merge.merged_for_decoding

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W + s·B·A as (d_out, d_in) in `dtype`, summed in fp32 and rounded once; the base weight is untouched."""
        w = self.base_layer.weight.float() + self.delta_weight()  # the base's own layout
        return (w.T if self.fan_in_fan_out else w).to(dtype)

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
        W_dec = self._decode_weight
        if W_dec is not None and not torch.is_grad_enabled():  # decoding: one GEMM with the merged weight
            bias = self.base_layer.bias
            return nn.functional.linear(x.to(W_dec.dtype), W_dec, None if bias is None else bias.to(W_dec.dtype))
        if self._group is not None and self.group_fusion:
            compiling = torch.compiler.is_compiling()
            y = self._group.take(self, x) if not compiling else \
                None if self.fused_when_compiled else self._group.traced(self, x)
            if y is not None:
                return y
        dev = x.device.type
        W, bias = self.base_layer.weight, self.base_layer.bias
        if self.fan_in_fan_out:
            W = W.T  # (d_out, d_in) view
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype
        trained_base = W.requires_grad or (bias is not None and bias.requires_grad)
        # compiled, d_in <= d_out: writing and adding the (N, d_out) LoRA output costs more than [x | s·x·Aᵀ]
        if torch.compiler.is_compiling() and not self.fused_when_compiled and self.up_in_base_gemm \
                and not trained_base and self.in_features <= self.out_features:
            with torch.autocast(dev, enabled=False):
                return base_and_up(x.to(dt), self.lora_A.to(dt), [self.lora_B.to(dt)], self.scale, W.to(dt),
                                   None if bias is None else bias.to(dt))[0]
        if trained_base or (torch.compiler.is_compiling() and not self.fused_when_compiled):  # plain ops
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
