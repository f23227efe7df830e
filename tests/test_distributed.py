"""FSDP2 through torchrun on CPU (gloo), real subprocesses: 2 processes give the single-process run at every step
(SFT and RL, LoRA and FullFT) and the same adapter or model; kill -9 of one rank stops the whole job at once and
`--resume` reaches the identical final loss; a 2-process checkpoint resumes in one process.

One torchrun job runs the four 2-process runs (tests/_dist_runs.py); the single-process references run in this
process. Tiny Llama (2 blocks, hidden 32) built from its config, the test BPE tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, tiny_llama_config
from safetensors.torch import load_file

from regretless import distributed
from regretless.config import RLConfig, SFTConfig, load_config
from regretless.rl.loop import run_rl
from regretless.rl.sampling import sample
from regretless.train import run_sft

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TIMING = {"tokens_per_s", "step_s", "peak_mem_mb", "sample_tokens_per_s", "train_tokens_per_s"}
REWARD = 'def has_a(completion, answer):\n    return float("a" in completion)\n'


def _configs(root: Path, model: Path) -> dict[str, tuple[str, dict]]:
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus one?"},
        {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n" for i in range(80)))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}", "answer": "x"}) + "\n"
                               for i in range(24)))
    (root / "rw.py").write_text(REWARD)
    common = {"model": str(model), "device": "cpu", "seed": 3}
    sft = {**common, "data": str(chat), "seq_len": 64, "eval_size": 8}
    rl = {**common, "env": f"{prompts},reward={root / 'rw.py'}:has_a", "stop": ["e"], "group_size": 4,
          "max_new_tokens": 8, "train_size": 16, "eval_size": 3, "save_every": 1}
    return {
        # 4 sequences a step, 2 per rank; long enough to be killed in the middle
        "sft_lora": ("sft", {**sft, "lora": {"rank": 4}, "lr": 3e-3, "steps": 30, "batch_size": 4,
                             "save_every": 6, "eval_every": 10}),
        # packed, 1 sequence a rank a forward: where the 2 pack into one row, rank 1 runs it at weight 0
        "sft_full": ("sft", {**sft, "lora": None, "lr": 1e-3, "steps": 4, "batch_size": 4, "packing": True,
                             "micro_batch_size": 1, "eval_every": 2}),
        "rl_lora": ("rl", {**rl, "lora": {"rank": 2}, "lr": 2e-3, "steps": 3, "problems_per_step": 3,
                           "eval_every": 2}),
        "rl_full": ("rl", {**rl, "lora": None, "lr": 1e-4, "steps": 3, "problems_per_step": 4,
                           "micro_batch_size": 4, "kl_coef": 0.05, "clip_eps": 0.2, "eval_every": 3}),
    }


def _write_config(path: Path, values: dict, out: Path) -> Path:
    path.write_text(yaml.safe_dump({**values, "out": str(out)}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    """{name: (config file of the 2-process run, its folder, the single-process folder)}."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("dist")
    model = root / "tiny-llama"
    build_model(tiny_llama_config()).save_pretrained(model)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model)
    out = {}
    for name, (command, values) in _configs(root, model).items():
        two = _write_config(root / f"{name}.yaml", values, root / "two" / name)
        one = _write_config(root / f"{name}-1.yaml", values, root / "one" / name)
        out[name] = (command, two, root / "two" / name, one, root / "one" / name)
    args = [f"{c}={two}" for c, two, *_ in out.values()]
    res = subprocess.run([*TORCHRUN, str(Path(__file__).with_name("_dist_runs.py")), *args], env=ENV,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    with one_thread():  # as each torchrun worker (OMP_NUM_THREADS=1)
        for command, _, _, one, _ in out.values():
            if command == "sft":
                run_sft(load_config(SFTConfig, one))
            else:
                run_rl(load_config(RLConfig, one))
    return out


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    f = out / "adapter" / "adapter_model.safetensors"
    return load_file(f if f.is_file() else out / "model" / "model.safetensors")


def _close(a: float, b: float, atol: float, rtol: float = 0.0) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


@pytest.mark.parametrize("name", ["sft_lora", "sft_full", "rl_lora", "rl_full"])
def test_two_processes_give_the_single_process_run(runs, name):
    command, _, two, _, one = runs[name]
    a, b = _metrics(one), _metrics(two)  # logged once: rank 0 alone writes
    assert [r["step"] for r in a] == [r["step"] for r in b] and [set(r) for r in a] == [set(r) for r in b]
    loss = "loss" if command == "sft" else "pg_loss"
    steps = [(x, y) for x, y in zip(a, b) if loss in x]
    assert len(steps) == {"sft_lora": 30, "sft_full": 4}.get(name, 3)
    for x, y in steps:  # the same sequences (and, for RL, the same samples) at every step
        assert _close(x[loss], y[loss], 1e-5), (x["step"], x[loss], y[loss])
        assert _close(x["grad_norm"], y["grad_norm"], 1e-6, 1e-4), (x["step"], x["grad_norm"], y["grad_norm"])
        if command == "sft":
            assert x["tokens"] == y["tokens"]
        else:
            assert x["reward"] == pytest.approx(y["reward"], abs=1e-6)
            assert x["response_len"] == pytest.approx(y["response_len"], abs=1e-6)
            assert _close(x["entropy"], y["entropy"], 1e-5)
    evals = [(x, y) for x, y in zip(a, b) if "eval_loss" in x or "eval_accuracy" in x]
    assert len(evals) >= 2
    for x, y in evals:
        key = "eval_loss" if command == "sft" else "eval_accuracy"
        assert _close(x[key], y[key], 1e-5)
    if command == "rl":  # the loss really varies (completions of different lengths), so the check can fail
        assert max(abs(x[loss]) for x, _ in steps) > 1e-3
    wa, wb = _weights(one), _weights(two)  # gathered and saved once, in the same format
    assert sorted(wa) == sorted(wb)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert all(wb[k].dtype == wa[k].dtype == torch.float32 for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sa["status"] == sb["status"] == "done" and sa["trainable_params"] == sb["trainable_params"]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    ck = max((two / "checkpoints").iterdir())  # sharded: one file per rank
    assert len(list((ck / "dcp").glob("*.distcp"))) == 2 and (ck / "state.json").is_file()


def _workers(agent: int) -> list[int]:
    """The pids of torchrun's worker processes (children of the agent)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent:
            kids.append(int(stat.parent.name))
    return sorted(kids)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if "zombie" not in Path(f"/proc/{pid}/status").read_text():
                alive.append(pid)
        except OSError:
            pass
    return alive


def test_kill_one_rank_stops_the_job_and_resume_reaches_the_same_loss(runs, tmp_path):
    _, config, uninterrupted, _, _ = runs["sft_lora"]
    out = tmp_path / "killed"
    cli = [*TORCHRUN, "-m", "regretless", "sft", "--config", str(config), "--out", str(out)]
    proc = subprocess.Popen(cli, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ck = out / "checkpoints"
        if ck.is_dir() and any(p.name >= "step-00000006" for p in ck.iterdir() if p.name.startswith("step-")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)  # torchrun's agent sees the dead worker and stops the other
    stopped_s = time.time() - t0
    assert proc.returncode != 0 and stopped_s < 60 and "SIGKILL" in err
    assert not _alive(workers)
    assert not (out / "summary.json").exists()
    single = tmp_path / "single"
    shutil.copytree(out, single)
    shutil.copy(config, tmp_path / "single.yaml")

    res = subprocess.run([*cli, "--resume"], env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step" in res.stderr
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in _metrics(out)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in _metrics(uninterrupted)]
    final = json.loads((out / "summary.json").read_text())["final_loss"]
    assert final == json.loads((uninterrupted / "summary.json").read_text())["final_loss"]

    # the same 2-process checkpoint, resumed by one process (torch.distributed.checkpoint reshards on load)
    cfg = load_config(SFTConfig, tmp_path / "single.yaml", [f"out={single}"])
    with one_thread():
        summary = run_sft(cfg, resume=True)
    assert math.isclose(summary["final_loss"], final, abs_tol=1e-5)


def test_helpers_are_the_identity_in_one_process():
    assert not distributed.active() and distributed.world() == 1 and distributed.share(7) == (0, 7)
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long)}
    assert distributed.rank_rows([batch]) == [(batch, 1.0)]
    assert distributed.all_sum([1.5, 2.0]) == [1.5, 2.0] and distributed.all_max(3) == 3
    assert distributed.mean_over_ranks({"a": 0.5, "b": 2.0}, {"a": 4.0}) == {"a": 0.5, "b": 2.0}


def test_each_prompt_samples_the_same_completions_whatever_else_is_in_the_batch(tiny_llama, tiny_tokenizer):
    """What lets each rank sample its share of the problems and get what one process gets: one generator per
    prompt (rows that stop early are dropped without shifting the other prompts' random streams)."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]

    def gens(slots):
        return [torch.Generator().manual_seed(1000 + k) for k in slots]

    full = sample(tiny_llama, tiny_tokenizer, prompts, n=3, max_new_tokens=10, stop=["e"], generator=gens(range(4)))
    for lo, hi in [(0, 2), (2, 4), (1, 2)]:
        part = sample(tiny_llama, tiny_tokenizer, prompts[lo:hi], n=3, max_new_tokens=10, stop=["e"],
                      generator=gens(range(lo, hi)))
        assert part.texts == full.texts[3 * lo:3 * hi]
        assert torch.equal(part.lengths_N, full.lengths_N[3 * lo:3 * hi])
    assert len(set(full.lengths_N.tolist())) > 1  # some rows stopped early
    assert len(set(full.texts)) > 4
