"""What every weight of a causal LM is, found by structure. Presets, the coverage table and FLOP counts read this.

- Blocks: the outermost `nn.ModuleList`s of the text decoder (`model.get_decoder()`, else the base model), i.e.
  the repeated layers. Weights outside them (embeddings, final norm, LM head, a vision tower) are left alone by
  the presets and can still be named explicitly.
- Kinds of adaptable unit: `linear` (nn.Linear and subclasses), `conv1d` (transformers' Conv1D), `experts` (one
  matrix of a module holding 3-D expert weights; gate and up halves of `gate_up_proj` are separate units),
  `param` (a bare 2-D weight such as a router's: adaptable only when named).
- Roles, from what the enclosing modules are (nearest first): routed `experts` (3-D weights, or a ModuleList of
  expert MLPs beside a router), `ssm` (a token mixer holding a depthwise convolution: Mamba, Mamba-2,
  GatedDeltaNet, LFM2's short conv), `attn` (a module with `is_causal`, or an attention class), `mlp` (MLP /
  feed-forward / MoE classes, shared experts), `router` (in a MoE module: a matrix with one output per expert, or
  one output: a shared-expert gate). A matrix held by the block itself is `mlp` when it maps hidden -> other or
  other -> hidden (OPT's fc1/fc2), else `other`; the module path's names are only a last resort.
- Everything else in a block is listed with a reason (norms, biases, per-channel vectors, depthwise filters, SSM
  state matrices, routers). A weight matrix of any other kind is `unsupported`: applying LoRA then fails, naming
  it, unless `lora.exclude` names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from regretless.lora.experts import ExpertsLayout, experts_layout
from regretless.lora.layer import is_conv1d

TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "num_selected_experts",
              "experts_per_token", "moe_k")
ATTN_PARTS = {"self_attn", "attn", "attention", "self_attention", "cross_attn"}
MLP_PARTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "shared_expert", "shared_experts"}
REASONS = {
    "router": "router: routing stays as trained (the paper)",
    "bias": "bias of an adapted matrix: frozen (PEFT's bias='none')",
    "norm": "normalization weight",
    "vector": "per-channel or per-head vector (SSM A_log/D/dt_bias, attention sinks...): LoRA adapts matrices",
    "conv": "depthwise convolution filter: one short filter per channel, not a matrix",
    "ssm": "SSM state matrix (used element-wise, not a projection)",
    "embedding": "embedding table inside a block (a lookup, not a matmul)",
    "embed": "input embeddings (outside the blocks): left alone unless named",
    "head": "LM head (outside the blocks): left alone unless named",
    "outside": "outside the decoder's repeated blocks (final norm, vision tower, projector...)",
    "excluded": "excluded by lora.exclude",
    "preset": "not in the chosen preset",
    "adapter": "not in the adapter file",
    "unsupported": "a weight matrix regretless cannot adapt",
}


@dataclass(frozen=True)
class Unit:
    """One adaptable matrix, or the stack of one matrix over all experts."""

    name: str  # module path
    param: str | None  # parameter for experts / bare weights; None for linear and conv1d
    part: str | None  # "gate" or "up": one half of a fused gate_up_proj
    kind: str  # linear | conv1d | experts | param
    role: str  # attn | mlp | experts | ssm | other | router | head | outside
    d_in: int
    d_out: int
    n_experts: int = 1
    uses: float = 1.0  # passes of one token through this stack per forward: top_k for routed experts
    in_block: bool = True
    top_k: int = 1  # active experts per token, for routed experts (their rank is rank // top_k)

    @property
    def path(self) -> str:
        return f"{self.name}.{self.param}" if self.param else self.name


@dataclass(frozen=True)
class Left:
    name: str  # parameter path
    numel: int
    reason: str  # a key of REASONS


@dataclass
class Scan:
    units: list[Unit] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    layouts: dict[str, ExpertsLayout] = field(default_factory=dict)  # experts module path -> layout
    hidden: int = 0
    decoder: str = ""  # path of the text decoder ("" when it is the model itself)


def text_config(model: nn.Module):
    """The decoder's config: the text config of multimodal models (where they keep num_experts_per_tok)."""
    cfg = getattr(model, "config", None)
    dec = _decoder(model)
    dcfg = getattr(dec, "config", None)
    if dcfg is not None and dcfg is not cfg:
        return dcfg
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def config_top_k(model: nn.Module) -> int | None:
    """Active experts per token as the config states it, looked up in the text config, then the top level."""
    for cfg in (text_config(model), getattr(model, "config", None)):
        for key in TOP_K_KEYS:
            v = getattr(cfg, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _decoder(model: nn.Module) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(dec, nn.Module):
        return dec
    return getattr(model, "base_model", model)


def _block_lists(root: nn.Module, prefix: str) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists under `root` whose members hold parameters: the repeated blocks."""
    found: list[tuple[str, nn.ModuleList]] = []

    def walk(mod: nn.Module, path: str) -> None:
        for child_name, child in mod.named_children():
            p = f"{path}.{child_name}" if path else child_name
            if isinstance(child, nn.ModuleList) and any(True for _ in child.parameters()):
                found.append((p, child))
            else:
                walk(child, p)

    walk(root, prefix)
    return found


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == m.in_channels and m.in_channels > 1


def _has_depthwise(m: nn.Module) -> bool:
    return any(_depthwise(c) for c in m.children())


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(m).__name__.lower()


def _router_top_k(*mods: nn.Module) -> int | None:
    for m in mods:
        for key in TOP_K_KEYS:
            v = getattr(m, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


@dataclass
class _MoE:
    n_experts: int
    top_k: int | None
    experts: set[str]  # fused experts module paths or ModuleList paths
    routers: set[str]  # router module paths (one output per expert)
    gates: set[str]  # shared-expert gates (one output)


def _find_moe(block: nn.Module, bpath: str, hidden: int) -> dict[str, _MoE]:
    """MoE modules of a block: a module with an experts child (3-D weights, or a ModuleList of >= 2 alike MLPs)
    and a router child whose output has one row per expert."""
    out: dict[str, _MoE] = {}
    for path, m in block.named_modules(prefix=bpath):
        experts: dict[str, int] = {}
        for cname, c in m.named_children():
            cp = f"{path}.{cname}"
            three = [] if isinstance(c, nn.modules.conv._ConvNd) else [p for p in c.parameters(recurse=False)
                                                                         if p.dim() == 3]
            if three:
                experts[cp] = three[0].shape[0]
            elif isinstance(c, nn.ModuleList) and len(c) >= 2 and _alike(c):
                experts[cp] = len(c)
        if not experts:
            continue
        E = next(iter(experts.values()))
        routers, gates = set(), set()
        for cname, c in m.named_children():
            cp = f"{path}.{cname}"
            if cp in experts:
                continue
            w = getattr(c, "weight", None)
            if isinstance(w, nn.Parameter) and w.dim() == 2:
                d_out = w.shape[1] if is_conv1d(c) else w.shape[0]
                if d_out == E:
                    routers.add(cp)
                elif d_out == 1:
                    gates.add(cp)
        router_mods = [block.get_submodule(r[len(bpath) + 1:]) for r in sorted(routers)]
        if routers or any(not isinstance(block.get_submodule(e[len(bpath) + 1:]), nn.ModuleList)
                          for e in experts):
            out[path] = _MoE(E, _router_top_k(*router_mods, m), set(experts), routers, gates)
    return out


def _alike(ml: nn.ModuleList) -> bool:
    shapes = [tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in ml]
    return bool(shapes[0]) and all(s == shapes[0] for s in shapes) and \
        any(isinstance(x, nn.Linear) for x in ml[0].modules())


def _module_role(m: nn.Module, path: str, moe: dict[str, _MoE]) -> str | None:
    if path in moe:
        return "mlp"
    if _has_depthwise(m):
        return "ssm"
    cls = type(m).__name__.lower()
    if cls.endswith(("decoderlayer", "block", "layer")) or isinstance(m, (nn.ModuleList, nn.Sequential)):
        return None
    if getattr(m, "is_causal", None) is not None or "attention" in cls or cls.endswith("attn"):
        return "attn"
    if any(s in cls for s in ("mlp", "feedforward", "ffn", "expert", "moe")):
        return "mlp"
    return None


def _role(path: str, bpath: str, modules: dict[str, nn.Module], moe: dict[str, _MoE], d_in: int, d_out: int,
          hidden: int) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1, bpath.count(".") + 1, -1):  # ancestors, nearest first, block excluded
        anc = ".".join(parts[:i])
        if any(anc in mo.experts for mo in moe.values()):
            return "experts"
        r = _module_role(modules[anc], anc, moe)
        if r:
            return r
    rel = set(parts[bpath.count(".") + 1:-1])
    if rel & ATTN_PARTS:
        return "attn"
    if rel & MLP_PARTS:
        return "mlp"
    return "mlp" if (d_in == hidden) != (d_out == hidden) else "other"


def _hidden(model: nn.Module) -> int:
    cfg = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(emb, "embedding_dim", 0) or 0)


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(m) else (w.shape[1], w.shape[0])  # (d_in, d_out)


def scan(model: nn.Module) -> Scan:
    """Every weight of `model`: adaptable units (with kind and role) and what is left, with its reason."""
    from regretless.lora.experts import LoRAExperts
    from regretless.lora.layer import LoRALinear, LoRAParam

    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAExperts, LoRAParam)):
            from regretless.errors import UserError

            raise UserError("the model already has LoRA adapters; load or apply adapters on a fresh model")
    out = Scan(hidden=_hidden(model))
    names = {id(m): n for n, m in model.named_modules()}
    dec = _decoder(model)
    dec_path = names.get(id(dec), "")
    out.decoder = dec_path
    cfg_k = config_top_k(model)
    seen: set[int] = set()
    block_paths: list[str] = []
    for list_path, blocks in _block_lists(dec, dec_path):
        block_paths.append(list_path)
        for i, block in enumerate(blocks):
            _scan_block(out, block, f"{list_path}.{i}", cfg_k, seen)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, m in model.named_modules():
        if any(path == b or path.startswith(b + ".") for b in block_paths):
            continue
        role = "head" if m is head else "outside"
        if isinstance(m, nn.Linear) or is_conv1d(m):
            d_in, d_out = _linear_dims(m)
            out.units.append(Unit(path, None, None, "conv1d" if is_conv1d(m) else "linear", role, d_in, d_out,
                                  in_block=False))
        for n, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.left.append(Left(f"{path}.{n}", p.numel(), "embed" if m is emb else role))
    return out


def _scan_block(out: Scan, block: nn.Module, bpath: str, cfg_k: int | None, seen: set[int]) -> None:
    hidden = out.hidden
    modules = dict(block.named_modules(prefix=bpath))
    moe = _find_moe(block, bpath, hidden)
    routers = {r: mo for mo in moe.values() for r in mo.routers | mo.gates}
    expert_lists = {e: mo for mo in moe.values() for e in mo.experts}
    for path, m in modules.items():
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue

        def left(n: str, p, reason: str, path: str = path) -> None:  # each shared tensor is listed once
            if id(p) not in seen:
                seen.add(id(p))
                out.left.append(Left(f"{path}.{n}", p.numel(), reason))

        if path in routers:
            w = m.weight
            d_in, d_out = _linear_dims(m) if isinstance(m, nn.Linear) or is_conv1d(m) else (w.shape[1], w.shape[0])
            kind, param = ("linear", None) if isinstance(m, nn.Linear) else ("param", "weight")
            out.units.append(Unit(path, param, None, kind, "router", d_in, d_out))
            for n, p in own:
                left(n, p, "router")
        elif isinstance(m, nn.Linear) or is_conv1d(m):
            d_in, d_out = _linear_dims(m)
            role = _role(path, bpath, modules, moe, d_in, d_out, hidden)
            uses, k = 1.0, 1
            mo = next((mo for e, mo in expert_lists.items() if path.startswith(e + ".")), None)
            if mo is not None:
                role = "experts"
                k = mo.top_k or cfg_k or 1
                uses = k / mo.n_experts
            out.units.append(Unit(path, None, None, "conv1d" if is_conv1d(m) else "linear", role, d_in, d_out,
                                  uses=uses, top_k=k))
            for n, p in own:
                if n == "weight":
                    seen.add(id(p))
                else:
                    left(n, p, "bias")
        elif _depthwise(m):
            for n, p in own:
                left(n, p, "conv")
        elif any(p.dim() == 3 for _, p in own) and not isinstance(m, nn.modules.conv._ConvNd):
            layout = experts_layout(m)
            mo = expert_lists.get(path)
            if isinstance(layout, str):
                for n, p in own:
                    left(n, p, "unsupported" if p.dim() >= 2 else "vector")
                out.layouts[path] = layout  # type: ignore[assignment]  # the reason, for the error message
                continue
            out.layouts[path] = layout
            k = (mo.top_k if mo else None) or cfg_k or 1
            for param, part, d_in, d_out in layout.matrices().values():
                out.units.append(Unit(path, param, part, "experts", "experts", d_in, d_out, layout.n_experts,
                                      uses=float(min(k, layout.n_experts)), top_k=k))
            for n, p in own:
                if p.dim() == 3:
                    seen.add(id(p))
                else:
                    left(n, p, "bias")
        elif _is_norm(m):
            for n, p in own:
                left(n, p, "norm")
        elif isinstance(m, nn.Embedding):
            for n, p in own:
                left(n, p, "embedding")
        else:
            ssm = _has_depthwise(m)
            for n, p in own:
                left(n, p, "vector" if p.dim() <= 1 else ("ssm" if ssm else "unsupported"))


def unsupported(s: Scan) -> list[Left]:
    return [w for w in s.left if w.reason == "unsupported"]


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp.gate.weight` -> `model.layers.*.mlp.gate.weight` (rows of the coverage table)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def iter_matches(units: list[Unit], pattern: str) -> Iterator[Unit]:
    for u in units:
        if matches(u.name, u.param, pattern):
            yield u


def matches(name: str, param: str | None, pattern: str) -> bool:
    """A target or exclude pattern: a dotted suffix of the module path (or of `path.param`), or a full regex."""
    full = f"{name}.{param}" if param else name
    for s in (full, name):
        if s == pattern or s.endswith("." + pattern):
            return True
    try:
        return re.fullmatch(pattern, full) is not None or re.fullmatch(pattern, name) is not None
    except re.error:
        return False
