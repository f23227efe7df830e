"""Parameter and FLOP counts, per target group, for LoRA and FullFT. Works on models built on the meta device,
so `recommend` can count a 70B model from its config without weights.

FLOPs (training, per token, matmuls only; attention scores and element-wise ops left out, as in the paper):
  FullFT, per d_out×d_in matrix: forward 2·d_in·d_out, input gradient 2·d_in·d_out, weight gradient
  2·d_in·d_out  ->  6·d_in·d_out   (the paper's 3N² multiply-adds for N×N).
  LoRA on that matrix: forward 2·d_in·d_out + 2r(d_in+d_out), input gradient the same, and gradients of A and B
  2r(d_in+d_out)  ->  4·d_in·d_out + 6r(d_in+d_out)   (the paper's 2N² + 6Nr multiply-adds).
  Frozen matrices under LoRA still pass gradients back: 4·d_in·d_out. Routed experts count top_k of E.
"""

from __future__ import annotations

from torch import nn

from regretless.lora.config import LoRAConfig
from regretless.lora.experts import EXPERT_PARAMS, expert_dims, is_fused_experts
from regretless.lora.inject import find_targets, group_of, top_k

GROUPS = ("attn", "mlp", "experts", "embed", "head", "other")


def _matrices(model: nn.Module):
    """(name, param, group, d_in, d_out, n_experts) for every weight matrix that a token passes through."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            group = "head" if m is out_emb else group_of(name)
            yield name, None, group, m.in_features, m.out_features, 1
        elif is_fused_experts(m):
            for p in EXPERT_PARAMS:
                E, d_in, d_out = expert_dims(m, p)
                yield name, p, "experts", d_in, d_out, E


def count_params(model: nn.Module, lora: LoRAConfig | None) -> dict[str, int]:
    """Trainable parameters by group, plus `total` and `model_total`. FullFT trains every parameter."""
    counts = dict.fromkeys(GROUPS, 0)
    model_total = sum(p.numel() for p in model.parameters())
    if lora is None:
        seen = set()
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            mod = name.rsplit(".", 1)[0]
            group = "embed" if p.dim() == 2 and "embed" in name else group_of(mod)
            if "lm_head" in name:
                group = "head"
            counts[group] += p.numel()
    else:
        for t in find_targets(model, lora):
            counts[t.group if t.group in counts else "other"] += t.lora_params
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(counts.values())
    counts["model_total"] = model_total
    return counts


def flops_per_token(model: nn.Module, lora: LoRAConfig | None) -> float:
    """Training FLOPs per token of the model's matmuls (see the module docstring)."""
    k = top_k(getattr(model, "config", None))
    adapted = {}
    if lora is not None:
        adapted = {(t.name, t.param): t.rank for t in find_targets(model, lora)}
    total = 0.0
    for name, param, _group, d_in, d_out, n in _matrices(model):
        active = min(k, n) if n > 1 else 1
        if lora is None:
            f = 6 * d_in * d_out
        else:
            r = adapted.get((name, param))
            f = 4 * d_in * d_out + (6 * r * (d_in + d_out) if r else 0)
        total += active * f
    return total
