"""Human and machine output of a run: live progress, the summary table and the JSON document."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from typing import Any, Optional, TextIO

from prestaged.model import Result
from prestaged.warm import RunReport, Tally

__all__ = ["Progress", "report_json", "report_text"]

log = logging.getLogger(__name__)

_ORDER = [Result.WARM, Result.EMPTY, Result.SKIPPED_FRESH, Result.MISSING, Result.DENIED,
          Result.FAILED]
_SHOWN_FAILURES = 20


def _eta(tally: Tally) -> Optional[float]:
    total, elapsed = tally.total, tally.elapsed()
    if not total or not tally.done or elapsed <= 0:
        return None
    return max(0.0, (total - tally.done) / (tally.done / elapsed))


def progress_line(tally: Tally) -> str:
    """One line of progress: done/total, percent, rate, failures, ETA."""
    total = tally.total
    rate = tally.done / tally.elapsed() if tally.elapsed() > 0 else 0.0
    of = f"/{total} ({100.0 * tally.done / total:.0f}%)" if total else ""
    eta = _eta(tally)
    tail = f", ETA {eta:.0f}s" if eta is not None else ""
    return f"progress: {tally.done}{of} files, {rate:.0f} files/s, {tally.failed} failed{tail}"


class Progress:
    """Shows a run's progress: a tqdm bar on a terminal, else a log line every ``interval`` s."""

    def __init__(self, tally: Tally, *, bar: bool, interval: float, stream: TextIO = sys.stderr):
        self.tally = tally
        self.bar = bar
        self.interval = interval
        self.stream = stream
        self._done = asyncio.Event()
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        """Begin displaying (call inside the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Draw the final state and stop."""
        self._done.set()
        if self._task is not None:
            await self._task

    async def _tick(self) -> bool:
        """Wait one period; True when it is time to stop."""
        try:
            await asyncio.wait_for(self._done.wait(), self.interval)
        except asyncio.TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        if not self.bar:
            while not await self._tick():
                log.info("%s", progress_line(self.tally))
            return
        from tqdm import tqdm  # imported here: only terminals need it

        # A terminal that reports no width (a fresh pty) would get an empty bar: assume 100.
        sized = shutil.get_terminal_size((100, 24)).columns > 0
        with tqdm(total=self.tally.total, unit="file", file=self.stream, dynamic_ncols=sized,
                  ncols=None if sized else 100, smoothing=0.1, mininterval=0.1) as pbar:
            stopping = False
            while not stopping:
                stopping = await self._tick()
                pbar.total = self.tally.total
                pbar.set_postfix(failed=self.tally.failed, refresh=False)
                pbar.update(self.tally.done - pbar.n)


def report_json(report: RunReport, *, definition: str, catalog: str, source: str) -> dict[str, Any]:
    """The ``--json`` document of a run."""
    t = report.tally
    return {
        "definition": definition,
        "catalog": catalog,
        "source": source,
        "files": t.done,
        "counts": {r.value: t.results[r.value] for r in _ORDER},
        "duplicates_skipped": t.duplicates,
        "retries": dict(t.retries),
        "bytes_read": t.bytes,
        "elapsed_seconds": round(report.elapsed, 3),
        "files_per_second": round(report.rate, 1),
        "interrupted": report.interrupted,
        "aborted": str(report.aborted) if report.aborted else None,
        "exit_code": report.exit_code,
        "failures": [
            {"url": o.url, "result": o.result.value, "status": o.status,
             "attempts": o.attempts, "error": o.error}
            for o in t.failures
        ],
        "failures_omitted": max(0, t.failed - len(t.failures)),
    }


def report_text(report: RunReport, *, definition: str, catalog: str, source: str) -> str:
    """The summary table printed at the end of ``prestaged warm``."""
    t = report.tally
    state = "interrupted" if report.interrupted else ("stopped" if report.aborted else "done")
    where = f"{catalog} catalog" + ("" if source == definition else f": {source}")
    lines = [f"prestaged warm {definition} ({where}): {state}"]
    rows: list[tuple[str, str]] = [(r.value, str(t.results[r.value])) for r in _ORDER]
    of = f" of {t.total}" if t.total and t.total != t.done else ""
    rows.insert(0, ("files", f"{t.done}{of}"))
    if t.duplicates:
        rows.append(("duplicates", f"{t.duplicates} (touched once)"))
    if t.retries:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(t.retries.items()))
        rows.append(("retries", f"{sum(t.retries.values())} ({detail})"))
    rows += [
        ("bytes read", str(t.bytes)),
        ("elapsed", f"{report.elapsed:.2f} s"),
        ("rate", f"{report.rate:.0f} files/s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if t.failures:
        lines.append(f"failed files ({min(len(t.failures), _SHOWN_FAILURES)} of {t.failed} shown; "
                     "--json lists them all):")
        for o in t.failures[:_SHOWN_FAILURES]:
            lines.append(f"  {o.result.value:<8} {o.url}  {o.error}")
    return "\n".join(lines)
