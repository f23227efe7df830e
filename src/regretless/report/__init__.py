"""Reports on sweeps: analysis (pointwise-min curves, optimal LRs), the five figures, and the claims table.
Python API: `write_report(DIR)` writes DIR/report.html, DIR/claims.json and DIR/figures/."""

from regretless.report.html import build, write_report

__all__ = ["build", "write_report"]
