"""Supervised fine-tuning, LoRA (default) or FullFT (--full), on chat or prompt/completion data.

examples:
  regretless sft --out runs/sft                                    # all defaults: SmolLM2-135M, chatterbot, r=32
  regretless sft --model smollm2-135m --data chatterbot --out runs/r8 --rank 8 --steps 100
  regretless sft --data my_chats.jsonl --full --lr 5e-5 --out runs/full
  regretless sft --config runs/sft/config.yaml --out runs/sft --resume   # continue a killed run
  regretless sft --out runs/tb report_to=tensorboard lora.alpha=16        # any config field as key=value

The LR defaults to the recipe's (printed with its reason). Files: config.yaml, metrics.jsonl, summary.json,
checkpoints/, and adapter/ (LoRA) or model/ (FullFT). Try the result with `regretless generate --run DIR`.
"""

from __future__ import annotations

from regretless.commands._train_args import add_common, build_config
from regretless.config import SFTConfig

FLAGS = {"data": "data", "steps": "steps", "epochs": "epochs", "batch_size": "batch_size",
         "micro_batch_size": "micro_batch_size", "seq_len": "seq_len", "packing": "packing",
         "eval_every": "eval_every", "save_every": "save_every", "lr_schedule": "lr_schedule",
         "too_long": "too_long"}


def add_arguments(p) -> None:
    add_common(p)
    p.add_argument("--data", help="chat/prompt-completion JSONL, a datasets folder or parquet, or a built-in "
                                  "name (chatterbot, gsm-symbolic)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward pass (gradient accumulation)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--packing", action="store_true", help="pack examples into seq-len rows (padding-free)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"])
    p.add_argument("--too-long", choices=["truncate", "skip"], help="what to do with sequences over --seq-len")


def run(args) -> int:
    from regretless.prepare import ensure_model
    from regretless.train import run_sft

    cfg = build_config(SFTConfig, args, FLAGS)
    ensure_model(cfg.model)  # a built-in made by training (tiny-base) is built here, above the trainer
    summary = run_sft(cfg, resume=args.resume)
    return 3 if summary["status"] == "diverged" else 0
