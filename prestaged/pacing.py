"""Pacing: attempts in flight per endpoint, cut on back-pressure and grown back (AIMD).

dCache 11.2 and later rate-limit their WebDAV doors and frontend with ``429 Too Many Requests``,
and an overloaded door answers ``503``. Retrying each file (``retry.RetryPolicy``, which honours
``Retry-After``) spaces out one file's tries but keeps the same number of them in flight; the
``Pacer`` lowers that number for the endpoint that pushed back:

* each endpoint (``scheme://host:port``, ``warm.endpoint_of``) starts at the ``maximum``;
* an answer 429 or 503 halves its limit (never below 1), at most once per window: answers to
  requests sent before the last cut are the rest of the burst that caused it, and are ignored;
* after ``limit`` successes (any other HTTP answer) of requests sent since the last cut, with the
  limit in use, the limit grows by one, up to the maximum.

First contact (``gate=True``, as the engine runs it): until an endpoint has accepted us once,
one attempt at a time goes to it. An
endpoint that refuses our credentials (401/403, or a refused connection: ``refused``) refuses
every file, and a run stopped by the breaker after N refusals must not have sent 32 doomed
requests before the first answer came back (dCache blocks a client at its 3rd 401,
each within 20 s of the one before). Any other outcome opens the gate for good; it costs one round
trip per endpoint and run.

Below one in flight: an endpoint that still answers 429 or 503 at a limit of 1 limits the
request *rate* (dCache 11.2+ allows 250 requests a second per client, and a door on the same
LAN answers in a millisecond or two, so even one request at a time outruns it). Each such
answer then spaces the starts of attempts there: twice the recent gap between starts at the
first, twice the spacing at each later one (once per window, as cuts are). Every
``RATE_GROW_EVERY`` successes take a tenth off the spacing, but never beyond nine tenths of the
rate at which the endpoint last pushed back (so a steady limit is met just below it, instead of
probed over and over: each 429 costs its file a Retry-After, 1-9 s at dCache); below
``MIN_SPACING`` the spacing is dropped and the limit grows again as above.

A request without an HTTP answer (timeout, reset, TLS failure) says nothing about load and
neither cuts nor grows. Pure asyncio: windows are counted in cuts, not seconds; only the
spacing reads the loop's clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Optional

__all__ = ["BACK_PRESSURE", "MIN_SPACING", "RATE_GROW_EVERY", "REFUSALS", "Pace", "Pacer",
           "Slot"]

log = logging.getLogger(__name__)

BACK_PRESSURE = frozenset({429, 503})
"""HTTP statuses that mean "fewer requests at once, please"."""
REFUSALS = frozenset({401, 403})
"""HTTP statuses that keep an endpoint's first-contact gate shut."""
MIN_SPACING = 0.0005
"""Seconds between starts below which an endpoint is no longer spaced (2,000 a second)."""
RATE_GROW_EVERY = 16
"""Successes, while spaced, per tenth taken off the spacing."""


@dataclass(frozen=True)
class Pace:
    """An endpoint's pacing: ``limit`` (attempts in flight allowed now), ``lowest`` (the lowest
    limit it was cut to) and ``cuts`` (times it was cut); ``rate`` (attempts a second it is
    spaced to now, None: not spaced) and ``lowest_rate`` (the lowest it was spaced to)."""

    limit: int
    lowest: int
    cuts: int
    rate: Optional[float] = None
    lowest_rate: Optional[float] = None


class _Endpoint:
    """The live state of one endpoint (only ever touched from the event loop's thread)."""

    __slots__ = ("ceiling", "cuts", "gap", "gated", "in_flight", "last_start", "limit",
                 "lowest", "lowest_rate", "next_start", "spacing", "successes", "waiters")

    def __init__(self, limit: int, gated: bool) -> None:
        self.gated = gated
        """First contact: one attempt at a time until the endpoint has accepted us once."""
        self.limit = limit
        self.lowest = limit
        self.cuts = 0
        """Also the window: a slot remembers how many cuts preceded it."""
        self.in_flight = 0
        self.successes = 0
        """Successes counted toward the next increase."""
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.spacing = 0.0
        """Seconds between attempt starts (0: not spaced)."""
        self.next_start = 0.0
        self.last_start: Optional[float] = None
        self.gap = 0.0
        """Recent seconds between starts (a moving average)."""
        self.lowest_rate: Optional[float] = None
        self.ceiling = math.inf
        """Starts a second the spacing never grows beyond: nine tenths of the rate at which
        the endpoint last pushed back."""

    def pace(self) -> Pace:
        """What is reported of it."""
        rate = 1.0 / self.spacing if self.spacing else None
        return Pace(self.limit, self.lowest, self.cuts, rate, self.lowest_rate)


class Pacer:
    """Per-endpoint AIMD limits on attempts in flight; ``maximum`` (>= 1) is where every
    endpoint starts and the most it grows back to.

    ``paced`` receives the ``Pace`` of every endpoint whose limit was ever cut, updated on each
    change of its limit (pass a ``warm.Tally``'s dict to show it live); a new dict by default.
    ``on_change(endpoint, limit)`` hears every endpoint's limit when first used and on each
    change (metrics). ``gate`` (default False): each endpoint starts behind a first-contact gate
    (see the module).
    Use ``async with pacer.slot(endpoint) as slot:`` around one attempt, then ``slot.answered``.
    """

    def __init__(self, maximum: int, paced: Optional[dict[str, Pace]] = None, *,
                 on_change: Optional[Callable[[str, int], None]] = None,
                 gate: bool = False) -> None:
        if maximum < 1:
            raise ValueError(f"Pacer maximum must be >= 1, got {maximum}")
        self.maximum = maximum
        self._on_change = on_change
        self._gate = gate
        self.paced: dict[str, Pace] = {} if paced is None else paced
        self._endpoints: dict[str, _Endpoint] = {}

    def slot(self, endpoint: str) -> Slot:
        """A slot for one attempt at ``endpoint`` (an async context manager: waits for room,
        frees it on exit, cancellation included)."""
        ep = self._endpoints.get(endpoint)
        if ep is None:
            ep = self._endpoints[endpoint] = _Endpoint(self.maximum, self._gate)
            self._changed(endpoint, ep)
        return Slot(self, endpoint, ep)

    def _changed(self, endpoint: str, ep: _Endpoint) -> None:
        if self._on_change is not None:
            self._on_change(endpoint, ep.limit)

    def pace(self, endpoint: str) -> Pace:
        """``endpoint``'s pacing now (the maximum for one never seen)."""
        ep = self._endpoints.get(endpoint)
        if ep is None:
            return Pace(self.maximum, self.maximum, 0)
        return ep.pace()

    def in_flight(self, endpoint: str) -> int:
        """Slots of ``endpoint`` taken now (those granted to waiters about to resume included)."""
        ep = self._endpoints.get(endpoint)
        return 0 if ep is None else ep.in_flight

    # Acquiring and releasing. No lock and no Condition: release must be synchronous, because
    # it runs in a ``finally`` that a second cancellation must not interrupt (an awaited lock
    # there could leak the slot). A freed slot is handed to the first waiter, in order.

    async def _acquire(self, ep: _Endpoint) -> bool:
        """Take a slot of ``ep``; True when the limit was binding (we had to wait or took the
        last free slot), which is when a success may grow the limit."""
        if ep.in_flight < (1 if ep.gated else ep.limit) and not ep.waiters:
            ep.in_flight += 1
            return ep.in_flight >= ep.limit
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ep.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(ep)  # granted, then cancelled before we resumed: give it back
            elif waiter in ep.waiters:  # _grant may already have dropped it, being cancelled
                ep.waiters.remove(waiter)
            raise
        return True

    @staticmethod
    async def _start(ep: _Endpoint) -> None:
        """Wait for ``ep``'s next start time when it is spaced; note the gap between starts."""
        now = asyncio.get_running_loop().time()
        if ep.spacing:
            start = max(now, ep.next_start)
            ep.next_start = start + ep.spacing
            if start > now:
                await asyncio.sleep(start - now)
                now = start
        if ep.last_start is not None:
            gap = now - ep.last_start
            ep.gap = gap if not ep.gap else 0.8 * ep.gap + 0.2 * gap
        ep.last_start = now

    def _release(self, ep: _Endpoint) -> None:
        ep.in_flight -= 1
        self._grant(ep)

    @staticmethod
    def _grant(ep: _Endpoint) -> None:
        """Hand free slots to waiters (after a release, an increase or the gate opening; a cut
        frees none)."""
        while ep.waiters and ep.in_flight < (1 if ep.gated else ep.limit):
            waiter = ep.waiters.popleft()
            if not waiter.done():
                ep.in_flight += 1
                waiter.set_result(None)

    # Feedback.

    def _open(self, endpoint: str, ep: _Endpoint) -> None:
        ep.gated = False
        log.debug("%s accepted us: up to %d attempts at once", endpoint, ep.limit)
        self._grant(ep)

    def _cut(self, endpoint: str, ep: _Endpoint, window: int, status: int) -> None:
        if window != ep.cuts:
            return  # sent before the last cut: the same burst
        ep.cuts += 1
        ep.successes = 0
        if ep.limit == 1:  # one at a time is too fast already: space the starts
            pushed_at = 1.0 / (ep.spacing or ep.gap) if (ep.spacing or ep.gap) else math.inf
            ep.ceiling = min(ep.ceiling, 0.9 * pushed_at)
            ep.spacing = max(2 * (ep.spacing or ep.gap), 2 * MIN_SPACING)
            rate = 1.0 / ep.spacing
            ep.lowest_rate = rate if ep.lowest_rate is None else min(ep.lowest_rate, rate)
            self.paced[endpoint] = ep.pace()
            log.info("%s answered %d at 1 attempt at once: at most %.0f a second", endpoint,
                     status, rate)
            return
        old, ep.limit = ep.limit, max(1, ep.limit // 2)
        ep.lowest = min(ep.lowest, ep.limit)
        self.paced[endpoint] = ep.pace()
        log.info("%s answered %d: concurrency %d -> %d", endpoint, status, old, ep.limit)
        self._changed(endpoint, ep)

    def _grow(self, endpoint: str, ep: _Endpoint, window: int, binding: bool) -> None:
        # Only successes sent at the current limit, with the limit in use, say that it could be
        # larger: a burst sent before a cut, or a run's tail with fewer files than slots, does
        # not (without this, the reported limit would creep to the maximum at every run's end).
        if window != ep.cuts or not binding:
            return
        if ep.spacing:
            ep.successes += 1
            if ep.successes >= RATE_GROW_EVERY:
                ep.successes = 0
                ep.spacing = max(0.9 * ep.spacing, 1.0 / ep.ceiling)
                if ep.spacing < MIN_SPACING:
                    ep.spacing = 0.0
                    log.debug("%s: no longer spaced", endpoint)
                self.paced[endpoint] = ep.pace()
            return
        if ep.limit >= self.maximum:
            return
        ep.successes += 1
        if ep.successes < ep.limit:
            return
        ep.limit += 1
        ep.successes = 0
        if ep.cuts:
            self.paced[endpoint] = ep.pace()
        log.debug("%s: concurrency %d -> %d", endpoint, ep.limit - 1, ep.limit)
        self._changed(endpoint, ep)
        self._grant(ep)


class Slot:
    """One attempt's place at an endpoint (see ``Pacer.slot``); report its answer with
    ``answered`` before leaving the ``async with``."""

    __slots__ = ("_binding", "_endpoint", "_ep", "_pacer", "_window", "gated")

    def __init__(self, pacer: Pacer, endpoint: str, ep: _Endpoint) -> None:
        self._pacer = pacer
        self._endpoint = endpoint
        self._ep = ep
        self._window = 0
        self._binding = False
        self.gated = False
        """The endpoint was behind its first-contact gate when the slot was granted: report
        the attempt with ``contact`` (a plain attribute: the engine reads it per attempt)."""

    async def __aenter__(self) -> Slot:
        ep = self._ep
        self._binding = await self._pacer._acquire(ep)
        try:
            await self._pacer._start(ep)
        except BaseException:  # cancelled while spaced: __aexit__ will not run
            self._pacer._release(ep)
            raise
        self._window = ep.cuts
        self.gated = ep.gated
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pacer._release(self._ep)

    def contact(self, status: Optional[int], refused: bool) -> None:
        """First contact (when ``gated``; after ``answered``, so that a 503 has cut the limit
        before waiters enter): any outcome but 401/403 (``status``) or ``refused`` (a
        connection the endpoint refused, as the engine's breakers count it) opens the
        endpoint's gate."""
        ep = self._ep
        if ep.gated and not refused and status not in REFUSALS:
            self._pacer._open(self._endpoint, ep)

    def answered(self, status: Optional[int]) -> None:
        """The attempt's HTTP status (None: no answer, which leaves the limit alone): 429 and
        503 cut the endpoint's limit, anything else counts toward growing it."""
        if status is None:
            return
        if status in BACK_PRESSURE:
            self._pacer._cut(self._endpoint, self._ep, self._window, status)
        else:
            self._pacer._grow(self._endpoint, self._ep, self._window, self._binding)
