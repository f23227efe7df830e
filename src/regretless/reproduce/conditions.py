"""The conditions of a reproduction (each arm of a comparison, with its own LR search) and what they need to
know of the model and the data: parameter counts on the meta device, the rank cap, the matched attention rank,
built-in data and RL environments written once as JSONL."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regretless.errors import UserError
from regretless.reproduce.presets import Preset
from regretless.sweep.spec import FINDINGS


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


