"""`--backend local`: runs as trainer subprocesses on this machine, one per slot (a GPU group or some cores).

Each launch gets a token and a pid file (procs.py) and is started with the parent-death signal, from the
thread that runs this loop and waits on it. When the loop is left by an exception (Ctrl-C, SIGTERM turned into
SystemExit by the runner, an error), every trainer it started is stopped: SIGTERM to its process group and to
everything carrying its token, SIGKILL after `grace_s`; their rows go back to `queued`.

Where it is exactly equivalent (warm.usable: the default launcher, one process per run, Linux) runs are forked
by a zygote (warm.py) instead of started cold: they carry the zygote's token, their pid files add the trainer's
pid and start time, and the zygote is stopped after its trainers. If it cannot start or dies, the remaining
runs start cold (one WARNING line).
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

from regretless.sweep import procs, warm
from regretless.sweep.launch import THREAD_VARS, Progress, finalize, launch_argv, not_started, run_dir
from regretless.sweep.ledger import Ledger
from regretless.sweep.spec import RunSpec

ZYGOTE_LOG = "zygote.log"


@dataclass
class _Running:
    run: RunSpec
    proc: subprocess.Popen | warm.WarmProc
    token: str | None  # a cold launch's own token (a warm one carries its zygote's)
    t0: float
    files: list[IO]


def _start_zygote(out: Path, env: dict[str, str], progress: Progress, grace_s: float) -> warm.Zygote | None:
    try:
        return warm.Zygote.start(out / ZYGOTE_LOG, {k: env[k] for k in THREAD_VARS if k in env}, grace_s)
    except (warm.ZygoteError, OSError) as e:
        progress.warn(f"WARNING: no warm launches ({e}); runs start cold")
        return None


def _go_cold(zygote: warm.Zygote, why: str, out: Path, progress: Progress, grace_s: float) -> None:
    progress.warn(f"WARNING: {why}; the remaining runs start cold (see {out / ZYGOTE_LOG})")
    zygote.close(grace_s)  # what it forked got SIGTERM when it died, and dies now


def _launch(zygote: warm.Zygote | None, argv: list[str], env: dict[str, str],
            rdir: Path) -> tuple[subprocess.Popen | warm.WarmProc, list[IO]]:
    """Fork the run from the zygote, or start it cold (then with its log files, closed when it ends)."""
    if zygote:
        return zygote.launch(argv, env, rdir / "stdout.log", rdir / "stderr.log"), []
    files = [open(rdir / name, "ab") for name in ("stdout.log", "stderr.log")]  # noqa: SIM115
    return procs.popen(argv, env, files[0], files[1]), files


def run_local(todo: list[RunSpec], out: Path, ledger: Ledger, envs: list[dict[str, str]], launcher: Sequence[str],
              progress: Progress, gpus_per_run: int = 1, grace_s: float = 10.0,
              zygote: warm.Zygote | None = None) -> None:
    """`zygote`: a serving zygote of the caller's (one for several sweeps, e.g. `reproduce`'s rounds) that this
    call uses and leaves running when it ends normally; else one is started for this call and closed after."""
    pending = deque(todo)
    own = zygote is None
    running: dict[int, _Running] = {}  # slot -> what runs there
    tokens: list[str] = []  # every cold launch of this call, registered before its process exists
    active: dict[str, tuple[RunSpec, str]] = {}  # rows marked running and not yet recorded, with their token
    can_warm = bool(todo) and warm.usable(launcher, gpus_per_run)
    if not can_warm or (zygote is not None and not zygote.serving()):
        zygote = None  # nothing to launch, launches that cannot be warm, or a caller's zygote that died
    try:
        if own and can_warm:
            zygote = _start_zygote(out, envs[0], progress, grace_s)  # every slot has the same threads
        while pending or running:
            for slot in range(len(envs)):
                if slot in running or not pending:
                    continue
                run = pending.popleft()
                rdir = run_dir(out, run)
                if procs.folder_locked(rdir):
                    progress.skipped(run, not_started(ledger, run, rdir))
                    continue
                if zygote and not zygote.serving():
                    _go_cold(zygote, f"the zygote exited (status {zygote.proc.poll()})", out, progress, grace_s)
                    zygote = None
                token = zygote.token if zygote else procs.new_token()
                if not zygote:
                    tokens.append(token)
                procs.write_pidfile(rdir, token)
                ledger.mark_running(run.id)
                active[run.id] = (run, token)
                env = {**os.environ, **envs[slot], procs.TOKEN_ENV: token}
                try:
                    proc, files = _launch(zygote, launch_argv(run, rdir, launcher, gpus_per_run), env, rdir)
                except warm.ZygoteError as e:
                    _go_cold(zygote, f"the zygote failed ({e})", out, progress, grace_s)
                    zygote = None
                    pending.appendleft(run)  # started cold on the next pass
                    continue
                running[slot] = _Running(run, proc, None if zygote else token, time.time(), files)
                procs.write_pidfile(rdir, token, proc.pid, proc.start if zygote else None)
                progress.started()
            for slot, r in list(running.items()):
                rc = r.proc.poll()
                if rc is None:
                    continue
                del running[slot]
                if r.token:  # anything the trainer left behind (normally nothing); the zygote kills a warm
                    procs.stop([r.token], grace_s)  # trainer's leftovers itself
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
        if zygote:
            zygote.close(grace_s)  # after its trainers, whose exits it reports
        for r in running.values():
            for f in r.files:
                f.close()
        left = set(procs.pids_with_token({token for _, token in active.values()}).values())
        for run, token in active.values():
            if token not in left:  # else the pid file stays, for the next start to reap
                (run_dir(out, run) / procs.PIDFILE).unlink(missing_ok=True)
            ledger.update(run.id, status="queued", error="interrupted: the sweep was stopped; rerun to resume")
        raise
    if zygote and own:
        zygote.close(grace_s)
