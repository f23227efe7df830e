"""gradient_checkpointing (same gradients as without, for LoRA and FullFT, SFT and RL; the recomputation really
happens) and freeze_embeddings (FullFT leaves the input embeddings and LM head bit-identical, tied or not)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, tiny_llama_config
from safetensors.torch import load_file

from regretless.cli import main as cli_main
from regretless.config import RLConfig, SFTConfig
from regretless.data import batches, tokenize
from regretless.lora import LoRAConfig, apply_lora
from regretless.rl.envs import make_env
from regretless.rl.evaluate import encode_problems
from regretless.rl.step import policy_gradient_step
from regretless.train import enable_checkpointing, run_sft

CHAT = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}, " * (1 + i % 3)}]}
        for i in range(6)]


def model_pair(lora: bool, **config):
    """Two identical tiny Llamas (LoRA with random B, or FullFT); the second with activation checkpointing."""
    models = []
    for _ in range(2):
        m = build_model(tiny_llama_config(**config), seed=0)
        if lora:
            apply_lora(m, LoRAConfig(rank=4))
            g = torch.Generator().manual_seed(1)
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            m.requires_grad_(True)
        models.append(m)
    enable_checkpointing(models[1])
    return models


def count_mlp_calls(model) -> list[int]:
    """[runs of layer 0's MLP forward, of them inside a backward pass] (module hooks do not fire in torch's
    recomputation; forward does)."""
    calls, mlp = [0, 0], model.model.layers[0].mlp
    inner = mlp.forward

    def forward(*args, **kwargs):
        calls[0] += 1
        calls[1] += torch._C._current_graph_task_id() != -1
        return inner(*args, **kwargs)

    mlp.forward = forward
    return calls


def assert_same_grads(a, b):
    ga = {n: p.grad for n, p in a.named_parameters() if p.requires_grad}
    gb = {n: p.grad for n, p in b.named_parameters() if p.requires_grad}
    assert ga and ga.keys() == gb.keys()
    assert all(g is not None and bool((g != 0).any()) for n, g in ga.items() if "lora_A" not in n)
    for n, g in ga.items():
        torch.testing.assert_close(gb[n], g, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_checkpointing_gives_the_same_sft_gradients(tiny_tokenizer, lora):
    from regretless import lm

    plain, ckpt = model_pair(lora)
    calls = count_mlp_calls(ckpt)
    toks, _ = tokenize(CHAT, tiny_tokenizer, 128)
    [batch] = list(batches(toks, 6, 128, False, tiny_tokenizer.pad_token_id, 0, 0))
    for m in (plain, ckpt):
        m.train()
        s, _ = lm.nll_sum(m, batch)
        s.backward()
    assert calls == [2, 1]  # forward, then again in backward: the activations were not kept
    assert_same_grads(plain, ckpt)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_checkpointing_gives_the_same_rl_gradients(tiny_tokenizer, tmp_path, lora):
    """Also with attention dropout in the config: the learner stays dropout-free under checkpointing."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(8)))
    (tmp_path / "r.py").write_text("def f(c, a):\n    return float(len(c) > 0 and ord(c[0]) % 2 == 1)\n")
    env = make_env(f"{data},reward={tmp_path / 'r.py'}:f", seed=0, train_size=6, eval_size=2)
    problems, ids, _ = encode_problems(tiny_tokenizer, env.train[:3], 200, "env")
    cfg = RLConfig(problems_per_step=3, group_size=4, max_new_tokens=6, micro_batch_size=8)
    plain, ckpt = model_pair(lora, attention_dropout=0.5)
    calls = [count_mlp_calls(m) for m in (plain, ckpt)]
    metrics = [policy_gradient_step(m, tiny_tokenizer, env, problems, ids, cfg, torch.Generator().manual_seed(0))[0]
               for m in (plain, ckpt)]
    assert 0 < metrics[0]["frac_constant_groups"] < 1
    assert metrics[1]["log_ratio_max"] < 1e-5
    assert calls[0][1] == 0 and calls[1][1] == 1  # the checkpointed learner forward ran again in backward
    assert_same_grads(plain, ckpt)


def test_checkpointing_run_matches_plain_run(tiny_llama_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in CHAT * 4))
    losses = []
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        s = run_sft(SFTConfig(model=str(tiny_llama_dir), data=str(data), out=str(out), steps=3, batch_size=4,
                              micro_batch_size=2, seq_len=128, eval_size=4, lr=1e-3, lora=None, device="cpu",
                              gradient_checkpointing=gc))
        assert s["status"] == "done"
        losses.append([json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert losses[0][1:] == pytest.approx(losses[1][1:], abs=1e-6)


def embed_and_head(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if "embed_tokens" in k or "lm_head" in k}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_freeze_embeddings_trains_everything_else(tokenizer_dir, tmp_path, tied):
    from transformers import AutoTokenizer

    base_dir = tmp_path / "base"
    base = build_model(tiny_llama_config(tie_word_embeddings=tied))
    base.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(base_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in CHAT * 4))
    out = tmp_path / "run"
    s = run_sft(SFTConfig(model=str(base_dir), data=str(data), out=str(out), steps=3, batch_size=4, seq_len=128,
                          eval_size=4, lr=1e-2, lora=None, device="cpu", freeze_embeddings=True))
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    frozen = embed_and_head(before)
    assert len(frozen) == (1 if tied else 2)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k not in frozen and not torch.equal(before[k], after[k])]
    assert changed == [k for k in before if k not in frozen]  # everything else trained
    V, H = 512, 32
    assert s["trainable_params"] == sum(p.numel() for p in base.parameters()) - V * H * (1 if tied else 2)


def test_freeze_embeddings_in_rl_from_the_cli(tiny_llama_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(12)))
    (tmp_path / "r.py").write_text("def f(c, a):\n    return float(len(c) > 0 and ord(c[0]) % 2 == 1)\n")
    out = tmp_path / "rl"
    rc = cli_main(["rl", "--model", str(tiny_llama_dir), "--env", str(data), "--reward", f"{tmp_path / 'r.py'}:f",
                   "--out", str(out), "--full", "--freeze-embeddings", "--gradient-checkpointing", "--lr", "1e-2",
                   "--steps", "3", "--problems-per-step", "3", "--group-size", "4", "--max-new-tokens", "5",
                   "--device", "cpu", "eval_size=2", "train_size=8"])
    assert rc == 0
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in before if "embed" not in k)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == sum(v.numel() for v in before.values()) - 512 * 32


@pytest.mark.parametrize("command", ["sft", "rl"])
def test_save_weights_false_writes_metrics_and_summary_only(tiny_llama_dir, tmp_path, command):
    """save_weights=false (the full preset's sweeps): the run ends `done` with its metrics and summary, and no
    adapter, model or checkpoint is written; the same run with the default writes them."""
    data = tmp_path / "d.jsonl"
    if command == "sft":
        data.write_text("".join(json.dumps(ex) + "\n" for ex in CHAT * 4))
        args, over = ["sft", "--data", str(data), "--steps", "2", "--batch-size", "4"], ["eval_size=4", "seq_len=128"]
    else:
        data.write_text("\n".join(json.dumps({"prompt": f"Say {i}", "answer": "x"}) for i in range(12)))
        (tmp_path / "r.py").write_text("def f(c, a):\n    return float(len(c) > 0 and ord(c[0]) % 2 == 1)\n")
        args = ["rl", "--env", str(data), "--reward", f"{tmp_path / 'r.py'}:f", "--steps", "2",
                "--problems-per-step", "2", "--group-size", "2", "--max-new-tokens", "3"]
        over = ["eval_size=2", "train_size=8"]
    for save in (True, False):
        out = tmp_path / f"{command}-{save}"
        rc = cli_main([*args, "--model", str(tiny_llama_dir), "--out", str(out), "--rank", "2", "--lr", "1e-3",
                       "--device", "cpu", *over, f"save_weights={str(save).lower()}"])
        assert rc == 0
        assert json.loads((out / "summary.json").read_text())["status"] == "done"
        assert (out / "metrics.jsonl").read_text().strip()
        written = {p.name for p in out.iterdir()}
        assert ({"adapter", "checkpoints"} <= written) is save
        if not save:
            assert not ({"adapter", "model", "checkpoints"} & written), written
