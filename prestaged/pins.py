"""Releasing the pins prestaged's stage requests hold (issue 13): ``prestaged release`` and a
campaign stage's ``release_after_complete``.

A file staged from tape stays pinned on disk until its pin expires (``storage.pin_lifetime``,
24 h by default), whether or not its jobs still need it. Releasing tells the storage early that
they do not. Everything comes from the state, never from the catalog.

Pins belong to definitions: the state records, per member file, the stage request whose pin
that definition relies on (its run made the request, or adopted or followed another run's
request for the file). Releasing a definition hands back what it relies on, one stage request
after another, naming each file by its namespace path (``namespace_path`` with
``storage.path_map``, as it was staged), at most ``STAGE_LIMIT`` paths a POST:

* a pin another definition relies on too is kept on the storage for it (the report says which
  and for whom); this definition no longer relies on it, so that one's release frees it;
* a file not known to have landed (its request still open, or a run interrupted before it saw
  the end) is cancelled first (``POST {stage_uri}/stage/{id}/cancel``, as FTS3 and gfal2 do:
  dCache would otherwise go on recalling it, then fail it "Operation was aborted"), then
  released with the rest (``POST {stage_uri}/release/{id}``), in case it landed unseen;
* once the storage accepted a request's POSTs, the state records it: the definition no longer
  relies on those pins, released files have no ``pinned_until``, cancelled ones' stage ended.

dCache answers 200 to every release (a fire-and-forget bulk request), so a request the storage
no longer knows is released too. A refusal (401/403: ``CredentialError``, exit 3; anything
else: ``TapeRestError``, exit 5) stops there: what was released before it is recorded, the
rest is still relied on in the state, so releasing again picks up where it stopped. Releasing
evicts nothing: the file stays on disk until the storage's LRU sweeper takes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

from prestaged.errors import CatalogError, PrestagedError
from prestaged.locality import TapeAccess, namespace_path
from prestaged.model import printable
from prestaged.state.store import Pin, Store
from prestaged.storage.tape import STAGE_LIMIT
from prestaged.warm import touch_url

if TYPE_CHECKING:
    from prestaged.catalog import Catalog

__all__ = ["ReleaseFn", "ReleaseReport", "Released", "pinned", "release_pins"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Released:
    """What was released at one Tape REST endpoint: ``files`` released in ``requests`` stage
    requests (one release POST each, or more past ``STAGE_LIMIT``), ``cancelled`` of those
    files cancelled first (not known to be on disk)."""

    uri: str
    files: int
    requests: int
    cancelled: int = 0


@dataclass(frozen=True)
class ReleaseReport:
    """What releasing a definition's pins did: per endpoint, in the order released; empty when
    nothing was pinned. ``left``: pins not released because it was stopped early. ``kept``:
    pins left on the storage because the definitions ``kept_for`` (``catalog:name``) rely on
    them too; this one no longer does."""

    catalog: str
    definition: str
    endpoints: tuple[Released, ...] = ()
    left: int = 0
    kept: int = 0
    kept_for: tuple[str, ...] = ()

    @property
    def files(self) -> int:
        """Files released, over every endpoint."""
        return sum(e.files for e in self.endpoints)

    @property
    def requests(self) -> int:
        """Stage requests released, over every endpoint."""
        return sum(e.requests for e in self.endpoints)

    @property
    def cancelled(self) -> int:
        """Files cancelled before their release (not on disk yet), over every endpoint."""
        return sum(e.cancelled for e in self.endpoints)

    def summary(self) -> str:
        """One line for people."""
        name = f"{self.catalog}:{self.definition}"
        if not self.endpoints and not self.left and not self.kept:
            return f"{name}: nothing pinned (no stage request of prestaged holds a pin on its " \
                   "files)"
        done = "; ".join(f"{e.uri}: {_n(e.files, 'file')} in {_n(e.requests, 'request')}"
                         + (f" ({e.cancelled} not on disk yet: cancelled first)"
                            if e.cancelled else "")
                         for e in self.endpoints) or "nothing"
        tail = f"; stopped with {_n(self.left, 'file')} still pinned" if self.left else ""
        if self.kept:
            tail += (f"; kept {_n(self.kept, 'pin')} that {_names(self.kept_for)} "
                     f"{'relies' if len(self.kept_for) == 1 else 'rely'} on too")
        # The URIs are the frontends' own words (their discovery documents): escaped.
        return printable(f"{name}: released {done}{tail}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the totals."""
        return {"catalog": self.catalog, "definition": self.definition, "files": self.files,
                "requests": self.requests, "cancelled": self.cancelled, "left": self.left,
                "kept": self.kept, "kept_for": list(self.kept_for),
                "endpoints": [{"uri": e.uri, "files": e.files, "requests": e.requests,
                               "cancelled": e.cancelled} for e in self.endpoints]}


KEPT_NAMES = 3
"""Definitions named in a summary's "kept" part; more are counted."""


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:KEPT_NAMES])
    more = len(names) - KEPT_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class ReleaseFn(Protocol):
    """Release the pins held on ``catalog``'s files, by its definition as the state records it
    (``pinned`` and ``release_pins``); built by ``Context.release``."""

    def __call__(self, catalog: Catalog) -> Awaitable[ReleaseReport]: ...


def pinned(store: Store, catalog: str, definition: str) -> list[Pin]:
    """The pins ``definition`` relies on (``Store.pins``; blocking: call it in a worker thread
    from the event loop); ``CatalogError`` (exit 4, as ``status``) when the state has no such
    definition."""
    pins = store.pins(catalog, definition)
    if pins is None:
        raise CatalogError(f"definition {definition!r} (catalog {catalog}) has no record in state "
                         f"{store.where}: nothing was warmed under that name with this state "
                         "(--catalog names its catalog, --state another state file)")
    return pins


async def release_pins(store: Store, access: TapeAccess, catalog: str, definition: str,
                       pins: Sequence[Pin], *,
                       stop: Optional[asyncio.Event] = None) -> ReleaseReport:
    """Release ``pins`` (``pinned``'s answer for ``catalog:definition``) through ``access``
    (open), one stage request after another: those no other definition relies on are released
    (cancelled first when not known to be on disk), the others kept for those definitions; the
    state records each request once the storage accepted it. See the module for refusals.
    Setting ``stop`` ends it between two requests (``ReleaseReport.left`` counts what is still
    pinned)."""
    groups: dict[tuple[str, str], list[Pin]] = {}
    for pin in pins:
        groups.setdefault((pin.uri, pin.request), []).append(pin)
    done: dict[str, list[int]] = {}  # uri -> [files, requests, cancelled]
    kept: list[Pin] = []
    left = len(pins)
    try:
        for (uri, _), group in groups.items():
            if stop is not None and stop.is_set():
                break
            released, kept_here = await _release_group(store, access, catalog, definition,
                                                       group)
            kept += kept_here
            if released:
                tally = done.setdefault(uri, [0, 0, 0])
                tally[0] += len(released)
                tally[1] += 1
                tally[2] += sum(not p.landed for p in released)
            left -= len(group)
    except PrestagedError:
        if left < len(pins):
            log.warning("%s:%s: released %d of %d pinned files before this error (recorded in "
                        "the state); the rest keep their pins", catalog, definition,
                        len(pins) - left, len(pins))
        raise
    return ReleaseReport(catalog, definition,
                         tuple(Released(uri, f, r, c) for uri, (f, r, c) in done.items()), left,
                         len(kept), tuple(sorted({o for p in kept for o in p.others})))


async def _release_group(store: Store, access: TapeAccess, catalog: str, definition: str,
                         group: Sequence[Pin]) -> tuple[list[Pin], list[Pin]]:
    """Release the pins of one stage request that no other definition relies on, keep the
    others, and record it; (released, kept)."""
    mine = [p for p in group if not p.others]
    theirs = [p for p in group if p.others]
    released: list[Pin] = []
    kept: list[Pin] = []
    while mine or theirs:
        if mine:
            await _release_request(access, mine[0].uri, mine[0].request, mine)
            released += mine
        # The others may have released theirs meanwhile, each keeping it for this one: those
        # nobody relies on any more are this one's to release after all.
        orphans = await asyncio.to_thread(store.unpinned, catalog, definition, mine, theirs)
        gone = {(p.file_id, p.request) for p in orphans}  # a list here was O(len^2)
        kept += [p for p in theirs if (p.file_id, p.request) not in gone]
        mine, theirs = orphans, []
    return released, kept


async def _release_request(access: TapeAccess, uri: str, request: str,
                           group: Sequence[Pin]) -> None:
    """One stage request's release: its files' namespace paths, ``STAGE_LIMIT`` a POST; those
    not known to be on disk are cancelled first."""
    path_map = access.settings.path_map
    paths: dict[str, bool] = {}  # namespace path -> landed
    for pin in group:
        # Named as the stage request named it: the router maps the https form of a davs URL.
        url = touch_url(pin.url, allow_plain_http=True)
        if isinstance(url, str):
            access.client.allow(url)  # its door's host: a bearer token may go to the frontend
        path = namespace_path(url if isinstance(url, str) else pin.url, path_map)
        paths[path] = paths.get(path, True) and pin.landed
    staging = [p for p, landed in paths.items() if not landed]
    for i in range(0, len(staging), STAGE_LIMIT):
        await access.client.cancel(uri, request, staging[i:i + STAGE_LIMIT])
    everything = list(paths)
    for i in range(0, len(everything), STAGE_LIMIT):
        await access.client.release(uri, request, everything[i:i + STAGE_LIMIT])
    log.debug("%s/release/%s: %d paths (%d cancelled first)", uri, request, len(paths),
              len(staging))
