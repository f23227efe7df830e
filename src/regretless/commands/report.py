"""Write report.html and claims.json (the paper's findings: held / did not hold / inconclusive) for a sweep folder.

examples:
  regretless report runs/lr       # one sweep folder
  regretless report runs/quick    # a reproduce output: every ledger.sqlite below it, at any depth
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a sweep folder (or a folder of sweeps, e.g. a reproduce output)")


def run(args: argparse.Namespace) -> int:
    from regretless.report import write_report

    report = write_report(args.dir)
    for c in report["claims"]:
        print(f"{c['title']:<20} {c['verdict']:<14} {c['measured']}")
    drawn = sum(bool(f["files"]) for f in report["figures"])
    print(f"wrote {args.dir}/report.html, {args.dir}/claims.json and {drawn} figures")
    return 0
