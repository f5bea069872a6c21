"""The daemon's campaign queue: campaigns added over the API, run by ``prestaged serve``.

``prestaged campaign add FILE`` sends the file's text to the daemon, which stores it in the state
database (``campaigns`` table) and runs it with the same ``campaigns.run_campaign`` as ``campaign
run``, with the daemon's shared connection pool, touch budget and metrics. Everything a campaign
knows lives in the state database, so a restarted daemon picks every campaign up where it was:
a drainingn ledger is never handed out twice, and a submission found in ``submitting`` becomes
``launch_unknown`` instead of being submitted again.

One task per campaign runs it until it ends: ``done`` (every stage drained and complete, or
cancelled) stops the task; otherwise (held, a submission failed or is launch_unknown, a catalog
error) the task waits for an operator action through the API (hold, release, cancel,
mark-submitted: they act at once) or for ``daemon.campaign_check`` to pass, then runs the
campaign again, which resumes from the state database. A cancel also interrupts a gate in
progress. On SIGTERM, gates and keep-warm waits stop at once; a submit command that is running
gets ``daemon.drain_timeout`` to finish (if it is killed its submission is launch_unknown).

Several daemons on one state (issue 16): every member has a task per stored campaign, but only
the member holding the campaign's lease (``state.cluster``) runs passes; the others show it as
``elsewhere`` and try to claim it every heartbeat, so a dead member's campaigns are taken over
within ``[cluster] lease`` plus a heartbeat. The holder renews the lease at a third of the
lease; a renewal that finds it taken over interrupts the pass, and every change the runner makes
checks the lease in its own transaction (``CampaignRepository(owner=...)``), so no submission is
launched twice. Every member looks at the stored campaigns every heartbeat: a campaign added or
replaced through another member is started here too, and an operator action through another
member (it sets ``poked``) wakes the holder (a cancel interrupts its gate).

Finished campaigns (``CampaignRepository.finished``: a pass ended with every stage done or
cancelled, and every submission is final) are not resumed at start and have no
``prestaged_campaign_submissions`` series (dropped the moment they finish); ``list`` and
``show`` still read them from the state until ``forget`` (``campaign forget``, or the daemon's
tidy after ``[state] keep_campaigns``) drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prestaged.campaign.actions import ACTIONS, apply_action, check_names
from prestaged.campaign.repository import CampaignRepository, SubmissionState
from prestaged.campaign.runner import one_runner, run_campaign
from prestaged.campaign.spec import CampaignConfig, parse_campaign
from prestaged.catalog import Catalog
from prestaged.context import Context
from prestaged.errors import EXIT_OK, ConflictError, NotFoundError, PrestagedError
from prestaged.gate import GateFn, RewarmFn
from prestaged.locality import TapeAccess
from prestaged.metrics import Metrics
from prestaged.model import error_text
from prestaged.pacing import Rates
from prestaged.pins import ReleaseFn
from prestaged.service.cluster import ClusterMember, keep_lease
from prestaged.service.runs import Spawn
from prestaged.state import cluster as shared
from prestaged.state.db import driver_errors
from prestaged.state.store import Store
from prestaged.warm import Toucher, WarmSettings

__all__ = ["ACTIONS", "CampaignEntry", "DaemonCampaigns"]

log = logging.getLogger(__name__)


_STATES = [s.value for s in SubmissionState]


def _set(event: asyncio.Event, _: object) -> None:
    event.set()


@dataclass
class CampaignEntry:
    """A campaign the daemon runs: its config and where its task is."""

    config: CampaignConfig
    status: str = "starting"
    """running, waiting (stopped short: see ``detail``), done, or stopped (daemon stopping)."""
    detail: str = ""
    stages: dict[str, str] = field(default_factory=dict)
    """Per stage, how the last pass ended (``CampaignResult.stages``)."""
    passes: int = 0
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by an operator action: look at the campaign again now."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the task must end (daemon stopping, campaign replaced)."""
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    """Ends the current pass at its next step (a cancel); the task goes on."""
    task: Optional[asyncio.Task[None]] = None
    keeper: Optional[asyncio.Task[None]] = None
    """Renews this member's lease on the campaign while it holds it (several daemons)."""
    born: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (the daemon side of ``campaign list``/``show``)."""
        return {"status": self.status, "detail": self.detail or None,
                "stage_results": dict(self.stages), "passes": self.passes,
                "source": str(self.config.source) if self.config.source else None}


class DaemonCampaigns:
    """The daemon's campaign tasks (started by ``start()``).

    Collaborators, nothing more of the daemon: the open ``store``, the shared ``toucher``,
    ``metrics``; ``context()`` the context in force (config, gate, keep-warm and release
    functions), ``settings()`` the engine settings with the current credentials,
    ``open_catalog(kind, definition)`` the daemon's catalogs, ``spawn`` to run tasks,
    ``draining()`` and ``tape()`` the daemon's Tape REST access (None: ``stage = never``),
    ``rates`` the request rates learned from 429s that the daemon's runs share.

    Every campaign-state call goes through ``asyncio.to_thread``: a transaction may wait up to
    the store's busy timeout for another process, and the event loop must keep answering
    ``/healthz`` and ``/metrics`` meanwhile.
    """

    def __init__(self, store: Store, toucher: Toucher, metrics: Metrics, *,
                 context: Callable[[], Context], settings: Callable[[], WarmSettings],
                 open_catalog: Callable[[str, str], Catalog], spawn: Spawn,
                 draining: Callable[[], bool],
                 tape: Callable[[], Optional[TapeAccess]] = lambda: None,
                 member: Optional[ClusterMember] = None,
                 rates: Optional[Rates] = None) -> None:
        self._store, self._toucher, self._metrics = store, toucher, metrics
        self._rates = Rates() if rates is None else rates
        self._member = member
        self._seen: dict[str, tuple[Optional[float], float]] = {}
        self._tape = tape
        self._context, self._settings, self._open = context, settings, open_catalog
        self._spawn, self._draining = spawn, draining
        self.entries: dict[str, CampaignEntry] = {}
        self.state = CampaignRepository(store, on_move=self._moved)
        """Campaign rows of the daemon's store, reporting transitions to its metrics."""
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stale: set[str] = set()
        self._stale_event = asyncio.Event()
        self._gauges: Optional[asyncio.Task[Any]] = None
        self._follower: Optional[asyncio.Task[Any]] = None

    @property
    def workdir(self) -> Path:
        """Where slices' URL and name lists go (as for ``campaign run``)."""
        return self._store.path.parent / "campaigns"

    async def start(self) -> None:
        """Run every campaign stored by an earlier ``add``."""
        self._loop = asyncio.get_running_loop()
        self._gauges = self._spawn(self._refresh_gauges())

        def stored() -> tuple[list[CampaignConfig], dict[str, float]]:
            return self.state.registered(), self.state.finished()

        registered, finished = await asyncio.to_thread(stored)
        for campaign in registered:
            if campaign.name not in finished:  # a finished one is only shown (list, show)
                self._mark_stale(campaign.name)
                self._launch(campaign)
        if self._member is not None:
            self._seen = {name: (poked, updated) for name, (poked, updated, _) in
                          (await asyncio.to_thread(shared.pokes, self._store)).items()}
            self._follower = self._spawn(self._follow(self._member))
        if self.entries:
            log.info("resuming %d campaigns: %s", len(self.entries), ", ".join(self.entries))
        done = len(registered) - len(self.entries)
        if done:
            log.info("%d finished campaigns not resumed (`prestaged campaign list` shows "
                     "them; `campaign forget` or state.keep_campaigns drops them)", done)

    def stop(self) -> None:
        """The daemon is stopping: every campaign stops at its next step."""
        for entry in self.entries.values():
            entry.stop.set()
            entry.poke.set()
        if self._gauges is not None:
            self._gauges.cancel()
        if self._follower is not None:
            self._follower.cancel()

    # --- operator actions -----------------------------------------------------------------

    async def add(self, text: str, source: str, *,
                  held: bool = False) -> tuple[CampaignConfig, bool]:
        """Validate and store campaign file ``text`` (read from ``source``), then run it;
        ``held`` holds it first, so that nothing is created or launched until released.
        Replacing a campaign of the same name keeps its submissions, ledger and controls.
        Returns the campaign and whether it is new; ``ConfigError`` for a bad file."""
        if self._draining():
            raise PrestagedError("the daemon is stopping")
        campaign = parse_campaign(text, Path(source))

        def store() -> bool:
            new = self.state.register(campaign, text)
            if held:
                self.state.hold(campaign.name)
            return new

        new = await asyncio.to_thread(store)
        self._mark_stale(campaign.name)
        self._launch(campaign)
        log.info("campaign %s %s from %s%s", campaign.name, "added" if new else "replaced",
                 source, " (held)" if held else "")
        return campaign, new

    async def act(self, name: str, action: str, stage: Optional[str] = None,
                  submission: Optional[int] = None, job_id: Optional[str] = None) -> str:
        """Apply ``action`` (one of ``ACTIONS``) to campaign ``name`` (or one ``stage``) and
        wake its task; returns a one-line account (``campaign.actions.apply_action``, whose
        errors propagate)."""
        if self._draining():  # stored now, it would act only after the restart: say so
            raise PrestagedError("the daemon is stopping")
        entry = self.entries.get(name)
        stages = [s.name for s in entry.config.stage] if entry is not None else None
        text = await asyncio.to_thread(functools.partial(
            apply_action, self.state, name, action, stage=stage, submission=submission,
            job_id=job_id, stages=stages))
        if self._member is not None:  # the member driving it (maybe another) looks again
            await asyncio.to_thread(shared.poke_campaign, self._store, name)
        entry = self.entries.get(name)  # the campaign may have been replaced meanwhile
        if action == "cancel" and entry is not None:
            entry.interrupt.set()  # a gate in progress ends now; the next pass sees it
        if entry is not None:
            if entry.task is None or entry.task.done():
                self._launch(entry.config)  # a finished campaign looks again (e.g. release)
            else:
                entry.poke.set()
        log.info("campaign action: %s", text)
        return text

    async def forget(self, name: str) -> dict[str, int]:
        """``campaign forget``: drop every row of finished campaign ``name`` from the state
        (``CampaignRepository.forget``, whose errors propagate), its task and its series;
        ``ConflictError`` while this daemon runs a pass of it. Returns the rows dropped."""
        if self._draining():
            raise PrestagedError("the daemon is stopping")
        check_names(name)
        entry = self.entries.get(name)
        if entry is not None and entry.task is not None and entry.status == "done":
            await asyncio.wait({entry.task}, timeout=10)  # giving its lease up, at most
        if entry is not None and entry.task is not None and not entry.task.done():
            why = await asyncio.to_thread(self.state.unfinished, name)  # the state's words
            raise ConflictError(f"campaign {name} is not finished: " + (why or (
                f"this daemon runs it ({entry.status}"
                f"{': ' + entry.detail if entry.detail else ''})")) + "; nothing forgotten")

        def drop() -> dict[str, int]:
            if self._store.url is not None:  # daemons: its lease, checked in forget
                return self.state.forget(name)
            if name not in self.state.names():
                raise NotFoundError(f"no campaign '{name}'")
            with one_runner(self.workdir, name):  # no `campaign run` of it meanwhile
                return self.state.forget(name)

        dropped = await asyncio.to_thread(drop)
        self.forgotten([name])
        return dropped

    def running(self) -> list[str]:
        """Campaigns this daemon runs a task of now (a tidy spares them)."""
        return [name for name, e in self.entries.items()
                if e.task is not None and not e.task.done()]

    def forgotten(self, names: Iterable[str]) -> None:
        """Campaigns ``names`` are gone from the state (a forget, a tidy, another member's):
        stop their tasks, drop their entries and series."""
        for name in names:
            entry = self.entries.pop(name, None)
            if entry is not None:
                entry.stop.set()
                entry.poke.set()
            self._stale.discard(name)
            self._metrics.forget_campaign(name, _STATES)

    async def describe(self, name: str, *, output: bool = True) -> dict[str, object]:
        """``campaign show``: the stored document plus the daemon's view of its task;
        ``NotFoundError`` for an unknown campaign. Without ``output`` the submit commands'
        ``output_tail`` is left out (operator data: see the API's access rules)."""
        fresh_for = self._context().cfg.state.fresh_for

        def read() -> dict[str, Any]:
            doc = self.state.describe(name, self.workdir, fresh_for)
            if not doc["submissions"] and name not in self.state.names():
                raise NotFoundError(f"no campaign '{name}'")
            return doc

        doc = await asyncio.to_thread(read)
        if not output:
            for sub in doc["submissions"]:
                sub["output_tail"] = None
        entry = self.entries.get(name)
        doc["daemon"] = entry.to_dict() if entry is not None else None
        return doc

    async def summaries(self) -> list[dict[str, object]]:
        """``campaign list``: every campaign with its control, counts by state and task."""
        out: list[dict[str, object]] = []
        for row in await asyncio.to_thread(self.state.summaries):
            entry = self.entries.get(row["campaign"])
            out.append({**row, "daemon": entry.to_dict() if entry is not None else None})
        return out

    # --- running ----------------------------------------------------------------------------

    def _launch(self, campaign: CampaignConfig) -> None:
        """(Re)start ``campaign``'s task; a task already running stops at its next step and
        the new one starts after it."""
        old = self.entries.get(campaign.name)
        previous = None
        if old is not None and old.task is not None and not old.task.done():
            old.stop.set()
            old.poke.set()
            previous = old.task
        entry = CampaignEntry(campaign)
        self.entries[campaign.name] = entry
        entry.task = self._spawn(self._loop_of(entry, previous))

    async def _loop_of(self, entry: CampaignEntry,
                       previous: Optional[asyncio.Task[Any]]) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            while not self._draining() and not entry.stop.is_set():
                if not await self._hold(entry):
                    # Another member drives it: look again every heartbeat (its death shows
                    # as an expired lease) or when an operator acts.
                    assert self._member is not None
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(entry.poke.wait(), self._member.heartbeat)
                    entry.poke.clear()
                    continue
                await self._pass(entry)
                if entry.status == "done":
                    return
                if entry.stop.is_set() or self._draining():
                    break
                # Idle until an operator acts or campaign_check passes: nothing else changes
                # a campaign that stopped short.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(entry.poke.wait(),
                                           self._context().cfg.daemon.campaign_check)
            entry.status = "stopped"
        finally:
            await self._unhold(entry)

    async def _hold(self, entry: CampaignEntry) -> bool:
        """Whether this member may run a pass of ``entry``: always on its own; with several
        daemons, once it holds the campaign's lease (claimed here, then renewed by
        ``entry.keeper`` until it is lost or given up)."""
        member = self._member
        if member is None or (entry.keeper is not None and not entry.keeper.done()):
            return True
        name = entry.config.name
        if not member.connected.is_set():  # claim nothing while the database is away
            entry.status, entry.detail = "waiting", "state database does not answer"
            return False
        try:
            ours, other = await asyncio.to_thread(shared.claim_campaign, self._store, name,
                                                  member.id, member.lease)
        except driver_errors(PrestagedError) as e:
            entry.status, entry.detail = "waiting", f"state unreachable: {e}"
            return False
        if not ours:
            entry.status = "elsewhere"
            entry.detail = f"driven by member {other}" if other else "not claimable now"
            return False
        if other is not None:
            self._metrics.lease_taken_over("campaign")
            log.info("campaign %s: taken over from member %s (its lease expired)", name, other)

        def lost() -> None:
            entry.interrupt.set()  # the pass in progress ends at its next step
            entry.poke.set()

        entry.keeper = asyncio.ensure_future(keep_lease(self._store, member, "campaign",
                                                        (name,), lost))
        return True

    async def _unhold(self, entry: CampaignEntry) -> None:
        """Stop renewing ``entry``'s lease and give it up (another member may drive it)."""
        if entry.keeper is None or self._member is None:
            return
        entry.keeper.cancel()
        entry.keeper = None
        with contextlib.suppress(*driver_errors(PrestagedError)):
            await asyncio.to_thread(shared.release_campaign, self._store, entry.config.name,
                                    self._member.id)

    async def _follow(self, member: ClusterMember) -> None:
        """Every heartbeat: start campaigns added through other members, restart those they
        replaced, and wake those they acted on (see the module docstring)."""
        while True:
            await asyncio.sleep(member.heartbeat)
            looked = time.monotonic()
            try:
                rows = await asyncio.to_thread(shared.pokes, self._store)
                changed = {name for name, (poked, updated, _) in rows.items()
                           if self._seen.get(name) != (poked, updated)}
                # New here, or replaced since we last looked (one added through this member
                # is in entries already and has no earlier look: not restarted again).
                fresh = {name for name in changed
                         if name not in self.entries
                         or (name in self._seen and self._seen[name][1] != rows[name][1])}
                configs = (await asyncio.to_thread(self._unfinished)) if fresh else []
                cancelled = {name for name in changed - fresh
                             if "cancelled" in (await asyncio.to_thread(
                                 self.state.controls, name)).values()}
            except driver_errors(PrestagedError) as e:
                log.warning("campaigns: cannot read the shared campaigns: %s", e)
                continue
            # Forgotten through another member (or its tidy): gone here too, unless added
            # again here since the rows were read.
            self.forgotten([name for name in set(self._seen) - set(rows)
                            if name not in self.entries or self.entries[name].born < looked])
            self._seen = {name: (poked, updated) for name, (poked, updated, _) in rows.items()}
            for campaign in configs:
                if campaign.name in fresh:
                    self._mark_stale(campaign.name)
                    self._launch(campaign)
            for name in changed - fresh:
                entry = self.entries.get(name)
                if entry is None:
                    continue
                if name in cancelled:
                    entry.interrupt.set()
                if entry.task is None or entry.task.done():
                    self._launch(entry.config)
                else:
                    entry.poke.set()

    def _unfinished(self) -> list[CampaignConfig]:
        """The registered campaigns that are not finished (a replaced one never is)."""
        finished = self.state.finished()
        return [c for c in self.state.registered() if c.name not in finished]

    async def _pass(self, entry: CampaignEntry) -> None:
        """One ``run_campaign`` pass; ``entry`` says how it ended."""
        name = entry.config.name
        entry.poke.clear()
        entry.status, entry.detail = "running", ""
        entry.passes += 1
        entry.interrupt = stop = asyncio.Event()
        relay = asyncio.ensure_future(entry.stop.wait())
        relay.add_done_callback(functools.partial(_set, stop))
        try:
            result = await run_campaign(
                entry.config, self._store, gate=self._gate(stop),
                open_catalog=self._catalogs(entry.config), workdir=self.workdir, stop=stop,
                rewarm=self._rewarm(stop), release=self._release(stop), on_move=self._moved,
                owner=self._member.id if self._member is not None else None)
        except PrestagedError as e:
            entry.status, entry.detail = "waiting", str(e)
            log.error("campaign %s: %s; trying again in %.0f s or on the next action",
                      name, e, self._context().cfg.daemon.campaign_check)
        except Exception as e:  # a bug: keep the daemon and the other campaigns going
            # Answered by the API: a bug's words may quote a URL's password or a header.
            entry.status, entry.detail = "waiting", f"internal error: {error_text(repr(e))}"
            log.exception("campaign %s: internal error", name)
        else:
            entry.stages = dict(result.stages)
            if result.exit_code == EXIT_OK:
                entry.status = "done"
                entry.detail = ", ".join(f"{k} {v}" for k, v in result.stages.items())
                log.info("campaign %s: done (%s)", name, entry.detail)
                self._mark_stale(name)  # finished now: its series go (_refresh_gauges)
                return
            waiting = {k: v for k, v in result.stages.items() if v not in ("done",
                                                                           "cancelled")}
            entry.status = "waiting"
            entry.detail = ", ".join(f"{k} {v}" for k, v in waiting.items())
        finally:
            relay.cancel()

    def _gate(self, stop: asyncio.Event) -> GateFn:
        return self._context().gate(self._store, self._toucher, self._settings(), stop=stop,
                                    probe=self._metrics, tape=self._tape(), rates=self._rates)

    def _rewarm(self, stop: asyncio.Event) -> RewarmFn:
        return self._context().rewarm(self._store, self._toucher, self._settings(), stop=stop,
                                      probe=self._metrics, tape=self._tape(),
                                      rates=self._rates)

    def _release(self, stop: asyncio.Event) -> ReleaseFn:
        return self._context().release(self._store, self._tape(), stop=stop)

    def _catalogs(self, campaign: CampaignConfig) -> Callable[[str], Catalog]:
        kind = campaign.defaults.catalog or self._context().cfg.catalog.default
        return lambda definition: self._open(kind, definition)

    # --- metrics ----------------------------------------------------------------------------

    def _moved(self, campaign: str, frm: Optional[SubmissionState], to: SubmissionState,
               since: float) -> None:
        """A stored transition. Runs on the event loop (the runner) or in a worker thread
        (an operator action): the metrics are thread-safe, and the submissions gauge, which
        needs a query, is refreshed by ``_refresh_gauges`` on the loop's side."""
        S = SubmissionState
        if frm is S.PRESTAGING and to in (S.READY, S.FAILED):
            self._metrics.gate_waited(self._store.now() - since)
        if frm is S.SUBMITTING:
            self._metrics.launched(to.value)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._mark_stale, campaign)

    def _totals(self, names: list[str]) -> dict[str, Optional[dict[str, int]]]:
        return {name: self.state.gauge(name) for name in names}

    def _mark_stale(self, campaign: str) -> None:
        self._stale.add(campaign)
        self._stale_event.set()

    async def _refresh_gauges(self) -> None:
        """Keep ``prestaged_campaign_submissions`` up to date: campaigns whose submissions
        moved, or that finished, are counted again, off the event loop, a batch at a time;
        a finished campaign's series are dropped (``CampaignRepository.gauge``)."""
        while True:
            await self._stale_event.wait()
            self._stale_event.clear()
            names, self._stale = sorted(self._stale), set()
            try:
                totals = await asyncio.to_thread(self._totals, names)
            except driver_errors(PrestagedError) as e:  # unreadable now: the next move retries
                log.warning("campaign gauges not updated: %s", e)
                continue
            for name, counts in totals.items():
                if counts is None:
                    self._metrics.forget_campaign(name, _STATES)
                else:
                    self._metrics.set_campaign_submissions(name, counts, _STATES)
