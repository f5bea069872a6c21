"""The engine: stream files from a catalog through a bounded queue to a fixed pool of workers.

Each worker touches one file at a time (``storage.http.HttpToucher``), retrying by
``retry.RetryPolicy``, optionally throttled per endpoint (asyncio-throttle), with fewer attempts
in flight at an endpoint answering 503 and fewer starts a second at one answering 429
(``pacing.Pacer``), and reports an ``Outcome``.
Breakers per endpoint (``scheme://host:port`` of the file's URL) stop the whole run
early when the storage keeps denying us (exit 3), keeps failing TLS (exit 3) or cannot be
reached at all (exit 5), instead of trying every remaining file. Until an endpoint has
accepted us once, one attempt at a time goes to it (``pacing``'s first-contact gate), so a
breaker trips before more refusals than its threshold reach the endpoint; once the run is
stopped, no attempt starts. A bearer token that cannot be sent (it expired during the run)
stops the run at once.

Memory does not grow with the dataset: the queue is bounded, duplicates are remembered as 8-byte
digests, and only failures (capped at ``MAX_FAILURES_KEPT``) are kept for the report.

One file never ends a run: ``warm_one`` is the per-file boundary, where a URL the engine does not
touch (``root://``, ``http://`` unless ``allow_plain_http``) and any exception from the toucher
(but cancellation) become that file's failure. ``davs://`` is touched as ``https://``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Protocol, Union
from urllib.parse import urlsplit

from asyncio_throttle.throttler import Throttler

from prestaged.config import BreakerConfig, Config
from prestaged.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STORAGE,
    CredentialError,
    PrestagedError,
    StorageError,
)
from prestaged.locality import TapeAccess, TapeProbe, TapeRouter, TapeTally
from prestaged.model import (
    Attempt,
    Failure,
    FileRef,
    Outcome,
    Result,
    TapeInfo,
    host_start,
    redact,
    usable_origin,
)
from prestaged.pacing import Pace, Pacer, Rates
from prestaged.retry import RetryPolicy, retry_reason
from prestaged.tokens import ScopeWarner, TokenSource, url_path

__all__ = [
    "MAX_FAILURES_KEPT",
    "PLAIN_HTTP_REFUSED",
    "RunReport",
    "Tally",
    "Toucher",
    "WarmSettings",
    "touch_url",
    "warm",
]

log = logging.getLogger(__name__)

MAX_FAILURES_KEPT = 10_000
"""Failed files kept for the report; beyond this only the counts grow."""

_NOT_OK = (Result.MISSING, Result.DENIED, Result.FAILED)


class Recorder(Protocol):
    """Where a run's files and outcomes are remembered (``store.StoreRecorder`` is the real one).

    ``admit`` sees every distinct file in chunks and returns those still to touch (the others
    count as ``skipped_fresh``); ``record`` is called once per touched file and must not block.
    """

    async def admit(self, refs: list[FileRef]) -> list[FileRef]:
        """The files of ``refs`` that need touching."""
        ...

    def record(self, outcome: Outcome) -> None:
        """Remember one file's outcome."""
        ...

    def note(self, url: str, info: TapeInfo) -> None:
        """Remember what the tape path learned of a file (locality, stage request made or
        followed for this run's definition, on disk, or ended without landing)."""
        ...

    async def open_stages(self, urls: list[str]) -> dict[str, TapeInfo]:
        """The stage requests earlier runs made for ``urls`` that are still open as far as the
        state knows (not landed, not ended), whatever their age."""
        ...

    def now(self) -> float:
        """The time as the state keeps it (``Store.now``: the database's clock), for the pins
        and landings the tape path records."""
        ...


class Probe(TapeProbe, Protocol):
    """Receives per-request events for metrics (``metrics.Metrics`` is the real one).

    ``host`` is the endpoint's host name (a bounded set: never a URL or file name).
    """

    def request_started(self, host: str) -> None:
        """An attempt at a file of ``host`` begins."""
        ...

    def request_finished(self, host: str, seconds: float) -> None:
        """That attempt ended after ``seconds`` (whatever its result)."""
        ...

    def retried(self, reason: str) -> None:
        """A file is about to be tried again because of ``reason`` (``503``, ``reset``...)."""
        ...

    def file_done(self, outcome: Outcome) -> None:
        """A file's final outcome (skipped fresh files included)."""
        ...

    def concurrency_changed(self, host: str, delta: int) -> None:
        """A run's limit on attempts in flight at ``host`` (its AIMD limit, ``pacing.Pacer``)
        moved by ``delta``: up by its start value when the run first uses ``host``, down on a
        503 cut, up as it grows back, and down by what is left when the run ends (so the sum
        over runs is what the running ones allow there now, 0 once none uses ``host``)."""
        ...

    def set_rate(self, host: str, rate: float) -> None:
        """Request starts a second allowed at ``host`` now (its 429 ceiling, ``pacing.Pacer``)."""
        ...


ADMIT_CHUNK = 256
"""Files handed to ``Recorder.admit`` at once (one state query per chunk)."""


class Toucher(Protocol):
    """One attempt at one URL (``storage.http.HttpToucher`` is the real one)."""

    async def touch(self, url: str) -> Attempt:
        """Try ``url`` once and say what happened."""
        ...


@dataclass(frozen=True)
class WarmSettings:
    """Engine knobs; see ``config.StorageConfig``/``BreakerConfig`` for meanings and units."""

    concurrency: int = 32
    nbytes: int = 4
    rate: float = 0.0
    queue: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    credential_hint: str = ""
    """Names the credentials in breaker messages, e.g. ``proxy /tmp/x509up_u1000`` or a
    token's ``TokenInfo.describe()`` (where, issuer, subject, scopes)."""
    token: Optional[TokenSource] = None
    """The bearer token the toucher sends (for scope warnings: no ``storage.read`` scope can
    cover a file's path); None: none."""
    sends_token: bool = False
    """The toucher sends a bearer token: 401/403 trip at ``breaker.token_denials`` rather than
    ``breaker.denials``."""
    allow_plain_http: bool = False
    """Touch ``http://`` URLs (default: each fails, "plain http refused")."""

    @classmethod
    def from_config(cls, cfg: Config, credential_hint: str = "",
                    token: Optional[TokenSource] = None) -> WarmSettings:
        """Settings from a loaded (and CLI-overridden) ``Config``; ``credential_hint`` and
        ``token`` as the fields (``sends_token`` when there is a token)."""
        r = cfg.retry
        return cls(
            concurrency=cfg.storage.concurrency,
            nbytes=cfg.storage.bytes,
            rate=cfg.storage.rate,
            queue=cfg.storage.queue,
            retry=RetryPolicy(r.attempts, r.initial, r.max, r.jitter, r.total, r.max_retry_after),
            breaker=cfg.breaker,
            credential_hint=credential_hint,
            token=token,
            sends_token=token is not None,
            allow_plain_http=cfg.storage.allow_plain_http,
        )


@dataclass
class Tally:
    """Live counters of a run, read by progress displays while the run goes on."""

    started: float = field(default_factory=time.monotonic)
    total_hint: Optional[int] = None
    queued: int = 0
    duplicates: int = 0
    catalog_done: bool = False
    done: int = 0
    bytes: int = 0
    results: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    failures: list[Outcome] = field(default_factory=list)
    """Failed files for the report (``MAX_FAILURES_KEPT`` at most), URL credentials redacted."""
    staged: int = 0
    """Files warm at the end that came from tape (staged by us, then touched)."""
    unsent: int = 0
    """Failed files whose URL was never sent anywhere (``unsent``): the list's fault."""
    tape: TapeTally = field(default_factory=TapeTally)
    """Locality and staging counters (``storage.stage``)."""
    paced: dict[str, Pace] = field(default_factory=dict)
    """Endpoints whose concurrency (503) or request rate (429) was cut, by
    ``scheme://host:port``: the attempts in flight allowed now, the lowest it was cut to, the
    cuts; the request starts a second allowed now and the 429s that set it (``pacing.Pacer``).
    Endpoints never cut ran at ``concurrency``, unspaced, and are not listed."""

    @property
    def total(self) -> Optional[int]:
        """Files to touch: exact once the catalog is exhausted, else the catalog's estimate."""
        return self.queued if self.catalog_done else self.total_hint

    @property
    def failed(self) -> int:
        """Files that ended missing, denied or failed."""
        return sum(self.results[r.value] for r in _NOT_OK)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def add(self, outcome: Outcome) -> None:
        """Count one finished file."""
        self.done += 1
        self.bytes += outcome.bytes
        self.results[outcome.result.value] += 1
        if outcome.staged and outcome.result in (Result.WARM, Result.EMPTY):
            self.staged += 1
        if outcome.result is Result.FAILED and unsent(outcome):
            self.unsent += 1
        if outcome.result in _NOT_OK and len(self.failures) < MAX_FAILURES_KEPT:
            url = redact(outcome.url)
            self.failures.append(outcome if url is outcome.url else replace(outcome, url=url))


@dataclass(frozen=True)
class RunReport:
    """The end of a run: counts by result, bytes, timing, failures and why it stopped."""

    tally: Tally
    elapsed: float
    interrupted: bool = False
    aborted: Optional[PrestagedError] = None

    @property
    def rate(self) -> float:
        """Files finished per second."""
        return self.tally.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 all warm; 1 some failed; 3/5 breaker; 5 nothing succeeded; 130 interrupted."""
        t = self.tally
        if self.aborted is not None:
            return self.aborted.exit_code
        if self.interrupted:
            return EXIT_INTERRUPTED
        ok = sum(t.results[r.value] for r in (Result.WARM, Result.EMPTY, Result.SKIPPED_FRESH))
        refused = t.results[Result.DENIED.value] + t.results[Result.FAILED.value]
        # Storage that refused everything it was sent; URLs never sent (a port out of range,
        # plain http) are the list's fault: exit 1, not 5 ("look at the storage").
        if t.done and ok == 0 and refused == t.done and refused > t.unsent:
            return EXIT_STORAGE
        return EXIT_SOME_FAILED if t.failed else EXIT_OK


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
PLAIN_HTTP_REFUSED = "plain http refused; set storage.allow_plain_http = true"
# What touch_url and the touchers say of a URL they refuse before sending anything.
_UNSENT = ("not a URL", "unsupported scheme ", PLAIN_HTTP_REFUSED, "bad URL: ")


def unsent(outcome: Outcome) -> bool:
    """Whether ``outcome`` failed on its URL alone, which was never sent to any server."""
    return outcome.status is None and outcome.error.startswith(_UNSENT)


def touch_url(url: str, allow_plain_http: bool = False) -> Union[str, Attempt]:
    """The URL to touch for a catalog's ``url``, or the failed ``Attempt`` of one we do not touch.

    ``https`` as it is; ``davs`` (WebDAV over TLS: https by another name, same default port 443)
    as ``https``; ``http`` only with ``allow_plain_http``; any other scheme (``root://``...) is
    refused, since no toucher of ours speaks it. The scheme is compared, and returned, in lower
    case (``HTTPS://`` is ``https://``: every later look at it, such as whether the bearer token
    may go, can then compare it as written).
    """
    if url.startswith("https://"):  # nearly every URL: no regex for it (this runs per file)
        return url
    match = _SCHEME.match(url)
    if match is None:
        return Attempt(failure=Failure.PROTOCOL, error="not a URL (no scheme://)")
    scheme = match.group(1).lower()
    if scheme in ("https", "davs"):
        return "https" + url[match.end(1):]
    if scheme == "http":
        if allow_plain_http:
            return "http" + url[match.end(1):]
        return Attempt(failure=Failure.PROTOCOL, error=PLAIN_HTTP_REFUSED)
    return Attempt(failure=Failure.PROTOCOL, error=f"unsupported scheme {scheme}://")


def endpoint_of(url: str) -> str:
    """``scheme://host:port`` of ``url``: the unit for breakers, throttling and pacing, named in
    their messages (so without the URL's userinfo: ``https://u:pw@h/f`` is ``https://h``)."""
    start = url.find("://")
    if start < 0:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"
    # The host starts after the userinfo as redact reads it and ends at the first "/", "?" or
    # "#": the query of ``https://h:1?authz=T``, named in every message about the door, and a
    # password holding "?", "#" or "/" were leaks.
    host = host_start(url)
    end = len(url)
    for sep in "/?#":
        i = url.find(sep, host, end)
        if i >= 0:
            end = i
    return url[: start + 3] + url[host:end]


_PLAIN_REASONS = frozenset({"", "unauthorized", "forbidden"})


def _status_reason(attempt: Attempt) -> str:
    """The reason phrase of a refusal when it says more than the status does (dCache puts why
    a token was refused there: "HTTP 401 Token expired"), else ""."""
    prefix = f"HTTP {attempt.status}"
    if not attempt.error.startswith(prefix):
        return ""
    reason = attempt.error[len(prefix):].strip()
    return "" if reason.lower() in _PLAIN_REASONS else reason


class _Breakers:
    """Consecutive-failure counters per endpoint; a trip becomes the run's abort error.

    Refusals at connection level count together: TLS handshake failures, and connections that
    an endpoint which has never answered us closes without answering. Real servers reject a
    certificate they do not like (unknown CA, DN not in the grid-mapfile) in both ways; XRootD
    with ``http.gridmap required`` reads the request and hangs up. Once an endpoint has answered
    anything, a dropped connection is an ordinary retryable reset again.

    Denials (401/403) trip at ``cfg.token_denials`` when the run sends a bearer token
    (``token``), else at ``cfg.denials``; the message quotes what the server said about the
    token (``Attempt.auth_error``). An attempt that could not be sent because our token cannot
    be used (``Failure.CREDENTIAL``) trips at once.

    Back-pressure (429, 503) says nothing of our credentials and leaves the denial count alone
    (the others it resets, as any answer does). A 429 within ``AUTH_BLOCK_WINDOW`` seconds of
    the last of ``AUTH_BLOCK_ERRORS`` 401s, each within that window of the one before, trips
    the denial breaker at once: dCache 11.2+ blocks a client at its 3rd 401 so spaced (403s do
    not count, answers between them do not reset it; ``RateLimitedHandlerList``) and answers it
    429 meanwhile, so the denials would never reach the limit and the run would end in files
    failed for "429" instead of naming the credentials. An answer after the 3rd such 401 shows
    that the endpoint did not block us: its 401s are forgotten.
    """

    def __init__(self, cfg: BreakerConfig, hint: str, token: bool = False) -> None:
        self.cfg = cfg
        self.hint = hint
        self.token = token
        self.denial_limit = cfg.token_denials if token else cfg.denials
        self.denials: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.unreachable: Counter[str] = Counter()
        self.answered: set[str] = set()
        self.last_denial: dict[str, Attempt] = {}
        self.unauthorized: dict[str, list[float]] = {}
        """Per endpoint, the times of its last 401s, each within AUTH_BLOCK_WINDOW of the one
        before (at most AUTH_BLOCK_ERRORS)."""
        self.last_unauthorized: dict[str, Attempt] = {}
        self.clock: Callable[[], float] = time.monotonic

    def refused(self, endpoint: str, attempt: Attempt) -> bool:
        """Whether ``attempt`` counts toward a credentials breaker: a denial, a refused
        connection (see the class), or a token we could not send."""
        if attempt.failure is None:
            return attempt.status in (401, 403)
        return attempt.failure in _REFUSING and (
            attempt.failure is not Failure.RESET
            or (endpoint not in self.answered and attempt.status is None))

    def observe(self, endpoint: str, attempt: Attempt) -> Optional[PrestagedError]:
        """Account one attempt; return the error that stops the run if a breaker trips."""
        if attempt.status is not None:
            self.answered.add(endpoint)  # even when its body then broke off (RESET)
        if attempt.failure is not None and attempt.failure in _REFUSING:
            return self._refusal(endpoint, attempt)
        if attempt.status is None:
            return None
        if attempt.status in (401, 403):
            self.denials[endpoint] += 1
            self.last_denial[endpoint] = attempt
            if attempt.status == 401:
                self._unauthorized(endpoint, attempt)
            if self.denials[endpoint] >= self.denial_limit:
                return self._denied(endpoint, attempt)
            return None
        self.refusals[endpoint] = self.unreachable[endpoint] = 0
        if attempt.status in (429, 503):
            if attempt.status == 429 and self._blocked(endpoint):
                return self._blocked_error(endpoint)
            return None
        self.denials[endpoint] = 0
        if len(self.unauthorized.get(endpoint, ())) >= AUTH_BLOCK_ERRORS:
            del self.unauthorized[endpoint]  # it answered after them: no block
        return None

    def _unauthorized(self, endpoint: str, attempt: Attempt) -> None:
        """Count a 401 toward dCache's block of clients."""
        now = self.clock()
        chain = self.unauthorized.setdefault(endpoint, [])
        if chain and now - chain[-1] > AUTH_BLOCK_WINDOW:
            chain.clear()  # dCache forgot the earlier ones
        chain.append(now)
        del chain[:-AUTH_BLOCK_ERRORS]
        self.last_unauthorized[endpoint] = attempt

    def _blocked(self, endpoint: str) -> bool:
        """Whether a 429 from ``endpoint`` now is dCache's block for our 401s."""
        chain = self.unauthorized.get(endpoint, [])
        return (len(chain) >= AUTH_BLOCK_ERRORS
                and self.clock() - chain[-1] <= AUTH_BLOCK_WINDOW)

    def _blocked_error(self, endpoint: str) -> CredentialError:
        last = self.last_unauthorized[endpoint]
        why = last.auth_error or _status_reason(last)
        said = f"; the server says: {why}" if why else ""
        refused = (f"{endpoint} answered 401 {AUTH_BLOCK_ERRORS} times, each within "
                   f"{AUTH_BLOCK_WINDOW:g} s of the one before (HTTP {last.status}{said}), and "
                   "now answers 429: it blocks clients after repeated authentication errors "
                   f"(dCache: {AUTH_BLOCK_ERRORS} so spaced)")
        return self._stop(refused)

    def _refusal(self, endpoint: str, attempt: Attempt) -> Optional[PrestagedError]:
        """Account an attempt that failed in one of the ``_REFUSING`` ways (it has no status,
        but for a RESET after the head, which ``answered`` keeps from counting)."""
        if attempt.failure is Failure.CREDENTIAL:
            return CredentialError(f"{attempt.error}; stopped (nothing was sent with it)")
        if attempt.failure is Failure.UNTRUSTED:
            self.refusals[endpoint] += 1
            n = self.refusals[endpoint]
            if n >= self.cfg.tls_failures:
                return CredentialError(
                    f"{endpoint}: we refused a server certificate on the way to its files {n} "
                    f"times in a row (last: {attempt.error}); check the host names (the URLs', "
                    "or the pools' a door redirects to) and the CA directory; stopped early")
            return None
        refused = attempt.failure is Failure.TLS or (
            attempt.failure is Failure.RESET and endpoint not in self.answered
        )
        if refused:
            self.refusals[endpoint] += 1
            n = self.refusals[endpoint]
            if n >= self.cfg.tls_failures:
                what = ("failed the TLS handshake" if attempt.failure is Failure.TLS
                        else "closed the connection without answering")
                return CredentialError(
                    f"{endpoint} refused {n} connections in a row (last {what}: "
                    f"{attempt.error}); it does not accept "
                    f"{self.hint or 'our proxy (or we do not trust its CA)'}; stopped early"
                )
        return None

    def _denied(self, endpoint: str, attempt: Attempt) -> CredentialError:
        why = attempt.auth_error or _status_reason(attempt)
        said = f"; the server says: {why}" if why else ""
        return self._stop(f"{endpoint} denied {self.denials[endpoint]} files in a row "
                          f"(HTTP {attempt.status}{said})")

    def _stop(self, refused: str) -> CredentialError:
        """The error ending the run after ``refused`` (what the endpoint did)."""
        if not self.token:
            return CredentialError(f"{refused}: it does not accept "
                                   f"{self.hint or 'our credentials'}; stopped early")
        return CredentialError(
            f"{refused}: it does not accept {self.hint or 'our token'}; "
            "a token needs storage.read covering the files' paths (and the storage's audience); "
            "stopped early")

    def observe_final(self, endpoint: str, last: Attempt) -> Optional[PrestagedError]:
        """Account a file whose retries are over, by its last attempt (unreachable breaker)."""
        if last.failure is Failure.UNREACHABLE:
            self.unreachable[endpoint] += 1
            if self.unreachable[endpoint] >= self.cfg.unreachable:
                return StorageError(
                    f"{endpoint} unreachable for {self.unreachable[endpoint]} files in a row "
                    f"({last.error}); stopped early"
                )
        return None


AUTH_BLOCK_ERRORS = 3
"""401s after which an endpoint's 429 means it blocks us for them (dCache's
``webdav.limits.error.max-allowed``: the client is blocked at that many)."""
AUTH_BLOCK_WINDOW = 20.0
"""Seconds within which each of those 401s follows the one before
(``webdav.limits.error.block.window.time``: dCache forgets a client's errors that long after
its last one)."""

_REFUSING = frozenset({Failure.CREDENTIAL, Failure.UNTRUSTED, Failure.TLS, Failure.RESET})
"""Failures the credentials breakers look at (``_Breakers._refusal``); never with a status."""

_Job = tuple[FileRef, Optional[TapeInfo]]
"""A file for a worker, with what the tape path knows of it (None: not asked)."""


class _Run:
    """One run of the engine; see ``warm()``."""

    def __init__(
        self,
        files: AsyncIterator[FileRef],
        settings: WarmSettings,
        toucher: Toucher,
        tally: Tally,
        on_outcome: Optional[Callable[[Outcome], None]],
        sleep: Callable[[float], Awaitable[None]],
        recorder: Optional[Recorder] = None,
        probe: Optional[Probe] = None,
        tape: Optional[TapeAccess] = None,
        rates: Optional[Rates] = None,
    ) -> None:
        self.recorder = recorder
        self.probe = probe
        self.files = files
        self.s = settings
        self.toucher = toucher
        self.tally = tally
        self.on_outcome = on_outcome
        self.sleep = sleep
        self.queue: asyncio.Queue[Optional[_Job]] = asyncio.Queue(
            settings.queue or 4 * settings.concurrency
        )
        self.breakers = _Breakers(settings.breaker, settings.credential_hint,
                                  settings.sends_token)
        self.read_scopes = (ScopeWarner(settings.token, "storage.read")
                            if settings.token is not None else None)
        self.abort_error: Optional[PrestagedError] = None
        self.abort = asyncio.Event()
        self.throttlers: dict[str, Throttler] = {}
        self.seen: set[bytes] = set()
        self.router: Optional[TapeRouter] = None
        if tape is not None:
            self.router = TapeRouter(tape, tally.tape, touch=self._enqueue, skip=self.skip,
                                     finish=self.finish,
                                     fail=self._trip, note=recorder.note if recorder else None,
                                     probe=probe,
                                     resume=recorder.open_stages if recorder else None,
                                     clock=recorder.now if recorder else time.time,
                                     deny=self._denied_by_tape)
        # Starts every endpoint at `concurrency`, not storage.per_host: that bounds connections
        # per host, and after a door's redirect an attempt holds a pool's connection instead.
        self.limits: dict[str, int] = {}  # endpoint -> its limit as last told to the probe
        self.pacer = Pacer(settings.concurrency, tally.paced, on_change=(
            None if probe is None else self._limit_changed),
            on_rate=None if probe is None else lambda ep, r: probe.set_rate(_host(ep), r),
            gate=True, rates=rates)

    def _limit_changed(self, endpoint: str, limit: int) -> None:
        """The pacer's limit at ``endpoint`` is ``limit`` now: the probe hears the change."""
        assert self.probe is not None
        before = self.limits.get(endpoint, 0)
        self.limits[endpoint] = limit
        if limit != before:
            self.probe.concurrency_changed(_host(endpoint), limit - before)

    def release_limits(self) -> None:
        """The run uses no endpoint any more: the probe hears each limit it held go."""
        limits, self.limits = self.limits, {}
        if self.probe is not None:
            for endpoint, limit in limits.items():
                if limit:
                    self.probe.concurrency_changed(_host(endpoint), -limit)

    def _denied_by_tape(self, door: str, outcome: Outcome) -> None:
        """A file the door's Tape REST API says we may not see (archiveinfo "Permission
        denied"): counted by the denial breaker as a touch's 403 there would be, and ended."""
        self._trip(self.breakers.observe(door, Attempt(status=403,
                                                       error=f"HTTP 403 {outcome.error}")))
        self.finish(outcome)

    def _trip(self, error: Optional[PrestagedError]) -> None:
        if error is not None and self.abort_error is None:
            self.abort_error = error
            self.abort.set()

    async def produce(self) -> None:
        """Feed the queue from the catalog, skipping duplicate URLs; then one stop per worker."""
        chunk: list[FileRef] = []
        try:
            async for ref in self.files:
                digest = hashlib.blake2b(ref.url.encode(), digest_size=8).digest()
                if digest in self.seen:
                    self.tally.duplicates += 1
                    continue
                self.seen.add(digest)
                self.tally.queued += 1
                if self.recorder is None and self.router is None:
                    await self.queue.put((ref, None))
                    continue
                chunk.append(ref)
                if len(chunk) >= ADMIT_CHUNK:
                    await self._admit(chunk)
                    chunk = []
            if chunk:
                await self._admit(chunk)
            self.tally.catalog_done = True
            if self.router is not None:
                await self.router.close()  # every staged file handed on
        except PrestagedError as e:
            self._trip(e)
            return
        except BaseException:
            self.abort.set()  # a bug or a cancellation: let warm() stop the workers and raise
            raise
        for _ in range(self.s.concurrency):
            await self.queue.put(None)

    async def _admit(self, chunk: list[FileRef]) -> None:
        todo = chunk if self.recorder is None else await self.recorder.admit(chunk)
        fresh: frozenset[str] = frozenset()
        if len(todo) != len(chunk):
            stale = {r.url for r in todo}
            fresh = frozenset(r.url for r in chunk if r.url not in stale)
        if self.router is not None:
            # Fresh files too: fresh means touched lately AND still on disk, which only the
            # storage can tell (an evicted file is staged again, not skipped).
            await self._route(chunk, fresh)
            return
        for ref in chunk:
            if ref.url in fresh:
                self.skip(ref)
            else:
                await self.queue.put((ref, None))

    def skip(self, ref: FileRef) -> None:
        """Count ``ref`` as skipped: touched within ``fresh_for`` (and on disk, when told)."""
        self.tally.done += 1
        self.tally.results[Result.SKIPPED_FRESH.value] += 1
        if self.probe is not None:
            self.probe.file_done(_skipped(ref))

    async def _route(self, refs: list[FileRef], fresh: frozenset[str]) -> None:
        """Hand ``refs`` to the tape path, per door; what it cannot concern (a URL we do not
        touch, plain http, a door no request can go to) takes the usual way."""
        assert self.router is not None
        doors: dict[str, list[tuple[FileRef, str]]] = {}
        for ref in refs:
            url = touch_url(ref.url, self.s.allow_plain_http)
            door = endpoint_of(url) if isinstance(url, str) else ""
            if isinstance(url, str) and url.startswith("https://") and usable_origin(door):
                doors.setdefault(door, []).append((ref, url))
            elif ref.url in fresh:
                self.skip(ref)
            else:
                await self.queue.put((ref, None))  # fails in warm_one, or plain http
        for door, files in doors.items():
            await self.router.route(door, files, fresh)

    async def _enqueue(self, ref: FileRef, info: Optional[TapeInfo]) -> None:
        """Queue a file the tape path found on disk (or brought there) for the touch."""
        await self.queue.put((ref, info))

    def _throttler(self, endpoint: str) -> Optional[Throttler]:
        if self.s.rate <= 0:
            return None
        thr = self.throttlers.get(endpoint)
        if thr is None:
            # asyncio-throttle admits `rate_limit` requests per `period`: a tenth of a second's
            # worth per 0.1 s keeps bursts small while the ratio stays exactly `rate`.
            per = max(1, round(self.s.rate / 10))
            thr = self.throttlers[endpoint] = Throttler(rate_limit=per, period=per / self.s.rate)
        return thr

    async def _attempt(self, url: str, endpoint: str) -> Attempt:
        thr = self._throttler(endpoint)
        if thr is not None:
            await thr.acquire()  # type: ignore[no-untyped-call]
        # The rate token first: a slot held while waiting for one would idle the endpoint.
        async with self.pacer.slot(endpoint) as slot:
            if self.abort_error is not None:
                # A breaker tripped while we waited for the slot (the attempt before ours was
                # its last refusal): send nothing more; warm() is about to cancel us.
                await self._stopped()
            attempt = await self._touch(url, endpoint)
            slot.answered(attempt.status)  # first: a 503 cuts the limit before the gate opens
            if slot.gated:
                slot.contact(attempt.status, self.breakers.refused(endpoint, attempt))
        return attempt

    @staticmethod
    async def _stopped() -> None:
        """Wait for the cancellation that follows an abort (``warm`` cancels every worker)."""
        await asyncio.get_running_loop().create_future()

    async def _touch(self, url: str, endpoint: str) -> Attempt:
        probe = self.probe
        if probe is None:
            return await self.toucher.touch(url)
        host = _host(endpoint)
        probe.request_started(host)
        start = time.monotonic()
        try:
            return await self.toucher.touch(url)
        finally:
            probe.request_finished(host, time.monotonic() - start)

    async def warm_one(self, ref: FileRef) -> Outcome:
        """Touch one file with retries. The per-file boundary: raises only when cancelled;
        a URL we do not touch or any exception is this file's failure, not the run's end."""
        url = touch_url(ref.url, self.s.allow_plain_http)
        if isinstance(url, Attempt):
            return _outcome(ref, url, 0, 0.0)
        endpoint = endpoint_of(url)
        if self.read_scopes is not None:
            self.read_scopes.see(endpoint, url_path(url))
        start = time.monotonic()
        tries = 0
        try:
            while True:
                tries += 1
                attempt = await self._attempt(url, endpoint)
                self._trip(self.breakers.observe(endpoint, attempt))
                delay = self.s.retry.next_delay(attempt, tries, time.monotonic() - start)
                if delay is None or self.abort.is_set():
                    break
                reason = retry_reason(attempt) or "other"
                self.tally.retries[reason] += 1
                if self.probe is not None:
                    self.probe.retried(reason)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("retry %d of %s in %.2fs (%s)", tries, redact(url), delay, reason)
                await self.sleep(delay)
        except Exception as e:
            # A toucher (or engine) bug, or an error nobody foresaw (aiohttp raising for one odd
            # URL): it fails this file, the other files go on. Cancellation is no Exception (a
            # BaseException since 3.8) and still stops the run. The traceback is for debugging.
            log.debug("touching %s raised", redact(url), exc_info=True)
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            attempt = Attempt(failure=Failure.PROTOCOL, error=f"unexpected error: {what}")
        outcome = _outcome(ref, attempt, tries, time.monotonic() - start)
        self._trip(self.breakers.observe_final(endpoint, attempt))
        return outcome

    async def work(self) -> None:
        """A worker: take files until a stop marker."""
        while True:
            job = await self.queue.get()
            if job is None or self.abort.is_set():
                return
            ref, info = job
            outcome = await self.warm_one(ref)
            self.finish(outcome if info is None else replace(outcome, tape=info))

    def finish(self, outcome: Outcome) -> None:
        """Count, record and report one file's final outcome."""
        self.tally.add(outcome)
        if self.recorder is not None:
            self.recorder.record(outcome)
        if self.probe is not None:
            self.probe.file_done(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)


@functools.lru_cache(maxsize=1024)
def _host(endpoint: str) -> str:
    """The host name of ``scheme://host:port``: a metrics label, never a path."""
    return urlsplit(endpoint).hostname or endpoint


def _skipped(ref: FileRef) -> Outcome:
    return Outcome(url=ref.url, name=ref.name, result=Result.SKIPPED_FRESH, status=None,
                   bytes=0, attempts=0, elapsed=0.0)


def _outcome(ref: FileRef, attempt: Attempt, tries: int, elapsed: float) -> Outcome:
    result = attempt.result or Result.FAILED
    return Outcome(
        url=ref.url,
        name=ref.name,
        result=result,
        status=attempt.status,
        bytes=attempt.data,
        attempts=tries,
        elapsed=elapsed,
        error=attempt.error if result is not Result.WARM else "",
    )


async def warm(
    files: AsyncIterator[FileRef],
    settings: WarmSettings,
    toucher: Toucher,
    *,
    tally: Optional[Tally] = None,
    on_outcome: Optional[Callable[[Outcome], None]] = None,
    stop: Optional[asyncio.Event] = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    recorder: Optional[Recorder] = None,
    probe: Optional[Probe] = None,
    tape: Optional[TapeAccess] = None,
    rates: Optional[Rates] = None,
) -> RunReport:
    """Warm every file of ``files`` with ``toucher``; return the report (never raises for
    storage or catalog trouble: those end up in ``RunReport.aborted``).

    ``tally`` is updated live (pass one in to display progress); ``on_outcome`` is called once per
    finished file; setting ``stop`` ends the run early (in-flight files are abandoned, stage
    requests already sent get ``locality.STAGE_ANSWER_GRACE`` to answer) and marks the report
    interrupted; ``sleep`` is injectable so tests can run backoff at zero cost;
    ``recorder`` (the state store) skips fresh files and remembers outcomes; ``probe``
    (metrics) hears of every request, retry and outcome; ``tape`` (an open ``TapeAccess``)
    asks the storage where files are and stages tape-only ones before touching them
    (``locality``); without it every file is touched. ``rates`` (``pacing.Rates``): the
    request-rate ceilings learned from 429s, shared with the caller's other runs (the
    daemon's); without it the run learns its own.
    """
    tally = tally if tally is not None else Tally()
    run = _Run(files, settings, toucher, tally, on_outcome, sleep, recorder, probe, tape, rates)
    producer = asyncio.ensure_future(run.produce())
    workers = [asyncio.ensure_future(run.work()) for _ in range(settings.concurrency)]
    everything = asyncio.gather(*workers)
    waiters: set[asyncio.Future[Any]] = {everything, asyncio.ensure_future(run.abort.wait())}
    if stop is not None:
        waiters.add(asyncio.ensure_future(stop.wait()))
    interrupted = False
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        interrupted = stop is not None and stop.is_set() and not everything.done()
    finally:
        for task in [producer, *workers, *waiters]:
            task.cancel()
        try:
            await asyncio.gather(producer, everything, *waiters, return_exceptions=True)
            if run.router is not None:
                await run.router.abort()
        finally:  # a second cancellation too: no limit left counted after the run
            run.release_limits()
    for task in (producer, *workers):
        # A bug in a worker or the catalog must not pass for a finished run.
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return RunReport(
        tally=tally,
        elapsed=tally.elapsed(),
        interrupted=interrupted,
        aborted=run.abort_error,
    )
