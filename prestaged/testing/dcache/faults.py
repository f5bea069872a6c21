"""Passing failures of the emulated dCache, set by a test: what a real site's frontend and door
answer now and then, and what a client must ride out rather than end a run for.

``Faults.add(where, kind, count)`` makes the next ``count`` requests of one kind fail:

* ``where``: the frontend handler's name (``stage``, ``poll``, ``cancel``, ``release``,
  ``delete``, ``archiveinfo``, ``namespace``), ``frontend`` for any of them, or ``discovery``
  (the door's ``/.well-known/wlcg-tape-rest-api``);
* ``kind`` (``KINDS``): ``400`` with an empty body (dCache's frontend when its message to the
  bulk service times out: ``BulkServiceCommunicator`` turns that into a bare
  ``BadRequestException``), ``500`` (problem JSON, as dCache's frontend), ``502``/``504`` (an
  HTML page, as a reverse proxy in front of it), ``drop`` (the connection closed without an
  answer: a restart, a proxy's idle cut; aiohttp sends an idempotent request once more on a
  new connection when a kept-alive one is closed so: ``count=2`` fails a GET for good),
  ``garbage`` (200 and text that is no JSON);
* ``after``: the request is carried out first and only its answer is lost (a stage request
  that the frontend created though the client never heard of it);
* ``skip``: so many requests of that kind are let through first.

Per-path archiveinfo errors other than "No such file" (``PathErrors``): dCache puts the root
cause of any failure there (``ArchiveInfoCollector``), e.g. ``PNFS_TIMEOUT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from aiohttp import web

__all__ = ["KINDS", "PNFS_TIMEOUT", "Fault", "Faults", "PathErrors"]

KINDS = ("400", "500", "502", "504", "drop", "garbage")
PNFS_TIMEOUT = "Request to [>PnfsManager@dCacheDomain] timed out."
"""What dCache's archiveinfo says for a path whose namespace lookup timed out."""
_PLACES = ("stage", "poll", "cancel", "release", "delete", "archiveinfo", "namespace",
           "frontend", "discovery")


@dataclass
class Fault:
    """``count`` more requests of ``where`` fail the ``kind`` way (``after``: once done),
    after ``skip`` more went through."""

    where: str
    kind: str
    count: int
    after: bool = False
    skip: int = 0


class Faults:
    """The failures still to come, in the order added; ``served`` counts those answered, by
    ``"<where>:<kind>"``."""

    def __init__(self) -> None:
        self._pending: list[Fault] = []
        self.served: dict[str, int] = {}

    def add(self, where: str, kind: str = "500", count: int = 1, *, after: bool = False,
            skip: int = 0) -> None:
        """Fail the next ``count`` requests of ``where`` (see the module)."""
        if where not in _PLACES or kind not in KINDS or count < 1 or skip < 0:
            raise ValueError(f"fault: where in {_PLACES}, kind in {KINDS}, count >= 1, "
                             f"skip >= 0; got {where!r}, {kind!r}, {count}, {skip}")
        self._pending.append(Fault(where, kind, count, after, skip))

    def take(self, where: str, site: str = "frontend") -> Optional[Fault]:
        """The fault due for a request of ``where`` at ``site`` (counted as served), or None."""
        for fault in self._pending:
            if fault.where in (where, site) and fault.skip > 0:
                fault.skip -= 1
                return None
            if fault.where in (where, site):
                fault.count -= 1
                if fault.count == 0:
                    self._pending.remove(fault)
                key = f"{where}:{fault.kind}"
                self.served[key] = self.served.get(key, 0) + 1
                return fault
        return None

    @staticmethod
    def answer(request: web.BaseRequest, fault: Fault) -> web.StreamResponse:
        """The failed answer to ``request`` (for ``drop``: the connection is closed first)."""
        if fault.kind == "400":
            return web.Response(status=400)
        if fault.kind == "500":
            body = ('{"status": "500", "title": "Internal Server Error", '
                    '"detail": "Internal problem"}')  # ErrorResponseProvider's shape
            return web.Response(status=500, text=body, content_type="application/json")
        if fault.kind in ("502", "504"):
            title = "Bad Gateway" if fault.kind == "502" else "Gateway Timeout"
            return web.Response(status=int(fault.kind), content_type="text/html",
                                text=f"<html><body><h1>{fault.kind} {title}</h1></body></html>")
        if fault.kind == "garbage":
            return web.Response(status=200, text="<html>maintenance</html>",
                                content_type="application/json")
        if request.transport is not None:  # drop: no answer at all
            request.transport.close()
        return web.Response(status=500)  # never reaches the client


class PathErrors:
    """Per-path archiveinfo errors: ``add(path, message, count)`` answers ``message`` for
    ``path`` (matched as given, after ``fs_path``) the next ``count`` times (None: always)."""

    def __init__(self) -> None:
        self._errors: dict[str, list[object]] = {}

    def add(self, path: str, message: str, count: Optional[int] = None) -> None:
        """Answer ``message`` for ``path``; see the class."""
        self._errors[path] = [message, count]

    def take(self, path: str) -> Optional[str]:
        """The error due for ``path`` now (counted), or None."""
        entry = self._errors.get(path)
        if entry is None:
            return None
        message, count = entry
        if isinstance(count, int):
            if count <= 1:
                del self._errors[path]
            else:
                entry[1] = count - 1
        return str(message)
