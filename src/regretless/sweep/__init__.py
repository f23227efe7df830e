"""Sweeps: a spec (base config + axes) expanded into runs, run as separate trainer processes, indexed in a
SQLite ledger. Python API: `spec = parse_spec({...})` or `load_spec(path)`, then `run_sweep(spec, out)`;
`current_rows(out)` lists the ledger rows of the current spec.

Modules, in import order (each imports only those before it): spec, ledger -> procs (trainer processes, locks)
-> launch (argv, slots, recording a finished run) -> warm (the zygote of warm launches) -> local_backend,
ray_backend -> runner (run_sweep).
"""

from regretless.sweep.ledger import Ledger, current_rows, stale_rows
from regretless.sweep.runner import SweepResult, register_spec, run_sweep
from regretless.sweep.spec import RunSpec, SweepSpec, expand, load_spec, lr_grid, parse_spec

__all__ = [
    "Ledger",
    "RunSpec",
    "SweepResult",
    "SweepSpec",
    "current_rows",
    "expand",
    "load_spec",
    "lr_grid",
    "parse_spec",
    "register_spec",
    "run_sweep",
    "stale_rows",
]
