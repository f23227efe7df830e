"""Trainers live and die with their runner, with real processes: a runner killed by SIGKILL, SIGTERM or SIGINT
leaves no trainer alive; a rerun reaps what survived, resumes every run with one writer per run folder, and
fixes the stale `running` rows; a folder locked by a live process is not launched into; one runner per sweep
folder. The trainer is the stand-in script of test_sweep_fake_trainer.py (the runner is under test)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep_fake_trainer import attempts, write_fake_trainer

from regretless.errors import UserError
from regretless.sweep import Ledger, expand, parse_spec, run_sweep
from regretless.sweep.procs import pids_with_token, read_pidfile

RUNNER = """
import json, sys
from regretless.sweep import run_sweep
spec, out, launcher, grace = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
res = run_sweep(spec, out, workers=2, launcher=launcher, quiet=True, gpus=[], stop_grace_s=grace)
print(json.dumps(res.counts))
"""


def _default_signals() -> None:
    """The runner keeps SIGINT/SIGTERM ignored when its parent ignored them (nohup, a shell's background job);
    these tests send them, so the runner starts with the default dispositions whatever launched pytest."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_runner(spec: dict, out: Path, launcher: list[str], grace: float = 10.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(spec), str(out), json.dumps(launcher),
                             str(grace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)  # noqa: PLW1509 (only resets two dispositions)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def folders(out: Path, spec: dict) -> list[Path]:
    return [out / "runs" / r.id for r in expand(parse_spec(spec))]


def steps_logged(folder: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


def trainer_pids(dirs: list[Path]) -> list[int]:
    return [int(a["pid"]) for d in dirs for a in attempts(d)]


def started(dirs: list[Path], steps: int = 5):
    return lambda: all(len(steps_logged(d)) >= steps for d in dirs)


SLOW = {"command": "sft", "base": {"steps": 400}, "axes": {"model": ["slow", "stubborn"]}}  # 20 s a first attempt


def test_sigkilled_runner_leaves_no_trainer_and_rerun_resumes_with_one_writer(tmp_path):
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    slow, stubborn = folders(out, SLOW)
    runner = start_runner(SLOW, out, launcher)
    wait_for(started([slow, stubborn]), 30, "both trainers to log 5 steps")
    (slow_pid,), (stubborn_pid,) = trainer_pids([slow]), trainer_pids([stubborn])
    runner.kill()
    runner.wait()
    killed_at = time.time()
    wait_for(lambda: not alive(slow_pid), 5, "the parent-death signal to stop the trainer")
    # the stubborn trainer ignores SIGTERM (the parent-death signal): it is still writing, and a rerun must reap it
    time.sleep(0.3)
    assert alive(stubborn_pid)
    assert pids_with_token([read_pidfile(stubborn)["token"]]) == {stubborn_pid: read_pidfile(stubborn)["token"]}
    ledger = Ledger(out / "ledger.sqlite")
    assert {r["status"] for r in ledger.runs()} == {"running"}  # stale rows left by the killed runner

    t0 = time.monotonic()
    res = run_sweep(SLOW, out, workers=2, launcher=launcher, quiet=True, gpus=[], stop_grace_s=0.5)
    assert time.monotonic() - t0 < 15
    assert res.counts == {"done": 2}
    assert not alive(stubborn_pid)
    for folder, old_pid in ((slow, slow_pid), (stubborn, stubborn_pid)):
        tries = attempts(folder)
        assert [t.get("refused") for t in tries] == [None, None]  # never a second writer refused by the lock
        assert int(tries[0]["pid"]) == old_pid and float(tries[1]["t0"]) > killed_at
        assert int(tries[1]["start"]) >= 5  # resumed where the killed run stopped, not restarted
        assert steps_logged(folder) == list(range(1, 401))
        assert not (folder / ".trainer.json").exists()
    assert all(r["status"] == "done" and r["error"] is None for r in ledger.runs())


@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)])
def test_sigterm_or_sigint_stops_the_trainers(tmp_path, sig, rc):
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    spec = SLOW
    dirs = folders(out, spec)
    runner = start_runner(spec, out, launcher, grace=1.0)
    wait_for(started(dirs), 30, "both trainers to log 5 steps")
    pids = trainer_pids(dirs)
    t0 = time.monotonic()
    runner.send_signal(sig)
    assert runner.wait(timeout=20) == rc, runner.stderr.read()
    assert time.monotonic() - t0 < 8  # the stubborn one gets 1 s of grace, then SIGKILL
    assert not [p for p in pids if alive(p)]
    rows = Ledger(out / "ledger.sqlite").runs()
    assert {r["status"] for r in rows} == {"queued"} and all("interrupted" in r["error"] for r in rows)
    assert all(len(steps_logged(d)) < 400 for d in dirs)


def test_stale_running_rows_are_reconciled(tmp_path):
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    done_spec = {"command": "sft", "base": {"steps": 3}, "axes": {"seed": [0, 1]}}
    assert run_sweep(done_spec, out, launcher=launcher, quiet=True, gpus=[]).counts == {"done": 2}
    ledger = Ledger(out / "ledger.sqlite")
    finished = ledger.runs()[0]
    ledger.mark_running(finished["id"])  # what a runner killed between its trainer's exit and the ledger write leaves
    slow_spec = {"command": "sft", "base": {"steps": 400, "model": "slow"}, "axes": {"seed": [0]}}
    (slow,) = folders(out, slow_spec)
    runner = start_runner(slow_spec, out, launcher)
    wait_for(started([slow]), 30, "the trainer to log 5 steps")
    runner.kill()
    runner.wait()
    assert ledger.get(slow.name)["status"] == "running"
    # a new spec: neither stale row is part of it, so only the reconciliation (not a relaunch) can fix them
    new_spec = {"command": "sft", "base": {"steps": 3}, "axes": {"seed": [5]}}
    assert run_sweep(new_spec, out, launcher=launcher, quiet=True, gpus=[]).counts == {"done": 1}
    row = ledger.get(finished["id"])
    assert row["status"] == "done" and row["final_loss"] is not None and len(attempts(out / row["path"])) == 1
    row = ledger.get(slow.name)
    assert row["status"] == "queued" and row["error"].startswith("interrupted: its runner stopped")
    assert not [p for p in trainer_pids([slow]) if alive(p)]
    assert ledger.counts()["running"] == 0


def test_locked_run_folder_is_not_launched(tmp_path):
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    spec = {"command": "sft", "base": {"steps": 3}, "axes": {"seed": [0, 1]}}
    locked, free = folders(out, spec)
    locked.mkdir(parents=True)
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('4242'); f.flush(); print('ok', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(locked / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        res = run_sweep(spec, out, launcher=launcher, quiet=True, gpus=[])
        assert res.counts == {"done": 1, "queued": 1} and not res.ok
        row = next(r for r in res.runs if r["status"] == "queued")
        assert out / row["path"] == locked and "locked by another live process (pid 4242" in row["error"]
        assert attempts(locked) == [] and len(attempts(free)) == 1
    finally:
        holder.kill()
        holder.wait()
    assert run_sweep(spec, out, launcher=launcher, quiet=True, gpus=[]).counts == {"done": 2}


def test_one_runner_per_sweep_folder(tmp_path):
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    spec = {"command": "sft", "base": {"steps": 200, "model": "slow"}, "axes": {"seed": [0]}}
    (folder,) = folders(out, spec)
    runner = start_runner(spec, out, launcher, grace=1.0)
    try:
        wait_for(started([folder], 2), 30, "the first runner's trainer")
        with pytest.raises(UserError, match=f"{out}: another sweep is running on this folder \\(pid {runner.pid} "):
            run_sweep(spec, out, launcher=launcher, quiet=True, gpus=[])
        assert len(attempts(folder)) == 1  # the second runner neither reaped nor relaunched anything
    finally:
        runner.terminate()
        runner.wait(timeout=20)
    assert not [p for p in trainer_pids([folder]) if alive(p)]
