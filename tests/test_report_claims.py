"""The verdict logic on synthetic seeded results (real run folders and ledgers): each finding gives `held`,
`did not hold` and `inconclusive` when the synthetic truth says so, and claims.json has the promised fields."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_report_data import full, lora, lr_grid, rl_arm, sft_arm

from regretless import stats as S
from regretless.report import analysis as A
from regretless.report import claims as C
from regretless.report import write_report


def claim(root, finding: str) -> dict:
    return next(c for c in C.evaluate(A.load_runs(root)) if c["finding"] == finding)


# ---- LR ratio ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,verdict", [(12.0, S.HELD), (1.0, S.NOT_HELD)])
def test_lr_ratio_held_and_not_held(tmp_path, ratio, verdict):
    sft_arm(tmp_path, "full", full(), 1e-3)
    sft_arm(tmp_path, "r16", lora(16), 1e-3 * ratio)
    c = claim(tmp_path, "lr_ratio")
    assert c["verdict"] == verdict, c
    lo, hi = c["ratio_interval"]
    assert lo <= ratio <= hi and hi / lo < 2
    assert c["optimal_lr"]["full"]["interval"][0] <= 1e-3 <= c["optimal_lr"]["full"]["interval"][1]


def test_lr_ratio_inconclusive_when_noise_hides_it_or_optimum_unbracketed(tmp_path):
    # ratio 15 sits inside [7.5, 30] for 120 steps, but seed noise this large straddles the region's edge
    sft_arm(tmp_path / "noisy", "full", full(), 1e-3, sd=0.05)
    sft_arm(tmp_path / "noisy", "r16", lora(16), 1e-3 * 7.0, sd=0.05)
    c = claim(tmp_path / "noisy", "lr_ratio")
    assert c["verdict"] == S.INCONCLUSIVE and c["interval"][0] < 7.5 < c["interval"][1], c
    # the LoRA optimum lies beyond the highest LR run: never a verdict from an edge
    sft_arm(tmp_path / "edge", "full", full(), 1e-3)
    sft_arm(tmp_path / "edge", "r16", lora(16), 1e-1, lrs=lr_grid(1e-2))
    c = claim(tmp_path / "edge", "lr_ratio")
    assert c["verdict"] == S.INCONCLUSIVE and "not bracketed" in c["reason"] and "r16" in c["reason"]


def test_an_unfinished_search_gives_no_verdict(tmp_path):
    """A claim whose arm's LR search `reproduce` left unfinished (decisive runs missing) is inconclusive, even
    where its runs so far would decide; an unfinished arm the claim does not use changes nothing."""
    sft_arm(tmp_path, "full", full(), 1e-3)
    sft_arm(tmp_path, "r16", lora(16), 1e-3 * 12.0)
    records = A.load_runs(tmp_path)
    done = next(c for c in C.evaluate(records, {"rl-r1"}) if c["finding"] == "lr_ratio")
    assert done["verdict"] == S.HELD and set(done["arms"]) == {"full", "r16"}
    left = next(c for c in C.evaluate(records, {"r16"}) if c["finding"] == "lr_ratio")
    assert left["verdict"] == S.INCONCLUSIVE and "r16 has not finished" in left["reason"]
    assert left["ratio"] == pytest.approx(done["ratio"])  # the numbers so far are still reported


def test_sft_claims_pool_seed_noise_over_sft_runs_only(tmp_path):
    """RL runs' seed spread (accuracies) is no measure of SFT's (losses): adding noisy RL arms changes none of
    the SFT claims' numbers; the seed-SD pooling refuses a mix of the two."""
    for root in (tmp_path / "sft", tmp_path / "both"):
        sft_arm(root, "full", full(), 1e-3, sd=0.01)
        sft_arm(root, "r16", lora(16), 1e-3 * 12.0, sd=0.01)
        sft_arm(root, "mlp", lora(8, "mlp"), 1e-2, sd=0.01, params=49_152)
        sft_arm(root, "attn", lora(12, "attn"), 1e-2, sd=0.01, params=49_152, lag=0.1)
    rl_arm(tmp_path / "both", "rl-full", None, 1e-4, 0.5, sd=0.2)
    rl_arm(tmp_path / "both", "rl-r1", 1, 1e-3, 0.5, sd=0.2)
    for finding in ("lr_ratio", "placement"):
        alone, mixed = claim(tmp_path / "sft", finding), claim(tmp_path / "both", finding)
        assert mixed["interval"] == pytest.approx(alone["interval"]), finding
    with pytest.raises(ValueError, match="rl and sft"):
        A.pooled_seed_sd(A.arms(A.load_runs(tmp_path / "both")).values())


# ---- capacity ----------------------------------------------------------------------------------------------
def test_capacity_three_verdicts(tmp_path):
    def build(root, hi_lag, lo_fall, sd=0.002):
        sft_arm(root, "full", full(), 1e-3, sd=sd)
        sft_arm(root, "r64", lora(64), 1e-2, lag=hi_lag, sd=sd)
        sft_arm(root, "r1", lora(1), 1e-2, fall_off=lo_fall, sd=sd)

    build(tmp_path / "held", 0.0, 0.3)
    build(tmp_path / "not", 0.4, 0.3)  # the high rank lags FullFT by 40% of its drop
    build(tmp_path / "inc", 0.0, 0.02, sd=0.05)  # a small fall-off under heavy noise
    got = {k: claim(tmp_path / k, "capacity") for k in ("held", "not", "inc")}
    assert got["held"]["verdict"] == S.HELD, got["held"]
    assert got["held"]["parts"]["low_rank_gap_growth"]["interval"][0] > 0
    assert got["not"]["verdict"] == S.NOT_HELD and got["not"]["parts"]["high_rank_gap"]["verdict"] == S.NOT_HELD
    assert got["inc"]["verdict"] == S.INCONCLUSIVE, got["inc"]


@pytest.mark.parametrize("tokens,verdict", [(999, S.INCONCLUSIVE), (1001, S.NOT_HELD)])
def test_capacity_fall_off_is_tested_only_where_the_low_rank_can_run_out(tmp_path, tokens, verdict):
    """The low rank's gap does not grow. With fewer trained tokens than its 1,000 LoRA parameters the paper's
    rule predicts exactly that, so (b) is untestable (inconclusive), not `did not hold`; with more tokens than
    parameters it did not hold."""
    sft_arm(tmp_path, "full", full(), 1e-3, tokens=tokens)
    sft_arm(tmp_path, "r64", lora(64), 1e-2, tokens=tokens, params=64_000)
    sft_arm(tmp_path, "r1", lora(1), 1e-2, lag=-0.3, tokens=tokens, params=1000)  # the gap shrinks
    part = claim(tmp_path, "capacity")["parts"]["low_rank_gap_growth"]
    assert part["verdict"] == verdict and part["testable"] is (tokens > 1000), part
    assert part["interval"][1] < 0 and (part["lora_params"], part["trained_tokens"]) == (1000, tokens)


# ---- batch -------------------------------------------------------------------------------------------------
def test_batch_three_verdicts(tmp_path):
    def build(root, extra_lag_large, sd=0.002):
        for b, steps, lag in ((4, 120, 0.0), (16, 30, extra_lag_large)):
            tag = "" if b == 4 else "-bs16"
            sft_arm(root, f"full{tag}", full(batch_size=b), 1e-3, steps=steps, sd=sd)
            sft_arm(root, f"r64{tag}", lora(64, batch_size=b), 1e-2, steps=steps, lag=lag, sd=sd)

    build(tmp_path / "held", 0.3)
    build(tmp_path / "not", -0.3)
    build(tmp_path / "inc", 0.0, sd=0.05)
    assert claim(tmp_path / "held", "batch")["verdict"] == S.HELD
    assert claim(tmp_path / "not", "batch")["verdict"] == S.NOT_HELD
    assert claim(tmp_path / "inc", "batch")["verdict"] == S.INCONCLUSIVE


# ---- placement ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_lag,sd,verdict", [(0.2, 0.002, S.HELD), (-0.2, 0.002, S.NOT_HELD),
                                                 (0.005, 0.05, S.INCONCLUSIVE)])
def test_placement_three_verdicts(tmp_path, attn_lag, sd, verdict):
    sft_arm(tmp_path, "mlp", lora(8, "mlp"), 1e-2, sd=sd, params=49_152)
    sft_arm(tmp_path, "attn", lora(12, "attn"), 1e-2, sd=sd, params=49_152, lag=attn_lag)
    sft_arm(tmp_path, "all", lora(8, "all"), 1e-2, sd=sd, params=81_920)
    c = claim(tmp_path, "placement")
    assert c["verdict"] == verdict, c
    assert "all_vs_mlp" in c


# ---- RL ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_acc,full_acc,verdict", [(0.57, 0.56, S.HELD), (0.40, 0.62, S.NOT_HELD),
                                                       (0.44, 0.50, S.NOT_HELD), (0.31, 0.31, S.INCONCLUSIVE)])
def test_rl_three_verdicts(tmp_path, lora_acc, full_acc, verdict):
    """Base 0.30. The margin is 10% of FullFT's gain over the base: FullFT 0.50 (gain 0.20) and rank 1 0.44 is
    -0.06 [-0.08, -0.04], wholly below -0.02 (rank 1 learned 70% of what FullFT learned): did not hold, where a
    fixed margin of 0.10 accuracy points would call it held."""
    rl_arm(tmp_path, "full", None, 1e-4, full_acc, n_eval=8000, sd=0.003)
    rl_arm(tmp_path, "r1", 1, 1e-3, lora_acc, n_eval=8000, sd=0.003)
    c = claim(tmp_path, "rl")
    assert c["verdict"] == verdict, c
    if verdict == S.INCONCLUSIVE:
        assert "nothing learned" in c["reason"]  # FullFT did not beat the base: no comparison to make
        return
    gain = c["fullft_gain"]
    assert gain == pytest.approx(full_acc - 0.3, abs=0.01) and c["margin"] == pytest.approx(C.RL_MARGIN * gain)
    lo, hi = c["interval"]
    assert (lo >= -c["margin"]) if verdict == S.HELD else (hi < -c["margin"]), c


@pytest.mark.parametrize("n_eval", [400, 4000])
def test_rl_says_when_the_eval_set_is_too_small_to_decide(tmp_path, n_eval):
    """Base 0, LoRA and FullFT end equal (0.50): the margin is 0.05 (10% of FullFT's gain 0.5). The
    difference's interval at 400 held-out problems is wider than the margin, so the claim is inconclusive and
    says how many problems would decide it: run with that many, the same results give a half-width of half the
    margin; at 4,000 it held."""
    rl_arm(tmp_path, "full", None, 1e-4, 0.5, base=0.0, n_eval=n_eval, sd=0.0)
    rl_arm(tmp_path, "r1", 1, 1e-3, 0.5, base=0.0, n_eval=n_eval, sd=0.0)
    c = claim(tmp_path, "rl")
    assert c["margin"] == pytest.approx(0.05)
    if n_eval == 400:
        assert c["verdict"] == S.INCONCLUSIVE and "cannot decide" in c["reason"], c
        assert c["interval_half_width"] > c["margin"]
        need = c["eval_size_needed"]
        assert 3073 <= need < 4000  # 1.96 * sqrt(2 * 0.25 / n) = 0.025 at n = 3073; a t quantile asks a bit more
        rl_arm(tmp_path / "more", "full", None, 1e-4, 0.5, base=0.0, n_eval=need, sd=0.0)
        rl_arm(tmp_path / "more", "r1", 1, 1e-3, 0.5, base=0.0, n_eval=need, sd=0.0)
        again = claim(tmp_path / "more", "rl")
        assert c["margin"] / 2 * 0.99 <= again["interval_half_width"] <= c["margin"] / 2, again
        assert again["verdict"] == S.HELD
    else:
        assert c["verdict"] == S.HELD and "eval_size_needed" not in c, c


def test_rl_binomial_uses_the_problems_the_trainer_scored(tmp_path):
    """config eval_size 2000, but the trainer scored 100 (duplicates dropped): the interval is the 100's."""
    for root, scored in ((tmp_path / "a", None), (tmp_path / "b", 100)):
        rl_arm(root, "full", None, 1e-4, 0.60, n_eval=2000, sd=0.003, scored=scored)
        rl_arm(root, "r1", 1, 1e-3, 0.58, n_eval=2000, sd=0.003, scored=scored)
    wide, narrow = claim(tmp_path / "b", "rl"), claim(tmp_path / "a", "rl")
    assert (narrow["eval_size"], wide["eval_size"]) == (2000, 100)
    width = lambda c: c["interval"][1] - c["interval"][0]
    assert width(wide) > 3 * width(narrow)


@pytest.mark.parametrize("opt_seeds", [(), (2, 3)])
def test_rl_seed_noise_is_the_optima_own_spread_once_they_have_confirmation_seeds(tmp_path, opt_seeds):
    """LRs far from each optimum spread widely between seeds (+-0.15), the optima barely (SD 0.002). With 2
    seeds at the optima the pooled SD (dominated by the far LRs) makes the claim undecidable; with 4 seeds at
    each optimum the interval is the Welch interval of the two optima's own seeds plus the binomial term, at the
    Welch-Satterthwaite df of the sum (checked against scipy's Welch df and the formula by hand), and the claim
    holds; the pooled interval is still reported."""
    from scipy import stats as st

    rl_arm(tmp_path, "full", None, 1e-4, 0.60, n_eval=8000, sd=0.002, opt_seeds=opt_seeds, sd_far=0.15)
    rl_arm(tmp_path, "r1", 1, 1e-3, 0.60, n_eval=8000, sd=0.002, opt_seeds=opt_seeds, sd_far=0.15)
    c = claim(tmp_path, "rl")
    if not opt_seeds:
        assert c["verdict"] == S.INCONCLUSIVE and "seed_noise" not in c, c
        assert c["interval"][1] - c["interval"][0] > 2 * c["margin"]
        return
    arms = A.arms(A.load_runs(tmp_path))
    vf, vl = arms["rl-full"].scores()[1e-4], arms["rl-r1"].scores()[1e-3]
    assert len(vf) == len(vl) == 4
    ref = st.ttest_ind(vl, vf, equal_var=False)  # Welch: the seeds' df; the variances by hand
    pf, pl = float(np.mean(vf)), float(np.mean(vl))
    parts = [(np.var(vf, ddof=1) / 4, 3), (np.var(vl, ddof=1) / 4, 3), (pf * (1 - pf) / 8000, 7999),
             (pl * (1 - pl) / 8000, 7999)]  # (variance, df): seeds of each arm, then each arm's binomial term
    var = sum(v for v, _ in parts)
    df = var ** 2 / sum(v * v / k for v, k in parts)  # Welch-Satterthwaite over all four
    assert 100 < df < 16_000  # the binomial terms dominate: far more df than the seeds' ~6
    h = st.t.ppf(0.975, df) * math.sqrt(var)
    assert c["effect"] == pytest.approx(pl - pf)
    assert c["interval"] == pytest.approx([pl - pf - h, pl - pf + h], rel=1e-9)
    assert c["seed_noise"]["df"] == pytest.approx(ref.df)
    pooled = c["seed_noise"]["interval_pooled_sd"]
    assert pooled[1] - pooled[0] > 2 * c["margin"] and "pooled over all LRs" in c["measured"]
    assert c["verdict"] == S.HELD, c


# ---- claims.json -------------------------------------------------------------------------------------------
def test_claims_json_fields(tmp_path):
    sft_arm(tmp_path, "full", full(), 1e-3)
    sft_arm(tmp_path, "r16", lora(16), 1e-2)
    sft_arm(tmp_path, "r1", lora(1), 1e-2, fall_off=0.3)
    write_report(tmp_path)
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["finding"] for c in claims] == ["capacity", "lr_ratio", "batch", "placement", "rl"]
    for c in claims:
        assert set(c) >= {"finding", "verdict", "effect", "interval", "runs", "seeds", "reason"}
        assert c["verdict"] in (S.HELD, S.NOT_HELD, S.INCONCLUSIVE)
        assert isinstance(c["reason"], str) and c["reason"]
    lr = claims[1]
    assert {"ratio", "ratio_interval", "optimal_lr"} <= set(lr)
    assert set(lr["optimal_lr"]) == {"full", "r16", "r1"}
    assert all(len(o["interval"]) == 2 for o in lr["optimal_lr"].values())
    assert lr["runs"] == 3 * 7 * 2 and lr["seeds"] == 2
    html = (tmp_path / "report.html").read_text()
    assert "optimal LRs" in html and "Capacity" in html
    assert (tmp_path / "figures" / "capacity.png").stat().st_size > 1000


def test_satterthwaite_df_and_welch_against_scipy():
    """S.satterthwaite: (sum v)^2 / sum(v^2/df), known (infinite df) and zero terms adding nothing; S.welch's df is
    scipy's Welch df, and both spreads zero gives n_a + n_b - 2."""
    from scipy import stats as st

    assert S.satterthwaite([(0.04, 3), (0.01, 9)]) == pytest.approx(0.05 ** 2 / (0.04 ** 2 / 3 + 0.01 ** 2 / 9))
    assert S.satterthwaite([(0.04, 3), (0.01, math.inf)]) == pytest.approx(0.05 ** 2 / (0.04 ** 2 / 3))
    assert S.satterthwaite([(0.04, 3), (0.0, 2)]) == pytest.approx(3)
    assert S.satterthwaite([(0.04, math.inf)]) == math.inf
    a, b = [0.31, 0.36, 0.33, 0.40], [0.30, 0.305, 0.31]
    var, df = S.welch(a, b)
    assert df == pytest.approx(st.ttest_ind(a, b, equal_var=False).df)
    assert var == pytest.approx(np.var(a, ddof=1) / 4 + np.var(b, ddof=1) / 3)
    assert S.welch([0.5, 0.5], [0.25, 0.25, 0.25]) == (0.0, 3.0)
