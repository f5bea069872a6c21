"""One warm run of one definition with everything around the engine: connection pool, state
store (skip fresh files, record outcomes and the run), final bookkeeping.

The CLI and the daemon both call ``run_definition``; neither talks to the engine directly.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Optional

from prestaged.catalog import Catalog
from prestaged.config import Config
from prestaged.state.store import Store, StoreRecorder
from prestaged.storage.http import HttpToucher
from prestaged.warm import Probe, RunReport, Tally, Toucher, WarmSettings, warm

__all__ = ["run_definition"]


def _reason(report: RunReport) -> str:
    if report.aborted is not None:
        return f"stopped: {report.aborted}"
    return "interrupted" if report.interrupted else "done"


async def run_definition(
    catalog: Catalog,
    cfg: Config,
    settings: WarmSettings,
    ssl_context: Optional[ssl.SSLContext],
    *,
    store: Optional[Store] = None,
    force: bool = False,
    tally: Optional[Tally] = None,
    stop: Optional[asyncio.Event] = None,
    toucher: Optional[Toucher] = None,
    probe: Optional[Probe] = None,
    fresh_for: Optional[float] = None,
) -> RunReport:
    """Warm ``catalog``'s files per ``cfg``; with a ``store``, skip files fresh within
    ``fresh_for`` seconds (default ``state.fresh_for``; unless ``force``) and record every
    outcome and the run itself. A ``toucher`` shared between runs (the daemon's) is used as
    it is; otherwise one is built from ``cfg.storage`` and ``ssl_context`` for this run."""
    st = cfg.storage
    recorder = None
    run_id = None
    if store is not None:
        recorder = StoreRecorder(store, catalog.name, catalog.definition, force=force,
                                 fresh_for=cfg.state.fresh_for if fresh_for is None else fresh_for)
        run_id = await asyncio.to_thread(store.start_run, catalog.name, catalog.definition)
    report: Optional[RunReport] = None
    try:
        if toucher is not None:
            report = await warm(catalog.files(), settings, toucher, tally=tally, stop=stop,
                                recorder=recorder, probe=probe)
            return report
        async with HttpToucher(ssl_context, nbytes=st.bytes, limit=st.concurrency,
                               limit_per_host=st.per_host, timeout=st.timeout,
                               connect_timeout=st.connect_timeout,
                               max_redirects=st.max_redirects, fast_path=st.fast_path) as own:
            report = await warm(catalog.files(), settings, own, tally=tally, stop=stop,
                                recorder=recorder, probe=probe)
        return report
    finally:
        if store is not None and run_id is not None:
            counts = report.tally.results if report else (tally.results if tally else {})
            code = report.exit_code if report else -1
            reason = _reason(report) if report else "crashed"
            # Shielded: the run's end is recorded even when the caller is being cancelled.
            await asyncio.shield(asyncio.to_thread(store.finish_run, run_id, counts, code, reason))
