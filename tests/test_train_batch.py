"""batch_size means sequences per optimizer step, in every mode: the same sequences and the same step loss
whatever the micro-batch size (exact accumulation), packed or not; bad batch settings are one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from regretless.config import SFTConfig
from regretless.data.batching import step_plan, steps_per_epoch
from regretless.errors import UserError
from regretless.lora import LoRAConfig
from regretless.train import run_sft

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def varied_chat(path: Path, n: int = 40) -> Path:
    """Chat examples whose trained part ranges from 3 to ~40 tokens: a mean of micro-batch means differs from
    the token-weighted mean here by far more than float rounding."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 12, 25])))
        rows.append({"messages": [{"role": "user", "content": f"Count {i}"},
                                  {"role": "assistant", "content": reply}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing", [False, True])
def test_step_plan_sequences_do_not_depend_on_micro_batch_size(packing):
    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(50)]
    plans = {m: step_plan(lengths, 8, m, 64, packing, seed=3, epoch=2) for m in (1, 2, 4, 8)}
    assert all(len(p) == steps_per_epoch(50, 8) == 6 for p in plans.values())
    flat = {m: [sorted(i for mb in step for row in mb for i in row) for step in p] for m, p in plans.items()}
    assert flat[1] == flat[2] == flat[4] == flat[8]
    for m, p in plans.items():
        for step in p:
            assert len(step) == 8 // m  # micro-batches per step
            assert all(sum(len(row) for row in mb) == m for mb in step)  # m sequences each, packed or not
            if packing:
                assert all(sum(lengths[i] for i in row) <= 64 for mb in step for row in mb)
            else:
                assert all(len(row) == 1 for mb in step for row in mb)
    used = [i for step in flat[8] for i in step]
    assert len(used) == len(set(used)) == 48  # each example at most once an epoch; 50 mod 8 = 2 left out
    assert flat[8] != [sorted(i for mb in s for row in mb for i in row)
                       for s in step_plan(lengths, 8, 8, 64, packing, seed=3, epoch=3)]  # reshuffled per epoch
    if packing:  # packing puts several sequences in a row when they fit
        assert any(len(row) > 1 for step in plans[8] for mb in step for row in mb)
    with pytest.raises(ValueError, match="does not divide"):
        step_plan(lengths, 8, 3, 64, packing, 0, 0)


@pytest.mark.parametrize("packing", [False, True])
def test_micro_batch_size_changes_nothing_but_memory(tiny_llama_dir, tmp_path, packing):
    """micro-batch 1, 2 and the whole batch: the same sequences (same trained tokens a step) and the same step
    loss to 1e-6 in fp32, for every step (the weights after each step agree as well, or later losses would not)."""
    data = varied_chat(tmp_path / "chat.jsonl")
    runs = {}
    for micro in (1, 2, 4):
        out = tmp_path / f"m{micro}"
        cfg = SFTConfig(model=str(tiny_llama_dir), data=str(data), out=str(out), steps=5, batch_size=4,
                        micro_batch_size=micro, seq_len=96, packing=packing, eval_size=4, eval_every=100,
                        save_every=100, lr=1e-2, lora=LoRAConfig(rank=4), device="cpu", dtype="fp32")
        s = run_sft(cfg)
        assert s["status"] == "done" and s["steps"] == 5
        runs[micro] = [r for r in metrics(out) if "loss" in r]
    tokens = {m: [r["tokens"] for r in recs] for m, recs in runs.items()}
    assert tokens[1] == tokens[2] == tokens[4]
    per_step = [b - a for a, b in zip([0, *tokens[4]], tokens[4])]
    assert len(set(per_step)) > 1  # the steps' sequences really differ in length
    for m in (1, 2):
        for a, b in zip(runs[m], runs[4]):
            assert abs(a["loss"] - b["loss"]) < 1e-6, (m, a["step"], a["loss"], b["loss"])
        assert abs(runs[m][-1]["eval_loss"] - runs[4][-1]["eval_loss"]) < 1e-6


def test_packing_batch_counts_sequences(tiny_llama_dir, tmp_path):
    """With packing, an epoch is floor(N / batch_size) steps of batch_size sequences, as without packing."""
    data = varied_chat(tmp_path / "chat.jsonl", n=40)
    for packing in (False, True):
        out = tmp_path / f"p{packing}"
        s = run_sft(SFTConfig(model=str(tiny_llama_dir), data=str(data), out=str(out), epochs=1.0, batch_size=8,
                              seq_len=96, packing=packing, eval_size=4, lr=1e-3, lora=LoRAConfig(rank=2),
                              device="cpu"))
        assert s["steps"] == 36 // 8  # 40 examples - 4 held out
        assert metrics(out)[-1]["epoch"] == 1.0


@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, "field 'epochs': expected a number > 0, got 0"),
    ({"epochs": -3}, "field 'epochs'"),
    ({"batch_size": 8, "micro_batch_size": 3}, "field 'micro_batch_size': expected a divisor of batch_size=8"),
    ({"batch_size": 0}, "field 'batch_size'"),
    ({"steps": 0}, "field 'steps'"),
])
def test_bad_batch_settings_are_errors_at_construction(kw, match):
    with pytest.raises(UserError, match=match):
        SFTConfig(**kw)


def test_batch_larger_than_training_set_is_an_error_before_writing(tiny_llama_dir, tmp_path):
    data = varied_chat(tmp_path / "chat.jsonl", n=40)
    out = tmp_path / "run"
    cfg = SFTConfig(model=str(tiny_llama_dir), data=str(data), out=str(out), batch_size=100, seq_len=96,
                    eval_size=4, lora=LoRAConfig(rank=2), device="cpu")
    with pytest.raises(UserError, match=r"field 'batch_size': 100 sequences per step, but .* has 36 training"):
        run_sft(cfg)
    assert not out.exists()


@pytest.mark.parametrize("packing", [False, True])
def test_eval_loss_does_not_depend_on_the_eval_batch_and_a_gpu_uses_bigger_ones(tiny_llama, packing):
    """`eval_micro_batch`: a CPU keeps training's micro-batch, a GPU fills EVAL_TOKENS_PER_PROCESS tokens (never
    fewer than the micro-batch); `evaluate` gives the same token-mean loss over batches of 2 rows or of 13."""
    import torch

    from regretless import data
    from regretless.data.tokens import Tokenized
    from regretless.train import EVAL_TOKENS_PER_PROCESS, eval_micro_batch, evaluate

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert eval_micro_batch(cpu, 8, 384) == 8
    assert eval_micro_batch(gpu, 8, 384) == EVAL_TOKENS_PER_PROCESS // 384 == 85
    assert eval_micro_batch(gpu, 128, 384) == 128 and eval_micro_batch(gpu, 4, 10**6) == 4
    rng = random.Random(0)
    toks = []
    for _ in range(13):
        n = rng.randint(3, 20)
        toks.append(Tokenized([rng.randrange(3, 512) for _ in range(n)], [i >= n // 3 for i in range(n)]))
    losses = [evaluate(tiny_llama, list(data.batches(toks, micro, 24, packing, 0, 0, 0)), cpu, None)
              for micro in (2, 13)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
