"""The fused LM head + NLL (`lm.head_nll_sum`, used by `lm.nll_sum` with grad) and the checkpointed RL log-probs
(`lm.head_logprobs` with grad) against an independent float64 reference: the full (N, V) logits, log_softmax in
float64, gradients by autograd. Loss and gradients w.r.t. h and W (trainable, tied and frozen heads, a bias), chunks
of 3-5 positions so that boundaries fall inside every batch, ignored (-100) positions, softcapping; autocast
against the plain chunked path; and, through saved-tensor hooks, that no (·, V) tensor waits for backward.

tests/mutate_lm_fused.py alters one term of the fused function at a time and expects this file to catch it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, tiny_llama_config
from torch import nn

from regretless import lm
from regretless.lora import LoRAConfig, apply_lora, lora_modules

V = 512  # tiny_llama_config's vocabulary


def _ref_nll(h, W, b, y, cap):
    """float64: −Σ log_softmax(c(h·Wᵀ + b))[y] with the full logits."""
    z = h.double() @ W.double().T + (b.double() if b is not None else 0)
    if cap:
        z = torch.tanh(z / cap) * cap
    return -torch.log_softmax(z, -1).gather(-1, y[:, None]).sum()


def _leaves(N=11, H=16, Vs=40, bias=True, w_grad=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W = (torch.randn(Vs, H, generator=g) * scale / H**0.5).requires_grad_(w_grad)
    b = (torch.randn(Vs, generator=g) * 0.5).requires_grad_(w_grad) if bias else None
    y = torch.randint(0, Vs, (N,), generator=g)
    return h, W, b, y


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


@pytest.fixture
def cpu_compile(monkeypatch):
    """`compiled=True` on CPU through the aot_eager backend: the traced graph of softmax_nll_grad, no C++ build."""
    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 4, 64])  # 11 positions: boundaries at 3, 6, 9 / 4, 8 / none
def test_loss_and_gradients_match_float64_full_logits(cap, bias, chunk, compiled, cpu_compile):
    h, W, b, y = _leaves(bias=bias, scale=8.0 if cap else 1.0)  # logits of ~±8: tanh far from linear
    upstream = 0.37  # backward must multiply by the incoming gradient
    fused = lm.head_nll_sum(h, W, b, y, cap, chunk, compiled=compiled)
    got = _grads(fused * upstream, (h, W, b))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = _ref_nll(h64, W64, b64, y, cap)
    want = _grads(ref * upstream, (h64, W64, b64))
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(ref.item(), rel=1e-6)
    assert len(got) == len(want) == (3 if bias else 2)
    for a, r in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == r.shape
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_logits_far_beyond_exp_range_stay_finite_and_exact(compiled, cpu_compile):
    h, W, b, y = _leaves(scale=400.0, bias=not compiled)  # logits of several hundred: exp overflows fp32 without
    loss = lm.head_nll_sum(h, W, b, y, None, 4, compiled=compiled)  # the max shift
    leaves = (h, W) if compiled else (h, W, b)
    got = _grads(loss, leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = _ref_nll(*l64[:2], l64[2] if len(l64) > 2 else None, y, None)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, r in zip(got, _grads(ref, l64)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_frozen_head_gets_no_weight_gradient_and_h_without_grad_works():
    h, W, b, y = _leaves(w_grad=False)
    loss = lm.head_nll_sum(h, W, b, y, None, 4)
    loss.backward()
    assert W.grad is None and b.grad is None and h.grad is not None
    torch.testing.assert_close(loss.double(), _ref_nll(h, W, b, y, None), rtol=1e-6, atol=0)
    h2 = h.detach()
    out = lm.head_nll_sum(h2, W, b, y, None, 4)
    assert not out.requires_grad and out.item() == pytest.approx(loss.item(), rel=1e-7)


def test_no_positions_gives_zero_loss_and_zero_gradients():
    h, W, _, y = _leaves(N=0)
    loss = lm.head_nll_sum(h, W, None, y, None, 4)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16) and float(W.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------------- whole models


def _batch(seed=0, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ref_model_nll(model64: nn.Module, batch, cap=None) -> torch.Tensor:
    """float64 reference: the trunk, the head on every position, the (B, T, V) log_softmax, the shifted labels."""
    h = model64.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    z = model64.get_output_embeddings()(h)  # (B, T, V)
    if cap:
        z = torch.tanh(z / cap) * cap
    t = lm.shifted_targets(batch["labels"])
    sel = t != -100
    return -torch.log_softmax(z, -1)[sel].gather(-1, t[sel][:, None]).sum()


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float32 against float64: 1e-4 relative, or 1e-6 of the largest entry (fp32 trunk noise)."""
    atol = 1e-6 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _model(kind: str):
    model = build_model(tiny_llama_config(tie_word_embeddings=kind != "untied")).train()
    if kind == "lora":  # frozen head; B ≠ 0 so that every adapter gets a gradient
        apply_lora(model, LoRAConfig(rank=4, alpha=8))
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.normal_(std=0.1)
    return model


@pytest.mark.parametrize("kind", ["tied", "untied", "lora"])
def test_nll_sum_matches_float64_model(kind, monkeypatch):
    monkeypatch.setattr(lm, "CHUNK", 5)  # 18 labelled positions: boundaries at 5, 10, 15
    monkeypatch.setattr(lm, "FUSED_CHUNK", 5)
    model = _model(kind)
    model64 = copy.deepcopy(model).double()
    batch = _batch()
    assert lm._fusable_head(model) is model.lm_head
    s, n = lm.nll_sum(model, batch)
    (s * 0.5).backward()
    ref = _ref_model_nll(model64, batch)
    (ref * 0.5).backward()
    assert n == 18 and s.item() == pytest.approx(ref.item(), rel=1e-6)
    got, want = _trainable(model), _trainable(model64)
    assert sorted(got) == sorted(want) and ("lm_head.weight" in got) == (kind == "untied")
    assert ("model.embed_tokens.weight" in got) == (kind != "lora")
    for name in got:
        _close(got[name].grad, want[name].grad, name)


def test_labelled_rows_found_on_the_host_give_the_same_loss_and_gradients(monkeypatch):
    """`train.to_device` keeps the labels on the host (lm.HOST_LABELS): nll_sum then selects the labelled rows by
    index (no device sync) and must give the boolean mask's loss and gradients bit for bit; the rows themselves
    against a loop over (b, t): position t of row b is labelled when labels[b, t + 1] != -100."""
    monkeypatch.setattr(lm, "FUSED_CHUNK", 5)
    from regretless.train import to_device

    model = _model("lora")
    batch = _batch(B=4, T=11)
    batch["labels"][1, 3:7] = -100  # a gap inside a row, beside _batch's prompt and padding
    moved = to_device(batch, torch.device("cpu"), None, model)
    assert moved[lm.HOST_LABELS] is batch["labels"]
    want_rows = [b * 11 + t for b in range(4) for t in range(10) if batch["labels"][b, t + 1] != -100]
    assert lm.labelled_rows(moved, torch.device("cpu")).tolist() == want_rows
    assert lm.labelled_rows(batch, torch.device("cpu")) is None
    moved_off_host = dict(moved, **{lm.HOST_LABELS: torch.empty(4, 11, dtype=torch.long, device="meta")})
    assert lm.labelled_rows(moved_off_host, torch.device("cpu")) is None  # (as FSDP2's root moves it to a GPU)

    def run(b):
        model.zero_grad(set_to_none=True)
        s, n = lm.nll_sum(model, b)
        s.backward()
        return s.detach(), n, {k: p.grad.clone() for k, p in _trainable(model).items()}

    s0, n0, g0 = run({k: v for k, v in moved.items() if k != lm.HOST_LABELS})  # the boolean mask
    s1, n1, g1 = run(moved)
    assert n0 == n1 == len(want_rows) and torch.equal(s0, s1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0) and any(float(g.abs().sum()) > 0 for g in g1.values())


def test_nll_sum_softcapped_matches_float64(monkeypatch):
    monkeypatch.setattr(lm, "CHUNK", 4)
    monkeypatch.setattr(lm, "FUSED_CHUNK", 4)
    model = _model("untied")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of several units: the cap bends them
    model.config.final_logit_softcapping = 2.0
    model64 = copy.deepcopy(model).double()
    batch = _batch(seed=1)
    s, _ = lm.nll_sum(model, batch)
    s.backward()
    ref = _ref_model_nll(model64, batch, cap=2.0)
    ref.backward()
    assert abs(ref.item() - _ref_model_nll(model64, batch).item()) > 1.0  # the cap matters here
    assert s.item() == pytest.approx(ref.item(), rel=1e-6)
    for name, p in _trainable(model).items():
        _close(p.grad, _trainable(model64)[name].grad, name)


def test_gemma2_softcap_matches_the_models_own_logits():
    """A real softcapping architecture: its own forward (full logits, float64) is the reference."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, pad_token_id=0, eos_token_id=2,
                       bos_token_id=None)
    model = build_model(cfg).train()
    model64 = copy.deepcopy(model).double()
    batch = _batch(seed=2)
    s, _ = lm.nll_sum(model, batch)
    s.backward()
    z = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = lm.shifted_targets(batch["labels"])
    ref = -torch.log_softmax(z, -1)[t != -100].gather(-1, t[t != -100][:, None]).sum()
    ref.backward()
    assert s.item() == pytest.approx(ref.item(), rel=1e-6)
    for name, p in _trainable(model).items():
        _close(p.grad, _trainable(model64)[name].grad, name)


def test_fused_equals_plain_chunks_under_autocast(monkeypatch):
    """bf16 autocast: the head's matmul in bf16 as in the plain path, so the losses agree to fp32 rounding (a
    fused path computing its logits in fp32 would differ by ~1e-3); gradients to bf16 rounding (1% in norm)."""
    monkeypatch.setattr(lm, "CHUNK", 5)
    monkeypatch.setattr(lm, "FUSED_CHUNK", 5)
    runs = []
    for fused in (True, False):
        model = _model("untied")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, _ = lm.nll_sum(model, _batch(), fused=fused)
        s.backward()
        runs.append((s.item(), _trainable(model)))
    (a, ga), (b, gb) = runs
    assert a == pytest.approx(b, rel=1e-6, abs=0)
    for name in ga:  # the head's dW: accumulated over chunks in fp32 here, in bf16 by the plain path
        assert float((ga[name].grad - gb[name].grad).norm()) <= 1e-2 * float(gb[name].grad.norm()), name
    model = _model("untied")
    with torch.no_grad():
        fp32_loss = lm.nll_sum(model, _batch())[0].item()
    assert abs(fp32_loss - a) > 10 * abs(a - b)


def test_lora_adapted_head_falls_back_to_the_plain_path():
    model = _model("untied")
    apply_lora(model, LoRAConfig(rank=2, targets=("lm_head",)))
    assert lm._fusable_head(model) is None
    model64 = copy.deepcopy(model).double()
    s, _ = lm.nll_sum(model, _batch())
    assert s.item() == pytest.approx(_ref_model_nll(model64, _batch()).item(), rel=1e-6)


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while fn() runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("kind", ["tied", "lora"])
def test_no_vocabulary_wide_tensor_is_saved_for_backward(kind, monkeypatch):
    monkeypatch.setattr(lm, "CHUNK", 5)
    monkeypatch.setattr(lm, "FUSED_CHUNK", 5)
    model = _model(kind)

    def wide(fused):
        return [s for s in _saved_shapes(lambda: lm.nll_sum(model, _batch(), fused=fused)) if s and s[-1] == V]

    assert wide(False)  # the plain chunks keep their logits: the check can fail
    assert wide(True) == []
    targets = lm.shifted_targets(_batch()["labels"])
    h = lm.hidden_states(model, _batch())[targets != -100]

    def wide_logp(keep):
        saved = _saved_shapes(lambda: lm.head_logprobs(model, h, targets[targets != -100], keep_logits=keep))
        return [s for s in saved if s and s[-1] == V]

    assert wide_logp(True) and wide_logp(False) == []  # RL: checkpointed chunks keep only h


# ----------------------------------------------------------------------------------------------------- RL


def test_checkpointed_logprobs_and_gradients_match_float64(monkeypatch):
    monkeypatch.setattr(lm, "CHUNK", 4)
    model = _model("untied")
    model.config.final_logit_softcapping = 4.0
    model64 = copy.deepcopy(model).double()
    batch = _batch(seed=3)
    t = lm.shifted_targets(batch["labels"])
    w = torch.randn(int((t != -100).sum()), generator=torch.Generator().manual_seed(0))  # any per-token use
    logp, ent = lm.target_logprobs(model, batch, t, with_entropy=True)
    assert logp.requires_grad and not ent.requires_grad
    (w * logp).sum().backward()
    h = model64.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    z = torch.tanh(model64.lm_head(h) / 4.0) * 4.0
    lp = torch.log_softmax(z, -1)[t != -100]
    ref = lp.gather(-1, t[t != -100][:, None])[:, 0]
    (w.double() * ref).sum().backward()
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double(), -(lp.exp() * lp).sum(-1).detach(), rtol=1e-5, atol=1e-6)
    for name, p in _trainable(model).items():
        _close(p.grad, _trainable(model64)[name].grad, name)


def test_eval_without_grad_takes_the_plain_chunks(monkeypatch):
    calls = []
    monkeypatch.setattr(lm._FusedHeadNLL, "apply", lambda *a: calls.append(a))
    model = _model("tied")
    with torch.no_grad():
        s, n = lm.nll_sum(model, _batch())
    assert calls == [] and n == 18 and torch.isfinite(s)
