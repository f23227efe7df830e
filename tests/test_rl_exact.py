"""RL math checked against independent references, each test failing on one known mutation:
the learner forward with dropout (train mode), sampler log-probs of the untempered policy, the KL term skipped on
constant-reward groups, and the k3 penalty's gradient direction (exact enumeration)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, tiny_llama_config

from regretless.config import RLConfig
from regretless.lora import LoRAConfig, adapters_disabled, apply_lora
from regretless.rl.envs import make_env
from regretless.rl.evaluate import encode_problems
from regretless.rl.loss import kl_k3
from regretless.rl.sampling import _draw, completion_logprobs, sample, sampling_logprobs
from regretless.rl.step import policy_gradient_step


@pytest.fixture
def env_files(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) for i in range(20)))
    (tmp_path / "rewards.py").write_text(
        "def first_odd(completion, answer):\n    return float(len(completion) > 0 and ord(completion[0]) % 2 == 1)\n"
        "def one(completion, answer):\n    return 1.0\n")
    return data, tmp_path / "rewards.py"


def lora_model(seed: int = 0, **config):
    """A tiny Llama with LoRA whose B is random (so adapters change the policy)."""
    model = build_model(tiny_llama_config(**config), seed=seed)
    apply_lora(model, LoRAConfig(rank=2))
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def setup(tok, env_files, reward, **kw):
    data, rewards = env_files
    env = make_env(f"{data},reward={rewards}:{reward}", seed=0, train_size=16, eval_size=4)
    problems, ids, _ = encode_problems(tok, env.train[:4], 200, "env")
    cfg = RLConfig(problems_per_step=4, group_size=4, max_new_tokens=8, micro_batch_size=8, **kw)
    return env, cfg, problems, ids


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.eval()
    loss_fn().backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out


def test_learner_forward_has_no_dropout_and_the_gradient_is_the_policy_gradient(tiny_tokenizer, env_files):
    """With attention dropout 0.5 in the config, the step's gradient equals −Σ A·∇log p / N computed in eval mode
    (on-policy the ratio is 1, so ∇ratio = ∇log p), and the learner reproduces the sampler's log-probs."""
    model = lora_model(attention_dropout=0.5)
    env, cfg, problems, ids = setup(tiny_tokenizer, env_files, "first_odd")
    pad = tiny_tokenizer.pad_token_id
    m, batch = policy_gradient_step(model, tiny_tokenizer, env, problems, ids, cfg, torch.Generator().manual_seed(0))
    assert 0 < m["frac_constant_groups"] < 1  # this seed gives groups with signal
    assert m["log_ratio_max"] < 1e-5 and m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    got = grads(model)

    rewards = torch.tensor([env.grade(problems[i], t).reward for i, t in zip(batch.prompt_index_N.tolist(),
                                                                               batch.texts)]).view(4, 4)
    adv_N = (rewards - rewards.mean(1, keepdim=True)).flatten()
    rows = [ids[i] for i in batch.prompt_index_N.tolist()]

    def loss():
        logp = completion_logprobs(model, rows, batch.tokens_N_T, batch.mask_N_T, pad)
        return -(adv_N[:, None] * logp * batch.mask_N_T).sum() / batch.num_tokens

    want = reference_grads(model, loss)
    assert set(got) == set(want) and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def reference_logq(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Independent nucleus: keep the k most likely tokens, k the first count whose mass reaches top_p."""
    probs = torch.softmax(logits_V.double() / temperature, -1)
    p_sorted, idx = probs.sort(descending=True)
    k = int((p_sorted.cumsum(0) < top_p).sum()) + 1
    q = torch.zeros_like(probs)
    q[idx[:k]] = p_sorted[:k] / p_sorted[:k].sum()
    return q.log()


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.8), (1.6, 1.0)])
def test_sampler_logprobs_are_those_of_the_distribution_sampled(tiny_tokenizer, temperature, top_p):
    model = lora_model()
    prompts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)[
        "input_ids"] for c in ("What is 2 + 3?", "hi")]
    batch = sample(model, tiny_tokenizer, prompts, n=3, max_new_tokens=6, temperature=temperature, top_p=top_p,
                   generator=torch.Generator().manual_seed(0), eos_token_ids=[])
    checked = 0
    with torch.no_grad():
        for row in range(batch.tokens_N_T.shape[0]):
            ids = list(prompts[int(batch.prompt_index_N[row])])
            for t in range(int(batch.lengths_N[row])):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]  # full recompute
                tok = int(batch.tokens_N_T[row, t])
                want = reference_logq(logits, temperature, top_p)[tok]
                assert torch.isfinite(want)  # drawn from inside the nucleus
                assert abs(float(batch.logp_N_T[row, t]) - float(want)) < 1e-4, (row, t)
                ids.append(tok)
                checked += 1
    assert checked == 36


def test_draws_follow_the_recorded_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    logq = sampling_logprobs(logits[None], 0.8, 0.9)[0]
    torch.testing.assert_close(logq.exp().double(), reference_logq(logits, 0.8, 0.9).exp(), atol=1e-6, rtol=0)
    n = 40_000
    tok, logq_tok = _draw(logits.repeat(n, 1), 0.8, 0.9, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=6).double() / n
    assert (freq[logq.isinf()] == 0).all() and logq.isinf().sum() == 3  # 3 tokens outside the nucleus
    torch.testing.assert_close(freq, logq.exp().double(), atol=0.01, rtol=0)
    torch.testing.assert_close(logq_tok, logq[tok])


def test_kl_term_applies_to_every_group(tiny_tokenizer, env_files):
    """Every reward the same (all groups constant, no policy-gradient signal): the KL penalty still trains, with the
    gradient of kl_coef · Σ k3 / N over all sampled tokens."""
    model = lora_model()
    env, cfg, problems, ids = setup(tiny_tokenizer, env_files, "one", kl_coef=0.5)
    pad = tiny_tokenizer.pad_token_id
    m, batch = policy_gradient_step(model, tiny_tokenizer, env, problems, ids, cfg, torch.Generator().manual_seed(0),
                                    reference=lambda: adapters_disabled(model))
    assert m["frac_constant_groups"] == 1.0 and m["trained_sequences"] == 16 and m["kl"] > 0
    got = grads(model)
    rows = [ids[i] for i in batch.prompt_index_N.tolist()]
    with torch.no_grad(), adapters_disabled(model):
        model.eval()
        logp_ref = completion_logprobs(model, rows, batch.tokens_N_T, batch.mask_N_T, pad)

    def loss():
        logp = completion_logprobs(model, rows, batch.tokens_N_T, batch.mask_N_T, pad)
        d = logp_ref - logp
        return 0.5 * ((d.exp() - d - 1) * batch.mask_N_T).sum() / batch.num_tokens

    want = reference_grads(model, loss)
    assert want and any(g.abs().sum() > 0 for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def test_k3_gradient_is_that_of_the_forward_kl():
    """Exact enumeration over a 6-token vocabulary: E_{x~π}[k3(x)] = KL(π ‖ ref) and E_{x~π}[∇k3(x)] (samples
    held fixed, as in the loss) = ∇ KL(ref ‖ π), which differs from ∇ KL(π ‖ ref)."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7, -0.4], dtype=torch.float64, requires_grad=True)
    logp_ref = torch.log_softmax(torch.tensor([1.0, 0.0, 0.5, -0.5, 0.2, 1.5], dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp()
    k3 = kl_k3(logp, logp_ref)  # one value per token x
    kl_new_ref = (pi * (logp - logp_ref)).sum()
    kl_ref_new = (logp_ref.exp() * (logp_ref - logp)).sum()
    assert (pi * k3).sum().item() == pytest.approx(kl_new_ref.item(), rel=1e-12)
    g_k3, = torch.autograd.grad((pi.detach() * k3).sum(), theta, retain_graph=True)
    g_fwd, = torch.autograd.grad(kl_ref_new, theta, retain_graph=True)
    g_rev, = torch.autograd.grad(kl_new_ref, theta)
    torch.testing.assert_close(g_k3, g_fwd, atol=1e-12, rtol=0)
    assert (g_k3 - g_rev).abs().max() > 0.05
