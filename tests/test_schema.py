"""The migrations written once for SQLite and PostgreSQL render, for SQLite, exactly the schema
prestaged had before they had dialects, so existing state files keep working (issue 16)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from prestaged.state import schema
from prestaged.state.schema import MIGRATIONS, POSTGRESQL, SCHEMA_VERSION, SQLITE, Dialect

# The SQLite-only migrations as they were at 838ac47 (prestaged/state/schema.py), copied here
# as the fixture the dialect must reproduce: a state file created by any earlier prestaged.
OLD_SQLITE_MIGRATIONS: list[str] = [
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


def _old_migrate(path: Path) -> None:
    """A state file made the way prestaged made it before the dialects."""
    conn = sqlite3.connect(path, isolation_level=None)
    for version, migration in enumerate(OLD_SQLITE_MIGRATIONS, 1):
        conn.executescript(f"BEGIN; {migration}; PRAGMA user_version = {version}; COMMIT;")
    conn.close()


def _new_migrate(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, path)
    conn.close()


def _schema_of(path: Path) -> tuple[int, list[tuple[str, ...]]]:
    """``user_version`` and every ``sqlite_master`` row (type, name, table, CREATE text)."""
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                            " ORDER BY type, name").fetchall()
        return version, rows
    finally:
        conn.close()


def test_sqlite_rendering_is_the_old_schema_word_for_word() -> None:
    """Each migration rendered for SQLite is the statement list the SQLite-only schema ran."""
    assert len(OLD_SQLITE_MIGRATIONS) == 6 < len(MIGRATIONS) == SCHEMA_VERSION
    for version, old in enumerate(OLD_SQLITE_MIGRATIONS, 1):
        assert SQLITE.statements(version) == [s for s in old.split(";") if s.strip()]


def test_sqlite_file_migrated_now_equals_one_migrated_before(tmp_path: Path) -> None:
    """A database migrated by today's runner has the same sqlite_master (tables, indexes, their
    CREATE text) and user_version as one made by the old migrations (version 6, the last schema
    before the dialects) and then brought up to date by today's runner."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    _old_migrate(old)
    assert _schema_of(old)[0] == len(OLD_SQLITE_MIGRATIONS)
    _new_migrate(old)
    _new_migrate(new)
    old_schema = _schema_of(old)
    assert old_schema[0] == SCHEMA_VERSION
    assert len(old_schema[1]) > 10  # tables and indexes, not an empty file
    assert _schema_of(new) == old_schema


def test_old_state_file_is_current_for_the_new_runner(tmp_path: Path) -> None:
    """A file made by the old migrations gets only the migrations after them from today's
    runner: its tables keep their CREATE text and its rows stay as they were."""
    path = tmp_path / "old.db"
    _old_migrate(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO definitions (catalog, name) VALUES ('local', 'd')")
    conn.commit()
    conn.close()
    before = _schema_of(path)
    _new_migrate(path)
    after = _schema_of(path)
    assert after[0] == SCHEMA_VERSION
    kept = {row[1]: row for row in after[1]}
    # 7 adds the campaigns' lease columns, 8 what the listings said to members and definitions,
    # 9 the stage requests' dates and who relies on their pins to files and members
    assert all(kept[row[1]] == row for row in before[1]
               if row[1] not in ("campaigns", "members", "definitions", "files"))
    assert {"cluster_members", "watch_schedule", "watch_rounds", "round_chunks"} <= set(kept)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT catalog, name FROM definitions").fetchall() == [("local", "d")]
    conn.close()


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRESQL], ids=lambda d: d.name)
def test_every_type_word_is_rendered(dialect: Dialect) -> None:
    """No migration uses a type word a dialect lacks, and none is left in braces."""
    for version in range(1, SCHEMA_VERSION + 1):
        for statement in dialect.statements(version):
            assert not schema._WORD.search(statement), statement


def test_postgresql_types_hold_64_bit_ids_and_exact_seconds() -> None:
    """PostgreSQL gets BIGINT for hashed file ids, DOUBLE PRECISION for times (never 4-byte
    REAL), identity keys, and no WITHOUT ROWID."""
    text = ";".join(s for v in range(1, SCHEMA_VERSION + 1) for s in POSTGRESQL.statements(v))
    assert "WITHOUT ROWID" not in text
    assert " REAL" not in text
    assert "id BIGINT PRIMARY KEY" in text  # files: the url_id hash, not auto-numbered
    assert text.count("GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY") == 5  # + watch_rounds
    assert "file_id BIGINT NOT NULL REFERENCES files(id)" in text


def test_unknown_type_word_is_an_error() -> None:
    """A migration naming a word the dialect does not define fails loudly, never renders it."""
    with pytest.raises(KeyError):
        SQLITE.render("CREATE TABLE t (x {uuid})")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_pin_recorded_before_9_stays_with_every_definition_listing_its_file(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Before 9 a pin was the file's, released by whichever definition listed it: after 9 every
    definition listing a pinned file relies on that pin (so none releases it while another
    still lists it); unpinned files and files without a request are relied on by nobody."""
    if engine == "sqlite":
        conn: Any = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        dialect = SQLITE
    else:
        from prestaged.state.postgres import connect

        conn = connect(request.getfixturevalue("pg_url"))
        dialect = POSTGRESQL
    ph = "?" if engine == "sqlite" else "%s"
    try:
        for version in range(1, 9):
            for statement in dialect.statements(version):
                conn.execute(statement)
        for name in ("a", "b"):
            conn.execute(f"INSERT INTO definitions (catalog, name) VALUES ('local', {ph})",
                         (name,))
        files = [(1, "req-1", "https://fe/v1", 4e9), (2, "req-2", "https://fe/v1", None),
                 (3, None, None, None)]
        for fid, req, uri, until in files:
            conn.execute("INSERT INTO files (id, url, name, stage_request, stage_uri, "
                         f"pinned_until) VALUES ({ph}, 'u', 'n', {ph}, {ph}, {ph})",
                         (fid, req, uri, until))
        for def_id, fid in ((1, 1), (2, 1), (1, 2), (2, 3)):
            conn.execute(f"INSERT INTO members (definition_id, file_id) VALUES ({ph}, {ph})",
                         (def_id, fid))
        for statement in dialect.statements(9):
            conn.execute(statement)
        rows = conn.execute("SELECT definition_id, file_id, pin_request FROM members "
                            "ORDER BY 1, 2").fetchall()
    finally:
        conn.close()
    assert [tuple(r) for r in rows] == [(1, 1, "req-1"), (1, 2, None), (2, 1, "req-1"),
                                        (2, 3, None)]


# Migrations written since the dialects, by the first 16 hex digits of their text's SHA-256.
# A migration some tree has run is never edited: a state it made would be taken as current
# and fail later (7 once gained two columns in place: states it had made lacked them). Change
# the schema with a new migration, and add its digest here.
RELEASED = {7: "04575307f3d13d32", 8: "8611bb2c8e79e420", 9: "bc055ca3987a97c9",
            10: "ed5c0dd0b705e9a7"}


def test_released_migrations_are_never_edited() -> None:
    """Every migration since the dialects is the text it was released with."""
    import hashlib

    assert len(MIGRATIONS) == max(RELEASED), "add the new migration's digest to RELEASED"
    for version, digest in RELEASED.items():
        text = MIGRATIONS[version - 1]
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, version
