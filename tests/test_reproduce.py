"""`regretless reproduce`: presets and their conditions, the cumulative zipped sweep spec, bad input, and a
miniature preset end to end on a model no preset names (real trainer subprocesses, a tiny model, a few steps).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from test_train_sft import chat_jsonl

from regretless import reproduce as R
from regretless.cli import main
from regretless.sweep import expand
from regretless.sweep.search import SearchConfig
from regretless.sweep.spec import FINDINGS, parse_spec


@pytest.mark.parametrize("name", sorted(R.PRESETS))
def test_dry_run_lists_every_finding_of_the_preset(name, capsys, tmp_path):
    assert main(["reproduce", "--preset", name, "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    for f in R.PRESETS[name].findings:
        assert f"    {f}:" in out
    assert "adaptive LR search" in out and not (tmp_path / "o").exists()


def test_quick_runs_all_five_and_standard_the_three_that_fit():
    assert R.QUICK.findings == FINDINGS
    assert set(R.STANDARD.findings) >= {"lr_ratio", "capacity", "placement"}
    assert R.STANDARD.model == "smollm2-135m"


def test_conditions_share_arms_and_batch_sees_equal_examples(tiny_llama_dir):
    conds = R.build_conditions(R.QUICK, FINDINGS, tiny_llama_dir, n_train=240, freeze=True)
    by = {c.name: c for c in conds}
    assert len(by) == len(conds) == 10  # each arm once; the batch finding reuses the base arms
    # quick draws learning curves only where the capacity finding reads them
    assert {c.name for c in conds if c.axes.get("eval_points") == 0} == {
        c.name for c in conds if c.command == "sft" and "capacity" not in c.roles} != set()
    assert {"full", "r1", "r8", "r64", "rl-full", "rl-r1"} <= set(by)
    assert set(by["r8"].roles) == {"capacity", "lr_ratio", "placement"}  # all matrices at the placement rank
    assert set(by["full"].roles) == {"capacity", "lr_ratio", "batch"}
    assert by["full"].axes["freeze_embeddings"] is True and by["rl-full"].axes["freeze_embeddings"] is True
    large = [c for c in conds if c.axes.get("batch_size") == R.QUICK.large_batch]
    assert {c.method for c in large} == {"full", "lora"}
    for c in large:
        assert c.steps >= R.QUICK.min_large_batch_steps
        small = by["full"] if c.method == "full" else by[f"r{max(R.QUICK.ranks)}"]
        assert small.steps * small.axes["batch_size"] == c.steps * c.axes["batch_size"]  # equal examples seen


def test_placement_attention_rank_is_matched(tiny_llama_dir):
    ra, attn, mlp = R.matched_attention_rank(tiny_llama_dir, 8)
    assert attn >= mlp and R.lora_params(tiny_llama_dir, "attn", ra - 1) < mlp
    assert mlp == R.lora_params(tiny_llama_dir, "mlp", 8)


def test_sweep_spec_is_exactly_the_planned_runs(tiny_llama_dir):
    conds = R.build_conditions(R.QUICK, ("lr_ratio",), tiny_llama_dir, n_train=480, freeze=False)
    by = {c.name: dataclasses.replace(c, start_lr=1e-3) for c in conds}
    plan = [("full", 1e-3, 0), ("r8", 2e-3, 0), ("r8", 2e-3, 1), ("full", 1e-3, 1)]
    spec = parse_spec(R.sweep_spec("sft", {"model": str(tiny_llama_dir), "data": "x.jsonl"}, by, plan), "t")
    runs = expand(spec)
    assert len(runs) == 4
    keys = [R.run_key("sft", r.axes, by) for r in runs]
    assert keys == plan
    assert [r.config.lora is None for r in runs] == [True, False, False, True]
    assert runs[1].config.lora.rank == 8 and runs[1].config.lr == 2e-3 and runs[2].config.seed == 1


def test_scores_lower_is_better_and_failures_worst():
    assert R.score("sft", {"final_eval_loss": 2.5}, "done") == 2.5
    assert R.score("rl", {"final_eval_accuracy": 0.4}, "done") == -0.4
    assert R.score("sft", None, "failed") == float("inf") and R.score("rl", {}, "diverged") == float("inf")
    assert R.score("sft", None, "running") is None


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "nope"], "--preset 'nope'"),
    (["--only", "capacity,speed"], "--only 'speed'"),
    (["--workers", "0"], "--workers 0"),
])
def test_cli_bad_input_exits_2_before_writing(tmp_path, capsys, argv, msg):
    out = tmp_path / "o"
    assert main(["reproduce", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_naming_a_file_is_an_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    assert main(["reproduce", "--out", str(f), "--model", "nope"]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep"


def test_materialize_data_writes_once(tmp_path):
    path = R.materialize_data("gsm-symbolic:5", tmp_path)
    assert path.name == "gsm-symbolic-5-seed0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["messages"][1]["content"].rstrip().split("\n")[-1].startswith("####")
    mtime = path.stat().st_mtime_ns
    assert R.materialize_data("gsm-symbolic:5", tmp_path).stat().st_mtime_ns == mtime
    assert R.materialize_data(str(path), tmp_path) == str(path)


def test_materialized_env_keeps_every_eval_problem_held_out(tmp_path):
    """A small task repeats questions; the JSONL holds each once, so the trainer's split keeps all 200 eval
    problems, none of them in train."""
    from regretless.rl.envs import make_env

    spec = "rg:chain_sum,min_terms=3,max_terms=3,max_digits=1"
    raw = make_env(spec, 0, 1000, 200)
    path = R.materialize_env(spec, tmp_path, 0, 1000, 200)
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    assert len(prompts) == len(set(prompts))
    env = make_env(path, 0, 1000, 200)
    assert len(env.eval) == 200 and not {p.prompt_messages[-1]["content"] for p in env.eval} & {
        p.prompt_messages[-1]["content"] for p in env.train}
    assert len(raw.train) == 1000 and len(env.train) >= 700  # duplicates went, the pool stayed large


MINI = R.Preset(
    name="mini", description="test", model="tiny-base", data="chatterbot", env="rg:chain_sum",
    sft={"steps": 3, "batch_size": 4, "seq_len": 64, "eval_size": 8, "eval_points": 3, "device": "cpu",
         "save_every": 100, "eval_every": 100},
    rl={}, ranks=(4,), large_batch=8, placement_rank=4, seeds=(0,), max_decades=1 / 3)


@pytest.mark.slow
def test_placement_on_a_local_model_and_chat_jsonl_end_to_end(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """The issue's command on a model no preset names: --model FOLDER --data CHAT.jsonl --only placement."""
    monkeypatch.setitem(R.PRESETS, "mini", MINI)
    data = chat_jsonl(tmp_path / "chat.jsonl", n=40)
    out = tmp_path / "repro"
    argv = ["reproduce", "--preset", "mini", "--model", str(tiny_llama_dir), "--data", str(data), "--only",
            "placement", "--out", str(out), "--workers", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4. Where to apply" in printed
    claims = json.loads((out / "claims.json").read_text())
    assert [c["finding"] for c in claims] == list(FINDINGS)
    placement = claims[3]
    assert placement["verdict"] in ("held", "did not hold", "inconclusive") and placement["runs"] >= 9
    ctx = json.loads((out / "reproduce.json").read_text())
    assert ctx["model"]["path"] == str(tiny_llama_dir) and ctx["data"] == str(data)
    ra = R.matched_attention_rank(tiny_llama_dir, 4)[0]
    assert {c["name"] for c in ctx["conditions"]} == {"mlp-r4", f"attn-r{ra}", "r4"}
    assert all(c["search"] in ("done", "capped") for c in ctx["conditions"])
    assert all(c["runs"] >= 3 for c in ctx["conditions"])  # 3 points a decade around each start, at least
    html = (out / "report.html").read_text()
    assert "Where to apply" in html and str(tiny_llama_dir) in html
    # a rerun replays the same search and starts no run
    logs = {p: p.stat().st_mtime_ns for p in out.glob("sft/runs/*/stderr.log")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("sft/runs/*/stderr.log")} == logs


def test_ranks_above_a_matrix_side_are_capped_before_anything_runs(tiny_llama_dir):
    """A preset rank larger than the model's smallest adapted matrix side would fail every run of it (the
    injector refuses it): the preset is fitted to the model first, and says so."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    side = min(cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
               cfg.hidden_size, cfg.intermediate_size)
    assert R.rank_limit(tiny_llama_dir) == side
    fitted, note = R.fit_ranks(dataclasses.replace(MINI, ranks=(1, side, 4 * side)), tiny_llama_dir)
    assert fitted.ranks == (1, side) and f"capped at {side}" in note
    same, none = R.fit_ranks(dataclasses.replace(MINI, ranks=(1, 2)), tiny_llama_dir)
    assert none is None and same.ranks == (1, 2)
    for c in R.build_conditions(fitted, FINDINGS, tiny_llama_dir, 64, False):
        if c.axes.get("method") == "lora":
            R.lora_params(tiny_llama_dir, c.axes.get("lora.targets", "all"), c.axes["lora.rank"])  # no error


def test_full_preset_batch_arms_reuse_the_base_arms():
    """128 steps of 8 = 32 steps of 32 (at least min_large_batch_steps): the small-batch arms of the batch finding
    are the base arms, so the preset has 10 conditions, not 12."""
    assert R.FULL.sft["steps"] * R.FULL.sft["batch_size"] == 32 * R.FULL.large_batch
    assert 32 >= R.FULL.min_large_batch_steps


U_CURVE_TRAINER = r'''
import argparse, json, math
from pathlib import Path
import yaml
p = argparse.ArgumentParser()
p.add_argument("command"); p.add_argument("--config"); p.add_argument("--out"); p.add_argument("--resume", action="store_true")
a = p.parse_args()
cfg = yaml.safe_load(open(a.config))
out = Path(a.out)
with open(out.parent.parent / "launches.log", "a") as f:
    f.write(out.name + "\n")
opt = 1e-2 if cfg.get("lora") else 1e-3  # the optimal LR: 10x for LoRA
loss = 1.0 + (math.log10(cfg["lr"] / opt)) ** 2 + 0.01 * cfg["seed"]
rows = [{"step": s, "loss": loss + 1.0 / s, "eval_loss": loss + 1.0 / s} for s in (1, 2, 3)]
(out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
json.dump({"status": "done", "steps": 3, "final_loss": loss, "final_eval_loss": loss, "best_eval_loss": loss,
           "trainable_params": 10, "lr": cfg["lr"], "wall_s": 0.1}, open(out / "summary.json", "w"))
'''


def test_a_resumed_search_replays_and_reports_every_run(tiny_llama_dir, tmp_path):
    """A reproduction stopped after its first round and started again replays the search from the ledger: it
    launches only the runs that had not finished, and its spec, context and claims cover every run of the
    search, as one uninterrupted invocation's do (a resumed invocation used to report only its own runs)."""
    import sys

    from regretless.sweep.ledger import current_rows

    trainer = tmp_path / "u_trainer.py"
    trainer.write_text(U_CURVE_TRAINER)
    launcher = [sys.executable, str(trainer), "{command}", "--config", "{config}", "--out", "{out}", "--resume"]
    data = chat_jsonl(tmp_path / "chat.jsonl", n=40)
    mini = dataclasses.replace(MINI, seeds=(0, 1), max_decades=2.0)
    kw = {"model": str(tiny_llama_dir), "data": str(data), "only": "lr_ratio", "quiet": True, "launcher": launcher}

    whole = R.reproduce(mini, tmp_path / "whole", **kw)
    R.reproduce(mini, tmp_path / "parts", max_rounds=1, **kw)
    first = (tmp_path / "parts" / "sft" / "launches.log").read_text().split()
    parts = R.reproduce(mini, tmp_path / "parts", **kw)
    launched = (tmp_path / "parts" / "sft" / "launches.log").read_text().split()
    assert len(launched) == len(set(launched))  # nothing the first invocation finished ran again
    n = whole["context"]["runs"]
    assert parts["context"]["runs"] == n == len(launched) > len(first)
    ids = {r["id"] for r in current_rows(tmp_path / "whole" / "sft")}
    assert {r["id"] for r in current_rows(tmp_path / "parts" / "sft")} == ids and len(ids) == n
    assert [c["search"] for c in parts["context"]["conditions"]] == ["done", "done"]
    claim = {c["finding"]: c for c in parts["report"]["claims"]}["lr_ratio"]
    same = {c["finding"]: c for c in whole["report"]["claims"]}["lr_ratio"]
    assert claim["runs"] == same["runs"] and claim["ratio"] == pytest.approx(same["ratio"])
    assert claim["ratio"] == pytest.approx(10, rel=0.1)
    # started again with nothing left: no launch, the same report
    again = R.reproduce(mini, tmp_path / "parts", **kw)
    assert (tmp_path / "parts" / "sft" / "launches.log").read_text().split() == launched
    assert again["context"]["runs"] == n and again["context"]["rounds"] == 0


U_CURVE_RL_TRAINER = U_CURVE_TRAINER.replace('''opt = 1e-2 if cfg.get("lora") else 1e-3''', '''if a.command == "rl":
    opt = 1e-3 if cfg.get("lora") else 1e-4
    acc = 0.6 - 0.2 * math.log10(cfg["lr"] / opt) ** 2 + 0.001 * cfg["seed"]
    rows = [{"step": 0, "eval_accuracy": 0.1}, {"step": 3, "reward": acc, "eval_accuracy": acc}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    json.dump({"status": "done", "steps": 3, "final_reward": acc, "final_eval_accuracy": acc,
               "eval_problems": 500, "trainable_params": 10, "lr": cfg["lr"], "wall_s": 0.1},
              open(out / "summary.json", "w"))
    raise SystemExit(0)
opt = 1e-2 if cfg.get("lora") else 1e-3''')


def test_rl_confirmation_seeds_run_at_each_arms_best_lr_only(tiny_llama_dir, tmp_path):
    """A preset's `rl_confirm_seeds` (the full preset's: 2, 3) give each RL arm's best LR those seeds too, after
    its decisive runs, and nothing else: no other RL LR and no SFT run gets them. Its `rl_first_span` (2 here)
    starts each RL search with the guess and 2 grid points each side (a first round of 1 point each side could
    reach both k = -2 and k = +2 only by extending both ways)."""
    import sys

    from regretless.sweep.ledger import current_rows

    trainer = tmp_path / "u_trainer.py"
    trainer.write_text(U_CURVE_RL_TRAINER)
    launcher = [sys.executable, str(trainer), "{command}", "--config", "{config}", "--out", "{out}", "--resume"]
    mini = dataclasses.replace(MINI, seeds=(0, 1), rl_confirm_seeds=(2, 3), rl_first_span=2, max_decades=2.0,
                               rl={"steps": 3, "problems_per_step": 2, "group_size": 2, "max_new_tokens": 4,
                                   "train_size": 64, "eval_size": 16, "device": "cpu"})
    res = R.reproduce(mini, tmp_path / "o", model=str(tiny_llama_dir), data=str(chat_jsonl(tmp_path / "c.jsonl", n=40)),
                      only="lr_ratio,rl", quiet=True, launcher=launcher)
    assert res["context"]["rl_confirm_seeds"] == [2, 3]
    assert {c["name"]: c["search"] for c in res["context"]["conditions"]} == dict.fromkeys(
        ["full", "r4", "rl-full", "rl-r1"], "done")
    sft_seeds = {r["axes"]["seed"] for r in current_rows(tmp_path / "o" / "sft")}
    assert sft_seeds == {0, 1}
    by_arm: dict[str, dict[float, set[int]]] = {}
    for r in current_rows(tmp_path / "o" / "rl"):
        axes = r["axes"]
        by_arm.setdefault(axes["method"], {}).setdefault(axes["lr"], set()).add(axes["seed"])
    for method, opt in (("full", 1e-4), ("lora", 1e-3)):
        lrs = by_arm[method]
        best = min(lrs, key=lambda lr: abs(math.log10(lr / opt)))
        assert lrs[best] == {0, 1, 2, 3}, method
        assert all(s <= {0, 1} for lr, s in lrs.items() if lr != best), method
    at = SearchConfig().lr_at
    for c in res["context"]["conditions"]:
        if c["command"] == "rl":
            method = c["axes"]["method"]
            assert {at(c["start_lr"], k) for k in range(-2, 3)} <= set(by_arm[method]), (method, c["start_lr"])
    claim = {c["finding"]: c for c in res["report"]["claims"]}["rl"]
    assert claim["seeds"] == 4 and claim["runs"] == sum(len(s) for v in by_arm.values() for s in v.values())
    assert claim["optimal_lr"]["rl-full"]["best_lr"] == pytest.approx(1e-4, rel=0.2)
