"""`reproduce`: the paper's five findings as sweeps on one model, run into one folder, then the report.

A preset is data: a model, a one-line description and a list of sweep specs (the dicts `regretless sweep`
reads as YAML, see `regretless.sweep.spec`). Each spec's `name` is its folder under DIR and its `findings`
are the claims its runs serve. One sweep may serve several findings, so runs are shared where the same runs
answer two questions: in both presets the SFT grid over methods, ranks and LRs gives the capacity curves
(pointwise minimum over LRs), the LR U-curves, the small-batch point of the batch comparison and the
all-matrices point of the placement comparison. `--only capacity,rl` runs every sweep that serves one of the
named findings (so `--only batch` also runs the shared SFT grid).

    result = reproduce("quick", "runs/quick")          # or PRESETS["full"], only=("rl",), workers=2
    result["report"]["claims"]                         # the claims table (also DIR/claims.json, DIR/report.html)

Layout: DIR/<sweep name>/ (one sweep folder each: spec.yaml, ledger.sqlite, runs/), DIR/data/ (built-in SFT
data written once as JSONL, so each run reads a file instead of regenerating it: reasoning-gym takes seconds
per run, a real share of a 15-minute budget), DIR/reproduce.json (timings), DIR/report.html, DIR/claims.json,
DIR/figures/. Rerunning skips finished runs (the sweep runner's resume) and the cached model.

Departures from the paper's protocol in `quick` (all so that it runs on 2 CPU cores in 15 minutes; see
docs/reproduce.md): a 1M-parameter model pretrained by regretless itself (`regretless.pretrain`, built-in
`tiny-base`) instead of 8B models; one epoch (80 steps) of 636 GSM-style worked solutions instead of Tulu3 /
OpenThoughts; batch 8 vs 64 instead of 32 vs 1024+; 2-3 LRs per condition, half a decade apart, one grid for
both methods placed where probe runs found the optima (an optimum on a grid edge makes the LR claim
inconclusive, never held); RL on 2-term 1-digit `chain_sum` (reward measured on the training samples, no
held-out set: the task has only 200 distinct problems) instead of MATH/GSM8K; one seed.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.sweep.spec import FINDINGS, SweepSpec, expand, parse_spec


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    description: str
    sweeps: tuple[dict[str, Any], ...]  # sweep spec dicts; each has `name` (its folder) and `findings`


def _per_method(full: list[float], lora: list[float]) -> dict[str, Any]:
    """An `lr` axis holding both grids, plus the `exclude` rules that give each method only its own grid."""
    return {"lr": sorted(set(full) | set(lora)),
            "exclude": [{"method": "full", "lr": [x for x in lora if x not in full]},
                        {"method": "lora", "lr": [x for x in full if x not in lora]}]}


# ---- quick: tiny-base on 2 CPU cores in <= 15 minutes ---------------------------------------------------
QUICK_SFT = {"model": "tiny-base", "data": "gsm-symbolic:700", "epochs": 1.0, "batch_size": 8, "seq_len": 256,
             "eval_size": 64, "eval_every": 100_000, "save_every": 100_000, "device": "cpu", "dtype": "fp32"}
QUICK_LRS = [1e-3, 3e-3, 1e-2]  # one grid for both methods: probe runs put both optima near 3e-3 on tiny-base
QUICK_RL = {"model": "tiny-base", "env": "rg:chain_sum,max_terms=2,max_digits=1", "steps": 50,
            "problems_per_step": 8, "group_size": 8, "max_new_tokens": 8, "train_size": 2000, "eval_size": 0,
            "save_every": 100_000, "device": "cpu", "dtype": "fp32"}
_q_rl = _per_method([1e-3, 3e-3], [3e-3, 1e-2])

QUICK = Preset(
    name="quick", model="tiny-base",
    description="tiny-base (1M params, pretrained here), 636 GSM-style solutions, batch 8 vs 64, RL on "
                "1-digit chain_sum; 2 CPU cores, <= 15 minutes",
    sweeps=(
        {"name": "ranks_lrs", "command": "sft", "findings": ["capacity", "lr_ratio", "batch", "placement"],
         "base": QUICK_SFT,
         "axes": {"method": ["full", "lora"], "lora.rank": [1, 8, 64], "lr": QUICK_LRS}},
        {"name": "batch", "command": "sft", "findings": ["batch"], "base": {**QUICK_SFT, "batch_size": 64},
         "axes": {"method": ["full", "lora"], "lora.rank": [64], "lr": QUICK_LRS[1:]}},  # 8x fewer steps
        {"name": "placement", "command": "sft", "findings": ["placement"], "base": QUICK_SFT,
         # per layer, attention r*(4*2*128) and MLP r*(3*(128+384)) parameters: attention r=12 and MLP r=8 have
         # exactly as many (49,152 in all), the paper's matched comparison; r=8 everywhere is the unmatched one
         "axes": {"lora.targets": ["attn", "attn", "mlp"], "lora.rank": [8, 12, 8], "lr": QUICK_LRS[:2]},
         "zip": [["lora.targets", "lora.rank"]]},
        {"name": "rl", "command": "rl", "findings": ["rl"], "base": QUICK_RL,
         "axes": {"method": ["full", "lora"], "lora.rank": [1], "lr": _q_rl["lr"]}, "exclude": _q_rl["exclude"]},
    ),
)

# ---- full: SmolLM2-135M with paper-like budgets (a GPU, or a long CPU run) -------------------------------
FULL_SFT = {"model": "smollm2-135m", "data": "gsm-symbolic:10000", "epochs": 1.0, "batch_size": 32,
            "micro_batch_size": 32, "seq_len": 512, "eval_size": 256, "eval_every": 50, "save_every": 100}
_AROUND = {"around_recipe": True, "points_per_decade": 2, "decades": 2}
FULL_RL = {"model": "smollm2-135m", "env": "rg:chain_sum", "steps": 200, "problems_per_step": 16,
           "group_size": 8, "max_new_tokens": 96, "eval_size": 200, "eval_every": 20, "save_every": 50}

FULL = Preset(
    name="full", model="smollm2-135m",
    description="SmolLM2-135M, 10,000 GSM-style solutions, ranks 1-256, batch 32 vs 256/1024, RL rank 1 vs "
                "FullFT on chain_sum; for a GPU or a long CPU run",
    sweeps=(
        {"name": "ranks_lrs", "command": "sft", "findings": ["capacity", "lr_ratio", "batch", "placement"],
         "base": FULL_SFT, "axes": {"method": ["full", "lora"], "lora.rank": [1, 4, 16, 64, 256], "lr": _AROUND}},
        {"name": "batch", "command": "sft", "findings": ["batch"], "base": FULL_SFT,
         "axes": {"method": ["full", "lora"], "lora.rank": [256], "batch_size": [256, 1024], "lr": _AROUND}},
        {"name": "placement", "command": "sft", "findings": ["placement"], "base": FULL_SFT,
         # SmolLM2-135M per layer and rank: attention 3,840 and MLP 6,336 parameters, so attention r=256
         # (983k) has more than MLP r=128 (811k): the paper's "attention r=256 loses to MLP r=128"
         "axes": {"lora.targets": ["attn", "attn", "mlp", "mlp"], "lora.rank": [64, 256, 64, 128], "lr": _AROUND},
         "zip": [["lora.targets", "lora.rank"]]},
        {"name": "rl", "command": "rl", "findings": ["rl"], "base": FULL_RL,
         "axes": {"method": ["full", "lora"], "lora.rank": [1], "lr": _AROUND}},
    ),
)

PRESETS: dict[str, Preset] = {"quick": QUICK, "full": FULL}


def parse_only(only: str | Iterable[str] | None) -> tuple[str, ...]:
    """'capacity,rl' -> ('capacity', 'rl') in the paper's order; None or '' -> all five."""
    if only is None:
        return FINDINGS
    items = [s.strip() for s in (only.split(",") if isinstance(only, str) else only)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in FINDINGS]
    if bad:
        raise UserError(f"--only {bad[0]!r}: not a finding; expected a comma-separated list of: "
                        f"{', '.join(FINDINGS)}")
    if not items:
        raise UserError(f"--only: empty; expected a comma-separated list of: {', '.join(FINDINGS)}")
    return tuple(f for f in FINDINGS if f in items)


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: expected one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def select(preset: Preset, only: Sequence[str]) -> list[dict[str, Any]]:
    """The preset's sweep specs that serve at least one finding in `only`, in preset order."""
    return [s for s in preset.sweeps if set(s["findings"]) & set(only)]


def specs(preset: str | Preset, only: str | Iterable[str] | None = None, data_dir: Path | None = None
          ) -> list[SweepSpec]:
    """Validated sweep specs (every axis a real config field). With `data_dir`, built-in SFT data is replaced
    by the JSONL file it is written to there (`materialize_data`)."""
    p = get_preset(preset)
    out = []
    for d in select(p, parse_only(only)):
        d = copy.deepcopy(d)
        if data_dir is not None and d["command"] == "sft" and "data" in d.get("base", {}):
            d["base"]["data"] = str(materialize_data(d["base"]["data"], data_dir))
        out.append(parse_spec(d, f"preset {p.name}: sweep {d['name']}"))
    return out


def materialize_data(spec: str, data_dir: Path, seed: int = 0) -> Path | str:
    """Write built-in data `spec` (e.g. gsm-symbolic:700) once to data_dir as chat JSONL; return its path.
    Paths and anything that is not a built-in name are returned unchanged."""
    from regretless.config import atomic_write_text
    from regretless.data import BUILTINS, load_examples

    name, _, size = spec.partition(":")
    if name not in BUILTINS or Path(spec).exists():
        return spec
    path = Path(data_dir).resolve() / f"{name}{'-' + size if size else ''}-seed{seed}.jsonl"
    if not path.is_file():
        rows = [json.dumps({"messages": ex["messages"]}) for ex in load_examples(spec, seed=seed)]
        atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def plan(preset: str | Preset, only: str | Iterable[str] | None = None) -> list[tuple[SweepSpec, int]]:
    """(spec, number of runs) per selected sweep, without writing anything (a dry run)."""
    return [(s, len(expand(s))) for s in specs(preset, only)]


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[regretless reproduce] {msg}", file=sys.stderr, flush=True)


def reproduce(preset: str | Preset, out: str | Path, only: str | Iterable[str] | None = None,
              workers: int | None = None, quiet: bool = False, launcher: Sequence[str] | None = None
              ) -> dict[str, Any]:
    """Run the selected sweeps of `preset` into `out`, then write the report. Returns {"report", "sweeps",
    "timing"}; failed runs are recorded in the report (and counted), not raised."""
    from regretless.prepare import resolve_or_build
    from regretless.report import write_report
    from regretless.sweep import run_sweep

    p = get_preset(preset)
    findings = parse_only(only)
    out = Path(out)
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    t0 = time.time()
    timing: dict[str, Any] = {"preset": p.name, "findings": list(findings)}
    for s in specs(p, findings):  # validate every sweep before anything is built or run
        expand(s)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    models = sorted({s["base"]["model"] for s in select(p, findings)})
    for m in models:
        _say(f"model {m}: {resolve_or_build(m, quiet=quiet)}", quiet)
    timing["model_s"] = round(time.time() - t, 1)
    t = time.time()
    sweeps = specs(p, findings, data_dir=out / "data")
    timing["data_s"] = round(time.time() - t, 1)
    results = {}
    for s in sweeps:
        t = time.time()
        _say(f"sweep {s.name} ({', '.join(s.findings)}): {len(expand(s))} runs into {out / s.name}", quiet)
        kw = {"launcher": launcher} if launcher is not None else {}
        res = run_sweep(s, out / s.name, workers=workers, threads_per_run=1, quiet=quiet, **kw)
        results[s.name] = res.counts
        timing[f"sweep_{s.name}_s"] = round(time.time() - t, 1)
        _say(f"sweep {s.name}: {', '.join(f'{k} {v}' for k, v in sorted(res.counts.items()))} "
             f"in {timing[f'sweep_{s.name}_s']:.0f} s", quiet)
    t = time.time()
    report = write_report(out)
    timing["report_s"] = round(time.time() - t, 1)
    timing["total_s"] = round(time.time() - t0, 1)
    from regretless.config import atomic_write_text

    atomic_write_text(out / "reproduce.json", json.dumps({"timing": timing, "sweeps": results}, indent=2) + "\n")
    return {"report": report, "sweeps": results, "timing": timing}


def summary_lines(result: dict[str, Any], only: Sequence[str] = FINDINGS) -> list[str]:
    """The claims table as short lines (selected findings first; the others are marked not run)."""
    lines = []
    for c in result["report"]["claims"]:
        if c["finding"] not in only:
            continue
        lines.append(f"{c['title']:<18} {c['verdict']:<13} {c['measured']}")
        lines.append(f"{'':<18} {'':<13} why: {c['reason']}")
    return lines


__all__ = ["FULL", "PRESETS", "QUICK", "Preset", "get_preset", "materialize_data", "parse_only", "plan",
           "reproduce", "select", "specs", "summary_lines"]
