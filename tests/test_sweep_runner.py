"""The sweep runner with real subprocesses (a stand-in trainer script): skip finished runs, resume interrupted
ones, record failures without stopping, per-worker threads, and the Ray backend on a local Ray instance."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from test_sweep_fake_trainer import attempts, write_fake_trainer

from regretless.sweep import Ledger, run_sweep
from regretless.sweep.launch import slot_envs

SPEC = {"command": "sft", "base": {"steps": 8},
        "axes": {"model": ["ok", "fail", "diverge", "crash_once"], "method": ["full", "lora"],
                 "lora.rank": [1, 4]}}


def test_failures_recorded_then_resume_and_skip(tmp_path):
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    res = run_sweep(SPEC, out, workers=3, launcher=launcher, quiet=True, gpus=[])
    assert res.counts == {"done": 3, "failed": 6, "diverged": 3}
    rows = {r["name"]: r for r in res.runs}
    fail = rows["lora-fail-r4"]
    assert fail["status"] == "failed" and "exit code 1" in fail["error"] and "boom" in fail["error"]
    assert rows["full-crash_once"]["status"] == "failed" and "killed half-way" in rows["full-crash_once"]["error"]
    ok = rows["lora-ok-r1"]
    assert ok["final_loss"] is not None and ok["trainable_params"] == 1000 and ok["steps"] == 8
    run_folder = out / ok["path"]
    cfg = yaml.safe_load((run_folder / "config.yaml").read_text())
    assert cfg["command"] == "sft" and cfg["lora"]["rank"] == 1 and cfg["out"] == str(run_folder)

    res2 = run_sweep(SPEC, out, workers=3, launcher=launcher, quiet=True, gpus=[])
    assert res2.counts == {"done": 6, "failed": 3, "diverged": 3}  # crash_once resumed and finished
    assert len(attempts(run_folder)) == 1  # finished: skipped
    assert len(attempts(out / rows["full-diverge"]["path"])) == 1  # diverged counts as finished
    crashed = out / rows["full-crash_once"]["path"]
    assert [a["start"] for a in attempts(crashed)] == ["0", "3"]  # resumed, not restarted
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert Ledger(out / "ledger.sqlite").counts()["failed"] == 3


def test_threads_per_worker_and_slots(tmp_path):
    launcher = write_fake_trainer(tmp_path)
    res = run_sweep({"command": "sft", "base": {"steps": 2}, "axes": {"seed": [0, 1]}}, tmp_path / "s",
                    workers=2, threads_per_run=3, launcher=launcher, quiet=True, gpus=[])
    assert res.counts == {"done": 2}
    for r in res.runs:
        assert attempts(tmp_path / "s" / r["path"])[0]["threads"] == "3"
    envs = slot_envs(None, None, gpus=["0", "1", "2"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2"]
    cpu = slot_envs(None, 1, gpus=[])
    assert len(cpu) == max(1, len(os.sched_getaffinity(0))) and cpu[0]["OMP_NUM_THREADS"] == "1"


def test_cli_sweep_reports_failures(tmp_path, capsys, monkeypatch):
    from regretless.cli import main
    from regretless.sweep import runner

    launcher = write_fake_trainer(tmp_path)
    monkeypatch.setattr(runner, "DEFAULT_LAUNCHER", tuple(launcher))
    monkeypatch.setattr(runner.run_sweep, "__kwdefaults__",
                        {**runner.run_sweep.__kwdefaults__, "launcher": tuple(launcher)})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"command": "sft", "base": {"steps": 2}, "axes": {"model": ["ok", "fail"]}}))
    rc = main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--quiet", "--workers", "2"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "done 1, failed 1" in cap.out and "failed: fail [" in cap.err and "boom" in cap.err


@pytest.mark.slow
def test_ray_backend_local_instance(tmp_path):
    """One local Ray instance (4 CPUs, 4 GPUs that are only resource names): failures recorded; each task holds
    one GPU, or `gpus_per_run` of them, named in CUDA_VISIBLE_DEVICES by Ray, and a 2-GPU run starts torchrun."""
    ray = pytest.importorskip("ray")
    launcher = write_fake_trainer(tmp_path)
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        res = run_sweep({"command": "sft", "base": {"steps": 3},
                         "axes": {"model": ["ok", "fail"], "seed": [0, 1]}}, tmp_path / "r", backend="ray",
                        launcher=launcher, quiet=True)
        res2 = run_sweep({"command": "sft", "base": {"steps": 3}, "axes": {"seed": [0]}}, tmp_path / "r2",
                         backend="ray", gpus_per_run=2, launcher=launcher, quiet=True)
    finally:
        ray.shutdown()
    assert res.counts == {"done": 2, "failed": 2}
    failed = [r for r in res.runs if r["status"] == "failed"]
    assert all("boom" in r["error"] for r in failed)
    for r in res.runs:
        (start,) = attempts(tmp_path / "r" / r["path"])
        assert start["gpus"] in {"0", "1", "2", "3"}
    assert res2.counts == {"done": 1}, [r["error"] for r in res2.runs]
    for r in res2.runs:
        folder = tmp_path / "r2" / r["path"]
        procs = [dict(kv.split("=") for kv in line.split()) for line in (folder / "procs.log").read_text().splitlines()]
        assert sorted(p["rank"] for p in procs) == ["0", "1"] and {p["world"] for p in procs} == {"2"}
        (gpus,) = {p["gpus"] for p in procs}
        assert len(set(gpus.split(","))) == 2 and set(gpus.split(",")) <= {"0", "1", "2", "3"}


def test_cli_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    from regretless.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"command": "sft", "base": {"steps": 2}, "axes": {"seed": [0]}}))
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for extra in ([], ["--dry-run"]):
        assert main(["sweep", str(spec), "--out", str(target), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        want = f"regretless sweep: error: --out {target}: is a file; expected a sweep folder (new or from an earlier sweep)"
        assert err == [want]
    assert target.read_text() == "keep me"
