"""Retry policy: what is retryable and how long to wait, as one explicit, testable object.

Backoff before retry ``k`` (k = 1 for the first retry) is
``min(max, initial * 2**(k-1)) * (1 + U(0, jitter))``; a server's ``Retry-After`` replaces the
computed backoff (capped by ``max_retry_after``: a longer ask gives up on the file; at least
``MIN_RETRY_AFTER``). Tries are bounded by ``attempts`` and by ``total`` seconds per file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

from prestaged.model import Attempt, Failure, classify_status

__all__ = ["MIN_RETRY_AFTER", "RetryPolicy", "retry_reason"]

MIN_RETRY_AFTER = 1.0
"""Seconds waited at least for a ``Retry-After``: dCache's rate limiter (its doors and its
frontend, ``RateLimitedHandlerList``) sends the whole seconds left of a client's block, 0 in
its last second, and 0 must not spend a file's tries in a burst of immediate 429s."""

_RETRYABLE_FAILURES = frozenset({Failure.TIMEOUT, Failure.RESET, Failure.UNREACHABLE})


def retry_reason(attempt: Attempt) -> Optional[str]:
    """Why ``attempt`` deserves another try (``"503"``, ``"timeout"``, ...), or None if final."""
    if attempt.failure is not None:
        return str(attempt.failure) if attempt.failure in _RETRYABLE_FAILURES else None
    if attempt.status is not None and classify_status(attempt.status) is None:
        return str(attempt.status)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; all durations in seconds."""

    attempts: int = 5
    initial: float = 0.5
    max: float = 30.0
    jitter: float = 0.5
    total: float = 600.0
    max_retry_after: float = 300.0

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), jitter included; any
        ``retry`` works (a gate or a ``complete`` poll may retry for weeks)."""
        # 2.0 ** 1024 overflows; past 2**64 the cap has long been reached anyway.
        base = min(self.max, self.initial * 2.0 ** min(retry - 1, 64))
        return base * (1.0 + self.jitter * rand())

    def delay(
        self,
        retry: int,
        *,
        retry_after: Optional[float] = None,
        elapsed: float = 0.0,
        rand: Callable[[], float] = random.random,
    ) -> Optional[float]:
        """Seconds to wait before retry number ``retry`` (1-based), or None to give up.

        Not tied to an ``Attempt``: any client's retry loop asks here. ``retry_after`` (seconds,
        the server's ``Retry-After``; at least ``MIN_RETRY_AFTER``) replaces the backoff.
        ``elapsed``: seconds since the first try. None means stop: ``attempts`` tries were
        made, the server asked for more than ``max_retry_after``, or the wait would take the
        request to ``total`` seconds or past.
        """
        if retry >= self.attempts:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            wait = max(retry_after, MIN_RETRY_AFTER)
        else:
            wait = self.backoff(retry, rand)
        if elapsed + wait >= self.total:
            return None
        return wait

    def next_delay(self, attempt: Attempt, tries: int, elapsed: float) -> Optional[float]:
        """Delay before the next try after ``tries`` tries and ``elapsed`` seconds, or None.

        None means stop: the attempt is final, the attempts or the time budget are spent, or the
        server asked for a wait longer than ``max_retry_after`` (see ``delay``).
        """
        if retry_reason(attempt) is None:
            return None
        return self.delay(tries, retry_after=attempt.retry_after, elapsed=elapsed)
