"""Several trainer runs in one torchrun job (one process-group start instead of one per run), for
tests/test_distributed.py. Each argument is COMMAND=CONFIG.yaml; the run goes where the config's `out` says:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_runs.py sft=a.yaml rl=b.yaml
"""

from __future__ import annotations

import sys

from regretless.config import RLConfig, SFTConfig, load_config
from regretless.rl.loop import run_rl
from regretless.train import run_sft

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        command, path = arg.split("=", 1)
        if command == "sft":
            run_sft(load_config(SFTConfig, path))
        else:
            run_rl(load_config(RLConfig, path))
