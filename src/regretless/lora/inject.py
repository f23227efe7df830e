"""Which matrices get LoRA, and wrapping them in place.

Presets (the paper's finding 4: attention-only LoRA is not enough, use all weight matrices):
  all  = every attention and MLP projection, and every routed expert of MoE layers
  mlp  = MLP projections and routed experts;   attn = attention projections only
or explicit module names (matched as a dotted suffix, e.g. `q_proj`, `layers.0.mlp.up_proj`) or regexes
(full match on the module path, or `path.param` for one fused expert parameter, e.g. `.*experts\\.down_proj`).
Routers, embeddings and the LM head are never adapted unless named explicitly.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from regretless.errors import UserError
from regretless.lora.config import LoRAConfig
from regretless.lora.experts import EXPERT_PARAMS, LoRAExperts, check_supported, expert_dims, is_fused_experts
from regretless.lora.layer import LoRALinear

PRESETS = ("all", "mlp", "attn")
ATTN_PARTS = {"self_attn", "attn", "attention", "self_attention", "cross_attn", "linear_attn"}
MLP_PARTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "shared_expert", "shared_experts"}
ROUTER_NAMES = {"gate", "router", "shared_expert_gate", "w_gate", "wg"}
HEAD_NAMES = {"lm_head", "embed_out", "output"}


@dataclass(frozen=True)
class Target:
    """One adapted matrix (or stack of expert matrices)."""

    name: str  # module path
    group: str  # attn | mlp | experts | other
    param: str | None  # fused expert parameter name, None for nn.Linear
    d_in: int
    d_out: int
    n_experts: int  # 1 for a dense matrix
    rank: int  # per expert for experts

    @property
    def lora_params(self) -> int:
        return self.n_experts * self.rank * (self.d_in + self.d_out)

    @property
    def base_params(self) -> int:
        return self.n_experts * self.d_in * self.d_out


def top_k(config) -> int:
    for key in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "num_selected_experts"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1


def group_of(name: str) -> str:
    parts = name.split(".")
    if "experts" in parts:
        return "experts"
    if any(p in ATTN_PARTS for p in parts):
        return "attn"
    if any(p in MLP_PARTS for p in parts):
        return "mlp"
    return "other"


def _is_excluded(name: str, module: nn.Module, model: nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1]
    if last in ROUTER_NAMES or last in HEAD_NAMES:
        return True
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is out


def candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """(module path, module, fused-expert parameter or None) for every adaptable matrix."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAExperts)):
            raise UserError("the model already has LoRA adapters; load or apply adapters on a fresh model")
        if isinstance(module, nn.Linear):
            yield name, module, None
        elif is_fused_experts(module):
            for p in EXPERT_PARAMS:
                yield name, module, p


def _matches(name: str, param: str | None, pattern: str) -> bool:
    full = f"{name}.{param}" if param else name
    if full == pattern or full.endswith("." + pattern) or name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, full) is not None or re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _target_list(targets) -> list[str]:
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [str(t) for t in targets]


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[Target]:
    """The matrices `cfg` selects, with their shapes and ranks. Works on a model on the meta device."""
    if cfg.rank <= 0:
        raise UserError(f"lora.rank: expected a positive integer, got {cfg.rank}")
    if cfg.expert_rank is not None and cfg.expert_rank <= 0:
        raise UserError(f"lora.expert_rank: expected a positive integer, got {cfg.expert_rank}")
    wanted = _target_list(cfg.targets)
    if not wanted:
        raise UserError("lora.targets: empty; expected all, mlp, attn, or module names/regexes")
    expert_rank = cfg.expert_rank or max(1, cfg.rank // top_k(getattr(model, "config", None)))
    found: list[Target] = []
    unmatched = set(wanted)
    for name, module, param in candidates(model):
        group = group_of(name)
        hit = None
        for w in wanted:
            if w in PRESETS:
                ok = (not _is_excluded(name, module, model)) and (
                    (w == "all" and group in ("attn", "mlp", "experts"))
                    or (w == "mlp" and group in ("mlp", "experts"))
                    or (w == "attn" and group == "attn"))
            else:
                ok = _matches(name, param, w)
            if ok:
                hit = w
                unmatched.discard(w)
        if hit is None:
            continue
        if param is None:
            d_in, d_out, n = module.in_features, module.out_features, 1
        else:
            n, d_in, d_out = expert_dims(module, param)
        rank = expert_rank if group == "experts" else cfg.rank
        if rank > min(d_in, d_out):
            where = f"{name}.{param}" if param else name
            raise UserError(f"lora rank {rank} is larger than the smallest dimension of {where} "
                            f"({d_out}x{d_in}); expected rank <= {min(d_in, d_out)}")
        found.append(Target(name, group, param, d_in, d_out, n, rank))
    if unmatched:
        names = sorted({n for n, _, _ in candidates(model)})
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
        raise UserError(f"lora.targets: {min(unmatched)!r} matches no module; modules that exist: "
                        f"{shown} (or presets {', '.join(PRESETS)})")
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig, targets: list[Target] | None = None,
               verbose: bool = False) -> LoRAReport:
    """Freeze the model and wrap every target in place. Returns the coverage report."""
    _check_causal_lm(model)
    targets = find_targets(model, cfg) if targets is None else targets
    model_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, list[Target]] = {}
    for t in targets:
        by_module.setdefault(t.name, []).append(t)
    for name, ts in by_module.items():
        module = model.get_submodule(name)
        if ts[0].param is None:
            wrapped: nn.Module = LoRALinear(module, ts[0].rank, cfg.scale(ts[0].rank))
        else:
            why = check_supported(module)
            if why is not None:
                raise UserError(f"{name}: fused experts of type {type(module).__name__} use a layout regretless "
                                f"cannot adapt ({why}); exclude them with lora.targets")
            wrapped = LoRAExperts(module, {t.param: t.rank for t in ts}, {t.param: cfg.scale(t.rank) for t in ts})
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
    report = LoRAReport(targets, model_params)
    if verbose:
        print(report.table())
    return report


def _check_causal_lm(model: nn.Module) -> None:
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UserError(f"{type(model).__name__} is not a causal language model (no LM head); "
                        "expected a transformers *ForCausalLM model")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAExperts]]:
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAExperts)):
            yield name, m


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n or n.startswith("lora_")]


def param_groups(model: nn.Module, lr: float, lr_b_mult: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups: LoRA A's and B's (B at lr·lr_b_mult for LoRA+), or every parameter for FullFT."""
    lora = lora_parameters(model)
    if not lora:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}]
    a = [p for n, p in lora if ".lora_A" in n or n.startswith("lora_A")]
    b = [p for n, p in lora if ".lora_B" in n or n.startswith("lora_B")]
    return [{"params": a, "lr": lr, "weight_decay": weight_decay, "name": "lora_A"},
            {"params": b, "lr": lr * lr_b_mult, "weight_decay": weight_decay, "name": "lora_B"}]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model's forward (e.g. the reference policy for a KL term) without a second copy of the weights."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.enabled = b


@dataclass
class LoRAReport:
    targets: list[Target]
    model_params: int

    @property
    def trainable(self) -> int:
        return sum(t.lora_params for t in self.targets)

    def rows(self) -> list[dict]:
        out: dict[str, dict] = {}
        for t in self.targets:
            r = out.setdefault(t.group, {"group": t.group, "modules": 0, "matrices": 0, "trainable": 0,
                                         "base": 0, "ranks": set()})
            r["modules"] += 1
            r["matrices"] += t.n_experts
            r["trainable"] += t.lora_params
            r["base"] += t.base_params
            r["ranks"].add(t.rank)
        return [dict(r, ranks=sorted(r["ranks"])) for r in out.values()]

    def table(self) -> str:
        lines = [f"{'group':<8} {'modules':>7} {'matrices':>8} {'rank':>6} {'trainable':>12} {'% of model':>10}"]
        for r in self.rows():
            rank = "/".join(str(x) for x in r["ranks"])
            lines.append(f"{r['group']:<8} {r['modules']:>7} {r['matrices']:>8} {rank:>6} {r['trainable']:>12,} "
                         f"{100 * r['trainable'] / max(1, self.model_params):>9.3f}%")
        lines.append(f"{'total':<8} {len(self.targets):>7} {sum(t.n_experts for t in self.targets):>8} {'':>6} "
                     f"{self.trainable:>12,} {100 * self.trainable / max(1, self.model_params):>9.3f}%")
        return "\n".join(lines)
