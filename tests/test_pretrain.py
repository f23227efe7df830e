"""The built-in model `tiny-base`: corpus, tokenizer, and a short real pretraining run whose loss goes down."""

from __future__ import annotations

import json

import pytest

from regretless import assets, pretrain
from regretless.errors import UserError
from regretless.rl.envs import INSTRUCTION

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": True}


def test_corpus_is_deterministic_and_in_the_rl_format():
    a, b = pretrain.corpus(chain_sum=20, gsm=4), pretrain.corpus(chain_sum=20, gsm=4)
    assert a == b
    arith = [ex for ex in a if ex["messages"][0]["role"] == "system"]
    assert len(arith) == 20
    assert arith[0]["messages"][0]["content"] == INSTRUCTION
    assert arith[0]["messages"][-1]["content"].startswith("#### ")
    assert sum(ex["messages"][-1]["content"].rstrip().endswith(tuple("0123456789")) for ex in a) >= 24


def test_tokenizer_splits_digits_and_speaks_chatml():
    tok = pretrain.train_tokenizer(["12345 + 678 = 13023", "hello there"] * 20, vocab_size=300)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    pieces = tok.convert_ids_to_tokens(tok("12345")["input_ids"])
    assert pieces == list("12345")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_tiny_base_builds_through_prepare_and_its_loss_goes_down(tmp_path, monkeypatch):
    monkeypatch.setenv("REGRETLESS_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "STEPS", 12)
    monkeypatch.setattr(pretrain, "CHAIN_SUM_PROBLEMS", 200)
    monkeypatch.setattr(pretrain, "GSM_PROBLEMS", 20)
    monkeypatch.setattr(pretrain, "SHAPE", SMALL)
    assert "tiny-base" in assets.BUILTIN_MODELS and not assets.is_prepared("tiny-base")
    from regretless.models import load_model, resolve_model
    from regretless.prepare import resolve_or_build

    with pytest.raises(UserError, match="not built yet"):  # the loader never trains
        resolve_model("tiny-base", quiet=True)
    path = resolve_or_build("tiny-base", quiet=True)
    assert path == tmp_path / "models" / "tiny-base" and assets.is_prepared("tiny-base")
    record = json.loads((path / ".complete").read_text())
    assert record["steps"] == 12 and record["final_eval_loss"] < record["first_eval_loss"] - 0.5
    assert json.loads((path / "pretrain.json").read_text()) == record
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tiny-base.") and p.is_dir()]
    model, tok, _ = load_model("tiny-base")
    assert model.config.hidden_size == 32 and tok.eos_token == "<|im_end|>" and tok.chat_template
    assert resolve_model("tiny-base", quiet=True) == path  # cached: no second build


def test_build_rejects_zero_steps(tmp_path):
    with pytest.raises(UserError, match="steps"):
        pretrain.build(tmp_path / "m", steps=0)
