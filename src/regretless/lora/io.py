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
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from regretless.errors import UserError
from regretless.lora.config import LoRAConfig
from regretless.lora.experts import LoRAExperts, expert_dims, is_fused_experts
from regretless.lora.inject import Target, apply_lora, lora_modules
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
    modules = sorted({name.rsplit(".", 1)[-1] for name, m in lora_modules(model) if isinstance(m, LoRALinear)})
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
        "regretless": {"targets": list(cfg.targets) if not isinstance(cfg.targets, str) else cfg.targets,
                       "module_names": modules, "lr_b_mult": cfg.lr_b_mult, "expert_rank": cfg.expert_rank},
    }


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, base_model: str = "") -> Path:
    """Write the adapter atomically: a temp folder beside `out_dir`, then a rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_file(adapter_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
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
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_file}: expected a LoRA adapter config (peft_type LORA)")
    for key, bad in (("use_dora", True), ("lora_bias", True)):
        if config.get(key) == bad:
            raise UserError(f"{cfg_file}: {key}={bad} is not supported; expected plain LoRA")
    if config.get("modules_to_save"):
        raise UserError(f"{cfg_file}: modules_to_save={config['modules_to_save']} is not supported")
    try:
        weights = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{w_file}: corrupt or unreadable safetensors file ({e})") from None
    return config, weights


def _strip(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise UserError(f"unexpected tensor {key!r} in adapter; expected only lora_A/lora_B weights")


def load_adapter(model: nn.Module, path: str | Path, verbose: bool = False) -> LoRAConfig:
    """Attach the adapter saved at `path` (by regretless or PEFT) to a fresh base model, in place."""
    config, weights = read_adapter(path)
    where = Path(path) / WEIGHTS_NAME
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = int(config.get("r", 8))
    cfg = LoRAConfig(rank=rank, alpha=alpha, targets="all", rslora=bool(config.get("use_rslora", False)))
    modules = {}  # module path -> list of tensor prefixes
    for key in weights:
        prefix = _strip(key)
        mod = prefix
        while mod.endswith(".base_layer"):
            mod = mod[: -len(".base_layer")]
        modules.setdefault(mod, set()).add(prefix)
    targets: list[Target] = []
    expert_params: dict[str, list[str]] = {}
    for mod in sorted(modules):
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            raise UserError(f"{where}: adapter targets {mod!r}, which this model does not have "
                            "(adapter saved for another base model?)") from None
        if isinstance(m, nn.Linear):
            targets.append(Target(mod, "adapter", None, m.in_features, m.out_features, 1,
                                  weights[PREFIX + mod + ".lora_A.weight"].shape[0]))
        elif is_fused_experts(m):
            names = [n for n, _ in m.named_parameters(recurse=False)]
            wanted = [p.split(".")[-1] for p in (config.get("target_parameters") or [])]
            adapted = [n for n in names if n in ("gate_up_proj", "down_proj")
                       and (not wanted or n in wanted)][: len(modules[mod])]
            expert_params[mod] = adapted
            for p in adapted:
                E, d_in, d_out = expert_dims(m, p)
                a = weights[f"{_expert_key(mod, adapted, p)}.lora_A.weight"]
                targets.append(Target(mod, "experts", p, d_in, d_out, E, a.shape[0] // E))
        else:
            raise UserError(f"{where}: adapter targets {mod!r} ({type(m).__name__}), which regretless cannot adapt")
    apply_lora(model, cfg, targets=targets, verbose=verbose)
    for (pattern, a) in alpha_pattern.items():  # PEFT: per-module alpha overrides
        for name, m in lora_modules(model):
            if name == pattern or name.endswith("." + pattern):
                if isinstance(m, LoRALinear):
                    m.scale = cfg.scale(m.rank) * a / alpha
    _copy_weights(model, weights, where)
    return cfg


def _copy_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    def put(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise UserError(f"{where}: tensor {key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)} "
                            "for this base model")
        dst.copy_(src.to(dst.dtype))

    with torch.no_grad():
        for name, m in lora_modules(model):
            if isinstance(m, LoRALinear):
                for ab in ("A", "B"):
                    key = f"{PREFIX}{name}.lora_{ab}.weight"
                    put(getattr(m, f"lora_{ab}"), weights[key].to(m.lora_A.device), key)
            else:
                for p in m.adapted:
                    k = _expert_key(name, m.adapted, p)
                    A, B = weights[f"{k}.lora_A.weight"], weights[f"{k}.lora_B.weight"]
                    E, r = m.num_experts, m.ranks[p]
                    put(m.lora_A(p), A.reshape(E, r, -1), f"{k}.lora_A.weight")
                    put(m.lora_B(p), B.reshape(B.shape[0], r, E).permute(2, 0, 1), f"{k}.lora_B.weight")


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
        m._backup = {} if isinstance(m, LoRAExperts) else None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base_layer)
    return model
