"""The REAL Rucio server (PyPI ``rucio``, the test extra) on 127.0.0.1 over TLS, for tests.

``RucioServer(pki, spec, directory).start()`` runs ``python -m prestaged.testing.rucio_server
serve --dir DIRECTORY`` in a subprocess, which:

1. writes ``rucio.cfg`` (``RUCIO_CONFIG``) and ``alembic.ini`` there: SQLite database
   ``rucio.db``; ``[bootstrap]`` root identities: userpass ``root`` with ``root_password`` and
   the test user's DN (RFC 2253 order) as X.509; memcached off (``[cache] url`` at a closed
   port, so nothing is shared with a memcached the machine may run);
2. imports Rucio (only there: ``prestaged`` does not depend on it), builds the schema
   (``build_database``, ``create_base_vo``, ``create_root_account``) and loads the spec
   (``prestaged.testing.rucio_spec``) through ``rucio.core``: in-process, in one transaction,
   no HTTP or token round trips (schema plus 1,000 files on two RSEs: about 2 s);
3. serves ``rucio.web.rest.flaskapi.v1.main.application`` (REST and ``/auth/*`` on the same
   port) with werkzeug's threaded server and a TLS context from ``TestPKI``: client
   certificates optional (userpass and token logins need none), RFC 3820 proxies accepted, and
   ``SSL_CLIENT_S_DN`` set from the peer's leaf certificate in RFC 2253 order, as Apache's
   mod_ssl does in production (Rucio strips the proxy's ``CN=<digits>`` itself);
4. writes one JSON line (``port``, ``url``, ``pid``, ``timings``) to the pipe the parent gave it
   (``--ready-fd``) and serves until SIGTERM or until its stdin, a pipe from the parent, is
   closed (the parent died). Rucio logs to stdout: both stdout and stderr go to ``server.log``
   in the directory.

WLCG/OIDC bearer tokens work offline too: given ``oidc`` identities (issuer URL, ``sub``,
account), the server lists each issuer in an ``idpsecrets.json`` and maps ``SUB=<sub>,
ISS=<issuer>`` to the account; Rucio then accepts a JWT as ``X-Rucio-Auth-Token`` when its
signature checks against the issuer's JWKS (fetched from its discovery document on the first
JWT, trusting the test CA through ``REQUESTS_CA_BUNDLE``), it has not expired, and its ``scope``
and ``aud`` contain ``oidc_scope`` and ``oidc_audience`` (Rucio's defaults: ``openid profile``
and ``rucio``). ``prestaged.testing.tokens.IssuerServer`` is such an issuer.

GeoIP replica sorting, Rucio's default for ``/replicas/list``, tries to download MaxMind's
database on every lookup and fails offline (1.8 ms a file and a log line each time); the
server replaces it with "every host equally far", which is what it falls back to offline
anyway: replicas keep Rucio's priority order.

Not for production: throw-away passwords, no authorisation policy beyond Rucio's generic one.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Union

from cryptography import x509

from prestaged.testing.pki import TestPKI, load_pki
from prestaged.testing.rucio_spec import FileSpec, RseSpec, RucioSpec, load_spec

__all__ = ["RucioServer", "RucioServerError", "rfc2253_dn"]

HOST = "127.0.0.1"
ROOT_USERNAME = "root"
# What Rucio's account and identity tables want for an e-mail; never mailed.
_EMAIL = "rucio-test@localhost"
# Protocol implementations as deployments configure them; on the server only their PFN
# joining and parsing run. xrootd keeps a parsed path's leading "/" (webdav drops it).
_IMPLS = {"https": "rucio.rse.protocols.webdav.Default",
          "davs": "rucio.rse.protocols.webdav.Default",
          "http": "rucio.rse.protocols.webdav.Default",
          "root": "rucio.rse.protocols.xrootd.Default",
          "file": "rucio.rse.protocols.posix.Default"}
_DEFAULT_IMPL = "rucio.rse.protocols.gfal.Default"
# SQLite's expression depth limit (1000) bounds one add_replicas() call: it looks its files up
# with one OR per file.
_CHUNK = 250
_SERVER_JSON = "server.json"
_LOG = "server.log"


class RucioServerError(RuntimeError):
    """The Rucio server did not start (the message ends with its log tail)."""


def rfc2253_dn(cert_pem: Path) -> str:
    """The subject of the first certificate in ``cert_pem`` in RFC 2253 order (leaf RDN first,
    ``CN=Test User,O=Test,DC=prestaged-test,DC=org``): mod_ssl's ``SSL_CLIENT_S_DN``."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    return cert.subject.rfc4514_string()


# --------------------------------------------------------------------------------------------
# The parent side: start, wait, stop (no Rucio import)
# --------------------------------------------------------------------------------------------


class RucioServer:
    """The real Rucio server in a subprocess on ``127.0.0.1:<free port>`` (module docstring).

    ``spec`` is a ``RucioSpec`` or its JSON form. ``directory`` holds the config, database and
    ``server.log`` (created if missing; left in place). ``root_password`` defaults to a random
    one. ``oidc`` lists token identities as ``{"issuer": URL, "sub": ..., "account": ...}``
    (the account is created if need be; module docstring: what a token needs);
    ``oidc_audience`` and ``oidc_scope`` are what every token must carry (space-separated
    items, all required). ``startup_timeout`` (seconds, default 120) bounds interpreter
    start, schema and bootstrap; ``stop_timeout`` (default 10) the wait after SIGTERM before
    SIGKILL.

    After ``start()``: ``url`` (``https://127.0.0.1:<port>``, REST and auth alike), ``ca_dir``
    and ``ca_file`` (the test CA, for ssl/aiohttp/requests clients), ``root_username`` /
    ``root_password`` (userpass of account ``root``), ``root_dn`` (the test user's DN, an X.509
    identity of ``root``) and ``timings`` (seconds: ``imports``, ``schema``, ``bootstrap``,
    ``total`` as measured in the subprocess).
    """

    def __init__(self, pki: TestPKI, spec: Union[RucioSpec, Mapping[str, Any]],
                 directory: Path, *, root_password: Optional[str] = None,
                 oidc: Sequence[Mapping[str, str]] = (), oidc_audience: str = "rucio",
                 oidc_scope: str = "openid profile",
                 startup_timeout: float = 120.0, stop_timeout: float = 10.0) -> None:
        self.pki = pki
        self.spec = load_spec(spec)
        self.directory = directory
        self.root_username = ROOT_USERNAME
        self.root_password = root_password or secrets.token_urlsafe(12)
        self.root_dn = rfc2253_dn(pki.user_cert)
        self.oidc = [dict(o) for o in oidc]
        for ident in self.oidc:
            if set(ident) != {"issuer", "sub", "account"}:
                raise ValueError(f"oidc identity {ident!r}: give issuer, sub and account")
        self.oidc_audience = oidc_audience
        self.oidc_scope = oidc_scope
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.timings: dict[str, float] = {}
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._port: Optional[int] = None

    @property
    def port(self) -> int:
        """The TCP port served on."""
        if self._port is None:
            raise RuntimeError("RucioServer is not running")
        return self._port

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>``: the REST API and the ``/auth`` endpoints."""
        return f"https://{HOST}:{self.port}"

    @property
    def ca_dir(self) -> Path:
        """The hashed test CA directory (``capath``) that verifies the server."""
        return self.pki.ca_dir

    @property
    def ca_file(self) -> Path:
        """The test CA certificate as one PEM file (``cafile``; what ``requests`` wants)."""
        return self.pki.ca_cert

    @property
    def log_path(self) -> Path:
        """The subprocess's stdout and stderr (Rucio logs to stdout)."""
        return self.directory / _LOG

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of ``server.log`` (passwords never go there)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Write ``server.json``, start the subprocess and wait for its ready line.

        Raises :class:`RucioServerError` (with the log tail) when it exits first or is not
        ready within ``startup_timeout`` seconds.
        """
        if self._process is not None:
            raise RuntimeError("RucioServer already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        settings = {"spec": self.spec.to_dict(), "pki_root": str(self.pki.root),
                    "root_password": self.root_password, "root_dn": self.root_dn,
                    "oidc": self.oidc, "oidc_audience": self.oidc_audience,
                    "oidc_scope": self.oidc_scope}
        path = self.directory / _SERVER_JSON
        path.touch(mode=0o600)
        path.write_text(json.dumps(settings), encoding="utf-8")
        read_end, write_end = os.pipe()
        try:
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "prestaged.testing.rucio_server", "serve",
                     "--dir", str(self.directory), "--ready-fd", str(write_end)],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(write_end,), start_new_session=True, env=_child_env())
            os.close(write_end)
            write_end = -1
            ready = self._wait_ready(read_end)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        self._port = int(ready["port"])
        self.timings = {k: float(v) for k, v in ready["timings"].items()}

    def _wait_ready(self, fd: int) -> dict[str, Any]:
        """The child's ready line, read from ``fd`` with a deadline; EOF means it died."""
        deadline = time.monotonic() + self.startup_timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RucioServerError(f"Rucio server not ready after {self.startup_timeout} s:"
                                       f"\n{self.log_tail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                process = self._process
                code = process.wait(timeout=self.stop_timeout) if process else None
                raise RucioServerError(f"Rucio server exited ({code}) before it was ready:\n"
                                       f"{self.log_tail()}")
            data += chunk
        doc: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
        return doc

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL after ``stop_timeout`` seconds; reap it. Idempotent."""
        process, self._process = self._process, None
        self._port = None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self.stop_timeout)

    def __enter__(self) -> RucioServer:
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()


def _child_env() -> dict[str, str]:
    """This environment without Rucio's own variables (``RUCIO_CONFIG``, ``RUCIO_HOME``,
    ``RUCIO_POLICY_PACKAGE``, ``POLICY``...): the child sets what it needs."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("RUCIO_") and k != "POLICY"}


# --------------------------------------------------------------------------------------------
# The subprocess: config, schema, bootstrap, serve (Rucio imported here only)
# --------------------------------------------------------------------------------------------


def _write_config(directory: Path, settings: Mapping[str, Any]) -> Path:
    """Write ``rucio.cfg`` and ``alembic.ini`` (and ``idpsecrets.json`` for token issuers)
    under ``directory``; return the first."""
    root_password, root_dn = settings["root_password"], settings["root_dn"]
    import importlib.util

    origin = importlib.util.find_spec("rucio")
    if origin is None or not origin.submodule_search_locations:
        raise RucioServerError("the rucio package is not installed (pip install 'rucio==41.5.1')")
    migrations = Path(next(iter(origin.submodule_search_locations))) / "db/sqla/migrate_repo"
    db_url = f"sqlite:///{directory / 'rucio.db'}"
    alembic = directory / "alembic.ini"
    alembic.write_text(
        f"[alembic]\nscript_location = {migrations}\nsqlalchemy.url = {db_url}\n"
        "\n"
        "[loggers]\nkeys = root\n[handlers]\nkeys = console\n[formatters]\nkeys = generic\n"
        "[logger_root]\nlevel = WARNING\nhandlers = console\n"
        "[handler_console]\nclass = StreamHandler\nargs = (sys.stderr,)\nlevel = NOTSET\n"
        "formatter = generic\n[formatter_generic]\nformat = %(levelname)s %(message)s\n",
        encoding="utf-8")
    config = directory / "rucio.cfg"
    config.touch(mode=0o600)
    config.write_text(
        "[common]\nloglevel = WARNING\n\n"
        f"[database]\ndefault = {db_url}\n\n"
        f"[alembic]\ncfg = {alembic}\n\n"
        f"[bootstrap]\nuserpass_identity = {ROOT_USERNAME}\nuserpass_pwd = {root_password}\n"
        f"userpass_email = {_EMAIL}\nx509_identity = {root_dn}\nx509_email = {_EMAIL}\n\n"
        # A closed port: Rucio probes memcached once at import and runs without a cache.
        "[cache]\nurl = 127.0.0.1:1\n\n"
        # What Rucio falls back to anyway, said outright (no start-up warning).
        "[policy]\npermission = generic\nschema = generic\n\n"
        "[core]\ngeoip_ignore_error = True\n\n"
        + _oidc_config(directory, settings),
        encoding="utf-8")
    return config


def _oidc_config(directory: Path, settings: Mapping[str, Any]) -> str:
    """The ``[oidc]`` section, and ``idpsecrets.json`` with one client per token issuer: Rucio
    takes a JWT in ``X-Rucio-Auth-Token`` only from an issuer listed there (it fetches the
    issuer's discovery document and JWKS on the first JWT it sees), with a ``SCIM`` client
    entry too (without one it loads no issuer at all). The client ids and secrets are never
    used: validating a token that carries ``scope`` and ``aud`` needs no IdP call."""
    issuers = sorted({ident["issuer"] for ident in settings["oidc"]})
    if not issuers:
        return ""
    client = {"client_id": "rucio-test", "client_secret": "unused",
              "redirect_uris": ["https://127.0.0.1/auth/oidc_token"]}
    secrets_path = directory / "idpsecrets.json"
    secrets_path.write_text(json.dumps(
        {f"issuer{i}": {"issuer": iss, **client, "SCIM": dict(client)}
         for i, iss in enumerate(issuers)}), encoding="utf-8")
    return (f"[oidc]\nidpsecrets = {secrets_path}\n"
            f"expected_audience = {settings['oidc_audience']}\n"
            f"expected_scope = {settings['oidc_scope']}\n")


def _protocol(rse: RseSpec, index: int) -> dict[str, Any]:
    """``add_protocol``'s parameter for ``rse.protocols[index]``: priority ``index + 1`` for
    every operation in both domains."""
    proto = rse.protocols[index]
    ops = {op: index + 1 for op in ("read", "write", "delete")}
    return {"scheme": proto.scheme, "hostname": proto.hostname, "port": proto.port,
            "prefix": proto.prefix, "impl": _IMPLS.get(proto.scheme, _DEFAULT_IMPL),
            "domains": {"wan": {**ops, "third_party_copy_read": index + 1,
                                "third_party_copy_write": index + 1}, "lan": ops}}


def _chunks(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


class _Bootstrap:
    """Loads a ``RucioSpec`` into a fresh Rucio database through ``rucio.core``, in one
    transaction (``session``) after the schema and root account exist."""

    def __init__(self, spec: RucioSpec, session: Any,
                 oidc: Sequence[Mapping[str, str]] = ()) -> None:
        from rucio.common.types import (  # type: ignore[import-untyped]
            InternalAccount,
            InternalScope,
        )

        self.spec = spec
        self.oidc = oidc
        self.session = session
        self.root = InternalAccount("root")
        self._account = InternalAccount
        self._scope = InternalScope
        self.rse_ids: dict[str, str] = {}

    def identities(self) -> None:
        """Extra accounts (USER) and their userpass and X.509 identities."""
        from rucio.core.account import add_account  # type: ignore[import-untyped]
        from rucio.core.identity import add_account_identity  # type: ignore[import-untyped]
        from rucio.db.sqla.constants import (  # type: ignore[import-untyped]
            AccountType,
            IdentityType,
        )

        oidc_accounts = [o["account"] for o in self.oidc]
        for name in dict.fromkeys([*self.spec.accounts, *oidc_accounts]):
            if name != "root":
                add_account(self._account(name), AccountType.USER, _EMAIL, session=self.session)
        for user in self.spec.users:
            add_account_identity(user.username, IdentityType.USERPASS,
                                 self._account(user.account), _EMAIL, password=user.password,
                                 session=self.session)
        for ident in self.spec.x509:
            add_account_identity(ident.dn, IdentityType.X509, self._account(ident.account),
                                 _EMAIL, session=self.session)
        for o in self.oidc:  # Rucio's identity string for a token: "SUB=<sub>, ISS=<iss>"
            add_account_identity(f"SUB={o['sub']}, ISS={o['issuer']}", IdentityType.OIDC,
                                 self._account(o["account"]), _EMAIL, session=self.session)

    def scopes_and_rses(self) -> None:
        """Scopes owned by root; RSEs with their type, determinism and protocols."""
        from rucio.core.rse import add_protocol, add_rse  # type: ignore[import-untyped]
        from rucio.core.scope import add_scope  # type: ignore[import-untyped]
        from rucio.db.sqla.constants import RSEType

        for scope in self.spec.scopes:
            add_scope(self._scope(scope), self.root, session=self.session)
        for rse in self.spec.rses:
            rse_id = add_rse(rse.name, deterministic=rse.deterministic,
                             rse_type=RSEType[rse.type], session=self.session)
            self.rse_ids[rse.name] = rse_id
            for index in range(len(rse.protocols)):
                add_protocol(rse_id, _protocol(rse, index), session=self.session)

    def _replica(self, f: FileSpec, rse: RseSpec) -> dict[str, Any]:
        """``add_replicas``' file dict: ``pfn`` on a non-deterministic RSE, the stored ``path``
        for an explicit PFN on a deterministic one (Rucio would insist that the PFN equal its
        own lfn2pfn), neither for a derived path."""
        doc: dict[str, Any] = {"scope": self._scope(f.scope), "name": f.name,
                               "bytes": f.bytes, "adler32": f.adler32}
        if f.md5 is not None:
            doc["md5"] = f.md5
        pfn = f.replicas[rse.name]
        if pfn is not None and not rse.deterministic:
            doc["pfn"] = pfn
        elif pfn is not None:
            doc["path"] = rse.path_of(pfn)
        return doc

    def files(self) -> None:
        """Replicas per RSE in chunks (the file DIDs come with the first), then the files
        registered with no replica at all as bare DIDs."""
        from rucio.core.replica import add_replicas  # type: ignore[import-untyped]

        for rse in self.spec.rses:
            replicas = [self._replica(f, rse) for f in self.spec.files if rse.name in f.replicas]
            for chunk in _chunks(replicas):
                add_replicas(self.rse_ids[rse.name], chunk, self.root, session=self.session)
        self._bare_files([f for f in self.spec.files if not f.replicas])

    def _bare_files(self, files: list[FileSpec]) -> None:
        """File DIDs without any replica row (Rucio's API can only register a file together
        with a replica; this is the DID row ``add_replicas`` would have written)."""
        from rucio.db.sqla import models  # type: ignore[import-untyped]
        from rucio.db.sqla.constants import DIDType

        for f in files:
            models.DataIdentifier(scope=self._scope(f.scope), name=f.name, account=self.root,
                                  did_type=DIDType.FILE, bytes=f.bytes, md5=f.md5,
                                  adler32=f.adler32, is_new=None).save(session=self.session,
                                                                       flush=False)
        self.session.flush()

    def datasets(self) -> None:
        """Datasets with their files attached in spec order."""
        from rucio.core.did import add_did, attach_dids  # type: ignore[import-untyped]

        for ds in self.spec.datasets:
            scope = self._scope(ds.scope)
            add_did(scope, ds.name, "DATASET", self.root, session=self.session)
            dids = [{"scope": self._scope(s), "name": n}
                    for s, n in (did.split(":", 1) for did in ds.files)]
            for chunk in _chunks(dids):
                attach_dids(scope, ds.name, chunk, self.root, session=self.session)


def _bootstrap(spec: RucioSpec, oidc: Sequence[Mapping[str, str]]) -> None:
    """Schema, base VO and root account (Rucio's own bootstrap, reading ``[bootstrap]``), then
    the spec: identities, scopes, RSEs, files, datasets."""
    from rucio.db.sqla.constants import DatabaseOperationType
    from rucio.db.sqla.session import db_session  # type: ignore[import-untyped]
    from rucio.db.sqla.util import (  # type: ignore[import-untyped]
        build_database,
        create_base_vo,
        create_root_account,
    )

    build_database()
    create_base_vo()
    create_root_account()
    with db_session(DatabaseOperationType.WRITE) as session:
        boot = _Bootstrap(spec, session, oidc)
        boot.identities()
        boot.scopes_and_rses()
        boot.files()
        boot.datasets()


def _equal_distances() -> None:
    """Replace GeoIP sorting by its offline outcome (module docstring): order kept."""
    from rucio.core import replica_sorter  # type: ignore[import-untyped]

    def sort_geoip(dictreplica: dict[str, Any], *_: object, **__: object) -> list[str]:
        return list(dictreplica)

    replica_sorter.sort_geoip = sort_geoip


def _server_ssl_context(pki: TestPKI) -> ssl.SSLContext:
    """The host certificate, client certificates verified when sent (proxies allowed)."""
    return pki.server_ssl_context(require_client_cert=False)


def _request_handler() -> type[Any]:
    """werkzeug's request handler plus ``SSL_CLIENT_S_DN`` from the peer's leaf certificate."""
    from werkzeug.serving import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        def make_environ(self) -> dict[str, Any]:
            environ = super().make_environ()
            getpeercert = getattr(self.connection, "getpeercert", None)
            der = getpeercert(binary_form=True) if getpeercert else None
            if der:
                subject = x509.load_der_x509_certificate(der).subject
                environ["SSL_CLIENT_S_DN"] = subject.rfc4514_string()
            return environ

    return Handler


def _set_up(directory: Path, timings: dict[str, float]) -> tuple[Any, TestPKI]:
    """Config, Rucio's imports, schema and spec; the WSGI application and the PKI. Adds the
    seconds spent importing and bootstrapping to ``timings``."""
    settings = json.loads((directory / _SERVER_JSON).read_text(encoding="utf-8"))
    spec = load_spec(settings["spec"])
    pki = load_pki(Path(settings["pki_root"]))
    os.environ["RUCIO_CONFIG"] = str(_write_config(directory, settings))
    # Rucio fetches token issuers' documents with requests, which trusts this bundle only.
    os.environ["REQUESTS_CA_BUNDLE"] = str(pki.ca_cert)
    mark = time.monotonic()
    from rucio.web.rest.flaskapi.v1.main import application  # type: ignore[import-untyped]

    _equal_distances()
    timings["imports"] = time.monotonic() - mark
    mark = time.monotonic()
    _bootstrap(spec, settings["oidc"])
    timings["bootstrap"] = time.monotonic() - mark
    return application, pki


def _stop_on_parent_exit(stop: threading.Event) -> None:
    """Set ``stop`` when stdin (a pipe from the parent) reaches EOF: the parent closed it or
    died, so no server outlives a killed test run."""
    def watch() -> None:
        sys.stdin.buffer.read()
        stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(directory: Path, ready_fd: int) -> None:
    """The subprocess (module docstring): set up, listen, write the ready line to
    ``ready_fd``, serve until SIGTERM or the parent's exit."""
    from werkzeug.serving import make_server

    started = time.monotonic()
    timings: dict[str, float] = {}
    application, pki = _set_up(directory, timings)
    server = make_server(HOST, 0, application, threaded=True,
                         request_handler=_request_handler(), ssl_context=_server_ssl_context(pki))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _stop_on_parent_exit(stop)
    threading.Thread(target=server.serve_forever, name="rucio-server", daemon=True).start()
    timings["total"] = time.monotonic() - started
    port = server.server_address[1]
    line = {"port": port, "url": f"https://{HOST}:{port}", "pid": os.getpid(),
            "timings": timings}
    os.write(ready_fd, (json.dumps(line) + "\n").encode())
    os.close(ready_fd)
    stop.wait()
    server.shutdown()
    server.server_close()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m prestaged.testing.rucio_server serve --dir DIR --ready-fd N``; DIR holds the
    ``server.json`` that ``RucioServer.start`` writes."""
    parser = argparse.ArgumentParser(prog="python -m prestaged.testing.rucio_server",
                                     description=__doc__.split("\n", 1)[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="set up and serve the real Rucio server")
    run.add_argument("--dir", type=Path, required=True, help="directory with server.json")
    run.add_argument("--ready-fd", type=int, required=True,
                     help="file descriptor to write the ready line to")
    args = parser.parse_args(argv)
    serve(args.dir, args.ready_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
