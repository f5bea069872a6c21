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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from prestaged.campaign.actions import ACTIONS, apply_action
from prestaged.campaign.repository import CampaignRepository as CampaignState
from prestaged.campaign.repository import SubmissionState
from prestaged.campaign.runner import run_campaign
from prestaged.campaign.spec import CampaignConfig, parse_campaign
from prestaged.catalog import Catalog
from prestaged.errors import EXIT_OK, CatalogError, PrestagedError
from prestaged.gate import GateFn, RewarmFn

if TYPE_CHECKING:
    from prestaged.service.daemon import Daemon

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the daemon side of ``campaign list``/``show``)."""
        return {"status": self.status, "detail": self.detail or None,
                "stage_results": dict(self.stages), "passes": self.passes,
                "source": str(self.config.source) if self.config.source else None}


class DaemonCampaigns:
    """Campaign tasks of ``daemon`` (started by ``start()``, once its store and pool exist)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.entries: dict[str, CampaignEntry] = {}
        self._state: Optional[CampaignState] = None

    @property
    def state(self) -> CampaignState:
        """Campaign rows of the daemon's store, reporting transitions to its metrics."""
        if self._state is None:
            assert self.daemon.store is not None
            self._state = CampaignState(self.daemon.store, on_move=self._moved)
        return self._state

    @property
    def workdir(self) -> Path:
        """Where slices' URL and name lists go (as for ``campaign run``)."""
        assert self.daemon.store is not None
        return self.daemon.store.path.parent / "campaigns"

    def start(self) -> None:
        """Run every campaign stored by an earlier ``add``."""
        for campaign in self.state.registered():
            self._update_gauge(campaign.name)
            self._launch(campaign)
        if self.entries:
            log.info("resuming %d campaigns: %s", len(self.entries), ", ".join(self.entries))

    def stop(self) -> None:
        """The daemon is stopping: every campaign stops at its next step."""
        for entry in self.entries.values():
            entry.stop.set()
            entry.poke.set()

    # --- operator actions -----------------------------------------------------------------

    def add(self, text: str, source: str, *, held: bool = False) -> tuple[CampaignConfig, bool]:
        """Validate and store campaign file ``text`` (read from ``source``), then run it;
        ``held`` holds it first, so that nothing is created or launched until released.
        Replacing a campaign of the same name keeps its submissions, ledger and controls.
        Returns the campaign and whether it is new; ``ConfigError`` for a bad file."""
        if self.daemon.draining:
            raise PrestagedError("the daemon is stopping")
        campaign = parse_campaign(text, Path(source))
        new = self.state.register(campaign, text)
        if held:
            self.state.hold(campaign.name)
        self._update_gauge(campaign.name)
        self._launch(campaign)
        log.info("campaign %s %s from %s%s", campaign.name, "added" if new else "replaced",
                 source, " (held)" if held else "")
        return campaign, new

    def act(self, name: str, action: str, stage: Optional[str] = None,
            submission: Optional[int] = None, job_id: Optional[str] = None) -> str:
        """Apply ``action`` (one of ``ACTIONS``) to campaign ``name`` (or one ``stage``) and
        wake its task; returns a one-line account (``campaign.actions.apply_action``, whose
        errors propagate)."""
        entry = self.entries.get(name)
        stages = [s.name for s in entry.config.stage] if entry is not None else None
        text = apply_action(self.state, name, action, stage=stage, submission=submission,
                            job_id=job_id, stages=stages)
        if action == "cancel" and entry is not None:
            entry.interrupt.set()  # a gate in progress ends now; the next pass sees it
        if entry is not None:
            if entry.task is None or entry.task.done():
                self._launch(entry.config)  # a finished campaign looks again (e.g. release)
            else:
                entry.poke.set()
        log.info("campaign action: %s", text)
        return text

    def describe(self, name: str) -> dict[str, Any]:
        """``campaign show``: the stored document plus the daemon's view of its task."""
        doc = self.state.describe(name, self.workdir, self.daemon.cfg.state.fresh_for)
        if not doc["submissions"] and name not in self.state.names():
            raise CatalogError(f"no campaign '{name}'")
        entry = self.entries.get(name)
        doc["daemon"] = entry.to_dict() if entry is not None else None
        return doc

    def summaries(self) -> list[dict[str, Any]]:
        """``campaign list``: every campaign with its control, counts by state and task."""
        out = []
        for row in self.state.summaries():
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
        entry.task = self.daemon.spawn(self._loop(entry, previous))

    async def _loop(self, entry: CampaignEntry, previous: Optional[asyncio.Task[Any]]) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        name = entry.config.name
        while not self.daemon.draining and not entry.stop.is_set():
            entry.poke.clear()
            entry.status, entry.detail = "running", ""
            entry.passes += 1
            entry.interrupt = stop = asyncio.Event()
            relay = asyncio.ensure_future(entry.stop.wait())
            relay.add_done_callback(functools.partial(_set, stop))
            try:
                result = await run_campaign(
                    entry.config, self.daemon.store_or_fail(), gate=self._gate(stop),
                    open_catalog=self._catalogs(entry.config), workdir=self.workdir, stop=stop,
                    rewarm=self._rewarm(stop), on_move=self._moved)
            except PrestagedError as e:
                entry.status, entry.detail = "waiting", str(e)
                log.error("campaign %s: %s; trying again in %.0f s or on the next action",
                          name, e, self.daemon.cfg.daemon.campaign_check)
            except Exception as e:  # a bug: keep the daemon and the other campaigns going
                entry.status, entry.detail = "waiting", f"internal error: {e!r}"
                log.exception("campaign %s: internal error", name)
            else:
                entry.stages = dict(result.stages)
                if result.exit_code == EXIT_OK:
                    entry.status = "done"
                    entry.detail = ", ".join(f"{k} {v}" for k, v in result.stages.items())
                    log.info("campaign %s: done (%s)", name, entry.detail)
                    return
                waiting = {k: v for k, v in result.stages.items() if v not in ("done",
                                                                               "cancelled")}
                entry.status = "waiting"
                entry.detail = ", ".join(f"{k} {v}" for k, v in waiting.items())
            finally:
                relay.cancel()
            if entry.stop.is_set() or self.daemon.draining:
                break
            # Idle until an operator acts or campaign_check passes: nothing else changes
            # a campaign that stopped short.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(entry.poke.wait(), self.daemon.cfg.daemon.campaign_check)
        entry.status = "stopped"

    def _gate(self, stop: asyncio.Event) -> GateFn:
        d = self.daemon
        return d.ctx.gate(d.store_or_fail(), d.toucher, d.ctx.warm_settings(d.credentials),
                          stop=stop, probe=d.metrics)

    def _rewarm(self, stop: asyncio.Event) -> RewarmFn:
        d = self.daemon
        return d.ctx.rewarm(d.store_or_fail(), d.toucher, d.ctx.warm_settings(d.credentials),
                            stop=stop, probe=d.metrics)

    def _catalogs(self, campaign: CampaignConfig) -> Callable[[str], Catalog]:
        kind = campaign.defaults.catalog or self.daemon.cfg.catalog.default
        return lambda definition: self.daemon.open_catalog(kind, definition)

    # --- metrics ----------------------------------------------------------------------------

    def _moved(self, campaign: str, frm: Optional[SubmissionState], to: SubmissionState,
               since: float) -> None:
        S = SubmissionState
        metrics = self.daemon.metrics
        if frm is S.PRESTAGING and to in (S.READY, S.FAILED):
            metrics.gate_waited(time.time() - since)
        if frm is S.SUBMITTING:
            metrics.launched(to.value)
        self._update_gauge(campaign)

    def _update_gauge(self, campaign: str) -> None:
        self.daemon.metrics.set_campaign_submissions(campaign, self.state.totals(campaign),
                                                     _STATES)
