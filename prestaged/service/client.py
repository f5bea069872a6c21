"""The CLI's client of the daemon's HTTP API (``daemon.listen``), standard library only.

``call`` returns None only when nothing listens there (connection refused: the command then
works on the state file instead), the JSON answer on success, and raises the ``PrestagedError``
matching an error answer (400 -> ``ConfigError``, 404 -> ``NotFoundError``, 409 ->
``ConflictError``), with the daemon's one-line message. A daemon that is slow, or anything else
that goes wrong on the way, is a ``DaemonError`` (exit 69) naming the daemon and ``--state``:
never taken for "no daemon", which would send a hold or cancel to a different database than
the one the daemon uses. Every call sends the bearer token from ``daemon.token_file`` when set
(a read goes without it when the file cannot be read).
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from typing import Any, Optional

from prestaged.config import Config
from prestaged.errors import (
    ConfigError,
    ConflictError,
    DaemonError,
    NotFoundError,
    error_for_exit,
)

__all__ = ["base_url", "call"]

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds for one API call (the daemon answers from memory or one small SQLite read)."""


def base_url(cfg: Config) -> str:
    """``http://<daemon.listen>``."""
    return f"http://{cfg.daemon.listen}"


def _token(cfg: Config, *, required: bool) -> Optional[str]:
    """The bearer token from ``daemon.token_file`` (None: not set). An unreadable file is an
    error when ``required`` (a change), else None: a read goes without it, and the daemon
    leaves out what needs it."""
    path = cfg.daemon.token_file
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except OSError as e:
        if not required:
            return None
        raise ConfigError(f"daemon.token_file {path}: cannot read: {e.strerror} (mutating "
                          "calls to the daemon need its bearer token)") from None


def call(cfg: Config, method: str, path: str, body: Optional[dict[str, Any]] = None,
         *, timeout: Optional[float] = None) -> Optional[Any]:
    """``method`` ``path`` (``/api/v1/...``) on the daemon: its JSON answer, or None when
    nothing listens at ``daemon.listen``. ``PrestagedError`` when the daemon refuses the call
    (bad input, a token, not found, a conflict); ``DaemonError`` (exit 69) when it fails it, does
    not answer within ``timeout`` seconds (default ``TIMEOUT``), or answers with something that
    is not JSON."""
    url = base_url(cfg) + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    # Reads send the token too when it can be read: runs and commands' output need it.
    token = _token(cfg, required=method != "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT if timeout is None else timeout) as resp:
            payload = resp.read()
    except urllib.error.HTTPError as e:
        _raise(e.code, e.read(), url, f"{method} {path}")
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ConnectionRefusedError):
            log.debug("no daemon at %s: %s", url, reason)
            return None
        raise DaemonError(f"the daemon at {base_url(cfg)} (daemon.listen) did not answer "
                             f"{method} {path}: {_describe(reason)}; is it overloaded or "
                             "stuck? --state FILE works on a state file instead") from None
    try:
        return json.loads(payload)
    except ValueError:
        raise DaemonError(f"{base_url(cfg)} (daemon.listen) answered {method} {path}, but "
                             "not with JSON: is something else listening there? --state FILE "
                             "works on a state file instead") from None


def _describe(e: object) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text)


def _raise(status: int, payload: bytes, url: str, asked: str) -> None:
    code: object = None
    try:
        doc = json.loads(payload)
        message, code = str(doc["error"]), doc.get("exit_code")
        code = code if isinstance(code, int) else None
    except (ValueError, KeyError, TypeError, AttributeError):
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
