"""A stand-in trainer for sweep tests (the real `regretless sft` is tested end to end elsewhere), and a
synthetic loss model for report tests.

`FAKE_TRAINER` is a real Python script, run as a real subprocess by the sweep runner (the runner, not the
trainer, is under test). It follows the run-folder contract (config.yaml in, metrics.jsonl + summary.json out,
--resume, exit 0/3) and, like the real trainer, holds an exclusive flock on RUNDIR/.lock while it writes (a
second writer is refused: it logs `refused` and exits 2). It reads its behaviour from the config's `model`
field: `fail` exits 1 with a message on stderr, `diverge` exits 3, `crash_once` dies half-way on its first
attempt and finishes on resume, `slow` sleeps 0.05 s per step and `stubborn` also ignores SIGTERM (both only
in an attempt that starts from step 0: a resumed attempt is quick and plain), anything else just trains. Each start appends `start=<step> threads=.. pid=.. gpus=.. t0=..` to attempts.log;
under torchrun every rank appends `rank=.. world=.. gpus=.. pid=..` to procs.log and rank 0 trains.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

FAKE_TRAINER = r'''
import argparse, fcntl, json, os, signal, sys, time
from pathlib import Path
import yaml

p = argparse.ArgumentParser()
p.add_argument("command"); p.add_argument("--config"); p.add_argument("--out"); p.add_argument("--resume", action="store_true")
a = p.parse_args()
cfg = yaml.safe_load(open(a.config))
out = Path(a.out)
gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
rank = int(os.environ.get("RANK", "0"))
if "RANK" in os.environ:
    with open(out / "procs.log", "a") as f:
        f.write(f"rank={rank} world={os.environ['WORLD_SIZE']} gpus={gpus} pid={os.getpid()}\n")
    if rank != 0:
        sys.exit(0)
model, steps, lr = cfg["model"], cfg.get("steps") or 10, cfg.get("lr") or 1e-3
lock = open(out / ".lock", "a+")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    with open(out / "attempts.log", "a") as f:
        f.write(f"refused pid={os.getpid()}\n")
    print("run folder in use by another process", file=sys.stderr)
    sys.exit(2)
lock.truncate(0); lock.write(str(os.getpid())); lock.flush()
metrics = out / "metrics.jsonl"
done = len(metrics.read_text().splitlines()) if (a.resume and metrics.exists()) else 0
slow = model in ("slow", "stubborn") and done == 0  # slow on a first attempt only: a resumed one is quick
if model == "stubborn" and done == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(out / "attempts.log", "a") as f:
    f.write(f"start={done} threads={os.environ.get('OMP_NUM_THREADS')} pid={os.getpid()} gpus={gpus} t0={time.time()}\n")
if model == "fail":
    print("Traceback (most recent call last):\nValueError: boom, the data set is empty", file=sys.stderr)
    sys.exit(1)
for step in range(done + 1, steps + 1):
    if model == "crash_once" and step == steps // 2 and not (out / "crashed").exists():
        (out / "crashed").write_text("1")
        print("killed half-way", file=sys.stderr)
        sys.exit(137)
    if slow:
        time.sleep(0.05)
    loss = 3.0 / (1 + step * lr * 100) + 0.01 * cfg.get("seed", 0)
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
    if model == "diverge" and step == 3:
        json.dump({"status": "diverged", "steps": step, "final_loss": None, "lr": lr}, open(out / "summary.json", "w"))
        sys.exit(3)
json.dump({"status": "done", "steps": steps, "final_loss": loss, "final_eval_loss": None, "best_eval_loss": None,
           "trainable_params": 1000, "lr": lr, "wall_s": 0.1}, open(out / "summary.json", "w"))
'''


def write_fake_trainer(tmp: Path) -> list[str]:
    """Write the script; returns the launcher argv template for run_sweep."""
    path = tmp / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return [sys.executable, str(path), "{command}", "--config", "{config}", "--out", "{out}", "--resume"]


def attempts(folder: Path) -> list[dict[str, str]]:
    """attempts.log of a fake-trainer run folder, one {key: value} per start (`refused` for a refused one)."""
    try:
        lines = (folder / "attempts.log").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in line.split()) for line in lines]


# -- synthetic run folders for report tests ----------------------------------------------------------------
def synthetic_loss(step: int, cfg: dict, ratio: float = 10.0, low_rank_falls_off: bool = True,
                   attn_worse: bool = True, batch_gap: bool = True) -> float:
    """Loss linear in log(step) for FullFT; LoRA optimum at `ratio` x FullFT's LR; low ranks fall off."""
    lora = cfg.get("lora")
    lr = cfg["lr"]
    lr_opt = 1e-4 * (ratio if lora else 1.0)
    base = 3.0 - 0.3 * math.log(step) + 0.4 * math.log10(lr / lr_opt) ** 2
    if lora:
        rank, t = lora["rank"], lora.get("targets", "all")
        if low_rank_falls_off:
            base += 0.15 * max(0.0, math.log(step / (2.0 * rank)))
        if attn_worse and t == "attn":
            base += 0.2
        if batch_gap:
            base += 0.05 * max(0.0, math.log2(cfg.get("batch_size", 8) / 8))
    return base + 0.005 * cfg.get("seed", 0)


def write_run(root: Path, run_id: str, command: str, cfg: dict, metrics: list[dict], status: str = "done",
              tags: tuple[str, ...] = (), trainable_params: int = 1000) -> Path:
    """A run folder as the trainer writes it, registered in root/ledger.sqlite."""
    from regretless.sweep.ledger import Ledger

    folder = root / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"command": command, **cfg}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    last = metrics[-1] if metrics else {}
    summary = {"status": status, "steps": last.get("step", 0), "final_loss": last.get("loss"),
               "final_reward": last.get("reward"), "trainable_params": trainable_params, "lr": cfg.get("lr"),
               "wall_s": 1.0}
    if status in ("done", "diverged"):
        (folder / "summary.json").write_text(json.dumps(summary))
    ledger = Ledger(root / "ledger.sqlite")
    ledger.add_run(run_id, run_id, command, cfg, {}, f"runs/{run_id}", tags)
    if status in ("done", "diverged"):
        ledger.record_summary(run_id, summary)
    elif status == "failed":
        ledger.record_failure(run_id, "exit code 1\nValueError: boom")
    return folder
