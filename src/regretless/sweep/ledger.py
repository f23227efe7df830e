"""The sweep ledger: one SQLite file (DIR/ledger.sqlite) listing every run, its config, status and headline
metrics. Safe under concurrent writers (WAL journal, busy timeout, one short transaction per call).

The ledger is an index, not the record: `metrics.jsonl` and `summary.json` in each run folder stay the source
of truth, and `sync_from_folder` refreshes a row from them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from regretless.errors import UserError

SCHEMA_VERSION = 1
STATUSES = ("queued", "running", "done", "diverged", "failed")
METRIC_COLUMNS = ("final_loss", "final_eval_loss", "best_eval_loss", "final_reward", "final_eval_accuracy",
                  "best_eval_accuracy", "steps", "wall_s", "lr", "trainable_params")
COLUMNS = ("id", "name", "command", "config_json", "axes_json", "tags_json", "status", "error", "started",
           "finished", *METRIC_COLUMNS, "path")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, command TEXT NOT NULL, config_json TEXT NOT NULL,
  axes_json TEXT NOT NULL DEFAULT '{{}}', tags_json TEXT NOT NULL DEFAULT '[]',
  status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
  error TEXT, started REAL, finished REAL,
  final_loss REAL, final_eval_loss REAL, best_eval_loss REAL, final_reward REAL, final_eval_accuracy REAL,
  best_eval_accuracy REAL, steps INTEGER, wall_s REAL, lr REAL, trainable_params INTEGER,
  path TEXT NOT NULL
);
"""


class Ledger:
    """`Ledger(DIR / "ledger.sqlite")`; each method opens its own short transaction (process-safe)."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as con:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('kind', 'regretless-ledger')")
            found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        if found != str(SCHEMA_VERSION):
            raise UserError(f"{self.path}: ledger schema version {found}, but this regretless reads version "
                            f"{SCHEMA_VERSION}; sweep into a new --out folder (or move the old ledger away)")

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable up to the last checkpoint
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a regretless ledger ({e})") from None
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    # -- writes ------------------------------------------------------------------------------------------
    def add_run(self, id: str, name: str, command: str, config: dict[str, Any], axes: dict[str, Any],
                path: str, tags: list[str] | tuple[str, ...] = ()) -> None:
        """Register a run as queued; an existing row keeps its status and metrics (resumable sweeps)."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO runs (id, name, command, config_json, axes_json, tags_json, path) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                "axes_json=excluded.axes_json, tags_json=excluded.tags_json, path=excluded.path",
                (id, name, command, json.dumps(config, sort_keys=True, default=str),
                 json.dumps(axes, default=str), json.dumps(list(tags)), path))

    def update(self, id: str, **fields: Any) -> None:
        bad = [k for k in fields if k not in COLUMNS or k == "id"]
        if bad:
            raise ValueError(f"unknown ledger column {bad[0]!r}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"bad status {fields['status']!r}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as con:
            cur = con.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*fields.values(), id))
            if cur.rowcount != 1:
                raise KeyError(f"run {id!r} is not in {self.path}")

    def mark_running(self, id: str) -> None:
        self.update(id, status="running", started=time.time(), finished=None, error=None)

    def record_summary(self, id: str, summary: dict[str, Any]) -> None:
        """Copy a run's summary.json into its row (status done or diverged)."""
        status = summary.get("status", "done")
        self.update(id, status=status if status in ("done", "diverged") else "done", finished=time.time(),
                    error=None, **{k: _num(summary.get(k)) for k in METRIC_COLUMNS})

    def record_failure(self, id: str, error: str) -> None:
        self.update(id, status="failed", finished=time.time(), error=error)

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, value))

    # -- reads -------------------------------------------------------------------------------------------
    def get(self, id: str) -> dict[str, Any] | None:
        rows = self._select("WHERE id = ?", (id,))
        return rows[0] if rows else None

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._select("WHERE status = ?", (status,)) if status else self._select("", ())

    def meta(self) -> dict[str, str]:
        con = self._connect()
        try:
            return {r["key"]: r["value"] for r in con.execute("SELECT key, value FROM meta")}
        finally:
            con.close()

    def _select(self, where: str, params: tuple) -> list[dict[str, Any]]:
        con = self._connect()
        try:
            rows = con.execute(f"SELECT * FROM runs {where} ORDER BY rowid", params).fetchall()
        finally:
            con.close()
        out = []
        for r in rows:
            d = dict(r)
            d["config"] = json.loads(d.pop("config_json"))
            d["axes"] = json.loads(d.pop("axes_json"))
            d["tags"] = json.loads(d.pop("tags_json"))
            out.append(d)
        return out

    def counts(self) -> dict[str, int]:
        con = self._connect()
        try:
            rows = con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        finally:
            con.close()
        return {s: 0 for s in STATUSES} | {r[0]: r[1] for r in rows}


def _num(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
