"""LoRAConfig: what the engine needs to know. Defaults are the paper's (alpha=32, scale alpha/r, B=0, no dropout).

`targets` and `exclude` are presets (all | mlp | attn) or module names / regexes: see `regretless.lora.inject`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 32
    alpha: float = 32.0
    targets: str | tuple[str, ...] = "all"  # preset all|mlp|attn, or module names / regexes
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    lr_b_mult: float = 1.0  # LoRA+: LR of B = lr * lr_b_mult
    expert_rank: int | None = None  # per-expert rank of MoE layers; default rank // top_k (the paper's rule)
    exclude: str | tuple[str, ...] = ()  # names / regexes left unadapted (also silences unsupported-weight errors)

    def scale(self, rank: int) -> float:
        return self.alpha / (rank**0.5 if self.rslora else rank)
