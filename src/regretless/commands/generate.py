"""Try a trained model: reply to a prompt with a run's model (base + adapter) or any model folder, streamed.

examples:
  regretless generate --run runs/sft --prompt "How are you?"
  echo "What is 12 + 30?" | regretless generate --run runs/rl
  regretless generate --model merged/ --prompt "Tell me a joke" --temperature 0.7 --seed 1
  regretless generate --run runs/sft --system "You are terse." --prompt "Hi" --max-new-tokens 32

--run DIR loads DIR's base model with DIR/adapter (LoRA) or DIR/model (FullFT); --model M loads M as it is
(a merged folder, a local HF folder, a .gguf file or a built-in name). The prompt comes from --prompt or, without
it, from standard input. It is sent as a user turn through the tokenizer's chat template (plain text when the
tokenizer has none, or with --raw). The reply is streamed to stdout as it is generated. Greedy by default
(--temperature 0); --temperature T > 0 samples (with --top-p and --seed).
"""

from __future__ import annotations

import argparse
import sys

from regretless.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder (regretless sft|rl --out DIR)")
    src.add_argument("--model", help="a model folder (e.g. from merge), a .gguf file or a built-in name")
    p.add_argument("--prompt", help="the user's message (default: read from standard input)")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    if not args.temperature >= 0:
        raise UserError(f"--temperature {args.temperature}: expected a number >= 0 (0 is greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: expected a number in (0, 1]")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif sys.stdin is None or sys.stdin.isatty():
        raise UserError("--prompt: no prompt; give --prompt TEXT or pipe the prompt on standard input")
    else:
        text = sys.stdin.read()
    if not text.strip():
        raise UserError("--prompt: the prompt is empty")
    return text.strip("\n")


def load(args: argparse.Namespace):
    """(model, tokenizer, description) for the run folder or model of `args`, in eval mode on the device."""
    import torch

    from regretless.commands._runs import from_run, resolve_base
    from regretless.models import default_device, load_model

    device = default_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model is not None:
        model, tok, _ = load_model(str(resolve_base(args.model)), device=device, dtype=dtype, quiet=True)
        return model, tok, str(args.model)
    found = from_run(args.run)
    if found.adapter is None:
        model, tok, _ = load_model(found.model, device=device, dtype=dtype, quiet=True)
        return model, tok, f"{found.model} (FullFT)"
    from regretless.lora import load_adapter, read_adapter

    read_adapter(found.adapter)  # a corrupt adapter fails before the model loads
    model, tok, _ = load_model(str(resolve_base(found.base)), device=device, dtype=dtype, quiet=True)
    cfg = load_adapter(model, found.adapter)
    model.eval()
    return model, tok, f"{found.base} + {found.adapter} (LoRA r={cfg.rank})"


def encode(tok, prompt: str, system: str | None, raw: bool) -> list[int]:
    if raw or not getattr(tok, "chat_template", None):
        text = f"{system}\n\n{prompt}" if system else prompt
        return list(tok(text)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def generate(model, tok, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, streamer=None) -> list[int]:
    """The reply's token ids (without the prompt); greedy at temperature 0. `streamer` gets tokens as they come."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    torch.manual_seed(seed)
    eos = [t for t in {tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if t is not None]
    flat = sorted({e for t in eos for e in (t if isinstance(t, list) else [t])})
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             eos_token_id=flat or None, pad_token_id=tok.pad_token_id, streamer=streamer,
                             **sampling)
    return out[0, input_ids.shape[1]:].tolist()


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    check_args(args)
    prompt = read_prompt(args)
    model, tok, what = load(args)
    print(f"[regretless] {what}; {'greedy' if args.temperature == 0 else f'sampling at T={args.temperature:g}'}",
          file=sys.stderr, flush=True)
    ids = encode(tok, prompt, args.system, args.raw)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    generate(model, tok, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, streamer)
    sys.stdout.flush()
    return 0
