"""Times the MoE LoRA routed path (forward + backward) per routing mode on one GPU, bf16, and prints JSON lines.

    PYTHONPATH=src python3 tests/bench_lora_moe_gpu.py      (device machine; not collected by pytest)
"""

from __future__ import annotations

import json
import time

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import regretless.lora.experts as ex


def main() -> None:
    torch.manual_seed(0)
    for E, K, H, I, T in ((64, 8, 1024, 512, 4096), (128, 8, 2048, 768, 4096)):
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
        base = Qwen3MoeExperts(cfg).to("cuda", torch.bfloat16)
        for p in base.parameters():
            torch.nn.init.normal_(p, std=0.02)
            p.requires_grad_(False)
        lay = ex.experts_layout(base)
        lora = ex.LoRAExperts(base, lay, {"gate": 4, "up": 4, "down": 4}, {"gate": 8.0, "up": 8.0, "down": 8.0})
        lora.cuda()
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
        w = torch.rand(T, K, device="cuda", dtype=torch.bfloat16)
        for mode in ("grouped", "loop"):
            ex.routing_mode = lambda x, w, mode=mode: mode
            for i in range(13):
                if i == 3:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                lora(x, idx, w).float().sum().backward()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 10 * 1e3
            print(json.dumps({"E": E, "k": K, "H": H, "I": I, "tokens": T, "mode": mode, "fwd_bwd_ms": round(ms, 2)}))


if __name__ == "__main__":
    main()
