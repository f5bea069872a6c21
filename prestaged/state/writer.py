"""The state store's writer process: applies batches of rows to the state database.

``prestaged.state.store.Store`` starts it (``main`` of its own prestaged in a new interpreter,
``python -c ... ROOT DB TIMEOUT``, DB "-" for a PostgreSQL state whose URL is then the first
line of stdin) and
sends it one JSON document per line on stdin; it writes each document in one transaction (on
PostgreSQL as one statement per kind of row, see ``UPSERT_MEMBER_FILE``'s comment). Running
the writes in a process of their own keeps SQLite's per-row work off the warming process's CPU
and GIL (in a thread of the warming process it cost 12-15% of the rate; bench/throughput.py).

Lines: ``{"members": [[catalog, definition, listed, [[id, url, name, size], ...]], ...],
"outcomes": [[id, url, name, result, http_status, bytes, attempts, error, time], ...]}`` or
``{"flush": n}``, answered with the line ``ok n`` once everything before it is committed.
A batch may also carry tape rows, applied after the outcomes in this order (a file's life:
located, staging, staged): ``"located": [[id, locality, time]]``, ``"staging": [[id, request,
uri, pinned_until]]``, ``"staged": [[id, time, pinned_until]]``.
End of input: exit 0. A failure is answered with one line ``error <message>`` on stdout, then
exit 1; the store turns it into its one-line error (the disk is full, ...).

A PostgreSQL batch whose connection is lost (``psycopg.OperationalError``, a broken
connection: the server restarted, terminated the session or cannot be reached) is not a
failure yet: the writer says so in one line on stderr and writes the batch again on a new
connection, with backoff, for up to ``RECONNECT_FOR`` seconds (or ``argv[4]``;
``write_through``); batches are idempotent, so one committed just before the cut does no harm
written twice. Its connection is named ``prestaged-writer/<pid of the store's process>``
(``argv[3]``) in ``pg_stat_activity``. A writer that gave up is not the end of a daemon: the
store starts a new one when its next run starts (``Store.revive_writer``).

It ignores SIGINT and SIGTERM: a Ctrl-C, ``timeout`` or systemd's stop signal to the whole
process group must not kill it before the warming process has handed over its last batch and
closed the pipe, which is how it learns to finish. It imports only ``state.schema`` and
``state.db`` (the package's ``__init__`` loads nothing eagerly), so it starts in a few tens of
milliseconds; psycopg only for a PostgreSQL state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from prestaged.errors import StateError
from prestaged.state.db import Database, PostgresDatabase, SqliteDatabase, driver_errors
from prestaged.state.schema import configure, definition_id

if TYPE_CHECKING:
    from prestaged.state.postgres import Connection as PgConnection

PG_WRITE_LOCK = 0x7072657374617772
"""Key of the advisory lock a PostgreSQL writer holds for each batch ("prestawr"): writers of
several daemons then take their row locks one batch at a time, as SQLite's ``BEGIN IMMEDIATE``
makes them, instead of deadlocking on files two batches share in different orders."""

# Each statement is written once and sent two ways: on SQLite a row at a time (executemany:
# SQLite runs in this process, a row costs microseconds), on PostgreSQL once per batch with
# every column as an array (``INSERT ... SELECT * FROM unnest(...)``, ``UPDATE ... FROM
# unnest(...)``): psycopg's executemany sends one statement per row, for the server to run one
# by one; that took 2.2x the writer's CPU and 1.6x the time (bench/README.md). An array
# statement must not touch a row twice (``ON CONFLICT DO UPDATE`` refuses to), so a batch's rows
# are first merged per file id into the row that executing them in order leaves (``_merged_*``).
_MEMBER_FILE_INSERT = "INSERT INTO files (id, url, name, size)"
_MEMBER_FILE_TYPES = ("bigint", "text", "text", "bigint")
_MEMBER_FILE_CONFLICT = " ON CONFLICT (id) DO UPDATE SET size = COALESCE(excluded.size, files.size)"
UPSERT_MEMBER_FILE = _MEMBER_FILE_INSERT + " VALUES (?, ?, ?, ?)" + _MEMBER_FILE_CONFLICT
# "listed" only grows: a batch written late never makes a file look unlisted since.
_MEMBER_LISTED = (" ON CONFLICT (definition_id, file_id) DO UPDATE SET listed = CASE WHEN "
                  "COALESCE(members.listed, 0) > excluded.listed THEN members.listed "
                  "ELSE excluded.listed END")
INSERT_MEMBER = ("INSERT INTO members (definition_id, file_id, listed) VALUES (?, ?, ?)"
                 + _MEMBER_LISTED)
PG_INSERT_MEMBERS = ("INSERT INTO members (definition_id, file_id, listed) "
                     "SELECT ?, unnest(?::bigint[]), ?::double precision" + _MEMBER_LISTED)
# An outcome never erases a newer success written by another process: last_try and last_warm
# only grow. CASE, not SQLite's scalar MAX(a, b), which PostgreSQL lacks (GREATEST there);
# the same SQL on both engines. The last parameter is last_warm (``_outcome_rows``).
_OUTCOME_INSERT = """
INSERT INTO files (id, url, name, status, http_status, bytes, attempts, last_error, last_try,
                   last_warm)
"""
_OUTCOME_TYPES = ("bigint", "text", "text", "text", "integer", "bigint", "integer", "text",
                  "double precision", "double precision")
_OUTCOME_CONFLICT = """
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status,
    http_status = excluded.http_status,
    bytes = excluded.bytes,
    attempts = excluded.attempts,
    last_error = excluded.last_error,
    last_try = CASE WHEN files.last_try > excluded.last_try THEN files.last_try
                    ELSE excluded.last_try END,
    last_warm = CASE WHEN excluded.last_warm > COALESCE(files.last_warm, 0)
                     THEN excluded.last_warm ELSE files.last_warm END
"""
UPSERT_OUTCOME = _OUTCOME_INSERT + "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" + _OUTCOME_CONFLICT
_SUCCESS = ("warm", "empty")


def _unnest(types: Sequence[str]) -> str:
    """``unnest(?::t1[], ...)``: one array parameter per column, a row per index."""
    return "unnest(" + ", ".join(f"?::{t}[]" for t in types) + ")"


PG_UPSERT_MEMBER_FILES = (_MEMBER_FILE_INSERT + " SELECT * FROM " + _unnest(_MEMBER_FILE_TYPES)
                          + _MEMBER_FILE_CONFLICT)
PG_UPSERT_OUTCOMES = (_OUTCOME_INSERT + "SELECT * FROM " + _unnest(_OUTCOME_TYPES)
                      + _OUTCOME_CONFLICT)

RECONNECT_FOR = 300.0
"""Seconds a PostgreSQL writer keeps retrying a batch whose connection was lost (backoff 0.2 s
doubling to 5 s) before it fails as it would on any other error: longer than a daemon's
lease, so a server restart or a short network partition loses nothing and stops nothing;
the store's ``flush`` waits meanwhile."""
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


# Tape rows (issue 13). A stage request made: the file is staging (staged_at cleared) under
# that request's pin. Staged: on disk since staged_at, so its locality is DISK_AND_TAPE now.
# Plain ? in the order of the row the store sent (no ?N: psycopg has no numbered parameters).
# Each kind as (its SET clause, a {n} per parameter; the parameters' types); the id comes last.
_TAPE_UPDATES = {
    "located": ("locality = {0}, locality_at = {1}", ("text", "double precision")),
    "staging": ("stage_request = {0}, stage_uri = {1}, pinned_until = {2}, staged_at = NULL",
                ("text", "text", "double precision")),
    "staged": ("staged_at = {0}, pinned_until = {1}, locality = 'DISK_AND_TAPE', "
               "locality_at = {2}", ("double precision", "double precision",
                                     "double precision")),
}


def _tape_update(key: str) -> str:
    """The row-at-a-time UPDATE of a tape row kind (SQLite)."""
    clause, types = _TAPE_UPDATES[key]
    return f"UPDATE files SET {clause.format(*['?'] * len(types))} WHERE id = ?"


def _pg_tape_update(key: str) -> str:
    """The same UPDATE with its rows as arrays (PostgreSQL)."""
    clause, types = _TAPE_UPDATES[key]
    names = [f"u.c{i}" for i in range(len(types))]
    columns = ", ".join(f"c{i}" for i in range(len(types)))
    return (f"UPDATE files SET {clause.format(*names)} "
            f"FROM {_unnest((*types, 'bigint'))} AS u({columns}, id) WHERE files.id = u.id")


LOCATED, STAGING, STAGED = (_tape_update(k) for k in ("located", "staging", "staged"))
_PG_TAPE = {key: _pg_tape_update(key) for key in _TAPE_UPDATES}


def _outcome_rows(rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """Outcome rows of the protocol with last_warm added: their time for a success."""
    return [(*r, r[8] if r[3] in _SUCCESS else None) for r in rows]


def _tape_rows(key: str, rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """Tape rows of the protocol (id first) in the order of their statement's parameters."""
    if key == "staged":  # [id, time, pinned_until]
        return [(r[1], r[2], r[1], r[0]) for r in rows]
    return [(*r[1:], r[0]) for r in rows]


def _merged_member_files(rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """One (id, url, name, size) per id: the first row's URL and name (the insert), the last
    size given (each later row sets a size it has)."""
    merged: dict[Any, Sequence[Any]] = {}
    for row in rows:
        first = merged.get(row[0])
        if first is None:
            merged[row[0]] = row
        elif row[3] is not None:
            merged[row[0]] = (*first[:3], row[3])
    return list(merged.values())


def _merged_outcomes(rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """One outcome row (``_outcome_rows``'s, last_warm last) per id: the last row's outcome,
    the latest last_try and last_warm of them all, as the upsert applied in order leaves it."""
    merged: dict[Any, Sequence[Any]] = {}
    for row in rows:
        before = merged.get(row[0])
        if before is None:
            merged[row[0]] = row
        else:
            warmed = max((t for t in (before[9], row[9]) if t is not None), default=None)
            merged[row[0]] = (*row[:8], max(before[8], row[8]), warmed)
    return list(merged.values())


def _last_per_id(rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """The last row per id (the last parameter), as UPDATEs applied in order leave it."""
    return list({row[-1]: row for row in rows}.values())


def _columns(rows: list[Sequence[Any]]) -> list[list[Any]]:
    """Rows as one list per column (the array parameters of an ``unnest``)."""
    return [list(column) for column in zip(*rows)]


def write(db: Database, doc: dict[str, Any]) -> None:
    """Apply one batch in one transaction."""
    with db.transaction():
        if db.dialect.name == "postgresql":
            _write_arrays(db, doc)
            return
        for catalog, definition, listed, rows in doc.get("members", ()):
            def_id = definition_id(db, catalog, definition)
            db.executemany(UPSERT_MEMBER_FILE, rows)
            db.executemany(INSERT_MEMBER, [(def_id, row[0], listed) for row in rows])
        if doc.get("outcomes"):
            db.executemany(UPSERT_OUTCOME, _outcome_rows(doc["outcomes"]))
        for key, statement in (("located", LOCATED), ("staging", STAGING), ("staged", STAGED)):
            if doc.get(key):
                db.executemany(statement, _tape_rows(key, doc[key]))


def _write_arrays(db: Database, doc: dict[str, Any]) -> None:
    """``write`` on PostgreSQL, inside its transaction: one statement per kind of row."""
    db.execute("SELECT pg_advisory_xact_lock(?)", (PG_WRITE_LOCK,))
    for catalog, definition, listed, rows in doc.get("members", ()):
        def_id = definition_id(db, catalog, definition)
        if not rows:
            continue
        files = _merged_member_files(rows)
        db.execute(PG_UPSERT_MEMBER_FILES, _columns(files))
        db.execute(PG_INSERT_MEMBERS, (def_id, [row[0] for row in files], listed))
    if doc.get("outcomes"):
        db.execute(PG_UPSERT_OUTCOMES, _columns(_merged_outcomes(_outcome_rows(doc["outcomes"]))))
    for key in ("located", "staging", "staged"):
        if doc.get(key):
            db.execute(_PG_TAPE[key], _columns(_last_per_id(_tape_rows(key, doc[key]))))


def _lost(db: PostgresDatabase, error: BaseException) -> bool:
    """Whether ``error`` says the connection is gone or the server unreachable (or refusing
    us for now, as during a restart), not that the batch is wrong: worth a new connection.
    ``connect`` wraps its errors in ``StateError``, hence the cause."""
    import psycopg

    return (db.conn.broken or isinstance(error, psycopg.OperationalError)
            or isinstance(error.__cause__, psycopg.OperationalError))


def write_through(db: PostgresDatabase, doc: dict[str, Any],
                  reconnect: Callable[[], PgConnection], *, patience: float = RECONNECT_FOR,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """``write`` one batch, again on a new connection (``reconnect()``, put in ``db.conn``)
    while the connection is lost, for up to ``patience`` seconds; then, or for any other
    error, raise. Safe because a batch is idempotent: upserts, members ``ON CONFLICT DO
    NOTHING``, times that only grow, tape updates setting given values; one whose ``COMMIT``
    was sent but not answered is applied twice to the same effect. One line on stderr per
    outage, not per attempt."""
    from prestaged.retry import RetryPolicy

    policy = RetryPolicy(attempts=sys.maxsize, initial=BACKOFF_FIRST, max=BACKOFF_MAX,
                         jitter=0.1, total=patience)
    started: float | None = None
    retry = 0
    while True:
        try:
            if db.conn.closed:
                db.conn = reconnect()
            write(db, doc)
            return
        except driver_errors(StateError) as e:
            if not _lost(db, e):
                raise
            if started is None:
                started = time.monotonic()
                sys.stderr.write(f"prestaged-writer: state {db.where}: connection lost "
                                 f"({db.describe(e)}); retrying for up to {patience:g} s\n")
                sys.stderr.flush()
            retry += 1
            wait = policy.delay(retry, elapsed=time.monotonic() - started)
            if wait is None:
                raise
            db.conn.close()
            sleep(wait)


def _open(target: str, timeout: float, parent: str) -> Database:
    """The database to write: the SQLite file ``target``, or (``target`` "-") the PostgreSQL
    URL read as the first line of stdin (never on the command line, where ps shows it), its
    connection named ``prestaged-writer/<parent>`` (the store's pid)."""
    if target != "-":
        conn = sqlite3.connect(target, timeout=timeout, isolation_level=None)
        configure(conn)
        return SqliteDatabase(conn, target)
    url = sys.stdin.buffer.readline().decode().strip()
    return PostgresDatabase(_connect(url, parent), url)


def _connect(url: str, parent: str) -> PgConnection:
    """A connection named ``prestaged-writer/<parent>`` (the store's pid) in
    ``pg_stat_activity``: an operator tells a daemon's writer from its other backends."""
    from prestaged.state.postgres import connect

    return connect(url, application_name=f"prestaged-writer/{parent}")


def main(argv: list[str]) -> int:
    """Serve batches for the database ``argv[1]`` (a file, or "-": a PostgreSQL URL on the
    first line of stdin), busy timeout ``argv[2]`` seconds (SQLite), ``argv[3]`` the store's
    pid (optional; names a PostgreSQL connection), ``argv[4]`` seconds to retry a batch whose
    connection was lost (optional; default ``RECONNECT_FOR``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = argv[3] if len(argv) > 3 else "?"
    patience = float(argv[4]) if len(argv) > 4 else RECONNECT_FOR
    try:
        db = _open(argv[1], float(argv[2]), parent)
    except driver_errors(StateError, OSError, ValueError) as e:
        return _fail(e)
    try:
        for line in sys.stdin.buffer:
            doc = json.loads(line)
            if "flush" in doc:
                sys.stdout.write(f"ok {doc['flush']}\n")
                sys.stdout.flush()
            elif isinstance(db, PostgresDatabase):
                write_through(db, doc, functools.partial(_connect, db.url, parent),
                              patience=patience)
            else:
                write(db, doc)
    except driver_errors(StateError, OSError, ValueError) as e:
        return _fail(e, db)
    finally:
        db.close()
    return 0


def _fail(e: BaseException, db: Database | None = None) -> int:
    """Tell the store what went wrong (one line on stdout), then exit 1."""
    message = str(e)
    if isinstance(db, PostgresDatabase):
        # A reconnection's StateError already names the state, as the store's line will.
        message = (message.replace(f"state {db.where}: ", "", 1) if isinstance(e, StateError)
                   else db.describe(e))
    message = " ".join(message.split()) or type(e).__name__
    with contextlib.suppress(OSError):
        sys.stdout.write(f"error {message}\n")
        sys.stdout.flush()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
