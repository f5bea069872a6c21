"""The state store's writer process: applies batches of rows to the SQLite file.

``prestaged.state.store.Store`` starts it (``python -m prestaged.state.writer DB TIMEOUT``) and
sends it one JSON document per line on stdin; it writes each document in one transaction. Running
the writes in a process of their own keeps SQLite's per-row work off the warming process's CPU
and GIL (in a thread of the warming process it cost 12-15% of the rate; bench/throughput.py).

Lines: ``{"members": [[catalog, definition, [[id, url, name, size], ...]], ...],
"outcomes": [[id, url, name, result, http_status, bytes, attempts, error, time], ...]}`` or
``{"flush": n}``, answered with the line ``ok n`` once everything before it is committed.
A batch may also carry tape rows, applied after the outcomes in this order (a file's life:
located, staging, staged): ``"located": [[id, locality, time]]``, ``"staging": [[id, request,
uri, pinned_until]]``, ``"staged": [[id, time, pinned_until]]``.
End of input: exit 0. A failure is answered with one line ``error <message>`` on stdout, then
exit 1; the store turns it into its one-line error (the disk is full, ...).

It ignores SIGINT and SIGTERM: a Ctrl-C, ``timeout`` or systemd's stop signal to the whole
process group must not kill it before the warming process has handed over its last batch and
closed the pipe, which is how it learns to finish. It imports only ``state.schema`` (the
package's ``__init__`` loads nothing eagerly), so it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import sys
from typing import Any

from prestaged.state.schema import configure, definition_id, immediate

UPSERT_MEMBER_FILE = (
    "INSERT INTO files (id, url, name, size) VALUES (?, ?, ?, ?) ON CONFLICT (id) "
    "DO UPDATE SET size = COALESCE(excluded.size, files.size)"
)
INSERT_MEMBER = "INSERT OR IGNORE INTO members (definition_id, file_id) VALUES (?, ?)"
# An outcome never erases a newer success written by another process: last_warm only grows.
UPSERT_OUTCOME = """
INSERT INTO files (id, url, name, status, http_status, bytes, attempts, last_error, last_try,
                   last_warm)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, CASE WHEN ?4 IN ('warm', 'empty') THEN ?9 END)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status,
    http_status = excluded.http_status,
    bytes = excluded.bytes,
    attempts = excluded.attempts,
    last_error = excluded.last_error,
    last_try = MAX(COALESCE(files.last_try, 0), excluded.last_try),
    last_warm = NULLIF(MAX(COALESCE(files.last_warm, 0), COALESCE(excluded.last_warm, 0)), 0)
"""


# Tape rows (issue 13). A stage request made: the file is staging (staged_at cleared) under
# that request's pin. Staged: on disk since staged_at, so its locality is DISK_AND_TAPE now.
LOCATED = "UPDATE files SET locality = ?2, locality_at = ?3 WHERE id = ?1"
STAGING = ("UPDATE files SET stage_request = ?2, stage_uri = ?3, pinned_until = ?4, "
           "staged_at = NULL WHERE id = ?1")
STAGED = ("UPDATE files SET staged_at = ?2, pinned_until = ?3, locality = 'DISK_AND_TAPE', "
          "locality_at = ?2 WHERE id = ?1")


def write(conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
    """Apply one batch in one transaction."""
    with immediate(conn):
        for catalog, definition, rows in doc.get("members", ()):
            def_id = definition_id(conn, catalog, definition)
            conn.executemany(UPSERT_MEMBER_FILE, rows)
            conn.executemany(INSERT_MEMBER, [(def_id, row[0]) for row in rows])
        if doc.get("outcomes"):
            conn.executemany(UPSERT_OUTCOME, doc["outcomes"])
        for key, statement in (("located", LOCATED), ("staging", STAGING), ("staged", STAGED)):
            if doc.get(key):
                conn.executemany(statement, doc[key])


def main(argv: list[str]) -> int:
    """Serve batches for the database ``argv[1]`` (busy timeout ``argv[2]`` seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        conn = sqlite3.connect(argv[1], timeout=float(argv[2]), isolation_level=None)
        configure(conn)
    except (sqlite3.Error, OSError) as e:
        return _fail(e)
    try:
        for line in sys.stdin.buffer:
            doc = json.loads(line)
            if "flush" in doc:
                sys.stdout.write(f"ok {doc['flush']}\n")
                sys.stdout.flush()
            else:
                write(conn, doc)
    except (sqlite3.Error, OSError, ValueError) as e:
        return _fail(e)
    finally:
        conn.close()
    return 0


def _fail(e: BaseException) -> int:
    """Tell the store what went wrong (one line on stdout), then exit 1."""
    message = " ".join(str(e).split()) or type(e).__name__
    with contextlib.suppress(OSError):
        sys.stdout.write(f"error {message}\n")
        sys.stdout.flush()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
