"""Reproduce the paper's five findings: run their sweeps, write report.html and claims.json, print the verdicts.

Example: regretless reproduce --preset quick --out runs/quick           (2 CPU cores, <= 15 minutes)
         regretless reproduce --preset full --out runs/full --only lr_ratio,rl --dry-run
Presets (regretless.reproduce.PRESETS): quick = tiny-base, a 1M-parameter model regretless pretrains itself
in a minute or two; full = SmolLM2-135M with paper-like budgets. Rerunning skips finished runs.
"""

from __future__ import annotations

import argparse

from regretless.sweep.spec import FINDINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help="quick (default) | full")
    p.add_argument("--out", required=True, help="output folder: one sweep folder per finding group, the report")
    p.add_argument("--only", help=f"comma-separated findings to run: {','.join(FINDINGS)} (default: all)")
    p.add_argument("--workers", type=int, default=None,
                   help="concurrent runs (default: one per GPU, else one per CPU core)")
    p.add_argument("--dry-run", action="store_true", help="list the sweeps and their runs; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from regretless import reproduce as R

    preset = R.get_preset(args.preset)
    only = R.parse_only(args.only)
    if args.dry_run:
        total = 0
        print(f"preset {preset.name}: {preset.description}")
        for spec, n in R.plan(preset, only):
            total += n
            print(f"  {args.out}/{spec.name}: {n} {spec.command} runs ({', '.join(spec.findings)})")
        print(f"{total} runs in all")
        return 0
    result = R.reproduce(preset, args.out, only=only, workers=args.workers, quiet=args.quiet)
    counts: dict[str, int] = {}
    for c in result["sweeps"].values():
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    print(f"regretless reproduce --preset {preset.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f" runs in {result['timing']['total_s']:.0f} s")
    for line in R.summary_lines(result, only):
        print(line)
    print(f"wrote {args.out}/report.html and {args.out}/claims.json")
    return 1 if counts.get("failed") else 0
