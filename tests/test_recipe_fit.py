"""The LR-sweep fitter recovers known optima, ratios and exponents from synthetic noisy U-curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regretless import recipe_fit as rf
from regretless.errors import UserError


def u_curve_rows(condition, x0, rng, noise=0.003, seeds=3, grid=None, curvature=0.3):
    """final_loss = 1 + curvature * (log10 lr - x0)^2 + noise, on a half-decade-quarter grid."""
    grid = np.arange(-5.5, -2.49, 0.25) if grid is None else grid
    rows = []
    for seed in range(seeds):
        for g in grid:
            loss = 1.0 + curvature * (g - x0) ** 2 + rng.normal(0, noise)
            rows.append({"condition": condition, "lr": 10**g, "final_loss": loss, "seed": seed})
    return rows


def test_exact_quadratic_hand_value():
    # loss = (log10 lr + 4.1)^2 on grid 1e-5, 1e-4, 1e-3: vertex at 10^-4.1, clamped range [1e-5, 1e-3]
    lrs = [1e-5, 1e-4, 1e-3]
    fit = rf.fit_optimal_lr(lrs, [(math.log10(v) + 4.1) ** 2 for v in lrs], "c")
    assert fit.method == "quadratic" and fit.lr == pytest.approx(10**-4.1)
    assert fit.best_grid_lr == pytest.approx(1e-4) and fit.loss == pytest.approx(0.0, abs=1e-12)
    assert fit.log10_lr_se is None  # 3 points, no residual degrees of freedom


def test_recovers_optimum_and_uncertainty():
    rng = np.random.default_rng(0)
    x0 = math.log10(3e-4)  # between grid points
    fit = rf.fit_sweep(u_curve_rows("lora", x0, rng))["lora"]
    assert fit.method == "quadratic"
    assert math.log10(fit.lr) == pytest.approx(x0, abs=0.02)
    assert fit.log10_lr_se is not None and 0 < fit.log10_lr_se < 0.05
    assert abs(math.log10(fit.lr) - x0) < 4 * fit.log10_lr_se + 1e-3


def test_ratio_of_ten_recovered():
    rng = np.random.default_rng(1)
    rows = u_curve_rows("lora", math.log10(4e-4), rng) + u_curve_rows("full", math.log10(4e-5), rng)
    fits = rf.fit_sweep(rows)
    r = rf.lr_ratio(fits["lora"], fits["full"])
    assert r.ratio == pytest.approx(10.0, rel=0.05)
    assert r.low < 10.0 < r.high and r.high / r.low < 2.0


def test_mean_ratio_over_models():
    ratios = [rf.RatioFit(v, 0.05, None, None) for v in (8.0, 10.0, 12.5)]
    m = rf.mean_ratio(ratios)
    assert m.ratio == pytest.approx(1000 ** (1 / 3))  # geometric mean of 8, 10, 12.5 = 10
    logs = np.log10([8.0, 10.0, 12.5])
    assert m.log10_se == pytest.approx(logs.std(ddof=1) / math.sqrt(3)) and m.n == 3


def test_edge_of_grid_is_flagged_and_clamped():
    rng = np.random.default_rng(2)
    grid = np.arange(-5.0, -3.49, 0.25)  # optimum 1e-3 lies above the grid
    fit = rf.fit_sweep(u_curve_rows("c", -3.0, rng, grid=grid))["c"]
    assert fit.method == "edge" and "extend the sweep" in fit.note
    assert 10**-3.75 <= fit.lr <= 10**-3.5 + 1e-12


def test_diverged_runs_dropped_and_too_few_points():
    fit = rf.fit_optimal_lr([1e-4, 1e-3, 1e-2], [1.0, 0.9, float("nan")], "c")
    assert fit.method == "grid" and fit.lr == pytest.approx(1e-3) and fit.n_points == 2
    with pytest.raises(UserError, match="diverged"):
        rf.fit_optimal_lr([1e-4], [float("inf")], "c")
    with pytest.raises(UserError, match="lr"):
        rf.fit_optimal_lr([-1e-4, 1e-3], [1.0, 0.9], "c")
    with pytest.raises(UserError, match="missing final_loss"):
        rf.fit_sweep([{"condition": "a", "lr": 1e-3}])


def test_fit_exponent_recovers_p():
    rng = np.random.default_rng(3)
    hidden = np.array([576, 1024, 2048, 4096, 5120, 8192])
    lrs = 5e-5 * (2000 / hidden) ** 0.6 * 10 ** rng.normal(0, 0.01, hidden.size)
    fit = rf.fit_exponent(hidden.tolist(), lrs.tolist())
    assert fit.p == pytest.approx(0.6, abs=0.03)
    assert fit.base == pytest.approx(5e-5, rel=0.05)
    assert fit.p_se is not None and abs(fit.p - 0.6) < 4 * fit.p_se + 1e-3
    exact = rf.fit_exponent([1000, 4000], [2e-4, 5e-5])  # (2000/1000)^p / (2000/4000)^p = 4 -> p = 1
    assert exact.p == pytest.approx(1.0) and exact.base == pytest.approx(1e-4) and exact.p_se is None
    with pytest.raises(UserError, match="2 different hidden sizes"):
        rf.fit_exponent([2048, 2048], [1e-4, 2e-4])


def test_read_sweep_csv(tmp_path):
    p = tmp_path / "sweep.csv"
    p.write_text("condition,lr,final_loss,seed\na,1e-4,1.0,0\na,1e-3,0.8,0\na,1e-2,,0\n")
    rows = rf.read_sweep_csv(p)
    assert rows[1]["lr"] == 1e-3 and math.isnan(rows[2]["final_loss"])
    assert rf.fit_sweep(rows)["a"].best_grid_lr == pytest.approx(1e-3)
    bad = tmp_path / "bad.csv"
    bad.write_text("condition,lr\na,1e-4\n")
    with pytest.raises(UserError, match="missing column"):
        rf.read_sweep_csv(bad)
    bad.write_text("condition,lr,final_loss\na,fast,1.0\n")
    with pytest.raises(UserError, match=":2: lr"):
        rf.read_sweep_csv(bad)


def test_summarize_sweep_two_models():
    # two model sizes, LoRA optimum 10x FullFT, both following LR* = M * 5e-5 * (2000/h)^0.5
    rng = np.random.default_rng(4)
    rows = []
    for model, hidden in (("small", 1000), ("big", 4000)):
        for method, mult in (("lora", 10.0), ("full", 1.0)):
            x0 = math.log10(mult * 5e-5 * (2000 / hidden) ** 0.5)
            for r in u_curve_rows(f"{model}/{method}", x0, rng, noise=0.001, grid=np.arange(-6, -1.99, 0.25)):
                rows.append({**r, "model": model, "method": method, "hidden_size": hidden})
    s = rf.summarize_sweep(rows)
    assert set(s["optimal_lr"]) == {"small/lora", "small/full", "big/lora", "big/full"}
    assert s["ratio"].ratio == pytest.approx(10.0, rel=0.03) and s["ratio"].n == 2
    assert s["ratio_by_model"]["big"].ratio == pytest.approx(10.0, rel=0.05)
    assert s["exponent"]["full"].p == pytest.approx(0.5, abs=0.03)
    assert s["exponent"]["lora"].base == pytest.approx(5e-4, rel=0.05)
    rows.append({"condition": "big/full", "lr": 1e-4, "final_loss": 1.0, "model": "big", "method": "lora"})
    with pytest.raises(UserError, match="disagree"):
        rf.summarize_sweep(rows)


def test_fit_optimal_lrs_plain_view():
    lrs = [1e-5, 1e-4, 1e-3]
    rows = [{"condition": "c", "lr": v, "final_loss": (math.log10(v) + 4.1) ** 2} for v in lrs]
    assert rf.fit_optimal_lrs(rows) == {"c": pytest.approx(10**-4.1)}
