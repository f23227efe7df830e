"""Token log-probabilities without the (B, T, V) logits tensor.

The LM head runs on the selected positions only (those with a label), in chunks, and the log-softmax is taken
chunk by chunk in fp32: memory is O(chunk · V) instead of O(B · T · V) — the "chunked cross-entropy" that keeps a
49k- or 150k-vocabulary model's loss from dominating memory. Used by SFT (NLL) and RL (log-probs, entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from regretless import distributed

CHUNK = 4096  # positions per LM-head chunk


def _trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    head = model.get_output_embeddings()
    trunk = getattr(model, "base_model", None)
    if trunk is None or trunk is model or head is None:
        return None
    if getattr(model.config, "logit_scale", None) not in (None, 1, 1.0):
        return None  # heads with extra scaling: fall back to the model's own logits
    return trunk, head


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = _trunk_and_head(model)
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    assert parts is not None
    return parts[0](**kwargs, use_cache=False).last_hidden_state  # (B, T, H)


def _head_logits(model: nn.Module, h_N_H: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(h_N_H).float()  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@distributed.through_root  # torchrun: trunk and head run inside the FSDP root's hooks
def target_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], targets_B_T: torch.Tensor,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[b, t] | inputs[b, :t+1]) at every position where targets != -100 (the label of the *next*
    token is targets[b, t]; callers shift). Returns (logp_N, entropy_N or None), N = number of such positions,
    in row-major order."""
    sel_B_T = targets_B_T != -100
    y_N = targets_B_T[sel_B_T]
    if _trunk_and_head(model) is None:
        kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**kwargs, use_cache=False).logits.float()[sel_B_T]  # (N, V)
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return logp.gather(-1, y_N[:, None])[:, 0], ent
    return head_logprobs(model, hidden_states(model, batch)[sel_B_T], y_N, with_entropy)


def head_logprobs(model: nn.Module, h_N_H: torch.Tensor, y_N: torch.Tensor, with_entropy: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(y_n | h_n) through the LM head, CHUNK positions at a time (fp32 log-softmax)."""
    out, ents = [], []
    for s in range(0, h_N_H.shape[0], CHUNK):
        logits = _head_logits(model, h_N_H[s:s + CHUNK])
        lse = torch.logsumexp(logits, -1)
        out.append(logits.gather(-1, y_N[s:s + CHUNK, None])[:, 0] - lse)
        if with_entropy:
            with torch.no_grad():
                p = torch.softmax(logits, -1)
                ents.append(lse - (p * logits).sum(-1))
    return torch.cat(out), (torch.cat(ents) if with_entropy else None)


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


def nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token NLLs over labelled positions, number of them) for an SFT batch with HF-style labels."""
    logp, _ = target_logprobs(model, batch, shifted_targets(batch["labels"]))
    return -logp.sum(), int(logp.numel())
