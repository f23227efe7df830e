"""PEFT's adapter layout, both ways: tensor shapes, key names, rank/alpha patterns, transformers-4 expert names.

What `peft.PeftModel` (checked against peft 0.21) reads and writes:
  dense (Linear, Conv1D, and a bare 2-D weight such as a router's `gate.weight`):
      base_model.model.<module>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r)
  3-D experts: one `ParamWrapper` per adapted parameter, nested in the order the parameters are registered on the
      module (the first innermost): gate_up_proj of a module adapting gate_up_proj and down_proj lives at
      <module>.base_layer.lora_A.weight. A is (E·R, in) expert-major, B is (out, R·E) with the expert index
      fastest. PEFT reads (E, a, b) as in=a, out=b when the module says is_transposed=True, else in=b, out=a; where
      that disagrees with the true layout (Llama4 stores (E, in, out) without saying so) A and B swap roles.
  The gate and up halves of a fused gate_up_proj, each with its own rank-r adapter, are written as one rank-2r
  PEFT adapter whose B is block-diagonal ([B_gate 0; 0 B_up] on the gate and up rows), exactly what PEFT's own
  conversion of transformers-4 adapters builds; alpha_pattern keeps the scale. Reading, such a B is split again.
Per-matrix ranks and scales go into `rank_pattern` / `alpha_pattern`, keyed by the exact module (or
`module.param`) path: PEFT matches re.match(rf"(.*\\.)?({p})$", key), first pattern first.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from regretless.lora.experts import ExpertsLayout, LoRAExperts, matrix_key

PREFIX = "base_model.model."


def peft_swapped(module: nn.Module, layout: ExpertsLayout) -> bool:
    """True when PEFT's reading of the 3-D parameters' in/out disagrees with the true layout."""
    return bool(getattr(module, "is_transposed", False)) != layout.transposed


def expert_key(name: str, adapted: list[str], param: str) -> str:
    """Tensor prefix of one adapted expert parameter (PEFT nests wrappers: the first registered is innermost)."""
    depth = len(adapted) - 1 - adapted.index(param)
    return PREFIX + name + ".base_layer" * depth


def experts_to_peft(m: LoRAExperts, param: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A (E·R, in_p), B (out_p, R·E), R, scale) of one base parameter in PEFT's layout."""
    lay = m.layout
    keys = [k for k, (p, *_) in m.specs.items() if p == param]
    E = lay.n_experts
    s0 = m.scales[keys[0]]
    As = []
    full_out = getattr(m.base_layer, param).shape[2 if lay.transposed else 1]
    R = sum(m.ranks[k] for k in keys)
    col = 0
    B = torch.zeros(E, full_out, R)
    for k in keys:
        part = m.specs[k][1]
        r = m.ranks[k]
        As.append(m.lora_A(k).detach().float().cpu())  # (E, r, in)
        b = m.lora_B(k).detach().float().cpu() * (m.scales[k] / s0)  # (E, out_k, r), scale folded into B
        if part is None:
            B[:, :, col:col + r] = b
        else:
            B[:, lay.rows(part), col:col + r] = b
        col += r
    A = torch.cat(As, dim=1)  # (E, R, in)
    if peft_swapped(m.base_layer, lay):
        A, B = B.transpose(1, 2), A.transpose(1, 2)  # ΔWᵀ = Aᵀ·Bᵀ: PEFT's A is our Bᵀ, its B our Aᵀ
    return (A.reshape(E * R, A.shape[-1]).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], R * E).contiguous(),
            R, s0)


def experts_from_peft(module: nn.Module, layout: ExpertsLayout, param: str, A_flat: torch.Tensor,
                      B_flat: torch.Tensor, split: tuple[int, int] | None
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT tensors of one parameter -> {matrix key: (A (E, r, in), B (E, out, r))}. `split` = (gate rank, up
    rank) of a gate_up_proj saved split (the first ranks are the gate's); None detects PEFT's block-diagonal B with
    equal halves, else the adapter stays one fused gate_up adapter."""
    E = layout.n_experts
    R = A_flat.shape[0] // E
    A = A_flat.reshape(E, R, -1).float()
    B = B_flat.reshape(B_flat.shape[0], R, E).permute(2, 0, 1).float()  # (E, out_p, R)
    if peft_swapped(module, layout):
        A, B = B.transpose(1, 2), A.transpose(1, 2)
    if param != "gate_up_proj" or not layout.gated:
        return {matrix_key(param, None): (A.contiguous(), B.contiguous())}
    if split is None and is_block_diagonal(B, layout):
        split = (R // 2, R - R // 2)
    if split is None or sum(split) != R:
        return {"gate_up": (A.contiguous(), B.contiguous())}
    r = split[0]
    out = {}
    for part, cols in (("gate", slice(0, r)), ("up", slice(r, R))):
        if cols.stop > cols.start:
            out[part] = (A[:, cols].contiguous(), B[:, layout.rows(part), cols].contiguous())
    return out


def is_block_diagonal(B: torch.Tensor, layout: ExpertsLayout) -> bool:
    """B (E, 2I, R) of a fused gate_up adapter is [B_gate 0; 0 B_up]: gate rows use the first R/2 ranks only, up
    rows the rest, and both blocks carry something (an all-zero B stays a plain fused adapter)."""
    R = B.shape[-1]
    if R % 2:
        return False
    r = R // 2
    g, u = B[:, layout.rows("gate")], B[:, layout.rows("up")]
    return bool((g[..., r:] == 0).all() and (u[..., :r] == 0).all() and g[..., :r].any() and u[..., r:].any())


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def patterns(entries: list[tuple[str, int, float]], r: int, alpha: float, rslora: bool) -> tuple[dict, dict]:
    """rank_pattern and alpha_pattern for (PEFT key, rank, scale) entries that differ from the global r / alpha."""
    rank_pattern, alpha_pattern = {}, {}
    for key, rank, scale in entries:
        pat = re.escape(key)
        if rank != r:
            rank_pattern[pat] = rank
        implied = scale * (math.sqrt(rank) if rslora else rank)
        if not math.isclose(implied, alpha, rel_tol=1e-9, abs_tol=0.0):
            alpha_pattern[pat] = _num(implied)
    return rank_pattern, alpha_pattern


def pattern_value(pats: dict, key: str, default: float) -> float:
    r"""PEFT's rank_pattern/alpha_pattern rule (peft.utils.other.get_pattern_key): the first pattern p with
    re.match(rf"(.*\.)?({p})$", key) wins."""
    for p, v in pats.items():
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return v
        except re.error:
            continue
    return default


def peft_renamed_leaves(model: nn.Module) -> set[str]:
    """Leaf names that PEFT, for this model type, moves from target_modules to fused expert parameters when it
    loads an adapter (its transformers-4 -> 5 conversion: e.g. `gate_proj`, `up_proj`, `down_proj`, `gate` on
    Qwen3-MoE). Dense modules with these names are written as target_parameters (`<module>.weight`) instead, which
    PEFT loads as the same LoRA without renaming them."""
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return set()
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt is None or get_checkpoint_conversion_mapping(mt) is None:
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(mt, ""), {}))


# ---- transformers-4 per-expert names (experts.N.gate_proj ...) <-> fused 3-D parameters

GENERIC_LEAVES = {"gate_proj": ("gate_up_proj", "gate"), "w1": ("gate_up_proj", "gate"),
                  "up_proj": ("gate_up_proj", "up"), "w3": ("gate_up_proj", "up"),
                  "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


def _literal(pattern: str) -> str | None:
    """A regex used as a plain string (only escaped or bare dots), or None."""
    s = pattern.replace("\\.", ".")
    return None if re.search(r"[\\^$*+?()\[\]{}|]", s) else s


def v4_mapping(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, tuple[str, str | None]]]:
    """(renamings [(regex, replacement)], {transformers-4 expert leaf: (fused parameter, part)}) from transformers'
    own checkpoint conversion for this model type; the generic names (gate_proj/w1, up_proj/w3, down_proj/w2)
    where it has none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming
    except ImportError:
        return [], dict(GENERIC_LEAVES)
    conv = get_checkpoint_conversion_mapping(getattr(model.config, "model_type", None)) or []
    renames: list[tuple[str, str]] = []
    leaves: dict[str, tuple[str, str | None]] = {}
    for c in conv:
        if isinstance(c, WeightRenaming):
            renames += list(zip(c.source_patterns, c.target_patterns))
        elif isinstance(c, WeightConverter) and any(isinstance(o, MergeModulelist) for o in c.operations):
            param = c.target_patterns[0].rsplit(".", 1)[-1]
            srcs = [re.search(r"experts\.\*\.([^.]+)\.weight$", s) for s in c.source_patterns]
            if not all(srcs):
                continue
            parts = ("gate", "up") if len(srcs) == 2 and param == "gate_up_proj" else (None,)
            for mt, part in zip(srcs, parts):
                leaves[mt.group(1)] = (param, part)
    return renames, leaves or dict(GENERIC_LEAVES)


def v4_to_fused(model: nn.Module, path: str) -> tuple[str, int, str] | None:
    """`...block_sparse_moe.experts.3.w1` -> (`...mlp.experts`, 3, `w1`) when the renamed experts module exists."""
    mt = re.fullmatch(r"(.*\.experts)\.(\d+)\.([^.]+)", path)
    if not mt:
        return None
    experts = mt.group(1)
    for src, tgt in v4_mapping(model)[0]:
        try:
            experts = re.sub(src, tgt, experts)
        except re.error:
            continue
    try:
        model.get_submodule(experts)
    except AttributeError:
        return None
    return experts, int(mt.group(2)), mt.group(3)


def fused_to_v4(model: nn.Module, experts_path: str) -> tuple[str, dict[tuple[str, str | None], str]]:
    """(transformers-4 path of the experts ModuleList, {(param, part): leaf name}) for the per-expert export.
    Mid-path renames (`.block_sparse_moe.` -> `.mlp.`) are undone; root-prefix renames are kept as in v5."""
    renames, leaves = v4_mapping(model)
    path = experts_path
    for src, tgt in renames:
        s, t = _literal(src), _literal(tgt)
        if s and t and t.startswith(".") and t in path:
            cand = path.replace(t, s)
            if re.sub(src, tgt, cand) == experts_path:
                path = cand
    by_matrix: dict[tuple[str, str | None], str] = {}
    for leaf, pp in leaves.items():
        by_matrix.setdefault(pp, leaf)
    return path, by_matrix
