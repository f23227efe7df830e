"""Warm launches: a zygote process imports torch, transformers and the trainer once, then forks each run.

A cold run is `python -m regretless.cli sft|rl ...`, which spends seconds importing before it trains. With the
default launcher, one process per run and Linux (`usable`), the local backend starts one zygote per sweep
(`Zygote.start`, through procs.popen: own session, parent-death signal, a token of its own) and asks it for each
run. Like `python -m`, the zygote runs the launcher's module by name (regretless.cli): it calls its `preload()`,
which imports the trainer and its libraries without computing anything, checks that it still has one thread
(a fork copies only the calling one) and no CUDA, then forks a child per request, which:
  setsid() (its own session: pgid == pid) -> PR_SET_PDEATHSIG=SIGTERM (its parent is the zygote; it exits if
  the zygote is gone already) -> the Python signal dispositions the zygote started with (a cold trainer's) ->
  /dev/null on fd 0, stdout.log and stderr.log on fds 1 and 2, sys.stdin/stdout/stderr rebound to them
  (line-buffered) -> the cwd and the whole environment a cold launch would get -> torch.set_num_threads(
  OMP_NUM_THREADS) if the thread counts differ from those the zygote imported torch with -> `main(argv)` ->
  os._exit with its exit code (SystemExit's code; 1 after printing the traceback of an uncaught exception).
The zygote waits for its children, kills what a finished child left in its process group, and reports
(pid, exit code) to the runner: `WarmProc` is the Popen-like handle the local backend and procs.stop use.

The zygote is started with the slots' OMP/MKL thread counts (every slot has the same), which torch's OpenMP and
MKL read when loaded, so a forked trainer sizes its pools as a cold one does. Where a forked run is not a cold
one: it carries the zygote's token (/proc/PID/environ shows the environment of the zygote's exec, so a per-run
token set after fork would be invisible) and shows the zygote's command line in `ps`; numpy's OpenBLAS keeps
the one thread the zygote was started with (it starts its threads at import); environment that libraries read
at import is the runner's at the zygote's start; the CPU peak RSS it reports (`peak_mem_mb`) is lower, as it
did not go through the imports. `REGRETLESS_WARM=0` turns warm launches off; a zygote that fails to start or
dies leaves the rest of the sweep to cold launches, with one WARNING line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from regretless.sweep import procs
from regretless.sweep.launch import DEFAULT_LAUNCHER

CLI_PREFIX = DEFAULT_LAUNCHER[:3]  # python -m regretless.cli
# the zygote runs the launcher's module by name, as `python -m` does: MODULE.preload() once, MODULE.main(ARGS) a run
ZYGOTE_ARGV = (sys.executable, "-c", "from regretless.sweep import warm; warm.serve()", CLI_PREFIX[2])
TORCH_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch's OpenMP and MKL when loaded
READY_TIMEOUT_S = 600.0  # the imports (4 s on a quiet 2-core machine; minutes when starved of CPU)
REPLY_TIMEOUT_S = 120.0
POLL_S = 0.1


class ZygoteError(RuntimeError):
    """The zygote did not start, or stopped answering."""


def usable(launcher: Sequence[str], gpus_per_run: int) -> bool:
    """Warm launches are exactly a cold launch's equivalent only for the default launcher, one process per run,
    on Linux (fork, the parent-death signal); REGRETLESS_WARM=0 turns them off."""
    return (tuple(launcher) == DEFAULT_LAUNCHER and gpus_per_run == 1 and os.environ.get("REGRETLESS_WARM") != "0"
            and hasattr(os, "fork") and procs.pdeathsig_preexec(os.getpid()) is not None)


# -- the runner's side ---------------------------------------------------------------------------------------
class Zygote:
    """The runner's end of a zygote: `launch` a run, `close` at the end of the sweep (it and what it left die)."""

    def __init__(self, proc: subprocess.Popen, token: str, log: IO):
        self.proc, self.token, self.log = proc, token, log
        self.exits: dict[int, int] = {}  # pid -> exit code, reported and not yet collected by a WarmProc
        self.replies: list[dict[str, Any]] = []
        self.dead = False  # its pipe reached end of file
        self._buf = b""

    @classmethod
    def start(cls, log_path: Path, threads: dict[str, str], grace_s: float) -> Zygote:
        """Start a zygote (its stderr goes to `log_path`) and wait for its imports; ZygoteError when it cannot
        serve warm launches. `threads`: the slots' thread variables, which torch reads at import."""
        token = procs.new_token()
        # numpy's OpenBLAS starts its threads at import, torch's pools at first use: OpenBLAS gets one
        env = {**os.environ, **threads, "OPENBLAS_NUM_THREADS": "1", procs.TOKEN_ENV: token}
        log = open(log_path, "ab")  # noqa: SIM115 - closed by close()
        z = cls(procs.popen(ZYGOTE_ARGV, env, subprocess.PIPE, log, subprocess.PIPE), token, log)
        try:
            ready = z._reply(READY_TIMEOUT_S)
            if not ready.get("ready"):
                raise ZygoteError(ready.get("why") or "not ready")
        except BaseException:
            z.close(grace_s)
            raise
        return z

    def launch(self, argv: Sequence[str], env: dict[str, str], stdout: Path, stderr: Path) -> WarmProc:
        """Fork `python -m regretless.cli ARGS` as a child of the zygote, with exactly `env` and the two logs."""
        if tuple(argv[:len(CLI_PREFIX)]) != CLI_PREFIX:
            raise ValueError(f"not a regretless.cli command line: {argv}")
        req = {"argv": list(argv[len(CLI_PREFIX):]), "env": env, "cwd": os.getcwd(), "stdout": str(stdout),
               "stderr": str(stderr)}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:  # it died: a broken pipe
            raise ZygoteError(f"the zygote is gone ({e})") from None
        reply = self._reply(REPLY_TIMEOUT_S)
        if "pid" not in reply:
            raise ZygoteError(reply.get("error") or f"unexpected reply {reply}")
        return WarmProc(self, reply["pid"], reply["start"])

    def serving(self) -> bool:
        self.read(0)
        return not self.dead and self.proc.poll() is None

    def read(self, timeout: float) -> None:
        """Take in what the zygote has written, waiting up to `timeout` for something."""
        if self.dead:
            time.sleep(timeout)
            return
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return
        chunk = os.read(fd, 1 << 16)
        self.dead = not chunk
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "exit" in msg:
                self.exits[msg["exit"]] = msg["code"]
            else:
                self.replies.append(msg)

    def _reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.replies:
            if self.dead:
                raise ZygoteError(f"the zygote exited (status {self.proc.wait()}; see {self.log.name})")
            if time.monotonic() > deadline:
                raise ZygoteError(f"no answer from the zygote in {timeout:.0f} s")
            self.read(POLL_S)
        return self.replies.pop(0)

    def close(self, grace_s: float) -> None:
        """End of input for the zygote, then procs.stop on its token: it and anything left carrying it die."""
        if self.proc.stdin.closed:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        procs.stop([self.token], grace_s, [self.proc])
        deadline = time.monotonic() + procs.KILL_WAIT_S
        while not self.dead and time.monotonic() < deadline:  # the exits it reported before it went
            self.read(POLL_S)
        self.dead = True
        self.proc.stdout.close()
        self.log.close()


class WarmProc:
    """A trainer forked by the zygote: the part of subprocess.Popen that run_local and procs.stop use. Its exit
    code comes from the zygote (negative for a signal, like Popen's)."""

    def __init__(self, zygote: Zygote, pid: int, start: int | None):
        self.zygote, self.pid, self.start = zygote, pid, start
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.read(0)
            if self.pid in self.zygote.exits:
                self.returncode = self.zygote.exits.pop(self.pid)
            elif self.zygote.dead and not procs.running(self.pid, self.start):
                # the zygote died before reporting it; its death sent the trainer SIGTERM (parent-death signal)
                self.returncode = -signal.SIGTERM
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"warm trainer {self.pid}", timeout)
            self.zygote.read(POLL_S)
        return self.returncode


# -- the zygote's side ---------------------------------------------------------------------------------------
def serve() -> None:
    """The zygote's main loop: requests on stdin, one JSON line each; replies and exits on stdout."""
    dispositions = {s: signal.getsignal(s) for s in signal.valid_signals()}  # a cold trainer's, at start
    imported_with = {k: os.environ.get(k) for k in TORCH_THREAD_VARS}
    rfd, wfd = os.dup(0), os.dup(1)  # the protocol leaves fds 0 and 1: what the imports print goes to the log
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)

    def say(msg: dict[str, Any]) -> None:
        os.write(wfd, (json.dumps(msg) + "\n").encode())

    module, why = _warm_up(sys.argv[1])
    say({"ready": why is None, "why": why})
    if why is not None:
        return
    child_setup = procs.pdeathsig_preexec(os.getpid())
    children: set[int] = set()
    buf = b""
    while True:
        if select.select([rfd], [], [], POLL_S if children else None)[0]:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                return  # the runner is done (or gone): children still running get SIGTERM as we exit
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                req = json.loads(line)
                if (threads := _threads()) != 1:  # nothing should have started one since the imports
                    say({"error": f"the zygote has {threads} threads; a fork copies one"})
                    continue
                try:
                    pid = _fork(req, module, dispositions, imported_with, child_setup, (rfd, wfd))
                except OSError as e:
                    say({"error": f"fork failed: {e}"})
                    continue
                children.add(pid)
                say({"pid": pid, "start": procs.start_time(pid)})
                print(f"[regretless zygote] {pid}: {' '.join(req['argv'])}", file=sys.stderr, flush=True)
        while children:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # left a zombie: pid not reused
            if info is None:
                break
            with contextlib.suppress(ProcessLookupError):  # what it left in its process group, as after a cold run
                os.killpg(info.si_pid, signal.SIGKILL)
            _, status = os.waitpid(info.si_pid, 0)
            children.discard(info.si_pid)
            say({"exit": info.si_pid, "code": os.waitstatus_to_exitcode(status)})


def _warm_up(name: str) -> tuple[Any, str | None]:
    """Import module `name` and call its preload(); (the module, None) when the zygote may fork, else why not."""
    try:
        module = importlib.import_module(name)
        module.preload()
        import torch
    except Exception as e:  # noqa: BLE001 - reported to the runner, which launches cold
        traceback.print_exc()
        return None, f"preload failed: {type(e).__name__}: {e}"
    if (threads := _threads()) != 1:
        return module, f"{threads} threads after the imports (a fork copies one)"
    if torch.cuda.is_initialized():
        return module, "CUDA was initialised by the imports"
    return module, None


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fork(req: dict[str, Any], module: Any, dispositions: dict[int, Any], imported_with: dict[str, str | None],
          child_setup: Callable[[], None], close: Sequence[int]) -> int:
    """Fork the child of `req`; returns once it is in its own session with its parent-death signal set, so
    that the runner can signal its process group as soon as it has the pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        os.close(r)
        _child(req, module, dispositions, imported_with, child_setup, (*close, w))
    os.close(w)
    os.read(r, 1)  # end of file: the child closed its end, or died
    os.close(r)
    return pid


def _child(req: dict[str, Any], module: Any, dispositions: dict[int, Any], imported_with: dict[str, str | None],
           child_setup: Callable[[], None], close: Sequence[int]) -> NoReturn:
    code = 1
    try:
        os.setsid()
        child_setup()  # PR_SET_PDEATHSIG; exits when the zygote is gone already
        for fd in close:
            os.close(fd)
        for sig, handler in dispositions.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, handler)
        _redirect(req["stdout"], req["stderr"])
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        asked = os.environ.get("OMP_NUM_THREADS", "")
        if any(os.environ.get(k) != v for k, v in imported_with.items()) and asked.isdigit():
            import torch  # imported with other thread counts, which its pools took then

            torch.set_num_threads(max(1, int(asked)))
        code = _main(module, req["argv"])
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a cold trainer
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _redirect(stdout: str, stderr: str) -> None:
    """/dev/null on fd 0, the logs (appended to) on fds 1 and 2, and sys.std* rebound to them, line-buffered."""
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, append), (2, stderr, append)):
        f = os.open(path, flags, 0o666)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115


def _main(module: Any, argv: list[str]) -> int:
    """`module.main(argv)` in this process: the exit code `python -m MODULE ARGV` would have."""
    sys.argv = [module.__file__, *argv]
    try:
        return module.main(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
