"""A real, throw-away PostgreSQL server for tests (Debian's ``postgresql``).

:class:`PostgresCluster` runs ``initdb`` into a fresh directory and ``pg_ctl start`` with the
server listening ONLY on a unix socket in that directory (``listen_addresses = ''``): nothing
listens on TCP, so tests cannot collide on ports or reach another server. Each test gets a
database of its own from :meth:`PostgresCluster.create_database`, which answers a libpq URL::

    postgresql://prestaged:<password>@/<name>?host=<socket dir>

The role ``prestaged`` is what a site would give the daemon: a login role of its own with a
password (SCRAM), owner of the databases it uses, not a superuser. The kit itself connects as
the superuser ``postgres`` with ``trust`` over the same socket, whose mode is 0700, so only the
server's OS user and root can reach that path.

What PostgreSQL does, and therefore why the set-up looks like this:

- It refuses to run as root. As root the kit runs ``initdb`` and ``pg_ctl`` as the OS user
  ``postgres`` (created by Debian's package) through ``runuser -u postgres --`` (or ``su``),
  and the directory is owned by ``postgres``; its parents must let others through (``/tmp``
  does; a 0700 pytest ``tmp_path`` under root's home would not).
- A unix socket path is at most 107 bytes (``sun_path``), and the server's socket is
  ``<dir>/.s.PGSQL.5432``: the directory is made directly under the system's temporary
  directory with a short name, and a longer one is refused before ``initdb`` runs.
- Debian puts the binaries in ``/usr/lib/postgresql/<version>/bin`` (not on ``PATH``); the
  newest version there is used, else ``initdb`` from ``PATH``.
- ``pg_terminate_backend(pid, timeout)`` (PostgreSQL 14+) waits until the backend has exited,
  so after :meth:`PostgresCluster.terminate_backends` the client's next query fails at once.
- Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``): a crash of the
  test machine loses the throw-away data, never anything else.

The admin connection uses psycopg 3 (the ``postgresql`` extra), imported only when the cluster
starts, so importing this module needs only the standard library.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Optional
from urllib.parse import quote

__all__ = [
    "APP_ROLE",
    "PostgresCluster",
    "PostgresError",
    "find_bin_dir",
]

log = logging.getLogger(__name__)

APP_ROLE = "prestaged"
_SUPERUSER = "postgres"
_PORT = 5432  # libpq's default; only names the socket file: nothing listens on a TCP port
_SOCKET_PATH_MAX = 107  # bytes, sun_path less its terminating NUL
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")

# Speed over durability; the socket as the only way in.
_SETTINGS = {
    "listen_addresses": "''",
    "port": str(_PORT),
    "unix_socket_permissions": "0700",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "'32MB'",
    "checkpoint_timeout": "'1h'",
    "max_wal_size": "'1GB'",
    "autovacuum": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %d '",
}

# Peers of the kit (superuser) trusted; everybody else, above all the application role, must
# present a password as a site would require.
_HBA = f"""\
local all {_SUPERUSER} trust
local all all scram-sha-256
"""


class PostgresError(RuntimeError):
    """The PostgreSQL server could not be set up, started or stopped (the message ends with
    the server log's tail when there is one); never contains a password."""


def find_bin_dir() -> Optional[Path]:
    """The directory of PostgreSQL's ``initdb``/``pg_ctl``: the newest Debian
    ``/usr/lib/postgresql/<version>/bin``, else the one of ``initdb`` on ``PATH``; None when
    PostgreSQL is not installed (Debian package ``postgresql``)."""
    versions = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        if candidate.parent.name.isdigit() and (candidate / "initdb").is_file():
            versions.append((int(candidate.parent.name), candidate))
    if versions:
        return max(versions)[1]
    initdb = shutil.which("initdb")
    # Debian's /usr/local/bin links point into /usr/lib/postgresql: keep pg_ctl beside initdb.
    return Path(initdb).resolve().parent if initdb else None


class PostgresCluster:
    """A PostgreSQL server of its own in a fresh directory, on a unix socket only.

    ``PostgresCluster()`` then :meth:`start` (or ``with``): ``initdb`` and start take about
    ``timings["initdb"]`` + ``timings["start"]`` seconds. ``run_as`` is the OS user the server
    runs as when we are root (default ``postgres``); ``bin_dir`` defaults to
    :func:`find_bin_dir`; ``timeout`` bounds each server command, in seconds (default 60);
    ``settings`` adds or overrides ``postgresql.conf`` lines (values as written in the file).
    """

    def __init__(self, *, run_as: str = "postgres", bin_dir: Optional[Path] = None,
                 timeout: float = 60.0, settings: Optional[dict[str, str]] = None) -> None:
        self.run_as = run_as
        self.bin_dir = bin_dir
        self.timeout = timeout
        self.settings = {**_SETTINGS, **(settings or {})}
        self.timings: dict[str, float] = {}
        self.password = secrets.token_urlsafe(18)
        self._dir: Optional[Path] = None
        self._passfile: Optional[Path] = None
        self._admin: Any = None  # psycopg.Connection once started

    def __repr__(self) -> str:
        return f"PostgresCluster(dir={self._dir})"

    @property
    def directory(self) -> Path:
        """The cluster's directory: ``data/`` (PGDATA), ``server.log`` and the socket."""
        if self._dir is None:
            raise PostgresError("the cluster is not started")
        return self._dir

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's socket (libpq's ``host``)."""
        return self.directory

    @property
    def socket_path(self) -> Path:
        """The server's unix socket, ``<socket_dir>/.s.PGSQL.<port>`` (at most 107 bytes)."""
        return self.socket_dir / f".s.PGSQL.{self._port()}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log ("" before there is one)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, PostgresError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> PostgresCluster:
        """``initdb``, write the settings, start the server and create the application role;
        returns self. Raises :class:`PostgresError` (and removes the directory) on failure."""
        bin_dir = self.bin_dir or find_bin_dir()
        if bin_dir is None:
            raise PostgresError("initdb not found: install Debian package postgresql")
        self.bin_dir = bin_dir
        self._dir = self._make_dir()
        try:
            self._initdb()
            self._start_server()
            self._connect_admin()
        except BaseException:
            self.stop()
            raise
        log.info("PostgreSQL started in %s (initdb %.2f s, start %.2f s)",
                 self._dir, self.timings["initdb"], self.timings["start"])
        return self

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.stop()

    # -- databases ------------------------------------------------------------------------

    @property
    def passfile(self) -> Path:
        """The libpq password file (mode 0600) holding the login roles' passwords: the
        application role's, and those of :meth:`add_login`."""
        if self._passfile is None:
            raise PostgresError("the cluster is not started")
        return self._passfile

    def url(self, name: str, *, user: str = APP_ROLE) -> str:
        """The libpq URL of database ``name`` for ``user`` (default the application role),
        with no password in it: libpq reads it from :attr:`passfile` (``passfile=`` in the
        query), so the URL may be shown, in a traceback too."""
        return (f"postgresql://{quote(user, safe='')}@/{quote(name)}?{self._host()}"
                f"&passfile={quote(str(self.passfile), safe='/')}")

    def url_with_password(self, name: str) -> str:
        """The libpq URL of database ``name`` for the application role WITH its password in
        the userinfo and no password file: only for tests that check the password is hidden
        (never let it reach an assertion's operands, a fixture value or a log)."""
        return (f"postgresql://{APP_ROLE}:{quote(self.password, safe='')}@/{quote(name)}"
                f"?{self._host()}")

    def add_login(self, role: str, password: str) -> None:
        """Add ``role``'s ``password`` to :attr:`passfile`, so that :meth:`url` with
        ``user=role`` logs in without a password in the URL (creating the role is the
        caller's)."""
        self._write_passfile_line(role, password)

    def superuser_url(self, name: str = "postgres") -> str:
        """The libpq URL of database ``name`` as the superuser (trusted, no password)."""
        return f"postgresql://{_SUPERUSER}@/{quote(name)}?{self._host()}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (lower-case letters, digits and ``_``, at most 63) owned by
        the application role and return its :meth:`url`."""
        self.execute(f"CREATE DATABASE {_ident(name)} OWNER {APP_ROLE}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, first cutting any session still connected to it; a database
        that does not exist is no error."""
        self.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    def databases(self) -> list[str]:
        """Names of the databases other than the templates and ``postgres``, sorted."""
        rows = self.execute("SELECT datname FROM pg_database WHERE NOT datistemplate"
                             " AND datname <> 'postgres' ORDER BY datname")
        return [str(row[0]) for row in rows]

    def terminate_backends(self, dbname: str, timeout: float = 10.0) -> int:
        """Terminate every session connected to ``dbname`` (``pg_terminate_backend``) and wait
        up to ``timeout`` seconds until each has exited; returns how many there were. The
        clients' connections are cut: their next query raises ``psycopg.OperationalError``."""
        rows = self.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (int(timeout * 1000), _ident(dbname)),
        )
        return sum(1 for row in rows if row[0])

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``, ``immediate`` if that fails) and remove
        its directory. Safe to call twice."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        directory, self._dir = self._dir, None
        self._passfile = None
        if directory is None:
            return
        if (directory / "data" / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                if self._pg_ctl_stop(directory, mode):
                    break
                log.warning("pg_ctl stop -m %s failed in %s", mode, directory)
        shutil.rmtree(directory, ignore_errors=True)

    def server_pid(self) -> int:
        """The postmaster's process id (first line of ``postmaster.pid``)."""
        return int((self.directory / "data" / "postmaster.pid").read_text().split()[0])

    # -- internals --------------------------------------------------------------------------

    def _port(self) -> int:
        return int(self.settings["port"])

    def _host(self) -> str:
        """The URL query naming the socket: directory, and port when not libpq's default."""
        host = f"host={quote(str(self.socket_dir), safe='/')}"
        return host if self._port() == _PORT else f"{host}&port={self._port()}"

    def _server_ids(self) -> tuple[int, int]:
        """uid/gid the server runs as: ``run_as`` when we are root, else ourselves."""
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError:
            raise PostgresError(f"user {self.run_as!r} does not exist (Debian package"
                                " postgresql creates postgres)") from None
        return entry.pw_uid, entry.pw_gid

    def _make_dir(self) -> Path:
        uid, gid = self._server_ids()
        directory = Path(tempfile.mkdtemp(prefix="pg-"))
        socket = directory / f".s.PGSQL.{self._port()}"
        if len(os.fsencode(socket)) > _SOCKET_PATH_MAX:
            shutil.rmtree(directory)
            raise PostgresError(f"socket path {socket} is over {_SOCKET_PATH_MAX} bytes:"
                                " set TMPDIR to a shorter directory")
        if uid != os.geteuid():
            _check_traversable(directory)
            os.chown(directory, uid, gid)
        # Others may traverse (root's clients need nothing; a non-root client of a root test
        # run would), the socket itself stays 0700.
        directory.chmod(0o755)
        return directory

    def _command(self, *args: str) -> list[str]:
        """``args`` run as the server's user: wrapped in runuser/su when we are root."""
        if os.geteuid() != 0:
            return list(args)
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self.run_as, "--", *args]
        su = shutil.which("su")
        if su is None:
            raise PostgresError("running as root needs runuser or su to become "
                                f"{self.run_as!r}")
        return [su, "-s", "/bin/sh", self.run_as, "-c",
                shlex.join(args)]

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # cwd: the server's user may not enter ours (root's home).
        return subprocess.run(self._command(*args), cwd=self.directory, capture_output=True,
                              text=True, timeout=self.timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def _initdb(self) -> None:
        assert self.bin_dir is not None
        data = self.directory / "data"
        started = time.monotonic()
        res = self._run(str(self.bin_dir / "initdb"), "-D", str(data), "-U", _SUPERUSER,
                        "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
                        "--no-instructions")
        self.timings["initdb"] = time.monotonic() - started
        if res.returncode != 0:
            raise PostgresError(f"initdb failed (exit {res.returncode}):\n"
                                f"{res.stdout}{res.stderr}")
        # Appending keeps the files' owner (the server's user) when we are root.
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n# prestaged.testing.postgres\n")
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
            conf.writelines(f"{key} = {value}\n" for key, value in self.settings.items())
        with open(data / "pg_hba.conf", "w") as hba:
            hba.write(_HBA)

    def _start_server(self) -> None:
        assert self.bin_dir is not None
        started = time.monotonic()
        res = self._run(str(self.bin_dir / "pg_ctl"), "start", "-w",
                        "-t", str(int(self.timeout)), "-D", str(self.directory / "data"),
                        "-l", str(self.log_path))
        self.timings["start"] = time.monotonic() - started
        if res.returncode != 0:
            raise PostgresError(f"pg_ctl start failed (exit {res.returncode}):\n"
                                f"{res.stdout}{res.stderr}\n{self.log_tail()}")

    def _connect_admin(self) -> None:
        try:
            import psycopg
        except ImportError:
            raise PostgresError("psycopg is not installed: pip install -e '.[postgresql]'"
                                ) from None
        from psycopg import sql

        self._admin = psycopg.connect(self.superuser_url(), autocommit=True)
        # A utility statement takes no bind parameters: the password is a quoted literal. The
        # server logs statements only when they fail (log_min_error_statement), and the role is
        # new in a new cluster, so this one does not.
        self._admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(APP_ROLE), sql.Literal(self.password)))
        self._write_passfile_line(APP_ROLE, self.password)

    def _write_passfile_line(self, role: str, password: str) -> None:
        """Append ``*:*:*:role:password`` to the password file (created 0600: libpq ignores
        one that group or others may read); ``:`` and ``\\`` escaped as libpq reads them."""
        path = self.directory / "pgpass"
        escaped = [field.replace("\\", "\\\\").replace(":", "\\:") for field in (role, password)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as passfile:
            passfile.write(f"*:*:*:{escaped[0]}:{escaped[1]}\n")
        self._passfile = path

    def execute(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``query`` as the superuser (autocommit) and return its rows (none for a
        statement): for tests that change roles or cut sessions."""
        if self._admin is None:
            raise PostgresError("the cluster is not started")
        cursor = self._admin.execute(query, params or None)
        return list(cursor.fetchall()) if cursor.description else []

    def _pg_ctl_stop(self, directory: Path, mode: str) -> bool:
        assert self.bin_dir is not None
        try:
            res = subprocess.run(
                self._command(str(self.bin_dir / "pg_ctl"), "stop", "-w", "-m", mode,
                              "-t", str(int(self.timeout)), "-D", str(directory / "data")),
                cwd=directory, capture_output=True, text=True, timeout=self.timeout + 5,
                check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0


def _ident(name: str) -> str:
    """``name`` checked as a plain lower-case identifier (then it needs no quoting)."""
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r}: use lower-case letters, digits and _"
                         " (at most 63, not starting with a digit)")
    return name


def _check_traversable(path: Path) -> None:
    """Raise unless every ancestor of ``path`` lets other users through (the server's user)."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise PostgresError(f"{parent} is not traversable by others: the server's user"
                                " cannot reach its directory (set TMPDIR elsewhere)")
