"""The LoRA engine: wrap any transformers causal LM (dense or MoE) with the paper's LoRA, in PEFT's format.

    report = apply_lora(model, LoRAConfig(rank=32))      # freezes the base, prints nothing unless verbose
    save_adapter(model, "out/adapter", cfg, base_model="...")
    load_adapter(fresh_model, "out/adapter")             # also reads adapters saved by PEFT
    with adapters_disabled(model): ...                   # the base model, no second copy
    unload(model, merge=True)                            # a plain HF model with ΔW merged in
"""

from regretless.lora.config import LoRAConfig
from regretless.lora.experts import LoRAExperts
from regretless.lora.inject import (
    LoRAReport,
    Target,
    adapters_disabled,
    apply_lora,
    find_targets,
    lora_modules,
    lora_parameters,
    param_groups,
)
from regretless.lora.io import load_adapter, merge_lora, read_adapter, save_adapter, unload, unmerge_lora
from regretless.lora.layer import LoRALinear

__all__ = [
    "LoRAConfig", "LoRAExperts", "LoRALinear", "LoRAReport", "Target", "adapters_disabled", "apply_lora",
    "find_targets", "load_adapter", "lora_modules", "lora_parameters", "merge_lora", "param_groups",
    "read_adapter", "save_adapter", "unload", "unmerge_lora",
]
