"""The plan of a reproduction's searches as sweeps: the runs decided so far, the zipped sweep spec whose grid is
exactly those runs, run ids and scores read back from the ledgers, the wall time the runs were active, and the
one warm-launch zygote for all rounds."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regretless.reproduce.conditions import Condition
from regretless.sweep.search import SearchConfig, next_runs
from regretless.sweep.spec import FINDINGS, parse_spec


@dataclass
class Plan:
    """Every (condition, lr, seed) run decided so far, per command; grows round by round."""

    runs: dict[str, list[tuple[str, float, int]]] = field(default_factory=lambda: {"sft": [], "rl": []})

    def add(self, cond: Condition, lr: float, seed: int) -> bool:
        """True when the run is new to the plan."""
        key = (cond.name, lr, seed)
        if key in self.runs[cond.command]:
            return False
        self.runs[cond.command].append(key)
        return True


def sweep_spec(command: str, base: dict[str, Any], conds: dict[str, Condition],
               runs: list[tuple[str, float, int]]) -> dict[str, Any]:
    """A sweep spec whose axes are zipped, so that its grid is exactly `runs` (in order)."""
    keys = sorted({k for c in conds.values() if c.command == command for k in c.axes})
    axes: dict[str, list[Any]] = {k: [] for k in [*keys, "lr", "seed"]}
    for name, lr, seed in runs:
        c = conds[name]
        for k in keys:
            axes[k].append(c.axes.get(k, _default(k, base)))
        axes["lr"].append(lr)
        axes["seed"].append(seed)
    findings = sorted({f for c in conds.values() if c.command == command for f in c.roles}, key=FINDINGS.index)
    return {"command": command, "name": command, "base": base, "axes": axes, "zip": [list(axes)],
            "findings": findings}


def _default(key: str, base: dict[str, Any]) -> Any:
    defaults = {"lora.rank": 1, "lora.targets": "all", "freeze_embeddings": False, "method": "lora"}
    return base.get(key, defaults.get(key))


def run_key(command: str, axes: dict[str, Any], conds: dict[str, Condition]) -> tuple[str, float, int] | None:
    """(condition, lr, seed) of a ledger row's axes."""
    for c in conds.values():
        if c.command != command:
            continue
        if all(axes.get(k) == v for k, v in c.axes.items() if not (c.method == "full" and k.startswith("lora."))):
            return c.name, float(axes["lr"]), int(axes["seed"])
    return None


def score(command: str, summary: dict[str, Any] | None, status: str) -> float | None:
    """Lower is better: final eval loss (SFT) or minus final eval accuracy (RL); +inf for a diverged or
    failed run; None while it has not finished."""
    if status in ("diverged", "failed"):
        return math.inf
    if status != "done" or summary is None:
        return None
    v = summary.get("final_eval_loss") if command == "sft" else summary.get("final_eval_accuracy")
    if v is None or not math.isfinite(float(v)):
        return math.inf
    return float(v) if command == "sft" else -float(v)


def replay(cond: Condition, plan: Plan, search: SearchConfig, finished: dict[str, float | None],
           run_id: Callable[[tuple[str, float, int]], str]) -> tuple[str, list[tuple[str, float, int]]]:
    """Advance `cond`'s search through every step whose runs have finished (`finished`: run id -> score, None
    while unfinished), adding each run it asks for to `plan`; stop at the first step with unfinished runs.
    Returns (search status, the unfinished runs the search waits for)."""
    seen: dict[float, dict[int, float]] = {}
    for key in plan.runs[cond.command]:
        if key[0] == cond.name and (s := finished.get(run_id(key))) is not None:
            seen.setdefault(key[1], {})[key[2]] = s
    while True:
        status, nxt = next_runs(seen, cond.start_lr, search)
        waiting = []
        for lr, seed in nxt:
            plan.add(cond, lr, seed)
            s = finished.get(run_id((cond.name, lr, seed)))
            if s is None:
                waiting.append((cond.name, lr, seed))
            else:
                seen.setdefault(lr, {})[seed] = s
        if not nxt or waiting:
            return status, waiting


def ledger_scores(sweep_dir: Path, command: str) -> dict[str, float | None]:
    """Run id -> score (`score`: lower is better, +inf diverged or failed, None not finished) of every row in
    the sweep folder's ledger."""
    from regretless.sweep.ledger import Ledger

    path = sweep_dir / "ledger.sqlite"
    if not path.is_file():
        return {}
    out: dict[str, float | None] = {}
    for row in Ledger(path).runs():
        try:
            summary = json.loads((sweep_dir / row["path"] / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        out[row["id"]] = score(command, summary, (summary or {}).get("status") or row.get("status", "queued"))
    return out


def planned_ids(command: str, base: dict[str, Any], conds: dict[str, Condition],
                runs: list[tuple[str, float, int]]) -> dict[str, tuple[str, float, int]]:
    """Run id (the sweep's hash of the full config) -> (condition, lr, seed) for every planned run."""
    from regretless.sweep.spec import expand

    if not runs:
        return {}
    spec = parse_spec(sweep_spec(command, base, conds, runs), f"{command} plan")
    return {r.id: key for r in expand(spec) if (key := run_key(command, r.axes, conds)) is not None}


def active_seconds(out: Path, ids: dict[str, set[str]]) -> float:
    """Seconds during which at least one of the runs `ids` ({command: run ids}) was running, from the ledgers'
    start and finish times: the search's own wall time, whichever invocations (and side-by-side processes)
    ran its runs."""
    from regretless.sweep.ledger import Ledger

    spans = []
    for cmd, keep in ids.items():
        path = out / cmd / "ledger.sqlite"
        if keep and path.is_file():
            spans += [(r["started"], r["finished"]) for r in Ledger(path).runs()
                      if r["id"] in keep and r.get("started") and r.get("finished")]
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def start_zygote(out: Path) -> Any:
    """A warm-launch zygote (`regretless.sweep.warm`) with the sweeps' one thread a run, or None (then each
    sweep starts its own or launches cold, and says why)."""
    from regretless.sweep import warm
    from regretless.sweep.launch import THREAD_VARS

    try:
        return warm.Zygote.start(out / "zygote.log", {k: "1" for k in THREAD_VARS}, 10.0)
    except (warm.ZygoteError, OSError):
        return None


