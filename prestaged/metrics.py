"""Every Prometheus metric of prestaged, in one place, on an injected ``CollectorRegistry``.

``Metrics`` is the engine's ``warm.Probe`` (requests, retries, outcomes) and the daemon's sink
for run results, dataset warmth, credential expiry and catalog calls; for tape staging (issue 13)
it counts stage requests by result (``stage_request``, the ``TapeClient(on_stage=...)`` hook),
files being staged, stage durations, locality per watched definition and the concurrency used
per storage host. ``Metrics.aiohttp_handler`` serves the exposition at the daemon's
``/metrics``; ``grafana/prestaged.json`` reads it.

Label values come from bounded sets only: results, retry reasons, endpoint host names, catalog
kinds, localities and watched definition names. Nothing here ever puts a URL or a file name in a
label: hosts are reduced to their host name and a definition given as a path to a URL list
(local catalog) is reduced to its base name without ``.txt``.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Awaitable, Iterable, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from prestaged._version import __version__
from prestaged.catalog import KINDS
from prestaged.model import Result
from prestaged.storage.tape import STAGE_RESULTS, Locality

if TYPE_CHECKING:
    from prestaged.model import Outcome
    from prestaged.warm import Probe, RunReport

__all__ = [
    "CATALOG_RESULTS",
    "DATASET_STATES",
    "GATE_BUCKETS",
    "LATENCY_BUCKETS",
    "LAUNCH_RESULTS",
    "LEASE_KINDS",
    "LOCALITIES",
    "RUN_RESULTS",
    "STAGE_BUCKETS",
    "Metrics",
    "definition_label",
    "host_label",
    "run_result",
]

LEASE_KINDS = ("campaign", "watch", "chunk")
"""What a member holds leases on (``state.cluster``): a campaign it drives, a watch schedule
while it lists a round, a chunk of a watch round it warms."""

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Request duration buckets (seconds): 1 ms on loopback to 60 s for a slow tape-backed door."""

RUN_RESULTS = ("ok", "failed", "aborted", "interrupted")
"""``prestaged_runs_total{result}`` values; see ``run_result``."""

DATASET_STATES = ("warm", "stale", "failed", "unknown", "unresolved")
"""``prestaged_dataset_files{state}`` values (``unresolved``: listed without a URL)."""

GATE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
                21600.0, 43200.0, 86400.0)
"""Gate wait buckets (seconds): an already-warm slice on loopback to a day of tape recalls."""

LAUNCH_RESULTS = ("submitted", "launch_failed", "launch_unknown")
"""``prestaged_campaign_launches_total{result}``: how a submit command ended (launch_unknown:
the daemon died while it ran)."""

CATALOG_RESULTS = ("ok", "error")
"""``prestaged_catalog_requests_total{result}`` values created at zero for every catalog kind
and for ``rucio`` (the requests MetaCat's resolver sends to Rucio)."""

LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""``prestaged_event_loop_lag_seconds`` buckets: an idle loop is late by about a millisecond;
1 s or more means everything the daemon does stood still that long (the watchdog fires at
60 s)."""

STAGE_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                 86400.0)
"""Stage duration buckets (seconds): a file already on its way to disk, to a day in the tape
queue."""

LOCALITIES = (*(where.value for where in Locality), "unknown")
"""``prestaged_locality_files{locality}`` values: the Tape REST API's localities, and
``unknown`` for a file the frontend gave no locality for (an error, or not asked yet)."""

_RETRY_REASONS = ("timeout", "reset", "unreachable")
"""Retry reasons that exist whatever the storage answers (statuses are added as they occur)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def host_label(host: str) -> str:
    """``host`` as a label: the host name alone, even if a URL or ``host:port`` slips in."""
    text = host.strip()
    if "://" in text:
        return urlsplit(text).hostname or "unknown"
    text = text.split("/", 1)[0]
    if text.count(":") == 1:  # host:port, not a bare IPv6 address
        text = text.split(":", 1)[0]
    return text or "unknown"


def definition_label(definition: str) -> str:
    """``definition`` as a label: a path to a URL list becomes its base name minus ``.txt``."""
    text = definition.strip()
    if "://" in text:
        text = urlsplit(text).path
    if "/" in text:
        text = PurePosixPath(text).name
    if text.endswith(".txt"):
        text = text[: -len(".txt")]
    return text or "unknown"


def _plain_label(value: str) -> str:
    """A free-form label value (catalog, result, reason) kept to one path-free word."""
    text = value.strip().replace("/", "_")
    return text or "unknown"


def run_result(report: RunReport) -> str:
    """The ``prestaged_runs_total`` result of a finished run: aborted, interrupted, ok or failed."""
    if report.aborted is not None:
        return "aborted"
    if report.interrupted:
        return "interrupted"
    return "ok" if report.exit_code == 0 else "failed"


class Metrics:
    """prestaged's metrics on ``registry`` (default: a new private one, never the global).

    Implements ``warm.Probe``; series of known label values (file results, run results, retry
    reasons, catalog kinds, stage results) exist at zero from the start so ``rate()`` works on
    the first event; a definition's localities all exist once it is first set.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.files_touched = Counter(
            "prestaged_files_touched", "Files finished, by result (skipped_fresh included).",
            ["result"], registry=r)
        self.bytes_read = Counter(
            "prestaged_bytes_read", "Body bytes read by touches.", registry=r)
        self.request_duration = Histogram(
            "prestaged_request_duration_seconds", "Duration of one touch attempt, by host.",
            ["host"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests_in_flight = Gauge(
            "prestaged_requests_in_flight", "Touch attempts in progress.", registry=r)
        self.retries = Counter(
            "prestaged_retries", "Attempts retried, by reason (HTTP status, timeout, reset...).",
            ["reason"], registry=r)
        self.dataset_files = Gauge(
            "prestaged_dataset_files", "Files of a watched definition, by state.",
            ["definition", "state"], registry=r)
        self.dataset_last_warm = Gauge(
            "prestaged_dataset_last_warm_timestamp_seconds",
            "When a watched definition's last run finished (Unix time).",
            ["definition"], registry=r)
        self.watch_every = Gauge(
            "prestaged_watch_every_seconds",
            "A watched definition's schedule interval ([[watch]] every): with "
            "prestaged_dataset_last_warm_timestamp_seconds, tells a watch that stopped running.",
            ["definition"], registry=r)
        self.watch_since = Gauge(
            "prestaged_watch_since_timestamp_seconds",
            "When this daemon began watching a definition (its start, or the reload that added "
            "it; Unix time): tells a watch that never finished a run.",
            ["definition"], registry=r)
        self._watched: set[str] = set()  # labels of watch_since already set
        self.credential_expiry = Gauge(
            "prestaged_credential_expiry_timestamp_seconds",
            "When a credential expires (Unix time), by kind (proxy, token).",
            ["kind"], registry=r)
        self.api_certificate_expiry = Gauge(
            "prestaged_api_certificate_expiry_timestamp_seconds",
            "When the certificate the daemon's API serves (daemon.tls_cert) expires (Unix "
            "time), by API address (daemon.listen); absent when the API is plain HTTP.",
            ["listen"], registry=r)
        self.runs = Counter(
            "prestaged_runs", "Warm runs finished, by result.", ["result"], registry=r)
        self.catalog_requests = Counter(
            "prestaged_catalog_requests",
            "Catalog queries, by catalog service (samweb, metacat, rucio) and result.",
            ["catalog", "result"], registry=r)
        self.campaign_submissions = Gauge(
            "prestaged_campaign_submissions",
            "Submissions of a daemon campaign not finished yet, by state (a finished "
            "campaign's series are dropped).",
            ["campaign", "state"], registry=r)
        self.gate_wait = Histogram(
            "prestaged_campaign_gate_wait_seconds",
            "Time a campaign submission spent prestaging, until ready or failed.",
            buckets=GATE_BUCKETS, registry=r)
        self.launches = Counter(
            "prestaged_campaign_launches", "Submit commands run by campaigns, by result.",
            ["result"], registry=r)
        self.stage_requests = Counter(
            "prestaged_stage_requests",
            "Stage requests sent to a Tape REST frontend, by result: accepted, too_large (413, "
            "batch halved), throttled (429/503, waited out), refused (any other answer, or none).",
            ["result"], registry=r)
        self.files_staging = Gauge(
            "prestaged_files_staging", "Files with an open stage request now.", registry=r)
        self.stage_duration = Histogram(
            "prestaged_stage_duration_seconds",
            "Time a file took from its first stage request to on disk (seconds).",
            buckets=STAGE_BUCKETS, registry=r)
        self.locality_files = Gauge(
            "prestaged_locality_files", "Files of a watched definition, by Tape REST locality.",
            ["definition", "locality"], registry=r)
        self.endpoint_concurrency = Gauge(
            "prestaged_endpoint_concurrency",
            "Attempts the runs using a storage host allow in flight there now: the sum of "
            "their limits (each run's limiter cuts its own on 503); 0 once no run uses it.",
            ["host"], registry=r)
        self.endpoint_rate_limit = Gauge(
            "prestaged_endpoint_rate_limit",
            "Request starts a second allowed towards a storage host now: set by its 429s, "
            "raised while it keeps up; no series for a host that never answered 429.",
            ["host"], registry=r)
        self.cluster_members = Gauge(
            "prestaged_cluster_members",
            "Members of the daemons' cluster heartbeating within [cluster] lease (this daemon "
            "included), as this member last read them.", registry=r)
        self.leases_held = Gauge(
            "prestaged_leases_held", "Unexpired work leases this member holds, by kind.",
            ["kind"], registry=r)
        self.lease_takeovers = Counter(
            "prestaged_lease_takeovers",
            "Leases this member took over from a member whose lease had expired, by kind.",
            ["kind"], registry=r)
        self.state_queued_bytes = Gauge(
            "prestaged_state_queued_bytes",
            "Bytes of outcome batches waiting for the state writer process: near zero while "
            "the state database takes writes, growing while it does not (up to 32 MiB, then "
            "recording waits).", registry=r)
        self.state_writer_up = Gauge(
            "prestaged_state_writer_up",
            "1 while the state writer process takes outcomes, 0 once it gave up (the state "
            "database took no writes for its patience); a new one replaces it when the "
            "database answers again.", registry=r)
        self.state_writer_replacements = Counter(
            "prestaged_state_writer_replacements",
            "State writer processes that gave up and were replaced (their unwritten outcomes "
            "are lost: those files are touched again).", registry=r)
        self.state_tidied = Counter(
            "prestaged_state_tidied_rows",
            "Rows the daemon's tidy dropped from the state ([state] tidy_every): runs beyond "
            "keep_runs per definition, files no definition lists, finished watch rounds; "
            "campaigns finished longer ago than keep_campaigns (a campaign each, with all "
            "its rows).",
            ["what"], registry=r)
        for what in ("runs", "files", "rounds", "campaigns"):
            self.state_tidied.labels(what)
        self.loop_lag = Histogram(
            "prestaged_event_loop_lag_seconds",
            "How late the daemon's event loop ran a timer set every 0.25 s: how long something "
            "kept it from serving the API, touches and heartbeats.",
            buckets=LOOP_LAG_BUCKETS, registry=r)
        self.build = Info("prestaged_build", "prestaged version and Python.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
        self._initialise()

    def _initialise(self) -> None:
        for result in Result:
            self.files_touched.labels(result.value)
        for run in RUN_RESULTS:
            self.runs.labels(run)
        for reason in _RETRY_REASONS:
            self.retries.labels(reason)
        for launch in LAUNCH_RESULTS:
            self.launches.labels(launch)
        for kind in LEASE_KINDS:
            self.leases_held.labels(kind)
            self.lease_takeovers.labels(kind)
        for kind in (*KINDS, "rucio"):
            for result_ in CATALOG_RESULTS:
                self.catalog_requests.labels(kind, result_)
        for stage in STAGE_RESULTS:
            self.stage_requests.labels(stage)

    # --- warm.Probe ------------------------------------------------------------------------

    def request_started(self, host: str) -> None:
        """An attempt at a file of ``host`` begins (in-flight + 1)."""
        self.requests_in_flight.inc()

    def request_finished(self, host: str, seconds: float) -> None:
        """That attempt ended after ``seconds`` (in-flight - 1, latency observed under host)."""
        self.requests_in_flight.dec()
        self.request_duration.labels(host_label(host)).observe(seconds)

    def retried(self, reason: str) -> None:
        """A file is tried again because of ``reason`` (``503``, ``reset``...)."""
        self.retries.labels(_plain_label(reason)).inc()

    def file_done(self, outcome: Outcome) -> None:
        """A file's final outcome: counted by result, its bytes added."""
        self.files_touched.labels(outcome.result.value).inc()
        if outcome.bytes:
            self.bytes_read.inc(outcome.bytes)

    # --- daemon ----------------------------------------------------------------------------

    def run_finished(self, result: str) -> None:
        """A run ended with ``result`` (one of ``RUN_RESULTS``; see ``run_result``)."""
        self.runs.labels(_plain_label(result)).inc()

    def set_dataset(
        self,
        definition: str,
        *,
        warm: int,
        stale: int,
        failed: int,
        unknown: int,
        last_warm: Optional[float],
        unresolved: int = 0,
    ) -> None:
        """Warmth of a watched definition: file counts by state (``unresolved``: files its
        catalog listed without a URL, cold for good); ``last_warm`` in Unix seconds (None:
        never warmed, the timestamp series is dropped)."""
        name = definition_label(definition)
        counts = {"warm": warm, "stale": stale, "failed": failed, "unknown": unknown,
                  "unresolved": unresolved}
        for state, n in counts.items():
            self.dataset_files.labels(name, state).set(n)
        if last_warm is None:
            self._remove(self.dataset_last_warm, name)
        else:
            self.dataset_last_warm.labels(name).set(last_warm)

    def set_watch_every(self, definition: str, seconds: float) -> None:
        """The watched ``definition`` is warmed every ``seconds``; the first time, it is watched
        since now (a reload that keeps it keeps that time)."""
        name = definition_label(definition)
        self.watch_every.labels(name).set(seconds)
        if name not in self._watched:
            self._watched.add(name)
            self.watch_since.labels(name).set(time.time())

    def forget_dataset(self, definition: str) -> None:
        """Drop a definition's series (it left the watch list on reload)."""
        name = definition_label(definition)
        for state in DATASET_STATES:
            self._remove(self.dataset_files, name, state)
        self._remove(self.dataset_last_warm, name)
        self._remove(self.watch_every, name)
        self._remove(self.watch_since, name)
        self._watched.discard(name)
        for locality in LOCALITIES:
            self._remove(self.locality_files, name, locality)

    def set_api_certificate_expiry(self, listen: str, timestamp: float) -> None:
        """The API at ``listen`` serves a certificate that expires at ``timestamp``."""
        self.api_certificate_expiry.labels(_plain_label(listen)).set(timestamp)

    def set_credential_expiry(self, kind: str, timestamp: Optional[float]) -> None:
        """Credential ``kind`` (``proxy``...) expires at ``timestamp`` (Unix seconds); None:
        none of that kind is in use, its series is dropped."""
        if timestamp is None:
            self._remove(self.credential_expiry, _plain_label(kind))
        else:
            self.credential_expiry.labels(_plain_label(kind)).set(timestamp)

    def catalog_request(self, catalog: str, result: str) -> None:
        """One query to catalog kind ``catalog`` ended with ``result`` (``ok`` or ``error``)."""
        self.catalog_requests.labels(_plain_label(catalog), _plain_label(result)).inc()

    def set_campaign_submissions(self, campaign: str, counts: Mapping[str, int],
                                 states: Iterable[str]) -> None:
        """Submissions of ``campaign`` by state: every one of ``states`` is set (0 if absent)."""
        name = _plain_label(campaign)
        for state in states:
            self.campaign_submissions.labels(name, state).set(counts.get(state, 0))

    def forget_campaign(self, campaign: str, states: Iterable[str]) -> None:
        """Drop ``campaign``'s submission series (every one of ``states``): it finished, or
        is gone from the state."""
        name = _plain_label(campaign)
        for state in states:
            self._remove(self.campaign_submissions, name, state)

    def gate_waited(self, seconds: float) -> None:
        """A submission's gate ended (ready or failed) after ``seconds`` of prestaging."""
        self.gate_wait.observe(max(0.0, seconds))

    def launched(self, result: str) -> None:
        """A submit command ended with ``result`` (one of ``LAUNCH_RESULTS``)."""
        self.launches.labels(_plain_label(result)).inc()

    # --- tape staging (issue 13) ------------------------------------------------------------

    def stage_request(self, result: str) -> None:
        """One stage request ended with ``result`` (one of ``STAGE_RESULTS``); the
        ``TapeClient(on_stage=...)`` hook."""
        self.stage_requests.labels(_plain_label(result)).inc()

    def staging(self, delta: int) -> None:
        """``delta`` files gained (> 0) or left (< 0) an open stage request."""
        self.files_staging.inc(delta)

    def file_staged(self, seconds: float) -> None:
        """A file is on disk ``seconds`` after its first stage request."""
        self.stage_duration.observe(max(0.0, seconds))

    def set_locality(self, definition: str, counts: Mapping[str, int]) -> None:
        """Files of a watched definition by locality: every one of ``LOCALITIES`` is set (0 if
        absent); a key outside them is added to ``unknown`` so the label set stays bounded."""
        name = definition_label(definition)
        values = dict.fromkeys(LOCALITIES, 0)
        for locality, n in counts.items():
            values[locality if locality in values else "unknown"] += n
        for locality, n in values.items():
            self.locality_files.labels(name, locality).set(n)

    def concurrency_changed(self, host: str, delta: int) -> None:
        """A run's limit at storage ``host`` moved by ``delta`` (``warm.Probe``): the gauge is
        the sum over running runs, back to 0 when the last one using ``host`` ends (a value
        merely set would show a finished run's limit, and the last of several runs' alone); a
        URL or ``host:port`` is reduced to the host name."""
        self.endpoint_concurrency.labels(host_label(host)).inc(delta)

    def set_rate(self, host: str, rate: float) -> None:
        """Storage ``host`` may get ``rate`` request starts a second now (its 429 ceiling); a
        URL or ``host:port`` is reduced to the host name."""
        self.endpoint_rate_limit.labels(host_label(host)).set(rate)

    # --- several daemons (issue 16) ---------------------------------------------------------

    def set_cluster(self, members: int, leases: Mapping[str, int]) -> None:
        """``members`` alive now; this member's unexpired leases per kind (``LEASE_KINDS``)."""
        self.cluster_members.set(members)
        for kind in LEASE_KINDS:
            self.leases_held.labels(kind).set(leases.get(kind, 0))

    def lease_taken_over(self, kind: str) -> None:
        """This member took a ``kind`` lease over from a member whose lease had expired."""
        self.lease_takeovers.labels(kind if kind in LEASE_KINDS else "unknown").inc()

    # --- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)

    def aiohttp_handler(self) -> Handler:
        """An aiohttp handler serving this registry (for the daemon's ``GET /metrics``)."""
        try:
            from prometheus_client.aiohttp import make_aiohttp_handler
        except ImportError:  # prometheus-client < 0.21 has no aiohttp adapter
            return self._plain_handler
        handler: Handler = make_aiohttp_handler(self.registry)
        return handler

    async def _plain_handler(self, request: web.Request) -> web.StreamResponse:
        body = self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    def _remove(metric: Gauge, *labels: str) -> None:
        with contextlib.suppress(KeyError):  # older prometheus-client raise for absent series
            metric.remove(*labels)


if TYPE_CHECKING:

    def _is_probe(m: Metrics) -> Probe:
        """mypy proves here that ``Metrics`` satisfies ``warm.Probe``."""
        return m
