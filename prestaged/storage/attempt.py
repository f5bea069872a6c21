"""HTTP details shared by the aiohttp path (``storage.http``) and the keep-alive fast path
(``storage.fast``), which must give identical ``model.Attempt``s.
"""

from __future__ import annotations

import re

__all__ = ["CONTENT_RANGE_TOTAL", "DENIED", "DRAIN_LIMIT", "LISTING_ERROR", "REDIRECTS",
           "is_listing", "past_the_end", "status_error"]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
DENIED = frozenset({401, 403})
"""Statuses whose ``WWW-Authenticate`` is read for what the server says about our token."""
# Bounded: int() refuses more than 4300 digits, and no file has 20 digits of bytes.
CONTENT_RANGE_TOTAL = re.compile(r"/\s*([0-9]{1,19})\s*$")
_CONTENT_RANGE = re.compile(r"bytes\s+([0-9]{1,19})\s*-\s*([0-9]{1,19})\s*/\s*([0-9]{1,19})",
                            re.IGNORECASE)
# How an HTML page starts (lower-cased); a directory's listing is one.
_HTML_STARTS = (b"<!doctype html", b"<html")
_LISTING_MIN = 4  # bytes needed to tell a page from file data ("<!do", "<htm")
LISTING_ERROR = ("a directory, not a file: the server answered a GET of it with its HTML "
                 "listing (HTTP 200)")
"""The error of a directory's URL (``is_listing``): failed, not retried."""
# Small error/redirect bodies are drained so the connection can be reused; anything larger
# (or of unknown length) costs a closed connection instead of reading it.
DRAIN_LIMIT = 1024


def status_error(status: int, reason: str, auth_error: str) -> str:
    """The error text of a final answer ``status`` >= 400: ``HTTP 401 Unauthorized``, with what
    the server said about our token (``net.bearer_error``) in parentheses when it said it."""
    text = f"HTTP {status} {reason}".strip()
    return f"{text} ({auth_error})" if auth_error else text


def past_the_end(content_range: str) -> bool:
    """Whether a 206's ``Content-Range`` claims bytes past the file's end (``bytes 0-3/2``).
    XRootD (5.5) answers a range beyond the end of a short file (or any range of an empty one)
    so, with the Content-Length of the range asked, no body, and a dropped connection: its
    head is the whole answer (the GET reached the file), and waiting for the body failed every
    file shorter than ``--bytes``."""
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    return match is not None and int(match.group(2)) >= int(match.group(3))


def is_listing(first: bytes) -> bool:
    """Whether ``first``, the first bytes of a **200** answer to our ranged GET, start an HTML
    page: a directory's listing. XrdHttp (5.5) honours ``Range`` on every file (206, even for
    an empty one) and answers a GET of a directory with 200 and its listing (no Content-Type);
    dCache's door lists a directory as a page too. Counted warm, a directory in a list (a
    catalog's location without the file name) was reported warm though nothing was read. At
    least 4 bytes are needed to tell (``--bytes`` 1 to 3 cannot): a data file starting with
    ``<!do`` or ``<htm`` answered 200 to a range request is not a case worth the doubt."""
    if len(first) < _LISTING_MIN:
        return False
    head = first.lower()
    return any(mark.startswith(head) or head.startswith(mark) for mark in _HTML_STARTS)
