"""Tokenizing with loss masks through the real test tokenizer's ChatML template: the mask covers exactly the
assistant text plus its end-of-turn token; prompt/completion; no template; too-long handling; bad input."""

from __future__ import annotations

import copy
import json

import pytest

from regretless.data import load_examples, tokenize
from regretless.errors import UserError

END = "<|im_end|>"


def trained_runs(tok, t) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(t.input_ids, t.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


def test_single_turn_mask_is_exactly_the_answer(tiny_tokenizer):
    [t], stats = tokenize([chat("What is AI?", "The study of thinking machines.")], tiny_tokenizer, 256)
    assert trained_runs(tiny_tokenizer, t) == ["The study of thinking machines." + END]
    # the ids are exactly the template's own tokenization
    assert t.input_ids == tiny_tokenizer(tiny_tokenizer.apply_chat_template(
        chat("What is AI?", "The study of thinking machines.")["messages"], tokenize=False),
        add_special_tokens=False)["input_ids"]
    assert not t.loss_mask[0] and not t.loss_mask[-1]  # template start and the newline after <|im_end|>
    assert (stats.examples, stats.kept, stats.tokens, stats.loss_tokens) == (1, 1, len(t), sum(t.loss_mask))


def test_multi_turn_with_system_and_untrained_turn(tiny_tokenizer):
    ex = chat("Hi", "Hello there, friend.", "How are you?", "Quite well.", "Bye", "Goodbye!", system="Be kind.")
    [t], _ = tokenize([ex], tiny_tokenizer, 256)
    assert trained_runs(tiny_tokenizer, t) == ["Hello there, friend." + END, "Quite well." + END, "Goodbye!" + END]
    ex["messages"][4]["weight"] = 0  # "Quite well." shown, not trained
    [t], _ = tokenize([ex], tiny_tokenizer, 256)
    assert trained_runs(tiny_tokenizer, t) == ["Hello there, friend." + END, "Goodbye!" + END]


def test_prompt_completion_uses_the_template(tiny_tokenizer):
    pc, _ = tokenize([{"prompt": "Say yes.", "completion": "Yes indeed."}], tiny_tokenizer, 256)
    ch, _ = tokenize([chat("Say yes.", "Yes indeed.")], tiny_tokenizer, 256)
    assert pc == ch
    assert trained_runs(tiny_tokenizer, pc[0]) == ["Yes indeed." + END]


def test_prompt_completion_without_template_is_plain_concatenation(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    [t], _ = tokenize([{"prompt": "Question: why?", "completion": " Because."}], tok, 256)
    assert tok.decode(t.input_ids) == "Question: why? Because." + END
    assert trained_runs(tok, t) == [" Because." + END]


def test_chat_data_without_template_names_file_and_line(tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(chat("a", "b")) + "\n")
    with pytest.raises(UserError, match="no chat template|has none") as e:
        tokenize(load_examples(str(path)), tok, 64)
    assert str(e.value).startswith(f"{path}:2:")


def test_template_that_is_not_prefix_stable(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # numbers each turn by the conversation length: adding a turn rewrites the earlier text
    tok.chat_template = ("{% for m in messages %}{{ messages|length }}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="prefix by prefix") as e:
        tokenize([{**chat("a", "b"), "where": "x.jsonl:7"}], tok, 64)
    assert str(e.value).startswith("x.jsonl:7:")


def test_truncate_and_skip_are_counted(tiny_tokenizer):
    short = chat("Hi", "Hello.")
    long = chat("Tell me a story.", "Once upon a time " * 30)
    only_prompt = chat("word " * 80, "ok")  # the cut leaves no trained token: skipped even when truncating
    toks, stats = tokenize([short, long, only_prompt], tiny_tokenizer, 40, too_long="truncate", source="t")
    assert (stats.kept, stats.truncated, stats.skipped) == (2, 1, 1)
    assert [len(t) for t in toks][1] == 40 and all(len(t.loss_mask) == len(t) for t in toks)
    assert stats.tokens == sum(len(t) for t in toks)
    assert stats.summary().startswith("t: 2/3 examples, 1 truncated, 1 skipped")
    toks, stats = tokenize([short, long, only_prompt], tiny_tokenizer, 40, too_long="skip")
    assert (stats.kept, stats.truncated, stats.skipped) == (1, 0, 2)
    with pytest.raises(UserError, match="no examples left"):
        tokenize([long], tiny_tokenizer, 40, too_long="skip", source="t")
    with pytest.raises(UserError, match="too_long"):
        tokenize([short], tiny_tokenizer, 40, too_long="drop")


def test_builtin_chatterbot_tokenizes_fast(tiny_tokenizer):
    examples = load_examples("chatterbot")
    toks, stats = tokenize(examples, tiny_tokenizer, 128)
    assert stats.examples == len(examples) and stats.kept + stats.skipped == len(examples)
    assert 0.2 < stats.loss_tokens / stats.tokens < 0.8
    ex, t = examples[0], toks[0]
    assert trained_runs(tiny_tokenizer, t) == [m["content"] + END for m in ex["messages"] if m["role"] == "assistant"]


class _SlowTokenizer:
    """The test tokenizer seen as a slow one (no offsets), to exercise the piecewise path."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        kw.pop("return_offsets_mapping", None)
        return self._tok(text, **kw)


def test_slow_tokenizer_path_masks_the_same_text(tiny_tokenizer):
    ex = chat("Hi", "Hello there, friend.", "How are you?", "Quite well.", system="Be kind.")
    [fast], _ = tokenize([ex], tiny_tokenizer, 256)
    [slow], _ = tokenize([ex], _SlowTokenizer(tiny_tokenizer), 256)
    assert trained_runs(tiny_tokenizer, slow) == trained_runs(tiny_tokenizer, fast)
    assert tiny_tokenizer.decode(slow.input_ids) == tiny_tokenizer.decode(fast.input_ids)
