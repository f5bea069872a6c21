"""Door -> pool redirects: every pool connection closed after its read, its TLS session resumed
on the next hop (asyncio and uvloop, TLS 1.2 and 1.3), pools that do not resume still served; the
fast path's one-shot hop held to the aiohttp path's answers, limits and headers."""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterable
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, cast

import pytest

from prestaged.credentials import load_credentials
from prestaged.model import Attempt, Failure, FileRef
from prestaged.retry import RetryPolicy
from prestaged.storage import fast
from prestaged.storage.fast import Endpoint, FastPath, FastPathStats, connect_timeout_text
from prestaged.storage.http import HttpToucher
from prestaged.storage.tls import SessionCache
from prestaged.testing.dcache import Locality
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import (
    Action,
    Delay,
    Flood,
    IgnoreRange,
    Raw,
    Reset,
    SilentEndpoint,
    Status,
    StorageServer,
)
from prestaged.warm import RunReport, WarmSettings, warm

T = TypeVar("T")
FILES = 60
IN_FLIGHT = 8
NO_RETRY = RetryPolicy(attempts=1, initial=0.0, max=0.0, jitter=0.0, total=30.0)
WARM = Attempt(status=206, data=4, size=1 << 20)


def _client(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                             ca_dir_configured=None, min_lifetime=3600)
    return creds.ssl_context()


@pytest.fixture
def client(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    """The client SSL context with the test proxy."""
    return _client(pki, proxy)


def _pool_context(pki: TestPKI, tls: str, *, resumes: bool = True) -> ssl.SSLContext:
    ctx = pki.pool_ssl_context()
    if tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if not resumes:
        # TLS 1.3 without tickets: nothing the client could resume.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def _run(loop_name: str, coro: Coroutine[Any, Any, T]) -> T:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _refs(urls: Iterable[str]) -> AsyncIterator[FileRef]:
    for u in urls:
        yield FileRef(name=u.rsplit("/", 1)[-1], url=u)


async def _warm(client: ssl.SSLContext, srv: StorageServer) -> tuple[RunReport, SessionCache]:
    """Warm FILES files through the door, IN_FLIGHT at a time; wait until no pool connection
    is open (every mover ended)."""
    urls = [srv.url(f"/pnfs/hop/f{i:03d}") for i in range(FILES)]
    settings = WarmSettings(concurrency=IN_FLIGHT, nbytes=4, retry=NO_RETRY)
    async with HttpToucher(client, limit=IN_FLIGHT, limit_per_host=IN_FLIGHT, timeout=20) as t:
        report = await warm(_refs(urls), settings, t)
    await srv.wait_until(lambda s: s.open_connections("pool") == 0, timeout=10)
    return report, t.tls_sessions


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_pool_hops_closed_and_resumed(pki: TestPKI, proxy: Path, loop_name: str,
                                      tls: str) -> None:
    """One closed pool connection per file, all but the first in-flight handshakes resumed."""

    async def run() -> tuple[RunReport, SessionCache, StorageServer]:
        async with StorageServer(pki.server_ssl_context(), redirect=True,
                                 pool_ssl_context=_pool_context(pki, tls)) as srv:
            report, cache = await _warm(_client(pki, proxy), srv)
        return report, cache, srv

    report, cache, srv = _run(loop_name, run())
    stats = srv.stats
    assert report.exit_code == 0 and report.tally.results["warm"] == FILES
    assert stats.requests_by_site == {"door": FILES, "pool": FILES}
    assert stats.connections["pool"] == FILES  # one mover per connection, never kept
    assert stats.open_connections("pool") == 0
    assert stats.tls_resumed["pool"] >= FILES - IN_FLIGHT  # only the first wave is full
    assert cache.resumed == stats.tls_resumed["pool"] <= cache.offered
    assert cache.kept <= 2 * IN_FLIGHT  # a resumed session stays: no copy of each successor
    assert stats.tls_resumed["door"] == 0  # doors are kept alive, never offered a session
    assert len(cache) == 1


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_closed_pool_connections_are_freed_without_the_garbage_collector(
        pki: TestPKI, proxy: Path, loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot pool connection, once closed, goes with its TLS objects at once: nothing
    holds it in a reference cycle until a full collection (there was one through its parser
    and one through its transport; a redirecting door piled up ~2 KiB a file that way)."""
    made: list[weakref.ref[Any]] = []
    init = fast._Conn.__init__

    def tracked(self: Any, pool: FastPath, ep: Endpoint) -> None:
        init(self, pool, ep)
        if ep.one_shot:
            made.append(weakref.ref(self))

    monkeypatch.setattr(fast._Conn, "__init__", tracked)

    async def run() -> RunReport:
        async with StorageServer(pki.server_ssl_context(), redirect=True,
                                 pool_ssl_context=_pool_context(pki, "1.3")) as srv:
            report, _ = await _warm(_client(pki, proxy), srv)
        for _ in range(5):  # let every connection_lost callback run
            await asyncio.sleep(0)
        return report

    gc.collect()
    gc.disable()
    try:
        report = _run(loop_name, run())
        alive = sum(ref() is not None for ref in made)
    finally:
        gc.enable()
    assert report.tally.results["warm"] == FILES
    assert len(made) == FILES  # one per file: the hop really went through the fast path
    assert alive == 0


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_pool_without_resumption_still_serves_every_file(pki: TestPKI, proxy: Path,
                                                         loop_name: str) -> None:
    """A pool issuing no tickets: every hop a full handshake, every file warm, movers closed."""

    async def run() -> tuple[RunReport, SessionCache, StorageServer]:
        pool = _pool_context(pki, "1.3", resumes=False)
        async with StorageServer(pki.server_ssl_context(), redirect=True,
                                 pool_ssl_context=pool) as srv:
            report, cache = await _warm(_client(pki, proxy), srv)
        return report, cache, srv

    report, cache, srv = _run(loop_name, run())
    assert report.exit_code == 0 and report.tally.results["warm"] == FILES
    assert srv.stats.connections["pool"] == FILES
    assert srv.stats.open_connections("pool") == 0
    assert srv.stats.tls_resumed["pool"] == 0
    assert (len(cache), cache.offered, cache.resumed) == (0, 0, 0)  # no resumable session kept


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_refused_session_falls_back_to_full_handshake(pki: TestPKI, proxy: Path,
                                                            tls: str) -> None:
    """A session the pool does not know (another server's) costs one full handshake, no file."""
    client = _client(pki, proxy)
    async with HttpToucher(client, limit=1, limit_per_host=1, timeout=20) as t:
        async with StorageServer(pki.server_ssl_context(), redirect=True,
                                 pool_ssl_context=_pool_context(pki, tls)) as other:
            assert await t.touch(other.url("/seed")) == WARM
            stale = t.tls_sessions.get("127.0.0.1", other.pool_port)
        async with StorageServer(pki.server_ssl_context(), redirect=True,
                                 pool_ssl_context=_pool_context(pki, tls)) as srv:
            assert stale is not None
            t.tls_sessions.put("127.0.0.1", srv.pool_port, stale)
            got = [await t.touch(srv.url(f"/f{i}")) for i in range(5)]
            await srv.wait_until(lambda s: s.open_connections("pool") == 0, timeout=10)
            fresh = t.tls_sessions.get("127.0.0.1", srv.pool_port)
    assert got == [WARM] * 5
    assert srv.stats.connections["pool"] == 5
    assert srv.stats.tls_resumed["pool"] == 4  # the stale offer was refused, then resumed
    assert fresh is not None and fresh is not stale


def test_session_cache_is_bounded_lru() -> None:
    """Beyond its size the least recently used (server, port) session is dropped."""
    cache = SessionCache(size=2)
    a, b, c = (cast(ssl.SSLSession, object()) for _ in range(3))
    cache.put("a", 1, a)
    cache.put("b", 1, b)
    assert cache.get("a", 1) is a  # now the most recent
    cache.put("c", 1, c)
    got: list[Optional[ssl.SSLSession]] = [cache.get(h, 1) for h in ("a", "b", "c")]
    assert got == [a, None, c] and len(cache) == 2
    assert cache.get("a", 2) is None  # the port is part of the key


# --- the fast path's one-shot pool hop ----------------------------------------------------------

_H206 = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/99\r\nContent-Length: 4\r\n"
_A404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
MiB = 1024**2


def _to(url: str) -> Raw:
    """A door's 302 to ``url`` (what the door of the two-server setup below answers)."""
    return Raw(b"HTTP/1.1 302 Found\r\nLocation: " + url.encode() + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
async def door(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """A door whose answers the test injects (a redirect to ``pool`` with ``_to``)."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        yield srv


@pytest.fixture
async def pool(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """A second server standing in for a pool: it serves /h whatever the query, or misbehaves
    as the test injects."""
    async with StorageServer(pki.pool_ssl_context()) as srv:
        yield srv


async def _both(client: ssl.SSLContext, url: str, prepare: Callable[[], None],
                **kwargs: Any) -> tuple[Attempt, Attempt, FastPathStats, bool]:
    """Touch ``url`` with the fast path, then without (``prepare()`` before each); also give the
    fast path's counters and whether that toucher opened an aiohttp session."""
    kwargs.setdefault("timeout", 20.0)
    prepare()
    async with HttpToucher(client, limit=4, limit_per_host=4, **kwargs) as fast:
        got = await fast.touch(url)
        used_aiohttp = fast._session is not None
    prepare()
    async with HttpToucher(client, limit=4, limit_per_host=4, fast_path=False, **kwargs) as slow:
        want = await slow.touch(url)
    stats = fast.fast_path_stats
    assert stats is not None
    return got, want, stats, used_aiohttp


def _redirecting(door: StorageServer, pool: StorageServer,
                 actions: Iterable[Action]) -> Callable[[], None]:
    """Prepare: the door redirects /h to the pool's /h?dcache-http-uuid=1 (as often as asked: a
    hop handed back costs another door request), where ``actions`` apply."""
    listed = list(actions)

    def prepare() -> None:
        door.clear_faults()
        pool.clear_faults()
        door.inject("/h", [_to(pool.url("/h") + "?dcache-http-uuid=1")] * 4)
        pool.inject("/h", listed * 4 if listed else [])

    return prepare


_FLOOD = 32 * MiB
_POOL_ANSWERS: list[tuple[str, list[Action], tuple[Optional[int], Optional[Failure]], bool]] = [
    # (id, pool's actions, (status, failure) expected, answered by the fast hop)
    ("206", [], (206, None), True),
    ("404", [Status(404, body=b"gone\n")], (404, None), True),
    ("503-retry-after", [Status(503, retry_after="7")], (503, None), True),
    ("500-long-body", [Status(500, body=b"x" * 5000)], (500, None), True),
    ("ignores-range", [IgnoreRange()], (200, None), True),
    ("reset", [Reset()], (None, Failure.RESET), False),
    ("truncated-body", [Raw(_H206 + b"\r\nab")], (206, Failure.RESET), False),
    ("garbage", [Raw(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")], (None, Failure.PROTOCOL), False),
    ("header-line-without-end",
     [Flood(_H206 + b"X-Big: ", b"a", _FLOOD, b"\r\n\r\nabcd")], (None, Failure.PROTOCOL), False),
    ("206-then-404-in-one-write", [Raw(_H206 + b"\r\nabcd" + _A404)], (206, None), True),
]


@pytest.mark.parametrize(("actions", "expect", "hopped"),
                         [(a, e, h) for _, a, e, h in _POOL_ANSWERS],
                         ids=[name for name, *_ in _POOL_ANSWERS])
async def test_pool_answers_equal_the_aiohttp_path(
    client: ssl.SSLContext, door: StorageServer, pool: StorageServer, actions: list[Action],
    expect: tuple[Optional[int], Optional[Failure]], hopped: bool
) -> None:
    """Whatever the pool answers (final statuses, a 200 ignoring Range, resets, garbage, an
    endless header), the fast hop gives the aiohttp path's Attempt: itself, or by handing the
    whole file to aiohttp; the pool never sends more than a few MiB and no connection stays."""
    got, want, stats, used_aiohttp = await _both(client, door.url("/h"),
                                                 _redirecting(door, pool, actions))
    assert got == want
    assert (got.status, got.failure) == expect, got
    assert (stats.hops, stats.hop_fallbacks) == ((1, 0) if hopped else (0, 1))
    assert used_aiohttp is not hopped
    await pool.wait_until(lambda s: s.active_requests == 0 and s.open_connections() == 0,
                          timeout=10)
    assert all(r.bytes_sent < 4 * MiB for r in pool.stats.path("/h").records)


async def test_pool_slower_than_the_attempt_limit_times_out_once(
    client: ssl.SSLContext, door: StorageServer, pool: StorageServer
) -> None:
    """A pool that does not answer within the attempt's timeout: timed out, one pool request,
    not a second try through aiohttp after the time is spent."""
    _redirecting(door, pool, [Delay(30)])()
    async with HttpToucher(client, limit=4, limit_per_host=4, timeout=0.5) as t:
        got = await t.touch(door.url("/h"))
        stats = t.fast_path_stats
    assert got == Attempt(failure=Failure.TIMEOUT, error="timed out")
    assert stats is not None and stats.hop_fallbacks == 1
    assert pool.stats.path("/h").requests == 1


async def test_pool_that_never_finishes_tls_is_unreachable_after_connect_timeout(
    client: ssl.SSLContext, door: StorageServer
) -> None:
    """A pool accepting TCP and never answering the handshake: unreachable after
    connect_timeout, the same Attempt on both paths, one connection each (no second wait)."""
    async with SilentEndpoint() as silent:
        got, want, stats, _ = await _both(
            client, door.url("/h"), lambda: door.inject("/h", [_to(silent.url("/p"))]),
            connect_timeout=0.3)
        assert silent.connections == 2
    assert got == want == Attempt(failure=Failure.UNREACHABLE, error=connect_timeout_text(0.3))
    assert (stats.hops, stats.hop_fallbacks) == (1, 0)


async def test_pool_not_listening_is_unreachable_as_through_aiohttp(
    client: ssl.SSLContext, door: StorageServer, pki: TestPKI
) -> None:
    """A refused pool connection: the file goes to aiohttp from the door and gets its
    classification (unreachable)."""
    async with StorageServer(pki.server_ssl_context()) as gone:
        url = gone.url("/p")
    got, want, stats, used_aiohttp = await _both(
        client, door.url("/h"), lambda: door.inject("/h", [_to(url)] * 2))
    assert got == want and got.failure is Failure.UNREACHABLE
    assert (stats.hops, stats.hop_fallbacks) == (0, 1) and used_aiohttp


async def test_redirect_limits_hold_past_the_fast_hop(
    client: ssl.SSLContext, door: StorageServer, pool: StorageServer, pki: TestPKI
) -> None:
    """A pool redirecting again is followed by aiohttp within max_redirects; max_redirects 0
    follows nothing; both as without the fast path."""
    async with StorageServer(pki.server_ssl_context()) as third:

        def prepare() -> None:
            door.inject("/h", [_to(pool.url("/h"))])
            pool.inject("/h", [_to(third.url("/h"))])

        for limit, expect in ((2, Attempt(status=206, data=4, size=1 << 20)),
                              (1, Attempt(failure=Failure.PROTOCOL,
                                          error="more than 1 redirects")),
                              (0, Attempt(failure=Failure.PROTOCOL,
                                          error="more than 0 redirects"))):
            got, want, stats, _ = await _both(client, door.url("/h"), prepare,
                                              max_redirects=limit)
            assert got == want == expect, limit
            assert stats.hops == (1 if limit else 0)
            door.clear_faults()
            pool.clear_faults()


class _Recorder:
    """A TLS pool on 127.0.0.1 that keeps each request head and answers it with a 206."""

    def __init__(self, server_ctx: ssl.SSLContext) -> None:
        self.ctx = server_ctx
        self.heads: list[bytes] = []
        self._server: Optional[asyncio.AbstractServer] = None

    async def __aenter__(self) -> _Recorder:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(_H206 + b"Connection: close\r\n\r\nabcd")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_pool_request_carries_no_credentials_and_asks_to_close(
    client: ssl.SSLContext, door: StorageServer, pki: TestPKI
) -> None:
    """The pool request (another host:port) has exactly the headers the aiohttp path sends
    there: its own Host, the Range, Connection: close, and no Authorization or cookie."""
    async with _Recorder(pki.pool_ssl_context()) as rec:
        port = rec.port
        location = f"https://127.0.0.1:{port}/p/f?dcache-http-uuid=u-1"
        got, want, stats, _ = await _both(client, door.url("/h"),
                                          lambda: door.inject("/h", [_to(location)]))
    assert got == want == Attempt(status=206, data=4, size=99)
    assert stats.hops == 1
    fast, slow = ({line.split(b":", 1)[0].lower(): line for line in head.split(b"\r\n")[1:]
                   if line} for head in rec.heads)
    assert rec.heads[0].split(b"\r\n", 1)[0] == b"GET /p/f?dcache-http-uuid=u-1 HTTP/1.1"
    assert set(fast) == set(slow) == {b"host", b"range", b"accept-encoding", b"user-agent",
                                      b"connection"}
    assert fast[b"host"] == f"Host: 127.0.0.1:{port}".encode()
    assert fast[b"connection"].lower() == b"connection: close"


async def test_pool_hops_do_not_take_the_door_connection_s_slot(
    client: ssl.SSLContext, pki: TestPKI
) -> None:
    """With one connection allowed, each pool hop opens its own one-shot connection and the
    door connection stays alive for the next file (not closed to make room)."""
    async with StorageServer(pki.server_ssl_context(), redirect=True,
                             pool_ssl_context=_pool_context(pki, "1.3")) as srv:
        async with HttpToucher(client, limit=1, limit_per_host=1, timeout=20) as t:
            got = [await t.touch(srv.url(f"/one/f{i}")) for i in range(10)]
            stats = t.fast_path_stats
        await srv.wait_until(lambda s: s.open_connections("pool") == 0, timeout=10)
    assert got == [WARM] * 10
    assert stats is not None and (stats.hops, stats.connections) == (10, 1)
    assert srv.stats.connections == {"door": 1, "pool": 10}


async def test_pool_hops_bounded_per_host(client: ssl.SSLContext, pki: TestPKI,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """limit_per_host 2 with 16 files at once: never more than two pool connections open, the
    other hops wait for a slot, none is handed back."""
    most = 0
    connect = FastPath._connect

    async def counting(self: FastPath, ep: Endpoint, timeout: float) -> Any:
        nonlocal most
        if ep.one_shot:
            most = max(most, ep.open + 1)
        return await connect(self, ep, timeout)

    monkeypatch.setattr(FastPath, "_connect", counting)
    async with StorageServer(pki.server_ssl_context(), redirect=True,
                             pool_ssl_context=_pool_context(pki, "1.3")) as srv:
        async with HttpToucher(client, limit=8, limit_per_host=2, timeout=20) as t:
            got = await asyncio.gather(*(t.touch(srv.url(f"/b/f{i}")) for i in range(16)))
            stats = t.fast_path_stats
        await srv.wait_until(lambda s: s.open_connections("pool") == 0, timeout=10)
    assert got == [WARM] * 16
    assert stats is not None and (stats.hops, stats.hop_fallbacks) == (16, 0)
    assert most == 2
    assert srv.stats.connections["pool"] == 16


async def test_dcache_movers_end_with_each_fast_hop(client: ssl.SSLContext,
                                                    dcache: Callable[..., Any]) -> None:
    """Against the dCache emulator, every file's mover ends when its read is done: the fast hop
    reads each one-time pool URL once, and no mover is left open."""
    srv = await dcache()
    paths = [f"/pnfs/m/f{i:02d}" for i in range(20)]
    for p in paths:
        srv.core.add_file(p, 1000, Locality.DISK)
    async with HttpToucher(client, limit=4, limit_per_host=4, timeout=20) as t:
        got = await asyncio.gather(*(t.touch(srv.door_url(p)) for p in paths))
        stats = t.fast_path_stats
    assert set(got) == {Attempt(status=206, data=4, size=1000)}
    assert stats is not None and (stats.hops, stats.hop_fallbacks) == (20, 0)
    await srv.core.wait_until(lambda: srv.core.stats.open_movers == 0)
    assert srv.core.stats.movers_started == 20


async def test_named_pool_resolved_once_numeric_door_never(
    client: ssl.SSLContext, door: StorageServer, pool: StorageServer
) -> None:
    """One-shot hops to a pool named by host name ask the resolver once for ten files (aiohttp's
    DNS cache does the same), and the numeric door is never looked up."""
    loop = asyncio.get_running_loop()
    asked: list[object] = []
    resolve = loop.getaddrinfo

    async def counting(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return await resolve(host, *args, **kwargs)

    location = f"https://localhost:{pool.door_port}/h?dcache-http-uuid=1"
    door.inject("/h", [_to(location)] * 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "getaddrinfo", counting)
        async with HttpToucher(client, limit=4, limit_per_host=4, timeout=20) as t:
            got = [await t.touch(door.url("/h")) for _ in range(10)]
            stats = t.fast_path_stats
    assert got == [WARM] * 10
    assert stats is not None and (stats.hops, stats.hop_fallbacks) == (10, 0)
    assert asked == ["localhost"]
    assert t.tls_sessions.resumed >= 9  # the session is kept under the name, not the address


# --- which session a hop leaves cached (fakes: what Hop.remember reads) ------------------------


class _Session:
    """What ``Hop.remember`` reads of an ``ssl.SSLSession``: created ``age`` s ago."""

    def __init__(self, age: float = 0.0, timeout: int = 7200) -> None:
        self.time = int(time.time() - age)
        self.timeout = timeout
        self.has_ticket = True
        self.id = b"id"


class _TLS:
    """What ``Hop.remember`` reads of an ``ssl.SSLObject``; counts reads of ``session`` (each
    one a copy in CPython)."""

    def __init__(self, reused: bool, session: _Session) -> None:
        self.session_reused = reused
        self._session = session
        self.reads = 0

    @property
    def session(self) -> _Session:
        self.reads += 1
        return self._session


def _hop(cache: SessionCache, reused: bool, new: _Session) -> int:
    """One hop to pool:1 offering the cached session; the server resumes it or not and the
    connection ends with session ``new``. Returns how often the session was read."""
    tls = _TLS(reused, new)
    with cache.offering("pool", 1) as hop:
        hop.session("pool")  # what wrap_bio asks
        hop.tls = cast(ssl.SSLObject, tls)
        hop.remember()
    return tls.reads


def test_resumed_hops_keep_the_cached_session_until_half_its_lifetime() -> None:
    """A full handshake's session is taken; hops resuming it leave it cached without reading
    theirs, until it is half-way through its lifetime; a stale session refused once is
    simply replaced."""
    cache = SessionCache()
    stale, first, later = _Session(), _Session(), _Session()
    cache.put("pool", 1, cast(ssl.SSLSession, stale))
    assert _hop(cache, False, first) == 1  # refused (never accepted): replaced
    assert [_hop(cache, True, _Session()) for _ in range(5)] == [0] * 5
    assert cache.get("pool", 1) is first and cache.kept == 1 and cache.resumed == 5
    first.time -= 3601  # half of 7200 s
    assert _hop(cache, True, later) == 1
    assert cache.get("pool", 1) is later
    assert _hop(cache, True, _Session()) == 0  # the fresh one stays


def test_pool_refusing_a_session_it_accepted_gets_each_new_one() -> None:
    """A pool that refuses a session it resumed before (single-use tickets) is given the
    newest session at every hop from then on."""
    cache = SessionCache()
    _hop(cache, False, _Session())
    assert _hop(cache, True, _Session()) == 0  # accepted: proven
    assert _hop(cache, False, _Session()) == 1  # refused the proven session
    newest = [_Session() for _ in range(3)]
    assert [_hop(cache, True, s) for s in newest] == [1, 1, 1]
    assert cache.get("pool", 1) is newest[-1]
