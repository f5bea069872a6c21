"""One connection to the state database, SQLite or PostgreSQL, as the store, its writer process
and the campaign repository use it: the same SQL text on both engines.

The SQL is written once, with SQLite's ``?`` placeholders; on PostgreSQL they become psycopg's
``%s`` (``pg_sql``). What cannot be written once is here and nowhere else:

- a write transaction: ``BEGIN IMMEDIATE`` on SQLite (the file's write lock at the start, so a
  transaction never fails half-way on another process's lock), a plain transaction on
  PostgreSQL, whose row locks do that work;
- the id of an inserted row (``insert``): SQLite's ``lastrowid`` (AlmaLinux 9 ships SQLite 3.34,
  which has no ``RETURNING``; that came in 3.35), PostgreSQL's ``RETURNING id``;
- errors: either driver's becomes one ``StateError`` line naming the state (the file, or the
  URL without its password) and what to do.

On PostgreSQL the store holds a pool, not a connection (``PooledDatabase``): a statement takes
a connection for itself, a transaction one for its whole length, and a connection the server
cut fails only the call that was using it (the pool checks the next one before handing it
out). The writer process keeps one connection (``PostgresDatabase``) and replaces it itself.

Standard library at import time (the writer process and the CLI's start import it): psycopg is
imported only when a PostgreSQL state is opened.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prestaged.state.schema import POSTGRESQL, SQLITE, Dialect, immediate

if TYPE_CHECKING:
    from prestaged.state.postgres import Connection as PgConnection
    from prestaged.state.postgres import Pool

__all__ = [
    "Cursor",
    "Database",
    "PooledDatabase",
    "PostgresDatabase",
    "SqliteDatabase",
    "describe_sqlite_error",
    "driver_errors",
    "pg_sql",
]


class Cursor(Protocol):
    """What is read back from a statement (both drivers' cursors have it)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


def driver_errors(*also: type[Exception]) -> tuple[type[Exception], ...]:
    """The exception classes either driver raises, for an ``except``: ``sqlite3.Error``, and
    ``psycopg.Error`` once psycopg is loaded (before that, nothing can raise it: importing it
    here would load it for every SQLite user); then ``also``."""
    psycopg = sys.modules.get("psycopg")
    found: tuple[type[Exception], ...] = (sqlite3.Error,)
    if psycopg is not None:
        found += (psycopg.Error,)
    return found + also


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """``sql`` with psycopg's placeholders: every ``?`` becomes ``%s`` and a literal ``%``
    becomes ``%%``. The state's SQL has no ``?`` inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


def describe_sqlite_error(message: str) -> str:
    """SQLite's text, said so that the user knows what to do (disk full, read-only, locked,
    damaged file), on one line."""
    text = " ".join(message.split())
    low = text.lower()
    if "disk is full" in low or "no space left" in low:
        return f"the disk is full ({text}); free some space, nothing recorded was lost"
    if "readonly" in low or "read-only" in low:
        return f"the file or its directory is read-only ({text})"
    if "locked" in low or "busy" in low:
        return f"another process holds the database locked for too long ({text})"
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return (f"the database is damaged ({text}); move it away (prestaged starts a new one) "
                "or choose another file with --state")
    return text


class Database(Protocol):
    """One open connection to the state. Not thread-safe by itself: the store serialises
    its users."""

    dialect: Dialect
    where: str
    """The state as error messages name it: the file, or the URL without its password."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement (``?`` placeholders)."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement per row of ``rows``; the rows changed in all."""
        ...

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an ``INSERT`` into a table with an ``id`` key and return the new row's id."""
        ...

    def transaction(self) -> contextlib.AbstractContextManager[Database]:
        """A write transaction: committed at the end, rolled back on any error."""
        ...

    def describe(self, error: BaseException) -> str:
        """One line saying what went wrong with ``error`` (a driver's) and what to do."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class SqliteDatabase:
    """A ``Database`` on an autocommit ``sqlite3`` connection (``isolation_level=None``)."""

    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self.conn = conn
        self.where = where

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """See ``Database.execute``."""
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """See ``Database.executemany``."""
        return self.conn.executemany(sql, rows).rowcount

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """See ``Database.insert``: ``lastrowid`` (no ``RETURNING`` before SQLite 3.35)."""
        rowid = self.conn.execute(sql, params).lastrowid
        assert rowid is not None
        return rowid

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """See ``Database.transaction``: ``BEGIN IMMEDIATE`` ... ``COMMIT``."""
        with immediate(self.conn):
            yield self

    def describe(self, error: BaseException) -> str:
        """See ``Database.describe``."""
        return describe_sqlite_error(str(error))

    def close(self) -> None:
        """See ``Database.close``."""
        self.conn.close()


class PostgresDatabase:
    """A ``Database`` on an autocommit psycopg connection (``state.postgres.connect``); the
    URL is kept to scrub its password from error texts."""

    dialect = POSTGRESQL

    def __init__(self, conn: PgConnection, url: str) -> None:
        from prestaged.model import redacted_url

        self.conn = conn
        self.url = url
        self.where = redacted_url(url)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """See ``Database.execute``."""
        return self.conn.execute(pg_sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """See ``Database.executemany`` (psycopg sends the rows in one pipeline)."""
        with self.conn.cursor() as cur:
            cur.executemany(pg_sql(sql), rows)
            return cur.rowcount

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """See ``Database.insert``: ``RETURNING id``."""
        row = self.conn.execute(pg_sql(sql) + " RETURNING id", params).fetchone()
        assert row is not None
        return int(row[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """See ``Database.transaction``: ``BEGIN`` ... ``COMMIT``."""
        with self.conn.transaction():
            yield self

    def describe(self, error: BaseException) -> str:
        """See ``Database.describe``: the server's text, any password scrubbed."""
        return _describe_pg(error, self.url)

    def close(self) -> None:
        """See ``Database.close``."""
        self.conn.close()


class PooledDatabase:
    """A ``Database`` on a pool of autocommit psycopg connections (``state.postgres.open_pool``).

    A statement outside a transaction takes a connection for itself and gives it back at once
    (psycopg's cursors are client-side: the rows stay readable); a transaction keeps one from
    ``BEGIN`` to ``COMMIT``. A connection the server cut fails only the call using it: the pool
    drops it, and checks the one it hands out next, so the next call works without anything
    else being done. Nothing is retried here: the caller decides.
    """

    dialect = POSTGRESQL

    def __init__(self, pool: Pool, url: str) -> None:
        from prestaged.model import redacted_url

        self.pool = pool
        self.url = url
        self.where = redacted_url(url)

    @contextlib.contextmanager
    def _one(self) -> Iterator[PostgresDatabase]:
        """One connection of the pool, given back (or dropped when broken) at the end."""
        with self.pool.connection() as conn:
            yield PostgresDatabase(conn, self.url)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """See ``Database.execute``."""
        with self._one() as db:
            return db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """See ``Database.executemany``."""
        with self._one() as db:
            return db.executemany(sql, rows)

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """See ``Database.insert``."""
        with self._one() as db:
            return db.insert(sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """See ``Database.transaction``: one connection from ``BEGIN`` to ``COMMIT``."""
        with self._one() as db, db.transaction():
            yield db

    def describe(self, error: BaseException) -> str:
        """See ``Database.describe``."""
        return _describe_pg(error, self.url)

    def close(self) -> None:
        """See ``Database.close``: close the pool and its connections."""
        self.pool.close()


def _describe_pg(error: BaseException, url: str) -> str:
    """A psycopg error as one line, any password of ``url`` scrubbed; the pool's timeout
    says what it means."""
    from prestaged.state.postgres import _message

    text = _message(error if isinstance(error, Exception) else Exception(str(error)), url)
    pool = sys.modules.get("psycopg_pool")
    if pool is not None and isinstance(error, pool.PoolTimeout):
        text = (f"no connection to the server ({text}); it does not answer or refuses us "
                "(the psycopg.pool log says why), or all connections are in use")
    return text
