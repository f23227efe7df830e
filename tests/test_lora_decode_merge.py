"""merged_for_decoding: token-by-token decoding from W' = W + s·B·A, one GEMM per adapted matrix, with the trained
adapters and the base weights untouched; forwards with grad keep the adapter path; RL's sampler uses it in bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config
from torch.utils._python_dispatch import TorchDispatchMode

from regretless.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_modules,
    merged_for_decoding,
)
from regretless.rl.sampling import sample

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in GEMMS
        return func(*args, **(kwargs or {}))


def _adapted(config=None, rank: int = 4):
    model = build_model(config or tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=rank))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.2)
    return model


def _ids():
    return torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def _gemms(model, **kw) -> tuple[int, torch.Tensor]:
    with CountGemms() as c:
        out = model(input_ids=_ids(), **kw).logits
    return c.n, out


def test_merged_weight_is_w_plus_scaled_ba_against_float64():
    """Each term: the base weight, the scale, B and A (Llama's (d_out, d_in) and GPT-2's Conv1D (d_in, d_out))."""
    from transformers import GPT2Config

    llama = _adapted()
    gpt2 = _adapted(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    for model in (llama, gpt2):
        for _, m in lora_modules(model):
            W = m.base_layer.weight.double()
            W = W.T if m.fan_in_fan_out else W
            ref = W + m.scale * m.lora_B.double() @ m.lora_A.double()
            got = m.merged_weight(torch.float32)
            assert got.dtype == torch.float32 and got.shape == (m.out_features, m.in_features)
            assert (got.double() - ref).abs().max() < 1e-6 * ref.abs().max()
            assert m.merged_weight(torch.bfloat16).dtype == torch.bfloat16


def test_decoding_runs_one_gemm_per_matrix_and_matches_the_adapter_path():
    model = _adapted()
    with torch.no_grad():
        with adapters_disabled(model):
            base_gemms, _ = _gemms(model)
        lora_gemms, ref = _gemms(model)
        with merged_for_decoding(model):
            assert all(m._decode_weight is not None for _, m in lora_modules(model))
            merged_gemms, got = _gemms(model)
    assert lora_gemms > base_gemms  # the adapter path runs its own GEMMs...
    assert merged_gemms == base_gemms  # ...merged: exactly the base model's
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    assert all(m._decode_weight is None for _, m in lora_modules(model))  # copies dropped on exit


def test_bf16_autocast_merges_in_bf16_and_stays_close():
    model = _adapted()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref = _gemms(model)
        with merged_for_decoding(model, low_precision_only=True):
            assert {m._decode_weight.dtype for _, m in lora_modules(model)} == {torch.bfloat16}
            _, got = _gemms(model)
    assert (got.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()


def test_fp32_with_low_precision_only_and_a_small_byte_budget_change_nothing():
    model = _adapted()
    with torch.no_grad():
        lora_gemms, ref = _gemms(model)
        with merged_for_decoding(model, low_precision_only=True):  # fp32 compute: the adapter path stays
            n1, out1 = _gemms(model)
        with merged_for_decoding(model, max_bytes=100):  # the copies would need more
            n2, out2 = _gemms(model)
    assert n1 == n2 == lora_gemms
    assert torch.equal(out1, ref) and torch.equal(out2, ref)


def test_training_inside_ignores_the_copies_and_an_error_drops_them():
    model = _adapted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_n, _ = _gemms(model)
    with merged_for_decoding(model):
        n, out = _gemms(model)  # grad enabled: the adapter path, gradients reach A and B
        out.square().mean().backward()
    assert n == ref_n
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for _, m in lora_modules(model))
    with pytest.raises(RuntimeError, match="boom"), merged_for_decoding(model):
        raise RuntimeError("boom")
    assert all(m._decode_weight is None for _, m in lora_modules(model))
    # decoding left the adapters and the base weights as they were (copies only, nothing merged in place)
    assert all(isinstance(m, LoRALinear) and not m.merged for _, m in lora_modules(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_sampler_decodes_from_merged_weights_in_bf16(tiny_tokenizer):
    """sample() under bf16 autocast runs the base model's GEMMs plus one B·A per adapter (the merge, once per
    call), its log-probs agree with the fp32 adapter path's to bf16 rounding, and in fp32 it keeps the adapter path."""
    model = _adapted()
    prompts = [tiny_tokenizer("hello there")["input_ids"], tiny_tokenizer("a b c")["input_ids"]]

    def run():
        with CountGemms() as c:
            b = sample(model, tiny_tokenizer, prompts, n=2, max_new_tokens=4, eos_token_ids=[10**9],
                       generator=torch.Generator().manual_seed(0))
        return c.n, b

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with adapters_disabled(model):
            n_base, _ = run()
        n_bf16, b_bf16 = run()
    n_fp32, b_fp32 = run()
    adapters = len(list(lora_modules(model)))
    assert n_bf16 == n_base + adapters and n_fp32 > n_bf16
    assert torch.equal(b_bf16.tokens_N_T[:, 0], b_fp32.tokens_N_T[:, 0])  # same draws (shared generator seed)
    assert 0 < (b_bf16.logp_N_T[:, 0] - b_fp32.logp_N_T[:, 0]).abs().max() < 0.05
