"""Recommend LR, rank, alpha, targets, batch size, MoE rank and a capacity verdict for a model, with reasons.

examples:
  regretless recommend                                      # the built-in default model (smollm2-135m)
  regretless recommend --model Llama-3.1-8B --tokens 20000000 --batch-size 64
  regretless recommend --model Qwen3-8B --task rl --episodes 320000
  regretless recommend --model path/to/model --dataset data.jsonl --json

--model is a local model folder (its config.json; with --dataset also its tokenizer and weights), a built-in
name, or a name from the table of known models (`regretless.known_models`). Each line gives a value and a one-line reason from the paper.
The model is built on the meta device, so counts for a 70B model take a second and no memory.
With --dataset the trained tokens are counted with the model's tokenizer, and bits/token is measured from the
base model's own loss on a few batches (unless --bits-per-token is given); --tokens assumes 1 bit/token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from regretless import recipe
from regretless.errors import UserError
from regretless.lora.config import LoRAConfig

DEFAULT_SFT_RANK = 256  # "256 is safe for post-training-size SFT"
DEFAULT_RL_RANK = recipe.RL_RANK  # "1 suffices for RL"
DEFAULT_MODEL = "smollm2-135m"  # the trainers' default model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local model folder, built-in or known model name (e.g. Qwen3-8B; default {DEFAULT_MODEL})")
    p.add_argument("--method", choices=recipe.METHODS, default="lora")
    p.add_argument("--task", choices=recipe.TASKS, default="sft")
    p.add_argument("--steps", type=int, help="optimizer steps of the run (short runs get a higher LoRA LR)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", help="SFT data (file or built-in name): count tokens, measure bits/token")
    data.add_argument("--tokens", type=int, help="trained (completion) tokens in one epoch of SFT data")
    data.add_argument("--episodes", type=int, help="RL episodes (sampled completions) in the whole run")
    p.add_argument("--bits-per-token", type=float, help="information per trained token (default 1, or measured)")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    p.add_argument("--rank", type=int, help="LoRA rank (default: what the data needs, else 256 SFT / 1 RL)")
    p.add_argument("--seq-len", type=int, default=2048, help="with --dataset: tokens per example at most")
    p.add_argument("--nll-batches", type=int, default=4, help="with --dataset: batches of 4 for measuring NLL")
    p.add_argument("--json", action="store_true", help="print the recommendations as JSON")


def load_model_config(model: str) -> tuple[Any, str, str | None]:
    """(transformers config, display name, local folder or None). Built-in names read their cached folder, or,
    before it exists, the known shapes (tiny-base: regretless.pretrain's; nothing is built or converted)."""
    from regretless import assets

    if model in assets.BUILTIN_MODELS:
        if assets.is_prepared(model):
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(assets.model_dir(model)), model, str(assets.model_dir(model))
        if model == "tiny-base":
            from transformers import LlamaConfig

            from regretless import pretrain

            return LlamaConfig(vocab_size=pretrain.VOCAB, **pretrain.SHAPE), f"{model} (not built yet)", None
    if os.path.isdir(model):
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserError(f"--model {model}: folder has no config.json")
        try:
            return AutoConfig.from_pretrained(model), os.path.basename(os.path.normpath(model)), model
        except (ValueError, OSError) as e:
            raise UserError(f"--model {model}/config.json: cannot read it ({str(e).splitlines()[0]})") from None
    from regretless.known_models import canonical_name, known_config

    cfg = known_config(model)
    return cfg, canonical_name(model) or model, None


def meta_model(cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise UserError(f"model type {cfg.model_type!r}: not a causal LM transformers can build "
                        f"({str(e).splitlines()[0]})") from None


def measure_dataset(path: str, spec: str, seq_len: int, n_batches: int, measure: bool) -> dict[str, Any]:
    """Trained tokens of one epoch of `spec`, and the base model's mean NLL on its first `n_batches` batches."""
    try:
        from regretless.data import batches, load_examples, tokenize
    except ImportError:
        raise UserError("--dataset: the data module is not available; pass --tokens instead") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    examples = load_examples(spec, seed=0)
    tokenized, stats = tokenize(examples, tok, seq_len=seq_len, source=spec)
    out: dict[str, Any] = {"examples": stats.kept, "tokens": stats.loss_tokens, "summary": stats.summary()}
    if not measure:
        return out
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for k, batch in enumerate(batches(tokenized, 4, seq_len, False, pad, 0, 0)):
            if k >= n_batches:
                break
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            mask = labels != -100
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            nll_sum += float(-(picked * mask).sum())
            count += int(mask.sum())
    out["nll"] = nll_sum / max(count, 1)
    out["nll_tokens"] = count
    return out


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def recommend(args: argparse.Namespace) -> dict[str, Any]:
    """All recommendations as {"model": ..., "items": {key: {"value": ..., "reason": ...}}}."""
    from regretless.counts import count_params, flops_per_token

    if args.steps is not None:
        recipe.check_positive_int("--steps", args.steps)
    if args.batch_size is not None:
        recipe.check_positive_int("--batch-size", args.batch_size)
    if args.rank is not None:
        recipe.check_positive_int("--rank", args.rank)
    if args.bits_per_token is not None:
        recipe.check_positive("--bits-per-token", args.bits_per_token)
    if args.tokens is not None:
        recipe.check_positive_int("--tokens", args.tokens)
    if args.episodes is not None:
        recipe.check_positive_int("--episodes", args.episodes)
    if args.task == "rl" and (args.tokens is not None or args.dataset):
        raise UserError("--task rl: RL information is counted in episodes; pass --episodes, not --tokens/--dataset")
    if args.task == "sft" and args.episodes is not None:
        raise UserError("--episodes is for --task rl; SFT information is counted in tokens (--tokens/--dataset)")

    cfg, name, local = load_model_config(args.model)
    text = cfg.get_text_config()
    items: dict[str, dict[str, Any]] = {}

    def put(key: str, value: Any, reason: str) -> None:
        items[key] = {"value": value, "reason": reason}

    # ---- data: trained tokens / episodes and bits per token
    steps, tokens, bits_per_token = args.steps, args.tokens, args.bits_per_token
    if args.dataset:
        if not local:
            raise UserError("--dataset needs a local model folder (its tokenizer and weights); with a known model "
                            "name pass --tokens")
        recipe.check_positive_int("--seq-len", args.seq_len)
        recipe.check_positive_int("--nll-batches", args.nll_batches)
        d = measure_dataset(local, args.dataset, args.seq_len, args.nll_batches, bits_per_token is None)
        tokens = d["tokens"]
        if bits_per_token is None:
            bits_per_token = recipe.bits_per_token_from_nll(d["nll"])
            put("bits_per_token", bits_per_token,
                f"measured: base model's mean NLL {d['nll']:.3f} nats / ln 2 on {d['nll_tokens']} trained tokens "
                "(the first-epoch log-loss is the data's description length)")
        if steps is None and args.batch_size is not None:
            steps = math.ceil(d["examples"] / args.batch_size)
            put("steps", steps, f"one epoch of {d['examples']} examples at batch {args.batch_size} (the paper's "
                                "protocol: SFT for one epoch)")
    if tokens is not None and "bits_per_token" not in items:
        if bits_per_token is None:
            bits_per_token = recipe.BITS_PER_TOKEN
            put("bits_per_token", bits_per_token, "assumed: LLM data is roughly 1 bit per token (an overestimate "
                                                  "of what must be learned; --dataset measures it)")
        else:
            put("bits_per_token", bits_per_token, "given")
    info = None
    if tokens is not None:
        info = recipe.information_bits("sft", tokens=tokens, bits_per_token=bits_per_token)
        put("information_bits", info, f"{_fmt_count(tokens)} trained tokens x {bits_per_token:.3g} bits/token")
    elif args.episodes is not None:
        info = recipe.information_bits("rl", episodes=args.episodes)
        put("information_bits", info, f"{_fmt_count(args.episodes)} episodes x 1 bit: policy gradient gives "
                                      "O(1) bits per episode")

    # ---- learning rates
    full_lr, full_why = recipe.default_lr(cfg, "full", steps, task=args.task)
    lora_lr, lora_why = recipe.default_lr(cfg, "lora", steps, task=args.task)
    lrs = [("lora_lr", lora_lr, lora_why), ("full_lr", full_lr, full_why)]
    for key, lr, why in lrs if args.method == "lora" else lrs[::-1]:
        put(key, lr, why)

    model = meta_model(cfg)
    top_k = getattr(text, "num_experts_per_tok", None) if getattr(text, "num_experts", None) else None

    def lora_cfg(rank: int) -> LoRAConfig:
        expert = recipe.moe_expert_rank(rank, top_k) if top_k else None
        return LoRAConfig(rank=rank, alpha=recipe.ALPHA, targets="all", expert_rank=expert)

    full_params = count_params(model, None)
    full_flops = flops_per_token(model, None)
    if args.method == "full":
        put("full_params", full_params, "FullFT trains every parameter")
        put("flops_per_token", {"full": full_flops}, "training FLOPs of the matmuls (forward + backward), "
                                                       "attention scores excluded")
        if info is not None:
            put("capacity", None, "FullFT: no adapter bottleneck; the verdict applies to LoRA (--method lora)")
    else:
        def lora_total(r: int) -> int:
            return int(count_params(model, lora_cfg(r))["total"])

        def valid(r: int) -> bool:  # the injector refuses ranks above a target's smallest dimension
            try:
                count_params(model, lora_cfg(r))
            except UserError:
                return False
            return True

        ranks = [r for r in recipe.POW2_RANKS if valid(r)]
        top = ranks[-1] if ranks else 1
        smallest = None
        if info is not None and ranks:
            smallest = recipe.smallest_passing_rank(info, lora_total, ranks=ranks, min_margin=2.0)
        if args.rank is not None:
            rank, why = args.rank, "given"
        elif smallest is not None:
            rank, why = smallest, ("smallest power of two whose capacity has a 2x margin over the data: rank as "
                                   "high as the data needs")
        elif info is not None:
            rank, why = top, f"no rank up to {top} fits the data with a 2x margin: consider FullFT"
        elif args.task == "rl":
            rank, why = DEFAULT_RL_RANK, "RL: even rank-1 LoRA matches FullFT (policy gradient learns ~1 bit/episode)"
        elif top < DEFAULT_SFT_RANK:
            rank, why = top, (f"256 is safe for post-training-size SFT, capped at {top}: the largest power of two "
                              "this model's matrices allow (rank <= the smallest dimension of an adapted matrix)")
        else:
            rank, why = DEFAULT_SFT_RANK, ("256 is safe for post-training-size SFT; pass --tokens or --dataset to "
                                           "size it to the data")
        put("rank", rank, why)
        put("alpha", recipe.ALPHA, "alpha = 32 in every experiment of the paper; the optimal LR barely depends "
                                   "on rank under the 1/r scale")
        put("scale", recipe.lora_scale(rank), f"alpha / r = 32 / {rank}")
        put("targets", "all", "all weight matrices (MLP / MoE experts and attention): attention-only is clearly "
                              "worse than MLP-only, even at matched parameters")
        if top_k:
            put("moe_expert_rank", recipe.moe_expert_rank(rank, top_k),
                f"rank {rank} // {top_k} active experts (top-k), at least 1: each expert's LoRA:FullFT parameter "
                "ratio matches the dense layers'; the router is not adapted")
        params = count_params(model, lora_cfg(rank))
        share = params["total"] / max(full_params["total"], 1)
        groups = ", ".join(f"{g} {_fmt_count(v)}" for g, v in params.items() if g not in ("total", "model_total"))
        put("lora_params", dict(params), f"{groups}; total {_fmt_count(params['total'])} = {share:.2%} of the "
                                         f"{_fmt_count(full_params['total'])} FullFT trains")
        lora_flops = flops_per_token(model, lora_cfg(rank))
        ratio = lora_flops / full_flops
        put("flops_per_token", {"lora": lora_flops, "full": full_flops, "ratio": ratio},
            f"LoRA {lora_flops:.3g} vs FullFT {full_flops:.3g} training FLOPs/token ({ratio:.2f}x): per NxN "
            "matrix LoRA costs 2N^2 + 6Nr multiply-adds vs 3N^2, slightly more than 2/3 (attention aside)")
        if info is not None:
            cap = recipe.capacity_check(info, int(params["total"]))
            put("capacity", {"verdict": cap.verdict, "margin": cap.margin, "capacity_bits": cap.capacity_bits,
                             "information_bits": cap.info_bits}, cap.reason)
            passing = recipe.smallest_passing_rank(info, lora_total, ranks=ranks, min_margin=1.0) if ranks else None
            put("smallest_passing_rank", passing,
                "smallest power of two with capacity >= the data's bits" if passing else f"none up to {top}")
        else:
            put("capacity", None, "give --tokens, --dataset (SFT) or --episodes (RL) for a capacity verdict")

    level, why = recipe.batch_size_advice(args.batch_size, args.method)
    put("batch_size", args.batch_size if args.batch_size is not None else f"< {recipe.MAX_BATCH}",
        f"{level}: {why}")
    family = recipe.model_family(cfg)[0]
    return {
        "warning": recipe.lr_warning(cfg),
        "model": name,
        "model_type": text.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "family": family,
        "method": args.method,
        "task": args.task,
        "steps": steps,
        "items": items,
    }


def _value_str(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "lora_params":
        return _fmt_count(v["total"])
    if key == "full_params":
        return _fmt_count(v["total"])
    if key == "flops_per_token":
        return f"{v['ratio']:.2f}x" if "ratio" in v else f"{v['full']:.3g}"
    if key == "capacity":
        return f"{v['verdict']} {v['margin']:.3g}x"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return _fmt_count(v)
    return str(v)


def run(args: argparse.Namespace) -> int:
    rec = recommend(args)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    method = "LoRA" if rec["method"] == "lora" else "FullFT"
    print(f"{rec['model']} ({rec['model_type']}, hidden {rec['hidden_size']}, {rec['num_hidden_layers']} layers)"
          f" - {method} {rec['task'].upper()}")
    warning = rec["warning"]
    if warning:
        print(f"  {warning}")
    for key, item in rec["items"].items():
        reason = item["reason"].removeprefix(f"{warning} ") if warning else item["reason"]
        print(f"  {key:<22} {_value_str(key, item['value']):<12} {reason}")
    return 0
