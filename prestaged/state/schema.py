"""The state database's schema: forward migrations, connection settings, and the one way to
write in a transaction (``immediate``), shared by the store and its writer process.

Standard library and ``prestaged.errors`` only: the writer process imports it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prestaged.errors import StateError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "configure", "definition_id", "immediate", "migrate"]

log = logging.getLogger(__name__)

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
    # 3: campaign submissions (campaign/repository.py), their state transitions, and the
    # drainingn ledger of files a stage has taken, so that no file is ever submitted twice by
    # one stage.
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
    # 6: tape (issue 13): the last locality the Tape REST API gave for a file and when, and
    # the last stage request prestaged made for it: the endpoint holding its pin (to release
    # it later), when it reached disk (NULL while staging) and until when it is pinned.
    """
    ALTER TABLE files ADD COLUMN locality TEXT;
    ALTER TABLE files ADD COLUMN locality_at REAL;
    ALTER TABLE files ADD COLUMN stage_request TEXT;
    ALTER TABLE files ADD COLUMN stage_uri TEXT;
    ALTER TABLE files ADD COLUMN staged_at REAL;
    ALTER TABLE files ADD COLUMN pinned_until REAL;
    CREATE INDEX files_by_stage_request ON files (stage_request) WHERE stage_request IS NOT NULL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def configure(conn: sqlite3.Connection) -> None:
    """Per-connection settings every prestaged connection uses."""
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, fast commits


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``conn`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on any error.

    IMMEDIATE takes the write lock at the start, so a transaction never fails half-way on
    another process's lock (it waits up to the connection's busy timeout instead).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite has already rolled back after some errors (a full disk, an I/O error): a
        # ROLLBACK then fails and would hide the error that matters.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def definition_id(conn: sqlite3.Connection, catalog: str, definition: str) -> int:
    """The id of ``(catalog, definition)``, created if new."""
    conn.execute("INSERT OR IGNORE INTO definitions (catalog, name) VALUES (?, ?)",
                 (catalog, definition))
    row = conn.execute("SELECT id FROM definitions WHERE catalog = ? AND name = ?",
                       (catalog, definition)).fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema of ``conn`` (the database at ``path``) to ``SCHEMA_VERSION``; safe when
    several processes open it at once. ``StateError`` for a database that is not prestaged's
    or is newer than this prestaged."""
    if _version(conn, path) == SCHEMA_VERSION:
        return
    # The write lock is taken before the version is read again: of two processes opening a
    # new file together, the second waits, then finds nothing left to do.
    with immediate(conn):
        version = _version(conn, path)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
    if 0 < version < SCHEMA_VERSION:
        log.info("state %s: schema version %d -> %d", path, version, SCHEMA_VERSION)
    conn.execute("PRAGMA journal_mode = WAL")  # persistent: once per file is enough


def _version(conn: sqlite3.Connection, path: Path) -> int:
    """The schema version, after checking the file is ours and not from the future."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state {path}: schema version {version} is newer than this prestaged "
            f"knows ({SCHEMA_VERSION}); upgrade prestaged or use another --state file"
        )
    if version == 0:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables:
            raise StateError(
                f"state {path}: a SQLite database of something else (tables: "
                f"{', '.join(sorted(tables)[:5])}); choose another file with --state"
            )
    return version
