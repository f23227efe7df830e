"""Merge a LoRA adapter into a copy of its base model and save a plain transformers folder (with the tokenizer).

examples:
  regretless merge --run runs/sft --out merged/
  regretless merge --adapter runs/sft/adapter --out merged/
  regretless merge --adapter my-adapter/ --model smollm2-135m --out merged/ --dtype bf16

--run DIR takes DIR/adapter and the run's base model (config.yaml); --adapter A takes the base that A names
(adapter_config.json), unless --model M gives another (a local folder, a .gguf file or a built-in name).
The merge W' = W + s·B·A is done in fp32 and the result saved in the base's dtype (or --dtype). The base
itself is never changed; an adapted LM head tied to the input embeddings is untied first (the embeddings stay as
they were, the saved config says tie_word_embeddings: false). OUT is written atomically (a temp folder beside
it, then a rename); an existing OUT is replaced only with --force.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from regretless.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a LoRA run folder (regretless sft|rl --out DIR): its adapter and base model")
    src.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", help="base model (default: the one the run or adapter names)")
    p.add_argument("--out", required=True, help="folder for the merged model (written atomically)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype of the saved weights (default auto: the base's)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")


def merge(model: str | None, adapter: str | Path, out: str | Path, dtype: str = "auto", force: bool = False,
          run: str | Path | None = None) -> dict:
    """Load base + adapter, merge, save a plain HF folder at `out`. Returns what was done."""
    from regretless.commands._runs import adapter_base, base_dtype, from_run, resolve_base
    from regretless.lora import load_adapter, lora_modules, merge_lora, read_adapter, unload
    from regretless.models import load_model
    from regretless.runfiles import save_atomically

    out = Path(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected auto or one of {', '.join(DTYPES)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a folder for the merged model")
    if out.exists() and not force and any(out.iterdir()):
        raise UserError(f"--out {out}: already exists; choose a new folder or pass --force to replace it")
    if run is not None:
        found = from_run(run)
        if found.adapter is None:
            raise UserError(f"--run {run}: a FullFT run; its model/ folder is already a plain model, nothing to merge")
        adapter, model = found.adapter, model or found.base
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise UserError(f"--adapter {adapter}: not a folder; expected a PEFT adapter folder")
    read_adapter(adapter)  # fail fast on a corrupt adapter, before a possibly long model load
    model = model or adapter_base(adapter)
    path = resolve_base(model)
    base, tok, path = load_model(str(path), dtype=torch.float32, quiet=True)
    target = base_dtype(path) if dtype == "auto" else DTYPES[dtype]
    lora_cfg = load_adapter(base, adapter)
    n_modules = len(list(lora_modules(base)))
    untied = merge_lora(base)  # a tied LM head gets its own weight before ΔW goes in: the embeddings stay
    merged = unload(base, merge=True).to(target)
    if hasattr(merged.config, "dtype"):
        merged.config.dtype = target

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(out.parent, out.name, write)
    return {"model": str(model), "adapter": str(adapter), "out": str(out), "dtype": NAMES.get(target, str(target)),
            "modules": n_modules, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "untied": untied}


def run(args: argparse.Namespace) -> int:
    info = merge(args.model, args.adapter, args.out, args.dtype, args.force, run=args.run)
    print(f"wrote {info['out']}: a plain transformers model ({info['dtype']}) with its tokenizer, = base "
          f"{info['model']} + adapter {info['adapter']} ({info['modules']} LoRA modules, r={info['rank']}, "
          f"alpha={info['alpha']:g}) merged; the base is unchanged")
    if info["untied"]:
        print(f"untied {', '.join(info['untied'])} from the input embeddings (their weight was shared): the merged "
              "model keeps the embeddings as they were and saves tie_word_embeddings: false")
    return 0
