"""Batching: deterministic shuffles per (seed, epoch), every example once, padding to the micro-batch's longest
with -100 labels, and packed rows whose logits equal the examples run separately on a real tiny Llama."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
from conftest import build_model, tiny_llama_config

from regretless.data import Tokenized, batches, count_batches

PAD = 0


def make_examples(n: int, seed: int = 0, lo: int = 3, hi: int = 30) -> list[Tokenized]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, 512) for _ in range(length)]
        cut = rng.randint(1, length - 1)  # a prompt, then the trained answer
        out.append(Tokenized(ids, [False] * cut + [True] * (length - cut)))
    return out


def seen(batch_list, packing: bool) -> Counter:
    """The examples (as id tuples) found in a list of batches."""
    found = Counter()
    for b in batch_list:
        for row in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][row].tolist()
            if packing:
                pos = b["position_ids"][row].tolist()
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                for s, e in itertools.pairwise(starts):
                    if ids[s] != PAD:
                        found[tuple(ids[s:e])] += 1
            else:
                n = int(b["attention_mask"][row].sum())
                found[tuple(ids[:n])] += 1
    return found


@pytest.mark.parametrize("packing", [False, True])
def test_deterministic_per_seed_and_epoch_and_complete(packing):
    ex = make_examples(101)
    run = lambda seed, epoch: list(batches(ex, 4, 64, packing, PAD, seed, epoch))
    a, b, c, d = run(0, 0), run(0, 0), run(0, 1), run(1, 0)
    same = lambda x, y: len(x) == len(y) and all(
        all(torch.equal(p[k], q[k]) for k in p) for p, q in zip(x, y))
    assert same(a, b) and not same(a, c) and not same(a, d)
    want = Counter(tuple(t.input_ids) for t in ex)
    for batch_list in (a, c, d):
        assert seen(batch_list, packing) == want
    assert count_batches(ex, 4, 64, packing, seed=0, epoch=1) == len(c)
    if not packing:
        assert len(a) == 26  # ceil(101 / 4)


def test_padded_batches_pad_to_longest_with_ignored_labels():
    ex = make_examples(40)
    for b in batches(ex, 8, 512, False, PAD, seed=0, epoch=0):
        B, T = b["input_ids"].shape
        assert b["labels"].shape == b["attention_mask"].shape == (B, T) and b["input_ids"].dtype == torch.long
        lengths = b["attention_mask"].sum(1)
        assert int(lengths.max()) == T < 512  # padded to the micro-batch's longest, not seq_len
        pad = b["attention_mask"] == 0
        assert (b["labels"][pad] == -100).all() and (b["input_ids"][pad] == PAD).all()
        for row in range(B):
            n = int(lengths[row])
            t = next(t for t in ex if t.input_ids == b["input_ids"][row, :n].tolist())
            want = [i if m else -100 for i, m in zip(t.input_ids, t.loss_mask)]
            assert b["labels"][row, :n].tolist() == want
    # length grouping: a micro-batch holds similar lengths, so little of it is padding
    all_b = list(batches(make_examples(400), 8, 512, False, PAD, seed=0, epoch=0))
    waste = sum(int((b["attention_mask"] == 0).sum()) for b in all_b) / sum(b["attention_mask"].numel() for b in all_b)
    assert waste < 0.1


def test_packed_rows_fit_and_restart_positions():
    ex = make_examples(60)
    packed = list(batches(ex, 2, 64, True, PAD, seed=0, epoch=0))
    assert len(packed) < len(list(batches(ex, 2, 64, False, PAD, seed=0, epoch=0)))  # packing saves rows
    for b in packed:
        B, T = b["input_ids"].shape
        assert T <= 64 and b["position_ids"].shape == (B, T) and b["attention_mask"].shape == (B, 1, T, T)
        assert (b["position_ids"][:, 0] == 0).all()
        starts = b["position_ids"] == 0
        assert (b["labels"][starts] == -100).all()  # no example's first token is predicted from the one before
        allowed = b["attention_mask"][:, 0] == 0  # (B, T, T)
        assert not allowed.triu(1).any() and allowed.diagonal(dim1=1, dim2=2).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_separate_runs(attn):
    model = build_model(tiny_llama_config(attn_implementation=attn))
    ex = make_examples(9, seed=1, lo=4, hi=20)
    [b] = list(batches(ex, 4, 200, True, PAD, seed=0, epoch=0))
    assert b["input_ids"].shape[0] == 1  # all nine fit in one row
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits  # (1, T, V)
        pos = b["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        checked = 0
        for s, e in itertools.pairwise(starts):
            ids = b["input_ids"][:, s:e]
            if ids[0, 0] == PAD:  # trailing padding
                continue
            alone = model(input_ids=ids).logits  # (1, L, V)
            torch.testing.assert_close(logits[:, s:e], alone, atol=1e-5, rtol=1e-5)
            checked += 1
        assert checked == 9
        # the loss over the packed row equals the token-weighted loss of the separate examples
        loss = model(**b).loss
        sep = [model(input_ids=torch.tensor([t.input_ids]),
                     labels=torch.tensor([[i if m else -100 for i, m in zip(t.input_ids, t.loss_mask)]])).loss
               for t in ex]
        n = [sum(t.loss_mask) for t in ex]
        torch.testing.assert_close(loss, sum(ls * k for ls, k in zip(sep, n)) / sum(n), atol=1e-5, rtol=1e-5)
