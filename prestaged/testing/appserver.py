"""The lifecycle the aiohttp-based service emulators share (SAM web, MetaCat): listen on
``host``:``port`` (0: a free port) with an optional TLS context, stop idempotently, ``async with``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from typing import Optional, TypeVar

from aiohttp import web

__all__ = ["AppServer"]

S = TypeVar("S", bound="AppServer")


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

    def _app(self) -> web.Application:
        """The application to serve (called once per ``start()``)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Listen on ``host``:``port`` (0: a free port)."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
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
