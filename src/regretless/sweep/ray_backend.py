"""`--backend ray`: the same runs, one Ray task each (num_gpus=1 when the cluster has GPUs).

Each task starts the same trainer subprocess as the local backend, in the run's folder, so DIR must be on a
filesystem every Ray node sees. The ledger is written by the driver only (tasks return exit codes). Connects
to the cluster named by RAY_ADDRESS, or starts a local Ray instance, unless `ray.init` was already called.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.sweep.ledger import Ledger
from regretless.sweep.runner import Progress, finalize, launch_argv, run_dir
from regretless.sweep.spec import RunSpec


def _run_task(argv: list[str], rdir: str, threads: int) -> int:
    """Body of one Ray task: the trainer as a subprocess, logs appended in the run folder."""
    env = dict(os.environ)
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    with open(Path(rdir) / "stdout.log", "ab") as out, open(Path(rdir) / "stderr.log", "ab") as err:
        return subprocess.run(argv, check=False, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env).returncode


def run_ray(todo: list[RunSpec], out: Path, ledger: Ledger, workers: int | None, threads_per_run: int | None,
            launcher: Sequence[str], progress: Progress) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'regretless[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    threads = threads_per_run or 1
    task = ray.remote(_run_task).options(num_gpus=1 if gpus else 0, num_cpus=threads, max_retries=0)
    limit = workers or len(todo)
    pending = list(todo)
    inflight: dict[Any, tuple[RunSpec, float]] = {}
    try:
        while pending or inflight:
            while pending and len(inflight) < limit:
                run = pending.pop(0)
                rdir = run_dir(out, run)
                ledger.mark_running(run.id)
                ref = task.remote(launch_argv(run, rdir, launcher), str(rdir), threads)
                inflight[ref] = (run, time.time())
                progress.started()
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
            ray.cancel(ref, force=True)
            ledger.update(run.id, status="queued", error="interrupted")
        raise
