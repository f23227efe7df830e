"""The RL loop: policy gradient with verifiable rewards, LoRA or FullFT (`cfg.lora is None`), one code path.

`run_rl(cfg)` reads top to bottom: environment -> model (+ LoRA) -> optimizer -> (resume) -> for each step:
take `problems_per_step` problems, sample `group_size` completions each from the current policy, grade them,
backpropagate the importance-sampled PG loss (`rl.step`), clip, AdamW step -> greedy eval every `eval_every`
steps -> checkpoints, metrics -> final adapter or model. The run plumbing (run folder, model setup, optimizer,
LR schedule, checkpoints, metrics log, final save) is shared with SFT in `regretless.train`/`runfiles`.

As in the paper: Adam(W), constant LR, group-mean advantages without std division, the sampler's log-probs in
the importance ratio. Departures: one optimizer step per sampled batch (fully on-policy up to sampler/learner
numerical differences, so the ratio is ~1; the correction matters for bf16 sampling and any future async
sampler); grad-norm clipping at 1.0 by default; the KL reference is the base model (adapters off for LoRA, a
frozen copy for FullFT) and is off by default. Problems are drawn in a seeded shuffled order and each problem's
sampling generator is seeded by (seed, step, slot), so a resumed run repeats an uninterrupted one and a torchrun
job, whose ranks each sample their share of the problems, samples what one process does.

A run ends as `diverged` (exit 3), never `done`, when its loss or gradient is not finite, or (`collapse_check`)
when the policy collapsed: entropy near ln V, reward gone for good, or held-out accuracy gone
(`regretless.rl.collapse` gives the rules and their thresholds). The summary's `reason` says which.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from regretless import distributed, progress, tracking
from regretless.config import RLConfig
from regretless.errors import UserError
from regretless.lora import adapters_disabled
from regretless.preflight import check_model, check_run
from regretless.rl import collapse
from regretless.rl.envs import Env, make_env
from regretless.rl.evaluate import EvalResult, encode_problems, eval_batch_rows, greedy_eval
from regretless.rl.step import Reference, policy_gradient_step
from regretless.runfiles import open_run, restore, write_summary
from regretless.train import (
    autocast,
    build_optimizer,
    log,
    lr_multiplier,
    peak_mem_mb,
    resolve_lr,
    save_final,
    seed_everything,
    set_lr,
    setup_policy,
)

METRIC_KEYS = ("reward", "accuracy", "frac_constant_groups", "response_len", "ratio_mean", "entropy",
               "sample_tokens_per_s", "train_tokens_per_s")  # + step, lr: docs/architecture.md


def problem_indices(step: int, per_step: int, pool: int, seed: int) -> list[int]:
    """Indices of the problems used at `step`: consecutive slices of seeded per-epoch shuffles of the pool."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, pool)
        order = list(range(pool))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[i])
    return out


def sample_seed(seed: int, step: int, slot: int) -> int:
    """The seed of the sampling generator of the `slot`-th problem of `step`: each problem's completions depend
    on (seed, step, slot) alone, whichever process samples it and whatever else is in its batch."""
    return ((seed * 1_000_003 + step) * 1_000_033 + slot) % (1 << 63)


def context_length(model_config: Any) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def build_reference(model: torch.nn.Module, cfg: RLConfig, amp: torch.dtype | None = None) -> Reference | None:
    """The KL reference policy, the base model. LoRA: adapters off (no copy). FullFT: a frozen copy."""
    if cfg.kl_coef <= 0:
        return None
    if cfg.lora is not None:
        return lambda: adapters_disabled(model)
    if distributed.is_sharded(model):  # torchrun: the base reloaded and sharded like the policy
        from regretless.models import load_model

        frozen = load_model(cfg.model, device=next(model.parameters()).device, quiet=True)[0].requires_grad_(False)
        distributed.shard(frozen, amp, lora=False)
        return lambda: contextlib.nullcontext(frozen)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen)


def run_rl(cfg: RLConfig, resume: bool = False) -> dict:
    """Train; returns the summary (also written to out/summary.json)."""
    distributed.init()  # torchrun: join the job (one process: nothing)
    check_run(cfg)
    if cfg.problems_per_step < distributed.world():
        raise UserError(f"field 'problems_per_step': {cfg.problems_per_step} problems cannot be shared by "
                        f"{distributed.world()} processes; expected at least one per process")
    env = make_env(cfg.env, cfg.data_seed, cfg.train_size, cfg.eval_size)  # same problems for every seed
    check_model(cfg)
    with open_run(cfg, "rl", resume) as (out, done):
        return done or _train_rl(cfg, out, resume, env)


def _train_rl(cfg: RLConfig, out: Path, resume: bool, env: Env) -> dict:
    seed_everything(cfg.seed)
    model, tok, model_path, device, amp, _ = setup_policy(cfg)
    ctx = context_length(model.config)
    max_prompt = ctx - cfg.max_new_tokens if ctx else 1 << 30
    if max_prompt < 1:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {ctx} tokens")
    problems, prompt_ids, dropped = encode_problems(tok, env.train, max_prompt, f"{cfg.env} (train)")
    eval_problems, eval_ids, eval_dropped = encode_problems(tok, env.eval, max_prompt, f"{cfg.env} (eval)")
    if dropped or eval_dropped:
        log(f"dropped {dropped} train and {eval_dropped} eval problems whose prompt plus max_new_tokens="
            f"{cfg.max_new_tokens} exceeds the context of {ctx} tokens")
    log(f"env {cfg.env}: {len(problems)} train problems, {len(eval_problems)} eval problems")
    if len(env.eval) < cfg.eval_size:
        log(f"WARNING: only {len(env.eval)} of eval_size={cfg.eval_size} eval problems are distinct from the "
            f"training pool; lower train_size or use a task with more distinct questions")

    lr = resolve_lr(cfg, model, cfg.steps)
    optimizer = build_optimizer(model, cfg, lr)
    reference = build_reference(model, cfg, amp)  # before resuming: the reference is the base model
    state: dict[str, Any] = {"first_eval": None, "last_eval": None, "best_eval": None, "last_reward": None,
                             "episodes": 0, "wall_s": 0.0, "collapse": collapse.new_tracker()}
    vocab = model.get_output_embeddings().weight.shape[0]
    start, ckpt, metrics = restore(out, model, optimizer, state, resume)
    if distributed.is_main():  # torchrun: rank 0 alone tracks and prints progress
        metrics = progress.lines(tracking.track(metrics, cfg, out), cfg.steps, start, "rl")  # + trackers, progress
    if start:
        log(f"resumed from step {start}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.steps} steps of {cfg.problems_per_step} problems x {cfg.group_size} samples, lr {lr:.3g}, "
        f"{f'LoRA r={cfg.lora.rank}' if cfg.lora else 'FullFT'}, {trainable:,} trainable parameters "
        f"on {device} ({torch.get_num_threads()} CPU threads)")

    eval_rows = eval_batch_rows(model.config, device, amp.itemsize if amp else 4,
                                max((len(t) for t in eval_ids), default=0) + cfg.max_new_tokens,
                                max(cfg.micro_batch_size, cfg.problems_per_step * cfg.group_size))

    def amp_ctx() -> contextlib.AbstractContextManager:
        return autocast(device, amp)

    def do_eval() -> dict[str, float]:
        lo, hi = distributed.share(len(eval_problems))  # torchrun: this rank's share; one process: all
        with amp_ctx():
            res = greedy_eval(model, tok, env, eval_problems[lo:hi], eval_ids[lo:hi], cfg.max_new_tokens,
                              cfg.stop, batch_size=eval_rows)
        if distributed.active():
            n = float(res.n)
            res = EvalResult(n=len(eval_problems), **distributed.mean_over_ranks(
                {"accuracy": res.accuracy, "frac_no_answer": res.frac_no_answer, "response_len": res.response_len},
                {"accuracy": n, "frac_no_answer": n, "response_len": n}))
        state["last_eval"] = res.accuracy
        best = state["best_eval"]
        state["best_eval"] = res.accuracy if best is None else max(res.accuracy, best)
        if state["first_eval"] is None:
            state["first_eval"] = res.accuracy
        return {"eval_accuracy": res.accuracy, "eval_frac_no_answer": res.frac_no_answer,
                "eval_response_len": res.response_len}

    def finish(status: str, step: int, reason: str | None = None) -> dict:
        summary = {"status": status, "steps": step, "final_reward": state["last_reward"],
                   "final_eval_accuracy": state["last_eval"], "best_eval_accuracy": state["best_eval"],
                   "initial_eval_accuracy": state["first_eval"], "trainable_params": trainable, "lr": lr,
                   "episodes": state["episodes"], "wall_s": round(state["wall_s"], 2),
                   "lora_rank": cfg.lora.rank if cfg.lora else None, "eval_problems": len(eval_problems),
                   "reason": reason}
        write_summary(out, summary)
        metrics.close()
        return summary

    if start == 0 and eval_problems:
        metrics.write({"step": 0, **do_eval()})
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.steps, initial=start, desc="rl", file=sys.stderr, dynamic_ncols=True,
               disable=None if distributed.is_main() else True, mininterval=1.0)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        cur_lr = set_lr(optimizer, lr_multiplier(step, cfg.steps, cfg))
        lo, hi = distributed.share(cfg.problems_per_step)  # torchrun: this rank's problems; one process: all
        idx = problem_indices(step, cfg.problems_per_step, len(problems), cfg.seed)[lo:hi]
        gens = [torch.Generator(device=device).manual_seed(sample_seed(cfg.seed, step, k)) for k in range(lo, hi)]
        m, _ = policy_gradient_step(model, tok, env, [problems[i] for i in idx], [prompt_ids[i] for i in idx],
                                    cfg, gens, reference, amp_ctx)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not (math.isfinite(m["pg_loss"]) and math.isfinite(gnorm)):
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            log(f"step {step + 1}: loss {m['pg_loss']:.4g}, grad norm {gnorm:.4g}: diverged; stopped, "
                "last good checkpoint kept")
            return finish("diverged", step, f"loss {m['pg_loss']:.4g}, grad norm {gnorm:.4g}: not finite")
        if m["trained_sequences"] > 0:  # all groups constant: no gradient, no step (Adam would still move)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["wall_s"] += time.perf_counter() - t0
        state["episodes"] += cfg.problems_per_step * cfg.group_size
        state["last_reward"] = m["reward"]
        rec = {"step": step + 1, **{k: m[k] for k in METRIC_KEYS}, "lr": cur_lr, "pg_loss": m["pg_loss"],
               "kl": m["kl"], "clip_frac": m["clip_frac"], "log_ratio_max": m["log_ratio_max"],
               "grad_norm": gnorm, "frac_no_answer": m["frac_no_answer"], "frac_stopped": m["frac_stopped"],
               "episodes": state["episodes"], "peak_mem_mb": round(peak_mem_mb(device), 1)}
        if eval_problems and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            rec.update(do_eval())
        why = None
        if cfg.collapse_check:
            why = collapse.check_step(state["collapse"], m["entropy"], m["accuracy"], cfg.problems_per_step, vocab)
            if why is None and "eval_accuracy" in rec:
                why = collapse.check_eval(state["first_eval"], rec["eval_accuracy"], len(eval_problems))
        if (step + 1) % cfg.log_every == 0 or "eval_accuracy" in rec or step + 1 == cfg.steps or why:
            metrics.write(rec)
        if why:
            bar.close()
            log(f"step {step + 1}: diverged: {why}; stopped, last good checkpoint kept")
            return finish("diverged", step + 1, why)
        bar.set_postfix(reward=f"{m['reward']:.3f}",
                        **({"eval": f"{rec['eval_accuracy']:.3f}"} if "eval_accuracy" in rec else {}))
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            ckpt.save(step + 1, model, optimizer, state)
    bar.close()
    if cfg.save_weights:
        save_final(model, tok, cfg, out, model_path)
        ckpt.save(cfg.steps, model, optimizer, state)
    summary = finish("done", cfg.steps)
    log(progress.final_line(summary, out))
    return summary
