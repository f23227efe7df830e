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


# ---- targets by structure: presets by role, unadapted weights listed, weights regretless cannot adapt


def test_presets_by_role_on_blocks_named_mixer():
    """NemotronH names every block's module `mixer`: roles come from what the module is, not its name."""
    from test_lora_architectures import ARCHS

    model = build_model(ARCHS["nemotron_h"][0]())
    leaf = {p: {t.name.split("layers.", 1)[1] + (f".{t.param}" if t.param else "") + (f"[{t.part}]" if t.part
                                                                                       else "")
                for t in find_targets(model, LoRAConfig(rank=2, targets=p))} for p in ("attn", "mlp", "all")}
    assert leaf["attn"] == {f"2.mixer.{x}_proj" for x in "qkvo"}
    assert leaf["mlp"] == {"1.mixer.experts.up_proj", "1.mixer.experts.down_proj", "1.mixer.shared_experts.up_proj",
                           "1.mixer.shared_experts.down_proj", "3.mixer.up_proj", "3.mixer.down_proj"}
    assert leaf["all"] == leaf["attn"] | leaf["mlp"] | {"0.mixer.in_proj", "0.mixer.out_proj"}  # + the SSM


def test_layer_level_matrices_are_found():
    """OPT keeps fc1/fc2 on the decoder layer itself (no mlp module): they are the MLP."""
    from test_lora_architectures import ARCHS

    model = build_model(ARCHS["opt"][0]())
    names = {t.name.rsplit(".", 1)[-1] for t in find_targets(model, LoRAConfig(rank=2, targets="mlp"))}
    assert names == {"fc1", "fc2"}


def test_coverage_table_lists_what_was_left_and_why():
    model = build_model(tiny_qwen3_moe_config())
    report = apply_lora(model, LoRAConfig(rank=4, exclude="k_proj"))
    rows = {(r["reason"], r["pattern"]): r for r in report.left_rows()}
    assert rows[("router", "model.layers.*.mlp.gate.weight")]["tensors"] == 2
    assert rows[("excluded", "model.layers.*.self_attn.k_proj.weight")]["params"] == 2 * 32 * 16
    assert rows[("norm", "model.layers.*.input_layernorm.weight")]["tensors"] == 2
    assert {("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight")} <= set(rows)
    assert not any(t.name.endswith("k_proj") for t in report.targets)
    table = report.table()
    for text in ("left unadapted:", "router: routing stays as trained", "excluded by lora.exclude",
                 "model.layers.*.mlp.gate.weight: 2 tensors, 512 params"):
        assert text in table, text
    # every parameter of the model is either adapted or listed as left
    adapted = {f"{t.name}.{t.param or 'weight'}" for t in report.targets}
    listed = {r.name.split("[")[0] for r in report.left}
    names = {n.replace(".base_layer", "") for n, _ in model.named_parameters() if ".lora_" not in n}
    assert names <= adapted | listed


class _RawMLP(torch.nn.Module):
    """An MLP that keeps its matrices as bare parameters: nothing regretless knows how to wrap."""

    def __init__(self, H: int, inter: int):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(inter, H) * 0.1)
        self.w_out = torch.nn.Parameter(torch.randn(H, inter) * 0.1)

    def forward(self, x):
        return torch.nn.functional.silu(x @ self.w_in.T) @ self.w_out.T


def test_weights_regretless_cannot_adapt_are_an_error_with_an_override():
    model = build_model(tiny_llama_config())
    for layer in model.model.layers:
        layer.mlp = _RawMLP(32, 64)
    with pytest.raises(UserError) as e:
        apply_lora(model, LoRAConfig(rank=4))
    msg = _one_line(e)
    assert "cannot adapt" in msg and "model.layers.*.mlp.w_in" in msg and "lora.exclude=" in msg
    assert not list(lora_modules(model))  # nothing applied
    report = apply_lora(model, LoRAConfig(rank=4, exclude=r".*mlp\.w_(in|out)"))
    assert {r["reason"] for r in report.left_rows() if "mlp.w_" in r["pattern"]} == {"excluded"}
    assert {r["group"] for r in report.rows()} == {"attn"}
    # explicit targets do not demand coverage: naming what to adapt is the user's choice
    find_targets(build_model(tiny_llama_config()), LoRAConfig(rank=4, targets="q_proj"))


def test_experts_per_token_from_the_router_or_a_nested_text_config():
    """top-k comes from where the model keeps it: the router's top_k, else the text config (Qwen3-VL-MoE keeps
    num_experts_per_tok in text_config); the expert rank follows."""
    model = build_model(tiny_qwen3_moe_config(num_experts_per_tok=4))
    assert {t.rank for t in find_targets(model, LoRAConfig(rank=8)) if t.group == "experts"} == {2}
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 8  # the router is what routes
    assert {t.rank for t in find_targets(model, LoRAConfig(rank=8)) if t.group == "experts"} == {1}
