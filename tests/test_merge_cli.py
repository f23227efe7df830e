"""`regretless merge` end to end on a saved tiny Llama, its user errors (one line, exit 2), and `regretless assets`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, tiny_llama_config

from regretless.cli import main
from regretless.lora import LoRAConfig, apply_lora, lora_parameters, save_adapter


@pytest.fixture
def adapted(tiny_llama_dir, tmp_path):
    """(adapter folder, logits of the adapted model on `ids`, ids)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    apply_lora(model, LoRAConfig(rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return save_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4)), logits, ids


def test_merge_end_to_end(tiny_llama_dir, adapted, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, want, ids = adapted
    out = tmp_path / "merged"
    rc = main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: a plain transformers model (fp32)") and "14 LoRA modules" in printed
    assert "the base is unchanged" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged", "tiny-llama"]  # no temp folders
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    with torch.no_grad():
        got = merged(ids).logits
        base = build_model(tiny_llama_config())(ids).logits
    assert (want - base).abs().max() > 1e-2
    assert (want - got).abs().max() <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("hello there") == AutoTokenizer.from_pretrained(tiny_llama_dir).encode("hello there")


def test_merge_bf16_and_force(tiny_llama_dir, adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, want, ids = adapted
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    args = ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(out), "--dtype", "bf16"]
    assert main(args) == 2  # refuses to overwrite without --force
    assert main([*args, "--force"]) == 0
    assert not (out / "stale.txt").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = merged.float()(ids).logits
    assert (want - got).abs().max() < 0.1  # bf16 rounding of the weights only


def test_merge_run_folder_takes_base_and_adapter_from_it(tiny_llama_dir, adapted, tmp_path, capsys):
    """--run DIR: the adapter of DIR and the base its config.yaml names; --adapter alone: the base it names."""
    import shutil

    from transformers import AutoModelForCausalLM

    from regretless.config import SFTConfig, save_config

    adapter, want, ids = adapted
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(adapter, run / "adapter")
    save_config(SFTConfig(model=str(tiny_llama_dir), out=str(run)), run / "config.yaml", "sft")
    assert main(["merge", "--run", str(run), "--out", str(tmp_path / "m1")]) == 0
    named = tmp_path / "named"
    shutil.copytree(adapter, named)
    cfg = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny_llama_dir)}))
    assert main(["merge", "--adapter", str(named), "--out", str(tmp_path / "m2")]) == 0
    for m in ("m1", "m2"):
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(tmp_path / m, dtype=torch.float32).eval()(ids).logits
        assert (want - got).abs().max() <= 1e-4


def test_merge_keeps_the_base_dtype(tiny_llama_dir, adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    base16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(base16)
    for f in tiny_llama_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            (base16 / f.name).write_bytes(f.read_bytes())
    assert main(["merge", "--model", str(base16), "--adapter", str(adapted[0]), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert main(["merge", "--model", str(base16), "--adapter", str(adapted[0]), "--out", str(tmp_path / "m32"),
                 "--dtype", "fp32"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m32").model.layers[0].mlp.up_proj.weight.dtype == \
        torch.float32


def _run_error(argv, capsys) -> str:
    capsys.readouterr()  # drop what the test printed before
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "it/s]" not in ln]  # transformers' progress bars aside
    assert len(lines) == 1 and lines[0].startswith(f"regretless {argv[0]}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_merge_user_errors(tiny_llama_dir, adapted, tmp_path, capsys):
    adapter, _, _ = adapted
    out = str(tmp_path / "merged")
    assert "not a folder, a .gguf file or a built-in name" in _run_error(
        ["merge", "--model", str(tmp_path / "nomodel"), "--adapter", str(adapter), "--out", out], capsys)
    assert "not a folder" in _run_error(
        ["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "none"), "--out", out], capsys)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 50)
    assert "corrupt or unreadable" in _run_error(
        ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", out], capsys)
    (adapter / "adapter_config.json").write_text('{"r": 4, "lora_alpha"')
    assert "adapter_config.json:1: not valid JSON" in _run_error(
        ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", out], capsys)
    assert not (tmp_path / "merged").exists()


def test_merge_non_causal_lm_folder(adapted, tmp_path, capsys):
    from transformers import LlamaModel

    LlamaModel(tiny_llama_config()).save_pretrained(tmp_path / "headless")
    msg = _run_error(["merge", "--model", str(tmp_path / "headless"), "--adapter", str(adapted[0]),
                      "--out", str(tmp_path / "m")], capsys)
    assert "LlamaModel" in msg and "not a causal language model" in msg


def test_merge_adapter_of_another_base(tmp_path, tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    other = build_model(tiny_llama_config(intermediate_size=48))
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "other")
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4))
    msg = _run_error(["merge", "--model", str(tmp_path / "other"), "--adapter", str(tmp_path / "adapter"),
                      "--out", str(tmp_path / "m")], capsys)
    assert "has shape" in msg and "another base model" in msg
    assert not (tmp_path / "m").exists()


def test_console_command_error_subprocess(tmp_path):
    """Through the installed `regretless` console command: one line on stderr, exit code 2, no traceback."""
    exe = Path(sys.executable).with_name("regretless")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "regretless.cli"]
    res = subprocess.run([*cmd, "merge", "--model", str(tmp_path), "--adapter", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"regretless merge: error: --adapter {tmp_path / 'missing'}: not a folder; expected a PEFT adapter folder"]
    assert res.stdout == ""


# ---- regretless assets


def test_assets_list_and_prepare(smollm2_dir, capsys, monkeypatch, tmp_path):
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and " cached " in out and str(smollm2_dir) in out
    assert main(["assets", "prepare", "smollm2-135m"]) == 0
    assert f"already cached at {smollm2_dir}" in capsys.readouterr().out

    monkeypatch.setenv("REGRETLESS_CACHE", str(tmp_path / "empty-cache"))
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    assert "not cached" in out and str(tmp_path / "empty-cache" / "models" / "smollm2-135m") in out


def test_assets_unknown_name(capsys):
    assert "unknown built-in asset 'gpt-7'" in _run_error(["assets", "prepare", "gpt-7"], capsys)


def test_merge_tied_head_unties_and_keeps_the_embeddings(tiny_llama_dir, tmp_path, capsys):
    """An adapter on the tied LM head: the merged model has its own head weight; the embeddings are untouched."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    emb0 = model.model.embed_tokens.weight.detach().clone()
    lora = LoRAConfig(rank=4, targets=("all", "lm_head"))
    apply_lora(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "adapter", lora)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 0
    assert "untied lm_head from the input embeddings" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(merged.model.embed_tokens.weight, emb0)
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max() <= 1e-4
