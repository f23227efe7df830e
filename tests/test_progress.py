"""Progress lines when stderr is not a terminal, and rounded numbers in the closing line."""

from __future__ import annotations

import io
import json

from regretless import progress
from regretless.runfiles import MetricsLog


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def records(n: int) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s, "tokens_per_s": 1234.56 * s, "lr": 1e-3} for s in range(1, n + 1)]


def test_lines_show_step_loss_speed_and_eta(tmp_path):
    stream = io.StringIO()
    log = progress.lines(MetricsLog(tmp_path), total=10, start=0, what="sft", stream=stream, interval=0)
    log.write({"step": 0, "eval_loss": 3.0})  # the step-0 eval: no line (no step done yet)
    for r in records(3):
        log.write(r)
    log.close()
    out = stream.getvalue().splitlines()
    assert len(out) == 3
    assert out[0].startswith("[regretless] sft step 1/10 (10%)  loss 2  1,235 tok/s  ")
    assert "loss 0.6667" in out[2] and "3,704 tok/s" in out[2] and " s/step" in out[2] and "ETA " in out[2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # every record still written


def test_steady_pace_first_eval_and_last_step_always(tmp_path):
    stream = io.StringIO()
    log = progress.lines(MetricsLog(tmp_path), total=6, start=0, what="rl", stream=stream, interval=3600)
    for r in records(6):
        if r["step"] == 3:
            r["eval_accuracy"] = 0.25
        log.write(r)
    log.close()
    steps = [line.split()[3] for line in stream.getvalue().splitlines()]
    assert steps == ["1/6", "3/6", "6/6"]
    assert "eval acc 0.25" in stream.getvalue() and "ETA" not in stream.getvalue().splitlines()[-1]


def test_resumed_run_counts_eta_from_its_own_steps(tmp_path):
    stream = io.StringIO()
    log = progress.lines(MetricsLog(tmp_path), total=100, start=90, what="sft", stream=stream, interval=0)
    log.write({"step": 91, "loss": 1.0})
    log.close()
    assert "step 91/100 (91%)" in stream.getvalue()


def test_nothing_on_a_terminal(tmp_path):
    log = MetricsLog(tmp_path)
    assert progress.lines(log, total=5, stream=Tty()) is log
    log.close()


def test_fmt_and_final_line_round():
    assert progress.fmt(1.8153158456851275) == "1.815"
    assert progress.fmt(0.000123456) == "0.0001235"
    assert progress.fmt(123456.7) == "123,457" and progress.fmt(1234567) == "1,234,567"
    assert progress.duration(65) == "1m05s" and progress.duration(3725) == "1h02m" and progress.duration(4) == "4s"
    summary = {"status": "done", "steps": 5, "final_loss": 1.8153158456851275, "final_eval_loss": 1.9012345678,
               "best_eval_loss": 1.9012345678, "wall_s": 12.3456, "lr": 0.0012789}
    line = progress.final_line(summary, "runs/x")
    assert line == ("done: 5 steps, loss 1.815, eval loss 1.901, best eval loss 1.901, 12s in steps; "
                    "files in runs/x")
    rl = progress.final_line({"status": "done", "steps": 24, "initial_eval_accuracy": 0.125,
                              "final_eval_accuracy": 0.2109375, "final_reward": 0.40625, "wall_s": 300}, "o")
    assert "eval accuracy at start 0.125" in rl and "eval accuracy 0.2109" in rl and "5m00s" in rl
    json.dumps(summary)  # the summary itself is untouched


def test_sft_cli_with_stderr_to_a_file_prints_progress_lines(tiny_llama_dir, tmp_path):
    """A real `regretless sft` whose stderr is a file (not a terminal): progress lines and a rounded last line."""
    import os
    import re
    import subprocess
    import sys

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                            for i in range(30)))
    out = tmp_path / "run"
    with open(tmp_path / "err.log", "w") as err:
        res = subprocess.run([sys.executable, "-m", "regretless.cli", "sft", "--model", str(tiny_llama_dir),
                              "--data", str(data), "--out", str(out), "--steps", "3", "--rank", "2",
                              "--lr", "1e-3", "--device", "cpu", "batch_size=4", "eval_size=4", "seq_len=32"],
                             stderr=err, stdout=subprocess.PIPE, text=True, timeout=300, check=False,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "REGRETLESS_PROGRESS_S": "0"})
    log = (tmp_path / "err.log").read_text()
    assert res.returncode == 0, log
    lines = [ln for ln in log.splitlines() if re.match(r"\[regretless\] sft step \d+/3 ", ln)]
    assert [ln.split()[3] for ln in lines] == ["1/3", "2/3", "3/3"], log
    assert all(" tok/s " in ln and " s/step " in ln for ln in lines)
    last = log.strip().splitlines()[-1]
    assert last.startswith("[regretless] done: 3 steps, loss ") and f"files in {out}" in last
    assert not re.search(r"\d\.\d{5,}", last), last  # rounded numbers
