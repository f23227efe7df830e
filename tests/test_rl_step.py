import json
from dataclasses import replace

import pytest
import torch
from conftest import build_model, tiny_llama_config

from regretless.config import RLConfig
from regretless.errors import UserError
from regretless.lora import LoRAConfig, adapters_disabled, apply_lora
from regretless.rl.envs import make_env
from regretless.rl.evaluate import encode_problems, greedy_eval
from regretless.rl.step import policy_gradient_step


@pytest.fixture
def env_files(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(20)))
    (tmp_path / "rewards.py").write_text(
        "def has_e(completion, answer):\n    return float('e' in completion[:6])\n"
        "def boom(completion, answer):\n    raise KeyError('oops')\n"
        "def first_odd(completion, answer):\n    return float(len(completion) > 0 and ord(completion[0]) % 2 == 1)\n")
    return data, tmp_path / "rewards.py"


def _setup(tok, env_files, reward="has_e", **kw):
    data, rewards = env_files
    env = make_env(f"{data},reward={rewards}:{reward}", seed=0, train_size=16, eval_size=4)
    cfg = RLConfig(problems_per_step=4, group_size=4, max_new_tokens=8, micro_batch_size=5, **kw)
    problems, ids, dropped = encode_problems(tok, env.train[:4], 200, "env")
    assert dropped == 0
    return env, cfg, problems, ids


def test_step_fills_grads_and_reports_metrics(tiny_tokenizer, env_files):
    model = build_model(tiny_llama_config())
    apply_lora(model, LoRAConfig(rank=2))
    env, cfg, problems, ids = _setup(tiny_tokenizer, env_files, reward="first_odd", kl_coef=0.1, clip_eps=0.2)
    metrics, batch = policy_gradient_step(model, tiny_tokenizer, env, problems, ids, cfg,
                                          torch.Generator().manual_seed(0),
                                          reference=lambda: adapters_disabled(model))
    assert batch.tokens_N_T.shape[0] == 16
    for k in ("reward", "accuracy", "frac_constant_groups", "response_len", "ratio_mean", "entropy",
              "sample_tokens_per_s", "train_tokens_per_s", "kl", "clip_frac", "frac_no_answer"):
        assert k in metrics
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy, first step
    assert metrics["log_ratio_max"] < 1e-5
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: adapters change nothing yet
    assert 0 < metrics["frac_constant_groups"] < 1  # this seed: some groups carry signal, some none
    # at B = 0 the loss's gradient reaches every B (through A x) and no A (it flows through B = 0)
    lora = [(n, p.grad) for n, p in model.named_parameters() if ".lora_" in n]
    assert lora and all(g is not None for _, g in lora)
    assert all(bool((g != 0).any()) for n, g in lora if ".lora_B" in n)
    assert all(bool((g == 0).all()) for n, g in lora if ".lora_A" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)  # base frozen


def test_all_constant_groups_give_no_gradient(tiny_tokenizer, env_files, tmp_path):
    model = build_model(tiny_llama_config())
    (tmp_path / "const.py").write_text("def one(completion, answer):\n    return 1\n")
    data, _ = env_files
    env = make_env(str(data), seed=0, train_size=8, eval_size=2, reward=f"{tmp_path / 'const.py'}:one")
    cfg = RLConfig(group_size=3, max_new_tokens=4)
    problems, ids, _ = encode_problems(tiny_tokenizer, env.train[:2], 200, "env")
    metrics, _ = policy_gradient_step(model, tiny_tokenizer, env, problems, ids, cfg)
    assert metrics["frac_constant_groups"] == 1.0 and metrics["trained_sequences"] == 0
    assert all(p.grad is None for p in model.parameters())


def test_raising_reward_is_a_user_error(tiny_tokenizer, env_files):
    model = build_model(tiny_llama_config())
    env, cfg, problems, ids = _setup(tiny_tokenizer, env_files, reward="boom")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="boom raised KeyError"):
        policy_gradient_step(model, tiny_tokenizer, env, problems, ids, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_policy_gradient_raises_reward(tiny_tokenizer, env_files):
    """FullFT on a tiny model: a handful of steps make 'e' early in the completion more likely."""
    model = build_model(tiny_llama_config())
    env, cfg, problems, ids = _setup(tiny_tokenizer, env_files)
    cfg = replace(cfg, group_size=8, micro_batch_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    g = torch.Generator().manual_seed(0)
    rewards = []
    for _ in range(14):
        opt.zero_grad()
        metrics, _ = policy_gradient_step(model, tiny_tokenizer, env, problems, ids, cfg, g)
        opt.step()
        rewards.append(metrics["reward"])
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards


WORDS = ("a", "story", "about", "cats", "dogs", "and", "birds", "now", "then")


@torch.no_grad()
def _greedy_reference(model, tok, prompt: list[int], max_new_tokens: int) -> tuple[str, int]:
    """Greedy decoding by full recompute (no cache, no padding): (text, number of tokens)."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        t = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t == tok.eos_token_id:
            break
    return tok.decode(out, skip_special_tokens=True), len(out)


def test_greedy_eval_matches_decoding_by_recompute(tiny_tokenizer, tmp_path):
    """Accuracy, response length and the pairing of problems with completions, against decoding by recompute;
    the reward mixes the completion's first character with the problem's answer, so it varies either way."""
    data = tmp_path / "e.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Tell me {w}", "answer": str(i)})
                              for i, w in enumerate(WORDS)))
    (tmp_path / "mix.py").write_text("def mix(completion, answer):\n"
                                     "    return float((ord((completion or ' ')[0]) + int(answer)) % 2 == 1)\n")
    env = make_env(f"{data},reward={tmp_path / 'mix.py'}:mix", seed=0, train_size=8, eval_size=1)
    problems, ids, _ = encode_problems(tiny_tokenizer, env.train, 200, "eval")
    model = build_model(tiny_llama_config(tie_word_embeddings=False), seed=3)
    res = greedy_eval(model, tiny_tokenizer, env, problems, ids, max_new_tokens=6, batch_size=3)
    ref = [_greedy_reference(model, tiny_tokenizer, p, 6) for p in ids]
    rewards = [env.grade(p, text).reward for p, (text, _) in zip(problems, ref)]
    assert 0 < sum(rewards) < len(rewards)  # some right, some wrong
    assert res.n == len(problems) == 8 and res.accuracy == sum(rewards) / 8
    assert res.response_len == sum(n for _, n in ref) / 8
    again = greedy_eval(model, tiny_tokenizer, env, problems, ids, max_new_tokens=6, batch_size=8)
    assert again == res  # batching changes nothing


def test_prompt_length_check(tiny_tokenizer, env_files):
    env, _, _, _ = _setup(tiny_tokenizer, env_files)
    with pytest.raises(UserError, match="longer than the context"):
        encode_problems(tiny_tokenizer, env.eval, 3, "eval")
