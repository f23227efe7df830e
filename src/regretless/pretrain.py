"""The built-in model `tiny-base`: a small Llama pretrained by regretless itself, offline, in 2-3 minutes.

Why: `regretless reproduce --preset quick` must run dozens of real fine-tuning runs on 2 CPU cores in 15
minutes, and SmolLM2-135M takes 1-2 s per optimizer step there. A 1.1M-parameter Llama (hidden 128, 4 layers,
vocab 2048) trained here for 800 steps is a real, if tiny, pretrained base: it has learned the ChatML format,
chit-chat, the "#### <answer>" convention and some one-digit arithmetic, and has seen a little GSM-style text.

`build(out)` does, deterministically for a seed:
1. corpus (`corpus`): every chatterbot-corpus dialog; `CHAIN_SUM_PROBLEMS` reasoning-gym `chain_sum` problems
   with 2 (20%) or 3 (80%) one-digit terms in the exact chat format of the RL environment (`regretless.rl.envs`: its
   system instruction, the question, "#### <answer>" as the assistant turn), so `rg:chain_sum` scores above
   zero from the start (3-term sums: 15-35% greedy accuracy on distinct held-out problems, the quick preset's RL
   task); and
   `GSM_PROBLEMS` GSM-style problems with worked solutions. All from seeds
   >= `CORPUS_SEED`, disjoint from the fine-tuning and RL seeds (0, 1, ...). The GSM part is small on purpose:
   without it the base has never produced the domain's tokens and FullFT wins mostly by training their
   embeddings (which LoRA never touches); with much more of it the fine-tuning set has little left to teach.
2. tokenizer: byte-level BPE (`tokenizers`, vocab `VOCAB`) trained on the corpus text, one token per digit
   (arithmetic), ChatML template, eos `<|im_end|>`, pad `<|endoftext|>`.
3. model: a randomly initialised `LlamaForCausalLM` of `SHAPE`, then FullFT with the normal SFT trainer
   (`regretless.train.run_sft`) on the corpus: packed rows, AdamW with warm-up and cosine decay (pretraining,
   not the paper's fine-tuning protocol), `STEPS` optimizer steps of `BATCH` x `SEQ_LEN` tokens, `THREADS`
   torch threads. The loss covers assistant turns only (what the trainer's chat data trains on).
4. the final HF folder (safetensors + tokenizer) is renamed into place with a `.complete` marker holding the
   build's record (steps, first and last eval loss, corpus size, wall time; also in `pretrain.json`). A file
   lock keeps two processes from building it at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from regretless.errors import UserError

VOCAB = 2048
SHAPE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 1024, "tie_word_embeddings": True}
STEPS = 800  # ~2.5 minutes on 2 quiet CPU cores (2 threads); greedy accuracy on held-out 3-term sums: 6% after
# 400 steps, 22% after 700, 35% after 1,000 (measured on 200 distinct held-out problems, 2026-12-03)
BATCH, SEQ_LEN, LR, WARMUP = 32, 128, 3e-3, 15
THREADS = min(2, os.cpu_count() or 1)  # torch threads: 1.43x faster than one on 2 quiet cores (0.19 vs 0.27 s
# a step); tiny-base is built before any run of a sweep starts, so the cores are not shared with its runs
CORPUS_SEED = 10_000
CHAIN_SUM_PROBLEMS = 9000
GSM_PROBLEMS = 400
VERSION = 3  # 3: 800 steps on 2 threads (v2's 400 steps left the quick RL task at 6%, below the 15% it needs)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[regretless pretrain] {msg}", file=sys.stderr, flush=True)


def corpus(seed: int = CORPUS_SEED, chain_sum: int | None = None, gsm: int | None = None) -> list[dict]:
    """Chat examples, shuffled: every chatterbot dialog; `chain_sum` arithmetic problems in the RL env's format;
    `gsm` GSM-style word problems as assistant text (the domain's language, never a worked solution)."""
    import reasoning_gym

    from regretless.data.builtin import chatterbot
    from regretless.rl.envs import INSTRUCTION

    chain_sum = CHAIN_SUM_PROBLEMS if chain_sum is None else chain_sum
    gsm = GSM_PROBLEMS if gsm is None else gsm
    examples = [{"messages": ex["messages"]} for ex in chatterbot()]
    for k, (terms, share) in enumerate(((2, 0.2), (3, 0.8))):  # mostly three terms: the RL task
        ds = reasoning_gym.create_dataset("chain_sum", size=max(1, round(chain_sum * share)), seed=seed + k,
                                          min_terms=terms, max_terms=terms, min_digits=1, max_digits=1)
        examples += [{"messages": [{"role": "system", "content": INSTRUCTION},
                                   {"role": "user", "content": str(e["question"])},
                                   {"role": "assistant", "content": f"#### {e['answer']}"}]} for e in ds]
    if gsm:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=gsm, seed=seed + 2)
        examples += [{"messages": [{"role": "user", "content": str(e["question"])},
                                   {"role": "assistant", "content": str(e["metadata"]["answer_cot"]).strip()}]}
                     for e in ds]
    random.Random(seed).shuffle(examples)
    return examples


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB):
    """A byte-level BPE with one token per digit, a ChatML template, eos <|im_end|> and pad <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHATML
    return fast


def init_model(tok, seed: int, shape: dict[str, Any] | None = None):
    """A randomly initialised Llama of `shape` (default SHAPE) for tokenizer `tok`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, **(shape or SHAPE))
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def build(out: str | Path, steps: int | None = None, seed: int = 0, quiet: bool = False, *,
          chain_sum: int | None = None, gsm: int | None = None, shape: dict[str, Any] | None = None,
          threads: int = THREADS) -> Path:
    """Pretrain tiny-base into `out` (atomic; returns `out`). Defaults: STEPS, CHAIN_SUM_PROBLEMS, GSM_PROBLEMS, SHAPE (read at
    call time; smaller values are for tests)."""
    import torch

    steps = STEPS if steps is None else steps
    if steps < 1:
        raise UserError(f"pretrain steps: expected a positive integer, got {steps}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(Path(out), steps, seed, quiet, chain_sum, gsm, shape)
    finally:
        torch.set_num_threads(before)


def _build(out: Path, steps: int, seed: int, quiet: bool, chain_sum: int | None, gsm: int | None,
           shape: dict[str, Any] | None) -> Path:
    from regretless.config import SFTConfig
    from regretless.train import run_sft

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        examples = corpus(CORPUS_SEED + seed, chain_sum, gsm)
        with open(tmp / "corpus.jsonl", "w") as f:
            f.writelines(json.dumps(ex) + "\n" for ex in examples)
        tok = train_tokenizer([m["content"] for ex in examples for m in ex["messages"]])
        shape = shape or SHAPE
        model = init_model(tok, seed, shape)
        model.save_pretrained(tmp / "init")
        tok.save_pretrained(tmp / "init")
        n_params = sum(p.numel() for p in model.parameters())
        _say(f"pretraining a {n_params / 1e6:.2f}M-parameter Llama on {len(examples)} chat examples, "
             f"{steps} steps of {BATCH} x {SEQ_LEN} tokens", quiet)
        cfg = SFTConfig(model=str(tmp / "init"), out=str(tmp / "run"), data=str(tmp / "corpus.jsonl"), lora=None,
                        lr=LR, lr_schedule="cosine", warmup_steps=min(WARMUP, steps // 5), steps=steps,
                        batch_size=BATCH, seq_len=SEQ_LEN, packing=True, eval_size=128, eval_every=steps,
                        save_every=steps, log_every=10, seed=seed, device="cpu", dtype="fp32")
        summary = run_sft(cfg)
        if summary["status"] != "done":
            raise UserError(f"pretraining tiny-base diverged (see {tmp / 'run'})")
        evals = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        evals = [r["eval_loss"] for r in evals if "eval_loss" in r]
        final = tmp / "final"
        shutil.copytree(tmp / "run" / "model", final)
        record = {"name": "tiny-base", "version": VERSION, "steps": steps, "seed": seed, "params": n_params, "vocab": len(tok),
                  "shape": shape, "examples": len(examples), "first_eval_loss": evals[0],
                  "final_eval_loss": evals[-1], "final_train_loss": summary["final_loss"],
                  "tokens_trained": summary["tokens"], "wall_s": round(time.time() - t0, 1)}
        (final / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
        (final / ".complete").write_text(json.dumps(record) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(final, out)
        _say(f"tiny-base ready in {record['wall_s']:.0f} s: eval loss {evals[0]:.3f} -> {evals[-1]:.3f} ({out})",
             quiet)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_current(out: Path) -> bool:
    """Built, and by this VERSION of the recipe (an older tiny-base in the cache is rebuilt)."""
    try:
        return json.loads((out / ".complete").read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def prepare(out: Path, quiet: bool = False) -> Path:
    """`out` if built by this version, else build it once (a lock file serialises concurrent callers)."""
    if is_current(out):
        return out
    _check_packages()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_current(out):
            _say("building the built-in model tiny-base (first use, ~2-3 minutes)", quiet)
            build(out, quiet=quiet)
    return out


def _check_packages() -> None:
    for name in ("chatterbot_corpus", "reasoning_gym", "tokenizers"):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"tiny-base needs the Python package {name!r}; pip install it")


__all__ = ["build", "corpus", "init_model", "prepare", "train_tokenizer"]
