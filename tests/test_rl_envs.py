import json

import pytest

from regretless.errors import UserError
from regretless.rl.envs import INSTRUCTION, make_env, parse_spec


def test_reasoning_gym_env_is_deterministic_and_disjoint():
    a = make_env("rg:chain_sum", seed=3, train_size=40, eval_size=10)
    b = make_env("rg:chain_sum", seed=3, train_size=40, eval_size=10)
    assert [p.answer for p in a.train] == [p.answer for p in b.train]
    assert len(a.train) == 40 and len(a.eval) == 10
    train_q = {p.prompt_messages[-1]["content"] for p in a.train}
    assert not train_q & {p.prompt_messages[-1]["content"] for p in a.eval}
    p = a.train[0]
    assert p.prompt_messages[0] == {"role": "system", "content": INSTRUCTION}
    assert a.reward(p, f"blah\n#### {p.answer}") == 1.0
    assert a.reward(p, "#### 99999999") == 0.0
    g = a.grade(p, "I don't know")
    assert g.reward == 0.0 and not g.found
    c = make_env("rg:chain_sum", seed=4, train_size=40, eval_size=10)
    assert [p.answer for p in a.train] != [p.answer for p in c.train]


def test_reasoning_gym_task_config():
    env = make_env("rg:chain_sum,max_terms=2,max_digits=1", seed=0, train_size=20, eval_size=2)
    assert all(p.prompt_messages[-1]["content"].count(" ") <= 12 for p in env.train)
    assert all(abs(int(p.answer)) <= 18 for p in env.train)
    with pytest.raises(UserError, match="rejected the task config"):
        make_env("rg:chain_sum,bogus=1", seed=0, train_size=4, eval_size=2)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(UserError, match="rg:chain_sum"):
        make_env("rg:no_such_task", seed=0, train_size=4, eval_size=2)
    with pytest.raises(UserError, match="unknown env"):
        make_env("gsm8k", seed=0, train_size=4, eval_size=2)


def _write_jsonl(path, n):
    lines = [json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(n)]
    path.write_text("\n".join(lines))


def test_jsonl_env(tmp_path):
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, 30)
    env = make_env(str(f), seed=0, train_size=20, eval_size=5)
    assert len(env.train) == 20 and len(env.eval) == 5
    assert not {p.answer for p in env.train} & {p.answer for p in env.eval}
    p = env.eval[0]
    assert env.reward(p, f"The answer is {p.answer}.") == 1.0


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        make_env(str(f), seed=0, train_size=4, eval_size=1)


def test_user_reward_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, 10)
    (tmp_path / "myrewards.py").write_text(
        "def length(completion, answer):\n    return len(completion) / 10\n"
        "def broken(completion, answer):\n    raise ValueError('boom')\n")
    env = make_env(f"{f},reward={tmp_path / 'myrewards.py'}:length", seed=0, train_size=8, eval_size=2)
    assert env.reward(env.train[0], "x" * 5) == 0.5
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env(str(f), seed=0, train_size=8, eval_size=2, reward="myrewards:broken")
    with pytest.raises(UserError, match=r"myrewards:broken raised ValueError: boom"):
        env.reward(env.train[0], "anything")
    with pytest.raises(UserError, match="no function 'nope'"):
        make_env(str(f), seed=0, train_size=8, eval_size=2, reward="myrewards:nope")
    with pytest.raises(UserError, match="could not import"):
        make_env(str(f), seed=0, train_size=8, eval_size=2, reward="no_such_module_xyz:fn")


def test_parse_spec():
    assert parse_spec("rg:chain_sum") == ("rg:chain_sum", None)
    assert parse_spec("d.jsonl,reward=m:f") == ("d.jsonl", "m:f")
