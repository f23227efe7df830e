"""`reproduce`: the paper's five findings as a fair experiment on any model and SFT data, then the report.

Design (issue: a fair test, where no verdict is decided by the experiment's layout):
- A *condition* is one arm of a comparison: FullFT, LoRA at rank r, LoRA on attention or MLP only, either at
  a large batch, RL with FullFT or rank-1 LoRA. Every condition gets its own adaptive LR search
  (`regretless.sweep.search`): 3 points a decade from the recipe's LR for it, extended until the best LR has
  a worse neighbour on both sides, refined, and its decisive runs (best LR and both neighbours) repeated with
  every seed. The recipe only says where to start; the optimum is wherever the runs put it, so a true ratio
  of 1 or 30 is found as surely as 10.
- Runs go through the normal sweep runner (one process per run, resumable, SQLite ledger), in rounds: each
  round asks every condition's search for its next runs, runs them all, and reads back their scores
  (final held-out eval loss for SFT; final held-out greedy accuracy for RL). The spec written to the sweep
  folder is cumulative, so the ledger and the report cover exactly the runs of this search, and a rerun
  replays the same decisions, skipping finished runs.
- The FullFT baseline freezes the input embeddings and LM head (`freeze_embeddings`) when they are a large
  share of the model (>= EMBED_SHARE_FREEZE): LoRA never trains them, and in a small model they would
  decide every comparison by themselves. The report says which baseline each claim used.
- Every run of a condition sees the same data; `data_seed` fixes the eval set across seeds.
- The batch comparison runs at equal examples seen: both batch sizes train on the same number of examples, enough
  for the large batch to take at least `min_large_batch_steps` optimizer steps.

Layout of DIR: DIR/sft/ and DIR/rl/ (sweep folders: spec.yaml, ledger.sqlite, runs/), DIR/data/ (built-in
SFT data written once as JSONL), DIR/reproduce.json (preset, model, data, conditions with their search
status, timings: the report's header), DIR/report.html, DIR/claims.json, DIR/figures/.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.reproduce.conditions import (
    Condition,
    build_conditions,
    count_examples,
    fit_ranks,
    lora_params,
    matched_attention_rank,
    materialize_data,
    materialize_env,
    model_facts,
    rank_limit,
    with_start_lrs,
)
from regretless.reproduce.plan import (
    Plan,
    active_seconds,
    ledger_scores,
    planned_ids,
    replay,
    run_key,
    score,
    start_zygote,
    sweep_spec,
)
from regretless.reproduce.presets import (
    EMBED_SHARE_FREEZE,
    FULL,
    MAX_ROUNDS,
    PRESETS,
    QUICK,
    STANDARD,
    Preset,
    get_preset,
    parse_only,
)
from regretless.sweep.search import DONE, SearchConfig
from regretless.sweep.spec import FINDINGS, parse_spec


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[regretless reproduce] {msg}", file=sys.stderr, flush=True)


def reproduce(preset: str | Preset, out: str | Path, *, model: str | None = None, data: str | None = None,
              env: str | None = None, only: str | Iterable[str] | None = None, workers: int | None = None,
              quiet: bool = False, launcher: Sequence[str] | None = None, max_rounds: int = MAX_ROUNDS
              ) -> dict[str, Any]:
    """Run the selected findings' searches into `out`, then write the report. Returns {"report", "context"}."""
    from regretless.prepare import resolve_or_build as resolve_model
    from regretless.report import write_report
    from regretless.sweep import register_spec, run_sweep, warm
    from regretless.sweep.launch import DEFAULT_LAUNCHER

    p = get_preset(preset)
    findings = parse_only(only, p.findings)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a folder")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    t0 = time.time()
    model_name = model or p.model
    model_path = Path(resolve_model(model_name, quiet=quiet))
    facts = model_facts(model_path)
    freeze = facts["embed_share"] >= EMBED_SHARE_FREEZE
    p, rank_note = fit_ranks(p, model_path)
    sft_data = data or p.data
    out.mkdir(parents=True, exist_ok=True)
    sft_base = {**copy.deepcopy(p.sft), "model": str(model_path), "data": str(materialize_data(sft_data, out / "data"))}
    rl_env = env or p.env
    rl_base = {**copy.deepcopy(p.rl), "model": str(model_path)}
    if "rl" in findings:
        n_tr, n_ev = int(p.rl.get("train_size", 2000)), int(p.rl.get("eval_size", 64))
        rl_base["env"] = materialize_env(rl_env, out / "data", int(p.rl.get("data_seed", 0)), n_tr, n_ev)
        if Path(rl_base["env"]).is_file():  # a small task space: say what the trainer will hold out
            from regretless.rl.envs import jsonl_eval_size

            n = sum(1 for line in Path(rl_base["env"]).read_text().splitlines() if line.strip())
            held = jsonl_eval_size(n, n_tr, n_ev)
            if n < n_tr + n_ev:
                _say(f"{rl_env}: {n:,} distinct problems, fewer than train_size + eval_size = {n_tr + n_ev:,}: "
                     f"each RL run holds out {held:,} and trains on the other {n - held:,}", quiet)
    n_train = count_examples(sft_base["data"]) - int(sft_base.get("eval_size", 64)) if any(
        f != "rl" for f in findings) else 0
    if any(f != "rl" for f in findings) and n_train < int(sft_base.get("batch_size", 8)):
        raise UserError(f"--data {sft_data}: {n_train + int(sft_base.get('eval_size', 64))} examples; expected "
                        f"more than eval_size + batch_size")
    conds = with_start_lrs(build_conditions(p, findings, model_path, n_train, freeze), model_path)
    by_name = {c.name: c for c in conds}
    for cmd, base in (("sft", sft_base), ("rl", rl_base)):  # validate both specs before anything runs
        if any(c.command == cmd for c in conds):
            probe = [(c.name, c.start_lr, p.seeds[0]) for c in conds if c.command == cmd]
            parse_spec(sweep_spec(cmd, base, by_name, probe), f"preset {p.name}: {cmd}")
    searches = {"sft": SearchConfig(max_decades=p.max_decades, seeds=p.seeds),
                "rl": SearchConfig(max_decades=p.max_decades, seeds=p.seeds, confirm=p.rl_confirm_seeds,
                                   first_span=p.rl_first_span)}
    plan = Plan()
    status: dict[str, str] = {}
    context = {"preset": p.name, "description": p.description, "budget": p.budget, "scale_note": p.scale_note,
               "model": {"name": model_name, **facts}, "data": str(sft_data), "env": rl_env,
               "n_train": n_train, "seeds": list(p.seeds), "rl_confirm_seeds": list(p.rl_confirm_seeds),
               "freeze_embeddings": freeze, "findings": list(findings),
               "ranks": list(p.ranks), "rank_note": rank_note,
               "sft": {k: v for k, v in sft_base.items() if k != "model"},
               "rl": {k: v for k, v in rl_base.items() if k != "model"}}
    _say(f"{p.name}: {facts['params'] / 1e6:.1f}M-parameter {facts['model_type']} ({model_path}); "
         f"{len(conds)} conditions, each with its own LR search; FullFT "
         f"{'freezes' if freeze else 'trains'} embeddings+head ({facts['embed_share']:.0%} of parameters)", quiet)
    if rank_note:
        _say(rank_note, quiet)
    bases = {"sft": sft_base, "rl": rl_base}
    kw = {"launcher": launcher} if launcher is not None else {}
    ids: dict[tuple[str, str, float, int], str] = {}  # (command, condition, lr, seed) -> run id

    def run_id_of(cmd: str, key: tuple[str, float, int]) -> str:
        if (cmd, *key) not in ids:
            ids[(cmd, *key)] = next(iter(planned_ids(cmd, bases[cmd], by_name, [key])))
        return ids[(cmd, *key)]

    rounds = 0
    zygote, tried = None, False  # one warm-launch zygote for all rounds: the trainer imported once, not per sweep
    try:
        while True:
            # Replay: the search is a pure function of the scores, so each condition's search is rebuilt from its
            # first step whenever `reproduce` starts, and advanced at once through every step whose runs an
            # earlier (killed or finished) invocation finished; only runs that have not finished are launched.
            # The plan, and so the spec and the report, hold every run of the search, whichever invocation ran it,
            # and a row of another spec (same axes, other base config) never enters it: runs match by id.
            finished = {cmd: ledger_scores(out / cmd, cmd) for cmd in bases}
            pending: dict[str, list[tuple[str, float, int]]] = {cmd: [] for cmd in bases}
            for c in conds:
                status[c.name], waiting = replay(c, plan, searches[c.command], finished[c.command],
                                                 lambda key, cmd=c.command: run_id_of(cmd, key))
                pending[c.command] += waiting
            if not any(pending.values()) or rounds == max_rounds:
                break
            rounds += 1
            _say(f"round {rounds}: {sum(map(len, pending.values()))} runs to run "
                 f"({sum(s != DONE for s in status.values())} conditions searching)", quiet)
            for cmd, base in bases.items():
                if pending[cmd]:
                    spec = parse_spec(sweep_spec(cmd, base, by_name, plan.runs[cmd]), f"preset {p.name}: {cmd}")
                    if not tried and warm.usable(launcher or DEFAULT_LAUNCHER, 1):
                        zygote, tried = start_zygote(out), True
                    run_sweep(spec, out / cmd, workers=workers, threads_per_run=1, quiet=True, zygote=zygote, **kw)
    finally:
        if zygote is not None:
            zygote.close(10.0)
    for cmd, base in bases.items():  # the whole plan is the ledgers' current spec, whichever invocation ran
        if plan.runs[cmd]:  # its runs (a replay that launched nothing would leave an older invocation's)
            register_spec(parse_spec(sweep_spec(cmd, base, by_name, plan.runs[cmd]), f"preset {p.name}: {cmd}"),
                          out / cmd)
    context["conditions"] = [{**asdict(c), "search": status.get(c.name, "?"),
                              "runs": sum(1 for n, _, _ in plan.runs[c.command] if n == c.name)} for c in conds]
    context["rounds"] = rounds
    context["runs"] = sum(len(v) for v in plan.runs.values())
    context["wall_s"] = round(time.time() - t0, 1)
    context["runs_wall_s"] = round(active_seconds(out, {cmd: {run_id_of(cmd, k) for k in plan.runs[cmd]}
                                                        for cmd in bases}), 1)
    from regretless.config import atomic_write_text

    atomic_write_text(out / "reproduce.json", json.dumps(context, indent=2, default=str) + "\n")
    report = write_report(out)
    return {"report": report, "context": context}


def summary_lines(result: dict[str, Any], only: Sequence[str] = FINDINGS) -> list[str]:
    """The claims as short lines: finding, verdict, effect with its interval, and why."""
    lines = []
    for c in result["report"]["claims"]:
        if c["finding"] not in only:
            continue
        lines.append(f"{c['title']:<18} {c['verdict']:<13} {c['measured']}")
        lines.append(f"{'':<18} {'':<13} why: {c['reason']}")
    return lines


def dry_run(preset: str | Preset, model: str | None = None, only: str | Iterable[str] | None = None) -> list[str]:
    """What `reproduce` would run, without running or writing anything (model sizes are read from its config
    when it is a folder or a known built-in)."""
    p = get_preset(preset)
    findings = parse_only(only, p.findings)
    lines = [f"preset {p.name}: {p.description} ({p.budget})",
             f"  model {model or p.model}; data {p.data}; RL env {p.env}; seeds {list(p.seeds)}",
             f"  SFT: {p.sft}", f"  RL: {p.rl}",
             ("  conditions (each with its own adaptive LR search: 3 points a decade from the recipe's LR, "
              f"extended up to {p.max_decades:g} decades until bracketed, refined, decisive runs x{len(p.seeds)} "
              "seeds):")]
    for f in findings:
        arms = {"capacity": f"FullFT + LoRA r={list(p.ranks)}", "lr_ratio": f"FullFT + LoRA r={list(p.ranks)}",
                "batch": f"FullFT + LoRA r={max(p.ranks)} at batch {p.sft.get('batch_size')} and {p.large_batch}",
                "placement": f"MLP-only r={p.placement_rank}, attention-only at the matched rank, all r="
                             f"{p.placement_rank}",
                "rl": f"FullFT + LoRA r={p.rl_rank}"}[f]
        lines.append(f"    {f}: {arms}")
    if "rl" in findings and p.rl_confirm_seeds:
        lines.append(f"  RL: each arm's best LR also runs seeds {list(p.rl_confirm_seeds)}")
    if "rl" in findings and p.rl_first_span != 1:
        lines.append(f"  RL: the searches start with {2 * p.rl_first_span + 1} LRs around the recipe's, "
                     f"{p.rl_first_span} grid points each side")
    return lines


__all__ = [
    "EMBED_SHARE_FREEZE",
    "FULL",
    "MAX_ROUNDS",
    "PRESETS",
    "QUICK",
    "STANDARD",
    "Condition",
    "Plan",
    "Preset",
    "active_seconds",
    "build_conditions",
    "count_examples",
    "dry_run",
    "fit_ranks",
    "get_preset",
    "ledger_scores",
    "lora_params",
    "matched_attention_rank",
    "materialize_data",
    "materialize_env",
    "model_facts",
    "parse_only",
    "planned_ids",
    "rank_limit",
    "replay",
    "reproduce",
    "run_key",
    "score",
    "start_zygote",
    "summary_lines",
    "sweep_spec",
    "with_start_lrs",
]
