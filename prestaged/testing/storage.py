"""A dCache-like HTTPS storage emulator for tests, benchmarks and ``prestaged demo``.

``StorageServer`` serves GET/HEAD over TLS on 127.0.0.1 with byte ranges, an optional
door -> pool redirect (``302`` to ``?dcache-http-uuid=<uuid4>`` like a dCache WebDAV door), and
fault injection per path (``Status``, ``Delay``, ``Reset``, ``IgnoreRange``, and the hostile
answers no well-behaved server library would send: ``Raw`` bytes, an endless ``Flood``). Every
request is
recorded in ``stats`` (requests, body bytes counted as they are written, Range headers, methods,
the action applied and when), and connections are counted per site (``door``/``pool``).

``ThreadedStorageServer`` runs the same server on its own event loop in a thread, for sync tests.
``SilentEndpoint`` accepts TCP connections and never answers: a TLS handshake that never ends.
``python -m prestaged.testing.storage --pki-dir DIR`` runs it as a process for benchmarks.

Not for production: file reads are blocking and every request is kept in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Callable, Optional, TypeVar, Union
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestHandler

from prestaged.testing.authz import RefusalStyle, refusal
from prestaged.testing.pki import load_or_create_pki
from prestaged.testing.threaded import ThreadedServer
from prestaged.testing.tokens import INVALID, NO_TOKEN, BearerCheck

__all__ = [
    "DOOR",
    "POOL",
    "Action",
    "Delay",
    "Flood",
    "IgnoreRange",
    "PathStats",
    "Raw",
    "RequestRecord",
    "Reset",
    "Serve",
    "ServerStats",
    "SilentEndpoint",
    "Status",
    "StorageServer",
    "ThreadedStorageServer",
    "generated_bytes",
    "main",
]

DOOR = "door"
POOL = "pool"
SITES = (DOOR, POOL)

TAPE_REST_DISCOVERY = "/.well-known/wlcg-tape-rest-api"
"""The WLCG Tape REST discovery path: this server has no such API (404, as XRootD answers)."""

#: Size of the body chunks written by streamed responses (bytes).
CHUNK_SIZE = 64 * 1024
#: Period of the generated content: prime, so equal bytes rarely line up at nearby offsets.
_PERIOD = 4093
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)\Z")

T = TypeVar("T")


# --- fault-injection actions -------------------------------------------------------------------


@dataclass(frozen=True)
class Serve:
    """Serve the request normally."""


@dataclass(frozen=True)
class Status:
    """Answer with HTTP status ``code``, an optional ``Retry-After`` header value and ``body``."""

    code: int
    retry_after: Optional[str] = None
    body: bytes = b""

    def __post_init__(self) -> None:
        if not 100 <= self.code <= 599:
            raise ValueError(f"Status.code must be an HTTP status 100-599, got {self.code}")


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` (cancelled if the client disconnects), then serve normally."""

    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError(f"Delay.seconds must be >= 0, got {self.seconds}")


@dataclass(frozen=True)
class Reset:
    """Abort the connection (TCP RST) without sending any response.

    aiohttp's ``ClientSession`` silently retries an idempotent request once after such a
    disconnect, so a GET through it only fails on two Resets in a row.
    """


@dataclass(frozen=True)
class IgnoreRange:
    """Ignore ``Range`` and answer 200 with a body of ``size`` bytes (default 10 GiB), streamed.

    Streaming stops as soon as the client goes away, so only what was really written is counted.
    In redirect mode the door redirects as usual and the pool ignores the range.
    """

    size: int = 10 * 1024**3

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"IgnoreRange.size must be >= 0, got {self.size}")


@dataclass(frozen=True)
class Raw:
    """Write ``data`` verbatim as the whole answer (status line, headers and body are the
    test's), then close the connection (``close``) or leave it open until the client does.

    For answers aiohttp's server would never produce: garbage status lines, truncated heads,
    two responses in one write, redirects to other schemes. Counted whole in ``bytes_sent``.
    """

    data: bytes
    close: bool = True


@dataclass(frozen=True)
class Flood:
    """Write ``head``, then ``filler`` repeated up to ``size`` bytes (default 10 GiB: endless in
    practice), then ``tail``, then close; streaming stops as soon as the client goes away.

    A hostile or broken server: a reason phrase or header line that never ends, headers without
    end. ``bytes_sent`` counts every byte handed to the transport, so a test can bound what the
    client let the server send before hanging up.
    """

    head: bytes
    filler: bytes
    size: int = 10 * 1024**3
    tail: bytes = b""

    def __post_init__(self) -> None:
        if not self.filler or self.size < 0:
            raise ValueError("Flood.filler must be non-empty and Flood.size >= 0")


Action = Union[Serve, Status, Delay, Reset, IgnoreRange, Raw, Flood]
_SERVE = Serve()
_TOO_MANY = Status(503, body=b"Too many requests in flight\n")


# --- statistics --------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as the server saw it.

    ``time`` is ``time.monotonic()`` at arrival; ``status`` is 0 until a response is started and
    stays 0 for ``Reset``, ``Raw``, ``Flood`` or a client that left first; ``bytes_sent`` counts
    body bytes written (every byte of a ``Raw`` or ``Flood`` answer); ``in_flight``: requests
    being handled at its arrival (door and pool), itself included.
    """

    __slots__ = ("action", "bytes_sent", "in_flight", "method", "range", "site", "status", "time")

    time: float
    site: str
    method: str
    range: Optional[str]
    action: Action
    status: int
    bytes_sent: int
    in_flight: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the action is given as its ``repr``."""
        return {
            "time": self.time,
            "site": self.site,
            "method": self.method,
            "range": self.range,
            "action": repr(self.action),
            "status": self.status,
            "bytes_sent": self.bytes_sent,
            "in_flight": self.in_flight,
        }


@dataclass
class PathStats:
    """Requests for one path, door and pool together (a redirected GET counts twice)."""

    requests: int = 0
    bytes_sent: int = 0
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        """HTTP methods in arrival order."""
        return [r.method for r in self.records]

    @property
    def ranges(self) -> list[Optional[str]]:
        """``Range`` header values in arrival order (None when absent)."""
        return [r.range for r in self.records]

    @property
    def statuses(self) -> list[int]:
        """Response statuses in arrival order (0: reset or client gone before the response)."""
        return [r.status for r in self.records]

    @property
    def actions(self) -> list[Action]:
        """The fault-injection action applied to each request, in arrival order."""
        return [r.action for r in self.records]

    @property
    def times(self) -> list[float]:
        """Arrival times (``time.monotonic()``) in arrival order."""
        return [r.time for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
            "records": [r.to_dict() for r in self.records],
        }


class ServerStats:
    """Counters of a ``StorageServer``; mutated only on the server's event loop.

    Attributes (plain ints and dicts, safe to read from another thread once the run is over):
    ``paths`` (normalised path -> ``PathStats``), ``requests_total``, ``bytes_total`` (body
    bytes), ``requests_by_site``, ``connections`` (distinct connections accepted per site),
    ``client_dns`` (peer certificate subject -> connections), ``active_requests`` (in flight),
    ``tls_resumed`` (connections per site whose TLS handshake resumed a session),
    ``discovery_requests`` (``TAPE_REST_DISCOVERY`` asked, answered 404, not in the others).
    With a ``BearerCheck``: ``token_requests`` (door requests that carried ``Authorization:
    Bearer``) and ``auth_refusals`` (door requests refused for want of a good token or
    certificate). Always: ``authorization_at_target`` (requests that reached the redirect
    target, the pool, with an ``Authorization`` header of any kind: a well-behaved client
    never sends its token to another port or host).
    """

    def __init__(self) -> None:
        self._open = dict.fromkeys(SITES, 0)
        self.active_requests = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter; open connections and in-flight requests are live state and stay."""
        self.paths: dict[str, PathStats] = {}
        self.requests_total = 0
        self.discovery_requests = 0
        self.token_requests = 0
        self.auth_refusals = 0
        self.authorization_at_target = 0
        self.bytes_total = 0
        self.requests_by_site = dict.fromkeys(SITES, 0)
        self.connections = dict.fromkeys(SITES, 0)
        self.tls_resumed = dict.fromkeys(SITES, 0)
        self.client_dns: dict[str, int] = {}

    def open_connections(self, site: str = DOOR) -> int:
        """Connections of ``site`` (``"door"`` or ``"pool"``) that are open right now."""
        return self._open[site]

    def path(self, path: str) -> PathStats:
        """Stats of ``path`` (with or without the leading slash); empty if never requested."""
        return self.paths.get(_normalize(path)) or PathStats()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot of every counter."""
        return {
            "requests_total": self.requests_total,
            "discovery_requests": self.discovery_requests,
            "token_requests": self.token_requests,
            "auth_refusals": self.auth_refusals,
            "authorization_at_target": self.authorization_at_target,
            "bytes_total": self.bytes_total,
            "requests_by_site": dict(self.requests_by_site),
            "connections": dict(self.connections),
            "tls_resumed": dict(self.tls_resumed),
            "open_connections": dict(self._open),
            "client_dns": dict(self.client_dns),
            "paths": {p: s.to_dict() for p, s in self.paths.items()},
        }

    def _connection_made(self, site: str, dn: Optional[str], resumed: bool) -> None:
        self.connections[site] += 1
        self.tls_resumed[site] += resumed
        self._open[site] += 1
        if dn is not None:
            self.client_dns[dn] = self.client_dns.get(dn, 0) + 1

    def _connection_lost(self, site: str) -> None:
        self._open[site] -= 1

    def _request(self, key: str, record: RequestRecord) -> PathStats:
        stats = self.paths.get(key)
        if stats is None:
            stats = self.paths[key] = PathStats()
        stats.requests += 1
        stats.records.append(record)
        self.requests_total += 1
        self.requests_by_site[record.site] += 1
        return stats

    def _sent(self, stats: PathStats, record: RequestRecord, n: int) -> None:
        stats.bytes_sent += n
        record.bytes_sent += n
        self.bytes_total += n


# --- content -----------------------------------------------------------------------------------


def _normalize(path: str) -> str:
    return "/" + path.lstrip("/")


@functools.lru_cache(maxsize=4096)
def _pattern(key: str) -> bytes:
    return hashlib.shake_128(key.encode()).digest(_PERIOD)


def generated_bytes(path: str, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of the generated content of ``path`` (independent of file size).

    Byte ``i`` of ``path`` is ``shake_128(path)[i % 4093]``, so a slice costs O(stop - start).
    """
    n = stop - start
    if n <= 0:
        return b""
    if stop <= 256:  # the common touch: a short prefix costs one SHAKE block, no cache
        return hashlib.shake_128(_normalize(path).encode()).digest(stop)[start:]
    pattern = _pattern(_normalize(path))
    offset = start % _PERIOD
    if offset + n <= _PERIOD:
        return pattern[offset : offset + n]
    return (pattern * ((offset + n) // _PERIOD + 1))[offset : offset + n]


class _Unsatisfiable(Exception):
    pass


def _parse_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """``[start, stop)`` for a single byte range; None to ignore it (absent, malformed, multi).

    Raises ``_Unsatisfiable`` for a range that selects nothing (e.g. any range of an empty file).
    """
    if header is None:
        return None
    match = _RANGE_RE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        if last and int(last) < start:
            return None
        if start >= size:
            raise _Unsatisfiable
        return start, (min(int(last) + 1, size) if last else size)
    if not last:
        return None
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise _Unsatisfiable
    return max(0, size - suffix), size


# --- connection tracking -----------------------------------------------------------------------

_DN_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
}


def _peer_dn(transport: asyncio.BaseTransport) -> Optional[str]:
    """Grid-style subject (``/DC=org/O=x/CN=y``) of the verified peer certificate, if any."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    parts = [f"/{_DN_NAMES.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return "".join(parts) or None


class _TrackingServer(web.Server):
    """aiohttp's low-level server, counting connections: one ``RequestHandler`` per connection."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        site: str,
        stats: ServerStats,
        on_change: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._site = site
        self._stats = stats
        self._on_change = on_change
        self._tracked: set[RequestHandler] = set()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._tracked.add(handler)
        # The handshake is over when the protocol sees the connection (asyncio and uvloop).
        tls = transport.get_extra_info("ssl_object")
        resumed = tls is not None and bool(tls.session_reused)
        self._stats._connection_made(self._site, _peer_dn(transport), resumed)
        self._on_change()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if handler in self._tracked:
            self._tracked.discard(handler)
            self._stats._connection_lost(self._site)
            self._on_change()


# --- the server --------------------------------------------------------------------------------


class StorageServer:
    """A dCache-like HTTPS storage on 127.0.0.1 for tests (see the module docstring).

    ``ssl_context`` serves the door; ``pool_ssl_context`` (default: the same) the pool, which
    exists only with ``redirect=True`` (a real dCache pool asks for no client certificate:
    give ``TestPKI.pool_ssl_context()``). With ``root`` files come from that directory (404 if
    absent); otherwise every path exists with ``default_size`` bytes (default 1 MiB) of
    ``generated_bytes`` content. ``set_size``/``remove`` override either namespace. Ports are
    chosen by the OS unless ``door_port`` is given. Use ``async with`` or ``start()``/``stop()``.

    ``max_in_flight`` (default None: no limit) stands for a door at capacity (a servlet
    container's or a proxy's cap on requests at once): while that many door requests are being
    handled, another one is answered ``503`` at once (no ``Retry-After``; recorded as the action
    ``Status(503)``, leaving the path's injected actions for later requests). dCache 11.2's
    request *rate* limiter (429) is the dCache emulator's (``testing.dcache``). Each
    ``RequestRecord.in_flight`` shows the load the server saw.

    ``bearer`` (default None: certificates only, as before) makes the door accept ``Authorization:
    Bearer`` tokens: a GET or HEAD needs ``storage.read`` on the URL path, checked before any
    injected action. A client without a certificate is then let through TLS, so
    ``ssl_context`` must request but not require one (``require_client_cert=False``). A request
    with a good covering token is served; one without a token is served if it came with a
    certificate; a good token that does not cover the path is refused even with a certificate;
    a bad or expired token is refused, except that the ``XROOTD`` style falls back to the
    certificate as XRootD does. ``refusal`` picks how refusals look (``RefusalStyle``: XRootD's
    403 by default, ``RFC6750`` or ``DCACHE``); they are recorded as ``Status(<code>)``. The pool
    never looks at tokens: the one-time UUID authorises.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        pool_ssl_context: ssl.SSLContext | None = None,
        root: Path | None = None,
        default_size: int = 1 << 20,
        redirect: bool = False,
        host: str = "127.0.0.1",
        door_port: int = 0,
        max_in_flight: Optional[int] = None,
        bearer: Optional[BearerCheck] = None,
        refusal: Union[RefusalStyle, str] = RefusalStyle.XROOTD,
    ) -> None:
        if default_size < 0:
            raise ValueError(f"default_size must be >= 0, got {default_size}")
        if bearer is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED:
            raise ValueError("with bearer tokens the door must let clients without a certificate"
                             " through: use server_ssl_context(require_client_cert=False)")
        self.bearer = bearer
        self.refusal = RefusalStyle(refusal)
        self._ssl = {DOOR: ssl_context, POOL: pool_ssl_context or ssl_context}
        self._root = root
        self.default_size = default_size
        self.redirect = redirect
        self.host = host
        self._requested_door_port = door_port
        self.max_in_flight = max_in_flight
        self._admitted = 0  # door requests being handled that the limiter let in
        self.stats = ServerStats()
        self._sizes: dict[str, int] = {}
        self._removed: set[str] = set()
        self._injected: dict[str, deque[Action]] = {}
        self._global: tuple[Action, ...] = ()
        self._global_repeat = False
        self._global_seen: dict[str, int] = {}
        self._transfers: dict[str, tuple[str, Action]] = {}
        self._runners: dict[str, web.BaseRunner] = {}
        self._ports: dict[str, int] = {}
        self._waiters: list[asyncio.Future[None]] = []

    # lifecycle

    async def start(self) -> None:
        """Start listening (pool first, so the door never redirects to a closed port)."""
        if self._runners:
            raise RuntimeError("StorageServer already started")
        try:
            if self.redirect:
                await self._start_site(POOL, self._handle_pool, 0)
            await self._start_site(DOOR, self._handle_door, self._requested_door_port)
        except BaseException:
            await self.stop()
            raise

    async def _start_site(
        self,
        site: str,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        port: int,
    ) -> None:
        server = _TrackingServer(
            handler,
            site=site,
            stats=self.stats,
            on_change=self._notify,
            handler_cancellation=True,  # a client that leaves cancels Delay and streaming
            access_log=None,
        )
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        self._runners[site] = runner
        await web.TCPSite(
            runner, self.host, port, ssl_context=self._ssl[site], backlog=1024
        ).start()
        self._ports[site] = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and close every connection (in-flight handlers get ~1 s). Idempotent."""
        runners, self._runners = self._runners, {}
        for runner in reversed(list(runners.values())):
            await runner.cleanup()
        self._ports = {}

    async def __aenter__(self) -> StorageServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # addresses

    @property
    def door_port(self) -> int:
        """TCP port of the door (the only site without ``redirect``)."""
        return self._port(DOOR)

    @property
    def pool_port(self) -> int:
        """TCP port of the pool; only with ``redirect=True``."""
        return self._port(POOL)

    def _port(self, site: str) -> int:
        try:
            return self._ports[site]
        except KeyError:
            raise RuntimeError(f"StorageServer {site} is not listening") from None

    def _base(self, site: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self._port(site)}"

    def url(self, path: str) -> str:
        """Door URL of ``path``: ``https://127.0.0.1:<door_port>/<path>`` (path quoted)."""
        return self._base(DOOR) + quote(_normalize(path))

    # namespace and fault injection (call on the server's loop, or through ThreadedStorageServer)

    def set_size(self, path: str, size: int) -> None:
        """Make ``path`` exist with ``size`` bytes of generated content (0: an empty file)."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        key = _normalize(path)
        self._removed.discard(key)
        self._sizes[key] = size

    def remove(self, path: str) -> None:
        """Make ``path`` absent (404)."""
        key = _normalize(path)
        self._sizes.pop(key, None)
        self._removed.add(key)

    def inject(self, path: str, actions: Sequence[Action]) -> None:
        """Apply ``actions`` to the next requests of ``path``, one per request, then serve.

        Appends to what is still queued for ``path``; takes precedence over ``inject_all``.
        In redirect mode the door takes the actions (``IgnoreRange`` is passed on to the pool).
        """
        self._injected.setdefault(_normalize(path), deque()).extend(actions)

    def inject_all(self, actions: Sequence[Action], *, repeat: bool = False) -> None:
        """Apply ``actions`` to every path: each path's n-th request from now gets ``actions[n]``.

        With ``repeat`` the list cycles forever (``[Status(403)]`` denies everything); an empty
        list removes the global injection.
        """
        self._global = tuple(actions)
        self._global_repeat = repeat
        self._global_seen = {}

    def clear_faults(self) -> None:
        """Drop every injected action, per path and global."""
        self._injected.clear()
        self.inject_all(())

    def reset_stats(self) -> None:
        """Zero the statistics (``stats`` keeps its identity)."""
        self.stats.reset()

    async def wait_until(
        self, predicate: Callable[[ServerStats], bool], timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(stats)`` holds, re-checked whenever a request starts or ends or
        a connection opens or closes; raise ``TimeoutError`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.stats):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"storage stats condition not met within {timeout} s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _notify(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _next_action(self, key: str) -> Action:
        queue = self._injected.get(key)
        if queue:
            action = queue.popleft()
            if not queue:
                del self._injected[key]
            return action
        actions = self._global
        if not actions:
            return _SERVE
        n = self._global_seen.get(key, 0)
        self._global_seen[key] = n + 1
        if n < len(actions):
            return actions[n]
        return actions[n % len(actions)] if self._global_repeat else _SERVE

    def _size(self, key: str) -> Optional[int]:
        if key in self._removed:
            return None
        size = self._sizes.get(key)
        if size is not None:
            return size
        if self._root is None:
            return self.default_size
        file = self._file(key)
        return file.stat().st_size if file is not None else None

    def _file(self, key: str) -> Optional[Path]:
        assert self._root is not None
        root = self._root.resolve()
        file = (root / key.lstrip("/")).resolve()
        return file if file.is_relative_to(root) and file.is_file() else None

    def _reader(self, key: str) -> Callable[[int, int], bytes]:
        """Function (start, stop) -> bytes of ``key``; real files are opened per call."""
        if self._root is None or key in self._sizes:
            return functools.partial(generated_bytes, key)
        file = self._file(key)
        if file is None:  # removed between the size check and now
            return lambda start, stop: b""

        def read(start: int, stop: int) -> bytes:
            with open(file, "rb") as f:
                return _read_at(f, start, stop)

        return read

    # request handling

    async def _handle_door(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == TAPE_REST_DISCOVERY:
            # A plain WebDAV/XRootD door: no WLCG Tape REST API here, as such servers answer.
            # Counted apart: it is no file request.
            self.stats.discovery_requests += 1
            return _text(404, b"Not Found\n")
        ex = self._arrive(DOOR, request)
        admitted = self.max_in_flight is None or self._admitted < self.max_in_flight
        self._admitted += int(admitted)
        try:
            refused = self._authorize(ex) if admitted else None
            if refused is not None:
                ex.record.action, ex.record.status = Status(refused.status), refused.status
                return refused
            ex.record.action = self._next_action(ex.key) if admitted else _TOO_MANY
            resp = await self._apply(ex, ex.record.action)
            ex.record.status = resp.status
            return resp
        finally:
            self._admitted -= int(admitted)
            self._leave()

    def _authorize(self, ex: _Exchange) -> Optional[web.Response]:
        """None when the door may serve ``ex`` (see the class docstring), else the refusal."""
        if self.bearer is None:
            return None
        header = ex.request.headers.get("Authorization")
        verdict = self.bearer.authorize(header, ("storage.read",), (ex.key,))
        if verdict.kind != NO_TOKEN:
            self.stats.token_requests += 1
        if verdict.granted:
            return None
        transport = ex.request.transport
        certified = transport is not None and bool(transport.get_extra_info("peercert"))
        if certified and (verdict.kind == NO_TOKEN or (
                verdict.kind == INVALID and self.refusal is RefusalStyle.XROOTD)):
            return None
        self.stats.auth_refusals += 1
        return refusal(self.refusal, verdict)

    async def _handle_pool(self, request: web.BaseRequest) -> web.StreamResponse:
        ex = self._arrive(POOL, request)
        if "Authorization" in request.headers:
            self.stats.authorization_at_target += 1
        try:
            transfer = self._transfers.pop(request.query.get("dcache-http-uuid", ""), None)
            if transfer is None or transfer[0] != ex.key:
                resp = _text(404, b"unknown or already used dcache-http-uuid\n")
            else:
                ex.record.action = transfer[1]
                resp = await self._serve(ex, transfer[1])
            ex.record.status = resp.status
            return resp
        finally:
            self._leave()

    def _arrive(self, site: str, request: web.BaseRequest) -> _Exchange:
        key = _normalize(request.path)
        self.stats.active_requests += 1
        record = RequestRecord(time.monotonic(), site, request.method, request.headers.get("Range"),
                               _SERVE, 0, 0, self.stats.active_requests)
        ex = _Exchange(request, key, record, self.stats._request(key, record))
        self._notify()
        return ex

    def _leave(self) -> None:
        self.stats.active_requests -= 1
        self._notify()

    async def _apply(self, ex: _Exchange, action: Action) -> web.StreamResponse:
        if isinstance(action, Status):
            headers = {"Retry-After": action.retry_after} if action.retry_after else None
            return _text(action.code, action.body, headers)
        if isinstance(action, Reset):
            return await _reset(ex.request)
        if isinstance(action, (Raw, Flood)):
            return await self._raw(ex, action)
        if isinstance(action, Delay):
            await asyncio.sleep(action.seconds)
            action = _SERVE
        if self.redirect and ex.request.method == "GET":
            return self._redirect(ex.key, action)
        return await self._serve(ex, action)

    def _redirect(self, key: str, action: Action) -> web.StreamResponse:
        if self._size(key) is None:  # a dCache door answers 404 itself, without a mover
            return _text(404, b"No such file or directory\n")
        transfer = str(uuid.uuid4())
        self._transfers[transfer] = (key, action)
        location = f"{self._base(POOL)}{quote(key)}?dcache-http-uuid={transfer}"
        return web.Response(status=302, headers={"Location": location})

    async def _serve(self, ex: _Exchange, action: Action) -> web.StreamResponse:
        method = ex.request.method
        if method not in ("GET", "HEAD"):
            return _text(405, b"", {"Allow": "GET, HEAD"})
        if isinstance(action, IgnoreRange):
            if method == "HEAD":
                return await self._head(ex, action.size, status=200, headers={})
            read: Callable[[int, int], bytes] = functools.partial(generated_bytes, ex.key)
            return await self._stream(ex, read, 0, action.size, status=200, headers={})
        size = self._size(ex.key)
        if size is None:
            return _text(404, b"No such file or directory\n")
        try:
            span = _parse_range(ex.record.range, size)
        except _Unsatisfiable:
            return _text(416, b"", {"Content-Range": f"bytes */{size}"})
        status, headers = 200, {"Accept-Ranges": "bytes"}
        start, stop = 0, size
        if span is not None:
            (start, stop), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if method == "HEAD":
            return await self._head(ex, stop - start, status=status, headers=headers)
        read = self._reader(ex.key)
        if stop - start <= CHUNK_SIZE:
            return await self._send(ex, read(start, stop), status=status, headers=headers)
        return await self._stream(ex, read, start, stop, status=status, headers=headers)

    async def _head(
        self, ex: _Exchange, length: int, *, status: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = length
        with contextlib.suppress(ConnectionError):
            await resp.prepare(ex.request)
            await resp.write_eof()
        return resp

    async def _send(
        self, ex: _Exchange, body: bytes, *, status: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a small body in one write; count it once handed to an open transport."""
        resp = web.Response(
            status=status, body=body, headers=headers, content_type="application/octet-stream"
        )
        try:
            await resp.prepare(ex.request)
            await resp.write_eof()
        except ConnectionError:
            return resp
        self.stats._sent(ex.stats, ex.record, len(body))
        return resp

    async def _stream(
        self,
        ex: _Exchange,
        read: Callable[[int, int], bytes],
        start: int,
        stop: int,
        *,
        status: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Write ``[start, stop)`` in chunks, yielding between chunks, until the client leaves.

        Over TLS, writes after the peer closed are dropped silently and a loop that never yields
        never sees the close: hence ``sleep(0)`` and the ``is_closing()`` check per chunk.
        """
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = stop - start
        ex.record.status = status
        try:
            await resp.prepare(ex.request)
            pos = start
            while pos < stop:
                transport = ex.request.transport
                if transport is None or transport.is_closing():
                    return resp
                chunk = read(pos, min(pos + CHUNK_SIZE, stop))
                if not chunk:  # a real file shrank under us
                    ex.request.protocol.force_close()
                    return resp
                await resp.write(chunk)
                self.stats._sent(ex.stats, ex.record, len(chunk))
                pos += len(chunk)
                await asyncio.sleep(0)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def _raw(self, ex: _Exchange, action: Raw | Flood) -> web.StreamResponse:
        """Write a hostile answer straight to the connection, bypassing aiohttp's response."""
        writer = ex.request.writer
        transport = ex.request.transport
        try:
            if isinstance(action, Raw):
                await self._write_raw(ex, writer, action.data)
            else:
                await self._write_raw(ex, writer, action.head)
                left = action.size
                chunk = action.filler * max(1, CHUNK_SIZE // len(action.filler))
                while left > 0:
                    # As in _stream: yield per chunk, or a TLS close is never noticed.
                    if transport is None or transport.is_closing():
                        break
                    piece = chunk[:left]
                    await self._write_raw(ex, writer, piece)
                    left -= len(piece)
                    await asyncio.sleep(0)
                else:
                    await self._write_raw(ex, writer, action.tail)
        except ConnectionError:
            pass
        if transport is not None and (not isinstance(action, Raw) or action.close):
            transport.close()
        # No response of aiohttp's may follow: wait to be cancelled when the connection is lost
        # (handler_cancellation=True), as _reset does.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_raw(self, ex: _Exchange, writer: AbstractStreamWriter, data: bytes) -> None:
        if data:
            await writer.write(data)
            await writer.drain()
            self.stats._sent(ex.stats, ex.record, len(data))


@dataclass
class _Exchange:
    """One request being handled: what the helpers of ``StorageServer`` pass around."""

    __slots__ = ("key", "record", "request", "stats")

    request: web.BaseRequest
    key: str
    record: RequestRecord
    stats: PathStats


def _read_at(f: BinaryIO, start: int, stop: int) -> bytes:
    f.seek(start)
    return f.read(stop - start)


def _text(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.StreamResponse:
    return web.Response(status=status, body=body, headers=headers, content_type="text/plain")


async def _reset(request: web.BaseRequest) -> web.StreamResponse:
    """Abort the connection with a TCP RST; the handler is then cancelled by aiohttp."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # connection_lost cancels this handler (handler_cancellation=True); never answer.
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")  # pragma: no cover


# --- an endpoint that never speaks -------------------------------------------------------------


class SilentEndpoint:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte: to a TLS client, a handshake
    that never completes (a hung door, a half-configured load balancer).

    ``connections`` counts connections accepted; each is closed when its client leaves, or at
    ``stop()``. Use ``async with`` or ``start()``/``stop()``.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.connections = 0
        self._server: Optional[asyncio.Server] = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Start listening on a port chosen by the OS."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)

    async def stop(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()

    async def __aenter__(self) -> SilentEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """TCP port listened on."""
        if self._server is None:
            raise RuntimeError("SilentEndpoint is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, path: str, scheme: str = "https") -> str:
        """``scheme://127.0.0.1:<port>/<path>``."""
        return f"{scheme}://{self.host}:{self.port}{quote(_normalize(path))}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await reader.read(CHUNK_SIZE):  # a ClientHello, then nothing: never answer
                pass
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


# --- in a thread -------------------------------------------------------------------------------


class ThreadedStorageServer(ThreadedServer[StorageServer]):
    """A ``StorageServer`` on its own event loop in a daemon thread, for synchronous code.

    Takes the same arguments. ``start()`` returns once both sites listen; ``stop()`` stops the
    server and the loop and joins the thread. Mutators run on the server's loop and return once
    applied, so the next request sees them. ``stats`` is the live object: read it after the run
    (or use ``stats_snapshot()`` during one).
    """

    def __init__(self, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(lambda: StorageServer(ssl_context, **kwargs), "storage server")

    @property
    def door_port(self) -> int:
        """TCP port of the door."""
        return self.server.door_port

    @property
    def pool_port(self) -> int:
        """TCP port of the pool (``redirect=True`` only)."""
        return self.server.pool_port

    @property
    def stats(self) -> ServerStats:
        """The live ``ServerStats``; safe to read once requests are over."""
        return self.server.stats

    def url(self, path: str) -> str:
        """Door URL of ``path``."""
        return self.server.url(path)

    def stats_snapshot(self) -> dict[str, Any]:
        """``stats.to_dict()`` taken on the server loop, consistent even during a run."""
        return self._call(self.server.stats.to_dict)

    def set_size(self, path: str, size: int) -> None:
        """See ``StorageServer.set_size``."""
        self._call(lambda: self.server.set_size(path, size))

    def remove(self, path: str) -> None:
        """See ``StorageServer.remove``."""
        self._call(lambda: self.server.remove(path))

    def inject(self, path: str, actions: Sequence[Action]) -> None:
        """See ``StorageServer.inject``."""
        self._call(lambda: self.server.inject(path, actions))

    def inject_all(self, actions: Sequence[Action], *, repeat: bool = False) -> None:
        """See ``StorageServer.inject_all``."""
        self._call(lambda: self.server.inject_all(actions, repeat=repeat))

    def clear_faults(self) -> None:
        """See ``StorageServer.clear_faults``."""
        self._call(self.server.clear_faults)

    def reset_stats(self) -> None:
        """See ``StorageServer.reset_stats``."""
        self._call(self.server.reset_stats)

    def wait_until(self, predicate: Callable[[ServerStats], bool], timeout: float = 10.0) -> None:
        """See ``StorageServer.wait_until``; blocks the calling thread."""
        self._run_on_loop(self.server.wait_until(predicate, timeout), timeout + 5)


# --- command line ------------------------------------------------------------------------------


def _size_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prestaged.testing.storage",
        description="Run the dCache-like HTTPS storage emulator on 127.0.0.1 until SIGTERM/SIGINT."
        " Prints one JSON line {door_port, pool_port, pid} once listening.",
    )
    p.add_argument(
        "--pki-dir",
        type=Path,
        required=True,
        help="test PKI directory; created with create_pki() if DIR/ca does not exist",
    )
    p.add_argument(
        "--redirect",
        action="store_true",
        help="door answers 302 to a pool (asking, like dCache's, for no client certificate)",
    )
    p.add_argument(
        "--default-size",
        type=_size_arg,
        default=1 << 20,
        help="size in bytes of every generated file (default 1 MiB)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="serve files from this directory instead of generated content",
    )
    p.add_argument("--port", type=_size_arg, default=0, help="door port (default 0: any free port)")
    p.add_argument(
        "--stats-file", type=Path, default=None, help="write the statistics as JSON here on exit"
    )
    return p


async def _serve_cli(args: argparse.Namespace) -> None:
    root: Path = args.pki_dir
    pki = load_or_create_pki(root)
    server = StorageServer(
        pki.server_ssl_context(),
        pool_ssl_context=pki.pool_ssl_context(),
        root=args.root,
        default_size=args.default_size,
        redirect=args.redirect,
        door_port=args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        pool_port = server.pool_port if args.redirect else None
        line = {"door_port": server.door_port, "pool_port": pool_port, "pid": os.getpid()}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        await stop.wait()
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(server.stats.to_dict()) + "\n")




def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m prestaged.testing.storage``; returns the exit code."""
    args = _parser().parse_args(argv)
    asyncio.run(_serve_cli(args))
    return 0


if __name__ == "__main__":
    from prestaged.testing.process import exit_quietly

    exit_quietly(main)
