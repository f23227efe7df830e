"""Warm launches (sweep/warm.py) with the real trainer on the tiny model of conftest.py: the same run files as
cold launches, the slot's thread count inside a forked trainer, a failing run recorded with its stderr, a zygote
that cannot start (cold launches, one WARNING line), and a runner killed by SIGKILL taking its trainers and the
zygote along (a rerun resumes). The stand-in trainer of test_sweep_fake_trainer.py is a script of its own, which
the zygote does not fork (warm launches are for the default launcher only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_sweep_lifetime import alive, folders, start_runner, steps_logged, wait_for
from test_train_sft import chat_jsonl

from regretless.sweep import Ledger, run_sweep, warm
from regretless.sweep.launch import DEFAULT_LAUNCHER
from regretless.sweep.procs import TOKEN_ENV, pids_with_token, read_pidfile, reap, start_time, write_pidfile

pytestmark = pytest.mark.skipif(not warm.usable(DEFAULT_LAUNCHER, 1), reason="warm launches need Linux and fork")

# measurements, not results: times, and the CPU peak RSS (a forked trainer skips the peak of the imports)
MEASURED = {"step_s", "tokens_per_s", "wall_s", "peak_mem_mb"}


@pytest.fixture
def base(tiny_llama_dir, tmp_path) -> dict:
    return {"model": str(tiny_llama_dir), "data": str(chat_jsonl(tmp_path / "chat.jsonl", n=40)), "steps": 4,
            "batch_size": 4, "seq_len": 64, "eval_size": 8, "eval_every": 2, "save_every": 2, "device": "cpu"}


def forked(out: Path) -> str:
    """What the zygote of the sweep folder launched (its log), '' when no zygote ran there."""
    path = out / "zygote.log"
    return path.read_text() if path.exists() else ""


def results(row: dict, out: Path) -> dict:
    return {k: str(v).replace(str(out), "OUT") for k, v in row.items() if k not in MEASURED}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_warm_runs_write_what_cold_runs_write(base, tmp_path, monkeypatch):
    """Cold (REGRETLESS_WARM=0) and warm sweeps of one spec, 2 threads a run: the same metrics and summaries but
    for the measured times and memory, and the trainers report the slot's thread count."""
    spec = {"command": "sft", "base": base, "axes": {"method": ["full", "lora"], "lora.rank": [4]}}
    res = {}
    for mode in ("cold", "warm"):
        monkeypatch.setenv("REGRETLESS_WARM", "0" if mode == "cold" else "1")
        res[mode] = run_sweep(spec, tmp_path / mode, workers=2, threads_per_run=2, quiet=True, gpus=[])
        assert res[mode].counts == {"done": 2}, [r["error"] for r in res[mode].runs]
    assert forked(tmp_path / "cold") == ""
    for row in res["warm"].runs:
        assert row["path"] in forked(tmp_path / "warm")  # forked by the zygote, not started cold
    for cold in res["cold"].runs:
        files = {}
        for mode in ("cold", "warm"):
            folder = tmp_path / mode / cold["path"]
            assert "trainable parameters on cpu (2 CPU threads)" in (folder / "stderr.log").read_text()
            metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((folder / "summary.json").read_text())
            files[mode] = ([results(m, folder) for m in metrics], results(summary, folder))
        assert files["warm"] == files["cold"]
        assert len(files["warm"][0]) >= 4


def test_warm_trainer_takes_its_own_thread_count(base, tmp_path):
    """A zygote that imported torch with 1 thread forks a run whose environment asks for 2: the trainer reports
    2 (OMP_NUM_THREADS alone reaches torch only at import; the child calls torch.set_num_threads)."""
    rdir = tmp_path / "run"  # made by the trainer (the logs lie outside: --out is a new folder)
    argv = [*DEFAULT_LAUNCHER[:3], "sft", "--out", str(rdir), "--rank", "4", *(f"{k}={v}" for k, v in base.items())]
    zygote = warm.Zygote.start(tmp_path / "zygote.log", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 5.0)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", TOKEN_ENV: zygote.token}
        proc = zygote.launch(argv, env, tmp_path / "stdout.log", tmp_path / "stderr.log")
        assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.log").read_text()
    finally:
        zygote.close(5.0)
    assert "trainable parameters on cpu (2 CPU threads)" in (tmp_path / "stderr.log").read_text()
    assert json.loads((rdir / "summary.json").read_text())["status"] == "done"
    assert zygote.proc.returncode is not None and pids_with_token([zygote.token]) == {}


def test_failing_warm_run_is_recorded_with_its_stderr(base, tmp_path):
    out = tmp_path / "sweep"
    missing = tmp_path / "no-such-model"
    res = run_sweep({"command": "sft", "base": {**base, "model": str(missing)}, "axes": {"seed": [0]}}, out,
                    workers=1, quiet=True, gpus=[])
    (row,) = res.runs
    assert row["status"] == "failed" and row["path"] in forked(out)
    assert row["error"].startswith("exit code 2\n")
    assert f"regretless sft: error: field 'model': {str(missing)!r} is not a folder" in row["error"]
    assert not (out / row["path"] / ".trainer.json").exists()


def test_zygote_that_cannot_start_leaves_cold_launches_and_one_warning(base, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(warm, "ZYGOTE_ARGV", (warm.sys.executable, "-c", "import sys; sys.exit(7)"))
    out = tmp_path / "sweep"
    res = run_sweep({"command": "sft", "base": {**base, "model": str(tmp_path / "none")}, "axes": {"seed": [0, 1]}},
                    out, workers=2, quiet=True, gpus=[])
    assert res.counts == {"failed": 2} and all("is not a folder" in r["error"] for r in res.runs)  # ran, cold
    warnings = [line for line in capfd.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "the zygote exited (status 7" in warnings[0] and "start cold" in warnings[0]


def test_sigkilled_warm_runner_leaves_no_trainer_nor_zygote_and_rerun_resumes(base, tmp_path):
    spec = {"command": "sft", "base": {**base, "steps": 150, "eval_every": 1000, "save_every": 10},
            "axes": {"seed": [0, 1], "lora.rank": [4]}}
    out = tmp_path / "sweep"
    dirs = folders(out, spec)
    runner = start_runner(spec, out, list(DEFAULT_LAUNCHER))
    wait_for(lambda: runner.poll() is not None or all(len(steps_logged(d)) >= 12 for d in dirs), 600,
             "both trainers to log 12 steps")
    assert runner.poll() is None, runner.communicate()
    infos = [read_pidfile(d) for d in dirs]
    (token,) = {i["token"] for i in infos}  # both carry the zygote's token
    trainers = [i["pid"] for i in infos]
    (zygote,) = {parent_of(pid) for pid in trainers}  # forked by one zygote, the runner's child
    assert parent_of(zygote) == runner.pid and set(pids_with_token([token])) == {zygote, *trainers}
    assert all(os.getpgid(pid) == pid for pid in trainers)  # own sessions: stop() signals their groups
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    wait_for(lambda: not any(alive(p) for p in (zygote, *trainers)), 10, "the zygote and its trainers to die")
    assert pids_with_token([token]) == {}

    res = run_sweep(spec, out, workers=2, quiet=True, gpus=[])
    assert res.counts == {"done": 2}, [r["error"] for r in res.runs]
    for d in dirs:
        assert steps_logged(d) == list(range(151))  # step 0: the first eval
        assert "resumed from step" in (d / "stderr.log").read_text()
        assert not (d / ".trainer.json").exists()


def test_reap_kills_the_recorded_trainer_by_pid_and_start_time_only(tmp_path):
    """A warm trainer's pid file names it by pid and start time: reap kills that process, and leaves alone one
    that has the pid but another start time (the pid reused)."""
    rdir = tmp_path / "run"
    rdir.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_pidfile(rdir, "a-token-nothing-carries", sleeper.pid, start_time(sleeper.pid) - 1)
        assert reap(rdir, 1.0) == [] and sleeper.poll() is None and not (rdir / ".trainer.json").exists()
        write_pidfile(rdir, "a-token-nothing-carries", sleeper.pid, start_time(sleeper.pid))
        assert reap(rdir, 1.0) == [sleeper.pid]
        assert sleeper.wait(timeout=5) == -signal.SIGTERM and not (rdir / ".trainer.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_stops_warm_trainers_then_the_zygote(base, tmp_path):
    spec = {"command": "sft", "base": {**base, "steps": 150, "eval_every": 1000, "save_every": 10},
            "axes": {"seed": [0, 1], "lora.rank": [4]}}
    out = tmp_path / "sweep"
    dirs = folders(out, spec)
    runner = start_runner(spec, out, list(DEFAULT_LAUNCHER), grace=1.0)
    wait_for(lambda: runner.poll() is not None or all(len(steps_logged(d)) >= 5 for d in dirs), 600,
             "both trainers to log 5 steps")
    assert runner.poll() is None, runner.communicate()
    (token,) = {read_pidfile(d)["token"] for d in dirs}
    family = set(pids_with_token([token]))  # the zygote and the two trainers
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == 128 + signal.SIGTERM, runner.stderr.read()
    assert len(family) == 3 and not any(alive(p) for p in family)
    rows = Ledger(out / "ledger.sqlite").runs()
    assert {r["status"] for r in rows} == {"queued"} and all("interrupted" in r["error"] for r in rows)
    assert not any((d / ".trainer.json").exists() for d in dirs)  # nothing left to reap


def test_a_callers_zygote_serves_several_sweeps_and_stays(base, tmp_path):
    """`reproduce` keeps one zygote for all its rounds: two sweeps given the caller's zygote fork their runs from
    it (their folders start no zygote of their own) and leave it serving; the caller closes it."""
    from regretless.sweep.launch import THREAD_VARS

    zygote = warm.Zygote.start(tmp_path / "zygote.log", {k: "1" for k in THREAD_VARS}, 5.0)
    try:
        for name, rank in (("a", 2), ("b", 4)):
            spec = {"command": "sft", "base": base, "axes": {"method": ["lora"], "lora.rank": [rank]}}
            res = run_sweep(spec, tmp_path / name, workers=1, threads_per_run=1, quiet=True, gpus=[], zygote=zygote)
            assert res.counts == {"done": 1}, [r["error"] for r in res.runs]
            assert forked(tmp_path / name) == ""  # no zygote of its own
            assert zygote.serving()
        log = forked(tmp_path)
        assert all(row["path"] in log for name in "ab" for row in Ledger(tmp_path / name / "ledger.sqlite").runs())
    finally:
        zygote.close(5.0)
    assert not zygote.serving() and zygote.proc.poll() is not None
