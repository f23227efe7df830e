"""Sweeps: a spec (base config + axes) expanded into runs, run as separate trainer processes, indexed in a
SQLite ledger. Python API: `spec = parse_spec({...})` or `load_spec(path)`, then `run_sweep(spec, out)`."""

from regretless.sweep.ledger import Ledger
from regretless.sweep.runner import SweepResult, run_sweep
from regretless.sweep.spec import RunSpec, SweepSpec, expand, load_spec, lr_grid, parse_spec

__all__ = ["Ledger", "RunSpec", "SweepResult", "SweepSpec", "expand", "load_spec", "lr_grid", "parse_spec",
           "run_sweep"]
