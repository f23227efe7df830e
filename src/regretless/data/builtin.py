"""Built-in SFT data sets that work offline, read from packages the project depends on.

- `chatterbot`: the chatterbot-corpus English dialogs (21 topics, ~2,000 conversations); each YAML conversation
  becomes alternating user/assistant turns (a trailing unanswered user turn is dropped).
- `gsm-symbolic`: reasoning-gym's `gsm_symbolic` (GSM8K-style templates): the question as the user turn and the
  worked solution from the task's metadata, ending in "#### N" with N the exact answer, as the assistant turn.
  Deterministic for a seed; 2,000 problems unless a size is given (`gsm-symbolic:500`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Callable, Iterable

from regretless.errors import UserError

GSM_DEFAULT_SIZE = 2000


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # locate without importing (chatterbot_corpus imports chatterbot)
    if spec is None or spec.origin is None:
        raise UserError(f"the built-in data needs the Python package {name!r}; pip install it")
    return os.path.dirname(spec.origin)


def conversations_to_messages(turns: Iterable[str]) -> list[dict]:
    """Alternate user/assistant over plain turns; a trailing user turn with no answer is dropped."""
    turns = list(turns)
    if len(turns) % 2:
        turns = turns[:-1]
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def chatterbot(seed: int = 0, size: int | None = None) -> list[dict]:
    """The chatterbot-corpus English dialogs in file order (the seed plays no part; the split shuffles)."""
    import yaml

    root = os.path.join(_package_dir("chatterbot_corpus"), "data", "english")
    files = sorted(glob.glob(os.path.join(root, "*.yml")))
    if not files:
        raise UserError(f"chatterbot: no *.yml dialogs under {root}")
    examples = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for k, conv in enumerate(doc.get("conversations", [])):
            msgs = conversations_to_messages(str(t) for t in conv)
            if msgs:
                examples.append({"messages": msgs, "where": f"chatterbot: {os.path.basename(path)} #{k}"})
    return examples[:size] if size else examples


def gsm_symbolic(seed: int = 0, size: int | None = None) -> list[dict]:
    """`size` GSM-style problems from reasoning-gym, question -> worked solution ending in '#### N'."""
    import reasoning_gym

    size = size or GSM_DEFAULT_SIZE
    examples = []
    for k, entry in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)):
        lines = entry["metadata"]["answer_cot"].strip().split("\n")
        if lines[-1].startswith("####"):
            lines = lines[:-1]
        # The templates sometimes print the final line as a float ("#### 8.0"); the answer is the exact one.
        solution = "\n".join(lines + [f"#### {entry['answer']}"])
        examples.append({
            "messages": [{"role": "user", "content": entry["question"]},
                         {"role": "assistant", "content": solution}],
            "where": f"gsm-symbolic: problem {k}",
        })
    return examples


BUILTINS: dict[str, Callable[..., list[dict]]] = {"chatterbot": chatterbot, "gsm-symbolic": gsm_symbolic}


def load_builtin(name: str, seed: int = 0, size: int | None = None) -> list[dict]:
    if size == 0:
        raise UserError(f"data {name}:0: empty data set (size 0)")
    return BUILTINS[name](seed=seed, size=size)
