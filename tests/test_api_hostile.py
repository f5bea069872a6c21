"""The daemon's API against hostile or clumsy clients, over real sockets to ``prestaged
serve``: what aiohttp's own parser refuses never puts the token in the log, a client dropping
mid-body is one quiet line, and one that never finishes its body no longer holds the daemon's
exit for aiohttp's 60 s (past systemd's stop timeout after the drain)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from daemon_harness import DEADLINE, Daemon, free_port, write_config

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
    head = b"GET /api/v1/runs/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    for bad in (b"Authorization: Bearer " + TOKEN.encode() + b"\x00\r\n",
                b"Authorization: Bearer " + TOKEN.encode() + b"\x01\r\n",
                b"Authorization: Bearer " + TOKEN.encode() + b"A" * 9000 + b"\r\n"):
        assert _send(port, head + bad + b"\r\n").startswith(b"HTTP/1.")
    post = (b"POST /api/v1/warm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
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
