"""What the sweep backends share: where a run lives, the argv that starts it (torchrun for a multi-GPU run),
which GPUs and threads each slot gets, how a finished process is recorded, and the progress line.

Used by local_backend.py and ray_backend.py; runner.py drives them. Nothing here imports a backend.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.sweep.ledger import Ledger
from regretless.sweep.spec import RunSpec

DEFAULT_LAUNCHER = (sys.executable, "-m", "regretless.cli", "{command}", "--config", "{config}", "--out", "{out}",
                    "--resume")
STDERR_TAIL_LINES = 20
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def run_dir(out: Path, run: RunSpec) -> Path:
    return out / "runs" / run.id


def read_summary(path: Path) -> dict[str, Any] | None:
    """summary.json of a finished run (status done or diverged), else None."""
    try:
        s = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("status") in ("done", "diverged") else None


def detect_gpus() -> list[str]:
    """GPU ids to give runs: CUDA_VISIBLE_DEVICES if set, else every CUDA device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except (ImportError, RuntimeError):
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_gpus_per_run(gpus_per_run: Any) -> int:
    if isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, int) or gpus_per_run < 1:
        raise UserError(f"gpus_per_run {gpus_per_run!r}: expected a whole number, at least 1")
    return gpus_per_run


def gpu_groups(gpus: Sequence[str], gpus_per_run: int) -> list[list[str]]:
    """The GPUs split into disjoint groups of `gpus_per_run`, in order (leftover GPUs stay idle)."""
    return [list(gpus[i * gpus_per_run:(i + 1) * gpus_per_run]) for i in range(len(gpus) // gpus_per_run)]


def slot_envs(workers: int | None, threads_per_run: int | None, gpus: Sequence[str] | None,
              gpus_per_run: int = 1) -> list[dict[str, str]]:
    """One environment overlay per concurrent slot: CUDA_VISIBLE_DEVICES (one group of `gpus_per_run` GPUs
    per slot, slots = GPUs // gpus_per_run) and the thread counts. Without GPUs: max(1, cores // threads)
    CPU slots; a run on several GPUs then is an error."""
    gpus_per_run = check_gpus_per_run(gpus_per_run)
    gpus = detect_gpus() if gpus is None else list(gpus)
    cores = cpu_count()
    if gpus_per_run > 1 and len(gpus) < gpus_per_run:
        raise UserError(f"gpus_per_run {gpus_per_run}: this machine shows {len(gpus)} GPU(s) "
                        f"(CUDA_VISIBLE_DEVICES or torch.cuda); expected at least {gpus_per_run}")
    if gpus:
        groups = gpu_groups(gpus, gpus_per_run)
        n = workers or len(groups)
        threads = threads_per_run or max(1, cores // (n * gpus_per_run))
        envs = [{"CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])} for i in range(n)]
    else:
        n = workers or max(1, cores // (threads_per_run or 1))
        threads = threads_per_run or max(1, cores // n)
        envs = [{} for _ in range(n)]
    for e in envs:
        e.update({k: str(threads) for k in THREAD_VARS})
    return envs


def _is_python(exe: str) -> bool:
    return exe == sys.executable or Path(exe).name.startswith("python")


def torchrun_argv(argv: Sequence[str], nproc: int) -> list[str]:
    """The same run as `nproc` processes under torchrun (one node):
    `python -m regretless.cli sft ...` -> `python -m torch.distributed.run --standalone --nproc-per-node N
    -m regretless.cli sft ...`; a script keeps its path; any other program goes through --no-python."""
    argv = list(argv)
    if _is_python(argv[0]) and len(argv) > 1 and (argv[1] == "-m" or not argv[1].startswith("-")):
        python, target = argv[0], argv[1:]
    else:
        python, target = sys.executable, ["--no-python", *argv]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]


def launch_argv(run: RunSpec, rdir: Path, launcher: Sequence[str], gpus_per_run: int = 1) -> list[str]:
    """The argv of one run: `launcher` with {command}, {config}, {out}, {id} filled in; through torchrun
    when the run takes more than one GPU."""
    fill = {"command": run.command, "config": str(rdir / "config.yaml"), "out": str(rdir), "id": run.id}
    argv = [a.format(**fill) for a in launcher]
    return torchrun_argv(argv, gpus_per_run) if gpus_per_run > 1 else argv


def stderr_tail(rdir: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = (rdir / "stderr.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def finalize(ledger: Ledger, run: RunSpec, rdir: Path, rc: int) -> str:
    """Record a finished process in the ledger; returns the status written."""
    summary = read_summary(rdir)
    if summary is not None:
        ledger.record_summary(run.id, summary)
        return summary["status"]
    if rc == 3:
        ledger.update(run.id, status="diverged", finished=time.time(), error="exit 3 (diverged), no summary.json")
        return "diverged"
    why = f"exit code {rc}" if rc != 0 else "exit code 0 but no summary.json"
    ledger.record_failure(run.id, f"{why}\n{stderr_tail(rdir)}".strip())
    return "failed"


def not_started(ledger: Ledger, run: RunSpec, rdir: Path) -> str:
    """A run whose folder another live process holds: left queued, with the reason. Returns the reason."""
    try:
        holder = f"pid {(rdir / '.lock').read_text().strip() or '?'}"
    except OSError:
        holder = "pid ?"
    why = f"not started: {rdir} is locked by another live process ({holder}, writing it); rerun once it is done"
    ledger.update(run.id, status="queued", error=why)
    return why


class Progress:
    """Done/diverged/running/failed counts with an ETA: a tqdm bar on a terminal, else one line per run."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.quiet, self.total, self.t0 = quiet, total, time.time()
        self.bar = tqdm(total=total, unit="run", file=sys.stderr, disable=quiet or not sys.stderr.isatty(),
                        dynamic_ncols=True)
        self.counts = {"done": 0, "diverged": 0, "failed": 0, "running": 0, "skipped": 0}

    def started(self) -> None:
        self.counts["running"] += 1
        self._postfix()

    def warn(self, msg: str) -> None:
        """One line on stderr, quiet or not."""
        self.bar.write(msg, file=sys.stderr)

    def skipped(self, run: RunSpec, why: str) -> None:
        self.counts["skipped"] += 1
        if not self.quiet:
            self.bar.write(f"skipped {run.name} ({run.id}): {why}", file=sys.stderr)
        self.bar.update(1)

    def finished(self, run: RunSpec, status: str, seconds: float, error: str | None = None) -> None:
        c = self.counts
        c["running"] -= 1
        c[status] += 1
        finished = c["done"] + c["diverged"] + c["failed"] + c["skipped"]
        if not self.quiet:
            eta = (time.time() - self.t0) / finished * (self.total - finished)
            msg = (f"[{finished}/{self.total} done {c['done']} diverged {c['diverged']} failed {c['failed']} "
                   f"running {c['running']} ETA {int(eta) // 60}:{int(eta) % 60:02d}] {status} {run.name} "
                   f"({run.id}, {seconds:.0f}s)")
            lines = (error or "").strip().splitlines()
            if lines:
                msg += f": {lines[-1]}"
            self.bar.write(msg, file=sys.stderr)
        self.bar.update(1)
        self._postfix()

    def _postfix(self) -> None:
        c = self.counts
        self.bar.set_postfix_str(f"done {c['done']} diverged {c['diverged']} running {c['running']} "
                                 f"failed {c['failed']}", refresh=False)

    def close(self) -> None:
        self.bar.close()
