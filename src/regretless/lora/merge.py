"""Merge W' = W + s·B·A into the base weights, unmerge (bit-exact), and unload to a plain transformers model.

Shared weights are never changed behind the user's back: a base weight that another module also holds (a tied LM
head, whose weight is the input embedding table) is untied first: the adapted module gets its own copy, merged,
and `config.tie_word_embeddings` is set to False so that saving and reloading keeps the two apart. Unmerging ties
the weight again. The untied module names are returned. `adapters_disabled` gives the base model's forward, merged
or not, without a second copy of the weights. `merged_for_decoding` gives token-by-token decoding (RL sampling,
greedy eval) one GEMM per adapted matrix, from merged copies, leaving the trained adapters and base weights alone.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from regretless.lora.experts import LoRAExperts
from regretless.lora.inject import lora_modules
from regretless.lora.layer import LoRALinear, LoRAParam


def _weight_attr(m: nn.Module) -> tuple[nn.Module, str]:
    return (m.base_layer, "weight") if isinstance(m, LoRALinear) else (m.base_layer, m.param)


@torch.no_grad()
def merge_lora(model: nn.Module, only: list[nn.Module] | None = None) -> list[str]:
    """Merge every adapter (or those in `only`). Returns the module names whose shared weight was untied."""
    untied = []
    for name, m in lora_modules(model):
        if only is not None and not any(m is o for o in only):
            continue
        if m.merged:
            continue
        if isinstance(m, (LoRALinear, LoRAParam)) and m.tied_to is not None:
            holder, attr = _weight_attr(m)
            shared = getattr(holder, attr)
            setattr(holder, attr, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
            m._shared = (shared, m.tied_to)  # re-tied by unmerge
            m.tied_to = None
            cfg = getattr(model, "config", None)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False) and m is head:
                cfg.tie_word_embeddings = False
                m._retie_config = True
            untied.append(name)
        m.merge()
    return untied


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()
        shared = getattr(m, "_shared", None)
        if shared is not None:
            holder, attr = _weight_attr(m)
            setattr(holder, attr, shared[0])
            m.tied_to = shared[1]
            m._shared = None
            if getattr(m, "_retie_config", False):
                model.config.tie_word_embeddings = True
                m._retie_config = False


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA wrapper by its (merged) base module: a plain transformers model again."""
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)  # a plain base model: drop a merge done earlier
    for name, m in list(lora_modules(model)):
        m._backup = {} if isinstance(m, LoRAExperts) else None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base_layer)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model's forward (e.g. the reference policy for a KL term) without a second copy of the weights.
    Merged adapters are unmerged for the duration (bit-exact: the saved base weights come back) and merged again
    afterwards."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    merged = [m.merged for m in mods]
    if any(merged):
        unmerge_lora(model)
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.enabled = b
        if any(merged):
            merge_lora(model, only=[m for m, was in zip(mods, merged) if was])


@contextlib.contextmanager
def merged_for_decoding(model: nn.Module, max_bytes: int | None = None, low_precision_only: bool = False):
    """Inside, forwards without grad of every active dense adapter (`LoRALinear`) run x·W'ᵀ with W' = W + s·B·A
    computed once on entry (fp32 sum, rounded to the compute dtype: the autocast dtype when autocast is on, else
    the base weight's): one GEMM and no adapter casts per matrix and token step, where the adapter path runs
    three or more kernels (casts of A and B, x·Aᵀ, the B GEMM accumulated) besides the base GEMM. Decoding is
    launch-bound at RL's batch sizes, so this is what a sampler wants; the numbers agree with the adapter path to
    the compute dtype's rounding. Forwards with grad (training) ignore the copies. The copies cost one weight's
    bytes per adapted matrix: when that is over `max_bytes`, nothing changes. `low_precision_only`: only where
    the compute dtype is below fp32 (bf16, fp16). Routed-expert and bare-parameter adapters keep their own paths."""
    def compute_dtype(m: LoRALinear) -> torch.dtype:
        dev = m.base_layer.weight.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else m.base_layer.weight.dtype

    todo = [(m, compute_dtype(m)) for _, m in lora_modules(model)
            if isinstance(m, LoRALinear) and m.enabled and not m.merged and m._decode_weight is None]
    if low_precision_only:
        todo = [(m, dt) for m, dt in todo if dt.itemsize < 4]
    if max_bytes is not None and sum(m.out_features * m.in_features * dt.itemsize for m, dt in todo) > max_bytes:
        todo = []
    try:
        for m, dt in todo:
            m._decode_weight = m.merged_weight(dt)
        yield model
    finally:
        for m, _ in todo:
            m._decode_weight = None
