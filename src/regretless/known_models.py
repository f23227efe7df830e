"""A built-in table of common causal LMs' shapes, so `recommend` works without the (unreachable) hub.

Each entry holds the config fields that decide parameter counts, FLOPs and the LR formula (model_type, hidden
size, MLP width, layers, heads, KV heads, head_dim where it is not hidden/heads, vocab, tied embeddings, MoE
fields). `known_config(name)` turns one into a real `transformers` config via `AutoConfig.for_model`, enough to
instantiate the model on the meta device. Values are those of the official Hugging Face `config.json` files;
fields that change no count (RoPE, norms, context length) are left at transformers' defaults.

Not from the paper: the paper names only the Llama 3 and Qwen3 models it used; the other rows are for users.
"""

from __future__ import annotations

import re
from typing import Any

from regretless.errors import UserError

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256}
_QWEN25_SMALL = {"model_type": "qwen2", "vocab_size": 151936, "tie_word_embeddings": True}
_QWEN25_LARGE = {"model_type": "qwen2", "vocab_size": 152064, "tie_word_embeddings": False}
_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128}
_SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True}
_GEMMA2 = {"model_type": "gemma2", "vocab_size": 256000, "head_dim": 256, "tie_word_embeddings": True}


def _row(base: dict[str, Any], hidden: int, inter: int, layers: int, heads: int, kv: int, **kw: Any) -> dict:
    return {**base, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, **kw}


# canonical name -> config fields (hidden, intermediate, layers, heads, kv heads)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": _row(_LLAMA3, 2048, 8192, 16, 32, 8, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-3B": _row(_LLAMA3, 3072, 8192, 28, 24, 8, head_dim=128, tie_word_embeddings=True),
    "Llama-3.1-8B": _row(_LLAMA3, 4096, 14336, 32, 32, 8, tie_word_embeddings=False),
    "Llama-3.1-70B": _row(_LLAMA3, 8192, 28672, 80, 64, 8, tie_word_embeddings=False),
    "Qwen2.5-0.5B": _row(_QWEN25_SMALL, 896, 4864, 24, 14, 2),
    "Qwen2.5-1.5B": _row(_QWEN25_SMALL, 1536, 8960, 28, 12, 2),
    "Qwen2.5-3B": _row(_QWEN25_SMALL, 2048, 11008, 36, 16, 2),
    "Qwen2.5-7B": _row(_QWEN25_LARGE, 3584, 18944, 28, 28, 4),
    "Qwen2.5-14B": _row(_QWEN25_LARGE, 5120, 13824, 48, 40, 8),
    "Qwen2.5-32B": _row(_QWEN25_LARGE, 5120, 27648, 64, 40, 8),
    "Qwen2.5-72B": _row(_QWEN25_LARGE, 8192, 29568, 80, 64, 8),
    "Qwen3-0.6B": _row(_QWEN3, 1024, 3072, 28, 16, 8, tie_word_embeddings=True),
    "Qwen3-1.7B": _row(_QWEN3, 2048, 6144, 28, 16, 8, tie_word_embeddings=True),
    "Qwen3-4B": _row(_QWEN3, 2560, 9728, 36, 32, 8, tie_word_embeddings=True),
    "Qwen3-8B": _row(_QWEN3, 4096, 12288, 36, 32, 8, tie_word_embeddings=False),
    "Qwen3-14B": _row(_QWEN3, 5120, 17408, 40, 40, 8, tie_word_embeddings=False),
    "Qwen3-32B": _row(_QWEN3, 5120, 25600, 64, 64, 8, tie_word_embeddings=False),
    "Qwen3-30B-A3B": _row({**_QWEN3, "model_type": "qwen3_moe"}, 2048, 6144, 48, 32, 4,
                          tie_word_embeddings=False, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[]),
    "Mistral-7B-v0.3": _row({"model_type": "mistral", "vocab_size": 32768}, 4096, 14336, 32, 32, 8,
                            tie_word_embeddings=False),
    "Gemma-2-2B": _row(_GEMMA2, 2304, 9216, 26, 8, 4),
    "Gemma-2-9B": _row(_GEMMA2, 3584, 14336, 42, 16, 8),
    "SmolLM2-135M": _row(_SMOLLM2, 576, 1536, 30, 9, 3),
    "SmolLM2-360M": _row(_SMOLLM2, 960, 2560, 32, 15, 5),
    "SmolLM2-1.7B": _row(_SMOLLM2, 2048, 8192, 24, 32, 32),
}

_ALIASES = {"mistral-7b": "Mistral-7B-v0.3"}
_SUFFIXES = ("-base", "-instruct", "-it", "-chat", "-hf")


def normalize_name(name: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b' (the key `known_config` looks up)."""
    key = name.strip().rstrip("/").split("/")[-1].lower()
    for _ in range(2):  # e.g. '-instruct-hf'
        for s in _SUFFIXES:
            key = key.removesuffix(s)
    key = re.sub(r"^meta-(?=llama)", "", key)
    return key


_INDEX = {normalize_name(k): k for k in KNOWN_MODELS} | _ALIASES


def canonical_name(name: str) -> str | None:
    """The table's spelling of `name`, or None when it is not in the table."""
    return _INDEX.get(normalize_name(name))


def known_config(name: str) -> Any:
    """A `transformers.PretrainedConfig` for a model in the table (case-insensitive; org prefix and
    -Base/-Instruct suffixes ignored). Raises UserError listing the known names otherwise."""
    from transformers import AutoConfig

    canon = canonical_name(name)
    if canon is None:
        raise UserError(f"model {name!r}: not a local model folder nor a known model; known models: "
                        f"{', '.join(KNOWN_MODELS)}")
    fields = dict(KNOWN_MODELS[canon])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg._name_or_path = canon
    return cfg
