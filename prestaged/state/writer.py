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
located, staging, wanted, staged, ended): ``"located": [[id, locality, time]]``, ``"staging":
[[id, request, uri, created, lifetime]]``, ``"wanted": [[catalog, definition, id, request]]``
(the definition relies on that request's pin for the file), ``"staged": [[id, request, time,
pinned_until]]``, ``"ended": [[id, request, time]]`` (it ended without bringing the file to
disk: nobody relies on it for that file any more).
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
import re
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


# Tape rows (issue 13). Each kind updates the files row of its id (first in the protocol's
# row), with these columns after it: located, its locality; staging, a stage request made or
# followed for it (the same request again keeps what is known of it: landed, pinned, ended;
# another one starts afresh); staged, on disk since then (DISK_AND_TAPE now) and pinned until;
# ended, the request ended without bringing it to disk. staged and ended apply only while the
# file's row names that request: a later request's row is never marked by an earlier one's.
# Written once with {name} placeholders: "?" in the row's order on SQLite (psycopg has no
# numbered parameters), the columns of an unnest on PostgreSQL.
_SAME = "files.stage_request = {request}"
_SECONDS = "double precision"
_TAPE_UPDATES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    # kind: (SET ... WHERE of its UPDATE files, the row's columns after the id and their types)
    "located": ("locality = {locality}, locality_at = {stamp} WHERE files.id = {id}",
                (("locality", "text"), ("stamp", _SECONDS))),
    "staging": ("stage_request = {request}, stage_uri = {uri}, "
                "stage_created = CASE WHEN " + _SAME + " THEN COALESCE(files.stage_created, "
                "{created}) ELSE {created} END, "
                "stage_lifetime = CASE WHEN " + _SAME + " THEN COALESCE(files.stage_lifetime, "
                "{lifetime}) ELSE {lifetime} END, "
                "staged_at = CASE WHEN " + _SAME + " THEN files.staged_at END, "
                "pinned_until = CASE WHEN " + _SAME + " THEN files.pinned_until END, "
                "stage_ended = CASE WHEN " + _SAME + " THEN files.stage_ended END "
                "WHERE files.id = {id}",
                (("request", "text"), ("uri", "text"), ("created", _SECONDS),
                 ("lifetime", _SECONDS))),
    "staged": ("staged_at = {stamp}, pinned_until = {pinned}, locality = 'DISK_AND_TAPE', "
               "locality_at = {stamp}, stage_ended = NULL WHERE files.id = {id} AND " + _SAME,
               (("request", "text"), ("stamp", _SECONDS), ("pinned", _SECONDS))),
    "ended": ("stage_ended = {stamp} WHERE files.id = {id} AND " + _SAME
              + " AND files.staged_at IS NULL",
              (("request", "text"), ("stamp", _SECONDS))),
}
TAPE_KINDS = ("located", "staging", "staged", "ended")
"""The tape row kinds, in the order a batch applies them (a file's life)."""
_NAME = re.compile(r"\{([a-z]+)\}")

# Who relies on a pin (schema 9): "wanted" [catalog, definition, id, request] is the stage
# request whose pin that definition's run relies on for the file (it made, adopted or followed
# it); a request that "ended" for a file is relied on by nobody any more (unless the file's row
# has it landed there: an end never undoes a landing).
WANTED = ("UPDATE members SET pin_request = ? WHERE definition_id = (SELECT id FROM definitions "
          "WHERE catalog = ? AND name = ?) AND file_id = ?")
PG_WANTED = ("UPDATE members SET pin_request = u.request FROM unnest(?::text[], ?::text[], "
             "?::bigint[], ?::text[]) AS u(catalog, name, id, request) JOIN definitions d "
             "ON d.catalog = u.catalog AND d.name = u.name "
             "WHERE members.definition_id = d.id AND members.file_id = u.id")
_LANDED_THERE = (" AND NOT EXISTS (SELECT 1 FROM files f WHERE f.id = members.file_id AND "
                 "f.stage_request = members.pin_request AND f.staged_at IS NOT NULL)")
UNWANTED = ("UPDATE members SET pin_request = NULL WHERE file_id = ? AND pin_request = ?"
            + _LANDED_THERE)
PG_UNWANTED = ("UPDATE members SET pin_request = NULL FROM unnest(?::bigint[], ?::text[]) "
               "AS u(id, request) WHERE members.file_id = u.id AND members.pin_request = "
               "u.request" + _LANDED_THERE)


def _tape_update(key: str) -> str:
    """The row-at-a-time UPDATE of a tape row kind (SQLite): a ``?`` per placeholder."""
    return "UPDATE files SET " + _NAME.sub("?", _TAPE_UPDATES[key][0])


def _pg_tape_update(key: str) -> str:
    """The same UPDATE with its rows as arrays (PostgreSQL): ``u.<column>`` of an unnest."""
    clause, columns = _TAPE_UPDATES[key]
    names = ", ".join(["id", *(name for name, _ in columns)])
    arrays = _unnest(["bigint", *(kind for _, kind in columns)])
    sets, where = _NAME.sub(r"u.\1", clause).split(" WHERE ", 1)
    return f"UPDATE files SET {sets} FROM {arrays} AS u({names}) WHERE {where}"


def _tape_params(key: str, rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """Tape rows of the protocol (id first) as the parameters of ``_tape_update(key)``: each
    column where its ``?`` is (some appear twice)."""
    columns = ["id", *(name for name, _ in _TAPE_UPDATES[key][1])]
    where = [columns.index(name) for name in _NAME.findall(_TAPE_UPDATES[key][0])]
    return [tuple(row[i] for i in where) for row in rows]


_SQLITE_TAPE = {key: _tape_update(key) for key in TAPE_KINDS}
_PG_TAPE = {key: _pg_tape_update(key) for key in TAPE_KINDS}


def _outcome_rows(rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """Outcome rows of the protocol with last_warm added: their time for a success."""
    return [(*r, r[8] if r[3] in _SUCCESS else None) for r in rows]


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


def _last_per(rows: list[Sequence[Any]], key: int) -> list[Sequence[Any]]:
    """The last row per value of its first ``key`` columns, as UPDATEs applied in order leave
    it (staged and ended rows are per file and request: they apply to one request only)."""
    return list({tuple(row[:key]): row for row in rows}.values())


_MERGE_KEY = {"located": 1, "staging": 1, "staged": 2, "ended": 2}
"""The columns a tape kind's rows are merged by on PostgreSQL (``_last_per``)."""


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
        for key in TAPE_KINDS:
            if doc.get(key):
                db.executemany(_SQLITE_TAPE[key], _tape_params(key, doc[key]))
            if key == "staging" and doc.get("wanted"):
                db.executemany(WANTED, [(r[3], r[0], r[1], r[2]) for r in doc["wanted"]])
        if doc.get("ended"):
            db.executemany(UNWANTED, [(r[0], r[1]) for r in doc["ended"]])


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
    for key in TAPE_KINDS:
        if doc.get(key):
            db.execute(_PG_TAPE[key], _columns(_last_per(doc[key], _MERGE_KEY[key])))
        if key == "staging" and doc.get("wanted"):
            db.execute(PG_WANTED, _columns(_last_per(doc["wanted"], 3)))
    if doc.get("ended"):
        db.execute(PG_UNWANTED, _columns(_last_per([r[:2] for r in doc["ended"]], 2)))


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
