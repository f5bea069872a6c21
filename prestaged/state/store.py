"""Persistent state: what was warmed when, which files belong to which definition, runs.

By default one SQLite file (WAL, foreign keys, a busy timeout so several prestaged processes
can share it), schema versioned with ``PRAGMA user_version`` and upgraded by forward
migrations; with ``url`` a PostgreSQL database (``state.postgres``) with the same schema. Both
are reached through ``state.db`` with the same SQL.

Writes are batched so the store never limits throughput: outcomes and memberships are buffered
and, once ``batch`` rows are waiting or ``flush_interval`` seconds have passed (a ticker thread
keeps that time even when nothing more is recorded; a stage request's rows go at once), sent as
one JSON line to a writer process (``state/writer.py``) that commits each batch in one
transaction. The warming process never runs SQLite's per-row work (in a thread it cost 12-15%
of the rate, in a process 9%: bench/throughput.py). A crash of the warming process loses at
most the open batch (the writer finishes what it was sent), and those files are simply warmed
again. PostgreSQL keeps the same writer process, speaking psycopg: its client side costs ~58 us
of CPU a file (SQLite's ~11 us), which in a thread would be the warming process's CPU and GIL.
Reads the engine needs (which of these files are still fresh?) are asked per chunk of files, in
a worker thread.

A cut PostgreSQL connection (the server restarted, an operator's ``pg_terminate_backend``, a
network partition) is survived on both sides. This process's reads and small transactions go
through a small ``psycopg_pool`` pool (``state.db.PooledDatabase``) that checks a connection
before handing it out: a call caught by the cut raises one ``StateError`` line (the store never
retries a write transaction itself: the caller decides), and the next call works on a new
connection. The writer retries a batch on a new connection for up to
``writer.RECONNECT_FOR`` seconds (a ``flush`` waits meanwhile) before it fails as on any other
error. Both name this process in ``pg_stat_activity`` (``prestaged/<pid>``,
``prestaged-writer/<pid>``).

A writer that gave up (that outage lasted longer; a SQLite lock was held past ``busy_timeout``)
fails every call that meets it with its one error line until the next run starts: ``start_run``
then starts a new writer, so a daemon goes on once the database takes writes again, without a
restart. The batches the old one had not committed are lost, as in a crash, and those files
are touched again. (Before, one such outage left a daemon up and ready but aborting every run
until someone restarted it.)

Batches reach the writer's pipe through a thread of their own (``_sender``), so a writer that
cannot write (an outage, a SQLite lock held for ``busy_timeout``) never stops the caller:
``record()`` runs on the daemon's event loop, and a full pipe used to freeze the loop, and with
it ``/metrics``, ``/healthz``, heartbeats and the systemd watchdog, for as long as the writer
waited. Up to ``OUTBOX_LIMIT`` bytes of batches wait in memory; past that the caller waits too.

Times are stored as Unix seconds (REAL, UTC). Files are keyed by a hash of their full URL; the
URL text kept beside it has its credentials redacted (``https://***@host/...``), so a URL with
a password in it never reaches the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, cast

from prestaged.errors import EXIT_USAGE, ConflictError, NotFoundError, StateError
from prestaged.model import FileRef, Outcome, Result, TapeInfo, redact
from prestaged.state import mounts, retention, schema
from prestaged.state.db import (
    Database,
    PooledDatabase,
    SqliteDatabase,
    describe_sqlite_error,
    driver_errors,
)
from prestaged.state.private import create_private
from prestaged.state.writer import PG_WRITE_LOCK

__all__ = [
    "DatasetStatus",
    "Listing",
    "Pin",
    "RunRecord",
    "Store",
    "StoreRecorder",
    "default_state_path",
    "describe_sqlite_error",
]

log = logging.getLogger(__name__)

WRITER_EXIT_WAIT = 5.0
"""Seconds a writer that gave up may take to exit before it is killed (``revive_writer``)."""

OUTBOX_LIMIT = 32 << 20
"""Bytes of batches that may wait for the writer process before ``record()`` waits for it:
some 200,000 outcomes, more than the files a daemon has in flight."""

CLOCK_RESYNC = 300.0
"""Seconds between two measures of the database's clock against ours (``Store.now``)."""
CLOCK_SKEW_WARN = 5.0
"""Seconds off the database's clock past which a host's clock is worth a WARNING."""
_DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"

_OK = (Result.WARM.value, Result.EMPTY.value)
_TAPE_ROWS = ("located", "staging", "wanted", "staged", "ended")
# Staging: a request of ours is open for the file (not landed, not ended without landing: a
# stage that timed out, failed or was cancelled or released leaves it tape-only). A run that
# was interrupted leaves its request open on the server, and so staging, until a rerun follows
# it or `release` cancels it.
_TAPE_COUNTS_OF = """
SELECT m.definition_id, f.locality, CASE WHEN f.stage_request IS NOT NULL AND f.staged_at IS NULL
                        AND f.stage_ended IS NULL THEN 1 ELSE 0 END, COUNT(*)
FROM members m JOIN files f ON f.id = m.file_id WHERE m.definition_id IN ({chosen})
GROUP BY 1, 2, 3
"""
_ON_DISK_LOCALITIES = ("DISK", "DISK_AND_TAPE")


def _tape_counts(rows: Iterable[tuple[Optional[str], int, int]]
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """(status buckets, raw localities) of a definition's ``_TAPE_COUNTS_OF`` rows."""
    buckets: Counter[str] = Counter()
    raw: Counter[str] = Counter()
    for locality, staging, n in rows:
        raw[locality or "unknown"] += n
        if locality is None:
            continue
        if locality in _ON_DISK_LOCALITIES:
            buckets["on_disk"] += n
        elif locality == "TAPE":
            buckets["staging" if staging else "tape_only"] += n
        else:
            buckets["unavailable"] += n
    return dict(buckets), dict(raw) if buckets else {}
# A file is warm only while on disk: touched, and not seen tape-only (or lost) since. A staged
# file's row says DISK_AND_TAPE from the moment it landed.
_ON_DISK = "COALESCE(f.locality, '') NOT IN ('TAPE', 'LOST', 'UNAVAILABLE', 'NONE')"



F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(method: F) -> F:
    """A ``Store`` method whose driver error becomes one ``StateError`` line naming the
    state (a damaged page behind a valid header fails in the middle of a read, not at open;
    a PostgreSQL server may go away at any time)."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except driver_errors() as e:
            raise self._error(e) from None

    return cast(F, wrapper)


_WRITER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
           "from prestaged.state.writer import main; sys.exit(main(sys.argv))")
"""The writer process's program: this very prestaged (its root, the first argument, first on
the path), whatever the directory it starts in. ``python -m prestaged.state.writer`` put that
directory first: run from a checkout of another version, a store fed a writer of that one."""


def _package_root() -> str:
    return str(Path(schema.__file__).resolve().parents[2])


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
    """One row of ``prestaged history``; ``reason`` is None while the run goes on, and says
    ``crashed: ...`` for a run whose process died without recording its end."""

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
    tape: dict[str, int] = field(default_factory=dict)
    """Member files by where the Tape REST API last placed them: ``on_disk``, ``tape_only``,
    ``staging`` (a stage request of ours is open), ``unavailable`` (lost, unavailable, none);
    empty when the storage never told."""
    localities: dict[str, int] = field(default_factory=dict)
    """Member files by last ``archiveinfo`` locality (``unknown``: never asked); empty when
    the storage never told (metrics: ``prestaged_locality_files``)."""
    unresolved: int = 0
    """Files the last complete listing named without a URL (not in ``files``; never warm)."""
    listing_complete: Optional[bool] = None
    """Whether the last run listed the whole definition (False: it was cut off or stopped,
    and ``files`` may be only part of it); None when no run has said."""

    @property
    def warm_fraction(self) -> Optional[float]:
        """Fresh files over every file of the definition, unresolved ones included; None when
        not known: no files, or the last listing did not complete (``files`` may be a part)."""
        whole = self.files + self.unresolved
        return self.fresh / whole if whole and self.listing_complete is not False else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dict(self.__dict__)
        d["last_run"] = self.last_run.to_dict() if self.last_run else None
        return d


@dataclass(frozen=True)
class Listing:
    """What one run's catalog listing said of its definition (``Store.finish_run``)."""

    complete: bool
    """Whether the catalog listed the whole definition (not cut off, not stopped)."""
    since: float
    """``Store.now()`` before the listing began: members last listed earlier were not named
    by a complete listing, so they left the definition."""
    unresolved: int = 0
    """Files the listing named without a URL."""


@dataclass(frozen=True)
class Pin:
    """A pin one of prestaged's stage requests holds (or will hold, once the file is on disk)
    on a file for a definition, as the state recorded it: the definition's run made, adopted
    or followed the request for that file, and the definition has not released it."""

    file_id: int
    """The files table's key (``url_id`` of the URL as the catalog gave it)."""
    url: str
    """The file's URL as stored (credentials redacted)."""
    request: str
    """The stage request's id."""
    uri: str
    """The Tape REST endpoint (v1 URI) the file's request was made at."""
    pinned_until: Optional[float] = None
    """Unix seconds the pin lasts until (landing plus the lifetime asked); None while the
    file is not known to have landed in this request."""
    landed: bool = False
    """Whether the file is known to be on disk under this request (else it is still being
    staged, or nobody followed it to the end: releasing cancels it first)."""
    others: tuple[str, ...] = ()
    """The other definitions (``catalog:name``) that rely on this pin too: releasing this
    one keeps it for them."""


def state_file_exists(path: Path) -> bool:
    """Whether the state file ``path`` exists; ``StateError`` (exit 2, naming it) where that
    cannot be told: ``exists()`` raises, not False, for a directory we may not enter or a
    name too long."""
    try:
        return path.exists()
    except OSError as e:
        raise StateError(f"state {path}: cannot open: {e.strerror}") from e


class Store:
    """The state database at ``path``, or the PostgreSQL database of the libpq ``url`` when
    one is given (``path`` then only anchors local files such as campaign slice lists);
    ``open()`` it before use and ``close()`` it after.

    ``batch``: rows per write transaction (default 500); ``flush_interval``: seconds an outcome
    may wait before it is written (default 1); ``busy_timeout``: seconds to wait for another
    process holding the write lock (default 30); ``writer_patience``: seconds the PostgreSQL
    writer retries a batch whose connection was lost (default ``writer.RECONNECT_FOR``);
    ``journal``: the SQLite file's journal, ``wal``, ``delete`` (the rollback journal) or
    ``auto`` (default: WAL unless the file is on a network filesystem, ``state.mounts``);
    ``keep_runs``: runs kept per definition, the newest (default 1000; 0: every run);
    ``keep_campaigns``: seconds a finished campaign is kept by ``tidy`` (default 0: for ever).
    """

    def __init__(self, path: Path, *, url: Optional[str] = None, batch: int = 500,
                 flush_interval: float = 1.0, busy_timeout: float = 30.0,
                 writer_patience: Optional[float] = None, journal: str = "auto",
                 keep_runs: int = 1000, keep_campaigns: float = 0.0) -> None:
        if journal not in ("auto", "wal", "delete"):
            raise ValueError(f"journal must be auto, wal or delete, not {journal!r}")
        self.path = path
        self.url = url
        self.journal = journal
        self.batch = batch
        self.flush_interval = flush_interval
        self.busy_timeout = busy_timeout
        self.writer_patience = writer_patience
        self.keep_runs = keep_runs
        self.keep_campaigns = keep_campaigns
        self._conn: Optional[Database] = None
        # Reads (and run rows) use this process's SQLite connection, guarded by _lock (reads
        # come from worker threads via asyncio.to_thread); on PostgreSQL each read and each
        # transaction takes a connection of the pool, so _lock guards nothing and serialises
        # nothing: a daemon's heartbeat never waits behind a long status scan (bench/cluster.py
        # saw heartbeats miss behind 2 s scans when it did). Outcomes and memberships wait in
        # _buffer and go a batch at a time to a writer process (state/writer.py), which commits
        # each batch in one transaction: SQLite's per-row work then costs the warming process
        # nothing but a JSON line. The buffer and the pipe have a lock of their own (_pipe),
        # held only to append or queue a line (the sender thread writes it), and flushes wait
        # for the writer's answer under a third (_answers): record(), called on the event loop,
        # never waits for a reader, for a flush that waits for another process's SQLite lock
        # (up to busy_timeout), nor for a writer that cannot write (up to OUTBOX_LIMIT).
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if url is None else contextlib.nullcontext())
        self._pipe = threading.Lock()
        self._answers = threading.Lock()
        self._answered = 0
        self._buffer: list[tuple[str, Any]] = []
        self._last_send = time.monotonic()
        self._writer: Optional[subprocess.Popen[bytes]] = None
        self._writer_error: Optional[str] = None
        self.writer_replacements = 0
        """Writer processes replaced since the store opened (``revive_writer``)."""
        self.on_writer_replaced: Optional[Callable[[], None]] = None
        """Called after each replacement (the daemon counts them in its metrics)."""
        self._flushes = 0
        # Lines for the writer's stdin (None: no more), written in order by _sender.
        self._outbox: deque[Optional[bytes]] = deque()
        self._outbox_bytes = 0
        self._outbox_changed = threading.Condition()
        self._send_failed = False
        self._sender: Optional[threading.Thread] = None
        self._ticker: Optional[threading.Thread] = None
        self._clock_offset = 0.0  # the database's clock minus ours (PostgreSQL; see now())
        self._clock_synced = -math.inf
        self._soon = threading.Event()  # wakes the ticker: a stage request was noted
        self._identity: Optional[tuple[int, int]] = None  # the SQLite file's (st_dev, st_ino)
        # Ends of runs whose outcomes could not be written (a full disk), and that could not
        # be written themselves yet: run id -> (ended, counts, exit code, reason).
        self._unended: dict[int, tuple[float, Mapping[str, int], int, str]] = {}
        self._ticking = False

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The state as messages name it: the file, or the URL without its password."""
        if self.url is None:
            return str(self.path)
        from prestaged.model import redacted_url

        return redacted_url(self.url)

    def _judged_now(self) -> float:
        """``now()`` for a read that judges freshness or pins, the offset measured again when
        it is older than ``CLOCK_RESYNC``."""
        self._sync_clock()
        return self.now()

    def now(self) -> float:
        """The time as the state keeps it (Unix seconds): the database's clock on PostgreSQL,
        which members on several hosts share (as leases and heartbeats already did), else ours.
        Outcomes, runs, pins and every freshness cut-off use it: with one member's clock 2 h
        ahead, members disagreed on what was fresh and a gate passed on files touched 7.5 h
        before with fresh_for 6 h. The offset is measured at open and again, at most every
        ``CLOCK_RESYNC`` seconds, by the reads that judge freshness."""
        return time.time() + self._clock_offset

    def _sync_clock(self) -> None:
        if self.url is None or time.monotonic() - self._clock_synced < CLOCK_RESYNC:
            return
        with self._lock:
            before = time.time()
            row = self.conn.execute(f"SELECT {_DB_NOW}").fetchone()
            after = time.time()
        self._clock_offset = float(row[0]) - (before + after) / 2
        self._clock_synced = time.monotonic()
        if abs(self._clock_offset) > CLOCK_SKEW_WARN:
            log.warning("this host's clock is %+.1f s off the state database's (%s): prestaged "
                        "keeps the database's time; fix this host's clock (NTP)",
                        -self._clock_offset, self.where)

    def _error(self, e: BaseException) -> StateError:
        """A driver's error ``e`` as one line naming the state."""
        text = (self._conn.describe(e) if self._conn is not None
                else describe_sqlite_error(str(e)))
        return StateError(f"state {self.where}: {text}")

    def open(self) -> Store:
        """Open (creating or migrating) the database.

        Raises ``StateError`` (exit 2) for a file that is not a SQLite database, a database
        that is not prestaged's, or one written by a newer prestaged; such files are left as
        they are. A PostgreSQL state: the same for an unreachable, foreign or newer database
        (``state.postgres.open_state``).
        """
        self._conn = self._open_postgres() if self.url is not None else self._open_sqlite()
        try:
            self._start_writer()
        except StateError:
            self._conn.close()
            self._conn = None
            raise
        self._sync_clock()
        self._ticking = True
        self._ticker = threading.Thread(target=self._tick, name="prestaged-state-ticker",
                                        daemon=True)
        self._ticker.start()
        return self

    def _tick(self) -> None:
        """The ticker thread: hand the buffer to the writer once ``flush_interval`` has passed
        since the last hand-over, and at once after a stage request is noted. Rows used to
        wait for the next ``record``: a run whose files come back from tape records nothing
        for hours, and a crash meanwhile lost its stage request ids (the rerun asked the tape
        system again, and no ``release`` could free the first request's pins) and the
        definition's memberships."""
        while True:
            soon = self._soon.wait(self.flush_interval)
            self._soon.clear()
            if not self._ticking:
                return
            with self._pipe:
                due = soon or time.monotonic() - self._last_send >= self.flush_interval
                if self._buffer and due and not self._writer_stopped():
                    with contextlib.suppress(StateError):  # the next record or flush says it
                        self._send()

    def _stop_ticker(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._ticking = False
            self._soon.set()
            ticker.join()

    def _start_writer(self) -> None:
        """Start the writer process and the sender thread that feeds it."""
        target = "-" if self.url is not None else str(self.path)
        patience = [] if self.writer_patience is None else [str(self.writer_patience)]
        try:
            self._writer = subprocess.Popen(
                # Our pid names the writer's connection (prestaged-writer/<pid>).
                [sys.executable, "-c", _WRITER, _package_root(), target,
                 str(self.busy_timeout), str(os.getpid()), *patience],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                # Its own session: a Ctrl-C or a SIGTERM to our process group (systemd, timeout,
                # kill -- -PGID) must not reach it before we hand over the last batch; it ends
                # when we close its stdin (and it ignores both signals itself, for the cgroup).
                start_new_session=True)
        except OSError as e:
            raise StateError(f"state {self.where}: cannot start the writer: {e}") from e
        self._writer_error = None
        self._send_failed = False
        self._outbox.clear()
        self._outbox_bytes = 0
        self._sender = threading.Thread(target=self._send_lines, args=(self._writer,),
                                        name="prestaged-state-sender", daemon=True)
        self._sender.start()
        if self.url is not None:
            # The URL may carry a password: on the pipe, never on the command line.
            self._line(self.url)

    @property
    def writer_stopped(self) -> bool:
        """Whether the writer process gave up: it sent its error, exited, or its pipe broke.
        Until ``revive_writer`` (or the next ``start_run``) nothing more is written."""
        return self._writer_stopped()

    def _writer_stopped(self) -> bool:
        writer = self._writer
        return writer is not None and (self._send_failed or self._writer_error is not None
                                       or writer.poll() is not None)

    def revive_writer(self) -> None:
        """Replace a writer process that gave up (a database that took no writes for the
        writer's patience, a SQLite lock held past ``busy_timeout``) by a new one, so that a
        daemon goes on once the database does, without a restart: until this is called, every
        call that meets the stopped writer raises its error. What the stopped writer had not
        committed is lost, as in a crash: those files are touched again. ``start_run`` calls
        it, and the daemon's heartbeat once the database answers again. Blocks up to
        ``WRITER_EXIT_WAIT`` for the old process: call it off the event loop."""
        if not self._writer_stopped():
            return
        with self._pipe, self._answers:
            old = self._writer
            if old is None or not self._writer_stopped():
                return
            why = self._writer_failed().args[0]
            self._buffer = []  # rows queued after the failure: never sent
            assert old.stdin is not None and old.stdout is not None
            with contextlib.suppress(OSError, ValueError):
                old.stdin.close()
            try:
                old.wait(timeout=WRITER_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
            self._stop_sender()
            old.stdout.close()
            self._send_failed = True  # until a new writer runs: if it cannot start, still so
            self._start_writer()
        log.warning("%s; a new writer process replaces it (outcomes it had not written are "
                    "lost: those files will be touched again)", why)
        self.writer_replacements += 1
        if self.on_writer_replaced is not None:
            self.on_writer_replaced()

    def _open_postgres(self) -> Database:
        from prestaged.state.postgres import open_pool, open_state

        assert self.url is not None
        # Migrate once, on a connection of its own (the advisory lock), then work through a
        # pool that replaces connections the server cut.
        open_state(self.url).close()
        return PooledDatabase(open_pool(self.url), self.url)

    def _open_sqlite(self) -> Database:
        existed = state_file_exists(self.path)
        if existed and not self.path.is_file():
            raise StateError(f"state {self.path}: not a regular file")
        if existed:
            _warn_if_emptied(self.path)
        try:
            # A new database is private (state.private); SQLite gives its -wal and -shm files
            # the database file's mode.
            create_private(self.path)
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"state {self.path}: cannot open: "
                             f"{describe_sqlite_error(str(e))}") from e
        try:
            return self._prepare(conn)
        except StateError:
            if not existed:  # ours, and still empty: no 0-byte file left for a later run
                with contextlib.suppress(OSError):
                    if self.path.stat().st_size == 0:
                        self.path.unlink()
            raise

    def _prepare(self, conn: sqlite3.Connection) -> Database:
        """Migrate and configure the SQLite connection ``conn`` to ``self.path``."""
        try:
            schema.migrate(conn, self.path)
            schema.set_journal(conn, self.path, *self._journal())
            schema.configure(conn)
            self._identity = _identity(self.path)
        except sqlite3.OperationalError as e:
            conn.close()
            text = describe_sqlite_error(str(e))
            if "read-only" in text and not os.access(self.path.parent, os.W_OK):
                # SQLite makes its -wal/-shm (or -journal) files beside the database, even to
                # read it: a state readable by a group, in a directory it cannot write.
                text = (f"its directory {self.path.parent} is not writable, and SQLite makes "
                        f"its {self.path.name}-wal and -shm files there ({e})")
            raise StateError(f"state {self.path}: cannot use it: {text}") from e
        except sqlite3.DatabaseError as e:
            conn.close()
            if "malformed" in str(e):  # ours, but damaged (SQLite could read its header)
                raise StateError(f"state {self.path}: {describe_sqlite_error(str(e))}") from e
            raise StateError(
                f"state {self.path}: not a prestaged state database ({e}); "
                "move it away or choose another file with --state"
            ) from e
        except StateError:
            conn.close()
            raise
        return SqliteDatabase(conn, str(self.path))

    def _journal(self) -> tuple[str, str]:
        """The journal mode the SQLite file should have, and why (for the log)."""
        if self.journal != "auto":
            return self.journal, f"state.journal = {self.journal}"
        network = mounts.network_filesystem(self.path)
        if network is None:
            return "wal", "a local filesystem"
        log.debug("state %s: on %s, shared between hosts: SQLite's rollback journal, not WAL",
                  self.path, network)
        return "delete", f"on {network}: SQLite's WAL works on one host only"

    def close(self) -> None:
        """Write everything still queued, stop the writer and close the database."""
        if self._conn is None:
            return
        self._stop_ticker()
        try:
            self.flush()
        finally:
            self._stop_sender()
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

    @property
    def conn(self) -> Database:
        """The open connection (guarded by ``_lock``)."""
        if self._conn is None:
            raise RuntimeError("Store.open() was not called")
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """The connection inside a write transaction (SQLite: ``BEGIN IMMEDIATE``) ...
        ``COMMIT`` (``ROLLBACK`` on error), under this store's lock: for small synchronous
        writes that must be durable at once (campaign state), not for outcomes (those go
        through the writer process)."""
        with self._lock:
            try:
                with self.conn.transaction() as conn:
                    yield conn
            except driver_errors() as e:
                raise self._error(e) from None

    # --- writes (queued) ----------------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        with self._pipe:
            self._buffer.append((kind, payload))
            due = time.monotonic() - self._last_send >= self.flush_interval
            if len(self._buffer) >= self.batch or due:
                self._send()

    def _send(self) -> None:
        """Hand the buffered rows to the writer process as one batch (caller holds _pipe)."""
        items, self._buffer = self._buffer, []
        self._last_send = time.monotonic()
        if not items:
            return
        members = []
        for kind, payload in items:
            if kind == "members":
                catalog, definition, listed, refs = payload
                members.append([catalog, definition, listed,
                                [[url_id(r.url), redact(r.url), redact(r.name), r.size]
                                 for r in refs]])
        doc: dict[str, list[Any]] = {"members": members}
        for key in ("outcomes", *_TAPE_ROWS):
            rows = [p for kind, p in items if kind == key]
            if rows or key == "outcomes":
                doc[key] = rows
        self._line(json.dumps(doc, separators=(",", ":")))

    @property
    def queued_bytes(self) -> int:
        """Bytes of batches waiting for the writer process (see the module docstring)."""
        return self._outbox_bytes

    def _line(self, line: str) -> None:
        """Queue ``line`` for the writer's stdin (see the module docstring)."""
        if self._writer is None:
            raise RuntimeError("Store.open() was not called")
        data = line.encode() + b"\n"
        with self._outbox_changed:
            while self._outbox_bytes > OUTBOX_LIMIT and not self._send_failed:
                self._outbox_changed.wait()
            failed = self._send_failed
            if not failed:
                self._outbox.append(data)
                self._outbox_bytes += len(data)
                self._outbox_changed.notify_all()
        if failed:
            raise self._writer_failed()

    def _send_lines(self, writer: subprocess.Popen[bytes]) -> None:
        """The sender thread: write queued lines to ``writer`` in order until None; on a
        failure (the writer is gone) drop the rest and let ``_line`` report it."""
        assert writer.stdin is not None
        while True:
            with self._outbox_changed:
                while not self._outbox:
                    self._outbox_changed.wait()
                data = self._outbox[0]
                if data is None:
                    self._outbox.popleft()
                    return
            try:
                writer.stdin.write(data)
                writer.stdin.flush()
            except (OSError, ValueError):  # broken pipe; ValueError: stdin closed
                with self._outbox_changed:
                    self._send_failed = True
                    self._outbox.clear()
                    self._outbox_bytes = 0
                    self._outbox_changed.notify_all()
                return
            with self._outbox_changed:
                self._outbox.popleft()
                self._outbox_bytes -= len(data)
                self._outbox_changed.notify_all()

    def _stop_sender(self) -> None:
        """Let the sender write what is queued, then end it."""
        sender, self._sender = self._sender, None
        if sender is None:
            return
        with self._outbox_changed:
            self._outbox.append(None)
            self._outbox_changed.notify_all()
        sender.join()

    def add_members(self, catalog: str, definition: str, refs: Sequence[FileRef]) -> None:
        """Record that ``refs`` belong to ``definition``, listed now (queued)."""
        self._put("members", (catalog, definition, self.now(), list(refs)))

    def record(self, url: str, name: str, result: str, http_status: Optional[int],
               nbytes: int, attempts: int, error: str, when: Optional[float] = None) -> None:
        """Record one file's outcome (queued; skipped_fresh is not an outcome to record)."""
        self._put("outcomes", (url_id(url), redact(url), redact(name), result, http_status, nbytes,
                              attempts, redact(error), self.now() if when is None else when))

    def note_tape(self, url: str, info: TapeInfo, when: Optional[float] = None, *,
                  wanted_by: Optional[tuple[str, str]] = None) -> None:
        """Record what the tape path learned of one file (queued): its locality; or a stage
        request made, adopted or followed for it (``info.request``, ``uri``,
        ``requested_at``, ``lifetime``), whose pin the definition ``wanted_by`` (catalog,
        name) relies on for it from now on; or that it reached disk in that request
        (``info.staged_at``, ``pinned_until``); or that the request ended without bringing it
        to disk (``info.ended_at``: nobody relies on it for that file any more)."""
        fid = url_id(url)
        if info.staged_at is not None:
            self._put("staged", (fid, info.request, float(info.staged_at),
                                 _seconds(info.pinned_until)))
        elif info.ended_at is not None:
            self._put("ended", (fid, info.request, float(info.ended_at)))
        elif info.request is not None:
            # floats: PostgreSQL's writer sends each column as one typed array
            self._put("staging", (fid, info.request, info.uri, _seconds(info.requested_at),
                                  _seconds(info.lifetime)))
            if wanted_by is not None:
                self._put("wanted", (*wanted_by, fid, info.request))
            self._soon.set()  # durable at once: a crash must not lose the request's id
        else:
            self._put("located", (fid, info.locality, self.now() if when is None else when))

    def flush(self) -> None:
        """Block until everything recorded so far is committed."""
        with self._pipe:
            self._send()
            self._flushes += 1
            seq = self._flushes
            self._line(json.dumps({"flush": seq}))
        with self._answers:  # answers come in order; one reader at a time takes them
            while self._answered < seq:
                assert self._writer is not None and self._writer.stdout is not None
                answer = self._writer.stdout.readline().decode(errors="replace").strip()
                if not answer.startswith("ok ") or not answer[3:].isdigit():
                    raise self._writer_failed(answer)
                self._answered = int(answer[3:])

    def _writer_failed(self, answer: str = "") -> StateError:
        """The one-line error for a writer process that stopped: its own ``error`` line when
        it sent one (read here if not given), else how it ended."""
        writer = self._writer
        assert writer is not None and writer.stdout is not None
        if not answer.startswith("error ") and self._writer_error is None:
            with contextlib.suppress(OSError, ValueError):
                answer = writer.stdout.readline().decode(errors="replace").strip()
        if answer.startswith("error "):
            self._writer_error = answer[6:]  # kept: later calls (finish_run) say the same
        if self._writer_error is not None:
            text = (self._writer_error if self.url is not None
                    else describe_sqlite_error(self._writer_error))
            return StateError(f"state {self.where}: cannot write: {text}")
        code = writer.poll()
        how = "is still running" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited {code}")
        return StateError(f"state {self.where}: the writer process stopped answering (it {how})")

    # --- runs ---------------------------------------------------------------------------------

    @_one_line_errors
    def check(self) -> None:
        """``StateError`` when SQLite's ``quick_check`` finds the file damaged: damage in pages
        nothing has read yet passes every statement, and a daemon would write on into it
        (PostgreSQL checks its own pages)."""
        if self.url is not None:
            return
        with self._lock:
            rows = self.conn.execute("PRAGMA quick_check(5)").fetchall()
        problems = [str(r[0]) for r in rows]
        if problems != ["ok"]:
            raise StateError(f"state {self.path}: the database is damaged ("
                             f"{'; '.join(problems)}); restore it from a copy, or move it away "
                             "(prestaged starts a new one)")

    def file_problem(self) -> Optional[str]:
        """Why the SQLite file this store opened is no longer the one at its path (removed,
        or replaced by a move or a restore), or None. Both processes would go on writing to
        the unlinked file, and lose it all when they stop; the next start would make a new,
        empty state there without a word."""
        if self._identity is None:
            return None
        try:
            now = _identity(self.path)
        except OSError as e:
            why = "removed" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror})"
        else:
            if now == self._identity:
                return None
            why = "replaced by another file"
        return (f"state {self.path}: {why} while in use: nothing is recorded any more; put "
                "it back or restart prestaged")

    @_one_line_errors
    def start_run(self, catalog: str, definition: str) -> int:
        """Record the start of a run now (written at once, not queued); return its id. A
        writer process that gave up since the last run is replaced first, and the ends of
        runs it could not record are written. ``StateError`` when the file was removed or
        replaced (``file_problem``)."""
        problem = self.file_problem()
        if problem is not None:
            raise StateError(problem)
        self.revive_writer()
        self._end_unended()
        with self.transaction() as conn:
            def_id = schema.definition_id(conn, catalog, definition)
            return conn.insert(
                "INSERT INTO runs (definition_id, started, host, pid) VALUES (?, ?, ?, ?)",
                (def_id, self.now(), os.uname().nodename, os.getpid()),
            )

    @_one_line_errors
    def finish_run(self, run_id: int, counts: Mapping[str, int], exit_code: int,
                   reason: str, listing: Optional[Listing] = None) -> None:
        """Flush queued outcomes, then record how run ``run_id`` ended and what its
        ``listing`` said: after a complete one the definition's members are the files it
        named (those not named since ``listing.since`` are dropped) and its unresolved files
        are counted; after another, the definition is marked as partly listed. Runs of the
        definition beyond its ``keep_runs`` newest are dropped."""
        try:
            self.flush()
        except StateError as e:
            # The outcomes are lost, but the run's end is a small write of its own: written
            # now if the database takes it, else before the next run starts (a daemon's), so
            # that the run does not show as running, then crashed, without its reason.
            self._unended[run_id] = (self.now(), dict(counts), EXIT_USAGE, f"stopped: {e}")
            self._end_unended()
            raise
        with self.transaction() as conn:
            _end_run(conn, run_id, self.now(), counts, exit_code, reason)
            row = conn.execute("SELECT definition_id FROM runs WHERE id = ?",
                               (run_id,)).fetchone()
            if row is None:
                return
            if listing is not None:
                _record_listing(conn, row[0], listing)
            retention.keep_newest_runs(conn, row[0], self.keep_runs)

    def _end_unended(self) -> None:
        """Write the ends of runs ``finish_run`` could not record; those the database still
        refuses wait for the next try."""
        for run_id, (ended, counts, code, reason) in list(self._unended.items()):
            try:
                with self.transaction() as conn:
                    _end_run(conn, run_id, ended, counts, code, reason)
            except StateError:
                return
            del self._unended[run_id]

    @_one_line_errors
    def record_listing(self, catalog: str, definition: str, listing: Listing) -> None:
        """Flush queued rows, then record what a listing made outside a run said of
        ``definition`` (a watch round's plan, whose files are added as members first): as
        ``finish_run`` does."""
        self.flush()
        with self.transaction() as conn:
            _record_listing(conn, schema.definition_id(conn, catalog, definition), listing)

    # --- retention ---------------------------------------------------------------------------

    @_one_line_errors
    def tidy(self, spare: Collection[str] = ()) -> retention.Tidied:
        """Drop what the state no longer needs (``retention.tidy``: runs beyond
        ``keep_runs`` per definition, files no definition lists and no pin holds, finished
        watch rounds but each watch's last, campaigns finished more than ``keep_campaigns``
        ago but those named in ``spare``), in one transaction; what was dropped."""
        with self.transaction() as conn:
            return retention.tidy(conn, self.keep_runs, self._judged_now(),
                                  self.keep_campaigns, spare)

    @_one_line_errors
    def forget(self, catalog: str, definition: str, *, force: bool = False) -> retention.Tidied:
        """Drop ``catalog:definition`` and everything only it kept (``retention.forget``).
        ``NotFoundError`` when the state has no such definition; ``ConflictError`` while a run
        of it has no end recorded and its process may still run, a watch round of it is
        unfinished, or it alone relies on pins of prestaged's that have not expired or on
        stage requests still open (nothing could release them once forgotten; a pin another
        definition relies on too is that one's to release), unless ``force``."""
        with self.transaction() as conn:
            retention.hold_members(conn)
            def_id = schema.known_definition_id(conn, catalog, definition)
            if def_id is None:
                raise NotFoundError(f"definition {definition!r} (catalog {catalog}) has no "
                                    f"record in state {self.where}: nothing to forget "
                                    "(--catalog names its catalog, --state another state file)")
            now = self._judged_now()
            if not force:
                problem = _busy(conn, def_id, catalog, definition, now)
                if problem is not None:
                    raise ConflictError(f"definition {definition!r} (catalog {catalog}): "
                                        f"{problem}; --force forgets it anyway")
            return retention.forget(conn, def_id, catalog, definition, now)

    # --- pins (issue 13) ----------------------------------------------------------------------

    @_one_line_errors
    def pins(self, catalog: str, definition: str) -> Optional[list[Pin]]:
        """The pins ``definition`` relies on (its runs made, adopted or followed the stage
        request for the file, and it has not released it), landed or not, expired or not,
        each with the other definitions that rely on it too; ordered by endpoint, request and
        URL. None when the state has no such definition."""
        with self._lock:
            def_id = schema.known_definition_id(self.conn, catalog, definition)
            if def_id is None:
                return None
            # Landed: the file's row names this very request and has it on disk (a later
            # request of another definition replaced it: this one's outcome is unknown).
            rows = self.conn.execute(
                "SELECT f.id, f.url, m.pin_request, f.stage_uri, CASE WHEN f.stage_request = "
                "m.pin_request AND f.staged_at IS NOT NULL THEN f.pinned_until END, CASE WHEN "
                "f.stage_request = m.pin_request AND f.staged_at IS NOT NULL THEN 1 ELSE 0 END "
                "FROM members m JOIN files f ON f.id = m.file_id WHERE m.definition_id = ? "
                "AND m.pin_request IS NOT NULL AND f.stage_uri IS NOT NULL "
                "ORDER BY f.stage_uri, m.pin_request, f.url", (def_id,)).fetchall()
            others: dict[tuple[int, str], list[str]] = {}
            for file_id, request, cat, name in self.conn.execute(
                    "SELECT m.file_id, m.pin_request, d.catalog, d.name FROM members m "
                    "JOIN members o ON o.file_id = m.file_id AND o.pin_request = m.pin_request "
                    "JOIN definitions d ON d.id = o.definition_id WHERE m.definition_id = ? "
                    "AND m.pin_request IS NOT NULL AND o.pin_request IS NOT NULL "
                    "AND o.definition_id <> m.definition_id ORDER BY 3, 4", (def_id,)):
                others.setdefault((file_id, request), []).append(f"{cat}:{name}")
        return [Pin(fid, url, request, uri, until, bool(landed),
                    tuple(others.get((fid, request), ())))
                for fid, url, request, uri, until, landed in rows]

    @_one_line_errors
    def unpinned(self, catalog: str, definition: str, released: Sequence[Pin],
                 kept: Sequence[Pin] = ()) -> list[Pin]:
        """Record, at once and in one transaction, that ``definition`` no longer relies on the
        pins ``released`` (the storage accepted their release: ``pinned_until`` NULL; those
        not landed were cancelled: their stage ended now) nor on ``kept`` (other definitions
        relied on them, so they were left on the storage). A file staged again since under
        another request keeps that newer request's pin. Returns the pins of ``kept`` that no
        definition relies on any more (the others released them meanwhile, each keeping it for
        this one): the caller releases those too."""
        with self.transaction() as conn:
            if conn.dialect.name == "postgresql":
                # Serialised with the writers and other releases, as SQLite's BEGIN IMMEDIATE
                # does: two definitions released at once must not each keep a pin for the other.
                conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_WRITE_LOCK,))
            def_id = schema.definition_id(conn, catalog, definition)
            conn.executemany("UPDATE members SET pin_request = NULL WHERE definition_id = ? AND "
                             "file_id = ? AND pin_request = ?",
                             [(def_id, p.file_id, p.request) for p in (*released, *kept)])
            conn.executemany("UPDATE files SET pinned_until = NULL WHERE id = ? AND "
                             "stage_request = ?", [(p.file_id, p.request) for p in released])
            now = self.now()
            conn.executemany("UPDATE files SET stage_ended = ? WHERE id = ? AND stage_request = "
                             "? AND staged_at IS NULL AND stage_ended IS NULL",
                             [(now, p.file_id, p.request) for p in released if not p.landed])
            return [p for p in kept if not conn.execute(
                "SELECT COUNT(*) FROM members WHERE file_id = ? AND pin_request = ?",
                (p.file_id, p.request)).fetchone()[0]]

    @_one_line_errors
    def open_stages(self, urls: Iterable[str], now: Optional[float] = None
                    ) -> dict[str, TapeInfo]:
        """Those of ``urls`` whose stage request of an earlier run neither landed nor ended
        (as far as the state knows: it may still be bringing them to disk). Each as the
        ``TapeInfo`` of that request (locality TAPE, request id, endpoint, when it was made, the
        pin lifetime it asked for), so a rerun follows it rather than asking again (the
        reference: no duplicate requests for a file), or, when it was made more than
        ``storage.stage_timeout`` ago (its run stopped before it could time it out), cancels
        it and asks anew (``locality.TapeRouter``). A request recorded before the state kept its
        creation (schema 9) counts while the pin it was guessed to have lasts."""
        now = self._judged_now() if now is None else now
        rows = self._files_of(urls, "stage_request, stage_uri, stage_created, stage_lifetime",
                              "stage_request IS NOT NULL AND stage_uri IS NOT NULL AND "
                              "staged_at IS NULL AND stage_ended IS NULL AND (stage_created "
                              "IS NOT NULL OR pinned_until > ?)", [now])
        return {url: TapeInfo("TAPE", request, uri, requested_at=created, lifetime=lifetime)
                for url, (request, uri, created, lifetime) in rows}

    def _files_of(self, urls: Iterable[str], columns: str, condition: str,
                  params: Sequence[Any]) -> list[tuple[str, tuple[Any, ...]]]:
        """(URL, ``columns``) of the files rows (alias ``f``) of ``urls`` that meet
        ``condition`` (its ``?`` bound to ``params``), asked 500 ids at a time."""
        by_id = {url_id(u): u for u in urls}
        wanted = list(by_id)
        found = []
        with self._lock:
            for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit is 999+
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.conn.execute(f"SELECT f.id, {columns} FROM files f WHERE f.id IN "
                                         f"({marks}) AND {condition}", [*chunk, *params])
                found += [(by_id[row[0]], tuple(row[1:])) for row in rows]
        return found

    # --- reads --------------------------------------------------------------------------------

    @_one_line_errors
    def fresh_urls(self, urls: Iterable[str], fresh_for: float,
                   now: Optional[float] = None) -> set[str]:
        """Those of ``urls`` successfully touched within the last ``fresh_for`` seconds and
        not failed since: the files ``status`` counts fresh and the gate counts warm. (A file
        whose last touch failed was skipped as fresh while the gate counted it cold, so
        ``wait`` and ``submit`` waited for it until their timeout.)"""
        since = (self._judged_now() if now is None else now) - fresh_for
        return {url for url, _ in self._files_of(
            urls, "f.last_warm", f"f.status IN (?, ?) AND f.last_warm >= ? AND {_ON_DISK}",
            [*_OK, since])}

    @_one_line_errors
    def status(self, fresh_for: float, definition: Optional[str] = None,
               catalog: Optional[str] = None, now: Optional[float] = None) -> list[DatasetStatus]:
        """Warmth of every recorded definition, or of the one named; ``catalog`` narrows
        either to that catalog kind. Four queries whatever the number of definitions (a
        query per definition took 4 s for 1,500 definitions on PostgreSQL, a round trip
        each, and the API's listing with it)."""
        since = (self._judged_now() if now is None else now) - fresh_for
        wanted = {"name": definition, "catalog": catalog or None}
        args: list[Any] = [v for v in wanted.values() if v is not None]
        cond = " AND ".join(f"d.{k} = ?" for k, v in wanted.items() if v is not None)
        where = f" WHERE {cond}" if cond else ""
        chosen = f"SELECT d.id FROM definitions d{where}"
        with self._lock:
            found = self.conn.execute("SELECT d.id, d.catalog, d.name, d.unresolved, d.partial "
                                      f"FROM definitions d{where} ORDER BY d.catalog, d.name",
                                      args).fetchall()
            if not found:
                return []
            counts: dict[int, list[tuple[Any, ...]]] = {}
            for def_id, *row in self.conn.execute(
                    f"SELECT m.definition_id, f.status, f.last_warm >= ? AND {_ON_DISK}, "
                    "f.last_warm IS NOT NULL, COUNT(*) FROM members m JOIN files f ON "
                    f"f.id = m.file_id WHERE m.definition_id IN ({chosen}) GROUP BY 1, 2, 3, 4",
                    [since, *args]).fetchall():
                counts.setdefault(def_id, []).append(tuple(row))
            tapes: dict[int, list[tuple[Optional[str], int, int]]] = {}
            for def_id, locality, staging, n in self.conn.execute(
                    _TAPE_COUNTS_OF.format(chosen=chosen), args).fetchall():
                tapes.setdefault(def_id, []).append((locality, staging, n))
            # Each definition's newest run: a probe of the runs_by_definition index per
            # definition (matching the runs to a list of ids scanned every run).
            last = {(r.catalog, r.definition): r for r in self._runs_where(
                cond, args, join="r.id = (SELECT r2.id FROM runs r2 WHERE r2.definition_id = "
                "d.id ORDER BY r2.started DESC, r2.id DESC LIMIT 1)")}
        out = []
        for def_id, cat, name, unresolved, partial in found:
            listing = None if partial is None else not partial
            out.append(_status_of(cat, name, counts.get(def_id, []), tapes.get(def_id, []),
                                  last.get((cat, name)), unresolved or 0, listing))
        return out

    @_one_line_errors
    def cold_urls(self, catalog: str, definition: str, fresh_for: float, limit: int = 5,
                  now: Optional[float] = None) -> list[str]:
        """Up to ``limit`` URLs (sorted) of ``definition``'s files not successfully touched
        within the last ``fresh_for`` seconds: never tried, failed (last outcome), or stale; the
        complement of ``DatasetStatus.fresh``."""
        since = (self._judged_now() if now is None else now) - fresh_for
        with self._lock:
            rows = self.conn.execute(
                "SELECT f.url FROM definitions d JOIN members m ON m.definition_id = d.id "
                "JOIN files f ON f.id = m.file_id WHERE d.catalog = ? AND d.name = ? "
                f"AND NOT COALESCE(f.status IN (?, ?) AND f.last_warm >= ? AND {_ON_DISK}, FALSE) "
                "ORDER BY f.url LIMIT ?",
                (catalog, definition, *_OK, since, limit),
            ).fetchall()
        return [r[0] for r in rows]

    @_one_line_errors
    def runs(self, limit: int = 20, definition_id: Optional[int] = None) -> list[RunRecord]:
        """Recent runs, newest first."""
        where, args = ("r.definition_id = ?", [definition_id]) if definition_id is not None \
            else ("", [])
        return self._runs_where(where, args, limit)

    def _runs_where(self, where: str, args: Sequence[Any], limit: Optional[int] = None, *,
                    join: str = "d.id = r.definition_id") -> list[RunRecord]:
        """Runs matching SQL condition ``where`` (on ``r``, the runs, and ``d``, their
        definitions; "" for all) with ``args``, newest first, at most ``limit``; ``join``
        the condition joining ``d`` to ``r``."""
        query = ("SELECT r.id, d.catalog, d.name, r.started, r.ended, r.counts, r.exit_code, "
                 f"r.reason, r.host, r.pid FROM definitions d JOIN runs r ON {join}")
        args = list(args)
        if where:
            query += f" WHERE {where}"
        query += " ORDER BY r.started DESC, r.id DESC"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self.conn.execute(query, args).fetchall()
        return [RunRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else {},
                          r[6], r[7] if r[7] is not None else _crashed(r[8], r[9], r[3]), r[8])
                for r in rows]


def _status_of(catalog: str, name: str, rows: Iterable[tuple[Any, ...]],
               tape_rows: Iterable[tuple[Optional[str], int, int]], last: Optional[RunRecord],
               unresolved: int, listing: Optional[bool]) -> DatasetStatus:
    """One definition's ``DatasetStatus`` from its rows of ``Store.status``'s queries."""
    tape, localities = _tape_counts(tape_rows)
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
    return DatasetStatus(catalog, name, files, fresh, stale, dict(failed), never, last, tape,
                         localities, unresolved, listing)


EMPTIED_AFTER = 60.0
"""Seconds after which an empty state file is not one being created by another process."""


def _warn_if_emptied(path: Path) -> None:
    """Warn of an existing, empty state file that nobody is creating now: SQLite makes a new
    state in it, and a truncated copy of a state (``> state.db``, a failed copy) would lose
    its history in silence."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_size == 0 and time.time() - st.st_mtime > EMPTIED_AFTER:
            log.warning("state %s is an empty file: a new state is made in it (if it was a "
                        "state, restore it from a copy first)", path)


def _seconds(value: Optional[float]) -> Optional[float]:
    """``value`` as a float (a whole number of seconds may come as an int), None kept."""
    return None if value is None else float(value)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino)


def _end_run(conn: Database, run_id: int, ended: float, counts: Mapping[str, int],
             exit_code: int, reason: str) -> None:
    conn.execute("UPDATE runs SET ended = ?, counts = ?, exit_code = ?, reason = ? WHERE id = ?",
                 (ended, json.dumps(dict(counts), sort_keys=True), exit_code, reason, run_id))


def _busy(conn: Database, def_id: int, catalog: str, definition: str,
          now: float) -> Optional[str]:
    """Why definition ``def_id`` cannot be forgotten now, or None."""
    for run_id, started, host, pid in conn.execute(
            "SELECT id, started, host, pid FROM runs WHERE definition_id = ? AND ended IS NULL",
            (def_id,)).fetchall():
        if _crashed(host, pid, started) is None:
            where = f"process {pid} on {host}" if host != os.uname().nodename else f"process {pid}"
            return (f"run {run_id} ({where}) has no end recorded and may still be running: let "
                    "it end or stop it first")
    open_rounds = conn.execute("SELECT COUNT(*) FROM watch_rounds WHERE catalog = ? AND "
                               "definition = ? AND finished IS NULL",
                               (catalog, definition)).fetchone()[0]
    if open_rounds:
        return "a watch round of it is still being warmed by the daemons sharing this state"
    pinned = conn.execute(_ONLY_ITS_PINS, (def_id, now)).fetchone()[0]
    if pinned:
        return (f"{pinned} of its files are pinned on disk by prestaged's stage requests (or "
                "will be, once staged) for it alone, and nothing could release them once "
                "forgotten: run `prestaged release` first")
    return None


# The pins only this definition relies on that hold now or will (pins another definition
# relies on are released by that one's `release`): landed in the file's current request and
# not expired, or that request still open (not landed, not ended). A request since replaced by
# another definition's is not counted: its outcome is unknown to the state.
_ONLY_ITS_PINS = """
SELECT COUNT(*) FROM members m JOIN files f ON f.id = m.file_id
WHERE m.definition_id = ? AND m.pin_request IS NOT NULL AND f.stage_request = m.pin_request
AND ((f.staged_at IS NOT NULL AND f.pinned_until > ?)
     OR (f.staged_at IS NULL AND f.stage_ended IS NULL))
AND NOT EXISTS (SELECT 1 FROM members o WHERE o.file_id = m.file_id AND o.pin_request IS NOT NULL
                AND o.pin_request = m.pin_request AND o.definition_id <> m.definition_id)
"""


def _record_listing(conn: Database, def_id: int, listing: Listing) -> None:
    """``listing`` of definition ``def_id`` (see ``Store.finish_run``), in ``conn``'s
    transaction."""
    if not listing.complete:
        conn.execute("UPDATE definitions SET partial = 1 WHERE id = ?", (def_id,))
        return
    conn.execute("DELETE FROM members WHERE definition_id = ? AND "
                 "(listed IS NULL OR listed < ?)", (def_id, listing.since))
    conn.execute("UPDATE definitions SET listed = ?, unresolved = ?, partial = 0 WHERE id = ?",
                 (listing.since, listing.unresolved, def_id))


def _crashed(host: Optional[str], pid: Optional[int], started: float) -> Optional[str]:
    """The reason of a run that has no end recorded: None while its process still runs (or runs
    on another host, where we cannot look), ``crashed: ...`` once it is gone (SIGKILL, OOM,
    power loss): its pid is free, or now belongs to a process started after the run."""
    if pid is None or host != os.uname().nodename:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"crashed: process {pid} ended without recording the end of the run"
    except PermissionError:
        pass  # alive, another user's
    begun = _process_start(pid)
    if begun is not None and begun > started + 1.0:
        return f"crashed: process {pid} ended without recording the end of the run"
    return None


def _process_start(pid: int) -> Optional[float]:
    """Unix time process ``pid`` started (Linux /proc), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # Field 22 (starttime, clock ticks after boot) counts from after the ")" ending the name.
    fields = stat.rpartition(")")[2].split()
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


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

    async def open_stages(self, urls: list[str]) -> dict[str, TapeInfo]:
        """The stage requests earlier runs left open on ``urls`` (see ``Store.open_stages``)."""
        return await asyncio.to_thread(self.store.open_stages, urls)

    def now(self) -> float:
        """``Store.now``."""
        return self.store.now()

    def note(self, url: str, info: TapeInfo) -> None:
        """Queue what the tape path learned of one file (see ``Store.note_tape``); a stage
        request made, adopted or followed for it is this definition's to release."""
        self.store.note_tape(url, info, wanted_by=(self.catalog, self.definition))

    def record(self, outcome: Outcome) -> None:
        """Queue one file's outcome for writing."""
        self.store.record(outcome.url, outcome.name, outcome.result.value, outcome.status,
                          outcome.bytes, outcome.attempts, outcome.error)
