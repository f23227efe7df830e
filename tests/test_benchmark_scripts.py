"""The GPU benchmark script runs end to end on tiny shapes on a CPU (`--tiny`): every selected case measured (no
error line), regretless LoRA eager and compiled (aot_eager) and PEFT, with the issue's targets checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_tiny_runs_every_selected_case(tmp_path):
    out = tmp_path / "gpu_step.md"
    cases = ("dense:hf-full-bf16,dense:rl-lora,dense:peft,dense:rl-lora+compile,moe:rl-lora,moe:rl-full,"
             "moe:rl-full+compile,dense:peft-plain,dense:rl-lora-fusednode+compile,"
             "dense:floor+compile,dense:rl-lora-nogroup+compile,dense:rl-lora-tuned+compile")  # script order
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--tiny", "--out", str(out),
                        "--only", cases], check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_step.md.jsonl").read_text().splitlines()]
    assert [f"{x['section']}:{x['method']}" for x in rows] == cases.split(",")
    assert all("error" not in x and x["step_s"] > 0 and x["loss"] > 0 for x in rows), rows
    text = out.read_text()
    assert "Issue 12 targets:" in text and "rl-lora+compile" in text
    assert re.search(r"dense: best regretless LoRA \(rl-lora(\+compile)?\) tokens/s vs PEFT eager in a plain loop",
                     text)  # the faster of eager and compiled, which on tiny CPU shapes is either
    assert "- dense: rl-lora+compile vs rl-lora-fusednode+compile: step" in text
    assert "- dense: rl-lora+compile vs rl-lora-nogroup+compile: step" in text
    assert "- dense: rl-lora+compile vs rl-lora-tuned+compile: step" in text
    assert "- dense: the frozen floor (floor+compile) takes" in text


def test_rl_search_rounds_replays_the_committed_full_sweep_exactly():
    """With the span the full sweep was searched with (3), the replay asks for exactly its 39 RL runs (none filled
    in) and ends where the report does: FullFT's best 5.811e-6, rank 1's 1.877e-4. With span 1 it asks for runs
    the sweep does not have (filled in)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "rl_search_rounds.py"),
                        str(ROOT / "docs" / "results" / "full"), "--spans", "1,3"],
                       check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    one, three = r.stdout.splitlines()
    assert three.startswith("first_span 3: 8 rounds") and three.count("(0 filled in)") == 2, three
    assert "16 runs (0 filled in)" in three and "23 runs (0 filled in)" in three
    assert "best 5.811e-06" in three and "best 0.0001877" in three
    assert one.startswith("first_span 1:") and "(7 filled in)" in one, one
