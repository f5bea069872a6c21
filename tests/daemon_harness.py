"""``prestaged serve`` for tests: as a real subprocess (``daemon_starter``, the ``start_daemon``
fixture of conftest.py) with a fake systemd notify socket, for what crosses the process
boundary (signals, notify, exit codes, restarts); or in the test's event loop (``in_process``)
for everything else. Waits poll with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp

from prestaged.config import load_config
from prestaged.service.daemon import Daemon as ServiceDaemon
from prestaged.testing.pki import TestPKI

DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notifications:
    """A fake systemd: a datagram socket at $NOTIFY_SOCKET whose datagrams a thread collects
    as they come, like systemd does (a socket read only when a test waits would fill, and the
    daemon's sends would wait or be dropped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []
        self._changed = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._reader = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            data = self.sock.recv(4096)
            with self._changed:
                self.seen.append(data.decode())
                self._changed.notify_all()

    def wait_for(self, line: str, timeout: float = DEADLINE) -> None:
        """Block until a datagram containing the line ``line`` has arrived."""
        with self._changed:
            if not self._changed.wait_for(
                    lambda: any(line in m.splitlines() for m in self.seen), timeout):
                raise AssertionError(f"no {line!r} from the daemon; got {self.seen}")

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._reader.join()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()


class Daemon:
    """A running ``prestaged serve`` with helpers to talk to it."""

    def __init__(self, proc: subprocess.Popen[str], port: int, notify: Notifications,
                 config: Path, token: Optional[str], log: Path) -> None:
        self.proc, self.port, self.notify, self.config, self.token = proc, port, notify, config, token
        self.log = log

    def output(self) -> str:
        """What the daemon wrote to stdout and stderr so far (a file: never blocks it)."""
        return self.log.read_text(errors="replace")

    def http(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
             token: Optional[str] = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method)
        if data is not None:  # urllib's default is a form, which the API refuses (415)
            req.add_header("Content-Type", "application/json")
        if token or self.token:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            payload, status = e.read(), e.code
        ctype = "json" if payload[:1] in (b"{", b"[") else "text"
        return status, json.loads(payload) if ctype == "json" else payload.decode()

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.http("GET", "/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
                return float(m.group(3))
        return 0.0


def poll(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling an external process's state with a deadline


def write_config(tmp_path: Path, pki: TestPKI, proxy: Path, port: int, watches: list[tuple[Path, str]],
            extra: str = "", credentials: str = "", state_url: Optional[str] = None,
            sections: str = "", catalog_dir: Optional[Path] = None, state: str = "") -> Path:
    """A daemon config: ``extra`` lines go in ``[daemon]``, ``credentials`` in ``[credentials]``,
    ``state`` in ``[state]``;
    the state is ``tmp_path/state.db``, or the PostgreSQL database ``state_url`` when given;
    ``sections`` (whole tables, e.g. ``[cluster]``) go before ``[catalog.local]``, whose ``dir``
    is ``catalog_dir`` (default ``tmp_path``)."""
    where = (f"url = {json.dumps(state_url)}" if state_url is not None
             else f'path = "{tmp_path / "state.db"}"')
    text = f"""
[credentials]
proxy = "{proxy}"
ca_dir = "{pki.ca_dir}"
{credentials}
[state]
{where}
flush_interval = "100ms"
{state}
[daemon]
listen = "127.0.0.1:{port}"
drain_timeout = "1s"
credential_check = "100ms"
jitter = 0
{extra}
{sections}
[catalog.local]
dir = "{catalog_dir or tmp_path}"
"""
    for definition, every in watches:
        text += f'\n[[watch]]\ndefinition = "{definition}"\nevery = "{every}"\n'
    path = tmp_path / "prestaged.toml"
    path.write_text(text)
    return path


def state_files(*roots: Path) -> list[Path]:
    """SQLite state files (``*.db``, with their ``-wal``/``-journal``) under ``roots`` and the
    default state directory ``$XDG_STATE_HOME/prestaged``: a daemon on PostgreSQL makes none."""
    default = Path(os.environ.get("XDG_STATE_HOME", "/nonexistent")) / "prestaged"
    return sorted(p for root in (*roots, default) if root.exists()
                  for p in root.rglob("*.db*"))


def daemon_starter(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``prestaged serve`` with a config; stopped (killed if need be) after the test."""
    started: list[Daemon] = []

    def start(config: Path, port: int, token: Optional[str] = None,
              env: Optional[dict[str, str]] = None) -> Daemon:
        notify = Notifications(tmp_path / f"notify{len(started)}")
        env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify.path),
               "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}
        log = tmp_path / f"daemon{len(started)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "prestaged", "serve", "--config",
                                     str(config)], env=env, stdout=out, stderr=out, text=True)
        d = Daemon(proc, port, notify, config, token, log)
        started.append(d)
        try:
            notify.wait_for("READY=1")
        except AssertionError:
            proc.kill()
            proc.wait()
            raise AssertionError(d.output()) from None
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.wait()
        d.notify.close()




def metric_value(text: str, name: str, **labels: str) -> Optional[float]:
    """The value of series ``name{labels}`` in exposition ``text``, None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return None


async def until(what: str, check: Callable[[], Awaitable[bool]],
                timeout: float = DEADLINE) -> None:
    """Poll the async ``check`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling the daemon's state, with a deadline


class InProcess:
    """A ``Daemon`` running in the test's own event loop (no signals, no subprocess), and an
    HTTP client of its API."""

    def __init__(self, daemon: ServiceDaemon, port: int, session: aiohttp.ClientSession,
                 token: Optional[str], scheme: str = "http") -> None:
        self.daemon, self.port, self.session, self.token = daemon, port, session, token
        self.scheme = scheme

    async def http(self, method: str, path: str, body: Any = None, *,
                   token: Optional[str] = None) -> tuple[int, Any]:
        """``method path`` with ``body`` as JSON and the bearer token (``token`` overrides
        the daemon's): (status, JSON document or text)."""
        headers = {}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        async with self.session.request(method, f"{self.scheme}://127.0.0.1:{self.port}{path}",
                                        json=body, headers=headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text[:1] in ("{", "[") else text

    async def ended(self, href: str) -> dict[str, Any]:
        """The run at ``href`` (``POST /api/v1/warm``'s answer) once it is done or failed."""
        async def over() -> bool:
            return (await self.http("GET", href))[1]["state"] in ("done", "error")
        await until("the run ended", over)
        doc: dict[str, Any] = (await self.http("GET", href))[1]
        return doc

    async def metrics(self) -> str:
        """The exposition of ``/metrics``."""
        status, text = await self.http("GET", "/metrics")
        assert status == 200
        return str(text)


@contextlib.asynccontextmanager
async def in_process(config: Path, token: Optional[str] = None,
                     tls: Optional[ssl.SSLContext] = None) -> AsyncIterator[InProcess]:
    """Run ``prestaged serve --config config`` as a ``Daemon`` in this event loop until the
    block ends; then drain it and check that it exited 0. ``tls``: the daemon serves https,
    and the client verifies it with this context."""
    cfg = load_config(config)
    port = int(cfg.daemon.listen.rpartition(":")[2])
    daemon = ServiceDaemon(cfg, config)
    task = asyncio.ensure_future(daemon.run(handle_signals=False))
    started = asyncio.ensure_future(daemon.wait_started())
    await asyncio.wait({task, started}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        if task.done():
            task.result()  # the start-up error
        raise AssertionError("the daemon did not start")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE),
                                         connector=None if tls is None else
                                         aiohttp.TCPConnector(ssl=tls)) as s:
            yield InProcess(daemon, port, s, token, "http" if tls is None else "https")
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, DEADLINE) == 0
