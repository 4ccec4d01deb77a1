"""The SQLite ledger: the source of truth for what finished, one row per task.

A row is written only after its files are renamed into place, so a row never names a missing
file. Rows that finish in the same turn of the event loop are committed together, right after:
a group commit that adds no waiting, so a kill loses at most the results of that one turn.
The database runs in WAL mode; a committed row survives a killed process.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from batcher import fastjson
from batcher.errors import UsageError
from batcher.records import Record

LEDGER_NAME = "ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id          TEXT PRIMARY KEY,
    job         TEXT NOT NULL,
    provider    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    model       TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    seed        INTEGER,
    vars        TEXT,
    params      TEXT,
    status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    attempts    INTEGER NOT NULL,
    reason      TEXT,
    error       TEXT,
    error_code  TEXT,
    http_status INTEGER,
    files       TEXT NOT NULL DEFAULT '[]',
    usage       TEXT,
    response    TEXT,
    started     REAL,
    finished    REAL,
    elapsed     REAL
);
"""

# Which task owns the files of each stem (``<job>/<model>/<slug>-s<seed>-<id16>``; see
# Ledger.claim). A separate table: no column of a task row changes, so older batchers and
# shards read this ledger as before.
_CLAIMS = "CREATE TABLE IF NOT EXISTS claims (stem TEXT PRIMARY KEY, id TEXT NOT NULL) " \
    "WITHOUT ROWID"

# Columns added since the first schema, with their SQL types, in order. A ledger written by an
# older batcher gains them when opened for writing; read-only, and in another shard's older
# ledger, they read as NULL. A new column goes here, as a Record field (after the others, in the
# same order) and at the end of Record.as_row.
ADDED_COLUMNS: dict[str, str] = {"request_id": "TEXT", "cost_usd": "REAL", "derived": "TEXT"}

_COLUMNS = (
    "id", "job", "provider", "kind", "model", "prompt", "seed", "vars", "params", "status",
    "attempts",
    "reason", "error", "error_code", "http_status", "files", "usage", "response", "started",
    "finished", "elapsed", *ADDED_COLUMNS,
)
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in {"id", "attempts"})
    + ", attempts = tasks.attempts + excluded.attempts"
)


class Ledger:
    """One output folder's ledger. Not thread-safe: use it from the event loop's thread."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._db.execute(_CLAIMS)
                for column, kind in ADDED_COLUMNS.items():
                    if column not in _columns_of(self._db, "main"):
                        self._db.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
            self._db.execute("SELECT count(*) FROM tasks").fetchone()
            present = _columns_of(self._db, "main")
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{path}: not a batcher ledger ({exc})") from None
        self._select_records = "SELECT {} FROM tasks ORDER BY rowid".format(", ".join(
            f.name if f.name in present else f"NULL AS {f.name}" for f in fields(Record)))
        self._db.row_factory = sqlite3.Row
        self._pending: list[Record] = []
        self._claims: dict[str, str] = {}  # stem -> id, claimed since the last flush
        self._flush_scheduled = False

    @classmethod
    def open_existing(cls, output: Path) -> Ledger | None:
        path = output / LEDGER_NAME
        return cls(path, readonly=True) if path.is_file() else None

    def close(self) -> None:
        self.flush()
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def record(self, record: Record) -> None:
        """Queue a row; it is committed with the others of this loop turn, right after it."""
        self._pending.append(record)
        self._schedule_flush()

    def claim(self, stem: str, task_id: str) -> str | None:
        """Claim the files named ``stem`` (and ``stem`` + a suffix) for ``task_id``, before
        it is sent: returns the id of another task that claimed them first (its files would
        be overwritten: the caller must not write), else None (claimed, or already its own).
        A claim is committed with the rows of its loop turn and stays with the ledger."""
        owner = self._claims.get(stem)
        if owner is None:
            row = self._db.execute("SELECT id FROM claims WHERE stem = ?", (stem,)).fetchone()
            owner = row[0] if row else None
        if owner is None:
            self._claims[stem] = task_id
            self._schedule_flush()
            return None
        return None if owner == task_id else str(owner)

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Commit every queued row in one transaction."""
        self._flush_scheduled = False
        if not self._pending and not self._claims:
            return
        rows, self._pending = self._pending, []
        claims, self._claims = self._claims, {}
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(_UPSERT, [r.as_row() for r in rows])
            self._db.executemany("INSERT OR IGNORE INTO claims (stem, id) VALUES (?, ?)",
                                 claims.items())

    def absorb(self, other: Path) -> list[str]:
        """Take in another ledger's rows: the one merge policy for every place ledgers meet
        (``merge``, a store's shards, adoption). An ok row wins over a failed one, else the
        later one (by ``finished``); a row taken keeps its attempt count. Returns the ids of
        the rows taken."""
        self.flush()
        try:
            self._db.execute("ATTACH DATABASE ? AS other", (f"file:{other}?mode=ro",))
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{other}: not a batcher ledger ({exc})") from None
        try:
            with self._db:
                self._db.execute("BEGIN")
                theirs = _columns_of(self._db, "other")
                taken = self._db.execute(
                    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) "
                    f"SELECT {', '.join(c if c in theirs else 'NULL' for c in _COLUMNS)} "
                    "FROM other.tasks WHERE true "
                    "ON CONFLICT(id) DO UPDATE SET "
                    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "id")
                    + " WHERE (excluded.status = 'ok') > (tasks.status = 'ok') OR "
                    "((excluded.status = 'ok') = (tasks.status = 'ok') AND "
                    "coalesce(excluded.finished, 0) > coalesce(tasks.finished, 0)) "
                    "RETURNING id").fetchall()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{other}: not a batcher ledger ({exc})") from None
        finally:
            self._db.execute("DETACH DATABASE other")
        return [row[0] for row in taken]

    def remove(self, ids: Iterable[str]) -> None:
        """Delete the rows of ``ids`` in one transaction (``batcher prune``)."""
        self.flush()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM tasks WHERE id = ?", ((i,) for i in ids))
            if "claims" in _tables_of(self._db):  # their names are free again
                self._db.execute("DELETE FROM claims WHERE id NOT IN (SELECT id FROM tasks)")

    def snapshot(self, target: Path) -> None:
        """A consistent copy of the whole ledger at ``target`` (for publishing it)."""
        self.flush()
        copy = sqlite3.connect(target)
        try:
            self._db.backup(copy)
        finally:
            copy.close()

    # ------------------------------------------------------------------ reading

    def statuses(self, present: FilePresent | Path) -> tuple[set[str], set[str]]:
        """(done, failed): ids whose latest record is ok with every file present at its
        recorded size, and ids whose latest record is failed. ``present`` says whether a file
        is there at a size (a folder: its files on disk)."""
        if isinstance(present, Path):
            present = on_disk(present)
        done: set[str] = set()
        failed: set[str] = set()
        for task_id, status, files in self._db.execute("SELECT id, status, files FROM tasks"):
            if status == "failed":
                failed.add(task_id)
            elif all(present(path, size) for path, size, _sha in fastjson.loads(files)):
                done.add(task_id)
        return done, failed

    def records(self) -> Iterator[Record]:
        """Every record, in the order first written, read as they are consumed."""
        for row in self._db.execute(self._select_records):
            yield Record.from_row(row)

    def ok_costs(self) -> Iterator[tuple[str, str, float | None]]:
        """(id, job, cost_usd) of every ok task; the cost is None where it was unknown (or the
        row was written before batcher kept costs)."""
        cost = "cost_usd" if "cost_usd" in _columns_of(self._db, "main") else "NULL"
        query = f"SELECT id, job, {cost} FROM tasks WHERE status = 'ok'"
        yield from self._db.execute(query)

    def last_finished(self) -> float:
        """When the newest record was written (0 for an empty ledger)."""
        return float(self._db.execute("SELECT max(finished) FROM tasks").fetchone()[0] or 0)

    def derived_states(self) -> Iterator[tuple[str, str, Any]]:
        """(id, job, derived) of every ok row, ``derived`` decoded (None when empty)."""
        if "NULL AS derived" in self._select_records:  # an older ledger opened read-only
            return
        query = "SELECT id, job, derived FROM tasks WHERE status = 'ok'"
        for task_id, job, derived in self._db.execute(query):
            yield task_id, job, fastjson.loads(derived) if derived else None

    def records_by_id(self, ids: Sequence[str]) -> list[Record]:
        """The records of ``ids`` (those the ledger has)."""
        found: list[Record] = []
        for start in range(0, len(ids), 500):  # SQLite caps the parameters of one query
            chunk = ids[start:start + 500]
            query = self._select_records.replace(
                " ORDER BY rowid", f" WHERE id IN ({', '.join('?' * len(chunk))})")
            found.extend(Record.from_row(row) for row in self._db.execute(query, chunk))
        return found


def _tables_of(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _columns_of(db: sqlite3.Connection, schema: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA {schema}.table_info(tasks)")}


FilePresent = Callable[[str, int], bool]


def on_disk(root: Path) -> FilePresent:
    """Whether a ledger's file is under ``root`` at its recorded size."""
    def present(path: str, size: int) -> bool:
        try:
            return os.stat(root / path).st_size == size
        except OSError:
            return False
    return present
