"""Prompt encoding and held-out evaluation: greedy accuracy over an environment's eval problems.

Accuracy here is the mean of the environment's reward under greedy decoding (for the default answer-match
reward, the fraction answered correctly). The paper evaluated MATH/GSM8K/AIME accuracy the same way in
spirit; our eval sets are small held-out slices of the same task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regretless import distributed
from regretless.errors import UserError
from regretless.rl.envs import Env, Problem
from regretless.rl.sampling import sample


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt up to where the assistant's reply begins (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
    return list(tokenizer(text)["input_ids"])


def encode_problems(tokenizer, problems: list[Problem], max_prompt_tokens: int, where: str
                    ) -> tuple[list[Problem], list[list[int]], int]:
    """Encode prompts, dropping those over `max_prompt_tokens`. -> (kept problems, their ids, #dropped).

    Raises UserError when nothing fits (the message gives the longest and shortest prompt lengths)."""
    kept, ids, lengths = [], [], []
    for p in problems:
        t = encode_prompt(tokenizer, p.prompt_messages)
        lengths.append(len(t))
        if len(t) <= max_prompt_tokens:
            kept.append(p)
            ids.append(t)
    if problems and not kept:
        raise UserError(f"{where}: every prompt is longer than the context allows ({min(lengths)} to "
                        f"{max(lengths)} tokens; at most {max_prompt_tokens} leave room for max_new_tokens); "
                        "lower max_new_tokens or use shorter prompts")
    return kept, ids, len(problems) - len(kept)


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    frac_no_answer: float
    response_len: float
    n: int


def eval_batch_rows(model_config, device: torch.device, value_bytes: int, tokens_per_row: int, at_least: int,
                    kv_budget_bytes: int = 1 << 31) -> int:
    """Rows per greedy-eval batch. On a GPU, where decoding is bound by kernel launches (one pass of the model
    per token, whatever the rows), as many rows as keep the KV cache within `kv_budget_bytes` (layers x 2 x KV
    heads x head size x `tokens_per_row` values of `value_bytes`), and never fewer than `at_least` (the training
    sampler's rows); on a CPU, where compute bounds it, `at_least`. A config without those fields: `at_least`."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
    if device.type != "cuda" or not layers or not heads or not getattr(text, "hidden_size", None):
        return at_least
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_row = layers * 2 * kv_heads * head_dim * tokens_per_row * value_bytes
    return max(at_least, kv_budget_bytes // max(per_row, 1))


@torch.no_grad()
@distributed.gathered_decoding  # torchrun: one gather for all its batches (ranks may differ in count)
def greedy_eval(model: torch.nn.Module, tokenizer, env: Env, problems: list[Problem],
                prompt_ids: list[list[int]], max_new_tokens: int, stop: tuple[str, ...] = (),
                batch_size: int = 32) -> EvalResult:
    """Greedy decoding of every problem (in batches of `batch_size`), scored by `env`."""
    rewards, found, lengths = [], [], []
    for i in range(0, len(problems), batch_size):
        batch = sample(model, tokenizer, prompt_ids[i:i + batch_size], n=1, max_new_tokens=max_new_tokens,
                       temperature=0.0, stop=stop)
        for p, text in zip(problems[i:i + batch_size], batch.texts):
            g = env.grade(p, text)
            rewards.append(g.reward)
            found.append(g.found)
        lengths += batch.lengths_N.tolist()
    n = len(rewards)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), float("nan"), 0)
    return EvalResult(sum(rewards) / n, 1 - sum(found) / n, sum(lengths) / n, n)
