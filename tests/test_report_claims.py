"""The five claims on constructed run data: held where the data says so, did not hold where it does not,
inconclusive when runs are missing or the measurement cannot decide."""

from __future__ import annotations

import pytest
from test_report_data import batch_sweep, lr_sweep, placement_sweep, rl_sweep

from regretless.report import analysis as A
from regretless.report import claims as C


def _claim(root, fn):
    return fn(A.load_runs(root))


def test_capacity_held_and_not(tmp_path):
    held = _claim(lr_sweep(tmp_path / "a", seeds=(0,)), C.capacity)
    assert held["verdict"] == C.HELD, held
    assert held["details"]["r64"]["final_gap"] <= C.CAP_HIGH_MAX_GAP
    assert held["details"]["r2"]["final_gap"] > held["details"]["r2"]["early_gap"] + C.CAP_MIN_GROWTH
    flat = _claim(lr_sweep(tmp_path / "b", seeds=(0,), low_rank_falls_off=False), C.capacity)
    assert flat["verdict"] == C.NOT_HELD and "no capacity limit" in flat["reason"]


@pytest.mark.parametrize("ratio, verdict", [(10.0, C.HELD), (2.0, C.NOT_HELD), (1000.0, C.INCONCLUSIVE)])
def test_lr_ratio(tmp_path, ratio, verdict):
    c = _claim(lr_sweep(tmp_path, ranks=(4, 64), seeds=(0,), ratio=ratio), C.lr_ratio)
    assert c["verdict"] == verdict, c
    if verdict != C.INCONCLUSIVE:
        assert c["value"] == pytest.approx(ratio, rel=0.02)
    else:
        assert "edge of the LR grid" in c["reason"]


def test_optimal_lr_is_the_log_parabola_vertex():
    rows = [{"condition": "full", "lr": lr, "final_loss": (lr_exp + 3.7) ** 2 + 1.0}
            for lr_exp in (-5, -4, -3, -2) for lr in [10.0**lr_exp]]
    opt = A.optimal_lrs(rows)["full"]
    assert opt.lr == pytest.approx(10**-3.7, rel=1e-6) and not opt.at_edge and opt.value == pytest.approx(1.0)
    edge = A.optimal_lrs([{**r, "final_loss": -r["lr"]} for r in rows])["full"]
    assert edge.at_edge and edge.lr == pytest.approx(1e-2)


def test_batch_held_and_not(tmp_path):
    held = _claim(batch_sweep(tmp_path / "a"), C.batch)
    assert held["verdict"] == C.HELD, held
    assert held["details"]["gap"]["512"] > held["details"]["gap"]["8"]
    same = _claim(batch_sweep(tmp_path / "b", batch_gap=False), C.batch)
    assert same["verdict"] == C.NOT_HELD and "grew by only" in same["reason"]


def test_placement_held_and_not(tmp_path):
    held = _claim(placement_sweep(tmp_path / "a"), C.placement)
    assert held["verdict"] == C.HELD, held
    assert "matched: attn r=256 (25,600 params)" in held["measured"] and "mlp r=128" in held["measured"]
    tie = _claim(placement_sweep(tmp_path / "b", attn_worse=False), C.placement)
    assert tie["verdict"] == C.NOT_HELD and "attention-only beats MLP-only" in tie["reason"]


def test_rl_held_not_and_inconclusive(tmp_path):
    held = _claim(rl_sweep(tmp_path / "a"), C.rl)
    assert held["verdict"] == C.HELD and held["value"] == pytest.approx(1.0, abs=0.02), held
    weak = _claim(rl_sweep(tmp_path / "b", rank1_fraction=0.5), C.rl)
    assert weak["verdict"] == C.NOT_HELD and weak["value"] < 0.9
    flat = _claim(rl_sweep(tmp_path / "c", learns=False), C.rl)
    assert flat["verdict"] == C.INCONCLUSIVE and "did not rise" in flat["reason"]


def test_no_runs_is_inconclusive_not_an_error(tmp_path):
    claims = C.evaluate(A.load_runs(tmp_path))
    assert [c["verdict"] for c in claims] == [C.INCONCLUSIVE] * 5
    assert all("no runs" in c["reason"] for c in claims)


def test_only_failed_runs_is_inconclusive(tmp_path):
    from test_sweep_fake_trainer import write_run

    write_run(tmp_path, "x", "rl", {"model": "m", "lora": None, "lr": 1e-5}, [], status="failed", tags=("rl",))
    c = C.rl(A.load_runs(tmp_path))
    assert c["verdict"] == C.INCONCLUSIVE and "no finished runs (1 runs, 1 failed)" in c["reason"]
