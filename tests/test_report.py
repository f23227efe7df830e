"""Loading runs (current spec only), arms and pointwise minima, the five figures (real PNG/SVG files) and the
report command (report.html + claims.json) on run folders written by the tests."""

from __future__ import annotations

import json

import numpy as np
from test_report_data import full, lora, rl_arm, sft_arm
from test_sweep_fake_trainer import write_run

from regretless.cli import main
from regretless.report import analysis as A
from regretless.report import figures as F
from regretless.report import write_report
from regretless.sweep.ledger import Ledger


def _eval_run(root, rid, lr, values, seed=0):
    metrics = [{"step": s, "eval_loss": v} for s, v in zip((0, 1, 2, 4), values)]
    write_run(root, rid, "sft", {"model": "m", "lora": None, "lr": lr, "seed": seed, "steps": 4,
                                 "batch_size": 4}, metrics)


def test_pointwise_min_over_lrs_takes_the_seed_mean_of_the_best_lr(tmp_path):
    _eval_run(tmp_path, "a0", 1e-3, [3.0, 2.0, 1.8, 1.7], seed=0)  # fast start, slow finish
    _eval_run(tmp_path, "a1", 1e-3, [3.0, 2.2, 2.0, 1.9], seed=1)
    _eval_run(tmp_path, "b0", 1e-4, [3.0, 2.5, 1.5, 1.0], seed=0)
    _eval_run(tmp_path, "b1", 1e-4, [3.0, 2.5, 1.5, 1.2], seed=1)
    (arm,) = A.arms(A.load_runs(tmp_path)).values()
    assert arm.name == "full" and sorted(arm.scores()) == [1e-4, 1e-3]
    c = A.pointwise_min(arm)
    np.testing.assert_allclose(c["steps"], [0, 1, 2, 4])
    np.testing.assert_allclose(c["value"], [3.0, 2.1, 1.5, 1.1])
    np.testing.assert_allclose(c["lr"][1:], [1e-3, 1e-4, 1e-4])
    np.testing.assert_allclose(c["n"], [2, 2, 2, 2])


def test_diverged_and_failed_runs_score_worst(tmp_path):
    _eval_run(tmp_path, "ok", 1e-3, [3.0, 2.0, 1.8, 1.7])
    write_run(tmp_path, "div", "sft", {"model": "m", "lora": None, "lr": 1e-1, "steps": 4, "batch_size": 4},
              [{"step": 1, "loss": 9.0}], status="diverged")
    write_run(tmp_path, "fail", "sft", {"model": "m", "lora": None, "lr": 1.0, "steps": 4, "batch_size": 4},
              [], status="failed")
    (arm,) = A.arms(A.load_runs(tmp_path)).values()
    assert arm.scores() == {1e-3: [1.7], 1e-1: [float("inf")], 1.0: [float("inf")]}


def test_rows_of_an_older_spec_are_left_out(tmp_path):
    _eval_run(tmp_path, "old", 1e-3, [3.0, 2.0, 1.8, 1.7])
    _eval_run(tmp_path, "new", 1e-4, [3.0, 2.0, 1.8, 1.6])
    led = Ledger(tmp_path / "ledger.sqlite")
    led.add_run("new", "new", "sft", {}, {}, "runs/new", (), spec_hash="B")
    led.set_meta("current_specs", json.dumps(["B"]))
    led.add_run("old", "old", "sft", {}, {}, "runs/old", (), spec_hash="A")
    ids = [r.id for r in A.load_runs(tmp_path)]
    assert ids == ["new"]  # the old spec's run folder is on disk but not read


def test_orphan_run_folders_without_ledger(tmp_path):
    folder = tmp_path / "manual"
    folder.mkdir()
    (folder / "config.yaml").write_text("command: rl\nmodel: m\nlora: {rank: 1}\nlr: 0.001\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')  # torn last line
    (rec,) = A.load_runs(tmp_path)
    assert rec.command == "rl" and rec.rank == 1 and rec.status == "queued" and len(rec.metrics) == 1


def _assert_figure(paths, name):
    assert [p.suffix for p in paths] == [".png", ".svg"], name
    png, svg = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    assert "<svg" in svg.read_text()[:2000] and svg.stat().st_size > 10_000, name


def five_findings(root):
    sft_arm(root, "full", full(), 1e-3)
    sft_arm(root, "r64", lora(64), 1e-2)
    sft_arm(root, "r1", lora(1), 1e-2, fall_off=0.3)
    sft_arm(root, "full-bs16", full(batch_size=16), 1e-3, steps=30)
    sft_arm(root, "r64-bs16", lora(64, batch_size=16), 1e-2, steps=30, lag=0.3)
    sft_arm(root, "mlp", lora(8, "mlp"), 1e-2, params=49_152)
    sft_arm(root, "attn", lora(12, "attn"), 1e-2, params=49_152, lag=0.2)
    sft_arm(root, "all8", lora(8), 1e-2, params=81_920)
    # RL: rank 1 level with FullFT; 8,000 problems make the interval narrower than 10% of FullFT's gain (0.026)
    rl_arm(root, "rlf", None, 1e-4, 0.56, n_eval=8000, sd=0.003)
    rl_arm(root, "rl1", 1, 1e-3, 0.57, n_eval=8000, sd=0.003)
    return root


def test_each_figure_function(tmp_path):
    arms = A.arms(A.load_runs(five_findings(tmp_path / "runs")))
    for name, (_, fn) in F.FIGURES.items():
        _assert_figure(fn(arms, tmp_path / "f" / name), name)
    assert F.fig_capacity({}, tmp_path / "f" / "none") == [] and F.fig_rl({}, tmp_path / "f" / "none") == []


def test_report_command_on_all_five_findings(tmp_path, capsys):
    five_findings(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "5 figures" in out
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["verdict"] for c in claims] == ["held"] * 5, [(c["finding"], c["reason"]) for c in claims]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"]["done"] == report["runs"]["total"]
    html = (tmp_path / "report.html").read_text()
    assert html.count("class=finding") == 5 and "LR ratio" in html and "figures/lr_curves.png" in html
    for f in report["figures"]:
        assert f["files"] and all((tmp_path / p).stat().st_size > 10_000 for p in f["files"])


def test_report_with_missing_findings_and_failures(tmp_path):
    rl_arm(tmp_path, "rlf", None, 1e-4, 0.56, n_eval=8000, sd=0.003)
    rl_arm(tmp_path, "rl1", 1, 1e-3, 0.57, n_eval=8000, sd=0.003)
    write_run(tmp_path, "broken", "rl", {"model": "m", "lora": None, "lr": 1.0}, [], status="failed")
    report = write_report(tmp_path)
    verdicts = {c["finding"]: c["verdict"] for c in report["claims"]}
    assert verdicts == {"capacity": "inconclusive", "lr_ratio": "inconclusive", "batch": "inconclusive",
                        "placement": "inconclusive", "rl": "held"}
    missing = {f["name"]: f["missing"] for f in report["figures"]}
    assert missing["lr_curves"] == "no runs to draw" and missing["rl"] is None
    assert report["failed_runs"][0]["name"] == "broken" and "boom" in report["failed_runs"][0]["error"]
    html = (tmp_path / "report.html").read_text()
    assert "Failed runs" in html and "no runs to draw" in html


def test_report_on_missing_folder_is_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
