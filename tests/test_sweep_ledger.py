"""The SQLite ledger: concurrent writers from real processes, schema-version check, summary copying."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

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
