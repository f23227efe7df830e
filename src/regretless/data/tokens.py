"""Examples -> token ids + loss masks, through the tokenizer's own chat template.

The loss mask is True exactly on what the model must learn to generate: each trained assistant turn's content
and its end-of-turn token (`<|im_end|>` in ChatML), not the role header before it nor the newline the template
prints after the end-of-turn token. Prompt/completion examples are a user turn and an assistant turn when the
tokenizer has a chat template; without one they are plain `prompt + completion + eos`, loss on the last two.

How the assistant tokens are found: the conversation is rendered once as text and tokenized once (so the ids
are exactly what the template produces at inference time). For assistant turn i, the text rendered from
messages[:i] with the generation prompt, and from messages[:i+1], must both be prefixes of the whole
conversation; the characters between them are the assistant turn, and the tokens whose character offsets
overlap it are trained. Templates that rewrite earlier turns as the conversation grows (e.g. dropping the
reasoning of past turns) break that prefix property, and we say so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from regretless.errors import UserError


@dataclass
class Tokenized:
    """One example: token ids and a same-length mask, True where the token is trained."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    """What tokenization did to a data set; the trainer logs `summary()`."""

    source: str = ""
    examples: int = 0  # examples in
    kept: int = 0  # examples out
    truncated: int = 0  # kept, but cut to seq_len
    skipped: int = 0  # dropped: longer than seq_len with too_long="skip", or no trained token left after cutting
    tokens: int = 0  # tokens kept
    loss_tokens: int = 0  # trained tokens kept

    def summary(self) -> str:
        share = self.loss_tokens / max(self.tokens, 1)
        return (f"{self.source or 'data'}: {self.kept}/{self.examples} examples, {self.truncated} truncated, "
                f"{self.skipped} skipped, {self.tokens} tokens ({share:.0%} trained)")


def tokenize(
    examples: list[dict],
    tokenizer,
    seq_len: int,
    too_long: str = "truncate",
    source: str = "",
) -> tuple[list[Tokenized], TokenizeStats]:
    """Tokenize examples (see `sources`) to at most `seq_len` tokens each.

    too_long: "truncate" keeps the first seq_len tokens; "skip" drops the example. Either way it is counted.
    Raises UserError on chat data with a tokenizer that has no chat template, or a template we cannot split.
    """
    if too_long not in ("truncate", "skip"):
        raise UserError(f"too_long must be 'truncate' or 'skip', got {too_long!r}")
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    stats = TokenizeStats(source=source, examples=len(examples))

    texts, spans, plain = [], [], {}
    for k, ex in enumerate(examples):
        where = ex.get("where") or f"{source or 'data'}: example {k}"
        if "messages" in ex:
            if not has_template:
                raise UserError(
                    f"{where}: chat data needs a tokenizer with a chat template, and this tokenizer has none "
                    "(give prompt/completion data, or a model whose tokenizer has a chat template)"
                )
            msgs = ex["messages"]
        elif has_template:
            msgs = [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"]}]
        else:
            plain[k] = _plain(tokenizer, ex["prompt"], ex["completion"])
            continue
        text, sp = assistant_spans(tokenizer, msgs, where)
        texts.append((k, text))
        spans.append(sp)

    rendered = dict(zip([k for k, _ in texts], _tokenize_with_spans(tokenizer, [t for _, t in texts], spans)))
    out = []
    for k in range(len(examples)):
        ids, mask = rendered[k] if k in rendered else plain[k]
        if len(ids) > seq_len:
            if too_long == "skip":
                stats.skipped += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            if not any(mask):  # the cut removed every trained token: nothing to learn from
                stats.skipped += 1
                continue
            stats.truncated += 1
        out.append(Tokenized(ids, mask))
        stats.kept += 1
        stats.tokens += len(ids)
        stats.loss_tokens += sum(mask)
    if not out:
        raise UserError(f"{source or 'data'}: no examples left after tokenizing ({stats.summary()}); "
                        f"raise seq_len (now {seq_len}) or use too_long=truncate")
    return out, stats


def _render(tokenizer, msgs: list[dict], generation_prompt: bool, where: str) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    try:
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as e:  # e.g. a template's "roles must alternate"
        raise UserError(f"{where}: the tokenizer's chat template rejected this conversation ({e})") from None
    return text


def assistant_spans(tokenizer, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return its text and the [start, end) character span of each trained assistant
    turn (content plus end-of-turn marker, without trailing whitespace)."""
    whole = _render(tokenizer, msgs, False, where)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, msgs[:i], True, where)
        through = whole if i == len(msgs) - 1 else _render(tokenizer, msgs[: i + 1], False, where)
        if not (through.startswith(before) and whole.startswith(through)):
            raise UserError(
                f"{where}: the tokenizer's chat template does not render conversations prefix by prefix "
                f"(turn {i} changes the text before it), so the assistant tokens cannot be located"
            )
        start, end = len(before), len(through)
        while end > start and through[end - 1].isspace():
            end -= 1
        if m["content"].strip() not in through[start:end]:
            raise UserError(f"{where}: the chat template rewrites assistant turn {i}; cannot locate its tokens")
        spans.append((start, end))
    return whole, spans


def _tokenize_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]):
    """Yield (ids, mask) per text: the mask is True on tokens overlapping any span."""
    if not texts:
        return
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
            yield list(ids), _overlaps(offsets, sp)
        return
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries separately.
    for text, sp in zip(texts, spans):
        ids, mask, pos = [], [], 0
        for a, b in sp + [(len(text), len(text))]:
            for piece, trained in ((text[pos:a], False), (text[a:b], True)):
                if piece:
                    piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    mask += [trained] * len(piece_ids)
            pos = b
        yield ids, mask


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's [start, end) characters: does it overlap one of the sorted, disjoint spans?"""
    mask, k = [], 0
    for s, e in offsets:
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        mask.append(k < len(spans) and spans[k][0] < max(e, s + 1))
    return mask


def _plain(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """No chat template: prompt (with the tokenizer's own BOS, if any) + completion + eos; loss on the latter."""
    p = list(tokenizer(prompt)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)
    return p + c, [False] * len(p) + [True] * len(c)
