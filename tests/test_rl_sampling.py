import pytest
import torch
from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

from regretless.rl.sampling import completion_logprobs, sample

MESSAGES = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "hi"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you today?"}]]


def _prompts(tok):
    return [tok.apply_chat_template(m, add_generation_prompt=True)["input_ids"] for m in MESSAGES]


@torch.no_grad()
def _greedy_by_recompute(model, prompt, steps):
    """Reference: one unpadded prompt, the whole sequence recomputed at every step, no cache. -> (tokens, entropy
    of the temperature-1 distribution at each step)."""
    ids, toks, ents = list(prompt), [], []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        t = int(logits.argmax())
        toks.append(t)
        logp = torch.log_softmax(logits, -1)
        ents.append(float(-(logp.exp() * logp).sum()))
        ids.append(t)
    return toks, ents


def test_kv_cache_greedy_matches_full_recompute(tiny_tokenizer):
    for cfg in (tiny_llama_config(), tiny_qwen3_moe_config()):
        model = build_model(cfg)
        prompts = _prompts(tiny_tokenizer)
        batch = sample(model, tiny_tokenizer, prompts, n=2, max_new_tokens=10, temperature=0.0,
                       eos_token_ids=[])
        assert batch.tokens_N_T.shape == (6, 10) and batch.mask_N_T.all()
        assert (batch.logp_N_T == 0).all()  # greedy draws from a point mass: log q = 0
        for i, p in enumerate(prompts):
            toks, ents = _greedy_by_recompute(model, p, 10)
            for row in (2 * i, 2 * i + 1):
                assert batch.tokens_N_T[row].tolist() == toks
                assert torch.allclose(batch.entropy_N_T[row], torch.tensor(ents), atol=1e-5)


def test_eos_ends_rows_and_others_continue(tiny_tokenizer, tiny_llama):
    prompts = _prompts(tiny_tokenizer)
    ref = [_greedy_by_recompute(tiny_llama, p, 8)[0] for p in prompts]
    eos = ref[0][2]  # row 0 stops at step 3 (or earlier if the token repeats)
    batch = sample(tiny_llama, tiny_tokenizer, prompts, n=1, max_new_tokens=8, temperature=0.0,
                   eos_token_ids=[eos])
    for row, toks in enumerate(ref):
        end = toks.index(eos) + 1 if eos in toks else 8
        assert batch.lengths_N[row] == end and bool(batch.stopped_N[row]) == (eos in toks)
        assert batch.tokens_N_T[row, :end].tolist() == toks[:end]
        assert not batch.mask_N_T[row, end:].any() and (batch.logp_N_T[row, end:] == 0).all()
        assert (batch.tokens_N_T[row, end:] == tiny_tokenizer.pad_token_id).all()


def test_stop_string_ends_row_and_is_cut_from_text(tiny_tokenizer, tiny_llama):
    prompts = _prompts(tiny_tokenizer)[:1]
    free = sample(tiny_llama, tiny_tokenizer, prompts, n=1, max_new_tokens=12, temperature=0.0,
                  eos_token_ids=[])
    text = free.texts[0]
    stop = text[4:7]
    assert stop
    batch = sample(tiny_llama, tiny_tokenizer, prompts, n=1, max_new_tokens=12, temperature=0.0,
                   eos_token_ids=[], stop=[stop])
    assert batch.stopped_N[0] and batch.lengths_N[0] < 12
    assert batch.texts[0] == text[:text.find(stop)]


def test_sampled_logprobs_match_fresh_forward(tiny_tokenizer, tiny_llama):
    prompts = _prompts(tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    batch = sample(tiny_llama, tiny_tokenizer, prompts, n=4, max_new_tokens=16, temperature=1.0, generator=g,
                   eos_token_ids=[tiny_tokenizer.eos_token_id, 100, 200, 300])
    assert batch.tokens_N_T.shape[0] == 12 and (batch.lengths_N >= 1).all()
    rows = [prompts[i] for i in batch.prompt_index_N.tolist()]
    logp_N_T = completion_logprobs(tiny_llama, rows, batch.tokens_N_T, batch.mask_N_T,
                                   tiny_tokenizer.pad_token_id)
    assert torch.allclose(logp_N_T, batch.logp_N_T, atol=1e-5)
    assert logp_N_T.requires_grad
    assert (batch.entropy_N_T[batch.mask_N_T] > 0).all()


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_tokenizer, tiny_llama):
    prompts = _prompts(tiny_tokenizer)
    def draw(seed):
        return sample(tiny_llama, tiny_tokenizer, prompts, n=3, max_new_tokens=6,
                      generator=torch.Generator().manual_seed(seed))

    a, b = draw(1), draw(1)
    assert torch.equal(a.tokens_N_T, b.tokens_N_T)
    greedy = sample(tiny_llama, tiny_tokenizer, prompts, n=2, max_new_tokens=6, temperature=0.0)
    nucleus = sample(tiny_llama, tiny_tokenizer, prompts, n=2, max_new_tokens=6, top_p=1e-6,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens_N_T, nucleus.tokens_N_T)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_group_logprobs_share_the_prompt_and_match_per_row(family):
    """Running each prompt once (KV cache repeated for its G completions) gives the same log-probs and the same
    LoRA gradients as running every row's prompt separately."""
    from conftest import build_model, tiny_llama_config, tiny_qwen3_moe_config

    from regretless.lora import LoRAConfig, apply_lora
    from regretless.rl.sampling import completion_logprobs, group_completion_logprobs

    model = build_model(tiny_llama_config() if family == "llama" else tiny_qwen3_moe_config())
    apply_lora(model, LoRAConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    prompts, G, T = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]], 3, 6
    tokens = torch.randint(3, 500, (len(prompts) * G, T), generator=g)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (len(prompts) * G,), generator=g)[:, None]
    per_row = completion_logprobs(model, [p for p in prompts for _ in range(G)], tokens, mask, 0)
    per_row.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared = group_completion_logprobs(model, prompts, G, tokens, mask, 0)
    shared.sum().backward()
    assert torch.allclose(per_row, shared, atol=1e-5)
    assert (shared[~mask] == 0).all()
    for n, p in model.named_parameters():
        if n in want:
            assert torch.allclose(p.grad, want[n], atol=1e-5), n
