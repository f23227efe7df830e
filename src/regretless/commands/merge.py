"""Merge a LoRA adapter into its base model and save a plain transformers model folder (with the tokenizer).

    regretless merge --model smollm2-135m --adapter runs/sft/adapter --out merged/ [--dtype fp32|bf16]

M is a local model folder, a .gguf file or a built-in name; A is a PEFT-format adapter folder (saved by
regretless or by PEFT). The merge W' = W + s·B·A is done in fp32 and only then cast to --dtype. O is written
atomically (a temp folder beside it, then a rename); an existing O is replaced only with --force.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from regretless.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: local folder, .gguf file or built-in name")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged model (written atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")


def merge(model: str, adapter: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False) -> dict:
    """Load base + adapter, merge, save a plain HF folder at `out`. Returns what was done."""
    from regretless.lora import load_adapter, lora_modules, read_adapter, unload
    from regretless.models import load_model
    from regretless.runfiles import save_atomically

    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(sorted(DTYPES))}")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists; choose a new folder or pass --force to replace it")
    if not Path(adapter).is_dir():
        raise UserError(f"--adapter {adapter}: not a folder; expected a PEFT adapter folder")
    read_adapter(adapter)  # fail fast on a corrupt adapter, before a possibly long model load
    base, tok, path = load_model(model, dtype=torch.float32, quiet=True)
    lora_cfg = load_adapter(base, adapter)
    n_modules = len(list(lora_modules(base)))
    merged = unload(base, merge=True).to(DTYPES[dtype])
    if hasattr(merged.config, "dtype"):
        merged.config.dtype = DTYPES[dtype]

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(out.parent, out.name, write)
    return {"model": str(path), "adapter": str(adapter), "out": str(out), "dtype": dtype,
            "modules": n_modules, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha}


def run(args: argparse.Namespace) -> int:
    info = merge(args.model, args.adapter, args.out, args.dtype, args.force)
    print(f"merged {info['modules']} LoRA modules (r={info['rank']}, alpha={info['alpha']:g}) of {info['adapter']} "
          f"into {info['model']}; saved a plain transformers model ({info['dtype']}) with its tokenizer to "
          f"{info['out']}")
    return 0
