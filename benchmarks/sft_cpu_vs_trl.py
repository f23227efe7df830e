"""CPU throughput of `regretless sft` vs TRL's SFTTrainer + PEFT on the same model, data, batch and LoRA.

Both: SmolLM2-135M-Instruct (the built-in, fp32), the chatterbot dialogs in chat format, LoRA r=8 with α=32 on
every linear layer but the LM head, batch 8 sequences, max length 512, AdamW, loss on assistant tokens only, the
same number of optimizer steps, fp32 without gradient checkpointing on both sides. Throughput = non-padding input tokens per second of training-step wall time,
skipping the first `--warmup` steps. TRL is an optional dependency: `pip install 'regretless[bench]'`.

    OMP_NUM_THREADS=2 python benchmarks/sft_cpu_vs_trl.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_regretless(model_dir: str, steps: int, warmup: int, batch: int, seq_len: int, rank: int) -> dict:
    from regretless.config import SFTConfig
    from regretless.lora import LoRAConfig
    from regretless.train import run_sft

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(model=model_dir, data="chatterbot", out=f"{tmp}/run", steps=steps, batch_size=batch,
                        seq_len=seq_len, lr=2e-4, lora=LoRAConfig(rank=rank), eval_size=0, eval_every=10**6,
                        save_every=10**6, device="cpu")
        run_sft(cfg)
        rows = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][warmup:]
    seconds = sum(r["step_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows)
    return {"impl": "regretless", "steps_timed": len(rows), "tokens_per_s": tokens / seconds,
            "final_loss": rows[-1]["loss"]}


def bench_trl(model_dir: str, steps: int, warmup: int, batch: int, seq_len: int, rank: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from regretless.data import load_examples

    examples = [{"messages": e["messages"]} for e in load_examples("chatterbot")]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    times: list[tuple[float, int]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.n0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t0, state.num_input_tokens_seen - self.n0))

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=batch, max_length=seq_len, max_steps=steps,
                         learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no",
                         report_to=[], use_cpu=True, include_num_input_tokens_seen="non_padding",
                         assistant_only_loss=False, dataloader_num_workers=0, seed=0,
                         # TRL's defaults are bf16 autocast and gradient checkpointing (both slow on a CPU):
                         # turn them off so both sides run fp32 without recomputation
                         bf16=False, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=tok,
                             peft_config=LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules="all-linear"))
        trainer.add_callback(Timer())
        trainer.train()
    timed = times[warmup:]
    return {"impl": "trl+peft", "steps_timed": len(timed),
            "tokens_per_s": sum(n for _, n in timed) / sum(t for t, _ in timed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--only", choices=["regretless", "trl"], default=None)
    args = ap.parse_args()
    from regretless.assets import prepare_smollm2

    model_dir = str(prepare_smollm2())
    import torch

    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    res = []
    if args.only in (None, "regretless"):
        res.append(bench_regretless(model_dir, args.steps, args.warmup, args.batch, args.seq_len, args.rank))
    if args.only in (None, "trl"):
        res.append(bench_trl(model_dir, args.steps, args.warmup, args.batch, args.seq_len, args.rank))
    for r in res:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
