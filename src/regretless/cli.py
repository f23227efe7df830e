"""regretless: fine-tune language models with LoRA the way "LoRA Without Regret" prescribes, and test its claims.

examples:
  regretless sft --out runs/sft                           # LoRA SFT of the built-in SmolLM2-135M on chatterbot
  regretless rl --env rg:chain_sum --out runs/rl          # RL with rank-1 LoRA on reasoning-gym sums
  regretless generate --run runs/sft --prompt "Hi there"  # try the model just trained
  regretless recommend --model Llama-3.1-8B               # the paper's recipe (LR, rank, batch) for a model
  regretless reproduce --preset quick --out runs/quick    # the paper's five findings, from real runs

Run `regretless COMMAND --help` for a command's options and examples. Exit status: 0 success, 2 a user error
(one line on stderr), 3 a diverged run.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys

COMMANDS = ["sft", "rl", "generate", "recommend", "merge", "assets", "sweep", "report", "reproduce"]


def command_doc(name: str) -> str:
    """A command module's docstring, read from its source without importing it (imports pull in torch)."""
    spec = importlib.util.find_spec(f"regretless.commands.{name}")
    with open(spec.origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or name


# Each subcommand lives in `regretless/commands/<name>.py` and defines `add_arguments(parser)` and
# `run(args) -> int | None`; its module docstring is its --help text (first line: the one-line help).
# Only the module of the command being run is imported (`chosen`; None: all of them).
def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="regretless", description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=command_doc(name).splitlines()[0], add_help=False)
            continue
        mod = importlib.import_module(f"regretless.commands.{name}")
        doc = (mod.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=mod.__doc__, formatter_class=raw)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def set_env_defaults() -> None:
    """The environment every command runs in (no hub, fewer advisories). Set before transformers is imported,
    which reads it then (the sweep's zygote calls this before its imports)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# What a training command imports before its first step, most of it lazily (transformers loads its model
# classes on first use): a sweep's zygote (sweep/warm.py) imports it once, then forks every run from it.
WARM_MODULES = ("torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
                "regretless.commands.sft", "regretless.commands.rl", "regretless.prepare", "regretless.train",
                "regretless.rl.loop", "peft.utils.transformers_weight_conversion")


def preload() -> None:
    """Import what `sft` and `rl` need, without computing anything (no thread pool, no CUDA): the zygote's
    warm-up, after which `main` runs as it would in a fresh process."""
    set_env_defaults()
    for name in WARM_MODULES:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    from regretless.errors import UserError

    set_env_defaults()
    words = sys.argv[1:] if argv is None else argv
    chosen = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
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
