"""Model loading: local folders, GGUF files (dequantized once into the cache), built-in names, bad paths."""

from __future__ import annotations

import pytest
import torch

from regretless.assets import _find_smollm2_gguf
from regretless.errors import UserError
from regretless.models import load_model, resolve_model


@pytest.mark.slow
def test_gguf_file_loads_dequantized_and_matches_builtin(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("REGRETLESS_CACHE", str(tmp_path / "cache"))  # a fresh cache: a real conversion
    gguf = _find_smollm2_gguf(quiet=True)
    folder = resolve_model(str(gguf), quiet=True)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolve_model(str(gguf), quiet=True) == folder  # cached: converted once
    model, tok, _ = load_model(str(gguf), quiet=True)
    ref, _, _ = load_model(str(smollm2_dir), quiet=True)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.chat_template  # the GGUF's tokenizer and chat template come along


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="not a folder, a .gguf file or a built-in name"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="bad.gguf"):
        resolve_model(str(bad), quiet=True)


def test_local_folder_loads_with_tokenizer(tiny_llama_dir):
    model, tok, path = load_model(str(tiny_llama_dir))
    assert path == tiny_llama_dir and not model.training
    assert tok.pad_token_id is not None and tok.chat_template
