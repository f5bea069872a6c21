"""The CLI's client of the daemon's HTTP API (``daemon.listen``), standard library only.

``call`` returns None only when nothing listens there (connection refused: the command then
works on the state file instead), the JSON answer on success, and raises the ``PrestagedError``
matching an error answer (400 -> ``ConfigError``, 404 -> ``NotFoundError``, 409 ->
``ConflictError``), with the daemon's one-line message. A daemon that is slow, or anything else
that goes wrong on the way, is a ``DaemonError`` (exit 69) naming the daemon and ``--state``:
never taken for "no daemon", which would send a hold or cancel to a different database than
the one the daemon uses. Every call sends the bearer token from ``daemon.token_file`` when set
(a read goes without it when the file cannot be read).

With ``daemon.tls_cert`` (or ``tls_ca`` alone) set the daemon serves https, and so the client
talks it, verifying the daemon's certificate (``tls.client_context``) for the host of
``daemon.listen``. A
certificate that does not verify is a ``CredentialError`` (exit 3) naming what was trusted,
never "no daemon"; the token is never sent over plain HTTP beyond loopback.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any, Optional

from prestaged.config import Config
from prestaged.errors import (
    ConfigError,
    ConflictError,
    CredentialError,
    DaemonError,
    NotFoundError,
    PrestagedError,
    error_for_exit,
)
from prestaged.model import hide_secret
from prestaged.service.tls import client_context, is_loopback, server_host, speaks_tls

__all__ = ["base_url", "call"]

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds for one API call (the daemon answers from memory or one small SQLite read)."""


def _nothing_listens(url: str) -> bool:
    """Whether a TCP connection to ``url``'s host and port is refused (nothing listens)."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def base_url(cfg: Config) -> str:
    """``http://<daemon.listen>``, or ``https://`` when ``daemon.tls_cert`` or ``tls_ca`` is
    set (``tls.speaks_tls``): then with the host the certificate must name
    (``tls.server_host``: this host's name for 0.0.0.0)."""
    listen = cfg.daemon.listen
    if not speaks_tls(cfg.daemon):
        return f"http://{listen}"
    return f"https://{server_host(listen)}:{listen.rpartition(':')[2]}"


def _token(cfg: Config, *, required: bool) -> Optional[str]:
    """The bearer token from ``daemon.token_file`` (None: not set). An unreadable file is an
    error when ``required`` (a change), else None: a read goes without it, and the daemon
    leaves out what needs it."""
    path = cfg.daemon.token_file
    if path is None:
        return None
    try:
        token = path.read_text().strip() or None
    except OSError as e:
        if not required:
            return None
        raise ConfigError(f"daemon.token_file {path}: cannot read: {e.strerror} (mutating "
                          "calls to the daemon need its bearer token)") from None
    if token is not None:
        # Whatever answers daemon.listen (not always our daemon) may quote it back in the
        # error we print; the daemon hides it likewise.
        hide_secret(token)
    return token


def call(cfg: Config, method: str, path: str, body: Optional[dict[str, Any]] = None,
         *, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
    """``method`` ``path`` (``/api/v1/...``) on the daemon: its JSON answer, or None when
    nothing listens at ``daemon.listen``. ``PrestagedError`` when the daemon refuses the call
    (bad input, a token, not found, a conflict); ``DaemonError`` (exit 69) when it fails it, does
    not answer within ``timeout`` seconds (default ``TIMEOUT``), or answers with something that
    is not a JSON object (a redirect included)."""
    url = base_url(cfg) + path
    try:
        tls, trusted = client_context(cfg) if speaks_tls(cfg.daemon) else (None, "")
    except CredentialError:
        # The CA to verify the daemon against cannot be used: that matters only if a daemon
        # answers (``status`` on a host whose daemon is stopped reads the state file).
        if _nothing_listens(url):
            log.debug("no daemon at %s (and its CA could not be loaded)", url)
            return None
        raise
    req = _request(cfg, url, method, body, in_clear=tls is None)
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if tls is not None:
        handlers.append(urllib.request.HTTPSHandler(context=tls))
    try:
        with urllib.request.build_opener(*handlers).open(
                req, timeout=TIMEOUT if timeout is None else timeout) as resp:
            payload = resp.read()
    except urllib.error.HTTPError as e:
        _raise(e.code, e.read(), url, f"{method} {path}")
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ConnectionRefusedError):
            log.debug("no daemon at %s: %s", url, reason)
            return None
        raise _failure(cfg, reason, trusted, f"{method} {path}") from None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise DaemonError(f"{base_url(cfg)} (daemon.listen) answered {method} {path}, but "
                             "not with JSON: is something else listening there? --state FILE "
                             "works on a state file instead") from None
    if not isinstance(doc, dict):
        # Every answer of the API is an object. A JSON null was None, "nothing listens": the
        # command went on with the state file while something answered at daemon.listen.
        raise DaemonError(f"the daemon at {cfg.daemon.listen} answered {method} {path} with "
                          f"{type(doc).__name__}, not a JSON object")
    return doc


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: the API never answers one, so it is another server's
    answer (``_raise``: "not as prestaged's API"). Followed to a port where nothing listens,
    it was taken for "no daemon", and the command worked on the state file instead."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> None:
        del req, fp, code, msg, headers, newurl  # urllib's signature: none of it is needed


def _request(cfg: Config, url: str, method: str, body: Optional[dict[str, Any]], *,
             in_clear: bool) -> urllib.request.Request:
    """The request of ``call``, with the bearer token when it can be read (reads send it too:
    runs and commands' output need it); ``ConfigError`` rather than the token ``in_clear``
    (plain HTTP) beyond loopback."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = _token(cfg, required=method != "GET")
    if token:
        if in_clear and not is_loopback(cfg.daemon.listen):
            raise ConfigError(f"daemon.listen {cfg.daemon.listen} is not loopback and neither "
                              "daemon.tls_cert nor daemon.tls_ca is set: not sending the bearer "
                              "token there in clear; set daemon.tls_ca (the CA of the daemon's "
                              "certificate) to talk https to it")
        req.add_header("Authorization", f"Bearer {token}")
    return req


def _failure(cfg: Config, e: object, trusted: str, asked: str) -> PrestagedError:
    """The error for a call that got no answer: never "no daemon" (see ``call``)."""
    where = f"the daemon at {base_url(cfg)} (daemon.listen)"
    if isinstance(e, ssl.SSLError):  # it is there, but not trusted or not speaking TLS
        return _tls_failure(where, e, cfg, trusted, asked)
    if isinstance(e, http.client.HTTPException) and not isinstance(e, ConnectionError):
        return DaemonError(f"{where} answered {asked}, but not with HTTP: is something else "
                           "listening there? --state FILE works on a state file instead")
    # A daemon serving https closes a connection that speaks HTTP in clear without a word.
    https = (" or serving https (daemon.tls_cert)" if isinstance(e, ConnectionError)
             and not speaks_tls(cfg.daemon) else "")
    return DaemonError(f"{where} did not answer {asked}: {_describe(e)}; is it overloaded or "
                       f"stuck{https}? --state FILE works on a state file instead")


_NAME_MISMATCH = {62, 64}
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""


def _tls_failure(where: str, e: ssl.SSLError, cfg: Config, trusted: str,
                 asked: str) -> PrestagedError:
    """The error for a TLS failure with the daemon: a certificate that does not verify is a
    ``CredentialError`` (exit 3) saying what to fix; any other, a ``DaemonError`` (exit 69)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = str(e.verify_message or e.reason).rstrip(".")
        if e.verify_code in _NAME_MISMATCH:
            fix = (f"daemon.tls_cert must name {server_host(cfg.daemon.listen)}, the host "
                   "daemon.listen is reached at")
        else:
            fix = "set daemon.tls_ca to the CA that issued daemon.tls_cert"
        return CredentialError(f"{where}: its certificate does not verify ({why}) against "
                               f"{trusted}; {fix}")
    return DaemonError(f"TLS with {where} failed {asked}: {e.reason or e}; does it serve https "
                       "(daemon.tls_cert)? --state FILE works on a state file instead")


def _describe(e: object) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text)


def _raise(status: int, payload: bytes, url: str, asked: str) -> None:
    code: object = None
    try:
        doc = json.loads(payload)
        message, code = doc["error"], doc.get("exit_code")
        code = code if isinstance(code, int) else None
        if not isinstance(message, str):  # {"error": null} was "daemon: None"
            raise TypeError(message)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        # Not the daemon's API (every refusal of it is {"error": ...}): another server holds
        # daemon.listen (9464 is also OpenTelemetry's Prometheus exporter's). Its 404 was
        # "not found" (exit 4, a catalog's code), its 401 advice about our token.
        raise DaemonError(f"{url.split('/api/', 1)[0]} (daemon.listen) answered {asked} with "
                          f"HTTP {status}, not as prestaged's API: is something else listening "
                          "there? --state FILE works on a state file instead") from None
    if status in (401, 403):
        raise ConfigError(f"daemon at {url} refused the call: {message} (set daemon.token_file "
                          "to the daemon's token file)")
    if status == 400:
        raise ConfigError(message)
    if status == 404:
        raise NotFoundError(message)
    if status == 409:
        raise ConflictError(message)
    raise error_for_exit(code if status >= 500 else None, f"daemon: {message}")
