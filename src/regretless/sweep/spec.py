"""Sweep specs: a base `sft`/`rl` config plus axes, expanded into concrete, validated runs.

A spec (YAML or dict):

```yaml
command: sft                      # sft | rl
base: {model: smollm2-135m, steps: 200}   # any SFTConfig / RLConfig fields
axes:
  method: [full, lora]            # special: full sets lora=None
  lora.rank: [1, 16, 256]         # dotted names reach nested fields
  lr: {around_recipe: true, points_per_decade: 2, decades: 2}   # or a plain list, or {center: 3e-4, ...}
seeds: [0, 1]
zip: [[lora.rank, lora.targets]]  # optional: axes varied together (equal-length lists)
exclude: [{method: full, batch_size: 1024}]   # optional: drop grid points matching every key
findings: [capacity, lr_ratio]    # optional tags for the report; inferred from the axes when absent
```

Every axis is checked against the config dataclass before anything runs; each grid point becomes a real
config through `from_dict`, so a bad value is an error naming the spec file and the key. Points that differ
only in fields a full fine-tune ignores (`lora.*` with `method: full`) collapse into one run: runs are
identified by a hash of their config, so duplicates vanish.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import itertools
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regretless.config import CONFIGS, field_types, from_dict, read_yaml, to_dict
from regretless.errors import UserError

FINDINGS = ("capacity", "lr_ratio", "batch", "placement", "rl")
SPEC_KEYS = ("command", "name", "base", "axes", "seeds", "zip", "exclude", "findings")
_SHORT = {"method": "", "lora.rank": "r", "lr": "lr", "batch_size": "bs", "lora.targets": "t", "seed": "s",
          "steps": "steps", "lora.alpha": "a", "model": "", "data": "", "env": ""}

LrCenter = Callable[[Any, str], float]  # (config, method) -> the LR the grid is centred on


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec; `source` names where it came from (for error messages)."""

    command: str
    base: dict[str, Any]
    axes: dict[str, Any]
    seeds: tuple[int, ...] = ()
    zip: tuple[tuple[str, ...], ...] = ()
    exclude: tuple[dict[str, Any], ...] = ()
    findings: tuple[str, ...] = ()
    name: str = "sweep"
    source: str = "spec"


@dataclass(frozen=True)
class RunSpec:
    """One concrete run of a sweep."""

    id: str  # stable: hash of command + config (without `out`)
    name: str  # readable: the axis values, e.g. lora-r16-lr3e-04-s0
    command: str
    config: Any  # SFTConfig | RLConfig
    axes: dict[str, Any] = field(default_factory=dict)
    findings: tuple[str, ...] = ()


def _check_axis(cls: type, key: str, where: str) -> None:
    if key == "method":
        return
    parts = key.split(".")
    sub = cls
    for i, p in enumerate(parts):
        types_ = field_types(sub)
        if p not in types_:
            raise UserError(f"{where}: axes.{key}: {p!r} is not a field of {sub.__name__}; "
                            f"expected one of: {', '.join(types_)}")
        if i < len(parts) - 1:
            tp = types_[p]
            nested = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
            if not nested:
                raise UserError(f"{where}: axes.{key}: field {p!r} has no sub-fields")
            sub = nested[0]


def parse_spec(d: dict[str, Any], source: str = "spec") -> SweepSpec:
    """Validate the shape of a spec dict (fields, axes, zip, exclude); values are checked in `expand`."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = [k for k in d if k not in SPEC_KEYS]
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r}; expected one of: {', '.join(SPEC_KEYS)}")
    command = d.get("command")
    if command not in CONFIGS:
        raise UserError(f"{source}: command: {command!r} is not a trainer; expected one of: {', '.join(CONFIGS)}")
    cls = CONFIGS[command]
    base = d.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"{source}: base: expected a mapping of {cls.__name__} fields")
    from_dict(cls, {k: v for k, v in base.items()}, f"{source}: base")  # fail early on bad base fields
    axes = d.get("axes") or {}
    if not isinstance(axes, dict):
        raise UserError(f"{source}: axes: expected a mapping of field -> list of values")
    for key, values in axes.items():
        _check_axis(cls, key, source)
        if key == "lr" and isinstance(values, dict):
            _check_lr_grid(values, source)
            continue
        if not isinstance(values, list):
            raise UserError(f"{source}: axes.{key}: expected a list of values, got {values!r}")
        if not values:
            raise UserError(f"{source}: axes.{key}: empty list, so the grid is empty")
        if key == "method" and any(v not in ("full", "lora") for v in values):
            raise UserError(f"{source}: axes.method: values must be full or lora, got {values!r}")
    seeds = d.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{source}: seeds: expected a list of integers, got {seeds!r}")
    if "seed" in axes and seeds:
        raise UserError(f"{source}: give seeds either as `seeds:` or as axes.seed, not both")
    zips = tuple(tuple(g) for g in (d.get("zip") or []))
    for g in zips:
        for k in g:
            if k not in axes:
                raise UserError(f"{source}: zip: {k!r} is not one of the axes ({', '.join(axes)})")
            if not isinstance(axes[k], list):
                raise UserError(f"{source}: zip: axis {k!r} must be a plain list to be zipped")
        if len({len(axes[k]) for k in g}) > 1:
            raise UserError(f"{source}: zip: axes {list(g)} must have lists of equal length")
    zipped = [k for g in zips for k in g]
    if len(zipped) != len(set(zipped)):
        raise UserError(f"{source}: zip: an axis appears in two groups")
    exclude = tuple(d.get("exclude") or [])
    for rule in exclude:
        if not isinstance(rule, dict) or not rule:
            raise UserError(f"{source}: exclude: each rule is a mapping of axis -> value(s), got {rule!r}")
        for k in rule:
            if k not in axes and k != "seed":
                raise UserError(f"{source}: exclude: {k!r} is not one of the axes ({', '.join(axes)})")
    findings = tuple(d.get("findings") or _infer_findings(command, axes))
    for f in findings:
        if f not in FINDINGS:
            raise UserError(f"{source}: findings: {f!r} unknown; expected some of: {', '.join(FINDINGS)}")
    return SweepSpec(command=command, base=dict(base), axes=dict(axes), seeds=tuple(seeds), zip=zips,
                     exclude=exclude, findings=findings, name=str(d.get("name") or Path(source).stem),
                     source=source)


def load_spec(path: str | Path) -> SweepSpec:
    return parse_spec(read_yaml(path), str(path))


def _check_lr_grid(g: dict[str, Any], source: str) -> None:
    allowed = {"around_recipe", "center", "points_per_decade", "decades"}
    bad = [k for k in g if k not in allowed]
    if bad:
        raise UserError(f"{source}: axes.lr: unknown key {bad[0]!r}; expected some of: {', '.join(sorted(allowed))}")
    if bool(g.get("around_recipe")) == ("center" in g):
        raise UserError(f"{source}: axes.lr: give exactly one of `around_recipe: true` or `center: <lr>`")
    for k in ("points_per_decade", "decades"):
        v = g.get(k, 1)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise UserError(f"{source}: axes.lr.{k}: expected a positive number, got {v!r}")


def _infer_findings(command: str, axes: dict[str, Any]) -> tuple[str, ...]:
    if command == "rl":
        return ("rl",)
    if "lora.targets" in axes:
        return ("placement",)
    if "batch_size" in axes:
        return ("batch",)
    return ("capacity", "lr_ratio")


def lr_grid(center: float, points_per_decade: float = 2, decades: float = 2) -> list[float]:
    """`decades` wide in log10, centred on `center`, `points_per_decade` per decade (both ends included)."""
    n = round(decades * points_per_decade)
    return [float(f"{center * 10 ** ((i - n / 2) / points_per_decade):.4g}") for i in range(n + 1)]


def recipe_center(cfg: Any, method: str) -> float:
    """The recipe's LR for this run: regretless.recipe.default_lr(model_config, method, steps, task)."""
    try:
        recipe = importlib.import_module("regretless.recipe")
    except ImportError:
        raise UserError("axes.lr: around_recipe needs regretless.recipe, which this install lacks; "
                        "give the LRs as a list or as {center: <lr>, ...}") from None
    task = "rl" if hasattr(cfg, "env") else "sft"
    lr = recipe.default_lr(_model_config(cfg.model), method, getattr(cfg, "steps", None), task=task)
    return float(lr[0] if isinstance(lr, tuple) else lr)  # default_lr returns (lr, reason)


def _model_config(name: str) -> Any:
    """The model's transformers config: a local folder, the built-in table of known models, or a built-in
    asset (built or converted once by regretless.prepare.resolve_or_build)."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    try:
        return importlib.import_module("regretless.known_models").known_config(name)
    except (ImportError, AttributeError, UserError):
        pass
    from regretless.prepare import resolve_or_build

    return AutoConfig.from_pretrained(resolve_or_build(name, quiet=True))


def _set(d: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        tp = field_types(cls)[p]
        cls = next(a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a))
        cur = d.get(p)
        d[p] = dict(cur) if isinstance(cur, dict) else to_dict(cls())
        d = d[p]
    d[parts[-1]] = value


def _matches(point: dict[str, Any], rule: dict[str, Any]) -> bool:
    for k, v in rule.items():
        allowed = v if isinstance(v, list) else [v]
        if k not in point or point[k] not in allowed:
            return False
    return True


# Config fields added after run ids were first issued, with their defaults: a field at its default is left out of
# the id, so a run made before the field existed keeps its id (and folder) and a replay still finds it.
LATER_FIELDS = {"save_weights": True}


def run_id(command: str, cfg: Any) -> str:
    d = to_dict(cfg)
    d.pop("out", None)
    for k, default in LATER_FIELDS.items():
        if d.get(k, default) == default:
            d.pop(k, None)
    blob = json.dumps({"command": command, "config": d}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_name(axes: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(axes.items(), key=lambda kv: kv[0] != "method"):  # method first, then spec order
        if isinstance(v, float):
            v = _short_float(v)
        elif isinstance(v, (list, tuple)):
            v = "+".join(map(str, v))
        short = _SHORT.get(k, k.split(".")[-1] + "=")
        parts.append(f"{short}{v}")
    return "-".join(parts).replace("/", "_").replace(" ", "") or "base"


def _short_float(v: float) -> str:
    """3e-04 -> 3e-4, 0.000316 -> 3.16e-4, 0.5 -> 0.5."""
    if v == 0 or 1e-2 <= abs(v) < 1e4:
        return f"{v:g}"
    mantissa, exp = f"{v:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def _points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid before LR expansion: product over zip groups and the other axes (spec order kept)."""
    groups: list[list[dict[str, Any]]] = []
    zipped = {k for g in spec.zip for k in g}
    seen: set[str] = set()
    for key, values in spec.axes.items():
        if key in seen or (key == "lr" and isinstance(values, dict)):
            continue
        group = next((g for g in spec.zip if key in g), None)
        if group is not None:
            groups.append([{k: spec.axes[k][i] for k in group} for i in range(len(spec.axes[key]))])
            seen.update(group)
        elif key not in zipped:
            groups.append([{key: v} for v in values])
            seen.add(key)
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*groups)]


def expand(spec: SweepSpec, lr_center: LrCenter | None = None) -> list[RunSpec]:
    """Every run of the sweep, validated, duplicates (e.g. rank axis under FullFT) collapsed, order kept."""
    cls = CONFIGS[spec.command]
    lr_axis = spec.axes.get("lr")
    seeds: list[int | None] = list(spec.seeds) or [None]
    runs: dict[str, RunSpec] = {}
    for point in _points(spec):
        d = copy.deepcopy(spec.base)
        method = point.get("method", "full" if d.get("lora", "unset") is None else "lora")
        for key, value in point.items():
            if key != "method" and not (method == "full" and key.startswith("lora.")):
                _set(d, key, value, cls)
        if method == "full":
            d["lora"] = None
        elif d.get("lora", "unset") is None:
            d["lora"] = {}
        where = f"{spec.source}: grid point {point}"
        lrs: list[Any] = [None]
        if isinstance(lr_axis, dict):
            probe = from_dict(cls, d, where)
            center = lr_axis.get("center") or (lr_center or recipe_center)(probe, method)
            lrs = lr_grid(float(center), lr_axis.get("points_per_decade", 2), lr_axis.get("decades", 2))
        for lr in lrs:
            for seed in seeds:
                dd = dict(d)
                axes = {k: v for k, v in point.items() if not (method == "full" and k.startswith("lora."))}
                if lr is not None:
                    dd["lr"] = lr
                    axes["lr"] = lr
                if seed is not None:
                    dd["seed"] = seed
                    axes["seed"] = seed
                if any(_matches({**axes, "method": method}, r) for r in spec.exclude):
                    continue
                cfg = from_dict(cls, dd, where)
                rid = run_id(spec.command, cfg)
                if rid not in runs:
                    runs[rid] = RunSpec(id=rid, name=run_name(axes), command=spec.command, config=cfg,
                                        axes=axes, findings=spec.findings)
    if not runs:
        raise UserError(f"{spec.source}: the grid is empty (every point excluded?)")
    return list(runs.values())


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    d = {k: getattr(spec, k) for k in ("command", "name", "base", "axes", "seeds", "exclude", "findings")}
    d["zip"] = [list(g) for g in spec.zip]
    d["seeds"], d["exclude"], d["findings"] = list(spec.seeds), list(spec.exclude), list(spec.findings)
    return d

