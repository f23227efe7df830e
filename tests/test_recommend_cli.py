"""`regretless recommend` end to end: known names, a local folder with data, MoE, and user errors."""

from __future__ import annotations

import json
import math

import pytest

from regretless.cli import main

# Llama-3.1-8B LoRA parameters per rank unit, by hand (32 layers; d=4096, kv=1024, mlp=14336):
#   attn: q,o (4096+4096) x2 + k,v (4096+1024) x2 = 26,624;  mlp: gate,up,down 3 x (4096+14336) = 55,296
LLAMA8B_ATTN_PER_RANK = 26_624 * 32
LLAMA8B_MLP_PER_RANK = 55_296 * 32


def recommend(capsys, *argv):
    rc = main(["recommend", *argv, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_llama8b_counts_lr_capacity(capsys):
    rec = recommend(capsys, "--model", "meta-llama/Llama-3.1-8B", "--tokens", "20000000", "--rank", "256")
    items = rec["items"]
    assert rec["model"] == "Llama-3.1-8B" and rec["family"] == "llama"
    assert items["lora_lr"]["value"] == pytest.approx(2.86e-4, rel=0.01)
    assert items["full_lr"]["value"] == pytest.approx(2.86e-5, rel=0.01)
    params = items["lora_params"]["value"]
    assert params["attn"] == 256 * LLAMA8B_ATTN_PER_RANK == 218_103_808  # paper: ~0.25B
    assert params["mlp"] == 256 * LLAMA8B_MLP_PER_RANK == 452_984_832  # paper: ~0.49B
    assert params["total"] == 671_088_640  # paper: ~0.70B
    cap = items["capacity"]["value"]
    assert cap["verdict"] == "fits" and cap["margin"] == pytest.approx(2 * 671_088_640 / 2e7)
    # capacity >= 2e7 bits  <=>  2 * r * 2,621,440 >= 2e7  <=>  r >= 3.8  ->  4
    assert items["smallest_passing_rank"]["value"] == 4
    assert items["scale"]["value"] == pytest.approx(0.125) and items["alpha"]["value"] == 32
    assert items["targets"]["value"] == "all"
    flops = items["flops_per_token"]["value"]
    assert flops["ratio"] == pytest.approx(flops["lora"] / flops["full"]) and 2 / 3 < flops["ratio"] < 1
    assert "moe_expert_rank" not in items


def test_rank_sized_to_data(capsys):
    # no --rank: smallest power of two with a 2x margin: 2 * r * 2,621,440 >= 2 * 2e7 -> r >= 7.6 -> 8
    rec = recommend(capsys, "--model", "llama-3.1-8b", "--tokens", "20000000")
    assert rec["items"]["rank"]["value"] == 8
    assert rec["items"]["capacity"]["value"]["margin"] == pytest.approx(2 * 8 * 2_621_440 / 2e7)
    # data no rank can hold: the largest rank the injector accepts (<= the smallest target dim, 1024)
    rec = recommend(capsys, "--model", "llama-3.1-8b", "--tokens", str(10**12))
    assert rec["items"]["rank"]["value"] == 1024
    assert rec["items"]["capacity"]["value"]["verdict"] == "exceeds"
    assert rec["items"]["smallest_passing_rank"]["value"] is None


def test_rl_rank_one_suffices(capsys):
    # the paper's MATH example: ~320k bits vs rank-1 LoRA on Llama-3.1-8B (~3M params)
    rec = recommend(capsys, "--model", "Llama-3.1-8B", "--task", "rl", "--episodes", "320000")
    items = rec["items"]
    assert items["rank"]["value"] == 1
    assert items["lora_params"]["value"]["total"] == LLAMA8B_ATTN_PER_RANK + LLAMA8B_MLP_PER_RANK
    assert items["capacity"]["value"]["margin"] == pytest.approx(2 * 2_621_440 / 320_000)


def test_moe_short_run_and_batch(capsys):
    rec = recommend(capsys, "--model", "Qwen/Qwen3-30B-A3B-Base", "--steps", "100", "--batch-size", "1024")
    items = rec["items"]
    assert items["moe_expert_rank"]["value"] == 256 // 8
    assert items["lora_lr"]["value"] / items["full_lr"]["value"] == pytest.approx(10 + 5 / (1 + 1 / 27))
    assert items["batch_size"]["reason"].startswith("too-large")
    assert items["lora_params"]["value"]["experts"] > 0
    assert "WARNING" not in items["lora_lr"]["reason"]
    rec = recommend(capsys, "--model", "Qwen3-30B-A3B", "--rank", "4")
    assert rec["items"]["moe_expert_rank"]["value"] == 1


def test_full_method(capsys):
    rec = recommend(capsys, "--model", "Qwen3-8B", "--method", "full", "--tokens", "1000")
    items = rec["items"]
    assert list(items)[2] == "full_lr"  # the method's LR first after the data lines
    assert items["full_params"]["value"]["total"] == items["full_params"]["value"]["model_total"]
    assert "lora_params" not in items and "rank" not in items


def test_text_output_lists_every_recommendation(capsys):
    assert main(["recommend", "--model", "Qwen3-8B", "--tokens", "1000000", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    for key in ("lora_lr", "full_lr", "rank", "alpha", "scale", "targets", "lora_params", "flops_per_token",
                "capacity", "batch_size"):
        assert f"  {key} " in out
    assert "4.73e-05" in out  # Qwen3-8B FullFT LR


def test_local_folder_with_dataset(capsys, tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from regretless.data import load_examples, tokenize

    data = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(10)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rec = recommend(capsys, "--model", str(tiny_llama_dir), "--dataset", str(data), "--batch-size", "4",
                    "--seq-len", "128", "--nll-batches", "2")
    items = rec["items"]
    _, stats = tokenize(load_examples(str(data)), AutoTokenizer.from_pretrained(tiny_llama_dir), seq_len=128)
    assert items["information_bits"]["value"] == pytest.approx(stats.loss_tokens * items["bits_per_token"]["value"])
    # a freshly initialized model predicts nearly uniformly over its 512 tokens: log2(512) = 9 bits/token
    assert items["bits_per_token"]["value"] == pytest.approx(math.log2(512), abs=0.2)
    assert items["steps"]["value"] == math.ceil(10 / 4)
    # vocab 512 is not Llama 3's: the LR warns instead of using the Llama exponent silently
    assert items["lora_lr"]["reason"].startswith("WARNING")


@pytest.mark.parametrize("argv, match", [
    (["--model", "gpt-17"], "known models: .*Qwen3-8B"),
    (["--model", "Qwen3-8B", "--steps", "-3"], "--steps: expected a positive integer"),
    (["--model", "Qwen3-8B", "--rank", "0"], "--rank: expected a positive integer"),
    (["--model", "Qwen3-8B", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--model", "Qwen3-8B", "--tokens", "0"], "--tokens: expected a positive integer"),
    (["--model", "Qwen3-8B", "--tokens", "100", "--bits-per-token", "-1"], "--bits-per-token"),
    (["--model", "Qwen3-8B", "--task", "rl", "--tokens", "100"], "episodes"),
    (["--model", "Qwen3-8B", "--episodes", "100"], "--episodes is for --task rl"),
    (["--model", "Qwen3-8B", "--dataset", "chatterbot"], "--dataset needs a local model folder"),
    (["--model", "Qwen3-8B", "--rank", "2048"], "rank"),
])
def test_user_errors(capsys, argv, match):
    import re

    assert main(["recommend", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("regretless recommend: error:") and len(err.splitlines()) == 1
    assert re.search(match, err), err


def _all_models() -> list[str]:
    from regretless.assets import BUILTIN_MODELS
    from regretless.known_models import KNOWN_MODELS

    return [*BUILTIN_MODELS, *KNOWN_MODELS]


@pytest.mark.parametrize("model", _all_models())
def test_no_flags_works_for_every_builtin_and_known_model(model, capsys, tmp_path, monkeypatch):
    """The default rank is capped at what the model's shapes allow, and the output says so."""
    from regretless.counts import count_params
    from regretless.errors import UserError

    monkeypatch.setenv("REGRETLESS_CACHE", str(tmp_path))  # built-ins not prepared: shapes only, nothing built
    rec = recommend(capsys, "--model", model)
    rank = rec["items"]["rank"]["value"]
    assert rank <= 256 and not list(tmp_path.glob("models/*"))
    if rank < 256:  # capped: the next power of two is refused by the injector, and the reason says so
        assert f"capped at {rank}" in rec["items"]["rank"]["reason"]
        from regretless.commands.recommend import load_model_config, meta_model
        from regretless.lora.config import LoRAConfig

        meta = meta_model(load_model_config(model)[0])
        with pytest.raises(UserError):
            count_params(meta, LoRAConfig(rank=2 * rank, targets="all"))
    assert recommend(capsys, "--model", model, "--task", "rl")["items"]["rank"]["value"] == 1


def test_bare_recommend_uses_the_default_model_and_warns_once(capsys):
    assert main(["recommend"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(("SmolLM2-135M", "smollm2-135m"))
    assert out.count("WARNING") == 1 and "capped at 128" in out
    assert max(len(line) for line in out.splitlines() if "WARNING" in line) < 130


def test_rl_task_recommends_rank_1_and_the_rl_lr(capsys):
    from regretless import recipe
    from regretless.known_models import known_config

    items = recommend(capsys, "--model", "smollm2-135m", "--task", "rl")["items"]
    assert items["rank"]["value"] == 1
    assert items["lora_lr"]["value"] == pytest.approx(recipe.default_lr(known_config("SmolLM2-135M"), "lora",
                                                                        task="rl")[0], rel=1e-9)
    assert items["lora_lr"]["value"] / items["full_lr"]["value"] == pytest.approx(5.0)
