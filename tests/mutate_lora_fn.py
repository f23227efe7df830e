"""Mutation check of the frozen-base LoRA autograd function: alter one term at a time in
src/regretless/lora/layer.py, run its tests, expect each alteration to be caught, restore the file.

    .venv/bin/python tests/mutate_lora_fn.py      (not collected by pytest; about a minute)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mutate import ROOT, run_mutations

SRC = ROOT / "src/regretless/lora/layer.py"
MUTATIONS = {
    "dA drops the scale": ("dA = (gb_N_r.T @ x).mul_(s)", "dA = (gb_N_r.T @ x)"),
    "dB drops the scale": ("dB = (g_N_out.T @ xa).mul_(s)", "dB = (g_N_out.T @ xa)"),
    "dx drops the LoRA term": ("dx = torch.addmm(g_N_out @ W, gb_N_r, A, alpha=s)", "dx = (g_N_out @ W)"),
    "dx LoRA term unscaled": ("dx = torch.addmm(g_N_out @ W, gb_N_r, A, alpha=s)",
                              "dx = torch.addmm(g_N_out @ W, gb_N_r, A)"),
    "dx drops the base term": ("dx = torch.addmm(g_N_out @ W, gb_N_r, A, alpha=s)",
                               "dx = torch.addmm(torch.zeros_like(g_N_out @ W), gb_N_r, A, alpha=s)"),
    "forward drops the LoRA term": ("y = torch.addmm(y, xa_N_r, B.T, alpha=scale)", "y = y"),
    "forward LoRA term unscaled": ("y = torch.addmm(y, xa_N_r, B.T, alpha=scale)", "y = torch.addmm(y, xa_N_r, B.T)"),
    "forward drops the bias": ("y = torch.addmm(bias, x_N_in, W.T) if bias is not None else x_N_in @ W.T",
                               "y = x_N_in @ W.T"),
    "dA off by 1%": ("dA = (gb_N_r.T @ x).mul_(s)", "dA = (gb_N_r.T @ (x * 1.01)).mul_(s)"),
}


def main() -> int:
    return run_mutations(SRC, MUTATIONS, ["tests/test_lora_layer.py", "-k", "fn or fused_path"])


if __name__ == "__main__":
    raise SystemExit(main())
