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

``grid_proxy_init`` runs Globus' ``grid-proxy-init -rfc`` (Debian ``globus-proxy-utils``). It
wants the user key at mode 0600 or stricter, reads no passphrase for an unencrypted key, and
with ``-verify`` needs a Globus ``<hash>.signing_policy`` next to each CA: ``grid_ca_dir``
writes them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Optional
from urllib.parse import quote

from cryptography import x509

from prestaged.credentials import format_dn
from prestaged.testing.pki import TestPKI, subject_hash

__all__ = [
    "MAPPED_USER",
    "AuditRecord",
    "GridProxyInitError",
    "XRootDError",
    "XRootDServer",
    "grid_ca_dir",
    "grid_proxy_init",
    "grid_proxy_init_available",
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
_BIND_ATTEMPTS = 3
_POLL = 0.05  # seconds between readiness checks while waiting on the process


class XRootDError(RuntimeError):
    """The XRootD server could not be set up, started or stopped; the message has its log."""


class GridProxyInitError(RuntimeError):
    """``grid-proxy-init`` is missing or failed; the message has its output."""


def xrootd_available() -> bool:
    """True if an ``xrootd`` binary is on ``PATH`` (Debian package ``xrootd-server``)."""
    return shutil.which("xrootd") is not None


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
) -> Path:
    """Make an RFC 3820 proxy with the real ``grid-proxy-init -rfc``; return ``out``.

    ``key`` must be unencrypted (no passphrase is read: stdin is empty) and at most mode 0600.
    ``valid`` is ``H:M`` (default 12 hours). With ``verify`` (default) the user certificate is
    checked against ``ca_dir``, which then needs signing policies (see :func:`grid_ca_dir`).
    ``timeout`` is in seconds. Raises :class:`GridProxyInitError` on failure.
    """
    binary = shutil.which("grid-proxy-init")
    if binary is None:
        raise GridProxyInitError("grid-proxy-init not found: install globus-proxy-utils")
    cmd = [binary, "-rfc", "-q", "-cert", str(cert), "-key", str(key), "-out", str(out),
           "-valid", valid]
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
    extra: Sequence[str] = (),
) -> str:
    """The text of an XRootD 5.5 config serving ``export_dir`` over XrdHttp on ``port``."""
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
    lines.extend(extra)
    return "\n".join(lines) + "\n"


class XRootDServer:
    """A real ``xrootd`` with XrdHttp on a free port, serving generated files (see module doc).

    ``files`` files of ``file_size`` bytes (default 64) named ``f000000.dat``... plus
    ``empty_files`` empty ones ``empty000.dat``... are served to the DNs of ``users`` (a map
    DN -> local name; default: the test user as :data:`MAPPED_USER`). With ``files_per_dir``
    > 0 the non-empty files are spread over subdirectories of that many files each
    (``d0000/f000000.dat``, ``d0000/f000001.dat``, ...; e.g. for benchmarks with 10^5 files);
    the default 0 puts them all directly in the export directory. ``gridmap_required``
    (default true) makes XRootD drop connections of unmapped DNs instead of naming them after
    a hash. ``audit`` (default true) logs every authorization decision (two lines per GET);
    turn it off for benchmarks. ``extra_config`` lines are appended to the config.

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
        gridmap_required: bool = True,
        audit: bool = True,
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
        self.gridmap_required = gridmap_required
        self.audit_enabled = audit
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
        """The last ``lines`` lines of the log (and of the console output if it has any)."""
        text = self.log_text()
        console = self.root / "console.txt"
        if console.is_file():
            text = console.read_text(errors="replace") + text
        return "\n".join(text.splitlines()[-lines:])

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
            self._prepare()
            for _ in range(_BIND_ATTEMPTS):
                if self._launch(binary):
                    return
            raise XRootDError(f"no free port after {_BIND_ATTEMPTS} attempts")
        except BaseException:
            self.stop()
            raise

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
            cwd=self.root, start_new_session=True,
        )
        try:
            self._wait_ready(self._process)
        except _PortTaken:
            self._terminate()
            return False
        return True

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            log = self.log_text()
            if _PORT_IN_USE in log:
                raise _PortTaken
            code = process.poll()
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
        """Stop the server (see :meth:`_terminate`) and remove its directory unless ``keep``."""
        self._terminate()
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
