"""The stage/poll loop (prestaged.storage.staging) against the dCache emulator: bounded open
requests and batches, every file handed on once on disk, one more try after FAILED, a timeout
that cancels, a request the server forgot, and the poll backoff."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Callable

import aiohttp
import pytest

from prestaged.retry import RetryPolicy
from prestaged.storage.staging import Staged, Stager, StagingSettings
from prestaged.storage.tape import StageRequest, StageState, StageStatus, TapeClient
from prestaged.testing.dcache import DCacheServer
from prestaged.testing.dcache import Locality as Where

Factory = Callable[..., Awaitable[DCacheServer]]
NO_WAIT = RetryPolicy(attempts=5, initial=0.0, max=0.0, jitter=0.0, total=60.0)
QUICK = StagingSettings(batch=50, max_requests=2, poll_min=0.01, poll_max=0.08, timeout=30,
                        lifetime=3600)


async def _all(stager: Stager, paths: list[str]) -> list[Staged]:
    return [s async for s in stager.run(paths)]


async def test_every_file_lands_once_within_the_request_and_batch_bounds(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """300 tape files on 3 tapes, 50 a request, 2 requests open at most (the emulator refuses a
    third with 429): each file yielded once, on disk and pinned; no request over 50 paths and
    no stage request sent twice."""
    srv = await dcache(drives=2, max_requests=2)
    paths = [f"/pnfs/q/f{i:04d}" for i in range(300)]
    for i, p in enumerate(paths):
        srv.core.add_file(p, 10, Where.TAPE, tape=f"T{i % 3}")
    got = await _all(Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url, QUICK), paths)
    assert sorted(s.path for s in got) == paths and all(s.on_disk for s in got)
    assert all(srv.core.files[p].on_disk and srv.core.files[p].pins for p in paths)
    assert srv.core.stats.max_paths <= 50
    stage_calls = [c for c in srv.core.stats.frontend_calls if c.startswith("POST")
                   and "/stage" in c and "cancel" not in c]
    assert len(stage_calls) == 6  # 300 / 50: none refused with 429 and sent again


async def test_a_failed_file_is_asked_once_more_then_reported(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A disk-only file cannot be staged: FAILED, a second request for it, then one failure
    carrying dCache's error; the tape file beside it lands."""
    srv = await dcache()
    srv.core.add_file("/pnfs/f/disk", 10, Where.DISK)
    srv.core.add_file("/pnfs/f/tape", 10, Where.TAPE)
    got = {s.path: s for s in await _all(
        Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url, QUICK),
        ["/pnfs/f/disk", "/pnfs/f/tape"])}
    assert got["/pnfs/f/tape"].on_disk
    assert not got["/pnfs/f/disk"].on_disk
    assert "Cannot stage DISK only files" in got["/pnfs/f/disk"].error
    assert srv.core.stats.requests["frontend:stage"] == 2


async def test_a_stage_that_takes_too_long_is_cancelled_and_reported(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A tape that takes longer to mount than the timeout: the file is reported "stage timed
    out" and its request cancelled on the server."""
    srv = await dcache(mount_seconds=30)
    srv.core.add_file("/pnfs/t/slow", 10, Where.TAPE)
    settings = StagingSettings(batch=10, max_requests=1, poll_min=0.05, poll_max=0.1,
                               timeout=0.3, lifetime=60)
    [got] = await _all(Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url,
                              settings), ["/pnfs/t/slow"])
    assert not got.on_disk and got.error == "stage timed out after 0.3s"
    assert srv.core.stats.requests["frontend:cancel"] == 1


async def test_a_path_the_server_lists_in_another_spelling_lands(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """dCache lists /a//b/./c as /a/b/c in its polls: the file lands (under the caller's
    spelling) instead of waiting for the timeout and being cancelled."""
    srv = await dcache()
    srv.core.add_file("/pnfs/n/f", 10, Where.TAPE)
    settings = StagingSettings(batch=10, max_requests=1, poll_min=0.01, poll_max=0.05,
                               timeout=10)
    [got] = await _all(Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url, settings),
                       ["/pnfs//n/./f"])
    assert got.on_disk and got.path == "/pnfs//n/./f"
    assert srv.core.stats.requests["frontend:cancel"] == 0


class _Scripted:
    """A TapeClient stand-in whose polls follow a script (partial lists, a forgotten request),
    recording the stage requests and the sleeps between polls."""

    def __init__(self, answers: list[StageStatus]) -> None:
        self.answers = answers
        self.staged: list[list[str]] = []

    async def stage(self, uri: str, paths: list[str], lifetime: float, **_: Any) -> list[Any]:
        from prestaged.storage.tape import StageRequest

        self.staged.append(list(paths))
        return [StageRequest(f"r{len(self.staged)}", tuple(paths))]

    def batch_for(self, uri: str) -> int:
        return 500

    async def poll(self, uri: str, request_id: str, **_: Any) -> StageStatus:
        answer = self.answers.pop(0)
        return StageStatus(request_id, answer.files, answer.found)

    async def cancel(self, uri: str, request_id: str, paths: list[str]) -> None:
        raise AssertionError("no cancel expected")


async def test_backoff_doubles_without_progress_resets_with_it_and_a_lost_request_is_resent(
) -> None:
    """Polls wait poll_min, doubling to poll_max while nothing lands, back to poll_min after
    progress; files missing from a poll stay pending; a 404 stages the rest again once."""
    from prestaged.storage.tape import FileStage

    def files(**states: StageState) -> dict[str, FileStage]:
        return {f"/{k}": FileStage(f"/{k}", v) for k, v in states.items()}

    S = StageState
    answers = [
        StageStatus("r1", files(a=S.STARTED, b=S.STARTED, c=S.STARTED)),
        StageStatus("r1", files(a=S.STARTED)),                   # a partial list
        StageStatus("r1", files(a=S.COMPLETED, b=S.STARTED)),    # progress
        StageStatus("r1", {}, found=False),                       # the server forgot it
        StageStatus("r2", files(b=S.COMPLETED, c=S.COMPLETED)),
    ]
    client = _Scripted(answers)
    clock = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 3))
        clock[0] += seconds

    settings = StagingSettings(batch=10, max_requests=1, poll_min=1, poll_max=3, timeout=100)
    stager = Stager(client, "https://t", settings, clock=lambda: clock[0],  # type: ignore[arg-type]
                    sleep=sleep)
    got = [s async for s in stager.run(["/a", "/b", "/c"])]
    assert [s.path for s in got] == ["/a", "/b", "/c"] and all(s.on_disk for s in got)
    assert client.staged == [["/a", "/b", "/c"], ["/b", "/c"]]
    assert waits == [1, 2, 3, 1, 1]


async def test_an_adopted_request_is_polled_at_once_and_what_it_does_not_bring_is_asked_anew(
) -> None:
    """An earlier run's request (``adopt``) is polled before anything is staged. What its first
    poll shows on the way lands from it without a stage request (/a). Asked anew instead: a
    path it cancelled (/b, whose FAILED in the new request then gets its one retry), one its
    first poll does not list (/d), one already COMPLETED at that first poll (/e: the locality
    said TAPE just before, so that may be from before an eviction), and the paths of a second
    adopted request the server forgot (404, /c). A path given both to ``adopt`` and ``add`` is
    followed only."""
    from prestaged.storage.tape import FileStage

    S = StageState
    by_id = {  # each request's polls, in order
        "old": [StageStatus("old", {"/a": FileStage("/a", S.STARTED),
                                    "/b": FileStage("/b", S.CANCELLED),
                                    "/e": FileStage("/e", S.COMPLETED)}),
                StageStatus("old", {"/a": FileStage("/a", S.COMPLETED)})],
        "gone": [StageStatus("gone", {}, found=False)],
        "r1": [StageStatus("r1", {"/b": FileStage("/b", S.FAILED, "tape error"),
                                  "/d": FileStage("/d", S.COMPLETED),
                                  "/e": FileStage("/e", S.COMPLETED)})],
        "r2": [StageStatus("r2", {"/c": FileStage("/c", S.COMPLETED)})],
        "r3": [StageStatus("r3", {"/b": FileStage("/b", S.COMPLETED)})],
    }

    class ById(_Scripted):
        async def poll(self, uri: str, request_id: str, **_: Any) -> StageStatus:
            return by_id[request_id].pop(0)

    client = ById([])
    clock = [0.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    settings = StagingSettings(batch=10, max_requests=5, poll_min=1, poll_max=3, timeout=100)
    stager = Stager(client, "https://t", settings, clock=lambda: clock[0],  # type: ignore[arg-type]
                    sleep=sleep)
    stager.adopt("old", ["/a", "/b", "/d", "/e"])
    stager.adopt("gone", ["/c"])
    stager.add(["/a"])
    stager.close()
    got = {s.path: (s.on_disk, s.request_id) async for s in stager.landed()}
    assert got == {"/a": (True, "old"), "/b": (True, "r3"), "/c": (True, "r2"),
                   "/d": (True, "r1"), "/e": (True, "r1")}
    assert client.staged == [["/b", "/d", "/e"], ["/c"], ["/b"]]


async def test_a_file_failed_in_an_adopted_request_gets_one_more_request_not_two() -> None:
    """FAILED in an earlier run's request is the file's first try: one new request, and when
    that fails too the file fails with the server's error (two requests in all, as in one
    run), not a new request plus the usual retry."""
    from prestaged.storage.tape import FileStage

    S = StageState
    by_id = {"old": [StageStatus("old", {"/f": FileStage("/f", S.FAILED, "bad tape")})],
             "r1": [StageStatus("r1", {"/f": FileStage("/f", S.FAILED, "bad tape again")})]}

    class ById(_Scripted):
        async def poll(self, uri: str, request_id: str, **_: Any) -> StageStatus:
            return by_id[request_id].pop(0)

    client = ById([])

    async def sleep(seconds: float) -> None:
        pass

    settings = StagingSettings(batch=10, max_requests=5, poll_min=1, poll_max=3, timeout=100)
    stager = Stager(client, "https://t", settings, sleep=sleep)  # type: ignore[arg-type]
    stager.adopt("old", ["/f"])
    stager.close()
    [got] = [s async for s in stager.landed()]
    assert not got.on_disk and got.error == "stage failed: bad tape again"
    assert got.request_id == "r1" and client.staged == [["/f"]]


async def test_an_adopted_request_times_out_from_when_it_was_made_and_nothing_is_adopted_late(
) -> None:
    """A request made 90 s ago under a 100 s timeout is cancelled 10 s into the rerun, not 100;
    once ``landed()`` has ended an ``adopt`` takes no request slot (it would never be given
    back, and the daemon's runs share the slots)."""
    from prestaged.storage.staging import RequestSlots
    from prestaged.storage.tape import FileStage

    cancelled: list[tuple[str, list[str]]] = []

    class Slow(_Scripted):
        async def poll(self, uri: str, request_id: str, **_: Any) -> StageStatus:
            return StageStatus(request_id, {"/a": FileStage("/a", StageState.STARTED)})

        async def cancel(self, uri: str, request_id: str, paths: list[str]) -> None:
            cancelled.append((request_id, paths))

    clock = [0.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    slots = RequestSlots(5)
    settings = StagingSettings(batch=10, max_requests=5, poll_min=1, poll_max=3, timeout=100)
    stager = Stager(Slow([]), "https://t", settings, clock=lambda: clock[0],  # type: ignore[arg-type]
                    sleep=sleep, slots=slots)
    stager.adopt("old", ["/a"], age=90)
    stager.close()
    [got] = [s async for s in stager.landed()]
    assert not got.on_disk and got.error.startswith("stage timed out")
    assert cancelled == [("old", ["/a"])] and 10 <= clock[0] <= 13
    stager.adopt("late", ["/b"])
    assert slots.used["https://t"] == 0


async def test_stagers_sharing_slots_keep_to_the_endpoint_limit(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """Two stagers (two runs of the daemon) sharing one ``RequestSlots`` of 1 never have two
    requests open on the endpoint: the emulator, refusing a second open request with 429,
    answers every stage POST with 201; both stagers finish."""
    import asyncio

    from prestaged.storage.staging import RequestSlots

    srv = await dcache(max_requests=1)
    for i in range(20):
        srv.core.add_file(f"/pnfs/s/f{i:02d}", 10, Where.TAPE, tape=f"T{i % 2}")
    slots = RequestSlots(1)
    settings = StagingSettings(batch=5, max_requests=1, poll_min=0.01, poll_max=0.05)
    answers: list[str] = []
    client = TapeClient(http, policy=NO_WAIT, on_stage=answers.append)
    a = Stager(client, srv.tape_api_url, settings, slots=slots)
    b = Stager(client, srv.tape_api_url, settings, slots=slots)
    got = await asyncio.gather(_all(a, [f"/pnfs/s/f{i:02d}" for i in range(10)]),
                               _all(b, [f"/pnfs/s/f{i:02d}" for i in range(10, 20)]))
    assert all(s.on_disk for run in got for s in run) and sum(map(len, got)) == 20
    assert answers == ["accepted"] * 4 and slots.used[srv.tape_api_url] == 0


class _Recording(TapeClient):
    """The real client, recording the paths of each stage POST; with ``gate`` the POST waits
    for it (``posting`` is set meanwhile), so a test can act while it is on its way."""

    def __init__(self, *args: Any, gate: Any = None, **kwargs: Any) -> None:
        import asyncio

        super().__init__(*args, **kwargs)
        self.posted: list[list[str]] = []
        self.gate = gate
        self.posting = asyncio.Event()

    async def stage(self, uri: str, paths: Any, lifetime: float, **kwargs: Any) -> Any:
        self.posted.append(list(paths))
        self.posting.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().stage(uri, paths, lifetime, **kwargs)


async def test_stagers_sharing_an_endpoint_never_ask_twice_for_one_file(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """Two runs of the daemon whose definitions share files: while A's stage request for
    f00-f09 is on its way, B (f05-f14) asks only for f10-f14, then follows f05-f09 in A's
    request once its id is known. Both see all their files land; each file was in one stage
    request and holds one pin; the slots are all given back."""
    import asyncio

    from prestaged.storage.staging import RequestSlots

    srv = await dcache(drives=2)
    names = [f"/pnfs/d/f{i:02d}" for i in range(15)]
    for i, p in enumerate(names):
        srv.core.add_file(p, 10, Where.TAPE, tape=f"T{i % 2}")
    slots = RequestSlots(5)
    settings = StagingSettings(batch=20, max_requests=5, poll_min=0.01, poll_max=0.05)
    gate = asyncio.Event()
    client_a = _Recording(http, policy=NO_WAIT, gate=gate)
    client_b = _Recording(http, policy=NO_WAIT)
    heard: list[tuple[str, tuple[str, ...]]] = []
    a = Stager(client_a, srv.tape_api_url, settings, slots=slots)
    b = Stager(client_b, srv.tape_api_url, settings, slots=slots,
               on_follow=lambda r, age: heard.append((r.id, r.paths)))
    run_a = asyncio.ensure_future(_all(a, names[:10]))
    await asyncio.wait_for(client_a.posting.wait(), 10)
    run_b = asyncio.ensure_future(_all(b, names[5:]))
    await asyncio.wait_for(client_b.posting.wait(), 10)
    assert client_b.posted == [names[10:]]  # f05-f09 are held, not asked again
    gate.set()
    got_a, got_b = await asyncio.wait_for(asyncio.gather(run_a, run_b), 30)
    assert sorted(s.path for s in got_a) == names[:10] and all(s.on_disk for s in got_a)
    assert sorted(s.path for s in got_b) == names[5:] and all(s.on_disk for s in got_b)
    assert client_a.posted == [names[:10]] and len(client_b.posted) == 1
    assert srv.core.stats.requests["frontend:stage"] == 2
    assert all(len(srv.core.files[p].pins) == 1 for p in names)
    followed = {s.request_id for s in got_b if s.path in names[5:10]}
    assert followed == {s.request_id for s in got_a}  # A's one request
    assert heard == [(followed.pop(), tuple(names[5:10]))]  # B's router notes A's pin
    assert slots.used[srv.tape_api_url] == 0 and not slots.claims and not slots.owners


async def test_a_request_of_a_running_stager_handed_to_adopt_is_followed_not_asked_again(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """The state already names A's open request when B's run starts (B's router hands it to
    ``adopt``): B follows it without a slot of its own and without a new request, and its
    files land in both runs."""
    import asyncio

    from prestaged.storage.staging import RequestSlots

    srv = await dcache(drives=1, mount_seconds=0.3)
    names = [f"/pnfs/e/f{i}" for i in range(4)]
    for p in names:
        srv.core.add_file(p, 10, Where.TAPE)
    slots = RequestSlots(1)
    settings = StagingSettings(batch=10, max_requests=1, poll_min=0.01, poll_max=0.05)
    client = _Recording(http, policy=NO_WAIT)
    made: list[str] = []
    answered = asyncio.Event()

    def on_request(request: Any) -> None:
        made.append(request.id)
        answered.set()

    a = Stager(client, srv.tape_api_url, settings, slots=slots, on_request=on_request)
    run_a = asyncio.ensure_future(_all(a, names))
    await asyncio.wait_for(answered.wait(), 10)
    b = Stager(client, srv.tape_api_url, settings, slots=slots)
    b.adopt(made[0], names[:2], age=0.0)
    assert slots.used[srv.tape_api_url] == 1  # A's only: B took no slot for it
    b.close()
    got_b = await asyncio.wait_for(_all(b, []), 30)
    got_a = await asyncio.wait_for(run_a, 30)
    assert sorted(s.path for s in got_b) == names[:2] and all(s.on_disk for s in got_b)
    assert len(got_a) == 4 and all(s.on_disk for s in got_a)
    assert client.posted == [names] and srv.core.stats.requests["frontend:stage"] == 1


class _Shared:
    """A scripted Tape REST endpoint for several stagers: each stage POST makes request r1,
    r2, ...; ``states`` says what a poll shows of a request's paths (by request id, else
    ``default``); POSTs and cancels are recorded, and ``posted`` is set at the first POST."""

    def __init__(self, states: dict[str, StageState],
                 default: StageState = StageState.STARTED) -> None:
        import asyncio

        self.states = states
        self.default = default
        self.posted = asyncio.Event()
        self.staged: list[list[str]] = []
        self.cancelled: list[str] = []
        self.paths: dict[str, list[str]] = {}

    async def stage(self, uri: str, paths: list[str], lifetime: float, **_: Any) -> list[Any]:
        from prestaged.storage.tape import StageRequest

        self.staged.append(list(paths))
        rid = f"r{len(self.staged)}"
        self.paths[rid] = list(paths)
        self.posted.set()
        return [StageRequest(rid, tuple(paths))]

    def batch_for(self, uri: str) -> int:
        return 500

    async def poll(self, uri: str, request_id: str, **_: Any) -> StageStatus:
        from prestaged.storage.tape import FileStage

        state = self.states.get(request_id, self.default)
        return StageStatus(request_id, {p: FileStage(p, state, "bad tape")
                                        for p in self.paths[request_id]})

    async def cancel(self, uri: str, request_id: str, paths: list[str]) -> None:
        self.cancelled.append(request_id)


async def test_one_retry_for_a_file_two_runs_saw_fail_and_no_post_for_a_followed_one() -> None:
    """A's request r1 for /p fails; B followed r1 at once, though A held the only slot. A and
    B both see FAILED, in whichever order: one of them asks again (r2), the other follows r2;
    both see /p land from r2. Two POSTs in all."""
    import asyncio

    from prestaged.storage.staging import RequestSlots

    client = _Shared({"r1": StageState.FAILED}, default=StageState.COMPLETED)
    slots = RequestSlots(1)
    settings = StagingSettings(batch=10, max_requests=1, poll_min=0.01, poll_max=0.02,
                               timeout=30)
    run_a, b = await _owner_then_follower(client, slots, settings, settings, "/p")
    got_a, got_b = await asyncio.wait_for(asyncio.gather(run_a, _drain(b)), 10)
    assert client.staged == [["/p"], ["/p"]]
    assert got_a == got_b == {"/p": (True, "r2")}
    assert slots.used["https://t"] == 0 and not slots.claims


async def _drain(stager: Stager) -> dict[str, tuple[bool, Any]]:
    return {s.path: (s.on_disk, s.request_id) async for s in stager.landed()}


async def _owner_then_follower(client: _Shared, slots: Any, first: StagingSettings,
                               second: StagingSettings, path: str) -> tuple[Any, Stager]:
    """Stager A (``first``) stages ``path``; once its POST is out, stager B (``second``) is
    given it too. A's run as a task, and B (closed, not yet drained)."""
    import asyncio

    a = Stager(client, "https://t", first, slots=slots)  # type: ignore[arg-type]
    b = Stager(client, "https://t", second, slots=slots)  # type: ignore[arg-type]
    a.add([path])
    a.close()
    run_a = asyncio.ensure_future(_drain(a))
    await asyncio.wait_for(client.posted.wait(), 10)
    b.add([path])
    b.close()
    return run_a, b


async def test_a_followers_timeout_leaves_the_owners_request_alone() -> None:
    """B follows A's request with a shorter stage_timeout (a reloaded config): B reports its
    file timed out, but only A, the request's owner, cancels the request on the server."""
    import asyncio

    from prestaged.storage.staging import RequestSlots

    client = _Shared({})
    slots = RequestSlots(2)
    short = StagingSettings(batch=10, max_requests=2, poll_min=0.01, poll_max=0.02, timeout=0.05)
    long = StagingSettings(batch=10, max_requests=2, poll_min=0.01, poll_max=0.02, timeout=0.3)
    run_a, b = await _owner_then_follower(client, slots, long, short, "/s")
    got_b = await asyncio.wait_for(_drain(b), 10)
    assert got_b == {"/s": (False, "r1")} and client.cancelled == []
    got_a = await asyncio.wait_for(run_a, 10)
    assert got_a == {"/s": (False, "r1")} and client.cancelled == ["r1"]


# --- passing failures: polls, back-pressure, lost answers (review H2, M1, M6, L1) ------------


async def test_passing_poll_failures_are_polled_through_and_every_file_lands(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A 500, a proxy's 502 and dCache's bare 400 (its bulk service late) on polls each ended
    the whole run; now the request is polled again on its schedule and every file lands."""
    srv = await dcache(drives=1, mount_seconds=0.2)
    paths = [f"/pnfs/p/f{i}" for i in range(4)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    for kind in ("500", "502", "400"):
        srv.faults.add("poll", kind)
    got = await _all(Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url, QUICK), paths)
    assert sorted(s.path for s in got) == paths and all(s.on_disk for s in got)
    assert srv.faults.served == {"poll:500": 1, "poll:502": 1, "poll:400": 1}
    assert srv.core.stats.requests["frontend:stage"] == 1


class _Flaky(_Scripted):
    """Request r1's polls fail (``error``), r2's show its files COMPLETED; cancels fail too
    (recorded); ``clock`` moves with the stager's sleeps."""

    def __init__(self, error: Exception) -> None:
        super().__init__([])
        self.error = error
        self.polled: list[str] = []
        self.cancelled: list[str] = []
        self.paths: dict[str, list[str]] = {}
        self.clock = [0.0]

    async def stage(self, uri: str, paths: list[str], lifetime: float, **_: Any) -> list[Any]:
        [request] = await super().stage(uri, paths, lifetime)
        self.paths[request.id] = list(paths)
        return [request]

    async def poll(self, uri: str, request_id: str, **_: Any) -> StageStatus:
        from prestaged.storage.tape import FileStage

        self.polled.append(request_id)
        if request_id == "r1":
            raise self.error
        return StageStatus(request_id, {p: FileStage(p, StageState.COMPLETED)
                                        for p in self.paths[request_id]})

    async def cancel(self, uri: str, request_id: str, paths: list[str]) -> None:
        from prestaged.storage.tape import TapeTransient

        self.cancelled.append(request_id)
        raise TapeTransient("https://t/stage/r1/cancel: 502 Bad Gateway")

    async def sleep(self, seconds: float) -> None:
        self.clock[0] += seconds


def _flaky_stager(client: _Flaky, **settings: Any) -> Stager:
    s = StagingSettings(**{"batch": 1, "max_requests": 5, "poll_min": 1, "poll_max": 8,
                           "timeout": 1000, **settings})
    return Stager(client, "https://t", s, clock=lambda: client.clock[0],  # type: ignore[arg-type]
                  sleep=client.sleep)


async def test_a_request_whose_polls_keep_failing_fails_alone_after_poll_errors() -> None:
    """r1's polls fail every time: after poll_errors (4) in a row, backing off, its file fails
    with the error; r2's file lands; the run goes on, and nothing is cancelled."""
    from prestaged.storage.tape import TapeTransient

    client = _Flaky(TapeTransient("https://t/stage/r1: 500 Internal problem"))
    stager = _flaky_stager(client, poll_errors=4)
    got = {s.path: s for s in await _all(stager, ["/a", "/b"])}
    assert got["/b"].on_disk and not got["/a"].on_disk
    assert got["/a"].error == ("stage failed: 4 polls of its request failed in a row "
                               "(https://t/stage/r1: 500 Internal problem)")
    assert client.polled.count("r1") == 4 and client.cancelled == []
    assert client.clock[0] >= 1 + 2 + 4  # polls backed off between the failures


async def test_polls_failing_until_the_timeout_time_out_and_a_failed_cancel_is_logged() -> None:
    """Polls that fail (a busy 429 is not counted at all) until stage_timeout: the file times
    out as any other, the cancel is tried, and its failure ends nothing."""
    from prestaged.storage.tape import TapeBusy

    client = _Flaky(TapeBusy("https://t/stage/r1: 429 slow down", retry_after=30.0))
    got = await _all(_flaky_stager(client, timeout=100, poll_errors=2), ["/a"])
    assert [(s.on_disk, s.error) for s in got] == [(False, "stage timed out after 100s")]
    assert client.cancelled == ["r1"] and 100 <= client.clock[0] < 140
    assert client.polled.count("r1") in (4, 5)  # every 30 s, Retry-After


async def test_back_pressure_on_stage_requests_is_waited_out_while_polls_go_on(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """dCache's per-user quota (one unfinished request here, held by another client: 429, no
    Retry-After) ended the run after the policy's tries. The stager waits, polling what it
    has, and asks again: every file lands, none failed."""
    srv = await dcache(max_requests=1, mount_seconds=0.2)
    srv.core.add_file("/pnfs/q/other", 10, Where.TAPE, tape="TX")
    paths = [f"/pnfs/q/f{i}" for i in range(3)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE, tape="TY")
    other = TapeClient(http, policy=NO_WAIT)
    await other.stage(srv.tape_api_url, ["/pnfs/q/other"], lifetime=60)
    heard: list[str] = []
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await srv.core.wait_until(lambda: srv.core.files["/pnfs/q/other"].on_disk
                                  and all(r.finished for r in srv.frontend.requests.values()))

    settings = StagingSettings(batch=2, max_requests=2, poll_min=0.01, poll_max=0.05)
    got = await _all(Stager(TapeClient(http, policy=NO_WAIT, on_stage=heard.append),
                            srv.tape_api_url, settings, sleep=sleep), paths)
    assert sorted(s.path for s in got) == paths and all(s.on_disk for s in got)
    assert "throttled" in heard and heard.count("accepted") == 2 and waits


async def test_back_pressure_lasting_stage_timeout_fails_what_waits_not_what_is_open() -> None:
    """The first POST is accepted, every later one refused (429, Retry-After 7 s): r1 is
    polled meanwhile and lands; the waiting file fails "stage timed out" once the endpoint
    has refused new requests for stage_timeout, with no try limit before that."""
    from prestaged.storage.tape import StageRequest, TapeBusy

    class Busy(_Flaky):
        async def stage(self, uri: str, paths: list[str], lifetime: float, **_: Any
                        ) -> list[Any]:
            if self.staged:
                raise TapeBusy("https://t/stage: 429 User has 5000 unfinished requests",
                               retry_after=7.0)
            self.staged.append(list(paths))
            self.paths["r2"] = list(paths)
            return [StageRequest("r2", tuple(paths))]

    client = Busy(AssertionError("r1 is never made"))
    got = await _all(_flaky_stager(client, max_requests=5, timeout=100), ["/a", "/b"])
    assert [(s.path, s.on_disk) for s in got] == [("/a", True), ("/b", False)]
    assert got[1].error.startswith("stage timed out after 100s: the endpoint took no new "
                                   "stage request all that time (https://t/stage: 429 User")
    assert 100 <= client.clock[0] <= 108


async def test_a_stage_request_whose_answer_was_lost_is_not_asked_again(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """The frontend makes the request, then the connection drops: the POST was sent again and
    the files pinned twice by two requests, one never followed. Now its files fail saying why,
    one request exists, and the next chunk is asked for as usual."""
    srv = await dcache(mount_seconds=0.1)
    paths = [f"/pnfs/l/f{i}" for i in range(4)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    srv.faults.add("stage", "drop", after=True)
    settings = StagingSettings(batch=2, max_requests=2, poll_min=0.01, poll_max=0.05)
    got = {s.path: s for s in await _all(
        Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url, settings), paths)}
    lost = sorted(p for p, s in got.items() if not s.on_disk)
    assert lost == paths[:2] and all(got[p].on_disk for p in paths[2:])
    assert "may have been made but its answer was lost" in got[paths[0]].error
    assert got[paths[0]].request_id is None
    assert srv.core.stats.requests["frontend:stage"] == 2 and len(srv.frontend.requests) == 2


async def test_a_413_is_learned_once_and_split_requests_keep_to_the_slots(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A frontend taking 25 targets, batches of 200, 5 open requests at most: the client
    halved each chunk anew (15 413s) and took a slot per split request without asking
    (12 open). The limit is learned once (3 413s) and never more than 5 are open."""
    from prestaged.storage.staging import RequestSlots

    class Peak(RequestSlots):
        peak = 0

        def take(self, uri: str) -> None:
            super().take(uri)
            self.peak = max(self.peak, self.used[uri])

    srv = await dcache(drives=4, max_targets=25)
    paths = [f"/pnfs/b/f{i:04d}" for i in range(400)]
    for i, p in enumerate(paths):
        srv.core.add_file(p, 10, Where.TAPE, tape=f"T{i % 4}")
    heard: list[str] = []
    slots = Peak(5)
    settings = StagingSettings(batch=200, max_requests=5, poll_min=0.01, poll_max=0.05)
    client = TapeClient(http, stage_batch=200, policy=NO_WAIT, on_stage=heard.append)
    got = await _all(Stager(client, srv.tape_api_url, settings, slots=slots), paths)
    assert len(got) == 400 and all(s.on_disk for s in got)
    assert heard.count("too_large") == 3 and heard.count("accepted") == 16
    assert slots.peak <= 5 and srv.core.stats.max_paths <= 200


async def _held(srv: DCacheServer, n: int = 1) -> None:
    """Until the emulator holds ``n`` stage answers back (their requests made)."""
    deadline = time.monotonic() + 30
    while srv.frontend.held < n:
        assert time.monotonic() < deadline, "no stage answer held back"
        await asyncio.sleep(0.01)  # polling the emulator, with a deadline


async def _stopped_with_a_post_on_its_way(
    dcache: Factory, http: aiohttp.ClientSession,
) -> tuple[DCacheServer, list[str], Stager, list[StageRequest]]:
    """A stager of 3 tape files stopped (its task cancelled) once the frontend has made its
    request and holds the answer back: (server, paths, stager, requests ``on_request`` heard)."""
    srv = await dcache(mount_seconds=30)
    paths = [f"/pnfs/h/f{i}" for i in range(3)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    heard: list[StageRequest] = []
    stager = Stager(TapeClient(http, policy=NO_WAIT), srv.tape_api_url, QUICK,
                    on_request=heard.append)
    srv.frontend.hold_stage_answers()
    running = asyncio.ensure_future(_all(stager, paths))
    await _held(srv)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    return srv, paths, stager, heard


async def test_a_stop_while_the_stage_post_is_on_its_way_still_hears_the_request_made(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """The stager stopped (its task cancelled) after the frontend made a request and before
    it answered: the POST is not abandoned. ``settle`` waits for the answer and tells
    ``on_request`` of the request, the one the server holds (a stop used to drop it unheard:
    the next run asked again, pinning twice, and ``release`` could not free the first)."""
    srv, paths, stager, heard = await _stopped_with_a_post_on_its_way(dcache, http)
    assert heard == [] and stager.unanswered == 1
    settling = asyncio.ensure_future(stager.settle(30))
    srv.frontend.release_stage_answers()
    await asyncio.wait_for(settling, 30)
    [request] = heard
    assert set(srv.frontend.requests) == {request.id} and sorted(request.paths) == paths
    assert srv.core.stats.requests["frontend:stage"] == 1 and stager.unanswered == 0


async def test_a_stage_answer_that_does_not_come_within_the_grace_is_given_up_with_a_warning(
    dcache: Factory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped stager whose POST is still unanswered when ``settle``'s time is up: it
    returns then (not after the client's request timeout), the POST cancelled, and one WARNING
    says a request may have been made for the files, which the next run may ask for again."""
    srv, _, stager, heard = await _stopped_with_a_post_on_its_way(dcache, http)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="prestaged.storage.staging"):
        await asyncio.wait_for(stager.settle(0.3), 30)
    assert 0.3 <= time.monotonic() - started < 5
    assert heard == [] and stager.unanswered == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"a stage request to {srv.tape_api_url} may have been made for "
                              "3 files") and "the next run may ask for them again" in warning
