"""Door -> pool redirects: every pool connection closed after its read, its TLS session resumed
on the next hop (asyncio and uvloop, TLS 1.2 and 1.3), and pools that do not resume still served."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Coroutine, Iterable
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

import pytest

from prestaged.credentials import load_credentials
from prestaged.model import Attempt, FileRef
from prestaged.retry import RetryPolicy
from prestaged.storage.http import HttpToucher
from prestaged.storage.tls import SessionCache
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import StorageServer
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


def _pool_context(pki: TestPKI, tls: str, *, resumes: bool = True) -> ssl.SSLContext:
    ctx = pki.server_ssl_context(require_client_cert=False)
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
    assert stats.tls_resumed["door"] == 0  # doors are kept alive, never offered a session
    assert len(cache) == 1


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
