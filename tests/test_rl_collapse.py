"""Collapse rules (pure, hand-computed thresholds) and a real tiny model driven to collapse by a huge LR: the run
ends `diverged` (exit 3) with the reason, while the same run at a sane LR ends `done`."""

from __future__ import annotations

import json
import math

import pytest

from regretless.cli import main as cli_main
from regretless.rl import collapse
from regretless.rl.collapse import check_eval, check_step, new_tracker, zero_streak_needed

LN_V = math.log(512)


def run(steps: list[tuple[float, float]], problems: int = 8, vocab: int = 512) -> tuple[int | None, str | None]:
    """Feed (entropy, accuracy) steps; -> (1-based step where a rule fired, reason) or (None, None)."""
    t = new_tracker()
    for k, (ent, acc) in enumerate(steps, 1):
        why = check_step(t, ent, acc, problems, vocab)
        if why:
            return k, why
    return None, None


def test_zero_streak_needed_hand_computed():
    assert zero_streak_needed(0.0, 8) is None  # never rewarded: no rule
    assert zero_streak_needed(0.5, 8) == 3  # log(1e-3) / (8 log 0.5) = 1.25 -> at least MIN_ZERO_STEPS
    assert zero_streak_needed(0.02, 8) == 43  # 6.9078 / (8 * 0.020203) = 42.74
    assert zero_streak_needed(0.16, 4) == 10  # 6.9078 / (4 * 0.17435) = 9.905
    assert zero_streak_needed(1.0, 8) == collapse.MIN_ZERO_STEPS


def test_reward_collapse_fires_after_the_needed_streak_only():
    good = [(1.0, 0.5)] * 5
    assert run(good + [(1.0, 0.0)] * 2) == (None, None)
    k, why = run(good + [(1.0, 0.0)] * 3)
    assert k == 8 and "reward collapsed" in why
    # a hard task: rare successes, so a long run of zeros is no evidence of collapse
    sparse = [(1.0, 0.02 if i % 3 == 0 else 0.0) for i in range(60)]
    assert run(sparse) == (None, None)
    assert run([(1.0, 0.0)] * 50) == (None, None)  # never rewarded


def test_entropy_rule_needs_a_low_start_and_two_steps():
    high = collapse.ENTROPY_FRAC * LN_V + 0.1
    assert run([(1.0, 0.3), (high, 0.3)]) == (None, None)  # one spike
    k, why = run([(1.0, 0.3), (high, 0.3), (high, 0.3)])
    assert k == 3 and "near-uniform" in why
    assert run([(1.0, 0.3), (high, 0.3), (1.0, 0.3), (high, 0.3)]) == (None, None)
    near_uniform_start = [(LN_V - 0.05, 0.3)] * 10  # a random-init model starts near ln V
    assert run(near_uniform_start) == (None, None)
    # what the first quick preset's tiny-base RL runs showed (git history) (vocab 2048): 0.81 nats, then 7.1-7.2 > 0.9 ln 2048 = 6.86
    assert run([(0.81, 0.03), (1.3, 0.0), (7.17, 0.0), (7.2, 0.0)], vocab=2048)[0] == 4


def test_eval_rule_hand_computed():
    assert check_eval(0.165, 0.0, 64) is not None  # 0.835^64 = 1e-5
    assert check_eval(0.05, 0.0, 64) is None  # 0.95^64 = 0.037: could be chance
    assert check_eval(0.165, 0.02, 64) is None
    assert check_eval(0.0, 0.0, 64) is None and check_eval(None, 0.0, 64) is None
    assert check_eval(0.11, 0.0, 64) is not None and check_eval(0.10, 0.0, 64) is None  # 0.89^64 < 1e-3 < 0.9^64


REWARD = "def one_e(completion, answer):\n    return float(completion[:12].count('e') == 1)\n"


@pytest.mark.parametrize("lr, status", [(1.0, "diverged"), (1e-3, "done")])
def test_huge_lr_collapse_ends_diverged(tiny_llama_dir, tmp_path, capsys, lr, status):
    """FullFT at LR 1 (no clipping) turns the tiny model into one that repeats a token: exactly one 'e' in the
    first 12 characters, rewarded about half the time at first, is never met again."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(40)))
    (tmp_path / "rw.py").write_text(REWARD)
    out = tmp_path / "run"
    rc = cli_main(["rl", "--model", str(tiny_llama_dir), "--env", str(data), "--reward", f"{tmp_path / 'rw.py'}:one_e",
                   "--out", str(out), "--full", "--lr", str(lr), "--steps", "12", "--problems-per-step", "4",
                   "--group-size", "4", "--max-new-tokens", "6", "--device", "cpu", "grad_clip=0", "eval_size=4",
                   "eval_every=100", "train_size=24"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == status and rc == (3 if status == "diverged" else 0)
    if status == "diverged":
        assert "reward collapsed" in summary["reason"] and summary["steps"] < 12
        assert "diverged: no sample rewarded" in capsys.readouterr().err
        assert not (out / "model").exists()
    else:
        assert summary["reason"] is None and summary["steps"] == 12
