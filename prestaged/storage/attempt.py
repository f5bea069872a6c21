"""HTTP details shared by the aiohttp path (``storage.http``) and the keep-alive fast path
(``storage.fast``), which must give identical ``model.Attempt``s.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

__all__ = [
    "CONTENT_RANGE_TOTAL",
    "DRAIN_LIMIT",
    "REDIRECTS",
    "parse_retry_after",
]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CONTENT_RANGE_TOTAL = re.compile(r"/\s*(\d+)\s*$")
# Small error/redirect bodies are drained so the connection can be reused; anything larger
# (or of unknown length) costs a closed connection instead of reading it.
DRAIN_LIMIT = 1024


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
