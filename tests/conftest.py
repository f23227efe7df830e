"""Shared fixtures: a real byte-level BPE tokenizer with a ChatML template (trained in a second on the
chatterbot corpus), tiny dense and MoE models built from real transformers configs, and the real SmolLM2-135M."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chatterbot_texts() -> list[str]:
    spec = importlib.util.find_spec("chatterbot_corpus")
    root = os.path.join(os.path.dirname(spec.origin), "data", "english")
    texts = []
    for f in sorted(glob.glob(os.path.join(root, "*.yml"))):
        for conv in yaml.safe_load(Path(f).read_text()).get("conversations", []):
            texts += [str(x) for x in conv]
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A real byte-level BPE tokenizer (vocab 512, ChatML template) saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_chatterbot_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
                "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": None}
    base.update(kw)
    return LlamaConfig(**base)


def tiny_qwen3_moe_config(**kw):
    from transformers import Qwen3MoeConfig

    base = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
                "num_experts_per_tok": 2, "max_position_embeddings": 256, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": None}
    base.update(kw)
    return Qwen3MoeConfig(**base)


def build_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return build_model(tiny_llama_config())


@pytest.fixture
def tiny_moe():
    return build_model(tiny_qwen3_moe_config())


@pytest.fixture
def tiny_llama_dir(tmp_path, tokenizer_dir):
    """A saved tiny Llama folder (weights + the test tokenizer): a real local model path for CLI-level tests."""
    from transformers import AutoTokenizer

    model = build_model(tiny_llama_config())
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, prepared once into the user cache by `regretless assets`."""
    from regretless.assets import prepare_smollm2

    return prepare_smollm2(quiet=True)
