"""One warm run of one definition with the state store around the engine: skip fresh files,
record outcomes, and record the run itself (also when it is cancelled).

Every caller (the CLI's ``warm``, the gate, the daemon's runs, campaigns' keep-warm) comes
through ``run_definition``; none talks to the engine directly. The toucher is the caller's:
``Context.make_toucher`` builds one, the daemon shares one between runs.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from prestaged.catalog import Catalog, unresolved_in
from prestaged.locality import TapeAccess
from prestaged.pacing import Rates
from prestaged.state.store import Listing, Store, StoreRecorder
from prestaged.warm import Probe, RunReport, Tally, Toucher, WarmSettings, warm

__all__ = ["run_definition"]


def _listing(catalog: Catalog, report: Optional[RunReport], since: float) -> Optional[Listing]:
    """What the run's listing said of the whole definition; None for a catalog that lists
    only part of it by design (a chunk of a watch round)."""
    if getattr(catalog, "lists_part", False):
        return None
    complete = report is not None and report.tally.catalog_done
    return Listing(complete, since, unresolved_in(catalog) if complete else 0)


def _reason(report: RunReport) -> str:
    if report.aborted is not None:
        return f"stopped: {report.aborted}"
    return "interrupted" if report.interrupted else "done"


async def run_definition(
    catalog: Catalog,
    settings: WarmSettings,
    toucher: Toucher,
    *,
    store: Optional[Store] = None,
    fresh_for: float = 0.0,
    force: bool = False,
    tally: Optional[Tally] = None,
    stop: Optional[asyncio.Event] = None,
    probe: Optional[Probe] = None,
    tape: Optional[TapeAccess] = None,
    rates: Optional[Rates] = None,
) -> RunReport:
    """Warm ``catalog``'s files through ``toucher``. With a ``store``, files touched within
    ``fresh_for`` seconds are skipped (unless ``force``) and every outcome and the run itself
    are recorded; without one nothing is skipped or kept. ``tape`` (an open ``TapeAccess``)
    stages tape-only files before their touch (``storage.stage``); ``rates`` are the request
    rates learned from 429s, shared by the caller's runs (``warm``)."""
    recorder = None
    run_id = None
    since = 0.0
    if store is not None:
        recorder = StoreRecorder(store, catalog.name, catalog.definition, force=force,
                                 fresh_for=fresh_for)
        since = store.now()
        run_id = await asyncio.to_thread(store.start_run, catalog.name, catalog.definition)
    report: Optional[RunReport] = None
    try:
        report = await warm(catalog.files(), settings, toucher, tally=tally, stop=stop,
                            recorder=recorder, probe=probe, tape=tape, rates=rates)
        return report
    finally:
        if store is not None and run_id is not None:
            counts = report.tally.results if report else (tally.results if tally else {})
            code = report.exit_code if report else -1
            reason = _reason(report) if report else "crashed"
            # Shielded: the run's end is recorded even when the caller is being cancelled.
            await asyncio.shield(asyncio.to_thread(store.finish_run, run_id, counts, code, reason,
                                                   _listing(catalog, report, since)))
