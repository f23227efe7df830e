"""`gpus_per_run` on CPU: slots of disjoint GPU groups, the torchrun command line, a real torchrun launch of
the stand-in trainer (2 processes, CUDA_VISIBLE_DEVICES naming the slot's GPUs), Ray placement arithmetic, and
the errors. Whether the trainer itself shards across the GPUs is tested with the trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_sweep_fake_trainer import attempts, write_fake_trainer

from regretless.cli import main
from regretless.errors import UserError
from regretless.sweep import expand, parse_spec, run_sweep
from regretless.sweep.launch import DEFAULT_LAUNCHER, cpu_count, launch_argv, slot_envs, torchrun_argv
from regretless.sweep.ray_backend import task_gpus

EIGHT = [str(i) for i in range(8)]


def test_slots_are_disjoint_gpu_groups():
    envs = slot_envs(None, None, EIGHT, gpus_per_run=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3", "4,5", "6,7"]
    assert envs[0]["OMP_NUM_THREADS"] == str(max(1, cpu_count() // 8))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(None, 2, EIGHT, gpus_per_run=3)] == ["0,1,2", "3,4,5"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(None, 1, ["4", "6"], gpus_per_run=2)] == ["4,6"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(None, 1, EIGHT)] == EIGHT  # default: one GPU a run
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_envs(None, 1, EIGHT, gpus_per_run=8)] == [",".join(EIGHT)]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_gpus_per_run_must_be_a_positive_whole_number(bad):
    with pytest.raises(UserError, match=f"gpus_per_run {bad!r}: expected a whole number, at least 1"):
        slot_envs(None, 1, EIGHT, gpus_per_run=bad)


def test_more_gpus_per_run_than_the_machine_has_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"gpus_per_run 4: this machine shows 2 GPU\(s\).*expected at least 4"):
        slot_envs(None, 1, ["0", "1"], gpus_per_run=4)
    with pytest.raises(UserError, match="gpus_per_run 2: this machine shows 0 GPU"):
        run_sweep({"command": "sft", "axes": {"seed": [0]}}, tmp_path / "s", gpus=[], gpus_per_run=2)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_torchrun_command_line(tmp_path):
    (run,) = expand(parse_spec({"command": "sft", "axes": {"seed": [0]}}))
    rdir = tmp_path / "runs" / run.id
    one = launch_argv(run, rdir, DEFAULT_LAUNCHER)
    assert one == [sys.executable, "-m", "regretless.cli", "sft", "--config", str(rdir / "config.yaml"),
                   "--out", str(rdir), "--resume"]
    assert launch_argv(run, rdir, DEFAULT_LAUNCHER, gpus_per_run=4) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", *one[1:]]
    assert torchrun_argv(["/venv/bin/python3", "train.py", "--x"], 2) == [
        "/venv/bin/python3", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py", "--x"]
    assert torchrun_argv(["/opt/bin/trainer", "--x"], 2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
        "/opt/bin/trainer", "--x"]


def test_runs_start_through_torchrun_on_their_slots_gpus(tmp_path):
    """Real torchrun (2 processes per run) on CPU; the GPU ids are only names here, as no process uses CUDA."""
    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"
    res = run_sweep({"command": "sft", "base": {"steps": 3}, "axes": {"seed": [0, 1]}}, out,
                    gpus=["0", "1", "2", "3", "5"], gpus_per_run=2, threads_per_run=1, launcher=launcher, quiet=True)
    assert res.counts == {"done": 2}, [r["error"] for r in res.runs]
    seen = []
    for r in res.runs:
        folder: Path = out / r["path"]
        procs = [dict(kv.split("=") for kv in line.split()) for line in (folder / "procs.log").read_text().splitlines()]
        assert sorted(p["rank"] for p in procs) == ["0", "1"] and {p["world"] for p in procs} == {"2"}
        (gpus,) = {p["gpus"] for p in procs}  # every rank of a run sees the same GPUs
        (start,) = attempts(folder)  # rank 0 trained, once
        assert start["gpus"] == gpus and start["threads"] == "1"
        seen.append(gpus)
    assert seen == ["0,1", "2,3"]  # the two slots, started together in order; GPU 5 is left over


def test_cli_gpus_per_run_errors(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text("command: sft\naxes: {seed: [0]}\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--gpus-per-run", "0"]) == 2
    assert "--gpus-per-run 0: expected at least 1" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--gpus-per-run", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpus_per_run 2: this machine shows 0 GPU(s)" in err[0]


def test_ray_task_holds_gpus_per_run():
    nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 8}}, {"Alive": True, "Resources": {"CPU": 8}}]
    assert task_gpus(nodes, 1) == 1 and task_gpus(nodes, 4) == 4 and task_gpus(nodes, 8) == 8
    with pytest.raises(UserError, match="gpus_per_run 16: no node of the Ray cluster has that many GPUs"):
        task_gpus(nodes, 16)
    cpu_only = [{"Alive": True, "Resources": {"CPU": 4}}, {"Alive": False, "Resources": {"GPU": 8}}]
    assert task_gpus(cpu_only, 1) == 0
    with pytest.raises(UserError, match=r"most on one node: 0\)"):
        task_gpus(cpu_only, 2)
