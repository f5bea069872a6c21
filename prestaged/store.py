"""Persistent state in SQLite: what was warmed when, which files belong to which definition, runs.

One database file (WAL, foreign keys, a busy timeout so several prestaged processes can share
it), schema versioned with ``PRAGMA user_version`` and upgraded by forward migrations.

Writes are batched so the store never limits throughput: outcomes and memberships are buffered
and written in one transaction once ``batch`` rows are waiting or ``flush_interval`` seconds have
passed (about 4 ms per 500 rows). The warming path never waits for the database: if another
process holds the write lock, the rows stay buffered for the next turn. A crash therefore loses
at most the open batch, and those files are simply warmed again. Reads the engine needs (which of
these files are still fresh?) are asked per chunk of files, in a worker thread.

Times are stored as Unix seconds (REAL, UTC).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prestaged.catalog import FileRef
from prestaged.errors import StateError
from prestaged.storage.http import Result
from prestaged.warm import Outcome

__all__ = [
    "SCHEMA_VERSION",
    "DatasetStatus",
    "RunRecord",
    "Store",
    "StoreRecorder",
    "default_state_path",
]

log = logging.getLogger(__name__)

_OK = (Result.WARM.value, Result.EMPTY.value)

# Forward migrations: MIGRATIONS[i] takes a database from user_version i to i + 1.
MIGRATIONS: list[str] = [
    # 1: files, definitions, their membership, runs.
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        url TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        status TEXT,              -- last outcome: warm, empty, missing, denied, failed
        http_status INTEGER,
        bytes INTEGER,
        attempts INTEGER,
        last_error TEXT,
        last_try REAL,            -- when the last outcome was recorded
        last_warm REAL            -- last successful touch (warm or empty)
    );
    CREATE TABLE definitions (
        id INTEGER PRIMARY KEY,
        catalog TEXT NOT NULL,
        name TEXT NOT NULL,
        UNIQUE (catalog, name)
    );
    CREATE TABLE members (
        definition_id INTEGER NOT NULL REFERENCES definitions(id) ON DELETE CASCADE,
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        PRIMARY KEY (definition_id, file_id)
    ) WITHOUT ROWID;
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        definition_id INTEGER NOT NULL REFERENCES definitions(id) ON DELETE CASCADE,
        started REAL NOT NULL,
        ended REAL,
        counts TEXT,              -- JSON {result: n}
        exit_code INTEGER,
        reason TEXT
    );
    """,
    # 2: file sizes from the catalog, the run's host and pid (who ran it), and an index for
    # "runs of a definition, newest first".
    """
    ALTER TABLE files ADD COLUMN size INTEGER;
    ALTER TABLE runs ADD COLUMN host TEXT;
    ALTER TABLE runs ADD COLUMN pid INTEGER;
    CREATE INDEX runs_by_definition ON runs (definition_id, started);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_state_path(env: Optional[Mapping[str, str]] = None) -> Path:
    """``$XDG_STATE_HOME/prestaged/state.db``, else ``~/.local/state/prestaged/state.db``."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")).expanduser()
                                             / ".local" / "state")
    return Path(base) / "prestaged" / "state.db"


@dataclass(frozen=True)
class RunRecord:
    """One row of ``prestaged history``."""

    id: int
    catalog: str
    definition: str
    started: float
    ended: Optional[float]
    counts: dict[str, int]
    exit_code: Optional[int]
    reason: Optional[str]
    host: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class DatasetStatus:
    """How warm one definition is, as ``prestaged status`` shows it."""

    catalog: str
    definition: str
    files: int
    fresh: int
    """Files warmed (or found empty) within ``fresh_for``."""
    stale: int
    """Files warmed once, but longer ago than ``fresh_for``."""
    failed: dict[str, int]
    """Files whose last outcome was not a success, by result."""
    never: int
    """Member files never tried."""
    last_run: Optional[RunRecord]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dict(self.__dict__)
        d["last_run"] = self.last_run.to_dict() if self.last_run else None
        return d


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, fast commits


def _connect(path: Path, *, busy_timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    _configure(conn)
    return conn


class Store:
    """The state database at ``path``; ``open()`` it before use and ``close()`` it after.

    ``batch``: rows per write transaction (default 500); ``flush_interval``: seconds an outcome
    may wait before it is written (default 1); ``busy_timeout``: seconds to wait for another
    process holding the write lock (default 30).
    """

    def __init__(self, path: Path, *, batch: int = 500, flush_interval: float = 1.0,
                 busy_timeout: float = 30.0) -> None:
        self.path = path
        self.batch = batch
        self.flush_interval = flush_interval
        self.busy_timeout = busy_timeout
        self._conn: Optional[sqlite3.Connection] = None
        # One connection for reads and writes, guarded by _lock (reads come from worker
        # threads via asyncio.to_thread). Outcomes wait in _buffer and are written by the
        # caller's own thread a batch at a time, in one short transaction. A writer thread was
        # tried first: sharing the GIL with the event loop cost 15% of the warming rate.
        self._lock = threading.RLock()
        self._read_lock = self._lock
        self._buffer: collections.deque[tuple[str, Any]] = collections.deque()
        self._last_write = time.monotonic()

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> Store:
        """Open (creating or migrating) the database.

        Raises ``StateError`` (exit 2) for a file that is not a SQLite database, a database
        that is not prestaged's, or one written by a newer prestaged; such files are left as
        they are.
        """
        if self.path.exists() and not self.path.is_file():
            raise StateError(f"state {self.path}: not a regular file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"state {self.path}: cannot open: {e}") from e
        try:
            self._migrate(conn)
            _configure(conn)
        except sqlite3.OperationalError as e:
            conn.close()
            raise StateError(f"state {self.path}: cannot use it: {e}") from e
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StateError(
                f"state {self.path}: not a prestaged state database ({e}); "
                "move it away or choose another file with --state"
            ) from e
        except StateError:
            conn.close()
            raise
        self._conn = conn
        return self

    def close(self) -> None:
        """Write everything still queued, stop the writer and close the database."""
        if self._conn is None:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to ``SCHEMA_VERSION``; safe when several processes open at once."""
        if self._version(conn) == SCHEMA_VERSION:
            return
        # The write lock is taken before the version is read again: of two processes opening a
        # new file together, the second waits, then finds nothing left to do.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._version(conn)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if version < SCHEMA_VERSION:
            log.info("state %s: schema version %d -> %d", self.path, version, SCHEMA_VERSION)
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: once per file is enough

    def _version(self, conn: sqlite3.Connection) -> int:
        """The schema version, after checking the file is ours and not from the future."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state {self.path}: schema version {version} is newer than this prestaged "
                f"knows ({SCHEMA_VERSION}); upgrade prestaged or use another --state file"
            )
        if version == 0:
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables:
                raise StateError(
                    f"state {self.path}: a SQLite database of something else (tables: "
                    f"{', '.join(sorted(tables)[:5])}); choose another file with --state"
                )
        return version

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (reads go through ``_read_lock``)."""
        if self._conn is None:
            raise RuntimeError("Store.open() was not called")
        return self._conn

    # --- writes (queued) ----------------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        self._buffer.append((kind, payload))
        due = time.monotonic() - self._last_write >= self.flush_interval
        if len(self._buffer) >= self.batch or due:
            self._write_buffer(wait=False)

    def _write_buffer(self, *, wait: bool) -> bool:
        """Write what is buffered in one transaction; True when the buffer was emptied.

        ``wait=False`` (the warming path) never blocks for long: if a read holds the
        connection or another process holds the database's write lock, the rows stay buffered
        for the next turn. ``wait=True`` (flush) waits up to ``busy_timeout``.
        """
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            items = [self._buffer.popleft() for _ in range(len(self._buffer))]
            if not items:
                return True
            conn = self.conn
            conn.execute(f"PRAGMA busy_timeout = {int(1000 * self.busy_timeout) if wait else 20}")
            try:
                self._write(conn, items)
            except sqlite3.OperationalError as e:
                self._buffer.extendleft(reversed(items))
                if wait or ("locked" not in str(e) and "busy" not in str(e)):
                    raise StateError(f"state {self.path}: writing failed: {e}") from e
                return False
            self._last_write = time.monotonic()
            return True
        finally:
            self._lock.release()

    def add_members(self, catalog: str, definition: str, refs: Sequence[FileRef]) -> None:
        """Record that ``refs`` belong to ``definition`` (queued)."""
        self._put("members", (catalog, definition, list(refs)))

    def record(self, url: str, name: str, result: str, http_status: Optional[int],
               nbytes: int, attempts: int, error: str, when: Optional[float] = None) -> None:
        """Record one file's outcome (queued; skipped_fresh is not an outcome to record)."""
        self._put("outcome", (url, name, result, http_status, nbytes, attempts, error,
                              time.time() if when is None else when))

    def flush(self) -> None:
        """Write everything buffered now (waits up to ``busy_timeout`` for the write lock)."""
        while self._buffer:
            self._write_buffer(wait=True)

    def _write(self, conn: sqlite3.Connection, items: list[tuple[str, Any]]) -> None:
        outcomes = [p for k, p in items if k == "outcome"]
        members = [p for k, p in items if k == "members"]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for catalog, definition, refs in members:
                self._write_members(conn, catalog, definition, refs)
            if outcomes:
                conn.executemany(_UPSERT_OUTCOME, outcomes)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _write_members(conn: sqlite3.Connection, catalog: str, definition: str,
                       refs: list[FileRef]) -> None:
        def_id = _definition_id(conn, catalog, definition)
        conn.executemany(
            "INSERT INTO files (url, name, size) VALUES (?, ?, ?) ON CONFLICT (url) DO UPDATE "
            "SET size = COALESCE(excluded.size, files.size)",
            [(r.url, r.name, r.size) for r in refs],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO members (definition_id, file_id) "
            "SELECT ?, id FROM files WHERE url = ?",
            [(def_id, r.url) for r in refs],
        )

    # --- runs ---------------------------------------------------------------------------------

    def start_run(self, catalog: str, definition: str) -> int:
        """Record the start of a run now (written at once, not queued); return its id."""
        with self._read_lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                def_id = _definition_id(conn, catalog, definition)
                cur = conn.execute(
                    "INSERT INTO runs (definition_id, started, host, pid) VALUES (?, ?, ?, ?)",
                    (def_id, time.time(), os.uname().nodename, os.getpid()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        assert cur.lastrowid is not None
        return cur.lastrowid

    def finish_run(self, run_id: int, counts: Mapping[str, int], exit_code: int,
                   reason: str) -> None:
        """Flush queued outcomes, then record how run ``run_id`` ended."""
        self.flush()
        with self._read_lock:
            self.conn.execute(
                "UPDATE runs SET ended = ?, counts = ?, exit_code = ?, reason = ? WHERE id = ?",
                (time.time(), json.dumps(dict(counts), sort_keys=True), exit_code, reason, run_id),
            )

    # --- reads --------------------------------------------------------------------------------

    def fresh_urls(self, urls: Iterable[str], fresh_for: float,
                   now: Optional[float] = None) -> set[str]:
        """Those of ``urls`` successfully touched within the last ``fresh_for`` seconds."""
        since = (time.time() if now is None else now) - fresh_for
        wanted = list(urls)
        found: set[str] = set()
        with self._read_lock:
            for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit is 999+
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.conn.execute(
                    f"SELECT url FROM files WHERE url IN ({marks}) AND last_warm >= ?",
                    [*chunk, since],
                )
                found.update(r[0] for r in rows)
        return found

    def status(self, fresh_for: float, definition: Optional[str] = None,
               catalog: Optional[str] = None, now: Optional[float] = None) -> list[DatasetStatus]:
        """Warmth of every recorded definition (or of the one named)."""
        since = (time.time() if now is None else now) - fresh_for
        query = "SELECT id, catalog, name FROM definitions"
        args: list[Any] = []
        if definition is not None:
            query += " WHERE name = ?" + (" AND catalog = ?" if catalog else "")
            args = [definition, *([catalog] if catalog else [])]
        out = []
        with self._read_lock:
            found = self.conn.execute(query + " ORDER BY catalog, name", args).fetchall()
            for def_id, cat, name in found:
                out.append(self._status_of(def_id, cat, name, since))
        return out

    def _status_of(self, def_id: int, catalog: str, name: str, since: float) -> DatasetStatus:
        rows = self.conn.execute(
            "SELECT f.status, f.last_warm >= ?, f.last_warm IS NOT NULL, COUNT(*) "
            "FROM members m JOIN files f ON f.id = m.file_id WHERE m.definition_id = ? "
            "GROUP BY 1, 2, 3", (since, def_id),
        ).fetchall()
        files = fresh = stale = never = 0
        failed: Counter[str] = Counter()
        for status, is_fresh, ever_warm, n in rows:
            files += n
            if status is None:
                never += n
            elif status not in _OK:
                failed[status] += n
            elif is_fresh:
                fresh += n
            elif ever_warm:
                stale += n
        last = self.runs(limit=1, definition_id=def_id)
        return DatasetStatus(catalog, name, files, fresh, stale, dict(failed), never,
                             last[0] if last else None)

    def runs(self, limit: int = 20, definition_id: Optional[int] = None) -> list[RunRecord]:
        """Recent runs, newest first."""
        query = ("SELECT r.id, d.catalog, d.name, r.started, r.ended, r.counts, r.exit_code, "
                 "r.reason, r.host FROM runs r JOIN definitions d ON d.id = r.definition_id")
        args: list[Any] = []
        if definition_id is not None:
            query += " WHERE r.definition_id = ?"
            args.append(definition_id)
        query += " ORDER BY r.started DESC, r.id DESC LIMIT ?"
        args.append(limit)
        with self._read_lock:
            rows = self.conn.execute(query, args).fetchall()
        return [RunRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else {},
                          r[6], r[7], r[8]) for r in rows]


def _definition_id(conn: sqlite3.Connection, catalog: str, definition: str) -> int:
    conn.execute("INSERT OR IGNORE INTO definitions (catalog, name) VALUES (?, ?)",
                 (catalog, definition))
    row = conn.execute("SELECT id FROM definitions WHERE catalog = ? AND name = ?",
                       (catalog, definition)).fetchone()
    return int(row[0])


# An outcome never erases a newer success written by another process: last_warm only grows.
_UPSERT_OUTCOME = """
INSERT INTO files (url, name, status, http_status, bytes, attempts, last_error, last_try,
                   last_warm)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, CASE WHEN ?3 IN ('warm', 'empty') THEN ?8 END)
ON CONFLICT (url) DO UPDATE SET
    status = excluded.status,
    http_status = excluded.http_status,
    bytes = excluded.bytes,
    attempts = excluded.attempts,
    last_error = excluded.last_error,
    last_try = MAX(COALESCE(files.last_try, 0), excluded.last_try),
    last_warm = NULLIF(MAX(COALESCE(files.last_warm, 0), COALESCE(excluded.last_warm, 0)), 0)
"""


class StoreRecorder:
    """Connects one run of the engine to the store (see ``warm.Recorder``).

    Every file the catalog yields becomes a member of the definition; files successfully
    touched within ``fresh_for`` seconds are not touched again unless ``force``.
    """

    def __init__(self, store: Store, catalog: str, definition: str, *, fresh_for: float,
                 force: bool = False) -> None:
        self.store = store
        self.catalog = catalog
        self.definition = definition
        self.fresh_for = fresh_for
        self.force = force

    async def admit(self, refs: list[FileRef]) -> list[FileRef]:
        """Record membership; return the files of ``refs`` that need touching."""
        self.store.add_members(self.catalog, self.definition, refs)
        if self.force or self.fresh_for <= 0:
            return refs
        fresh = await asyncio.to_thread(self.store.fresh_urls, [r.url for r in refs],
                                        self.fresh_for)
        return [r for r in refs if r.url not in fresh] if fresh else refs

    def record(self, outcome: Outcome) -> None:
        """Queue one file's outcome for writing."""
        self.store.record(outcome.url, outcome.name, outcome.result.value, outcome.status,
                          outcome.bytes, outcome.attempts, outcome.error)
