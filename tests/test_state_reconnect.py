"""A PostgreSQL state survives a cut connection (issue 16, "reconnects"): the server
terminating the store's or the writer's sessions, and a real outage (the role refused for a
while). The store's pool replaces a cut connection by the next call; the writer retries its
batch on a new connection with backoff. Never a password in an error or a log line."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from prestaged.errors import StateError
from prestaged.model import redacted_url
from prestaged.state.store import Store
from prestaged.testing.postgres import APP_ROLE, PostgresCluster

DEADLINE = 15.0  # seconds any wait below may take before the test fails


def _dbname(url: str) -> str:
    """The database name of a libpq URL."""
    return urlsplit(url).path.lstrip("/")


def _terminate(cluster: PostgresCluster, url: str, application_name: str) -> int:
    """Terminate the sessions of ``url``'s database named ``application_name`` and wait until
    they have exited; returns how many there were."""
    rows = cluster.execute(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = %s", (_dbname(url), application_name))
    return sum(1 for row in rows if row[0])


@contextlib.contextmanager
def _login_refused(cluster: PostgresCluster) -> Iterator[None]:
    """The application role may not log in (an outage as clients see it) until the end."""
    cluster.execute(f"ALTER ROLE {APP_ROLE} NOLOGIN")
    try:
        yield
    finally:
        cluster.execute(f"ALTER ROLE {APP_ROLE} LOGIN")


def _record(store: Store, first: int, count: int) -> None:
    """Queue ``count`` warm outcomes for files ``first``, ``first + 1``, ..."""
    for i in range(first, first + count):
        store.record(f"https://h/f{i}", f"f{i}", "warm", 206, 4, 1, "")


def _files(cluster: PostgresCluster, url: str) -> int:
    """Rows in the files table of ``url``'s database, read as the superuser."""
    dbname = _dbname(url)
    import psycopg

    with psycopg.connect(cluster.superuser_url(dbname)) as conn:
        row = conn.execute("SELECT count(*) FROM files").fetchone()
    assert row is not None
    return int(row[0])


def _one_line(error: BaseException, url: str, cluster: PostgresCluster) -> str:
    """``error``'s text, checked to be one line naming ``url`` without the role's password
    (taken from ``cluster``: as an argument, a traceback would print it)."""
    text = str(error)
    assert text.startswith(f"state {redacted_url(url)}: ") and "\n" not in text, text
    leaked = cluster.password in text
    assert not leaked, "the password is in the error"
    return text


def _no_secret(cluster: PostgresCluster, caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    """Neither a log record nor any of ``texts`` holds the role's password."""
    leaked = [cluster.password in text
              for text in (*texts, *(r.getMessage() for r in caplog.records))]
    assert not any(leaked), "the password is in a log record or in stderr"


def test_a_cut_store_session_costs_at_most_one_call(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Terminating the store's sessions (prestaged/<pid>) costs at most the next call, as
    one StateError line; the call after works and what was committed before is there. The
    URL carries the password here, which no error or log record shows."""
    caplog.set_level(logging.DEBUG)
    secret = pg_cluster.url_with_password(_dbname(pg_url))
    with Store(tmp_path / "state.db", url=secret) as store:
        run = store.start_run("local", "ds")
        assert _terminate(pg_cluster, pg_url, f"prestaged/{os.getpid()}") >= 1
        try:
            store.runs()
        except StateError as e:
            _one_line(e, secret, pg_cluster)
        assert [r.id for r in store.runs()] == [run]
    _no_secret(pg_cluster, caplog)


def test_a_session_cut_inside_a_transaction_fails_that_transaction_only(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path) -> None:
    """A transaction whose connection is cut half-way raises one StateError line without the
    password and commits nothing; the next transaction works on a new connection."""
    with Store(tmp_path / "state.db", url=pg_url) as store:
        with pytest.raises(StateError) as cut, store.transaction() as conn:
            conn.execute("INSERT INTO definitions (catalog, name) VALUES (?, ?)", ("l", "lost"))
            _terminate(pg_cluster, pg_url, f"prestaged/{os.getpid()}")
            conn.execute("SELECT 1")
        _one_line(cut.value, pg_url, pg_cluster)
        with store.transaction() as conn:
            conn.execute("INSERT INTO definitions (catalog, name) VALUES (?, ?)", ("l", "kept"))
        rows = store.conn.execute("SELECT name FROM definitions").fetchall()
    assert [r[0] for r in rows] == ["kept"]


def test_the_writer_survives_its_session_cut(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Terminating the writer's session (prestaged-writer/<store's pid>) between batches loses
    no outcome and does not stop the writer; it says so in one stderr line."""
    with Store(tmp_path / "state.db", url=pg_url) as store:
        _record(store, 0, 3)
        store.flush()
        assert _terminate(pg_cluster, pg_url, f"prestaged-writer/{os.getpid()}") == 1
        _record(store, 3, 3)
        store.flush()
        assert store._writer is not None and store._writer.poll() is None
        assert _files(pg_cluster, pg_url) == 6
    err = capfd.readouterr().err
    assert err.count("connection lost") == 1, err
    _no_secret(pg_cluster, caplog, err)


def test_the_writer_waits_out_an_outage(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """With the role refused and the writer's session cut, a flush waits while the writer
    retries; once logins work again it completes and every outcome is in the database."""
    errors: list[BaseException] = []
    seen = ""
    with Store(tmp_path / "state.db", url=pg_url) as store:
        _record(store, 0, 2)
        store.flush()
        with _login_refused(pg_cluster):
            _terminate(pg_cluster, pg_url, f"prestaged-writer/{os.getpid()}")
            _record(store, 2, 3)
            flusher = threading.Thread(target=_catching(store.flush, errors))
            flusher.start()
            deadline = time.monotonic() + DEADLINE
            while "connection lost" not in seen:  # the writer noticed (its stderr line)
                assert time.monotonic() < deadline, "the writer never noticed"
                seen += capfd.readouterr().err
                time.sleep(0.02)
            assert flusher.is_alive()  # still waiting for the batch to be written
        flusher.join(DEADLINE)
        assert not flusher.is_alive() and errors == []
        assert _files(pg_cluster, pg_url) == 5
    seen += capfd.readouterr().err
    assert seen.count("connection lost") == 1, seen
    _no_secret(pg_cluster, caplog, seen)


def test_recording_goes_on_while_the_writer_waits_out_an_outage(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path) -> None:
    """record() never waits for a writer that cannot write: 30,000 outcomes (~3 MB of batches,
    far more than the pipe holds) are queued while logins are refused, and a flush once they
    work again writes every one. (record() runs on the daemon's event loop: it used to block
    on the full pipe, freezing /metrics, /healthz and the watchdog for the whole outage.)"""
    errors: list[BaseException] = []
    with Store(tmp_path / "state.db", url=pg_url) as store:
        _record(store, 0, 2)
        store.flush()
        with _login_refused(pg_cluster):
            _terminate(pg_cluster, pg_url, f"prestaged-writer/{os.getpid()}")
            recorder = threading.Thread(target=_catching(lambda: _record(store, 2, 30_000),
                                                         errors))
            recorder.start()
            recorder.join(DEADLINE)
            assert not recorder.is_alive(), "record() waited for the writer"
            assert errors == []
            assert store.queued_bytes > 1 << 20  # queued here, not written
            assert _files(pg_cluster, pg_url) == 2
        store.flush()
        assert _files(pg_cluster, pg_url) == 30_002


def test_a_writer_that_gave_up_is_replaced_when_the_next_run_starts(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An outage longer than the writer's patience (0.5 s here, 5 min by default) makes the
    writer give up: the flush fails with one line, and so does every call that meets the
    stopped writer even once logins work again, until the next run starts: ``start_run``
    puts a new writer in its place and that run's outcomes are written. Before, a daemon came
    out of such an outage up and ready but aborting every run until it was restarted. The URL
    carries the password: neither the errors nor the warning show it."""
    secret = pg_cluster.url_with_password(_dbname(pg_url))
    with Store(tmp_path / "state.db", url=secret, writer_patience=0.5) as store:
        _record(store, 0, 2)
        store.flush()
        with _login_refused(pg_cluster):
            _terminate(pg_cluster, pg_url, f"prestaged-writer/{os.getpid()}")
            _record(store, 2, 3)
            with pytest.raises(StateError) as gave_up:
                store.flush()
        with pytest.raises(StateError) as again:
            store.flush()
        assert str(again.value) == str(gave_up.value)
        run = store.start_run("local", "ds")
        _record(store, 10, 3)
        store.finish_run(run, {"warm": 3}, 0, "")
        assert [r.id for r in store.runs() if r.ended is not None] == [run]
    assert "not permitted to log in" in _one_line(gave_up.value, secret, pg_cluster)
    assert _files(pg_cluster, pg_url) == 5  # f0, f1, f10-f12: the lost batch is not there
    assert sum("a new writer process replaces it" in r.getMessage() for r in caplog.records) == 1
    _no_secret(pg_cluster, caplog)


def test_no_connection_within_the_timeout_is_one_line(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A call that gets no connection from the pool (logins refused) raises one StateError
    line without the password, the pool's log holds no password either, and calls work again
    once the server takes us back. The URL carries the password here."""
    caplog.set_level(logging.DEBUG)
    secret = pg_cluster.url_with_password(_dbname(pg_url))
    with Store(tmp_path / "state.db", url=secret) as store:
        store.flush()  # answered once the writer is connected: its start is not under test
        pool: Any = store.conn
        with _login_refused(pg_cluster):
            _terminate(pg_cluster, pg_url, f"prestaged/{os.getpid()}")
            pool.pool.timeout = 0.5  # seconds; 10 by default
            with pytest.raises(StateError) as refused:
                store.runs()
        pool.pool.timeout = DEADLINE
        assert store.runs() == []
    text = _one_line(refused.value, secret, pg_cluster)
    assert "no connection to the server" in text
    _no_secret(pg_cluster, caplog)


def _catching(call: Any, errors: list[BaseException]) -> Any:
    """``call`` for a thread: an exception it raises lands in ``errors``."""
    def run() -> None:
        try:
            call()
        except BaseException as e:  # whatever it is, the test reports it
            errors.append(e)
    return run


def test_the_writer_gives_up_after_its_patience(
        pg_cluster: PostgresCluster, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``write_through`` retries a lost connection with growing waits (zero here) only for
    ``patience`` seconds, then raises the last error, naming the URL without its password."""
    from prestaged.state.db import PostgresDatabase
    from prestaged.state.postgres import connect, open_state
    from prestaged.state.writer import write_through

    db = PostgresDatabase(open_state(pg_url), pg_url)
    waits: list[float] = []
    try:
        with _login_refused(pg_cluster), pytest.raises(StateError) as gave_up:
            _terminate(pg_cluster, pg_url, f"prestaged/{os.getpid()}")
            write_through(db, {"outcomes": []}, lambda: connect(pg_url),
                          patience=0.5, sleep=waits.append)
    finally:
        db.close()
    assert "not permitted to log in" in _one_line(gave_up.value, pg_url, pg_cluster)
    assert len(waits) > 1 and waits[0] < waits[-1] <= 0.5
    assert capsys.readouterr().err.count("connection lost") == 1


def test_the_writer_does_not_retry_a_wrong_batch(pg_url: str) -> None:
    """An error that is not a lost connection (here text for a count) is raised at once, with
    no retry and no wait."""
    import psycopg

    from prestaged.state.db import PostgresDatabase
    from prestaged.state.postgres import connect, open_state
    from prestaged.state.writer import write_through

    open_state(pg_url).close()
    db = PostgresDatabase(connect(pg_url), pg_url)
    waits: list[float] = []
    try:
        with pytest.raises(psycopg.DataError):
            write_through(db, {"outcomes": [[1, "u", "n", "warm", 206, 4, "many", "", 1.0]]},
                          lambda: connect(pg_url), sleep=waits.append)
    finally:
        db.close()
    assert waits == []
