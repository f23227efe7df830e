"""PEFT interop beyond the basics (tests/test_lora_io.py): PEFT's own `all-linear` adapter for transformers-5 MoE
models (router adapter, rank_pattern and alpha_pattern) both ways, merged and unmerged; rank/alpha patterns kept
faithfully on save; transformers-4 per-expert adapters (experts.N.gate_proj, Mixtral's experts.N.w1) mapped onto
fused experts; and the per-expert export, read back by regretless and by PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config
from safetensors.torch import load_file, save_file
from test_lora_experts import tiny_gpt_oss_config, tiny_mixtral_config

from regretless.lora import (
    LoRAConfig,
    LoRAExperts,
    LoRAParam,
    apply_lora,
    export_per_expert,
    load_adapter,
    lora_modules,
    lora_parameters,
    save_adapter,
    unload,
)

TOL = 1e-4
MOE = {"qwen3_moe": tiny_qwen3_moe_config, "mixtral": tiny_mixtral_config}


def _ids():
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model):
    return model(_ids()).logits


def _randomize(named, std=0.2, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in named:
            if "lora_" in n:
                p.normal_(0, std)


@pytest.mark.parametrize("family", sorted(MOE))
def test_peft_all_linear_moe_with_router_both_ways(family, tmp_path):
    """PEFT's all-linear on a transformers-5 MoE adapts the router (`gate.weight`) and gives gate_up_proj rank 2r
    and alpha 2·alpha through its patterns: regretless loads exactly that, and saves it back for PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model

    make = MOE[family]
    peft_model = get_peft_model(build_model(make()), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    cfg = peft_model.peft_config["default"]
    assert "gate.weight" in cfg.target_parameters and cfg.rank_pattern and cfg.alpha_pattern
    _randomize(peft_model.named_parameters(), seed=1)
    want = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    base = _logits(build_model(make()))

    model = build_model(make())
    lora = load_adapter(model, tmp_path / "peft")
    mods = dict(lora_modules(model))
    router = mods["model.layers.0.mlp.gate"]
    assert isinstance(router, LoRAParam) and router.rank == 4
    ex = mods["model.layers.0.mlp.experts"]
    assert isinstance(ex, LoRAExperts) and ex.ranks == {"gate_up": 8, "down": 4}
    assert ex.scales["gate_up"] == pytest.approx(16 / 8) and ex.scales["down"] == pytest.approx(8 / 4)
    assert (want - base).abs().max() > 1e-2
    assert (_logits(model) - want).abs().max() <= TOL
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for _, p in lora_parameters(model)) == n_peft

    save_adapter(model, tmp_path / "ours", lora)
    again = PeftModel.from_pretrained(build_model(make()), tmp_path / "ours")
    assert (_logits(again) - want).abs().max() <= TOL
    # merged against unmerged, both ways
    merged_peft = PeftModel.from_pretrained(build_model(make()), tmp_path / "peft").merge_and_unload()
    assert (_logits(merged_peft) - _logits(model)).abs().max() <= TOL
    assert (_logits(unload(model, merge=True)) - want).abs().max() <= TOL


def test_rank_and_alpha_patterns_survive_a_round_trip(tmp_path):
    """A PEFT adapter with rank_pattern and alpha_pattern, loaded and saved again by regretless, is the same
    adapter for PEFT (before: alpha_pattern dropped, logits off by 0.74)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                          rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                          alpha_pattern={"v_proj": 4, "down_proj": 40})
    peft_model = get_peft_model(build_model(tiny_llama_config()), peft_cfg)
    _randomize(peft_model.named_parameters(), seed=2)
    want = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_model(tiny_llama_config())
    lora = load_adapter(model, tmp_path / "peft")
    assert (lora.rank, lora.alpha) == (4, 16)
    save_adapter(model, tmp_path / "ours", lora)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 16)
    again = PeftModel.from_pretrained(build_model(tiny_llama_config()), tmp_path / "ours")
    for name, m in again.named_modules():  # every module has PEFT's rank and scale of the original
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            orig = peft_model.get_submodule(name)
            assert (m.r["default"], m.scaling["default"]) == (orig.r["default"], orig.scaling["default"]), name
    assert (_logits(again) - want).abs().max() <= TOL
    # a config that disagrees with the modules still saves them faithfully: the patterns carry the difference
    save_adapter(model, tmp_path / "other", LoRAConfig(rank=8, alpha=32))
    again = PeftModel.from_pretrained(build_model(tiny_llama_config()), tmp_path / "other")
    assert (_logits(again) - want).abs().max() <= TOL


def _v4_adapter(family: str, path, r: int = 2, alpha: float = 8.0):
    """A transformers-4 style PEFT adapter for a MoE model: one LoRA module per expert and projection."""
    cfg = MOE[family]()
    E = cfg.num_experts if family == "qwen3_moe" else cfg.num_local_experts
    inter = cfg.moe_intermediate_size if family == "qwen3_moe" else cfg.intermediate_size
    H = cfg.hidden_size
    prefix, names = (("mlp", ("gate_proj", "up_proj", "down_proj")) if family == "qwen3_moe"
                     else ("block_sparse_moe", ("w1", "w3", "w2")))
    g = torch.Generator().manual_seed(3)
    sd = {}
    for layer in range(cfg.num_hidden_layers):
        q = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        sd[f"{q}.lora_A.weight"], sd[f"{q}.lora_B.weight"] = torch.randn(r, H, generator=g), torch.randn(
            cfg.num_attention_heads * 8, r, generator=g)
        for e in range(E):
            for name, (d_in, d_out) in zip(names, ((H, inter), (H, inter), (inter, H))):
                k = f"base_model.model.model.layers.{layer}.{prefix}.experts.{e}.{name}"
                sd[f"{k}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * 0.3
                sd[f"{k}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.3
    path.mkdir()
    save_file(sd, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["q_proj", *names], "bias": "none", "base_model_name_or_path": "tiny"}))
    return path


@pytest.mark.parametrize("family", sorted(MOE))
def test_transformers4_per_expert_adapter_onto_fused_experts(family, tmp_path):
    """experts.N.gate_proj / up_proj / down_proj (Mixtral: block_sparse_moe.experts.N.w1 / w3 / w2) stacked onto
    the fused gate_up_proj and down_proj; PEFT's own conversion is the reference."""
    from peft import PeftModel

    adapter = _v4_adapter(family, tmp_path / "v4")
    want = _logits(PeftModel.from_pretrained(build_model(MOE[family]()), adapter))
    assert (want - _logits(build_model(MOE[family]()))).abs().max() > 1e-2
    model = build_model(MOE[family]())
    load_adapter(model, adapter)
    ex = dict(lora_modules(model))["model.layers.1.mlp.experts"]
    assert ex.ranks == {"gate": 2, "up": 2, "down": 2} and ex.scales["gate"] == pytest.approx(4.0)
    assert (_logits(model) - want).abs().max() <= TOL
    w = load_file(str(adapter / "adapter_model.safetensors"))
    leaf = "gate_proj" if family == "qwen3_moe" else "w1"
    key = f"base_model.model.model.layers.1.{'mlp' if family == 'qwen3_moe' else 'block_sparse_moe'}.experts.3"
    assert torch.equal(ex.lora_A("gate")[3], w[f"{key}.{leaf}.lora_A.weight"])  # expert 3's gate, unchanged


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_export_per_expert_layout(family, tmp_path):
    from peft import PeftModel

    make = {**MOE, "gpt_oss": tiny_gpt_oss_config}[family]
    lora = LoRAConfig(rank=8)
    model = build_model(make())
    apply_lora(model, lora)
    _randomize(lora_parameters(model), seed=4)
    want = _logits(model)
    out = export_per_expert(model, tmp_path / "per-expert", lora)
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    leaf = {"qwen3_moe": "mlp.experts.3.gate_proj", "mixtral": "block_sparse_moe.experts.3.w1",
            "gpt_oss": "mlp.experts.3.gate_proj"}[family]
    assert f"base_model.model.model.layers.0.{leaf}.lora_A.weight" in keys
    assert not any("gate_up_proj" in k or "base_layer" in k for k in keys)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] is None and config["r"] == 4  # the experts' rank: 8 // top-2
    fresh = build_model(make())
    load_adapter(fresh, out)
    assert (_logits(fresh) - want).abs().max() <= 1e-5
    if family != "gpt_oss":  # PEFT converts per-expert adapters only for model types it has a mapping for
        assert (_logits(PeftModel.from_pretrained(build_model(make()), out)) - want).abs().max() <= TOL


def test_block_diagonal_gate_up_is_split_again(tmp_path):
    """regretless saves gate and up as one block-diagonal PEFT adapter; reading it (even without regretless's
    header) gives separate gate and up adapters again, bit for bit."""
    model = build_model(tiny_qwen3_moe_config())
    apply_lora(model, LoRAConfig(rank=8))
    _randomize(lora_parameters(model), seed=5)
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=8))
    f = tmp_path / "a" / "adapter_model.safetensors"
    save_file(load_file(str(f)), str(f))  # drop the regretless metadata: a plain PEFT file
    fresh = build_model(tiny_qwen3_moe_config())
    load_adapter(fresh, tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(lora_parameters(model), lora_parameters(fresh)):
        assert n1 == n2 and torch.equal(p1, p2)


def test_export_per_expert_of_a_fused_peft_adapter(tmp_path):
    """PEFT's fused gate_up adapter (one rank for both halves) exported per expert: gate and up share its A and
    split its B's rows; regretless reads the export back as the same adapter."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_model(tiny_qwen3_moe_config()),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                           target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    _randomize(peft_model.named_parameters(), seed=6)
    want = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_model(tiny_qwen3_moe_config())
    lora = load_adapter(model, tmp_path / "peft")
    assert dict(lora_modules(model))["model.layers.0.mlp.experts"].ranks == {"gate_up": 4, "down": 4}
    export_per_expert(model, tmp_path / "per-expert", lora)
    fresh = build_model(tiny_qwen3_moe_config())
    load_adapter(fresh, tmp_path / "per-expert")
    assert dict(lora_modules(fresh))["model.layers.0.mlp.experts"].ranks == {"gate": 4, "up": 4, "down": 4}
    assert (_logits(fresh) - want).abs().max() <= TOL


def test_gate_and_up_of_different_ranks_round_trip(tmp_path):
    """A transformers-4 adapter whose gate and up have different ranks: split on load, one rank-5 block-diagonal
    PEFT adapter on save (scales kept), split into ranks 2 and 3 again on the next load; PEFT agrees throughout."""
    from peft import PeftModel

    adapter = _v4_adapter("qwen3_moe", tmp_path / "v4")
    w = load_file(str(adapter / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(9)
    for k in list(w):
        if ".up_proj." in k:  # up_proj gets rank 3, gate_proj keeps 2
            w[k] = torch.randn(3, w[k].shape[1], generator=g) * 0.3 if "lora_A" in k else \
                torch.randn(w[k].shape[0], 3, generator=g) * 0.3
    save_file(w, str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"up_proj": 3}}))
    model = build_model(tiny_qwen3_moe_config())
    lora = load_adapter(model, adapter)
    want = _logits(model)
    assert dict(lora_modules(model))["model.layers.0.mlp.experts"].ranks == {"gate": 2, "up": 3, "down": 2}
    save_adapter(model, tmp_path / "ours", lora)
    again = build_model(tiny_qwen3_moe_config())
    load_adapter(again, tmp_path / "ours")
    assert dict(lora_modules(again))["model.layers.0.mlp.experts"].ranks == {"gate": 2, "up": 3, "down": 2}
    assert (_logits(again) - want).abs().max() <= 1e-5
    assert (_logits(PeftModel.from_pretrained(build_model(tiny_qwen3_moe_config()), tmp_path / "ours"))
            - want).abs().max() <= TOL
