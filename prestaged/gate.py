"""The submission gate: warm a definition's cold files until enough of it is warm, or time out.

``wait_until_ready`` is what ``prestaged wait`` and ``prestaged submit`` run: a warm run with the
state store (files fresh within ``state.fresh_for`` are skipped, so only cold files are
touched), then the warm fraction of the definition from the store (fresh files / member files);
a run in which files landed from tape is followed at once by another before the gate passes (the
recalls evicted the pool's least recently used replicas, maybe files skipped as fresh);
below ``ready`` it runs again, after a bounded exponential backoff, until ``timeout``. A run that
is stopped for the credentials (exit 3) ends the gate at once with that code: only a person can
renew them; so does ``storage.stage = always`` on a door that says it has no Tape REST API
(exit 5: only a person can change either). A run stopped by the storage otherwise (exit 5: a
breaker, a frontend refusing) is tried again like a run that left files cold, until
``timeout``: storage trouble passes (a frontend restart, a busy door), and a gate exists to
wait; at the deadline the gate ends with exit 5 naming the last stop. A ``CatalogError``
propagates.

``run_command`` runs the user's command once the gate has passed: an argv list, never a shell,
so definition or file names with shell metacharacters cannot inject anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from prestaged.catalog import Catalog
from prestaged.errors import (
    EXIT_CATALOG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STORAGE,
    ConfigError,
    StorageSetupError,
)
from prestaged.locality import TapeAccess
from prestaged.pacing import Rates
from prestaged.retry import RetryPolicy
from prestaged.runner import run_definition
from prestaged.runtime import stop_signals
from prestaged.state.store import Store
from prestaged.warm import Probe, RunReport, Toucher, WarmSettings

__all__ = [
    "COLD_SHOWN",
    "GateFn",
    "GateResult",
    "RewarmFn",
    "check_ready",
    "run_command",
    "wait_until_ready",
]

log = logging.getLogger(__name__)

COLD_SHOWN = 5
"""Cold file URLs named in a ``GateResult`` (and so in the timeout message)."""


@dataclass(frozen=True)
class GateResult:
    """How a gate ended. ``exit_code`` is 0 when it passed, 1 on timeout, 130 when stopped,
    3 when a warm run was stopped for the credentials, 5 on timeout when the last warm run was
    stopped by the storage."""

    catalog: str
    definition: str
    ready: float
    """The warm fraction that was required (0..1)."""
    files: int
    """Files of the definition: in the state store, and those its catalog named without a
    URL (``unresolved``)."""
    fresh: int
    """Of those, files successfully touched within ``state.fresh_for``."""
    runs: int
    """Warm runs made by this gate."""
    waited: float
    """Seconds from the start of the gate to its end."""
    exit_code: int
    reason: str
    cold: list[str] = field(default_factory=list)
    """Up to ``COLD_SHOWN`` URLs of files that are not fresh."""
    unresolved: int = 0
    """Files the catalog named without a URL: cold for good (``prestaged files`` lists them)."""

    @property
    def passed(self) -> bool:
        """True when the command may be submitted."""
        return self.exit_code == EXIT_OK

    @property
    def fraction(self) -> float:
        """Warm fraction (fresh / files); 1.0 for a definition without files (which passes
        only with ``allow_empty``)."""
        return self.fresh / self.files if self.files else 1.0

    def summary(self) -> str:
        """One line for people: the definition, its warmth, and why the gate ended."""
        line = (f"{self.catalog}:{self.definition}: {self.fresh}/{self.files} files warm "
                f"({self.fraction:.1%}, need {self.ready:.1%}) after {self.runs} "
                f"run{'s' if self.runs != 1 else ''}, {self.waited:.1f}s: {self.reason}")
        cold = self.files - self.fresh - self.unresolved
        if cold and not self.passed:
            shown = ", ".join(self.cold)
            more = f" and {cold - len(self.cold)} more" if cold > len(self.cold) else ""
            line += f"; {cold} cold: {shown}{more}"
        if self.unresolved and not self.passed:
            line += (f"; {self.unresolved} unresolved (the catalog gave no URL: `prestaged "
                     f"files {self.definition}` lists them)")
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``fraction`` and ``passed`` included)."""
        return {"catalog": self.catalog, "definition": self.definition, "ready": self.ready,
                "files": self.files, "fresh": self.fresh, "cold_count": self.files - self.fresh,
                "fraction": self.fraction, "passed": self.passed, "runs": self.runs,
                "waited_seconds": round(self.waited, 3), "exit_code": self.exit_code,
                "reason": self.reason, "cold": list(self.cold), "unresolved": self.unresolved}


def check_ready(ready: float) -> float:
    """``ready`` as a fraction in (0, 1], or a ``ConfigError`` naming ``--ready``."""
    if not 0.0 < ready <= 1.0:
        raise ConfigError(f"--ready: expected a fraction in (0, 1], e.g. 0.99, got {ready}")
    return ready


class GateFn(Protocol):
    """Warm ``catalog`` until ``ready`` (0..1] of it is warm or ``timeout`` seconds pass,
    retrying the cold files after ``retry`` seconds, doubling (``wait_until_ready``)."""

    def __call__(self, catalog: Catalog, ready: float, timeout: float,
                 retry: float) -> Awaitable[GateResult]: ...


class RewarmFn(Protocol):
    """Warm ``catalog`` again, skipping files touched within ``fresh_for`` seconds."""

    def __call__(self, catalog: Catalog, fresh_for: float) -> Awaitable[RunReport]: ...


@dataclass(frozen=True)
class _Measure:
    files: int
    """Member files and unresolved ones."""
    fresh: int
    cold: list[str]
    """Up to ``COLD_SHOWN`` URLs of member files not fresh."""
    unresolved: int


async def _measure(store: Store, catalog: Catalog, fresh_for: float) -> _Measure:
    """How warm the definition is, from the store: the files its last complete listing named
    without a URL count, as cold."""
    rows = await asyncio.to_thread(store.status, fresh_for, catalog.definition, catalog.name)
    members = rows[0].files if rows else 0
    fresh = rows[0].fresh if rows else 0
    unresolved = rows[0].unresolved if rows else 0
    cold: list[str] = []
    if fresh < members:
        cold = await asyncio.to_thread(store.cold_urls, catalog.name, catalog.definition,
                                       fresh_for, COLD_SHOWN)
    return _Measure(members + unresolved, fresh, cold, unresolved)


def _landed(catalog: Catalog, report: RunReport) -> int:
    """Files that landed from tape in ``report``'s run (logged when any). They made room on the
    pool by evicting its least recently used replicas: maybe the very files the run saw on disk
    and skipped as fresh (touched within fresh_for, but before other users' reads), which the
    store still has on disk. The gate must ask the storage again before it passes."""
    landed = report.tally.tape.on_disk
    if landed:
        log.info("%s: %d files landed from tape; checking at once that the files seen on disk "
                 "before are still there", catalog.definition, landed)
    return landed


async def wait_until_ready(
    catalog: Catalog,
    settings: WarmSettings,
    toucher: Toucher,
    store: Store,
    *,
    fresh_for: float,
    ready: float = 1.0,
    timeout: float = 6 * 3600.0,
    retry_initial: float = 10.0,
    retry_max: float = 600.0,
    stop: Optional[asyncio.Event] = None,
    clock: Callable[[], float] = time.monotonic,
    probe: Optional[Probe] = None,
    allow_empty: bool = False,
    tape: Optional[TapeAccess] = None,
    rates: Optional[Rates] = None,
) -> GateResult:
    """Warm ``catalog``'s cold files (not touched within ``fresh_for`` seconds) until its warm
    fraction reaches ``ready`` (0..1], giving up after ``timeout`` seconds (default 6 h);
    between runs wait ``retry_initial`` seconds (default 10), doubling up to ``retry_max``
    (default 600). A run in progress at the timeout is stopped. Setting ``stop`` ends the gate
    early with exit code 130. ``probe`` hears every request (the daemon's metrics). A
    definition with no files fails at once with exit code 4 (an empty input is almost always a
    wrong name or query, and submitting on it wastes a job) unless ``allow_empty``. ``tape``
    stages tape-only files first; only files on disk and touched count as warm. ``rates``: the
    request rates learned from 429s, shared with the caller's other runs; by default the
    gate's runs share their own."""
    check_ready(ready)
    rates = Rates() if rates is None else rates
    if fresh_for <= 0:
        raise ConfigError("state.fresh_for: the gate needs a freshness window, got 0 "
                          "(every file would count as cold); set --fresh-for, e.g. 6h")
    start = clock()
    halt = asyncio.Event()  # set at the deadline or by the caller's stop
    loop = asyncio.get_running_loop()
    timer = loop.call_later(max(0.0, timeout), halt.set)
    relay = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if relay is not None:
        relay.add_done_callback(lambda _: halt.set())
    runs = 0
    backoff = RetryPolicy(initial=retry_initial, max=retry_max, jitter=0.0)
    stopped: Optional[str] = None  # why the last finished run was stopped by the storage

    def result(code: int, reason: str, m: _Measure) -> GateResult:
        return GateResult(catalog.name, catalog.definition, ready, m.files, m.fresh, runs,
                          clock() - start, code, reason, m.cold, m.unresolved)

    try:
        while True:
            runs += 1
            report = await run_definition(catalog, settings, toucher, store=store,
                                          fresh_for=fresh_for, stop=halt, probe=probe,
                                          tape=tape, rates=rates)
            m = await _measure(store, catalog, fresh_for)
            log.info("%s: run %d: %s", catalog.definition, runs,
                     ", ".join(f"{k} {v}" for k, v in sorted(report.tally.results.items()) if v)
                     or "nothing to touch")
            if report.aborted is not None and (report.exit_code != EXIT_STORAGE or isinstance(
                    report.aborted, StorageSetupError)):
                return result(report.exit_code, f"warm run stopped: {report.aborted}", m)
            if report.aborted is not None:
                stopped = str(report.aborted)
                log.warning("%s: run %d stopped: %s; trying again until the gate's timeout",
                            catalog.definition, runs, stopped)
            elif not report.interrupted:
                stopped = None
            if stop is not None and stop.is_set():  # before "ready": Ctrl-C never submits
                return result(EXIT_INTERRUPTED, "interrupted", m)
            if not m.files and not allow_empty:
                return result(EXIT_CATALOG, f"definition {catalog.definition} has no files "
                              "(--allow-empty lets an empty input pass)", m)
            if (m.fresh / m.files if m.files else 1.0) >= ready:
                if not _landed(catalog, report):
                    return result(EXIT_OK, "ready", m)
                if not halt.is_set():
                    continue  # ask the storage again at once
            left = timeout - (clock() - start)
            if not halt.is_set() and left > 0:
                delay = backoff.backoff(runs)
                log.info("%s: %d/%d files warm, need %.1f%%; %d cold, next try in %.0fs "
                         "(%.0fs left)", catalog.definition, m.fresh, m.files, ready * 100,
                         m.files - m.fresh, delay, left)
                # Past the deadline the timer sets halt: no race between two clocks.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(halt.wait(), delay if delay < left else None)
            if stop is not None and stop.is_set():
                return result(EXIT_INTERRUPTED, "interrupted", m)
            if halt.is_set() or clock() - start >= timeout:
                if stopped is not None:
                    return result(EXIT_STORAGE, f"not ready within {timeout:g}s; the last warm "
                                  f"run was stopped: {stopped}", m)
                return result(EXIT_SOME_FAILED, f"not ready within {timeout:g}s", m)
    finally:
        timer.cancel()
        if relay is not None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay


def run_command(argv: Sequence[str]) -> int:
    """Run ``argv`` (no shell) with this process's stdin, stdout and stderr; return its exit code
    (128 + N when it was killed by signal N, as a shell reports it). While it runs, Ctrl-C is
    left to the command (it gets the terminal's SIGINT itself) and SIGTERM and SIGHUP are
    passed on to it (a SIGHUP, a closed terminal or ssh session, left it running alone; an
    ignored one, ``nohup``, stays ignored: the command inherits that). The forwarders are in
    place before the command starts: a signal in between is passed on once it has.
    ``FileNotFoundError``/``PermissionError`` mean it could not be started."""
    started: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if started:
            started[0].send_signal(signum)
        else:
            pending.append(signum)

    passed = {sig: signal.signal(sig, forward)
              for sig in stop_signals() if sig != signal.SIGINT}
    try:
        proc = subprocess.Popen(list(argv))
        started.append(proc)
        # After Popen: an ignored SIGINT would be inherited, and Ctrl-C must reach the command.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for signum in pending:
                proc.send_signal(signum)
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, old_int)
    finally:
        for sig, handler in passed.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
