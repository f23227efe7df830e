"""Progress for people: one line at a steady pace when stderr is not a terminal (a log file, a sweep's
stdout.log, CI), where the trainers' tqdm bar switches itself off.

    metrics = progress.lines(metrics, total=total, start=start, what="sft")   # wraps the run's metrics log

Every record the trainer writes to metrics.jsonl passes through; at most one line every `interval` seconds
($REGRETLESS_PROGRESS_S, default 30), plus the first step, every eval and the last step:

    [regretless] sft step 40/246 (16%)  loss 1.234  eval 1.102  1,850 tok/s  2.4 s/step  3m05s elapsed  ETA 8m14s

On a terminal nothing is printed here (the bar shows the same). `final_line(summary)` is the closing line with
rounded numbers. Numbers are formatted by `fmt` (4 significant digits; counts with thousands separators).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

DEFAULT_INTERVAL_S = 30.0
# (record key, label) in the order shown; the first present of each group is used
SHOWN = (("loss", "loss"), ("reward", "reward"), ("eval_loss", "eval"), ("eval_accuracy", "eval acc"))
SPEED = ("tokens_per_s", "sample_tokens_per_s")


def fmt(x: Any) -> str:
    """4 significant digits for floats (1.235, 0.0001235, 1.235e+05 -> 123,500), plain ints with separators."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and abs(x) >= 1e4:
            return f"{round(x):,}"
        return f"{x:.4g}"
    return str(x)


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLines:
    """Wraps a metrics log: `write(record)` writes it, then maybe prints a progress line."""

    def __init__(self, log: Any, total: int, start: int, what: str, interval: float, stream: TextIO):
        self.log, self.total, self.start, self.what = log, total, start, what
        self.interval, self.stream = interval, stream
        self.t0 = time.perf_counter()
        self.last_print: float | None = None

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        step = int(record.get("step", 0))
        if step < 1:
            return
        now = time.perf_counter()
        due = (self.last_print is None or now - self.last_print >= self.interval or step >= self.total
               or any(k.startswith("eval_") for k in record))
        if due:
            self.last_print = now
            print(self.line(record, now - self.t0), file=self.stream, flush=True)

    def line(self, record: dict[str, Any], elapsed: float) -> str:
        step = int(record["step"])
        parts = [f"[regretless] {self.what} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        for key, label in SHOWN:
            if isinstance(record.get(key), (int, float)):
                parts.append(f"{label} {fmt(float(record[key]))}")
        speed = next((record[k] for k in SPEED if isinstance(record.get(k), (int, float))), None)
        if speed is not None:
            parts.append(f"{fmt(round(speed))} tok/s")
        done = step - self.start
        if done > 0:
            per_step = elapsed / done
            parts.append(f"{per_step:.3g} s/step")
            parts.append(f"{duration(elapsed)} elapsed")
            if step < self.total:
                parts.append(f"ETA {duration(per_step * (self.total - step))}")
        return "  ".join(parts)

    def close(self) -> None:
        self.log.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)


def lines(log: Any, total: int, start: int = 0, what: str = "train", stream: TextIO | None = None,
          interval: float | None = None) -> Any:
    """`log` wrapped to print progress lines when `stream` (default stderr) is not a terminal; else `log`."""
    stream = stream or sys.stderr
    if stream.isatty():
        return log
    if interval is None:
        try:
            interval = float(os.environ.get("REGRETLESS_PROGRESS_S", DEFAULT_INTERVAL_S))
        except ValueError:
            interval = DEFAULT_INTERVAL_S
    return ProgressLines(log, total, start, what, interval, stream)


def final_line(summary: dict[str, Any], out: Any) -> str:
    """'done: 246 steps, loss 2.113 -> 0.7701, eval loss 0.7702 (best 0.7689), 10m55s, files in runs/sft'."""
    keys = (("final_loss", "loss"), ("final_eval_loss", "eval loss"), ("best_eval_loss", "best eval loss"),
            ("final_reward", "reward"), ("initial_eval_accuracy", "eval accuracy at start"),
            ("final_eval_accuracy", "eval accuracy"), ("best_eval_accuracy", "best eval accuracy"))
    parts = [f"{summary.get('status', 'done')}: {summary.get('steps', '?')} steps"]
    parts += [f"{label} {fmt(summary[k])}" for k, label in keys if isinstance(summary.get(k), (int, float))]
    if isinstance(summary.get("wall_s"), (int, float)):
        parts.append(f"{duration(summary['wall_s'])} in steps")
    return ", ".join(parts) + f"; files in {out}"
