"""What the storage layer and the engine put into text: bounded, and free of URL credentials.

Error text comes from servers (reason phrases) and libraries (exception messages, which often
quote the URL). Before it is kept (an ``Attempt``, then an ``Outcome``, the state store, the
report, the metrics' logs) it goes through ``error_text``: userinfo redacted, whitespace folded,
at most ``ERROR_TEXT_MAX`` characters. ``redact`` is the one helper for any URL put into text.
"""

from __future__ import annotations

import re

__all__ = ["ERROR_TEXT_MAX", "error_text", "redact"]

ERROR_TEXT_MAX = 200
"""Characters of error text kept per attempt (a reason phrase may be megabytes long)."""

# scheme://userinfo@ up to the authority's last "@": a password holding an unescaped "@"
# (``https://u:p@ss@host/``) is redacted whole, as urlsplit and yarl read it.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")


def redact(text: str) -> str:
    """``text`` (a URL, or text quoting URLs) with every URL's userinfo replaced by ``***``:
    ``https://user:pw@host/f`` -> ``https://***@host/f``."""
    if "@" not in text:  # the common case costs no regex
        return text
    return _USERINFO.sub(r"\1***@", text)


def error_text(text: str) -> str:
    """``text`` fit to keep: credentials redacted, whitespace runs folded to one space, cut to
    ``ERROR_TEXT_MAX`` characters (an ellipsis marks the cut)."""
    # Redact first: a cut could otherwise leave a password's head without its "@".
    text = " ".join(redact(text).split())
    if len(text) <= ERROR_TEXT_MAX:
        return text
    return text[: ERROR_TEXT_MAX - 1] + "\u2026"
