"""Tokenized examples -> optimizer steps of micro-batches (training), or one pass of micro-batches (evaluation).

Training (`step_plan`, `train_steps`): `batch_size` is the number of *sequences* (examples) per optimizer step,
in every mode. Each epoch is a deterministic shuffle per (seed, epoch); step s of the epoch is the slice
order[s*B:(s+1)*B], so which sequences form a step depends on (seed, epoch, batch_size) only, never on
`micro_batch_size`. An epoch has floor(N / B) steps; the N mod B examples left over are not trained that epoch
(a different few each epoch: `drop_last`). The step's B sequences are then split into B / micro_batch_size
micro-batches of `micro_batch_size` sequences each:
- Padded (`packing=False`): the step's sequences are sorted by length, so each micro-batch holds similar lengths,
  and padded on the right to the longest in their micro-batch (not to seq_len); `attention_mask` is (B, T).
- Packed (`packing=True`): each micro-batch's sequences are packed first-fit-decreasing into as few rows of at
  most seq_len tokens as they fit in. `position_ids` restart at 0 for each example and `attention_mask` is a
  (B, 1, T, T) additive float mask, 0 where a query may attend and the dtype's minimum elsewhere: causal within
  an example, nothing across examples (transformers 5 passes a 4-D mask through unchanged to the eager and SDPA
  attention). A padding position attends only to itself so no softmax row is empty. Cast the mask to the
  model's dtype when the model runs in bf16 without autocast.
A micro-batch never holds more than `micro_batch_size` sequences, so memory is bounded by micro_batch_size x
seq_len tokens in both modes; the step's loss (token-weighted over all its micro-batches) is the same whatever
the micro-batch size, up to float rounding.

Evaluation (`batches`, `count_batches`): one pass over the examples in micro-batches of `micro_batch_size`
sequences (padded: length-grouped within a shuffled window of `GROUP_WINDOW` micro-batches; packed: first-fit-
decreasing rows within windows of `PACK_WINDOW` examples, `micro_batch_size` rows per micro-batch).

Never cuts an example (tokenize already fit each one to seq_len). Labels are aligned with the inputs, -100 where
not trained (the HF convention: the model shifts).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from regretless.data.tokens import Tokenized

GROUP_WINDOW = 32  # micro-batches per length-grouping window (padded mode)
PACK_WINDOW = 1024  # examples per packing window (packed mode)
IGNORE = -100


def plan(
    lengths: Sequence[int], micro_batch_size: int, seq_len: int, packing: bool, seed: int, epoch: int
) -> list[list[list[int]]]:
    """One pass of micro-batches (evaluation) as example indices: plan[b][row] = indices packed in that row (one if
    padded)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if lengths and max(lengths) > seq_len:
        raise ValueError(f"an example has {max(lengths)} tokens, more than seq_len={seq_len}; tokenize() first")
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        rows: list[list[int]] = []
        for w in range(0, len(order), PACK_WINDOW):
            rows += _pack(order[w : w + PACK_WINDOW], lengths, seq_len)
        rng.shuffle(rows)
        return [rows[k : k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
    micro: list[list[list[int]]] = []
    span = micro_batch_size * GROUP_WINDOW
    for w in range(0, len(order), span):
        window = sorted(order[w : w + span], key=lambda i: lengths[i])
        micro += [[[i] for i in window[k : k + micro_batch_size]] for k in range(0, len(window), micro_batch_size)]
    rng.shuffle(micro)
    return micro


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: floor(N / B) (the remainder is dropped, a different few each epoch)."""
    return n_examples // batch_size


def step_plan(
    lengths: Sequence[int], batch_size: int, micro_batch_size: int, seq_len: int, packing: bool, seed: int,
    epoch: int
) -> list[list[list[list[int]]]]:
    """The epoch's optimizer steps as example indices: plan[step][micro][row] = indices packed in that row (one
    index per row when padded). Step s holds the same `batch_size` examples whatever `micro_batch_size` is."""
    if batch_size < 1 or micro_batch_size < 1:
        raise ValueError(f"batch_size and micro_batch_size must be >= 1, got {batch_size}, {micro_batch_size}")
    if batch_size % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} does not divide batch_size={batch_size}")
    if lengths and max(lengths) > seq_len:
        raise ValueError(f"an example has {max(lengths)} tokens, more than seq_len={seq_len}; tokenize() first")
    order = list(range(len(lengths)))
    random.Random(f"steps:{seed}:{epoch}").shuffle(order)
    plan_: list[list[list[list[int]]]] = []
    for s in range(steps_per_epoch(len(order), batch_size)):
        step = order[s * batch_size:(s + 1) * batch_size]
        if not packing:
            step = sorted(step, key=lambda i: lengths[i])  # stable: equal lengths keep the shuffled order
        groups = [step[k:k + micro_batch_size] for k in range(0, batch_size, micro_batch_size)]
        plan_.append([_pack(g, lengths, seq_len) if packing else [[i] for i in g] for g in groups])
    return plan_


def train_steps(
    tokenized: Sequence[Tokenized],
    batch_size: int,
    micro_batch_size: int,
    seq_len: int,
    packing: bool,
    pad_id: int,
    seed: int,
    epoch: int,
    *,
    mask_dtype: torch.dtype = torch.float32,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield the epoch's optimizer steps, each a list of batch_size / micro_batch_size micro-batches."""
    lengths = [len(t) for t in tokenized]
    for step in step_plan(lengths, batch_size, micro_batch_size, seq_len, packing, seed, epoch):
        yield [collate([[tokenized[i] for i in row] for row in micro], packing, pad_id, mask_dtype)
               for micro in step]


def _pack(indices: Sequence[int], lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit-decreasing bins of at most seq_len tokens (ties keep the given order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if r >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(seq_len - lengths[i])
    return bins


def collate(rows: list[list[Tokenized]], packing: bool, pad_id: int, mask_dtype: torch.dtype = torch.float32
            ) -> dict[str, torch.Tensor]:
    """One micro-batch from rows of examples (one example per row when padded, several when packed)."""
    return _packed(rows, pad_id, mask_dtype) if packing else _padded([r[0] for r in rows], pad_id)


def count_batches(
    tokenized: Sequence[Tokenized], micro_batch_size: int, seq_len: int, packing: bool, seed: int = 0, epoch: int = 0
) -> int:
    """Micro-batches `batches` yields for this epoch (padded: ceil(N / B); packed: rows / B, which can vary by a
    row or so with the (seed, epoch) shuffle)."""
    return len(plan([len(t) for t in tokenized], micro_batch_size, seq_len, packing, seed, epoch))


def batches(
    tokenized: Sequence[Tokenized],
    micro_batch_size: int,
    seq_len: int,
    packing: bool,
    pad_id: int,
    seed: int,
    epoch: int,
    *,
    mask_dtype: torch.dtype = torch.float32,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield one pass of micro-batches (evaluation): input_ids, labels, attention_mask (and position_ids when
    packing)."""
    for micro in plan([len(t) for t in tokenized], micro_batch_size, seq_len, packing, seed, epoch):
        yield collate([[tokenized[i] for i in row] for row in micro], packing, pad_id, mask_dtype)


def _labels(ex: Tokenized) -> torch.Tensor:
    ids = torch.tensor(ex.input_ids, dtype=torch.long)
    labels = torch.where(torch.tensor(ex.loss_mask, dtype=torch.bool), ids, IGNORE)
    labels[0] = IGNORE  # nothing predicts an example's first token (matters when packed after another)
    return labels


def _padded(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    B, T = len(examples), max(len(e) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, ex in enumerate(examples):
        n = len(ex)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = _labels(ex)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _packed(rows: list[list[Tokenized]], pad_id: int, mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    B, T = len(rows), max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    segment = -1 - torch.arange(T).repeat(B, 1)  # (B, T): example id per position; each pad its own negative id
    for b, row in enumerate(rows):
        pos = 0
        for k, ex in enumerate(row):
            n = len(ex)
            input_ids[b, pos : pos + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[b, pos : pos + n] = _labels(ex)
            position_ids[b, pos : pos + n] = torch.arange(n)
            segment[b, pos : pos + n] = k
            pos += n
    causal = torch.ones((T, T), dtype=torch.bool).tril()  # (T, T)
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    attention_mask = torch.zeros((B, 1, T, T), dtype=mask_dtype)  # (B, 1, T, T)
    attention_mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}
