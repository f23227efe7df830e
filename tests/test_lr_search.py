"""The adaptive LR search and the optimum fit on synthetic U-curves: true LoRA/FullFT ratios of 1, 10 and 30
must all be found, from the same recipe-style starting guesses (LoRA started at 10x FullFT)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regretless.stats import lr_optimum, ratio_interval
from regretless.sweep.search import CAPPED, DONE, SearchConfig, next_runs


def u_curve(opt: float, noise: float, seed: int = 0, diverge_above: float | None = None):
    """A U-curve in log10(LR), steeper on the high side (as real ones are), with seeded Gaussian noise per
    (lr, seed) and +inf (a diverged run) above `diverge_above`."""

    def f(lr: float, s: int) -> float:
        if diverge_above is not None and lr > diverge_above:
            return math.inf
        d = math.log10(lr / opt)
        rng = np.random.default_rng(abs(hash((round(lr, 12), s, seed))) % 2**32)
        return 1.0 + 0.3 * d * d + (0.4 * d**3 if d > 0 else 0.0) + noise * rng.standard_normal()

    return f


def search(f, start: float, cfg: SearchConfig | None = None, max_rounds: int = 40, rounds: list | None = None):
    """Run the search to its end on `f`: (status, scores); each round's runs are appended to `rounds`."""
    cfg = cfg or SearchConfig()
    scores: dict[float, dict[int, float]] = {}
    for _ in range(max_rounds):
        status, todo = next_runs(scores, start, cfg)
        if not todo:
            return status, scores
        if rounds is not None:
            rounds.append(todo)
        for lr, s in todo:
            assert s not in scores.get(lr, {}), "the search asked for a run it already has"
            scores.setdefault(lr, {})[s] = f(lr, s)
    raise AssertionError("search did not terminate")


def optimum(scores):
    return lr_optimum({lr: list(v.values()) for lr, v in scores.items()})


@pytest.mark.parametrize("true_ratio", [1.0, 10.0, 30.0])
def test_search_finds_any_ratio(true_ratio):
    opt_full = 3e-4
    full_status, full = search(u_curve(opt_full, 0.003, seed=1), start=1e-4)
    lora_status, lora = search(u_curve(opt_full * true_ratio, 0.003, seed=2), start=1e-3)
    assert full_status == lora_status == DONE
    of, ol = optimum(full), optimum(lora)
    assert of.bracketed and ol.bracketed
    assert of.low <= opt_full <= of.high
    assert ol.low <= opt_full * true_ratio <= ol.high
    r = ratio_interval(ol, of)
    assert r.low <= true_ratio <= r.high
    assert abs(math.log10(r.value / true_ratio)) < math.log10(1.3)
    assert r.high / r.low < 3  # informative, not (0, inf)


def test_decisive_runs_get_every_seed():
    _, scores = search(u_curve(2e-3, 0.003), start=1e-3)
    lrs = sorted(scores)
    b = min(lrs, key=lambda lr: np.mean(list(scores[lr].values())))
    i = lrs.index(b)
    for lr in lrs[i - 1:i + 2]:
        assert set(scores[lr]) == {0, 1}
    # everything else ran once: the search does not spend seeds where they decide nothing
    assert all(len(scores[lr]) == 1 for lr in lrs if lr not in lrs[i - 1:i + 2])


def test_confirm_seeds_only_at_the_best_lr_after_the_decisive_runs():
    f = u_curve(2e-3, 0.003)
    _, plain = search(f, start=1e-3)
    cfg = SearchConfig(confirm=(2, 3))
    status, scores = search(f, start=1e-3, cfg=cfg)
    assert status == DONE
    lrs = sorted(scores)
    b = min(lrs, key=lambda lr: np.mean(list(scores[lr].values())))
    assert set(scores[b]) == {0, 1, 2, 3}
    assert all(set(scores[lr]) <= {0, 1} for lr in lrs if lr != b)  # confirmation seeds nowhere else
    assert {lr: set(v) for lr, v in scores.items() if lr != b} == {lr: set(v) for lr, v in plain.items() if lr != b}
    # they come last: while the decisive runs are missing, no confirmation seed is asked for
    partial = {lr: {0: v[0]} for lr, v in plain.items()}
    _, todo = next_runs(partial, 1e-3, cfg)
    assert todo and all(s == 1 for _, s in todo)


def test_confirm_seeds_that_move_the_best_confirm_the_new_best():
    # two neighbouring LRs nearly tied after seeds 0-1; the confirmation seeds of the first make it worse
    at = SearchConfig().lr_at
    left, left_half, lo, mid, hi, right = (at(1e-3, k) for k in (-1, -0.5, 0, 0.5, 1, 2))
    base = {left: 3.0, left_half: 2.5, lo: 1.0, mid: 1.01, hi: 2.0, right: 3.0}

    def f(lr, s):
        return base[lr] + (0.5 if (lr == lo and s >= 2) else 0.0)

    status, scores = search(f, start=1e-3, cfg=SearchConfig(confirm=(2, 3)))
    assert status == DONE
    assert set(scores[lo]) == {0, 1, 2, 3}  # confirmed first, then no longer the best
    assert set(scores[mid]) == {0, 1, 2, 3}  # the new best got its confirmation seeds too


def test_a_wider_first_round_and_the_same_search_after_it():
    """first_span = 3: seven LRs, +-1 decade, in the first round; once scores exist the rules are the same as
    with span 1, so a replay over a sweep started with either span asks for the same runs. A far-off guess
    (optimum 1.2 decades below) is found in fewer rounds."""
    at = SearchConfig().lr_at
    _, todo = next_runs({}, 1e-3, SearchConfig(first_span=3))
    assert [lr for lr, _ in todo] == [at(1e-3, k) for k in range(-3, 4)] and {s for _, s in todo} == {0}
    _, capped = next_runs({}, 1e-3, SearchConfig(first_span=9, max_decades=1.0))
    assert len(capped) == 7  # never beyond max_decades
    f = u_curve(1e-3 / 10 ** 1.2, 0.0)
    s1, scores1 = search(f, start=1e-3)
    s3, scores3 = search(f, start=1e-3, cfg=SearchConfig(first_span=3))
    assert s1 == s3 == DONE
    best = lambda sc: min(sc, key=lambda lr: np.mean(list(sc[lr].values())))
    assert best(scores1) == best(scores3)
    for sc in (scores1, scores3):
        assert next_runs(sc, 1e-3, SearchConfig()) == next_runs(sc, 1e-3, SearchConfig(first_span=3))
    r1, r3 = [], []
    search(f, start=1e-3, rounds=r1)
    search(f, start=1e-3, cfg=SearchConfig(first_span=3), rounds=r3)
    assert len(r3) < len(r1)


def test_start_points_three_per_decade_then_refined():
    _, todo = next_runs({}, 1e-3)
    assert [lr for lr, _ in todo] == [pytest.approx(1e-3 / 10 ** (1 / 3), rel=1e-3), 1e-3,
                                      pytest.approx(1e-3 * 10 ** (1 / 3), rel=1e-3)]
    scores = {lr: {0: v} for (lr, _), v in zip(todo, (2.0, 1.0, 2.0))}
    _, todo = next_runs(scores, 1e-3)
    assert sorted(lr for lr, _ in todo) == [pytest.approx(1e-3 / 10 ** (1 / 6), rel=1e-3),
                                            pytest.approx(1e-3 * 10 ** (1 / 6), rel=1e-3)]


def test_diverged_high_side_extends_down_and_no_seeds_spent_on_divergence():
    status, scores = search(u_curve(1e-4, 0.002, diverge_above=2e-4), start=1e-3)
    assert status == DONE
    o = optimum(scores)
    assert o.bracketed and o.low <= 1e-4 <= o.high
    assert all(len(v) == 1 for v in scores.values() if any(math.isinf(x) for x in v.values()))


def test_capped_when_the_optimum_is_beyond_the_cap():
    cfg = SearchConfig(max_decades=1.0)
    status, scores = search(u_curve(1e-1, 0.001), start=1e-4, cfg=cfg)
    assert status == CAPPED
    assert not optimum(scores).bracketed
    assert max(scores) <= 1e-3 * 1.001  # never beyond start * 10^max_decades


def test_optimum_interval_shrinks_with_noise_and_ratio_interval_is_consistent():
    quiet = optimum(search(u_curve(1e-3, 0.001), start=1e-3)[1])
    loud = optimum(search(u_curve(1e-3, 0.03), start=1e-3)[1])
    assert quiet.high / quiet.low < loud.high / loud.low
    r = ratio_interval(quiet, quiet)
    assert r.value == pytest.approx(1.0) and r.low <= 1.0 <= r.high


def test_lr_optimum_exact_parabola_vertex():
    # y = (x - log10(2e-3))^2 sampled at 5 points, no noise: the vertex is exact and the interval collapses
    x0 = math.log10(2e-3)
    obs = {10 ** x: [(x - x0) ** 2 + 1.0] for x in np.linspace(x0 - 0.3, x0 + 0.2, 5)}
    o = lr_optimum(obs)
    assert o.lr == pytest.approx(2e-3, rel=1e-6)
    assert o.low == pytest.approx(2e-3, rel=1e-6) and o.high == pytest.approx(2e-3, rel=1e-6)
    assert o.bracketed
    # maximize: the same curve upside down has the same optimum
    assert lr_optimum({k: [-v[0]] for k, v in obs.items()}, maximize=True).lr == pytest.approx(2e-3, rel=1e-6)
