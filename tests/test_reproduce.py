"""`regretless reproduce`: presets expand to valid sweeps, `--only` selection, bad input, and a miniature preset
end to end through the same code path (real trainer subprocesses, a tiny random model, a few steps)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from regretless import reproduce as R
from regretless.cli import main
from regretless.config import CONFIGS, field_types
from regretless.errors import UserError
from regretless.sweep import expand
from regretless.sweep.spec import FINDINGS


def _field(cls: type, key: str) -> bool:
    """Is the dotted `key` a real field of `cls` (through nested dataclasses)?"""
    if key == "method":
        return True
    for part in key.split("."):
        types_ = field_types(cls)
        if part not in types_:
            return False
        nested = [a for a in (getattr(types_[part], "__args__", None) or (types_[part],))
                  if dataclasses.is_dataclass(a)]
        cls = nested[0] if nested else None
    return True


@pytest.mark.parametrize("name", sorted(R.PRESETS))
def test_presets_expand_to_valid_sweeps(name):
    preset = R.PRESETS[name]
    served = {f for s in preset.sweeps for f in s["findings"]}
    assert served == set(FINDINGS)
    names = [s["name"] for s in preset.sweeps]
    assert len(names) == len(set(names))
    for spec, n in R.plan(preset):
        cls = CONFIGS[spec.command]
        assert all(_field(cls, k) for k in spec.axes), spec.axes
        assert n >= 2
        runs = expand(spec)
        assert all(r.config.model == preset.model for r in runs)
        methods = {"full" if r.config.lora is None else "lora" for r in runs}
        if spec.name != "placement":
            assert methods == {"full", "lora"}, spec.name
        conditions = {(r.config.lora and (r.config.lora.rank, r.config.lora.targets)) for r in runs}
        for cond in conditions:  # every condition has at least two LRs to pick the best from
            assert len({r.config.lr for r in runs if (r.config.lora and (r.config.lora.rank, r.config.lora.targets))
                        == cond}) >= 2, (spec.name, cond)


def test_quick_lr_grid_covers_every_condition():
    runs = expand(next(s for s in R.specs("quick") if s.name == "ranks_lrs"))
    grids = {}
    for r in runs:
        grids.setdefault(None if r.config.lora is None else r.config.lora.rank, set()).add(r.config.lr)
    assert set(grids) == {None, 1, 8, 64}
    assert all(sorted(g) == R.QUICK_LRS for g in grids.values())
    assert len(R.QUICK_LRS) >= 3 and R.QUICK_LRS[-1] / R.QUICK_LRS[0] >= 10


def test_placement_matched_pair_is_matched():
    """The quick preset's attention r=12 and MLP r=8 adapt exactly as many parameters on tiny-base's shape."""
    from regretless.pretrain import SHAPE

    h, i, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    kv = h * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    attn = layers * 12 * (2 * (h + h) + 2 * (h + kv))
    mlp = layers * 8 * 3 * (h + i)
    assert attn == mlp


def test_only_selects_the_sweeps_serving_those_findings():
    assert R.parse_only(None) == FINDINGS
    assert R.parse_only("rl, capacity") == ("capacity", "rl")
    assert [s.name for s in R.specs("quick", "rl")] == ["rl"]
    assert [s.name for s in R.specs("quick", "batch")] == ["ranks_lrs", "batch"]
    assert [s.name for s in R.specs("full", ["placement", "capacity"])] == ["ranks_lrs", "placement"]


@pytest.mark.parametrize("only", ["capacity,bogus", "lr", ",", ""])
def test_bad_only_is_a_user_error(only):
    with pytest.raises(UserError, match="--only"):
        R.parse_only(only)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path / "o"), "--only", "capcity"]) == 2
    assert "capcity" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "huge", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_dry_run_lists_sweeps(tmp_path, capsys):
    assert main(["reproduce", "--preset", "full", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ranks_lrs" in out and "rl" in out and "runs in all" in out
    assert not (tmp_path / "o").exists()


def test_materialize_data_writes_once(tmp_path):
    path = R.materialize_data("gsm-symbolic:5", tmp_path)
    assert path.name == "gsm-symbolic-5-seed0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["messages"][1]["content"].rstrip().split("\n")[-1].startswith("####")
    mtime = path.stat().st_mtime_ns
    assert R.materialize_data("gsm-symbolic:5", tmp_path).stat().st_mtime_ns == mtime
    assert R.materialize_data(str(path), tmp_path) == str(path)


def mini_preset(model: str) -> R.Preset:
    """The quick preset's shape at toy scale: same sweep names and findings, a few steps of a tiny model."""
    sft = {"model": model, "data": "gsm-symbolic:24", "steps": 3, "batch_size": 4, "seq_len": 512, "eval_size": 4,
           "eval_every": 100, "save_every": 100, "device": "cpu"}
    rl = {"model": model, "env": "rg:chain_sum,max_terms=2,max_digits=1", "steps": 2, "problems_per_step": 2,
          "group_size": 2, "max_new_tokens": 4, "train_size": 8, "eval_size": 0, "save_every": 100,
          "device": "cpu"}
    return R.Preset(name="mini", model=model, description="test", sweeps=(
        {"name": "ranks_lrs", "command": "sft", "findings": ["capacity", "lr_ratio", "batch", "placement"],
         "base": sft, "axes": {"method": ["full", "lora"], "lora.rank": [1, 4], "lr": [1e-3]},
         "exclude": [{"method": "lora", "lora.rank": 1}]},
        {"name": "batch", "command": "sft", "findings": ["batch"], "base": {**sft, "batch_size": 8, "steps": 2},
         "axes": {"lora.rank": [4], "lr": [1e-3]}},
        {"name": "placement", "command": "sft", "findings": ["placement"], "base": sft,
         "axes": {"lora.targets": ["attn"], "lora.rank": [4], "lr": [1e-3]}},
        {"name": "rl", "command": "rl", "findings": ["rl"], "base": rl,
         "axes": {"method": ["full", "lora"], "lora.rank": [1], "lr": [1e-3]}},
    ))


@pytest.mark.slow
def test_mini_preset_end_to_end(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "repro"
    result = R.reproduce(mini_preset(str(tiny_llama_dir)), out, workers=2, quiet=True)
    failed = [r["error"] for r in result["report"]["failed_runs"]]
    assert all(c == {"done": n} for c, n in zip(result["sweeps"].values(), (2, 1, 1, 2))), failed
    claims = json.loads((out / "claims.json").read_text())["claims"]
    assert [c["finding"] for c in claims] == list(FINDINGS)
    assert all(c["verdict"] in ("held", "did not hold", "inconclusive") for c in claims)
    assert (out / "report.html").read_text().count("<tr>") == 1 + len(FINDINGS)
    assert {p.name for p in out.iterdir()} >= {"ranks_lrs", "batch", "placement", "rl", "data", "figures",
                                               "report.html", "claims.json", "reproduce.json"}
    assert json.loads((out / "reproduce.json").read_text())["timing"]["total_s"] > 0
    lines = R.summary_lines(result)
    assert len(lines) == 2 * len(FINDINGS) and lines[0].startswith("1. Capacity")
    # resumable: a rerun starts no run (every run folder keeps its stderr.log untouched)
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/runs/*/stderr.log")}
    again = R.reproduce(mini_preset(str(tiny_llama_dir)), out, workers=2, quiet=True, only="rl")
    assert list(again["sweeps"]) == ["rl"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/runs/*/stderr.log")} == logs
