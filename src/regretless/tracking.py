"""Experiment tracking: every record written to metrics.jsonl also goes to TensorBoard, W&B or MLflow.

`report_to` (a field of every training config; HF Trainer's names) is `none` (the default), `tensorboard`,
`wandb`, `mlflow`, or a comma-separated list. metrics.jsonl is always written and stays the source of truth
(analysis reads only it); a tracker receives the same numbers, each record at its `step`:

- tensorboard: event files in RUN/tensorboard (torch's SummaryWriter), one scalar per metric; the config as text.
- wandb: `wandb.init` in RUN (files under RUN/wandb), project $WANDB_PROJECT or "regretless", the run folder's
  name as the run name, the config as the run config. $WANDB_MODE=offline works without a network
  (`wandb sync RUN/wandb/offline-run-*` uploads later).
- mlflow: the tracking store $MLFLOW_TRACKING_URI, else a local file store in RUN/mlruns (read it with
  `mlflow ui --backend-store-uri RUN/mlruns` or `MlflowClient`); experiment $MLFLOW_EXPERIMENT_NAME or
  "regretless"; the config flattened into params ("lora.rank"). `mlflow-skinny` is enough for a file store.

A resumed run continues the same W&B and MLflow runs (their ids are kept in RUN/tracking.json). Steps that the
trainer repeats after a resume (those past the last checkpoint) are logged again: TensorBoard and MLflow keep
both values, W&B drops the ones below its current step.

    metrics = tracking.track(metrics, cfg, out)   # wraps the run's MetricsLog; write() then goes to both
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from regretless.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
STATE_FILE = "tracking.json"


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


def parse_report_to(report_to: str) -> list[str]:
    """['tensorboard', ...] from the field's value ('none' -> [])."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    bad = [n for n in names if n not in (*TRACKERS, "none")]
    if bad or not names or ("none" in names and len(names) > 1):
        raise UserError(f"field 'report_to': expected none | {' | '.join(TRACKERS)} (or a comma-separated list of "
                        f"trackers), got {report_to!r}")
    return [n for n in names if n != "none"]


def check_available(report_to: str) -> None:
    """UserError naming the missing package, before a run writes anything."""
    for name in parse_report_to(report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = "mlflow-skinny" if name == "mlflow" else PACKAGES[name]
            raise UserError(f"field 'report_to': {name} needs the Python package {PACKAGES[name]!r}; "
                            f"pip install 'regretless[track]' (or {extra})")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, without `step` (what every tracker logs)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- the three trackers
class TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flatten(config).items()), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, config: dict[str, Any], state: dict[str, Any]):
        import wandb

        run_id = state.get("wandb_run_id")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "regretless"), name=out.name, dir=str(out),
                              config=config, id=run_id, resume="allow" if run_id else None, reinit="create_new")
        state["wandb_run_id"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "done" else 1)


class MLflow:
    def __init__(self, out: Path, config: dict[str, Any], state: dict[str, Any]):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps file stores opt-in
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.run_id = state.get("mlflow_run_id")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "regretless")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params at a time
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        state["mlflow_run_id"] = self.run_id
        state["mlflow_tracking_uri"] = uri

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "done" else "FAILED")


# ---------------------------------------------------------------- the hook
class TrackedLog:
    """The run's metrics log plus trackers: `write(record)` writes the metrics.jsonl line, then sends its numbers."""

    def __init__(self, log: Any, trackers: list[Tracker], out: Path):
        self.log, self.trackers, self.out = log, trackers, out

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        values = scalars(record)
        if values:
            for t in self.trackers:
                t.log(int(record.get("step", 0)), values)

    def close(self) -> None:
        """Closes the log and the trackers; a run is finished there when its summary says `done`."""
        self.log.close()
        try:
            status = json.loads((self.out / "summary.json").read_text()).get("status", "failed")
        except (OSError, json.JSONDecodeError, AttributeError):
            status = "failed"
        for t in self.trackers:
            t.close(status)
        self.trackers = []

    def __getattr__(self, name: str) -> Any:  # anything else of the wrapped log (its path, ...)
        return getattr(self.log, name)


def track(log: Any, cfg: Any, out: Path) -> Any:
    """`log` itself when cfg.report_to is none, else a TrackedLog sending every record to the trackers."""
    names = parse_report_to(getattr(cfg, "report_to", "none"))
    if not names:
        return log
    check_available(cfg.report_to)
    from regretless.config import atomic_write_text, to_dict

    out = Path(out)
    state_path = out / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        state = {}
    config = to_dict(cfg)
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoard(out, config))
        elif name == "wandb":
            trackers.append(WandB(out, config, state))
        else:
            trackers.append(MLflow(out, config, state))
    if state:
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    return TrackedLog(log, trackers, out)
