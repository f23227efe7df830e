"""Batched sampling with a KV cache, and scoring of sampled completions under the learner.

`sample` left-pads the P prompts, runs them through the model once (prefill), repeats the cache G times
(`DynamicCache.batch_repeat_interleave`) and then feeds one token per step, reusing the cache (updated in
place). Rows that finish (EOS or a stop string) are dropped from the cache, so late steps only pay for live
rows. For each sampled token it records the log-prob of that token under the distribution it was actually drawn
from, q = softmax(logits / temperature) cut to the top-p nucleus and renormalised: the `logp_old` (p_sampler) of
the importance ratio p_learner / p_sampler. The learner scores tokens at temperature 1 (its own policy), so with
temperature 1 and top_p 1 the ratio is 1 on-policy; with temperature != 1 the ratio corrects samples from the
tempered policy towards the learner's; with top_p < 1 tokens outside the nucleus are never drawn, so their share
of the policy gradient is missing (the estimate is biased towards the nucleus; keep top_p = 1 for RL).
The recorded entropy is that of the temperature-1 policy (a diagnostic, and the RL loop's collapse check).
Row order is prompt-major: row i * G + j is sample j of prompt i.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from regretless import distributed
from regretless.lm import cache_kw, has_trunk, head_logprobs, target_logprobs
from regretless.lora import merged_for_decoding


@dataclass
class SampleBatch:
    tokens_N_T: torch.Tensor  # (N, T) long, completion ids; pad_id after each row's end
    logp_N_T: torch.Tensor  # (N, T) float32, log-prob under the distribution sampled (temperature, top_p); 0 at pad
    entropy_N_T: torch.Tensor  # (N, T) float32, entropy of the temperature-1 distribution; 0 at padding
    mask_N_T: torch.Tensor  # (N, T) bool, True on completion tokens
    lengths_N: torch.Tensor  # (N,) long
    stopped_N: torch.Tensor  # (N,) bool, ended by EOS or a stop string (False: ran into max_new_tokens)
    texts: list[str]  # decoded completions, special tokens skipped, cut before the stop string
    prompt_index_N: torch.Tensor  # (N,) long, index into the prompt list
    wall_s: float

    @property
    def num_tokens(self) -> int:
        return int(self.lengths_N.sum())


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids_B_L (long), attn_B_L (long) with the padding on the left."""
    width = max(len(s) for s in seqs)
    ids_B_L = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn_B_L = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids_B_L[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            attn_B_L[i, width - len(s):] = 1
    return ids_B_L, attn_B_L


def _positions(attn_B_L: torch.Tensor) -> torch.Tensor:
    return (attn_B_L.cumsum(-1) - 1).clamp(min=0)


def sampling_logprobs(logits_N_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log q, the distribution tokens are drawn from: softmax(logits / temperature) restricted to the top-p nucleus
    (the smallest set of most likely tokens whose probability reaches top_p; the top token always) and
    renormalised; -inf outside it. (N, V) float32."""
    logq_N_V = torch.log_softmax(logits_N_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_N_V, order_N_V = logq_N_V.sort(dim=-1, descending=True)
        before_N_V = sorted_N_V.exp().cumsum(-1) - sorted_N_V.exp()  # probability of the tokens ranked above
        outside_N_V = torch.zeros_like(logq_N_V, dtype=torch.bool).scatter(-1, order_N_V, before_N_V >= top_p)
        logq_N_V = torch.log_softmax(logq_N_V.masked_fill(outside_N_V, float("-inf")), dim=-1)
    return logq_N_V


def _exponentials(shape: torch.Size, generator: Any, device: torch.device) -> torch.Tensor:
    """Exp(1) draws of `shape` (rows, V): from one generator, or, for `(generators, rows_per_prompt)`, each
    prompt's rows from that prompt's own generator (its samples then do not depend on the other prompts)."""
    if not isinstance(generator, tuple):
        gen_device = generator.device if generator is not None else device
        return torch.empty(shape, device=gen_device).exponential_(generator=generator).to(device)
    gens, counts = generator
    return torch.cat([torch.empty((k, shape[-1]), device=g.device).exponential_(generator=g).to(device)
                      for g, k in zip(gens, counts) if k])


def _draw(logits_N_V: torch.Tensor, temperature: float, top_p: float, generator: Any
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_N, logq_N): greedy (log q = 0) when temperature == 0, else a draw from `sampling_logprobs`."""
    if temperature == 0:
        return logits_N_V.argmax(-1), torch.zeros(logits_N_V.shape[0], device=logits_N_V.device)
    logq_N_V = sampling_logprobs(logits_N_V, temperature, top_p)
    # exponential race: argmax_i q_i / E_i with E_i ~ Exp(1) draws i with probability q_i (one vectorized pass;
    # torch.multinomial was 18% of CPU sampling time). log q_i - log E_i: the same argmax, no underflow.
    race_N_V = _exponentials(logq_N_V.shape, generator, logq_N_V.device)
    tok_N = (logq_N_V - race_N_V.log()).argmax(-1)
    return tok_N, logq_N_V.gather(-1, tok_N[:, None]).squeeze(-1)


@torch.no_grad()
@distributed.gathered_decoding  # torchrun: the model gathered once, not once per token
def sample(model: torch.nn.Module, tokenizer, prompts_token_ids: list[list[int]], n: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, stop: tuple[str, ...] | list[str] = (),
           eos_token_ids: list[int] | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None,
           pad_token_id: int | None = None) -> SampleBatch:
    """Sample `n` completions per prompt (N = len(prompts) * n rows); see the module docstring. `generator` is
    one generator for all rows or one per prompt (a list: each prompt's completions then depend only on its own
    generator, whatever else is in the batch, which is how a torchrun job samples what one process does).
    When decoding computes in bf16 or fp16 (autocast on a GPU), dense LoRA adapters decode from merged copies of
    their weights (`merged_for_decoding`, within a quarter of the free GPU memory): one GEMM per matrix and token
    step instead of the adapter's four or more kernels, as FullFT's sampler does with its fp32 weights rounded to
    bf16. In fp32 the adapter path stays (the learner then reproduces the sampler's log-probs to ~1e-6, and
    compute, not launches, bounds decoding on a CPU)."""
    t0 = time.perf_counter()  # wall_s counts the merge too
    device = next(model.parameters()).device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    with merged_for_decoding(model, max_bytes=None if free is None else free // 4, low_precision_only=True):
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        eos_set = set(eos_token_ids)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
        stop = [s for s in stop if s]
        tail_tokens = max((len(s) for s in stop), default=0) + 2

        ids_P_L, attn_P_L = left_pad(prompts_token_ids, pad_token_id)
        ids_P_L, attn_P_L = ids_P_L.to(device), attn_P_L.to(device)
        cache = DynamicCache(config=model.config)
        ckw = cache_kw(model)
        out = model(input_ids=ids_P_L, attention_mask=attn_P_L, position_ids=_positions(attn_P_L),
                    **{ckw: cache}, use_cache=True, logits_to_keep=1)
        N = len(prompts_token_ids) * n
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits_A_V = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # A = rows still alive
        attn_A_L = attn_P_L.repeat_interleave(n, dim=0)
        pos_A = _positions(attn_P_L)[:, -1].repeat_interleave(n, dim=0)
        alive_A = torch.arange(N, device=device)

        tokens_N_T = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logp_N_T = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
        entropy_N_T = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
        # the host keeps each row's ids and which rows are alive: one wait for the device a step (the drawn ids), where
        # reading them back per row (stop strings) and the done/any/all masks on the device waited up to N + 4 times
        ids_N: list[list[int]] = [[] for _ in range(N)]
        alive = list(range(N))  # = alive_A, on the host
        stopped = [False] * N
        for t in range(max_new_tokens):
            logp_A_V = torch.log_softmax(logits_A_V, dim=-1)  # the temperature-1 policy
            gen = generator
            if isinstance(generator, list):  # rows alive per prompt (rows stay prompt-major)
                counts = [0] * len(prompts_token_ids)
                for row in alive:
                    counts[row // n] += 1
                gen = (generator, counts)
            tok_A, logq_A = _draw(logits_A_V, temperature, top_p, gen)
            tokens_N_T[alive_A, t] = tok_A
            logp_N_T[alive_A, t] = logq_A
            entropy_N_T[alive_A, t] = -(logp_A_V.exp() * logp_A_V).sum(-1)
            done = []
            for row, tok in zip(alive, tok_A.tolist()):
                ids_N[row].append(tok)
                done.append(tok in eos_set)
            if stop:  # the tail of each row that did not just end: one batched decode
                check = [a for a, d in enumerate(done) if not d]
                tails = tokenizer.batch_decode([ids_N[alive[a]][-tail_tokens:] for a in check])
                for a, tail in zip(check, tails):
                    done[a] = any(s in tail for s in stop)
            for row, d in zip(alive, done):
                stopped[row] = stopped[row] or d
            if t == max_new_tokens - 1 or all(done):
                break
            if any(done):
                keep = [a for a, d in enumerate(done) if not d]
                keep_A = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep_A)
                alive = [alive[a] for a in keep]
                alive_A, tok_A, attn_A_L, pos_A = alive_A[keep_A], tok_A[keep_A], attn_A_L[keep_A], pos_A[keep_A]
            attn_A_L = torch.cat([attn_A_L, attn_A_L.new_ones((len(alive), 1))], dim=1)
            pos_A = pos_A + 1
            out = model(input_ids=tok_A[:, None], attention_mask=attn_A_L, position_ids=pos_A[:, None],
                        **{ckw: cache}, use_cache=True)
            logits_A_V = out.logits[:, -1].float()

        lengths_N = torch.tensor([len(ids) for ids in ids_N], dtype=torch.long)
        T = int(lengths_N.max()) if N else 0
        mask_N_T = torch.arange(T)[None, :] < lengths_N[:, None]
        texts = []
        for text in tokenizer.batch_decode(ids_N, skip_special_tokens=True):
            cuts = [text.find(s) for s in stop if s in text]
            texts.append(text[:min(cuts)] if cuts else text)
        return SampleBatch(tokens_N_T[:, :T].cpu(), logp_N_T[:, :T].cpu(), entropy_N_T[:, :T].cpu(),
                           mask_N_T, lengths_N, torch.tensor(stopped, dtype=torch.bool), texts,
                           torch.arange(len(prompts_token_ids)).repeat_interleave(n), time.perf_counter() - t0)


def completion_logprobs(model: torch.nn.Module, prompts_token_ids: list[list[int]], tokens_N_T: torch.Tensor,
                        mask_N_T: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Log-prob of each completion token under `model` (temperature 1), with gradient: logp_N_T, 0 at padding.

    Row i is prompts_token_ids[i] followed by tokens_N_T[i][mask]. Prompts are left-padded with the same
    position ids as in `sample`, so an unchanged model reproduces the sampler's log-probs up to float error.
    The LM head runs on completion positions only, in chunks (`regretless.lm.target_logprobs`).
    """
    device = next(model.parameters()).device
    N, T = tokens_N_T.shape
    ids_N_L, attn_N_L = left_pad(prompts_token_ids, pad_token_id)
    L = ids_N_L.shape[1]
    ids_N_S = torch.cat([ids_N_L, tokens_N_T.masked_fill(~mask_N_T, pad_token_id)], dim=1)
    attn_N_S = torch.cat([attn_N_L, mask_N_T.long()], dim=1)
    targets_N_S = torch.full_like(ids_N_S, -100)
    # position L-1+t predicts completion token t
    targets_N_S[:, L - 1:L - 1 + T] = tokens_N_T.masked_fill(~mask_N_T, -100)
    batch = {"input_ids": ids_N_S.to(device), "attention_mask": attn_N_S.to(device),
             "position_ids": _positions(attn_N_S).to(device)}
    logp_M, _ = target_logprobs(model, batch, targets_N_S.to(device))  # M = masked tokens, row-major
    logp_N_T = torch.zeros((N, T), dtype=logp_M.dtype, device=device)
    return logp_N_T.masked_scatter(mask_N_T.to(device), logp_M)


@distributed.through_root  # torchrun: trunk and head run inside the FSDP root's hooks
def group_completion_logprobs(model: torch.nn.Module, prompts_token_ids: list[list[int]], group_size: int,
                              tokens_N_T: torch.Tensor, mask_N_T: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """`completion_logprobs` for rows in groups of `group_size` completions of one prompt each (row i * G + j is
    completion j of prompts_token_ids[i]), running each prompt through the model once instead of G times: the
    prompt's KV cache (with gradient) is repeated for the group and the completions run on top of it. Same
    result as `completion_logprobs`; the prompt's share of the training forward shrinks G-fold."""
    if not has_trunk(model):
        rows = [p for p in prompts_token_ids for _ in range(group_size)]
        return completion_logprobs(model, rows, tokens_N_T, mask_N_T, pad_token_id)
    device = next(model.parameters()).device
    G = group_size
    N, T = tokens_N_T.shape
    trunk = model.base_model
    ckw = cache_kw(model)
    ids_P_L, attn_P_L = left_pad(prompts_token_ids, pad_token_id)
    ids_P_L, attn_P_L = ids_P_L.to(device), attn_P_L.to(device)
    pos_P_L = _positions(attn_P_L)
    cache = DynamicCache(config=model.config)
    h_P_L_H = trunk(input_ids=ids_P_L, attention_mask=attn_P_L, position_ids=pos_P_L, **{ckw: cache},
                    use_cache=True).last_hidden_state
    cache.batch_repeat_interleave(G)
    mask_N_T = mask_N_T.to(device)
    ids_N_T = tokens_N_T.to(device).masked_fill(~mask_N_T, pad_token_id)
    attn_N_S = torch.cat([attn_P_L.repeat_interleave(G, 0), mask_N_T.long()], dim=1)
    pos_N_T = pos_P_L[:, -1:].repeat_interleave(G, 0) + 1 + torch.arange(T, device=device)[None, :]
    h_N_T_H = trunk(input_ids=ids_N_T, attention_mask=attn_N_S, position_ids=pos_N_T, **{ckw: cache},
                    use_cache=True).last_hidden_state
    # the state that predicts completion token t: the prompt's last position for t = 0, else completion t - 1
    h_pred_N_T_H = torch.cat([h_P_L_H[:, -1:].repeat_interleave(G, 0), h_N_T_H[:, :-1]], dim=1)
    logp_M, _ = head_logprobs(model, h_pred_N_T_H[mask_N_T], tokens_N_T.to(device)[mask_N_T])
    logp_N_T = torch.zeros((N, T), dtype=logp_M.dtype, device=device)
    return logp_N_T.masked_scatter(mask_N_T, logp_M)
