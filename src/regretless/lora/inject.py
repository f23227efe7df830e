"""Which matrices get LoRA, and wrapping them in place.

Presets select by role, on the structural scan of `regretless.lora.structure` (the paper's finding 4: attention-only
LoRA is not enough, use all weight matrices):
  all  = every matrix in the repeated blocks: attention, MLP, shared and routed experts, SSM projections, others
  mlp  = MLP matrices, shared and routed experts;   attn = attention matrices only
or explicit names (a dotted suffix of the module path, e.g. `q_proj`, `layers.0.mlp.up_proj`, or of `path.param`
for an expert or bare weight, e.g. `experts.down_proj`, `mlp.gate.weight`) or regexes (full match). Routers,
embeddings and the LM head are adapted only when named. `lora.exclude` takes the same patterns and leaves what
they match unadapted, including weights regretless cannot adapt (otherwise an error when a preset is used).
Routed experts get rank // top-k each (the paper's budget), the gate and up halves of a fused gate_up_proj each
their own adapter at that rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from regretless.errors import UserError
from regretless.lora.config import LoRAConfig
from regretless.lora.experts import LoRAExperts, check_supported, experts_layout, matrix_key
from regretless.lora.layer import LoRALinear, LoRAParam, group_shared_inputs
from regretless.lora.structure import REASONS, Left, Scan, layer_pattern, matches, scan

PRESETS = ("all", "mlp", "attn")
PRESET_ROLES = {"all": {"attn", "mlp", "experts", "ssm", "other"}, "mlp": {"mlp", "experts"}, "attn": {"attn"}}
WRAPPERS = (LoRALinear, LoRAExperts, LoRAParam)


@dataclass(frozen=True)
class Target:
    """One adapted matrix (or stack of expert matrices)."""

    name: str  # module path
    group: str  # role: attn | mlp | experts | ssm | other | router | head | outside
    param: str | None  # expert or bare parameter name; None for nn.Linear / Conv1D
    d_in: int
    d_out: int
    n_experts: int  # 1 for a dense matrix
    rank: int  # per expert for experts
    part: str | None = None  # gate | up: one half of a fused gate_up_proj
    kind: str = "linear"  # linear | conv1d | experts | param
    uses: float = 1.0  # passes of one token per forward (top_k for routed experts)

    @property
    def path(self) -> str:
        return f"{self.name}.{self.param}" if self.param else self.name

    @property
    def lora_params(self) -> int:
        return self.n_experts * self.rank * (self.d_in + self.d_out)

    @property
    def base_params(self) -> int:
        return self.n_experts * self.d_in * self.d_out


def _target_list(targets) -> list[str]:
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [str(t) for t in targets]


def _check_cfg(cfg: LoRAConfig) -> list[str]:
    if cfg.rank <= 0:
        raise UserError(f"lora.rank: expected a positive integer, got {cfg.rank}")
    if cfg.expert_rank is not None and cfg.expert_rank <= 0:
        raise UserError(f"lora.expert_rank: expected a positive integer, got {cfg.expert_rank}")
    wanted = _target_list(cfg.targets)
    if not wanted:
        raise UserError("lora.targets: empty; expected all, mlp, attn, or module names/regexes")
    return wanted


def plan(model: nn.Module, cfg: LoRAConfig) -> tuple[list[Target], list[Left], Scan]:
    """(targets, weights left unadapted with their reasons, the scan). Works on a model on the meta device."""
    wanted = _check_cfg(cfg)
    excludes = _target_list(cfg.exclude)
    s = scan(model)
    found: list[Target] = []
    left: list[Left] = list(s.left)
    unmatched = set(wanted)
    for u in s.units:
        hits = [w for w in wanted if (u.in_block and u.role in PRESET_ROLES[w] if w in PRESETS
                                      else matches(u.name, u.param, w))]
        unmatched -= set(hits)
        n = u.n_experts * u.d_in * u.d_out
        if any(matches(u.name, u.param, x) for x in excludes):
            left.append(Left(_weight_path(u), n, "excluded"))
            continue
        if not hits:
            if u.in_block and u.role not in ("router",):
                left.append(Left(_weight_path(u), n, "preset"))
            continue
        rank = (cfg.expert_rank or max(1, cfg.rank // u.top_k)) if u.role == "experts" else cfg.rank
        if rank > min(u.d_in, u.d_out):
            raise UserError(f"lora rank {rank} is larger than the smallest dimension of {u.path} "
                            f"({u.d_out}x{u.d_in}); expected rank <= {min(u.d_in, u.d_out)}, or leave it out "
                            "with lora.exclude")
        found.append(Target(u.name, u.role, u.param, u.d_in, u.d_out, u.n_experts, rank, u.part, u.kind, u.uses))
    if unmatched:
        shown = ", ".join(sorted({u.name.rsplit(".", 1)[-1] for u in s.units}))
        raise UserError(f"lora.targets: {min(unmatched)!r} matches no module; modules that exist: "
                        f"{shown} (or presets {', '.join(PRESETS)})")
    bad = [w for w in left if w.reason == "unsupported" and not any(matches(w.name, None, x) for x in excludes)]
    if bad and any(w in PRESETS for w in wanted):
        names = sorted({layer_pattern(w.name) for w in bad})
        why = sorted({str(v) for k, v in s.layouts.items() if isinstance(v, str)
                      and any(w.name.startswith(k + ".") for w in bad)})
        raise UserError(f"lora.targets={cfg.targets}: the blocks hold weight matrices regretless cannot adapt: "
                        f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                        f"{' (' + '; '.join(why) + ')' if why else ''}; leave them unadapted knowingly with "
                        f"lora.exclude={names[0]!r}")
    for i, w in enumerate(left):
        if w.reason == "unsupported" and any(matches(w.name, None, x) for x in excludes):
            left[i] = Left(w.name, w.numel, "excluded")
    return found, left, s


def _weight_path(u) -> str:
    """The parameter a unit stands for: `<module>.weight`, `<module>.<param>`, `<module>.gate_up_proj[gate]`."""
    return (f"{u.name}.{u.param}" if u.param else f"{u.name}.weight") + (f"[{u.part}]" if u.part else "")


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[Target]:
    """The matrices `cfg` selects, with their shapes and ranks. Works on a model on the meta device."""
    return plan(model, cfg)[0]


def apply_lora(model: nn.Module, cfg: LoRAConfig, targets: list[Target] | None = None,
               verbose: bool = False, scales: dict[str, float] | None = None) -> LoRAReport:
    """Freeze the model and wrap every target in place. Returns the coverage report.
    `scales` (keyed by `Target.path` + `[part]`) overrides cfg.scale(rank), e.g. for PEFT's alpha_pattern."""
    _check_causal_lm(model)
    if targets is None:
        targets, left, _ = plan(model, cfg)
    else:  # targets from an adapter file
        s = scan(model)
        chosen = {(t.name, t.param, t.part) for t in targets} | {(t.name, t.param, None) for t in targets}
        left = list(s.left) + [Left(_weight_path(u), u.n_experts * u.d_in * u.d_out,
                                    "adapter") for u in s.units if u.in_block and u.role != "router"
                               and (u.name, u.param, u.part) not in chosen and (u.name, u.param, None) not in chosen]
    model_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, list[Target]] = {}
    for t in targets:
        by_module.setdefault(t.name, []).append(t)

    def scale_of(t: Target) -> float:
        key = t.path + (f"[{t.part}]" if t.part else "")
        return scales[key] if scales and key in scales else cfg.scale(t.rank)

    wrapped_all: list[tuple[str, nn.Module]] = []
    for name, ts in by_module.items():
        module = model.get_submodule(name)
        kind = ts[0].kind
        if kind in ("linear", "conv1d"):
            wrapped: nn.Module = LoRALinear(module, ts[0].rank, scale_of(ts[0]))
        elif kind == "param":
            wrapped = LoRAParam(module, ts[0].param, ts[0].rank, scale_of(ts[0]))
        else:
            layout = experts_layout(module)
            why = layout if isinstance(layout, str) else check_supported(module, layout)
            if why is not None:
                raise UserError(f"{name}: experts of type {type(module).__name__} use a layout regretless "
                                f"cannot adapt ({why}); leave them out with lora.exclude={name!r}")
            keys = {matrix_key(t.param, t.part): t for t in ts}
            wrapped = LoRAExperts(module, layout, {k: t.rank for k, t in keys.items()},
                                  {k: scale_of(t) for k, t in keys.items()})
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        wrapped_all.append((name, wrapped))
    _mark_shared(model, wrapped_all)
    group_shared_inputs(model)  # q/k/v and gate/up share one fused A projection at run time (layer.py)
    report = LoRAReport(list(targets), model_params, left)
    if verbose:
        print(report.table())
    return report


def _mark_shared(model: nn.Module, wrapped: list[tuple[str, nn.Module]]) -> None:
    """Record on each dense wrapper whose base weight another module also holds (a tied LM head) who that is."""
    holders: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(n)
    for name, m in wrapped:
        if isinstance(m, (LoRALinear, LoRAParam)):
            w = m.base_layer.weight if isinstance(m, LoRALinear) else getattr(m.base_layer, m.param)
            others = [n for n in holders.get(id(w), []) if not n.startswith(name + ".")]
            m.tied_to = others[0] if others else None


def _check_causal_lm(model: nn.Module) -> None:
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UserError(f"{type(model).__name__} is not a causal language model (no LM head); "
                        "expected a transformers *ForCausalLM model")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAExperts | LoRAParam]]:
    for name, m in model.named_modules():
        if isinstance(m, WRAPPERS):
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


@dataclass
class LoRAReport:
    targets: list[Target]
    model_params: int
    left: list[Left] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(t.lora_params for t in self.targets)

    def rows(self) -> list[dict]:
        out: dict[str, dict] = {}
        seen: dict[str, set] = {}
        for t in self.targets:
            r = out.setdefault(t.group, {"group": t.group, "modules": 0, "matrices": 0, "trainable": 0,
                                         "base": 0, "ranks": set()})
            if t.name not in seen.setdefault(t.group, set()):
                seen[t.group].add(t.name)
                r["modules"] += 1
            r["matrices"] += t.n_experts
            r["trainable"] += t.lora_params
            r["base"] += t.base_params
            r["ranks"].add(t.rank)
        return [dict(r, ranks=sorted(r["ranks"])) for r in out.values()]

    def left_rows(self) -> list[dict]:
        """Unadapted weights grouped by reason and by path with layer indices as `*`."""
        out: dict[tuple[str, str], dict] = {}
        for w in self.left:
            key = (w.reason, layer_pattern(w.name))
            r = out.setdefault(key, {"reason": w.reason, "pattern": key[1], "tensors": 0, "params": 0})
            r["tensors"] += 1
            r["params"] += w.numel
        return sorted(out.values(), key=lambda r: (r["reason"], r["pattern"]))

    def table(self) -> str:
        lines = [f"{'group':<8} {'modules':>7} {'matrices':>8} {'rank':>6} {'trainable':>12} {'% of model':>10}"]
        for r in self.rows():
            rank = "/".join(str(x) for x in r["ranks"])
            lines.append(f"{r['group']:<8} {r['modules']:>7} {r['matrices']:>8} {rank:>6} {r['trainable']:>12,} "
                         f"{100 * r['trainable'] / max(1, self.model_params):>9.3f}%")
        n_mod = len({t.name for t in self.targets})
        lines.append(f"{'total':<8} {n_mod:>7} {sum(t.n_experts for t in self.targets):>8} {'':>6} "
                     f"{self.trainable:>12,} {100 * self.trainable / max(1, self.model_params):>9.3f}%")
        rows = self.left_rows()
        if rows:
            lines.append("left unadapted:")
            for reason in dict.fromkeys(r["reason"] for r in rows):
                group = [r for r in rows if r["reason"] == reason]
                lines.append(f"  {REASONS[reason]}: {sum(r['params'] for r in group):,} params in "
                             f"{sum(r['tensors'] for r in group)} tensors")
                for r in group:
                    lines.append(f"    {r['pattern']}: {r['tensors']} tensors, {r['params']:,} params")
        return "\n".join(lines)
