"""Parameter and FLOP counts, per role, for LoRA and FullFT, from the structural scan of `regretless.lora.structure`.
Works on models built on the meta device, so `recommend` can count a 70B model from its config without weights.

FLOPs (training, per token, matmuls only; attention scores and element-wise ops left out, as in the paper):
  FullFT, per d_out×d_in matrix: forward 2·d_in·d_out, input gradient 2·d_in·d_out, weight gradient
  2·d_in·d_out  ->  6·d_in·d_out   (the paper's 3N² multiply-adds for N×N).
  LoRA on that matrix: forward 2·d_in·d_out + 2r(d_in+d_out), input gradient the same, and gradients of A and B
  2r(d_in+d_out)  ->  4·d_in·d_out + 6r(d_in+d_out)   (the paper's 2N² + 6Nr multiply-adds).
  Frozen matrices under LoRA still pass gradients back: 4·d_in·d_out. Routed experts count their active experts
  only (top_k of E, for fused 3-D experts and for ModuleLists of expert MLPs alike); routers and shared experts
  count for every token. Counted: every matrix in the decoder (blocks, projections outside them) and the LM head.
"""

from __future__ import annotations

from torch import nn

from regretless.lora.config import LoRAConfig
from regretless.lora.inject import find_targets
from regretless.lora.structure import scan

GROUPS = ("attn", "mlp", "experts", "ssm", "router", "embed", "head", "other")


def count_params(model: nn.Module, lora: LoRAConfig | None) -> dict[str, int]:
    """Trainable parameters by group, plus `total` and `model_total`. FullFT trains every parameter."""
    counts = dict.fromkeys(GROUPS, 0)
    model_total = sum(p.numel() for p in model.parameters())
    if lora is None:
        s = scan(model)
        role_of = {}
        for u in s.units:
            role_of[u.name] = "head" if u.role == "head" else ("other" if u.role == "outside" else u.role)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        emb_w = getattr(emb, "weight", None)
        for name, p in model.named_parameters():
            mod = name.rsplit(".", 1)[0]
            group = "embed" if p is emb_w else role_of.get(mod, "other")
            counts[group if group in counts else "other"] += p.numel()
    else:
        for t in find_targets(model, lora):
            counts[t.group if t.group in counts else "other"] += t.lora_params
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(counts.values())
    counts["model_total"] = model_total
    return counts


def flops_per_token(model: nn.Module, lora: LoRAConfig | None) -> float:
    """Training FLOPs per token of the model's matmuls (see the module docstring)."""
    s = scan(model)
    adapted = {}
    if lora is not None:
        adapted = {(t.name, t.param, t.part): t.rank for t in find_targets(model, lora)}
    total = 0.0
    dec = s.decoder + "." if s.decoder else ""
    for u in s.units:
        if not (u.in_block or u.role == "head" or (u.role == "outside" and u.name.startswith(dec))):
            continue
        if lora is None:
            f = 6 * u.d_in * u.d_out
        else:
            r = adapted.get((u.name, u.param, u.part))
            f = 4 * u.d_in * u.d_out + (6 * r * (u.d_in + u.d_out) if r else 0)
        total += u.uses * f
    return total
