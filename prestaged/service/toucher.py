"""The daemon's one touch path, shared by every run, gate and keep-warm it makes.

One budget (``storage.concurrency`` files in flight in total), a pause while a credential is
expired, and a connection pool that can be swapped for one built on renewed credentials without
dropping the touches in flight on the old one.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable, Optional

from prestaged.model import Attempt
from prestaged.storage.http import HttpToucher

__all__ = ["SharedToucher"]


class SharedToucher:
    """A ``warm.Toucher`` over swappable pools: ``make`` builds a pool (not started) for an SSL
    context; at most ``budget`` touches run at once across every caller."""

    def __init__(self, make: Callable[[ssl.SSLContext], HttpToucher], budget: int, *,
                 expired: Optional[Callable[[], bool]] = None) -> None:
        self._make = make
        self._expired = expired
        self._budget = asyncio.Semaphore(budget)
        self.valid = asyncio.Event()
        """Set while the credentials are usable; touches wait for it."""
        self._current: Optional[HttpToucher] = None
        self._users: dict[int, int] = {}
        self._retired: list[HttpToucher] = []

    async def install(self, ssl_context: ssl.SSLContext) -> None:
        """Use a new pool built on ``ssl_context`` for new touches; retire the old one."""
        fresh = self._make(ssl_context)
        await fresh.start()
        old, self._current = self._current, fresh
        self._users[id(fresh)] = 0
        if old is not None:
            self._retired.append(old)
            await self._close_idle()

    async def _close_idle(self) -> None:
        for t in [t for t in self._retired if self._users.get(id(t), 0) == 0]:
            self._retired.remove(t)
            self._users.pop(id(t), None)
            await t.close()

    async def usable(self) -> None:
        """Return once the credentials are valid: at once, or when the daemon sets ``valid``
        again (the Tape REST requests of the daemon's runs wait here too)."""
        await self.valid.wait()
        while self._expired is not None and self._expired():
            self.valid.clear()
            await self.valid.wait()

    async def touch(self, url: str) -> Attempt:
        """One attempt, within the shared budget, once the credentials are valid.

        ``expired`` (the bearer token's, looked at before each touch) clears ``valid`` the
        moment it turns true, so no touch goes out with an expired token while the daemon's
        credential watch has not looked yet; the watch sets ``valid`` again on renewal."""
        await self.usable()
        async with self._budget:
            t = self._current
            assert t is not None
            self._users[id(t)] += 1
            try:
                return await t.touch(url)
            finally:
                self._users[id(t)] -= 1
                if self._retired:
                    await self._close_idle()

    async def close(self) -> None:
        """Close every pool."""
        for t in [*self._retired, *([self._current] if self._current else [])]:
            await t.close()
        self._retired.clear()
        self._current = None
