"""The Tape REST client (prestaged.storage.tape) against the dCache emulator, which is itself
held to gfal2 (tests/test_dcache_emulator.py): discovery on the frontend's own port, locality in
bulk matched by path, stage batches within dCache's 500-target limit (413 halves them), 429
waited out, polls of both state forms, cancel and release of pins."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Callable

import aiohttp
import pytest
from mocks import aioresponses as mocked

from prestaged.errors import CredentialError
from prestaged.retry import RetryPolicy
from prestaged.storage.tape import (
    ARCHIVEINFO_BATCH,
    Locality,
    StageRequest,
    StageState,
    StageUncertain,
    TapeBusy,
    TapeClient,
    TapeRestError,
    TapeTransient,
)
from prestaged.testing.dcache import DCacheServer
from prestaged.testing.dcache import Locality as Where

Factory = Callable[..., Awaitable[DCacheServer]]
NO_WAIT = RetryPolicy(attempts=5, initial=0.0, max=0.0, jitter=0.0, total=60.0)


async def test_discovery_finds_the_frontend_on_its_own_port(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """The door's well-known document names the frontend (another port than the door)."""
    srv = await dcache()
    door = srv.door_url("")
    uri = await TapeClient(http).discover(door)
    assert uri == srv.tape_api_url and not uri.startswith(door)


async def test_locality_in_bulk_is_matched_by_path(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """archiveinfo of disk, tape, both, lost and unknown paths, more than one batch: every answer
    by path, the unknown one as an error, and no request above the batch size."""
    srv = await dcache()
    kinds = [Where.DISK, Where.TAPE, Where.DISK_AND_TAPE, Where.LOST]
    paths = [f"/pnfs/t/f{i:05d}" for i in range(ARCHIVEINFO_BATCH + 10)]
    for i, p in enumerate(paths):
        srv.core.add_file(p, 10, kinds[i % 4])
    client = TapeClient(http)
    got = await client.archiveinfo(srv.tape_api_url, [*paths, "/pnfs/t/none"])
    assert [got[p].locality for p in paths[:4]] == [
        Locality.TAPE if k is Where.TAPE else
        Locality.DISK if k is Where.DISK else
        Locality.DISK_AND_TAPE if k is Where.DISK_AND_TAPE else Locality.UNAVAILABLE
        for k in kinds]
    assert got["/pnfs/t/none"].locality is None and got["/pnfs/t/none"].error
    assert len(got) == len(paths) + 1
    assert srv.core.stats.max_paths <= ARCHIVEINFO_BATCH
    assert got[paths[1]].locality is not None and not got[paths[1]].locality.on_disk


async def test_stage_batches_poll_to_completion_and_release_the_pins(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """Stage 450 tape files with stage_batch 200: three requests (none above 500 paths), every
    file COMPLETED on disk and pinned; release drops the pins of one request."""
    srv = await dcache(drives=2)
    paths = [f"/pnfs/s/f{i:04d}" for i in range(450)]
    for i, p in enumerate(paths):
        srv.core.add_file(p, 10, Where.TAPE, tape=f"T{i % 3}")
    client = TapeClient(http, stage_batch=200, policy=NO_WAIT)
    requests = await client.stage(srv.tape_api_url, paths, lifetime=3600)
    assert [len(r.paths) for r in requests] == [200, 200, 50]
    assert srv.core.stats.max_paths == 200

    async def all_done() -> bool:
        states = [await client.poll(srv.tape_api_url, r.id) for r in requests]
        return all(f.state is StageState.COMPLETED for s in states for f in s.files.values())

    deadline = asyncio.get_running_loop().time() + 30
    while not await all_done():
        assert asyncio.get_running_loop().time() < deadline, "staging did not complete"
        await srv.core.wait_until(lambda: True, timeout=0.2)
    assert all(srv.core.files[p].on_disk for p in paths)
    first = requests[0]
    assert all(srv.core.files[p].pins for p in first.paths)
    await client.release(srv.tape_api_url, first.id, first.paths)
    assert not any(srv.core.files[p].pins.get(first.id) for p in first.paths)


async def test_413_halves_the_batch_and_sends_again(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A frontend whose target limit is below our batch answers 413: the batch is halved until
    it fits, and every path is staged once."""
    srv = await dcache(max_targets=60)
    paths = [f"/pnfs/h/f{i:03d}" for i in range(200)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    requests = await TapeClient(http, stage_batch=200, policy=NO_WAIT).stage(
        srv.tape_api_url, paths, lifetime=600)
    staged = [p for r in requests for p in r.paths]
    assert sorted(staged) == paths and all(len(r.paths) <= 60 for r in requests)
    assert srv.core.stats.requests["frontend:stage"] >= len(requests) + 1  # the 413s too


async def test_429_is_back_pressure_not_a_failure(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """With one unfinished request allowed, a second stage request gets 429 and is sent again
    once the first finished; a server that keeps saying 429 exhausts the policy with one line."""
    srv = await dcache(max_requests=1, mount_seconds=0.3)
    for p in ("/pnfs/b/a", "/pnfs/b/b"):
        srv.core.add_file(p, 10, Where.TAPE)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        # Back-pressure ends when the first request finished (its file is on disk).
        await srv.core.wait_until(lambda: srv.core.files["/pnfs/b/a"].on_disk, timeout=10)

    policy = RetryPolicy(attempts=10, initial=0.01, max=0.05, jitter=0.0, total=30.0)
    client = TapeClient(http, policy=policy, sleep=sleep)
    await client.stage(srv.tape_api_url, ["/pnfs/b/a"], lifetime=60)
    [second] = await client.stage(srv.tape_api_url, ["/pnfs/b/b"], lifetime=60)
    assert waits and second.paths == ("/pnfs/b/b",)
    with mocked() as m:
        for _ in range(3):
            m.post("https://t/api/v1/tape/stage", status=429, body="{}")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TapeRestError, match="gave up after 3 tries: 429"):
                await TapeClient(session, policy=RetryPolicy(
                    attempts=3, initial=0.0, max=0.0, jitter=0.0)).stage(
                    "https://t/api/v1/tape", ["/p"], lifetime=60)


async def test_a_stage_post_that_may_have_reached_the_server_is_not_sent_again(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A stage POST whose connection drops after the frontend made the request, or that gets
    dCache's bare 400 (its bulk service did not answer in time, yet may have acted), was sent
    again: a second request, its twin's pins never recorded nor released. It is
    StageUncertain, sent once."""
    srv = await dcache(mount_seconds=60)
    srv.core.add_file("/pnfs/u/a", 10, Where.TAPE)
    client = TapeClient(http, policy=NO_WAIT)
    for kind in ("drop", "400"):
        srv.faults.add("stage", kind, after=True)
        with pytest.raises(StageUncertain):
            await client.stage(srv.tape_api_url, ["/pnfs/u/a"], lifetime=60)
    assert srv.core.stats.requests["frontend:stage"] == 2 and len(srv.frontend.requests) == 2


async def test_a_413_split_reports_each_request_at_once_and_the_limit_is_kept(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """A stage of 200 paths against a 60-target frontend: 413 twice, then 50 accepted, then the
    next POST fails: the accepted request was dropped with the error. on_made hears it at once;
    the limit learned (50) holds for the next stage on that endpoint (no new 413), and
    ``most`` makes no more requests than asked."""
    srv = await dcache(max_targets=60, mount_seconds=60)
    paths = [f"/pnfs/h/f{i:03d}" for i in range(250)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    heard: list[str] = []
    made: list[StageRequest] = []
    client = TapeClient(http, stage_batch=200, policy=NO_WAIT, on_stage=heard.append)
    srv.faults.add("stage", "500", skip=3)
    with pytest.raises(StageUncertain, match="500"):
        await client.stage(srv.tape_api_url, paths[:200], lifetime=60, on_made=made.append)
    assert [len(r.paths) for r in made] == [50] and made[0].id in srv.frontend.requests
    assert client.batch_for(srv.tape_api_url) == 50
    [one] = await client.stage(srv.tape_api_url, paths[50:], lifetime=60, most=1)
    assert one.paths == tuple(paths[50:100])
    assert heard == ["too_large", "too_large", "accepted", "refused", "accepted"]


async def test_retry_after_zero_waits_a_second_and_polls_raise_passing_failures(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """Retry-After: 0 (dCache in a block's last second) is waited 1 s, not 0; an impatient
    poll raises each passing failure (500, a proxy's 502, the bulk service's bare 400, a
    dropped connection, 429) as TapeTransient (TapeBusy for 429); a patient one rides them
    out."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    with mocked() as m:
        m.post("https://t/api/v1/tape/stage", status=429, headers={"Retry-After": "0"},
               body="{}")
        m.post("https://t/api/v1/tape/stage", status=201, body=json.dumps({"requestId": "r"}))
        async with aiohttp.ClientSession() as session:
            await TapeClient(session, policy=NO_WAIT, sleep=sleep).stage(
                "https://t/api/v1/tape", ["/p"], lifetime=60)
    assert waits == [1.0]
    srv = await dcache()
    srv.core.add_file("/pnfs/p/a", 10, Where.TAPE)
    client = TapeClient(http, policy=NO_WAIT, sleep=sleep)
    [req] = await client.stage(srv.tape_api_url, ["/pnfs/p/a"], lifetime=60)
    for kind in ("500", "502", "400"):
        srv.faults.add("poll", kind)
        with pytest.raises(TapeTransient) as raised:
            await client.poll(srv.tape_api_url, req.id, patient=False)
        assert not isinstance(raised.value, TapeBusy)
    srv.faults.add("poll", "500", count=2)
    assert (await client.poll(srv.tape_api_url, req.id)).found
    with mocked() as m:
        m.get("https://t/api/v1/tape/stage/r", exception=aiohttp.ServerDisconnectedError())
        m.get("https://t/api/v1/tape/stage/r", status=429, body="{}")
        async with aiohttp.ClientSession() as session:
            impatient = TapeClient(session, policy=NO_WAIT)
            with pytest.raises(TapeTransient, match="disconnected"):
                await impatient.poll("https://t/api/v1/tape", "r", patient=False)
            with pytest.raises(TapeBusy):
                await impatient.poll("https://t/api/v1/tape", "r", patient=False)


async def test_poll_reads_both_state_forms_and_a_forgotten_request() -> None:
    """``state`` (dCache) with CANCELED (gfal2's spelling) and the spec's ``onDisk`` form, files
    in any order and a partial list; a 404 is a request the server forgot."""
    files = [{"path": "/b", "onDisk": True}, {"path": "/a", "state": "CANCELED"},
             {"path": "/c", "onDisk": False, "error": "tape lost"},
             {"path": "/d", "state": "STARTED"}]
    with mocked() as m:
        m.get("https://t/api/v1/tape/stage/r1", status=200, body=json.dumps({"files": files}))
        m.get("https://t/api/v1/tape/stage/r2", status=404, body="{}")
        async with aiohttp.ClientSession() as session:
            client = TapeClient(session, policy=NO_WAIT)
            status = await client.poll("https://t/api/v1/tape", "r1")
            gone = await client.poll("https://t/api/v1/tape", "r2")
    assert {p: f.state for p, f in status.files.items()} == {
        "/a": StageState.CANCELLED, "/b": StageState.COMPLETED, "/c": StageState.FAILED,
        "/d": StageState.STARTED}
    assert status.files["/c"].error == "tape lost" and not gone.found


async def test_refusals_name_the_right_and_problems_their_detail() -> None:
    """403 is a CredentialError naming storage.stage; another 4xx a TapeRestError with the
    RFC 7807 detail; a discovery document without a v1 https endpoint is refused."""
    with mocked() as m:
        m.post("https://t/api/v1/tape/stage", status=403,
               body=json.dumps({"title": "Forbidden", "status": "403", "detail": "no stage"}))
        m.post("https://t/api/v1/tape/archiveinfo", status=400,
               body=json.dumps({"title": "Bad Request", "status": "400",
                                "detail": "paths missing"}))
        m.get("https://door/.well-known/wlcg-tape-rest-api", status=200,
              body=json.dumps({"endpoints": [{"uri": "http://fe/api/v0", "version": "v0"}]}))
        async with aiohttp.ClientSession() as session:
            client = TapeClient(session, policy=NO_WAIT)
            with pytest.raises(CredentialError, match=r"storage\.stage"):
                await client.stage("https://t/api/v1/tape", ["/p"], lifetime=60)
            with pytest.raises(TapeRestError, match="400 paths missing"):
                await client.archiveinfo("https://t/api/v1/tape", ["/p"])
            with pytest.raises(TapeRestError, match="no https v1 endpoint"):
                await client.discover("https://door")


async def test_cancel_stops_what_is_not_on_disk_yet(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """Cancel of a request whose tape is still mounting: its file ends CANCELLED, not recalled."""
    srv = await dcache(mount_seconds=5)
    srv.core.add_file("/pnfs/c/a", 10, Where.TAPE)
    client = TapeClient(http, policy=NO_WAIT)
    [req] = await client.stage(srv.tape_api_url, ["/pnfs/c/a"], lifetime=60)
    await client.cancel(srv.tape_api_url, req.id, req.paths)
    status = await client.poll(srv.tape_api_url, req.id)
    assert status.files["/pnfs/c/a"].state is StageState.CANCELLED


async def test_cancel_and_release_of_no_paths_send_nothing(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """dCache cancels a whole request for an empty path list (BulkService): cancel and release
    of no paths send no request, and the request's files go on staging."""
    srv = await dcache(mount_seconds=0.2)
    srv.core.add_file("/pnfs/c/a", 10, Where.TAPE)
    client = TapeClient(http, policy=NO_WAIT)
    [req] = await client.stage(srv.tape_api_url, ["/pnfs/c/a"], lifetime=60)
    calls = len(srv.core.stats.frontend_calls)
    await client.cancel(srv.tape_api_url, req.id, [])
    await client.release(srv.tape_api_url, req.id, [])
    assert len(srv.core.stats.frontend_calls) == calls
    await srv.core.wait_until(lambda: srv.frontend.requests[req.id].finished)
    status = await client.poll(srv.tape_api_url, req.id)
    assert status.files["/pnfs/c/a"].state is StageState.COMPLETED


async def test_on_stage_hears_every_stage_post_by_result(
    dcache: Factory, http: aiohttp.ClientSession
) -> None:
    """Against a frontend allowing one open request of at most 60 targets: accepted, throttled
    (429 while a request is open), too_large (413, batch halved), each POST reported once, in
    order, as many as the emulator saw."""
    srv = await dcache(max_targets=60, max_requests=1, mount_seconds=60)  # nothing ends alone
    srv.core.add_file("/pnfs/o/first", 10, Where.TAPE)
    paths = [f"/pnfs/o/f{i:03d}" for i in range(100)]
    for p in paths:
        srv.core.add_file(p, 10, Where.TAPE)
    heard: list[str] = []
    operator = TapeClient(http, policy=NO_WAIT)

    async def sleep(seconds: float) -> None:
        # Back-pressure lifts when the open requests end: an operator cancels them here.
        for request_id, request in list(srv.frontend.requests.items()):
            await operator.cancel(srv.tape_api_url, request_id, list(request.files))

    client = TapeClient(http, stage_batch=100, policy=NO_WAIT, sleep=sleep,
                        on_stage=heard.append)
    await client.stage(srv.tape_api_url, ["/pnfs/o/first"], lifetime=60)
    requests = await client.stage(srv.tape_api_url, paths, lifetime=60)
    assert [len(r.paths) for r in requests] == [50, 50]
    assert heard == ["accepted", "throttled", "too_large", "accepted", "throttled", "accepted"]
    assert len(heard) == srv.core.stats.requests["frontend:stage"]


async def test_on_stage_counts_503_as_throttled_and_other_failures_as_refused() -> None:
    """A 503 is throttled and sent again, and so is a connection that could not be made; a 400,
    a 403 and a connection dropped once the request was sent are refused (the last is not sent
    again: it may have made a request); polls, locality and releases are never reported as
    stage requests."""
    uri = "https://t/api/v1/tape"
    with mocked() as m:
        m.post(f"{uri}/stage", status=503, body="{}")
        m.post(f"{uri}/stage", exception=aiohttp.ConnectionTimeoutError())
        m.post(f"{uri}/stage", status=201, body=json.dumps({"requestId": "r1"}))
        m.post(f"{uri}/stage", status=400, body=json.dumps({"detail": "bad path"}))
        m.post(f"{uri}/stage", status=403, body=json.dumps({"detail": "no stage"}))
        m.post(f"{uri}/stage", exception=aiohttp.ServerDisconnectedError())
        m.post(f"{uri}/stage", status=201, body=json.dumps({"requestId": "never"}))
        m.get(f"{uri}/stage/r1", status=200, body=json.dumps({"files": []}))
        m.post(f"{uri}/archiveinfo", status=200, body="[]")
        m.post(f"{uri}/release/r1", status=200, body="")
        heard: list[str] = []
        async with aiohttp.ClientSession() as session:
            client = TapeClient(session, policy=NO_WAIT, on_stage=heard.append)
            [req] = await client.stage(uri, ["/p"], lifetime=60)
            await client.poll(uri, req.id)
            await client.archiveinfo(uri, ["/p"])
            await client.release(uri, req.id, ["/p"])
            with pytest.raises(TapeRestError, match="400 bad path"):
                await client.stage(uri, ["/p"], lifetime=60)
            with pytest.raises(CredentialError):
                await client.stage(uri, ["/p"], lifetime=60)
            with pytest.raises(StageUncertain, match="Server disconnected"):
                await client.stage(uri, ["/p"], lifetime=60)
    assert heard == ["throttled", "refused", "accepted", "refused", "refused", "refused"]


async def test_hostile_frontend_answers_are_errors_never_tracebacks_nor_redirects_followed(
) -> None:
    """From the hostile-server review: a redirect (to plain http, another origin, file://, or
    a loop) was followed (a stage re-POSTed over http) or escaped as a traceback; a discovery
    uri with a user in it beside our token was a traceback; JSON nested 100,000 deep was a
    RecursionError. Each is now a TapeRestError naming it, and no redirect is followed."""
    uri = "https://t/api/v1/tape"
    with mocked() as m:
        m.post(f"{uri}/stage", status=307, headers={"Location": "http://t:8080/api/v1/tape/stage"})
        m.get("https://door/.well-known/wlcg-tape-rest-api", status=302,
              headers={"Location": "file:///etc/passwd"})
        m.get("https://door2/.well-known/wlcg-tape-rest-api", status=200, body=json.dumps(
            {"endpoints": [{"uri": "https://u:pw@door2:3880/api/v1/tape", "version": "v1"}]}))
        m.post(f"{uri}/archiveinfo", status=200, body="[" * 100_000)
        async with aiohttp.ClientSession() as session:
            client = TapeClient(session, policy=NO_WAIT)
            with pytest.raises(TapeRestError, match=r"redirected \(307\) to "
                                                    r"http://t:8080/api/v1/tape/stage: not "
                                                    "followed"):
                await client.stage(uri, ["/p"], lifetime=60)
            with pytest.raises(TapeRestError, match=r"redirected \(302\) to file:///etc/passwd"):
                await client.discover("https://door")
            with pytest.raises(TapeRestError, match="v1 uri has a user, a query or a fragment: "
                                                    r"https://\*\*\*@door2"):
                await client.discover("https://door2")
            with pytest.raises(TapeRestError, match="the answer is not JSON"):
                await client.archiveinfo(uri, ["/p"])
        sent = [(method, str(url)) for method, url in m.requests]
    assert ("POST", "http://t:8080/api/v1/tape/stage") not in sent
    assert not [u for _, u in sent if u.startswith("file:")]


async def test_a_path_answered_twice_keeps_the_answer_that_avoids_the_door() -> None:
    """archiveinfo listing a path twice, TAPE then DISK: the last won, and a file the storage
    also called tape-only was range-read at the door. The answer that is not on disk wins,
    in either order (of two on-disk answers the later stands)."""
    uri = "https://t/api/v1/tape"
    answer = [{"path": "/a", "locality": "TAPE"}, {"path": "/a", "locality": "DISK"},
              {"path": "/b", "locality": "DISK"}, {"path": "/b", "locality": "NONE"},
              {"path": "/c", "locality": "DISK"}, {"path": "/c", "locality": "DISK_AND_TAPE"}]
    with mocked() as m:
        m.post(f"{uri}/archiveinfo", status=200, body=json.dumps(answer))
        async with aiohttp.ClientSession() as session:
            got = await TapeClient(session, policy=NO_WAIT).archiveinfo(uri, ["/a", "/b", "/c"])
    assert {p: f.locality for p, f in got.items()} == {
        "/a": Locality.TAPE, "/b": Locality.NONE, "/c": Locality.DISK_AND_TAPE}


async def test_a_request_id_is_one_path_segment() -> None:
    """A server-chosen request id ``../x?y`` moved the poll (and the release, with our token)
    to another path of the frontend; it is sent percent-encoded as one segment."""
    uri = "https://t/api/v1/tape"
    with mocked() as m:
        m.get(f"{uri}/stage/..%2Fx%3Fy", status=200, body=json.dumps({"files": []}))
        async with aiohttp.ClientSession() as session:
            status = await TapeClient(session, policy=NO_WAIT).poll(uri, "../x?y")
        assert status.found
        [(_, url)] = list(m.requests)
    assert url.raw_path == "/api/v1/tape/stage/..%2Fx%3Fy"
