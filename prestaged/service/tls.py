"""TLS of the daemon's API, both ends: the daemon's server context and the CLI's client one.

Mutating API calls carry the bearer token of ``daemon.token_file``; whoever captures it can add
a campaign, whose submit commands the daemon runs as its own user. So a ``daemon.listen``
beyond loopback is served over TLS (``daemon.tls_cert``/``tls_key``) or not at all
(``require_tls``). There is no opt-out: a TLS-terminating proxy on the same host reaches the
daemon on loopback and needs none, and a proxy on another host would carry the token in clear
between the two, the very hole this closes.

``ServerTLS`` is built by the daemon's start-up (never at import or in a constructor) and
re-reads the files on reload: new connections get the new certificate, open ones keep
theirs. ``client_context`` is the CLI's: TLS 1.2 or later, verifying the daemon against
``daemon.tls_ca`` or the grid CA directory, hostname checking on.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Optional, Union

from prestaged.config import Config, DaemonConfig
from prestaged.credentials import validity
from prestaged.errors import ConfigError, CredentialError
from prestaged.files import exposed_beyond
from prestaged.net import client_ssl_context

__all__ = ["ServerTLS", "client_context", "is_loopback", "require_tls", "server_host",
           "server_tls", "speaks_tls"]

MIN_VERSION = ssl.TLSVersion.TLSv1_2
"""The oldest TLS either end speaks."""


def _host(listen: str) -> str:
    """The host of ``listen`` (``host:port``), without an IPv6 literal's brackets."""
    return listen.rpartition(":")[0].strip("[]")


def is_loopback(listen: str) -> bool:
    """Whether ``listen`` (``host:port``) is a loopback address or ``localhost``."""
    host = _host(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def speaks_tls(cfg: DaemonConfig) -> bool:
    """Whether the API of ``cfg`` is https, as the CLI sees it: ``tls_cert`` (the daemon's
    config), or ``tls_ca`` alone (a CLI's config on another host)."""
    return cfg.tls_cert is not None or cfg.tls_ca is not None


def require_tls(cfg: DaemonConfig) -> None:
    """``ConfigError`` when ``cfg.listen`` is not loopback and the API would be plain HTTP, or
    when ``tls_ca`` says the API is https and there is no ``tls_cert`` to serve it with.
    Checked first at start, before anything is opened or bound."""
    if cfg.tls_ca is not None and cfg.tls_cert is None:
        raise ConfigError("daemon.tls_ca: set without daemon.tls_cert, so the API would be "
                          "plain HTTP while the CLI of this config talks https; set "
                          "daemon.tls_cert and daemon.tls_key too, or remove daemon.tls_ca")
    if cfg.tls_cert is None and not is_loopback(cfg.listen):
        raise ConfigError(f"daemon.listen {cfg.listen} is not loopback, and over plain HTTP "
                          "the bearer token would cross the network in clear: set "
                          "daemon.tls_cert and daemon.tls_key (e.g. the host certificate and "
                          "key), or listen on 127.0.0.1")


def _no_password() -> bytes:
    # An encrypted key fails instead of prompting on a terminal.
    return b""


def _readable(key: str, path: Path) -> None:
    """``ConfigError`` unless ``path`` is a regular file we may read (a pipe would hang the
    start on its open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"daemon.{key} {path}: cannot read: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"daemon.{key} {path}: not a regular file")
    finally:
        os.close(fd)


def _not_after(cert: Path) -> float:
    """When the first certificate of the PEM file ``cert`` expires (Unix time)."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        # load_cert_chain has just read and parsed the same file: only a file replaced in
        # between lands here, and the next reload reads it again.
        raise ConfigError(f"daemon.tls_cert {cert}: not a PEM certificate") from None
    return validity(leaf)[1].timestamp()


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context of ``cert`` and ``key``, the key checked to be the daemon's alone."""
    _readable("tls_cert", cert)
    _readable("tls_key", key)
    # Refused as token_file is: the key lets its reader pose as the daemon and collect the
    # token. Group-readable is refused too (0640 root:prestaged): give the daemon's user its
    # own copy, or systemd's LoadCredential= (an ACL for the daemon's user alone passes).
    exposed = exposed_beyond(key, os.getuid())
    if exposed is not None:
        raise ConfigError(f"daemon.tls_key {key}: readable by others ({exposed}); chmod 600 "
                          "it, owned by the daemon's user")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"daemon.tls_key {key}: not the key of daemon.tls_cert {cert}") \
                from None
        raise ConfigError(f"daemon.tls_cert {cert}, daemon.tls_key {key}: OpenSSL cannot load "
                          f"them ({e.reason or 'not PEM'}): expected a PEM certificate and its "
                          "unencrypted PEM key") from None
    return ctx


class ServerTLS:
    """The API listener's TLS. ``context`` is given to the listener once; ``reload`` makes
    new connections use the certificate and key the files hold now (the context of each
    connection is swapped in its handshake, SNI or not), open ones keep theirs. ``expires``:
    when the certificate served to new connections expires (Unix time)."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.context, self.expires = self._load(cfg)
        self._current = self.context
        self.context.sni_callback = self._pick

    @staticmethod
    def _load(cfg: DaemonConfig) -> tuple[ssl.SSLContext, float]:
        assert cfg.tls_cert is not None and cfg.tls_key is not None
        context = _context(cfg.tls_cert, cfg.tls_key)
        return context, _not_after(cfg.tls_cert)

    def _pick(self, conn: Union[ssl.SSLObject, ssl.SSLSocket], name: Optional[str],
              initial: ssl.SSLContext) -> None:
        if self._current is not initial:
            conn.context = self._current

    def reload(self, cfg: DaemonConfig) -> None:
        """Re-read ``cfg.tls_cert`` and ``tls_key``; ``ConfigError`` (and the certificate in
        use kept) when they cannot be used."""
        self._current, self.expires = self._load(cfg)


def server_tls(cfg: DaemonConfig) -> Optional[ServerTLS]:
    """The API's TLS when ``cfg.tls_cert`` is set (None: plain HTTP, loopback only);
    ``ConfigError`` naming the key when the files cannot be used or ``listen`` is not loopback
    without them."""
    require_tls(cfg)
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    return ServerTLS(cfg)


# --- the CLI's end --------------------------------------------------------------------------

def server_host(listen: str) -> str:
    """The host a client names to reach ``listen`` and checks its certificate against: its
    host, but this host's name (``socket.getfqdn``) for a wildcard (0.0.0.0, ::), which
    answers on it and which a host certificate names."""
    host = _host(listen)
    if host in ("0.0.0.0", "::"):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host


def client_context(cfg: Config) -> tuple[ssl.SSLContext, str]:
    """The CLI's TLS context for the daemon, and what it trusts, for messages: ``daemon.tls_ca``
    (a CA file or a hashed CA directory), else the grid CA directory as the credentials find
    it. ``CredentialError`` naming the file when it cannot be used."""
    from prestaged.credentials import check_ca_dir, resolve_ca_dir  # cryptography: TLS only

    ca = cfg.daemon.tls_ca
    if ca is None:
        ca, source = resolve_ca_dir(None, cfg.credentials.ca_dir)
        trusted = f"CA directory {ca} ({source})"
        try:
            check_ca_dir(ca, source)
        except CredentialError as e:
            raise CredentialError(f"{e} (to verify the daemon, daemon.tls_ca may name another)") \
                from None
    else:
        trusted = f"daemon.tls_ca {ca}"
        if ca.is_dir():
            check_ca_dir(ca, "daemon.tls_ca")
        elif not ca.exists():
            raise CredentialError(f"{trusted}: no such file or directory")
    capath, cafile = (str(ca), None) if ca.is_dir() else (None, str(ca))
    try:
        ctx = client_ssl_context(capath=capath, cafile=cafile)
    except (ssl.SSLError, OSError) as e:
        why = e.reason if isinstance(e, ssl.SSLError) else e.strerror
        raise CredentialError(f"{trusted}: OpenSSL cannot load it ({why})") from None
    ctx.minimum_version = MIN_VERSION
    return ctx, trusted
