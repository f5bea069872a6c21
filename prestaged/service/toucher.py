"""The daemon's one touch path, shared by every run, gate and keep-warm it makes; and a
command's, which follows a renewed proxy file the same way.

One budget (``storage.concurrency`` files in flight in total), a pause while a credential is
expired, and a connection pool that can be swapped for one built on renewed credentials without
dropping the touches in flight on the old one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from datetime import datetime, timezone
from typing import Callable, Optional

from prestaged.credentials import Credentials, check_lifetime, inspect_proxy, warn_if_exposed
from prestaged.errors import CredentialError
from prestaged.files import file_stamp
from prestaged.locality import TapeAccess
from prestaged.model import Attempt, Failure
from prestaged.storage.http import HttpToucher

__all__ = ["ProxyFollower", "SharedToucher"]

log = logging.getLogger(__name__)


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


class ProxyFollower:
    """A command's touch path (``warm``, ``wait``, ``submit``, ``campaign run``: runs of hours
    or days) presenting the proxy file as it is now, as the daemon's credential watch does.
    Every ``recheck`` seconds (``follow``) and before a touch, the file is looked at; renewed
    (rewritten in place by condor's credmon, or renamed over by voms-proxy-init), it is checked
    and the touches (and the Tape REST requests of ``tape``) that start from then on present
    it, while those in flight finish on the old pool. A renewal that cannot be used is a
    WARNING, and the previous proxy is kept. Once the proxy in use has expired, each touch
    fails at once naming it (nothing is sent: the run stops with exit 3), instead of every
    server refusing it and the run blaming the storage. (Before, a command kept the proxy it
    started with.)"""

    def __init__(self, creds: Credentials, shared: SharedToucher,
                 tape: Optional[TapeAccess] = None, *, recheck: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert creds.proxy is not None
        self.creds = creds
        self._shared = shared
        self._tape = tape
        self._recheck = recheck
        self._clock = clock
        self._stamp = file_stamp(creds.proxy.path)
        self._next = clock() + recheck
        self._looking = asyncio.Lock()

    async def touch(self, url: str) -> Attempt:
        """One attempt at ``url`` with the proxy on disk now (see the class)."""
        if self._clock() >= self._next:
            await self._look()
        try:
            self.check()
        except CredentialError as e:
            return Attempt(failure=Failure.CREDENTIAL, error=str(e))
        return await self._shared.touch(url)

    def check(self) -> None:
        """``CredentialError`` naming the proxy in use once it has expired (unrenewed)."""
        proxy = self.creds.proxy
        assert proxy is not None
        if datetime.now(timezone.utc) >= proxy.usable_until:
            check_lifetime(proxy, 0)

    async def follow(self) -> None:
        """Look at the file every ``recheck`` seconds, touches or not, until cancelled: a
        dataset all on tape makes no touch until files land, and its Tape REST polls kept the
        first proxy past its end (the run gave up with exit 5) while a renewal sat on disk."""
        while True:
            await asyncio.sleep(self._recheck)
            await self._look()

    async def _look(self) -> None:
        async with self._looking:
            if self._clock() < self._next:
                return  # another touch looked meanwhile
            self._next = self._clock() + self._recheck
            current = self.creds.proxy
            assert current is not None
            stamp = file_stamp(current.path)
            if stamp is None or stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                info = inspect_proxy(current.path)
                check_lifetime(info, 0)
                warn_if_exposed(current.path)
                creds = dataclasses.replace(self.creds, proxy=info)
                tls = creds.ssl_context()
            except CredentialError as e:
                log.warning("proxy changed but cannot be used: %s; keeping the previous one", e)
                return
            await self._shared.install(tls)
            if self._tape is not None:
                self._tape.install(tls, creds.token)
            self.creds = creds
        log.info("proxy %s re-read: %s, %.1f h left", info.path, info.identity,
                 info.time_left().total_seconds() / 3600)
