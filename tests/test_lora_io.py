"""Adapters in PEFT's format: regretless -> PEFT and PEFT -> regretless give the same logits (dense and MoE, and on
the real SmolLM2), merge/unload, and clear one-line errors for corrupt or mismatched adapter files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config
from safetensors.torch import load_file, save_file
from test_lora_experts import tiny_gpt_oss_config, tiny_mixtral_config, tiny_olmoe_config

from regretless.errors import UserError
from regretless.lora import (
    LoRAConfig,
    LoRAExperts,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    save_adapter,
    unload,
    unmerge_lora,
)

TOL = 1e-4  # the bar: fp32, max abs diff of the logits
FAMILIES = {"llama": tiny_llama_config, "qwen3_moe": tiny_qwen3_moe_config, "mixtral": tiny_mixtral_config,
            "olmoe": tiny_olmoe_config, "gpt_oss": tiny_gpt_oss_config}
MOE_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _randomize(named_params, std: float = 0.2, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_B" in n or "lora_A" in n:
                p.normal_(0, std)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def _adapted(make, cfg: LoRAConfig, seed: int = 0):
    model = build_model(make())
    apply_lora(model, cfg)
    _randomize(lora_parameters(model), seed=seed)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lora", [LoRAConfig(rank=4), LoRAConfig(rank=8, expert_rank=3, rslora=True)],
                         ids=["default", "expert_rank+rslora"])
def test_regretless_to_peft(family, lora, ids, tmp_path):
    from peft import PeftModel

    make = FAMILIES[family]
    model = _adapted(make, lora)
    want = _logits(model, ids)
    save_adapter(model, tmp_path / "adapter", lora, base_model="tiny")
    peft_model = PeftModel.from_pretrained(build_model(make()), tmp_path / "adapter")
    got = _logits(peft_model, ids)
    assert (want - _logits(build_model(make()), ids)).abs().max() > 1e-2  # the adapter does something
    assert (want - got).abs().max() <= TOL
    # PEFT built the same adapter, plus the zero off-diagonal blocks of each fused gate_up B
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    zeros = sum(m.num_experts * m.layout.inter * (m.ranks["gate"] + m.ranks["up"])
                for _, m in lora_modules(model) if isinstance(m, LoRAExperts))
    assert n_peft == sum(p.numel() for _, p in lora_parameters(model)) + zeros


@pytest.mark.parametrize("targets", [r".*experts\.down_proj", "experts"])
def test_regretless_to_peft_experts_only(targets, ids, tmp_path):
    """No dense module adapted: target_modules is empty and PEFT adapts only the listed expert parameters."""
    from peft import PeftModel

    lora = LoRAConfig(rank=4, targets=targets)
    model = _adapted(tiny_qwen3_moe_config, lora)
    want = _logits(model, ids)
    save_adapter(model, tmp_path / "a", lora)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == []
    peft_model = PeftModel.from_pretrained(build_model(tiny_qwen3_moe_config()), tmp_path / "a")
    assert (want - _logits(build_model(tiny_qwen3_moe_config()), ids)).abs().max() > 1e-2
    assert (want - _logits(peft_model, ids)).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_to_regretless(family, rslora, ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    make = FAMILIES[family]
    moe = family != "llama"
    peft_cfg = LoraConfig(r=4, lora_alpha=16, use_rslora=rslora, target_modules=["q_proj", "v_proj", "o_proj"],
                          target_parameters=MOE_PARAMS if moe else None,
                          rank_pattern={"down_proj": 2} if moe else {"o_proj": 2},
                          alpha_pattern={"v_proj": 4})
    peft_model = get_peft_model(build_model(make()), peft_cfg)
    _randomize(peft_model.named_parameters(), seed=1)
    want = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")

    model = build_model(make())
    cfg = load_adapter(model, tmp_path / "peft")
    assert cfg.rank == 4 and cfg.alpha == 16 and cfg.rslora == rslora
    got = _logits(model, ids)
    assert (want - _logits(build_model(make()), ids)).abs().max() > 1e-2
    assert (want - got).abs().max() <= TOL
    mods = dict(lora_modules(model))
    assert {n.rsplit(".", 1)[-1] for n in mods} == {"q_proj", "v_proj", "o_proj"} | ({"experts"} if moe else set())
    if moe:
        ex = mods["model.layers.0.mlp.experts"]
        # PEFT's rank-4 adapter on the fused gate_up_proj (B not block-diagonal): one fused adapter
        assert isinstance(ex, LoRAExperts) and ex.ranks == {"gate_up": 4, "down": 2}
    v = mods["model.layers.1.self_attn.v_proj"]
    assert v.scale == pytest.approx(4 / (4**0.5 if rslora else 4))  # alpha_pattern


def test_peft_to_regretless_only_some_expert_params(ids, tmp_path):
    """Expert-only adapter, down_proj only: the logits differ from the base only through the experts."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_model(tiny_qwen3_moe_config()),
                                LoraConfig(r=4, target_modules=[], target_parameters=["experts.down_proj"]))
    _randomize(peft_model.named_parameters(), std=0.5, seed=2)
    want = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_model(tiny_qwen3_moe_config())
    load_adapter(model, tmp_path / "peft")
    assert [(n, m.adapted, m.ranks) for n, m in lora_modules(model)] == [
        ("model.layers.0.mlp.experts", ["down_proj"], {"down": 4}),
        ("model.layers.1.mlp.experts", ["down_proj"], {"down": 4})]
    assert (want - _logits(build_model(tiny_qwen3_moe_config()), ids)).abs().max() > 1e-2
    assert (want - _logits(model, ids)).abs().max() <= TOL


def test_regretless_round_trip_and_config(ids, tmp_path):
    lora = LoRAConfig(rank=8, expert_rank=3, lr_b_mult=4.0)
    model = _adapted(tiny_qwen3_moe_config, lora)
    want = _logits(model, ids)
    save_adapter(model, tmp_path / "a", lora, base_model="tiny-qwen")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == "tiny-qwen"
    assert sorted(config["target_parameters"]) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                   for p in ("down_proj", "gate_up_proj")]
    # gate and up (rank 3 each) travel as one block-diagonal rank-6 PEFT adapter on gate_up_proj, whose
    # alpha_pattern keeps the scale 32/3; down_proj is rank 3
    esc = r"model\.layers\.0\.mlp\.experts\."
    assert config["rank_pattern"][esc + "gate_up_proj"] == 6 and config["rank_pattern"][esc + "down_proj"] == 3
    assert config["alpha_pattern"][esc + "gate_up_proj"] == 64  # 64 / 6 = 32 / 3
    assert esc + "down_proj" not in config["alpha_pattern"]  # 32 / 3 with the global lora_alpha
    assert all(k.startswith("base_model.model.") for k in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    # saving again replaces the folder atomically (no temp folders left behind)
    save_adapter(model, tmp_path / "a", lora)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    fresh = build_model(tiny_qwen3_moe_config())
    load_adapter(fresh, tmp_path / "a")
    assert (want - _logits(fresh, ids)).abs().max() <= 1e-6
    for (n1, p1), (n2, p2) in zip(lora_parameters(model), lora_parameters(fresh)):
        assert n1 == n2 and torch.equal(p1, p2)


def test_smollm2_round_trip_both_ways(smollm2_dir, tmp_path):
    """The real SmolLM2-135M: regretless -> PEFT and PEFT -> regretless on a few tokens."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 30, 2]])
    base = _logits(model, ids)
    lora = LoRAConfig(rank=8)
    apply_lora(model, lora)
    _randomize(lora_parameters(model), std=0.02)
    want = _logits(model, ids)
    save_adapter(model, tmp_path / "ours", lora)
    model = unload(model, merge=False)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "ours")
    assert (want - base).abs().max() > 1e-2
    assert (want - _logits(peft_model, ids)).abs().max() <= TOL

    model = peft_model.unload()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
    _randomize(peft_model.named_parameters(), std=0.02, seed=3)
    want = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peft_model.unload()
    load_adapter(model, tmp_path / "peft")
    assert len(list(lora_modules(model))) == 30 * 7
    assert (want - base).abs().max() > 1e-2
    assert (want - _logits(model, ids)).abs().max() <= TOL


# ---- merge and unload


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss"])
def test_merge_unmerge_unload(family, ids):
    make = FAMILIES[family]
    base_sd = {k: v.clone() for k, v in build_model(make()).state_dict().items()}
    model = _adapted(make, LoRAConfig(rank=4))
    want = _logits(model, ids)
    merge_lora(model)
    assert all(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(sd[k], base_sd[k]) for k in base_sd)

    plain = unload(model, merge=True)
    assert not list(lora_modules(plain)) and set(plain.state_dict()) == set(base_sd)
    torch.testing.assert_close(_logits(plain, ids), want, atol=1e-5, rtol=1e-5)
    assert sum(not torch.equal(plain.state_dict()[k], base_sd[k]) for k in base_sd) > 0


def test_unload_without_merge_gives_the_base_even_after_a_merge(ids):
    base = _logits(build_model(tiny_llama_config()), ids)
    model = _adapted(tiny_llama_config, LoRAConfig(rank=4))
    merge_lora(model)
    plain = unload(model, merge=False)
    assert not list(lora_modules(plain))
    assert torch.equal(_logits(plain, ids), base)


# ---- bad adapter files: UserError, one line, model untouched


@pytest.fixture
def saved(tmp_path):
    model = _adapted(tiny_llama_config, LoRAConfig(rank=4))
    return save_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4))


def _load_error(model, path) -> str:
    with pytest.raises(UserError) as e:
        load_adapter(model, path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert not list(lora_modules(model))  # nothing was attached
    return msg


def test_missing_files(saved, tmp_path):
    (saved / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors: missing" in _load_error(build_model(tiny_llama_config()), saved)
    assert "adapter_config.json: missing" in _load_error(build_model(tiny_llama_config()), tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(saved, damage):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x93\x11not a safetensors file" * 40, "truncated": data[: len(data) // 2],
                   "empty": b""}[damage])
    msg = _load_error(build_model(tiny_llama_config()), saved)
    assert "corrupt or unreadable safetensors" in msg and str(f) in msg


@pytest.mark.parametrize("text,expect", [
    ('{"peft_type": "LORA", "r": 4,', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not a text file"),
    ('["LORA"]', "expected a LoRA adapter config"),
    ('{"peft_type": "IA3"}', "expected a LoRA adapter config"),
    ('{"peft_type": "LORA", "r": "four", "lora_alpha": 32}', "r='four'; expected a positive number"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": null}', "lora_alpha=None; expected a positive number"),
    ('{"peft_type": "LORA", "r": 4, "use_dora": true}', "use_dora=True is not supported"),
])
def test_invalid_adapter_config(saved, text, expect):
    f = saved / "adapter_config.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    msg = _load_error(build_model(tiny_llama_config()), saved)
    assert expect in msg and str(f) in msg


def test_adapter_of_another_base_shape_mismatch(saved):
    msg = _load_error(build_model(tiny_llama_config(intermediate_size=48)), saved)
    assert "has shape" in msg and "expected" in msg and "another base model" in msg


def test_adapter_of_another_base_unknown_module(tmp_path):
    model = _adapted(lambda: tiny_llama_config(num_hidden_layers=3), LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=4))
    msg = _load_error(build_model(tiny_llama_config()), tmp_path / "a")
    assert "'model.layers.2." in msg and "does not have" in msg


def test_adapter_of_another_base_expert_count(tmp_path):
    model = _adapted(tiny_qwen3_moe_config, LoRAConfig(rank=4))  # 8 experts, expert rank 2
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=4))
    msg = _load_error(build_model(tiny_qwen3_moe_config(num_experts=4)), tmp_path / "a")
    assert "experts" in msg and "another base model" in msg
    msg = _load_error(build_model(tiny_qwen3_moe_config(num_experts=3)), tmp_path / "a")
    assert "not a multiple of this model's 3 experts" in msg


def test_adapter_onto_a_non_adaptable_module(saved):
    from transformers import GPT2Config

    # a LayerNorm: the adapter's module exists but holds no matrix LoRA can adapt
    w = load_file(saved / "adapter_model.safetensors")
    save_file({"base_model.model.transformer.h.0.ln_1.lora_A.weight": w[next(iter(w))],
               "base_model.model.transformer.h.0.ln_1.lora_B.weight": torch.zeros(32, 4)},
              saved / "adapter_model.safetensors")
    model = build_model(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    assert "cannot adapt" in _load_error(model, saved)


def test_unexpected_or_missing_tensors(saved):
    f = saved / "adapter_model.safetensors"
    w = load_file(f)
    save_file({**w, "base_model.model.lm_head.weight": torch.zeros(512, 32)}, f)
    assert "unexpected tensor" in _load_error(build_model(tiny_llama_config()), saved)
    del w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(w, f)
    msg = _load_error(build_model(tiny_llama_config()), saved)
    assert "layers.0.self_attn.q_proj has no lora_B" in msg


def test_rank_disagreeing_with_config(saved):
    f = saved / "adapter_config.json"
    config = json.loads(f.read_text())
    f.write_text(json.dumps({**config, "r": 8}))
    msg = _load_error(build_model(tiny_llama_config()), saved)
    assert "has rank 4 in the file, but adapter_config.json says 8" in msg


def test_loading_twice_is_an_error(saved):
    model = build_model(tiny_llama_config())
    load_adapter(model, saved)
    assert all(isinstance(m, LoRALinear) for _, m in lora_modules(model))
    with pytest.raises(UserError, match="already has LoRA adapters"):
        load_adapter(model, saved)


def test_load_prints_coverage_by_group(saved, capsys):
    load_adapter(build_model(tiny_llama_config()), saved, verbose=True)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["attn"][1:3] == ["8", "8"] and rows["mlp"][1:3] == ["6", "6"] and rows["total"][1] == "14"
