"""The engine against the real HTTPS test storage on 127.0.0.1 (client certificates, no mocks)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from prestaged.config import BreakerConfig
from prestaged.credentials import load_credentials
from prestaged.model import FileRef, Result
from prestaged.retry import RetryPolicy
from prestaged.storage.http import HttpToucher
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import IgnoreRange, Reset, Status, StorageServer
from prestaged.warm import RunReport, WarmSettings, warm

FAST = RetryPolicy(attempts=5, initial=0.0, max=0.0, jitter=0.0, total=30.0)


async def _refs(urls: Iterable[str]) -> AsyncIterator[FileRef]:
    for u in urls:
        yield FileRef(name=u.rsplit("/", 1)[-1], url=u)


def _client(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                             ca_dir_configured=None, min_lifetime=3600)
    return creds.ssl_context()


async def _warm(ctx: ssl.SSLContext, urls: list[str], *, nbytes: int = 4,
                **settings: object) -> RunReport:
    base: dict[str, object] = {"concurrency": 8, "nbytes": nbytes, "retry": FAST}
    base.update(settings)
    async with HttpToucher(ctx, nbytes=nbytes, limit=8, limit_per_host=8, timeout=20) as t:
        return await warm(_refs(urls), WarmSettings(**base), t)  # type: ignore[arg-type]


@pytest.fixture
async def storage(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """The test storage, requiring a client certificate."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        yield srv


async def test_every_file_gets_one_ranged_get_and_at_most_n_bytes(
    pki: TestPKI, proxy: Path, storage: StorageServer
) -> None:
    """300 files: one GET each with Range bytes=0-3, at most 4 body bytes sent per file."""
    paths = [f"/pnfs/ds/f{i:04d}.root" for i in range(300)]
    report = await _warm(_client(pki, proxy), [storage.url(p) for p in paths])
    assert report.tally.results["warm"] == 300 and report.exit_code == 0
    assert report.tally.bytes == 4 * 300
    for p in paths:
        st = storage.stats.path(p)
        assert (st.requests, st.methods, st.ranges) == (1, ["GET"], ["bytes=0-3"])
        assert st.bytes_sent <= 4
    assert storage.stats.bytes_total == 1200
    assert storage.stats.connections["door"] <= 8  # keep-alive: connections reused
    assert pki.user_dn in "".join(storage.stats.client_dns)


async def test_bytes_option_sets_the_range(pki: TestPKI, proxy: Path, storage: StorageServer) -> None:
    """--bytes n asks for and reads exactly n bytes."""
    report = await _warm(_client(pki, proxy), [storage.url("/a")], nbytes=16)
    assert report.tally.bytes == 16
    assert storage.stats.path("/a").ranges == ["bytes=0-15"]
    assert storage.stats.path("/a").bytes_sent == 16


async def test_server_ignoring_range_costs_n_bytes(
    pki: TestPKI, proxy: Path, storage: StorageServer
) -> None:
    """A 200 streaming a 10 GiB body counts as warm, reads 4 bytes, and the stream is cut."""
    storage.inject("/huge", [IgnoreRange(size=10 * 1024**3)])
    report = await _warm(_client(pki, proxy), [storage.url("/huge"), storage.url("/small")])
    assert report.tally.results["warm"] == 2
    await storage.wait_until(lambda s: s.active_requests == 0)
    st = storage.stats.path("/huge")
    assert st.statuses == [200]
    assert st.bytes_sent < 16 * 1024**2, "the client must drop the connection, not read on"


async def test_empty_and_missing(pki: TestPKI, proxy: Path, storage: StorageServer) -> None:
    """416 is an empty file, 404 a missing one; missing makes the run exit 1."""
    storage.set_size("/empty", 0)
    storage.remove("/gone")
    report = await _warm(_client(pki, proxy), [storage.url(p) for p in ("/empty", "/gone", "/ok")])
    r = report.tally.results
    assert (r["warm"], r["empty"], r["missing"]) == (1, 1, 1)
    assert storage.stats.path("/empty").statuses == [416]
    [missing] = report.tally.failures
    assert missing.result is Result.MISSING and missing.status == 404
    assert report.exit_code == 1


async def test_503_twice_then_warm_honours_retry_after(
    pki: TestPKI, proxy: Path, storage: StorageServer
) -> None:
    """503, 503 (Retry-After: 1), 206: warm after three tries, waiting what the server asked."""
    storage.inject("/busy", [Status(503), Status(503, retry_after="1")])
    report = await _warm(_client(pki, proxy), [storage.url("/busy")])
    assert report.tally.results["warm"] == 1
    st = storage.stats.path("/busy")
    assert st.statuses == [503, 503, 206]
    assert st.times[2] - st.times[1] >= 1.0
    assert report.tally.retries["503"] == 2


async def test_reset_connection_is_retried(pki: TestPKI, proxy: Path, storage: StorageServer) -> None:
    """Connections reset before any answer are retried until the file is warm."""
    storage.inject("/flaky", [Reset(), Reset(), Reset()])
    report = await _warm(_client(pki, proxy), [storage.url("/flaky")])
    assert report.tally.results["warm"] == 1
    assert storage.stats.path("/flaky").statuses[-1] == 206
    assert report.tally.retries["reset"] >= 1


async def test_deny_everything_trips_breaker_early(
    pki: TestPKI, proxy: Path, storage: StorageServer
) -> None:
    """A server answering 403 to everything stops the run after `denials` files (exit 3)."""
    storage.inject_all([Status(403)], repeat=True)
    urls = [storage.url(f"/d/{i}") for i in range(2000)]
    report = await _warm(_client(pki, proxy), urls, breaker=BreakerConfig(denials=10))
    assert report.exit_code == 3
    assert "denied 10 files in a row" in str(report.aborted)
    assert storage.stats.requests_total <= 10 + 8  # threshold + what was already in flight


async def test_redirect_followed_and_pool_connection_closed(pki: TestPKI, proxy: Path) -> None:
    """Door 302 -> pool on another port: the pool read is 4 bytes and its connection closed."""
    async with StorageServer(pki.server_ssl_context(), redirect=True,
                             pool_ssl_context=pki.pool_ssl_context()) as srv:
        paths = [f"/pnfs/r/f{i}" for i in range(40)]
        report = await _warm(_client(pki, proxy), [srv.url(p) for p in paths])
        assert report.tally.results["warm"] == 40
        assert srv.stats.requests_by_site == {"door": 40, "pool": 40}
        assert srv.stats.connections["pool"] == 40  # never reused: one mover per connection
        assert srv.stats.connections["door"] <= 8  # door connections kept alive
        await srv.wait_until(lambda s: s.open_connections("pool") == 0, timeout=10)
        assert all(srv.stats.path(p).bytes_sent <= 4 for p in paths)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_untrusted_ca_proxy_trips_refusal_breaker(pki: TestPKI, tmp_path: Path, tls: str) -> None:
    """A proxy from a CA the storage does not trust stops the run early with exit 3.

    Under TLS 1.2 the server rejects the certificate inside the handshake. Under TLS 1.3 the
    client's handshake is over first, and an asyncio server then hangs up without flushing its
    alert: the client sees a connection closed without an answer.
    """
    foreign = pki.make_foreign_proxy(tmp_path / "foreign")
    server_ctx = pki.server_ssl_context()
    if tls == "1.2":
        server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client = pki.client_ssl_context(foreign)
    async with StorageServer(server_ctx) as srv:
        urls = [srv.url(f"/x/{i}") for i in range(500)]
        endpoint = f"https://127.0.0.1:{srv.door_port}"
        report = await _warm(client, urls, breaker=BreakerConfig(tls_failures=3),
                             credential_hint=f"proxy {foreign}")
    assert report.exit_code == 3
    assert f"{endpoint} refused 3 connections in a row" in str(report.aborted)
    assert ("TLS handshake" in str(report.aborted)) == (tls == "1.2")
    assert str(foreign) in str(report.aborted)
    assert report.tally.done < 50
    assert srv.stats.requests_total == 0
    assert not report.tally.retries.get("reset", 0) > 3


async def test_reset_after_answers_is_not_a_refusal(pki: TestPKI, proxy: Path, storage: StorageServer) -> None:
    """Once an endpoint has answered, dropped connections are retried resets, not a breaker trip."""
    for i in range(10):
        storage.inject(f"/later/{i}", [Reset(), Reset()])
    urls = [storage.url("/first")] + [storage.url(f"/later/{i}") for i in range(10)]
    report = await _warm(_client(pki, proxy), urls, concurrency=1,
                         breaker=BreakerConfig(tls_failures=2))
    assert report.aborted is None
    assert report.tally.results["warm"] == 11


async def test_unreachable_endpoint_trips_breaker_exit_5(pki: TestPKI, proxy: Path) -> None:
    """Nothing listening: after `unreachable` files fail to connect the run stops with exit 5."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        port = srv.door_port
    urls = [f"https://127.0.0.1:{port}/f{i}" for i in range(500)]
    report = await _warm(_client(pki, proxy), urls, breaker=BreakerConfig(unreachable=5),
                         retry=RetryPolicy(attempts=2, initial=0, max=0, jitter=0))
    assert report.exit_code == 5
    assert "unreachable for 5 files in a row" in str(report.aborted)
    assert report.tally.done < 50


async def test_rate_limit_per_endpoint(pki: TestPKI, proxy: Path, storage: StorageServer) -> None:
    """--rate spaces requests to one endpoint: 30 files at 50/s span at least ~0.5 s."""
    urls = [storage.url(f"/r/{i}") for i in range(30)]
    report = await _warm(_client(pki, proxy), urls, rate=50.0)
    assert report.tally.results["warm"] == 30
    times = sorted(t for p in storage.stats.paths.values() for t in p.times)
    assert times[-1] - times[0] >= 0.4
