"""Pacing: attempts in flight and request starts per endpoint, cut on push-back, grown back.

Retrying each file (``retry.RetryPolicy``, which honours ``Retry-After``) spaces out one file's
tries but keeps as many of them going; the ``Pacer`` slows down the endpoint that pushed back.
It has two controls, because servers push back in two ways:

**Concurrency, on 503.** An overloaded door (a servlet container's or a proxy's cap on
requests at once) answers ``503 Service Unavailable``:

* each endpoint (``scheme://host:port``, ``warm.endpoint_of``) starts at the ``maximum``;
* a 503 halves its limit (never below 1), at most once per window: answers to requests sent
  before the last cut are the rest of the burst that caused it, and are ignored;
* after ``limit`` successes (any other HTTP answer) of requests sent since the last cut, with the
  limit in use, the limit grows by one, up to the maximum.

**Rate, on 429.** ``429 Too Many Requests`` is a complaint about requests *per unit of time*
(RFC 6585): dCache 11.2 and later limit each client to 250 requests a second at a door and at
the frontend (``webdav.limits.rate.*``, a Guava ``SmoothBursty`` limiter). Fewer requests at
once cannot fix that: on loopback one request at a time is still faster than 250/s, and over a
WAN a cut to 1 in flight would be far slower than the limit. So a 429 sets a ceiling on
request *starts* instead, and leaves the concurrency alone:

* an endpoint has no ceiling until its first 429 (nothing is spaced at a server that never
  complained), and a 429 among fewer than ``RATE_MIN_STARTS`` (8) starts of the last second
  sets none either: a fresh dCache client limiter refuses the second of two requests closer
  than 1/rate whatever the rate, as when two runs' first requests meet;
* a 429 of a request sent since the last rate cut sets the ceiling to ``RATE_CUT`` (80 %) of
  the starts of the last ``RATE_WINDOW`` (1 s; measured over at least ``RATE_MIN_SPAN``, 0.1 s,
  so a first burst does not count as thousands a second) or of the ceiling, whichever is lower,
  never below ``RATE_FLOOR`` (1/s);
* starts are then spaced at least ``1 / ceiling`` apart, one after the other, measured from
  when the previous one really went, spaced or not (no burst credit builds up while idle);
* a 429 counts only for a start spaced at the ceiling set by the last rate cut: one spaced at
  the old ceiling is the same burst, even when it goes after the cut;
* each success of a request whose start the ceiling delayed raises it. A soft estimate (a
  first burst's: no ceiling yet and under ``RATE_WINDOW`` of use; or a 429 at a ceiling that
  held less than ``RATE_MIN_SPAN``) may be far from the limit: the ceiling grows by
  ``RATE_SOFT`` x ``RATE_GROWTH`` (0.5 request/s a success, +50 % a second) until a 429 says
  more. Otherwise by ``RATE_GROWTH`` (0.1, +10 % a second), and by a tenth of that (+1 % a
  second) from ``RATE_NEAR`` (90 %) of the rate that drew the last 429: a 429 costs its file a
  ``Retry-After`` (dCache: 1 to 9 s), so probing where the limit likely is must be slow. After
  ``RATE_MEMORY`` (60 s) without a 429 that rate is forgotten: the limit may have been lowered
  for a while only. A start that did not wait says nothing.

First contact (``gate=True``, as the engine runs it): until an endpoint has accepted us once,
one attempt at a time goes to it. An
endpoint that refuses our credentials (401/403, or a refused connection: ``refused``) refuses
every file, and a run stopped by the breaker after N refusals must not have sent 32 doomed
requests before the first answer came back (dCache blocks a client at its 3rd 401,
each within 20 s of the one before). Any other outcome opens the gate for good; it costs one round
trip per endpoint and run.

A request without an HTTP answer (timeout, reset, TLS failure) says nothing about load and
neither cuts nor grows. Windows are counted in cuts, not seconds; the clock and the sleep are
injectable (tests drive the rate on a fake clock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Optional

__all__ = ["BACK_PRESSURE", "REFUSALS", "Pace", "Pacer", "Rates", "Slot"]

log = logging.getLogger(__name__)

BACK_PRESSURE = frozenset({429, 503})
"""HTTP statuses that mean "slower, please": 503 cuts the concurrency, 429 the rate."""
RATE_WINDOW = 1.0
"""Seconds of recent starts measured when a 429 sets an endpoint's rate ceiling."""
RATE_MIN_SPAN = 0.1
"""The shortest span the starts are counted over (a first burst is not 1,000s a second)."""
RATE_MIN_STARTS = 8
"""Starts in the window a first 429 needs to set a ceiling (fewer measure nothing)."""
RATE_CUT = 0.8
"""A 429 sets the ceiling to this share of the measured start rate (or of the ceiling)."""
RATE_GROWTH = 0.1
"""Requests/s added to the ceiling by each success whose start the ceiling delayed (a tenth of
it from ``RATE_NEAR`` of the rate that drew the last 429)."""
RATE_NEAR = 0.9
"""Share of the rate that drew the last 429 from which growth is slow."""
RATE_SOFT = 5
"""Growth is this many times ``RATE_GROWTH`` (+50 % a second) after a soft estimate."""
RATE_MEMORY = 60.0
"""Seconds after a 429 during which growth near the rate that drew it stays slow: a limit
lowered for a while (other clients sharing dCache's overall rate) is not remembered for good."""
RATE_FLOOR = 1.0
"""Requests/s: the lowest ceiling a 429 can set."""
REFUSALS = frozenset({401, 403})
"""HTTP statuses that keep an endpoint's first-contact gate shut."""


@dataclass(frozen=True)
class Pace:
    """An endpoint's pacing: ``limit`` (attempts in flight allowed now), ``lowest`` (the lowest
    limit it was cut to) and ``cuts`` (times it was halved, on 503); ``rate`` (request starts
    a second allowed now, None while it answered no 429) and ``rate_cuts`` (429s that set it)."""

    limit: int
    lowest: int
    cuts: int
    rate: Optional[float] = None
    rate_cuts: int = 0


class _Rate:
    """One endpoint's request-rate state (only ever touched from the event loop's thread)."""

    __slots__ = ("cut_at", "cuts", "firm", "first_start", "last_start", "rate", "starts",
                 "too_fast", "turns")

    def __init__(self) -> None:
        self.rate: Optional[float] = None
        """Request starts a second allowed (None: no 429 yet, starts are not spaced)."""
        self.cuts = 0
        """Also the rate's window, as ``_Endpoint.cuts`` is the concurrency's."""
        self.turns = asyncio.Lock()
        """Held by the start being spaced (with a ``rate``)."""
        self.last_start = float("-inf")
        """When the last start went (the clock's time)."""
        self.starts: deque[float] = deque()
        """Start times of the last ``RATE_WINDOW`` seconds (what a 429 measures)."""
        self.too_fast = 0.0
        """The start rate that drew the last 429 (where growth slows down)."""
        self.firm = False
        """``too_fast`` was not measured over a first burst (see ``_slow``)."""
        self.cut_at = float("-inf")
        """When the last 429 set the ceiling (the clock's time)."""
        self.first_start = float("inf")


class Rates:
    """Request-rate ceilings by endpoint, for one client. dCache limits requests per client, so
    the daemon gives one ``Rates`` to the ``Pacer`` of every run it makes: runs at once share
    one ceiling per door (not one each, which would add up past the limit), and a run starts at
    the ceiling the last one learned rather than with a burst. A ``Pacer`` without one has its
    own."""

    def __init__(self) -> None:
        self._endpoints: dict[str, _Rate] = {}

    def of(self, endpoint: str) -> _Rate:
        """``endpoint``'s state (new and unspaced when first asked)."""
        r = self._endpoints.get(endpoint)
        if r is None:
            r = self._endpoints[endpoint] = _Rate()
        return r


def _forget_old(starts: deque[float], now: float) -> None:
    """Drop the start times older than ``RATE_WINDOW`` before ``now``."""
    while starts and starts[0] < now - RATE_WINDOW:
        starts.popleft()


class _Endpoint:
    """The live state of one endpoint (only ever touched from the event loop's thread)."""

    __slots__ = ("cuts", "gated", "in_flight", "limit", "lowest", "r", "successes", "waiters")

    def __init__(self, limit: int, gated: bool, r: _Rate) -> None:
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
        self.r = r
        """Its request rate (perhaps shared with other Pacers: ``Rates``)."""

    def pace(self) -> Pace:
        """The ``Pace`` now."""
        return Pace(self.limit, self.lowest, self.cuts, self.r.rate, self.r.cuts)


class Pacer:
    """Per-endpoint AIMD limits on attempts in flight (503) and on request starts a second
    (429); ``maximum`` (>= 1) is where every endpoint's concurrency starts and the most it
    grows back to.

    ``paced`` receives the ``Pace`` of every endpoint whose concurrency or rate was ever cut,
    updated on each change (pass a ``warm.Tally``'s dict to show it live); a new dict by
    default. ``rates``: the request-rate ceilings, shared with other Pacers (the daemon's
    runs) or, by default, this one's own. ``clock`` and ``sleep`` (``time.monotonic``,
    ``asyncio.sleep``) space the starts.
    ``on_change(endpoint, limit)`` hears every endpoint's limit when first used and on each
    change (metrics); ``on_rate(endpoint, rate)`` each ceiling a 429 sets and each raise of
    it. ``gate`` (default False): each endpoint starts behind a first-contact gate
    (see the module).
    Use ``async with pacer.slot(endpoint) as slot:`` around one attempt, then ``slot.answered``.
    """

    def __init__(self, maximum: int, paced: Optional[dict[str, Pace]] = None, *,
                 on_change: Optional[Callable[[str, int], None]] = None,
                 on_rate: Optional[Callable[[str, float], None]] = None,
                 gate: bool = False, rates: Optional[Rates] = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if maximum < 1:
            raise ValueError(f"Pacer maximum must be >= 1, got {maximum}")
        self.maximum = maximum
        self._clock = clock
        self._sleep = sleep
        self._rates = Rates() if rates is None else rates
        self._on_change = on_change
        self._on_rate = on_rate
        self._gate = gate
        self.paced: dict[str, Pace] = {} if paced is None else paced
        self._endpoints: dict[str, _Endpoint] = {}

    def slot(self, endpoint: str) -> Slot:
        """A slot for one attempt at ``endpoint`` (an async context manager: waits for room,
        frees it on exit, cancellation included)."""
        ep = self._endpoints.get(endpoint)
        if ep is None:
            ep = self._endpoints[endpoint] = _Endpoint(self.maximum, self._gate,
                                                       self._rates.of(endpoint))
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

    def _release(self, ep: _Endpoint) -> None:
        ep.in_flight -= 1
        self._grant(ep)

    async def _start(self, endpoint: str, ep: _Endpoint) -> tuple[bool, int]:
        """Wait for this start's turn under ``ep``'s rate ceiling, if it has one, and note the
        start. Returns whether the ceiling delayed it (then a success may raise the ceiling)
        and the rate window of the start: one spaced at the rate before a cut belongs to the
        burst before that cut, whenever it comes."""
        r = ep.r
        window = r.cuts
        delayed = False
        if r.rate is None:
            now = self._clock()
        else:
            # One start at a time, each 1/rate after the one before it really went: a start the
            # loop woke late does not let the next one come early (dCache's limiter, with no
            # permits stored, refuses two requests closer than 1/rate).
            async with r.turns:
                window = r.cuts
                now = self._clock()
                assert r.rate is not None  # a ceiling is never taken away
                wait = r.last_start + 1.0 / r.rate - now
                if wait > 0:
                    await self._sleep(wait)
                    now = self._clock()
                    delayed = True
                    if endpoint not in self.paced:  # spaced at a ceiling another run set
                        self.paced[endpoint] = ep.pace()
        r.last_start = now  # unspaced starts too: a new ceiling counts from the last of them
        r.first_start = min(r.first_start, now)  # inf before the first
        r.starts.append(now)
        _forget_old(r.starts, now)
        return delayed, window

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
        self.paced[endpoint] = ep.pace()
        log.info("%s answered %d: concurrency %d -> %d", endpoint, status, old, ep.limit)
        self._changed(endpoint, ep)

    def _slow(self, endpoint: str, ep: _Endpoint, window: int) -> None:
        """A 429 of a request sent in rate window ``window``: set the ceiling (module doc)."""
        r = ep.r
        if window != r.cuts:
            return  # sent before the last rate cut: the same burst
        now = self._clock()
        starts = r.starts
        _forget_old(starts, now)
        old = r.rate
        if old is None and len(starts) < RATE_MIN_STARTS:
            # A fresh dCache client limiter refuses the second of two requests closer than
            # 1/rate, whatever the rate: a handful of starts says nothing of it.
            log.debug("%s answered 429 after %d starts: no ceiling yet", endpoint, len(starts))
            return
        span = RATE_WINDOW if not starts else min(RATE_WINDOW, max(RATE_MIN_SPAN, now - starts[0]))
        measured = len(starts) / span
        r.too_fast = measured if old is None else min(old, measured)
        # Soft: a first burst's (no ceiling yet, under a second of use), or one at a ceiling
        # that held less than RATE_MIN_SPAN. Otherwise the starts measured are the ceiling's,
        # a fair picture of where the limit is.
        r.firm = (now - r.first_start >= RATE_WINDOW
                  or (old is not None and now - r.cut_at >= RATE_MIN_SPAN))
        r.cut_at = now
        r.rate = max(RATE_FLOOR, RATE_CUT * r.too_fast)
        r.cuts += 1
        self._rate_changed(endpoint, ep, r.rate)
        log.info("%s answered 429: at most %.1f requests/s (%s)", endpoint, r.rate,
                 f"was {old:.1f}" if old is not None else f"{len(starts)} sent in {span:.2f} s")

    def _speed_up(self, endpoint: str, ep: _Endpoint, window: int) -> None:
        r = ep.r
        if window != r.cuts or r.rate is None:
            return
        if not r.firm:
            r.rate += RATE_GROWTH * RATE_SOFT
        elif RATE_NEAR * r.too_fast <= r.rate and self._clock() - r.cut_at < RATE_MEMORY:
            r.rate += RATE_GROWTH / 10
        else:
            r.rate += RATE_GROWTH
        self._rate_changed(endpoint, ep, r.rate)

    def _rate_changed(self, endpoint: str, ep: _Endpoint, rate: float) -> None:
        self.paced[endpoint] = ep.pace()
        if self._on_rate is not None:
            self._on_rate(endpoint, rate)

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
        if endpoint in self.paced:
            self.paced[endpoint] = ep.pace()
        log.debug("%s: concurrency %d -> %d", endpoint, ep.limit - 1, ep.limit)
        self._changed(endpoint, ep)
        self._grant(ep)


class Slot:
    """One attempt's place at an endpoint (see ``Pacer.slot``); report its answer with
    ``answered`` before leaving the ``async with``."""

    __slots__ = ("_binding", "_delayed", "_endpoint", "_ep", "_pacer", "_rate_window",
                 "_window", "gated")

    def __init__(self, pacer: Pacer, endpoint: str, ep: _Endpoint) -> None:
        self._pacer = pacer
        self._endpoint = endpoint
        self._ep = ep
        self._window = 0
        self._rate_window = 0
        self._binding = False
        self._delayed = False
        self.gated = False
        """The endpoint was behind its first-contact gate when the slot was granted: report
        the attempt with ``contact`` (a plain attribute: the engine reads it per attempt)."""

    async def __aenter__(self) -> Slot:
        ep = self._ep
        self._binding = await self._pacer._acquire(ep)
        try:
            # The slot first, then the turn: a turn taken while waiting for a slot would be
            # spent idle, and the starts would bunch up when slots free, above the ceiling.
            self._delayed, self._rate_window = await self._pacer._start(self._endpoint, ep)
        except BaseException:
            self._pacer._release(ep)  # cancelled while spaced: __aexit__ will not run
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
        """The attempt's HTTP status (None: no answer, which leaves the pacing alone): 503 cuts
        the endpoint's concurrency, 429 its rate; anything else counts toward growing both."""
        if status is None:
            return
        if status == 429:
            self._pacer._slow(self._endpoint, self._ep, self._rate_window)
        elif status in BACK_PRESSURE:
            self._pacer._cut(self._endpoint, self._ep, self._window, status)
        else:
            self._pacer._grow(self._endpoint, self._ep, self._window, self._binding)
            if self._delayed:
                self._pacer._speed_up(self._endpoint, self._ep, self._rate_window)
