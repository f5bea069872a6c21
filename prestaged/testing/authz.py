"""How the storage emulators refuse a request, and dCache's blocking of clients that collect
authorisation errors.

``refusal(style, verdict)`` answers a refused ``BearerCheck`` verdict the way a real server of
that ``style`` does:

- ``XROOTD`` (XRootD 5.5 with the SciTokens plugin, measured): 403 whatever went wrong, body
  ``permission denied``, ``Connection: close``, no ``WWW-Authenticate``;
- ``RFC6750`` (a bearer-token resource server such as StoRM WebDAV): 401 with ``WWW-Authenticate:
  Bearer error="invalid_token", error_description="<reason>"`` for a bad or expired token, 403
  with ``error="insufficient_scope"`` for a good token that does not cover the request, and a
  bare ``Bearer`` challenge when no credential came at all;
- ``DCACHE`` (dCache's ``org.dcache.http.AuthenticationHandler``): a failed login is 401 with
  the failure as the reason phrase, ``WWW-Authenticate: Basic realm="dCache"`` and no body; a
  good token without the right scope is 403 ``Permission denied``.

``AuthErrorLimiter`` is dCache 11.2's ``RateLimitedHandlerList`` as far as tokens go: per client
address, every 401 it answers is counted; once ``max_errors`` have been counted (an error more
than ``error_window`` seconds after the previous one starts the count again) the client is
blocked for ``block_seconds``: every request gets 429 ``Server is busy. Please try again
later.`` with ``Retry-After`` (whole seconds left), before any other check. 403 does not count
(dCache 11.1+). Times come from an injectable clock, so tests need not sleep.

With ``rate_overall`` set it also keeps dCache's request rates (``throttled``): each client
address may make ``client_percent`` % of ``rate_overall`` requests a second, and all clients
together ``rate_overall`` (``webdav.limits.rate.overall`` = 1000, ``...per-client.fractions`` =
25), each through Guava's ``RateLimiter.create`` (``SmoothBursty``: no stored permits at first,
unused ones stored up to one second's worth, a request admitted when its ticket is due). A
client's limiter is dropped after ``idle_seconds`` without requests (``blocked-clients.idle-
time`` = 10 s). A refused request gets 429 ``Server is busy...`` with a ``Retry-After`` drawn
from 1 to ``idle_seconds`` - 1, as dCache draws it.
"""

from __future__ import annotations

import enum
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from aiohttp import web

from prestaged.testing.tokens import INSUFFICIENT_SCOPE, NO_TOKEN, Verdict

__all__ = ["AuthErrorLimiter", "RefusalStyle", "SmoothBursty", "client_address", "refusal"]

BUSY = "Server is busy. Please try again later."


class RefusalStyle(str, enum.Enum):
    """Which real server's refusals an emulator imitates (see the module docstring)."""

    XROOTD = "xrootd"
    RFC6750 = "rfc6750"
    DCACHE = "dcache"


def _quoted(text: str) -> str:
    """``text`` safe inside a quoted header parameter."""
    return text.replace("\\", "").replace('"', "'").replace("\r", " ").replace("\n", " ")


def refusal(style: RefusalStyle, verdict: Verdict) -> web.Response:
    """The answer of a ``style`` server to a request refused with ``verdict``."""
    reason = verdict.reason or "permission denied"
    if style is RefusalStyle.XROOTD:
        resp = web.Response(status=403, text="permission denied", content_type="text/plain")
        resp.force_close()  # XrdHttp hangs up after a refusal
        return resp
    scope = verdict.kind == INSUFFICIENT_SCOPE
    if style is RefusalStyle.DCACHE:
        if scope:
            return web.Response(status=403, text="Permission denied\n", content_type="text/plain")
        phrase = None if verdict.kind == NO_TOKEN else _quoted(reason)  # anonymous: plain 401
        return web.Response(status=401, reason=phrase,
                            headers={"WWW-Authenticate": 'Basic realm="dCache"'})
    if verdict.kind == NO_TOKEN:
        challenge = "Bearer"
    else:
        error = "insufficient_scope" if scope else "invalid_token"
        challenge = f'Bearer error="{error}", error_description="{_quoted(reason)}"'
    return web.Response(status=403 if scope else 401, text=reason + "\n",
                        content_type="text/plain", headers={"WWW-Authenticate": challenge})


def client_address(request: web.BaseRequest) -> str:
    """The client as dCache's limiter names it: the first ``X-Forwarded-For`` entry, else the
    peer address (tests on loopback set the header to be several clients)."""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        return forwarded.split(",")[0].strip()
    return request.remote or ""


class SmoothBursty:
    """Guava's ``RateLimiter.create(rate)`` as dCache uses it (``tryAcquire()``, one permit):
    admitted when the next ticket is due; a permit not stored costs ``1 / rate`` seconds of the
    next ticket; idle time stores permits, up to ``rate`` (one second's worth); none at first."""

    def __init__(self, rate: float, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.interval = 1.0 / rate
        self.max_permits = rate
        self.stored = 0.0
        self.next_free = now

    def try_acquire(self, now: float) -> bool:
        """Take a permit at ``now`` (seconds) if one is due."""
        if self.next_free > now:
            return False
        self.stored = min(self.max_permits, self.stored + (now - self.next_free) / self.interval)
        self.next_free = now
        spent = min(1.0, self.stored)
        self.stored -= spent
        self.next_free += (1.0 - spent) * self.interval
        return True


@dataclass
class _Client:
    errors: int = 0
    last_error: float = -math.inf
    blocked_until: float = -math.inf


@dataclass
class AuthErrorLimiter:
    """dCache's blocking of clients with too many authorisation errors, for one service (door
    or frontend each have their own). Defaults are dCache's: ``webdav.limits.error.max-allowed``
    = 3, ``...error.block.window.time`` = 20 s (how long an error is remembered), and the block
    lasts ``...rate.per-client.block.window.time`` = 10 s. As dCache's ``RateLimitedHandlerList``
    (2026): only 401s count, the client is blocked at the ``max_errors``-th (``errors >=
    max``), and the count is forgotten ``error_window`` after the last 401
    (``expireAfterAccess``). ``clock`` gives seconds (``time.monotonic`` by default).
    ``blocks`` counts clients blocked, ``refused`` the 429s answered to blocked clients."""

    max_errors: int = 3
    error_window: float = 20.0
    block_seconds: float = 10.0
    clock: Callable[[], float] = time.monotonic
    rate_overall: Optional[float] = None
    client_percent: float = 25.0
    idle_seconds: float = 10.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    blocks: int = 0
    refused: int = 0
    _clients: dict[str, _Client] = field(default_factory=dict, repr=False)
    _rates: dict[str, tuple[SmoothBursty, float]] = field(default_factory=dict, repr=False)
    _overall: Optional[SmoothBursty] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_errors < 1 or self.error_window <= 0 or self.block_seconds <= 0:
            raise ValueError("AuthErrorLimiter needs max_errors >= 1 and positive windows, got "
                             f"{self.max_errors}, {self.error_window}, {self.block_seconds}")
        if self.rate_overall is not None:
            if not (self.rate_overall > 0 and 0 < self.client_percent <= 100
                    and self.idle_seconds >= 2):
                raise ValueError("rates need rate_overall > 0, client_percent in (0, 100] and "
                                 "idle_seconds >= 2")
            self._overall = SmoothBursty(self.rate_overall, self.clock())

    def throttled(self, client: str) -> Optional[web.Response]:
        """The 429 answer when ``client``, or all clients, are over their request rate now (the
        client's limit is checked first, as dCache does), else None."""
        if self._overall is None or self.rate_overall is None:
            return None
        now = self.clock()
        kept = self._rates.get(client)
        if kept is None or now - kept[1] >= self.idle_seconds:  # expireAfterAccess
            limiter = SmoothBursty(self.rate_overall * self.client_percent / 100.0, now)
        else:
            limiter = kept[0]
        self._rates[client] = (limiter, now)
        if limiter.try_acquire(now) and self._overall.try_acquire(now):
            return None
        wait = self.rng.randrange(1, int(self.idle_seconds))
        return web.Response(status=429, text=BUSY, headers={"Retry-After": str(wait)})

    def blocked(self, client: str) -> Optional[web.Response]:
        """The 429 answer when ``client`` is blocked now, else None."""
        state = self._clients.get(client)
        left = (state.blocked_until - self.clock()) if state is not None else 0.0
        if left <= 0:
            return None
        self.refused += 1
        return web.Response(status=429, text=BUSY, headers={"Retry-After": str(int(left))})

    def answered(self, client: str, status: int) -> None:
        """Count ``status`` answered to ``client``: a 401 is an authorisation error."""
        if status != 401:
            return
        now = self.clock()
        state = self._clients.setdefault(client, _Client())
        if now - state.last_error > self.error_window:
            state.errors = 0
        state.errors += 1
        state.last_error = now
        if state.errors >= self.max_errors:
            state.errors, state.blocked_until = 0, now + self.block_seconds
            self.blocks += 1
            self._rates.pop(client, None)  # dCache invalidates its rate limiter too
