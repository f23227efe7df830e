"""One trainer for LoRA and FullFT. `cfg.lora is None` means FullFT; nothing else differs.

`run_sft(cfg)` reads top to bottom: checks (nothing written before they pass) -> run folder (locked) -> data ->
model (+ LoRA) -> optimizer -> (resume) -> loop of optimizer steps, each over `batch_size` sequences (packed or
not) split into micro-batches of `micro_batch_size` sequences (`data.batching.step_plan`: which sequences form a
step does not depend on the micro-batch size) -> eval, checkpoints, metrics -> final adapter or model.
The plumbing above the loop (`setup_policy`, `build_optimizer`, `resolve_lr`, `lr_multiplier`, `save_final`) is
shared with the RL loop in `regretless.rl.loop`.

Options beyond the paper: `gradient_checkpointing` (each decoder layer's activations are recomputed in backward,
transformers' own mechanism, non-reentrant; same gradients, less memory) and `freeze_embeddings` (FullFT trains
everything but the input embeddings and the LM head, tied or not: the matrices LoRA never touches).

Protocol as in the paper: AdamW, constant LR, no warm-up by default, β = (0.9, 0.95), ε = 1e-8; LR from the
recipe unless given. The loss of a step is the mean NLL over all trained tokens of the whole batch (token-weighted
across micro-batches, not a mean of micro-batch means). Departure: grad-norm clipping at 1.0 by default (the
paper does not say; set grad_clip=0 to turn it off).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regretless import distributed, lm
from regretless.config import SFTConfig
from regretless.data.batching import collate, step_plan, steps_per_epoch
from regretless.errors import UserError
from regretless.lora import apply_lora, param_groups, save_adapter
from regretless.models import autocast_experts, default_device, load_model
from regretless.preflight import check_model, check_run
from regretless.runfiles import normal_modes, open_run, restore, save_atomically, write_summary


def log(msg: str) -> None:
    if distributed.is_main():  # torchrun: rank 0 speaks for the job
        print(f"[regretless] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_policy(cfg: Any):
    """(model, tokenizer, model_path, device, autocast_dtype, lora_report). LoRA bases load in bf16 on CUDA
    (frozen), FullFT keeps fp32 master weights; both compute under bf16 autocast on CUDA."""
    device = distributed.local_device(default_device(cfg.device))  # torchrun: cuda:LOCAL_RANK
    amp = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")) else None
    weights = torch.bfloat16 if (amp is not None and cfg.lora is not None and device.type == "cuda") else torch.float32
    model, tok, path = load_model(cfg.model, device=device, dtype=weights)
    torch.manual_seed(cfg.seed)  # LoRA A init depends on the seed only
    report = None
    if cfg.lora is not None:
        report = apply_lora(model, cfg.lora)
        log("LoRA coverage:\n" + report.table())
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.freeze_embeddings:
            n = freeze_embeddings(model)
            log(f"freeze_embeddings: {n:,} parameters of the input embeddings and LM head stay fixed")
        if amp is not None and autocast_experts(model):  # fp32 master experts: grouped GEMMs in the amp dtype
            log(f"MoE experts run in {str(amp).removeprefix('torch.')} under autocast (fp32 master weights)")
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    distributed.shard(model, amp, lora=cfg.lora is not None)  # torchrun: FSDP2 over all ranks; else nothing
    if cfg.compile:
        n = compile_blocks(model)
        log(f"torch.compile: {n} decoder blocks compiled on first use" if n else
            "torch.compile: the transformer trunk is compiled on first use")
    return model, tok, path, device, amp, report


def compile_blocks(model: torch.nn.Module, **kwargs) -> int:
    """torch.compile each decoder block in place (parameter names, checkpoints and adapters unchanged); the
    number compiled. Blocks, not the whole trunk: the trunk's forward (embeddings, rotary tables, the attention
    mask) stays eager, where transformers leaves plain causal attention to SDPA's `is_causal=True`; traced
    (torch < 2.14) it materializes a (B, 1, T, T) mask for every batch, and the masked attention kernels cost
    ~3x the causal ones (40 ms of a 256 ms Llama-3.2-1B LoRA step at 8 x 2048 on an H200). Identical blocks
    share one compiled graph. A model without recognisable blocks gets its trunk compiled instead (0)."""
    blocks = distributed.decoder_blocks(model)
    if not blocks:
        getattr(model, "base_model", model).compile(**kwargs)
        return 0
    for b in blocks:
        b.compile(**kwargs)
    return len(blocks)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing of every decoder layer, with torch's non-reentrant checkpoint."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"field 'gradient_checkpointing': {type(model).__name__} does not support it in transformers")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Stop training the input embeddings and the LM head (one matrix when tied); returns how many parameters."""
    frozen = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    for p in frozen.values():
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


def resolve_lr(cfg: Any, model, steps: int | None) -> float:
    if cfg.lr is not None:
        return cfg.lr
    from regretless.config import RLConfig
    from regretless.recipe import default_lr

    lr, reason = default_lr(model.config, "lora" if cfg.lora is not None else "full", steps,
                            task="rl" if isinstance(cfg, RLConfig) else "sft")
    log(f"lr = {lr:.3g} from the recipe: {reason}")
    return lr


def build_optimizer(model, cfg: Any, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, cfg.lora.lr_b_mult if cfg.lora else 1.0, cfg.weight_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None)


def lr_multiplier(step: int, total: int, cfg: Any) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - frac)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    raise UserError(f"field 'lr_schedule': expected constant, linear or cosine, got {cfg.lr_schedule!r}")


def log_spaced_steps(total: int, points: int) -> set[int]:
    """`points` steps spread evenly in log(step) over 1..total (fewer when total is small), total included."""
    if points <= 0 or total < 1:
        return set()
    if points == 1:
        return {total}
    return {max(1, min(total, round(total ** (i / (points - 1))))) for i in range(points)}


def set_lr(optimizer: torch.optim.Optimizer, mult: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * mult
    return optimizer.param_groups[0]["lr"]


def save_final(model, tok, cfg: Any, out: Path, model_path: Path) -> None:
    """adapter/ or model/; under torchrun gathered whole (fp32) and written once, by rank 0."""
    if cfg.lora is not None:
        with distributed.gathered(model):
            if distributed.is_main():
                save_adapter(model, out / "adapter", cfg.lora, base_model=str(model_path))
                normal_modes(out / "adapter")  # safetensors writes 0600
    else:
        sd = distributed.full_state_dict(model)  # torchrun: the fp32 masters on rank 0; one process: None

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, state_dict=sd)
            tok.save_pretrained(tmp)
        if distributed.is_main():
            save_atomically(out, "model", write)
    distributed.barrier()


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def right_padded(mask_B_T: torch.Tensor) -> bool:
    """True when every row of a 2-D padding mask is ones then zeros (padding on the right only, or none)."""
    return bool((mask_B_T[:, 1:] <= mask_B_T[:, :-1]).all())


def to_device(batch: dict[str, torch.Tensor], device: torch.device, amp: torch.dtype | None, model) -> dict:
    """The batch on `device`. A right-padded 2-D attention mask (checked here, on the host) is left out: under
    causal attention a real token never sees a pad to its right and positions count from 0 either way, so every
    labelled position's output is the same without it, and attention runs as plain causal SDPA (no mask
    tensor, no device-to-host check of it by transformers)."""
    mask = batch.get("attention_mask")
    drop = mask is not None and mask.dim() == 2 and "position_ids" not in batch and right_padded(mask)
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if not (drop and k == "attention_mask")}
    if "labels" in batch and batch["labels"].device.type == "cpu":  # the loss finds its rows without a sync
        out[lm.HOST_LABELS] = batch["labels"]
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 4:  # packed rows: an additive float mask in the compute dtype
        out["attention_mask"] = mask.to(amp or next(model.parameters()).dtype)
    return out


EVAL_TOKENS_PER_PROCESS = 32768  # a GPU's eval forward: rows x seq_len up to this, per process


def eval_micro_batch(device: torch.device, micro: int, seq_len: int) -> int:
    """Sequences per eval forward (summed over the ranks, like `micro`). On a GPU, where a small model's forward
    costs its kernel launches rather than its FLOPs, as many as fill EVAL_TOKENS_PER_PROCESS tokens per process
    at `seq_len` (an eval forward keeps no activations for backward), never fewer than training's `micro`; on a
    CPU, where compute bounds it, `micro`. The eval loss is a sum over tokens, so it does not depend on this."""
    if device.type != "cuda":
        return micro
    return max(micro, distributed.world() * max(1, EVAL_TOKENS_PER_PROCESS // seq_len))


@torch.no_grad()
def evaluate(model, eval_batches: list[dict], device, amp) -> float:
    model.eval()
    total, n = 0.0, 0
    for b in eval_batches:
        for part, w in distributed.rank_rows([to_device(b, device, amp, model)]):  # torchrun: this rank's rows
            with autocast(device, amp):
                s, k = lm.nll_sum(model, part)
            total, n = total + s.item() * w, n + k * w
    total, n = distributed.all_sum([total, n])
    return total / max(n, 1)


def run_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Train; returns the summary (also written to out/summary.json)."""
    from regretless import data

    distributed.init()  # torchrun: join the job (one process: nothing)
    check_run(cfg)
    distributed.global_micro_batch(cfg.micro_batch_size, cfg.batch_size)  # torchrun: fits the world size
    examples = data.load_examples(cfg.data, seed=cfg.data_seed)  # bad data fails before anything is written
    check_model(cfg)
    train_ex, eval_ex = data.split_train_eval(examples, cfg.eval_size, cfg.data_seed)  # same eval set every seed
    if len(train_ex) < cfg.batch_size:
        raise UserError(f"field 'batch_size': {cfg.batch_size} sequences per step, but {cfg.data} has "
                        f"{len(train_ex)} training examples ({len(eval_ex)} held out); lower batch_size")
    with open_run(cfg, "sft", resume) as (out, done):
        return done or _train_sft(cfg, out, resume, train_ex, eval_ex)


def _train_sft(cfg: SFTConfig, out: Path, resume: bool, train_ex: list[dict], eval_ex: list[dict]) -> dict:
    from regretless import data, progress, tracking

    seed_everything(cfg.seed)
    model, tok, model_path, device, amp, _ = setup_policy(cfg)
    train_tok, stats = data.tokenize(train_ex, tok, cfg.seq_len, cfg.too_long, source=f"{cfg.data} (train)")
    log(stats.summary())
    eval_tok = []
    if eval_ex:  # eval_size=0: no held-out split, no eval
        eval_tok, eval_stats = data.tokenize(eval_ex, tok, cfg.seq_len, cfg.too_long, source=f"{cfg.data} (eval)")
        log(eval_stats.summary())
    micro = distributed.global_micro_batch(cfg.micro_batch_size, cfg.batch_size)  # torchrun: over all ranks
    accum = cfg.batch_size // micro
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    per_epoch = steps_per_epoch(len(train_tok), cfg.batch_size)
    if per_epoch == 0:
        raise UserError(f"field 'batch_size': {cfg.batch_size} sequences per step, more than the "
                        f"{len(train_tok)} training examples left after tokenization; lower batch_size")
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * per_epoch))
    eval_batches = list(data.batches(eval_tok, eval_micro_batch(device, micro, cfg.seq_len), cfg.seq_len,
                                     cfg.packing, pad, cfg.seed, 0))
    eval_at = log_spaced_steps(total, cfg.eval_points)

    lr = resolve_lr(cfg, model, total)
    optimizer = build_optimizer(model, cfg, lr)
    state = {"tokens": 0, "first_loss": None, "last_loss": None, "best_eval": None, "last_eval": None,
             "wall_s": 0.0}
    start, ckpt, metrics = restore(out, model, optimizer, state, resume)
    if distributed.is_main():  # torchrun: rank 0 alone tracks and prints progress
        metrics = progress.lines(tracking.track(metrics, cfg, out), total, start, "sft")  # + trackers, progress
    if start:
        log(f"resumed from step {start}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    left = len(train_tok) - per_epoch * cfg.batch_size
    log(f"{total} steps of {cfg.batch_size} sequences ({accum} x {micro}{', packed' if cfg.packing else ''}), "
        f"{per_epoch} steps an epoch ({left} examples left out each epoch), lr {lr:.3g}, "
        f"{f'LoRA r={cfg.lora.rank}' if cfg.lora else 'FullFT'}, {trainable:,} trainable parameters on {device} "
        f"({torch.get_num_threads()} CPU threads)")

    lengths = [len(t) for t in train_tok]
    plans: dict[int, list] = {}

    def step_parts(k: int) -> list[dict]:
        """The micro-batches of global optimizer step k (0-based): step k % per_epoch of epoch k // per_epoch."""
        epoch, s = divmod(k, per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = step_plan(lengths, cfg.batch_size, micro, cfg.seq_len, cfg.packing, cfg.seed, epoch)
        return [collate([[train_tok[i] for i in row] for row in mb], cfg.packing, pad) for mb in plans[epoch][s]]

    def finish(status: str, step: int, reason: str | None = None) -> dict:
        summary = {"status": status, "steps": step, "final_loss": state["last_loss"],
                   "final_eval_loss": state["last_eval"], "best_eval_loss": state["best_eval"],
                   "trainable_params": trainable, "lr": lr, "tokens": state["tokens"],
                   "wall_s": round(state["wall_s"], 2), "lora_rank": cfg.lora.rank if cfg.lora else None,
                   "reason": reason}
        write_summary(out, summary)
        metrics.close()
        return summary

    def do_eval(step: int) -> float:
        ev = evaluate(model, eval_batches, device, amp)
        state["last_eval"] = ev
        state["best_eval"] = ev if state["best_eval"] is None else min(ev, state["best_eval"])
        return ev

    if start == 0 and eval_batches:
        metrics.write({"step": 0, "eval_loss": do_eval(0), "tokens": 0})
    bar = tqdm(total=total, initial=start, desc="sft", file=sys.stderr, dynamic_ncols=True,
               disable=None if distributed.is_main() else True, mininterval=1.0)
    for step in range(start, total):
        t0 = time.perf_counter()
        model.train()
        cur_lr = set_lr(optimizer, lr_multiplier(step, total, cfg))
        raw = step_parts(step)
        parts = [to_device(b, device, amp, model) for b in raw]
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in raw)  # on the host: no sync
        sums = []
        for b, w in distributed.rank_rows(parts):  # the step's loss is the token-weighted mean over all its
            with autocast(device, amp):  # micro-batches (torchrun: this rank's rows of each, over all ranks')
                s, _ = lm.nll_sum(model, b, compiled=cfg.compile)
            (s * w / max(n_tok, 1)).backward()
            sums.append(s.detach() * w)  # read once after the last micro-batch, not a sync after each
        loss_sum = distributed.all_sum([torch.stack(sums).double().sum().item()])[0]
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss = loss_sum / max(n_tok, 1)
        if state["first_loss"] is None:
            state["first_loss"] = loss
        first = state["first_loss"]
        if not math.isfinite(loss) or loss > cfg.divergence_factor * first:
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            log(f"step {step + 1}: loss {loss:.4g} diverged (first loss {state['first_loss']:.4g}); stopped, "
                f"last good checkpoint kept")
            state["last_loss"] = loss if math.isfinite(loss) else None
            return finish("diverged", step, f"loss {loss:.4g} at step {step + 1}: not finite or above "
                                            f"divergence_factor={cfg.divergence_factor:g} x the first {first:.4g}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        seen = sum(int(p["input_ids"].numel() if p.get("attention_mask") is None or p["attention_mask"].dim() == 4
                       else p["attention_mask"].sum()) for p in raw)  # host tensors: no sync
        state["tokens"] += n_tok
        state["wall_s"] += dt
        state["last_loss"] = loss
        rec = {"step": step + 1, "loss": loss, "lr": cur_lr, "tokens": state["tokens"], "grad_norm": float(gnorm),
               "tokens_per_s": seen / dt, "step_s": round(dt, 4), "peak_mem_mb": round(peak_mem_mb(device), 1),
               "epoch": round((step + 1) / per_epoch, 4)}
        if eval_batches and ((step + 1) % cfg.eval_every == 0 or step + 1 == total or step + 1 in eval_at):
            rec["eval_loss"] = do_eval(step + 1)
        if (step + 1) % cfg.log_every == 0 or "eval_loss" in rec or step + 1 == total:
            metrics.write(rec)
        bar.set_postfix(loss=f"{loss:.3f}", **({"eval": f"{rec['eval_loss']:.3f}"} if "eval_loss" in rec else {}))
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            ckpt.save(step + 1, model, optimizer, state)
    bar.close()
    if cfg.save_weights:
        save_final(model, tok, cfg, out, model_path)
        ckpt.save(total, model, optimizer, state)
    summary = finish("done", total)
    log(progress.final_line(summary, out))
    return summary
