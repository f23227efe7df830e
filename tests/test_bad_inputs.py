"""A table of bad inputs across `sft`, `rl`, `sweep`, `merge` and `generate`, run through the real CLI in-process.

Each must exit 2 with exactly one line on stderr, `regretless CMD: error: ...`, naming the file (and line) or the
field at fault, and must leave what was on disk untouched: every file and folder under the test's folder (and the
asset cache) is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from regretless.cli import main
from regretless.config import SFTConfig, save_config
from regretless.lora import LoRAConfig, apply_lora, save_adapter


@pytest.fixture
def world(tiny_llama_dir, tmp_path, monkeypatch):
    """Files the cases refer to, by name: {model}, {data}, {bad_json}, {file}, {run}, {unfinished}, ..."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("REGRETLESS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    chat = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(120)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp_path / "bad_json.jsonl").write_text(json.dumps(chat[0]) + "\n" + '{"messages": [oops\n')
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n"
                                                     for i in range(20)))
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "bad_yaml.yaml").write_text("lr: 1e-3\nsteps: [1,\nrank: 4\n")
    (tmp_path / "typo.yaml").write_text("lr: 1e-3\nlearning_rate: 2e-3\n")
    (tmp_path / "sweep_typo.yaml").write_text(yaml.safe_dump(
        {"command": "sft", "base": {"model": str(tiny_llama_dir), "data": str(tmp_path / "chat.jsonl")},
         "axes": {"lora.rnk": [1, 2]}}))
    (tmp_path / "sweep_ok.yaml").write_text(yaml.safe_dump(
        {"command": "sft", "base": {"model": str(tiny_llama_dir), "data": str(tmp_path / "chat.jsonl"),
                                    "steps": 1}, "axes": {"lr": [1e-3]}}))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "nameless_adapter", LoRAConfig(rank=2))  # names no base model
    run = tmp_path / "run"
    run.mkdir()
    save_config(SFTConfig(model=str(tiny_llama_dir), out=str(run), lora=LoRAConfig(rank=2)), run / "config.yaml",
                "sft")
    save_adapter(model, run / "adapter", LoRAConfig(rank=2), base_model=str(tiny_llama_dir))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    save_config(SFTConfig(model=str(tiny_llama_dir), out=str(unfinished)), unfinished / "config.yaml", "sft")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine\n")
    names = {"model": tiny_llama_dir, "data": tmp_path / "chat.jsonl", "tmp": tmp_path}
    names.update({p.name.split(".")[0]: p for p in tmp_path.iterdir()})
    assert len(names) == 3 + len(list(tmp_path.iterdir()))  # no two files share a name
    return tmp_path, {k: str(v) for k, v in names.items()}


def tree(root: Path) -> dict[str, str]:
    """Every path under root -> a hash of its content (folders: 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


S, R = "sft --model {model} --data {data} --rank 2", "rl --model {model} --env {problems} --rank 2"
CASES = [
    # (argv template, what the one line must match)
    (S + " --out {a_file}", r"--out .*a_file: is a file"),
    (S + " --out {tmp}/o --config {bad_yaml}", r"bad_yaml\.yaml:\d+: not valid YAML"),
    (S + " --out {tmp}/o --config {typo}", r"typo\.yaml: unknown field 'learning_rate'"),
    (S + " --out {tmp}/o lr=fast", r"field 'lr': expected a number, got 'fast'"),
    (S + " --out {tmp}/o --batch-size 0", r"field 'batch_size': expected"),
    (S + " --out {tmp}/o --epochs 0", r"field 'epochs': expected"),
    (S + " --out {tmp}/o --batch-size 8 --micro-batch-size 3", r"field 'micro_batch_size': expected a divisor"),
    ("sft --model {model} --data {tmp}/nope.jsonl --rank 2 --out {tmp}/o", r"nope\.jsonl'?: no such file"),
    ("sft --model {model} --data {bad_json} --rank 2 --out {tmp}/o", r"bad_json\.jsonl:2: "),
    ("sft --model {tmp}/no_model --data {data} --out {tmp}/o", r"field 'model': .*no_model.* not a folder"),
    ("sft --model {model} --data {data} --out {tmp}/o --rank 64", r"rank 64 is larger than the smallest dimension of model\.layers\.0\.self_attn"),
    (S + " --out {tmp}/o report_to=tb", r"field 'report_to': expected none \| tensorboard"),
    (S + " --out {tmp}/o --batch-size 100", r"field 'batch_size': 100 sequences per step, but .* 56 training"),
    (S + " --out {run}", r"run: holds another run|run: holds a run"),
    (R + " --out {a_file}", r"--out .*a_file: is a file"),
    (R + " --out {tmp}/o --group-size 1", r"field 'group_size': expected at least 2"),
    (R + " --out {tmp}/o top_p=1.5", r"field 'top_p'"),
    ("rl --model {model} --env rg:no_such_task --out {tmp}/o", r"unknown reasoning-gym task 'no_such_task'"),
    ("rl --model {model} --env {tmp}/missing.jsonl --out {tmp}/o", r"missing\.jsonl"),
    ("rl --model {model} --env {problems} --out {tmp}/o --rank 32", r"rank 32 .*k_proj"),
    ("sweep {tmp}/missing.yaml --out {tmp}/sw", r"missing\.yaml: no such"),
    ("sweep {sweep_typo} --out {tmp}/sw", r"sweep_typo\.yaml: axes\.lora\.rnk: 'rnk' is not a field"),
    ("sweep {sweep_ok} --out {a_file}", r"--out .*a_file: is a file"),
    ("merge --adapter {tmp}/no_adapter --out {tmp}/m", r"--adapter .*no_adapter: not a folder"),
    ("merge --run {a_file} --out {tmp}/m", r"--run .*a_file: not a folder"),
    ("merge --run {unfinished} --out {tmp}/m", r"--run .*unfinished: has no adapter/ or model/"),
    ("merge --adapter {nameless_adapter} --out {tmp}/m", r"adapter_config\.json: names no base model"),
    ("merge --run {run} --out {merged}", r"--out .*merged: already exists"),
    ("merge --run {run} --out {a_file}", r"--out .*a_file: is a file"),
    ("generate --run {tmp}/no_run --prompt hi", r"--run .*no_run: not a folder"),
    ("generate --run {unfinished} --prompt hi", r"--run .*unfinished: has no adapter/ or model/"),
    ("generate --run {run} --prompt hi --max-new-tokens 0", r"--max-new-tokens 0: expected a positive integer"),
    ("generate --run {run} --prompt hi --top-p 0", r"--top-p 0\.0: expected a number in \(0, 1\]"),
    ("generate --run {run} --prompt hi --temperature -1", r"--temperature -1\.0: expected a number >= 0"),
    ("generate --model {tmp}/no_model --prompt hi", r"model '.*no_model': not a folder"),
]


@pytest.mark.parametrize("template, pattern", CASES, ids=[c[0].split(" --out")[0][:60] + f"#{i}"
                                                          for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(template, pattern, world, capsys):
    root, names = world
    argv = template.format(**names).split()
    before = tree(root)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"regretless {argv[0]}: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert tree(root) == before


def test_the_table_covers_every_command_and_is_large():
    commands = {c[0].split()[0] for c in CASES}
    assert commands == {"sft", "rl", "sweep", "merge", "generate"} and len(CASES) >= 20
