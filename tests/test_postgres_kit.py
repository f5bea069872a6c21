"""The throw-away PostgreSQL of ``prestaged.testing.postgres`` does what the shared state of
issue 16 will lean on: psycopg 3 async connections and pools as the ``prestaged`` role, one
isolated database per test, ``FOR UPDATE SKIP LOCKED`` leases, advisory locks, a cut
connection (``pg_terminate_backend``), and no TCP listener at all.

psycopg is imported inside the tests: without the test extra the fixtures skip (fail under CI)
with a message rather than this module failing to import.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable

import pytest

from prestaged.testing.postgres import APP_ROLE, PostgresCluster, PostgresError


def _dbname(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return str(conninfo_to_dict(url)["dbname"])


@pytest.fixture
async def connect(pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Factory of autocommit async connections to this test's database, closed after it."""
    import psycopg

    conns: list[psycopg.AsyncConnection[Any]] = []

    async def make(url: str = pg_url) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        await conn.close()


async def _wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll the async ``predicate`` until it is true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def test_async_connection_is_the_application_role(connect: Callable[..., Any]) -> None:
    """An async connection of ``pg_url`` is the ``prestaged`` role (not a superuser), owns its
    database and can create a table, insert and read back."""
    conn = await connect()
    cur = await conn.execute("SELECT current_user, rolsuper, pg_get_userbyid(datdba)"
                             " FROM pg_roles, pg_database"
                             " WHERE rolname = current_user AND datname = current_database()")
    assert await cur.fetchone() == (APP_ROLE, False, APP_ROLE)
    await conn.execute("CREATE TABLE files (name text PRIMARY KEY, size bigint)")
    await conn.execute("INSERT INTO files VALUES (%s, %s), (%s, %s)", ("a", 1, "b", 2))
    cur = await conn.execute("SELECT name, size FROM files ORDER BY name")
    assert await cur.fetchall() == [("a", 1), ("b", 2)]


async def test_pool_hands_out_distinct_connections(pg_url: str) -> None:
    """A psycopg_pool ``AsyncConnectionPool`` on ``pg_url`` holds two backends at once; rows
    written through one in a committed transaction are read through the other."""
    from psycopg_pool import AsyncConnectionPool

    async with AsyncConnectionPool(pg_url, min_size=2, max_size=2) as pool, \
            pool.connection() as first, pool.connection() as second:
        pids = [(await (await c.execute("SELECT pg_backend_pid()")).fetchone())
                for c in (first, second)]
        assert pids[0] != pids[1]
        await first.execute("CREATE TABLE t (n int)")
        await first.execute("INSERT INTO t SELECT generate_series(1, 100)")
        await first.commit()
        cur = await second.execute("SELECT count(*), sum(n) FROM t")
        assert await cur.fetchone() == (100, 5050)


async def test_databases_are_isolated(make_pg_url: Callable[[], str],
                                      connect: Callable[..., Any]) -> None:
    """Two databases of the fixture are distinct: a table made in one does not exist in the
    other."""
    import psycopg

    url_a, url_b = make_pg_url(), make_pg_url()
    assert _dbname(url_a) != _dbname(url_b)
    a, b = await connect(url_a), await connect(url_b)
    await a.execute("CREATE TABLE only_here (n int)")
    with pytest.raises(psycopg.errors.UndefinedTable):
        await b.execute("SELECT * FROM only_here")


async def test_skip_locked_skips_a_row_claimed_by_another(connect: Callable[..., Any]) -> None:
    """``SELECT ... FOR UPDATE SKIP LOCKED`` on a second connection passes over the row that
    the first holds in an open transaction (the lease claim), and gets it once that commits."""
    import psycopg

    claim = "SELECT id FROM work ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    setup, a, b = await connect(), await connect(), await connect()
    await setup.execute("CREATE TABLE work (id int PRIMARY KEY)")
    await setup.execute("INSERT INTO work VALUES (1), (2), (3)")
    await a.set_autocommit(False)
    await b.set_autocommit(False)
    assert await (await a.execute(claim)).fetchone() == (1,)
    assert await (await b.execute(claim)).fetchone() == (2,)
    # Row 1 is really locked, not merely passed over by chance.
    with pytest.raises(psycopg.errors.LockNotAvailable):
        await setup.execute("SELECT id FROM work WHERE id = 1 FOR UPDATE NOWAIT")
    await b.rollback()
    await a.commit()
    assert await (await b.execute(claim)).fetchone() == (1,)
    await b.rollback()


async def test_advisory_lock_blocks_another_connection(connect: Callable[..., Any]) -> None:
    """An advisory lock held by one connection makes another's ``pg_try_advisory_lock``
    answer false and its ``pg_advisory_lock`` wait until the holder unlocks (the migration
    runner's guard)."""
    holder, other, observer = await connect(), await connect(), await connect()
    assert await (await holder.execute("SELECT pg_try_advisory_lock(16)")).fetchone() == (True,)
    assert await (await other.execute("SELECT pg_try_advisory_lock(16)")).fetchone() == (False,)

    waiter = asyncio.ensure_future(other.execute("SELECT pg_advisory_lock(16)"))

    async def other_is_waiting() -> bool:
        cur = await observer.execute("SELECT count(*) FROM pg_locks"
                                     " WHERE locktype = 'advisory' AND NOT granted")
        return await cur.fetchone() == (1,)

    await _wait_for(other_is_waiting, "the second connection waits for the advisory lock")
    assert not waiter.done()
    await holder.execute("SELECT pg_advisory_unlock(16)")
    await asyncio.wait_for(waiter, timeout=10)
    cur = await observer.execute("SELECT count(*) FROM pg_locks"
                                 " WHERE locktype = 'advisory' AND granted")
    assert await cur.fetchone() == (1,)


async def test_terminate_backends_cuts_a_live_connection(
        pg_cluster: PostgresCluster, pg_url: str, connect: Callable[..., Any]) -> None:
    """``terminate_backends`` cuts every session of the database: the next query on a cut
    connection raises ``psycopg.OperationalError``, and a new connection works."""
    import psycopg

    victim = await connect()
    await victim.execute("SELECT 1")
    assert pg_cluster.terminate_backends(_dbname(pg_url)) == 1
    with pytest.raises(psycopg.OperationalError):
        await victim.execute("SELECT 1")
    assert victim.closed
    fresh = await connect()
    assert await (await fresh.execute("SELECT 1")).fetchone() == (1,)


async def test_drop_database_cuts_open_connections(pg_cluster: PostgresCluster,
                                                   connect: Callable[..., Any]) -> None:
    """``drop_database`` succeeds while a connection is still open to the database (as the
    fixture's clean-up must), and the database is gone."""
    url = pg_cluster.create_database("kit_drop_me")
    try:
        await connect(url)
        pg_cluster.drop_database("kit_drop_me")
        assert "kit_drop_me" not in pg_cluster.databases()
    finally:
        pg_cluster.drop_database("kit_drop_me")


async def test_the_role_needs_its_password(pg_cluster: PostgresCluster, pg_url: str) -> None:
    """The application role authenticates by password (SCRAM): without it or with a wrong one
    the connection is refused; neither the server log nor the cluster's repr shows it."""
    import psycopg

    dbname = _dbname(pg_url)
    host = f"host={pg_cluster.socket_dir} dbname={dbname} user={APP_ROLE}"
    for conninfo in (host, f"{host} password=wrong"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            await psycopg.AsyncConnection.connect(conninfo)
    # Booleans, not `password not in text`: a failing assertion would print its operands.
    shown = [pg_cluster.password in text
             for text in (pg_cluster.log_path.read_text(), repr(pg_cluster))]
    assert shown == [False, False], "the password is in the server log or the repr"


async def test_urls_carry_no_password(pg_cluster: PostgresCluster, pg_url: str) -> None:
    """``pg_url`` names a 0600 password file instead of holding the password (pytest prints
    fixture values), and connects; ``url_with_password`` connects without the file."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(pg_url)
    leaked = pg_cluster.password in pg_url  # not in the assert: it would print the password
    assert "password" not in params and not leaked
    assert params["passfile"] == str(pg_cluster.passfile)
    assert pg_cluster.passfile.stat().st_mode & 0o777 == 0o600
    secret = pg_cluster.url_with_password(_dbname(pg_url))
    assert "passfile" not in conninfo_to_dict(secret)
    for url in (pg_url, secret):
        conn = await psycopg.AsyncConnection.connect(url)
        try:
            assert await (await conn.execute("SELECT current_user")).fetchone() == (APP_ROLE,)
        finally:
            await conn.close()


def test_server_listens_on_its_unix_socket_only(pg_cluster: PostgresCluster) -> None:
    """The postmaster has no TCP socket at all, only ``<dir>/.s.PGSQL.5432`` (mode 0700), and
    reports ``listen_addresses = ''``."""
    import psutil
    import psycopg

    server = psutil.Process(pg_cluster.server_pid())
    assert server.net_connections(kind="inet") == []
    socket = pg_cluster.socket_path
    assert socket == pg_cluster.socket_dir / ".s.PGSQL.5432"
    assert {c.laddr for c in server.net_connections(kind="unix")} == {str(socket)}
    assert socket.stat().st_mode & 0o777 == 0o700
    with psycopg.connect(pg_cluster.superuser_url()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)


def test_a_socket_path_over_107_bytes_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A temporary directory so deep that the socket path would pass 107 bytes is refused
    before initdb runs, naming the limit, and leaves no directory behind."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    cluster = PostgresCluster(bin_dir=Path("/nonexistent"))
    with pytest.raises(PostgresError, match="over 107 bytes"):
        cluster.start()
    assert list(deep.iterdir()) == []
