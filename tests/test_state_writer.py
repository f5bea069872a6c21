"""The writer process applies a batch the same way on both backends (issue 16's follow-up).

On SQLite it executes a batch's rows one at a time; on PostgreSQL one statement per kind of
row with the columns as arrays (``unnest``). Such a statement must not touch a file twice, so
the writer first merges a batch's rows per file. The row-at-a-time SQLite result is the
reference: the same batches, with repeated files, older times and rows already stored, must
leave the same tables on PostgreSQL. Expected values are asserted too, so that both writers
cannot agree on a wrong answer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from prestaged.state.db import Database, PostgresDatabase, SqliteDatabase
from prestaged.state.schema import configure, migrate
from prestaged.state.writer import write

A, B, C, D, E = 11, -22, 33, 2**62, 55  # file ids are signed 64-bit hashes
BOOM = 'said "no", {1,2} \\ NULL \u00e9'  # what an array literal must quote

FIRST = {
    "members": [["samweb", "ds", 300.0, [[A, "https://h/a", "a", None],
                                         [C, "https://h/c", "c", 7]]]],
    "outcomes": [[C, "https://h/c", "c", "warm", 206, 4, 1, "", 200.0]],
    "located": [[C, "DISK", 200.0]],
}
SECOND = {
    "members": [
        ["samweb", "ds", 200.0, [  # written after FIRST, listed before it
            [A, "https://h/a", "a", 5],        # a size arrives for a file stored without one
            [B, "https://h/b", "b", 9],
            [B, "https://h/b", "b", None],     # no size: keeps 9
            [D, "https://h/d,{x}", "NULL", 1],
            [D, "https://h/d,{x}", "NULL", 2 ** 40],  # the last size given wins
        ]],
        ["metacat", "empty:set", 200.0, []],   # an empty definition is still recorded
        ["metacat", "other", 200.0, [[B, "https://h/b", "b", None]]],
    ],
    "outcomes": [
        [A, "https://h/a", "a", "warm", 206, 4, 1, "", 100.0],
        [A, "https://h/a", "a", "failed", 500, 0, 3, BOOM, 90.0],  # older, recorded later
        [B, "https://h/b", "b", "failed", None, 0, 2, "refused", 50.0],
        [B, "https://h/b", "b", "warm", 206, 4, 1, "", 60.0],
        [C, "https://h/c", "c", "warm", 206, 4, 1, "", 150.0],  # older than the stored success
    ],
    "located": [[A, "TAPE", 100.0], [A, "DISK", 101.0], [B, "TAPE", 55.0]],
    # B: asked in req-1, then req-2 (made at 950 for an hour); ds and other rely on req-2
    "staging": [[B, "req-1", "https://fe/api/v1/tape", 900.0, 86400.0],
                [B, "req-2", "https://fe/api/v1/tape", 950.0, 3600.0],
                [D, "req-4", "https://fe/api/v1/tape", 960.0, 60.0]],
    "wanted": [["samweb", "ds", B, "req-1"], ["samweb", "ds", B, "req-2"],
               ["metacat", "other", B, "req-2"], ["samweb", "ds", D, "req-4"]],
    # B landed in req-2 (req-1's late landing marks nothing); D's req-4 ended without it
    "staged": [[B, "req-2", 1000.0, 4600.0], [B, "req-1", 990.0, 9.0]],
    "ended": [[D, "req-4", 980.0], [D, "req-0", 1.0], [B, "req-2", 5.0]],
}
# A follower notes the request again: what is known of it (made, landed, pinned) stays.
AGAIN = {"staging": [[B, "req-2", "https://fe/api/v1/tape", 999.0, 1.0]]}


# A batch whose columns hold nothing but NULLs (no size, no HTTP status, no success, no pin):
# the arrays carry no element to tell their type by, only the statement's casts do.
NULLS = {
    "members": [["samweb", "ds", 300.0, [[E, "https://h/e", "e", None]]]],
    "outcomes": [[E, "https://h/e", "e", "failed", None, 0, 1, "unreachable", 300.0]],
    "staging": [[E, "req-3", "https://fe/api/v1/tape", None, None]],
}


def _sqlite(path: Path) -> SqliteDatabase:
    conn = sqlite3.connect(path, isolation_level=None)
    configure(conn)
    migrate(conn, path)
    return SqliteDatabase(conn, str(path))


def _postgres(url: str) -> PostgresDatabase:
    from prestaged.state.postgres import open_state

    return PostgresDatabase(open_state(url), url)


def _tables(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    files = ("SELECT id, url, name, size, status, http_status, bytes, attempts, last_error,"
             " last_try, last_warm, locality, locality_at, stage_request, stage_uri, staged_at,"
             " pinned_until, stage_created, stage_lifetime, stage_ended FROM files ORDER BY id")
    members = ("SELECT d.catalog, d.name, m.file_id, m.listed, m.pin_request FROM members m"
               " JOIN definitions d ON d.id = m.definition_id ORDER BY 1, 2, 3")
    return {
        "files": [tuple(row) for row in db.execute(files).fetchall()],
        "members": [tuple(row) for row in db.execute(members).fetchall()],
        "definitions": [tuple(row) for row in db.execute(
            "SELECT catalog, name FROM definitions ORDER BY 1, 2").fetchall()],
    }


def _written(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    try:
        for batch in (FIRST, SECOND, NULLS, AGAIN):
            write(db, batch)
        return _tables(db)
    finally:
        db.close()


def test_postgresql_arrays_leave_what_sqlite_rows_leave(tmp_path: Path, pg_url: str) -> None:
    reference = _written(_sqlite(tmp_path / "state.db"))
    assert _written(_postgres(pg_url)) == reference

    files = {row[0]: row for row in reference["files"]}
    # A: the outcome recorded last, the latest try and the success's time
    assert files[A][3:11] == (5, "failed", 500, 0, 3, BOOM, 100.0, 100.0)
    assert files[A][11:13] == ("DISK", 101.0)
    # B: warm after a failure; staged under the second request, so on disk now, pinned from
    # its landing for the hour that request asked
    assert files[B][3:11] == (9, "warm", 206, 4, 1, "", 60.0, 60.0)
    assert files[B][11:] == ("DISK_AND_TAPE", 1000.0, "req-2", "https://fe/api/v1/tape",
                             1000.0, 4600.0, 950.0, 3600.0, None)
    # D: its request ended without landing (an end of another request changes nothing)
    assert files[D][11:] == (None, None, "req-4", "https://fe/api/v1/tape", None, None, 960.0,
                             60.0, 980.0)
    # C: an older success does not move last_try or last_warm back
    assert files[C][4:11] == ("warm", 206, 4, 1, "", 200.0, 200.0)
    assert files[D][1:4] == ("https://h/d,{x}", "NULL", 2 ** 40)
    assert files[E][3:11] == (None, "failed", None, 0, 1, "unreachable", 300.0, None)
    assert files[E][13:] == ("req-3", "https://fe/api/v1/tape", None, None, None, None, None)
    assert reference["definitions"] == [("metacat", "empty:set"), ("metacat", "other"),
                                        ("samweb", "ds")]
    # "listed" only grows: A and C keep FIRST's time, written before SECOND's older one
    listed = {A: 300.0, B: 200.0, C: 300.0, D: 200.0, E: 300.0}
    # who relies on a pin: both definitions on B's req-2 (ds's last word), nobody on D's
    # ended req-4
    pin = {B: "req-2"}
    assert reference["members"] == [("metacat", "other", B, 200.0, "req-2"),
                                     *[("samweb", "ds", f, listed[f], pin.get(f))
                                       for f in sorted(listed)]]


def test_a_batch_written_twice_changes_nothing(pg_url: str) -> None:
    """Batches are idempotent (the writer resends one whose COMMIT went unanswered)."""
    db = _postgres(pg_url)
    try:
        write(db, FIRST)
        write(db, SECOND)
        once = _tables(db)
        write(db, SECOND)
        assert _tables(db) == once
    finally:
        db.close()


def test_the_writer_is_this_prestaged_whatever_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer ran as `python -m prestaged.state.writer`, which puts the directory it starts
    in first on the path: run from a checkout of another version, the store was fed that
    version's writer (a benchmark's baseline got today's and failed)."""
    from prestaged.state.store import Store

    other = tmp_path / "prestaged"
    other.mkdir()
    (other / "__init__.py").write_text("raise SystemExit('another prestaged')\n")
    monkeypatch.chdir(tmp_path)
    with Store(tmp_path / "state.db") as store:
        run = store.start_run("local", "ds")
        store.record("https://h/a", "a", "warm", 206, 4, 1, "")
        store.finish_run(run, {"warm": 1}, 0, "done")
        assert store.runs()[0].exit_code == 0
