"""Network helpers shared by every client in prestaged (storage touches and catalogs alike).

Stdlib only and importing nothing else from prestaged, so that any layer may use it: the
catalogs must not depend on ``prestaged.storage`` for a header parser.

* ``tls_cause``: the TLS failure behind an exception raised by a connection (aiohttp wraps the
  ``ssl`` error as ``os_error``/``__cause__``), or None when it is not a TLS problem;
* ``parse_retry_after``: a ``Retry-After`` header as seconds;
* ``bearer_error``: what a ``WWW-Authenticate: Bearer`` challenge says went wrong with our
  token (RFC 6750 ``error`` and ``error_description``), fit to quote in a message;
* ``client_ssl_context``: the client TLS context every connection of ours starts from.
"""

from __future__ import annotations

import re
import ssl
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

__all__ = ["BEARER_ERROR_MAX", "bearer_error", "client_ssl_context", "parse_retry_after",
           "tls_cause"]

# ssl.VERIFY_X509_PARTIAL_CHAIN is named from 3.10 on; no 3.9 context sets it.
_NOT_OPENSSL_DEFAULT = ssl.VERIFY_X509_STRICT | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)


def client_ssl_context(capath: Optional[str] = None,
                       cafile: Optional[str] = None) -> ssl.SSLContext:
    """``ssl.create_default_context(capath=capath, cafile=cafile)`` (the system's CAs when
    neither is given) that verifies servers as OpenSSL does by default, on every Python, as
    curl, gfal2/davix and XRootD do. Python 3.13 added
    ``VERIFY_X509_STRICT`` and ``VERIFY_X509_PARTIAL_CHAIN`` to that context: strict refuses
    certificates every grid client accepts (a CA whose basicConstraints is not critical, a
    host certificate without an authority key identifier), so a storage that the same user
    reaches with 3.9 would be unreachable with 3.13; partial chains would make any
    intermediate in the CA directory an anchor on 3.13 only."""
    ctx = ssl.create_default_context(capath=capath, cafile=cafile)
    ctx.verify_flags &= ~_NOT_OPENSSL_DEFAULT
    return ctx

BEARER_ERROR_MAX = 160
"""Characters of a server's bearer error kept (``bearer_error``)."""
# A challenge is read in at most this many characters: a server decides how long its headers
# are (aiohttp accepts 128 lines of 8 KiB), we decide how much of them we look at.
_CHALLENGE_SCAN = 4096
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Something shaped like a JWT (or a long base64url run, as a signature is): a server that echoes
# the token back in its description must not make us print it.
_TOKENISH = (r"[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}(?:\.[A-Za-z0-9_-]*)?"
             r"|[A-Za-z0-9_+/=-]{40,}")

# Ways a TLS connection ends without an alert: not a certificate problem once the handshake
# is over (the peer just went away), but a refusal while it is still going on.
_SILENT_CLOSE = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError)


def tls_cause(exc: BaseException, *, handshake: bool = False) -> Optional[BaseException]:
    """The TLS error behind ``exc`` (a certificate refused or not trusted), or None.

    Follows ``os_error`` (aiohttp's wrapped error), ``__cause__`` and ``__context__`` until an
    ``ssl.SSLError``/``ssl.CertificateError`` is found; aiohttp's ``ClientConnectorSSLError``
    and ``ClientConnectorCertificateError`` are such subclasses themselves.

    A connection closed or reset without an alert stops the walk: after the handshake
    (``handshake=False``, the default) it is a dropped connection and gives None, to be retried
    like any reset. While connecting (``handshake=True``) it is returned as the TLS refusal:
    a refused or unroutable connection never gets that far, and servers that reject a client
    certificate often close without sending an alert.
    """
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:  # ``seen``: chains can be cyclic
        seen.add(id(cur))
        if isinstance(cur, _SILENT_CLOSE):
            return cur if handshake else None
        if isinstance(cur, (ssl.SSLError, ssl.CertificateError)):
            return cur
        nxt = getattr(cur, "os_error", None) or cur.__cause__ or cur.__context__
        cur = nxt if isinstance(nxt, BaseException) else None
    return None


def parse_retry_after(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """Parse a ``Retry-After`` header (seconds or HTTP-date) into seconds >= 0, or None.

    ``now`` (default: the current UTC time) is what an HTTP-date is measured from; a date in
    the past gives 0. None for a missing or unparseable header.
    """
    if not value:
        return None
    text = value.strip()
    if text.isdigit():  # "²" and other scripts' digits are digits too, but no number
        return float(text) if text.isascii() else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _auth_token(text: str, i: int) -> tuple[str, int]:
    """The RFC 9110 token at ``text[i:]`` (empty if none) and the index after it."""
    j = i
    while j < len(text) and text[j] in _TOKEN_CHARS:
        j += 1
    return text[i:j], j


def _skip(text: str, i: int, chars: str = " \t") -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The quoted-string starting at ``text[i]`` (a ``"``), unescaped; unterminated: to the end."""
    out: list[str] = []
    i += 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\" and i + 1 < len(text):
            i += 1
            ch = text[i]
        out.append(ch)
        i += 1
    return "".join(out), i


def _bearer_params(text: str) -> Optional[dict[str, str]]:
    """The auth-params of the first ``Bearer`` challenge in ``text`` (a ``WWW-Authenticate``
    value, several challenges joined by commas), or None when there is no such challenge."""
    params: Optional[dict[str, str]] = None
    i = 0
    while i < len(text):
        i = _skip(text, i, " \t,")
        name, j = _auth_token(text, i)
        if not name:
            i += 1  # not a token character: skip it (a malformed header is no reason to fail)
            continue
        k = _skip(text, j)
        if k < len(text) and text[k] == "=":  # an auth-param of the current challenge
            k = _skip(text, k + 1)
            if k < len(text) and text[k] == '"':
                value, i = _quoted(text, k)
            else:
                value, i = _auth_token(text, k)
                i = max(i, k + 1) if not value else i
            if params is not None:
                params.setdefault(name.lower(), value)
            continue
        # an auth-scheme: a new challenge begins
        if params is not None:
            return params
        if name.lower() == "bearer":
            params = {}
        i = j
    return params


def bearer_error(value: Optional[str]) -> str:
    """What a ``WWW-Authenticate`` value's ``Bearer`` challenge says (RFC 6750):
    ``invalid_token: The token expired`` (``error``, then ``error_description``), either alone,
    or empty when there is no Bearer challenge or it names no error.

    Safe to quote: only the first 4 KiB of the header are read, control and unprintable
    characters are dropped, whitespace folded, anything shaped like a token replaced by
    ``[redacted]``, and the result cut to ``BEARER_ERROR_MAX`` characters.
    """
    if not value:
        return ""
    params = _bearer_params(value[:_CHALLENGE_SCAN])
    if not params:
        return ""
    parts = [params.get("error", ""), params.get("error_description", "")]
    text = ": ".join(p for p in parts if p)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    # (re caches the compiled pattern: compiled on the first challenge, not at import, which
    # every run pays and few need)
    text = re.sub(_TOKENISH, "[redacted]", " ".join(text.split()))
    if len(text) > BEARER_ERROR_MAX:
        text = text[: BEARER_ERROR_MAX - 1] + "\u2026"
    return text
