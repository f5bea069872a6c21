"""Shared fixtures: one test PKI per session, a fresh proxy per test, the emulators, the
real XRootD that checks bearer tokens, the real Rucio server and a real PostgreSQL."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import aiohttp
import pytest

from prestaged.state.store import Store
from prestaged.testing.dcache import DCacheConfig, DCacheServer
from prestaged.testing.pki import TestPKI, create_pki
from prestaged.testing.postgres import PostgresCluster, find_bin_dir
from prestaged.testing.rucio_server import RucioServer
from prestaged.testing.samweb import ThreadedSamWebServer
from prestaged.testing.storage import ThreadedStorageServer
from prestaged.testing.tokens import TokenIssuer
from prestaged.testing.xrootd import XRootDServer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A CA, host certificate and user certificate shared by the whole session."""
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def storage(pki: TestPKI) -> Iterator[ThreadedStorageServer]:
    """The test storage in a background thread, requiring a client certificate (modules that
    need another kind of storage define their own ``storage``)."""
    with ThreadedStorageServer(pki.server_ssl_context()) as srv:
        yield srv


@pytest.fixture
def proxy(pki: TestPKI, tmp_path: Path) -> Path:
    """A valid 12-hour RFC 3820 proxy of the test user, in this test's tmp_path."""
    return pki.make_proxy(tmp_path / "x509up_test")


def _in_ci() -> bool:
    """True when the environment variable CI is set to something other than false/0."""
    import os

    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def peer_missing(message: str, what: str = "tool") -> NoReturn:
    """A real peer the test needs is not installed: skip with ``message`` (what to install);
    with CI set, fail instead, so that CI never passes without it."""
    if _in_ci():
        pytest.fail(f"{message} (CI is set: a missing {what} is a failure)")
    pytest.skip(message)


_STARTED: list[Any] = []
"""What ``pytest_collection_finish`` started, for ``pytest_sessionfinish`` to stop (the module
is not looked up by name: under ``--import-mode=importlib`` it is ``tests.test_pythons``)."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Python cross-sections (``test_pythons``) selected, so that they run while the
    rest of the suite does (their tests then wait for them)."""
    if session.config.option.collectonly:
        return
    items = [i for i in session.items
             if getattr(i, "originalname", "") == "test_suite_cross_section_passes_on"]
    if items:
        background = items[0].module.BACKGROUND
        background.start([i.callspec.params["version"] for i in items])
        _STARTED.append(background)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End a cross-section still running when the session ends (``-x``, Ctrl-C...)."""
    while _STARTED:
        _STARTED.pop().stop()


def exposed_metric_names() -> set[str]:
    """The names in the exposition of a ``Metrics`` with a series of every labelled metric
    (what a dashboard or an alert rule may name)."""
    from prestaged.campaign.repository import SubmissionState
    from prestaged.metrics import Metrics

    m = Metrics()
    m.request_started("h")
    m.request_finished("h", 0.1)
    m.set_dataset("d", warm=1, stale=0, failed=0, unknown=0, last_warm=1.0)
    m.set_watch_every("d", 3600.0)
    m.set_credential_expiry("proxy", 2.0)
    m.set_api_certificate_expiry("127.0.0.1:9464", 2.0)
    m.set_campaign_submissions("c", {"queued": 1}, [s.value for s in SubmissionState])
    m.set_locality("d", {"TAPE": 1})
    m.concurrency_changed("h", 4)
    m.set_rate("h", 200.0)
    m.set_cluster(1, {"campaign": 1})
    m.lease_taken_over("chunk")
    return set(re.findall(r"^(prestaged_[a-z_]+)", m.exposition().decode(), re.M))


@pytest.fixture
def grid_proxy(pki: TestPKI, tmp_path: Path) -> Path:
    """A 12-hour RFC 3820 proxy of the test user made by the real ``grid-proxy-init -rfc``."""
    from prestaged.testing.xrootd import grid_ca_dir, grid_proxy_init, grid_proxy_init_available

    if not grid_proxy_init_available():
        peer_missing("grid-proxy-init not found: install Debian package globus-proxy-utils")
    # -verify checks the user certificate against a CA directory with Globus signing policies.
    ca_dir = grid_ca_dir(pki.ca_dir, tmp_path / "grid-certificates")
    return grid_proxy_init(pki.user_cert, pki.user_key, tmp_path / "x509up_grid", ca_dir=ca_dir)


def _require_xrootd_tokens() -> None:
    """Skip the calling test unless ``xrootd`` and its SciTokens plugin are installed; with CI
    set, fail it instead (a missing server is a failure there, not a skip)."""
    from prestaged.testing.xrootd import scitokens_available, xrootd_available

    missing = [package for present, package in ((xrootd_available(), "xrootd-server"),
                                                (scitokens_available(), "xrootd-scitokens-plugins"))
               if not present]
    if missing:
        peer_missing(f"install Debian package(s) {' '.join(missing)} for the token-checking XRootD", "server")


# Files on the session's token XRootDs, as on tests/test_xrootd.py's proxy-only one.
_TOKEN_FILES = 300


@pytest.fixture(scope="session")
def xrootd_token_server(pki: TestPKI) -> Iterator[XRootDServer]:
    """The real XRootD accepting bearer tokens AND the test user's proxy (one per session).

    Mint with ``server.mint(scope="storage.read:/", **TokenIssuer.mint kwargs)``: ``aud``
    defaults to ``server.audience`` = ``https://127.0.0.1:<port>`` (the origin of
    ``server.url(name)``; ``https://localhost:<port>`` and the WLCG "any" audience are accepted
    too), scope paths are relative to the export directory (``storage.read:/`` reads every
    file, ``storage.read:/f000001.dat`` one). ``server.issuer`` is the ``TokenIssuer``, served
    over HTTPS at ``server.issuer.url`` with the test CA. Files: ``server.file_names``
    (300 of 64 bytes) and ``server.empty_names`` (2), URLs ``server.urls()``.
    Without a token, or with an invalid one, a mapped proxy still reads (``onmissing =
    passthrough``); a VALID token decides alone. Every refusal is 403. Log: ``log_mark()``,
    then ``token_grants(mark)``, ``token_failures(mark)``, ``audit(mark)`` (proxy decisions),
    ``logins(mark)``; ``log_tail()`` is safe to print. Tokens stay valid in XRootD's cache a
    while past ``exp``: mint a fresh token (new ``jti``) per case.
    """
    _require_xrootd_tokens()
    with XRootDServer(pki, files=_TOKEN_FILES, empty_files=2,
                      issuer=TokenIssuer()) as server:
        yield server


@pytest.fixture(scope="session")
def xrootd_token_only_server(pki: TestPKI) -> Iterator[XRootDServer]:
    """Like ``xrootd_token_server`` but token-only (``onmissing = deny``): without a valid
    token every request gets 403, even with a mapped proxy; clients need no certificate, and
    one presenting an unmapped proxy is not dropped (the grid-mapfile is not "required")."""
    _require_xrootd_tokens()
    with XRootDServer(pki, files=_TOKEN_FILES, empty_files=2, issuer=TokenIssuer(),
                      token_only=True) as server:
        yield server


@pytest.fixture
def make_xrootd_token_server(pki: TestPKI) -> Iterator[Callable[..., XRootDServer]]:
    """Factory of started token XRootDs for tests that change one (``make(**XRootDServer
    kwargs)``; ``issuer`` defaults to a new ``TokenIssuer``), stopped after the test."""
    _require_xrootd_tokens()
    servers: list[XRootDServer] = []

    def make(**kwargs: Any) -> XRootDServer:
        kwargs.setdefault("issuer", TokenIssuer())
        server = XRootDServer(pki, **kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


def _require_rucio() -> None:
    """Skip the calling test unless the real Rucio server (PyPI ``rucio``, the test extra) is
    installed; with CI set, fail it instead."""
    import importlib.util

    if importlib.util.find_spec("rucio") is None:
        peer_missing("install the test extra (pip install -e '.[test]') for the real Rucio server", "server")


@pytest.fixture(scope="session")
def make_rucio_server(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory,
                      ) -> Iterator[Callable[..., RucioServer]]:
    """Factory of started REAL Rucio servers (``prestaged.testing.rucio_server``), each in its
    own subprocess and directory; whatever is still running at the end of the session is
    stopped (stop a module's server yourself with ``server.stop()``).

    ``make(spec, **RucioServer kwargs) -> RucioServer``; ``spec`` is a ``RucioSpec`` or its
    JSON form (``prestaged.testing.rucio_spec``). The server has ``url`` (REST and ``/auth``
    alike), ``ca_dir``/``ca_file`` (the test CA), ``root_username``/``root_password``
    (userpass of account ``root``), ``root_dn`` (the test user's DN: ``proxy`` logs in as
    ``root`` over ``/auth/x509``), ``timings`` and ``log_tail()``. About 4 s to start.
    ``oidc=[{"issuer": issuer.url, "sub": ..., "account": ...}]`` makes it accept JWTs of a
    ``prestaged.testing.tokens`` issuer served by ``IssuerServer`` (tests/test_rucio_server.py).
    """
    _require_rucio()
    servers: list[RucioServer] = []

    def make(spec: Any, **kwargs: Any) -> RucioServer:
        server = RucioServer(pki, spec, tmp_path_factory.mktemp("rucio"), **kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


def _require_postgres() -> None:
    """Skip the calling test unless PostgreSQL's server (Debian ``postgresql``) and psycopg
    (the ``postgresql`` extra) are installed; with CI set, fail it instead."""
    import importlib.util

    missing = []
    if find_bin_dir() is None:
        missing.append("Debian package postgresql")
    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        missing.append("the test extra (pip install -e '.[test]') for psycopg")
    if missing:
        peer_missing(f"install {' and '.join(missing)} for the real PostgreSQL", "server")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL per session (``prestaged.testing.postgres``): unix socket
    only, run as ``postgres`` under root; about 3 s to initdb and start on 2 cores. Tests take
    databases from ``pg_url``/``make_pg_url``, never the cluster's own."""
    _require_postgres()
    with PostgresCluster() as cluster:
        yield cluster


_pg_serial = itertools.count(1)


@pytest.fixture
def make_pg_url(pg_cluster: PostgresCluster,
                request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Factory of fresh databases on the session's PostgreSQL: ``make() -> url`` (libpq URL
    of the ``prestaged`` role with no password in it: libpq reads that from the cluster's
    password file, ``passfile=``). Each is dropped after the test, with any connection still
    open to it; about 0.1 s per database."""
    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    names: list[str] = []

    def make() -> str:
        name = f"t{next(_pg_serial)}_{stem}"
        names.append(name)
        return pg_cluster.create_database(name)

    yield make
    for name in names:
        pg_cluster.drop_database(name)


@pytest.fixture
def pg_url(make_pg_url: Callable[[], str]) -> str:
    """A database of this test's own on the session's PostgreSQL (see ``make_pg_url``)."""
    return make_pg_url()


class Backend:
    """A fresh state of one backend for a test: ``sqlite`` (a file under tmp_path) or
    ``postgresql`` (a database of its own on the session's server)."""

    def __init__(self, name: str, directory: Path, url: Optional[str]) -> None:
        self.name = name
        self.path = directory / "state.db"
        """The SQLite file; for PostgreSQL only the anchor of local files (campaign lists)."""
        self.url = url
        self._directory = directory

    @property
    def where(self) -> str:
        """The state as prestaged's messages name it."""
        from prestaged.model import redacted_url

        return redacted_url(self.url) if self.url is not None else str(self.path)

    def store(self, **kwargs: Any) -> Store:
        """A ``Store`` of this state, not opened."""
        return Store(self.path, url=self.url, **kwargs)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` read on a connection of its own (another process's view)."""
        if self.url is None:
            conn = sqlite3.connect(self.path)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        from prestaged.state.postgres import connect

        with connect(self.url) as pg:
            return pg.execute(sql).fetchall()

    def state_table(self) -> str:
        """TOML to append to a config a test writes itself: for PostgreSQL ``[state] url`` and
        no daemon to ask (``[daemon] listen`` on port 1); "" for SQLite (see ``state_args``)."""
        if self.url is None:
            return ""
        return f'\n[state]\nurl = {json.dumps(self.url)}\n[daemon]\nlisten = "127.0.0.1:1"\n'

    def state_args(self) -> list[str]:
        """Command-line arguments to go with a config ending in ``state_table()``:
        ``--state FILE`` for SQLite, none for PostgreSQL."""
        return [] if self.url is not None else ["--state", str(self.path)]

    def cli(self, state_toml: str = "") -> list[str]:
        """Command-line arguments selecting this state: ``--state FILE``, or a config whose
        ``[state] url`` is the database (and no daemon to ask); ``state_toml`` adds keys to
        ``[state]``."""
        config = self._directory / f"state-{self.name}.toml"
        url = f"url = {json.dumps(self.url)}\n" if self.url is not None else ""
        config.write_text(f"[state]\n{url}{state_toml}\n[daemon]\nlisten = \"127.0.0.1:1\"\n")
        args = ["--config", str(config)]
        return args if self.url is not None else [*args, "--state", str(self.path)]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each state backend in turn, fresh (see ``Backend``)."""
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path, None)
    make: Callable[[], str] = request.getfixturevalue("make_pg_url")
    return Backend("postgresql", tmp_path, make())


@pytest.fixture
def samweb(pki: TestPKI) -> Iterator[Callable[..., ThreadedSamWebServer]]:
    """Factory of SAM web emulators on 127.0.0.1 (experiment "dune"), stopped after the test.

    ``samweb(definitions, require_cert=False, **kwargs)``; kwargs go to ``SamWebServer``.
    """
    servers: list[ThreadedSamWebServer] = []

    def make(definitions: dict[str, Any] | None = None, *, require_cert: bool = False,
             **kwargs: Any) -> ThreadedSamWebServer:
        kwargs.setdefault("experiment", "dune")
        srv = ThreadedSamWebServer(pki.server_ssl_context(require_client_cert=require_cert),
                                   definitions=definitions or {}, **kwargs)
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every CLI it starts) gets its own default state database directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture(autouse=True)
def _no_ambient_token(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No test picks up a bearer token of the machine it runs on: the discovery variables are
    unset and ``$XDG_RUNTIME_DIR`` is an empty directory of the test's own (``/tmp/bt_u<uid>``
    cannot be moved: tests that need it absent skip when it exists)."""
    for name in ("BEARER_TOKEN", "BEARER_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("xdg-runtime")))


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start ``prestaged serve`` (``daemon_harness.Daemon``); killed after the test."""
    from daemon_harness import daemon_starter

    yield from daemon_starter(tmp_path)


@pytest.fixture
async def http(pki: TestPKI, proxy: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session presenting the test proxy (modules may define their own ``http``)."""
    connector = aiohttp.TCPConnector(ssl=pki.client_ssl_context(proxy))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture
async def dcache(pki: TestPKI) -> AsyncIterator[Callable[..., Awaitable[DCacheServer]]]:
    """Factory of started dCache emulators (``await dcache(**DCacheConfig kwargs)``), stopped
    after the test; ``bearer=`` and ``clock=`` go to ``DCacheServer`` (with a ``BearerCheck``
    client certificates become optional)."""
    servers: list[DCacheServer] = []

    async def make(*, bearer: Any = None, clock: Any = None, **config: Any) -> DCacheServer:
        extra = {"bearer": bearer} if clock is None else {"bearer": bearer, "clock": clock}
        srv = DCacheServer(pki.server_ssl_context(require_client_cert=bearer is None),
                           pki.pool_ssl_context(),
                           DCacheConfig(**config), **extra)
        await srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop()


@pytest.fixture
async def anonymous(pki: TestPKI) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session that trusts the test CA and presents no certificate (token tests)."""
    ctx = ssl.create_default_context(capath=str(pki.ca_dir))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        yield s


@pytest.fixture
async def certified(pki: TestPKI, proxy: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session presenting the test proxy."""
    ctx = pki.client_ssl_context(proxy)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        yield s
