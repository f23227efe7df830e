"""Run configs: one frozen dataclass per entry point, filled from YAML, CLI flags and `key=value` overrides.

`load_config(SFTConfig, "run.yaml", ["lr=1e-4", "lora.rank=8"])` checks every key against the dataclass fields
and every value against the field's type, so a typo is an error naming the key and the file, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regretless.errors import UserError
from regretless.lora.config import LoRAConfig
from regretless.recipe import RL_RANK

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")  # experiment trackers (regretless.tracking)


@dataclass(frozen=True)
class TrainCommon:
    """Fields shared by SFT and RL (LoRA vs FullFT is `lora is None`, nothing else)."""

    model: str = "smollm2-135m"
    out: str = ""
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    lr: float | None = None  # None: the recipe's LR (recipe.default_lr)
    lr_schedule: str = "constant"  # constant (the paper's protocol) | linear | cosine
    warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0  # initialisation, data order and sampling
    data_seed: int = 0  # the data itself: built-in data generation and the train/eval split (fixed across seeds)
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    device: str = "auto"
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end)
    save_weights: bool = True  # False: no final adapter/model and no end-of-run checkpoint (sweeps that need the curves)
    log_every: int = 1
    eval_every: int = 25
    compile: bool = False  # torch.compile each decoder block and the head softmax (CUDA: 0.288 -> 0.197 s a step, 1B LoRA)
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, ~1/3 more compute
    freeze_embeddings: bool = False  # FullFT: train everything but the input embeddings and LM head (what LoRA reaches)
    divergence_factor: float = 4.0  # SFT: stop when loss > factor * first loss (or not finite); RL: non-finite only
    report_to: str = "none"  # tracking, HF's names: none | tensorboard | wandb | mlflow (comma-separated for several)

    def __post_init__(self) -> None:
        names = [n.strip() for n in str(self.report_to).split(",")]
        bad = [n for n in names if n not in REPORT_TO]
        if bad or ("none" in names and len(names) > 1):
            raise UserError(f"field 'report_to': expected {' | '.join(REPORT_TO)} (or a comma-separated list of "
                            f"trackers), got {self.report_to!r}")
        check_common(self)


@dataclass(frozen=True)
class SFTConfig(TrainCommon):
    data: str = "chatterbot"
    steps: int | None = None  # None: `epochs` passes over the training split
    epochs: float = 1.0
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward pass (gradient accumulation); None = batch_size
    seq_len: int = 512
    packing: bool = False  # pack examples into seq_len rows (padding-free); else pad per micro-batch
    too_long: str = "truncate"  # truncate | skip
    eval_size: int = 64  # held-out examples
    eval_points: int = 0  # > 0: also evaluate at this many log-spaced steps (learning curves in log steps)
    bits_per_token: float | None = None  # only informs the capacity check

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sft(self)


@dataclass(frozen=True)
class RLConfig(TrainCommon):
    lora: LoRAConfig | None = field(default_factory=lambda: LoRAConfig(rank=RL_RANK))  # the recipe's RL rank
    env: str = "rg:chain_sum"
    steps: int = 50
    problems_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    normalize_std: bool = False  # divide advantages by the group's std (off in the paper)
    clip_eps: float | None = None  # PPO-style ratio clipping; None = plain importance sampling
    kl_coef: float = 0.0  # KL to the base model (adapters off for LoRA)
    micro_batch_size: int = 16  # sequences per training forward pass (whole groups: rounded down to a multiple of G)
    eval_size: int = 64
    eval_every: int = 10
    train_size: int = 2000  # problems in the training pool
    collapse_check: bool = True  # stop as `diverged` when the policy collapses (regretless.rl.collapse)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rl(self)


CONFIGS: dict[str, type] = {"sft": SFTConfig, "rl": RLConfig}
DTYPES = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")


def _need(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise UserError(f"field {name!r}: expected {expected}, got {value!r}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(cfg: Any, names: tuple[str, ...], lo: int) -> None:
    for name in names:
        v = getattr(cfg, name)
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name,
              "a positive integer" if lo == 1 else f"an integer >= {lo}", v)


def check_common(cfg: TrainCommon) -> None:
    """Ranges of the fields shared by SFT and RL (paths are checked by the trainer before it writes anything)."""
    _need(isinstance(cfg.model, str) and cfg.model.strip() != "", "model",
          "a model folder, .gguf file or built-in name", cfg.model)
    _need(cfg.lr is None or (_is_num(cfg.lr) and cfg.lr > 0), "lr", "a positive number (or null: the recipe's)",
          cfg.lr)
    _need(cfg.lr_schedule in LR_SCHEDULES, "lr_schedule", " | ".join(LR_SCHEDULES), cfg.lr_schedule)
    _int_at_least(cfg, ("warmup_steps",), 0)
    _need(len(cfg.adam_betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in cfg.adam_betas), "adam_betas",
          "two numbers in [0, 1)", cfg.adam_betas)
    for name in ("adam_eps", "weight_decay", "grad_clip"):
        v = getattr(cfg, name)
        _need(_is_num(v) and v >= 0, name, "a number >= 0", v)
    _need(cfg.dtype in DTYPES, "dtype", " | ".join(DTYPES), cfg.dtype)
    dev = str(cfg.device)
    _need(dev in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", dev) is not None, "device",
          "auto | cpu | cuda | cuda:N | mps", cfg.device)
    _int_at_least(cfg, ("save_every", "log_every", "eval_every"), 1)
    _need(_is_num(cfg.divergence_factor) and cfg.divergence_factor > 1, "divergence_factor", "a number > 1",
          cfg.divergence_factor)
    if cfg.lora is not None:
        lo = cfg.lora
        _need(isinstance(lo.rank, int) and lo.rank >= 1, "lora.rank", "a positive integer", lo.rank)
        _need(lo.expert_rank is None or (isinstance(lo.expert_rank, int) and lo.expert_rank >= 1),
              "lora.expert_rank", "a positive integer or null", lo.expert_rank)
        _need(_is_num(lo.alpha) and lo.alpha > 0, "lora.alpha", "a positive number", lo.alpha)
        _need(_is_num(lo.lr_b_mult) and lo.lr_b_mult > 0, "lora.lr_b_mult", "a positive number", lo.lr_b_mult)
        _need(bool(lo.targets) and (not isinstance(lo.targets, str) or lo.targets.strip(" ,") != ""),
              "lora.targets", "all | mlp | attn | module names or regexes", lo.targets)


def check_sft(cfg: SFTConfig) -> None:
    _int_at_least(cfg, ("batch_size",), 1)
    _int_at_least(cfg, ("seq_len",), 2)
    _int_at_least(cfg, ("eval_size",), 0)
    if cfg.steps is not None:
        _int_at_least(cfg, ("steps",), 1)
    _need(_is_num(cfg.epochs) and cfg.epochs > 0, "epochs", "a number > 0", cfg.epochs)
    if cfg.micro_batch_size is not None:
        _int_at_least(cfg, ("micro_batch_size",), 1)
        if cfg.batch_size % cfg.micro_batch_size:
            raise UserError(f"field 'micro_batch_size': expected a divisor of batch_size={cfg.batch_size} "
                            f"(sequences per optimizer step), got {cfg.micro_batch_size}")
    _need(cfg.too_long in ("truncate", "skip"), "too_long", "truncate | skip", cfg.too_long)
    _need(cfg.bits_per_token is None or (_is_num(cfg.bits_per_token) and cfg.bits_per_token > 0),
          "bits_per_token", "a positive number or null", cfg.bits_per_token)


def check_rl(cfg: RLConfig) -> None:
    _int_at_least(cfg, ("steps", "problems_per_step", "max_new_tokens", "micro_batch_size", "train_size"), 1)
    _int_at_least(cfg, ("eval_size",), 0)
    if cfg.group_size < 2:
        raise UserError(f"field 'group_size': expected at least 2 (group-mean advantages of one sample are always "
                        f"0), got {cfg.group_size}")
    _need(_is_num(cfg.temperature) and cfg.temperature > 0, "temperature",
          "a number > 0 (greedy sampling gives a group G copies of one completion)", cfg.temperature)
    _need(_is_num(cfg.top_p) and 0 < cfg.top_p <= 1, "top_p", "a number in (0, 1]", cfg.top_p)
    _need(cfg.clip_eps is None or (_is_num(cfg.clip_eps) and cfg.clip_eps > 0), "clip_eps",
          "a positive number or null", cfg.clip_eps)
    _need(_is_num(cfg.kl_coef) and cfg.kl_coef >= 0, "kl_coef", "a number >= 0", cfg.kl_coef)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise UserError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[-1] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise UserError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    return value


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, d: dict[str, Any], where: str = "config") -> Any:
    types_ = field_types(cls)
    unknown = [k for k in d if k not in types_]
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}; expected one of: {', '.join(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}: field {k!r}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except UserError as e:  # a range check at construction: say which file
        raise UserError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def apply_overrides(d: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """`key=value` (dotted keys for nested fields, e.g. lora.rank=8; lora=null for FullFT)."""
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. lr=1e-4 or lora.rank=8")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        target = d
        sub_cls = cls
        for p in parts[:-1]:
            types_ = field_types(sub_cls)
            if p not in types_:
                raise UserError(f"override {item!r}: unknown field {p!r}")
            nested = [a for a in (typing.get_args(types_[p]) or (types_[p],)) if dataclasses.is_dataclass(a)]
            if not nested:
                raise UserError(f"override {item!r}: field {p!r} has no sub-fields")
            sub_cls = nested[0]
            cur = target.get(p)
            if cur is None:
                cur = to_dict(sub_cls())
            elif dataclasses.is_dataclass(cur):
                cur = to_dict(cur)
            target[p] = dict(cur)
            target = target[p]
        if parts[-1] not in field_types(sub_cls):
            raise UserError(f"override {item!r}: unknown field {parts[-1]!r}; expected one of: "
                            f"{', '.join(field_types(sub_cls))}")
        target[parts[-1]] = value
    return d


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping of config fields at the top level")
    return d


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = (),
                values: dict[str, Any] | None = None) -> Any:
    """YAML file, then explicit `values` (CLI flags), then `key=value` overrides; validated against `cls`."""
    d: dict[str, Any] = {}
    where = "config"
    if path is not None:
        d = read_yaml(path)
        d.pop("command", None)
        where = str(path)
    for k, v in (values or {}).items():
        d[k] = v
    d = apply_overrides(d, list(overrides), cls)
    return from_dict(cls, d, where)


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (tempfile's are 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a half-written file.
    The file gets the usual mode under the umask, not tempfile's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), umask_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(cfg: Any, path: str | Path, command: str) -> None:
    d = {"command": command, **to_dict(cfg)}
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))
