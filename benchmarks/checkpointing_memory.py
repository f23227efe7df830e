"""Memory saved by activation checkpointing (`gradient_checkpointing=true`) on CPU, LoRA and FullFT.

Each configuration runs in a fresh process (the peak resident set size, ru_maxrss, cannot be reset): build a
random-init Llama of the given shape, set it up as the trainer does (regretless LoRA, or FullFT with every
parameter trained; `regretless.train.enable_checkpointing`), then time forward + backward of the SFT loss
(`regretless.lm.nll_sum`, the trainer's chunked loss) on one micro-batch. Reported: the step's peak memory above
what the process held before the first step (model, gradients of the previous step freed), and the median step
time. Gradients are checked equal to the plain run's (max abs difference printed).

    python benchmarks/checkpointing_memory.py --layers 8 --hidden 512 --seq 1024 --batch 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args: argparse.Namespace, method: str, ckpt: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from regretless import lm
    from regretless.lora import LoRAConfig, apply_lora
    from regretless.train import enable_checkpointing

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=args.rank))
    else:
        model.requires_grad_(True)
    if ckpt:
        enable_checkpointing(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # hold the gradient buffers before measuring: they are the same with and without
        p.grad = torch.zeros_like(p)
    before = rss_mb()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        s, n = lm.nll_sum(model, batch)
        (s / n).backward()
        times.append(time.perf_counter() - t0)
    grad = torch.cat([p.grad.flatten() / args.steps for p in params])
    torch.save(grad, f"{args.grad_file}.{method}.{int(ckpt)}")
    return {"method": method, "checkpointing": ckpt, "peak_above_model_mb": round(rss_mb() - before, 1),
            "model_and_grads_mb": round(before, 1), "step_s": round(statistics.median(times), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grad-file", default="/tmp/regretless-ckpt-bench")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one[0], args.one[1] == "1")))
        return
    import torch

    rows = []
    base = [a for a in sys.argv[1:]]
    for method in ("lora", "full"):
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, *base, "--one", method, str(int(ckpt))], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        a, b = (torch.load(f"{args.grad_file}.{method}.{k}") for k in (0, 1))
        rows[-1]["max_grad_diff"] = float((a - b).abs().max())
    print(f"shape: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; batch {args.batch} x {args.seq} "
          f"tokens; LoRA r={args.rank} (all matrices); fp32, {args.threads} threads")
    print(f"{'method':<6} {'checkpointing':>13} {'peak above model MB':>20} {'step s':>8} {'max |grad diff|':>16}")
    for r in rows:
        diff = f"{r['max_grad_diff']:.1e}" if "max_grad_diff" in r else ""
        print(f"{r['method']:<6} {r['checkpointing']!s:>13} {r['peak_above_model_mb']:>20,.1f} {r['step_s']:>8.3f} "
              f"{diff:>16}")
    for method in ("lora", "full"):
        off, on = (r for r in rows if r["method"] == method)
        print(f"{method}: checkpointing saves {off['peak_above_model_mb'] - on['peak_above_model_mb']:,.0f} MB "
              f"({1 - on['peak_above_model_mb'] / off['peak_above_model_mb']:.0%}) and costs "
              f"{on['step_s'] / off['step_s'] - 1:+.0%} step time")


if __name__ == "__main__":
    main()
