"""The SQLite ledger: concurrent writers from real processes, schema-version check, summary copying."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

import pytest

from regretless.errors import UserError
from regretless.sweep.ledger import SCHEMA_VERSION, Ledger


def _writer(path: str, worker: int, n: int) -> None:
    ledger = Ledger(path)
    for i in range(n):
        rid = f"w{worker}-{i}"
        ledger.add_run(rid, rid, "sft", {"lr": 1e-4 * i}, {"i": i}, f"runs/{rid}", ["capacity"])
        ledger.mark_running(rid)
        ledger.record_summary(rid, {"status": "done", "final_loss": float(i), "steps": i, "lr": 1e-4})
        ledger.update(f"w{worker}-0", wall_s=float(i))  # contended row updates too


def test_concurrent_writers_from_processes(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 30)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    ledger = Ledger(path)
    rows = ledger.runs()
    assert len(rows) == 180
    assert ledger.counts()["done"] == 180
    assert all(r["final_loss"] == float(r["axes"]["i"]) and r["tags"] == ["capacity"] for r in rows)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_other_schema_version_is_a_clear_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(UserError, match=f"schema version 99, but this regretless reads version {SCHEMA_VERSION}"):
        Ledger(path)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(UserError, match="not a regretless ledger"):
        Ledger(path)


def test_add_run_keeps_status_and_failure_is_recorded(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_run("a", "a", "rl", {}, {}, "runs/a")
    ledger.record_summary("a", {"status": "diverged", "steps": 3, "final_reward": 0.25})
    ledger.add_run("a", "a-renamed", "rl", {}, {"x": 1}, "runs/a")
    row = ledger.get("a")
    assert row["status"] == "diverged" and row["final_reward"] == 0.25 and row["name"] == "a-renamed"
    ledger.record_failure("a", "exit code 1\nboom")
    assert ledger.get("a")["error"].endswith("boom") and ledger.get("a")["status"] == "failed"
    with pytest.raises(KeyError):
        ledger.update("missing", status="done")


def test_recording_a_finished_run_again_keeps_its_finish_time(tmp_path):
    """A finished run registered again (a later spec, a replay) keeps its finish time: the report's 'runs
    active' wall time comes from these spans. A rerun after a failure is a new finish."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_run("a", "a", "sft", {}, {}, "runs/a")
    ledger.mark_running("a")
    ledger.record_summary("a", {"status": "done", "final_eval_loss": 1.5})
    first = ledger.get("a")["finished"]
    time.sleep(0.02)
    ledger.record_summary("a", {"status": "done", "final_eval_loss": 1.5})
    assert ledger.get("a")["finished"] == first
    ledger.record_failure("a", "boom")
    time.sleep(0.02)
    ledger.record_summary("a", {"status": "done", "final_eval_loss": 1.4})
    assert ledger.get("a")["finished"] > first and ledger.get("a")["status"] == "done"


# -- which rows belong to the current spec -----------------------------------------------------------------
def _seeds(rows: list[dict]) -> list[int]:
    return sorted(r["axes"]["seed"] for r in rows)


def test_rows_of_an_older_spec_are_not_current(tmp_path):
    from test_sweep_fake_trainer import write_fake_trainer

    from regretless.sweep import current_rows, run_sweep, stale_rows

    launcher = write_fake_trainer(tmp_path)
    out = tmp_path / "sweep"

    def spec(*seeds: int) -> dict:
        return {"command": "sft", "base": {"steps": 2}, "axes": {"seed": list(seeds)}}

    run_sweep(spec(0, 1), out, launcher=launcher, quiet=True, gpus=[])
    assert _seeds(current_rows(out)) == [0, 1]
    run_sweep(spec(1, 2), out, launcher=launcher, quiet=True, gpus=[])  # a new spec: seed 0 is left behind
    ledger = Ledger(out / "ledger.sqlite")
    assert _seeds(ledger.runs()) == [0, 1, 2]
    assert _seeds(current_rows(out)) == [1, 2] and _seeds(stale_rows(out)) == [0]
    assert _seeds(current_rows(out / "ledger.sqlite")) == [1, 2]
    row = next(r for r in current_rows(out) if r["axes"]["seed"] == 1)
    assert row["folder"] == (out / row["path"]).resolve() and (row["folder"] / "summary.json").is_file()
    run_sweep(spec(3), out, launcher=launcher, quiet=True, gpus=[], extend=True)  # a search adding a point
    assert _seeds(current_rows(out)) == [1, 2, 3]
    res = run_sweep(spec(0), out, launcher=launcher, quiet=True, gpus=[])  # back to an old run: not rerun
    assert _seeds(current_rows(out)) == [0] and res.counts == {"done": 1}
    assert len(ledger.current_specs()) == 1 and len({r["spec_hash"] for r in ledger.runs()}) == 3


def test_schema_1_ledger_is_migrated_and_every_row_counts_as_current(tmp_path):
    from regretless.sweep import current_rows

    path = tmp_path / "ledger.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1'), ('kind', 'regretless-ledger');
        CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, command TEXT NOT NULL, config_json TEXT NOT NULL,
          axes_json TEXT NOT NULL DEFAULT '{}', tags_json TEXT NOT NULL DEFAULT '[]',
          status TEXT NOT NULL DEFAULT 'queued', error TEXT, started REAL, finished REAL, final_loss REAL,
          final_eval_loss REAL, best_eval_loss REAL, final_reward REAL, final_eval_accuracy REAL,
          best_eval_accuracy REAL, steps INTEGER, wall_s REAL, lr REAL, trainable_params INTEGER, path TEXT NOT NULL);
        INSERT INTO runs (id, name, command, config_json, status, final_loss, path)
          VALUES ('a', 'a', 'sft', '{}', 'done', 1.5, 'runs/a'), ('b', 'b', 'sft', '{}', 'failed', NULL, 'runs/b');
    """)
    con.close()
    ledger = Ledger(path)
    assert ledger.meta()["schema_version"] == str(SCHEMA_VERSION) == "2"
    assert ledger.current_specs() is None
    rows = current_rows(tmp_path)
    assert [(r["id"], r["status"], r["final_loss"], r["spec_hash"]) for r in rows] == [
        ("a", "done", 1.5, None), ("b", "failed", None, None)]
    ledger.set_current_specs(["abc"])  # once a spec is recorded, rows that no spec registered are not current
    assert current_rows(tmp_path) == []
