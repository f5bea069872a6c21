"""The daemon's warm runs: queued by a watch or ``POST /api/v1/warm``, run one at a time per
definition over the shared touch path, remembered for ``GET /api/v1/runs/<id>``.

``RunBook`` keeps every run that is queued or running, and the last ``kept`` finished ones (the
state store keeps all): a run is never forgotten while someone may still be waiting for it.
``Runs`` executes them; what happens after a run (dataset gauges, the ready check) is the
caller's ``after`` hook, so this module knows nothing of watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from prestaged.catalog import Catalog
from prestaged.errors import BusyError, PrestagedError
from prestaged.locality import TapeAccess
from prestaged.metrics import Metrics, run_result
from prestaged.model import error_text
from prestaged.pacing import Rates
from prestaged.runner import run_definition
from prestaged.state.store import Store
from prestaged.warm import Tally, Toucher, WarmSettings

__all__ = ["KEPT_RUNS", "RunBook", "RunInfo", "Runs", "Spawn"]

log = logging.getLogger(__name__)

KEPT_RUNS = 1000
"""Finished runs remembered for ``GET /api/v1/runs/<id>`` (the store keeps all)."""

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]
"""Runs a coroutine as a task its owner waits for on drain and cancels on shutdown."""


@dataclass
class RunInfo:
    """A warm run the daemon queued, is running or ran."""

    id: int
    catalog: str
    definition: str
    """The definition as its catalog reports it (``Catalog.definition``: canonical)."""
    origin: str
    """``watch``, ``chunk`` (a chunk of a watch round on a shared state) or ``api``."""
    state: str = "queued"
    """queued, running, done (finished with an exit code) or error (did not run, or died)."""
    submitted: float = field(default_factory=time.time)
    started: Optional[float] = None
    ended: Optional[float] = None
    exit_code: Optional[int] = None
    error: str = ""
    warm_fraction: Optional[float] = None
    """Share of the definition's files fresh after the run (from the store)."""
    tally: Tally = field(default_factory=Tally)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form, with live counts while running."""
        t = self.tally
        return {
            "id": self.id, "catalog": self.catalog, "definition": self.definition,
            "origin": self.origin, "state": self.state, "submitted": self.submitted,
            "started": self.started, "ended": self.ended, "exit_code": self.exit_code,
            "error": self.error or None, "files": t.done, "total": t.total,
            "warm_fraction": self.warm_fraction,
            "counts": dict(t.results), "retries": dict(t.retries),
        }


class RunBook:
    """Runs by id: all unfinished ones, and the last ``kept`` finished ones."""

    def __init__(self, kept: int = KEPT_RUNS) -> None:
        self.kept = kept
        self._runs: dict[int, RunInfo] = {}
        self._finished: deque[int] = deque()
        self._next_id = 1

    def add(self, catalog: str, definition: str, origin: str) -> RunInfo:
        """A new queued run with the next id."""
        info = RunInfo(id=self._next_id, catalog=catalog, definition=definition, origin=origin)
        self._next_id += 1
        self._runs[info.id] = info
        return info

    def get(self, run_id: int) -> Optional[RunInfo]:
        """Run ``run_id``, or None when it never existed or was forgotten."""
        return self._runs.get(run_id)

    def finish(self, info: RunInfo) -> None:
        """``info`` ended: wake its waiters, then forget the oldest finished runs beyond
        ``kept`` (never a queued or running one). Its failed files' outcomes are dropped (up
        to ``MAX_FAILURES_KEPT`` each, which only a command's report reads; the store has
        them): kept, a watch with missing files grew the daemon by ~0.5 MB a round, up to
        ``kept`` rounds."""
        info.ended = time.time()
        info.tally.failures = []
        info.finished.set()
        self._finished.append(info.id)
        while len(self._finished) > self.kept:
            self._runs.pop(self._finished.popleft(), None)

    def running(self) -> list[RunInfo]:
        """Runs in progress, oldest first."""
        return [r for r in self._runs.values() if r.state == "running"]

    def unfinished(self) -> list[RunInfo]:
        """Runs queued or in progress, oldest first."""
        return [r for r in self._runs.values() if r.state in ("queued", "running")]


AfterRun = Callable[[RunInfo], Awaitable[None]]
"""Called once a run finished with an exit code (dataset gauges, ready check)."""


class Runs:
    """Queues and executes warm runs; never two of one definition at once.

    Collaborators: the open ``store``, the shared ``toucher``, ``metrics``; ``settings()`` the
    engine settings in force, ``tape()`` the Tape REST access in force (None: touch only),
    ``fresh_for()`` the default freshness (``state.fresh_for``), ``draining()`` whether the
    daemon is stopping, ``stop`` the event that interrupts runs, ``spawn`` to run tasks,
    ``after`` (see ``AfterRun``) and ``changed`` (a run started or ended: the systemd status
    line); ``rates`` the request rates learned from 429s, shared by every run of the daemon
    (dCache limits a client, not a run).
    """

    def __init__(self, store: Store, toucher: Toucher, metrics: Metrics, *,
                 settings: Callable[[], WarmSettings], fresh_for: Callable[[], float],
                 tape: Callable[[], Optional[TapeAccess]] = lambda: None,
                 draining: Callable[[], bool], stop: asyncio.Event, spawn: Spawn,
                 after: AfterRun, changed: Callable[[], None], kept: int = KEPT_RUNS,
                 max_runs: Callable[[], int] = lambda: 100,
                 rates: Optional[Rates] = None) -> None:
        self.book = RunBook(kept)
        self._rates = Rates() if rates is None else rates
        self._max_runs = max_runs
        self._store, self._toucher, self._metrics = store, toucher, metrics
        self._settings, self._fresh_for, self._draining = settings, fresh_for, draining
        self._tape = tape
        self._stop, self._spawn, self._after, self._changed = stop, spawn, after, changed
        # Weak: a definition's lock lives while a run of it holds or waits on it (one-off
        # warms and campaign slices would otherwise leave one each behind, for ever).
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = \
            weakref.WeakValueDictionary()
        self._running = 0
        self._room: Optional[asyncio.Condition] = None  # made in the loop (Python 3.9)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the ``max_runs()`` places of runs that run at once; the others wait for one,
        queued. 2,000 watches started their first runs together, and their state calls
        queued the API's reads behind them for seconds (2.5 s for /api/v1/datasets)."""
        if self._room is None:
            self._room = asyncio.Condition()
        room = self._room
        async with room:
            await room.wait_for(lambda: self._running < self._max_runs())
            self._running += 1
        try:
            yield
        finally:
            async with room:
                self._running -= 1
                room.notify()

    def submit(self, catalog: Catalog, *, origin: str, fresh_for: Optional[float] = None,
               join: bool = True,
               stop: Optional[asyncio.Event] = None) -> tuple[RunInfo, bool]:
        """Queue a warm of ``catalog``'s definition, skipping files touched within
        ``fresh_for`` seconds (None: ``state.fresh_for``); or, when a run of that definition
        is queued or running already, join it (unless not ``join``: a chunk of a watch round
        has files of its own, so it runs beside that run). Returns (the run, whether it was
        joined). ``stop`` (a new run only) also interrupts it: a chunk whose lease was lost.

        ``PrestagedError`` (HTTP 503) while the daemon is stopping; ``BusyError`` (429) for an
        API request while ``max_runs()`` runs are queued or running (watches are never refused:
        there are only so many of them, and each has at most one run at a time).
        """
        if self._draining():
            raise PrestagedError("the daemon is stopping")
        unfinished = self.book.unfinished()
        for other in unfinished if join else ():
            if (other.catalog, other.definition) == (catalog.name, catalog.definition):
                return other, True
        if origin == "api" and len(unfinished) >= self._max_runs():
            raise BusyError(f"{len(unfinished)} warm runs are queued or running "
                            "(daemon.max_runs); try again later", retry_after=30.0)
        info = self.book.add(catalog.name, catalog.definition, origin)
        self._spawn(self._execute(info, catalog, fresh_for, alone=join, stop=stop))
        return info, False

    def get(self, run_id: int) -> Optional[RunInfo]:
        """Run ``run_id`` (see ``RunBook.get``)."""
        return self.book.get(run_id)

    def running(self) -> list[RunInfo]:
        """Runs in progress, oldest first."""
        return self.book.running()

    async def _execute(self, info: RunInfo, catalog: Catalog, fresh_for: Optional[float], *,
                       alone: bool = True, stop: Optional[asyncio.Event] = None) -> None:
        # One run of a definition at a time, except chunks of a watch round (not ``alone``):
        # their files are disjoint, and a member warms a chunk it took over beside its own.
        lock = (self._locks.setdefault((info.catalog, info.definition), asyncio.Lock())
                if alone else asyncio.Lock())
        relay = None
        if stop is not None:  # the daemon's stop interrupts this run too
            relay = asyncio.ensure_future(self._stop.wait())
            relay.add_done_callback(lambda _: stop.set())
        try:
            async with lock, self._slot():
                if self._draining():
                    info.state, info.error = "error", "not started: the daemon was stopping"
                    return
                info.state, info.started = "running", time.time()
                self._changed()
                report = await run_definition(
                    catalog, self._settings(), self._toucher, store=self._store,
                    tally=info.tally, stop=self._stop if stop is None else stop,
                    probe=self._metrics, tape=self._tape(), rates=self._rates,
                    fresh_for=self._fresh_for() if fresh_for is None else fresh_for)
                info.exit_code = report.exit_code
                info.error = str(report.aborted) if report.aborted else ""
                if report.aborted:  # a list that cannot be read, a refusing storage...
                    log.error("warm of %s stopped: %s", info.definition, info.error)
                self._metrics.run_finished(run_result(report))
            await self._report(info)
            # "done" only once the after hook has filled warm_fraction in: an API client that
            # polls for "done" must not read a run without it (a race seen under load).
            info.state = "done"
        except PrestagedError as e:
            info.state, info.error = "error", str(e)
            self._metrics.run_finished("aborted")
            log.error("warm of %s failed: %s", info.definition, e)
        except Exception as e:  # a bug: the run is failed, the daemon and other runs go on
            # Answered by the API: a bug's words may quote a URL's password or a header.
            info.state, info.error = "error", f"internal error: {error_text(repr(e))}"
            self._metrics.run_finished("aborted")
            log.exception("warm of %s: internal error", info.definition)
        finally:
            if relay is not None:
                relay.cancel()
            self.book.finish(info)
            self._changed()

    async def _report(self, info: RunInfo) -> None:
        """The ``after`` hook of a run that ran: its failure is logged, the run stays done."""
        try:
            await self._after(info)
        except Exception:  # a gauge or a warning is not worth failing a finished run for
            log.exception("after the warm of %s", info.definition)
