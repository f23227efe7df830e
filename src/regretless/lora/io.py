"""Adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), merge and unload.

Key layout written and read (what `peft.PeftModel` uses, checked against peft 0.21):
  dense:   base_model.model.<module>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r)
  experts: PEFT wraps each targeted 3-D parameter in a `ParamWrapper`, nesting one wrapper per parameter in the
           order the parameters are registered on the module (the first is innermost), so gate_up_proj of a
           module adapting both lives at <module>.base_layer.lora_A.weight. A is (E·r, d_in) expert-major,
           B is (d_out, r·E) with the expert index fastest; regretless stores A (E, r, d_in), B (E, d_out, r).
Per-expert ranks go into `rank_pattern` (PEFT has one `r`), keyed by the parameter path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from regretless.errors import UserError
from regretless.lora.config import LoRAConfig
from regretless.lora.experts import EXPERT_PARAMS, LoRAExperts, expert_dims, is_fused_experts
from regretless.lora.inject import Target, apply_lora, group_of, lora_modules
from regretless.lora.layer import LoRALinear

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _expert_key(name: str, adapted: list[str], param: str) -> str:
    depth = len(adapted) - 1 - adapted.index(param)
    return PREFIX + name + ".base_layer" * depth


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        if isinstance(m, LoRALinear):
            sd[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
            sd[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
        else:
            for p in m.adapted:
                A, B = m.lora_A(p).detach(), m.lora_B(p).detach()  # (E, r, in), (E, out, r)
                E, r, d_in = A.shape
                key = _expert_key(name, m.adapted, p)
                sd[f"{key}.lora_A.weight"] = A.reshape(E * r, d_in)
                sd[f"{key}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], r * E)
    return {k: v.to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def adapter_config(model: nn.Module, cfg: LoRAConfig, base_model: str) -> dict:
    params, rank_pattern = [], {}
    for name, m in lora_modules(model):
        if isinstance(m, LoRAExperts):
            for p in m.adapted:
                params.append(f"{name}.{p}")
                if m.ranks[p] != cfg.rank:
                    rank_pattern[f"{name}.{p}"] = m.ranks[p]
    for name, m in lora_modules(model):
        if isinstance(m, LoRALinear) and m.rank != cfg.rank:
            rank_pattern[name.replace(".", r"\.")] = m.rank
    # exact module paths keep PEFT from adapting a same-named module that regretless left alone
    exact = sorted(name for name, m in lora_modules(model) if isinstance(m, LoRALinear))
    target_modules = "^(" + "|".join(n.replace(".", r"\.") for n in exact) + ")$" if exact else []
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": 0.0, "bias": "none",
        "target_modules": target_modules, "target_parameters": params or None, "rank_pattern": rank_pattern,
        "alpha_pattern": {}, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "use_dora": False, "inference_mode": True,
    }


def _regretless_metadata(model: nn.Module, cfg: LoRAConfig) -> str:
    """How regretless chose the targets; kept in the safetensors header, where PEFT does not look."""
    modules = sorted({name.rsplit(".", 1)[-1] for name, m in lora_modules(model) if isinstance(m, LoRALinear)})
    return json.dumps({"targets": list(cfg.targets) if not isinstance(cfg.targets, str) else cfg.targets,
                       "module_names": modules, "lr_b_mult": cfg.lr_b_mult, "expert_rank": cfg.expert_rank})


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, base_model: str = "") -> Path:
    """Write the adapter atomically: a temp folder beside `out_dir`, then a rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_file(adapter_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "regretless": _regretless_metadata(model, cfg)})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config(model, cfg, base_model), indent=2))
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


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    r"""PEFT's rank_pattern/alpha_pattern rule (peft.utils.other.get_pattern_key): first pattern p with
    re.match(rf"(.*\.)?({p})$", key) wins."""
    for p, v in patterns.items():
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return v
        except re.error:
            continue
    return default


def load_adapter(model: nn.Module, path: str | Path, verbose: bool = False) -> LoRAConfig:
    """Attach the adapter saved at `path` (by regretless or PEFT) to a fresh base model, in place.
    Everything is checked against the model before it is touched: on a UserError the model is unchanged."""
    config, raw = read_adapter(path)
    where = Path(path) / WEIGHTS_NAME
    if any(True for _ in lora_modules(model)):
        raise UserError("the model already has LoRA adapters; load the adapter into a fresh base model")
    alpha = float(config.get("lora_alpha", 8))
    rank = int(config.get("r", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    cfg = LoRAConfig(rank=rank, alpha=alpha, targets="all", rslora=bool(config.get("use_rslora", False)))
    weights: dict[str, torch.Tensor] = {}  # canonical keys: base_model.model.<prefix>.lora_{A,B}.weight
    modules: dict[str, set[str]] = {}  # module path -> tensor prefixes (one per adapted expert parameter)
    for key, t in raw.items():
        prefix, ab = _split_key(key)
        weights[f"{PREFIX}{prefix}.lora_{ab}.weight"] = t
        mod = prefix
        while mod.endswith(".base_layer"):
            mod = mod[: -len(".base_layer")]
        modules.setdefault(mod, set()).add(prefix)
    for prefix in {p for ps in modules.values() for p in ps}:
        for ab in ("A", "B"):
            if f"{PREFIX}{prefix}.lora_{ab}.weight" not in weights:
                raise UserError(f"{where}: {prefix} has no lora_{ab} weight; expected both lora_A and lora_B")
    wanted = [str(p) for p in (config.get("target_parameters") or [])]
    targets: list[tuple[str, Target]] = []  # (tensor key prefix, target)
    for mod in sorted(modules):
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            raise UserError(f"{where}: adapter targets {mod!r}, which this model does not have "
                            "(adapter saved for another base model?)") from None
        if isinstance(m, nn.Linear):
            targets.append((PREFIX + mod, Target(mod, group_of(mod), None, m.in_features, m.out_features, 1,
                                                 weights[f"{PREFIX}{mod}.lora_A.weight"].shape[0])))
        elif is_fused_experts(m):
            # PEFT's rule: a target_parameters entry matches `<module>.<param>` exactly or as a dotted suffix
            adapted = [n for n, _ in m.named_parameters(recurse=False) if n in EXPERT_PARAMS and (not wanted or any(
                f"{mod}.{n}" == w or f"{mod}.{n}".endswith("." + w) for w in wanted))]
            if len(adapted) != len(modules[mod]):
                raise UserError(f"{where}: {len(modules[mod])} adapted parameter(s) of {mod!r} in the file, but "
                                f"target_parameters selects {adapted or 'none'} of this model's experts")
            for p in adapted:
                E, d_in, d_out = expert_dims(m, p)
                key = _expert_key(mod, adapted, p)
                if f"{key}.lora_A.weight" not in weights:
                    raise UserError(f"{where}: no weights for {mod}.{p} at {key}; expected PEFT's nesting of the "
                                    f"adapted parameters {adapted}")
                rows = weights[f"{key}.lora_A.weight"].shape[0]
                if rows % E:
                    raise UserError(f"{where}: {mod}.{p} has {rows} lora_A rows, not a multiple of this model's "
                                    f"{E} experts (adapter saved for another base model?)")
                targets.append((key, Target(mod, "experts", p, d_in, d_out, E, rows // E)))
        else:
            raise UserError(f"{where}: adapter targets {mod!r} ({type(m).__name__}), which regretless cannot adapt")
    for key, t in targets:
        path = f"{t.name}.{t.param}" if t.param else t.name
        want = int(_pattern_value(rank_pattern, path, rank))
        if t.rank != want:
            raise UserError(f"{where}: {path} has rank {t.rank} in the file, but adapter_config.json says {want} "
                            "(adapter saved for another base model?)")
        _check_shapes(key, t, weights, where)
    apply_lora(model, cfg, targets=[t for _, t in targets], verbose=verbose)
    for name, m in lora_modules(model):  # PEFT: per-module alpha overrides
        if isinstance(m, LoRALinear):
            m.scale = cfg.scale(m.rank) * float(_pattern_value(alpha_pattern, name, alpha)) / alpha
        else:
            for p in m.adapted:
                a = float(_pattern_value(alpha_pattern, f"{name}.{p}", alpha))
                m.scales[p] = cfg.scale(m.ranks[p]) * a / alpha
    _copy_weights(model, weights)
    return cfg


def _check_shapes(key: str, t: Target, weights: dict[str, torch.Tensor], where: Path) -> None:
    """PEFT's shapes for one target: dense A (r, d_in), B (d_out, r); experts A (E·r, d_in), B (d_out, r·E)."""
    n = t.n_experts * t.rank
    for ab, want in (("A", (n, t.d_in)), ("B", (t.d_out, n))):
        got = tuple(weights[f"{key}.lora_{ab}.weight"].shape)
        if got != want:
            raise UserError(f"{where}: tensor {key}.lora_{ab}.weight has shape {got}, expected {want} for this "
                            "base model (adapter saved for another base model?)")


def _copy_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy (already shape-checked) PEFT-layout tensors into the wrappers."""
    with torch.no_grad():
        for name, m in lora_modules(model):
            if isinstance(m, LoRALinear):
                for ab in ("A", "B"):
                    dst = getattr(m, f"lora_{ab}")
                    dst.copy_(weights[f"{PREFIX}{name}.lora_{ab}.weight"].to(dst.device, dst.dtype))
            else:
                for p in m.adapted:
                    k = _expert_key(name, m.adapted, p)
                    A, B = weights[f"{k}.lora_A.weight"], weights[f"{k}.lora_B.weight"]  # (E·r, in), (out, r·E)
                    E, r = m.num_experts, m.ranks[p]
                    m.lora_A(p).copy_(A.reshape(E, r, -1).to(m.lora_A(p).device, m.lora_A(p).dtype))
                    m.lora_B(p).copy_(B.reshape(B.shape[0], r, E).permute(2, 0, 1).to(m.lora_B(p).device,
                                                                                      m.lora_B(p).dtype))


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA wrapper by its (merged) base module: a plain transformers model again."""
    for name, m in list(lora_modules(model)):
        if merge:
            m.merge()
        else:
            m.unmerge()  # a plain base model: drop a merge done earlier
        m._backup = {} if isinstance(m, LoRAExperts) else None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base_layer)
    return model
