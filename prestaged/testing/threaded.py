"""Run an asyncio test server on its own event loop in a daemon thread, for synchronous code.

``ThreadedStorageServer`` and ``ThreadedSamWebServer`` are this with their server's mutators
forwarded: ``start()`` returns once the server listens (or raises its start-up error), mutators
run on the server's loop and return once applied, ``stop()`` stops the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Callable, Generic, Optional, Protocol, TypeVar

__all__ = ["ThreadedServer"]

T = TypeVar("T")


class _Server(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


class ThreadedServer(Generic[S]):
    """A server made by ``factory()`` (inside the thread's loop), run in a daemon thread."""

    def __init__(self, factory: Callable[[], S], name: str) -> None:
        self._factory = factory
        self._name = name
        self._server: Optional[S] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._error: Optional[BaseException] = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread; return once the server listens (or raise its start-up error)."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"{self._name} did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to start(); the thread must not die silently
            self._error = e
            self._started.set()

    async def _main(self) -> None:
        server = self._factory()
        self._stopping = asyncio.Event()
        await server.start()
        try:
            self._server, self._loop = server, asyncio.get_running_loop()
            self._started.set()
            await self._stopping.wait()
        finally:
            await server.stop()

    def stop(self) -> None:
        """Stop the server and its loop; join the thread. Idempotent."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None

    def __enter__(self: T) -> T:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    @property
    def server(self) -> S:
        """The wrapped server; touch it only from its own loop."""
        if self._server is None:
            raise RuntimeError(f"{self._name} is not running")
        return self._server

    def _run_on_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self._name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        async def call() -> T:
            return fn()

        return self._run_on_loop(call(), timeout)
