"""Loading SFT examples: JSONL (chat and prompt/completion), datasets folders and parquet, built-ins, bad input,
and the held-out split."""

from __future__ import annotations

import json

import pytest

from regretless.data import BUILTINS, load_examples, split_train_eval
from regretless.data.builtin import GSM_DEFAULT_SIZE
from regretless.errors import UserError

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6", "weight": 1}]},
]
PC = [{"prompt": "Say yes.", "completion": "Yes."}, {"prompt": "Say no.", "completion": "No."}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def strip_where(examples):
    return [{k: v for k, v in ex.items() if k != "where"} for ex in examples]


def test_chat_jsonl_multi_turn(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT[0], "", CHAT[1]])  # a blank line is allowed
    ex = load_examples(path)
    assert strip_where(ex) == [{"messages": CHAT[0]["messages"]},
                               {"messages": [{k: v for k, v in m.items() if k != "weight"}
                                             for m in CHAT[1]["messages"]]}]
    assert [e["where"] for e in ex] == [f"{path}:1", f"{path}:3"]


def test_prompt_completion_and_chat_style_lists(tmp_path):
    conv = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": [{"type": "text", "text": "c"}]}],
            "completion": [{"role": "assistant", "content": "d"}]}
    ex = strip_where(load_examples(write_jsonl(tmp_path / "pc.jsonl", PC + [conv])))
    assert ex[:2] == PC
    assert ex[2] == {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}


def test_json_array_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(PC))
    assert strip_where(load_examples(str(tmp_path / "d.json"))) == PC


@pytest.mark.parametrize("rows", [CHAT, PC], ids=["chat", "prompt-completion"])
def test_datasets_save_to_disk_and_parquet_round_trip(tmp_path, rows):
    import datasets

    ds = datasets.Dataset.from_list(rows if rows is PC else [{"messages": r["messages"][:3]} for r in rows])
    want = strip_where(load_examples(write_jsonl(tmp_path / "ref.jsonl", ds.to_list())))
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    for spec in ["disk", "dict", "pq", "pq/part-0.parquet"]:
        ex = load_examples(str(tmp_path / spec))
        assert strip_where(ex) == want, spec
    assert load_examples(str(tmp_path / "dict"))[1]["where"].endswith("[train]: row 1")


BAD = [
    ("malformed", [PC[0], '{"prompt": "x", '], 2, "malformed JSON"),
    ("not-object", [PC[0], "[1, 2]"], 2, "expected a JSON object"),
    ("missing-messages", [PC[0], PC[1], {"text": "hi"}], 3, "missing `messages` field"),
    ("unknown-role", [{"messages": [{"role": "robot", "content": "x"}]}], 1, "unknown role 'robot'"),
    ("no-assistant", [CHAT[0], {"messages": [{"role": "user", "content": "x"}]}], 2, "no assistant turn"),
    ("assistant-first", [{"messages": [{"role": "assistant", "content": "x"}]}], 1, "starts with an assistant"),
    ("mixed-pc", [{"prompt": "x", "completion": ["y"]}], 1, "must both be strings"),
]


@pytest.mark.parametrize("rows,line,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_lines_name_file_and_line(tmp_path, rows, line, msg):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=msg) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:{line}:")
    assert "\n" not in str(e.value)


def test_empty_data_set(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match="empty data set") as e:
        load_examples(path)
    assert path in str(e.value)


def test_unknown_path_lists_builtins():
    with pytest.raises(UserError, match="no such file") as e:
        load_examples("no/such/file.jsonl")
    assert all(name in str(e.value) for name in BUILTINS)
    with pytest.raises(UserError, match="whole number"):
        load_examples("gsm-symbolic:many")


def test_folder_without_data(tmp_path):
    with pytest.raises(UserError, match="parquet"):
        load_examples(str(tmp_path))


def test_chatterbot_builtin():
    ex = load_examples("chatterbot")
    assert 1900 <= len(ex) <= 2100
    for e in ex:
        roles = [m["role"] for m in e["messages"]]
        assert roles[0] == "user" and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert sum(len(e["messages"]) > 2 for e in ex) >= 50  # multi-turn dialogs survive
    assert ex[0]["where"].startswith("chatterbot: ")


def test_gsm_symbolic_builtin_is_deterministic():
    a, b, c = (load_examples("gsm-symbolic:12", seed=s) for s in (0, 0, 1))
    assert a == b and a != c and len(a) == 12
    for e in a:
        user, assistant = e["messages"]
        assert user["role"] == "user" and "?" in user["content"]
        last = assistant["content"].split("\n")[-1]
        assert last.startswith("#### ") and last[5:].lstrip("-").isdigit()
    assert GSM_DEFAULT_SIZE == 2000


def test_split_train_eval():
    examples = [{"prompt": str(i), "completion": "x"} for i in range(50)]
    train, evals = split_train_eval(examples, 10, seed=3)
    assert (train, evals) == split_train_eval(examples, 10, seed=3)
    assert len(train) == 40 and len(evals) == 10
    assert sorted(e["prompt"] for e in train + evals) == sorted(e["prompt"] for e in examples)
    assert evals != split_train_eval(examples, 10, seed=4)[1]
    assert split_train_eval(examples, 0, seed=0) == (examples, [])
    with pytest.raises(UserError, match="leaves no training examples"):
        split_train_eval(examples, 50, seed=0)
