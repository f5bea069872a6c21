"""A real XRootD server (XrdHttp over HTTPS) and the real ``grid-proxy-init``, for tests.

:class:`XRootDServer` runs the ``xrootd`` binary of Debian's ``xrootd-server`` (5.5.3) with
its XrdHttp plugin on one free port, serving an export directory of generated files to clients
that present a proxy of a DN listed in its grid-mapfile. The configuration it writes is::

    xrd.port <port>
    xrd.protocol XrdHttp:<port> libXrdHttp.so
    xrd.allow host localhost
    xrd.tls <hostcert> <hostkey>
    xrd.tlsca certdir <CA dir> proxies
    all.export <export dir>
    http.gridmap required <grid-mapfile>
    ofs.authorize 1
    acc.authdb <authdb>              one "u <mapped name> <export dir> rl" line per user
    acc.audit deny grant             two log lines per GET: "stat" and "read" of the path

What XRootD 5.5.3 does, and therefore why the set-up looks like this:

- It refuses to run as root; as root we start it with ``-R xrootd``, so everything it reads
  (config, CA directory, grid-mapfile, authdb, export) lives in a world-traversable directory
  of its own, and the host key is a 0600 copy owned by ``xrootd`` (it rejects a key with
  "excessive access rights").
- It binds every interface (``*:<port>``, dual stack); ``xrd.allow host localhost`` refuses
  connections from anywhere else, and tests only ever connect to 127.0.0.1.
- XrdHttp requests but does not require a client certificate: a client without one becomes
  ``nobody``, so read access comes only from the authdb, which names mapped users, never ``*``.
- ``http.gridmap required <file>``: the keyword goes *before* the path. Written after it,
  ``required`` is silently ignored and an unmapped DN gets a hash as its name (then the authdb
  answers 403). With ``required``, an unmapped DN passes the TLS handshake and XRootD closes
  the connection without any HTTP answer, logging "Required gridmap mapping failed for DN".
- A certificate from an unknown CA fails verification after the TLS 1.3 handshake from the
  client's point of view: the client reads either an "unknown ca" alert or a connection reset.
- The xroot protocol shares the port and trusts the user name a root:// client claims: this
  server is test material for loopback only.

With ``issuer`` (a :class:`~prestaged.testing.tokens.TokenIssuer`) the server also authorises
WLCG bearer tokens with the SciTokens plugin (Debian ``xrootd-scitokens-plugins``), offline::

    http.header2cgi Authorization authz          the plugin reads the token only from the
                                                 "authz" CGI element: without it, 403 for all
    ofs.authlib ++ libXrdAccSciTokens.so config=<root>/scitokens.cfg
    scitokens.trace all                          log grants as well as failures (no token text)

``scitokens.cfg`` accepts that issuer's tokens for the audiences ``https://127.0.0.1:<port>``
and ``https://localhost:<port>`` (scitokens-cpp also accepts the WLCG "any" audience), with
scope paths relative to the export directory (``base_path``): ``storage.read:/`` covers every
file, ``storage.read:/f000001.dat`` one. Without a token the plugin either passes the request
on to the authdb, so a mapped proxy still reads (``onmissing = passthrough``, the default), or
refuses it (``token_only``: ``onmissing = deny``). A client without a certificate is let in
as ``nobody`` either way; "required" would only drop clients presenting an unmapped proxy, so
a token-only server does not require the grid-mapfile. What the plugin does:

- It needs the issuer's public keys. scitokens-cpp would fetch the discovery document and JWKS
  with libcurl, trusting only the system CA bundle, which lacks the test CA; instead the key
  cache it reads first, ``$XDG_CACHE_HOME/scitokens/scitokens_cpp.sqllite`` (sic), is pre-filled
  under ``<root>/cache`` with keys fresh for a day, and ``XDG_CACHE_HOME`` points there (it
  survives ``-R xrootd``). The issuer is still served over HTTPS with the test CA's host
  certificate during the server's life (``serve_issuer``), which sets the issuer's URL to
  ``https://localhost:<port>/issuer``; XRootD never asks it.
- Every refusal is HTTP 403, never 401, without ``WWW-Authenticate``, with ``Connection: Close``
  and the body "Unable to open <path>; permission denied"; only the log says why
  (:meth:`XRootDServer.token_failures`). A token not yet valid is logged as "token expired"; a
  valid token whose scope does not cover the path logs no failure at all; text that is no JWT
  is skipped as if there were no token. Grants are logged per operation
  (:meth:`XRootDServer.token_grants`); the authdb's ``acc.audit`` lines appear only for
  requests the plugin passed on. XRootD logs no token text.
- With a proxy and a token, the TLS handshake checks the proxy first; then a valid token decides
  alone (a valid token without a covering scope gets 403 although the proxy would be allowed),
  and an invalid token falls back to the proxy's grid-mapfile identity (``passthrough``).
- An accepted token stays accepted from the plugin's cache after its ``exp`` (measured: still
  206 over a second past ``exp``, logged "Cached token", while an unseen token with the same
  ``exp`` gets 403; for 60 s by the reference notes, not measured here): a client must check
  ``exp`` itself.
- Without the key cache the plugin does fetch from the served issuer, and fails: "SSL peer
  certificate or SSH remote key was not OK" (the system bundle lacks the test CA).

``grid_proxy_init`` runs Globus' ``grid-proxy-init -rfc`` (Debian ``globus-proxy-utils``). It
wants the user key at mode 0600 or stricter, reads no passphrase for an unencrypted key, and
with ``-verify`` needs a Globus ``<hash>.signing_policy`` next to each CA: ``grid_ca_dir``
writes them.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional
from urllib.parse import quote

from cryptography import x509

from prestaged.credentials import format_dn
from prestaged.testing.pki import TestPKI, subject_hash
from prestaged.testing.threaded import ThreadedServer
from prestaged.testing.tokens import IssuerServer, TokenIssuer

__all__ = [
    "MAPPED_USER",
    "AuditRecord",
    "GridProxyInitError",
    "HiddenToken",
    "XRootDError",
    "XRootDServer",
    "grid_ca_dir",
    "grid_proxy_init",
    "grid_proxy_init_available",
    "scitokens_available",
    "scitokens_config",
    "write_key_cache",
    "write_signing_policy",
    "xrootd_available",
    "xrootd_config",
]

#: Local name the test user's DN is mapped to by default.
MAPPED_USER = "prestaged"

_HASHED_CERT = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
_LOCAL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_READY = "initialization completed"
_FAILED = "initialization failed"
_PORT_IN_USE = "address already in use"
_AUDIT = re.compile(
    r"acc_Audit: \S+ (?P<verdict>grant|deny) (?P<protocol>\S+) (?P<user>[^@\s]*)@\S+ "
    r"(?P<operation>\S+) (?P<path>.+)$",
    re.M,
)
_GRIDMAP_FAILED = re.compile(r"Required gridmap mapping failed for DN: (.+)$", re.M)
_CERT_REJECTED = re.compile(r"CertVerify: Cert verification failed for DN=(.+)$", re.M)
_LOGIN = re.compile(r"XrootdBridge: \S+ login as (\S+)$", re.M)
_TOKEN_FAILED = re.compile(
    r"scitokens_GenerateAcls: (?:ACL generation from SciToken failed|Failed to deserialize "
    r"SciToken): (?:token verification failed: )?(.+?)\.?$",
    re.M,
)
_TOKEN_GRANT = re.compile(
    r"scitokens_Access: Grant authorization based on scopes for operation=(\S+), path=(.+)$",
    re.M,
)
# Anything shaped like a JWT; log tails we print are scrubbed of it (XRootD 5.5.3 logs none).
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")
# ``ofs.authlib libXrdAccSciTokens.so`` loads the plugin of XRootD's major version.
_SCITOKENS_PLUGIN = "XrdAccSciTokens-5"
_KEY_CACHE = Path("scitokens", "scitokens_cpp.sqllite")  # (sic), under XDG_CACHE_HOME
_KEY_CACHE_LIFETIME = 86400  # seconds the pre-filled keys count as fresh: longer than any run
_BIND_ATTEMPTS = 3
_POLL = 0.05  # seconds between readiness checks while waiting on the process


class XRootDError(RuntimeError):
    """The XRootD server could not be set up, started or stopped; the message has its log."""


class GridProxyInitError(RuntimeError):
    """``grid-proxy-init`` is missing or failed; the message has its output."""


def xrootd_available() -> bool:
    """True if an ``xrootd`` binary is on ``PATH`` (Debian package ``xrootd-server``)."""
    return shutil.which("xrootd") is not None


def scitokens_available() -> bool:
    """True if XRootD's SciTokens authorization plugin is installed (Debian package
    ``xrootd-scitokens-plugins``)."""
    return ctypes.util.find_library(_SCITOKENS_PLUGIN) is not None


def grid_proxy_init_available() -> bool:
    """True if ``grid-proxy-init`` is on ``PATH`` (Debian package ``globus-proxy-utils``)."""
    return shutil.which("grid-proxy-init") is not None


# --------------------------------------------------------------------------------------------
# CA directory and grid-proxy-init
# --------------------------------------------------------------------------------------------


def write_signing_policy(ca_file: Path, ca_dir: Path) -> Path:
    """Write ``<hash>.signing_policy`` for the CA in ``ca_file`` into ``ca_dir``; return it.

    The Globus EACL lets the CA sign any subject; only Globus tools read it (``-verify``).
    """
    cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    policy = ca_dir / f"{subject_hash(cert)}.signing_policy"
    policy.write_text(
        f"access_id_CA X509 '{format_dn(cert.subject)}'\n"
        "pos_rights globus CA:sign\n"
        "cond_subjects globus '\"*\"'\n"
    )
    policy.chmod(0o644)
    return policy


def grid_ca_dir(source: Path, dest: Path) -> Path:
    """Copy the hashed CA directory ``source`` to ``dest`` with a signing policy per CA.

    ``dest`` (created if needed) and its files are world-readable so that a server running as
    another user can read them. Returns ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    for src in sorted(source.iterdir()):
        if not _HASHED_CERT.match(src.name):
            continue
        copy = dest / src.name
        shutil.copyfile(src, copy)
        copy.chmod(0o644)
        write_signing_policy(copy, dest)
    return dest


def grid_proxy_init(
    cert: Path,
    key: Path,
    out: Path,
    *,
    ca_dir: Path,
    valid: str = "12:00",
    verify: bool = True,
    timeout: float = 60.0,
    legacy: bool = False,
) -> Path:
    """Make an RFC 3820 proxy with the real ``grid-proxy-init -rfc`` (a legacy Globus proxy,
    ``CN=proxy``, with ``legacy``: ``-old``); return ``out``.

    ``key`` must be unencrypted (no passphrase is read: stdin is empty) and at most mode 0600.
    ``valid`` is ``H:M`` (default 12 hours). With ``verify`` (default) the user certificate is
    checked against ``ca_dir``, which then needs signing policies (see :func:`grid_ca_dir`).
    ``timeout`` is in seconds. Raises :class:`GridProxyInitError` on failure.
    """
    binary = shutil.which("grid-proxy-init")
    if binary is None:
        raise GridProxyInitError("grid-proxy-init not found: install globus-proxy-utils")
    cmd = [binary, "-old" if legacy else "-rfc", "-q", "-cert", str(cert), "-key", str(key),
           "-out", str(out), "-valid", valid]
    if verify:
        cmd.append("-verify")
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    env["X509_CERT_DIR"] = str(ca_dir)
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env=env, timeout=timeout, check=False)
    if res.returncode != 0 or not out.is_file():
        raise GridProxyInitError(
            f"grid-proxy-init exited with {res.returncode}: {(res.stderr + res.stdout).strip()}"
        )
    return out


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class HiddenToken(str):
    """A token as a ``str`` whose ``repr`` is ``<token>``: pytest shows reprs (assertion
    rewriting, ``--showlocals``), and test output must never show a token. ``str()`` and
    f-strings give the token itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<token>"


@dataclass(frozen=True)
class AuditRecord:
    """One ``acc.audit`` log line: an authorization decision for one operation on one path.

    ``verdict`` is ``grant`` or ``deny``; ``user`` the mapped name (``*`` without a client
    certificate); ``operation`` e.g. ``stat`` or ``read`` (a GET logs both).
    """

    verdict: str
    protocol: str
    user: str
    operation: str
    path: str


def _free_port() -> int:
    """A TCP port free on every interface (XRootD binds ``*:<port>``, dual stack)."""
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _check_traversable(path: Path) -> None:
    """Raise unless every ancestor of ``path`` lets other users through (the server's user)."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise XRootDError(
                f"{parent} is not traversable by other users; the xrootd user cannot reach "
                f"{path}: pass XRootDServer(root=...) under a world-traversable directory"
            )


def _write_files(directory: Path, names: Sequence[str], size: int) -> None:
    """Create ``directory/name`` for each of ``names`` (relative paths; subdirectories made,
    mode 0755), ``size`` bytes of readable text each, mode 0644."""
    for sub in sorted({Path(n).parent for n in names} - {Path()}):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / sub).chmod(0o755)
    for name in names:
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if size:
                os.write(fd, (name.encode() * (size // len(name) + 1))[:size])
        finally:
            os.close(fd)


def xrootd_config(
    *,
    port: int,
    export_dir: Path,
    host_cert: Path,
    host_key: Path,
    ca_dir: Path,
    gridmap: Path,
    authdb: Path,
    admin_dir: Path,
    gridmap_required: bool = True,
    audit: bool = True,
    scitokens: Optional[Path] = None,
    extra: Sequence[str] = (),
) -> str:
    """The text of an XRootD 5.5 config serving ``export_dir`` over XrdHttp on ``port``; with
    ``scitokens`` (the plugin's config file) bearer tokens are authorised too."""
    lines = [
        f"xrd.port {port}",
        f"xrd.protocol XrdHttp:{port} libXrdHttp.so",
        "xrd.allow host localhost",
        f"xrd.tls {host_cert} {host_key}",
        f"xrd.tlsca certdir {ca_dir} proxies",
        f"all.export {export_dir}",
        f"all.adminpath {admin_dir}",
        f"all.pidpath {admin_dir}",
        f"http.gridmap {'required ' if gridmap_required else ''}{gridmap}",
        "ofs.authorize 1",
        f"acc.authdb {authdb}",
    ]
    if audit:
        lines.append("acc.audit deny grant")
    if scitokens is not None:
        lines += [
            # The plugin reads the token only from the "authz" CGI element, never the header.
            "http.header2cgi Authorization authz",
            f"ofs.authlib ++ libXrdAccSciTokens.so config={scitokens}",
            # Failures are logged by default; "all" adds the grants (and never the token).
            "scitokens.trace all",
        ]
    lines.extend(extra)
    return "\n".join(lines) + "\n"


def scitokens_config(
    *, issuer_url: str, audiences: Sequence[str], base_path: Path, token_only: bool
) -> str:
    """The text of a ``scitokens.cfg``: tokens of ``issuer_url`` for one of ``audiences``, scope
    paths relative to ``base_path``; a request without a token is refused (``token_only``) or
    left to the authdb (``passthrough``)."""
    return (
        "[Global]\n"
        f"audience = {', '.join(audiences)}\n"
        f"onmissing = {'deny' if token_only else 'passthrough'}\n"
        "\n"
        "[Issuer test]\n"
        f"issuer = {issuer_url}\n"
        f"base_path = {base_path}\n"
    )


def write_key_cache(
    cache_home: Path, issuer: TokenIssuer, *, lifetime: int = _KEY_CACHE_LIFETIME,
    now: Optional[float] = None,
) -> Path:
    """Put ``issuer``'s JWKS into scitokens-cpp's key cache under ``cache_home`` (what it gets
    as ``XDG_CACHE_HOME``); return the cache file.

    The keys count as fresh for ``lifetime`` seconds (default a day) from ``now`` and expire
    after twice that, so scitokens-cpp never fetches them from the issuer.
    """
    path = cache_home / _KEY_CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time() if now is None else now
    keys = {"jwks": issuer.jwks(), "next_update": int(now + lifetime),
            "expires": int(now + 2 * lifetime)}
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        # The schema scitokens-cpp 0.7 creates; it reads the row of the token's "iss".
        db.execute("CREATE TABLE IF NOT EXISTS keycache ("
                   "issuer text UNIQUE PRIMARY KEY NOT NULL, keys text NOT NULL)")
        db.execute("INSERT OR REPLACE INTO keycache VALUES (?, ?)",
                   (issuer.url, json.dumps(keys)))
    return path


class XRootDServer:
    """A real ``xrootd`` with XrdHttp on a free port, serving generated files (see module doc).

    ``files`` files of ``file_size`` bytes (default 64) named ``f000000.dat``... plus
    ``empty_files`` empty ones ``empty000.dat``... are served to the DNs of ``users`` (a map
    DN -> local name; default: the test user as :data:`MAPPED_USER`). With ``files_per_dir``
    > 0 the non-empty files are spread over subdirectories of that many files each
    (``d0000/f000000.dat``, ``d0000/f000001.dat``, ...; e.g. for benchmarks with 10^5 files);
    the default 0 puts them all directly in the export directory. ``gridmap_required``
    (default true, false with ``token_only``) makes XRootD drop connections of unmapped DNs
    instead of naming them after a hash. ``audit`` (default true) logs every authorization
    decision of the authdb (two lines per GET; not those the token plugin takes); turn it off
    for benchmarks. ``extra_config`` lines are appended to the config.

    With ``issuer`` the server also authorises that issuer's bearer tokens (see the module
    doc): mint them with :meth:`mint`, for :attr:`audience`, scopes relative to the export
    directory. ``token_only`` (default false) refuses every request without a token, even with
    a mapped proxy. ``serve_issuer`` (default true) serves the issuer's discovery document and
    JWKS over HTTPS on 127.0.0.1 while the server runs, which sets ``issuer.url``.

    Everything lives under ``root`` (default: a new directory in the system temp dir, removed
    on :meth:`stop` unless ``keep``). ``startup_timeout``/``stop_timeout`` are seconds; after
    the latter SIGTERM becomes SIGKILL. ``run_as`` is the user ``xrootd`` switches to when
    started as root. URLs use ``host`` (default 127.0.0.1, in the test host certificate).
    """

    def __init__(
        self,
        pki: TestPKI,
        *,
        files: int = 10,
        empty_files: int = 0,
        file_size: int = 64,
        files_per_dir: int = 0,
        users: Optional[Mapping[str, str]] = None,
        gridmap_required: Optional[bool] = None,
        audit: bool = True,
        issuer: Optional[TokenIssuer] = None,
        token_only: bool = False,
        serve_issuer: bool = True,
        extra_config: Sequence[str] = (),
        host: str = "127.0.0.1",
        run_as: str = "xrootd",
        root: Optional[Path] = None,
        keep: bool = False,
        startup_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if files < 0 or empty_files < 0 or file_size < 0 or files_per_dir < 0:
            raise ValueError("files, empty_files, file_size and files_per_dir must be >= 0")
        if startup_timeout <= 0 or stop_timeout <= 0:
            raise ValueError("startup_timeout and stop_timeout must be > 0 seconds")
        if token_only and issuer is None:
            raise ValueError("token_only needs an issuer whose tokens the server accepts")
        if token_only and gridmap_required:
            raise ValueError("a token-only server cannot require a grid-mapfile mapping: its "
                             "clients present no certificate")
        self.pki = pki
        self.users = dict(users) if users is not None else {pki.user_dn: MAPPED_USER}
        if not self.users or not all(_LOCAL_NAME.match(n) for n in self.users.values()):
            raise ValueError("users must map at least one DN to local names ([A-Za-z0-9._-]+)")
        width = max(6, len(str(max(files - 1, 0))))
        self.file_names = [f"f{i:0{width}d}.dat" for i in range(files)]
        """Names of the non-empty files, in order (paths relative to the export directory)."""
        if files_per_dir:
            dirs = max(4, len(str(max(files - 1, 0) // files_per_dir)))
            self.file_names = [f"d{i // files_per_dir:0{dirs}d}/{name}"
                               for i, name in enumerate(self.file_names)]
        self.empty_names = [f"empty{i:03d}.dat" for i in range(empty_files)]
        """Names of the empty files."""
        self.file_size = file_size
        self.gridmap_required = not token_only if gridmap_required is None else gridmap_required
        self.audit_enabled = audit
        self._issuer = issuer
        self.token_only = token_only
        self.serve_issuer = serve_issuer
        self._issuer_server: Optional[ThreadedServer[IssuerServer]] = None
        self.extra_config = tuple(extra_config)
        self.host = host
        self.run_as = run_as
        self.keep = keep
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._root = root
        self._made_root = False
        self._port: Optional[int] = None
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._console: Optional[IO[bytes]] = None

    # ---- paths ------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The directory holding config, CA copy, host credentials, export and log."""
        if self._root is None:
            raise RuntimeError("XRootDServer.start() was not called")
        return self._root

    @property
    def export_dir(self) -> Path:
        """The exported directory; URL paths are its absolute path plus the file name."""
        return self.root / "export"

    @property
    def ca_dir(self) -> Path:
        """The server's hashed CA directory (a copy of the PKI's, with signing policies)."""
        return self.root / "certificates"

    @property
    def log_path(self) -> Path:
        """XRootD's log file (``-l``; not rotated)."""
        return self.root / "var" / "xrootd.log"

    @property
    def config_path(self) -> Path:
        """The generated XRootD config file."""
        return self.root / "xrootd.cfg"

    @property
    def cache_home(self) -> Path:
        """The server's ``XDG_CACHE_HOME``, holding scitokens-cpp's key cache (with ``issuer``)."""
        return self.root / "cache"

    @property
    def key_cache(self) -> Path:
        """scitokens-cpp's key cache (SQLite; see :func:`write_key_cache`)."""
        return self.cache_home / _KEY_CACHE

    @property
    def port(self) -> int:
        """The HTTPS port (also the xroot port)."""
        if self._port is None:
            raise RuntimeError("XRootDServer.start() was not called")
        return self._port

    @property
    def pid(self) -> Optional[int]:
        """PID of the running ``xrootd``, or None."""
        return self._process.pid if self._process is not None else None

    def url(self, name: str) -> str:
        """``https://<host>:<port><export dir>/<name>`` (the file need not exist)."""
        return f"https://{self.host}:{self.port}{quote(str(self.export_dir))}/{quote(name)}"

    def urls(self) -> list[str]:
        """URLs of every non-empty file, in order."""
        return [self.url(n) for n in self.file_names]

    # ---- tokens -----------------------------------------------------------------------------

    @property
    def issuer(self) -> TokenIssuer:
        """The issuer whose tokens the server accepts (``issuer=``)."""
        if self._issuer is None:
            raise RuntimeError("this XRootDServer accepts no tokens: pass issuer=TokenIssuer()")
        return self._issuer

    @property
    def audience(self) -> str:
        """The ``aud`` to mint: ``https://<host>:<port>``, the origin of :meth:`url`."""
        return f"https://{self.host}:{self.port}"

    @property
    def audiences(self) -> list[str]:
        """Every audience the server accepts besides the WLCG "any" one: :attr:`audience` and
        the same origin named ``localhost``."""
        return list(dict.fromkeys([self.audience, f"https://localhost:{self.port}"]))

    def mint(self, scope: str = "storage.read:/", **kwargs: Any) -> HiddenToken:
        """A token of :attr:`issuer` for this server: ``audience`` defaults to :attr:`audience`,
        scope paths are relative to the export directory (the default ``storage.read:/`` reads
        every file); other ``kwargs`` go to :meth:`TokenIssuer.mint`. Its repr hides it."""
        kwargs.setdefault("audience", self.audience)
        return HiddenToken(self.issuer.mint(scope, **kwargs))

    # ---- log --------------------------------------------------------------------------------

    def log_mark(self) -> int:
        """Current size of the log in bytes: pass it as ``since`` to read only what follows."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset ``since`` (default: all of it); empty if there is none."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log (and of the console output if it has any), with
        anything shaped like a token replaced by ``<token>``: it is meant to be printed."""
        text = self.log_text()
        console = self.root / "console.txt"
        if console.is_file():
            text = console.read_text(errors="replace") + text
        return _JWT.sub("<token>", "\n".join(text.splitlines()[-lines:]))

    def audit(self, since: int = 0) -> list[AuditRecord]:
        """Authorization decisions logged from offset ``since`` (needs ``audit=True``)."""
        return [AuditRecord(**m.groupdict()) for m in _AUDIT.finditer(self.log_text(since))]

    def logins(self, since: int = 0) -> list[str]:
        """Names XrdHttp logged clients in as (one per connection) from offset ``since``."""
        return _LOGIN.findall(self.log_text(since))

    def gridmap_failures(self, since: int = 0) -> list[str]:
        """DNs whose connection was dropped for want of a grid-mapfile entry (``required``)."""
        return [dn.strip() for dn in _GRIDMAP_FAILED.findall(self.log_text(since))]

    def rejected_certificates(self, since: int = 0) -> list[str]:
        """DNs of client certificates that failed verification (e.g. an unknown CA)."""
        return [dn.strip() for dn in _CERT_REJECTED.findall(self.log_text(since))]

    def token_failures(self, since: int = 0) -> list[str]:
        """Why the token plugin rejected tokens, from offset ``since``: one reason per check (a
        GET checks twice, "stat" then "open"), e.g. ``token expired``, ``'aud' claim
        verification failed``, ``Invalid signature``, ``Token issuer is not in list of allowed
        issuers``. A valid token that does not cover the path is not a failure here."""
        return _TOKEN_FAILED.findall(self.log_text(since))

    def token_grants(self, since: int = 0) -> list[tuple[str, str]]:
        """``(operation, path)`` the token plugin granted from offset ``since`` (a GET: ``stat``
        then ``read`` of the file's absolute path); requests the plugin passed on to the authdb
        appear in :meth:`audit` instead."""
        return [(op, path) for op, path in _TOKEN_GRANT.findall(self.log_text(since))]

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Lay out the directory, write the config and start ``xrootd``; wait until it serves.

        Raises :class:`XRootDError` (with the log tail) if it exits, logs a failed start-up or
        does not accept connections within ``startup_timeout`` seconds.
        """
        if self._process is not None:
            raise RuntimeError("XRootDServer already started")
        binary = shutil.which("xrootd")
        if binary is None:
            raise XRootDError("xrootd not found: install the Debian package xrootd-server")
        try:
            if self._issuer is not None and self.serve_issuer:
                self._start_issuer(self._issuer)
            self._prepare()
            crashed, taken = False, 0
            while taken < _BIND_ATTEMPTS:
                try:
                    if self._launch(binary):
                        return
                    taken += 1
                except _CrashedAtStart as e:
                    if crashed:  # twice: not a fluke, the caller must hear it
                        raise XRootDError(str(e)) from None
                    crashed = True
                    sys.stderr.write(f"prestaged.testing.xrootd: {e}; starting it once more\n")
            raise XRootDError(f"no free port after {_BIND_ATTEMPTS} attempts")
        except BaseException:
            self.stop()
            raise

    def _start_issuer(self, issuer: TokenIssuer) -> None:
        """Serve ``issuer`` on its own loop in a thread; this sets its URL (and so ``iss``)."""
        pki = self.pki
        server = ThreadedServer(
            lambda: IssuerServer(issuer, pki.server_ssl_context(require_client_cert=False)),
            "token-issuer",
        )
        server.start(timeout=self.startup_timeout)
        self._issuer_server = server

    def _prepare(self) -> None:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="prestaged-xrootd-"))
            self._made_root = True
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        uid, gid = self._server_ids()
        if uid != os.geteuid():
            _check_traversable(root)
        grid_ca_dir(self.pki.ca_dir, self.ca_dir)
        host = root / "host"
        host.mkdir(exist_ok=True)
        host.chmod(0o755)
        shutil.copyfile(self.pki.host_cert, host / "hostcert.pem")
        (host / "hostcert.pem").chmod(0o644)
        key = host / "hostkey.pem"
        shutil.copyfile(self.pki.host_key, key)
        key.chmod(0o600)  # XRootD refuses a key readable by others
        os.chown(key, uid, gid)
        self.export_dir.mkdir(exist_ok=True)
        self.export_dir.chmod(0o755)
        _write_files(self.export_dir, self.file_names, self.file_size)
        _write_files(self.export_dir, self.empty_names, 0)
        (root / "grid-mapfile").write_text(
            "".join(f'"{dn}" {name}\n' for dn, name in self.users.items())
        )
        (root / "authdb").write_text(
            "".join(f"u {name} {self.export_dir} rl\n" for name in sorted(set(self.users.values())))
        )
        var = root / "var"
        var.mkdir(exist_ok=True)
        os.chown(var, uid, gid)
        if self._issuer is not None:
            cache = write_key_cache(self.cache_home, self._issuer)
            # scitokens-cpp, running as the server's user, may update its cache.
            for path in (self.cache_home, cache.parent, cache):
                os.chown(path, uid, gid)

    def _server_ids(self) -> tuple[int, int]:
        """uid/gid ``xrootd`` will run as: ``run_as`` when we are root, else ourselves."""
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError:
            raise XRootDError(
                f"user {self.run_as!r} does not exist (the xrootd-server package creates it)"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _launch(self, binary: str) -> bool:
        """Start on a fresh port; True once serving, False if the port was taken meanwhile."""
        self._port = _free_port()
        scitokens: Optional[Path] = None
        env = None
        if self._issuer is not None:
            scitokens = self.root / "scitokens.cfg"
            scitokens.write_text(scitokens_config(
                issuer_url=self._issuer.url, audiences=self.audiences,
                base_path=self.export_dir, token_only=self.token_only,
            ))
            env = {**os.environ, "XDG_CACHE_HOME": str(self.cache_home)}
        self.config_path.write_text(
            xrootd_config(
                port=self._port,
                export_dir=self.export_dir,
                host_cert=self.root / "host" / "hostcert.pem",
                host_key=self.root / "host" / "hostkey.pem",
                ca_dir=self.ca_dir,
                gridmap=self.root / "grid-mapfile",
                authdb=self.root / "authdb",
                admin_dir=self.root / "var",
                gridmap_required=self.gridmap_required,
                audit=self.audit_enabled,
                scitokens=scitokens,
                extra=self.extra_config,
            )
        )
        self.log_path.unlink(missing_ok=True)
        cmd = [binary, "-c", str(self.config_path), "-l", f"={self.log_path}"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-R", self.run_as]
        # Messages from before the log is open (e.g. a log path it cannot write) land here.
        self._console = open(self.root / "console.txt", "wb")  # noqa: SIM115 closed in stop()
        self._process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
            cwd=self.root, start_new_session=True, env=env,
        )
        try:
            self._wait_ready(self._process)
        except _PortTaken:
            self._terminate()
            return False
        except _CrashedAtStart:
            self._terminate()
            raise
        return True

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            log = self.log_text()
            if _PORT_IN_USE in log:
                raise _PortTaken
            code = process.poll()
            if code is not None and code < 0 and not log.strip():
                # Killed by a signal before it logged a line: XRootD 5.5 with the SciTokens
                # plugin was seen to SIGSEGV so on a loaded 2-core CI machine, once in several
                # runs, and start the next time.
                raise _CrashedAtStart(f"xrootd was killed by signal {-code} before it logged "
                                      "anything")
            if code is not None or _FAILED in log:
                raise XRootDError(f"xrootd failed to start (exit {code}):\n{self.log_tail()}")
            if _READY in log and _accepts(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise XRootDError(
                    f"xrootd not serving on port {self.port} after {self.startup_timeout} s:\n"
                    f"{self.log_tail()}"
                )
            # Waiting on the process doubles as the pause between checks and notices its death.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_POLL)

    def _terminate(self) -> None:
        """SIGTERM the server by PID, SIGKILL after ``stop_timeout`` seconds; reap it."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=self.stop_timeout)
        if self._console is not None:
            self._console.close()
            self._console = None

    def stop(self) -> None:
        """Stop the server (see :meth:`_terminate`) and the issuer's, and remove the directory
        unless ``keep``."""
        self._terminate()
        if self._issuer_server is not None:
            self._issuer_server.stop()
            self._issuer_server = None
        if self._made_root and not self.keep and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> XRootDServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()


class _PortTaken(Exception):
    """The port picked for XRootD was taken before it could bind it."""


class _CrashedAtStart(Exception):
    """XRootD died of a signal before writing a line of its log."""
