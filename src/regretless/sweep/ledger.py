"""The sweep ledger: one SQLite file (DIR/ledger.sqlite) listing every run, its config, status and headline
metrics. Safe under concurrent writers (WAL journal, busy timeout, one short transaction per call).

The ledger is an index, not the record: `metrics.jsonl` and `summary.json` in each run folder stay the source
of truth (`record_summary` copies a summary into its row).

Which rows belong to the current spec: every row records `spec_hash`, the spec (and the set of runs it expanded
to) that last registered it; `meta.current_specs` lists the hashes that are current (the last sweep's, or
several when sweeps were run with `extend=True`). Rows of an older spec stay in the table, with their files,
but `current_rows(DIR)` leaves them out. A ledger that never recorded a spec (schema 1, or rows written by hand)
counts every row as current.
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

SCHEMA_VERSION = 2  # 2 added runs.spec_hash (schema 1 is migrated on open)
STATUSES = ("queued", "running", "done", "diverged", "failed")
METRIC_COLUMNS = ("final_loss", "final_eval_loss", "best_eval_loss", "final_reward", "final_eval_accuracy",
                  "best_eval_accuracy", "steps", "wall_s", "lr", "trainable_params")
COLUMNS = ("id", "name", "command", "config_json", "axes_json", "tags_json", "status", "error", "started",
           "finished", *METRIC_COLUMNS, "path", "spec_hash")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, command TEXT NOT NULL, config_json TEXT NOT NULL,
  axes_json TEXT NOT NULL DEFAULT '{{}}', tags_json TEXT NOT NULL DEFAULT '[]',
  status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
  error TEXT, started REAL, finished REAL,
  final_loss REAL, final_eval_loss REAL, best_eval_loss REAL, final_reward REAL, final_eval_accuracy REAL,
  best_eval_accuracy REAL, steps INTEGER, wall_s REAL, lr REAL, trainable_params INTEGER,
  path TEXT NOT NULL, spec_hash TEXT
);
"""


class Ledger:
    """`Ledger(DIR / "ledger.sqlite")`; each method opens its own short transaction (process-safe)."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._use_wal()
        with self._tx() as con:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('kind', 'regretless-ledger')")
            found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
            if found == "1":  # schema 1 -> 2: the column naming each row's spec
                con.execute("ALTER TABLE runs ADD COLUMN spec_hash TEXT")
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                found = str(SCHEMA_VERSION)
        if found != str(SCHEMA_VERSION):
            raise UserError(f"{self.path}: ledger schema version {found}, but this regretless reads version "
                            f"{SCHEMA_VERSION}; sweep into a new --out folder (or move the old ledger away)")

    def _use_wal(self) -> None:
        """Switch the file to WAL once (the mode is stored in the file). Changing the journal mode does not wait
        on the busy handler, so concurrent first openers retry here instead of failing."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            con = self._connect()
            try:
                if con.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                con.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise UserError(f"{self.path}: cannot open the ledger ({e})") from None
                time.sleep(0.05)
            except sqlite3.DatabaseError as e:
                raise UserError(f"{self.path}: not a regretless ledger ({e})") from None
            finally:
                con.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
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
                path: str, tags: list[str] | tuple[str, ...] = (), spec_hash: str | None = None) -> None:
        """Register a run as queued; an existing row keeps its status and metrics (resumable sweeps) and moves
        to `spec_hash`."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO runs (id, name, command, config_json, axes_json, tags_json, path, spec_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                "axes_json=excluded.axes_json, tags_json=excluded.tags_json, path=excluded.path, "
                "spec_hash=excluded.spec_hash",
                (id, name, command, json.dumps(config, sort_keys=True, default=str),
                 json.dumps(axes, default=str), json.dumps(list(tags)), path, spec_hash))

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
        """Copy a run's summary.json into its row (status done or diverged). A row already recorded as finished
        keeps its finish time (registering a finished run again, e.g. under a later spec, is not a finish)."""
        status = summary.get("status", "done")
        status = status if status in ("done", "diverged") else "done"
        row = self.get(id)
        kept = row and row.get("status") == status and row.get("finished")
        self.update(id, status=status, finished=row["finished"] if kept else time.time(),
                    error=None, **{k: _num(summary.get(k)) for k in METRIC_COLUMNS})

    def record_failure(self, id: str, error: str) -> None:
        self.update(id, status="failed", finished=time.time(), error=error)

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, value))

    def set_current_specs(self, hashes: list[str]) -> None:
        """The spec hashes whose rows are current (see the module docstring)."""
        self.set_meta("current_specs", json.dumps(list(hashes)))

    def current_specs(self) -> list[str] | None:
        """The current spec hashes, or None when this ledger never recorded any (then every row is current)."""
        v = self.meta().get("current_specs")
        return None if v is None else list(json.loads(v))

    # -- reads -------------------------------------------------------------------------------------------
    def get(self, id: str) -> dict[str, Any] | None:
        rows = self._select("WHERE id = ?", (id,))
        return rows[0] if rows else None

    def runs(self, status: str | None = None, current_only: bool = False) -> list[dict[str, Any]]:
        """Rows in insertion order; `current_only`: only rows of the current spec(s)."""
        rows = self._select("WHERE status = ?", (status,)) if status else self._select("", ())
        specs = self.current_specs() if current_only else None
        return rows if specs is None else [r for r in rows if r["spec_hash"] in specs]

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


def _ledger_path(where: str | Path) -> Path:
    p = Path(where)
    return p if p.suffix == ".sqlite" or p.is_file() else p / "ledger.sqlite"


def current_rows(where: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep folder (or of a ledger.sqlite path) that belong to its current spec: those the last
    `run_sweep` expanded (plus, after `extend=True` sweeps, the ones before it). Rows left by an older spec
    are not returned (`stale_rows` has them); their folders stay on disk. Each row as `Ledger.runs` gives
    it, plus `folder`: the run folder's absolute path."""
    path = _ledger_path(where)
    return [{**r, "folder": (path.parent / r["path"]).resolve()}
            for r in Ledger(path).runs(current_only=True)]


def stale_rows(where: str | Path) -> list[dict[str, Any]]:
    """The rows `current_rows` leaves out (an older spec's runs), with `folder` as there."""
    path = _ledger_path(where)
    keep = {r["id"] for r in current_rows(path)}
    return [{**r, "folder": (path.parent / r["path"]).resolve()} for r in Ledger(path).runs() if r["id"] not in keep]


def _num(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
