"""What one touch gave: ``Attempt`` (an HTTP status or a ``Failure``) and its ``Result`` class.

Shared by the aiohttp path (``storage.http``) and the keep-alive fast path (``storage.fast``),
which must give identical attempts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

from prestaged.storage.text import error_text

__all__ = [
    "CONTENT_RANGE_TOTAL",
    "DRAIN_LIMIT",
    "REDIRECTS",
    "Attempt",
    "Failure",
    "Result",
    "classify_status",
    "parse_retry_after",
]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CONTENT_RANGE_TOTAL = re.compile(r"/\s*(\d+)\s*$")
# Small error/redirect bodies are drained so the connection can be reused; anything larger
# (or of unknown length) costs a closed connection instead of reading it.
DRAIN_LIMIT = 1024


class Result(str, enum.Enum):
    """Outcome class of one file (persisted: values are stable strings)."""

    WARM = "warm"
    EMPTY = "empty"
    MISSING = "missing"
    DENIED = "denied"
    FAILED = "failed"
    SKIPPED_FRESH = "skipped_fresh"
    STAGING = "staging"

    def __str__(self) -> str:
        return self.value


class Failure(str, enum.Enum):
    """Why an attempt did not get an HTTP answer we can classify (drives retry and breakers)."""

    TIMEOUT = "timeout"
    RESET = "reset"  # connection dropped/reset mid-request
    UNREACHABLE = "unreachable"  # could not connect at all
    TLS = "tls"  # handshake or certificate failure: a credential/trust problem, not retried
    PROTOCOL = "protocol"  # malformed answer, bad redirect, bad URL: not retried

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Attempt:
    """What one try at one URL gave: an HTTP status, or a ``Failure`` and its text."""

    status: Optional[int] = None
    data: int = 0
    """Bytes of file data read (<= n)."""
    failure: Optional[Failure] = None
    error: str = ""
    retry_after: Optional[float] = None
    """Seconds the server asked us to wait (Retry-After), if any."""
    redirected: bool = False
    size: Optional[int] = None
    """File size when the answer tells it (Content-Range total, or a 200's Content-Length)."""

    def __post_init__(self) -> None:
        # The one place error text is made fit to keep, whoever built the attempt (both toucher
        # paths, the engine): a server's 5 MB reason phrase or a library's message quoting
        # ``https://user:pw@host/`` must not reach the outcome, the state store or the report.
        if self.error:
            object.__setattr__(self, "error", error_text(self.error))

    @property
    def result(self) -> Optional[Result]:
        """Outcome class of a final answer; None for failures and retryable statuses."""
        if self.failure is not None or self.status is None:
            return None
        if self.status in (200, 206) and self.size == 0:
            return Result.EMPTY
        return classify_status(self.status)


def classify_status(status: int) -> Optional[Result]:
    """Map a final HTTP status to a ``Result``; None means retryable (5xx, 429, 408)."""
    if status in (200, 206):
        return Result.WARM
    if status == 416:
        return Result.EMPTY
    if status in (404, 410):
        return Result.MISSING
    if status in (401, 403):
        return Result.DENIED
    if status >= 500 or status in (408, 429):
        return None
    return Result.FAILED


def parse_retry_after(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """Parse a ``Retry-After`` header (seconds or HTTP-date) into seconds >= 0, or None."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
