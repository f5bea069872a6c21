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

A request without an HTTP answer (timeout, reset, TLS failure) says nothing about load and
neither cuts nor grows. Pure asyncio; no clock: windows are counted in cuts, not seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Optional

__all__ = ["BACK_PRESSURE", "REFUSALS", "Pace", "Pacer", "Slot"]

log = logging.getLogger(__name__)

BACK_PRESSURE = frozenset({429, 503})
"""HTTP statuses that mean "fewer requests at once, please"."""
REFUSALS = frozenset({401, 403})
"""HTTP statuses that keep an endpoint's first-contact gate shut."""


@dataclass(frozen=True)
class Pace:
    """An endpoint's pacing: ``limit`` (attempts in flight allowed now), ``lowest`` (the lowest
    limit it was cut to) and ``cuts`` (times it was halved)."""

    limit: int
    lowest: int
    cuts: int


class _Endpoint:
    """The live state of one endpoint (only ever touched from the event loop's thread)."""

    __slots__ = ("cuts", "gated", "in_flight", "limit", "lowest", "successes", "waiters")

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
        return Pace(ep.limit, ep.lowest, ep.cuts)

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
        if window != ep.cuts or ep.limit == 1:
            return  # sent before the last cut (same burst), or nothing left to cut
        old, ep.limit = ep.limit, max(1, ep.limit // 2)
        ep.lowest = min(ep.lowest, ep.limit)
        ep.cuts += 1
        ep.successes = 0
        self.paced[endpoint] = Pace(ep.limit, ep.lowest, ep.cuts)
        log.info("%s answered %d: concurrency %d -> %d", endpoint, status, old, ep.limit)
        self._changed(endpoint, ep)

    def _grow(self, endpoint: str, ep: _Endpoint, window: int, binding: bool) -> None:
        # Only successes sent at the current limit, with the limit in use, say that it could be
        # larger: a burst sent before a cut, or a run's tail with fewer files than slots, does
        # not (without this, the reported limit would creep to the maximum at every run's end).
        if window != ep.cuts or not binding or ep.limit >= self.maximum:
            return
        ep.successes += 1
        if ep.successes < ep.limit:
            return
        ep.limit += 1
        ep.successes = 0
        if ep.cuts:
            self.paced[endpoint] = Pace(ep.limit, ep.lowest, ep.cuts)
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
