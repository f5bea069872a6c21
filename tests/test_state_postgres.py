"""A PostgreSQL state (issue 16), against a real throw-away PostgreSQL: the one schema migrated
once under an advisory lock, the same tables and columns as SQLite, and refusals (unreachable,
newer, foreign) that name the URL without its password."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit

import pytest

from prestaged.errors import EXIT_USAGE, StateError
from prestaged.state import schema
from prestaged.state.postgres import (
    MIGRATION_LOCK,
    VERSION_TABLE,
    connect,
    migrate,
    open_state,
    redacted_url,
)
from prestaged.state.schema import SCHEMA_VERSION
from prestaged.testing.postgres import PostgresCluster


def _applied(url: str) -> list[tuple[int, float]]:
    """The rows of the version table: (version, applied)."""
    with closing(connect(url)) as conn:
        return [(int(v), float(t)) for v, t in
                conn.execute(f"SELECT version, applied FROM {VERSION_TABLE} ORDER BY version")]


def _tables(url: str) -> list[str]:
    with closing(connect(url)) as conn:
        return [str(r[0]) for r in conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() ORDER BY 1")]


@pytest.fixture
def secret_url(pg_cluster: PostgresCluster, pg_url: str) -> Iterator[Callable[[str], str]]:
    """``make(password)``: ``pg_url``'s database as a URL with ``password`` in it and no
    password file (the cluster's real one is ``pg_cluster.password``)."""
    def make(password: str) -> str:
        real = pg_cluster.url_with_password(urlsplit(pg_url).path.lstrip("/"))
        return real.replace(quote(pg_cluster.password, safe=""), quote(password, safe=""))
    yield make


# --- migrating --------------------------------------------------------------------------------


def test_fresh_database_is_migrated_once_per_version(pg_url: str) -> None:
    """A new database gets every prestaged table and one version row per migration."""
    with closing(open_state(pg_url)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() is not None
    assert [v for v, _ in _applied(pg_url)] == list(range(1, SCHEMA_VERSION + 1))
    assert {"files", "definitions", "members", "runs", "campaign_submissions",
            "submission_events", "campaign_ledger", "campaign_controls", "campaigns",
            "campaign_ends", "cluster_members", "watch_schedule", "watch_rounds", "round_chunks",
            VERSION_TABLE} == set(_tables(pg_url))


def test_reopening_a_current_database_changes_nothing(pg_url: str) -> None:
    """A second open finds the schema current: migrate reports it and records nothing new."""
    open_state(pg_url).close()
    before = _applied(pg_url)
    with closing(connect(pg_url)) as conn:
        assert migrate(conn, pg_url) == SCHEMA_VERSION
    assert _applied(pg_url) == before


def test_an_older_schema_is_brought_forward(pg_url: str) -> None:
    """A database at version 1 (as an older prestaged left it) gets the later migrations only,
    keeping its rows."""
    with closing(connect(pg_url)) as conn:
        conn.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER PRIMARY KEY,"
                     " applied DOUBLE PRECISION NOT NULL)")
        for statement in schema.POSTGRESQL.statements(1):
            conn.execute(statement)
        conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (1, 1.5)")
        conn.execute("INSERT INTO definitions (catalog, name) VALUES ('local', 'd')")
        assert migrate(conn, pg_url) == 1
        assert conn.execute("SELECT catalog, name FROM definitions").fetchall() == [
            ("local", "d")]
    assert _applied(pg_url)[0] == (1, 1.5)
    assert [v for v, _ in _applied(pg_url)] == list(range(1, SCHEMA_VERSION + 1))


def _advisory_waiters(admin: Any) -> int:
    """Sessions of this database waiting for prestaged's migration lock."""
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND ((classid::bigint << 32) | objid::bigint) = %s", (MIGRATION_LOCK,)).fetchone()
    return int(row[0])


def test_concurrent_migrators_apply_each_migration_once(pg_url: str) -> None:
    """Two processes opening a new database together: both wait on the advisory lock, one
    migrates, the other finds it done; both end current, each migration applied once."""
    results: list[object] = []

    def open_one() -> None:
        try:
            with closing(connect(pg_url)) as conn:
                results.append(migrate(conn, pg_url))
        except Exception as e:  # reported by the assertion below, with its text
            results.append(e)

    with closing(connect(pg_url)) as holder:
        # Hold the lock so that both migrators read version 0 and then queue on it.
        with holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            threads = [threading.Thread(target=open_one) for _ in range(2)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while _advisory_waiters(holder) < 2:  # a query per turn, no sleep
                assert time.monotonic() < deadline, "the migrators never waited on the lock"
        for thread in threads:
            thread.join(30)
    assert results == [0, 0]
    assert [v for v, _ in _applied(pg_url)] == list(range(1, SCHEMA_VERSION + 1))


# --- refusals -----------------------------------------------------------------------------------


def test_newer_schema_is_refused_and_left_alone(pg_cluster: PostgresCluster,
                                                 pg_url: str) -> None:
    """A database migrated by a newer prestaged: StateError (exit 2) naming both versions and
    the URL without its password; nothing is changed."""
    open_state(pg_url).close()
    with closing(connect(pg_url)) as conn:
        conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    before = (_applied(pg_url), _tables(pg_url))
    secret = pg_cluster.url_with_password(urlsplit(pg_url).path.lstrip("/"))
    with pytest.raises(StateError) as err:
        open_state(secret)
    message = str(err.value)
    assert (f"schema version {SCHEMA_VERSION + 1} is newer than this prestaged knows "
            f"({SCHEMA_VERSION})") in message
    assert redacted_url(secret) in message and ":***@" in message
    leaked = pg_cluster.password in message  # not in the assert: it would print the password
    assert not leaked, "the password is in the message"
    assert err.value.exit_code == EXIT_USAGE == 2
    assert (_applied(pg_url), _tables(pg_url)) == before


def test_foreign_database_is_refused_and_left_alone(pg_url: str) -> None:
    """A database holding another program's tables and no prestaged version: StateError, and
    prestaged creates nothing in it."""
    with closing(connect(pg_url)) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StateError, match=r"a database of something else \(tables: photos\)"):
        open_state(pg_url)
    assert _tables(pg_url) == ["photos"]


def test_unreachable_server_is_refused_without_the_password() -> None:
    """No server on the socket the URL names: StateUnavailable (exit 69: it may come back,
    and systemd restarts a daemon for it, not for 2) saying what to check, with the user and
    socket directory but not the password."""
    pytest.importorskip("psycopg")
    with tempfile.TemporaryDirectory(prefix="pg-") as empty:
        url = f"postgresql://prestaged:{'s3cr3t-XYZ'}@/state?host={empty}"
        with pytest.raises(StateError) as err:
            open_state(url)
    message = str(err.value)
    assert message.startswith(f"state postgresql://prestaged:***@/state?host={empty}: "
                              "cannot connect (")
    assert f"{empty}/.s.PGSQL.5432" in message  # libpq's own words: which socket it tried
    assert "check that the server runs" in message
    assert "s3cr3t" not in message
    assert "\n" not in message
    assert err.value.exit_code == 69


def test_wrong_password_is_refused_without_either_password(
        pg_cluster: PostgresCluster, secret_url: Callable[[str], str]) -> None:
    """The server refuses our password: StateError quoting the server's reason, neither the
    given nor the real password in it."""
    url = secret_url("not-the-password-7Q")
    with pytest.raises(StateError) as err:
        open_state(url)
    message = str(err.value)
    assert 'password authentication failed for user "prestaged"' in message
    assert "not-the-password-7Q" not in message
    leaked = pg_cluster.password in message  # not in the assert: it would print the password
    assert not leaked, "the cluster's password is in the message"
    assert redacted_url(url) in message
    assert err.value.exit_code == 2  # the configuration's fault: restarting cannot fix it


@pytest.mark.parametrize(("url", "said"), [
    ("postgresql://127.0.0.1:99999/state", "99999"),
    ("postgresql://127.0.0.1:abc/state", "abc"),
    ("postgresql://unresolvable.invalid:abc/state", "abc"),
    ("postgresql://h1:5432,h2:x/state", "x"),
    ("postgresql:///state?port=0", "0"),
    ("postgresql:///state?sslmode=bogus", "sslmode"),
    ("postgresql:///state?connect_timeout=abc", "connect_timeout"),
])
def test_a_url_value_libpq_refuses_is_exit_2_not_69(url: str, said: str) -> None:
    """A port that is no port, or an option value libpq refuses, is the URL's mistake: exit 2
    (systemd does not restart the daemon for it). They were StateUnavailable, exit 69, as for a
    server that is down, so a typo in state.url restarted the daemon for ever, and the port
    "abc" of a host name was blamed on the resolver."""
    pytest.importorskip("psycopg")
    with pytest.raises(StateError) as err:
        open_state(url)
    assert err.value.exit_code == 2, str(err.value)
    assert said in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_url_is_refused_without_the_password() -> None:
    """A URL libpq cannot parse: StateError, the password hidden even where libpq quotes it."""
    pytest.importorskip("psycopg")
    url = "postgresql://prestaged:pa55-Qq@[::1/state"  # libpq quotes it back: no "]"
    with pytest.raises(StateError) as err:
        open_state(url)
    message = str(err.value)
    assert "not a usable PostgreSQL URL" in message
    assert 'IPv6 host address in URI: "postgresql://prestaged:***@[::1/state"' in message
    assert "pa55-Qq" not in message


@pytest.mark.parametrize("url", ["postgresql://u@127.0.0.1:1/db?password=hunter2%ZZ",
                                 "postgresql://u@127.0.0.1:1/db?sslpassword=hunter2s"])
def test_a_password_parameter_is_hidden_where_libpq_quotes_it(url: str) -> None:
    """A password= parameter libpq quotes back (a bad percent-encoding), and sslpassword=:
    hidden in the error too."""
    pytest.importorskip("psycopg")
    with pytest.raises(StateError) as err:
        open_state(url)
    assert "hunter2" not in str(err.value) and "password=***" in str(err.value)


# --- one schema -----------------------------------------------------------------------------


def _sqlite_columns(path: Path) -> dict[str, list[tuple[str, str, bool]]]:
    """table -> [(column, declared type, NOT NULL)] of a migrated SQLite state."""
    conn = sqlite3.connect(path)
    schema.migrate(conn, path)
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    found = {t: [(str(c[1]), str(c[2]), bool(c[3] or c[5])) for c in
                 conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    conn.close()
    return found


def _postgres_columns(url: str) -> dict[str, list[tuple[str, str, bool]]]:
    """table -> [(column, data type, NOT NULL)] of a migrated PostgreSQL state, in column
    order, without the version table."""
    found: dict[str, list[tuple[str, str, bool]]] = {}
    with closing(open_state(url)) as conn:
        for table, column, data_type, nullable in conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable"
                " FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name <> %s ORDER BY table_name, ordinal_position",
                (VERSION_TABLE,)):
            found.setdefault(table, []).append((column, data_type, nullable == "NO"))
    return found


# What each SQLite declared type may become; INTEGER is BIGINT where it holds ids or sizes.
COMPATIBLE = {"INTEGER": {"integer", "bigint"}, "REAL": {"double precision"}, "TEXT": {"text"}}


def test_postgresql_has_sqlite_tables_and_columns(tmp_path: Path, pg_url: str) -> None:
    """Same tables, same columns in the same order, compatible types and the same NOT NULLs
    (a primary key counts as NOT NULL on both)."""
    lite = _sqlite_columns(tmp_path / "state.db")
    pg = _postgres_columns(pg_url)
    assert sorted(pg) == sorted(lite)
    for table, columns in lite.items():
        assert [c[0] for c in pg[table]] == [c[0] for c in columns], table
        for (name, lite_type, lite_nn), (_, pg_type, pg_nn) in zip(columns, pg[table]):
            assert pg_type in COMPATIBLE[lite_type], (table, name, lite_type, pg_type)
            assert pg_nn == lite_nn, (table, name)


def test_postgresql_types_keep_hash_ids_and_times_exact(pg_url: str) -> None:
    """A file id at both ends of the signed 64-bit range and a time to the microsecond come
    back exactly; auto-numbered keys number themselves."""
    now = 1_764_000_000.123456
    with closing(open_state(pg_url)) as conn:
        for file_id in (-(2**63), 2**63 - 1):
            conn.execute("INSERT INTO files (id, url, name, last_warm, size) VALUES"
                         " (%s, 'u', 'n', %s, %s)", (file_id, now, 5 * 2**30))
        rows = conn.execute("SELECT id, last_warm, size FROM files ORDER BY id").fetchall()
        assert rows == [(-(2**63), now, 5 * 2**30), (2**63 - 1, now, 5 * 2**30)]
        ids = [conn.execute("INSERT INTO definitions (catalog, name) VALUES ('c', %s)"
                            " RETURNING id", (name,)).fetchone()[0] for name in ("a", "b")]
        assert ids == [1, 2]


def test_indexes_match_sqlite(tmp_path: Path, pg_url: str) -> None:
    """The named indexes (partial one included) exist on PostgreSQL as on SQLite."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    schema.migrate(conn, path)
    lite = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    conn.close()
    with closing(open_state(pg_url)) as pg:
        indexes = {str(r[0]): str(r[1]) for r in pg.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND indexname NOT LIKE '%%_pkey' AND indexname NOT LIKE '%%_key'")}
    assert set(indexes) == lite
    assert indexes["files_by_stage_request"].endswith("WHERE (stage_request IS NOT NULL)")


# --- the URL shown ----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://app:pw@db.example.org/state", "postgresql://app:***@db.example.org/state"),
    ("postgresql://app@db.example.org/state", "postgresql://app@db.example.org/state"),
    ("postgresql:///state?host=/run/postgresql", "postgresql:///state?host=/run/postgresql"),
    ("postgres://app:p%40ss@h1:5432,h2:5433/state?sslmode=require",
     "postgres://app:***@h1:5432,h2:5433/state?sslmode=require"),
    ("postgresql://app:p@ss/word@db/state", "postgresql://app:***@db/state"),
    ("postgresql://db/state?user=app&password=pw&sslmode=require",
     "postgresql://db/state?user=app&password=***&sslmode=require"),
    ("postgresql://db/state?PASSWORD=pw", "postgresql://db/state?PASSWORD=***"),
    ("host=db user=app password='p w' dbname=state",
     "host=db user=app password=*** dbname=state"),
    # libpq takes an unescaped "?" in the password (the userinfo ends at the first "/").
    ("postgresql://app:pw?x@127.0.0.1:1/state", "postgresql://app:***@127.0.0.1:1/state"),
    ("postgresql://db/state?sslpassword=pw&sslmode=require",
     "postgresql://db/state?sslpassword=***&sslmode=require"),
    ("host=db sslpassword=pw dbname=state", "host=db sslpassword=*** dbname=state"),
    ("https://127.0.0.1:1/sam/api?token=T&x=1", "https://127.0.0.1:1/sam/api?token=***&x=1"),
    ("https://127.0.0.1:1?authz=T", "https://127.0.0.1:1?authz=***"),
])
def test_redacted_url_hides_only_the_password(url: str, shown: str) -> None:
    """The password (and a token-like parameter), wherever a URL carries it, becomes ***; the
    rest is kept."""
    assert redacted_url(url) == shown


def test_importing_the_module_does_not_import_psycopg() -> None:
    """The driver is loaded when a PostgreSQL state is opened, not when the module is
    imported (the CLI's start-up stays free of it)."""
    code = "import sys, prestaged.state.postgres; print('psycopg' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert res.stdout.strip() == "False"


def test_members_with_skewed_clocks_judge_freshness_by_the_databases_clock(
        make_pg_url: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Leases and heartbeats used the database's clock, outcomes and freshness each host's:
    a member 2 h behind stamped a touch made now as 2 h old, so another member (and the gate)
    found it stale at once, and one 2 h ahead kept files fresh past fresh_for. The state's
    times are now the database's, whatever the host's clock says; a skew is a WARNING."""
    from prestaged.state.store import Store

    url = make_pg_url()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 7200.0)  # this host is 2 h behind
    behind = Store(tmp_path / "anchor", url=url).open()
    try:
        behind.record("https://door/f1", "f1", "warm", 206, 4, 1, "")
        run = behind.start_run("local", "d")
        behind.finish_run(run, {"warm": 1}, 0, "ok")
        stamped = behind.now()
    finally:
        behind.close()
    monkeypatch.setattr(time, "time", real)
    assert abs(stamped - real()) < 60, "the outcome has this host's time, not the database's"
    assert "this host's clock is -7200" in caplog.text
    with Store(tmp_path / "anchor", url=url) as right:
        assert right.fresh_urls(["https://door/f1"], fresh_for=3600) == {"https://door/f1"}
        [ended] = [r[0] for r in right.conn.execute("SELECT ended FROM runs").fetchall()]
        assert abs(ended - real()) < 60
