"""Reproduce the paper's five findings as a fair test: every condition gets its own adaptive LR search, the
decisive runs are repeated with several seeds, and each finding's verdict comes from an effect with a 95%
interval: held, did not hold, or inconclusive. Rerunning with the same --out skips finished runs and replays
the same search.

Examples:
  regretless reproduce --preset quick --out runs/quick        # tiny-base, all five findings, 2 CPU cores
  regretless reproduce --preset standard --out runs/standard  # SmolLM2-135M: capacity, LR ratio, placement
  regretless reproduce --model ./my-model --data chats.jsonl --only placement --out runs/mine  # your model, data
  regretless reproduce --preset full --dry-run --out runs/full  # what the GPU preset would run
  regretless reproduce --preset full --report-only --out runs/full  # the report of runs brought back, none launched
"""

from __future__ import annotations

import argparse

from regretless.sweep.spec import FINDINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help="quick (default) | standard | full")
    p.add_argument("--model", help="the model to test (a folder, a .gguf file or a built-in name); default: the "
                                   "preset's")
    p.add_argument("--data", help="SFT data (chat or prompt/completion JSONL, a datasets folder, a built-in "
                                  "name); default: the preset's")
    p.add_argument("--env", help="RL environment (e.g. rg:chain_sum,max_terms=2 or a JSONL file); default: the "
                                 "preset's")
    p.add_argument("--out", required=True, help="output folder: the sweeps, the report and claims.json")
    p.add_argument("--only", help=f"comma-separated findings to run: {','.join(FINDINGS)} (default: the preset's)")
    p.add_argument("--workers", type=int, default=None,
                   help="concurrent runs (default: one per GPU, else one per CPU core)")
    p.add_argument("--dry-run", action="store_true", help="list the conditions and the search; run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="replay the searches from the runs already in --out and write the report; launch nothing "
                        "(e.g. for run folders brought back from a GPU machine)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from regretless import reproduce as R

    preset = R.get_preset(args.preset)
    if args.dry_run:
        for line in R.dry_run(preset, model=args.model, only=args.only):
            print(line)
        return 0
    result = R.reproduce(preset, args.out, model=args.model, data=args.data, env=args.env, only=args.only,
                         workers=args.workers, quiet=args.quiet, **({"max_rounds": 0} if args.report_only else {}))
    ctx = result["context"]
    left = [c["name"] for c in ctx["conditions"] if c["search"] == "searching"]
    print(f"{ctx['runs']} runs planned, {ctx['rounds']} rounds run now, {ctx['wall_s'] / 60:.1f} min; runs active "
          f"{ctx['runs_wall_s'] / 60:.1f} min in all" + (f"; still searching: {', '.join(left)}" if left else ""))
    for line in R.summary_lines(result, R.parse_only(args.only, preset.findings)):
        print(line)
    print(f"wrote {args.out}/report.html and {args.out}/claims.json")
    failed = result["report"]["runs"].get("failed", 0)
    return 1 if failed else 0
