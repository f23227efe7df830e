"""Injection: presets and explicit targets, the coverage report, freezing (gradients reach only the adapters),
adapters_disabled, and the user errors for bad targets, ranks and models."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

from regretless.errors import UserError
from regretless.lora import (
    LoRAConfig,
    LoRAExperts,
    adapters_disabled,
    apply_lora,
    find_targets,
    lora_modules,
    lora_parameters,
    param_groups,
)

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def _leaf_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)}


def _randomize_B(model, std: float = 0.2, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, std)


@pytest.mark.parametrize("preset,want", [("all", ATTN | MLP), ("mlp", MLP), ("attn", ATTN)])
def test_presets_dense(preset, want):
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=4, targets=preset))
    assert _leaf_names(model) == want
    assert len(list(lora_modules(model))) == 2 * len(want)
    assert "lm_head" not in _leaf_names(model) and "embed_tokens" not in _leaf_names(model)


@pytest.mark.parametrize("preset,want", [("all", ATTN | {"experts"}), ("mlp", {"experts"}), ("attn", ATTN)])
def test_presets_moe_never_touch_the_router(preset, want):
    model = build_model(tiny_qwen3_moe_config())
    apply_lora(model, LoRAConfig(rank=4, targets=preset))
    assert _leaf_names(model) == want
    for layer in model.model.layers:
        assert type(layer.mlp.gate).__name__ == "Qwen3MoeTopKRouter"
        assert not any(p.requires_grad for p in layer.mlp.gate.parameters())
    assert not model.lm_head.weight.requires_grad


def test_explicit_names_and_regexes():
    model = build_model(tiny_llama_config())
    targets = find_targets(model, LoRAConfig(rank=2, targets=("q_proj", "layers.1.mlp.up_proj")))
    assert [t.name for t in targets] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                         "model.layers.1.mlp.up_proj"]
    targets = find_targets(model, LoRAConfig(rank=2, targets=r"model\.layers\.0\..*_proj"))
    assert len(targets) == 7 and all(".layers.0." in t.name for t in targets)
    targets = find_targets(model, LoRAConfig(rank=2, targets="v_proj, o_proj"))  # comma-separated string
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == {"v_proj", "o_proj"}
    # the LM head only when named
    targets = find_targets(model, LoRAConfig(rank=2, targets="lm_head"))
    assert [(t.name, t.d_in, t.d_out) for t in targets] == [("lm_head", 32, 512)]


def test_explicit_expert_parameter():
    model = build_model(tiny_qwen3_moe_config())
    apply_lora(model, LoRAConfig(rank=4, targets=r".*experts\.down_proj"))
    mods = dict(lora_modules(model))
    assert set(mods) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(isinstance(m, LoRAExperts) and m.adapted == ["down_proj"] for m in mods.values())


def test_coverage_report():
    model = build_model(tiny_llama_config())
    total = sum(p.numel() for p in model.parameters())
    report = apply_lora(model, LoRAConfig(rank=4))
    rows = {r["group"]: r for r in report.rows()}
    # attention per layer: q 4·(32+32) + k 4·(32+16) + v 4·(32+16) + o 4·(32+32) = 896; mlp: 3·4·(32+64) = 1152
    assert rows["attn"]["trainable"] == 2 * 896 and rows["attn"]["modules"] == 8
    assert rows["mlp"]["trainable"] == 2 * 1152 and rows["mlp"]["modules"] == 6
    assert report.trainable == 4096 == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.model_params == total
    table = report.table()
    assert "attn" in table and "mlp" in table and "4,096" in table and f"{100 * 4096 / total:.3f}%" in table


def test_verbose_prints_the_table(capsys):
    apply_lora(build_model(tiny_llama_config()), LoRAConfig(rank=2), verbose=True)
    out = capsys.readouterr().out
    assert "group" in out and "total" in out and "trainable" in out


# ---- gradients reach only the adapter; the base is bit-identical after optimizer steps


@pytest.mark.parametrize("make", [tiny_llama_config, tiny_qwen3_moe_config])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_only_adapters_train(make, weight_decay):
    model = build_model(make())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4))
    model.train()
    lora = dict(lora_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=weight_decay))
    ids = torch.randint(0, 512, (2, 8))
    start = {n: p.detach().clone() for n, p in lora.items()}
    for _ in range(2):  # two steps: after the first, B != 0, so A gets gradients too
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            if n not in lora:
                assert p.grad is None, n
        opt.step()
    assert all(not torch.equal(p, start[n]) for n, p in lora.items())
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_frozen_base_survives_an_optimizer_over_all_parameters():
    """Even an optimizer given every parameter (with weight decay) leaves the frozen base alone."""
    model = build_model(tiny_llama_config())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4))
    _randomize_B(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    ids = torch.randint(0, 512, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)


# ---- adapters_disabled


@pytest.mark.parametrize("make", [tiny_llama_config, tiny_qwen3_moe_config])
def test_adapters_disabled_gives_base_logits_and_restores(make):
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        base_logits = build_model(make())(ids).logits
    model = build_model(make())
    apply_lora(model, LoRAConfig(rank=4))
    _randomize_B(model)
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - base_logits).abs().max() > 1e-2
        with adapters_disabled(model) as m:
            assert m is model
            torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-6, rtol=0)
        assert torch.equal(model(ids).logits, adapted)
        # restored even when the body raises, and a module disabled before stays disabled
        first = next(m for _, m in lora_modules(model))
        first.enabled = False
        with pytest.raises(RuntimeError), adapters_disabled(model):
            raise RuntimeError("boom")
        assert first.enabled is False
        assert all(m.enabled for _, m in list(lora_modules(model))[1:])


# ---- user errors: one line, what was wrong and what was expected


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_target_lists_existing_names():
    model = build_model(tiny_qwen3_moe_config())
    with pytest.raises(UserError) as e:
        find_targets(model, LoRAConfig(rank=4, targets=("q_proj", "qkv_proj")))
    msg = _one_line(e)
    assert "'qkv_proj' matches no module" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "experts", "lm_head"):
        assert name in msg
    with pytest.raises(UserError, match="empty"):
        find_targets(model, LoRAConfig(rank=4, targets=""))


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(UserError) as e:
        apply_lora(build_model(tiny_llama_config()), LoRAConfig(rank=rank))
    assert f"expected a positive integer, got {rank}" in _one_line(e)


def test_rank_larger_than_a_matrix():
    model = build_model(tiny_llama_config())  # k_proj and v_proj are 32 -> 16
    with pytest.raises(UserError) as e:
        apply_lora(model, LoRAConfig(rank=17))
    msg = _one_line(e)
    assert "rank 17" in msg and "k_proj" in msg and "expected rank <= 16" in msg
    assert not list(lora_modules(model)) and all(p.requires_grad for p in model.parameters())  # untouched
    apply_lora(model, LoRAConfig(rank=16))  # the boundary is allowed


def test_applying_twice_is_an_error():
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))


def test_non_causal_lm_is_a_user_error():
    from transformers import BertConfig, BertModel, LlamaModel

    for model in (LlamaModel(tiny_llama_config()),
                  BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))):
        with pytest.raises(UserError) as e:
            apply_lora(model, LoRAConfig(rank=2))
        msg = _one_line(e)
        assert type(model).__name__ in msg and "not a causal language model" in msg


def test_meta_device_targets():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_qwen3_moe_config())
    targets = find_targets(model, LoRAConfig(rank=8))
    # per layer: attention 8·(64 + 48 + 48 + 64) = 1792; experts (rank 8 // top-2 = 4, E = 8), gate, up and down
    # each 8·4·(32 + 16) = 1536
    assert sum(t.lora_params for t in targets) == 2 * (1792 + 3 * 1536)
    assert all(t.rank == 4 for t in targets if t.group == "experts")
