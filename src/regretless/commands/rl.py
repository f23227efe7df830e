"""RL with verifiable rewards (group-mean policy gradient), LoRA (default, rank 1) or FullFT (--full).

examples:
  regretless rl --env rg:chain_sum --out runs/rl
  regretless rl --env "rg:chain_sum,max_terms=2,max_digits=2" --steps 36 --max-new-tokens 40 --out runs/rl2
  regretless rl --env problems.jsonl --reward my_rewards.py:score --out runs/custom
  regretless rl --env rg:gsm_symbolic --full --lr 1e-6 --out runs/rl-full

ENV is rg:<task>[,key=value...] (a reasoning-gym task and its settings) or a JSONL file of
{"prompt", "answer"} lines. --reward module:function (or path/to/file.py:function) replaces the answer-match
reward; it is called as fn(completion, answer) -> float and stored in the config as ENV,reward=REF.
Defaults follow the recipe's RL advice: rank 1 ("1 suffices for RL") and its RL learning rate (printed).
"""

from __future__ import annotations

from dataclasses import replace

from regretless.commands._train_args import add_common, build_config
from regretless.config import RLConfig

FLAGS = {"env": "env", "steps": "steps", "problems_per_step": "problems_per_step", "group_size": "group_size",
         "max_new_tokens": "max_new_tokens", "temperature": "temperature", "eval_every": "eval_every",
         "save_every": "save_every", "lr_schedule": "lr_schedule"}


def add_arguments(p) -> None:
    add_common(p)
    p.add_argument("--env", help="rg:<task> (e.g. rg:chain_sum, rg:gsm_symbolic) or a prompt/answer "
                                 "JSONL file")
    p.add_argument("--reward", help="a Python reward function module:function or file.py:function, called as "
                                    "fn(completion, answer) -> float")
    p.add_argument("--steps", type=int, help="optimizer steps (one sampled batch each)")
    p.add_argument("--problems-per-step", type=int, help="problems per step (P)")
    p.add_argument("--group-size", type=int, help="completions sampled per problem (G)")
    p.add_argument("--max-new-tokens", type=int, help="longest completion")
    p.add_argument("--temperature", type=float, help="sampling temperature (greedy eval is unaffected)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"])


def run(args) -> int:
    from regretless.prepare import ensure_model
    from regretless.rl.envs import parse_spec
    from regretless.rl.loop import run_rl

    cfg = build_config(RLConfig, args, FLAGS)
    ensure_model(cfg.model)  # a built-in made by training (tiny-base) is built here, above the trainer
    if args.reward:
        cfg = replace(cfg, env=f"{parse_spec(cfg.env)[0]},reward={args.reward}")
    summary = run_rl(cfg, resume=args.resume)
    return 3 if summary["status"] == "diverged" else 0
