"""Step time of one training step on a GPU: regretless LoRA vs FullFT vs transformers+PEFT LoRA.

Random-init models of real shapes (weights do not change speed), bf16 compute. Each method runs forward +
backward + AdamW step on the same batch; the median of `--iters` steps after warm-up, timed with CUDA events.

    python benchmarks/gpu_step.py --shape llama-1b --batch 8 --seq 2048 --rank 32
    python benchmarks/gpu_step.py --shape qwen3-moe-small --batch 8 --seq 2048 --rank 32

Prints one JSON line per method, and a table. The FLOP model is `regretless.counts.flops_per_token`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from regretless import lm
from regretless.counts import flops_per_token
from regretless.lora import LoRAConfig, apply_lora, param_groups

SHAPES = {
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192},
    "llama-8b-4l": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192},
    "qwen3-moe-small": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                            "num_hidden_layers": 6, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                            "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "decoder_sparse_step": 1,
                            "mlp_only_layers": [], "max_position_embeddings": 8192},
}


def build(shape: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def time_steps(step, iters: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def run(method: str, args) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    full = method == "full"
    # FullFT keeps fp32 master weights (as the trainer does); LoRA freezes a bf16 base
    model = build(args.shape, torch.float32 if full else torch.bfloat16)
    lcfg = LoRAConfig(rank=args.rank, targets=args.targets)
    flops = flops_per_token(model, None if full else lcfg)
    if method == "regretless":
        apply_lora(model, lcfg)
        params = param_groups(model, 1e-4)
    elif method == "peft":
        from peft import LoraConfig, get_peft_model

        moe = hasattr(model.config, "num_experts")
        pc = LoraConfig(r=args.rank, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"] +
                        ([] if moe else ["gate_proj", "up_proj", "down_proj"]),
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None)
        model = get_peft_model(model, pc)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
    if args.compile:  # in place, so parameter names and the LoRA wrappers stay as they are
        (model.get_base_model().model if method == "peft" else model.model).compile(dynamic=False)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch, args.seq), device="cuda", generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if method == "peft":
                loss = model(**batch).loss  # transformers' own loss path: full logits
            else:
                s, n = lm.nll_sum(model, batch)
                loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, args.iters)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"--- {method}: top CUDA kernels")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    ms = statistics.median(times)
    tokens = args.batch * args.seq
    res = {"method": method + ("+compile" if args.compile else ""), "shape": args.shape, "batch": args.batch, "seq": args.seq, "rank": args.rank,
           "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3),
           "model_tflops_per_s": round(flops * tokens / ms / 1e9, 1),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "flops_per_token": flops, "spread_ms": round(max(times) - min(times), 2)}
    step = None  # drop the closure (and with it the model, optimizer and batch) before the next method
    gc.collect()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--targets", default="all")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--methods", default="full,regretless,peft")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer trunk")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per method")
    args = ap.parse_args()
    rows = []
    for m in args.methods.split(","):
        try:
            rows.append(run(m, args))
        except Exception as e:  # noqa: BLE001 - report and go on with the other methods
            rows.append({"method": m, "shape": args.shape, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    full = next((r for r in rows if r["method"].startswith("full") and "ms_per_step" in r), None)
    print(f"\n{'method':<11} {'ms/step':>9} {'tok/s':>9} {'vs full':>8} {'TFLOP/s':>8} {'mem GB':>7}")
    for r in rows:
        if "ms_per_step" in r:
            rel = f"{r['ms_per_step'] / full['ms_per_step']:.2f}" if full else "-"
            print(f"{r['method']:<11} {r['ms_per_step']:>9} {r['tokens_per_s']:>9} {rel:>8} "
                  f"{r['model_tflops_per_s']:>8} {r['peak_mem_gb']:>7}")


if __name__ == "__main__":
    main()
