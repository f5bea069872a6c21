"""The touch over HTTP(S): one ranged GET of a file's first bytes, classified.

``GET`` with ``Range: bytes=0-(n-1)``; at most ``n`` bytes of file data are read whatever the
status. 206 and 200 are warm (200 means the server ignored Range: the connection is closed after
``n`` bytes so the rest of the file is never transferred); 416 is an empty file; 404/410 missing;
401/403 denied. Redirects (a dCache door sending us to a pool) are followed here rather than by
aiohttp so that the connection to the redirect target is closed after the read (a dCache pool
mover lives as long as its connection) while the connection to the door stays in the pool.

This module does one attempt; retries, breakers and throttling live in ``prestaged.warm``.
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

import aiohttp
from yarl import URL

from prestaged import __version__

__all__ = ["Attempt", "Failure", "HttpToucher", "Result", "classify_status", "parse_retry_after"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ENCODED = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]*")
_CONTENT_RANGE_TOTAL = re.compile(r"/\s*(\d+)\s*$")
# Small error/redirect bodies are drained so the door connection can be reused; anything larger
# (or of unknown length) costs a closed connection instead of reading it.
_DRAIN_LIMIT = 1024


class Result(str, enum.Enum):
    """Outcome class of one file (persisted: values are stable strings)."""

    WARM = "warm"
    EMPTY = "empty"
    MISSING = "missing"
    DENIED = "denied"
    FAILED = "failed"
    SKIPPED_FRESH = "skipped_fresh"
    STAGING = "staging"

    def __str__(self) -> str:
        return self.value


class Failure(str, enum.Enum):
    """Why an attempt did not get an HTTP answer we can classify (drives retry and breakers)."""

    TIMEOUT = "timeout"
    RESET = "reset"  # connection dropped/reset mid-request
    UNREACHABLE = "unreachable"  # could not connect at all
    TLS = "tls"  # handshake or certificate failure: a credential/trust problem, not retried
    PROTOCOL = "protocol"  # malformed answer, bad redirect, bad URL: not retried

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Attempt:
    """What one try at one URL gave: an HTTP status, or a ``Failure`` and its text."""

    status: Optional[int] = None
    data: int = 0
    """Bytes of file data read (<= n)."""
    failure: Optional[Failure] = None
    error: str = ""
    retry_after: Optional[float] = None
    """Seconds the server asked us to wait (Retry-After), if any."""
    redirected: bool = False
    size: Optional[int] = None
    """File size when the answer tells it (Content-Range total, or a 200's Content-Length)."""

    @property
    def result(self) -> Optional[Result]:
        """Outcome class of a final answer; None for failures and retryable statuses."""
        if self.failure is not None or self.status is None:
            return None
        if self.status in (200, 206) and self.size == 0:
            return Result.EMPTY
        return classify_status(self.status)


def classify_status(status: int) -> Optional[Result]:
    """Map a final HTTP status to a ``Result``; None means retryable (5xx, 429, 408)."""
    if status in (200, 206):
        return Result.WARM
    if status == 416:
        return Result.EMPTY
    if status in (404, 410):
        return Result.MISSING
    if status in (401, 403):
        return Result.DENIED
    if status >= 500 or status in (408, 429):
        return None
    return Result.FAILED


def parse_retry_after(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """Parse a ``Retry-After`` header (seconds or HTTP-date) into seconds >= 0, or None."""
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


def _size(resp: aiohttp.ClientResponse) -> Optional[int]:
    """The file size an answer reveals: a 206's Content-Range total or a 200's length."""
    if resp.status == 206:
        match = _CONTENT_RANGE_TOTAL.search(resp.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    if resp.status == 200:
        return resp.content_length
    return None


def _tls_cause(exc: BaseException, *, handshake: bool = False) -> Optional[BaseException]:
    """The TLS error behind ``exc``, or None if it is not a TLS problem.

    After the handshake an EOF is just a dropped connection. During connection set-up
    (``handshake=True``) a TCP connection that the peer drops or resets is a TLS refusal: a
    refused or unroutable connection never gets that far, and servers that reject a client
    certificate often close without sending an alert.
    """
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError)):
            return cur if handshake else None
        if isinstance(cur, (ssl.SSLError, ssl.CertificateError)):
            return cur
        if isinstance(cur, aiohttp.ClientSSLError):
            return cur
        nxt = getattr(cur, "os_error", None) or cur.__cause__ or cur.__context__
        cur = nxt if isinstance(nxt, BaseException) else None
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


class HttpToucher:
    """Touches URLs over one pooled ``aiohttp.ClientSession`` (built in ``start()``).

    ``nbytes``: bytes read per file (default 4). ``timeout``: seconds for one attempt including
    redirects; ``connect_timeout``: seconds to connect + handshake. ``limit``/``limit_per_host``
    bound sockets overall and per host.
    """

    def __init__(
        self,
        ssl_context: Optional[ssl.SSLContext],
        *,
        nbytes: int = 4,
        limit: int = 32,
        limit_per_host: int = 32,
        timeout: float = 60.0,
        connect_timeout: float = 15.0,
        max_redirects: int = 5,
    ) -> None:
        self.nbytes = nbytes
        self.max_redirects = max_redirects
        self._ssl = ssl_context
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._headers = {
            "Range": f"bytes=0-{nbytes - 1}",
            "Accept-Encoding": "identity",
            "User-Agent": f"prestaged/{__version__}",
        }
        # Pool movers end when their connection does; newer dCache also honours the header.
        # (The door request sends the session's default headers: no per-request merge.)
        self._pool_headers = {"Connection": "close"}
        self._session: Optional[aiohttp.ClientSession] = None

    async def start(self) -> None:
        """Open the connection pool."""
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            ssl=self._ssl if self._ssl is not None else True,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            cookie_jar=aiohttp.DummyCookieJar(),  # storage sets none; filtering costs per request
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept",),
        )

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpToucher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def touch(self, url: str) -> Attempt:
        """One attempt at ``url``: follow redirects, read at most ``nbytes``, classify."""
        session = self._session
        if session is None:
            raise RuntimeError("HttpToucher.start() was not called")
        try:
            # A URL made only of characters legal in an encoded URL needs no requoting by yarl
            # (5% of the per-file CPU); anything else is quoted as usual.
            target = URL(url, encoded=_ENCODED.fullmatch(url) is not None)
        except (ValueError, TypeError) as e:
            return Attempt(failure=Failure.PROTOCOL, error=f"bad URL: {_describe(e)}")
        try:
            return await self._follow(session, target)
        except asyncio.TimeoutError:
            return Attempt(failure=Failure.TIMEOUT, error="timed out")
        except aiohttp.ClientConnectorError as e:
            tls = _tls_cause(e, handshake=True)
            if tls is not None:
                why = _describe(tls) if str(tls) else "connection closed during the TLS handshake"
                return Attempt(failure=Failure.TLS, error=f"TLS handshake failed: {why}")
            return Attempt(failure=Failure.UNREACHABLE, error=_describe(e))
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            tls = _tls_cause(e)
            if tls is not None:
                return Attempt(failure=Failure.TLS, error=_describe(tls))
            return Attempt(failure=Failure.RESET, error=_describe(e))
        except aiohttp.ClientResponseError as e:
            return Attempt(failure=Failure.PROTOCOL, error=_describe(e))
        except (aiohttp.InvalidURL, ValueError) as e:
            return Attempt(failure=Failure.PROTOCOL, error=f"bad URL: {_describe(e)}")

    async def _follow(self, session: aiohttp.ClientSession, target: URL) -> Attempt:
        for hop in range(self.max_redirects + 1):
            headers = None if hop == 0 else self._pool_headers
            async with session.get(target, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                if status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        return Attempt(status=status, failure=Failure.PROTOCOL,
                                       error=f"HTTP {status} redirect without Location")
                    await self._drain(resp)
                    target = resp.url.join(URL(location))
                    continue
                size = _size(resp)
                if size == 0:
                    # Nothing to read. XRootD 5.5 answers an empty file with 206, a 4-byte
                    # Content-Length and no body: do not wait for bytes that never come.
                    data = 0
                    resp.close()
                elif status in (200, 206):
                    data = await self._read_head(resp)
                else:
                    data = 0
                    await self._drain(resp)
                if hop > 0:
                    resp.close()
                return Attempt(
                    status=status,
                    data=data,
                    retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                    redirected=hop > 0,
                    error="" if status < 400 else f"HTTP {status} {resp.reason or ''}".strip(),
                    size=size,
                )
        return Attempt(failure=Failure.PROTOCOL, error=f"more than {self.max_redirects} redirects")

    async def _read_head(self, resp: aiohttp.ClientResponse) -> int:
        """Read at most ``nbytes`` of body; close the connection if more would follow."""
        length = resp.content_length
        if length is not None and length <= self.nbytes:
            return len(await resp.read())
        got = 0
        while got < self.nbytes:
            chunk = await resp.content.read(self.nbytes - got)
            if not chunk:
                break
            got += len(chunk)
        if not resp.content.at_eof():
            # The server ignored Range (or sent more than asked): drop the connection so the
            # rest of the file is never transferred.
            resp.close()
        return got

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        length = resp.content_length
        if length is not None and length <= _DRAIN_LIMIT:
            await resp.read()
        else:
            resp.close()
