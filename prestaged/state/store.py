"""Persistent state in SQLite: what was warmed when, which files belong to which definition, runs.

One database file (WAL, foreign keys, a busy timeout so several prestaged processes can share
it), schema versioned with ``PRAGMA user_version`` and upgraded by forward migrations.

Writes are batched so the store never limits throughput: outcomes and memberships are buffered
and, once ``batch`` rows are waiting or ``flush_interval`` seconds have passed, sent as one JSON
line to a writer process (``store_writer.py``) that commits each batch in one transaction. The
warming process never runs SQLite's per-row work (in a thread it cost 12-15% of the rate, in a
process 9%: bench/throughput.py). A crash of the warming process loses at most the open batch
(the writer finishes what it was sent), and those files are simply warmed again. Reads the
engine needs (which of these files are still fresh?) are asked per chunk of files, in a worker
thread.

Times are stored as Unix seconds (REAL, UTC).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prestaged.errors import StateError
from prestaged.model import FileRef, Outcome, Result
from prestaged.state import writer as store_writer

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
        id INTEGER PRIMARY KEY,   -- url_id(url): a 64-bit hash, so no index on the URL text
        url TEXT NOT NULL,
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
    # 3: campaign submissions (campaigns.py), their state transitions, and the drainingn ledger
    # of files a stage has taken, so that no file is ever submitted twice by one stage.
    """
    CREATE TABLE campaign_submissions (
        id INTEGER PRIMARY KEY,
        campaign TEXT NOT NULL,
        stage TEXT NOT NULL,
        item TEXT NOT NULL,       -- all, a list item, or slice-N of a drainingn split
        definition TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        n_files INTEGER,
        exit_code INTEGER,
        job_id TEXT,
        output_tail TEXT,
        UNIQUE (campaign, stage, item)
    );
    CREATE TABLE submission_events (
        id INTEGER PRIMARY KEY,
        submission_id INTEGER NOT NULL REFERENCES campaign_submissions(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT
    );
    CREATE INDEX submission_events_by_submission ON submission_events (submission_id, id);
    CREATE TABLE campaign_ledger (
        campaign TEXT NOT NULL,
        stage TEXT NOT NULL,
        name TEXT NOT NULL,
        url TEXT NOT NULL,
        submission_id INTEGER NOT NULL REFERENCES campaign_submissions(id) ON DELETE CASCADE,
        PRIMARY KEY (campaign, stage, name)
    ) WITHOUT ROWID;
    CREATE INDEX campaign_ledger_by_submission ON campaign_ledger (submission_id);
    """,
    # 4: operator controls of campaigns (stage '') and stages: hold/release and cancel; and
    # the retry that supersedes a launch_unknown submission released by the operator.
    """
    ALTER TABLE campaign_submissions ADD COLUMN superseded_by INTEGER
        REFERENCES campaign_submissions(id);
    CREATE TABLE campaign_controls (
        campaign TEXT NOT NULL,
        stage TEXT NOT NULL,      -- '' for the whole campaign
        held INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        updated REAL NOT NULL,
        reason TEXT,
        PRIMARY KEY (campaign, stage)
    ) WITHOUT ROWID;
    """,
    # 5: campaigns the daemon runs (`prestaged campaign add`): the file's text as added, so a
    # restarted daemon resumes them without the file.
    """
    CREATE TABLE campaigns (
        name TEXT PRIMARY KEY,
        source TEXT,              -- the path it was added from, for people (never re-read)
        body TEXT NOT NULL,       -- the campaign file's TOML text
        added REAL NOT NULL,
        updated REAL NOT NULL
    ) WITHOUT ROWID;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def url_id(url: str) -> int:
    """The files table's key for ``url``: 64 bits of BLAKE2b as a signed SQLite integer.

    Keying on a hash keeps the URL text out of every index (a 20,000-file run wrote ~40% less);
    a collision needs about 4 billion distinct URLs to become likely.
    """
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big",
                          signed=True)


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
        # Reads (and run rows) use this process's connection, guarded by _lock (reads come
        # from worker threads via asyncio.to_thread). Outcomes and memberships wait in _buffer
        # and go a batch at a time to a writer process (store_writer.py), which commits each
        # batch in one transaction: SQLite's per-row work then costs the warming process
        # nothing but a JSON line.
        self._lock = threading.RLock()
        self._buffer: list[tuple[str, Any]] = []
        self._last_send = time.monotonic()
        self._writer: Optional[subprocess.Popen[bytes]] = None
        self._flushes = 0

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
        try:
            self._writer = subprocess.Popen(
                [sys.executable, str(Path(store_writer.__file__)), str(self.path),
                 str(self.busy_timeout)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        except OSError as e:
            conn.close()
            self._conn = None
            raise StateError(f"state {self.path}: cannot start the writer: {e}") from e
        return self

    def close(self) -> None:
        """Write everything still queued, stop the writer and close the database."""
        if self._conn is None:
            return
        try:
            self.flush()
        finally:
            writer, self._writer = self._writer, None
            if writer is not None:
                assert writer.stdin is not None
                with contextlib.suppress(OSError):
                    writer.stdin.close()
                writer.wait(timeout=self.busy_timeout + 30)
                if writer.stdout is not None:
                    writer.stdout.close()
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
        if 0 < version < SCHEMA_VERSION:
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
        """The open connection (guarded by ``_lock``)."""
        if self._conn is None:
            raise RuntimeError("Store.open() was not called")
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error),
        under this store's lock: for small synchronous writes that must be durable at once
        (campaign state), not for outcomes (those go through the writer process)."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # --- writes (queued) ----------------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._buffer.append((kind, payload))
            due = time.monotonic() - self._last_send >= self.flush_interval
            if len(self._buffer) >= self.batch or due:
                self._send()

    def _send(self) -> None:
        """Hand the buffered rows to the writer process as one batch (caller holds _lock)."""
        items, self._buffer = self._buffer, []
        self._last_send = time.monotonic()
        if not items:
            return
        members = []
        for kind, payload in items:
            if kind == "members":
                catalog, definition, refs = payload
                members.append([catalog, definition,
                                [[url_id(r.url), r.url, r.name, r.size] for r in refs]])
        doc = {"members": members, "outcomes": [p for kind, p in items if kind == "outcome"]}
        self._line(json.dumps(doc, separators=(",", ":")))

    def _line(self, line: str) -> None:
        writer = self._writer
        if writer is None or writer.stdin is None:
            raise RuntimeError("Store.open() was not called")
        try:
            writer.stdin.write(line.encode() + b"\n")
            writer.stdin.flush()
        except OSError as e:
            raise StateError(f"state {self.path}: the writer process died "
                             f"(exit {writer.poll()}): {e}") from e

    def add_members(self, catalog: str, definition: str, refs: Sequence[FileRef]) -> None:
        """Record that ``refs`` belong to ``definition`` (queued)."""
        self._put("members", (catalog, definition, list(refs)))

    def record(self, url: str, name: str, result: str, http_status: Optional[int],
               nbytes: int, attempts: int, error: str, when: Optional[float] = None) -> None:
        """Record one file's outcome (queued; skipped_fresh is not an outcome to record)."""
        self._put("outcome", (url_id(url), url, name, result, http_status, nbytes, attempts,
                              error,
                              time.time() if when is None else when))

    def flush(self) -> None:
        """Block until everything recorded so far is committed."""
        with self._lock:
            self._send()
            self._flushes += 1
            seq = self._flushes
            self._line(json.dumps({"flush": seq}))
            assert self._writer is not None and self._writer.stdout is not None
            answer = self._writer.stdout.readline().decode().strip()
        if answer != f"ok {seq}":
            raise StateError(f"state {self.path}: the writer process failed "
                             f"(exit {self._writer.poll()}); see the message above")

    # --- runs ---------------------------------------------------------------------------------

    def start_run(self, catalog: str, definition: str) -> int:
        """Record the start of a run now (written at once, not queued); return its id."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                def_id = store_writer.definition_id(conn, catalog, definition)
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
        with self._lock:
            self.conn.execute(
                "UPDATE runs SET ended = ?, counts = ?, exit_code = ?, reason = ? WHERE id = ?",
                (time.time(), json.dumps(dict(counts), sort_keys=True), exit_code, reason, run_id),
            )

    # --- reads --------------------------------------------------------------------------------

    def fresh_urls(self, urls: Iterable[str], fresh_for: float,
                   now: Optional[float] = None) -> set[str]:
        """Those of ``urls`` successfully touched within the last ``fresh_for`` seconds."""
        since = (time.time() if now is None else now) - fresh_for
        by_id = {url_id(u): u for u in urls}
        wanted = list(by_id)
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit is 999+
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.conn.execute(
                    f"SELECT id FROM files WHERE id IN ({marks}) AND last_warm >= ?",
                    [*chunk, since],
                )
                found.update(by_id[r[0]] for r in rows)
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
        with self._lock:
            found = self.conn.execute(query + " ORDER BY catalog, name", args).fetchall()
            for def_id, cat, name in found:
                out.append(self._status_of(def_id, cat, name, since))
        return out

    def cold_urls(self, catalog: str, definition: str, fresh_for: float, limit: int = 5,
                  now: Optional[float] = None) -> list[str]:
        """Up to ``limit`` URLs (sorted) of ``definition``'s files not successfully touched
        within the last ``fresh_for`` seconds: never tried, failed (last outcome), or stale; the
        complement of ``DatasetStatus.fresh``."""
        since = (time.time() if now is None else now) - fresh_for
        with self._lock:
            rows = self.conn.execute(
                "SELECT f.url FROM definitions d JOIN members m ON m.definition_id = d.id "
                "JOIN files f ON f.id = m.file_id WHERE d.catalog = ? AND d.name = ? "
                "AND NOT COALESCE(f.status IN (?, ?) AND f.last_warm >= ?, 0) "
                "ORDER BY f.url LIMIT ?",
                (catalog, definition, *_OK, since, limit),
            ).fetchall()
        return [r[0] for r in rows]

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
        with self._lock:
            rows = self.conn.execute(query, args).fetchall()
        return [RunRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else {},
                          r[6], r[7], r[8]) for r in rows]


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
