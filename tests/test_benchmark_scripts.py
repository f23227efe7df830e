"""The GPU benchmark script runs end to end on tiny shapes on a CPU (`--tiny`): every selected case measured (no
error line), regretless LoRA eager and compiled (aot_eager) and PEFT, with the issue's targets checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_tiny_runs_every_selected_case(tmp_path):
    out = tmp_path / "gpu_step.md"
    cases = ("dense:hf-full-bf16,dense:rl-lora,dense:peft,dense:rl-lora+compile,moe:rl-lora,moe:rl-full,"
             "moe:rl-full+compile,dense:peft-plain,moe:peft-plain,dense:rl-lora-fusednode+compile")  # in the script's order
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--tiny", "--out", str(out),
                        "--only", cases], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_step.md.jsonl").read_text().splitlines()]
    assert [f"{x['section']}:{x['method']}" for x in rows] == cases.split(",")
    assert all("error" not in x and x["step_s"] > 0 and x["loss"] > 0 for x in rows), rows
    text = out.read_text()
    assert "Issue 12 targets:" in text and "rl-lora+compile" in text
    assert "moe: best regretless LoRA (rl-lora) tokens/s vs PEFT eager in a plain loop" in text
    assert "- dense: rl-lora+compile vs rl-lora-fusednode+compile: step" in text
