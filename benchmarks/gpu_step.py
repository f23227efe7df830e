"""One training step on one GPU, side by side (issue 12): regretless LoRA and FullFT vs plain transformers and PEFT.

Random-init models of real shapes (weights do not change speed). One step = forward + backward + fused AdamW on
the same batch; median of `--iters` CUDA-event-timed steps after `--warmup` untimed ones (compiled methods compile
in the warm-up). Every configuration runs in its own try/except: an OOM or a compile failure prints one line and
the script goes on. A global `--budget-s` skips configurations whose estimated cost no longer fits; results are
written after each configuration (`<out>.jsonl` and the markdown table `<out>`), so a killed run keeps what it had.

    PYTHONPATH=src python3 benchmarks/gpu_step.py --out $OUT/gpu_step.md --budget-s 540
    PYTHONPATH=src python3 benchmarks/gpu_step.py --tiny --out /tmp/gpu_step.md        # CPU check, < 1 min

Methods
  hf-full-bf16   plain transformers FullFT: bf16 weights, fused AdamW, `model(**batch).loss` (full logits), no
                 regretless code: the reference of the issue's "0.72x a plain bf16 FullFT step"
  rl-full        regretless FullFT as the trainer runs it on CUDA: fp32 master weights, bf16 autocast (MoE experts'
                 3-D weights cast to bf16 too: models.autocast_experts), lm.nll_sum (the fused head + NLL, here
                 also computing the trainable tied head's dW)
  rl-lora        regretless LoRA: frozen bf16 base, fp32 adapters, bf16 autocast, lm.nll_sum (fused head + NLL:
                 no logits kept for backward); `-nogroup` = the same with the q/k/v, gate/up group fusion and
                 the experts' gate/up pair turned off (A/B of those changes); `-plaince` = the same with the
                 plain chunked cross-entropy, every chunk's fp32 logits kept for backward (A/B of the fused loss);
                 `-fusednode+compile` = compiled with each dense adapter's own fused autograd node (LoRA term
                 accumulated inside the GEMMs) traced into the blocks instead of plain ops (A/B);
                 `-autotune+compile` = compiled with inductor's GEMM autotuning (max_autotune_gemm: Triton
                 templates, the grouped expert GEMMs among them, against the ATen kernels);
                 `-tuned+compile` = compiled with inductor's coordinate-descent tuning of its generated kernels'
                 launch configurations (the blocks' fused element-wise kernels and the head's softmax);
                 `-cudagraph+compile` = compiled with CUDA graphs (inductor's cudagraph trees, as
                 mode="reduce-overhead"): each block's kernels replayed in one launch;
                 `-slotdown` = the routed experts' down adapter per slot (a grouped up-projection writing an
                 (S, H) delta) instead of after the tokens' sum in token space (A/B); `-slota` = the first
                 projection's x·Aᵀ grouped over the slot rows instead of one dense GEMM on the tokens (A/B);
                 `-notriton` = the fused head's softmax pass compiled by inductor (or eager) instead of the
                 Triton kernels of `regretless.kernels` (A/B)
  floor          the frozen floor: the bf16 base with no adapters, no weight gradients, input gradients through
                 every layer (the embeddings' output asks for one), the fused head: what a LoRA step on this base
                 cannot go below with these kernels; MFU counts 4·N + attention
  peft           transformers + PEFT LoRA (target_modules, and target_parameters for fused experts), HF loss,
                 under bf16 autocast (the adapters' matmuls in bf16, as HF Trainer's bf16=True runs it)
  peft-plain     the same in a plain bf16 loop: no autocast, PEFT's default fp32 adapters (their matmuls in fp32):
                 the setup of the issue's own PEFT measurement (0.471 s, 69 GiB); the targets are checked against
                 both PEFT setups
  +compile       regretless: `torch.compile` of each decoder block, as the trainer's `compile=true` does
                 (`train.compile_blocks`; the fused head's softmax pass runs as Triton kernels on CUDA with or
                 without it, compiled by inductor only where those do not apply); PEFT: of the trunk, as a
                 PEFT user would (traced, transformers hands SDPA a materialized causal mask)
  +ckpt          activation checkpointing of every decoder layer (non-reentrant), as `gradient_checkpointing=true`

MFU = model FLOPs per step / step time / 989e12 (H200 dense bf16 peak), with model FLOPs per token
  LoRA:   4·N + 6·N_lora + attention      FullFT: 6·N + attention
  N = matmul weights a token passes through (decoder matrices, routed experts top-k of E, router, LM head;
  `regretless.counts.flops_per_token`), N_lora = LoRA parameters a token passes through, attention = 6·L·T·d_attn
  (causal QKᵀ and AV: 2·T·d_attn forward per layer and token, times 3 for forward + backward; T = sequence length,
  d_attn = heads·head_dim).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from regretless import lm
from regretless.counts import flops_per_token
from regretless.lora import LoRAConfig, apply_lora, lora_modules, param_groups
from regretless.models import autocast_experts
from regretless.train import compile_blocks, to_device

PEAK_FLOPS = 989e12  # H200 SXM dense bf16
AB_VARIANTS = ("rl-lora-nogroup", "rl-lora-plaince", "rl-lora-fusednode", "rl-lora-slotdown",
               "rl-lora-slota", "rl-lora-notriton")  # one change each
TUNED = {"rl-lora-autotune": {"max_autotune_gemm": True},  # inductor options of the tuned A/B cases
         "rl-lora-tuned": {"coordinate_descent_tuning": True},
         "rl-lora-cudagraph": {"triton.cudagraphs": True}}  # torch.compile's mode="reduce-overhead"

SHAPES = {  # full size; --tiny shrinks them
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072, "rope_theta": 500000.0},
    "qwen3-30b-a3b-8l": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                         "moe_intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 32,
                         "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                         "norm_topk_prob": True, "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
                         "tie_word_embeddings": False, "max_position_embeddings": 40960, "rope_theta": 1000000.0},
}
TINY = {"llama-3.2-1b": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512},
        "qwen3-30b-a3b-8l": {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                             "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512}}


@dataclasses.dataclass(frozen=True)
class Case:
    section: str  # dense | moe | long
    shape: str
    method: str  # hf-full-bf16 | rl-full | rl-lora | rl-lora-nogroup | rl-lora-plaince | rl-lora-slot* | peft
    batch: int
    seq: int
    compile: bool = False
    ckpt: bool = False
    est_s: float = 30.0  # wall-clock estimate, for the budget

    @property
    def name(self) -> str:
        return self.method + ("+compile" if self.compile else "") + ("+ckpt" if self.ckpt else "")


def cases(tiny: bool) -> list[Case]:
    """In priority order: what matters most runs first, so a tight budget drops the least important."""
    B, T, TL = (2, 64, 256) if tiny else (8, 2048, 16384)
    d, m = "llama-3.2-1b", "qwen3-30b-a3b-8l"
    return [
        Case("dense", d, "hf-full-bf16", B, T, est_s=25), Case("dense", d, "rl-lora", B, T, est_s=25),
        Case("dense", d, "peft", B, T, est_s=25), Case("dense", d, "rl-full", B, T, est_s=30),
        Case("dense", d, "rl-lora-plaince", B, T, est_s=25), Case("dense", d, "rl-lora-nogroup", B, T, est_s=25),
        Case("dense", d, "rl-lora", B, T, compile=True, est_s=60), Case("dense", d, "peft", B, T, compile=True, est_s=120),
        Case("moe", m, "rl-lora", B, T, est_s=40), Case("moe", m, "peft", B, T, est_s=45),
        Case("moe", m, "hf-full-bf16", B, T, est_s=45), Case("moe", m, "rl-full", B, T, est_s=60),
        Case("long", d, "rl-lora", 1, TL, est_s=25), Case("long", d, "rl-lora", 1, TL, ckpt=True, est_s=25),
        Case("moe", m, "rl-lora-nogroup", B, T, est_s=40),
        Case("moe", m, "rl-lora", B, T, compile=True, est_s=80), Case("moe", m, "peft", B, T, compile=True, est_s=150),
        Case("moe", m, "rl-full", B, T, compile=True, est_s=100),
        # PEFT as a plain training loop runs it: bf16 base, PEFT's default fp32 adapters, no autocast (so the
        # adapters' matmuls run in fp32): the setup of the issue's own PEFT measurement (0.471 s, 69 GiB)
        Case("dense", d, "peft-plain", B, T, est_s=30), Case("moe", m, "peft-plain", B, T, est_s=60),
        Case("dense", d, "peft-plain", B, T, compile=True, est_s=75),  # 47 s and 24 s measured (13:01, 12-04)
        Case("moe", m, "peft-plain", B, T, compile=True, est_s=60),
        Case("dense", d, "rl-lora-fusednode", B, T, compile=True, est_s=60),
        # the frozen floor: what any LoRA step on this base must at least cost (no adapters, no weight gradients,
        # input gradients through every layer, the fused head), and the A/Bs of the compiled groups and autotuning
        Case("dense", d, "floor", B, T, compile=True, est_s=50), Case("moe", m, "floor", B, T, compile=True, est_s=70),
        Case("dense", d, "rl-lora-nogroup", B, T, compile=True, est_s=60),
        Case("moe", m, "rl-lora-slotdown", B, T, compile=True, est_s=80),
        Case("moe", m, "rl-lora-slota", B, T, compile=True, est_s=80),
        Case("dense", d, "rl-lora-notriton", B, T, compile=True, est_s=60),
        Case("moe", m, "rl-lora-notriton", B, T, compile=True, est_s=80),
        Case("dense", d, "rl-lora-cudagraph", B, T, compile=True, est_s=80),
        Case("moe", m, "rl-lora-cudagraph", B, T, compile=True, est_s=100),
        Case("moe", m, "rl-lora-autotune", B, T, compile=True, est_s=300),
        Case("dense", d, "rl-lora-tuned", B, T, compile=True, est_s=120),
        Case("moe", m, "rl-lora-tuned", B, T, compile=True, est_s=150),
    ]


def build(shape: str, dtype: torch.dtype, device: str, tiny: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape], **(TINY[shape] if tiny else {}))
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def lora_cfg(rank: int) -> LoRAConfig:
    return LoRAConfig(rank=rank, alpha=32, targets="all")  # routed experts: rank // top-k each (the paper's budget)


def peft_model(model, moe: bool, rank: int):
    from peft import LoraConfig, get_peft_model

    top_k = getattr(model.config, "num_experts_per_tok", 1)
    kw = {}
    if moe:  # fused 3-D experts: PEFT's target_parameters, at the per-expert rank r // top-k (PEFT keys
        # rank_pattern of target_parameters by module.parameter)
        kw = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
              "rank_pattern": {"experts.gate_up_proj": rank // top_k, "experts.down_proj": rank // top_k}}
    mods = ["q_proj", "k_proj", "v_proj", "o_proj"] + ([] if moe else ["gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=mods, **kw))


def attention_flops_per_token(cfg, seq: int) -> float:
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return 6.0 * cfg.num_hidden_layers * seq * d_attn


def set_group_fusion(model, on: bool) -> None:
    for _, m in lora_modules(model):
        if hasattr(m, "group_fusion"):  # dense q/k/v and gate/up groups (compiled: and the up-projection
            m.group_fusion = m.up_in_base_gemm = on  # inside the base GEMM of the adapters alone)
        if hasattr(m, "fuse_gate_up"):  # routed experts' gate/up pair
            m.fuse_gate_up = on


def run_case(c: Case, args, device: str) -> dict:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    peft = c.method.startswith("peft")
    lora = c.method.startswith("rl-lora") or peft
    weights = torch.float32 if c.method == "rl-full" else torch.bfloat16
    lm.TRITON_SOFTMAX = c.method != "rl-lora-notriton"  # the fused head's softmax pass: Triton kernels or not
    model = build(c.shape, weights, device, args.tiny)
    moe = hasattr(model.config, "num_experts")
    lcfg = lora_cfg(args.rank)
    flops_tok = flops_per_token(model, lcfg if lora else None) * (4 / 6 if c.method == "floor" else 1) + \
        attention_flops_per_token(model.config, c.seq)
    if c.method == "floor":  # frozen: the embeddings' output asks for a gradient, so every layer passes one back
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
        groups = []
    elif c.method.startswith("rl-lora"):
        apply_lora(model, lcfg)
        set_group_fusion(model, c.method != "rl-lora-nogroup")  # compiled: also the up-projection's concat
        for _, mod in lora_modules(model):
            if hasattr(mod, "down_in_token_space"):  # the routed experts' adapters in token space
                mod.down_in_token_space = c.method != "rl-lora-slotdown"
                mod.a_in_token_space = c.method != "rl-lora-slota"
        for _, mod in lora_modules(model):
            if hasattr(mod, "fused_when_compiled"):  # the dense adapters (LoRALinear)
                mod.fused_when_compiled = c.method == "rl-lora-fusednode"
        groups = param_groups(model, 1e-5)
    elif peft:
        model = peft_model(model, moe, args.rank)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if c.method == "rl-full":  # as the trainer: fp32 master experts compute in bf16 under autocast
            autocast_experts(model)
        groups = param_groups(model, 1e-5)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    if c.ckpt:
        from regretless.train import enable_checkpointing

        enable_checkpointing(model.get_base_model() if peft else model)
    if c.compile and peft:  # the trunk, in place, as a PEFT user compiles it
        model.get_base_model().model.compile(backend=args.compile_backend, dynamic=False)
    elif c.compile:  # as the trainer does with compile=true: each decoder block
        options = TUNED.get(c.method, {}) if args.compile_backend == "inductor" else {}  # (inductor options)
        lm.COMPILE_OPTIONS = {k: v for k, v in options.items() if k != "triton.cudagraphs"}  # the head's softmax
        compile_blocks(model, backend=args.compile_backend, dynamic=False, **({"options": options} if options else {}))
    opt = torch.optim.AdamW(groups, lr=1e-5, fused=True) if groups else None
    model.train()
    amp = c.method not in ("hf-full-bf16", "peft-plain")  # the plain reference and loop: bf16 weights, no autocast
    hf_loss = c.method in ("hf-full-bf16", "peft", "peft-plain")
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (c.batch, c.seq), device=device, generator=g)
    batch = {"input_ids": ids, "labels": ids}
    if args.mask == "ones":  # what a padded batch without padding looks like to the model
        batch["attention_mask"] = torch.ones_like(ids)
    if not hf_loss:  # regretless methods get the batch as the trainer hands it over (no mask when right-padded)
        batch = to_device({k: v.cpu() for k, v in batch.items()}, torch.device(device), None, model)

    def step() -> torch.Tensor:
        ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            if hf_loss:
                loss = model(**batch, use_cache=False).loss  # transformers' own loss path: full logits
            else:
                s, n = lm.nll_sum(model, batch, fused=c.method != "rl-lora-plaince", compiled=c.compile)
                loss = s / n
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss = step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
    if not torch.isfinite(loss).item():
        raise RuntimeError(f"loss is {loss.item()}")
    sec = statistics.median(times)
    tokens = c.batch * c.seq
    res = {"section": c.section, "shape": c.shape, "method": c.name, "batch": c.batch, "seq": c.seq,
           "step_s": round(sec, 4), "tokens_per_s": round(tokens / sec), "spread_s": round(max(times) - min(times), 4),
           "min_s": round(min(times), 4),
           "mfu": round(flops_tok * tokens / sec / PEAK_FLOPS, 4), "gflop_per_token": round(flops_tok / 1e9, 3),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "trainable": n_train, "loss": round(loss.item(), 4), "warmup_s": round(warm_s, 1)}
    if args.profile and cuda:
        res["profile"] = profile_step(step)
    return res


KERNEL_KINDS = (  # profiler kernel name fragments -> kind, first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "splitkreduce")),
    ("optimizer", ("multi_tensor", "adam")),
    ("triton (fused by inductor)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other (eager element-wise, "
                "reductions, copies)")


GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of the GPU's own work


def idle_gaps(evs: list[dict], min_us: float = 5.0) -> dict:
    """Where a profiled step's GPU sits idle: every gap of >= min_us between kernels (memcpy and memset count as
    busy), charged to the CPU ops that were launching the kernel after it (the outermost and the innermost op
    enclosing its launch on the CPU thread). A gap whose next kernel was launched after the previous kernel had
    ended is the GPU waiting for the CPU (launch-bound); otherwise it waited on something else (a sync, an event)."""
    busy = sorted((e for e in evs if e.get("cat") in GPU_EVENTS and "dur" in e), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in evs if e.get("cat") in ("cuda_runtime", "cuda_driver")
              and "correlation" in e.get("args", {})}  # runtime launches, and the driver's (cuBLAS's nvjet)
    ops_by_tid: dict = {}
    for e in evs:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            ops_by_tid.setdefault(e["tid"], []).append(e)
    by_key: dict[str, list] = {}
    total, launch_bound = 0.0, 0.0
    end = busy[0]["ts"] + busy[0]["dur"] if busy else 0.0
    for k in busy[1:]:
        gap = k["ts"] - end
        if gap >= min_us:
            total += gap
            rt = launch.get(k.get("args", {}).get("correlation"))
            key = "(launch not found)"
            if rt is not None:
                t = rt["ts"]
                launch_bound += gap if t > end else 0.0
                enclosing = sorted((o for o in ops_by_tid.get(rt["tid"], []) if o["ts"] <= t <= o["ts"] + o["dur"]),
                                   key=lambda o: -o["dur"])
                names = [o["name"][:70] for o in enclosing]
                key = " > ".join(names[:2] + (["..", names[-1]] if len(names) > 2 else [])) or "(no cpu op)"
            ms, n = by_key.get(key, (0.0, 0))
            by_key[key] = [ms + gap / 1e3, n + 1]
        end = max(end, k["ts"] + k["dur"])
    top = sorted(by_key.items(), key=lambda kv: -kv[1][0])[:20]
    return {"gpu_span_ms": round((end - busy[0]["ts"]) / 1e3, 2) if busy else 0.0, "idle_ms": round(total / 1e3, 2),
            "launch_bound_ms": round(launch_bound / 1e3, 2),
            "by_cpu_op": [f"{ms:6.2f} ms x{n:<4} {key}" for key, (ms, n) in top]}


def profile_step(step) -> dict:
    """CUDA time of one step by kernel kind, every kernel by name, and the GPU's idle gaps with the CPU ops that
    launched the kernels after them: where a step's time goes."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        evs = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    per_name: dict[str, list] = {}  # kernel name -> [ms, count]
    for e in evs:
        if e.get("cat") in GPU_EVENTS and "dur" in e:
            ms, n = per_name.get(e["name"], (0.0, 0))
            per_name[e["name"]] = [ms + e["dur"] / 1e3, n + 1]
    kinds: dict[str, float] = {}
    every: dict[str, list] = {}  # every kernel of >= 20 us in the step, by name (cut, summed): diff two cases
    for key, (ms, n) in per_name.items():
        kinds[kernel_kind(key)] = kinds.get(kernel_kind(key), 0.0) + ms
        if ms >= 0.02:
            name = key if len(key) <= 100 else key[:60] + "..." + key[-37:]  # templates differ at the end
            old_ms, old_n = every.get(name, (0.0, 0))
            every[name] = [round(old_ms + ms, 3), old_n + n]
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {"kinds_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "kernel_ms": round(sum(kinds.values()), 1), "kernels": every, "idle": idle_gaps(evs),
            "top": [f"{ms:7.1f} ms x{n:<4} {key[:110]}" for key, (ms, n) in top]}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cleanup(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", ("| section | shape | method | batch x seq | step s | tokens/s | vs hf-full-bf16 | vs peft | "
             "MFU | peak GiB | trainable |"), "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {(r["section"], r["shape"], r["method"]): r for r in rows if "step_s" in r}
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['section']} | {r['shape']} | {r['method']} | {r['batch']}x{r['seq']} | "
                         f"{r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        base = "long" if r["section"] == "long" else r["section"]
        full = ref.get((base, r["shape"], "hf-full-bf16"))
        peft = ref.get((r["section"], r["shape"], "peft+compile" if "+compile" in r["method"] else "peft"))
        vs_full = f"{r['step_s'] / full['step_s']:.2f}x time" if full else "-"
        vs_peft = f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}x tok/s" if peft else "-"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['section']} | {r['shape']} | {r['method']} | {r['batch']}x{r['seq']} | {r['step_s']:.4f} | "
                     f"{r['tokens_per_s']:,} | {vs_full} | {vs_peft} | {100 * r['mfu']:.1f}% | {mem} | "
                     f"{r['trainable']:,} |")
    lines += ["", ("MFU = model FLOPs/step / step time / 989e12; model FLOPs/token = 4N + 6·N_lora + 6·L·T·d_attn "
              "(LoRA) or 6N + 6·L·T·d_attn (FullFT); N = matmul weights a token passes (routed experts: top-k), "
              "T = sequence length. `vs peft` compares with PEFT of the same section and compile setting."),
              "", "Issue 12 targets:", *targets(rows), "", "A/B of single changes (rl-lora against the variant):",
              *ab_lines(rows)]
    return "\n".join(lines) + "\n"


def ab_lines(rows: list[dict]) -> list[str]:
    """rl-lora against each of its one-change variants in the same section: step time and peak memory ratios."""
    ok = {(r["section"], r["method"]): r for r in rows if "step_s" in r}
    out = []
    for (sec, m), r in ok.items():
        base = ok.get((sec, "rl-lora+compile" if "+compile" in m else "rl-lora"))
        if not base or m.split("+")[0] not in (*AB_VARIANTS, *TUNED):
            continue
        mem = (f", peak memory {base['peak_mem_gib']:.1f} vs {r['peak_mem_gib']:.1f} GiB "
               f"({base['peak_mem_gib'] / r['peak_mem_gib']:.2f}x)") if r["peak_mem_gib"] else ""
        out.append(f"- {sec}: {base['method']} vs {m}: step {base['step_s']:.4f} vs {r['step_s']:.4f} s "
                   f"({base['step_s'] / r['step_s']:.2f}x){mem}")
    return out or ["- none measured"]


def targets(rows: list[dict]) -> list[str]:
    """Issue 12's targets, checked on this run's rows (best regretless LoRA of eager and compiled)."""
    ok = {(r["section"], r["method"]): r for r in rows if "step_s" in r}
    out = []

    def check(label: str, value: float | None, goal: float, higher: bool) -> None:
        if value is None:
            out.append(f"- {label}: not measured")
        else:
            met = value >= goal if higher else value <= goal
            out.append(f"- {label}: {value:.2f} (target {'>=' if higher else '<='} {goal}) {'MET' if met else 'NOT MET'}")

    def best(section: str, prefix: str) -> dict | None:
        cands = [r for (sec, m), r in ok.items() if sec == section and m.split("+")[0] == prefix and "ckpt" not in m]
        return max(cands, key=lambda r: r["tokens_per_s"]) if cands else None

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b and b[key] else None

    refs = (("", "PEFT under bf16 autocast"),  # the stronger PEFT: adapters' matmuls in bf16, as HF Trainer's bf16
            ("-plain", "PEFT in a plain bf16 loop, the issue's own measurement"))  # fp32 adapters, no autocast
    for sec, goals in (("dense", (2.0, 1.4)), ("moe", (2.5, 1.5))):
        lo = best(sec, "rl-lora")
        name = f"{sec}: best regretless LoRA ({lo['method']})" if lo else f"{sec}: regretless LoRA"
        for suffix, label in refs:
            eager, compiled = ok.get((sec, "peft" + suffix)), ok.get((sec, f"peft{suffix}+compile"))
            check(f"{name} tokens/s vs {label}, eager (peft{suffix})", ratio(lo, eager, "tokens_per_s"), goals[0],
                  True)
            check(f"{name} tokens/s vs {label}, compiled (peft{suffix}+compile)", ratio(lo, compiled, "tokens_per_s"),
                  goals[1], True)
            if sec == "dense":
                mem = lo["peak_mem_gib"] / eager["peak_mem_gib"] if lo and eager and eager["peak_mem_gib"] else None
                check(f"{name} peak memory vs {label}, eager (peft{suffix})", mem, 0.6, False)
        floor, peft_eager = ok.get((sec, "floor+compile")), ok.get((sec, "peft"))
        if floor and lo and peft_eager:  # information: how far the targets are from what the frozen base costs
            out.append(f"- {sec}: the frozen floor (floor+compile) takes {floor['step_s']:.4f} s; {lo['method']} "
                       f"{lo['step_s']:.4f} s is {lo['step_s'] / floor['step_s']:.2f}x it; {goals[0]}x PEFT under "
                       f"autocast needs a step of at most {peft_eager['step_s'] / goals[0]:.4f} s (information)")
        if sec == "dense":
            check(f"{name} step time vs hf-full-bf16", ratio(lo, ok.get((sec, "hf-full-bf16")), "step_s"), 0.72, False)
            check(f"{name} MFU", lo["mfu"] if lo else None, 0.45, True)
        else:
            ft = best(sec, "rl-full")  # regretless FullFT, eager or with the trainer's compile=true
            check(f"moe: best regretless FullFT ({ft['method'] if ft else 'rl-full'}) step time vs hf-full-bf16",
                  ratio(ft, ok.get((sec, "hf-full-bf16")), "step_s"), 1.0, False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="markdown table path; JSON lines go next to it as <out>.jsonl")
    ap.add_argument("--budget-s", type=float, default=540, help="wall-clock budget; cases that no longer fit are skipped")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)  # compiled steps vary by up to ~10% between iterations
    ap.add_argument("--only", default="", help="comma list of sections (dense,moe,long), case names (rl-lora+compile) or "
                    "section:name (dense:rl-lora+compile) to run")
    ap.add_argument("--skip", default="", help="comma list of case names to skip, e.g. rl-full,peft+compile")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the whole script in < 1 min)")
    ap.add_argument("--compile-backend", default=None, help="default inductor; --tiny on CPU uses aot_eager")
    ap.add_argument("--profile", action="store_true", help="per case, one profiled step: CUDA time by kernel kind, every "
                    "kernel by name, the GPU's idle gaps charged to the CPU ops that launched the next kernel")
    ap.add_argument("--mask", choices=("ones", "none"), default="ones",
                    help="ones: every method gets attention_mask = ones (B, T); none: no attention_mask")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 64; 16 with --tiny)")
    args = ap.parse_args()
    if args.rank is None:
        args.rank = 16 if args.tiny else 64
    if args.tiny:
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if (args.tiny and device == "cpu") else "inductor"
    lm.COMPILE_BACKEND = args.compile_backend  # the fused head's compiled softmax
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    header = (f"# gpu_step.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n{gpu}; torch "
              f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; bf16, sdpa, "
              f"fused AdamW, LoRA r={args.rank} alpha=32 on every matrix (routed experts r={args.rank}/top-k); warm-up {args.warmup}, "
              f"median of {args.iters}{'; TINY shapes' if args.tiny else ''}")
    print(header, flush=True)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    rows: list[dict] = []
    for c in cases(args.tiny):
        if (only and not {c.section, c.name, f"{c.section}:{c.name}"} & only) or c.name in skip:
            continue
        left = args.budget_s - (time.perf_counter() - t_start)
        est = c.est_s * (0.1 if args.tiny else 1.0)
        row = {"section": c.section, "shape": c.shape, "method": c.name, "batch": c.batch, "seq": c.seq}
        if left < est:
            row["skipped"] = f"skipped: {left:.0f} s left of the budget, needs ~{est:.0f} s"
        else:
            t0 = time.perf_counter()
            try:
                row = run_case(c, args, device)
            except Exception as e:  # noqa: BLE001 - OOM, compile failure, ...: report and go on
                oom = isinstance(e, torch.cuda.OutOfMemoryError)
                row["error"] = ("OOM: " if oom else f"{type(e).__name__}: ") + str(e).splitlines()[0][:240] if str(e) \
                    else type(e).__name__
                if not oom:
                    traceback.print_exc(limit=4)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            cleanup(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write(out.with_suffix(out.suffix + ".jsonl") if out.suffix != ".jsonl" else out,
                     "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write(out, markdown(rows, header))
    print("\n" + markdown(rows, header), flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
