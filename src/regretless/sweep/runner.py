"""Run a sweep: every run is its own process (the normal trainer CLI), scheduled on local slots or on Ray.

Layout of the sweep folder DIR:
  DIR/spec.yaml                the expanded spec, for the record
  DIR/ledger.sqlite            one row per run (see ledger.py)
  DIR/runs/<id>/config.yaml    written here, then `python -m regretless.cli <cmd> --config .. --out .. --resume`
  DIR/runs/<id>/{stdout,stderr}.log, and the trainer's own files (metrics.jsonl, summary.json, ...)

Slots: one per GPU (CUDA_VISIBLE_DEVICES) when GPUs exist, else max(1, cores // threads_per_run) CPU slots
with OMP/MKL threads set per run. A run with summary.json (status done or diverged) is skipped on rerun; any
other run is (re)started with --resume. A run that fails (non-zero exit, no summary) is recorded with the tail
of its stderr and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regretless.config import save_config, to_dict
from regretless.errors import UserError
from regretless.sweep.ledger import Ledger
from regretless.sweep.spec import LrCenter, RunSpec, SweepSpec, expand, load_spec, parse_spec, spec_to_dict

DEFAULT_LAUNCHER = (sys.executable, "-m", "regretless.cli", "{command}", "--config", "{config}", "--out", "{out}",
                    "--resume")
STDERR_TAIL_LINES = 20


@dataclass
class SweepResult:
    out: Path
    runs: list[dict[str, Any]] = field(default_factory=list)  # ledger rows
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0 and self.counts.get("queued", 0) == 0


def as_spec(spec: SweepSpec | dict[str, Any] | str | Path) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    return load_spec(spec)


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


def slot_envs(workers: int | None, threads_per_run: int | None, gpus: Sequence[str] | None) -> list[dict]:
    """One environment overlay per concurrent slot."""
    gpus = detect_gpus() if gpus is None else list(gpus)
    cores = cpu_count()
    if gpus:
        n = workers or len(gpus)
        threads = threads_per_run or max(1, cores // n)
        envs = [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
    else:
        n = workers or max(1, cores // (threads_per_run or 1))
        threads = threads_per_run or max(1, cores // n)
        envs = [{} for _ in range(n)]
    for e in envs:
        e.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return envs


def prepare(spec: SweepSpec, out: Path, lr_center: LrCenter | None = None) -> tuple[list[RunSpec], Ledger]:
    """Expand the spec, write each run's config.yaml and register it in the ledger (idempotent)."""
    runs = expand(spec, lr_center)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.sqlite")
    (out / "spec.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    ledger.set_meta("spec_json", json.dumps(spec_to_dict(spec), default=str))
    for run in runs:
        rdir = run_dir(out, run)
        rdir.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(run.config, out=str(rdir))
        save_config(cfg, rdir / "config.yaml", run.command)
        ledger.add_run(run.id, run.name, run.command, to_dict(run.config), run.axes,
                       str(rdir.relative_to(out)), run.findings)
        summary = read_summary(rdir)
        if summary is not None:
            ledger.record_summary(run.id, summary)
    return runs, ledger


def launch_argv(run: RunSpec, rdir: Path, launcher: Sequence[str]) -> list[str]:
    fill = {"command": run.command, "config": str(rdir / "config.yaml"), "out": str(rdir), "id": run.id}
    return [a.format(**fill) for a in launcher]


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


class Progress:
    """Done/diverged/running/failed counts with an ETA: a tqdm bar on a terminal, else one line per run."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.quiet, self.total, self.t0 = quiet, total, time.time()
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="run", file=sys.stderr, disable=quiet or not self.tty,
                        dynamic_ncols=True)
        self.counts = {"done": 0, "diverged": 0, "failed": 0, "running": 0}

    def started(self) -> None:
        self.counts["running"] += 1
        self._postfix()

    def finished(self, run: RunSpec, status: str, seconds: float, error: str | None = None) -> None:
        c = self.counts
        c["running"] -= 1
        c[status] += 1
        finished = c["done"] + c["diverged"] + c["failed"]
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


def _terminate(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_local(todo: list[RunSpec], out: Path, ledger: Ledger, envs: list[dict], launcher: Sequence[str],
              progress: Progress) -> None:
    pending = deque(todo)
    running: dict[int, tuple[RunSpec, subprocess.Popen, float, list]] = {}  # slot -> (run, proc, t0, files)
    try:
        while pending or running:
            for slot in range(len(envs)):
                if slot in running or not pending:
                    continue
                run = pending.popleft()
                rdir = run_dir(out, run)
                # closed when the run ends (they outlive this block)
                files = [open(rdir / name, "ab") for name in ("stdout.log", "stderr.log")]  # noqa: SIM115
                ledger.mark_running(run.id)
                proc = subprocess.Popen(launch_argv(run, rdir, launcher), stdout=files[0], stderr=files[1],
                                        stdin=subprocess.DEVNULL, env={**os.environ, **envs[slot]},
                                        start_new_session=True)
                running[slot] = (run, proc, time.time(), files)
                progress.started()
            for slot, (run, proc, t0, files) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                for f in files:
                    f.close()
                del running[slot]
                status = finalize(ledger, run, run_dir(out, run), rc)
                row = ledger.get(run.id) or {}
                progress.finished(run, status, time.time() - t0, row.get("error"))
            time.sleep(0.1)
    except BaseException:
        for run, proc, _, files in running.values():
            _terminate(proc)
            for f in files:
                f.close()
            ledger.update(run.id, status="queued", error="interrupted")
        raise


def run_sweep(spec: SweepSpec | dict[str, Any] | str | Path, out: str | Path, *, workers: int | None = None,
              backend: str = "local", dry_run: bool = False, threads_per_run: int | None = None,
              gpus: Sequence[str] | None = None, launcher: Sequence[str] = DEFAULT_LAUNCHER,
              lr_center: LrCenter | None = None, quiet: bool = False,
              on_plan: Callable[[list[RunSpec], list[RunSpec]], None] | None = None) -> SweepResult:
    """Expand `spec` and run every unfinished run into `out`; returns the ledger rows and status counts.

    `launcher` is the argv template of one run ({command}, {config}, {out}, {id} are filled in).
    `on_plan(all_runs, todo)` is called once before anything runs (the CLI prints the plan with it).
    """
    spec = as_spec(spec)
    out = Path(out)
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r}: expected local or ray")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    if dry_run:
        runs = expand(spec, lr_center)
        todo = [r for r in runs if read_summary(run_dir(out, r)) is None]
        if on_plan:
            on_plan(runs, todo)
        return SweepResult(out, [{"id": r.id, "name": r.name, "status": "todo" if r in todo else "finished"}
                                 for r in runs], {"todo": len(todo), "finished": len(runs) - len(todo)})
    runs, ledger = prepare(spec, out, lr_center)
    todo = [r for r in runs if read_summary(run_dir(out, r)) is None]
    if on_plan:
        on_plan(runs, todo)
    progress = Progress(len(todo), quiet)
    try:
        if backend == "ray":
            from regretless.sweep.ray_backend import run_ray

            run_ray(todo, out, ledger, workers, threads_per_run, launcher, progress)
        else:
            run_local(todo, out, ledger, slot_envs(workers, threads_per_run, gpus), launcher, progress)
    finally:
        progress.close()
    ids = {r.id for r in runs}
    rows = [r for r in ledger.runs() if r["id"] in ids]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return SweepResult(out, rows, counts)
