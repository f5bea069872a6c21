"""SAM locations -> storage URLs, by prefix rules (``[[catalog.samweb.rewrite]]``).

A SAM location is ``<kind>:<directory>``, optionally followed by a tape suffix
``(<seq>@<tape label>)``: ``enstore:/pnfs/dune/tape_backed/x(597@vr0337m8)``. SAM turns
locations into URLs server-side by rules it does not publish, so prestaged carries its own: the
tape suffix is removed (a regex anchored at the end), the first rule whose ``location`` is a
prefix of the location gives the URL base, and the rest of the location plus ``/<file name>`` is
appended::

    enstore:/pnfs/dune/ -> https://fndca1.fnal.gov:2880/pnfs/fnal.gov/usr/dune/
    enstore:/pnfs/dune/tape_backed/x(597@vr0337m8) + a.root
        -> https://fndca1.fnal.gov:2880/pnfs/fnal.gov/usr/dune/tape_backed/x/a.root

Rules are tried in order and the first rule matching *any* of a file's locations wins, so the
order of the rules is the order of preference (put a disk ``dcache:`` rule before the tape
``enstore:`` rule to prefer it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Optional
from urllib.parse import quote

from prestaged.config import RewriteRule

__all__ = ["Rewriter", "location_kind", "strip_tape_suffix"]

_TAPE_SUFFIX = re.compile(r"\([^()/]*\)\s*$")
# Characters kept as they are in URL paths; everything else (space, ?, #, %, ...) is escaped.
_SAFE_PATH = "/:@!$&'()*+,;=~"
_SAFE_NAME = ":@!$&'()*+,;=~"


def strip_tape_suffix(location: str) -> str:
    """``location`` without a trailing ``(<seq>@<tape label>)`` and surrounding blanks."""
    return _TAPE_SUFFIX.sub("", location.strip()).strip()


def location_kind(location: str) -> str:
    """The part before the first ``:`` (``enstore``, ``dcache``, ``rucio``...), or ``""``."""
    kind, colon, _ = location.partition(":")
    return kind if colon else ""


def _matches(location: str, prefix: str) -> bool:
    if not location.startswith(prefix):
        return False
    # "/pnfs/dune" must not match "/pnfs/dunepro": a prefix not ending in "/" or ":" stops at
    # a path component boundary.
    return prefix.endswith(("/", ":")) or len(location) == len(prefix) or (
        location[len(prefix)] == "/"
    )


class Rewriter:
    """Applies rewrite rules, first match wins (see the module docstring)."""

    def __init__(self, rules: Sequence[RewriteRule]) -> None:
        self.rules = tuple(rules)

    def url_for(self, name: str, locations: Iterable[str]) -> Optional[str]:
        """URL of file ``name`` given its SAM ``locations``, or None if no rule matches any."""
        directory = self._first([strip_tape_suffix(loc) for loc in locations])
        if directory is None:
            return None
        return f"{directory}/{quote(name, safe=_SAFE_NAME)}"

    def _first(self, locations: Sequence[str]) -> Optional[str]:
        for rule in self.rules:
            for loc in locations:
                if _matches(loc, rule.location):
                    rest = loc[len(rule.location):].strip("/")
                    base = rule.url.rstrip("/")
                    return f"{base}/{quote(rest, safe=_SAFE_PATH)}" if rest else base
        return None
