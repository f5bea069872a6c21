"""The daemon's ``[[watch]]`` entries: definitions kept warm on a schedule.

Each watch has a loop: warm now (or once its last successful run is ``every`` old, so a restart
does not warm everything again), then every ``every`` (± ``daemon.jitter``). A scheduled run
skips files touched within 0.8 ``every``. After any run of a watched definition its dataset
gauges are set and a warning is logged when it stays below its ``ready`` fraction.

A watch is known by its catalog's canonical (kind, definition), as ``Catalog.name`` and
``Catalog.definition`` report it, never by the text of the config: the local catalog turns
``defs/a.txt`` or ``~/a.txt`` into an absolute path, and the runs, the store and every lookup
here use that form. Gauges exist for watched definitions only (a bounded label set) and are
dropped when a reload removes the watch.

On a shared (PostgreSQL) state with several daemons (issue 16) the schedule is the database's:
each watch has a ``watch_schedule`` row, due first as above. Every member looks at it every
``[cluster] heartbeat``; the one that claims it when due lists the definition once, stores the
round as chunks of ``[cluster] chunk`` files and sets the next due time, all in one transaction
(``state.cluster.plan_round``). The members' ``ChunkWorker``s then warm the chunks. Each member
runs the same ``[[watch]]`` entries (one config for all), and a watch only some members list
is planned by those. Every member sets a watch's gauges from the shared state once per
finished round: the member that finishes it at once, the others at their next heartbeat (and
a member that starts, after the last round finished before it), so that all show the same
round.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from typing import Callable, Optional

from prestaged.catalog import Catalog, unresolved_in
from prestaged.config import Config, WatchConfig
from prestaged.errors import EXIT_OK, EXIT_SOME_FAILED, PrestagedError
from prestaged.metrics import Metrics, definition_label
from prestaged.model import FileRef
from prestaged.service.cluster import ClusterMember, keep_lease
from prestaged.service.runs import RunInfo, Spawn
from prestaged.state import cluster as shared
from prestaged.state.db import driver_errors
from prestaged.state.store import DatasetStatus, Listing, Store

__all__ = ["Watch", "Watches", "watch_fresh_for"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(catalog kind, definition) as the catalog reports them."""


def watch_fresh_for(w: WatchConfig) -> float:
    """Seconds within which a scheduled run of ``w`` skips a file: a little less than
    ``every``, so that files touched by the previous scheduled run (which started up to
    ``every`` ago, jitter included) are touched again."""
    return 0.8 * w.every


class Watch:
    """One ``[[watch]]`` entry as the daemon runs it: its config, catalog kind, canonical key
    and loop task."""

    def __init__(self, config: WatchConfig, kind: str, key: Key) -> None:
        self.config = config
        self.kind = kind
        self.key = key
        """Canonical (kind, definition); the written form until the catalog could be opened."""
        self.task: Optional[asyncio.Task[None]] = None
        self.gauges_round: Optional[int] = None
        """On a shared state: the finished round this member's gauges were last set after."""

    @property
    def fresh_for(self) -> float:
        """See ``watch_fresh_for``."""
        return watch_fresh_for(self.config)


class Watches:
    """The watch loops of the daemon.

    Collaborators: the open ``store`` and ``metrics``; ``open_catalog(kind, definition)``,
    ``submit(catalog, fresh_for)`` (queues a run, see ``Runs.submit``), ``spawn`` and
    ``config()``, the configuration in force. With ``member`` (a shared state) rounds are
    planned in the database instead (see the module docstring) and ``planned()`` is called
    after each round this member stored (its chunk worker claims at once).
    """

    def __init__(self, store: Store, metrics: Metrics, *,
                 open_catalog: Callable[[str, str], Catalog],
                 submit: Callable[[Catalog, float], RunInfo], spawn: Spawn,
                 config: Callable[[], Config], member: Optional[ClusterMember] = None,
                 planned: Callable[[], None] = lambda: None) -> None:
        self._store, self._metrics = store, metrics
        self._open, self._submit, self._spawn, self._config = open_catalog, submit, spawn, config
        self._member, self._planned = member, planned
        self._watches: dict[Key, Watch] = {}

    def __len__(self) -> int:
        return len(self._watches)

    def apply(self, cfg: Config) -> None:
        """Start loops for ``cfg``'s watches (restarting those kept: their first delay comes
        from the store), stop those no longer listed and drop their gauges."""
        wanted: dict[Key, Watch] = {}
        for w in cfg.watch:
            kind = w.catalog or cfg.catalog.default
            watch = Watch(w, kind, self._canonical(kind, w.definition))
            if watch.key in wanted:
                log.warning("watch %s: the same definition as %s; the later entry is used",
                            w.definition, wanted[watch.key].config.definition)
            wanted[watch.key] = watch
        for key in [k for k in self._watches if k not in wanted]:
            self._drop(self._watches.pop(key), wanted.values())
        for key, watch in wanted.items():
            old = self._watches.get(key)
            if old is not None and old.task is not None:
                old.task.cancel()
            loop = self._loop if self._member is None else self._shared_loop
            watch.task = self._spawn(loop(watch))
            self._watches[key] = watch
            self._metrics.set_watch_every(key[1], watch.config.every)

    def stop(self) -> None:
        """Cancel every watch loop (runs already queued go on)."""
        for watch in self._watches.values():
            if watch.task is not None:
                watch.task.cancel()

    def find(self, catalog: str, definition: str) -> Optional[Watch]:
        """The watch of canonical (``catalog``, ``definition``), if any."""
        for watch in self._watches.values():
            if watch.key == (catalog, definition):
                return watch
        return None

    def fresh_for(self, catalog: str, definition: str) -> float:
        """Freshness window of a definition: its watch's, else ``state.fresh_for``."""
        watch = self.find(catalog, definition)
        return watch.fresh_for if watch is not None else self._config().state.fresh_for

    async def after_run(self, info: RunInfo) -> None:
        """Set ``info.warm_fraction`` from the store; for a watched definition also its
        gauges, and warn when it stays below the watch's ``ready`` fraction. A chunk of a
        round reads nothing: a scan of the whole definition after every chunk cost a 200,000-
        file round 7-22 s (bench/cluster.py); ``round_done`` does it once per round."""
        if info.origin == "chunk":
            return
        fresh_for = self.fresh_for(info.catalog, info.definition)
        rows = await asyncio.to_thread(self._store.status, fresh_for, info.definition,
                                       info.catalog)
        row = rows[0] if rows else None
        info.warm_fraction = row.warm_fraction if row is not None else None
        # Looked up again after the wait: a reload may have removed the watch meanwhile, and
        # a gauge set now would never be dropped.
        watch = self.find(info.catalog, info.definition)
        if watch is None or row is None:
            return
        self._set_gauges(row)
        self._warn_unready(watch, info.warm_fraction)

    async def round_done(self, catalog: str, definition: str, round_id: int) -> None:
        """The last chunk of round ``round_id`` of (``catalog``, ``definition``) was just
        recorded done by this member: set its gauges, and warn when the definition stays below
        its watch's ``ready`` fraction. The other members set theirs at their next heartbeat
        (``_shared_loop``), so that every member's gauges show the last finished round."""
        watch = self.find(catalog, definition)
        if watch is None:
            return
        row = await self._refresh_gauges(watch, round_id)
        if row is not None:
            self._warn_unready(watch, row.warm_fraction)

    async def _refresh_gauges(self, watch: Watch, round_id: int) -> Optional[DatasetStatus]:
        """Set ``watch``'s gauges from the state, after its round ``round_id`` finished."""
        catalog, definition = watch.key
        rows = await asyncio.to_thread(self._store.status, watch.fresh_for, definition,
                                       catalog)
        if rows and self.find(catalog, definition) is watch:
            self._set_gauges(rows[0])
            watch.gauges_round = round_id
        return rows[0] if rows else None

    @staticmethod
    def _warn_unready(watch: Watch, warm_fraction: Optional[float]) -> None:
        ready = watch.config.ready
        if warm_fraction is not None and warm_fraction < ready:
            log.warning("watch %s: only %.1f%% warm after the run, below ready %.1f%%",
                        watch.config.definition, 100 * warm_fraction, 100 * ready)

    # --- internals --------------------------------------------------------------------------

    def _canonical(self, kind: str, definition: str) -> Key:
        """(kind, definition) as the catalog names it; the written form when it cannot be
        opened now (the loop tries again and reports the problem)."""
        try:
            catalog = self._open(kind, definition)
        except PrestagedError:
            return (kind, definition)
        return (catalog.name, catalog.definition)

    def _drop(self, watch: Watch, remaining: Iterable[Watch]) -> None:
        """Stop ``watch`` and drop its gauges, unless one of the ``remaining`` watches
        shows under the same label."""
        if watch.task is not None:
            watch.task.cancel()
        log.info("watch %s removed", watch.config.definition)
        label = definition_label(watch.key[1])
        if not any(definition_label(w.key[1]) == label for w in remaining):
            self._metrics.forget_dataset(watch.key[1])

    def _set_gauges(self, row: DatasetStatus) -> None:
        last = row.last_run.ended if row.last_run else None
        self._metrics.set_dataset(row.definition, warm=row.fresh, stale=row.stale,
                                  failed=sum(row.failed.values()), unknown=row.never,
                                  last_warm=last, unresolved=row.unresolved)
        if row.localities:  # only where the storage tells locality
            self._metrics.set_locality(row.definition, row.localities)

    def _open_watched(self, watch: Watch) -> Catalog:
        """Open ``watch``'s catalog and learn its canonical key (if it changed: the file
        appeared since the watch was applied)."""
        catalog = self._open(watch.kind, watch.config.definition)
        watch.key = (catalog.name, catalog.definition)
        return catalog

    async def _loop(self, watch: Watch) -> None:
        """Warm ``watch`` after its first delay, then every ``every``."""
        w = watch.config
        delay = await self._first_delay(watch)
        while True:
            await asyncio.sleep(delay)
            try:
                info = self._submit(self._open_watched(watch), watch.fresh_for)
            except PrestagedError as e:
                log.error("watch %s: %s", w.definition, e)
            else:
                await info.finished.wait()
            jitter = self._config().daemon.jitter
            delay = w.every * (1.0 + random.uniform(-jitter, jitter))

    async def _shared_loop(self, watch: Watch) -> None:
        """A watch on a shared state: add its schedule (due after the first delay, unless
        another member added it), then every heartbeat claim it when due and plan a round."""
        member = self._member
        assert member is not None
        delay = await self._first_delay(watch)
        added = False
        while True:
            await member.connected.wait()
            kind, definition = watch.key
            try:
                if not added:
                    await asyncio.to_thread(shared.ensure_schedule, self._store, kind,
                                            definition, self._store.now() + delay)
                    added = True
                if await asyncio.to_thread(shared.claim_schedule, self._store, kind,
                                           definition, member.id, member.lease):
                    await self._plan(watch)
                # A round another member finished (or one before this member started): the
                # gauges follow it, or they would show some earlier round for ever.
                finished = await asyncio.to_thread(shared.last_finished_round, self._store,
                                                   kind, definition)
                if finished is not None and finished != watch.gauges_round:
                    await self._refresh_gauges(watch, finished)
            except driver_errors(PrestagedError) as e:
                log.warning("watch %s: %s", watch.config.definition, e)
            await asyncio.sleep(member.heartbeat)

    async def _plan(self, watch: Watch) -> None:
        """We hold ``watch``'s schedule: list its definition and store the round's chunks (or,
        when it cannot be listed, give the schedule back, due again after ``every``)."""
        member = self._member
        assert member is not None
        # The schedule's lease is renewed while the definition is listed: a listing longer
        # than cluster.lease (a big SAM or MetaCat definition) lost it every time, so the
        # round was never planned and the watch never warmed.
        lost = asyncio.Event()
        keeper = asyncio.ensure_future(keep_lease(self._store, member, "watch", watch.key,
                                                  lost.set))
        try:
            await self._list_and_plan(watch, member, lost)
        finally:
            keeper.cancel()

    async def _list_and_plan(self, watch: Watch, member: ClusterMember,
                             lost: asyncio.Event) -> None:
        w, cfg = watch.config, self._config()
        jitter = cfg.daemon.jitter
        since = self._store.now()
        try:
            catalog = self._open_watched(watch)
            refs = [ref async for ref in catalog.files()]
        except PrestagedError as e:
            log.error("watch %s: %s", w.definition, e)
            await asyncio.to_thread(shared.release_schedule, self._store, *watch.key,
                                    member.id, w.every)
            return
        try:
            planned = await asyncio.to_thread(
                shared.plan_round, self._store, catalog.name, catalog.definition, member.id,
                refs=refs, chunk=cfg.cluster.chunk, fresh_for=watch.fresh_for,
                next_in=w.every * (1.0 + random.uniform(-jitter, jitter)))
        except ValueError as e:
            log.error("watch %s: %s; not warmed", w.definition, e)
            await asyncio.to_thread(shared.release_schedule, self._store, *watch.key,
                                    member.id, w.every)
            return
        if planned is None:
            log.warning("watch %s: schedule lease lost while listing%s; another member plans "
                        "the round", w.definition,
                        " (taken over)" if lost.is_set() else "")
            return
        log.info("watch %s: round %d planned, %d files in %d chunks", w.definition, planned.id,
                 planned.files, planned.chunks)
        # Only this listing sees the whole definition: the members are the files it named.
        await asyncio.to_thread(self._listed, catalog, refs,
                                Listing(True, since, unresolved_in(catalog)))

    def _listed(self, catalog: Catalog, refs: list[FileRef], listing: Listing) -> None:
        self._store.add_members(catalog.name, catalog.definition, refs)
        self._store.record_listing(catalog.name, catalog.definition, listing)
        self._planned()

    async def _first_delay(self, watch: Watch) -> float:
        """0, or what is left of ``every`` since the watch's last run that did its work: all
        files warm, or some failed on their own (exit 1: a missing file is a normal state of
        real data, and every reload re-listed such a definition at once). A run stopped by
        its credentials, catalog, storage, state or a shutdown is run again at once."""
        try:
            catalog = self._open_watched(watch)
        except PrestagedError:
            return 0.0  # the first submit reports the problem
        every = watch.config.every
        rows = await asyncio.to_thread(self._store.status, every, catalog.definition,
                                       catalog.name)
        last = rows[0].last_run if rows else None
        if last is not None and last.ended and last.exit_code in (EXIT_OK, EXIT_SOME_FAILED):
            return max(0.0, last.ended + every - self._store.now())
        return 0.0
