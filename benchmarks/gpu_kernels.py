"""The kernels a dense step is made of, alone on one GPU: SDPA attention per backend, and the GEMMs of a
Llama-3.2-1B layer and LM head at 8 x 2048 tokens. Says what each part of a step should cost (issue 12).

    PYTHONPATH=src python3 benchmarks/gpu_kernels.py --out $OUT/kernels.json

Attention: (B, H, T, D) = (8, 32, 2048, 64) with 8 KV heads, forward + backward, causal (`is_causal=True`) and
with the (B, 1, T, T) boolean mask transformers builds when it cannot prove a padding mask is all ones (under
torch.compile tracing); FLOPs counted causal (half of 4·B·H·T²·D forward), times 3 with backward, as the
benchmark's MFU counts them. GEMMs: bf16, y = x·Wᵀ shapes (N, d_in) x (d_in, d_out) and the
backward's dx = g·W, TFLOP/s = 2·N·d_in·d_out / time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def attention(rows: list[dict]) -> None:
    B, H, KV, T, D = 8, 32, 8, 2048, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril().expand(B, 1, T, T)
    flops = 3 * 2 * B * H * T * T * D  # causal QK^T and AV forward (half of 4BHT^2D), x3 with backward
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for masked in (False, True):
            name = f"sdpa {backend.name.lower()} {'bool mask' if masked else 'is_causal'}"

            def fwd_bwd(masked=masked):
                kk, vv = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask if masked else None, is_causal=not masked)
                o.sum().backward()

            try:
                with sdpa_kernel([backend]):
                    t = timed(fwd_bwd)
                rows.append({"kernel": name, "ms": round(t * 1e3, 2), "tflops": round(flops / t / 1e12, 1)})
            except Exception as e:  # noqa: BLE001 - a backend that does not take this case
                rows.append({"kernel": name, "error": str(e).splitlines()[0][:160]})
            print(json.dumps(rows[-1]), flush=True)


def gemms(rows: list[dict]) -> None:
    N = 8 * 2048
    shapes = {"q/o (2048->2048)": (2048, 2048), "k/v (2048->512)": (2048, 512), "gate/up (2048->8192)": (2048, 8192),
              "down (8192->2048)": (8192, 2048), "lm head (2048->128256)": (2048, 128256),
              "lora A (2048->64)": (2048, 64), "lora B (64->8192)": (64, 8192)}
    for name, (d_in, d_out) in shapes.items():
        x = torch.randn(N, d_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        gy = torch.randn(N, d_out, device="cuda", dtype=torch.bfloat16)
        for what, fn in (("x.Wt", lambda x=x, w=w: x @ w.T), ("g.W", lambda gy=gy, w=w: gy @ w)):
            t = timed(fn)
            rows.append({"kernel": f"gemm {name} {what}", "ms": round(t * 1e3, 3),
                         "tflops": round(2 * N * d_in * d_out / t / 1e12, 1)})
            print(json.dumps(rows[-1]), flush=True)


def routed(rows: list[dict]) -> None:
    """The routed experts' GEMMs at Qwen3-30B-A3B's shape (T = 8 x 2048 tokens, top-8 of E = 128, H = 2048,
    I = 768, LoRA rank 8 per expert matrix, gate and up together 16), forward + backward, each way the adapters
    can be computed: grouped over the (S = T·K) slots in expert order, or, where the adapter touches token space
    (the first projection's A reads x_T, the down projection's B writes into the tokens' sum), as one dense GEMM
    over all experts' adapters in token space plus a gather of each slot's block."""
    T, K, E, H, I, r = 8 * 2048, 8, 128, 2048, 768, 8
    S = T * K
    g = torch.Generator(device="cuda").manual_seed(0)
    top = torch.rand(T, E, device="cuda", generator=g).topk(K, -1).indices  # (T, K) balanced on average
    expert_S, order_S = torch.sort(top.reshape(-1), stable=True)
    offs = torch.cumsum(torch.bincount(expert_S, minlength=E), 0).to(torch.int32)
    tok_S = order_S // K
    bf = {"device": "cuda", "dtype": torch.bfloat16}

    def leaf(*shape):
        return (torch.randn(*shape, **bf, generator=g) * 0.02).requires_grad_()

    x_T, x_S, h_S = leaf(T, H), leaf(S, H), leaf(S, I)
    u_S, ud_S = leaf(S, 2 * r), leaf(S, r)
    A1, B1, A2, B2 = leaf(E, H, 2 * r), leaf(E, 2 * r, 2 * I), leaf(E, I, r), leaf(E, r, H)
    W1, W2 = torch.randn(E, H, 2 * I, **bf, generator=g), torch.randn(E, I, H, **bf, generator=g)
    A1_all, B2_all = leaf(H, E * 2 * r), leaf(E * r, H)
    w_S = torch.rand(S, **bf, generator=g)
    gm = torch.nn.functional.grouped_mm

    leaves = [x_T, x_S, h_S, u_S, ud_S, A1, B1, A2, B2, A1_all, B2_all]

    def fb(fn):  # forward + backward (output gradient of ones), gradients written fresh, not accumulated
        def run():
            y = fn()
            y.backward(torch.ones_like(y))
            for t in leaves:
                t.grad = None
        return run

    cases = {
        "base first x_S.W1 (grouped, dx only)": (fb(lambda: gm(x_S, W1, offs=offs)), 2 * 2 * S * H * 2 * I),
        "base down h_S.W2 (grouped, dx only)": (fb(lambda: gm(h_S, W2, offs=offs)), 2 * 2 * S * I * H),
        "lora first A: x_S.A1 grouped": (fb(lambda: gm(x_S, A1, offs=offs)), 3 * 2 * S * H * 2 * r),
        "lora first A: x_T.A1_all dense + gather": (
            fb(lambda: (x_T @ A1_all).view(T, E, 2 * r)[tok_S, expert_S]), 3 * 2 * T * H * E * 2 * r),
        "lora first B: u_S.B1 grouped": (fb(lambda: gm(u_S, B1, offs=offs)), 3 * 2 * S * 2 * r * 2 * I),
        "lora down A: h_S.A2 grouped": (fb(lambda: gm(h_S, A2, offs=offs)), 3 * 2 * S * I * r),
        "lora down B: ud_S.B2 grouped": (fb(lambda: gm(ud_S, B2, offs=offs)), 3 * 2 * S * r * H),
        "lora down B: Z_T.B2_all dense (Z_T scattered)": (
            fb(lambda: torch.zeros(T, E, r, **bf).index_put((tok_S, expert_S), ud_S * w_S[:, None])
               .view(T, E * r) @ B2_all), 3 * 2 * T * E * r * H),
    }
    for name, (fn, flop) in cases.items():
        t = timed(fn)
        rows.append({"kernel": f"routed {name}", "ms": round(t * 1e3, 3), "tflops": round(flop / t / 1e12, 1)})
        print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="", help="comma list of attention, gemms, routed")
    args = ap.parse_args()
    rows: list[dict] = [{"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "cudnn": torch.backends.cudnn.version()}]
    ap_only = args.only.split(",") if args.only else ["attention", "gemms", "routed"]
    for part in ap_only:
        {"attention": attention, "gemms": gemms, "routed": routed}[part](rows)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
