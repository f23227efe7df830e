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
