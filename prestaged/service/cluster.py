"""The daemon as a member of a cluster sharing one state (issue 16): heartbeat, lease keeping,
and the worker that claims chunks of watch rounds.

``ClusterMember`` registers the daemon in ``cluster_members`` at start, heartbeats every ``[cluster]
heartbeat`` and leaves (giving up its leases) on a clean stop. While the database does not
answer, ``connected`` is clear: the daemon claims no new work until a heartbeat succeeds again
(the store reconnects by itself); the leases it held meanwhile may have expired and been taken
over, which every renewal and every campaign change notices (``state.cluster``).

``ChunkWorker`` warms chunks of watch rounds (``Watches`` plans them on a shared state): it
claims the oldest free chunk, runs it as a warm run of the watched definition, renewing the
chunk's lease at a third of the lease meanwhile, records it done, and claims the next; with
nothing to claim it looks again every heartbeat, or at once when this member planned a round.
While it warms a chunk it still looks every heartbeat for orphans (chunks whose holder's lease
expired: a dead member's) and warms those beside it, sharing the touch budget, so a dead
member's chunk is taken over within the lease plus a heartbeat even when every survivor is busy.

``keep_lease`` renews one lease while some work runs; the campaign queue uses it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Callable, Optional, Protocol

from prestaged.catalog import Catalog
from prestaged.config import ClusterConfig
from prestaged.errors import PrestagedError, StateError
from prestaged.metrics import Metrics
from prestaged.model import FileRef
from prestaged.state import cluster as shared
from prestaged.state.db import driver_errors
from prestaged.state.store import Store

__all__ = ["ChunkCatalog", "ChunkWorker", "ClusterMember", "LeaseHolder", "keep_lease"]

log = logging.getLogger(__name__)

FORGET_AFTER = 86400.0
"""A dead member's row stays this long (seconds) for people to see, then a live one drops it."""


def _unreachable() -> tuple[type[Exception], ...]:
    """What a database that does not answer raises here: a driver's error, or the store's
    one-line ``StateError`` (a ``PrestagedError``)."""
    return driver_errors(PrestagedError)


class ClusterMember:
    """This daemon's row in ``members`` and its heartbeat (see the module docstring).

    ``config()`` is the ``[cluster]`` section in force; ``listen`` the API address shown to
    people. The heartbeat task is its own (not one the daemon waits for on drain): ``leave``
    ends it."""

    def __init__(self, store: Store, metrics: Metrics, *, config: Callable[[], ClusterConfig],
                 listen: str, version: str) -> None:
        self._store, self._metrics, self._config = store, metrics, config
        self._listen, self._version = listen, version
        self.id = shared.new_member_id()
        self.connected = asyncio.Event()
        """Set while the database answers: work is claimed only then."""
        self._task: Optional[asyncio.Task[Any]] = None
        self._registered = False
        self._inflight: Optional[asyncio.Future[tuple[list[shared.Member],
                                                      dict[str, int]]]] = None

    @property
    def lease(self) -> float:
        """``[cluster] lease`` in force (seconds)."""
        return float(self._config().lease)

    @property
    def heartbeat(self) -> float:
        """``[cluster] heartbeat`` in force (seconds)."""
        return float(self._config().heartbeat)

    async def start(self) -> None:
        """Register (after forgetting members of this host whose process is gone, so that a
        restarted daemon resumes their work at once instead of after their leases), then
        heartbeat in the background."""
        gone = await asyncio.to_thread(shared.forget_dead_local, self._store)
        for member in gone:
            log.info("member %s (this host, process gone): its leases are given up", member)
        await asyncio.to_thread(shared.register_member, self._store, self.id,
                                listen=self._listen, version=self._version)
        self._registered = True
        self.connected.set()
        log.info("cluster member %s (lease %.0f s, heartbeat %.0f s)", self.id, self.lease,
                 self.heartbeat)
        await self._beat_once()
        self._task = asyncio.ensure_future(self._beat())

    async def leave(self) -> None:
        """A clean stop: stop heartbeating, give up every lease and remove our row (others
        take our work at once). A database that does not answer is logged: our leases then
        expire on their own."""
        if self._task is not None:
            self._task.cancel()
        if not self._registered:  # start() failed (a read-only state): nothing to give up
            return
        try:
            await asyncio.to_thread(shared.leave, self._store, self.id)
        except _unreachable() as e:
            log.warning("cluster: could not leave cleanly (%s); our leases expire in %.0f s",
                        e, self.lease)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._beat_once()

    async def _beat_once(self) -> None:
        """One heartbeat, and the cluster gauges. A heartbeat that fails, or that has not
        answered within a heartbeat (the store waits up to its pool timeout for a connection),
        clears ``connected``; the one in flight is waited for, never doubled."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._beat_sync))
            # One that fails after its wait gave up is replaced unawaited: its error was
            # "Task exception was never retrieved" with a traceback (the next beat reports).
            self._inflight.add_done_callback(_retrieved)
        failures: tuple[type[Exception], ...] = (asyncio.TimeoutError, *_unreachable())
        try:
            members, leases = await asyncio.wait_for(asyncio.shield(self._inflight),
                                                     self.heartbeat)
        except failures as e:
            if self.connected.is_set():
                why = "no answer within a heartbeat" if isinstance(
                    e, asyncio.TimeoutError) else str(e)
                log.error("cluster: the state database does not answer (%s); claiming no new "
                          "work until it does", why)
            self.connected.clear()
            return
        if not self.connected.is_set():
            log.info("cluster: the state database answers again; claiming work")
        self.connected.set()
        self._metrics.set_cluster(sum(m.alive(self.lease) for m in members), leases)
        if self._store.writer_stopped:
            # The database answers again (or never stopped: a killed writer): outcomes are
            # recorded again from now on, not only from the next run's start.
            try:
                await asyncio.to_thread(self._store.revive_writer)
            except StateError as e:
                log.error("%s", e)

    def _beat_sync(self) -> tuple[list[shared.Member], dict[str, int]]:
        """The heartbeat's transactions (in a worker thread): our row (registered again if
        the others forgot it after a very long silence), then what the gauges show."""
        if not shared.heartbeat(self._store, self.id,
                                forget_after=max(FORGET_AFTER, 10 * self.lease)):
            log.warning("cluster: our member row was gone; registering again")
            shared.register_member(self._store, self.id, listen=self._listen,
                                   version=self._version)
        return shared.members(self._store), shared.leases_held(self._store, self.id)


class LeaseHolder(Protocol):
    """Who holds a lease: a ``ClusterMember``, or a foreground ``campaign run``."""

    @property
    def id(self) -> str:
        """The owner id the lease is stored under."""
        ...

    @property
    def lease(self) -> float:
        """Seconds one renewal lasts."""
        ...


async def keep_lease(store: Store, member: LeaseHolder, kind: str, key: Sequence[Any],
                     on_lost: Callable[[], None]) -> None:
    """Renew our ``kind`` lease on ``key`` every third of the lease until cancelled; when a
    renewal finds it taken over, call ``on_lost`` once and return. A database that does not
    answer is retried at the next third: the lease may still be ours when it answers."""
    while True:
        await asyncio.sleep(member.lease / 3)
        try:
            ours = await asyncio.to_thread(shared.renew, store, kind, key, member.id,
                                           member.lease)
        except _unreachable() as e:
            log.warning("cluster: %s %s lease not renewed: %s", kind, _show(key), e)
            continue
        if not ours:
            log.warning("cluster: %s %s: lease lost (taken over by another member)", kind,
                        _show(key))
            on_lost()
            return


def _show(key: Sequence[Any]) -> str:
    return "/".join(str(k) for k in key)


class ChunkCatalog:
    """The files of one chunk of a watch round, as the watched definition's catalog: its runs
    and records are the definition's (a ``Catalog``)."""

    lists_part = True
    """A chunk's run says nothing of the definition's whole listing (``runner._listing``)."""

    def __init__(self, name: str, definition: str, refs: list[FileRef]) -> None:
        self.name, self.definition, self._refs = name, definition, refs

    async def files(self) -> AsyncIterator[FileRef]:
        """The chunk's files, in round order."""
        for ref in self._refs:
            yield ref

    async def estimate(self) -> Optional[int]:
        """The chunk's size."""
        return len(self._refs)


RunChunk = Callable[[Catalog, float, asyncio.Event], Awaitable[int]]
"""``run(catalog, fresh_for, stop) -> exit code``: one warm run of a chunk (``Runs.submit``),
interrupted when ``stop`` is set."""


class ChunkWorker:
    """Claims and warms chunks of watch rounds (see the module docstring); ``round_done(catalog,
    definition)`` is awaited when a chunk this member finished completed its round."""

    def __init__(self, store: Store, member: ClusterMember, metrics: Metrics, *,
                 run: RunChunk, draining: Callable[[], bool],
                 round_done: Callable[[str, str, int], Awaitable[None]]) -> None:
        self._store, self._member, self._metrics = store, member, metrics
        self._run, self._draining, self._round_done = run, draining, round_done
        self.wake = asyncio.Event()
        """Set when this member planned a round: claim at once, not at the next heartbeat."""

    async def loop(self) -> None:
        """Claim and warm chunks until cancelled or the daemon drains."""
        working: set[asyncio.Task[None]] = set()
        try:
            while not self._draining():
                await self._member.connected.wait()
                self.wake.clear()
                try:
                    chunk = await asyncio.to_thread(
                        shared.claim_chunk, self._store, self._member.id, self._member.lease,
                        orphans_only=bool(working))
                except _unreachable() as e:
                    log.warning("cluster: cannot claim a chunk: %s", e)
                    chunk = None
                if chunk is not None:
                    task = asyncio.ensure_future(self._work(chunk))
                    working.add(task)
                    task.add_done_callback(working.discard)
                    continue  # maybe more orphans
                waits = {asyncio.ensure_future(self.wake.wait()), *working}
                _, pending = await asyncio.wait(waits, timeout=self._member.heartbeat,
                                                return_when=asyncio.FIRST_COMPLETED)
                for waiter in pending - working:
                    waiter.cancel()
        finally:
            for task in working:
                task.cancel()

    async def _work(self, chunk: shared.Chunk) -> None:
        if chunk.taken_from is not None:
            self._metrics.lease_taken_over("chunk")
            log.info("cluster: took chunk %d/%d of %s over from %s (its lease expired)",
                     chunk.round_id, chunk.idx, chunk.definition, chunk.taken_from)
        catalog = ChunkCatalog(chunk.catalog, chunk.definition, chunk.refs)
        lost = asyncio.Event()  # another member took it over: stop, it warms the rest
        keeper = asyncio.ensure_future(keep_lease(self._store, self._member, "chunk", chunk.key,
                                                  lost.set))
        try:
            code = await self._run(catalog, chunk.fresh_for, lost)
        except PrestagedError as e:
            log.error("cluster: chunk %d/%d of %s: %s", chunk.round_id, chunk.idx,
                      chunk.definition, e)
            return  # not done: its lease expires and a member (maybe us) takes it again
        finally:
            keeper.cancel()
        if lost.is_set():
            log.info("cluster: chunk %d/%d of %s stopped: another member took it over",
                     chunk.round_id, chunk.idx, chunk.definition)
            return
        try:
            _, completed = await asyncio.to_thread(shared.finish_chunk, self._store, chunk,
                                                   self._member.id, code)
        except _unreachable() as e:
            log.warning("cluster: chunk %d/%d of %s warmed but not recorded done (%s); it "
                        "will be warmed again", chunk.round_id, chunk.idx, chunk.definition, e)
            return
        if completed:
            log.info("cluster: round %d of %s complete", chunk.round_id, chunk.definition)
            await self._round_done(chunk.catalog, chunk.definition, chunk.round_id)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s outcome as seen (its exception is reported elsewhere, or moot)."""
    if not future.cancelled():
        future.exception()
