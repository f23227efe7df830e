"""Causal attention without a mask tensor where none is needed: a right-padded batch loses its 2-D attention mask
on its way to the device (`train.to_device`) with every labelled position's loss and gradient unchanged, and
`train.compile_blocks` (the trainer's `compile=true`) compiles the decoder blocks, not the trunk, so that SDPA
runs with `is_causal=True` and no mask tensor (transformers materializes a (B, 1, T, T) mask when the trunk's
forward is traced), while a left-padded batch keeps its mask."""

from __future__ import annotations

import torch
from conftest import build_model, tiny_llama_config

from regretless import lm
from regretless.train import compile_blocks, right_padded, to_device


def _right_padded_batch(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_right_padded_mask_is_dropped_and_the_loss_and_gradients_stay():
    model = build_model(tiny_llama_config())
    batch = _right_padded_batch([9, 5, 12, 1])
    moved = to_device(batch, torch.device("cpu"), None, model)
    assert "attention_mask" not in moved and right_padded(batch["attention_mask"])

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        s, n = lm.nll_sum(model, b)
        s.backward()
        return s.detach(), n, [p.grad.clone() for p in model.parameters()]

    s0, n0, g0 = loss_and_grads(batch)
    s1, n1, g1 = loss_and_grads(moved)
    assert n0 == n1 and torch.allclose(s0, s1, rtol=1e-6, atol=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_left_padded_or_packed_mask_is_kept():
    model = build_model(tiny_llama_config())
    left = _right_padded_batch([4, 7])
    left["attention_mask"] = left["attention_mask"].flip(1)
    assert not right_padded(left["attention_mask"])
    assert "attention_mask" in to_device(left, torch.device("cpu"), None, model)
    packed = dict(_right_padded_batch([6, 6]), position_ids=torch.arange(6).repeat(2, 1))
    assert "attention_mask" in to_device(packed, torch.device("cpu"), None, model)


def _compiled_sdpa_calls(model, compile_fn, **inputs):
    """Run the trunk after `compile_fn(model, backend=...)` with a backend that records dynamo's graphs; return the
    output and (attn_mask is None, is_causal) of every SDPA call in the graphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compile_fn(model, backend=backend, dynamic=False)
    try:
        out = model.base_model(**inputs, use_cache=False).last_hidden_state
    finally:
        torch._dynamo.reset()
    calls = [(n.kwargs.get("attn_mask") is None, n.kwargs.get("is_causal")) for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    return out, calls


def _trunk(model, **kw):
    model.base_model.compile(**kw)


def test_compiled_blocks_run_causal_attention_without_a_mask_tensor():
    model = build_model(tiny_llama_config(_attn_implementation="sdpa"))
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # eager
        out, calls = _compiled_sdpa_calls(model, compile_blocks, input_ids=ids)
        _, traced = _compiled_sdpa_calls(build_model(tiny_llama_config(_attn_implementation="sdpa")), _trunk,
                                         input_ids=ids)
    assert calls and all(c == (True, True) for c in calls), calls  # is_causal, no mask
    assert torch.allclose(out, ref, atol=1e-5)
    # what the blocks avoid: the traced trunk hands SDPA a mask tensor (transformers 5 with torch < 2.14)
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14):
        assert traced and all(not none for none, _ in traced), traced


def test_compiled_blocks_keep_a_left_padded_mask():
    model = build_model(tiny_llama_config(_attn_implementation="sdpa"))
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding: the mask matters
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        out, calls = _compiled_sdpa_calls(model, compile_blocks, input_ids=ids, attention_mask=mask, position_ids=pos)
    assert calls and all(not none for none, _ in calls), calls
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-5)
