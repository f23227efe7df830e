"""Flags shared by `regretless sft` and `regretless rl`: they fill the config dataclass; anything else is a
`key=value` override (e.g. `lora.rslora=true adam_betas=[0.9,0.999]`)."""

from __future__ import annotations

import argparse
from typing import Any

from regretless.config import load_config, to_dict
from regretless.errors import UserError
from regretless.lora.config import LoRAConfig


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field, e.g. lora.alpha=16")
    p.add_argument("--config", help="YAML config file (fields of the config dataclass)")
    p.add_argument("--model", help="local HF folder, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("--out", help="run folder (config.yaml, metrics.jsonl, checkpoints, adapter/ or model/)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--rank", type=int, help="LoRA rank (default: 32 for sft, 1 for rl)")
    m.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--targets", help="LoRA targets: all | mlp | attn | comma-separated module names or regexes")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's, printed)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--report-to", help="also log metrics to tensorboard | wandb | mlflow (comma-separated)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, about a third more compute")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="with --full: keep the input embeddings and LM head fixed (train what LoRA can reach)")


def build_config(cls: type, args: argparse.Namespace, flags: dict[str, str]) -> Any:
    """flags maps argparse dest -> config field for the command's own flags."""
    values: dict[str, Any] = {}
    for dest, field in {"model": "model", "out": "out", "lr": "lr", "seed": "seed", "device": "device",
                        "report_to": "report_to",
                        "gradient_checkpointing": "gradient_checkpointing",
                        "freeze_embeddings": "freeze_embeddings", **flags}.items():
        v = getattr(args, dest, None)
        if v is not None and v is not False:
            values[field] = v
    cfg = load_config(cls, args.config, args.overrides, values)
    if args.full:
        from dataclasses import replace

        cfg = replace(cfg, lora=None)
    elif args.rank is not None or args.targets is not None:
        from dataclasses import replace

        lora = cfg.lora or LoRAConfig()
        if args.rank is not None:
            lora = replace(lora, rank=args.rank)
        if args.targets is not None:
            lora = replace(lora, targets=args.targets)
        cfg = replace(cfg, lora=lora)
    if not cfg.out:
        raise UserError("--out: required; the folder where the run's files go")
    _ = to_dict(cfg)
    return cfg
