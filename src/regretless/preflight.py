"""Checks a training config against the world before the trainer writes anything: the model path, the device,
`--out`, and LoRA's rank and targets against the model's shapes when they are known without loading weights.

Field ranges are checked when the config is built (`regretless.config`); what needs the file system or the model's
`config.json` is checked here. The model's shapes are known before loading for a local HF folder (its config.json),
a built-in model already prepared in the cache, and `smollm2-135m` (the built-in table of shapes); for a GGUF file
not yet converted they are checked once the model is loaded (`apply_lora` raises the same error then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from regretless import assets
from regretless.errors import UserError

KNOWN_BUILTIN_SHAPES = {"smollm2-135m": "SmolLM2-135M"}  # built-in name -> regretless.known_models row


def model_config(name: str) -> Any | None:
    """The transformers config of `name` if it can be had without loading weights or preparing assets; else None.
    Raises UserError for a name that is neither a folder, a .gguf file nor a built-in model."""
    from transformers import AutoConfig

    if name in assets.BUILTIN_MODELS:
        if assets.is_prepared(name):
            return AutoConfig.from_pretrained(assets.model_dir(name))
        if name in KNOWN_BUILTIN_SHAPES:
            from regretless.known_models import known_config

            return known_config(KNOWN_BUILTIN_SHAPES[name])
        return None
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return None
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"field 'model': {p}: no config.json; expected a transformers model folder")
        try:
            return AutoConfig.from_pretrained(p)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"{p}/config.json: cannot read it ({str(e).strip().splitlines()[0]})") from None
    raise UserError(f"field 'model': {name!r} is not a folder, a .gguf file or a built-in name "
                    f"({', '.join(assets.BUILTIN_MODELS)}); the hub is not used")


def check_lora_shapes(model_cfg: Any, lora: Any) -> None:
    """Raise the LoRA engine's own UserError (rank too large for a matrix, a target matching nothing) on the model
    built on the meta device: no memory, no weights."""
    from transformers import AutoModelForCausalLM

    from regretless.lora.inject import find_targets

    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(model_cfg)
    except (ValueError, KeyError, TypeError):
        return  # not buildable from its config alone: load_model gives the precise error
    find_targets(meta, lora)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"field 'device': {device!r}, but this machine has no CUDA device; use auto or cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"field 'device': {device!r}, but this machine has {torch.cuda.device_count()} CUDA "
                        "device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("field 'device': 'mps', but MPS is not available here; use auto or cpu")


def check_out(out: str) -> None:
    if not out:
        raise UserError("--out: required; the folder where the run's files go")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p}: is a file; expected a folder for the run's files")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {p}: {parent} is a file; expected a folder for the run's files")


def check_run(cfg: Any) -> None:
    """`--out` and the device (first: the cheapest checks)."""
    check_out(cfg.out)
    check_device(cfg.device)


def check_model(cfg: Any) -> None:
    """The model path, and LoRA's rank and targets against its shapes when known (after the data: a bad data path
    is the likelier mistake and is reported first)."""
    mc = model_config(cfg.model)
    if mc is not None and cfg.lora is not None:
        check_lora_shapes(mc, cfg.lora)
