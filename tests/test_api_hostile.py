"""The daemon's API against hostile or clumsy clients, over real sockets to ``prestaged
serve``: what aiohttp's own parser refuses never puts the token in the log, a client dropping
mid-body is one quiet line, one that never finishes its body no longer holds the daemon's
exit for aiohttp's 60 s (past systemd's stop timeout after the drain), and one that sends
nothing, trickles its headers or stalls its body is cut off after ``REQUEST_DEADLINE``."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from daemon_harness import DEADLINE, Daemon, free_port, in_process, until, write_config

from prestaged.service import api
from prestaged.service.daemon import SHUTDOWN_GRACE
from prestaged.testing.pki import TestPKI

TOKEN = "Hostile-API-t0ken-C4NARY"


def _send(port: int, request: bytes, *, answer: bool = True) -> bytes:
    """``request`` written raw to the daemon; its answer (up to the close) when ``answer``."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(request)
        if not answer:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_malformed_requests_never_log_the_token_and_a_stalled_body_does_not_hold_the_exit(
        pki: TestPKI, proxy: Path, tmp_path: Path,
        start_daemon: Callable[..., Daemon]) -> None:
    """A bad byte in the Authorization header, or a header over 8 KiB: aiohttp refused the
    request and logged its whole header line (the token) at ERROR with a traceback. A client
    dropping mid-body: an ERROR traceback each time. A body that never ends: the daemon took
    60 s more to exit after SIGTERM. Now: one WARNING line each, no token, no traceback, and
    the exit within the drain plus ``SHUTDOWN_GRACE``."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [], extra=f'token_file = "{token_file}"',
                          sections='[output]\nlog_level = "debug"\n')
    d = start_daemon(config, port, token=TOKEN)
    head = b"GET /api/v1/runs/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    for bad in (b"Authorization: Bearer " + TOKEN.encode() + b"\x00\r\n",
                b"Authorization: Bearer " + TOKEN.encode() + b"\x01\r\n",
                b"Authorization: Bearer " + TOKEN.encode() + b"A" * 9000 + b"\r\n"):
        assert _send(port, head + bad + b"\r\n").startswith(b"HTTP/1.")
    post = (b"POST /api/v1/warm HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 100"
            b"\r\n\r\n{")
    _send(port, post, answer=False)  # gone mid-body
    stalled = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        stalled.sendall(post)  # and never more
        assert d.http("GET", "/healthz")[0] == 200  # the stalled body reached the server
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        # 60 s before; the drain is 1 s here, the grace SHUTDOWN_GRACE.
        assert d.proc.wait(timeout=DEADLINE) == 0
        took = time.monotonic() - start
    finally:
        stalled.close()
    assert took < 1 + SHUTDOWN_GRACE + 10, f"the daemon took {took:.1f}s to exit"
    log = d.output()
    assert TOKEN not in log and TOKEN[:12] not in log
    assert "Traceback" not in log and "ERROR" not in log, log
    assert log.count("WARNING: API: refused a request") >= 3, log


def test_a_log_line_is_one_escaped_line_and_its_traceback_keeps_its_lines() -> None:
    """Every log line goes through the CLI's formatter: a campaign's list item or a server's
    words with an escape sequence or a line break reached the terminal and the journal raw (a
    forged line, a cleared screen). The message is escaped; a traceback after it keeps its
    lines; a URL's password and a bearer value are hidden in both."""
    import logging
    import sys

    from prestaged.cli.main import _Scrubbing

    fmt = _Scrubbing("prestaged: %(levelname)s: %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "item %s",
                               ("ds\x1b[41mX\nprestaged: ERROR: fake",), None)
    assert fmt.format(record) == "prestaged: INFO: item ds\\x1b[41mX\\x0aprestaged: ERROR: fake"
    try:
        raise RuntimeError("https://u:pw@h/f Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln")
    except RuntimeError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = fmt.format(failed)
    assert text.startswith("prestaged: ERROR: failed\nTraceback (most recent call last):\n")
    assert "u:pw@" not in text and "eyJ" not in text and "https://***@h/f" in text


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the daemon sends on a connection until it closes it (a test deadline otherwise)."""
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    except ConnectionResetError:
        return b""


async def test_a_client_too_slow_to_send_its_request_is_cut_off(
        pki: TestPKI, proxy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that sends nothing, half a request line, headers trickled a line at a
    time, or a body that stops, held a connection and a file descriptor for good (the only
    bound was the process's file limit). Each is closed once ``REQUEST_DEADLINE`` has passed,
    the stalled body with a 408, an idle kept-alive connection too, and the daemon serves
    everyone else meanwhile."""
    monkeypatch.setattr(api, "REQUEST_DEADLINE", 0.5)
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    async with in_process(config) as d:
        async def connect(first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first)
            return reader, writer

        silent = await connect(b"")
        half_line = await connect(b"GET /heal")
        trickled = await connect(b"GET /healthz HTTP/1.1\r\n")
        body = await connect(b"POST /api/v1/warm HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        kept = await connect(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        waits = {name: asyncio.ensure_future(_until_closed(reader)) for name, (reader, _) in
                 {"silent": silent, "half_line": half_line, "trickled": trickled,
                  "body": body, "kept": kept}.items()}
        start = time.monotonic()
        while not waits["trickled"].done() and time.monotonic() - start < DEADLINE:
            trickled[1].write(b"X-Slow: 1\r\n")  # a header line every 0.1 s, never the end
            await asyncio.wait({waits["trickled"]}, timeout=0.1)
        assert (await d.http("GET", "/healthz"))[0] == 200  # everyone else is served
        got = dict(zip(waits, await asyncio.gather(*waits.values())))
        took = time.monotonic() - start
        for _, writer in (silent, half_line, trickled, body, kept):
            writer.close()
    assert took < DEADLINE / 2, f"slow clients kept for {took:.1f} s"
    assert got["silent"] == got["half_line"] == got["trickled"] == b""
    assert got["kept"].startswith(b"HTTP/1.1 200 ") and got["kept"].count(b"HTTP/1.1") == 1
    head, _, answer = got["body"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), got["body"]
    assert json.loads(answer) == {"error": "the request body did not come within 0.5 s"}


async def test_connections_beyond_the_cap_are_answered_503_and_closed(
        pki: TestPKI, proxy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """1,000 idle connections from any local user took every file descriptor of a daemon
    under systemd's 1024: its API answered nothing and its runs could open no socket. Beyond
    ``MAX_CONNECTIONS`` a connection is answered 503 and closed at once (one WARNING for the
    episode), and the API serves again as soon as the others close."""
    monkeypatch.setattr(api, "MAX_CONNECTIONS", 8)
    port = free_port()
    async with in_process(write_config(tmp_path, pki, proxy, port, [])) as d:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        answers = await asyncio.gather(*(_until_closed(reader) for reader, _ in extra))
        for answer in answers:  # accepted after the 8 (the kernel's queue is first come)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), answer[:80]
            assert "8 API connections open" in json.loads(body)["error"]
        for _, writer in held + extra:
            writer.close()

        async def served() -> bool:
            try:
                return (await d.http("GET", "/healthz"))[0] == 200
            except aiohttp.ClientError:  # a close not seen by the daemon yet
                return False
        await until("the API serving again", served)
    refusals = [r for r in caplog.records if "connections open; refusing" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "WARNING"


async def test_the_daemon_in_clear_answers_only_requests_naming_this_host(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """``prestaged serve`` on loopback refuses a Host of another name (DNS rebinding) with
    421 and serves its own address and localhost."""
    port = free_port()
    async with in_process(write_config(tmp_path, pki, proxy, port, [])) as d:
        for host, status in ((f"evil.example:{port}", 421), (f"localhost:{port}", 200),
                             (f"127.0.0.1:{port}", 200)):
            async with d.session.get(f"http://127.0.0.1:{port}/api/v1/campaigns",
                                     headers={"Host": host}) as resp:
                assert resp.status == status, host
