"""Merge safety: a tied LM head is untied before its ΔW goes in (the input embeddings never change), merged models
save and reload as they run, and adapters_disabled on a merged model gives the base model (then merges back)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

from regretless.lora import (
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    lora_modules,
    lora_parameters,
    merge_lora,
    unload,
    unmerge_lora,
)


def _ids():
    return torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))


def _adapted(cfg, lora: LoRAConfig):
    model = build_model(cfg)
    apply_lora(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


@torch.no_grad()
def test_tied_head_is_untied_on_merge_and_tied_again_on_unmerge():
    model = _adapted(tiny_llama_config(), LoRAConfig(rank=4, targets=("all", "lm_head")))
    emb = model.model.embed_tokens.weight
    assert model.lm_head.base_layer.weight is emb  # tied
    emb0 = emb.detach().clone()
    want = model(_ids()).logits
    head = dict(lora_modules(model))["lm_head"]
    with pytest.raises(RuntimeError, match="shared with model.embed_tokens.weight"):
        head.merge()  # merging the module alone would change the embeddings too
    assert merge_lora(model) == ["lm_head"]
    assert torch.equal(model.model.embed_tokens.weight, emb0)  # the input embeddings never change
    assert model.lm_head.base_layer.weight is not emb and not model.config.tie_word_embeddings
    torch.testing.assert_close(model(_ids()).logits, want, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(model(_ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_merged_tied_model_saves_and_reloads_as_it_runs(tmp_path):
    from transformers import AutoModelForCausalLM

    base = build_model(tiny_llama_config())
    model = _adapted(tiny_llama_config(), LoRAConfig(rank=4, targets=("all", "lm_head")))
    with torch.no_grad():
        want = model(_ids()).logits
    plain = unload(model, merge=True)
    plain.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(_ids()).logits - want).abs().max() <= 1e-4
    assert torch.equal(again.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert not again.config.tie_word_embeddings


@pytest.mark.parametrize("make", [tiny_llama_config, tiny_qwen3_moe_config])
@torch.no_grad()
def test_adapters_disabled_on_a_merged_model_gives_the_base(make):
    base = build_model(make())(_ids()).logits
    model = _adapted(make(), LoRAConfig(rank=4))
    want = model(_ids()).logits
    merge_lora(model)
    with adapters_disabled(model):
        torch.testing.assert_close(model(_ids()).logits, base, atol=1e-6, rtol=0)
    assert all(m.merged for _, m in lora_modules(model))  # merged again afterwards
    torch.testing.assert_close(model(_ids()).logits, want, atol=1e-5, rtol=1e-5)
    m = next(m for _, m in lora_modules(model))
    m.enabled = False  # disabling by hand, without unmerging, refuses to run rather than return W + ΔW
    with pytest.raises(RuntimeError, match="disabled on a merged layer"):
        model(_ids())
