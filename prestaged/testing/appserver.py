"""The lifecycle the aiohttp-based service emulators share (SAM web, MetaCat, Rucio): listen on
``host``:``port`` (0: a free port) with an optional TLS context, stop idempotently, ``async with``;
and injected failures (``fail``), so tests can prove a client's retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from aiohttp import web

from prestaged.testing.threaded import ThreadedServer

__all__ = ["AppServer", "ThreadedAppServer", "serving"]

S = TypeVar("S", bound="AppServer")


@contextlib.asynccontextmanager
async def serving(app: web.Application, ssl_context: Optional[ssl.SSLContext],
                  host: str = "127.0.0.1") -> AsyncIterator[int]:
    """``app`` served on ``host`` over ``ssl_context`` until the block ends: a test's server of a
    route or two, on a free port (given)."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
A = TypeVar("A", bound="AppServer")


@dataclass
class _Fault:
    path: str
    status: int
    times: int
    retry_after: Optional[float]


class AppServer:
    """An aiohttp application (``_app()``, given by the subclass) served on ``host``:``port``
    over ``ssl_context`` (None: plain HTTP). aiohttp's default line, header and body limits
    stay: an emulator must refuse what the real server refuses, never widen them to fit a
    client."""

    def __init__(self, ssl_context: Optional[ssl.SSLContext], host: str, port: int) -> None:
        self._ssl = ssl_context
        self.host = host
        self._requested_port = port
        self._runner: Optional[web.AppRunner] = None
        self._port: Optional[int] = None
        self._faults: list[_Fault] = []
        self.faults_served = 0
        """Requests answered by an injected failure instead of the emulator."""

    def fail(self, path: str, status: int, *, times: int = 1,
             retry_after: Optional[float] = None) -> None:
        """Answer the next ``times`` requests whose path ends with ``path`` with ``status`` (and
        ``Retry-After``), before the emulator sees them: a server in trouble. Call it before the
        requests (from any thread: a list append)."""
        self._faults.append(_Fault(path, status, times, retry_after))

    @web.middleware
    async def _injected_fault(self, request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        ) -> web.StreamResponse:
        for fault in self._faults:
            if fault.times > 0 and request.path.endswith(fault.path):
                fault.times -= 1
                self.faults_served += 1
                headers = ({"Retry-After": f"{fault.retry_after:g}"}
                           if fault.retry_after is not None else None)
                return web.Response(status=fault.status, text=f"injected {fault.status}",
                                    headers=headers)
        return await handler(request)

    def _app(self) -> web.Application:
        """The application to serve (called once per ``start()``)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Listen on ``host``:``port`` (0: a free port)."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        app = self._app()
        app.middlewares.append(self._injected_fault)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, self.host, self._requested_port,
                              ssl_context=self._ssl).start()
        except BaseException:
            await self.stop()
            raise
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and close connections. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._port = None

    async def __aenter__(self: S) -> S:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """The URL clients are given (the subclass's)."""
        raise NotImplementedError

    async def serve_until_signalled(self) -> None:
        """For ``python -m``: listen, print one JSON line (port, base_url, pid) on stdout, serve
        until SIGTERM or SIGINT, stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with self:
            line = {"port": self.port, "base_url": self.base_url, "pid": os.getpid()}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            await stop.wait()

    @property
    def port(self) -> int:
        """The TCP port listened on."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not listening")
        return self._port


class ThreadedAppServer(ThreadedServer[A]):
    """An ``AppServer`` in a thread (``ThreadedServer``), with the URL clients are given."""

    @property
    def base_url(self) -> str:
        """See the server's ``base_url``."""
        return self.server.base_url
