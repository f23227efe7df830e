"""Mutation check of the fused LM head + NLL: alter one term at a time in src/regretless/lm.py, run
tests/test_lm_fused.py, expect each alteration to be caught, restore the file.

    PYTHONPATH=src python tests/mutate_lm_fused.py      (not collected by pytest; about two minutes)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mutate import ROOT, run_mutations

SRC = ROOT / "src/regretless/lm.py"
ONEHOT = "g_C_V[torch.arange(len(y_C), device=y_C.device), y_C] -= 1.0"
MUTATIONS = {
    "gradient without the one-hot": (ONEHOT, "pass"),
    "one-hot off by 1%": (ONEHOT, ONEHOT.replace("1.0", "1.01")),
    "no softcap chain rule": ("g_C_V.mul_(t_C_V.square_().neg_().add_(1.0))", "pass"),
    "softcap chain rule 1 - t": ("g_C_V.mul_(t_C_V.square_().neg_().add_(1.0))", "g_C_V.mul_(t_C_V.neg().add_(1.0))"),
    "backward ignores the incoming gradient": ("(d * g).to(dt)", "d.to(dt)"),
    "dh off by 1%": ("dh[s:s + chunk] = g_C_V @ W", "dh[s:s + chunk] = 1.01 * (g_C_V @ W)"),
    "dh written at the wrong rows": ("dh[s:s + chunk] = g_C_V @ W", "dh[:len(y_C)] = g_C_V @ W"),
    "dW from the last chunk only": ("dW += g_C_V.T @ h_C_H", "dW.copy_(g_C_V.T @ h_C_H)"),
    "dW off by 1%": ("dW += g_C_V.T @ h_C_H", "dW += 1.01 * (g_C_V.T @ h_C_H)"),
    "db dropped": ("db += g_C_V.sum(0)", "pass"),
    "loss without the target term": ("total += (m_C + sum_C.log() - zy_C).sum()", "total += (m_C + sum_C.log()).sum()"),
    "loss without the max shift": ("total += (m_C + sum_C.log() - zy_C).sum()", "total += (sum_C.log() - zy_C).sum()"),
    "softmax not normalised": ("g_C_V = e_C_V.div_(sum_C[:, None])", "g_C_V = e_C_V"),
    "loss without the cap": ("                    z_C_V = t_C_V * cap\n", "                    z_C_V = t_C_V * cap * 1.0001\n"),
    "matmul in fp32 under autocast": ("return torch.get_autocast_dtype(device)", "return W.dtype"),
    "RL chunks keep their logits": ("recompute = torch.is_grad_enabled() and not keep_logits", "recompute = False"),
}


def main() -> int:
    return run_mutations(SRC, MUTATIONS, ["tests/test_lm_fused.py"])


if __name__ == "__main__":
    raise SystemExit(main())
