"""The LoRA engine: wrap any transformers causal LM (dense, MoE or hybrid SSM) with the paper's LoRA, in PEFT's format.

    report = apply_lora(model, LoRAConfig(rank=32))      # freezes the base; report.table() is the coverage table
    save_adapter(model, "out/adapter", cfg, base_model="...")
    load_adapter(fresh_model, "out/adapter")             # also reads adapters saved by PEFT
    export_per_expert(model, "out/per-expert", cfg)      # fused experts as experts.N.gate_proj/up_proj/down_proj
    with adapters_disabled(model): ...                   # the base model, no second copy
    with merged_for_decoding(model): ...                 # decoding with W + s·B·A: one GEMM per matrix
    unload(model, merge=True)                            # a plain HF model with ΔW merged in

Targets are found by structure (`regretless.lora.structure`), not by module names.
"""

from regretless.lora.config import LoRAConfig
from regretless.lora.experts import ExpertsLayout, LoRAExperts
from regretless.lora.inject import (
    LoRAReport,
    Target,
    apply_lora,
    find_targets,
    lora_modules,
    lora_parameters,
    param_groups,
    plan,
)
from regretless.lora.io import export_per_expert, load_adapter, read_adapter, save_adapter
from regretless.lora.layer import LoRALinear, LoRAParam
from regretless.lora.merge import adapters_disabled, merge_lora, merged_for_decoding, unload, unmerge_lora
from regretless.lora.structure import scan

__all__ = [
    "ExpertsLayout", "LoRAConfig", "LoRAExperts", "LoRALinear", "LoRAParam", "LoRAReport", "Target",
    "adapters_disabled", "apply_lora", "export_per_expert", "find_targets", "load_adapter", "lora_modules",
    "lora_parameters", "merge_lora", "merged_for_decoding", "param_groups", "plan", "read_adapter", "save_adapter",
    "scan", "unload", "unmerge_lora",
]
