"""The CUDA path of FSDP2 training (`regretless.distributed`) on ONE GPU: the same SFT and RL runs, LoRA and FullFT,
without and with the FSDP2 wrapping (a 1-rank NCCL job, `distributed.active` forced on), bf16 autocast; prints,
per run, both loss curves, the largest difference, the saved weights' dtypes and the checkpoint files.

    python -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/fsdp_cuda_check.py OUT

A 1-rank job checks the mixed-precision policy (bf16 frozen base beside fp32 adapters; FullFT's fp32 masters
gathered in bf16), the trunk-and-head path through the FSDP root, gathered decoding, DCP checkpoints and the
gathered saves on CUDA; it says nothing about scaling. Everything (tokenizer, model, data) is built here, offline.
Results: docs/distributed.md.
"""

import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ["HF_HUB_OFFLINE"] = "1"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from regretless import distributed
from regretless.config import RLConfig, SFTConfig
from regretless.lora import LoRAConfig
from regretless.lora.layer import LoRALinear
from regretless.rl.loop import run_rl
from regretless.train import run_sft

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

out = Path(sys.argv[1])
A = out / "assets"
A.mkdir(parents=True, exist_ok=True)
rows = [[{"role": "user", "content": f"What is {i} plus one?"}, {"role": "assistant", "content": f"It is {i + 1}."}]
        for i in range(200)]
(A / "chat.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
(A / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) + "\n"
                                         for i in range(64)))
(A / "rw.py").write_text('def has_a(completion, answer):\n    return float("a" in completion)\n')
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator([m["content"] for r in rows for m in r] * 4, trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
tok.chat_template = CHATML
model_dir = out / "model"
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2,
                  pad_token_id=0, bos_token_id=None)
AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir)
tok.save_pretrained(model_dir)

seen = set()
orig = LoRALinear.forward


def spy(self, x):
    seen.add((str(self.base_layer.weight.dtype), str(self.lora_A.dtype), type(self.lora_A).__name__,
              str(torch.get_autocast_dtype("cuda")) if torch.is_autocast_enabled("cuda") else "no-autocast"))
    return orig(self, x)


LoRALinear.forward = spy

common = {"model": str(model_dir), "device": "cuda", "seed": 1}
runs = {
    "sft_lora": (run_sft, SFTConfig(**common, data=str(A / "chat.jsonl"), lora=LoRAConfig(rank=8), lr=2e-3, steps=12,
                                    batch_size=8, micro_batch_size=4, seq_len=64, eval_size=16, eval_every=6,
                                    save_every=6)),
    "sft_full": (run_sft, SFTConfig(**common, data=str(A / "chat.jsonl"), lora=None, lr=3e-4, steps=12, batch_size=8,
                                    seq_len=64, eval_size=16, eval_every=6, save_every=6)),
    "rl_lora": (run_rl, RLConfig(**common, env=f"{A / 'prompts.jsonl'},reward={A / 'rw.py'}:has_a", stop=("e",),
                                 lora=LoRAConfig(rank=4), lr=1e-3, steps=4, problems_per_step=4, group_size=4,
                                 max_new_tokens=12, train_size=32, eval_size=8, eval_every=2, save_every=2)),
    "rl_full": (run_rl, RLConfig(**common, env=f"{A / 'prompts.jsonl'},reward={A / 'rw.py'}:has_a", stop=("e",),
                                 lora=None, lr=1e-5, steps=4, problems_per_step=4, group_size=4, max_new_tokens=12,
                                 train_size=32, eval_size=8, eval_every=2, save_every=2, kl_coef=0.05)),
}
ok = set(runs)


def attempt(name, fn, c):
    try:
        fn(c)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok.discard(name)


for name, (fn, c) in runs.items():
    attempt(name, fn, replace(c, out=str(out / "plain" / name)))
print("plain dtypes seen in LoRA forward:", sorted(seen), flush=True)
seen.clear()

torch.distributed.init_process_group("cpu:gloo,cuda:nccl")
distributed.active = lambda: torch.distributed.is_initialized()
for name, (fn, c) in runs.items():
    attempt(name, fn, replace(c, out=str(out / "fsdp" / name)))
print("fsdp dtypes seen in LoRA forward:", sorted(seen), flush=True)


def metrics(p):
    return [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]


report = {}
for name in sorted(ok):
    a, b = metrics(out / "plain" / name), metrics(out / "fsdp" / name)
    key = "loss" if name.startswith("sft") else "pg_loss"
    pairs = [(x[key], y[key]) for x, y in zip(a, b) if key in x]
    ev = "eval_loss" if name.startswith("sft") else "eval_accuracy"
    evs = [(x[ev], y[ev]) for x, y in zip(a, b) if ev in x]
    f = "adapter/adapter_model.safetensors" if "lora" in name else "model/model.safetensors"
    wa, wb = load_file(out / "plain" / name / f), load_file(out / "fsdp" / name / f)
    report[name] = {"loss_plain": [round(x, 5) for x, _ in pairs], "loss_fsdp": [round(y, 5) for _, y in pairs],
                    "max_abs_loss_diff": max(abs(x - y) for x, y in pairs), "eval": evs,
                    "weights_same_keys": sorted(wa) == sorted(wb),
                    "weights_dtypes": sorted({str(v.dtype) for v in wb.values()}),
                    "max_abs_weight_diff": max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa),
                    "ckpt": sorted(p.name for p in (out / "fsdp" / name / "checkpoints").rglob("*") if p.is_file())}
for name, r in report.items():
    print(name, json.dumps(r), flush=True)
(out / "report.json").write_text(json.dumps(report, indent=1))
torch.distributed.destroy_process_group()
