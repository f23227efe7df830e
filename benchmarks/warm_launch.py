"""Seconds per sweep run, started cold (`python -m regretless.cli sft ...`) vs warm (forked by the zygote).

N runs like those of `regretless reproduce --preset quick` (tiny-base, 480 gsm-symbolic examples, batch 4 for
one epoch: 120 steps, LoRA r=8, one seed each), one at a time (one slot, 2 threads), by `run_sweep`: a cold
sweep (REGRETLESS_WARM=0), then a warm one, `--repeats` times. A run's seconds go from its launch to its recorded
exit (the ledger's `started` -> `finished`); a sweep's total includes the warm sweep's zygote start.

    python benchmarks/warm_launch.py --runs 4 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def sweep(mode: str, runs: int, out: Path, data: str, threads: int) -> tuple[list[float], float]:
    from regretless.reproduce import QUICK
    from regretless.sweep import run_sweep

    os.environ["REGRETLESS_WARM"] = "0" if mode == "cold" else "1"
    spec = {"command": "sft", "base": {**QUICK.sft, "model": "tiny-base", "data": data, "lora": {"rank": 8}},
            "axes": {"seed": list(range(runs))}}
    t0 = time.time()
    res = run_sweep(spec, out, workers=1, threads_per_run=threads, quiet=True, gpus=[])
    total = time.time() - t0
    assert res.counts == {"done": runs}, [r["error"] for r in res.runs]
    return [r["finished"] - r["started"] for r in res.runs], total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4, help="runs per sweep")
    p.add_argument("--repeats", type=int, default=1, help="cold + warm sweep pairs")
    p.add_argument("--threads", type=int, default=2, help="threads per run")
    args = p.parse_args()
    from regretless.prepare import resolve_or_build
    from regretless.reproduce import materialize_data

    resolve_or_build("tiny-base")
    with tempfile.TemporaryDirectory() as tmp:
        data = str(materialize_data("gsm-symbolic:512", Path(tmp) / "data"))
        seconds: dict[str, list[float]] = {"cold": [], "warm": []}
        for i in range(args.repeats):
            for mode in ("cold", "warm"):
                per_run, total = sweep(mode, args.runs, Path(tmp) / f"{mode}{i}", data, args.threads)
                seconds[mode] += per_run
                print(f"{mode} sweep {i + 1}: runs {' '.join(f'{s:.1f}' for s in per_run)} s; "
                      f"total {total:.1f} s for {args.runs} runs", flush=True)
    for mode, s in seconds.items():
        print(f"{mode}: median {statistics.median(s):.1f} s a run, mean {statistics.mean(s):.1f} s "
              f"(min {min(s):.1f}, max {max(s):.1f}, {len(s)} runs)")


if __name__ == "__main__":
    main()
