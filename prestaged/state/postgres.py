"""A PostgreSQL state (issue 16): connect to it from its URL and bring its schema to
``SCHEMA_VERSION``, with errors that name the URL without its password.

The schema is ``state.schema``'s migrations rendered by its ``POSTGRESQL`` dialect, so both
backends have the same tables and columns. The version lives in the table ``prestaged_schema``,
one row per migration applied (SQLite keeps ``PRAGMA user_version``). Migrating runs in one
transaction under ``pg_advisory_xact_lock(MIGRATION_LOCK)``: of several daemons starting at once,
one migrates and the others wait, then find nothing left to do. PostgreSQL's DDL is
transactional, so a migration that fails leaves the database as it was.

After migrating, the store works through a small ``psycopg_pool`` pool (``open_pool``) whose
connections are checked before use, so one the server cut (``pg_terminate_backend``, a restart,
a network partition) is replaced instead of breaking every later call. Every connection names
its process in ``pg_stat_activity`` (``application_name``: ``prestaged/<pid>``, the writer's
``prestaged-writer/<pid of the store's process>``) unless the URL names it.

psycopg 3 (the ``postgresql`` extra) is imported only when a function here runs: importing this
module, and so starting the CLI, needs only the standard library.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from prestaged.errors import StateError, StateUnavailable
from prestaged.model import redacted_url
from prestaged.state.schema import POSTGRESQL, SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    Connection = psycopg.Connection[tuple[Any, ...]]
    Pool = ConnectionPool[Connection]

__all__ = [
    "CONNECT_TIMEOUT",
    "MIGRATION_LOCK",
    "VERSION_TABLE",
    "connect",
    "connect_options",
    "migrate",
    "open_pool",
    "open_state",
    "redacted_url",
    "schema_version",
    "store_name",
]

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x7072657374616765
"""Key of the advisory lock the migration runner holds ("prestage" in ASCII, a signed 64-bit
integer). Advisory locks are per database, so two prestaged databases on one server do not
wait for each other."""

CONNECT_TIMEOUT = 10
"""Seconds libpq waits for a server to answer when the URL sets no ``connect_timeout`` (libpq's
own default is to wait for ever on a host that drops packets)."""

VERSION_TABLE = "prestaged_schema"
"""The table recording the migrations applied, one row each (version, applied in Unix s)."""

_CREATE_VERSION_TABLE = f"""
CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    version INTEGER PRIMARY KEY,    -- a migration applied: never twice
    applied DOUBLE PRECISION NOT NULL
)"""
# Not to_regclass(): it looks the name up in the session's catalog cache without a lock, so a
# migrator that saw no table before waiting on the lock would still see none after it (a stale
# cache entry; the concurrency test caught it). A query of pg_class reads the committed rows.
_HAS_VERSION_TABLE = ("SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN"
                      " pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                      " WHERE n.nspname = current_schema() AND c.relname = %s)")
_VERSION = f"SELECT COALESCE(MAX(version), 0) FROM {VERSION_TABLE}"
_RECORD = f"INSERT INTO {VERSION_TABLE} (version, applied) VALUES (%s, %s)"
_TABLES = ("SELECT table_name FROM information_schema.tables WHERE table_schema ="
           " current_schema() AND table_type = 'BASE TABLE' AND table_name <> %s"
           " ORDER BY table_name")
_LOCK = "SELECT pg_advisory_xact_lock(%s)"


def store_name() -> str:
    """The ``application_name`` of this process's store connections, ``prestaged/<pid>``: an
    operator (or a test) finds a daemon's backends in ``pg_stat_activity`` by it."""
    return f"prestaged/{os.getpid()}"


def connect_options(url: str, *, connect_timeout: int = CONNECT_TIMEOUT,
                    application_name: str | None = None) -> dict[str, Any]:
    """psycopg's keyword arguments for ``url``: autocommit, and ``connect_timeout`` (seconds)
    and ``application_name`` (default ``store_name()``) unless the URL sets them. Raises
    ``StateError`` naming ``redacted_url(url)`` for a malformed URL."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as e:
        raise StateError(f"state {redacted_url(url)}: not a usable PostgreSQL URL "
                         f"({_message(e, url)})") from e
    _check_values(url, params)
    options: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        options["connect_timeout"] = connect_timeout
    if "application_name" not in params:
        options["application_name"] = application_name or store_name()
    return options


def _check_values(url: str, params: dict[str, Any]) -> None:
    """``StateError`` (exit 2) for a port or ``connect_timeout`` of the URL that is none:
    psycopg resolves host names before libpq reads the port, so ``host:abc`` was blamed on
    the resolver, and either was "cannot connect", exit 69, as for a server that is down."""
    for port in str(params.get("port") or "").split(","):
        if port and not (re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
            raise StateError(f"state {redacted_url(url)}: not a usable PostgreSQL URL (port "
                             f"{port!r} is no port from 1 to 65535)")
    timeout = params.get("connect_timeout")
    if timeout is not None and not re.fullmatch(r"\s*[0-9]{1,9}\s*", str(timeout)):
        raise StateError(f"state {redacted_url(url)}: not a usable PostgreSQL URL "
                         f"(connect_timeout {str(timeout)!r} is no number of seconds)")


def connect(url: str, *, connect_timeout: int = CONNECT_TIMEOUT,
            application_name: str | None = None) -> Connection:
    """A psycopg connection (autocommit: every transaction explicit) to the database of the
    libpq ``url``, named ``application_name`` (default ``store_name()``) in
    ``pg_stat_activity`` unless the URL names it.

    ``connect_timeout`` (seconds) applies unless the URL sets its own. Raises ``StateError``
    (exit 2) naming ``redacted_url(url)`` and what to check when the URL is malformed or the
    server cannot be reached or refuses us (no server, wrong password, no such database).
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    options = connect_options(url, connect_timeout=connect_timeout,
                              application_name=application_name)
    try:
        return psycopg.connect(url, **options)
    except psycopg.Error as e:
        password = conninfo_to_dict(url).get("password")
        raise (StateUnavailable if _may_come_back(str(e)) else StateError)(
            f"state {redacted_url(url)}: cannot connect ({_message(e, url, password)}); "
            "check that the server runs and that the URL's host, port, database, user and "
            "password (or the password file) are right"
        ) from e


# What a server says when it refuses connections for now (libpq gives a connection failure no
# SQLSTATE, only its text).
_FOR_NOW = ("the database system is starting up", "the database system is shutting down",
            "the database system is in recovery mode", "the database system is not yet "
            "accepting connections", "too many clients", "remaining connection slots")


# What libpq says of a URL's option value it refuses before connecting (`invalid sslmode
# value: "x"`, `invalid port number`, `invalid integer value "x" for connection option`).
_REFUSED_VALUE = re.compile(r"\binvalid (?:\w+ )?(?:value|number|method)\b|"
                            r"\bcould not match \d+ ")


def _may_come_back(said: str) -> bool:
    """Whether libpq's connection failure ``said`` is the server's absence (no server there,
    a network cut, a name that does not resolve now) or a refusal for now (starting, shutting
    down, full): a daemon restarted later may connect. A server's other refusals (a
    password, a role, a database that does not exist: ``FATAL:``) and libpq's refusal of the
    URL's own values are the configuration's."""
    if _REFUSED_VALUE.search(said):
        return False
    return "FATAL:" not in said or any(reason in said for reason in _FOR_NOW)


def open_pool(url: str, *, timeout: float = CONNECT_TIMEOUT) -> Pool:
    """An open pool of the store's connections to ``url`` (``connect_options``): one kept, up
    to 4 at once (each read or transaction of the store takes one: a heartbeat never waits
    behind a long scan), each checked before it is handed out, so a connection the server cut
    is replaced rather than failing the call. While the server refuses connections the pool
    logs one warning a minute, not one per attempt (``_QuietRepeats``). Getting a connection
    waits up to ``timeout`` seconds (``PoolTimeout``, a ``psycopg.OperationalError``). The
    caller closes it.

    Raises ``StateError`` naming ``redacted_url(url)`` when no connection can be made within
    ``timeout``."""
    import psycopg
    from psycopg_pool import ConnectionPool

    pool_log = logging.getLogger("psycopg.pool")
    if not any(isinstance(f, _QuietRepeats) for f in pool_log.filters):
        pool_log.addFilter(_QuietRepeats(REPEAT_EVERY))
    pool: Pool = ConnectionPool(url, kwargs=connect_options(url), min_size=1, max_size=4,
                          timeout=timeout, check=ConnectionPool.check_connection,
                          name="prestaged-state", open=False)
    try:
        pool.open(wait=True, timeout=timeout)
    except psycopg.Error as e:
        pool.close()
        raise StateUnavailable(f"state {redacted_url(url)}: cannot connect within {timeout:g} "
                               f"s ({_message(e, url)})") from e
    return pool


REPEAT_EVERY = 60.0
"""Seconds between two of the pool's "error connecting" warnings (an outage retried every
fraction of a second would otherwise log a line per attempt)."""


class _QuietRepeats(logging.Filter):
    """Lets one of psycopg-pool's "error connecting" warnings through every ``every`` seconds
    (the first of an outage always: it says why); every other record passes."""

    def __init__(self, every: float) -> None:
        super().__init__()
        self.every = every
        self._last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within ``every`` seconds of the last one let through."""
        if record.levelno != logging.WARNING or "error connecting" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


def schema_version(conn: Connection, url: str) -> int:
    """The database's schema version (0: none yet), after checking that it is prestaged's and
    not from a newer prestaged: ``StateError`` otherwise, naming ``redacted_url(url)``."""
    shown = redacted_url(url)
    version = 0
    exists = conn.execute(_HAS_VERSION_TABLE, (VERSION_TABLE,)).fetchone()
    if exists and exists[0]:
        row = conn.execute(_VERSION).fetchone()
        version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state {shown}: schema version {version} is newer than this prestaged knows "
            f"({SCHEMA_VERSION}); upgrade prestaged, or give it another database"
        )
    if version == 0:
        tables = [str(r[0]) for r in conn.execute(_TABLES, (VERSION_TABLE,))]
        if tables:
            raise StateError(
                f"state {shown}: a database of something else (tables: "
                f"{', '.join(tables[:5])}); give prestaged a database (or schema) of its own"
            )
    return version


def migrate(conn: Connection, url: str) -> int:
    """Bring the schema of ``conn`` (the autocommit connection to ``url``) to ``SCHEMA_VERSION``;
    safe when several processes do it at once. Returns the version found before.

    ``StateError`` (naming ``redacted_url(url)``) for a database that is not prestaged's, is
    newer than this prestaged, or cannot be changed (the role lacks ``CREATE`` on the schema,
    the connection broke); a failed migration changes nothing.
    """
    import psycopg

    try:
        found = schema_version(conn, url)
        if found == SCHEMA_VERSION:
            return found
        # The lock is taken before the version is read again: of two processes migrating a
        # new database together, the second waits, then finds nothing left to do.
        with conn.transaction():
            conn.execute(_LOCK, (MIGRATION_LOCK,))
            version = schema_version(conn, url)
            conn.execute(_CREATE_VERSION_TABLE)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in POSTGRESQL.statements(target):
                    conn.execute(statement)
                conn.execute(_RECORD, (target, time.time()))
    except psycopg.Error as e:
        raise StateError(f"state {redacted_url(url)}: cannot bring the schema to version "
                         f"{SCHEMA_VERSION}: {_message(e, url)}") from e
    if version < SCHEMA_VERSION:
        log.info("state %s: schema version %d -> %d", redacted_url(url), version, SCHEMA_VERSION)
    return found


def open_state(url: str, *, connect_timeout: int = CONNECT_TIMEOUT) -> Connection:
    """``connect`` then ``migrate``: a connection to a database whose schema is current, or
    ``StateError`` (exit 2) naming the URL without its password. The caller closes it."""
    conn = connect(url, connect_timeout=connect_timeout)
    try:
        migrate(conn, url)
    except BaseException:
        conn.close()
        raise
    return conn


def _message(error: Exception, url: str, password: object = None) -> str:
    """``error``'s text on one line, any password of ``url`` replaced by ``***`` (libpq does
    not echo passwords, but a malformed URL may be quoted back)."""
    text = " ".join(str(error).split()) or type(error).__name__
    secrets = {str(password)} if password else set()
    start = url.find("://")
    at = url.rfind("@")
    if 0 <= start < at:
        secrets.add(url[start + 3:at].partition(":")[2])
    # and the value of a password= or sslpassword= parameter, as written and decoded
    for value in re.findall(r"[?&](?:ssl)?password=([^&#]*)", url, flags=re.IGNORECASE):
        secrets.update((value, unquote(value)))
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return redacted_url(text)
