"""HTTP details shared by the aiohttp path (``storage.http``) and the keep-alive fast path
(``storage.fast``), which must give identical ``model.Attempt``s.
"""

from __future__ import annotations

import re

__all__ = ["CONTENT_RANGE_TOTAL", "DENIED", "DRAIN_LIMIT", "REDIRECTS", "status_error"]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
DENIED = frozenset({401, 403})
"""Statuses whose ``WWW-Authenticate`` is read for what the server says about our token."""
CONTENT_RANGE_TOTAL = re.compile(r"/\s*(\d+)\s*$")
# Small error/redirect bodies are drained so the connection can be reused; anything larger
# (or of unknown length) costs a closed connection instead of reading it.
DRAIN_LIMIT = 1024


def status_error(status: int, reason: str, auth_error: str) -> str:
    """The error text of a final answer ``status`` >= 400: ``HTTP 401 Unauthorized``, with what
    the server said about our token (``net.bearer_error``) in parentheses when it said it."""
    text = f"HTTP {status} {reason}".strip()
    return f"{text} ({auth_error})" if auth_error else text
