"""The CLI's client of the daemon's HTTP API (``daemon.listen``), standard library only.

``call`` returns None when no daemon answers there (so the command works on the state file
instead), the JSON answer on success, and raises the ``PrestagedError`` matching an error answer
(400 -> ``ConfigError``, 404 -> ``CatalogError``, 409 -> ``StateError``), with the daemon's
one-line message. Mutating calls send the bearer token from ``daemon.token_file`` when set.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any, Optional

from prestaged.config import Config
from prestaged.errors import CatalogError, ConfigError, PrestagedError, StateError

__all__ = ["base_url", "call"]

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds for one API call (the daemon answers from memory or one small SQLite read)."""


def base_url(cfg: Config) -> str:
    """``http://<daemon.listen>``."""
    return f"http://{cfg.daemon.listen}"


def _token(cfg: Config) -> Optional[str]:
    path = cfg.daemon.token_file
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except OSError as e:
        raise ConfigError(f"daemon.token_file {path}: cannot read: {e.strerror} (mutating "
                          "calls to the daemon need its bearer token)") from None


def call(cfg: Config, method: str, path: str, body: Optional[dict[str, Any]] = None,
         *, probe_timeout: float = 2.0) -> Optional[Any]:
    """``method`` ``path`` (``/api/v1/...``) on the daemon; None when nothing (or not a
    prestaged daemon) answers within ``probe_timeout`` seconds."""
    url = base_url(cfg) + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if method != "GET":
        token = _token(cfg)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=probe_timeout if method == "GET"
                                    else TIMEOUT) as resp:
            payload = resp.read()
    except urllib.error.HTTPError as e:
        _raise(e.code, e.read(), url)
    except (OSError, ValueError) as e:
        log.debug("no daemon at %s: %s", url, e)
        return None
    try:
        return json.loads(payload)
    except ValueError:
        log.debug("%s answered, but not with JSON: not a prestaged daemon", url)
        return None


def _raise(status: int, payload: bytes, url: str) -> None:
    try:
        message = str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {status} from {url}"
    if status in (401, 403):
        raise ConfigError(f"daemon at {url} refused the call: {message} (set daemon.token_file "
                          "to the daemon's token file)")
    if status == 400:
        raise ConfigError(message)
    if status == 404:
        raise CatalogError(message)
    if status == 409:
        raise StateError(message)
    raise PrestagedError(f"daemon: {message}")
