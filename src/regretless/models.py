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


def _experts_forward_in_amp(self: torch.nn.Module, *args, **kwargs):
    """An expert module's forward with its 3-D weights cast to the autocast dtype (see `autocast_experts`)."""
    names = self._amp_expert_params
    dev = getattr(self, names[0]).device.type
    if torch.is_autocast_enabled(dev):
        amp = torch.get_autocast_dtype(dev)
        ws = {n: getattr(self, n) for n in names}
        if any(w.dtype != amp for w in ws.values()):  # re-enters with the cast weights in place
            return torch.func.functional_call(self, {n: w.to(amp) for n, w in ws.items()}, args, kwargs)
    return type(self).forward(self, *args, **kwargs)


def autocast_experts(model: torch.nn.Module) -> int:
    """Run 3-D expert weights (transformers' fused MoE experts: gate_up_proj, down_proj) in the autocast dtype
    while autocast is on, as autocast does for nn.Linear; the number of expert modules changed. transformers'
    grouped-GEMM experts are not autocast-aware: with FullFT's fp32 master weights they cast the routed tokens
    *up* to fp32 and run fp32 grouped GEMMs (regretless FullFT of a Qwen3-30B-A3B-shaped model took 3.2x
    transformers' own bf16 step on an H200). The cast is differentiable, so gradients reach the fp32 weights;
    outside autocast, or with weights already in its dtype (FSDP2's bf16 compute), the forward is unchanged.
    The forward is a method bound to each module (a deep copy, e.g. RL's frozen reference, rebinds it)."""
    import types

    changed = 0
    for m in model.modules():
        names = tuple(n for n, p in m.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point())
        if names:
            m._amp_expert_params = names
            m.forward = types.MethodType(_experts_forward_in_amp, m)
            changed += 1
    return changed
