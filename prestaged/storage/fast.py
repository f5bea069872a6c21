"""A lean keep-alive HTTP/1.1 path for the plain ranged GET (``HttpToucher``'s fast path).

aiohttp spends most of prestaged's per-file CPU building the request and wrapping the answer.
For the common case, one ``GET`` of a plain URL answered by a final status on a keep-alive
connection, this module writes pre-built request bytes on a pooled ``asyncio.Protocol``
connection and parses the answer with ``httptools`` (llhttp). It produces the same ``Attempt``
as the aiohttp path or hands the file back: ``FastPath.fetch`` returns an ``Attempt`` (final
answer, or a connection not made within ``connect_timeout``), a ``Redirect`` (which the caller
follows) or None (no complete, well-formed answer within aiohttp's limits: connection or TLS
failure, timeout, stale connection, parser error, a head past aiohttp's limits, no free
connection slot), after which the caller tries the URL once with aiohttp, so failures are
classified exactly as before.

A redirect's target (a dCache pool's one-time URL) is fetched the same way on a one-shot
connection (``FastPath.hop_route``): a new connection per request, ``Connection: close`` sent,
closed as soon as the answer is in, never pooled, since a dCache mover lives as long as its
connection. One-shot connections have their own slots (``limit`` overall, ``limit_per_host``
per endpoint), so a hop never closes an idle keep-alive connection to a door to make room.

A server decides how much it sends; the fast path bounds what it keeps. aiohttp refuses a
reason phrase or a header line over 8190 bytes and more than 128 header lines, so the same
answers are handed back to aiohttp here, which refuses them identically; a head still incomplete
after ``HEAD_LIMIT`` bytes (a header line without end, which httptools would buffer whole) is
handed back too. Answer bytes that follow the answer (a second response in the same write) are
never parsed as part of it, and cost the connection.

At most ``nbytes`` of file data are read; a 2xx body that would be longer (a server ignoring
``Range``) costs the connection. Non-2xx bodies up to 1 KiB are drained, longer ones close it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union, cast

import httptools
from yarl import URL

from prestaged.model import Attempt, Failure
from prestaged.net import bearer_error, parse_retry_after
from prestaged.storage.attempt import (
    CONTENT_RANGE_TOTAL,
    DENIED,
    DRAIN_LIMIT,
    LISTING_ERROR,
    REDIRECTS,
    is_listing,
    past_the_end,
    status_error,
)

__all__ = [
    "HEAD_LIMIT",
    "MAX_FIELD_SIZE",
    "MAX_HEADERS",
    "MAX_LINE_SIZE",
    "RESOLVE_TTL",
    "Answer",
    "Endpoint",
    "FastPath",
    "FastPathStats",
    "Redirect",
    "connect_timeout_text",
]

log = logging.getLogger(__name__)


class Redirect(NamedTuple):
    """A redirect answer: its status and ``Location`` (followed by the caller, with aiohttp)."""

    status: int
    location: str


Answer = Union[Attempt, Redirect, None]
"""What ``FastPath.fetch`` gives: a final ``Attempt``, a ``Redirect``, or None (fall back)."""

# aiohttp's client parser limits (``ClientSession``/``HttpResponseParser`` defaults, unchanged
# from aiohttp 3.8 to 3.14; tests/test_fast_path.py holds them to the installed aiohttp).
# aiohttp refuses an answer past any of them, so such answers are handed back to it.
MAX_LINE_SIZE = 8190
"""Longest reason phrase (aiohttp counts the status line after the status code), bytes."""
MAX_FIELD_SIZE = 8190
"""Longest header line, bytes (how aiohttp counts it: see ``_Conn.on_header``)."""
MAX_HEADERS = 128
"""Most header lines in one answer."""
HEAD_LIMIT = 64 * 1024
"""Head bytes (status line and headers) read before the head must be complete. httptools
buffers a header line until its end, so a line or a head without end would grow without bound
before any limit above could be checked; past this the answer goes to aiohttp (whose parser
checks as it reads). Real storage heads are well under 4 KiB."""
# aiohttp refuses an answer carrying this header (the old WebSocket handshake): so do we.
_REFUSED_HEADER = b"sec-websocket-key1"


def connect_timeout_text(seconds: float) -> str:
    """The error text of a connection not made (TCP connect and TLS handshake) in ``seconds``;
    the same on both paths."""
    return f"connect timed out after {seconds:g} s (TCP connect or TLS handshake)"

# Characters a path (and query) may hold for the fast path: a subset of what ``HttpToucher``
# sends without requoting, so the request line is the URL's as aiohttp would send it. No "%":
# yarl rewrites some escapes (%41 -> A, %2f -> %2F), so escaped URLs stay with aiohttp.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*")
_NETLOC = re.compile(r"([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Idle keep-alive connections are closed after this long (aiohttp's keepalive_timeout).
IDLE_TIMEOUT = 15.0
RESOLVE_TTL = 300.0
"""Seconds a host name's addresses are kept (aiohttp's ``ttl_dns_cache`` in ``HttpToucher``):
one-shot connections to a named pool would otherwise ask the resolver once per file."""
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# Sent on one-shot connections: the server may end the transfer (a dCache mover) with the
# answer rather than when it sees the connection close.
_CLOSE = b"Connection: close\r\n"
_MAX_ENDPOINTS = 4096
_WANTED = frozenset({b"content-length", b"content-range", b"retry-after", b"location",
                     b"www-authenticate"})
_CHALLENGE = b"www-authenticate"  # the one header kept whole when repeated (one per scheme)


@dataclass
class FastPathStats:
    """Counters of a ``FastPath``: ``answered`` files (final answer, redirect, or no connection
    within the connect timeout), ``fallbacks`` (handed back to aiohttp), kept-alive
    ``connections`` opened, ``reused`` requests on a pooled one; ``hops`` redirect targets
    answered on one-shot connections, ``hop_fallbacks`` handed back."""

    answered: int = 0
    fallbacks: int = 0
    connections: int = 0
    reused: int = 0
    hops: int = 0
    hop_fallbacks: int = 0


class _Slots:
    """Open connections of one kind (kept-alive or one-shot) against their overall ``limit``,
    and the fetches waiting for one to close or go idle."""

    __slots__ = ("limit", "open", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        """A connection went idle or a slot became free: let one waiting fetch look again."""
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        """Let every waiting fetch look again (the pool is closing)."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


class Endpoint:
    """One ``scheme://host:port``: where to connect, the request tail, the idle connections
    (never any if ``one_shot``), the slots its connections count against."""

    __slots__ = ("addresses", "head", "host", "idle", "numeric", "one_shot", "open", "port",
                 "resolved_until", "server_hostname", "slots", "ssl", "tail")

    def __init__(self, host: str, port: int, ssl_context: Optional[ssl.SSLContext],
                 tail: bytes, slots: _Slots, *, one_shot: bool) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl_context
        self.server_hostname = host if ssl_context is not None else None
        self.tail = tail
        self.head = tail[:-2]  # the tail without the blank line: more header lines may follow
        self.slots = slots
        self.one_shot = one_shot
        self.idle: list[_Conn] = []
        self.open = 0
        self.numeric = _IPV4.fullmatch(host) is not None
        self.addresses: list[tuple[int, str]] = []  # (family, address) of a host name
        self.resolved_until = 0.0


def _endpoint(endpoint: str, ssl_context: Optional[ssl.SSLContext], headers: bytes,
              slots: _Slots, *, one_shot: bool) -> Optional[Endpoint]:
    """The ``Endpoint`` of ``scheme://netloc``, or None if the fast path does not take it."""
    scheme, _, netloc = endpoint.partition("://")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS or (scheme == "https" and ssl_context is None):
        return None
    match = _NETLOC.fullmatch(netloc)
    if match is None:  # userinfo, IPv6 literal, trailing dot, non-ASCII: aiohttp's business
        return None
    port = int(match.group(2)) if match.group(2) else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        return None
    host_header = URL(endpoint + "/", encoded=True).host_port_subcomponent
    if host_header is None:
        return None
    tail = b" HTTP/1.1\r\nHost: " + host_header.encode("ascii") + b"\r\n" + headers + b"\r\n"
    return Endpoint(match.group(1), port, ssl_context if scheme == "https" else None, tail,
                     slots, one_shot=one_shot)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time, its answer parsed by httptools."""

    def __init__(self, pool: FastPath, ep: Endpoint) -> None:
        self.pool = pool
        self.ep = ep
        # The parser calls back into this object: a reference cycle, broken (with the one
        # through the transport) once the connection is lost, see ``connection_lost``.
        self.parser: Optional[httptools.HttpResponseParser] = httptools.HttpResponseParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.retired = False  # slot given back (closing or lost)
        self.idle_since = 0.0
        self.waiter: Optional[asyncio.Future[Answer]] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self._reset_message()

    def _reset_message(self) -> None:
        self.status = 0  # set once the head is complete
        self.reason: list[bytes] = []
        self.reason_size = 0
        self.fields = 0  # header lines seen
        self.last_name = 0  # length of the last header name
        self.head_size = 0  # bytes received while the head was incomplete
        self.headers: dict[bytes, bytes] = {}
        self.mode = ""  # "read" (2xx body), "drain" (kept), "done" (answer ready)
        self.length: Optional[int] = None
        self.size: Optional[int] = None  # file size a 2xx revealed (set by _success)
        self.got = 0
        self.first = b""  # the first bytes of a 200's body (a directory's listing?)
        self.complete = False
        self.keep = False
        self.drop = False  # close even if the message is complete (a long body not read)
        self.answer: Answer = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._retire()
        if self in self.ep.idle:
            self.ep.idle.remove(self)
        self._deliver(None)
        # Break the cycles (parser -> self -> parser, transport -> self -> transport), so that
        # a closed connection and its TLS objects (~20 KiB of OpenSSL buffers) go at once, not
        # at the next full garbage collection: with a one-shot connection per redirected file
        # those piled up by the thousand (+80 MiB at 50,000 files, growing with the run).
        self.parser = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if self.waiter is None or parser is None:  # nothing asked: unsolicited bytes, or
            self.close()                            # after we gave up
            return
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._give_up(f"malformed answer or past aiohttp's limits: {e!r}")
        else:
            if not self.status:  # all of data was head, and the head is not over yet
                self.head_size += len(data)
                if self.head_size > HEAD_LIMIT:
                    self._give_up(f"head longer than {HEAD_LIMIT} bytes")
        if self.mode == "done" or (self.mode == "read" and self.got >= self.pool.nbytes):
            self._finish()

    def _give_up(self, why: str) -> None:
        """Stop reading this connection: hand the file back to aiohttp, unless a complete answer
        came before the trouble (bytes after an answer only cost the connection)."""
        log.debug("fast path: %s:%s: %s", self.ep.host, self.ep.port, why)
        if self.mode != "done":
            self.answer = None
        self.keep = False
        self.mode = "done"

    # -- httptools callbacks ----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        # Called per piece as the reason arrives, so the limit holds before it is buffered.
        self.reason_size += len(status)
        if self.reason_size > MAX_LINE_SIZE:
            raise ValueError(f"reason phrase over {MAX_LINE_SIZE} bytes")
        self.reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        if self.fields > MAX_HEADERS:
            raise ValueError(f"more than {MAX_HEADERS} header lines")
        # What aiohttp adds up against MAX_FIELD_SIZE depends on the line's place (with the
        # first line it counts name and value, later only the value, and a name together with
        # the name before it). Counting the name with the longer of the two refuses all it
        # refuses; the few lines it would still accept it then gets to judge itself. (The sum of
        # all three is a cheaper bound that ordinary lines never reach: this runs per header.)
        n, v = len(name), len(value)
        if n + v + self.last_name > MAX_FIELD_SIZE and n + max(v, self.last_name) > MAX_FIELD_SIZE:
            raise ValueError(f"header line over {MAX_FIELD_SIZE} bytes")
        self.last_name = n
        key = name.lower()
        if key in _WANTED:
            if key not in self.headers:
                self.headers[key] = value
            elif key == _CHALLENGE:  # as aiohttp's getall(), joined as HTTP combines fields
                self.headers[key] += b", " + value
        elif key == _REFUSED_HEADER:
            raise ValueError("Sec-WebSocket-Key1 header")

    def on_headers_complete(self) -> None:
        if self.complete:
            # A second answer to one request, in the same read: aiohttp keeps the first and
            # never reads on; so do we (the error stops the parser, the connection is closed).
            # Checked here, once per answer, rather than in a per-message callback.
            raise ValueError("bytes after the answer")
        assert self.parser is not None  # called by the parser, from data_received
        self.status = status = self.parser.get_status_code()
        length = self.headers.get(b"content-length")
        self.length = int(length) if length is not None else None
        if status < 200:
            raise ValueError(f"interim status {status}")  # becomes a parser error: fall back
        if status in REDIRECTS:
            self._redirect()
        elif status in (200, 206):
            self._success()
        else:
            self._final(data=0, size=None)
            self._drain_or_drop()

    def on_body(self, body: bytes) -> None:
        if self.mode == "read":
            take = min(len(body), self.pool.nbytes - self.got)
            if self.status == 200 and take:  # kept to tell a listing (is_listing)
                self.first += body[:take]
            self.got += take

    def on_message_complete(self) -> None:
        self.complete = True
        assert self.parser is not None  # called by the parser, from data_received
        self.keep = self.parser.should_keep_alive()
        if self.mode == "read":
            self._final(data=self.got, size=self.size)
        self.mode = "done"

    # -- the answer -------------------------------------------------------------------------

    def _header(self, key: bytes) -> Optional[str]:
        value = self.headers.get(key)
        return None if value is None else value.decode("utf-8", "surrogateescape")

    def _size(self) -> Optional[int]:
        if self.status != 206:
            return self.length
        value = self.headers.get(b"content-range", b"")
        total = value.rpartition(b"/")[2].strip(b" \t")
        if total.isdigit() and len(total) < 20:  # the common "bytes 0-3/1234", without the regex
            return int(total)
        match = CONTENT_RANGE_TOTAL.search(value.decode("utf-8", "surrogateescape"))
        return int(match.group(1)) if match else None

    def _redirect(self) -> None:
        location = self._header(b"location")
        if not location:
            raise ValueError("redirect without Location")  # aiohttp says so: fall back
        self.answer = Redirect(self.status, location)
        self._drain_or_drop()

    def _drain_or_drop(self) -> None:
        """A body we do not need: drain it up to 1 KiB, else close the connection (as aiohttp
        does, even when the body has already arrived)."""
        if self.length is not None and self.length <= DRAIN_LIMIT:
            self.mode = "drain"
        else:
            self.mode = "done"
            self.drop = True

    def _success(self) -> None:
        self.size = self._size()
        if self.size == 0 or (self.status == 206 and past_the_end(
                self.headers.get(b"content-range", b"").decode("latin-1"))):
            # Nothing to read: XRootD 5.5 answers an empty file, or a range past the end of a
            # short one, with a 206, the asked range's Content-Length and no body. Do not wait
            # for bytes that never come (nor reuse the connection).
            self._final(data=0, size=self.size)
            self.mode = "done"
            self.drop = True
        else:
            self.mode = "read"

    def _final(self, *, data: int, size: Optional[int]) -> None:
        status = self.status
        if status == 200 and is_listing(self.first):  # a directory: nothing warmed
            self.answer = Attempt(status=status, data=data, failure=Failure.PROTOCOL,
                                  error=LISTING_ERROR, size=size)
            return
        error = auth = ""
        if status >= 400:
            reason = b"".join(self.reason).decode("utf-8", "surrogateescape")
            if status in DENIED:
                auth = bearer_error(self._header(_CHALLENGE))
            error = status_error(status, reason, auth)
        self.answer = Attempt(
            status=status,
            data=data,
            retry_after=parse_retry_after(self._header(b"retry-after")),
            error=error,
            size=size,
            auth_error=auth,
        )

    def _finish(self) -> None:
        """The answer is known: give the connection back (or close it), wake the caller."""
        if self.mode == "read":  # nbytes read and more would follow: never read the rest
            self._final(data=self.got, size=self.size)
        answer = self.answer
        if (self.complete and self.keep and not self.drop and not self.retired
                and not self.ep.one_shot):
            self.waiter_done()
            self.pool.release(self)
        else:
            self.waiter_done()
            self.close()
        self._deliver(answer)

    def waiter_done(self) -> None:
        """Stop the request's timer (the answer is in, or the request was given up)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _deliver(self, answer: Answer) -> None:
        waiter, self.waiter = self.waiter, None
        self.waiter_done()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _timed_out(self) -> None:
        self.timer = None
        self.close()
        self._deliver(None)

    # -- lifecycle --------------------------------------------------------------------------

    def send(self, request: bytes, timeout: float) -> asyncio.Future[Answer]:
        """Write ``request``; the future gets the answer (None: fall back) within ``timeout``."""
        assert self.transport is not None
        loop = self.pool.loop
        self._reset_message()
        self.waiter = waiter = loop.create_future()
        self.timer = loop.call_later(timeout, self._timed_out)
        self.transport.write(request)
        return waiter

    def abandon(self) -> None:
        """The caller stopped waiting (cancelled): close, since the answer may still come."""
        self.close()
        self._deliver(None)

    def close(self) -> None:
        """Close the connection and give its slot back."""
        self._retire()
        if self.transport is not None:
            self.transport.close()

    def _retire(self) -> None:
        if not self.retired:
            self.retired = True
            self.ep.open -= 1
            self.ep.slots.open -= 1
            self.ep.slots.wake()


class FastPath:
    """Pooled keep-alive HTTP/1.1 connections for plain ranged GETs, and one-shot connections
    for redirect targets (see the module docstring).

    ``ssl_context`` is used for every https endpoint (None: https is left to aiohttp);
    ``nbytes``: file bytes read per file; ``headers``: the request's header lines (CRLF-ended
    bytes, Host excluded); ``limit``/``limit_per_host``: open connections overall and per
    endpoint, for kept-alive and one-shot connections each; ``connect_timeout``: seconds to
    connect and finish the TLS handshake. Build it inside the running loop
    (``HttpToucher.start``).
    """

    def __init__(self, ssl_context: Optional[ssl.SSLContext], *, nbytes: int, headers: bytes,
                 limit: int, limit_per_host: int, connect_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.nbytes = nbytes
        self.stats = FastPathStats()
        self._ssl = ssl_context
        self._headers = headers
        self._limit_per_host = limit_per_host
        self._connect_timeout = connect_timeout
        self._kept = _Slots(limit)
        self._one_shot = _Slots(limit)
        self._endpoints: dict[str, Optional[Endpoint]] = {}
        self._hop_endpoints: dict[str, Optional[Endpoint]] = {}
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._closed = False

    @property
    def open(self) -> int:
        """Connections open now (kept-alive and one-shot)."""
        return self._kept.open + self._one_shot.open

    def route(self, url: str,
              auth: Optional[bytes] = None) -> Optional[tuple[Endpoint, bytes]]:
        """The endpoint and request bytes for ``url`` on a kept-alive connection, or None if it
        is not a plain URL. ``auth`` (a bearer token's request) is the ``Authorization`` line
        and the blank line that ends the head: ``b"Authorization: Bearer ...\\r\\n\\r\\n"``."""
        return self._route(url, self._endpoints, False, auth)  # positional: runs per file

    def hop_route(self, url: str) -> Optional[tuple[Endpoint, bytes]]:
        """The endpoint and request bytes for ``url`` (a redirect target) on a one-shot
        connection, or None if it is not a plain URL."""
        return self._route(url, self._hop_endpoints, True, None)

    def _route(self, url: str, endpoints: dict[str, Optional[Endpoint]], one_shot: bool,
               auth: Optional[bytes]) -> Optional[tuple[Endpoint, bytes]]:
        start = url.find("://")
        end = url.find("/", start + 3) if start > 0 else -1
        if end < 0:
            return None
        key = url[:end]
        try:
            ep = endpoints[key]
        except KeyError:
            if one_shot:
                ep = _endpoint(key, self._ssl, self._headers + _CLOSE, self._one_shot,
                               one_shot=True)
            else:
                ep = _endpoint(key, self._ssl, self._headers, self._kept, one_shot=False)
            if len(endpoints) < _MAX_ENDPOINTS:
                endpoints[key] = ep
        if ep is None:
            return None
        path = url[end:]
        if _PLAIN_PATH.fullmatch(path) is None:
            return None
        if auth is None:
            return ep, b"GET " + path.encode("ascii") + ep.tail
        return ep, b"GET " + path.encode("ascii") + ep.head + auth

    async def fetch(self, ep: Endpoint, request: bytes, timeout: float) -> Answer:
        """Send ``request`` to ``ep`` on a pooled or new connection (always a new one, closed
        after the answer, for a ``hop_route``); see the module docstring.

        ``timeout`` (seconds) covers waiting for a connection, connecting and the answer.
        """
        conn = self._take(ep)
        if conn is None:
            deadline = self.loop.time() + timeout
            got = await self._acquire(ep, deadline)
            if isinstance(got, Attempt):  # no connection within connect_timeout
                self._count(ep, got)
                return got
            if got is None:
                self._count(ep, None)
                return None
            conn = got
            timeout = deadline - self.loop.time()
        else:
            self.stats.reused += 1
        try:
            answer = await conn.send(request, max(timeout, 0.0))
        except asyncio.CancelledError:
            conn.abandon()
            raise
        self._count(ep, answer)
        return answer

    def _count(self, ep: Endpoint, answer: Answer) -> None:
        stats = self.stats
        if ep.one_shot:
            if answer is None:
                stats.hop_fallbacks += 1
            else:
                stats.hops += 1
        elif answer is None:
            stats.fallbacks += 1
        else:
            stats.answered += 1

    async def _acquire(self, ep: Endpoint, deadline: float) -> Union[_Conn, Attempt, None]:
        """A new connection to ``ep``, or an idle one freed while we wait for a slot (see
        ``_connect`` for the Attempt)."""
        waiters = ep.slots.waiters
        while not self._closed:
            if self._free_slot(ep):
                timeout = min(deadline - self.loop.time(), self._connect_timeout)
                return await self._connect(ep, timeout)
            waiter: asyncio.Future[None] = self.loop.create_future()
            waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - self.loop.time())
            except asyncio.TimeoutError:
                return None
            finally:
                if waiter in waiters:
                    waiters.remove(waiter)
            conn = self._take(ep)
            if conn is not None:
                self.stats.reused += 1
                return conn
        return None

    def _take(self, ep: Endpoint) -> Optional[_Conn]:
        idle = ep.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing() and not conn.retired:
                return conn
            conn.close()
        return None

    async def _connect(self, ep: Endpoint, timeout: float) -> Union[_Conn, Attempt, None]:
        """A new connection, or None (fall back), or the failure of a connection that took
        longer than ``connect_timeout``: an endpoint that accepts TCP but never finishes the TLS
        handshake would otherwise stall each file twice, here and again in aiohttp."""
        if timeout <= 0:
            return None
        conn = _Conn(self, ep)
        ep.open += 1
        ep.slots.open += 1
        try:
            await asyncio.wait_for(self._open(conn, ep), timeout)
        except asyncio.TimeoutError:
            conn.close()
            if timeout < self._connect_timeout:  # the attempt's own limit: the caller says so
                return None
            log.debug("fast path: no connection to %s:%s within %s s", ep.host, ep.port,
                      timeout)
            return Attempt(failure=Failure.UNREACHABLE,
                           error=connect_timeout_text(self._connect_timeout))
        except (OSError, ssl.SSLError, ValueError) as e:
            log.debug("fast path: connecting to %s:%s failed: %s", ep.host, ep.port, e)
            conn.close()
            return None
        except BaseException:  # cancelled: give the slot back (and any socket made meanwhile)
            conn.close()
            raise
        if not ep.one_shot:
            self.stats.connections += 1
        if self.closed:  # close() ran while we connected
            conn.close()
            return None
        return conn

    async def _open(self, conn: _Conn, ep: Endpoint) -> None:
        """Connect ``conn`` to ``ep`` and finish the TLS handshake: to a numeric host directly,
        else to the name's addresses (resolved at most every ``RESOLVE_TTL`` s) in turn."""
        def factory() -> _Conn:
            return conn

        if ep.numeric:
            await self.loop.create_connection(factory, ep.host, ep.port, ssl=ep.ssl,
                                              server_hostname=ep.server_hostname)
            return
        error: Optional[OSError] = None
        for family, address in await self._addresses(ep):
            try:
                await self.loop.create_connection(factory, address, ep.port, family=family,
                                                  ssl=ep.ssl, server_hostname=ep.server_hostname)
                return
            except OSError as e:  # refused, unreachable, TLS: the next address, as aiohttp does
                error = e
        raise error or OSError(f"no address for {ep.host}")

    async def _addresses(self, ep: Endpoint) -> list[tuple[int, str]]:
        """The (family, address) pairs of ``ep``'s host name, from the cache or the resolver."""
        now = self.loop.time()
        if ep.addresses and now < ep.resolved_until:
            return ep.addresses
        infos = await self.loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
        found: list[tuple[int, str]] = []
        for family, _, _, _, sockaddr in infos:
            pair = (int(family), str(sockaddr[0]))
            if pair not in found:
                found.append(pair)
        ep.addresses, ep.resolved_until = found, now + RESOLVE_TTL
        return found

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (no new connections then)."""
        return self._closed

    def _free_slot(self, ep: Endpoint) -> bool:
        """Whether one more connection to ``ep`` fits the limits (closing an idle kept-alive
        one if need be)."""
        if ep.open >= self._limit_per_host:
            return False
        if ep.slots.open < ep.slots.limit:
            return True
        if ep.one_shot:
            return False
        for other in self._endpoints.values():
            if other is not None and other.idle:
                other.idle.pop(0).close()
                return True
        return False

    def release(self, conn: _Conn) -> None:
        """Put a connection whose answer was complete back in its endpoint's idle list."""
        if self._closed:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        conn.ep.idle.append(conn)
        self._kept.wake()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(IDLE_TIMEOUT, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for ``IDLE_TIMEOUT`` s; look again while any are idle."""
        self._sweeper = None
        cutoff = self.loop.time() - IDLE_TIMEOUT
        waiting = False
        for ep in self._endpoints.values():
            if ep is None:
                continue
            while ep.idle and ep.idle[0].idle_since <= cutoff:
                ep.idle.pop(0).close()
            waiting = waiting or bool(ep.idle)
        if waiting and not self._closed:
            self._sweeper = self.loop.call_later(IDLE_TIMEOUT, self._sweep)

    def close(self) -> None:
        """Close every idle connection; connections in use close when their answer is in."""
        self._closed = True
        self._kept.wake_all()
        self._one_shot.wake_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for ep in self._endpoints.values():
            while ep is not None and ep.idle:
                ep.idle.pop().close()
