"""What the commands print: live progress, a run's summary table and JSON document, the
files a catalog could not resolve, and the text of ``status``, ``history`` and ``campaign``.

Rendering only: every function here takes what a command already has and returns text (or a
JSON-ready dict); none of them reads the state or asks the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, TextIO, runtime_checkable

from prestaged.errors import EXIT_INTERRUPTED
from prestaged.model import Result, printable

if TYPE_CHECKING:
    from prestaged.catalog import Catalog
    from prestaged.state.cluster import Member
    from prestaged.state.store import DatasetStatus, RunRecord
    from prestaged.warm import RunReport, Tally

__all__ = [
    "Progress",
    "Resolving",
    "ago",
    "campaign_lines",
    "campaign_list_lines",
    "history_lines",
    "member_lines",
    "report_json",
    "report_text",
    "source_of",
    "status_lines",
    "unresolved_json",
    "unresolved_text",
]

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
    staging = _staging(tally)
    staging = f", staging {staging}" if staging else ""
    return (f"progress: {tally.done}{of} files, {rate:.0f} files/s, {tally.failed} failed"
            f"{staging}{tail}")


def _staging(tally: Tally) -> str:
    """``N requested / M on disk`` while the run stages from tape, else empty."""
    tape = tally.tape
    return f"{tape.requested} requested / {tape.on_disk} on disk" if tape.requested else ""


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

        # A terminal that reports no size (a fresh pty, `script`) got no bar at all (tqdm
        # hides it with 0 rows): assume 100 x 24. (shutil.get_terminal_size puts its fallback
        # in for a 0, so the stream itself is asked.)
        sized = min(_size(self.stream)) > 0
        with tqdm(total=self.tally.total, unit="file", file=self.stream, dynamic_ncols=sized,
                  ncols=None if sized else 100, nrows=None if sized else 24, smoothing=0.1,
                  mininterval=0.1) as pbar:
            stopping = False
            while not stopping:
                stopping = await self._tick()
                pbar.total = self.tally.total
                staging = _staging(self.tally)
                if staging:
                    pbar.set_postfix(failed=self.tally.failed, staging=staging, refresh=False)
                else:
                    pbar.set_postfix(failed=self.tally.failed, refresh=False)
                pbar.update(self.tally.done - pbar.n)


def _size(stream: TextIO) -> tuple[int, int]:
    """The columns and rows the terminal of ``stream`` reports (0: none, or no terminal)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return size.columns, size.lines


def report_json(report: RunReport, *, definition: str, catalog: str, source: str) -> dict[str, Any]:
    """The ``--json`` document of a run."""
    t = report.tally
    return {
        "definition": definition,
        "catalog": catalog,
        "source": source,
        "files": t.done,
        # Listed but never ended (a breaker or an interrupt stopped the run): with only
        # "files", a 50-file list stopped after one read as a 1-file run.
        "not_done": t.queued - t.done,
        "listing_complete": t.catalog_done,
        "counts": {**{r.value: t.results[r.value] for r in _ORDER}, "staged": t.staged},
        "tape": _tape_json(t),
        "duplicates_skipped": t.duplicates,
        "retries": dict(t.retries),
        # Only endpoints that pushed back: the others ran at the configured concurrency, and a
        # dataset spread over many doors would otherwise list them all.
        "endpoints": {
            endpoint: {"concurrency": p.limit, "lowest": p.lowest, "backoffs": p.cuts,
                       "rate": None if p.rate is None else round(p.rate, 1),
                       "rate_cuts": p.rate_cuts}
            for endpoint, p in sorted(t.paced.items())
        },
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


def _tape_json(t: Tally) -> Optional[dict[str, Any]]:
    """What the tape path did (None when no endpoint told locality)."""
    tape = t.tape
    if not tape.endpoints:
        return None
    return {"endpoints": dict(tape.endpoints), "locality": dict(tape.located),
            "stage_requested": tape.requested, "staged_on_disk": tape.on_disk}


def report_text(report: RunReport, *, definition: str, catalog: str, source: str) -> str:
    """The summary table printed at the end of ``prestaged warm``."""
    t = report.tally
    state = "interrupted" if report.interrupted else ("stopped" if report.aborted else "done")
    where = f"{catalog} catalog" + ("" if source == definition else f": {source}")
    lines = [f"prestaged warm {definition} ({where}): {state}"]
    rows: list[tuple[str, str]] = [(r.value, str(t.results[r.value])) for r in _ORDER]
    of = f" of {t.total}" if t.total and t.total != t.done else ""
    rows.insert(0, ("files", f"{t.done}{of}"))
    if t.tape.located:
        where = ", ".join(f"{k} {v}" for k, v in sorted(t.tape.located.items()))
        rows.append(("locality", where))
    if t.tape.requested:
        rows.append(("staged", f"{t.staged} warm from tape ({t.tape.requested} requested, "
                               f"{t.tape.on_disk} reached disk)"))
    if t.duplicates:
        rows.append(("duplicates", f"{t.duplicates} (touched once)"))
    if t.retries:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(t.retries.items()))
        rows.append(("retries", f"{sum(t.retries.values())} ({detail})"))
    for endpoint, p in sorted(t.paced.items()):
        if p.cuts:
            rows.append(("paced", f"{endpoint}: {p.limit} at once (lowest {p.lowest}, "
                                  f"cut {p.cuts}x on 503)"))
        if p.rate is not None:
            rows.append(("paced", f"{endpoint}: at most {p.rate:.0f} requests/s "
                                  f"(set {p.rate_cuts}x on 429)"))
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
            lines.append(f"  {o.result.value:<8} {printable(o.url)}  {o.error}")
    return "\n".join(lines)


# --- where a catalog's files come from, and those it could not resolve -------------------------


@runtime_checkable
class Sourced(Protocol):
    """A catalog that names where its files come from (SAM web: the API's base URL)."""

    @property
    def source(self) -> str:
        """Where the files come from, for summaries."""
        ...


@runtime_checkable
class FileBacked(Protocol):
    """A catalog read from one file (the local catalog)."""

    @property
    def path(self) -> Path:
        """The definition file."""
        ...


class UnresolvedFile(Protocol):
    """A file the catalog listed but could give no URL (see ``Resolving``)."""

    @property
    def name(self) -> str:
        """The file's name in the catalog."""
        ...

    @property
    def locations(self) -> Sequence[str]:
        """The catalog's locations of it (none when it knows none)."""
        ...

    @property
    def reason(self) -> str:
        """Why it got no URL."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        ...


@runtime_checkable
class Resolving(Protocol):
    """A catalog that can list files it cannot turn into URLs (SAM web): after ``files()``,
    ``unresolved_count`` of them, the first few kept in ``unresolved``."""

    @property
    def unresolved(self) -> Sequence[UnresolvedFile]:
        """The first unresolved files, with their locations and reasons."""
        ...

    @property
    def unresolved_count(self) -> int:
        """Every unresolved file, kept in ``unresolved`` or not."""
        ...


_SHOWN_UNRESOLVED = 20


def source_of(catalog: Catalog) -> str:
    """Where ``catalog``'s files come from: its source, its file, else the definition."""
    if isinstance(catalog, Sourced) and catalog.source:
        return catalog.source
    if isinstance(catalog, FileBacked):
        return str(catalog.path)
    return catalog.definition


def unresolved_json(catalog: Catalog) -> dict[str, Any]:
    """``unresolved``/``unresolved_count`` for a JSON document ({} for catalogs without)."""
    if not isinstance(catalog, Resolving):
        return {}
    count = catalog.unresolved_count
    kept = [u.to_dict() for u in catalog.unresolved]
    return {"unresolved_count": count, "unresolved": kept,
            "unresolved_omitted": max(0, count - len(kept))}


def unresolved_text(catalog: Catalog, *, limit: Optional[int] = _SHOWN_UNRESOLVED) -> str:
    """Lines naming the files that got no URL ("" when there are none)."""
    if not isinstance(catalog, Resolving) or not catalog.unresolved_count:
        return ""
    count = catalog.unresolved_count
    kept = catalog.unresolved if limit is None else catalog.unresolved[:limit]
    more = "" if len(kept) == count else f" ({len(kept)} shown; --json lists more)"
    lines = [f"unresolved: {count} file{'s' if count != 1 else ''} got no URL and "
             f"{'were' if count != 1 else 'was'} not touched{more}:"]
    for u in kept:
        where = ", ".join(u.locations) or "-"
        lines.append(printable(f"  {u.name}  {u.reason}: {where}"))
    return "\n".join(lines)


# --- the state: status and history ------------------------------------------------------------


def ago(when: Optional[float]) -> str:
    """``when`` (a Unix time) as "1h02m ago"; "-" for None."""
    if when is None:
        return "-"
    from prestaged.credentials import format_timedelta  # cryptography: only when a time shows

    return format_timedelta(timedelta(seconds=max(0.0, time.time() - when))) + " ago"


def status_lines(rows: Sequence[DatasetStatus]) -> list[str]:
    """``prestaged status``'s table: one row per definition, its failures by reason below."""
    lines = [f"{'definition':<32} {'catalog':<8} {'files':>8} {'fresh':>8} {'stale':>7} "
             f"{'failed':>7} {'never':>7}  last run"]
    for r in rows:
        last = "-"
        if r.last_run is not None:
            lr = r.last_run
            code = "-" if lr.exit_code is None else lr.exit_code
            last = f"{ago(lr.started)}, {lr.reason or 'running'} (exit {code})"
        failed = sum(r.failed.values())
        lines.append(f"{r.definition:<32} {r.catalog:<8} {r.files:>8} {r.fresh:>8} "
                     f"{r.stale:>7} {failed:>7} {r.never:>7}  {last}")
        if r.listing_complete is False or (
                r.last_run is not None and r.last_run.exit_code in (None, EXIT_INTERRUPTED)):
            # Files are known as the catalog lists them: a run stopped early may have listed
            # only part of the definition (60,000 files, 20,000 listed, showed as 98 % fresh).
            lines.append("  files: those listed so far; the last run did not list the whole "
                         "definition, which may hold more (a complete run lists them all)")
        if r.unresolved:
            lines.append(f"  unresolved: {r.unresolved} more files the catalog gave no URL "
                         f"for (never warm; `prestaged files {r.definition}` lists them)")
        if r.tape:
            lines.append("  tape: " + ", ".join(f"{k.replace('_', ' ')} {r.tape[k]}"
                                                for k in _TAPE_BUCKETS if r.tape.get(k)))
        if r.failed:
            lines.append("  failed: " + ", ".join(f"{k} {v}" for k, v in sorted(r.failed.items())))
    return lines


_TAPE_BUCKETS = ("on_disk", "tape_only", "staging", "unavailable")


def history_lines(runs: Sequence[RunRecord]) -> list[str]:
    """``prestaged history``: one line per run, newest first as given."""
    lines = []
    for r in runs:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v) or "-"
        lines.append(f"#{r.id:<5} {ago(r.started):<14} {r.catalog}:{r.definition}  "
                     f"exit {r.exit_code if r.exit_code is not None else '-'}  "
                     f"{r.reason or 'running'}  [{counts}]")
    return lines


def member_lines(members: Sequence[Member], lease: float) -> list[str]:
    """``prestaged status --members``: one line per member of the state's cluster, dead when
    its last heartbeat (``age``, by the database's clock) is older than ``lease`` seconds."""
    lines = [f"{'member':<36} {'host':<20} {'pid':>7} {'API':<21} {'heartbeat':>12} "
             f"{'state':<5} {'leases':>6}"]
    for m in members:
        lines.append(f"{m.id:<36} {m.host:<20} {m.pid:>7} {m.listen or '-':<21} "
                     f"{f'{m.age:.0f} s ago':>12} {'alive' if m.alive(lease) else 'dead':<5} "
                     f"{m.leases:>6}")
    return lines


# --- campaigns --------------------------------------------------------------------------------


def campaign_list_lines(rows: Sequence[dict[str, Any]], source: str) -> list[str]:
    """``campaign list``: one line per campaign with its submissions by state."""
    if not rows:
        return [f"no campaigns ({source})"]
    lines = []
    for r in rows:
        task = r["daemon"]["status"] if r["daemon"] else "finished" if r.get("finished") \
            else "-"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["submissions"].items())) or "none"
        lines.append(f"{r['campaign']:<24} {r['control'] or '':<9} daemon {task:<8} "
                     f"submissions: {counts}")
    return lines


def campaign_lines(doc: dict[str, Any]) -> list[str]:
    """``campaign show``'s text: the campaign, then each stage and its submissions."""
    task = doc.get("daemon")
    # (not 'active': a campaign whose every submission completed showed as active)
    head = f"{doc['campaign']}: {doc['control'] or 'not held'}"
    if task:
        head += f"; daemon: {task['status']}" + (f" ({task['detail']})" if task["detail"] else "")
    if doc.get("finished"):
        head += f"; finished {ago(doc['finished'])}"
    lines = [f"{head}  [{doc['source']}]"]
    for stage in doc["stages"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(stage["counts"].items())) or "none"
        control = f" [{stage['control']}]" if stage["control"] else ""
        lines.append(f"{doc['campaign']}/{stage['name']}{control}: {counts}")
        for s in (s for s in doc["submissions"] if s["stage"] == stage["name"]):
            files = "-" if s["n_files"] is None else str(s["n_files"])
            warm = "-" if s["warm_of"] is None else f"{s['warm']}/{s['warm_of']}"
            # Escaped: an item, a job id or a reason quoting a command's output could hold
            # escape sequences (states written before job ids were checked, too).
            lines.append(printable(
                f"  #{s['id']:<4} {s['item']:<12} {s['state']:<14} files {files:<6} "
                f"warm {warm:<9} job {s['job_id'] or '-'}  {ago(s['updated'])}: "
                f"{s['reason'] or '-'}"))
    return lines
