"""Load any transformers causal LM from a local folder, a GGUF file, or a built-in name; nothing from the hub.

`load_model` returns the model in eval mode on `device`, with weights in `dtype` (fp32 on CPU; on CUDA, bf16
weights for frozen LoRA bases and fp32 master weights for FullFT are the trainer's choice).
"""

from __future__ import annotations

from pathlib import Path

import torch

from regretless import assets
from regretless.errors import UserError


def resolve_model(name: str, quiet: bool = False) -> Path:
    """A model folder for `name`: a built-in name, a local HF folder, or a .gguf file (converted once)."""
    if name in assets.BUILTIN_MODELS:
        return assets.prepare(name, quiet)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        out = assets.cache_dir() / "models" / f"gguf-{p.stem}-{p.stat().st_size}"
        return out if (out / ".complete").is_file() else assets.convert_gguf(p, out, quiet)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: no config.json; expected a transformers model folder")
        return p
    raise UserError(f"model {name!r}: not a folder, a .gguf file or a built-in name "
                    f"({', '.join(assets.BUILTIN_MODELS)}); the hub is not used")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).strip().splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quiet: bool = False):
    """(model, tokenizer, path). Raises UserError for anything that is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(name, quiet)
    try:
        config = AutoConfig.from_pretrained(path)
        _check_architectures(path, config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError as e:
        kind = type(config).__name__ if "config" in locals() else "this model"
        raise UserError(f"{path}: {kind} is not a causal language model ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    model.to(device)
    model.eval()
    return model, load_tokenizer(path), path


def _check_architectures(path: Path, config) -> None:
    """A folder saved from a model without an LM head (BertModel, LlamaModel) or with another task's head would
    load as *ForCausalLM with a freshly initialised head; refuse it. Folders without `architectures` pass."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    known = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    if archs and not any(a in known or a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                         for a in archs):
        raise UserError(f"{path}/config.json: architectures {archs} is not a causal language model; "
                        "expected a *ForCausalLM checkpoint")


def default_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

