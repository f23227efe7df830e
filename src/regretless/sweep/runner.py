"""Run a sweep: every run is its own process (the normal trainer CLI), scheduled on local slots or on Ray.

Layout of the sweep folder DIR:
  DIR/spec.yaml                the expanded spec, for the record
  DIR/ledger.sqlite            one row per run (see ledger.py), each naming the spec that registered it
  DIR/.sweep.lock              held by the runner while it runs: one runner per sweep folder
  DIR/zygote.log               what the zygote of warm launches printed, and the runs it forked (warm.py)
  DIR/runs/<id>/config.yaml    written here, then `python -m regretless.cli <cmd> --config .. --out .. --resume`
                               (through torchrun on `gpus_per_run` GPUs when that is more than 1; with one GPU
                               or none, locally, forked by a zygote that imported the trainer once: warm.py)
  DIR/runs/<id>/{stdout,stderr}.log, .trainer.json (token and pid of the live launch), and the trainer's own
                               files (metrics.jsonl, summary.json, .lock while it writes, ...)

Slots: one per group of `gpus_per_run` GPUs (CUDA_VISIBLE_DEVICES) when GPUs exist, else
max(1, cores // threads_per_run) CPU slots with OMP/MKL threads set per run. A run with summary.json (status
done or diverged) is skipped on rerun; any other run is (re)started with --resume. A run that fails (non-zero
exit, no summary) is recorded with the tail of its stderr and the sweep goes on.

Trainers die with the runner (procs.py): SIGINT, SIGTERM and SIGHUP stop them (SIGTERM, then SIGKILL after
`stop_grace_s`) and put their rows back to queued; a runner killed outright takes them along through the
parent-death signal. A start then reaps what a previous runner left alive on this machine, turns `running` rows
that have no process into `queued` (or `done`, when the run had finished), and does not launch into a run
folder another live process holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regretless.config import atomic_write_text, save_config, to_dict
from regretless.errors import UserError
from regretless.sweep import launch, procs, warm
from regretless.sweep.launch import DEFAULT_LAUNCHER, Progress, read_summary, run_dir
from regretless.sweep.ledger import Ledger
from regretless.sweep.local_backend import run_local
from regretless.sweep.ray_backend import run_ray
from regretless.sweep.spec import LrCenter, RunSpec, SweepSpec, expand, load_spec, parse_spec, spec_to_dict

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Terminated(SystemExit):
    """Raised in the runner by SIGTERM or SIGHUP, after which the process exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


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


def spec_hash(spec: SweepSpec, runs: list[RunSpec]) -> str:
    """Names a spec together with the runs it expanded to (a changed recipe LR changes the runs, so the hash)."""
    d = spec_to_dict(spec)
    blob = json.dumps({"spec": d, "runs": sorted(r.id for r in runs)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare(spec: SweepSpec, runs: list[RunSpec], out: Path, ledger: Ledger, extend: bool = False) -> str:
    """Write each run's config.yaml and register it in the ledger under this spec (idempotent); the spec
    becomes the current one (`extend`: one of the current ones). Returns the spec's hash."""
    h = spec_hash(spec, runs)
    atomic_write_text(out / "spec.yaml", yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    ledger.set_meta("spec_json", json.dumps(spec_to_dict(spec), default=str))
    ledger.set_meta(f"spec:{h}", json.dumps(spec_to_dict(spec), default=str))
    for run in runs:
        rdir = run_dir(out, run)
        rdir.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(run.config, out=str(rdir))
        save_config(cfg, rdir / "config.yaml", run.command)
        ledger.add_run(run.id, run.name, run.command, to_dict(run.config), run.axes,
                       str(rdir.relative_to(out)), run.findings, spec_hash=h)
        summary = read_summary(rdir)
        if summary is not None:
            ledger.record_summary(run.id, summary)
    before = (ledger.current_specs() or []) if extend else []
    ledger.set_current_specs([*[x for x in before if x != h], h])
    return h


def register_spec(spec: SweepSpec | dict[str, Any] | str | Path, out: str | Path) -> str:
    """Make `spec` the current spec of sweep folder `out` (configs written, rows registered, finished runs'
    summaries recorded) and run nothing: what `run_sweep` does before it launches. Returns the spec's hash."""
    spec, out = as_spec(spec), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with procs.sweep_lock(out):
        return prepare(spec, expand(spec), out, Ledger(out / "ledger.sqlite"))


def reap(out: Path, grace_s: float) -> list[int]:
    """Kill what earlier runners into `out` left alive on this machine (every run folder, old specs too)."""
    found: list[int] = []
    runs = out / "runs"
    if runs.is_dir():
        for rdir in sorted(p for p in runs.iterdir() if (p / procs.PIDFILE).is_file()):
            found += procs.reap(rdir, grace_s)
    return found


def reconcile(out: Path, ledger: Ledger) -> list[str]:
    """Rows still `running` from a runner that is gone: `done`/`diverged` when the run finished (summary.json),
    else `queued` (resumed by this sweep if it is part of the spec). Returns their ids."""
    fixed = []
    for row in ledger.runs("running"):
        summary = read_summary(out / row["path"])
        if summary is not None:
            ledger.record_summary(row["id"], summary)
        else:
            ledger.update(row["id"], status="queued",
                          error="interrupted: its runner stopped before it finished; resumed on the next sweep")
        fixed.append(row["id"])
    return fixed


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """In the main thread: SIGINT raises KeyboardInterrupt, SIGTERM/SIGHUP raise Terminated, once; later
    signals are ignored while the trainers are being stopped. Signals set to be ignored (nohup) stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    old = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_sweep(spec: SweepSpec | dict[str, Any] | str | Path, out: str | Path, *, workers: int | None = None,
              backend: str = "local", dry_run: bool = False, threads_per_run: int | None = None,
              gpus: Sequence[str] | None = None, gpus_per_run: int = 1, launcher: Sequence[str] = DEFAULT_LAUNCHER,
              lr_center: LrCenter | None = None, quiet: bool = False, extend: bool = False,
              stop_grace_s: float = 10.0,
              on_plan: Callable[[list[RunSpec], list[RunSpec]], None] | None = None,
              zygote: warm.Zygote | None = None) -> SweepResult:
    """Expand `spec` and run every unfinished run into `out`; returns the ledger rows and status counts.

    `launcher` is the argv template of one run ({command}, {config}, {out}, {id} are filled in); with
    `gpus_per_run` > 1 it is started through torchrun on that many GPUs (`gpus`: the ids to use, default
    CUDA_VISIBLE_DEVICES or every GPU torch sees). The spec's runs become the ledger's current ones
    (`ledger.current_rows`); `extend=True` keeps the previous current runs current too (a search that adds
    points to a sweep folder). `stop_grace_s`: how long a trainer gets between SIGTERM and SIGKILL when the
    sweep stops. `on_plan(all_runs, todo)` is called once before anything runs (the CLI prints the plan).
    `zygote`: a caller's serving `warm.Zygote` for the local backend's warm launches (left running; `reproduce`
    keeps one for all its rounds instead of importing the trainer again for every sweep).
    """
    spec = as_spec(spec)
    out = Path(out)
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r}: expected local or ray")
    for name, v in (("--workers", workers), ("--threads-per-run", threads_per_run)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"{name} {v!r}: expected a whole number, at least 1")
    gpus_per_run = launch.check_gpus_per_run(gpus_per_run)
    if isinstance(stop_grace_s, bool) or not isinstance(stop_grace_s, (int, float)) or not stop_grace_s >= 0:
        raise UserError(f"stop_grace_s {stop_grace_s!r}: expected seconds, at least 0")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a sweep folder (new or from an earlier sweep)")
    runs = expand(spec, lr_center)
    if dry_run:
        todo = [r for r in runs if read_summary(run_dir(out, r)) is None]
        if on_plan:
            on_plan(runs, todo)
        return SweepResult(out, [{"id": r.id, "name": r.name, "status": "todo" if r in todo else "finished"}
                                 for r in runs], {"todo": len(todo), "finished": len(runs) - len(todo)})
    envs = launch.slot_envs(workers, threads_per_run, gpus, gpus_per_run) if backend == "local" else []
    out.mkdir(parents=True, exist_ok=True)
    with procs.sweep_lock(out), stop_on_signals():
        ledger = Ledger(out / "ledger.sqlite")
        reap(out, stop_grace_s)
        prepare(spec, runs, out, ledger, extend)
        reconcile(out, ledger)
        todo = [r for r in runs if read_summary(run_dir(out, r)) is None]
        if on_plan:
            on_plan(runs, todo)
        progress = Progress(len(todo), quiet)
        try:
            if backend == "ray":
                run_ray(todo, out, ledger, workers, threads_per_run, launcher, progress, gpus_per_run, stop_grace_s)
            else:
                run_local(todo, out, ledger, envs, launcher, progress, gpus_per_run, stop_grace_s, zygote)
        finally:
            progress.close()
    ids = {r.id for r in runs}
    rows = [r for r in ledger.runs() if r["id"] in ids]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return SweepResult(out, rows, counts)
