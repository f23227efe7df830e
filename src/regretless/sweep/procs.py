"""Trainer processes of a sweep: they die with their runner, and a run folder has one writer at a time.

- **Parent-death signal.** On Linux every trainer starts with prctl(PR_SET_PDEATHSIG, SIGTERM) (set in the
  child between fork and exec), so a runner killed even with SIGKILL takes its trainers with it. Linux sends
  the signal when the *thread* that started the child exits, not the process: trainers must be started from a
  thread that outlives them (the runner's own loop, or a Ray task's thread, which waits on its trainer).
  The signal survives exec and setsid; only the direct child gets it (torchrun passes SIGTERM on to its workers).
- **Own session.** A trainer runs in a session of its own, so its whole process group is signalled as one, and
  a Ctrl-C on the terminal reaches the runner only, which then stops its trainers itself.
- **Token.** Each launch puts REGRETLESS_TRAINER_TOKEN=<random> in the trainer's environment; everything it
  starts inherits it (torchrun's workers too, though they sit in sessions of their own). RUNDIR/.trainer.json
  records the token with the host and boot id. A rerun on the same machine finds, by that token in
  /proc/*/environ, any process a previous launch left behind (a trainer that ignored SIGTERM, an orphaned
  worker) and kills it before the run starts again (`reap`). A token never matches a process it did not start.
- **Warm launches** (warm.py) add one link to the chain: runner -> zygote (started by `popen`: parent-death
  signal, own session, its own token) -> trainer, forked by the zygote from its only thread, which calls setsid
  and sets its own parent-death signal (its parent being the zygote). A runner killed with SIGKILL takes the
  zygote along, and the zygote its trainers. A forked trainer's /proc/PID/environ is the zygote's, so it carries
  the zygote's token (stopping or reaping by that token finds the zygote and all it forked), and its pid file also
  records its pid and start time (`start_time`), by which `reap` kills that very process however pids are reused.
  The zygote kills what a finished trainer left in its process group before it reaps it (its pid is not reused
  until then).
- **Locks.** The trainer holds an exclusive flock on RUNDIR/.lock while it writes; `folder_locked` probes it.
  The runner holds DIR/.sweep.lock for as long as it runs (`sweep_lock`): a second runner on the same sweep
  folder is refused, so reaping never touches the trainers of a live runner.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from regretless.errors import UserError

TOKEN_ENV = "REGRETLESS_TRAINER_TOKEN"
PIDFILE = ".trainer.json"
RUN_LOCK = ".lock"
SWEEP_LOCK = ".sweep.lock"
PR_SET_PDEATHSIG = 1
KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the processes to vanish


def new_token() -> str:
    return secrets.token_hex(8)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def write_pidfile(rdir: Path, token: str, pid: int | None = None, pid_start: int | None = None) -> None:
    """RUNDIR/.trainer.json: who launched what, so a later runner on this machine can find it (`pid_start`:
    the trainer's start time, `start_time(pid)`, which lets `reap` kill that very process)."""
    from regretless.config import atomic_write_text

    atomic_write_text(rdir / PIDFILE, json.dumps({
        "token": token, "pid": pid, "pid_start": pid_start, "host": socket.gethostname(), "boot_id": _boot_id(),
        "launcher_pid": os.getpid(), "started": time.time()}) + "\n")


def read_pidfile(rdir: Path) -> dict[str, Any] | None:
    try:
        d = json.loads((rdir / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("token"), str) else None


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def pdeathsig_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that asks for SIGTERM when the parent thread dies (Linux); None elsewhere. The zygote
    (warm.py) calls it in each child it forks."""
    prctl = _prctl()  # resolved here, in the parent: the child only calls it
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(143)

    return preexec


def popen(argv: Sequence[str], env: dict[str, str], stdout: IO | int | None = None,
          stderr: IO | int | None = None, stdin: IO | int | None = subprocess.DEVNULL) -> subprocess.Popen:
    """Start a trainer (or the zygote): own session, stdin closed, parent-death signal on Linux."""
    # preexec_fn runs between fork and exec; ours only calls prctl and getppid (no locks, no allocation to speak
    # of), which is safe even when the parent has threads
    return subprocess.Popen(list(argv), stdout=stdout, stderr=stderr, stdin=stdin, env=env,
                            start_new_session=True, preexec_fn=pdeathsig_preexec(os.getpid()))  # noqa: PLW1509


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "(comm)" ([0] is field 3, the state); None: no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When `pid` started (field 22 of /proc/PID/stat, clock ticks after boot; zombies too): with the pid, it
    names one process however pids are reused. None when there is no such process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def running(pid: int, start: int | None) -> bool:
    """True while the process that started at `start` (start_time) still runs as `pid` (zombies are gone)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == start


def pids_with_token(tokens: Iterable[str]) -> dict[int, str]:
    """{pid: token} for every live process of this machine whose environment holds one of `tokens`
    (zombies have no environment left and count as gone). Empty where there is no /proc."""
    wanted = {f"{TOKEN_ENV}={t}".encode() for t in tokens}
    found: dict[int, str] = {}
    if not wanted or not os.path.isdir("/proc"):
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, a zombie, or not ours to read
            continue
        for var in env.split(b"\0"):
            if var in wanted:
                found[int(entry.name)] = var.split(b"=", 1)[1].decode()
                break
    return found


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(tokens: Iterable[str], grace_s: float, procs: Sequence[Any] = (),
         exact: dict[int, int] | None = None) -> list[int]:
    """SIGTERM to the process groups of `procs` (our own children: subprocess.Popen or warm.WarmProc), to every
    process carrying one of `tokens` and to the processes of `exact` ({pid: start_time}, while that process
    still runs); after `grace_s`, SIGKILL to whatever is left. Returns the pids that were found alive."""
    tokens, exact = set(tokens), exact or {}

    def found() -> set[int]:
        return set(pids_with_token(tokens)) | {pid for pid, start in exact.items() if running(pid, start)}

    seen = found()
    for p in procs:
        if p.poll() is None:
            seen.add(p.pid)
            _signal(p.pid, signal.SIGTERM, group=True)
    for pid in found():
        _signal(pid, signal.SIGTERM)

    def alive() -> set[int]:
        left = found()
        seen.update(left)
        return left | {p.pid for p in procs if p.poll() is None}

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive()
    for pid in left:
        _signal(pid, signal.SIGKILL)
    for p in procs:
        _signal(p.pid, signal.SIGKILL, group=True)
    deadline = time.monotonic() + KILL_WAIT_S
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = alive()
    for p in procs:
        p.wait()
    return sorted(seen)


def reap(rdir: Path, grace_s: float) -> list[int]:
    """Kill what a previous launch into `rdir` left running on this machine: every process with its token, and
    its trainer by pid and start time when the pid file has them (a warm trainer's token is its zygote's); the
    pid file goes once nothing of it is left. Returns the pids found. A launch on another machine is left alone."""
    info = read_pidfile(rdir)
    if info is None:
        return []
    if info.get("host") != socket.gethostname() or info.get("boot_id") != _boot_id():
        return []
    pid, start = info.get("pid"), info.get("pid_start")
    exact = {pid: start} if isinstance(pid, int) and isinstance(start, int) else {}
    found = stop([info["token"]], grace_s, exact=exact)
    if not pids_with_token([info["token"]]) and not any(running(p, s) for p, s in exact.items()):
        (rdir / PIDFILE).unlink(missing_ok=True)
    return found


def folder_locked(rdir: Path) -> bool:
    """True when some live process holds the run folder's lock (RUNDIR/.lock, taken by the trainer)."""
    try:
        f = open(rdir / RUN_LOCK, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return True
        raise
    finally:
        f.close()  # closing drops our probe lock
    return False


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """`with sweep_lock(DIR):` holds DIR/.sweep.lock (an exclusive flock); a second holder gets a UserError."""
    with open(out / SWEEP_LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(f"{out}: another sweep is running on this folder ({holder}); wait for it to finish "
                            "or stop it, or sweep into another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield  # the lock goes with the file's closing
