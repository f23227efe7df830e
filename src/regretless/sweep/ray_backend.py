"""`--backend ray`: the same runs, one Ray task each. A task holds `gpus_per_run` GPUs when the cluster has
GPUs (Ray sets CUDA_VISIBLE_DEVICES to them; a multi-GPU run starts torchrun on them), else none.

Each task starts the same trainer subprocess as the local backend (own session, parent-death signal, token
and pid file: see procs.py), in the run's folder, so DIR must be on a filesystem every Ray node sees. When a
task is cancelled its worker dies and the parent-death signal stops the trainer. The ledger is written by the
driver only (tasks return exit codes). Connects to the cluster named by RAY_ADDRESS, or starts a local Ray
instance, unless `ray.init` was already called.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.sweep import procs
from regretless.sweep.launch import THREAD_VARS, Progress, finalize, launch_argv, not_started, run_dir
from regretless.sweep.ledger import Ledger
from regretless.sweep.spec import RunSpec


def _run_task(argv: list[str], rdir: str, threads: int, token: str, grace_s: float) -> int:
    """Body of one Ray task: the trainer as a subprocess, logs appended in the run folder."""
    folder = Path(rdir)
    env = {**os.environ, **{k: str(threads) for k in THREAD_VARS}, procs.TOKEN_ENV: token}
    procs.write_pidfile(folder, token)
    with open(folder / "stdout.log", "ab") as out, open(folder / "stderr.log", "ab") as err:
        p = procs.popen(argv, env, out, err)
        procs.write_pidfile(folder, token, p.pid)
        try:
            rc = p.wait()
        finally:
            procs.stop([token], grace_s, [p])  # what is left (all of it, if this task was interrupted)
    (folder / procs.PIDFILE).unlink(missing_ok=True)
    return rc


def task_gpus(nodes: list[dict[str, Any]], gpus_per_run: int) -> int:
    """GPUs one task asks for: gpus_per_run where the cluster has GPUs, else 0; a UserError when no live node
    has gpus_per_run of them (the task could never be placed)."""
    most = max((n.get("Resources", {}).get("GPU", 0) for n in nodes if n.get("Alive", True)), default=0)
    if gpus_per_run > 1 and most < gpus_per_run:
        raise UserError(f"gpus_per_run {gpus_per_run}: no node of the Ray cluster has that many GPUs "
                        f"(the most on one node: {most:g})")
    return gpus_per_run if most else 0


def run_ray(todo: list[RunSpec], out: Path, ledger: Ledger, workers: int | None, threads_per_run: int | None,
            launcher: Sequence[str], progress: Progress, gpus_per_run: int = 1, grace_s: float = 10.0) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'regretless[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    threads = threads_per_run or 1
    task = ray.remote(_run_task).options(num_gpus=task_gpus(ray.nodes(), gpus_per_run),
                                         num_cpus=threads * gpus_per_run, max_retries=0)
    limit = workers or len(todo)
    pending = list(todo)
    inflight: dict[Any, tuple[RunSpec, float]] = {}
    try:
        while pending or inflight:
            while pending and len(inflight) < limit:
                run = pending.pop(0)
                rdir = run_dir(out, run)
                if procs.folder_locked(rdir):
                    progress.skipped(run, not_started(ledger, run, rdir))
                    continue
                ledger.mark_running(run.id)
                argv = launch_argv(run, rdir, launcher, gpus_per_run)
                ref = task.remote(argv, str(rdir), threads, procs.new_token(), grace_s)
                inflight[ref] = (run, time.time())
                progress.started()
            if not inflight:
                continue
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in done:
                run, t0 = inflight.pop(ref)
                try:
                    rc = int(ray.get(ref))
                except ray.exceptions.RayError as e:  # the task itself died (node lost, worker killed)
                    with (run_dir(out, run) / "stderr.log").open("a") as f:
                        f.write(f"\nray task failed: {e}\n")
                    rc = -1
                status = finalize(ledger, run, run_dir(out, run), rc)
                progress.finished(run, status, time.time() - t0, (ledger.get(run.id) or {}).get("error"))
    except BaseException:
        for ref, (run, _) in inflight.items():
            ray.cancel(ref, force=True)  # kills the worker; the parent-death signal stops its trainer
        for run, _ in inflight.values():
            procs.reap(run_dir(out, run), grace_s)  # trainers of this machine, in case one ignored SIGTERM
            ledger.update(run.id, status="queued", error="interrupted: the sweep was stopped; rerun to resume")
        raise
