"""Whole runs against hostile or broken endpoints on 127.0.0.1: they end, quickly, file by file.

Each run goes through the engine and the real toucher, with the fast path on and off.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from prestaged.config import BreakerConfig
from prestaged.credentials import load_credentials
from prestaged.errors import StorageError
from prestaged.model import FileRef, Result
from prestaged.retry import RetryPolicy
from prestaged.storage.fast import connect_timeout_text
from prestaged.storage.http import HttpToucher
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Raw, SilentEndpoint, StorageServer
from prestaged.warm import PLAIN_HTTP_REFUSED, RunReport, WarmSettings, warm

pytestmark = pytest.mark.timeout(120)

NO_WAIT = RetryPolicy(attempts=2, initial=0.0, max=0.0, jitter=0.0, total=60.0)


@pytest.fixture
async def storage(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """The test storage, requiring a client certificate."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        yield srv


@pytest.fixture
def ctx(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    """The client SSL context with the test proxy."""
    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                             ca_dir_configured=None, min_lifetime=3600)
    return creds.ssl_context()


async def _refs(urls: Iterable[str]) -> AsyncIterator[FileRef]:
    for u in urls:
        yield FileRef(name=u.rsplit("/", 1)[-1], url=u)


async def _warm(ctx: ssl.SSLContext, urls: list[str], *, fast: bool, connect_timeout: float = 5.0,
                **settings: object) -> RunReport:
    base: dict[str, object] = {"concurrency": 4, "retry": NO_WAIT}
    base.update(settings)
    async with HttpToucher(ctx, limit=4, limit_per_host=4, timeout=30.0,
                           connect_timeout=connect_timeout, fast_path=fast) as t:
        return await warm(_refs(urls), WarmSettings(**base), t)  # type: ignore[arg-type]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "aiohttp"])
async def test_endpoint_that_never_finishes_tls_trips_the_unreachable_breaker(
    ctx: ssl.SSLContext, fast: bool
) -> None:
    """An endpoint that accepts TCP and never answers the handshake: each try ends after
    connect_timeout (not the 60 s attempt limit, not twice), and the unreachable breaker stops
    the run after a few files instead of stalling on every one."""
    loop = asyncio.get_running_loop()
    async with SilentEndpoint() as silent:
        urls = [silent.url(f"/f{i}") for i in range(200)]
        endpoint = f"https://127.0.0.1:{silent.port}"
        start = loop.time()
        report = await asyncio.wait_for(
            _warm(ctx, urls, fast=fast, connect_timeout=0.3,
                  breaker=BreakerConfig(unreachable=3)), 60)
        elapsed = loop.time() - start
    assert isinstance(report.aborted, StorageError) and report.exit_code == 5
    message = str(report.aborted)
    assert f"{endpoint} unreachable for 3 files in a row" in message
    assert connect_timeout_text(0.3) in message
    assert report.tally.done < 12  # the breaker's 3, plus what was in flight
    # 3 files x 2 tries x 0.3 s, 4 at a time: about a second; stalling would take minutes.
    assert elapsed < 10


def _redirect(location: str) -> Raw:
    """A 302 answer to ``location``, written verbatim."""
    return Raw(b"HTTP/1.1 302 Found\r\nLocation: " + location.encode()
               + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "aiohttp"])
async def test_one_bad_url_or_answer_never_ends_the_run(
    ctx: ssl.SSLContext, storage: StorageServer, fast: bool
) -> None:
    """davs:// is touched as https; root://, http:// (not allowed), and answers redirecting to
    file:, ftp: or http: each fail their own file with a reason; a garbage answer to a URL with
    credentials fails without showing them; every other file is warm and the run completes."""
    port = storage.door_port
    storage.inject("/to-file", [_redirect("file:///etc/passwd")])
    storage.inject("/to-ftp", [_redirect("ftp://127.0.0.1/x")])
    storage.inject("/to-http", [_redirect(f"http://127.0.0.1:{port}/x")])
    storage.inject("/garbage", [Raw(b"HTTP/1.1 abc Weird\r\n\r\n")] * 3)
    bad = {
        "root://127.0.0.1:1094//pnfs/r": "unsupported scheme root://",
        f"http://127.0.0.1:{port}/plain": PLAIN_HTTP_REFUSED,
        storage.url("/to-file"): "refused redirect to file:///etc/passwd",
        storage.url("/to-ftp"): "refused redirect to ftp://127.0.0.1/x",
        storage.url("/to-http"): f"refused redirect to http://127.0.0.1:{port}/x",
    }
    secret = f"https://someone:s3cret@127.0.0.1:{port}/garbage"
    good = [storage.url(f"/ok{i}") for i in range(20)] + [f"davs://127.0.0.1:{port}/dav"]
    report = await asyncio.wait_for(_warm(ctx, [*bad, secret, *good], fast=fast), 60)
    assert report.aborted is None and report.exit_code == 1
    assert report.tally.results[Result.WARM.value] == 21
    assert storage.stats.path("/dav").ranges == ["bytes=0-3"]  # davs went out as https
    errors = {o.url: o.error for o in report.tally.failures}
    assert {u: errors[u] for u in bad} == bad
    redacted = f"https://***@127.0.0.1:{port}/garbage"
    assert errors[redacted].startswith("400, message=")
    assert not any("s3cret" in f"{u} {e}" for u, e in errors.items())
    assert storage.stats.path("/plain").requests == 0 and storage.stats.path("/x").requests == 0


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "aiohttp"])
async def test_a_server_certificate_for_another_name_is_not_blamed_on_the_proxy(
    pki: TestPKI, ctx: ssl.SSLContext, fast: bool
) -> None:
    """A server on 127.0.0.1 whose certificate names another host: every file fails as
    untrusted, the breaker stops the run with exit 3 and says the certificate does not match
    the server's name, without blaming our proxy (issue 12, 10)."""
    wrong = pki.server_ssl_context(cert=pki.make_host_cert("elsewhere.invalid"))
    async with StorageServer(wrong) as srv:
        urls = [srv.url(f"/f{i}") for i in range(50)]
        report = await _warm(ctx, urls, fast=fast, breaker=BreakerConfig(tls_failures=3),
                             credential_hint="proxy /tmp/x509up_u1000 (Test User)")
        port = srv.door_port
    assert report.exit_code == 3
    message = str(report.aborted)
    assert f"the certificate of 127.0.0.1:{port} does not match its name" in message
    assert "proxy" not in message
    assert report.tally.done <= 4 + 3  # stopped early: at most those in flight and the trips


async def test_a_pools_certificate_for_another_name_names_the_pool_not_the_door(
        pki: TestPKI, ctx: ssl.SSLContext) -> None:
    """A door with a good certificate redirects to a pool whose certificate names another
    host: the message blamed the door ("its certificate") and never named the pool."""
    pool = pki.server_ssl_context(require_client_cert=False,
                                  cert=pki.make_host_cert("pool.other.invalid"))
    async with StorageServer(pki.server_ssl_context(), redirect=True,
                             pool_ssl_context=pool) as srv:
        urls = [srv.url(f"/f{i}") for i in range(20)]
        report = await _warm(ctx, urls, fast=True, breaker=BreakerConfig(tls_failures=3))
        pool_port = srv.pool_port
    assert report.exit_code == 3
    message = str(report.aborted)
    assert f"the certificate of 127.0.0.1:{pool_port} does not match its name" in message
    assert "or the pools' a door redirects to" in message
