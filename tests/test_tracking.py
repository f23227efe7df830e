"""Experiment tracking for real: TensorBoard event files read back with tensorboard's EventAccumulator, W&B in
offline mode read back from its run file (wandb's own protobuf records), MLflow on a local file store read back
with MlflowClient. Each must hold exactly the numbers of metrics.jsonl, at the same steps."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from regretless import tracking
from regretless.config import SFTConfig, load_config
from regretless.errors import UserError
from regretless.runfiles import MetricsLog

RECORDS = [{"step": 0, "eval_loss": 2.5, "tokens": 0},
           {"step": 1, "loss": 2.25, "lr": 1e-3, "tokens": 40, "tokens_per_s": 123.4567, "epoch": 0.125},
           {"step": 2, "loss": 1.875, "lr": 1e-3, "tokens": 80, "tokens_per_s": 130.0, "eval_loss": 2.0,
            "note": "text is not a metric", "flag": True, "missing": None}]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def jsonl_scalars(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}}, the numbers a tracker must hold."""
    got: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                got.setdefault(k, {})[rec["step"]] = float(v)
    return got


def tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log of wandb_internal.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            out.append(pb.Record.FromString(pending))
    return out


def wandb_scalars(out: Path) -> tuple[dict[str, dict[int, float]], dict]:
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    got: dict[str, dict[int, float]] = {}
    config: dict = {}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    got.setdefault(k, {})[items["_step"]] = float(v)
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return got, config


def mlflow_scalars(uri: str, run_id: str) -> tuple[dict[str, dict[int, float]], dict, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    got = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in run.data.metrics}
    return got, run.data.params, run.info.status


def write_run(out: Path, cfg: SFTConfig, records: list[dict], status: str = "done") -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = tracking.track(MetricsLog(out), cfg, out)
    for r in records:
        log.write(r)
    (out / "summary.json").write_text(json.dumps({"status": status}))
    log.close()


def test_all_three_trackers_hold_exactly_the_metrics_of_metrics_jsonl(tmp_path, offline):
    out = tmp_path / "run"
    cfg = SFTConfig(out=str(out), report_to="tensorboard,wandb,mlflow", lr=1e-3)
    write_run(out, cfg, RECORDS)
    expected = jsonl_scalars(out)
    assert expected["loss"] == {1: 2.25, 2: 1.875} and "note" not in expected
    expected.pop("flag", None)

    tb = tensorboard_scalars(out)
    assert set(tb) == set(expected)
    for k in expected:
        assert tb[k] == pytest.approx(expected[k], rel=1e-6)  # event files store float32

    wb, wb_config = wandb_scalars(out)
    assert wb == expected
    assert wb_config["lr"] == 1e-3 and wb_config["lora"]["rank"] == cfg.lora.rank

    state = json.loads((out / "tracking.json").read_text())
    assert state["mlflow_tracking_uri"] == (out / "mlruns").resolve().as_uri()
    ml, params, status = mlflow_scalars(state["mlflow_tracking_uri"], state["mlflow_run_id"])
    assert ml == expected and status == "FINISHED"
    assert params["lr"] == "0.001" and params["lora.rank"] == str(cfg.lora.rank) and params["report_to"]


def test_resume_continues_the_same_wandb_and_mlflow_runs(tmp_path, offline):
    out = tmp_path / "run"
    cfg = SFTConfig(out=str(out), report_to="wandb,mlflow")
    write_run(out, cfg, RECORDS[:2], status="running")
    first = json.loads((out / "tracking.json").read_text())
    ml, _, status = mlflow_scalars(first["mlflow_tracking_uri"], first["mlflow_run_id"])
    assert status == "FAILED" and ml["loss"] == {1: 2.25}  # not finished: the summary did not say done

    log = tracking.track(MetricsLog(out, keep_until_step=1), cfg, out)
    log.write(RECORDS[2])
    (out / "summary.json").write_text(json.dumps({"status": "done"}))
    log.close()
    again = json.loads((out / "tracking.json").read_text())
    assert again == first
    ml, _, status = mlflow_scalars(again["mlflow_tracking_uri"], again["mlflow_run_id"])
    assert status == "FINISHED" and ml["loss"] == {1: 2.25, 2: 1.875}
    ids = [r.run.run_id for f in (out / "wandb").glob("offline-run-*/run-*.wandb") for r in wandb_records(f)
           if r.WhichOneof("record_type") == "run"]
    assert len(ids) == 2 and set(ids) == {first["wandb_run_id"]}  # the resumed process wrote to the same run


def test_mlflow_honours_its_tracking_uri(tmp_path, offline, monkeypatch):
    store = tmp_path / "shared-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-exp")
    out = tmp_path / "run"
    write_run(out, SFTConfig(out=str(out), report_to="mlflow"), RECORDS)
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=store.as_uri()).get_experiment_by_name("my-exp")
    assert exp is not None and not (out / "mlruns").exists()


def test_none_is_the_default_and_returns_the_log_itself(tmp_path):
    log = MetricsLog(tmp_path)
    assert SFTConfig().report_to == "none"
    assert tracking.track(log, SFTConfig(out=str(tmp_path)), tmp_path) is log
    log.close()
    assert not (tmp_path / "tracking.json").exists() and not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("value", ["tb", "none,wandb", "", "wandb,,comet"])
def test_bad_report_to_names_the_field(value):
    with pytest.raises(UserError, match="field 'report_to': expected none | tensorboard"):
        load_config(SFTConfig, None, [f"report_to={value}"])


def test_missing_package_is_a_user_error_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UserError, match="wandb needs the Python package 'wandb'; pip install 'regretless\\[track\\]'"):
        tracking.check_available("tensorboard,wandb")


# ---------------------------------------------------------------- through the trainers
def _chat(path: Path, n: int = 40) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_run_reports_every_metrics_line_to_all_three_trackers(tiny_llama_dir, tmp_path, offline):
    from regretless.lora import LoRAConfig
    from regretless.train import run_sft

    out = tmp_path / "run"
    cfg = SFTConfig(model=str(tiny_llama_dir), data=str(_chat(tmp_path / "chat.jsonl")), out=str(out), steps=4,
                    batch_size=4, seq_len=64, eval_size=8, eval_every=2, lr=3e-3, lora=LoRAConfig(rank=4),
                    device="cpu", report_to="tensorboard,wandb,mlflow")
    assert run_sft(cfg)["status"] == "done"
    expected = jsonl_scalars(out)
    assert set(expected["loss"]) == {1, 2, 3, 4} and set(expected["eval_loss"]) == {0, 2, 4}
    tb = tensorboard_scalars(out)
    assert set(tb) == set(expected) and all(tb[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())
    assert wandb_scalars(out)[0] == expected
    state = json.loads((out / "tracking.json").read_text())
    ml, params, status = mlflow_scalars(state["mlflow_tracking_uri"], state["mlflow_run_id"])
    assert ml == expected and status == "FINISHED" and params["batch_size"] == "4"


def test_rl_run_reports_to_tensorboard(tiny_llama_dir, tmp_path):
    from regretless.config import RLConfig
    from regretless.lora import LoRAConfig
    from regretless.rl.loop import run_rl

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) for i in range(20)))
    out = tmp_path / "rl"
    cfg = RLConfig(model=str(tiny_llama_dir), env=str(data), out=str(out), lora=LoRAConfig(rank=2), lr=1e-2,
                   steps=2, problems_per_step=2, group_size=2, max_new_tokens=4, eval_size=2, eval_every=1,
                   train_size=10, device="cpu", report_to="tensorboard")
    run_rl(cfg)
    expected = jsonl_scalars(out)
    assert {"reward", "pg_loss", "eval_accuracy"} <= set(expected) and set(expected["reward"]) == {1, 2}
    tb = tensorboard_scalars(out)
    assert set(tb) == set(expected) and all(tb[k] == pytest.approx(v, rel=1e-6, abs=1e-7)
                                            for k, v in expected.items())
