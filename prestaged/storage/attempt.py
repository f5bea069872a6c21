"""HTTP details shared by the aiohttp path (``storage.http``) and the keep-alive fast path
(``storage.fast``), which must give identical ``model.Attempt``s.
"""

from __future__ import annotations

import re

__all__ = ["CONTENT_RANGE_TOTAL", "DRAIN_LIMIT", "REDIRECTS"]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CONTENT_RANGE_TOTAL = re.compile(r"/\s*(\d+)\s*$")
# Small error/redirect bodies are drained so the connection can be reused; anything larger
# (or of unknown length) costs a closed connection instead of reading it.
DRAIN_LIMIT = 1024
