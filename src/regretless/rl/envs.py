"""RL environments: problems (chat prompt + reference answer) and a reward for a completion.

Spec grammar (`RLConfig.env`, `--env`):
    SOURCE[,reward=REWARD]
    SOURCE = rg:<task>[,key=value...]  a reasoning-gym task with optional config fields, e.g. rg:chain_sum,
                                       rg:gsm_symbolic, rg:chain_sum,max_terms=3,max_digits=2
           | path/to/file.jsonl        one {"prompt": str, "answer": str} object per line
    REWARD = module:function | path/to/file.py:function
The default reward extracts the final answer tolerantly (`regretless.rl.extract`) and scores 1.0 when it
matches the reference, else 0.0; a completion with no answer in it scores 0 and is counted (`Grade.found`).
A user reward is called as `function(completion: str, answer: str) -> float` (bool is fine); an exception in
it becomes a UserError naming the function and the exception.

Train and eval problems are disjoint (eval questions that also occur in train are dropped) and deterministic
in `seed`. Every prompt ends with an instruction asking for the final answer after "####", which the
extractor reads first. Departure from the paper: the paper's RL runs used MATH/GSM8K/DeepMath; here any
reasoning-gym task or JSONL file stands in, since those data sets are not available offline.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.rl.extract import answers_match, extract_answer

INSTRUCTION = "Solve the problem. End your reply with the final answer on its own line, as: #### <answer>"


@dataclass
class Problem:
    prompt_messages: list[dict[str, str]]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grade:
    reward: float
    found: bool  # False when no answer could be extracted (the default reward then scores 0)


RewardFn = Callable[[str, str], float]


@dataclass
class Env:
    name: str
    train: list[Problem]
    eval: list[Problem]
    reward_fn: RewardFn | None = None  # None: tolerant answer match
    reward_name: str = "answer_match"

    def grade(self, problem: Problem, completion_text: str) -> Grade:
        if self.reward_fn is None:
            pred = extract_answer(completion_text)
            return Grade(1.0 if answers_match(pred, problem.answer) else 0.0, pred is not None)
        try:
            value = self.reward_fn(completion_text, problem.answer)
            value = float(value)
        except Exception as e:  # noqa: BLE001 -- any failure in user code is the user's to fix
            raise UserError(f"reward function {self.reward_name} raised {type(e).__name__}: {e} "
                            f"(called with a completion of {len(completion_text)} chars and answer "
                            f"{problem.answer!r})") from None
        if math.isnan(value):
            raise UserError(f"reward function {self.reward_name} returned NaN for answer {problem.answer!r}")
        return Grade(value, True)

    def reward(self, problem: Problem, completion_text: str) -> float:
        return self.grade(problem, completion_text).reward


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}]


def _split(train_items: list[tuple[str, str, dict]], eval_items: list[tuple[str, str, dict]], eval_size: int,
           where: str) -> tuple[list[Problem], list[Problem]]:
    """Train as given; eval = the first `eval_size` distinct candidates whose question is not in train."""
    train = [Problem(_messages(q), a, m) for q, a, m in train_items]
    seen = {q for q, _, _ in train_items}
    evals = []
    for q, a, m in eval_items:
        if len(evals) >= eval_size:
            break
        if q not in seen:
            seen.add(q)
            evals.append(Problem(_messages(q), a, m))
    if not train:
        raise UserError(f"{where}: no training problems")
    return train, evals


def _reasoning_gym(spec: str, seed: int, train_size: int, eval_size: int
                   ) -> tuple[list[Problem], list[Problem]]:
    import reasoning_gym
    import yaml
    from reasoning_gym.factory import DATASETS

    task, *fields = spec.split(",")
    kwargs = {}
    for item in fields:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"env rg:{spec}: expected key=value after the task name, got {item!r}")
        kwargs[key.strip()] = yaml.safe_load(raw)
    if task not in DATASETS:
        easy = [t for t in ("chain_sum", "basic_arithmetic", "products", "gsm_symbolic", "gcd", "lcm")
                if t in DATASETS]
        names = ", ".join("rg:" + t for t in easy)
        raise UserError(f"unknown reasoning-gym task {task!r}; try one of: {names} "
                        f"({len(DATASETS)} tasks in all, see reasoning_gym.factory.DATASETS)")
    size = train_size + 2 * eval_size + 16  # headroom for eval questions that duplicate train ones
    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"env rg:{spec}: reasoning-gym rejected the task config "
                        f"({type(e).__name__}: {e})") from None
    items = [(str(e["question"]), str(e["answer"]), {"task": task, **dict(e.get("metadata") or {})})
             for e in ds]
    return _split(items[:train_size], items[train_size:], eval_size, f"rg:{spec}")


def _jsonl(path: Path, seed: int, train_size: int, eval_size: int) -> tuple[list[Problem], list[Problem]]:
    import random

    from regretless.data.sources import json_records

    items = []
    for obj, where in json_records(str(path)):
        if not isinstance(obj, dict) or "prompt" not in obj or "answer" not in obj:
            raise UserError(f"{where}: expected an object with \"prompt\" and \"answer\" keys")
        items.append((str(obj["prompt"]), str(obj["answer"]), {"where": where}))
    if len(items) < 2:
        raise UserError(f"{path}: need at least 2 prompt/answer lines, found {len(items)}")
    random.Random(seed).shuffle(items)
    n_eval = jsonl_eval_size(len(items), train_size, eval_size)
    return _split(items[n_eval:n_eval + train_size], items[:n_eval], n_eval, str(path))


def jsonl_eval_size(n_items: int, train_size: int, eval_size: int) -> int:
    """Problems a JSONL env of `n_items` holds out: `eval_size`, or a fifth of them when there are fewer than
    train_size + eval_size."""
    return eval_size if n_items >= train_size + eval_size else min(eval_size, n_items // 5)


def load_reward(ref: str) -> tuple[RewardFn, str]:
    """`module:function` or `path/to/file.py:function` -> (callable, display name)."""
    mod_name, sep, fn_name = ref.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise UserError(f"reward {ref!r}: expected module:function or path/to/file.py:function")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UserError(f"reward {ref!r}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"regretless_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"reward {ref!r}: could not import {mod_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"reward {ref!r}: {mod_name} has no function {fn_name!r}")
    return fn, ref


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'SOURCE[,reward=REF]' -> (SOURCE, REF or None)."""
    source, sep, rest = spec.partition(",reward=")
    return source.strip(), (rest.strip() or None) if sep else None


def make_env(spec: str, seed: int, train_size: int, eval_size: int, reward: str | None = None) -> Env:
    """The environment named by `spec` (grammar in the module docstring); `reward` overrides the spec's."""
    source, spec_reward = parse_spec(spec)
    reward = reward or spec_reward
    if source.startswith("rg:"):
        train, evals = _reasoning_gym(source[3:], seed, train_size, eval_size)
    elif source.endswith(".jsonl") or Path(source).is_file():
        if not Path(source).is_file():
            raise UserError(f"env {source!r}: no such file")
        train, evals = _jsonl(Path(source), seed, train_size, eval_size)
    else:
        raise UserError(f"unknown env {spec!r}: expected rg:<task> (e.g. rg:chain_sum) or a .jsonl file of "
                        "{\"prompt\", \"answer\"} lines, optionally followed by ,reward=module:function")
    env = Env(name=spec, train=train, eval=evals)
    if reward:
        env.reward_fn, env.reward_name = load_reward(reward)
    return env
