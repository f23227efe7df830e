"""The `regretless` command. Each subcommand lives in `regretless/commands/<name>.py` and defines
`add_arguments(parser)` and `run(args) -> int | None`; its module docstring's first line is its help."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ["sft", "rl", "generate", "recommend", "merge", "assets", "sweep", "report", "reproduce"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regretless", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"regretless.commands.{name}")
        doc = (mod.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from regretless.errors import UserError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    try:
        rc = args._run(args)
    except UserError as e:
        print(f"regretless {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"regretless {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
