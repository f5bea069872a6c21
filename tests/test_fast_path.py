"""The toucher's keep-alive fast path (``storage.fast``) against real servers on 127.0.0.1.

Every case touches the same URL with the fast path on and off and requires the same ``Attempt``;
the fast path's counters and the server's statistics show which path did the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp
import pytest

from prestaged.catalog.local import LocalCatalog
from prestaged.config import load_config
from prestaged.context import Context
from prestaged.credentials import load_credentials
from prestaged.model import ERROR_TEXT_MAX, Attempt, Failure, Result, redact
from prestaged.runner import run_definition
from prestaged.storage.fast import (
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    FastPath,
    connect_timeout_text,
)
from prestaged.storage.http import HttpToucher
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
    ThreadedStorageServer,
)
from prestaged.testing.xrootd import XRootDServer, xrootd_available
from prestaged.warm import WarmSettings

pytestmark = pytest.mark.timeout(120)
MiB = 1024**2


def _client(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                             ca_dir_configured=None, min_lifetime=3600)
    return creds.ssl_context()


@pytest.fixture
def ctx(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    """The client SSL context with the test proxy."""
    return _client(pki, proxy)


@pytest.fixture
async def storage(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """The test storage, requiring a client certificate."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        yield srv


@contextlib.asynccontextmanager
async def _toucher(ctx: Optional[ssl.SSLContext], *, fast: bool = True,
                   **kwargs: object) -> AsyncIterator[HttpToucher]:
    kwargs.setdefault("timeout", 20.0)
    async with HttpToucher(ctx, limit=8, limit_per_host=8, fast_path=fast,
                           **kwargs) as t:  # type: ignore[arg-type]
        yield t


async def _both(ctx: ssl.SSLContext, url: str, prepare: Callable[[], None],
                **kwargs: object) -> tuple[Attempt, Attempt, HttpToucher]:
    """Touch ``url`` with the fast path (after ``prepare()``), then without (after it again)."""
    prepare()
    async with _toucher(ctx, **kwargs) as fast:
        got = await fast.touch(url)
    prepare()
    async with _toucher(ctx, fast=False, **kwargs) as slow:
        want = await slow.touch(url)
    return got, want, fast


def _stats(t: HttpToucher) -> tuple[int, int]:
    stats = t.fast_path_stats
    assert stats is not None
    return stats.answered, stats.fallbacks


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` (it depends on the client's own loop) until true or ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_many_files_on_few_kept_alive_connections(
    ctx: ssl.SSLContext, storage: StorageServer
) -> None:
    """200 files, 8 at once: all answered by the fast path over at most 8 connections."""
    paths = [f"/pnfs/ds/f{i:04d}.root" for i in range(200)]
    sem = asyncio.Semaphore(8)
    async with _toucher(ctx) as t:

        async def one(p: str) -> Attempt:
            async with sem:
                return await t.touch(storage.url(p))

        got = await asyncio.gather(*(one(p) for p in paths))
        stats = t.fast_path_stats
    assert set(got) == {Attempt(status=206, data=4, size=1 << 20)}
    assert stats is not None and (stats.answered, stats.fallbacks) == (200, 0)
    assert stats.connections <= 8 and stats.reused >= 192
    assert storage.stats.connections["door"] <= 8
    for p in paths:
        st = storage.stats.path(p)
        assert (st.methods, st.ranges, st.bytes_sent) == (["GET"], ["bytes=0-3"], 4)


async def test_connections_bounded_per_host(ctx: ssl.SSLContext, storage: StorageServer) -> None:
    """limit_per_host 2 with 16 files at once: two connections, the others wait, no fallback."""
    async with HttpToucher(ctx, limit=8, limit_per_host=2) as t:
        got = await asyncio.gather(*(t.touch(storage.url(f"/w/{i}")) for i in range(16)))
        stats = t.fast_path_stats
    assert set(got) == {Attempt(status=206, data=4, size=1 << 20)}
    assert stats is not None and (stats.answered, stats.fallbacks, stats.connections) == (16, 0, 2)
    assert storage.stats.connections["door"] == 2


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        ([], Attempt(status=206, data=4, size=1 << 20)),
        ([Status(404, body=b"no such file\n")], Attempt(status=404, error="HTTP 404 Not Found")),
        ([Status(403)], Attempt(status=403, error="HTTP 403 Forbidden")),
        ([Status(503, retry_after="7")],
         Attempt(status=503, retry_after=7.0, error="HTTP 503 Service Unavailable")),
        ([Status(500, body=b"x" * 5000)],
         Attempt(status=500, error="HTTP 500 Internal Server Error")),
        ([Status(204)], Attempt(status=204)),
    ],
    ids=["206", "404", "403", "503-retry-after", "500-long-body", "204"],
)
async def test_final_answers_equal_the_aiohttp_path(
    ctx: ssl.SSLContext, storage: StorageServer, actions: list[Action], expected: Attempt
) -> None:
    """206, 404, 403, 503 with Retry-After, a long error body, 204: same Attempt, fast path."""
    got, want, fast = await _both(ctx, storage.url("/f"), lambda: storage.inject("/f", actions))
    assert got == want == expected
    assert _stats(fast) == (1, 0)


async def test_error_body_drained_or_connection_closed(
    ctx: ssl.SSLContext, storage: StorageServer
) -> None:
    """A short 404 body is drained and the connection reused; a 5 KB one costs the connection."""
    storage.inject("/short", [Status(404, body=b"x" * 100)])
    storage.inject("/long", [Status(404, body=b"x" * 5000)])
    async with _toucher(ctx) as t:
        await t.touch(storage.url("/short"))
        await t.touch(storage.url("/a"))
        await t.touch(storage.url("/long"))
        await t.touch(storage.url("/b"))
        stats = t.fast_path_stats
    assert stats is not None and (stats.connections, stats.answered) == (2, 4)


async def test_empty_and_missing_files(ctx: ssl.SSLContext, storage: StorageServer) -> None:
    """416 (empty file) and 404 (removed) are the same Attempt and Result on both paths."""
    storage.set_size("/empty", 0)
    storage.remove("/gone")
    for path, result in (("/empty", Result.EMPTY), ("/gone", Result.MISSING)):
        got, want, fast = await _both(ctx, storage.url(path), lambda: None)
        assert got == want and got.result is result
        assert _stats(fast) == (1, 0)


async def test_server_ignoring_range_reads_n_bytes_and_drops_the_connection(
    ctx: ssl.SSLContext, storage: StorageServer
) -> None:
    """A 200 streaming 10 GiB: 4 bytes read, warm, and that connection is closed."""
    got, want, fast = await _both(
        ctx, storage.url("/huge"), lambda: storage.inject("/huge", [IgnoreRange(10 * 1024**3)]))
    assert got == want == Attempt(status=200, data=4, size=10 * 1024**3)
    assert _stats(fast) == (1, 0)
    await storage.wait_until(lambda s: s.active_requests == 0 and s.open_connections() == 0)
    first = storage.stats.path("/huge").records[0]
    assert first.bytes_sent < 16 * 1024**2, "the client must drop the connection, not read on"


async def test_nbytes_larger_than_the_file(ctx: ssl.SSLContext, storage: StorageServer) -> None:
    """Asking 16 bytes of a 10-byte file: 10 bytes, size 10, the connection kept."""
    storage.set_size("/small", 10)
    got, want, fast = await _both(ctx, storage.url("/small"), lambda: None, nbytes=16)
    assert got == want == Attempt(status=206, data=10, size=10)
    assert _stats(fast) == (1, 0)


async def test_redirect_followed_on_a_one_shot_connection(ctx: ssl.SSLContext,
                                                         pki: TestPKI) -> None:
    """Door 302 -> pool: both answers are the fast path's (the pool's on a connection closed
    after its read), the same Attempts as aiohttp's, and no aiohttp session is opened."""
    async with StorageServer(pki.server_ssl_context(), redirect=True,
                             pool_ssl_context=pki.pool_ssl_context()) as srv:
        urls = [srv.url(f"/pnfs/r/f{i}") for i in range(20)]
        async with _toucher(ctx) as fast:
            got = [await fast.touch(u) for u in urls]
            assert fast._session is None
        async with _toucher(ctx, fast=False) as slow:
            want = [await slow.touch(u) for u in urls]
        assert got == want
        assert set(got) == {Attempt(status=206, data=4, size=1 << 20)}
        assert _stats(fast) == (20, 0)
        stats = fast.fast_path_stats
        assert stats is not None and (stats.hops, stats.hop_fallbacks) == (20, 0)
        assert srv.stats.connections["door"] == 2  # one per toucher: door kept alive
        assert srv.stats.connections["pool"] == 40  # one mover connection per read
        await srv.wait_until(lambda s: s.open_connections("pool") == 0, timeout=10)


async def test_reset_mid_request_falls_back(ctx: ssl.SSLContext, storage: StorageServer) -> None:
    """A reset before any answer is handed to aiohttp, which classifies it as it always did."""
    for resets in (1, 3):
        got, want, fast = await _both(
            ctx, storage.url("/flaky"), lambda n=resets: storage.inject("/flaky", [Reset()] * n))
        assert got == want
        assert _stats(fast) == (0, 1)
        storage.clear_faults()
    assert want.failure is Failure.RESET


async def test_timeout_is_the_attempt_limit(ctx: ssl.SSLContext, storage: StorageServer) -> None:
    """A server slower than the attempt limit times out once, not once per path."""
    loop = asyncio.get_running_loop()
    storage.inject("/slow", [Delay(30)])
    start = loop.time()
    async with _toucher(ctx, timeout=0.5) as t:
        got = await t.touch(storage.url("/slow"))
    assert loop.time() - start < 5
    assert got == Attempt(failure=Failure.TIMEOUT, error="timed out")
    assert storage.stats.path("/slow").requests == 1


async def test_unreachable_endpoint_falls_back(ctx: ssl.SSLContext, pki: TestPKI) -> None:
    """Nothing listening: the fast path cannot connect and aiohttp reports it unreachable."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        url = srv.url("/f")
    got, want, fast = await _both(ctx, url, lambda: None)
    assert got == want and got.failure is Failure.UNREACHABLE
    assert _stats(fast) == (0, 1)


async def test_untrusted_client_falls_back_to_the_same_refusal(pki: TestPKI, tmp_path: Path) -> None:
    """A proxy the server rejects (TLS 1.2: inside the handshake) is a TLS failure on both."""
    server_ctx = pki.server_ssl_context()
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client = pki.client_ssl_context(pki.make_foreign_proxy(tmp_path / "foreign"))
    async with StorageServer(server_ctx) as srv:
        got, want, fast = await _both(client, srv.url("/f"), lambda: None)
    assert got == want and got.failure is Failure.TLS
    assert _stats(fast) == (0, 1)


def test_idle_connections_closed_by_the_server(ctx: ssl.SSLContext, pki: TestPKI) -> None:
    """The server closes the pooled connections while idle, unseen or seen: no failure."""

    async def run(srv: Callable[[], Awaitable[None]], url: str) -> tuple[Attempt, ...]:
        async with _toucher(ctx) as t:
            first = await t.touch(url)
            # Restart the server on the same port with this loop blocked: the idle connection is
            # closed by the server but the client has not seen it yet (a stale keep-alive).
            await srv()
            stale = await t.touch(url)
            assert _stats(t) == (1, 1)
            again = await t.touch(url)  # a new fast-path connection
            assert _stats(t) == (2, 1)
            # Now let the client see the close before the next touch: no stale connection used.
            await srv()
            fast = t._fast
            assert fast is not None
            await _until(lambda: fast.open == 0)
            fresh = await t.touch(url)
            assert _stats(t) == (3, 1)
            return first, stale, again, fresh

    servers: list[ThreadedStorageServer] = []

    def start(port: int = 0) -> ThreadedStorageServer:
        srv = ThreadedStorageServer(pki.server_ssl_context(), door_port=port)
        srv.start()
        servers.append(srv)
        return srv

    first_server = start()
    port = first_server.door_port

    async def restart() -> None:
        servers[-1].stop()  # blocks this loop: the client sees nothing meanwhile
        start(port)

    try:
        answers = asyncio.run(run(restart, first_server.url("/f")))
    finally:
        for s in servers:
            s.stop()
    assert set(answers) == {Attempt(status=206, data=4, size=1 << 20)}


async def test_urls_that_are_not_plain_skip_the_fast_path(
    ctx: ssl.SSLContext, storage: StorageServer
) -> None:
    """Spaces, non-ASCII, userinfo, escapes: aiohttp only, same answers as without."""
    base = storage.url("/")
    user = base.replace("https://", "https://someone@")
    for url in (base + "a b.root", base + "caf\u00e9.root", user + "x", base + "bad%zz",
                base + "a%41b"):
        got, want, fast = await _both(ctx, url, lambda: None)
        assert got == want
        assert _stats(fast) == (0, 0)


async def test_queries_and_sub_delimiters_use_the_fast_path(
    ctx: ssl.SSLContext, storage: StorageServer
) -> None:
    """A query and sub-delimiters in the path are sent as they are, like aiohttp sends them."""
    base = storage.url("/")
    for url in (base + "f?x=1", base + "a,b;c=d(1)~.root"):
        got, want, fast = await _both(ctx, url, lambda: None)
        assert got == want and got.status == 206
        assert _stats(fast) == (1, 0)
    assert storage.stats.path("/a,b;c=d(1)~.root").requests == 2


def test_config_turns_it_off(ctx: ssl.SSLContext, tmp_path: Path) -> None:
    """storage.fast_path defaults to true; false makes the toucher use aiohttp only."""
    cfg = tmp_path / "prestaged.toml"
    cfg.write_text("")
    assert load_config(cfg).storage.fast_path is True
    cfg.write_text("[storage]\nfast_path = false\n")
    off = load_config(cfg).storage.fast_path
    assert off is False

    async def stats() -> object:
        async with HttpToucher(ctx, fast_path=off) as t:
            return t.fast_path_stats

    assert asyncio.run(stats()) is None


async def test_runs_follow_the_config_key(ctx: ssl.SSLContext, storage: StorageServer,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_definition`` (the CLI's and the daemon's path) builds the fast path only when
    storage.fast_path is true; both ways every file is warm."""
    made: list[int] = []
    real_init = FastPath.__init__

    def counting_init(self: FastPath, *args: Any, **kwargs: Any) -> None:
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(FastPath, "__init__", counting_init)
    definition = tmp_path / "ds.txt"
    definition.write_text("".join(storage.url(f"/cfg/f{i}") + "\n" for i in range(5)))
    for flag in ("true", "false"):
        path = tmp_path / f"{flag}.toml"
        path.write_text(f"[storage]\nfast_path = {flag}\n")
        cfg = load_config(path)
        async with Context(cfg).make_toucher(ctx) as toucher:
            report = await run_definition(LocalCatalog(str(definition)),
                                          WarmSettings.from_config(cfg), toucher)
        assert report.tally.results["warm"] == 5
        assert len(made) == 1  # the first run (true) made one; the second (false) none
    assert storage.stats.path("/cfg/f0").requests == 2


@pytest.mark.parametrize("redirect", [False, True], ids=["direct", "door-pool"])
async def test_a_run_the_fast_path_serves_never_loads_aiohttp(
    pki: TestPKI, proxy: Path, tmp_path: Path, redirect: bool
) -> None:
    """``prestaged warm --stage never`` of plain URLs that all answer 206, directly or through a
    door's redirect to a pool, does not import aiohttp at all (a third of a one-file run's
    start-up); the Tape REST discovery of ``--stage auto`` does load it."""
    async with StorageServer(pki.server_ssl_context(), redirect=redirect) as srv:
        definition = tmp_path / "ds.txt"
        definition.write_text("".join(srv.url(f"/lean/f{i}") + "\n" for i in range(20)))
        code = ("import sys; from prestaged.cli import main; rc = main(sys.argv[1:]); "
                "print('aiohttp' in sys.modules, rc)")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "warm", str(definition), "--proxy", str(proxy),
            "--ca-dir", str(pki.ca_dir), "--no-state", "-q", "--stage", "never",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert out.decode().split()[-2:] == ["False", "0"], err.decode()
    assert srv.stats.path("/lean/f19").requests == (2 if redirect else 1)


async def test_a_fallback_after_close_opens_no_session(ctx: ssl.SSLContext,
                                                      storage: StorageServer) -> None:
    """A file whose fast attempt fails while the run closes the toucher (a breaker stopping it)
    gets a reset, not a new aiohttp session that nothing would close ("Unclosed client
    session" on stderr, seen on real XRootD refusing a stranger's proxy)."""
    toucher = HttpToucher(ctx, fast_path=True)
    await toucher.start()
    fast = toucher._fast
    assert fast is not None

    async def fails_as_the_run_closes(*args: object) -> None:
        await toucher.close()

    fast.fetch = fails_as_the_run_closes  # type: ignore[method-assign, assignment]
    attempt = await toucher.touch(storage.url("/closing/f0"))
    assert (attempt.failure, attempt.error) == (Failure.RESET, "connection pool closed")
    assert toucher._session is None
    assert storage.stats.path("/closing/f0").requests == 0


# --- canned answers: what the test storage cannot send ----------------------------------------


class _Canned:
    """A TLS server on 127.0.0.1 answering each request (read up to its blank line) with the
    next of ``answers`` verbatim, then closing if the answer is the last; counts connections."""

    def __init__(self, server_ctx: ssl.SSLContext, answers: list[bytes]) -> None:
        self.ctx = server_ctx
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: Optional[asyncio.AbstractServer] = None

    async def __aenter__(self) -> _Canned:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def url(self, path: str) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.sockets[0].getsockname()[1]}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(self.answers.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


_XROOTD_EMPTY = (b"HTTP/1.1 206 Partial Content\r\nConnection: Keep-Alive\r\n"
                 b"Content-Length: 4\r\nContent-Range: bytes 0-3/0\r\n\r\n")
_OK = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/99\r\nContent-Length: 4\r\n\r\nabcd"


@pytest.fixture
def canned(pki: TestPKI) -> Callable[[list[bytes]], _Canned]:
    """Factory of canned-answer servers with the test host certificate (no client cert)."""
    return lambda answers: _Canned(pki.server_ssl_context(require_client_cert=False), answers)


async def test_canned_answers(ctx: ssl.SSLContext,
                              canned: Callable[[list[bytes]], _Canned]) -> None:
    """XRootD's bodiless empty 206, Connection: close, an odd reason, a chunked 206."""
    cases = [
        (_XROOTD_EMPTY, Attempt(status=206, data=0, size=0), 1),
        (b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Range: bytes 0-3/9\r\n"
         b"Content-Length: 4\r\n\r\nabcd", Attempt(status=206, data=4, size=9), 1),
        (b"HTTP/1.1 404 Nicht gefunden, sorry \r\nContent-Length: 0\r\n\r\n",
         Attempt(status=404, error="HTTP 404 Nicht gefunden, sorry"), 0),
        (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n",
         Attempt(status=206, data=4, size=5), 0),
    ]
    for answer, expected, closes in cases:
        results = []
        for fast in (True, False):
            async with canned([answer, _OK]) as srv, _toucher(ctx, fast=fast) as t:
                results.append(await t.touch(srv.url("/f")))
                # A second touch shows whether the first connection was kept.
                assert await t.touch(srv.url("/g")) == Attempt(status=206, data=4, size=99)
                if fast:
                    assert _stats(t) == (2, 0)
                    assert srv.connections == 1 + closes, answer
        assert results == [expected, expected]


_CHALLENGES = [
    # dCache: a Basic challenge, then the Bearer one with what went wrong
    (b"WWW-Authenticate: Basic realm=\"dCache\"\r\nWWW-Authenticate: Bearer realm=\"dCache\", "
     b"error=\"invalid_token\", error_description=\"Token has expired\"\r\n",
     "invalid_token: Token has expired"),
    (b"WWW-Authenticate: Bearer error=\"insufficient_scope\", "
     b"error_description=\"Zugriff f\xc3\xbcr /dune verweigert\"\r\n",
     "insufficient_scope: Zugriff f\u00fcr /dune verweigert"),
    (b"WWW-Authenticate: Bearer error=\"bad\xff\xfebytes\"\r\n", "bad bytes"),
    (b"WWW-Authenticate: Basic realm=\"x\"\r\n", ""),
]


@pytest.mark.parametrize(("header", "said"), _CHALLENGES,
                         ids=["dcache-two-challenges", "utf-8", "invalid-utf-8", "basic-only"])
@pytest.mark.parametrize("status", [401, 403])
async def test_bearer_challenges_equal_the_aiohttp_path(
    ctx: ssl.SSLContext, canned: Callable[[list[bytes]], _Canned], header: bytes,
    said: str, status: int
) -> None:
    """A 401/403's WWW-Authenticate (repeated, non-ASCII, invalid UTF-8, not Bearer):
    the same Attempt on both paths, quoting the Bearer error (``auth_error``, in the error
    text too) and nothing unprintable."""
    reason = b"Unauthorized" if status == 401 else b"Forbidden"
    answer = (b"HTTP/1.1 %d %s\r\n" % (status, reason) + header
              + b"Content-Length: 0\r\n\r\n")
    results = []
    for fast in (True, False):
        async with canned([answer, _OK]) as srv, _toucher(ctx, fast=fast) as t:
            results.append(await t.touch(srv.url("/f")))
            if fast:
                assert _stats(t) == (1, 0)
    got, want = results
    assert got == want and got.status == status
    assert got.auth_error == said
    if said:
        assert got.error == f"HTTP {status} {reason.decode()} ({got.auth_error})"


async def test_malformed_answer_falls_back(ctx: ssl.SSLContext,
                                           canned: Callable[[list[bytes]], _Canned]) -> None:
    """Garbage instead of HTTP: the fast path gives up and aiohttp reports what it sees."""
    junk = b"SSH-2.0-OpenSSH_9.2\r\n\r\n"
    async with canned([junk, junk, junk]) as srv:
        async with _toucher(ctx) as t:
            got = await t.touch(srv.url("/f"))
            assert _stats(t) == (0, 1)
        async with _toucher(ctx, fast=False) as t:
            want = await t.touch(srv.url("/f"))
    assert got == want and got.failure is Failure.PROTOCOL


# --- hostile answers (the test kit's Raw and Flood): aiohttp's limits and results, bounded -------

_H206 = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/99\r\nContent-Length: 4\r\n"
_A206 = _H206 + b"\r\nabcd"
_A404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_FLOOD = 32 * MiB  # far past every limit: the client must hang up long before the end
_REFUSED = (None, Failure.PROTOCOL)  # aiohttp refuses the answer: a protocol failure


def _field(size: int) -> bytes:
    """A header line whose name and value together are ``size`` bytes."""
    return b"X: " + b"y" * (size - 1) + b"\r\n"


_HOSTILE: list[tuple[str, Action, tuple[Optional[int], Optional[Failure]]]] = [
    ("header-line-without-end", Flood(_H206 + b"X-Big: ", b"a", _FLOOD, b"\r\n\r\nabcd"), _REFUSED),
    ("headers-without-end", Flood(_H206, b"X-H: v\r\n", _FLOOD, b"\r\nabcd"), _REFUSED),
    ("reason-without-end",
     Flood(b"HTTP/1.1 404 ", b"x", _FLOOD, b"\r\nContent-Length: 0\r\n\r\n"), _REFUSED),
    ("reason-at-limit",
     Raw(b"HTTP/1.1 404 " + b"x" * MAX_LINE_SIZE + b"\r\nContent-Length: 0\r\n\r\n"), (404, None)),
    ("reason-past-limit",
     Raw(b"HTTP/1.1 404 " + b"x" * (MAX_LINE_SIZE + 1) + b"\r\nContent-Length: 0\r\n\r\n"),
     _REFUSED),
    ("field-at-limit", Raw(_H206 + _field(MAX_FIELD_SIZE) + b"\r\nabcd"), (206, None)),
    ("field-near-limit", Raw(_H206 + _field(MAX_FIELD_SIZE + 1) + b"\r\nabcd"), (206, None)),
    ("field-past-limit", Raw(_H206 + _field(MAX_FIELD_SIZE + 2) + b"\r\nabcd"), _REFUSED),
    ("first-field-past-limit",
     Raw(b"HTTP/1.1 206 Partial Content\r\n" + _field(MAX_FIELD_SIZE + 1) + b"\r\nabcd"), _REFUSED),
    ("names-past-limit", Raw(_H206 + b"N" * (MAX_FIELD_SIZE - 10) + b": 1\r\n" + b"M" * 11
                             + b": 2\r\n\r\nabcd"), _REFUSED),
    ("headers-at-limit", Raw(_H206 + b"X: y\r\n" * (MAX_HEADERS - 2) + b"\r\nabcd"), (206, None)),
    ("headers-past-limit", Raw(_H206 + b"X: y\r\n" * (MAX_HEADERS - 1) + b"\r\nabcd"), _REFUSED),
    ("206-then-404-in-one-write", Raw(_A206 + _A404), (206, None)),
    ("404-then-206-in-one-write", Raw(_A404 + _A206), (404, None)),
    ("two-answers-connection-left-open", Raw(_A206 + _A404, close=False), (206, None)),
    ("garbage-status-line", Raw(b"HTTP/1.1 abc Weird\r\n\r\n"), _REFUSED),
    ("not-http-at-all", Raw(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"), _REFUSED),
    ("truncated-head", Raw(b"HTTP/1.1 206 Partial Content\r\nContent-Ra"), (None, Failure.RESET)),
    # The head came: the server answered (not a refused connection), then broke off.
    ("truncated-body", Raw(_A206[:-2]), (206, Failure.RESET)),
    # XRootD 5.5's answer to a range past a short file's end: the head is all there is.
    ("range-past-the-end", Raw(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/2"
                               b"\r\nContent-Length: 4\r\n\r\n"), (206, None)),
    ("total-of-5000-digits", Raw(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/"
                                 + b"9" * 5000 + b"\r\nContent-Length: 4\r\n\r\nabcd"),
     (206, None)),
    ("nul-in-header-value", Raw(_H206 + b"X: a\x00b\r\n\r\nabcd"), _REFUSED),
    ("old-websocket-header", Raw(_H206 + b"Sec-WebSocket-Key1: 1\r\n\r\nabcd"), _REFUSED),
]


def test_fast_path_limits_are_aiohttps() -> None:
    """The fast path's parser limits are the installed aiohttp session's defaults (ours)."""
    params = inspect.signature(aiohttp.ClientSession.__init__).parameters
    assert params["max_line_size"].default == MAX_LINE_SIZE
    assert params["max_field_size"].default == MAX_FIELD_SIZE
    assert params["max_headers"].default == MAX_HEADERS


@pytest.mark.parametrize(("action", "expect"), [(a, e) for _, a, e in _HOSTILE],
                         ids=[name for name, _, _ in _HOSTILE])
async def test_hostile_answers_equal_the_aiohttp_path(
    ctx: ssl.SSLContext, storage: StorageServer, action: Action,
    expect: tuple[Optional[int], Optional[Failure]]
) -> None:
    """Endless or oversized heads, two answers in one write, garbage, truncation: the same
    Attempt on both paths, bounded error text, a client that hangs up within a few MiB, and a
    connection that never serves the next file a stale answer."""
    results = []
    for fast in (True, False):
        storage.clear_faults()
        # The fast path may hand the file back, and aiohttp retries a GET once on a disconnect.
        storage.inject("/h", [action] * 3)
        async with _toucher(ctx, fast=fast, timeout=10.0) as t:
            results.append(await t.touch(storage.url("/h")))
            assert await t.touch(storage.url("/next")) == Attempt(status=206, data=4, size=1 << 20)
    got, want = results
    assert got == want
    assert (got.status, got.failure) == expect, got
    assert len(got.error) <= ERROR_TEXT_MAX
    await storage.wait_until(lambda s: s.active_requests == 0, timeout=10)
    assert all(r.bytes_sent < 4 * MiB for r in storage.stats.path("/h").records)


@pytest.mark.parametrize("location", [
    "http://{silent}/x", "http://user:secret@{silent}/x", "davs://{silent}/x",
    "ftp://127.0.0.1/x", "file:///etc/passwd",
])
async def test_redirects_off_https_are_refused(ctx: ssl.SSLContext, storage: StorageServer,
                                               location: str) -> None:
    """A 302 from https to http (or ftp:, file:, davs:) is never followed, on either path: the
    file fails naming the target, its credentials redacted, and nothing connects there."""
    async with SilentEndpoint() as silent:
        target = location.format(silent=f"127.0.0.1:{silent.port}")
        answer = Raw(b"HTTP/1.1 302 Found\r\nLocation: " + target.encode()
                     + b"\r\nContent-Length: 0\r\n\r\n")
        got, want, fast = await _both(ctx, storage.url("/r"),
                                      lambda: storage.inject("/r", [answer]))
        assert silent.connections == 0
    assert got == want == Attempt(status=302, failure=Failure.PROTOCOL,
                                  error=f"refused redirect to {redact(target)}")
    assert "secret" not in got.error
    assert _stats(fast) == (1, 0)


def test_redirect_rules() -> None:
    """Followed: to https from anywhere, to http from http (a URL the engine let through);
    refused, with the redirect's status: https to http at any hop, and every other scheme."""
    from yarl import URL

    from prestaged.storage.http import _refused_redirect

    https, http = URL("https://door/f"), URL("http://door/f")
    assert _refused_redirect(https, URL("https://pool/f"), 302) is None
    assert _refused_redirect(http, URL("https://pool/f"), 302) is None
    assert _refused_redirect(http, URL("http://pool/f"), 302) is None
    assert _refused_redirect(https, URL("http://u:p@pool/f"), 307) == Attempt(
        status=307, failure=Failure.PROTOCOL,
        error="refused redirect to http://***@pool/f")
    for target in ("file:///etc/passwd", "ftp://pool/f", "davs://pool/f"):
        refused = _refused_redirect(http, URL(target), 302)
        assert refused is not None and refused.error == f"refused redirect to {target}"


async def test_urls_of_other_schemes_fail_without_raising(ctx: ssl.SSLContext) -> None:
    """davs:, root:, file:, ftp: given to the toucher itself fail that file on both paths;
    aiohttp would raise NonHttpUrlClientError out of touch()."""
    for url in ("davs://127.0.0.1:1/f", "root://127.0.0.1:1094//f", "file:///etc/passwd",
                "ftp://127.0.0.1/f"):
        got, want, fast = await _both(ctx, url, lambda: None)
        scheme = url.partition(":")[0]
        assert got == want == Attempt(failure=Failure.PROTOCOL,
                                      error=f"unsupported scheme {scheme}://")
        assert _stats(fast) == (0, 0)  # none of these is the fast path's


async def test_handshake_that_never_ends_is_unreachable_after_connect_timeout(
    ctx: ssl.SSLContext
) -> None:
    """An endpoint that accepts TCP and never answers the TLS handshake: after connect_timeout
    (not the attempt's timeout) the file is unreachable, the same on both paths, and the fast
    path does not hand it to aiohttp to wait a second time."""
    async with SilentEndpoint() as silent:
        loop = asyncio.get_running_loop()
        start = loop.time()
        got, want, fast = await _both(ctx, silent.url("/f"), lambda: None, connect_timeout=0.5,
                                      timeout=30.0)
        elapsed = loop.time() - start
        assert silent.connections == 2  # one per path
    assert got == want == Attempt(failure=Failure.UNREACHABLE, error=connect_timeout_text(0.5))
    assert _stats(fast) == (1, 0)
    assert elapsed < 10  # two connect timeouts, not two attempt timeouts


# --- the real XRootD ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xrootd(pki: TestPKI) -> Iterator[XRootDServer]:
    """A real XRootD with three files and an empty one (skipped without xrootd)."""
    if not xrootd_available():
        pytest.skip("xrootd not found: install Debian package xrootd-server")
    with XRootDServer(pki, files=3, empty_files=1, audit=False) as server:
        yield server


async def test_xrootd_files_and_empty_file(ctx: ssl.SSLContext, xrootd: XRootDServer) -> None:
    """On XRootD, files and an empty file (206 bytes 0-3/0, no body) match the aiohttp path."""
    urls = [*xrootd.urls()[:3], xrootd.url(xrootd.empty_names[0]), xrootd.url("nope.dat")]
    async with _toucher(ctx) as fast:
        got = [await fast.touch(u) for u in urls]
        assert _stats(fast) == (5, 0)
    async with _toucher(ctx, fast=False) as slow:
        want = [await slow.touch(u) for u in urls]
    assert got == want
    assert [a.result for a in got] == [Result.WARM] * 3 + [Result.EMPTY, Result.MISSING]


def test_on_uvloop(ctx: ssl.SSLContext, pki: TestPKI) -> None:
    """On uvloop (the CLI's loop): plain reads, a server ignoring Range, a reset, an empty file."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> tuple[list[Attempt], tuple[int, int]]:
        async with StorageServer(pki.server_ssl_context()) as srv:
            srv.inject("/huge", [IgnoreRange()])
            srv.inject("/flaky", [Reset()])
            srv.set_size("/empty", 0)
            async with _toucher(ctx) as t:
                got = [await t.touch(srv.url(p)) for p in ("/a", "/b", "/huge", "/flaky", "/empty")]
            return got, _stats(t)

    loop = uvloop.new_event_loop()
    try:
        got, stats = loop.run_until_complete(run())
    finally:
        loop.close()
    warm = Attempt(status=206, data=4, size=1 << 20)
    assert got == [warm, warm, Attempt(status=200, data=4, size=10 * 1024**3), warm,
                   # The server's reason phrase: "Range Not Satisfiable" from Python 3.13 on.
                   Attempt(status=416, error=f"HTTP 416 {HTTPStatus(416).phrase}")]
    assert stats == (4, 1)


async def test_redirects_share_one_attempts_timeout(ctx: ssl.SSLContext, pki: TestPKI) -> None:
    """``--timeout`` bounds one attempt, redirects included. On the aiohttp path (an escaped
    URL, a token's same-origin hops, ``fast_path = false``) every hop had all of it: five
    hops of 0.4 s each passed a 1 s timeout (and six slow hops of the default 60 s took six
    minutes). The attempt now times out."""
    from aiohttp import web

    from prestaged.testing.appserver import serving

    async def hop(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        await asyncio.sleep(0.4)  # the server's slowness, not a wait of the test
        if n < 5:
            raise web.HTTPFound(f"/hop/{n + 1}")
        return web.Response(status=206, body=b"abcd",
                            headers={"Content-Range": "bytes 0-3/99"})

    app = web.Application()
    app.router.add_get("/hop/{n}", hop)
    async with serving(app, pki.server_ssl_context()) as port:
        for fast in (True, False):  # a %-escape keeps the fast path out: aiohttp does it all
            async with _toucher(ctx, fast=fast, timeout=1.0) as t:
                got = await t.touch(f"https://localhost:{port}/hop/%31")
            assert got.failure is Failure.TIMEOUT, (fast, got)
        async with _toucher(ctx, fast=False, timeout=5.0) as t:
            assert (await t.touch(f"https://localhost:{port}/hop/1")).status == 206
