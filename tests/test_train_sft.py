"""The SFT trainer end to end on a tiny real Llama: outputs, LoRA vs FullFT, resume after SIGKILL, divergence,
bad input. Real subprocesses for the CLI paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from regretless.cli import main as cli_main
from regretless.config import SFTConfig, load_config
from regretless.errors import UserError
from regretless.lora import LoRAConfig
from regretless.train import lr_multiplier, run_sft

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def chat_jsonl(path: Path, n: int = 80) -> Path:
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                  {"role": "assistant", "content": f"It is {i + 1}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(model_dir, data, out, **kw) -> SFTConfig:
    base = {"model": str(model_dir), "data": str(data), "out": str(out), "steps": 6, "batch_size": 4, "seq_len": 64,
                "eval_size": 8, "eval_every": 3, "save_every": 2, "lr": 3e-3, "lora": LoRAConfig(rank=4), "device": "cpu"}
    base.update(kw)
    return SFTConfig(**base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_writes_all_files_and_lowers_eval_loss(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    summary = run_sft(cfg_for(tiny_llama_dir, data, out, steps=12))
    assert summary["status"] == "done" and summary["steps"] == 12
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["command"] == "sft" and cfg["lora"]["rank"] == 4
    m = read_metrics(out)
    assert m[0]["step"] == 0 and "eval_loss" in m[0]
    steps = [r for r in m if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"loss", "lr", "tokens", "tokens_per_s", "peak_mem_mb"} <= set(r) for r in steps)
    assert steps[-1]["eval_loss"] < m[0]["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "model").exists()
    # the config file reruns the same run
    again = load_config(SFTConfig, out / "config.yaml")
    assert again == cfg_for(tiny_llama_dir, data, out, steps=12)


def test_full_finetune_is_the_same_loop_and_saves_a_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "full"
    summary = run_sft(cfg_for(tiny_llama_dir, data, out, lora=None, lr=1e-3))
    assert summary["status"] == "done"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    n = sum(p.numel() for p in base.parameters())
    assert summary["trainable_params"] == n
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters()))


def test_same_seed_same_metrics(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    a = run_sft(cfg_for(tiny_llama_dir, data, tmp_path / "a"))
    b = run_sft(cfg_for(tiny_llama_dir, data, tmp_path / "b"))
    la = [r.get("loss") for r in read_metrics(tmp_path / "a")]
    lb = [r.get("loss") for r in read_metrics(tmp_path / "b")]
    assert la == lb and a["final_eval_loss"] == b["final_eval_loss"]


# Gradient accumulation is tested exactly in test_train_batch.py (micro-batch 1, 2, all: step loss to 1e-6).


def test_resume_after_sigkill_matches_uninterrupted(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    args = ["--model", str(tiny_llama_dir), "--data", str(data), "--rank", "4", "--lr", "3e-3", "--steps", "40",
            "--batch-size", "4", "--seq-len", "64", "--save-every", "2", "--device", "cpu", "eval_size=8",
            "eval_every=10"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "regretless.cli", "sft", *args, "--out", str(ref)], env=ENV, check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "regretless.cli", "sft", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ck = out / "checkpoints"
        if ck.is_dir() and any(p.name >= "step-00000006" for p in ck.iterdir() if p.name.startswith("step-")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    # a plain rerun refuses to overwrite; --resume continues
    r = subprocess.run([sys.executable, "-m", "regretless.cli", "sft", *args, "--out", str(out)], env=ENV, check=False,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    subprocess.run([sys.executable, "-m", "regretless.cli", "sft", *args, "--out", str(out), "--resume"], env=ENV,
                   check=True, capture_output=True)
    strip = ("tokens_per_s", "peak_mem_mb", "step_s")  # timings differ run to run
    a = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(ref)]
    b = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(out)]
    assert a == b
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    assert sa["final_loss"] == sb["final_loss"] and sa["final_eval_loss"] == sb["final_eval_loss"]


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "div"
    summary = run_sft(cfg_for(tiny_llama_dir, data, out, lora=None, lr=5.0, steps=30, save_every=1,
                              grad_clip=0.0))
    assert summary["status"] == "diverged" and "divergence_factor=4" in summary["reason"]
    assert summary["steps"] < 30
    ck = sorted((out / "checkpoints").iterdir())
    assert ck and int(ck[-1].name.split("-")[1]) <= summary["steps"]
    assert not (out / "model").exists()
    rc = cli_main(["sft", "--config", str(out / "config.yaml"), "--out", str(out), "--resume"])
    assert rc == 3  # finished (diverged) already: nothing to do, same status


def test_output_folder_with_another_run_is_refused_and_untouched(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    run_sft(cfg_for(tiny_llama_dir, data, out, steps=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds another run"):
        run_sft(cfg_for(tiny_llama_dir, data, out, steps=3))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_sft(cfg_for(tiny_llama_dir, data, other))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_bad_input_is_one_line(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    rc = cli_main(["sft", "--model", str(tiny_llama_dir), "--data", str(bad), "--out", str(tmp_path / "o"),
                   "--steps", "1", "--rank", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("regretless sft: error:") and "bad.jsonl" in err[-1]
    rc = cli_main(["sft", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o2"), "lora.rnak=3"])
    assert rc == 2 and "rnak" in capsys.readouterr().err


def test_lr_schedules():
    cfg = SFTConfig(lr_schedule="cosine", warmup_steps=2)
    assert lr_multiplier(0, 10, cfg) == 0.5 and lr_multiplier(1, 10, cfg) == 1.0
    assert lr_multiplier(2, 10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 10, cfg) == pytest.approx(0.0)
    lin = SFTConfig(lr_schedule="linear")
    assert lr_multiplier(5, 10, lin) == pytest.approx(0.5)
    assert lr_multiplier(7, 10, SFTConfig()) == 1.0


def test_default_lr_comes_from_the_recipe(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from regretless.recipe import default_lr

    data = chat_jsonl(tmp_path / "chat.jsonl")
    s = run_sft(cfg_for(tiny_llama_dir, data, tmp_path / "r", lr=None, steps=1))
    expected, _ = default_lr(AutoConfig.from_pretrained(tiny_llama_dir), "lora", 1)
    assert s["lr"] == pytest.approx(expected)
    assert "from the recipe" in capsys.readouterr().err


def test_no_eval_split(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    s = run_sft(cfg_for(tiny_llama_dir, data, tmp_path / "r", eval_size=0, steps=2))
    assert s["status"] == "done" and s["final_eval_loss"] is None
    assert all("eval_loss" not in r for r in read_metrics(tmp_path / "r"))
