"""Adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`): save, load, per-expert export.

`save_adapter` writes what PEFT loads with the same logits: r, lora_alpha and use_rslora from the config handed
in, and a rank_pattern / alpha_pattern entry for every matrix whose rank or scale differs, so an adapter loaded
from PEFT (with its own patterns) and saved again is the same adapter. `load_adapter` reads adapters saved by
regretless or by PEFT >= 0.17: dense `all-linear`, fused experts through `target_parameters` (block-diagonal
gate_up from PEFT's transformers-4 conversion, or a plain fused rank), PEFT's router adapter (`gate.weight`), and
the transformers-4 per-expert layout (`experts.N.gate_proj`, Mixtral's `block_sparse_moe.experts.N.w1`) mapped
onto fused experts through transformers' own checkpoint conversion. `export_per_expert` writes that per-expert
layout, for serving stacks that do not read `target_parameters`. Layout details: `regretless.lora.peft_format`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from regretless.errors import UserError
from regretless.lora import peft_format as pf
from regretless.lora.config import LoRAConfig
from regretless.lora.experts import ExpertsLayout, LoRAExperts, experts_layout, matrix_key
from regretless.lora.inject import Target, apply_lora, lora_modules
from regretless.lora.layer import LoRALinear, LoRAParam, is_conv1d
from regretless.lora.structure import scan

PREFIX = pf.PREFIX
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# ---- save


def _tensors(model: nn.Module, per_expert: bool) -> tuple[dict[str, torch.Tensor], list, list[str]]:
    """(PEFT tensors, [(PEFT key, rank, scale, 'module'|'param')], {experts module: (gate rank, up rank)} of those
    saved with split gate/up)."""
    sd: dict[str, torch.Tensor] = {}
    entries: list[tuple[str, int, float, str]] = []
    split: dict[str, tuple[int, int]] = {}
    renamed = pf.peft_renamed_leaves(model)
    for name, m in lora_modules(model):
        if isinstance(m, (LoRALinear, LoRAParam)):
            sd[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
            sd[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
            if isinstance(m, LoRAParam):
                entries.append((f"{name}.{m.param}", m.rank, m.scale, "param"))
            elif name.rsplit(".", 1)[-1] in renamed:
                entries.append((f"{name}.weight", m.rank, m.scale, "param"))
            else:
                entries.append((name, m.rank, m.scale, "module"))
            continue
        if {"gate", "up"} & set(m.specs):
            split[name] = (m.ranks.get("gate", 0), m.ranks.get("up", 0))
        if per_expert:
            v4_path, leaves = pf.fused_to_v4(model, name)
            for key, (param, part, *_) in m.specs.items():
                A, B = m.lora_A(key).detach(), m.lora_B(key).detach()  # (E, r, in), (E, out, r)
                # a fused gate_up adapter (PEFT's one rank for both halves) becomes gate and up adapters that
                # share its A, each with its half of B's rows: the same ΔW
                halves = [(p, B[:, m.layout.rows(p)]) for p in ("gate", "up")] if key == "gate_up" else [(part, B)]
                for half, Bh in halves:
                    leaf = leaves.get((param, half)) or ("up_proj" if param == "up_proj" else f"{half or key}_proj")
                    for e in range(m.num_experts):
                        sd[f"{PREFIX}{v4_path}.{e}.{leaf}.lora_A.weight"] = A[e].clone()  # own storage each
                        sd[f"{PREFIX}{v4_path}.{e}.{leaf}.lora_B.weight"] = Bh[e].clone()
                        entries.append((f"{v4_path}.{e}.{leaf}", m.ranks[key], m.scales[key], "module"))
            continue
        for p in m.adapted:
            A, B, R, s = pf.experts_to_peft(m, p)
            key = pf.expert_key(name, m.adapted, p)
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = A, B
            entries.append((f"{name}.{p}", R, s, "param"))
    return {k: v.to("cpu", torch.float32).contiguous() for k, v in sd.items()}, entries, split


def adapter_config(model: nn.Module, cfg: LoRAConfig, base_model: str, per_expert: bool = False) -> dict:
    _, entries, _ = _tensors(model, per_expert)
    return _config(model, entries, cfg, base_model, per_expert)


def _config(model: nn.Module, entries: list, cfg: LoRAConfig, base_model: str, per_expert: bool) -> dict:
    r = cfg.rank
    if per_expert:  # PEFT's own conversion gives fused experts the global r: make it the experts' rank
        ex = [rank for key, rank, _s, _v in entries if ".experts." in key]
        r = ex[0] if ex else r
    rank_pattern, alpha_pattern = pf.patterns([(k, rk, s) for k, rk, s, _ in entries], r, cfg.alpha, cfg.rslora)
    modules = sorted(k for k, *_, via in entries if via == "module")
    params = sorted(k for k, *_, via in entries if via == "param")
    if per_expert:
        target_modules: list[str] | str = sorted({k.rsplit(".", 1)[-1] for k in modules})
    elif pf.peft_renamed_leaves(model):
        target_modules = modules  # exact paths as a list: PEFT's conversion leaves them as they are
    else:  # an exact-path regex keeps PEFT from adapting a same-named module that regretless left alone
        target_modules = "^(" + "|".join(re.escape(n) for n in modules) + ")$" if modules else []
    conv1d = any(is_conv1d(m.base_layer) for _, m in lora_modules(model) if isinstance(m, LoRALinear))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": 0.0, "bias": "none",
        "target_modules": target_modules, "target_parameters": params or None, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "fan_in_fan_out": conv1d, "init_lora_weights": True,
        "modules_to_save": None, "use_dora": False, "inference_mode": True,
    }


def _regretless_metadata(cfg: LoRAConfig, split: dict[str, tuple[int, int]]) -> str:
    """How regretless chose the targets; kept in the safetensors header, where PEFT does not look."""
    def as_list(v):
        return list(v) if not isinstance(v, str) else v
    return json.dumps({"targets": as_list(cfg.targets), "exclude": as_list(cfg.exclude), "lr_b_mult": cfg.lr_b_mult,
                       "expert_rank": cfg.expert_rank, "split_gate_up": split})


def _write(out_dir: Path, tensors: dict, config: dict, metadata: str) -> Path:
    """Write the adapter atomically: a temp folder beside `out_dir`, then a rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "regretless": metadata})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, base_model: str = "") -> Path:
    """Write the adapter in PEFT's format, atomically. Fused experts are saved through target_parameters."""
    tensors, entries, split = _tensors(model, per_expert=False)
    return _write(Path(out_dir), tensors, _config(model, entries, cfg, base_model, False),
                  _regretless_metadata(cfg, split))


def export_per_expert(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, base_model: str = "") -> Path:
    """Write the adapter with fused experts as per-expert modules (`experts.N.gate_proj` / `up_proj` /
    `down_proj`, or the model type's transformers-4 names such as Mixtral's `block_sparse_moe.experts.N.w1`), for
    serving stacks that read only target_modules. regretless and PEFT (on transformers-5 models whose experts PEFT
    converts) load it back as the same adapter."""
    tensors, entries, split = _tensors(model, per_expert=True)
    return _write(Path(out_dir), tensors, _config(model, entries, cfg, base_model, True),
                  _regretless_metadata(cfg, split))


# ---- read and load


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise UserError(f"{f}: missing; expected a PEFT adapter folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{cfg_file}: not a text file; expected a JSON adapter config") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_file}: expected a LoRA adapter config (peft_type LORA)")
    for key, bad in (("use_dora", True), ("lora_bias", True)):
        if config.get(key) == bad:
            raise UserError(f"{cfg_file}: {key}={bad} is not supported; expected plain LoRA")
    if config.get("modules_to_save"):
        raise UserError(f"{cfg_file}: modules_to_save={config['modules_to_save']} is not supported")
    for key, default in (("r", 8), ("lora_alpha", 8)):
        v = config.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise UserError(f"{cfg_file}: {key}={v!r}; expected a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise UserError(f"{cfg_file}: {key} must be a mapping of module patterns to numbers")
    try:
        weights = load_file(str(w_file))
        with safe_open(str(w_file), "pt") as f:
            meta = (f.metadata() or {}).get("regretless")
        config["_regretless"] = json.loads(meta) if meta else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{w_file}: corrupt or unreadable safetensors file ({e})") from None
    return config, weights


def _split_key(key: str) -> tuple[str, str]:
    """(tensor prefix without `base_model.model.`, "A" or "B") of an adapter tensor name."""
    key = key.removeprefix(PREFIX)
    for ab in ("A", "B"):
        for suffix in (f".lora_{ab}.weight", f".lora_{ab}.default.weight"):
            if key.endswith(suffix):
                return key[: -len(suffix)], ab
    raise UserError(f"unexpected tensor {key!r} in adapter; expected only lora_A/lora_B weights")


class _Plan:
    """What an adapter file adapts: targets, their weights in regretless's layout, their scales."""

    def __init__(self, config: dict, where: Path):
        self.where = where
        self.rank = int(config.get("r", 8))
        self.alpha = float(config.get("lora_alpha", 8))
        self.rslora = bool(config.get("use_rslora", False))
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self.targets: list[Target] = []
        self.scales: dict[str, float] = {}
        self.tensors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (module, key) -> (A, B)

    def scale(self, key: str, rank: int) -> float:
        a = float(pf.pattern_value(self.alpha_pattern, key, self.alpha))
        return a / (rank**0.5 if self.rslora else rank)

    def check_rank(self, key: str, got: int) -> None:
        want = int(pf.pattern_value(self.rank_pattern, key, self.rank))
        if got != want:
            raise UserError(f"{self.where}: {key} has rank {got} in the file, but adapter_config.json says {want} "
                            "(adapter saved for another base model?)")

    def add(self, t: Target, key: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        self.targets.append(t)
        self.scales[t.path + (f"[{t.part}]" if t.part else "")] = scale
        self.tensors[(t.name, key)] = (A, B)

    def shape(self, name: str, ab: str, got: tuple, want: tuple) -> None:
        if got != want:
            raise UserError(f"{self.where}: tensor {name}.lora_{ab}.weight has shape {got}, expected {want} for "
                            "this base model (adapter saved for another base model?)")


def load_adapter(model: nn.Module, path: str | Path, verbose: bool = False) -> LoRAConfig:
    """Attach the adapter saved at `path` (by regretless or PEFT) to a fresh base model, in place.
    Everything is checked against the model before it is touched: on a UserError the model is unchanged."""
    config, raw = read_adapter(path)
    where = Path(path) / WEIGHTS_NAME
    if any(True for _ in lora_modules(model)):
        raise UserError("the model already has LoRA adapters; load the adapter into a fresh base model")
    weights: dict[str, dict[str, torch.Tensor]] = {}  # tensor prefix (no base_model.model.) -> {"A", "B"}
    for key, t in raw.items():
        prefix, ab = _split_key(key)
        weights.setdefault(prefix, {})[ab] = t
    for prefix, ab in weights.items():
        for x in ("A", "B"):
            if x not in ab:
                raise UserError(f"{where}: {prefix} has no lora_{x} weight; expected both lora_A and lora_B")
    modules: dict[str, list[str]] = {}  # module path -> tensor prefixes (nested ParamWrappers)
    for prefix in weights:
        mod = prefix
        while mod.endswith(".base_layer"):
            mod = mod[: -len(".base_layer")]
        modules.setdefault(mod, []).append(prefix)
    plan = _Plan(config, where)
    wanted = [str(p) for p in (config.get("target_parameters") or [])]
    split = (config.get("_regretless") or {}).get("split_gate_up") or {}
    split = split if isinstance(split, dict) else {}
    units = {(u.name, u.param, u.part): u for u in scan(model).units}
    v4: dict[tuple[str, str, str | None], dict[int, tuple[str, dict]]] = {}
    for mod in sorted(modules):
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            hit = pf.v4_to_fused(model, mod)
            if hit is None:
                raise UserError(f"{where}: adapter targets {mod!r}, which this model does not have "
                                "(adapter saved for another base model?)") from None
            experts, idx, leaf = hit
            v4.setdefault((experts, leaf, mod.rsplit(".", 2)[0]), {})[idx] = (mod, weights[mod])
            continue
        if isinstance(m, nn.Linear) or is_conv1d(m):
            _load_dense(plan, units, mod, m, weights[mod], wanted)
        elif isinstance(experts_layout(m), ExpertsLayout) and any(p.dim() == 3 for p in m.parameters(False)):
            _load_fused(plan, mod, m, modules[mod], weights, wanted, split.get(mod))
        elif isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2:
            _load_param(plan, units, mod, m, weights[mod])
        else:
            raise UserError(f"{where}: adapter targets {mod!r} ({type(m).__name__}), which regretless cannot adapt")
    _load_v4(plan, model, v4)
    cfg = LoRAConfig(rank=plan.rank, alpha=plan.alpha, targets="all", rslora=plan.rslora)
    apply_lora(model, cfg, targets=plan.targets, verbose=verbose, scales=plan.scales)
    with torch.no_grad():
        for name, m in lora_modules(model):
            if isinstance(m, LoRAExperts):
                for key in m.specs:
                    A, B = plan.tensors[(name, key)]
                    m.lora_A(key).copy_(A.to(m.lora_A(key).device))
                    m.lora_B(key).copy_(B.to(m.lora_B(key).device))
            else:
                A, B = plan.tensors[(name, "")]
                m.lora_A.copy_(A.to(m.lora_A.device))
                m.lora_B.copy_(B.to(m.lora_B.device))
    return cfg


def _load_dense(plan: _Plan, units: dict, mod: str, m: nn.Module, ab: dict, wanted: list[str]) -> None:
    A, B = ab["A"], ab["B"]
    d_out, d_in = (m.weight.shape[1], m.weight.shape[0]) if is_conv1d(m) else tuple(m.weight.shape)
    r = A.shape[0]
    plan.shape(mod, "A", tuple(A.shape), (r, d_in))
    plan.shape(mod, "B", tuple(B.shape), (d_out, r))
    key = f"{mod}.weight" if any(f"{mod}.weight" == w or f"{mod}.weight".endswith("." + w) for w in wanted) else mod
    plan.check_rank(key, r)
    u = units.get((mod, None, None))
    kind = "conv1d" if is_conv1d(m) else "linear"
    plan.add(Target(mod, u.role if u else "other", None, d_in, d_out, 1, r, None, kind), "", A, B,
             plan.scale(key, r))


def _load_param(plan: _Plan, units: dict, mod: str, m: nn.Module, ab: dict) -> None:
    A, B = ab["A"], ab["B"]
    d_out, d_in = m.weight.shape
    r = A.shape[0]
    plan.shape(mod, "A", tuple(A.shape), (r, d_in))
    plan.shape(mod, "B", tuple(B.shape), (d_out, r))
    key = f"{mod}.weight"
    plan.check_rank(key, r)
    u = units.get((mod, "weight", None))
    plan.add(Target(mod, u.role if u else "router", "weight", d_in, d_out, 1, r, None, "param"), "", A, B,
             plan.scale(key, r))


def _load_fused(plan: _Plan, mod: str, m: nn.Module, prefixes: list[str], weights: dict, wanted: list[str],
                split: list[int] | None) -> None:
    layout = experts_layout(m)
    # PEFT's rule: a target_parameters entry matches `<module>.<param>` exactly or as a dotted suffix
    adapted = [n for n, p in m.named_parameters(recurse=False) if p.dim() == 3 and (not wanted or any(
        f"{mod}.{n}" == w or f"{mod}.{n}".endswith("." + w) for w in wanted))]
    if len(adapted) != len(prefixes):
        raise UserError(f"{plan.where}: {len(prefixes)} adapted parameter(s) of {mod!r} in the file, but "
                        f"target_parameters selects {adapted or 'none'} of this model's experts")
    E = layout.n_experts
    for p in adapted:
        key = pf.expert_key(mod, adapted, p).removeprefix(PREFIX)
        if key not in weights:
            raise UserError(f"{plan.where}: no weights for {mod}.{p} at {key}; expected PEFT's nesting of the "
                            f"adapted parameters {adapted}")
        A, B = weights[key]["A"], weights[key]["B"]
        rows = A.shape[0]
        if rows % E:
            raise UserError(f"{plan.where}: {mod}.{p} has {rows} lora_A rows, not a multiple of this model's "
                            f"{E} experts (adapter saved for another base model?)")
        R = rows // E
        plan.check_rank(f"{mod}.{p}", R)
        w = getattr(m, p)
        a, b = w.shape[1], w.shape[2]
        in_p, out_p = (a, b) if getattr(m, "is_transposed", False) else (b, a)
        plan.shape(key, "A", tuple(A.shape), (E * R, in_p))
        plan.shape(key, "B", tuple(B.shape), (out_p, R * E))
        s = plan.scale(f"{mod}.{p}", R)
        for k, (Ak, Bk) in pf.experts_from_peft(m, layout, p, A, B, tuple(split) if split else None).items():
            spec = layout.matrices(fused_gate_up=k == "gate_up")[k]
            plan.add(Target(mod, "experts", p, spec[2], spec[3], E, Ak.shape[1], spec[1], "experts"), k, Ak, Bk, s)


def _load_v4(plan: _Plan, model: nn.Module, v4: dict) -> None:
    """transformers-4 per-expert tensors (experts.N.<leaf>) stacked onto the fused experts they were merged into."""
    leaves = pf.v4_mapping(model)[1]
    for (experts, leaf, _v4_experts), per in sorted(v4.items()):
        m = model.get_submodule(experts)
        layout = experts_layout(m)
        if not isinstance(layout, ExpertsLayout):
            raise UserError(f"{plan.where}: per-expert adapter for {experts}, whose experts regretless cannot adapt "
                            f"({layout})")
        param, part = leaves.get(leaf, pf.GENERIC_LEAVES.get(leaf, (None, None)))
        if param == "gate_up_proj" and not layout.gated:
            param, part = "up_proj", None
        if param is None:
            raise UserError(f"{plan.where}: {experts}.N.{leaf}: unknown expert matrix {leaf!r}; expected one of "
                            f"{', '.join(sorted(leaves))}")
        E = layout.n_experts
        if sorted(per) != list(range(E)):
            raise UserError(f"{plan.where}: {experts}.N.{leaf} has experts {sorted(per)}, expected 0..{E - 1}")
        k = matrix_key(param, part)
        _, _, d_in, d_out = layout.matrices()[k]
        ranks, scales, As, Bs = set(), set(), [], []
        for e in range(E):
            name, ab = per[e]
            r = ab["A"].shape[0]
            plan.shape(name, "A", tuple(ab["A"].shape), (r, d_in))
            plan.shape(name, "B", tuple(ab["B"].shape), (d_out, r))
            plan.check_rank(name, r)
            ranks.add(r)
            scales.add(plan.scale(name, r))
            As.append(ab["A"])
            Bs.append(ab["B"])
        if len(ranks) > 1 or len(scales) > 1:
            raise UserError(f"{plan.where}: {experts}.N.{leaf}: experts have ranks {sorted(ranks)} and scales "
                            f"{sorted(scales)}; fused experts share one rank and scale per matrix")
        plan.add(Target(experts, "experts", param, d_in, d_out, E, ranks.pop(), part, "experts"), k,
                 torch.stack(As).float(), torch.stack(Bs).float(), scales.pop())
