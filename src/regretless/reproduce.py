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
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.sweep.search import DONE, SearchConfig, next_runs
from regretless.sweep.spec import FINDINGS, parse_spec

EMBED_SHARE_FREEZE = 0.10  # FullFT freezes embeddings + head when they hold at least this share of parameters
MAX_ROUNDS = 30


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: str
    data: str  # SFT data: a built-in spec (e.g. gsm-symbolic:600) or a path
    env: str  # RL environment
    sft: dict[str, Any]  # SFT fields shared by every SFT run
    rl: dict[str, Any]  # RL fields shared by every RL run
    ranks: tuple[int, ...]  # capacity and LR ratio: FullFT and LoRA (all matrices) at these ranks
    large_batch: int  # the batch comparison: base batch_size versus this
    placement_rank: int  # MLP-only and all-matrices at this rank; attention-only at the matched rank
    findings: tuple[str, ...] = FINDINGS  # what the preset runs when --only is not given
    rl_rank: int = 1
    seeds: tuple[int, ...] = (0, 1)
    max_decades: float = 2.0
    min_large_batch_steps: int = 30
    budget: str = ""
    scale_note: str = ""
    curves: str = "all"  # eval_points on every SFT condition, or "capacity": only on the capacity arms (the other
    # findings read final eval losses, so their runs evaluate at step 0 and at the end only: less time)


@dataclass(frozen=True)
class Condition:
    name: str
    command: str  # sft | rl
    axes: dict[str, Any]  # sweep axes: method, lora.rank, lora.targets, batch_size, steps, freeze_embeddings
    roles: tuple[str, ...]  # the findings that use it
    start_lr: float = 0.0
    steps: int = 0  # optimizer steps of each run (for the recipe's short-run multiplier)

    @property
    def method(self) -> str:
        return self.axes["method"]


# ---- presets ---------------------------------------------------------------------------------------------
_CPU = {"device": "cpu", "dtype": "fp32", "save_every": 100_000, "eval_every": 100_000, "log_every": 1}
QUICK = Preset(
    name="quick",
    description="tiny-base (1.1M-parameter Llama pretrained here), 240 GSM-style worked solutions, batch 2 vs 8, "
                "RL on 3-term one-digit chain_sum",
    model="tiny-base", data="gsm-symbolic:272", env="rg:chain_sum,min_terms=3,max_terms=3,max_digits=1",
    sft={**_CPU, "epochs": 1.0, "batch_size": 2, "seq_len": 192, "eval_size": 32, "eval_points": 8},
    rl={**_CPU, "steps": 16, "problems_per_step": 8, "group_size": 8, "max_new_tokens": 8, "train_size": 1000,
        "eval_size": 200, "eval_every": 4},
    ranks=(1, 8, 64), large_batch=8, placement_rank=8, budget="2 CPU cores, <= 15 minutes", curves="capacity",
    scale_note="A 1.1M-parameter model and 120 optimizer steps of 2: the paper's effects are measured at 8B "
               "parameters and thousands of steps. Capacity limits appear at far smaller ranks here, and a "
               "batch of 8 is 'large' only relative to 2.",
)
STANDARD = Preset(
    name="standard",
    description="SmolLM2-135M-Instruct, 24 steps of 8 chatterbot dialogs, LoRA ranks 1-64 vs FullFT, "
                "placement (batch and RL do not fit 2 CPU cores in 2 hours)",
    model="smollm2-135m", data="chatterbot", env="rg:chain_sum,min_terms=2,max_terms=2,max_digits=2",
    sft={**_CPU, "batch_size": 8, "seq_len": 128, "eval_size": 32, "eval_points": 8, "steps": 24},
    rl={**_CPU, "steps": 16, "problems_per_step": 8, "group_size": 4, "max_new_tokens": 24, "train_size": 1000,
        "eval_size": 200, "eval_every": 4},
    ranks=(1, 16, 64), large_batch=32, placement_rank=16, budget="2 CPU cores, <= 2 hours",
    findings=("capacity", "lr_ratio", "placement"),
    scale_note="A 135M model and 24 steps of 8 short dialogs: very short runs, where the paper expects ~15x "
               "rather than 10x, and too few steps for a capacity limit to show at moderate rank.",
)
FULL = Preset(
    name="full",
    description="SmolLM2-135M-Instruct, 1,024 GSM-style worked solutions (128 steps of 8), ranks 1-128 vs FullFT, "
                "batch 8 vs 32, placement, RL rank 1 vs FullFT",
    model="smollm2-135m", data="gsm-symbolic:1280", env="rg:chain_sum,min_terms=2,max_terms=2,max_digits=2",
    sft={"steps": 128, "batch_size": 8, "seq_len": 384, "eval_size": 256, "eval_points": 8,
         "save_every": 100_000, "eval_every": 100_000, "save_weights": False},
    rl={"steps": 24, "problems_per_step": 16, "group_size": 8, "max_new_tokens": 32, "train_size": 2000,
        "eval_size": 256, "eval_every": 6, "save_every": 100_000, "save_weights": False},
    ranks=(1, 16, 128), large_batch=32, placement_rank=16, budget="one H200, <= 25 minutes",
    scale_note="A 135M model and 128 steps of 8: larger than quick, far below the paper's 8B models and "
               "thousands of steps; the large batch (32) is the paper's *small* batch, so the batch finding "
               "here tests only the direction of the effect at a 4x batch.",
)
PRESETS: dict[str, Preset] = {"quick": QUICK, "standard": STANDARD, "full": FULL}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: expected one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def parse_only(only: str | Iterable[str] | None, default: Sequence[str] = FINDINGS) -> tuple[str, ...]:
    """'capacity,rl' -> ('capacity', 'rl') in the paper's order; None -> `default` (all five)."""
    if only is None:
        return tuple(default)
    items = [s.strip() for s in (only.split(",") if isinstance(only, str) else only)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in FINDINGS]
    if bad:
        raise UserError(f"--only {bad[0]!r}: not a finding; expected a comma-separated list of: "
                        f"{', '.join(FINDINGS)}")
    if not items:
        raise UserError(f"--only: empty; expected a comma-separated list of: {', '.join(FINDINGS)}")
    return tuple(f for f in FINDINGS if f in items)


# ---- the model and the data ------------------------------------------------------------------------------
def model_facts(model_path: str | Path) -> dict[str, Any]:
    """Parameters (total, embeddings+head share), hidden size, layers, vocab of a model folder, counted on
    the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    emb = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
           if m is not None and getattr(m, "weight", None) is not None}
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"path": str(model_path), "model_type": getattr(text, "model_type", "?"), "params": total,
            "embed_head_params": sum(emb.values()), "embed_share": sum(emb.values()) / max(total, 1),
            "hidden_size": getattr(text, "hidden_size", None), "layers": getattr(text, "num_hidden_layers", None),
            "vocab": getattr(text, "vocab_size", None), "tied": len(emb) == 1}


def lora_params(model_path: str | Path, targets: str, rank: int) -> int:
    """Trainable LoRA parameters at (targets, rank), counted on a meta-device copy of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from regretless.counts import count_params
    from regretless.lora import LoRAConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return int(count_params(model, LoRAConfig(rank=rank, targets=targets))["total"])


def rank_limit(model_path: str | Path, targets: str = "all") -> int:
    """The largest LoRA rank every matrix of `targets` allows (the injector refuses a rank above a matrix's
    smaller side, e.g. SmolLM2-135M's 192 x 576 k_proj), found on a meta-device copy of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from regretless.counts import count_params
    from regretless.lora import LoRAConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))

    def fits(r: int) -> bool:
        try:
            count_params(model, LoRAConfig(rank=r, targets=targets))
        except UserError:
            return False
        return True

    lo, hi = 1, 1 << 15
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_ranks(p: Preset, model_path: str | Path) -> tuple[Preset, str | None]:
    """The preset with every LoRA rank capped at what the model's matrices allow, and a note saying so (None
    when nothing changed): a preset's rank 256 on a model whose smallest adapted matrix side is 192 runs at 192."""
    limit = rank_limit(model_path)
    ranks = tuple(sorted({min(r, limit) for r in p.ranks}))
    fitted = dataclasses.replace(p, ranks=ranks, placement_rank=min(p.placement_rank, limit),
                                 rl_rank=min(p.rl_rank, limit))
    if fitted == p:
        return p, None
    return fitted, (f"LoRA ranks {list(p.ranks)} capped at {limit}, the smallest side of an adapted matrix of "
                    f"this model: ranks {list(ranks)}")


def matched_attention_rank(model_path: str | Path, mlp_rank: int) -> tuple[int, int, int]:
    """The smallest attention-only rank with at least as many LoRA parameters as MLP-only at `mlp_rank`:
    (rank, attention params, MLP params) — the paper's matched comparison."""
    mlp = lora_params(model_path, "mlp", mlp_rank)
    per = lora_params(model_path, "attn", mlp_rank) / mlp_rank
    r = max(1, math.ceil(mlp / per))
    while lora_params(model_path, "attn", r) < mlp:
        r += 1
    return r, lora_params(model_path, "attn", r), mlp


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


def materialize_env(spec: str, data_dir: Path, seed: int, train_size: int, eval_size: int) -> str:
    """A reasoning-gym env (`rg:task,...`) written once as a JSONL file of {"prompt", "answer"} lines (the
    same problems, each question once; the trainer's JSONL env splits them into train and held-out eval), so every RL run reads a
    file and runs need no problem generator (e.g. on a GPU machine without reasoning-gym). Anything else, and
    a spec with its own reward, is returned unchanged."""
    from regretless.config import atomic_write_text
    from regretless.rl.envs import make_env, parse_spec

    source, reward = parse_spec(spec)
    if not source.startswith("rg:") or reward:
        return spec
    safe = "".join(ch if ch.isalnum() or ch in "-_=" else "_" for ch in source[3:])
    path = Path(data_dir).resolve() / f"env-{safe}-seed{seed}-{train_size}+{eval_size}-distinct.jsonl"
    if not path.is_file():
        env = make_env(spec, seed, train_size, eval_size)
        rows, seen = [], set()
        for p in [*env.eval, *env.train]:  # each question once, so the held-out split keeps all eval_size
            q = p.prompt_messages[-1]["content"]
            if q not in seen:
                seen.add(q)
                rows.append(json.dumps({"prompt": q, "answer": p.answer}))
        atomic_write_text(path, "\n".join(rows) + "\n")
    return str(path)


def count_examples(data: str | Path) -> int:
    from regretless.data import load_examples

    return len(load_examples(str(data), seed=0))


# ---- conditions ------------------------------------------------------------------------------------------
def _lora(rank: int, targets: str = "all") -> dict[str, Any]:
    return {"method": "lora", "lora.rank": rank, "lora.targets": targets}


def build_conditions(p: Preset, findings: Sequence[str], model_path: Path, n_train: int,
                     freeze: bool) -> list[Condition]:
    """The conditions the selected findings need, each once (shared arms serve several findings). Every SFT
    condition states its optimizer steps: one epoch (`sft.epochs` of the training split) or `sft.steps`."""
    bs = int(p.sft.get("batch_size", 8))
    base_steps = int(p.sft["steps"]) if p.sft.get("steps") else max(
        1, round(float(p.sft.get("epochs", 1.0)) * (n_train // bs)))
    full = {"method": "full", "freeze_embeddings": freeze}
    arms: dict[str, tuple[str, dict[str, Any], set[str]]] = {}

    def add(name: str, command: str, axes: dict[str, Any], role: str) -> None:
        if name in arms:
            arms[name][2].add(role)
        else:
            arms[name] = (command, axes, {role})

    base = {"batch_size": bs, "steps": base_steps}
    for f in ("capacity", "lr_ratio"):
        if f in findings:
            add("full", "sft", {**full, **base}, f)
            for r in p.ranks:
                add(f"r{r}", "sft", {**_lora(r), **base}, f)
    if "batch" in findings:
        # equal examples seen at both batch sizes, enough for the large batch to take min_large_batch_steps
        large_steps = max(p.min_large_batch_steps, math.ceil(base_steps * bs / p.large_batch))
        examples = large_steps * p.large_batch
        top = max(p.ranks)
        for b in (bs, p.large_batch):
            steps = examples // b
            tag = "" if (b == bs and steps == base_steps) else f"-bs{b}-n{examples}"
            add(f"full{tag}", "sft", {**full, "batch_size": b, "steps": steps}, "batch")
            add(f"r{top}{tag}", "sft", {**_lora(top), "batch_size": b, "steps": steps}, "batch")
    if "placement" in findings:
        r = p.placement_rank
        ra, _, _ = matched_attention_rank(model_path, r)
        add(f"mlp-r{r}", "sft", {**_lora(r, "mlp"), **base}, "placement")
        add(f"attn-r{ra}", "sft", {**_lora(ra, "attn"), **base}, "placement")
        add(f"r{r}", "sft", {**_lora(r), **base}, "placement")
    if "rl" in findings:
        add("rl-full", "rl", dict(full), "rl")
        add(f"rl-r{p.rl_rank}", "rl", {"method": "lora", "lora.rank": p.rl_rank}, "rl")
    out = []
    for name, (command, axes, roles) in arms.items():
        if p.curves == "capacity" and command == "sft" and "capacity" not in roles:
            axes = {**axes, "eval_points": 0}
        steps = axes["steps"] if command == "sft" else int(p.rl.get("steps", 50))
        out.append(Condition(name, command, axes, tuple(f for f in FINDINGS if f in roles), steps=steps))
    return out


def with_start_lrs(conds: list[Condition], model_path: Path) -> list[Condition]:
    """Each condition's starting LR: the recipe's LR for its method and run length (a start, not an answer)."""
    from transformers import AutoConfig

    from regretless.recipe import default_lr

    mc = AutoConfig.from_pretrained(model_path)
    return [Condition(c.name, c.command, c.axes, c.roles, float(f"{default_lr(mc, c.method, c.steps)[0]:.4g}"),
                      c.steps) for c in conds]


# ---- the search rounds -----------------------------------------------------------------------------------
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
        rl_base["env"] = materialize_env(rl_env, out / "data", int(p.rl.get("data_seed", 0)),
                                         int(p.rl.get("train_size", 2000)), int(p.rl.get("eval_size", 64)))
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
    search = SearchConfig(max_decades=p.max_decades, seeds=p.seeds)
    plan = Plan()
    status: dict[str, str] = {}
    context = {"preset": p.name, "description": p.description, "budget": p.budget, "scale_note": p.scale_note,
               "model": {"name": model_name, **facts}, "data": str(sft_data), "env": rl_env,
               "n_train": n_train, "seeds": list(p.seeds), "freeze_embeddings": freeze, "findings": list(findings),
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
                cmd = c.command
                while True:
                    seen: dict[float, dict[int, float]] = {}
                    for key in plan.runs[cmd]:
                        s = finished[cmd].get(run_id_of(cmd, key)) if key[0] == c.name else None
                        if s is not None:
                            seen.setdefault(key[1], {})[key[2]] = s
                    status[c.name], nxt = next_runs(seen, c.start_lr, search)
                    for lr, seed in nxt:
                        plan.add(c, lr, seed)
                    waiting = [(c.name, lr, seed) for lr, seed in nxt
                               if finished[cmd].get(run_id_of(cmd, (c.name, lr, seed))) is None]
                    if not nxt or waiting:
                        pending[cmd] += waiting
                        break
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
    return lines


__all__ = [
    "FULL",
    "PRESETS",
    "QUICK",
    "STANDARD",
    "Condition",
    "Preset",
    "build_conditions",
    "dry_run",
    "fit_ranks",
    "get_preset",
    "matched_attention_rank",
    "materialize_data",
    "model_facts",
    "parse_only",
    "rank_limit",
    "reproduce",
    "summary_lines",
]
