"""Token log-probabilities and the SFT loss without the (B, T, V) logits tensor.

The LM head runs on the selected positions only (those with a label), in chunks of CHUNK positions, and the
log-softmax is taken chunk by chunk in fp32: memory is O(chunk · V) instead of O(B · T · V) — the "chunked
cross-entropy" that keeps a 49k- or 150k-vocabulary model's loss from dominating memory. Used by SFT (NLL) and
RL (log-probs, entropy).

Training keeps no logits either:
- SFT (`nll_sum` with grad enabled): `head_nll_sum`, one autograd node that computes each chunk's logits, the NLL
  and, in the same pass, the gradient pieces dL/dh = (softmax − onehot)·W and dL/dW += (softmax − onehot)ᵀ·h (the
  latter only when the head is trained: FullFT; LoRA freezes it). Backward only multiplies them by the incoming
  gradient, so what waits for backward is (N, H) and (V, H), never (N, V) — the idea of Liger-Kernel's fused
  linear cross-entropy, in plain PyTorch ops. Matmuls run in the dtype the plain head would use (the autocast
  dtype under autocast, else the head's), the softmax in fp32; dh and dW are accumulated in fp32. On CUDA the
  softmax pass is two Triton kernels (`regretless.kernels`), elsewhere compiled or eager PyTorch.
- RL (`head_logprobs` with grad enabled: per-token log-probs feed an arbitrary loss): each chunk's head and
  log-softmax run under non-reentrant activation checkpointing, so backward recomputes the chunk's logits from
  the kept h instead of storing them (one extra head forward; the entropy stays without gradient).

The plain chunked path (logits kept for backward) remains for what the fused node does not handle: a head that
is not a bare `nn.Linear` (an LM head the user named as a LoRA target, one with hooks, a tensor-parallel weight),
and models whose head is not split from the trunk or that scale logits (`logit_scale`), which run the model's own
forward. Gemma-style `final_logit_softcapping` (z -> cap·tanh(z/cap)) is handled in both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from regretless import distributed

CHUNK = 4096  # positions per LM-head chunk
FUSED_CHUNK = 2048  # positions per chunk of the fused head + NLL: its (C, V) buffers are what it adds at the peak


def _trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    head = model.get_output_embeddings()
    trunk = getattr(model, "base_model", None)
    if trunk is None or trunk is model or head is None:
        return None
    if getattr(model.config, "logit_scale", None) not in (None, 1, 1.0):
        return None  # heads with extra scaling: fall back to the model's own logits
    return trunk, head


def _softcap(model: nn.Module) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None) or None


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = _trunk_and_head(model)
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    assert parts is not None
    return parts[0](**kwargs, use_cache=False).last_hidden_state  # (B, T, H)


def _head_logits(model: nn.Module, h_N_H: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(h_N_H).float()  # (N, V)
    cap = _softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@distributed.through_root  # torchrun: trunk and head run inside the FSDP root's hooks
def target_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], targets_B_T: torch.Tensor,
                    with_entropy: bool = False, keep_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[b, t] | inputs[b, :t+1]) at every position where targets != -100 (the label of the *next*
    token is targets[b, t]; callers shift). Returns (logp_N, entropy_N or None), N = number of such positions,
    in row-major order. `keep_logits`: see `head_logprobs`."""
    sel_B_T = targets_B_T != -100
    y_N = targets_B_T[sel_B_T]
    if _trunk_and_head(model) is None:
        kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**kwargs, use_cache=False).logits.float()[sel_B_T]  # (N, V)
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return logp.gather(-1, y_N[:, None])[:, 0], ent
    return head_logprobs(model, hidden_states(model, batch)[sel_B_T], y_N, with_entropy, keep_logits)


def _chunk_logprobs(model: nn.Module, h_C_H: torch.Tensor, y_C: torch.Tensor, with_entropy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = _head_logits(model, h_C_H)  # (C, V) fp32
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, y_C[:, None])[:, 0] - lse
    ent = None
    if with_entropy:  # after every op that saves for backward: a checkpoint's recompute stops before this
        with torch.no_grad():
            ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


def head_logprobs(model: nn.Module, h_N_H: torch.Tensor, y_N: torch.Tensor, with_entropy: bool = False,
                  keep_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(y_n | h_n) through the LM head, CHUNK positions at a time (fp32 log-softmax). With grad enabled each
    chunk runs under activation checkpointing: backward recomputes its logits instead of keeping them
    (`keep_logits=True`: each chunk's fp32 logits are kept for backward instead, the plain chunked path)."""
    recompute = torch.is_grad_enabled() and not keep_logits
    out, ents = [], []
    for s in range(0, h_N_H.shape[0], CHUNK):
        args = (model, h_N_H[s:s + CHUNK], y_N[s:s + CHUNK], with_entropy)
        logp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if recompute else _chunk_logprobs(*args)
        out.append(logp)
        ents.append(ent)
    return torch.cat(out), (torch.cat(ents) if with_entropy else None)


class _FusedHeadNLL(torch.autograd.Function):
    """L = Σ_n [logsumexp(z_n) − z_n[y_n]], z = c(h·Wᵀ + b) in fp32, c the identity or cap·tanh(·/cap).

    Forward computes L and its gradients chunk by chunk: with p = softmax(z_n) and e_y the one-hot of y_n,
    dL/du_n = (p − e_y) ⊙ c'(u_n) for the pre-cap logits u_n (c' = 1 − tanh²(u/cap), or 1), then dL/dh_n = that·W,
    dL/dW = Σ_n thatᵀ·h_n, dL/db = Σ_n that. Only these are saved; backward multiplies them by dLoss/dL."""

    @staticmethod
    def forward(ctx, h_N_H, W_V_H, b_V, y_N, cap: float | None, chunk: int, dtype: torch.dtype, softmax_fn=None):
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        N, V = h_N_H.shape[0], W_V_H.shape[0]
        with torch.autocast(h_N_H.device.type, enabled=False):  # casts made here, as autocast would make them
            W = W_V_H.to(dtype)
            b = b_V.to(dtype) if b_V is not None else None
            total = torch.zeros((), dtype=torch.float32, device=h_N_H.device)
            dh = torch.empty(h_N_H.shape, dtype=torch.float32, device=h_N_H.device) if need_h else None
            dW = torch.zeros(W_V_H.shape, dtype=torch.float32, device=W_V_H.device) if need_W else None
            db = torch.zeros(V, dtype=torch.float32, device=W_V_H.device) if need_b else None
            for s in range(0, N, chunk):
                h_C_H, y_C = h_N_H[s:s + chunk].to(dtype), y_N[s:s + chunk]
                if softmax_fn is not None and not need_b:  # two fused passes over the logits (compiled)
                    nll, g_C_V = softmax_fn(F.linear(h_C_H, W, b), y_C, cap)
                    total += nll
                    if need_h:
                        dh[s:s + chunk] = g_C_V @ W
                    if need_W:
                        dW += g_C_V.T @ h_C_H
                    continue
                z_C_V = F.linear(h_C_H, W, b).float()  # (C, V)
                if cap:
                    t_C_V = z_C_V.div_(cap).tanh_()
                    z_C_V = t_C_V * cap
                zy_C = z_C_V.gather(-1, y_C[:, None])[:, 0]
                m_C = z_C_V.amax(-1)
                e_C_V = z_C_V.sub_(m_C[:, None]).exp_()  # in place: one (C, V) fp32 buffer for all that follows
                sum_C = e_C_V.sum(-1)
                total += (m_C + sum_C.log() - zy_C).sum()  # logsumexp − target logit
                if not (need_h or need_W or need_b):
                    continue
                g_C_V = e_C_V.div_(sum_C[:, None])  # softmax
                g_C_V[torch.arange(len(y_C), device=y_C.device), y_C] -= 1.0  # − onehot
                if cap:
                    g_C_V.mul_(t_C_V.square_().neg_().add_(1.0))  # chain rule through cap·tanh(u/cap)
                if need_b:
                    db += g_C_V.sum(0)
                g_C_V = g_C_V.to(dtype)
                if need_h:
                    dh[s:s + chunk] = g_C_V @ W
                if need_W:
                    dW += g_C_V.T @ h_C_H
        ctx.dtypes = (h_N_H.dtype, W_V_H.dtype, b_V.dtype if b_V is not None else None)
        ctx.save_for_backward(dh, dW, db)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        dh, dW, db = ctx.saved_tensors
        g = g.float()
        out = [None if d is None else (d * g).to(dt) for d, dt in zip((dh, dW, db), ctx.dtypes)]
        return *out, None, None, None, None, None


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(h, W)` computes in: autocast's where it is on (and W is not float64), else W's."""
    device = W.device.type
    if torch.is_autocast_enabled(device) and W.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return W.dtype


def softmax_nll_grad(z_C_V: torch.Tensor, y_C: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_c −log softmax(u_c)[y_c], dΣ/dz) for logits z (C, V), u = z or cap·tanh(z/cap), in fp32; the gradient
    (softmax − onehot) ⊙ du/dz comes back in z's dtype. Out-of-place plain ops, written for torch.compile, which
    fuses them into a reduction pass and an element-wise pass over z (the eager in-place path of _FusedHeadNLL
    makes ~10 passes over an fp32 copy)."""
    u = z_C_V.float()
    if cap:
        t = torch.tanh(u / cap)
        u = t * cap
    m = u.amax(-1, keepdim=True)
    e = torch.exp(u - m)
    sum_e = e.sum(-1, keepdim=True)
    nll = (m[:, 0] + sum_e[:, 0].log() - u.gather(-1, y_C[:, None])[:, 0]).sum()
    onehot = torch.arange(u.shape[-1], device=u.device)[None, :] == y_C[:, None]
    g = e / sum_e - onehot.to(u.dtype)
    if cap:
        g = g * (1 - t * t)
    return nll, g.to(z_C_V.dtype)


COMPILE_BACKEND = "inductor"  # of the compiled softmax_nll_grad (tests on CPU use aot_eager)
COMPILE_OPTIONS: dict = {}  # inductor options for it (benchmarks/gpu_step.py's tuned A/B sets some)


@functools.cache
def _compiled_softmax_nll_grad(backend: str, options: tuple = ()):
    return torch.compile(softmax_nll_grad, backend=backend, dynamic=False, options=dict(options) or None)


def head_nll_sum(h_N_H: torch.Tensor, W_V_H: torch.Tensor, b_V: torch.Tensor | None, y_N: torch.Tensor,
                 cap: float | None = None, chunk: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Σ_n −log softmax(c(h_n·Wᵀ + b))[y_n] (fp32 scalar) without keeping any (N, V) tensor for backward; c is
    cap·tanh(·/cap) when `cap` is given. Gradients reach h, W and b wherever they require them. Each chunk's
    softmax and gradient: on CUDA without a cap, `kernels.softmax_nll_grad` (Triton, two passes over the logits,
    the gradient written over them); else with `compiled`, `softmax_nll_grad` under torch.compile; else (and
    with a trained bias) the eager in-place path of `_FusedHeadNLL`."""
    return _FusedHeadNLL.apply(h_N_H, W_V_H, b_V, y_N, cap, chunk or FUSED_CHUNK, compute_dtype(W_V_H),
                               _softmax_fn(h_N_H.device, cap, compiled))


TRITON_SOFTMAX = True  # kernels.softmax_nll_grad where it applies (benchmarks/gpu_step.py's A/B turns it off)


@functools.cache
def _have_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _softmax_fn(device: torch.device, cap: float | None, compiled: bool):
    if TRITON_SOFTMAX and device.type == "cuda" and not cap and _have_triton():
        from regretless import kernels

        return kernels.softmax_nll_grad
    if compiled:
        return _compiled_softmax_nll_grad(COMPILE_BACKEND, tuple(sorted(COMPILE_OPTIONS.items()))
                                          if COMPILE_BACKEND == "inductor" else ())
    return None


def _fusable_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when `head_nll_sum` can stand in for it: a bare nn.Linear (not a LoRA wrapper, no hooks) with
    a plain weight (not a DTensor: under FSDP2 the root's hooks have put the unsharded weight in place)."""
    parts = _trunk_and_head(model)
    head = parts[1] if parts else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if type(head.weight) not in (nn.Parameter, torch.Tensor):
        return None
    return head


def cache_kw(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` in recent transformers 5, `past_key_values` before."""
    import inspect

    target = getattr(model, "base_model", model)
    return "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"


def has_trunk(model: nn.Module) -> bool:
    """True when the model splits into a trunk (`base_model`) and a plain LM head, as most causal LMs do."""
    return _trunk_and_head(model) is not None


def shifted_targets(labels_B_T: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: targets[:, t] = labels[:, t+1], last column -100."""
    return F.pad(labels_B_T[:, 1:], (0, 1), value=-100)


@distributed.through_root  # torchrun: trunk and head run inside the FSDP root's hooks
def nll_sum(model: nn.Module, batch: dict[str, torch.Tensor], fused: bool = True, compiled: bool = False
            ) -> tuple[torch.Tensor, int]:
    """(sum of token NLLs over labelled positions, number of them) for an SFT batch with HF-style labels.
    With grad enabled the head and loss are one fused node (`head_nll_sum`); eval without grad takes the plain
    chunks, as does a head that the fused node does not handle (then checkpointed per chunk). `fused=False`: the
    plain chunks with their logits kept for backward (the benchmark's A/B reference). `compiled`: the fused
    node's softmax runs compiled where the Triton pass does not apply (`head_nll_sum`), as the trainer asks with
    `compile=true`."""
    targets_B_T = shifted_targets(batch["labels"])
    head = _fusable_head(model) if fused and torch.is_grad_enabled() else None
    if head is None:
        logp, _ = target_logprobs(model, batch, targets_B_T, keep_logits=not fused)
        return -logp.sum(), int(logp.numel())
    rows_N = labelled_rows(batch, targets_B_T.device)
    if rows_N is None:  # a boolean mask on the device: its count is read back (a sync in forward and backward)
        sel_B_T = targets_B_T != -100
        y_N = targets_B_T[sel_B_T]
        h_N_H = hidden_states(model, batch)[sel_B_T]
    else:
        y_N = targets_B_T.flatten().index_select(0, rows_N)
        h_N_H = hidden_states(model, batch).flatten(0, 1).index_select(0, rows_N)
    return head_nll_sum(h_N_H, head.weight, head.bias, y_N, _softcap(model), compiled=compiled), int(y_N.numel())


HOST_LABELS = "labels_host"  # a batch's labels kept on the host beside the device copy (`train.to_device`)


def labelled_rows(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The flat positions b·T + t whose shifted target is labelled, found on the host from the batch's
    HOST_LABELS and sent to `device` without waiting for it (pinned memory, non-blocking); None without them, or
    when they are no longer on the host (FSDP2's root moves a sharded model's tensor inputs to its GPU). A boolean
    mask on the device would make the GPU wait for the CPU twice a step: its number of rows is read back before
    the head can run, and again in its backward."""
    host = batch.get(HOST_LABELS)
    if host is None or host.device.type != "cpu":
        return None
    rows = (shifted_targets(host) != -100).flatten().nonzero()[:, 0]
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)
