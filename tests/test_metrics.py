"""Metrics: a real warm against the HTTPS test storage feeds the counters; labels stay bounded;
``promtool check metrics`` accepts the exposition."""

from __future__ import annotations

import asyncio
import platform
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from subprocess import PIPE, STDOUT

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from aiohttp.web import Application
from conftest import peer_missing
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import prestaged
from prestaged.credentials import inspect_proxy, load_credentials
from prestaged.metrics import (
    LEASE_KINDS,
    LOCALITIES,
    STAGE_BUCKETS,
    Metrics,
    definition_label,
    host_label,
    run_result,
)
from prestaged.model import FileRef
from prestaged.retry import RetryPolicy
from prestaged.runtime import probe_lag
from prestaged.storage.http import HttpToucher
from prestaged.storage.tape import STAGE_RESULTS
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Status, StorageServer
from prestaged.warm import RunReport, Tally, WarmSettings, warm

FAST = RetryPolicy(attempts=5, initial=0.0, max=0.0, jitter=0.0, total=30.0)


def _promtool() -> str:
    """Path of promtool; skip without it, unless CI is set (then a missing tool fails)."""
    path = shutil.which("promtool")
    if path is None:
        peer_missing("promtool not found: install Debian package prometheus")
    return path


async def _refs(urls: Iterable[str]) -> AsyncIterator[FileRef]:
    for u in urls:
        yield FileRef(name=u.rsplit("/", 1)[-1], url=u)


def _client(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                             ca_dir_configured=None, min_lifetime=3600)
    return creds.ssl_context()


async def _warm(ctx: ssl.SSLContext, urls: list[str], metrics: Metrics) -> RunReport:
    settings = WarmSettings(concurrency=8, nbytes=4, retry=FAST)
    async with HttpToucher(ctx, nbytes=4, limit=8, limit_per_host=8, timeout=20) as t:
        return await warm(_refs(urls), settings, t, probe=metrics)


def _value(m: Metrics, name: str, **labels: str) -> float:
    """The current value of one sample (0 for an absent one, so a missing series fails loudly)."""
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


def _label_values(exposition: bytes) -> list[tuple[str, str, str]]:
    """(sample name, label name, label value) of every labelled sample of ``exposition``."""
    out: list[tuple[str, str, str]] = []
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            out.extend((sample.name, k, v) for k, v in sample.labels.items())
    return out


@pytest.fixture
async def storage(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """The test storage, requiring a client certificate."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        yield srv


@pytest.fixture
async def warmed(pki: TestPKI, proxy: Path, storage: StorageServer) -> Metrics:
    """Metrics after a real warm of 50 files (one 503 then warm) plus every daemon-side and
    tape-side call."""
    m = Metrics()
    storage.inject("/pnfs/ds/f0000.root", [Status(503)])
    urls = [storage.url(f"/pnfs/ds/f{i:04d}.root") for i in range(50)]
    report = await _warm(_client(pki, proxy), urls, m)
    assert report.exit_code == 0
    m.run_finished(run_result(report))
    m.set_dataset(str(Path("/data/definitions/my_dataset.txt")), warm=50, stale=0, failed=0,
                  unknown=0, last_warm=1.7e9)
    m.set_credential_expiry("proxy", inspect_proxy(proxy).not_after.timestamp())
    m.catalog_request("local", "ok")
    # The tape side (issue 13) as the engine will call it, so promtool lints those series too.
    m.stage_request("accepted")
    m.staging(1)
    m.file_staged(30.0)
    m.set_locality(str(Path("/data/definitions/my_dataset.txt")), {"TAPE": 3, "DISK": 1})
    m.concurrency_changed(storage.url("/pnfs/ds/f0000.root"), 8)
    m.set_rate(storage.url("/pnfs/ds/f0000.root"), 212.5)
    return m


async def test_real_warm_counts_files_bytes_requests_and_retries(
    pki: TestPKI, proxy: Path, storage: StorageServer
) -> None:
    """N files warmed: touched{warm}=N, bytes=4N, histogram count=requests, in-flight 0, 503 retried."""
    m = Metrics()
    n = 120
    storage.inject("/busy", [Status(503), Status(503)])
    urls = [storage.url(f"/pnfs/ds/f{i:04d}.root") for i in range(n - 1)] + [storage.url("/busy")]
    report = await _warm(_client(pki, proxy), urls, m)
    assert report.tally.results["warm"] == n
    assert _value(m, "prestaged_files_touched_total", result="warm") == n
    assert _value(m, "prestaged_files_touched_total", result="failed") == 0
    assert _value(m, "prestaged_bytes_read_total") == 4 * n
    assert storage.stats.requests_total == n + 2
    assert _value(m, "prestaged_request_duration_seconds_count", host="127.0.0.1") == n + 2
    assert _value(m, "prestaged_requests_in_flight") == 0
    assert _value(m, "prestaged_retries_total", reason="503") == 2
    assert _value(m, "prestaged_retries_total", reason="reset") == 0


class _SeenConcurrency(Metrics):
    """Metrics noting the endpoint concurrency gauge of 127.0.0.1 as each attempt starts."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def request_started(self, host: str) -> None:
        super().request_started(host)
        self.seen.append(_value(self, "prestaged_endpoint_concurrency", host="127.0.0.1"))


async def test_endpoint_concurrency_is_what_running_runs_allow_and_zero_after(
    pki: TestPKI, proxy: Path, storage: StorageServer
) -> None:
    """Two real runs at once towards one host: the gauge is the sum of their limits while they
    run (a 503 cuts one), and 0 once both ended, not a finished run's limit."""
    m = _SeenConcurrency()
    storage.inject("/pnfs/a/f0000.root", [Status(503)])
    ctx = _client(pki, proxy)
    reports = await asyncio.gather(
        _warm(ctx, [storage.url(f"/pnfs/a/f{i:04d}.root") for i in range(40)], m),
        _warm(ctx, [storage.url(f"/pnfs/b/f{i:04d}.root") for i in range(40)], m))
    assert [r.exit_code for r in reports] == [0, 0]
    assert m.seen and all(0 < v <= 16 for v in m.seen), m.seen
    assert max(m.seen) > 8  # both runs' limits counted at once (8 each)
    assert _value(m, "prestaged_endpoint_concurrency", host="127.0.0.1") == 0
    report = await _warm(ctx, [storage.url("/pnfs/c/f.root")], m)
    assert report.exit_code == 0 and m.seen[-1] == 8
    assert _value(m, "prestaged_endpoint_concurrency", host="127.0.0.1") == 0


async def test_skipped_fresh_files_are_counted_without_bytes() -> None:
    """file_done of a skipped_fresh outcome counts the file and adds no bytes."""
    from prestaged.model import Outcome, Result

    m = Metrics()
    m.file_done(Outcome(url="https://h/x", name="x", result=Result.SKIPPED_FRESH, status=None,
                        bytes=0, attempts=0, elapsed=0.0))
    assert _value(m, "prestaged_files_touched_total", result="skipped_fresh") == 1
    assert _value(m, "prestaged_bytes_read_total") == 0


def test_known_label_values_exist_at_zero() -> None:
    """Every file result, run result and catalog kind has a series at 0 before any event."""
    m = Metrics()
    for result in ("warm", "empty", "missing", "denied", "failed", "skipped_fresh"):
        assert _value(m, "prestaged_files_touched_total", result=result) == 0
    for result in ("ok", "failed", "aborted", "interrupted"):
        assert _value(m, "prestaged_runs_total", result=result) == 0
    assert _value(m, "prestaged_catalog_requests_total", catalog="local", result="error") == 0
    info = _value(m, "prestaged_build_info", version=prestaged.__version__,
                  python=platform.python_version())
    assert info == 1


def test_registry_is_injected_never_global() -> None:
    """Two Metrics on their own registries coexist and nothing lands on the global REGISTRY."""
    reg = CollectorRegistry()
    a, b = Metrics(reg), Metrics()
    assert a.registry is reg and b.registry is not reg
    assert REGISTRY.get_sample_value("prestaged_bytes_read_total") is None
    a.run_finished("ok")
    assert _value(a, "prestaged_runs_total", result="ok") == 1
    assert _value(b, "prestaged_runs_total", result="ok") == 0


async def test_no_label_value_is_a_url_or_a_path(warmed: Metrics) -> None:
    """After a warm and every daemon call, no label value holds a "/" or a URL scheme."""
    labels = _label_values(warmed.exposition())
    assert labels
    bad = [(s, k, v) for s, k, v in labels if "/" in v or "://" in v]
    assert not bad
    assert ("prestaged_dataset_files", "definition", "my_dataset") in labels
    assert ("prestaged_request_duration_seconds_count", "host", "127.0.0.1") in labels


def test_label_helpers_strip_urls_and_paths() -> None:
    """Hosts lose scheme, port and path; definitions given as files keep only their name."""
    assert host_label("https://door.example.org:2880/pnfs/x/file.root") == "door.example.org"
    assert host_label("door.example.org:2880") == "door.example.org"
    assert host_label("::1") == "::1"
    assert definition_label("/srv/defs/run42_raw.txt") == "run42_raw"
    assert definition_label("dune_mc_2024") == "dune_mc_2024"
    m = Metrics()
    m.request_started("https://door.example.org:2880/a/b")
    m.request_finished("https://door.example.org:2880/a/b", 0.02)
    m.retried("5/03")
    assert not [v for _, _, v in _label_values(m.exposition()) if "/" in v]


def test_set_dataset_sets_states_and_forget_drops_them() -> None:
    """set_dataset writes the five states and the timestamp; set_watch_every the interval and,
    once, when the watch began; None and forget_dataset drop series."""
    m = Metrics()
    m.set_dataset("d", warm=7, stale=2, failed=1, unknown=3, last_warm=1234.5, unresolved=4)
    got = {s: _value(m, "prestaged_dataset_files", definition="d", state=s)
           for s in ("warm", "stale", "failed", "unknown", "unresolved")}
    assert got == {"warm": 7, "stale": 2, "failed": 1, "unknown": 3, "unresolved": 4}
    assert _value(m, "prestaged_dataset_last_warm_timestamp_seconds", definition="d") == 1234.5
    m.set_dataset("d", warm=7, stale=2, failed=1, unknown=3, last_warm=None)
    assert m.registry.get_sample_value(
        "prestaged_dataset_last_warm_timestamp_seconds", {"definition": "d"}) is None
    before = time.time()
    m.set_watch_every("/defs/d.txt", 3600)
    assert _value(m, "prestaged_watch_every_seconds", definition="d") == 3600
    since = _value(m, "prestaged_watch_since_timestamp_seconds", definition="d")
    assert before <= since <= time.time()
    m.set_watch_every("/defs/d.txt", 60)  # a reload keeping the watch keeps its start
    assert _value(m, "prestaged_watch_since_timestamp_seconds", definition="d") == since
    m.forget_dataset("d")
    assert m.registry.get_sample_value(
        "prestaged_watch_since_timestamp_seconds", {"definition": "d"}) is None
    assert m.registry.get_sample_value(
        "prestaged_dataset_files", {"definition": "d", "state": "warm"}) is None
    assert m.registry.get_sample_value("prestaged_watch_every_seconds", {"definition": "d"}) is None
    m.forget_dataset("never-seen")


def test_forget_campaign_drops_its_submission_series_only() -> None:
    """forget_campaign drops every state's series of one campaign (it finished); another
    campaign's stay; forgetting one never set is harmless."""
    m = Metrics()
    states = ["queued", "completed", "launch_unknown"]
    m.set_campaign_submissions("done", {"completed": 3}, states)
    m.set_campaign_submissions("stuck", {"launch_unknown": 1}, states)
    m.forget_campaign("done", states)
    for state in states:
        assert m.registry.get_sample_value(
            "prestaged_campaign_submissions", {"campaign": "done", "state": state}) is None
    assert _value(m, "prestaged_campaign_submissions", campaign="stuck",
                  state="launch_unknown") == 1
    m.forget_campaign("never-seen", states)


def test_run_result_maps_reports() -> None:
    """A clean report is ok, failures failed, a breaker trip aborted, a stop interrupted."""
    from prestaged.errors import CredentialError

    clean = Tally()
    clean.results["warm"] = 3
    clean.done = 3
    bad = Tally()
    bad.results["missing"] = 1
    bad.results["warm"] = 1
    bad.done = 2
    assert run_result(RunReport(tally=clean, elapsed=1.0)) == "ok"
    assert run_result(RunReport(tally=bad, elapsed=1.0)) == "failed"
    assert run_result(RunReport(tally=clean, elapsed=1.0, interrupted=True)) == "interrupted"
    assert run_result(RunReport(tally=clean, elapsed=1.0, aborted=CredentialError("x"))) == "aborted"


async def test_aiohttp_handler_serves_the_exposition(warmed: Metrics) -> None:
    """GET /metrics through the aiohttp handler returns the registry in the text format."""
    app = Application()
    app.router.add_get("/metrics", warmed.aiohttp_handler())
    async with TestServer(app, host="127.0.0.1") as server, ClientSession() as http, \
            http.get(server.make_url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        body = await resp.text()
    assert 'prestaged_files_touched_total{result="warm"} 50.0' in body
    assert "prestaged_credential_expiry_timestamp_seconds" in body


async def test_promtool_check_metrics_passes(warmed: Metrics) -> None:
    """promtool check metrics (Debian prometheus) finds no problem in the exposition."""
    proc = await asyncio.create_subprocess_exec(
        _promtool(), "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(warmed.exposition()), timeout=60)
    assert proc.returncode == 0, out.decode()
    assert not out.strip(), out.decode()  # lint findings are printed even when it exits 0


# --- tape staging (issue 13) ----------------------------------------------------------------


def test_stage_results_exist_at_zero_and_count() -> None:
    """Every stage result has a series at 0 before any request; stage_request counts one."""
    m = Metrics()
    assert STAGE_RESULTS == ("accepted", "too_large", "throttled", "refused")
    for result in STAGE_RESULTS:
        assert _value(m, "prestaged_stage_requests_total", result=result) == 0
    m.stage_request("throttled")
    m.stage_request("throttled")
    m.stage_request("accepted")
    assert _value(m, "prestaged_stage_requests_total", result="throttled") == 2
    assert _value(m, "prestaged_stage_requests_total", result="accepted") == 1


def test_files_staging_goes_up_and_down() -> None:
    """The staging gauge starts at 0 and follows staging(+n) and staging(-n)."""
    m = Metrics()
    assert _value(m, "prestaged_files_staging") == 0
    m.staging(200)
    m.staging(-3)
    assert _value(m, "prestaged_files_staging") == 197


def test_stage_duration_buckets_span_seconds_to_a_day() -> None:
    """file_staged observes seconds in buckets from 1 s to 86400 s; a negative clock step is 0."""
    m = Metrics()
    assert STAGE_BUCKETS[0] == 1.0 and STAGE_BUCKETS[-1] == 86400.0
    m.file_staged(42.0)
    m.file_staged(5 * 3600.0)
    m.file_staged(-1.0)
    name = "prestaged_stage_duration_seconds"
    assert _value(m, f"{name}_count") == 3
    assert _value(m, f"{name}_sum") == 42.0 + 5 * 3600.0
    assert _value(m, f"{name}_bucket", le="1.0") == 1
    assert _value(m, f"{name}_bucket", le="60.0") == 2
    assert _value(m, f"{name}_bucket", le="14400.0") == 2
    assert _value(m, f"{name}_bucket", le="43200.0") == 3


def test_set_locality_sets_every_locality_and_forget_drops_them() -> None:
    """set_locality writes all seven localities (0 if absent, strays to unknown) under the
    definition's name; forget_dataset removes them with the warmth series."""
    m = Metrics()
    m.set_locality("/srv/defs/run42_raw.txt", {"TAPE": 40, "DISK_AND_TAPE": 8, "weird": 2})
    got = {loc: _value(m, "prestaged_locality_files", definition="run42_raw", locality=loc)
           for loc in LOCALITIES}
    assert got == {"DISK": 0, "TAPE": 40, "DISK_AND_TAPE": 8, "LOST": 0, "NONE": 0,
                   "UNAVAILABLE": 0, "unknown": 2}
    m.set_locality("/srv/defs/run42_raw.txt", {"DISK_AND_TAPE": 48})
    assert _value(m, "prestaged_locality_files", definition="run42_raw", locality="TAPE") == 0
    m.set_dataset("run42_raw", warm=48, stale=0, failed=0, unknown=0, last_warm=1.0)
    m.forget_dataset("/srv/defs/run42_raw.txt")
    exposition = m.exposition().decode()
    assert "run42_raw" not in exposition


def test_concurrency_is_per_host_name() -> None:
    """concurrency_changed keeps one series per host name, whatever form the host is given in
    (two endpoints of a host add up)."""
    m = Metrics()
    m.concurrency_changed("https://door.example.org:2880/pnfs/x/f.root", 64)
    m.concurrency_changed("door.example.org:2881", -32)
    m.concurrency_changed("127.0.0.1", 4)
    assert _value(m, "prestaged_endpoint_concurrency", host="door.example.org") == 32
    assert _value(m, "prestaged_endpoint_concurrency", host="127.0.0.1") == 4
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert len(families["prestaged_endpoint_concurrency"].samples) == 2
    assert "prestaged_endpoint_rate_limit{" not in m.exposition().decode()  # no 429, no series
    m.set_rate("https://door.example.org:2880/pnfs/x/f.root", 212.5)
    assert _value(m, "prestaged_endpoint_rate_limit", host="door.example.org") == 212.5


def test_tape_metrics_never_label_a_url_or_a_path() -> None:
    """Definitions given as URL-list paths or URLs and hosts given as URLs become bare names
    in every tape series; a result with a slash is flattened."""
    m = Metrics()
    m.set_locality("https://samweb.example.org/defs/mc_2024.txt", {"TAPE": 1})
    m.set_locality("/data/definitions/run7.txt", {"DISK": 1})
    m.concurrency_changed("https://door.example.org:2880/pnfs/a/b.root", 8)
    m.stage_request("too/large")
    labels = _label_values(m.exposition())
    assert not [(s, k, v) for s, k, v in labels if "/" in v or "://" in v]
    assert ("prestaged_locality_files", "definition", "mc_2024") in labels
    assert ("prestaged_locality_files", "definition", "run7") in labels
    assert ("prestaged_endpoint_concurrency", "host", "door.example.org") in labels


def test_cluster_gauges_cover_every_lease_kind_and_takeovers_stay_bounded() -> None:
    """set_cluster sets the members alive and every lease kind (0 for a kind not given, so a
    lease given up drops to 0); a takeover of an unknown kind counts as "unknown", never as a
    new label value."""
    m = Metrics()
    m.set_cluster(3, {"campaign": 2, "chunk": 1})
    m.set_cluster(2, {"campaign": 1})
    assert _value(m, "prestaged_cluster_members") == 2
    assert [_value(m, "prestaged_leases_held", kind=k) for k in LEASE_KINDS] == [1, 0, 0]
    m.lease_taken_over("chunk")
    m.lease_taken_over("/pnfs/odd")
    assert _value(m, "prestaged_lease_takeovers_total", kind="chunk") == 1
    assert _value(m, "prestaged_lease_takeovers_total", kind="unknown") == 1
    assert "/pnfs/odd" not in m.exposition().decode()


async def test_probe_lag_sees_the_loop_held() -> None:
    """A callback holding the loop for 0.3 s makes the probe that was due meanwhile run at
    least 0.25 s late (probes every 0.05 s); the probes of the idle loop before it were not."""
    lags: list[float] = []
    idle, held = asyncio.Event(), asyncio.Event()

    def observe(lag: float) -> None:
        lags.append(lag)
        if len(lags) == 3:
            idle.set()
        if lag >= 0.25:
            held.set()

    task = asyncio.ensure_future(probe_lag(observe, 0.05))
    try:
        await asyncio.wait_for(idle.wait(), 5)
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # a callback holding the loop
        await asyncio.wait_for(held.wait(), 5)
    finally:
        task.cancel()
    assert all(lag < 0.25 for lag in lags[:3]), lags
    assert 0.25 <= max(lags) < 5, lags


def test_loop_lag_histogram_is_in_the_exposition() -> None:
    m = Metrics()
    m.loop_lag.observe(0.002)
    m.loop_lag.observe(1.5)
    text = m.exposition().decode()
    assert 'prestaged_event_loop_lag_seconds_bucket{le="1.0"} 1.0' in text
    assert 'prestaged_event_loop_lag_seconds_bucket{le="2.5"} 2.0' in text
