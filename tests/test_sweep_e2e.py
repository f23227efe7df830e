"""End to end on the real trainer: a tiny LR x method sweep with `regretless sft` subprocesses, rerun (all
skipped), then the report."""

from __future__ import annotations

import json

import pytest
from test_train_sft import chat_jsonl

from regretless.report import write_report
from regretless.sweep import run_sweep


@pytest.mark.slow
def test_real_sft_sweep_then_report(tiny_llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl", n=40)
    spec = {"command": "sft", "findings": ["capacity", "lr_ratio"],
            "base": {"model": str(tiny_llama_dir), "data": str(data), "steps": 4, "batch_size": 4, "seq_len": 64,
                     "eval_size": 8, "eval_every": 2, "save_every": 2, "device": "cpu"},
            "axes": {"method": ["full", "lora"], "lora.rank": [4], "lr": [1e-3, 1e-2]}}
    out = tmp_path / "sweep"
    res = run_sweep(spec, out, workers=2, threads_per_run=1, quiet=True, gpus=[])
    assert res.counts == {"done": 4}, [r["error"] for r in res.runs]
    row = next(r for r in res.runs if r["name"] == "lora-r4-lr0.01")
    assert row["steps"] == 4 and row["final_loss"] > 0 and row["trainable_params"] > 0
    assert json.loads((out / row["path"] / "summary.json").read_text())["status"] == "done"
    mtimes = {r["id"]: (out / r["path"] / "stderr.log").stat().st_mtime_ns for r in res.runs}
    again = run_sweep(spec, out, workers=2, quiet=True, gpus=[])
    assert again.counts == {"done": 4}
    assert {r["id"]: (out / r["path"] / "stderr.log").stat().st_mtime_ns for r in again.runs} == mtimes
    report = write_report(out)
    figs = {f["name"]: f["files"] for f in report["figures"]}
    assert figs["capacity"] and figs["lr_curves"]
    assert {c["finding"]: c["verdict"] for c in report["claims"]}["batch"] == "inconclusive"
