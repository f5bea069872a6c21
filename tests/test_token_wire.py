"""Bearer tokens on the wire (issue 14): the storage door gets ``Authorization: Bearer``, a
redirect target on another origin never does (both toucher paths), a renewed token file is used
by later requests, an expired token sends nothing and stops the run, and refusals trip the
breaker before more than ``breaker.token_denials`` requests reach the endpoint.

Small aiohttp servers on 127.0.0.1 play door and pool (ports differ, so they are different
origins), recording the ``Authorization`` header of every request they get.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import pytest
from aiohttp import web

from prestaged.config import BreakerConfig
from prestaged.model import Attempt, Failure, FileRef
from prestaged.net import bearer_error
from prestaged.retry import RetryPolicy
from prestaged.storage.http import HttpToucher
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import TokenIssuer, write_token
from prestaged.tokens import FoundToken, TokenSource
from prestaged.warm import RunReport, WarmSettings, touch_url, warm

NO_RETRY = RetryPolicy(attempts=1, initial=0.0, max=0.0, jitter=0.0, total=30.0)
BODY = b"\x00\x01\x02\x03"
CONTENT_RANGE = "bytes 0-3/1000"
class Serve:
    """Starts aiohttp apps on 127.0.0.1 over TLS (the test CA's host certificate, no client
    certificate asked: a token never goes in clear); ``client`` is the SSL context that
    trusts them."""

    def __init__(self, pki: TestPKI) -> None:
        self.tls = pki.server_ssl_context(require_client_cert=False)
        self.client = ssl.create_default_context(capath=str(pki.ca_dir))
        self.runners: list[web.AppRunner] = []

    async def __call__(self, app: web.Application) -> int:
        """Start ``app``; its port."""
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        return int(runner.addresses[0][1])


@pytest.fixture
async def serve(pki: TestPKI) -> AsyncIterator[Serve]:
    """A ``Serve``; its apps stopped after the test."""
    server = Serve(pki)
    yield server
    for runner in server.runners:
        await runner.cleanup()


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    """One test issuer (an ES256 key) for the module."""
    return TokenIssuer("https://localhost:8443/issuer")


def _source(path: Path, token: str) -> TokenSource:
    """A token file at ``path`` holding ``token``, watched for rewrites on every request."""
    write_token(path, token)
    return TokenSource(FoundToken(token, "--token-file", path), recheck=0.0, settle=0.0)


@dataclass
class Seen:
    """The ``Authorization`` header (None: absent) of each request, by server role."""

    door: list[Optional[str]] = field(default_factory=list)
    pool: list[Optional[str]] = field(default_factory=list)


def _partial() -> web.Response:
    return web.Response(status=206, body=BODY, headers={"Content-Range": CONTENT_RANGE})


async def _door_and_pool(serve: Serve, seen: Seen, *, back_to_door: bool = False) -> int:
    """A pool (its own port) serving 206, and a door redirecting ``/data/*`` there; paths under
    ``/same/`` are redirected to ``/data/`` on the door itself (the same origin). With
    ``back_to_door`` the pool redirects once more, to the door's ``/data/``. The door's port."""
    door_port = 0

    async def pool(request: web.Request) -> web.StreamResponse:
        seen.pool.append(request.headers.get("Authorization"))
        if back_to_door:
            name = request.match_info["name"]
            raise web.HTTPFound(f"https://127.0.0.1:{door_port}/data/{name}")
        return _partial()

    pool_app = web.Application()
    pool_app.router.add_get("/pool/{name}", pool)
    pool_port = await serve(pool_app)

    async def data(request: web.Request) -> web.StreamResponse:
        seen.door.append(request.headers.get("Authorization"))
        if back_to_door and seen.pool:  # the pool sent us back: serve it here
            return _partial()
        name = request.match_info["name"]
        raise web.HTTPFound(f"https://127.0.0.1:{pool_port}/pool/{name}?uuid=0f3a")

    async def same(request: web.Request) -> web.StreamResponse:
        seen.door.append(request.headers.get("Authorization"))
        raise web.HTTPFound(f"/data/{request.match_info['name']}")

    door_app = web.Application()
    door_app.router.add_get("/data/{name}", data)
    door_app.router.add_get("/same/{name}", same)
    door_port = await serve(door_app)
    return door_port


WARM = Attempt(status=206, data=4, size=1000)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_the_door_gets_the_token_and_a_pool_on_another_port_never(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path, fast_path: bool
) -> None:
    """Door requests carry ``Bearer <token>``; the pool it redirects to (same host, another
    port: another origin) never gets an Authorization header; after the token file is
    rewritten, the next request carries the new token."""
    seen = Seen()
    port = await _door_and_pool(serve, seen)
    first, second = issuer.mint(), issuer.mint(subject="renewed")
    token = _source(tmp_path / "bt_u1000", first)
    async with HttpToucher(serve.client, fast_path=fast_path, token=token) as toucher:
        assert await toucher.touch(f"https://127.0.0.1:{port}/data/a") == WARM
        assert await toucher.touch(f"https://127.0.0.1:{port}/data/b") == WARM
        write_token(tmp_path / "bt_u1000", second)
        assert await toucher.touch(f"https://127.0.0.1:{port}/data/c") == WARM
        stats = toucher.fast_path_stats
    assert seen.door == [f"Bearer {first}", f"Bearer {first}", f"Bearer {second}"]
    assert seen.pool == [None, None, None]
    if fast_path:  # the pool hops were the fast path's own, not aiohttp fallbacks
        assert stats is not None and stats.hops == 3 and stats.hop_fallbacks == 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_a_same_origin_redirect_keeps_the_token(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path, fast_path: bool
) -> None:
    """A door redirecting to itself (same scheme, host and port) gets the token on both hops
    (the fast path hands such a hop to aiohttp, which sends it); the pool still does not."""
    seen = Seen()
    port = await _door_and_pool(serve, seen)
    text = issuer.mint()
    async with HttpToucher(serve.client, fast_path=fast_path,
                           token=_source(tmp_path / "bt", text)) as toucher:
        assert await toucher.touch(f"https://127.0.0.1:{port}/same/a") == WARM
    assert seen.door == [f"Bearer {text}", f"Bearer {text}"]
    assert seen.pool == [None]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_once_off_the_origin_the_token_is_not_sent_even_back_there(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path, fast_path: bool
) -> None:
    """door -> pool -> door: the token goes with the first request only; the pool and the
    second door hop (after leaving the origin) get none, as aiohttp's own redirects do."""
    seen = Seen()
    port = await _door_and_pool(serve, seen, back_to_door=True)
    text = issuer.mint()
    async with HttpToucher(serve.client, fast_path=fast_path,
                           token=_source(tmp_path / "bt", text)) as toucher:
        assert await toucher.touch(f"https://127.0.0.1:{port}/data/a") == WARM
    assert seen.door == [f"Bearer {text}", None]
    assert seen.pool == [None]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_without_a_token_no_authorization_is_sent(serve: Serve, fast_path: bool) -> None:
    """A toucher without a token sends no Authorization header anywhere (proxy-only runs)."""
    seen = Seen()
    port = await _door_and_pool(serve, seen)
    async with HttpToucher(serve.client, fast_path=fast_path) as toucher:
        assert await toucher.touch(f"https://127.0.0.1:{port}/data/a") == WARM
    assert seen.door == [None] and seen.pool == [None]


# --- an expired token ------------------------------------------------------------------------


async def _counting(serve: Serve, status: int = 206,
                    headers: Optional[dict[str, str]] = None) -> tuple[int, list[Optional[str]]]:
    """A server answering every GET with ``status`` (206: 4 bytes), recording each request's
    Authorization header; its port and the record."""
    seen: list[Optional[str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if status == 206:
            return _partial()
        return web.Response(status=status, text="permission denied", headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return await serve(app), seen


async def _files(urls: Iterable[str]) -> AsyncIterator[FileRef]:
    for url in urls:
        yield FileRef(name=url.rsplit("/", 1)[-1], url=url)


def _urls(port: int, n: int) -> list[str]:
    return [f"https://127.0.0.1:{port}/data/f{i:04d}" for i in range(n)]


async def _warm(toucher: HttpToucher, urls: list[str], *, token: Optional[TokenSource],
                breaker: Optional[BreakerConfig] = None) -> RunReport:
    settings = WarmSettings(concurrency=32, retry=NO_RETRY, breaker=breaker or BreakerConfig(),
                            sends_token=token is not None,
                            credential_hint=token.info.describe() if token else "")
    return await warm(_files(urls), settings, toucher)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_an_expired_token_sends_nothing_and_fails_the_touch(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path, fast_path: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token that expired (here: the clock moved past its exp; an expired renewal would not
    replace it) is never sent: the touch is a Failure.CREDENTIAL attempt whose error says why,
    without the token's text."""
    port, seen = await _counting(serve)
    path = tmp_path / "bt"
    token = _source(path, text := issuer.mint(lifetime=60))
    async with HttpToucher(serve.client, fast_path=fast_path, token=token) as toucher:
        assert await toucher.touch(f"https://127.0.0.1:{port}/data/a") == WARM
        later = datetime.now(timezone.utc) + timedelta(seconds=120)
        monkeypatch.setattr("prestaged.tokens._utcnow", lambda: later)
        attempt = await toucher.touch(f"https://127.0.0.1:{port}/data/b")
    assert attempt.failure is Failure.CREDENTIAL and attempt.status is None
    assert "expired at" in attempt.error and str(path) in attempt.error
    assert text not in attempt.error and text.split(".")[2] not in attempt.error
    assert len(seen) == 1  # the first touch only


async def test_a_token_expiring_mid_run_stops_it_with_exit_3(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """The engine turns the first unsendable-token attempt into the run's abort (exit 3,
    "expired"); no request reaches the storage with the expired token."""
    port, seen = await _counting(serve)
    expired = issuer.mint(lifetime=-30)
    token = TokenSource(FoundToken(expired, "$BEARER_TOKEN", None))
    async with HttpToucher(serve.client, token=token) as toucher:
        report = await _warm(toucher, _urls(port, 200), token=token)
    assert report.aborted is not None and report.exit_code == 3
    assert "token from $BEARER_TOKEN: expired at" in str(report.aborted)
    assert expired not in str(report.aborted)
    assert seen == []


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_an_upper_case_scheme_still_gets_the_token(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path, fast_path: bool
) -> None:
    """Schemes ignore case: HTTPS:// and Https:// URLs went without the token, and the run
    stopped with exit 3 blaming it. The toucher sends it to them, and a run (whose URLs
    touch_url gives the scheme in lower case) is done."""
    port, seen = await _counting(serve)
    token = _source(tmp_path / "bt", text := issuer.mint())
    upper = [url.replace("https://", scheme) for url, scheme in
             zip(_urls(port, 4), ["HTTPS://", "Https://"] * 2)]
    async with HttpToucher(serve.client, fast_path=fast_path, token=token) as toucher:
        assert await toucher.touch(upper[0]) == WARM
        assert [header == f"Bearer {text}" for header in seen] == [True]  # (no token shown)
        report = await _warm(toucher, upper, token=token)
    assert report.aborted is None and report.exit_code == 0
    assert [header == f"Bearer {text}" for header in seen] == [True] * 5
    assert touch_url("HTTPS://h:1/f") == "https://h:1/f"
    assert touch_url("DAVS://h/f") == "https://h/f"
    assert touch_url("HTTP://h/f", allow_plain_http=True) == "http://h/f"


# --- refusals and the breaker ----------------------------------------------------------------

DCACHE_401 = {"WWW-Authenticate": 'Bearer realm="dCache", error="invalid_token", '
                                  'error_description="Token signature is invalid"'}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
@pytest.mark.parametrize(("status", "headers", "quoted"), [
    (403, None, None),  # XRootD: 403 for every token problem, no WWW-Authenticate
    (401, DCACHE_401, "the server says: invalid_token: Token signature is invalid"),
], ids=["xrootd-403", "dcache-401"])
async def test_a_refused_token_reaches_the_endpoint_at_most_token_denials_times(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path, fast_path: bool, status: int,
    headers: Optional[dict[str, str]], quoted: Optional[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """32 workers, 300 files, every request refused: exactly ``token_denials`` (3) requests
    reach the endpoint (first contact is one at a time), the run stops with exit 3 naming the
    token (issuer, subject, scopes) and quoting the server's description, never its text."""
    caplog.set_level(logging.DEBUG)
    port, seen = await _counting(serve, status, headers)
    text = issuer.mint("storage.create:/dune", subject="alice")
    token = _source(tmp_path / "bt", text)
    async with HttpToucher(serve.client, fast_path=fast_path, token=token) as toucher:
        report = await _warm(toucher, _urls(port, 300), token=token)
    message = str(report.aborted)
    assert report.exit_code == 3 and len(seen) == 3 == BreakerConfig().token_denials
    assert f"denied 3 files in a row (HTTP {status}" in message
    assert "issuer https://localhost:8443/issuer, subject alice, scopes storage.create:/dune" \
        in message
    assert "storage.read" in message
    if quoted is not None:
        assert quoted in message
    signature = text.split(".")[2]
    assert signature not in message and signature not in caplog.text
    assert all(signature not in o.error for o in report.tally.failures)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_a_proxy_run_refused_sends_at_most_breaker_denials(
    serve: Serve, fast_path: bool
) -> None:
    """Without a token the denials breaker keeps its own threshold (``denials``), and the
    first-contact gate holds the requests reaching a refusing endpoint to exactly that."""
    port, seen = await _counting(serve, 403)
    breaker = BreakerConfig(denials=5)
    async with HttpToucher(serve.client, fast_path=fast_path) as toucher:
        report = await _warm(toucher, _urls(port, 300), token=None, breaker=breaker)
    assert report.exit_code == 3 and len(seen) == 5
    assert "denied 5 files in a row (HTTP 403)" in str(report.aborted)
    assert seen == [None] * 5


async def test_the_gate_opens_at_the_first_accepted_answer(
    serve: Serve, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """After the first 206 the endpoint gets its full concurrency: many requests in flight at
    once (each handler waits until 8 are in, which a run stuck at one at a time never reaches)."""
    in_flight = [0, 0]  # now, most
    crowd = asyncio.Event()
    answered = [0]

    async def handle(request: web.Request) -> web.Response:
        answered[0] += 1
        if answered[0] > 1:  # the first answers at once (first contact); the rest wait for 8
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            if in_flight[0] >= 8:
                crowd.set()
            await asyncio.wait_for(crowd.wait(), 5)  # a guard: a stuck gate fails, slowly
            in_flight[0] -= 1
        return _partial()

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    port = await serve(app)
    token = _source(tmp_path / "bt", issuer.mint())
    async with HttpToucher(serve.client, token=token) as toucher:
        report = await _warm(toucher, _urls(port, 40), token=token)
    assert report.exit_code == 0 and in_flight[1] >= 8


def test_bearer_error_reads_the_challenge_safely() -> None:
    """bearer_error: the Bearer challenge among several, quoted-pair unescaping, nothing for a
    challenge without error or a non-Bearer one, control characters dropped, a JWT-shaped echo
    redacted, the result bounded, a huge header read only in its first 4 KiB."""
    assert bearer_error('Basic realm="dCache", Bearer realm="x", error="insufficient_scope", '
                        'error_description="needs \\"storage.read\\""') == \
        'insufficient_scope: needs "storage.read"'
    assert bearer_error("Bearer error=invalid_token") == "invalid_token"
    assert bearer_error('Bearer realm="dCache"') == ""
    assert bearer_error('Basic realm="x", error="not ours"') == ""
    assert bearer_error(None) == ""
    assert bearer_error('Bearer error="a\x00b\x1bc\td"') == "a b c d"
    echoed = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJl"
    assert bearer_error(f'Bearer error_description="bad token {echoed}"') == \
        "bad token [redacted]"
    assert len(bearer_error('Bearer error="' + "x " * 5000 + '"')) <= 160
    assert bearer_error(" " * 5000 + 'Bearer error="late"') == ""


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
async def test_a_plain_http_url_never_gets_the_token(
    issuer: TokenIssuer, tmp_path: Path, fast_path: bool
) -> None:
    """storage.allow_plain_http lets an http:// URL through, but the token is not sent in
    clear: the server sees no Authorization header."""
    seen: list[Optional[str]] = []

    async def data(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return _partial()

    app = web.Application()
    app.router.add_get("/data/{name}", data)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        token = _source(tmp_path / "bt", issuer.mint())
        async with HttpToucher(None, fast_path=fast_path, token=token) as toucher:
            assert await toucher.touch(f"http://127.0.0.1:{port}/data/a") == WARM
    finally:
        await runner.cleanup()
    assert seen == [None]
