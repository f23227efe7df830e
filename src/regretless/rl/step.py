"""One RL step without the run plumbing: sample G completions per problem, grade them, and accumulate the
policy gradient of the importance-sampled loss into `.grad` (the caller clips, steps and logs).

    stats = policy_gradient_step(model, tok, env, problems, prompt_ids, cfg, generator)
    optimizer.step()

The learner's forward runs with eval() semantics (no dropout) while taking gradients (`learner_mode`): the
sampler ran without dropout, so on-policy the importance ratio is exactly 1 up to float error.

Groups whose rewards are all equal carry no policy-gradient signal (their advantages are exactly 0): they are
counted in `frac_constant_groups` and, without a KL term, skipped in the training forward (which runs each prompt
once per group, sharing its KV cache among the G completions: `group_completion_logprobs`); their tokens stay in
the loss normaliser (see `rl.loss`), so skipping them is exactly the same as training on them with zero
advantage. With `kl_coef > 0` every group is trained: the KL term applies to every sampled token.
With activation checkpointing on, each row runs prompt and completion in one forward (`completion_logprobs`):
a KV cache built inside a checkpointed layer would be rebuilt by its recomputation.
`accuracy` is the fraction of samples with a positive reward (for the default answer-match reward, correct).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from regretless import distributed
from regretless.config import RLConfig
from regretless.rl.envs import Env, Problem
from regretless.rl.loss import constant_groups, group_advantages, pg_loss
from regretless.rl.sampling import SampleBatch, completion_logprobs, group_completion_logprobs, sample

Reference = Callable[[], contextlib.AbstractContextManager[torch.nn.Module]]


def learner_mode(model: torch.nn.Module) -> None:
    """eval() semantics (no dropout) for a forward that takes gradients. transformers' activation checkpointing
    only acts on layers whose `training` flag is set, so that flag alone (not their children's) is set again on
    checkpointed layers; no decoder layer of the common families (Llama, Qwen2/3, Qwen3-MoE, Mistral, Gemma 2,
    GPT-2) reads it for anything else."""
    model.eval()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _masked_mean(x_N_T: torch.Tensor, mask_N_T: torch.Tensor) -> float:
    return float((x_N_T * mask_N_T).sum() / mask_N_T.sum().clamp(min=1))


def policy_gradient_step(model: torch.nn.Module, tokenizer, env: Env, problems: list[Problem],
                         prompt_ids: list[list[int]], cfg: RLConfig,
                         generator: torch.Generator | list[torch.Generator] | None = None,
                         reference: Reference | None = None,
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         ) -> tuple[dict[str, float], SampleBatch]:
    """Sample, grade, and backpropagate the PG loss over micro-batches of `cfg.micro_batch_size` sequences.

    `reference()` must yield the reference policy for the KL term (LoRA: `adapters_disabled(model)`; FullFT:
    a frozen copy); it is only used when `cfg.kl_coef > 0`. Returns (metrics, the sampled batch).
    """
    G = cfg.group_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    with autocast():
        batch = sample(model, tokenizer, prompt_ids, n=G, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop, generator=generator,
                       pad_token_id=pad_id)
    grades = [env.grade(problems[i], text) for i, text in zip(batch.prompt_index_N.tolist(), batch.texts)]
    rewards_P_G = torch.tensor([g.reward for g in grades], dtype=torch.float32).view(len(problems), G)
    adv_N = group_advantages(rewards_P_G, cfg.normalize_std).flatten()
    constant_P = constant_groups(rewards_P_G)
    use_kl = cfg.kl_coef > 0 and reference is not None
    train_groups = list(range(len(problems))) if use_kl else (~constant_P).nonzero().squeeze(-1).tolist()
    train_rows = [p * G + j for p in train_groups for j in range(G)]

    t0 = time.perf_counter()
    learner_mode(model)
    logprobs = _per_row_logprobs if checkpointing_on(model) else group_completion_logprobs
    # per trained micro-batch: loss, Σ ratio, clipped tokens, Σ k3, tokens, max |log p_learner - log p_sampler|,
    # kept on the device and read back once after the loop
    sums: list[torch.Tensor] = []
    trained_tokens = 0
    per_micro = max(1, cfg.micro_batch_size // G)  # whole groups: each prompt runs once for its G completions
    n_micro = -(-len(train_groups) // per_micro)
    # torchrun: the loss is normalised by the whole step's tokens (all ranks), and every rank runs as many
    # forwards as the busiest one (FSDP's collectives pair up); one process: both are this process's own
    num_tokens = max(distributed.all_sum([batch.num_tokens])[0], 1)
    for i in range(distributed.all_max(n_micro)):
        dummy = i >= n_micro  # torchrun: this rank ran out of informative groups; group 0 at weight 0
        groups = [0] if dummy else train_groups[i * per_micro:(i + 1) * per_micro]
        rows = [p * G + j for p in groups for j in range(G)]
        T = int(batch.lengths_N[rows].max())
        tokens_B_T, mask_B_T = batch.tokens_N_T[rows, :T], batch.mask_N_T[rows, :T]
        group_prompt_ids = [prompt_ids[p] for p in groups]
        logp_ref_B_T = None
        if use_kl:
            with torch.no_grad(), reference() as ref_model, autocast():
                logp_ref_B_T = logprobs(ref_model, group_prompt_ids, G, tokens_B_T, mask_B_T, pad_id)
        with autocast():
            logp_new_B_T = logprobs(model, group_prompt_ids, G, tokens_B_T, mask_B_T, pad_id)
        device = logp_new_B_T.device
        logp_old_B_T = batch.logp_N_T[rows, :T].to(device)
        loss, stats = pg_loss(logp_new_B_T, logp_old_B_T, adv_N[rows].to(device),
                              mask_B_T.to(device), clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
                              logp_ref_B_T=logp_ref_B_T, num_tokens=num_tokens)
        if dummy:
            (loss * 0.0).backward()
            continue
        loss.backward()
        with torch.no_grad():
            gap = ((logp_new_B_T - logp_old_B_T).abs() * mask_B_T.to(device)).max()
            sums.append(torch.stack([t.float() for t in (loss.detach(), stats["ratio_sum"], stats["clipped"],
                                                          stats["kl_sum"], stats["tokens"], gap)]))
        trained_tokens += sum(len(p) for p in group_prompt_ids) + int(mask_B_T.sum())
    cols = list(zip(*torch.stack(sums).tolist())) if sums else [()] * 6  # the one read-back
    totals = {k: float(sum(c)) for k, c in zip(("loss", "ratio_sum", "clipped", "kl_sum", "tokens"), cols)}
    totals["log_ratio_max"] = max(cols[5], default=0.0)
    train_s = time.perf_counter() - t0
    model.eval()

    n_tok = max(totals["tokens"], 1.0)
    rewards_N = rewards_P_G.flatten()
    metrics = {
        "reward": float(rewards_N.mean()),
        "accuracy": float((rewards_N > 0).float().mean()),
        "frac_constant_groups": float(constant_P.float().mean()),
        "response_len": float(batch.lengths_N.float().mean()),
        "ratio_mean": totals["ratio_sum"] / n_tok if train_rows else 1.0,
        "log_ratio_max": totals["log_ratio_max"],  # max |log p_learner - log p_sampler| over trained tokens
        "clip_frac": totals["clipped"] / n_tok,
        "kl": totals["kl_sum"] / n_tok,
        "entropy": _masked_mean(batch.entropy_N_T, batch.mask_N_T),
        "pg_loss": totals["loss"],
        "frac_no_answer": 1.0 - sum(g.found for g in grades) / len(grades),
        "frac_stopped": float(batch.stopped_N.float().mean()),
        "sample_tokens_per_s": batch.num_tokens / max(batch.wall_s, 1e-9),
        "train_tokens_per_s": trained_tokens / train_s if trained_tokens else 0.0,
        "trained_sequences": float(len(train_rows)),
    }
    if distributed.active():  # torchrun: each mean over every rank's samples (unweighted keys are summed)
        n_rows, n_sampled = float(len(grades)), float(batch.mask_N_T.sum())
        metrics = distributed.mean_over_ranks(metrics, {
            "reward": n_rows, "accuracy": n_rows, "response_len": n_rows, "frac_no_answer": n_rows,
            "frac_stopped": n_rows, "frac_constant_groups": float(len(problems)), "entropy": n_sampled,
            "ratio_mean": totals["tokens"], "clip_frac": totals["tokens"], "kl": totals["tokens"]},
            maxima=("log_ratio_max",))
    return metrics, batch


def _per_row_logprobs(model: torch.nn.Module, prompts_token_ids: list[list[int]], group_size: int,
                      tokens_N_T: torch.Tensor, mask_N_T: torch.Tensor, pad_id: int) -> torch.Tensor:
    """`group_completion_logprobs` without the shared prompt cache: each row's prompt runs with its completion."""
    rows = [p for p in prompts_token_ids for _ in range(group_size)]
    return completion_logprobs(model, rows, tokens_N_T, mask_N_T, pad_id)

