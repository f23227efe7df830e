"""Reading runs back and grouping them into the arms of the paper's comparisons. Reads only run folders
(config.yaml, summary.json, metrics.jsonl) and the rows of each ledger that belong to its current spec.

An *arm* is what one LR search covers: the run config minus LR and seed. Its name says what differs:
`full`, `r64` (LoRA on every matrix), `mlp-r8` / `attn-r12` (LoRA on one role), a `-bs16-n480` suffix for a
batch size / examples-seen other than the experiment's base, `rl-full` / `rl-r1` for RL. The base (batch
size, steps) of the SFT runs is the most common one among the all-matrices arms.

The score of a run is its final held-out eval loss (SFT) or final held-out greedy accuracy (RL); a diverged
or failed run scores worst (its LR is unusable), never `done`.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from regretless.sweep.ledger import current_rows


@dataclass
class RunRecord:
    """One run: its config, summary and per-step metrics, plus the ledger's axes/tags/status."""

    id: str
    name: str
    command: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    path: Path
    axes: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    status: str = "queued"
    error: str | None = None

    @property
    def method(self) -> str:
        return "full" if self.config.get("lora") is None else "lora"

    @property
    def rank(self) -> int | None:
        return None if self.config.get("lora") is None else int(self.config["lora"].get("rank", 0))

    @property
    def targets(self) -> str:
        lora = self.config.get("lora")
        if lora is None:
            return "full"
        t = lora.get("targets", "all")
        return t if isinstance(t, str) else "+".join(t)

    @property
    def lr(self) -> float | None:
        v = self.config.get("lr")
        if v is None and self.summary:
            v = self.summary.get("lr")
        return None if v is None else float(v)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def batch_size(self) -> int | None:
        return self.config.get("batch_size")

    @property
    def steps(self) -> int | None:
        """Planned optimizer steps (the config's; a diverged run's summary has fewer)."""
        s = self.config.get("steps") or (self.summary or {}).get("steps")
        return None if s is None else int(s)

    @property
    def trainable_params(self) -> int | None:
        return (self.summary or {}).get("trainable_params")

    @property
    def finished(self) -> bool:
        return self.status in ("done", "diverged", "failed")

    def score(self) -> float:
        """Final eval loss (SFT) or eval accuracy (RL) from the summary; nan when there is none."""
        key = "eval_loss" if self.command == "sft" else "eval_accuracy"
        v = (self.summary or {}).get(f"final_{key}")
        if not isinstance(v, (int, float)):  # a summary without it: the last logged eval
            _, vals = self.series(key)
            v = float(vals[-1]) if len(vals) else math.nan
        return float(v) if math.isfinite(v) else math.nan

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one logged metric (finite values only)."""
        pts = [(m["step"], m[metric]) for m in self.metrics
               if "step" in m and isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
        if not pts:
            return np.zeros(0), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


# ---- loading ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (run still writing) is skipped."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            rows.append(d)
    return rows


def _record(folder: Path, row: dict[str, Any] | None) -> RunRecord:
    cfg_path = folder / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else dict((row or {}).get("config", {}))
    command = str(cfg.pop("command", (row or {}).get("command", "sft")))
    summary = _read_json(folder / "summary.json")
    status = (row or {}).get("status") or "queued"
    if summary is not None and summary.get("status") in ("done", "diverged"):
        status = summary["status"]
    return RunRecord(id=(row or {}).get("id", folder.name), name=(row or {}).get("name", folder.name),
                     command=command, config=cfg, summary=summary, metrics=read_metrics(folder / "metrics.jsonl"),
                     path=folder, axes=(row or {}).get("axes", {}), tags=tuple((row or {}).get("tags", ())),
                     status=status, error=(row or {}).get("error"))


def load_runs(root: str | Path) -> list[RunRecord]:
    """The runs under `root`: for each ledger.sqlite, the rows of its current spec (an older spec's rows are
    left out); plus plain run folders (config.yaml with metrics) that no ledger lists."""
    root = Path(root)
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for ledger_path in sorted(root.rglob("ledger.sqlite")):
        for row in current_rows(ledger_path):
            folder = Path(row["folder"])
            seen.add(folder)
            records.append(_record(folder, row))
        seen.update(p.resolve() for p in (ledger_path.parent / "runs").glob("*"))  # stale rows stay out
    for cfg in sorted(root.rglob("config.yaml")):
        folder = cfg.parent.resolve()
        if folder not in seen and ((folder / "metrics.jsonl").exists() or (folder / "summary.json").exists()):
            seen.add(folder)
            records.append(_record(folder, None))
    return records


# ---- arms ------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    command: str
    method: str
    rank: int | None
    targets: str
    batch_size: int | None
    steps: int | None
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def maximize(self) -> bool:
        return self.command == "rl"

    @property
    def examples(self) -> int | None:
        return None if self.batch_size is None or self.steps is None else self.batch_size * self.steps

    def scores(self) -> dict[float, list[float]]:
        """{lr: [score per finished seed]} in minimise-form-free units: eval loss (SFT) or accuracy (RL); a
        diverged or failed run counts as the worst value (inf loss, -inf accuracy)."""
        out: dict[float, list[float]] = defaultdict(list)
        worst = -math.inf if self.maximize else math.inf
        for r in self.runs:
            if r.lr is None or not r.finished:
                continue
            v = r.score() if r.status == "done" else math.nan
            out[r.lr].append(v if math.isfinite(v) else worst)
        return dict(sorted(out.items()))

    def at_lr(self, lr: float) -> list[RunRecord]:
        return [r for r in self.runs if r.lr == lr and r.status == "done"]

    @property
    def trainable_params(self) -> int | None:
        return next((r.trainable_params for r in self.runs if r.trainable_params), None)


def _arm_key(r: RunRecord, base: tuple[Any, Any] | None) -> str:
    if r.command == "rl":
        return "rl-full" if r.method == "full" else f"rl-r{r.rank}"
    name = "full" if r.method == "full" else (f"r{r.rank}" if r.targets == "all" else f"{r.targets}-r{r.rank}")
    if base is not None and (r.batch_size, r.steps) != base:
        name += f"-bs{r.batch_size}-n{(r.batch_size or 0) * (r.steps or 0)}"
    return name


def sft_base(records: Iterable[RunRecord]) -> tuple[Any, Any] | None:
    """The most common (batch_size, steps) among SFT runs on all matrices (or FullFT)."""
    c = Counter((r.batch_size, r.steps) for r in records if r.command == "sft" and r.targets in ("all", "full")
                and r.steps is not None)
    return c.most_common(1)[0][0] if c else None


def arms(records: Iterable[RunRecord]) -> dict[str, Arm]:
    records = list(records)
    base = sft_base(records)
    out: dict[str, Arm] = {}
    for r in records:
        key = _arm_key(r, base)
        if key not in out:
            out[key] = Arm(key, r.command, r.method, r.rank, r.targets, r.batch_size, r.steps)
        out[key].runs.append(r)
    return out


def base_arms(all_arms: dict[str, Arm]) -> dict[str, Arm]:
    """The capacity / LR-ratio arms: FullFT and all-matrices LoRA at the base (batch size, steps)."""
    return {k: a for k, a in all_arms.items() if a.command == "sft" and "-bs" not in k and a.targets in
            ("all", "full")}


def rank_of(name: str) -> int:
    return int(name.split("-")[0][1:]) if name.startswith("r") else 10**9


def eval_curve(runs: list[RunRecord], metric: str = "eval_loss") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, seed mean, seed count) at the eval steps every run logged."""
    parts = [r.series(metric) for r in runs]
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(p[0].tolist()) for p in parts)))
    stack = np.stack([[v[list(s).index(t)] for t in common] for s, v in parts]) if common else np.zeros((0, 0))
    return np.asarray(common), stack.mean(0) if common else np.zeros(0), np.full(len(common), len(parts))


def pointwise_min(arm: Arm, metric: str = "eval_loss") -> dict[str, np.ndarray]:
    """At each eval step, the best seed-mean value over the arm's LRs (the paper's curves), the LR that gives
    it and its seed count: {steps, value, lr, n}."""
    curves = {lr: eval_curve(arm.at_lr(lr), metric) for lr in arm.scores()}
    curves = {lr: c for lr, c in curves.items() if len(c[0])}
    if not curves:
        return {"steps": np.zeros(0), "value": np.zeros(0), "lr": np.zeros(0), "n": np.zeros(0)}
    steps = np.asarray(sorted(set.intersection(*(set(c[0].tolist()) for c in curves.values()))))
    value = np.full(len(steps), np.inf)
    lrs, ns = np.zeros(len(steps)), np.zeros(len(steps))
    for lr, (s, v, n) in curves.items():
        idx = [list(s).index(t) for t in steps]
        better = v[idx] < value
        value[better], lrs[better], ns[better] = v[idx][better], lr, n[idx][better]
    return {"steps": steps, "value": value, "lr": lrs, "n": ns}


def pooled_seed_sd(all_arms: Iterable[Arm], metric: str | None = None, step_index: int | None = None
                   ) -> tuple[float, int]:
    """Seed-to-seed SD pooled over every (arm, LR) with 2+ finished seeds: of the final score, or of `metric`
    at the `step_index`-th eval point. The arms must share one command: an SFT loss's spread and an RL
    accuracy's are in different units."""
    from regretless.stats import pooled_sd

    all_arms = list(all_arms)
    if len({a.command for a in all_arms}) > 1:
        raise ValueError(f"pooled_seed_sd over {' and '.join(sorted({a.command for a in all_arms}))} arms: "
                         "pool one command's runs")
    groups = []
    for a in all_arms:
        for lr in a.scores():
            runs = a.at_lr(lr)
            if len(runs) < 2:
                continue
            if metric is None:
                groups.append([r.score() for r in runs])
            else:
                vals = []
                for r in runs:
                    _, v = r.series(metric)
                    if len(v) > step_index:
                        vals.append(float(v[step_index]))
                groups.append(vals)
    return pooled_sd(groups)


__all__ = ["Arm", "RunRecord", "arms", "base_arms", "eval_curve", "load_runs", "pointwise_min",
           "pooled_seed_sd", "rank_of", "read_metrics", "sft_base"]
