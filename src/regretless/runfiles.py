"""A run is a folder of plain files (config.yaml, metrics.jsonl, summary.json, checkpoints/, adapter/ or model/).
This module writes them so that a run killed at any moment (even SIGKILL) can resume from its last good
checkpoint: checkpoints are written into a hidden temp folder and renamed into place; metrics lines past the
checkpoint are dropped on resume, so the resumed log equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from regretless.config import atomic_write_text, save_config, to_dict
from regretless.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "adapter", "model")


def prepare_run_dir(cfg: Any, command: str, resume: bool) -> Path:
    """Create or reopen the run folder. Refuses to mix two different runs in one folder."""
    if not cfg.out:
        raise UserError("--out: required; the folder where the run's files go")
    out = Path(cfg.out)
    cfg_file = out / "config.yaml"
    if cfg_file.is_file():
        old = yaml.safe_load(cfg_file.read_text()) or {}
        new = {"command": command, **to_dict(cfg)}
        diff = sorted(k for k in set(old) | set(new) if k != "out" and old.get(k) != new.get(k))
        if diff:
            raise UserError(f"{out}: holds another run (config.yaml differs in {', '.join(diff[:5])}); "
                            "choose a new --out or rerun with the same settings")
        if not resume and (out / "metrics.jsonl").exists():
            raise UserError(f"{out}: holds a run already; pass --resume to continue it or choose a new --out")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise UserError(f"{out}: not empty and holds no regretless run; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg_file, command)
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


class MetricsLog:
    """Append-only metrics.jsonl, one object per line, flushed and fsynced per write."""

    def __init__(self, out: Path, keep_until_step: int | None = None):
        self.path = out / "metrics.jsonl"
        if keep_until_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: drop it and everything after
                if rec.get("step", 0) > keep_until_step:
                    break
                kept.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif keep_until_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed by close()

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class Checkpointer:
    """checkpoints/step-N/{trainable.pt, optimizer.pt, state.json}; a folder exists only once complete."""

    def __init__(self, out: Path, keep: int = 1):
        self.dir = out / "checkpoints"
        self.keep = keep

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            torch.save(trainable_state(model), tmp / "trainable.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        done = self.complete()
        if not done:
            return None
        ck = done[-1]
        params = dict(model.named_parameters())
        saved = torch.load(ck / "trainable.pt", map_location="cpu")
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing:
            raise UserError(f"{ck}: checkpoint lacks {missing[0]}; it belongs to a different setup")
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
        optimizer.load_state_dict(torch.load(ck / "optimizer.pt", map_location="cpu"))
        rng = torch.load(ck / "rng.pt", map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return json.loads((ck / "state.json").read_text())


def restore(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
            resume: bool) -> tuple[int, Checkpointer, MetricsLog]:
    """(start step, checkpointer, metrics log): when resuming, the last good checkpoint is loaded into the model,
    optimizer, RNG and `state` (updated in place), and metrics past it are dropped; otherwise a fresh log."""
    ckpt = Checkpointer(out)
    loaded = ckpt.load_latest(model, optimizer) if resume else None
    start = loaded.pop("step") if loaded else 0
    if loaded:
        state.update(loaded)
    return start, ckpt, MetricsLog(out, keep_until_step=start if loaded else None)


def open_run(cfg: Any, command: str, resume: bool) -> tuple[Path, dict | None]:
    """(run folder, its summary if it already finished): the prologue of every trainer."""
    out = prepare_run_dir(cfg, command, resume)
    done = finish_marker(out) if resume else None
    if done:
        print(f"[regretless] {out}: finished already ({done['status']}); nothing to do", file=sys.stderr, flush=True)
    return out, done


def finish_marker(out: Path) -> dict | None:
    """The run's summary if it already finished (done or diverged), else None."""
    s = read_json(out / "summary.json")
    return s if s and s.get("status") in ("done", "diverged") else None


def save_atomically(out: Path, name: str, writer: Callable[[Path], None]) -> Path:
    """writer(tmp_folder) fills a temp folder that then replaces out/name."""
    final = out / name
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
    try:
        writer(tmp)
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
