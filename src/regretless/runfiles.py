"""A run is a folder of plain files (config.yaml, metrics.jsonl, summary.json, checkpoints/, adapter/ or model/).
This module writes them so that a run killed at any moment (even SIGKILL) can resume from its last good
checkpoint: checkpoints are written into a hidden temp folder and renamed into place; metrics lines past the
checkpoint are dropped on resume, so the resumed log equals an uninterrupted one.

A run holds an exclusive lock (`fcntl.flock` on DIR/.lock) from `open_run` to its end, so a second process
(a rerun, a sweep worker) cannot write into a live run's folder; the kernel drops the lock when the holder dies,
so a killed run's folder is free again at once. A folder holding only the config (and perhaps the step-0 eval)
of a run that failed before its first optimizer step holds nothing worth keeping and is reused by the next run.
Everything is written with the usual modes under the umask (tempfile's are 0600/0700).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from regretless import distributed
from regretless.config import atomic_write_text, save_config, to_dict, umask_mode
from regretless.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "adapter", "model")
LOCK = ".lock"


def started(out: Path) -> bool:
    """Whether the run in `out` trained at least one step (a metrics line past step 0, a checkpoint, a summary or
    final weights). A folder that has not holds only the config of a run that failed before its first step."""
    if any((out / name).exists() for name in ("summary.json", "adapter", "model")):
        return True
    ck = out / "checkpoints"
    if ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir()):
        return True
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if json.loads(line).get("step", 0) >= 1:
                return True
        except (json.JSONDecodeError, AttributeError):
            return True  # not ours to judge: keep it
    return False


def _lock(out: Path) -> int:
    """Take the folder's exclusive lock (non-blocking); returns its fd. UserError when a live process holds it."""
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{out}: in use by another regretless process (pid {holder}); wait for it to finish "
                            "or choose another --out") from None
        try:  # the file we locked must still be the one at `path` (it could have been replaced meanwhile)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _check_folder(out: Path, cfg: Any, command: str, resume: bool) -> None:
    """Read-only checks of an existing folder: UserError unless it is empty, holds only the config of a run that
    failed before its first step, or holds this same run and `resume` is set."""
    cfg_file = out / "config.yaml"
    if not cfg_file.is_file():
        if any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise UserError(f"{out}: not empty and holds no regretless run; choose a new --out")
        return
    if not started(out):
        return  # the config of a run that failed before its first step: nothing to keep
    try:
        old = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{cfg_file}: not valid YAML; this folder holds a damaged run, choose a new --out") from None
    new = {"command": command, **to_dict(cfg)}
    diff = sorted(k for k in set(old) | set(new) if k != "out" and old.get(k) != new.get(k))
    if diff:
        raise UserError(f"{out}: holds another run (config.yaml differs in {', '.join(diff[:5])}); "
                        "choose a new --out or rerun with the same settings")
    if not resume:
        raise UserError(f"{out}: holds a run already; pass --resume to continue it or choose a new --out")


@contextlib.contextmanager
def open_run(cfg: Any, command: str, resume: bool) -> Iterator[tuple[Path, dict | None]]:
    """The prologue of every trainer: `with open_run(cfg, "sft", resume) as (out, done):` checks the folder,
    takes its lock (held until the block ends), writes config.yaml and yields (run folder, its summary if the
    run already finished). Refuses to mix two runs in one folder; on refusal nothing on disk changes.
    Under torchrun rank 0 does all this (and holds the lock); every rank gets its answer or its UserError."""
    with distributed.rank0_context(lambda: _open_run(cfg, command, resume)) as opened:
        yield opened


@contextlib.contextmanager
def _open_run(cfg: Any, command: str, resume: bool) -> Iterator[tuple[Path, dict | None]]:
    if not cfg.out:
        raise UserError("--out: required; the folder where the run's files go")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a folder for the run's files")
    if out.is_dir():
        had_lock = (out / LOCK).exists()
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
        had_lock = False
    fd = _lock(out)
    try:
        try:
            _check_folder(out, cfg, command, resume)
        except BaseException:
            if not had_lock:
                (out / LOCK).unlink(missing_ok=True)
            raise
        if not started(out):
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a failed run's step-0 line
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        save_config(cfg, out / "config.yaml", command)
        done = finish_marker(out) if resume else None
        if done:
            print(f"[regretless] {out}: finished already ({done['status']}); nothing to do", file=sys.stderr,
                  flush=True)
        yield out, done
    finally:
        os.close(fd)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_summary(out: Path, summary: dict) -> None:
    if not distributed.is_main():  # torchrun: rank 0 writes run files
        return
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


class MetricsLog:
    """Append-only metrics.jsonl, one object per line, flushed and fsynced per write."""

    def __init__(self, out: Path, keep_until_step: int | None = None):
        self.path = out / "metrics.jsonl"
        self._f = None
        if not distributed.is_main():  # torchrun: rank 0 writes run files
            return
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
        if self._f is None:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class Checkpointer:
    """checkpoints/step-N/{trainable.pt, optimizer.pt, state.json}; a folder exists only once complete."""

    def __init__(self, out: Path, keep: int = 1):
        self.dir = out / "checkpoints"
        self.keep = keep

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        if distributed.active():  # torchrun: sharded, through torch.distributed.checkpoint
            return distributed.save_checkpoint(self.dir, step, model, optimizer, state, self.keep)
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            tmp.chmod(umask_mode(directory=True))
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
        if distributed.active() or (ck / "dcp").is_dir():  # written by (or read into) a torchrun job
            return distributed.load_checkpoint(ck, model, optimizer)
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


def finish_marker(out: Path) -> dict | None:
    """The run's summary if it already finished (done or diverged), else None."""
    s = read_json(out / "summary.json")
    return s if s and s.get("status") in ("done", "diverged") else None


def normal_modes(root: Path) -> None:
    """Give a folder written by other libraries the usual modes under the umask (safetensors writes 0600, tempfile
    folders are 0700)."""
    fmode, dmode = umask_mode(), umask_mode(directory=True)
    root.chmod(dmode)
    for p in root.rglob("*"):
        if not p.is_symlink():
            p.chmod(dmode if p.is_dir() else fmode)


def save_atomically(out: Path, name: str, writer: Callable[[Path], None]) -> Path:
    """writer(tmp_folder) fills a temp folder that then replaces out/name."""
    final = out / name
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
    try:
        writer(tmp)
        normal_modes(tmp)
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
