"""Run folders: checked before anything is written, locked while a run is live (two real processes), reusable
after a run that failed before its first step, resumable after a kill between the last checkpoint and the
summary, and written with the usual modes under the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from regretless.cli import main as cli_main
from regretless.config import SFTConfig, load_config
from regretless.errors import UserError
from regretless.lora import LoRAConfig
from regretless.train import run_sft

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def chat_jsonl(path: Path, n: int = 40) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(model_dir, data, out, **kw) -> SFTConfig:
    base = {"model": str(model_dir), "data": str(data), "out": str(out), "steps": 3, "batch_size": 4, "seq_len": 64,
            "eval_size": 4, "eval_every": 2, "save_every": 1, "lr": 3e-3, "lora": LoRAConfig(rank=2), "device": "cpu"}
    return SFTConfig(**{**base, **kw})


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_checks_fail_before_anything_is_written(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"lora rank 24 is larger than .*k_proj \(16x32\)"):  # known from config.json
        run_sft(cfg_for(tiny_llama_dir, data, out, lora=LoRAConfig(rank=24)))
    with pytest.raises(UserError, match="matches no module"):
        run_sft(cfg_for(tiny_llama_dir, data, out, lora=LoRAConfig(rank=2, targets="nope_proj")))
    with pytest.raises(UserError, match="field 'model'.*not a folder"):
        run_sft(cfg_for(tmp_path / "no-such-model", data, out))
    with pytest.raises(UserError, match="no such file|not found|does not exist"):
        run_sft(cfg_for(tiny_llama_dir, tmp_path / "missing.jsonl", out))
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(UserError, match="is a file; expected a folder"):
        run_sft(cfg_for(tiny_llama_dir, data, afile))
    with pytest.raises(UserError, match="is a file"):
        run_sft(cfg_for(tiny_llama_dir, data, afile / "sub"))
    assert afile.read_text() == "keep me"


def test_cli_out_is_a_file_is_one_line(tiny_llama_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for cmd in (["sft", "--data", str(chat_jsonl(tmp_path / "c.jsonl"))], ["rl", "--env", "rg:chain_sum"]):
        rc = cli_main([*cmd, "--model", str(tiny_llama_dir), "--out", str(afile), "--rank", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is a file" in err[0] and "Traceback" not in err[0]
    assert afile.read_text() == "keep me"


def test_folder_of_a_run_that_failed_before_its_first_step_is_reused(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no examples left"):  # fails after the folder is opened
        run_sft(cfg_for(tiny_llama_dir, data, out, seq_len=4, too_long="skip"))
    assert (out / "config.yaml").is_file()
    s = run_sft(cfg_for(tiny_llama_dir, data, out))  # the corrected rerun, different config, same folder
    assert s["status"] == "done"
    with pytest.raises(UserError, match="holds another run"):  # a run that trained is never overwritten
        run_sft(cfg_for(tiny_llama_dir, data, out, steps=4))


def test_resume_after_kill_between_final_checkpoint_and_summary(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    first = run_sft(cfg_for(tiny_llama_dir, data, out))
    # the state a kill leaves after the final checkpoint and weights are written but before summary.json
    (out / "summary.json").unlink()
    again = run_sft(cfg_for(tiny_llama_dir, data, out), resume=True)
    assert again == first and json.loads((out / "summary.json").read_text()) == first


def test_files_get_the_modes_the_umask_gives(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    old = os.umask(0o002)
    try:
        run_sft(cfg_for(tiny_llama_dir, data, tmp_path / "lora"))
        run_sft(cfg_for(tiny_llama_dir, data, tmp_path / "full", lora=None, steps=1))
    finally:
        os.umask(old)
    checked = 0
    for run in ("lora", "full"):
        for p in [tmp_path / run, *(tmp_path / run).rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (0o775 if p.is_dir() else 0o664), (p, oct(mode))
            checked += 1
    assert checked > 15


HOLDER = """
import sys, time
from regretless.config import load_config, SFTConfig
from regretless.runfiles import open_run
cfg = load_config(SFTConfig, None, [], {"model": sys.argv[1], "data": sys.argv[2], "out": sys.argv[3],
                                       "steps": 2, "batch_size": 4, "seq_len": 64, "eval_size": 4, "device": "cpu",
                                       "lora": {"rank": 2}})
with open_run(cfg, "sft", False) as (out, done):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_live_run_locks_its_folder_against_a_second_process(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tiny_llama_dir), str(data), str(out)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        args = [sys.executable, "-m", "regretless.cli", "sft", "--config", str(out / "config.yaml"), "--out",
                str(out), "--resume"]
        r = subprocess.run(args, check=False, env=ENV, capture_output=True, text=True, timeout=120)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, r.stderr
        assert "in use by another regretless process" in err[0] and f"pid {holder.pid}" in err[0]
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops a dead holder's lock: the same run now goes ahead (the holder never trained a step)
    s = run_sft(load_config(SFTConfig, out / "config.yaml"), resume=True)
    assert s["status"] == "done" and json.loads((out / "summary.json").read_text()) == s
