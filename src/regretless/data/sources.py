"""SFT examples from files and built-in names, checked and normalized, and the held-out eval split.

An example is a plain dict, one of two shapes:
    {"messages": [{"role": "system"|"user"|"assistant", "content": str, ("weight": 0|1)}, ...], "where": str}
    {"prompt": str, "completion": str, "where": str}
`where` ("file.jsonl:12", "dir: row 3", "chatterbot: ai.yml #4") lets later stages name the input in errors.

Accepted inputs: chat JSONL in the OpenAI `messages` format (content may be a string or a list of text parts;
an assistant message with `"weight": 0` is shown but not trained, as in OpenAI fine-tuning), prompt/completion
JSONL (strings, or conversational lists of messages; prompt-side assistant turns are not trained), a JSON array
file, a `datasets` `save_to_disk` folder (the `train` split of a DatasetDict), a .parquet file or a folder of
them, and the built-in names in `regretless.data.builtin.BUILTINS` (optionally `name:size`).
"""

from __future__ import annotations

import glob
import json
import os
import random
from collections.abc import Iterator
from typing import Any

from regretless.data.builtin import BUILTINS, load_builtin
from regretless.errors import UserError

ROLES = ("system", "user", "assistant")


def load_examples(spec: str, seed: int = 0) -> list[dict]:
    """Load and check every example named by `spec` (a path or a built-in name); never returns an empty list."""

    if os.path.exists(spec):
        examples = [normalize(rec, where) for rec, where in _records(spec)]
        if not examples:
            raise UserError(f"{spec}: empty data set (no examples found)")
        return examples
    name, _, size = spec.partition(":")
    if name in BUILTINS:
        if size and not size.isdigit():
            raise UserError(f"data {spec!r}: the size after ':' must be a whole number, e.g. {name}:500")
        return load_builtin(name, seed=seed, size=int(size) if size else None)
    raise UserError(
        f"data {spec!r}: no such file or folder, and not a built-in data set "
        f"(built-ins: {', '.join(BUILTINS)}; a size can follow a colon, e.g. gsm-symbolic:500)"
    )


def split_train_eval(examples: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split: `eval_size` examples drawn by `seed`; both parts keep the input order."""
    if eval_size < 0:
        raise UserError(f"eval_size must be >= 0, got {eval_size}")
    if eval_size >= len(examples):
        raise UserError(
            f"eval_size {eval_size} leaves no training examples (the data set has {len(examples)}); lower eval_size"
        )
    held = set(random.Random(f"split:{seed}").sample(range(len(examples)), eval_size))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals


# ---- reading files -------------------------------------------------------------------------------------


def _records(path: str) -> Iterator[tuple[Any, str]]:
    """Yield (raw record, where) from a JSONL/JSON file, a parquet file or folder, or a save_to_disk folder."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            yield from _saved_dataset(path)
            return
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise UserError(
                f"{path}: a folder, but neither a `datasets` save_to_disk folder (state.json or dataset_dict.json) "
                "nor a folder holding .parquet files"
            )
        for f in files:
            yield from _parquet(f)
        return
    if path.endswith(".parquet"):
        yield from _parquet(path)
        return
    yield from json_records(path)


def json_records(path: str) -> Iterator[tuple[Any, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        for i, rec in enumerate(items):
            yield rec, f"{path}: item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield rec, f"{path}:{lineno}"


def _parquet(path: str) -> Iterator[tuple[Any, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise UserError(f"{path}: cannot read as parquet ({e})") from None
    for i, rec in enumerate(rows):
        yield rec, f"{path}: row {i}"


def _saved_dataset(path: str) -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load with datasets.load_from_disk ({e})") from None
    label = path
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            split = "train"
        elif len(ds) == 1:
            split = next(iter(ds))
        else:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds, label = ds[split], f"{path} [{split}]"
    for i, rec in enumerate(ds):
        yield rec, f"{label}: row {i}"


# ---- checking one record -------------------------------------------------------------------------------


def normalize(rec: Any, where: str) -> dict:
    """Check one raw record and return it in one of the two example shapes (see the module docstring)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    messages = rec.get("messages")
    if messages is not None:
        msgs = _messages(messages, where, "messages")
        _check_conversation(msgs, where)
        return {"messages": msgs, "where": where}
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if prompt is None or completion is None:
        raise UserError(
            f"{where}: missing `messages` field (expected `messages`, or `prompt` and `completion`; "
            f"found keys: {', '.join(map(str, rec)) or 'none'})"
        )
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion, "where": where}
    if isinstance(prompt, list) and isinstance(completion, list):
        # Conversational prompt/completion: only the completion's assistant turns are trained.
        head = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in _messages(prompt, where, "prompt")]
        tail = _messages(completion, where, "completion")
        msgs = head + tail
        _check_conversation(msgs, where)
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in tail):
            raise UserError(f"{where}: `completion` holds no assistant turn to train on")
        return {"messages": msgs, "where": where}
    raise UserError(
        f"{where}: `prompt` and `completion` must both be strings or both be lists of messages, "
        f"got {type(prompt).__name__} and {type(completion).__name__}"
    )


def _messages(messages: Any, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list):
        raise UserError(f"{where}: `{field}` must be a list of messages, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: {field}[{j}] must be an object with `role` and `content`")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: {field}[{j}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        msg = {"role": role, "content": _content(m.get("content"), where, f"{field}[{j}]")}
        weight = m.get("weight")
        if weight is not None:
            if role != "assistant" or weight not in (0, 1):
                raise UserError(f"{where}: {field}[{j}]: `weight` must be 0 or 1 and only on assistant messages")
            if weight == 0:
                msg["weight"] = 0
        out.append(msg)
    return out


def _content(content: Any, where: str, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise UserError(f"{where}: {field}: `content` must be a string or a list of text parts, got {content!r:.60}")


def _check_conversation(msgs: list[dict], where: str) -> None:
    trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1)]
    if not trained:
        raise UserError(f"{where}: conversation has no assistant turn (nothing to train on)")
    if trained[0] == 0:
        raise UserError(f"{where}: conversation starts with an assistant turn; it must follow a user or system turn")

