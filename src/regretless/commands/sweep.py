"""Run a grid of training runs (a sweep spec) as separate processes, resumably, with a SQLite ledger.

examples:
  regretless sweep lr_sweep.yaml --out runs/lr --workers 4
  regretless sweep lr_sweep.yaml --out runs/lr --dry-run        # list the runs, start nothing
  regretless sweep big.yaml --out runs/big --gpus-per-run 4     # multi-GPU: each run is torchrun on 4 GPUs

Rerunning the same command skips finished runs, resumes interrupted ones and retries failed ones.
Stopping the sweep (Ctrl-C, SIGTERM, even kill -9) stops its trainers; a rerun resumes them.
"""

from __future__ import annotations

import argparse
import sys

from regretless.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="sweep spec (YAML): command, base, axes, seeds[, zip, exclude, findings]")
    p.add_argument("--out", required=True, help="sweep folder (runs/, ledger.sqlite, spec.yaml)")
    p.add_argument("--workers", type=int, default=None,
                   help="concurrent runs (default: one per GPU, else cores // --threads-per-run)")
    p.add_argument("--threads-per-run", type=int, default=None, help="CPU threads per run (default 1 on CPU)")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="GPUs per run (default 1); above 1 each run is started with torchrun on that many GPUs, "
                        "and runs = GPUs // this run at once")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what would run; start nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _print_plan(runs: list, todo: list) -> None:
    todo_ids = {r.id for r in todo}
    for r in runs:
        print(f"{r.id}  {'todo' if r.id in todo_ids else 'finished':>8}  {r.command}  {r.name}")
    print(f"{len(runs)} runs, {len(todo)} to run, {len(runs) - len(todo)} finished")


def run(args: argparse.Namespace) -> int:
    from regretless.sweep import run_sweep
    from regretless.sweep.runner import Terminated

    if args.gpus_per_run < 1:
        raise UserError(f"--gpus-per-run {args.gpus_per_run}: expected at least 1")
    try:
        result = run_sweep(args.spec, args.out, workers=args.workers, backend=args.backend, dry_run=args.dry_run,
                           threads_per_run=args.threads_per_run, gpus_per_run=args.gpus_per_run, quiet=args.quiet,
                           on_plan=_print_plan)
    except Terminated as e:
        print(f"regretless sweep: stopped by signal {e.signum}; its trainers were stopped, rerun to resume",
              file=sys.stderr)
        raise
    if args.dry_run:
        return 0
    c = result.counts
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    failed = [r for r in result.runs if r["status"] == "failed"]
    for r in failed:
        last = (r.get("error") or "").strip().splitlines()
        print(f"failed: {r['name']} [{r['id']}] {last[-1] if last else ''} (see {args.out}/{r['path']}/stderr.log)",
              file=sys.stderr)
    queued = [r for r in result.runs if r["status"] == "queued"]  # not started: their folder was in use
    for r in queued:
        print(f"not run: {r['name']} [{r['id']}] {r.get('error') or ''}", file=sys.stderr)
    return 1 if failed or queued else 0
