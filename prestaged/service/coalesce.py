"""Answers that many callers may ask for at once, computed once and shared for a moment.

``GET /api/v1/datasets`` reads every definition's warmth from the state database (tens of
milliseconds of CPU for a large one). Two hundred dashboards or scripts asking at once used to
run two hundred such reads (p50 7 s); now concurrent askers of one key share one computation,
and its answer serves for ``ttl`` seconds more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Hashable
from typing import Callable, Generic, TypeVar

__all__ = ["Coalesced"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalesced(Generic[K, V]):
    """At most one computation per key in flight, its answer kept ``ttl`` seconds (default 2);
    a failed computation is not kept (its askers all get the error)."""

    def __init__(self, ttl: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._done: dict[K, tuple[float, V]] = {}
        self._running: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        """The answer for ``key``: a recent one, the one being computed, or a new one."""
        now = self._clock()
        kept = self._done.get(key)
        if kept is not None and now - kept[0] < self.ttl:
            return kept[1]
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(compute())
            self._running[key] = running
            running.add_done_callback(lambda f: self._finished(key, f))
        # shield: one asker going away (a client hanging up) must not cancel the others'.
        return await asyncio.shield(running)

    def _finished(self, key: K, future: asyncio.Future[V]) -> None:
        self._running.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self._done[key] = (self._clock(), future.result())
            for stale in [k for k, (t, _) in self._done.items() if self._clock() - t >= self.ttl]:
                del self._done[stale]
