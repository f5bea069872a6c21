"""Network helpers shared by every client in prestaged (storage touches and catalogs alike).

Stdlib only and importing nothing else from prestaged, so that any layer may use it: the
catalogs must not depend on ``prestaged.storage`` for a header parser.

* ``tls_cause``: the TLS failure behind an exception raised by a connection (aiohttp wraps the
  ``ssl`` error as ``os_error``/``__cause__``), or None when it is not a TLS problem;
* ``parse_retry_after``: a ``Retry-After`` header as seconds.
"""

from __future__ import annotations

import ssl
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

__all__ = ["parse_retry_after", "tls_cause"]

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
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
