"""Sweep specs: validation errors name the file and key; grid expansion counts; stable ids; LR grids."""

from __future__ import annotations

import math
import sys

import pytest
import yaml

from regretless.cli import main
from regretless.config import SFTConfig
from regretless.errors import UserError
from regretless.sweep.spec import expand, load_spec, lr_grid, parse_spec, run_id


def _write(tmp_path, d, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("spec, match", [
    ({"command": "dpo", "axes": {}}, r"command: 'dpo' is not a trainer"),
    ({"command": "sft", "axes": {"lrr": [1e-4]}}, r"axes.lrr: 'lrr' is not a field of SFTConfig"),
    ({"command": "sft", "axes": {"lora.rnk": [4]}}, r"axes.lora.rnk: 'rnk' is not a field of LoRAConfig"),
    ({"command": "sft", "axes": {"seed.x": [4]}}, r"axes.seed.x: field 'seed' has no sub-fields"),
    ({"command": "sft", "axes": {"lr": []}}, r"axes.lr: empty list"),
    ({"command": "sft", "axes": {"lr": 1e-4}}, r"axes.lr: expected a list"),
    ({"command": "sft", "axes": {"method": ["full", "qlora"]}}, r"axes.method: values must be full or lora"),
    ({"command": "sft", "base": {"lerning_rate": 1}}, r"base: unknown field 'lerning_rate'"),
    ({"command": "sft", "axis": {}}, r"unknown key 'axis'"),
    ({"command": "rl", "axes": {"batch_size": [8]}}, r"'batch_size' is not a field of RLConfig"),
    ({"command": "sft", "axes": {"lr": {"around_recipe": True, "center": 1e-4}}}, r"exactly one of"),
    ({"command": "sft", "axes": {"lr": [1e-4], "lora.rank": [1, 2]}, "zip": [["lr", "lora.rank"]]},
     r"equal length"),
    ({"command": "sft", "axes": {"lr": [1e-4]}, "exclude": [{"batch_size": 8}]}, r"exclude: 'batch_size'"),
    ({"command": "sft", "axes": {"lr": [1e-4]}, "findings": ["speed"]}, r"findings: 'speed' unknown"),
])
def test_spec_errors_name_file_and_key(tmp_path, spec, match):
    path = _write(tmp_path, spec)
    with pytest.raises(UserError, match=match) as e:
        load_spec(path)
    assert str(path) in str(e.value)


def test_bad_value_is_caught_at_expansion_before_any_run(tmp_path):
    spec = load_spec(_write(tmp_path, {"command": "sft", "axes": {"lora.rank": [4, "big"]}}))
    with pytest.raises(UserError, match=r"spec.yaml: grid point .*'rank'.*expected an integer"):
        expand(spec)


def test_empty_grid_after_exclusion(tmp_path):
    spec = load_spec(_write(tmp_path, {"command": "sft", "axes": {"method": ["full"]},
                                       "exclude": [{"method": "full"}]}))
    with pytest.raises(UserError, match="grid is empty"):
        expand(spec)


def test_grid_counts_collapse_rank_for_full():
    spec = parse_spec({"command": "sft", "base": {"steps": 5},
                       "axes": {"method": ["full", "lora"], "lora.rank": [1, 4, 16], "lr": [1e-4, 1e-3]},
                       "seeds": [0, 1]})
    runs = expand(spec)
    assert len(runs) == (1 + 3) * 2 * 2  # full collapses over rank
    full = [r for r in runs if r.config.lora is None]
    assert len(full) == 4 and all("lora.rank" not in r.axes for r in full)
    lora = [r for r in runs if r.config.lora is not None]
    assert sorted({r.config.lora.rank for r in lora}) == [1, 4, 16]
    assert {r.config.seed for r in runs} == {0, 1}
    assert len({r.id for r in runs}) == len(runs)
    assert "lora-r16-lr1e-3-s1" in {r.name for r in runs}
    # ids are stable (a hash of the config) and independent of the output folder
    again = expand(spec)
    assert [r.id for r in runs] == [r.id for r in again]
    r0 = runs[0]
    import dataclasses

    assert run_id("sft", dataclasses.replace(r0.config, out="/elsewhere")) == r0.id


def test_zip_exclude_and_nested_targets():
    spec = parse_spec({"command": "sft", "base": {"lora": None},
                       "axes": {"method": ["lora"], "lora.targets": ["attn", "mlp", "all"],
                                "lora.rank": [256, 128, 128], "batch_size": [8, 32]},
                       "zip": [["lora.targets", "lora.rank"]],
                       "exclude": [{"lora.targets": "attn", "batch_size": [32]}]})
    runs = expand(spec)
    assert len(runs) == 3 * 2 - 1
    pairs = {(r.config.lora.targets, r.config.lora.rank, r.config.batch_size) for r in runs}
    assert ("attn", 256, 8) in pairs and ("attn", 256, 32) not in pairs and ("mlp", 128, 32) in pairs
    assert spec.findings == ("placement",)


def test_lr_grid_and_center():
    g = lr_grid(1e-3, points_per_decade=2, decades=2)
    assert len(g) == 5 and math.isclose(g[2], 1e-3) and math.isclose(g[0], 1e-4) and math.isclose(g[-1], 1e-2)
    assert math.isclose(g[1], 10**-3.5, rel_tol=1e-3)
    spec = parse_spec({"command": "sft", "axes": {"method": ["full", "lora"],
                                                   "lr": {"center": 2e-4, "points_per_decade": 1, "decades": 2}}})
    assert len(expand(spec)) == 6


def test_lr_around_recipe_uses_the_recipe_per_method_and_steps():
    from regretless.known_models import known_config
    from regretless.recipe import default_lr

    spec = parse_spec({"command": "sft", "base": {"model": "SmolLM2-135M", "steps": 50},
                       "axes": {"method": ["full", "lora"],
                                "lr": {"around_recipe": True, "points_per_decade": 1, "decades": 2}}})
    runs = expand(spec)
    assert len(runs) == 6
    full_center = default_lr(known_config("SmolLM2-135M"), "full", 50)[0]
    lora_center = default_lr(known_config("SmolLM2-135M"), "lora", 50)[0]
    full = sorted(r.config.lr for r in runs if r.config.lora is None)
    lora = sorted(r.config.lr for r in runs if r.config.lora is not None)
    assert full[1] == pytest.approx(full_center, rel=1e-3) and lora[1] == pytest.approx(lora_center, rel=1e-3)
    assert full[0] == pytest.approx(full_center / 10, rel=1e-3) and lora[2] == pytest.approx(lora_center * 10, rel=1e-3)
    # a custom centre (what `reproduce` may pass) overrides the recipe
    custom = expand(spec, lr_center=lambda cfg, method: 1e-3 if method == "lora" else 1e-4)
    assert {r.config.lr for r in custom} == {1e-5, 1e-4, 1e-3, 1e-2}


def test_lr_around_recipe_without_recipe_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "regretless.recipe", None)  # import fails
    spec = parse_spec({"command": "sft", "axes": {"lr": {"around_recipe": True}}})
    with pytest.raises(UserError, match="around_recipe needs regretless.recipe"):
        expand(spec)


def test_base_config_is_respected():
    runs = expand(parse_spec({"command": "sft", "base": {"model": "m", "seq_len": 64},
                              "axes": {"lora.rank": [2]}}))
    assert runs[0].config == SFTConfig(model="m", seq_len=64, lora=SFTConfig().lora.__class__(rank=2))


def test_cli_dry_run_and_errors(tmp_path, capsys):
    good = _write(tmp_path, {"command": "sft", "axes": {"method": ["full", "lora"], "lora.rank": [1, 8]}})
    assert main(["sweep", str(good), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 runs, 3 to run" in out and "lora-r8" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    bad = _write(tmp_path, {"command": "sft", "axes": {"rank": [1]}}, "bad.yaml")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: axes.rank: 'rank' is not a field of SFTConfig" in err and not (tmp_path / "out").exists()
