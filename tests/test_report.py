"""Analysis (pointwise minima, seed bands, final values), the five figures (real PNG/SVG files) and the
report command (report.html + claims.json) on run folders written by the tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_report_data import batch_sweep, lr_sweep, placement_sweep, rl_sweep
from test_sweep_fake_trainer import write_run

from regretless.cli import main
from regretless.report import analysis as A
from regretless.report import figures as F
from regretless.report import write_report


def _loss_run(root, rid, lr, losses, seed=0, rank=None, status="done"):
    cfg = {"model": "m", "lora": None if rank is None else {"rank": rank}, "lr": lr, "seed": seed}
    metrics = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    write_run(root, rid, "sft", cfg, metrics, status=status)


def test_pointwise_min_over_lrs_with_seed_band(tmp_path):
    _loss_run(tmp_path, "a0", 1e-3, [3.0, 2.0, 1.8, 1.7], seed=0)  # fast start, slow finish
    _loss_run(tmp_path, "a1", 1e-3, [3.2, 2.2, 2.0, 1.9], seed=1)
    _loss_run(tmp_path, "b0", 1e-4, [3.5, 2.5, 1.5, 1.0], seed=0)
    _loss_run(tmp_path, "b1", 1e-4, [3.5, 2.5, 1.5, 1.2], seed=1)
    _loss_run(tmp_path, "c0", 1e-2, [9.0], seed=0, status="diverged")
    recs = A.load_runs(tmp_path)
    assert len(recs) == 5 and {r.status for r in recs} == {"done", "diverged"}
    curve = A.pointwise_min([r for r in recs if r.status == "done"], "loss")["full"]
    np.testing.assert_allclose(curve.steps, [1, 2, 3, 4])
    np.testing.assert_allclose(curve.mean, [3.1, 2.1, 1.5, 1.1])
    np.testing.assert_allclose(curve.lo, [3.0, 2.0, 1.5, 1.0])
    np.testing.assert_allclose(curve.hi, [3.2, 2.2, 1.5, 1.2])
    np.testing.assert_allclose(curve.lr, [1e-3, 1e-3, 1e-4, 1e-4])
    rows = A.final_vs_lr(recs, "loss")
    by_lr = {d["lr"]: d for d in rows}
    assert by_lr[1e-4]["final_loss"] == pytest.approx(1.1) and by_lr[1e-4]["n"] == 2
    assert math.isnan(by_lr[1e-2]["final_loss"]) and by_lr[1e-2]["diverged"] == 1


def test_final_value_is_tail_mean_and_eval_preferred(tmp_path):
    _loss_run(tmp_path, "a", 1e-3, [5.0] * 10 + [2.0, 1.0])
    (rec,) = A.load_runs(tmp_path)
    assert A.final_value(rec, "loss") == pytest.approx(1.5)  # mean of the last 10% (2 of 12 points)
    rec.summary["final_eval_loss"] = 1.25
    assert A.final_value(rec, "eval_loss") == 1.25 and A.pick_metric([rec]) == "eval_loss"


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


def test_each_figure_function(tmp_path):
    recs = A.load_runs(lr_sweep(tmp_path / "lr", seeds=(0, 1)))
    _assert_figure(F.fig_loss_curves(recs, tmp_path / "f" / "loss"), "loss")
    _assert_figure(F.fig_lr_curves(recs, tmp_path / "f" / "lr"), "lr")
    _assert_figure(F.fig_batch(A.load_runs(batch_sweep(tmp_path / "b")), tmp_path / "f" / "batch"), "batch")
    _assert_figure(F.fig_placement(A.load_runs(placement_sweep(tmp_path / "p")), tmp_path / "f" / "pl"), "pl")
    _assert_figure(F.fig_rl_reward(A.load_runs(rl_sweep(tmp_path / "r")), tmp_path / "f" / "rl"), "rl")
    assert F.fig_loss_curves([], tmp_path / "f" / "none") == []


def test_report_on_a_reproduce_folder(tmp_path, capsys):
    lr_sweep(tmp_path / "capacity", seeds=(0,))
    batch_sweep(tmp_path / "batch")
    placement_sweep(tmp_path / "placement")
    rl_sweep(tmp_path / "rl")
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "5 figures" in out
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["verdict"] for c in claims["claims"]] == ["held"] * 5
    assert claims["runs"]["done"] == claims["runs"]["total"]
    html = (tmp_path / "report.html").read_text()
    assert html.count("<tr>") == 6 and "LR ratio" in html and "figures/lr_curves.png" in html
    for f in claims["figures"]:
        assert f["files"] and all((tmp_path / p).stat().st_size > 10_000 for p in f["files"])


def test_report_with_missing_sweeps_and_failures(tmp_path):
    rl_sweep(tmp_path / "rl", seeds=(0,))
    write_run(tmp_path / "rl", "broken", "rl", {"model": "m", "lora": None, "lr": 1.0}, [], status="failed",
              tags=("rl",))
    report = write_report(tmp_path)
    verdicts = {c["finding"]: c["verdict"] for c in report["claims"]}
    assert verdicts == {"capacity": "inconclusive", "lr_ratio": "inconclusive", "batch": "inconclusive",
                        "placement": "inconclusive", "rl": "held"}
    missing = {f["name"]: f["missing"] for f in report["figures"]}
    assert missing["lr_curves"] == "inconclusive: no runs" and missing["rl_reward"] is None
    assert report["failed_runs"][0]["name"] == "broken" and "boom" in report["failed_runs"][0]["error"]
    html = (tmp_path / "report.html").read_text()
    assert "Failed runs" in html and "inconclusive: no runs" in html


def test_report_on_missing_folder_is_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
