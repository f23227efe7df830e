import json

import pytest

from regretless.cli import main
from regretless.config import RLConfig
from regretless.errors import UserError
from regretless.lora import LoRAConfig
from regretless.rl.loop import problem_indices, run_rl

REWARDS = """import os
CALLS = 0
def has_e(completion, answer):
    global CALLS
    CALLS += 1
    if CALLS > int(os.environ.get("RL_TEST_FAIL_AFTER", "1000000000")):
        raise RuntimeError("reward server down")
    return float("e" in completion[:6])
"""
KEYS = {"step", "reward", "accuracy", "frac_constant_groups", "response_len", "ratio_mean", "entropy",
        "sample_tokens_per_s", "train_tokens_per_s", "lr"}
TIMING = {"sample_tokens_per_s", "train_tokens_per_s", "peak_mem_mb"}


@pytest.fixture
def env_spec(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(24)))
    (tmp_path / "rw.py").write_text(REWARDS)
    return f"{data},reward={tmp_path / 'rw.py'}:has_e"


def _cfg(model_dir, env, out, **kw):
    base = {"model": str(model_dir), "env": env, "out": str(out), "lora": LoRAConfig(rank=2), "lr": 2e-2,
            "steps": 3, "problems_per_step": 2, "group_size": 4, "max_new_tokens": 6, "eval_size": 3,
            "eval_every": 2, "save_every": 1, "train_size": 16}
    return RLConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_problem_indices_cycle_the_pool():
    seen = [i for s in range(5) for i in problem_indices(s, 2, 10, seed=0)]
    assert sorted(seen) == list(range(10))
    assert problem_indices(3, 2, 10, 0) == problem_indices(3, 2, 10, 0)


def test_run_rl_lora_files_metrics_and_exact_resume(tiny_llama_dir, env_spec, tmp_path, monkeypatch):
    ref = run_rl(_cfg(tiny_llama_dir, env_spec, tmp_path / "ref"))
    out = tmp_path / "ref"
    assert ref["status"] == "done" and ref["steps"] == 3 and ref["final_eval_accuracy"] is not None
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "config.yaml").is_file()
    recs = _metrics(out)
    assert recs[0]["step"] == 0 and "eval_accuracy" in recs[0]
    assert [r["step"] for r in recs[1:]] == [1, 2, 3]
    assert all(KEYS <= set(r) for r in recs[1:]) and "eval_accuracy" in recs[2] and "eval_accuracy" in recs[3]

    # a reward that fails at step 3: clear error, checkpoint of step 2 intact, then --resume repeats the run
    killed = tmp_path / "killed"
    monkeypatch.setenv("RL_TEST_FAIL_AFTER", str(2 * 2 * 4))
    with pytest.raises(UserError, match="has_e raised RuntimeError: reward server down"):
        run_rl(_cfg(tiny_llama_dir, env_spec, killed))
    assert not (killed / "summary.json").exists()
    monkeypatch.delenv("RL_TEST_FAIL_AFTER")
    with pytest.raises(UserError, match="--resume"):
        run_rl(_cfg(tiny_llama_dir, env_spec, killed))
    resumed = run_rl(_cfg(tiny_llama_dir, env_spec, killed), resume=True)
    assert resumed["status"] == "done"
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in _metrics(killed)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    # a kill after the final checkpoint but before summary.json: --resume writes the same summary
    (out / "summary.json").unlink()
    assert run_rl(_cfg(tiny_llama_dir, env_spec, out), resume=True) == ref


def test_cli_full_ft_with_kl(tiny_llama_dir, env_spec, tmp_path):
    out = tmp_path / "full"
    data, _, reward = env_spec.partition(",reward=")
    rc = main(["rl", "--model", str(tiny_llama_dir), "--env", data, "--reward", reward, "--out", str(out),
               "--full", "--lr", "1e-3", "--steps", "2", "--problems-per-step", "2", "--group-size", "3",
               "--max-new-tokens", "5", "--seed", "1", "kl_coef=0.05", "eval_size=2", "clip_eps=0.2"])
    assert rc == 0
    assert (out / "model" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["lora_rank"] is None
    assert "reward=" in (out / "config.yaml").read_text()


def test_cli_bad_input_is_one_line(tiny_llama_dir, tmp_path, capsys):
    rc = main(["rl", "--model", str(tiny_llama_dir), "--env", "rg:not_a_task", "--out", str(tmp_path / "x"),
               "--rank", "2"])
    assert rc == 2 and "rg:chain_sum" in capsys.readouterr().err
    rc = main(["rl", "--model", str(tiny_llama_dir), "--env", "rg:chain_sum", "--out", str(tmp_path / "x"),
               "--rank", "32"])
    err = capsys.readouterr().err  # rank 32 is larger than this model's k_proj: said before loading
    assert rc == 2 and "rank 32" in err and "k_proj" in err and not (tmp_path / "x").exists()
    rc = main(["rl", "--model", str(tiny_llama_dir), "--env", "rg:chain_sum", "--out", str(tmp_path / "y"),
               "--max-new-tokens", "250", "--rank", "2", "train_size=4", "eval_size=1"])
    assert rc == 2 and "longer than the context" in capsys.readouterr().err
    rc = main(["rl", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "z"), "--group-size", "1"])
    assert rc == 2 and "group_size" in capsys.readouterr().err


def test_eval_batch_rows_fill_a_kv_budget_on_a_gpu_and_stay_at_the_sampler_rows_on_a_cpu():
    import torch
    from transformers import LlamaConfig

    from regretless.rl.evaluate import eval_batch_rows

    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    per_row = 30 * 2 * 3 * (576 // 9) * 107 * 2  # layers, K and V, KV heads, head size, tokens, bf16 bytes
    assert eval_batch_rows(cfg, gpu, 2, 107, 128) == (1 << 31) // per_row == 871
    assert eval_batch_rows(cfg, gpu, 2, 107, 128, kv_budget_bytes=per_row * 7) == 128  # never below the sampler's
    assert eval_batch_rows(cfg, gpu, 4, 107, 16) == (1 << 31) // (2 * per_row)
    assert eval_batch_rows(cfg, cpu, 2, 107, 128) == 128
    cfg.head_dim = 128  # an explicit head size wins over hidden / heads
    assert eval_batch_rows(cfg, gpu, 2, 107, 1) == (1 << 31) // (30 * 2 * 3 * 128 * 107 * 2)
    assert eval_batch_rows(object(), gpu, 2, 107, 9) == 9  # no attention fields: the sampler's rows
