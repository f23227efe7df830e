"""`--backend local`: runs as trainer subprocesses on this machine, one per slot (a GPU group or some cores).

Each launch gets a token and a pid file (procs.py) and is started with the parent-death signal, from the
thread that runs this loop and waits on it. When the loop is left by an exception (Ctrl-C, SIGTERM turned into
SystemExit by the runner, an error), every trainer it started is stopped: SIGTERM to its process group and to
everything carrying its token, SIGKILL after `grace_s`; their rows go back to `queued`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from regretless.sweep import procs
from regretless.sweep.launch import Progress, finalize, launch_argv, not_started, run_dir
from regretless.sweep.ledger import Ledger
from regretless.sweep.spec import RunSpec


@dataclass
class _Running:
    run: RunSpec
    proc: subprocess.Popen
    token: str
    t0: float
    files: list[IO]


def run_local(todo: list[RunSpec], out: Path, ledger: Ledger, envs: list[dict[str, str]], launcher: Sequence[str],
              progress: Progress, gpus_per_run: int = 1, grace_s: float = 10.0) -> None:
    pending = deque(todo)
    running: dict[int, _Running] = {}  # slot -> what runs there
    tokens: list[str] = []  # every launch of this call, registered before its process exists
    active: dict[str, tuple[RunSpec, str]] = {}  # rows marked running and not yet recorded, with their token
    try:
        while pending or running:
            for slot in range(len(envs)):
                if slot in running or not pending:
                    continue
                run = pending.popleft()
                rdir = run_dir(out, run)
                if procs.folder_locked(rdir):
                    progress.skipped(run, not_started(ledger, run, rdir))
                    continue
                token = procs.new_token()
                tokens.append(token)
                procs.write_pidfile(rdir, token)
                # closed when the run ends (they outlive this block)
                files = [open(rdir / name, "ab") for name in ("stdout.log", "stderr.log")]  # noqa: SIM115
                ledger.mark_running(run.id)
                active[run.id] = (run, token)
                env = {**os.environ, **envs[slot], procs.TOKEN_ENV: token}
                proc = procs.popen(launch_argv(run, rdir, launcher, gpus_per_run), env, files[0], files[1])
                running[slot] = _Running(run, proc, token, time.time(), files)
                procs.write_pidfile(rdir, token, proc.pid)
                progress.started()
            for slot, r in list(running.items()):
                rc = r.proc.poll()
                if rc is None:
                    continue
                del running[slot]
                procs.stop([r.token], grace_s)  # anything the trainer left behind (normally nothing)
                for f in r.files:
                    f.close()
                rdir = run_dir(out, r.run)
                (rdir / procs.PIDFILE).unlink(missing_ok=True)
                status = finalize(ledger, r.run, rdir, rc)
                del active[r.run.id]
                progress.finished(r.run, status, time.time() - r.t0, (ledger.get(r.run.id) or {}).get("error"))
            time.sleep(0.1)
    except BaseException:
        procs.stop(tokens, grace_s, [r.proc for r in running.values()])
        for r in running.values():
            for f in r.files:
                f.close()
        left = set(procs.pids_with_token(tokens).values())
        for run, token in active.values():
            if token not in left:  # else the pid file stays, for the next start to reap
                (run_dir(out, run) / procs.PIDFILE).unlink(missing_ok=True)
            ledger.update(run.id, status="queued", error="interrupted: the sweep was stopped; rerun to resume")
        raise
