"""What `merge` and `generate` share: find the base model and the adapter (or full model) of a run folder, and
load a model for inference.

A run folder (`regretless sft|rl --out DIR`) holds `config.yaml` (its `model` is the base, as the user named it)
and either `adapter/` (LoRA) or `model/` (FullFT, a plain HF folder). An adapter folder names its base in
`adapter_config.json` (`base_model_name_or_path`, the path the trainer loaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from regretless.errors import UserError


@dataclass(frozen=True)
class RunModel:
    base: str | None  # the base model (name or path) a LoRA adapter goes on; None for a full model
    adapter: Path | None  # PEFT-format adapter folder, or None
    model: str | None  # a complete model (FullFT run's model/, or --model): loaded as is


def adapter_base(adapter: Path) -> str:
    """The base model an adapter names (adapter_config.json: base_model_name_or_path)."""
    cfg_file = adapter / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{cfg_file}: missing; expected a PEFT adapter folder") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise UserError(f"{cfg_file}: names no base model (base_model_name_or_path); pass --model")
    return str(base)


def from_run(run: str | Path) -> RunModel:
    """Base + adapter of a LoRA run, or the model of a FullFT run. UserError naming the folder otherwise."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--run {run}: not a folder; expected a run folder (regretless sft|rl --out DIR)")
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"--run {run}: no config.yaml; expected a run folder (regretless sft|rl --out DIR)")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{cfg_file}{f':{mark.line + 1}' if mark else ''}: not valid YAML") from None
    if (run / "adapter").is_dir():
        base = cfg.get("model") if isinstance(cfg, dict) else None
        return RunModel(str(base) if base else adapter_base(run / "adapter"), run / "adapter", None)
    if (run / "model").is_dir():
        return RunModel(None, None, str(run / "model"))
    raise UserError(f"--run {run}: has no adapter/ or model/ yet (the run has not finished); resume it first "
                    f"(regretless {cfg.get('command', 'sft')} --config {cfg_file} --out {run} --resume)")


def resolve_base(name: str):
    """The base's folder: a built-in is built or converted first (tiny-base is pretrained once)."""
    from regretless.prepare import resolve_or_build

    return resolve_or_build(name, quiet=True)


def base_dtype(path: Path):
    """The dtype the base's config.json records (fp32 when it records none)."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
