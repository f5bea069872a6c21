"""The engine's tape path (prestaged.locality) in the test's event loop: locality asked while the
catalog still streams, every locality's way (LOST and NONE, which the emulator never answers,
from a scripted client), paths left out of an answer asked again, discovery kept for its TTL,
and namespace paths from URLs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import pytest

from prestaged.config import PathMap
from prestaged.locality import TapeAccess, TapeDirectory, TapeSettings, namespace_path
from prestaged.model import Attempt, FileRef, Result, TapeInfo
from prestaged.storage.staging import StagingSettings
from prestaged.storage.tape import FileLocality, Locality
from prestaged.testing.dcache import DCacheServer
from prestaged.testing.dcache import Locality as Where
from prestaged.testing.pki import TestPKI
from prestaged.warm import WarmSettings, warm

Factory = Callable[..., Awaitable[DCacheServer]]
QUICK = TapeSettings(staging=StagingSettings(poll_min=0.01, poll_max=0.05))


class _Touches:
    """A toucher that answers 206 and remembers what it touched, setting ``first`` then."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.first = asyncio.Event()

    async def touch(self, url: str) -> Attempt:
        self.urls.append(url)
        self.first.set()
        return Attempt(status=206, data=4)


async def test_the_first_touches_do_not_wait_for_the_whole_catalog(
    dcache: Factory, pki: TestPKI, proxy: Path
) -> None:
    """A catalog that yields 300 files, then waits until a file has been touched before it
    yields the rest: the run ends (it would hang if locality waited for the whole stream), with
    one archiveinfo per admitted chunk."""
    srv = await dcache()
    for i in range(600):
        srv.core.add_file(f"/pnfs/p/f{i:03d}", 10, Where.DISK)
    toucher = _Touches()

    async def files() -> AsyncIterator[FileRef]:
        for i in range(600):
            if i == 300:
                await toucher.first.wait()
            yield FileRef(f"f{i}", srv.door_url(f"/pnfs/p/f{i:03d}"))

    async with TapeAccess(pki.client_ssl_context(proxy), QUICK) as tape:
        report = await asyncio.wait_for(
            warm(files(), WarmSettings(concurrency=4), toucher, tape=tape), 30)
    assert report.tally.results[Result.WARM.value] == 600 and len(toucher.urls) == 600
    assert srv.core.stats.requests["frontend:archiveinfo"] == 3  # chunks of 256, 256, 88
    assert srv.core.stats.requests["door:discovery"] == 1


class _Scripted:
    """A TapeClient answering archiveinfo from a table; paths in ``late`` only on a retry."""

    def __init__(self, answers: dict[str, FileLocality], late: set[str]) -> None:
        self.answers, self.late = answers, late
        self.asked: list[list[str]] = []

    async def discover(self, door: str) -> Optional[str]:
        return "https://frontend/api/v1/tape"

    async def archiveinfo(self, uri: str, paths: Sequence[str]) -> dict[str, FileLocality]:
        self.asked.append(list(paths))
        first = len(self.asked) == 1
        return {p: self.answers[p] for p in paths
                if p in self.answers and not (first and p in self.late)}


async def test_every_locality_takes_its_way() -> None:
    """DISK and DISK_AND_TAPE are touched; LOST, UNAVAILABLE and NONE fail with that reason,
    untouched; a per-path error is missing; a path left out of the answer is asked once more."""
    L = Locality
    answers = {f"/{w.value}": FileLocality(f"/{w.value}", w) for w in
               (L.DISK, L.DISK_AND_TAPE, L.LOST, L.UNAVAILABLE, L.NONE)}
    answers["/gone"] = FileLocality("/gone", None, "No such file or directory")
    client = _Scripted(answers, late={"/DISK_AND_TAPE"})
    access = TapeAccess(None, TapeSettings())
    access._client = client  # type: ignore[assignment]
    toucher = _Touches()

    async def files() -> AsyncIterator[FileRef]:
        for path in answers:
            yield FileRef(path, f"https://door:2880{path}")

    report = await warm(files(), WarmSettings(concurrency=2), toucher, tape=access)
    assert sorted(toucher.urls) == ["https://door:2880/DISK", "https://door:2880/DISK_AND_TAPE"]
    errors = {o.name: (o.result, o.error) for o in report.tally.failures}
    assert errors["/LOST"] == (Result.FAILED, "locality LOST: the storage has no readable copy")
    assert errors["/NONE"][1].startswith("locality NONE")
    assert errors["/UNAVAILABLE"][1].startswith("locality UNAVAILABLE")
    assert errors["/gone"] == (Result.MISSING, "archiveinfo: No such file or directory")
    assert client.asked[1] == ["/DISK_AND_TAPE"]  # the one left out, asked again alone


class _Discovering:
    """A Tape REST client whose discovery answers ``outcome[0]`` (raised when an exception)
    and notes each door asked in ``calls``."""

    def __init__(self, first: Any) -> None:
        self.outcome: list[Any] = [first]
        self.calls: list[str] = []

    async def discover(self, door: str) -> Optional[str]:
        self.calls.append(door)
        if isinstance(self.outcome[0], Exception):
            raise self.outcome[0]
        return self.outcome[0]  # type: ignore[no-any-return]


async def test_discovery_is_kept_for_its_ttl() -> None:
    """A door's discovery answer is reused until ``ttl`` has passed, then asked again; an
    unreadable document is not kept."""
    from prestaged.storage.tape import TapeRestError

    now = [0.0]
    client = _Discovering("https://f/api/v1/tape")
    outcome, calls = client.outcome, client.calls
    directory = TapeDirectory(ttl=60, clock=lambda: now[0])
    assert await directory.lookup(client, "https://d:2880") == "https://f/api/v1/tape"
    now[0] = 59
    assert await directory.lookup(client, "https://d:2880") == "https://f/api/v1/tape"
    assert len(calls) == 1
    now[0] = 61
    outcome[0] = TapeRestError("bad document")
    assert isinstance(await directory.lookup(client, "https://d:2880"), TapeRestError)
    outcome[0] = None
    assert await directory.lookup(client, "https://d:2880") is None
    assert len(calls) == 3


async def test_a_door_that_stops_answering_discovery_keeps_its_last_answer_a_while() -> None:
    """Asked again after the TTL, a door that answers 5xx (TapeTransient) keeps its last
    answer for STALE_RETRY more seconds instead of having none (its files were then read by
    GET); one never answered gets the error; an unreadable document is still not kept."""
    from prestaged.locality import STALE_RETRY
    from prestaged.storage.tape import TapeRestError, TapeTransient

    now = [0.0]
    client = _Discovering("https://f/api/v1/tape")
    outcome, calls = client.outcome, client.calls
    directory = TapeDirectory(ttl=3600, clock=lambda: now[0])
    assert await directory.lookup(client, "https://d:2880") == "https://f/api/v1/tape"
    now[0] = 3601
    outcome[0] = TapeTransient("https://d:2880/.well-known/wlcg-tape-rest-api: 503")
    assert await directory.lookup(client, "https://d:2880") == "https://f/api/v1/tape"
    now[0] = 3600 + STALE_RETRY
    assert await directory.lookup(client, "https://d:2880") == "https://f/api/v1/tape"
    assert len(calls) == 2
    now[0] = 3602 + STALE_RETRY
    assert await directory.lookup(client, "https://d:2880") == "https://f/api/v1/tape"
    assert len(calls) == 3
    assert isinstance(await directory.lookup(client, "https://other:2880"), TapeTransient)
    outcome[0] = TapeRestError("bad document")
    now[0] = 10_000
    assert isinstance(await directory.lookup(client, "https://d:2880"), TapeRestError)


def test_namespace_paths_are_spelled_as_dcache_fspath() -> None:
    """A rule whose prefixes both bring a "/" to the join, a URL with "//", "." or "..", and
    a trailing "/" give the path dCache lists in its polls (no "//", "." or "..")."""
    rules = (PathMap("https://d:2880/dune", "/pnfs/fnal.gov/usr/dune/"),)
    assert namespace_path("https://d:2880/dune/raw/f1", rules) == "/pnfs/fnal.gov/usr/dune/raw/f1"
    assert namespace_path("https://e:2880//pnfs/a//b/./c/../f/") == "/pnfs/a/b/f"
    assert namespace_path("https://e:2880/../../f") == "/f"
    assert namespace_path("https://e:2880") == "/"


async def test_a_door_named_in_tape_api_is_never_asked_and_a_reload_applies() -> None:
    """[[storage.tape_api]]: its door's endpoint is the entry's uri, whatever the spelling of
    the door (case, default port), and discovery is never sent there; other doors are asked.
    Settings set anew on the access (the daemon's reload) change the entries and the TTL, and
    a bearer token may go to the new entry's host, and no longer once the entry is gone."""
    from prestaged.config import TapeApi
    from prestaged.testing.tokens import TokenIssuer
    from prestaged.tokens import FoundToken, TokenSource

    asked: list[str] = []

    class Client:
        async def discover(self, door: str) -> Optional[str]:
            asked.append(door)
            return None

    entry = TapeApi("https://FNDCA.example.org", "https://f.example.org:3880/api/v1/tape/")
    directory = TapeDirectory(configured=[entry])
    client: Any = Client()
    assert await directory.lookup(client, "https://fndca.example.org:443") == \
        "https://f.example.org:3880/api/v1/tape"
    assert asked == []
    assert await directory.lookup(client, "https://fndca.example.org:2880") is None
    assert asked == ["https://fndca.example.org:2880"]

    minted = TokenIssuer().mint("storage.stage:/", audience="https://d.example.org")
    token = TokenSource(FoundToken(minted, "test", None))
    async with TapeAccess(None, QUICK, token=token) as access:
        assert access.client._authorization("https://g.example.org:3880/api/v1/tape") is None
        other = TapeApi("https://d.example.org:2880", "https://g.example.org:3880/api/v1/tape")
        access.settings = TapeSettings(tape_api=(other,), discovery_ttl=5.0)
        assert access.directory.ttl == 5.0
        assert await access.directory.lookup(client, "https://d.example.org:2880") == other.uri
        assert await access.directory.lookup(client, "https://fndca.example.org:443") is None
        assert access.client._authorization(other.uri) == "Bearer " + minted
        access.settings = QUICK  # the entry is gone: so is the token's way there
        assert access.client._authorization(other.uri) is None


def test_namespace_paths_from_urls() -> None:
    """The URL's percent-decoded path by default; the first matching path_map rule otherwise."""
    rules = (PathMap("https://d:2880/dune/", "/pnfs/fnal.gov/usr/dune/"),
             PathMap("https://d:2880/", "/pnfs/other/"))
    assert namespace_path("https://d:2880/pnfs/a%20b/f.root?x=1") == "/pnfs/a b/f.root"
    assert namespace_path("https://d:2880/dune/raw/f%2B1", rules) == \
        "/pnfs/fnal.gov/usr/dune/raw/f+1"
    assert namespace_path("https://d:2880/icarus/f", rules) == "/pnfs/other/icarus/f"
    assert namespace_path("https://e:2880/dune/f", rules) == "/dune/f"


class _Adopting:
    """A recorder whose state says an earlier run made a stage request for the files: when
    the router asks (locality said TAPE), it makes that request on the emulator (``make``),
    asking a pin of ``lifetime``, and answers it as made ``age`` seconds ago; it keeps what
    is noted."""

    def __init__(self, make: Callable[[list[str]], Awaitable[str]], uri: str, lifetime: float,
                 age: float) -> None:
        self.make, self.uri, self.lifetime, self.age = make, uri, lifetime, age
        self.notes: list[TapeInfo] = []
        self.made = 0.0

    async def admit(self, refs: list[FileRef]) -> list[FileRef]:
        return refs

    def record(self, outcome: Any) -> None: ...

    def note(self, url: str, info: TapeInfo) -> None:
        self.notes.append(info)

    async def open_stages(self, urls: list[str]) -> dict[str, TapeInfo]:
        request = await self.make([urlsplit(u).path for u in urls])
        self.made = time.time() - self.age
        return {u: TapeInfo("TAPE", request, self.uri, requested_at=self.made,
                            lifetime=self.lifetime) for u in urls}

    def now(self) -> float:
        return time.time()


async def test_an_adopted_request_keeps_its_date_and_its_pin_lifetime(
    dcache: Factory, pki: TestPKI, proxy: Path
) -> None:
    """An earlier run's request, made 100 s ago with a 1 h pin, followed by a run whose
    storage.pin_lifetime is 2 days and stage_timeout 10 min: it is polled (not cancelled as
    47 h old), and the pin noted on landing ends an hour after the landing, as that request
    asked; the follow is noted with the request's own date."""
    srv = await dcache(mount_seconds=1.0)
    srv.core.add_file("/pnfs/a/f", 10, Where.TAPE)
    settings = TapeSettings(staging=StagingSettings(poll_min=0.01, poll_max=0.05, timeout=600,
                                                    lifetime=2 * 86400))
    async with TapeAccess(pki.client_ssl_context(proxy), settings) as tape:
        async def make(paths: list[str]) -> str:
            (request,) = await tape.client.stage(srv.tape_api_url, paths, 3600.0)
            return request.id

        recorder = _Adopting(make, srv.tape_api_url, 3600.0, 100.0)

        async def files() -> AsyncIterator[FileRef]:
            yield FileRef("f", srv.door_url("/pnfs/a/f"))

        report = await asyncio.wait_for(warm(files(), WarmSettings(), _Touches(), tape=tape,
                                             recorder=recorder), 30)
    assert report.tally.results[Result.WARM.value] == 1
    assert srv.core.stats.requests["frontend:stage"] == 1
    assert "frontend:cancel" not in srv.core.stats.requests
    followed, landed = [n for n in recorder.notes if n.request is not None]
    assert (followed.requested_at, followed.lifetime) == (recorder.made, 3600.0)
    assert landed.staged_at is not None and landed.pinned_until == landed.staged_at + 3600.0


class _StagingProbe:
    """Records ``staging`` deltas; sets ``requested`` at the first positive one."""

    def __init__(self) -> None:
        self.deltas: list[int] = []
        self.requested = asyncio.Event()

    def staging(self, delta: int) -> None:
        self.deltas.append(delta)
        if delta > 0:
            self.requested.set()

    def file_staged(self, seconds: float) -> None:
        raise AssertionError("nothing lands in this test")

    def request_started(self, host: str) -> None: ...

    def request_finished(self, host: str, seconds: float) -> None: ...

    def retried(self, reason: str) -> None: ...

    def file_done(self, outcome: object) -> None: ...

    def concurrency_changed(self, host: str, delta: int) -> None: ...

    def set_rate(self, host: str, rate: float) -> None: ...


async def test_a_run_stopped_while_staging_leaves_no_file_counted_as_staging(
    dcache: Factory, pki: TestPKI, proxy: Path
) -> None:
    """Stopping a run whose files wait for a 30 s mount: the files-staging gauge goes back to
    where it was (the run no longer follows them), and the run is reported interrupted."""
    srv = await dcache(mount_seconds=30.0)
    for i in range(3):
        srv.core.add_file(f"/pnfs/i/f{i}", 10, Where.TAPE)
    probe, stop = _StagingProbe(), asyncio.Event()

    async def files() -> AsyncIterator[FileRef]:
        for i in range(3):
            yield FileRef(f"f{i}", srv.door_url(f"/pnfs/i/f{i}"))

    async def stop_once_requested() -> None:
        await probe.requested.wait()
        stop.set()

    stopper = asyncio.ensure_future(stop_once_requested())
    async with TapeAccess(pki.client_ssl_context(proxy), QUICK) as tape:
        report = await asyncio.wait_for(warm(files(), WarmSettings(), _Touches(), stop=stop,
                                             tape=tape, probe=probe), 30)  # type: ignore[arg-type]
    await stopper
    assert report.interrupted and probe.deltas[0] == 3 and sum(probe.deltas) == 0


async def test_a_session_replaced_by_renewed_credentials_is_closed_once_its_requests_are_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``install`` (a reload, a renewed proxy or token) replaces the Tape REST session; the
    old one is closed once ``REQUEST_TIMEOUT``, the longest a request on it may take, has
    passed. A daemon kept every one to its end: a session, connector and SSL context leaked
    at every reload and renewal."""
    import prestaged.locality as locality

    monkeypatch.setattr(locality, "REQUEST_TIMEOUT", 0.05)
    async with TapeAccess(None, QUICK) as access:
        first = access._session
        for _ in range(3):
            access.install(None)
        assert access.retired == 3 and first is not None and not first.closed
        deadline = time.monotonic() + 10
        while access.retired:
            assert time.monotonic() < deadline, access.retired
            await asyncio.sleep(0.01)
        assert first.closed and access._session is not None and not access._session.closed


class _AdoptingSome(_Adopting):
    """An earlier run's request for the files of ``only`` (made on the emulator, answered);
    the stage POSTs after it are held back unanswered."""

    def __init__(self, srv: DCacheServer, make: Callable[[list[str]], Awaitable[str]],
                 only: set[str]) -> None:
        super().__init__(make, srv.tape_api_url, 3600.0, 1.0)
        self.srv, self.only = srv, only

    async def open_stages(self, urls: list[str]) -> dict[str, TapeInfo]:
        mine = [u for u in urls if urlsplit(u).path in self.only]
        request = await self.make([urlsplit(u).path for u in mine])
        self.srv.frontend.hold_stage_answers()  # this run's own POSTs get no answer
        return {u: TapeInfo("TAPE", request, self.uri, requested_at=time.time() - self.age,
                            lifetime=self.lifetime) for u in mine}


async def test_a_stop_cancelled_while_waiting_for_stage_answers_leaves_no_file_staging(
    dcache: Factory, pki: TestPKI, proxy: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run following 3 files staging (an earlier run's request), stopped while its own
    stage POST for 3 more is unanswered, waits for that answer (``STAGE_ANSWER_GRACE``).
    Cancelled meanwhile (a second Ctrl-C, the daemon's shutdown), it still takes its files
    off the files-staging gauge (they stayed counted)."""
    import logging

    import prestaged.locality as locality

    monkeypatch.setattr(locality, "STAGE_ANSWER_GRACE", 60.0)
    srv = await dcache(mount_seconds=30.0)
    paths = [f"/pnfs/c/f{i}" for i in range(6)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    probe, stop = _StagingProbe(), asyncio.Event()

    async def files() -> AsyncIterator[FileRef]:
        for p in paths:
            yield FileRef(p, srv.door_url(p))

    caplog.set_level(logging.INFO, logger="prestaged.locality")
    async with TapeAccess(pki.client_ssl_context(proxy), QUICK) as tape:
        async def make(chosen: list[str]) -> str:
            (request,) = await tape.client.stage(srv.tape_api_url, chosen, 3600.0)
            return request.id

        recorder = _AdoptingSome(srv, make, set(paths[:3]))
        run = asyncio.ensure_future(warm(files(), WarmSettings(), _Touches(), stop=stop,
                                         tape=tape, probe=probe,  # type: ignore[arg-type]
                                         recorder=recorder))
        deadline = time.monotonic() + 30
        while not srv.frontend.held:  # its own request made, the answer held back
            assert time.monotonic() < deadline and not run.done()
            await asyncio.sleep(0.01)
        stop.set()
        while "stopping: waiting up to 60 s" not in caplog.text:
            assert time.monotonic() < deadline and not run.done()
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        srv.frontend.release_stage_answers()
    assert probe.deltas[0] == 3 and sum(probe.deltas) == 0, probe.deltas


async def test_files_two_runs_follow_are_one_file_staging_and_land_once(
    dcache: Factory, pki: TestPKI, proxy: Path
) -> None:
    """Two runs of one access (two watched definitions) sharing 4 tape files: one stage
    request, and the files-staging gauge and the stage durations count each file once (they
    counted it once per run: 8 staging, 8 landings), back to 0 at the end."""
    from prestaged.metrics import Metrics

    srv = await dcache(mount_seconds=0.3)
    for i in range(4):
        srv.core.add_file(f"/pnfs/s/f{i}", 10, Where.TAPE)
    seen: list[float] = []

    class Seen(Metrics):
        """The daemon's metrics, noting the files-staging gauge at each change."""

        def staging(self, delta: int) -> None:
            super().staging(delta)
            seen.append(self.registry.get_sample_value("prestaged_files_staging") or 0.0)

    metrics = Seen()

    async def files() -> AsyncIterator[FileRef]:
        for i in range(4):
            yield FileRef(f"f{i}", srv.door_url(f"/pnfs/s/f{i}"))

    async with TapeAccess(pki.client_ssl_context(proxy), QUICK) as tape:
        reports = await asyncio.wait_for(asyncio.gather(*(
            warm(files(), WarmSettings(), _Touches(), tape=tape, probe=metrics)
            for _ in range(2))), 30)
    assert [r.tally.results[Result.WARM.value] for r in reports] == [4, 4]
    assert srv.core.stats.requests["frontend:stage"] == 1  # the second run followed the first
    assert seen and max(seen) == 4 and seen[-1] == 0, seen
    assert metrics.registry.get_sample_value("prestaged_stage_duration_seconds_count") == 4
