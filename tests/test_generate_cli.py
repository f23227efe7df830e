"""`regretless generate`: a run folder's base + adapter (and a merged folder) reply with exactly the tokens of an
independent greedy decode (argmax of the adapted model's logits, one token at a time), through the chat
template, streamed to stdout; sampling is seeded; bad input is one line."""

from __future__ import annotations

import io

import pytest
import torch

from regretless.cli import main
from regretless.config import SFTConfig, save_config
from regretless.lora import LoRAConfig, apply_lora, lora_parameters, save_adapter


@pytest.fixture
def lora_run(tiny_llama_dir, tmp_path):
    """A LoRA run folder (config.yaml naming the base, adapter/) whose adapter changes the model's replies,
    and the adapted model itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    apply_lora(model, LoRAConfig(rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            if "lora_B" in n:
                p.normal_(0, 0.3)
    run = tmp_path / "run"
    run.mkdir()
    save_config(SFTConfig(model=str(tiny_llama_dir), out=str(run), lora=LoRAConfig(rank=4)), run / "config.yaml",
                "sft")
    save_adapter(model, run / "adapter", LoRAConfig(rank=4), base_model=str(tiny_llama_dir))
    return run, model


def greedy_reference(model, tok, prompt: str, n: int) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(out, skip_special_tokens=True)


def reply(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out.strip()


def test_run_folder_reply_is_the_adapted_models_greedy_decode(lora_run, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, adapted = lora_run
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    want = greedy_reference(adapted, tok, "hello there", 12)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert greedy_reference(base, tok, "hello there", 12) != want  # the adapter matters
    got = reply(capsys, ["--run", str(run), "--prompt", "hello there", "--max-new-tokens", "12"])
    assert got == want.strip() and got

    # the merged folder answers the same
    assert main(["merge", "--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert reply(capsys, ["--model", str(tmp_path / "merged"), "--prompt", "hello there",
                          "--max-new-tokens", "12"]) == got


def test_prompt_from_stdin(lora_run, monkeypatch, capsys):
    run, _ = lora_run
    a = reply(capsys, ["--run", str(run), "--prompt", "what is two plus two?", "--max-new-tokens", "8"])
    monkeypatch.setattr("sys.stdin", io.StringIO("what is two plus two?\n"))
    assert reply(capsys, ["--run", str(run), "--max-new-tokens", "8"]) == a


def test_sampling_is_seeded_and_differs_from_greedy(lora_run, capsys):
    run, _ = lora_run
    args = ["--run", str(run), "--prompt", "tell me a story", "--max-new-tokens", "16", "--temperature", "1.5"]
    s1 = reply(capsys, [*args, "--seed", "1"])
    assert reply(capsys, [*args, "--seed", "1"]) == s1
    others = {reply(capsys, [*args, "--seed", str(s)]) for s in (2, 3, 4)}
    assert others - {s1}  # other seeds give other replies


def test_streams_token_by_token(lora_run, tiny_llama_dir):
    """The reply goes through a transformers streamer as it is generated (not printed once at the end)."""
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from regretless.commands.generate import encode, generate

    class Count(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1

        def end(self):
            pass

    _, adapted = lora_run
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    streamer = Count()
    new = generate(adapted, tok, encode(tok, "hi", None, False), 10, streamer=streamer)
    assert streamer.calls == 1 + len(new)  # the prompt once, then each new token
