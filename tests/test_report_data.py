"""Builders of synthetic sweeps (real run folders and ledgers) for the report tests; no tests here."""

from __future__ import annotations

import math
from pathlib import Path

from test_sweep_fake_trainer import synthetic_loss, write_run

LRS = [10 ** (-5 + k / 2) for k in range(7)]  # 1e-5 .. 1e-2, two points per decade
STEPS = 200


def sft_cfg(lora_rank: int | None, lr: float, seed: int, **kw) -> dict:
    lora = None if lora_rank is None else {"rank": lora_rank, "alpha": 32.0, "targets": kw.pop("targets", "all")}
    return {"model": "tiny", "lora": lora, "lr": lr, "seed": seed, "batch_size": kw.pop("batch_size", 8), **kw}


def _sft_run(root: Path, cfg: dict, tags: tuple, params: int = 1000, **loss_kw) -> None:
    metrics = [{"step": s, "loss": synthetic_loss(s, cfg, **loss_kw), "lr": cfg["lr"]} for s in range(1, STEPS + 1)]
    lora = cfg["lora"]
    cond = "full" if lora is None else f"r{lora['rank']}-{lora['targets']}"
    rid = f"{cond}-lr{cfg['lr']:.2e}-bs{cfg['batch_size']}-s{cfg['seed']}"
    write_run(root, rid, "sft", cfg, metrics, tags=tags, trainable_params=params)


def lr_sweep(root: Path, ranks=(2, 64), seeds=(0, 1), lrs=LRS, **loss_kw) -> Path:
    for rank in (None, *ranks):
        for lr in lrs:
            for seed in seeds:
                _sft_run(root, sft_cfg(rank, lr, seed), ("capacity", "lr_ratio"), **loss_kw)
    return root


def batch_sweep(root: Path, batch_gap: bool = True) -> Path:
    for rank in (None, 64):
        for bs in (8, 64, 512):
            for lr in (3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3):
                _sft_run(root, sft_cfg(rank, lr, 0, batch_size=bs), ("batch",), low_rank_falls_off=False,
                         batch_gap=batch_gap)
    return root


PARAMS_PER_RANK = {"attn": 100, "mlp": 200, "all": 300}


def placement_sweep(root: Path, attn_worse: bool = True) -> Path:
    for targets, ranks in (("attn", (128, 256)), ("mlp", (64, 128)), ("all", (64, 128))):
        for rank in ranks:
            for lr in (3.16e-4, 1e-3, 3.16e-3):
                _sft_run(root, sft_cfg(rank, lr, 0, targets=targets), ("placement",),
                         params=rank * PARAMS_PER_RANK[targets], low_rank_falls_off=False, attn_worse=attn_worse)
    return root


def rl_sweep(root: Path, rank1_fraction: float = 1.0, learns: bool = True, seeds=(0, 1)) -> Path:
    for rank in (None, 1, 8):
        for lr in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
            for seed in seeds:
                lr_opt = 1e-5 if rank is None else 1e-4
                width = 1.0 if rank is None else 2.0  # LoRA: a wider band of good LRs
                factor = math.exp(-((math.log10(lr / lr_opt) / width) ** 2))
                ceiling = rank1_fraction if rank == 1 else 1.0
                cfg = {"model": "tiny", "lora": None if rank is None else {"rank": rank}, "lr": lr, "seed": seed,
                       "steps": 60}
                metrics = []
                for s in range(1, 61):
                    gain = 0.6 * (1 - math.exp(-s / 15)) * factor * ceiling if learns else 0.0
                    metrics.append({"step": s, "reward": 0.2 + gain + 0.01 * seed, "lr": lr})
                write_run(root, f"rl-{rank}-{lr:.0e}-s{seed}", "rl", cfg, metrics, tags=("rl",))
    return root
