"""The dCache emulator (prestaged.testing.dcache), driven by the real grid client (gfal2 2.21)
and by aiohttp, over TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from conftest import peer_missing

from prestaged.testing.dcache import (
    DOOR_TIMEOUT_MESSAGE,
    PNFS_TIMEOUT,
    DCacheConfig,
    DCacheServer,
    Locality,
)
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import BearerCheck, TokenIssuer

PROBE = Path(__file__).with_name("gfal2_probe.py")
SYSTEM_PYTHON = "/usr/bin/python3"
TWO_DAYS = 2 * 24 * 3600
Factory = Callable[..., Awaitable[DCacheServer]]


@pytest.fixture
def gfal2(pki: TestPKI, proxy: Path) -> Callable[..., Awaitable[dict[str, Any]]]:
    """Run tests/gfal2_probe.py under Debian's python3 with the test proxy (or, given
    ``token=``, a bearer token instead); returns its JSON."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gfal2"], capture_output=True,
                           check=False) if shutil.which(SYSTEM_PYTHON) else None
    if probe is None or probe.returncode != 0:
        peer_missing("gfal2 not importable: install Debian packages python3-gfal2 gfal2-plugin-http")
    env = dict(os.environ, X509_USER_PROXY=str(proxy), X509_CERT_DIR=str(pki.ca_dir))

    async def run(*args: str, token: str | None = None) -> dict[str, Any]:
        """``token``: gfal2 gets it as BEARER_TOKEN and no proxy at all."""
        run_env = dict(env)
        if token is not None:
            del run_env["X509_USER_PROXY"]
            run_env["BEARER_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, str(PROBE), *args, env=run_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(out)
        return result

    return run


# --- the real client: gfal2 ------------------------------------------------------------------


async def test_gfal2_status_maps_archiveinfo_localities(dcache: Factory, gfal2: Any) -> None:
    """gfal2's user.status, over both davs:// and https://, reads each locality the emulator
    answers through discovery and POST /archiveinfo/; UNAVAILABLE is gfal2's EAGAIN error."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/tape", 10, Locality.TAPE)
    srv.core.add_file("/pnfs/t/both", 10, Locality.DISK_AND_TAPE)
    srv.core.add_file("/pnfs/t/disk", 10, Locality.DISK)
    srv.core.add_file("/pnfs/t/lost", 10, Locality.LOST)
    want = {"tape": "NEARLINE", "both": "ONLINE_AND_NEARLINE", "disk": "ONLINE"}
    for name, status in want.items():
        for scheme in ("davs", "https"):
            url = srv.door_url(f"/pnfs/t/{name}").replace("https", scheme, 1)
            assert await gfal2("status", url) == {"status": status}
    lost = await gfal2("status", srv.door_url("/pnfs/t/lost"))
    assert "UNAVAILABLE" in lost["error"] and lost["code"] == 11  # EAGAIN
    assert srv.core.stats.requests["door:discovery"] == 7  # one per gfal2 context
    assert "POST /api/v1/tape/archiveinfo/" in srv.core.stats.frontend_calls


async def test_gfal2_bring_online_poll_and_release(dcache: Factory, gfal2: Any) -> None:
    """gfal2 stages through POST /stage/, polls pending then done, and releases the pin; it
    sends no diskLifetime (2.21 drops pintime), so dCache's 2-day default pin applies."""
    srv = await dcache(mount_seconds=3.0)
    replica = srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url = srv.door_url("/pnfs/t/a")
    staged = await gfal2("bring_online", "3600", "60", url)
    token = staged["token"]
    assert staged["errors"] == [None] and token in srv.frontend.requests
    assert "POST /api/v1/tape/stage/" in srv.core.stats.frontend_calls
    assert await gfal2("poll", token, url) == {"result": 0}  # the mount takes 3 s
    await srv.core.wait_until(lambda: bool(replica.pins))
    assert await gfal2("poll", token, url) == {"result": 1}
    assert replica.on_disk and srv.core.stats.mounts == 1
    assert replica.pins[token] - time.time() == pytest.approx(TWO_DAYS, abs=60)
    assert await gfal2("release", token, url) == {"errors": [None]}
    assert replica.pins == {} and f"POST /api/v1/tape/release/{token}" in \
        srv.core.stats.frontend_calls


async def test_gfal2_sees_stage_failures_and_archive_poll(dcache: Factory, gfal2: Any) -> None:
    """A disk-only file fails to stage with dCache's message as gfal2 reports it; archive_poll
    says which files are on tape and which path is unknown."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/disk", 10, Locality.DISK)
    srv.core.add_file("/pnfs/t/tape", 10, Locality.TAPE)
    disk = srv.door_url("/pnfs/t/disk")
    token = (await gfal2("bring_online", "60", "60", disk))["token"]
    req = srv.frontend.requests[token]
    await srv.core.wait_until(lambda: req.finished)
    polled = await gfal2("poll", token, disk)
    assert "Cannot stage DISK only files" in polled["error"]
    answers = (await gfal2("archive_poll", srv.door_url("/pnfs/t/tape"), disk,
                           srv.door_url("/pnfs/t/none")))["errors"]
    assert answers[0] is None
    assert "not yet archived" in answers[1] and "No such file" in answers[2]


# --- the real client with a WLCG token ---------------------------------------------------------


@pytest.fixture
def tokens() -> tuple[TokenIssuer, BearerCheck]:
    """An issuer and the check the emulator makes: audience 127.0.0.1, scopes under /pnfs."""
    issuer = TokenIssuer()
    return issuer, BearerCheck(issuer, ["https://127.0.0.1"], "/pnfs")


async def test_gfal2_token_alone_reads_status_stages_polls_and_releases(
        dcache: Factory, gfal2: Any, tokens: tuple[TokenIssuer, BearerCheck]) -> None:
    """gfal2 with BEARER_TOKEN and no proxy sends the token to door and frontend: with
    storage.stage it reads user.status, stages, polls and releases, as the token's subject."""
    issuer, check = tokens
    srv = await dcache(bearer=check)
    replica = srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url, token = srv.door_url("/pnfs/t/a"), issuer.mint("storage.stage:/t")
    assert await gfal2("status", url, token=token) == {"status": "NEARLINE"}
    staged = await gfal2("bring_online", "3600", "60", url, token=token)
    assert staged["errors"] == [None]
    req = srv.frontend.requests[staged["token"]]
    assert req.user == "token:prestaged-test-user"
    await srv.core.wait_until(lambda: req.finished)
    assert await gfal2("poll", staged["token"], url, token=token) == {"result": 1}
    assert await gfal2("release", staged["token"], url, token=token) == {"errors": [None]}
    assert replica.on_disk and replica.pins == {}
    stats = srv.core.stats
    assert stats.token_requests["frontend"] == 4  # archiveinfo, stage, poll, release
    assert stats.token_requests["door"] >= 4 and stats.auth_refusals == {}
    assert token not in json.dumps(stats.to_dict()) + repr(srv.frontend.requests)


async def test_gfal2_read_only_token_cannot_stage(
        dcache: Factory, gfal2: Any, tokens: tuple[TokenIssuer, BearerCheck]) -> None:
    """With storage.read only, dCache takes gfal2's stage request and fails the tape-only file
    (storage.read never recalls): gfal2's poll reports PoolManager's message; nothing mounts."""
    issuer, check = tokens
    srv = await dcache(bearer=check)
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url, token = srv.door_url("/pnfs/t/a"), issuer.mint("storage.read:/t")
    staged = await gfal2("bring_online", "3600", "60", url, token=token)
    req = srv.frontend.requests[staged["token"]]
    await srv.core.wait_until(lambda: req.finished)
    polled = await gfal2("poll", staged["token"], url, token=token)
    assert "File not online. Staging not allowed." in polled["error"]
    assert srv.core.stats.mounts == 0


async def test_gfal2_sends_its_token_on_to_the_pool(
        dcache: Factory, gfal2: Any, tokens: tuple[TokenIssuer, BearerCheck]) -> None:
    """gfal2 2.21 (davix 0.8) keeps Authorization when it follows the door's redirect to the
    pool, another port (another host in a real dCache): the pool counts it and, going by the
    one-time UUID alone, serves. A careful client does not do this; the counter shows it."""
    issuer, check = tokens
    srv = await dcache(bearer=check)
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    url = srv.door_url("/pnfs/t/a")
    assert await gfal2("read", "4", url, token=issuer.mint("storage.read:/t")) == {"bytes": 4}
    assert srv.core.stats.requests["pool:get"] == 1
    assert srv.core.stats.pool_authorization == 1


async def test_gfal2_expired_token_is_refused_then_blocked(
        dcache: Factory, gfal2: Any, tokens: tuple[TokenIssuer, BearerCheck]) -> None:
    """An expired token: gfal2 gets 401 (EACCES) three times, then dCache 11.2 blocks the
    client and gfal2 sees 429 for any token, a good one included."""
    issuer, check = tokens
    srv = await dcache(bearer=check, clock=lambda: 0.0)  # frozen: the block never ends
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url, expired = srv.door_url("/pnfs/t/a"), issuer.mint("storage.stage:/t", lifetime=-5)
    for _ in range(3):
        refused = await gfal2("status", url, token=expired)
        assert refused["code"] == 13 and "401" in refused["error"]
    blocked = await gfal2("status", url, token=issuer.mint("storage.stage:/t"))
    assert "429" in blocked["error"]
    assert srv.core.stats.auth_refusals == {"door:401": 3}
    assert srv.core.stats.blocked == {"door": 1}
    assert check.refusals == {"token expired": 3}


async def test_gfal2_is_refused_with_429_over_dcache_11_2_request_rate(
        dcache: Factory, gfal2: Any) -> None:
    """dCache 11.2's request rate per client (here 1 a second, the clock frozen): gfal2's first
    status call passes, the next gets 429 (the emulator's answer is one the real client reads
    as dCache's)."""
    srv = await dcache(rate_overall=4.0, clock=lambda: 0.0)
    srv.core.add_file("/pnfs/r/a", 10, Locality.DISK)
    url = srv.door_url("/pnfs/r/a")
    assert (await gfal2("status", url))["status"] == "ONLINE"
    throttled = await gfal2("status", url)
    assert "429" in throttled["error"], throttled
    assert srv.core.stats.throttled["door"] >= 1 and not srv.core.stats.blocked


async def test_request_rates_follow_guava_smooth_bursty_per_client_then_overall(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """rate_overall 8/s, 25 % a client (2/s): a new client's first request passes and the next
    at the same instant gets 429 (Retry-After 1-9 s, dCache's body); another client
    (X-Forwarded-For) has its own share once the overall ticket is due; half a second on, one
    more passes; idle time stores permits up to one second's worth; after the idle time the
    client's limiter starts afresh (none stored)."""
    now = [100.0]
    srv = await dcache(rate_overall=8.0, clock=lambda: now[0])
    srv.core.add_file("/pnfs/r/f", 10, Locality.DISK)

    async def status(client: str = "10.0.0.1") -> int:
        async with http.get(srv.door_url("/pnfs/r/f"), allow_redirects=False,
                            headers={"X-Forwarded-For": client}) as r:
            if r.status == 429:
                assert 1 <= int(r.headers["Retry-After"]) <= 9
                assert await r.text() == "Server is busy. Please try again later."
            return r.status

    assert [await status(), await status()] == [302, 429]
    now[0] += 0.2  # the overall limiter's next ticket (1/8 s) is due
    assert await status("10.0.0.2") == 302  # its own share
    now[0] += 0.3
    assert [await status(), await status()] == [302, 429]
    now[0] += 3.0  # stores min(2, 6) permits
    assert [await status() for _ in range(4)] == [302, 302, 302, 429]
    now[0] += 11.0  # idle longer than 10 s: a new limiter, nothing stored
    assert [await status(), await status()] == [302, 429]
    assert srv.core.stats.throttled["door"] == 4


# --- door and pool -----------------------------------------------------------------------------


async def test_door_redirects_to_one_time_pool_url(dcache: Factory,
                                                   http: aiohttp.ClientSession) -> None:
    """HEAD at the door starts no mover; GET answers 302 to the pool with a dcache-http-uuid;
    the pool serves the range once and sends a second use of the UUID back to the door (307)."""
    srv = await dcache()
    replica = srv.core.add_file("/pnfs/d/f", 1000, Locality.DISK)
    async with http.head(srv.door_url("/pnfs/d/f"), allow_redirects=False) as head:
        assert head.status == 200 and head.headers["Content-Length"] == "1000"
    assert replica.atime == 0.0 and srv.core.stats.movers_started == 0
    async with http.get(srv.door_url("/pnfs/d/f"), allow_redirects=False) as door:
        assert door.status == 302
        pool_url = door.headers["Location"]
    assert "?dcache-http-uuid=" in pool_url and not pool_url.startswith(srv.door_url("/"))
    headers = {"Range": "bytes=0-3", "Connection": "close"}
    async with http.get(pool_url, headers=headers, allow_redirects=False) as pool:
        assert pool.status == 206 and len(await pool.read()) == 4
        assert pool.headers["Content-Range"] == "bytes 0-3/1000"
    async with http.get(pool_url, headers=headers, allow_redirects=False) as again:
        assert again.status == 307 and again.headers["Location"] == srv.door_url("/pnfs/d/f")


async def test_mover_lives_while_the_pool_connection_is_open(
        dcache: Factory, pki: TestPKI, proxy: Path, http: aiohttp.ClientSession) -> None:
    """A ranged read sets the replica's atime and keeps its mover until the client closes the
    connection; Connection: close ends it with the response."""
    srv = await dcache()
    replica = srv.core.add_file("/pnfs/d/f", 1000, Locality.DISK_AND_TAPE, atime=1.0)
    before = time.time()
    keep = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=pki.client_ssl_context(proxy)))
    async with keep.get(srv.door_url("/pnfs/d/f"), headers={"Range": "bytes=0-3"}) as r:
        assert r.status == 206 and len(await r.read()) == 4
    assert replica.atime >= before and srv.core.stats.open_movers == 1
    await keep.close()
    await srv.core.wait_until(lambda: srv.core.stats.open_movers == 0)
    async with http.get(srv.door_url("/pnfs/d/f"),
                        headers={"Range": "bytes=0-3", "Connection": "close"}) as r:
        assert r.status == 206
        assert srv.core.stats.open_movers == 0
    assert srv.core.stats.movers_started == 2


async def test_door_blocks_on_tape_only_file_then_500_and_recall_goes_on(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """A door GET of a NEARLINE file holds the request for door_timeout, answers dCache's 500,
    and the recall it started completes afterwards (a later GET is redirected)."""
    srv = await dcache(door_timeout=0.3, mount_seconds=0.8)
    replica = srv.core.add_file("/pnfs/t/f", 100, Locality.TAPE)
    began = time.monotonic()
    async with http.get(srv.door_url("/pnfs/t/f"), allow_redirects=False) as r:
        assert r.status == 500 and DOOR_TIMEOUT_MESSAGE in await r.text()
    assert time.monotonic() - began >= 0.3
    stats = srv.core.stats
    assert stats.door_tape_gets == 1 and stats.door_blocked_seconds >= 0.3
    assert not replica.on_disk
    await srv.core.wait_until(lambda: replica.on_disk)
    async with http.get(srv.door_url("/pnfs/t/f"), allow_redirects=False) as r:
        assert r.status == 302
    assert stats.mounts == 1 and stats.recalled == 1


async def test_door_and_frontend_require_a_client_certificate(dcache: Factory,
                                                              pki: TestPKI) -> None:
    """Without a client certificate neither the door nor the frontend answers."""
    srv = await dcache()
    ctx = ssl.create_default_context(capath=str(pki.ca_dir))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as anon:
        for url in (srv.door_url("/x"), srv.tape_api_url + "/stage/x"):
            with pytest.raises(aiohttp.ClientError):
                async with anon.get(url) as r:
                    await r.read()


# --- the frontend -----------------------------------------------------------------------------


async def _stage(http: aiohttp.ClientSession, srv: DCacheServer, paths: list[str],
                 **extra: Any) -> aiohttp.ClientResponse:
    body = {"files": [{"path": p, **extra} for p in paths]}
    async with http.post(srv.tape_api_url + "/stage", json=body) as r:
        await r.read()
        return r


async def _finished(srv: DCacheServer, rid: str) -> None:
    """Wait until every file of stage request ``rid`` is in a final state."""
    req = srv.frontend.requests[rid]
    await srv.core.wait_until(lambda: req.finished)


async def test_discovery_points_at_the_frontend_on_its_own_port(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """/.well-known/wlcg-tape-rest-api on the door gives a v1 uri on another port."""
    srv = await dcache()
    async with http.get(srv.door_url("/.well-known/wlcg-tape-rest-api")) as r:
        doc = await r.json()
    (endpoint,) = doc["endpoints"]
    assert endpoint["version"] == "v1" and endpoint["uri"] == srv.tape_api_url
    assert not endpoint["uri"].startswith(srv.door_url(""))


async def test_stage_lifecycle_states_pins_and_errors(dcache: Factory,
                                                      http: aiohttp.ClientSession) -> None:
    """201 + Location + requestId; per-file COMPLETED (pinned for diskLifetime) or FAILED with
    dCache's reasons; ms timestamps; cancel of a foreign path is 400; DELETE then 404."""
    srv = await dcache()
    tape = srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    srv.core.add_file("/pnfs/t/d", 10, Locality.DISK)
    r = await _stage(http, srv, ["/pnfs/t/a", "/pnfs/t/d", "/pnfs/t/x"], diskLifetime="PT1H")
    assert r.status == 201
    rid = (await r.json())["requestId"]
    assert r.headers["Location"] == f"{srv.tape_api_url}/stage/{rid}"
    await _finished(srv, rid)
    async with http.get(r.headers["Location"]) as poll:
        doc = await poll.json()
    files = {f["path"]: f for f in doc["files"]}
    assert files["/pnfs/t/a"]["state"] == "COMPLETED"
    assert files["/pnfs/t/d"] == {**files["/pnfs/t/d"], "state": "FAILED",
                                  "error": "Cannot stage DISK only files"}
    assert files["/pnfs/t/x"]["state"] == "FAILED"
    assert doc["completedAt"] >= doc["createdAt"] > time.time() * 1000 - 60_000
    assert tape.pins[rid] - time.time() == pytest.approx(3600, abs=60)
    async with http.post(f"{srv.tape_api_url}/stage/{rid}/cancel",
                         json={"paths": ["/other"]}) as c:
        assert c.status == 400 and await c.read() == b""
    async with http.delete(f"{srv.tape_api_url}/stage/{rid}") as d:
        assert d.status == 200
    async with http.get(f"{srv.tape_api_url}/stage/{rid}") as gone:
        problem = await gone.json()
        assert gone.status == 404 and problem["status"] == "404"


async def test_release_answers_200_and_aborts_the_pin_of_a_target_still_staging(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """As dCache (a fire-and-forget RELEASE bulk request): a release answers 200 even for a
    request id nobody made; releasing a target still being recalled makes it fail "Operation
    was aborted" once the recall ends, with no pin set (the file is on disk, unpinned); a
    target that landed in the same request loses its pin."""
    srv = await dcache(mount_seconds=1.0)
    slow = srv.core.add_file("/pnfs/t/slow", 10, Locality.TAPE)
    cached = srv.core.add_file("/pnfs/t/cached", 10, Locality.DISK_AND_TAPE)
    async with http.post(f"{srv.tape_api_url}/release/no-such-request",
                         json={"paths": ["/pnfs/t/slow"]}) as r:
        assert r.status == 200
    rid = (await (await _stage(http, srv, ["/pnfs/t/slow", "/pnfs/t/cached"])).json())[
        "requestId"]
    await srv.core.wait_until(lambda: bool(cached.pins))  # on disk: pinned at once
    async with http.post(f"{srv.tape_api_url}/release/{rid}",
                         json={"paths": ["/pnfs/t/slow", "/pnfs/t/cached"]}) as r:
        assert r.status == 200
    assert cached.pins == {}
    await _finished(srv, rid)
    async with http.get(f"{srv.tape_api_url}/stage/{rid}") as poll:
        files = {f["path"]: f for f in (await poll.json())["files"]}
    assert files["/pnfs/t/slow"]["state"] == "FAILED"
    assert files["/pnfs/t/slow"]["error"] == "Operation was aborted"
    assert files["/pnfs/t/cached"]["state"] == "COMPLETED"
    assert slow.on_disk and slow.pins == {}  # the recall went on


async def test_limits_413_and_429_checked_first(dcache: Factory,
                                                http: aiohttp.ClientSession) -> None:
    """Over 500 targets is 413; over max_requests unfinished requests is 429, even for a
    request that is also too large; limits above dCache's cannot be configured."""
    srv = await dcache(max_requests=2, mount_seconds=60)
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    many = [f"/pnfs/t/{i}" for i in range(501)]
    too_big = await _stage(http, srv, many)
    assert too_big.status == 413
    for _ in range(2):
        assert (await _stage(http, srv, ["/pnfs/t/a"])).status == 201
    async with http.post(srv.tape_api_url + "/stage/",
                         json={"files": [{"path": p} for p in many]}) as r:
        problem = await r.json()
    assert r.status == 429 and problem["status"] == "429" and problem["title"]
    assert srv.core.stats.max_paths == 501
    with pytest.raises(ValueError, match="dCache's limit"):
        DCacheConfig(max_targets=501)


async def test_passing_failures_as_a_real_site_gives_them(dcache: Factory,
                                                        http: aiohttp.ClientSession) -> None:
    """A test makes the next requests of a kind fail as a site's frontend does now and then:
    400 with no body (bulk cell timeout), 500 problem, 502 page, a dropped connection, garbage
    discovery; ``after`` carries the request out and loses only its answer; a per-path
    archiveinfo error lasts as many answers as asked. The per-user quota's 429 carries no
    Retry-After (BulkService.checkQuota)."""
    srv = await dcache(max_requests=1, mount_seconds=60)
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    srv.faults.add("stage", "400")
    srv.faults.add("stage", "drop", after=True)
    r = await _stage(http, srv, ["/pnfs/t/a"])
    assert r.status == 400 and not srv.frontend.requests
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await _stage(http, srv, ["/pnfs/t/a"])
    [rid] = srv.frontend.requests  # made, though its answer was lost
    busy = await _stage(http, srv, ["/pnfs/t/a"])
    assert busy.status == 429 and "Retry-After" not in busy.headers
    srv.faults.add("poll", "500")
    srv.faults.add("frontend", "502")
    for status, kind in ((500, "application/json"), (502, "text/html"), (200, None)):
        async with http.get(f"{srv.tape_api_url}/stage/{rid}") as poll:
            assert poll.status == status and (kind is None or poll.content_type == kind)
    srv.faults.add("discovery", "garbage")
    async with http.get(srv.door_url("/.well-known/wlcg-tape-rest-api")) as d:
        assert d.status == 200 and (await d.text()).startswith("<html>")
    srv.frontend.path_errors.add("/pnfs/t/a", PNFS_TIMEOUT, count=1)
    answers = []
    for _ in range(2):
        async with http.post(srv.tape_api_url + "/archiveinfo",
                             json={"paths": ["/pnfs//t/a"]}) as info:
            answers.append(await info.json())
    assert answers == [[{"path": "/pnfs//t/a", "error": PNFS_TIMEOUT}],
                       [{"path": "/pnfs//t/a", "locality": "TAPE"}]]
    assert srv.faults.served == {"stage:400": 1, "stage:drop": 1, "poll:500": 1,
                                 "poll:502": 1, "discovery:garbage": 1}
    with pytest.raises(ValueError, match="kind in"):
        srv.faults.add("poll", "418")


async def test_paths_go_by_dcache_fspath(dcache: Factory, http: aiohttp.ClientSession) -> None:
    """As dCache's FsPath: a stage request lists its targets resolved (``//``, ``.``, ``..``
    gone), archiveinfo resolves a path but echoes it as sent, a cancel resolves the paths it
    names (BulkService.validateTargets), and the door and namespace resolve any spelling."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    odd = "/pnfs//t/./x/../a/"
    r = await _stage(http, srv, [odd])
    rid = (await r.json())["requestId"]
    await _finished(srv, rid)
    async with http.get(f"{srv.tape_api_url}/stage/{rid}") as poll:
        assert [f["path"] for f in (await poll.json())["files"]] == ["/pnfs/t/a"]
    async with http.post(srv.tape_api_url + "/archiveinfo", json={"paths": [odd]}) as info:
        assert await info.json() == [{"path": odd, "locality": "DISK_AND_TAPE"}]
    for paths, status in ((["/pnfs/t/b"], 400), ([odd], 200), (["/pnfs/t/a"], 200)):
        async with http.post(f"{srv.tape_api_url}/stage/{rid}/cancel",
                             json={"paths": paths}) as c:
            assert c.status == status
    async with http.get(srv.frontend_url + "/api/v1/namespace/pnfs//t/a?locality=true") as n:
        assert (await n.json())["fileLocality"] == "ONLINE_AND_NEARLINE"
    async with http.get(srv.door_url("/pnfs/t/a").replace("/pnfs/", "//pnfs/"),
                        headers={"Range": "bytes=0-3"}) as door:
        assert door.status == 206 and len(await door.read()) == 4


async def test_archiveinfo_answers_at_most_10000_paths(dcache: Factory,
                                                       http: aiohttp.ClientSession) -> None:
    """archiveinfo silently reads the first 10,000 entries of a bigger request and merges
    their duplicates (9,999 answers here: ArchiveInfoResources cuts before ArchiveInfoCollector
    merges), answers an unknown path with a per-path error, and each locality as dCache names
    it."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/tape", 1, Locality.TAPE)
    srv.core.add_file("/pnfs/t/lost", 1, Locality.LOST)
    paths = ["/pnfs/t/tape", "/pnfs/t/tape", "/pnfs/t/lost", "/pnfs/t/none"]
    paths += [f"/pnfs/u/{i}" for i in range(10_100)]
    async with http.post(srv.tape_api_url + "/archiveinfo/", json={"paths": paths}) as r:
        answer = await r.json()
    assert r.status == 200 and len(answer) == 9_999
    by_path = {a["path"]: a for a in answer}
    assert by_path["/pnfs/t/tape"]["locality"] == "TAPE"
    assert by_path["/pnfs/t/lost"]["locality"] == "UNAVAILABLE"
    assert "error" in by_path["/pnfs/t/none"] and "locality" not in by_path["/pnfs/t/none"]
    assert srv.core.stats.max_paths == len(paths)


async def test_namespace_locality(dcache: Factory, http: aiohttp.ClientSession) -> None:
    """GET /api/v1/namespace/<path>?locality=true gives fileLocality; a missing path is a 404
    problem."""
    srv = await dcache()
    want = {Locality.DISK: "ONLINE", Locality.TAPE: "NEARLINE",
            Locality.DISK_AND_TAPE: "ONLINE_AND_NEARLINE", Locality.LOST: "UNAVAILABLE"}
    for locality in want:
        srv.core.add_file(f"/pnfs/n/{locality.name}", 5, locality)
    base = srv.frontend_url + "/api/v1/namespace"
    for locality, expected in {**want, None: "NONE"}.items():
        name = f"/{locality.name}" if locality else ""
        async with http.get(f"{base}/pnfs/n{name}?locality=true") as r:
            assert (await r.json())["fileLocality"] == expected
    async with http.get(f"{base}/pnfs/missing?locality=true") as r:
        assert r.status == 404
        assert (await r.json())["status"] == "404"


# --- the tape model and the disk ---------------------------------------------------------------


async def test_recalls_queued_together_are_grouped_by_tape(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """Six files alternating between two tapes, staged in one request, need two mounts on one
    drive and on two drives (one tape per drive), not six."""
    for drives in (1, 2):
        srv = await dcache(drives=drives, mount_seconds=0.05, file_seconds=0.01)
        paths = [f"/pnfs/g/{i}" for i in range(6)]
        for i, path in enumerate(paths):
            srv.core.add_file(path, 1, Locality.TAPE, tape=f"T{i % 2}")
        rid = (await (await _stage(http, srv, paths)).json())["requestId"]
        await _finished(srv, rid)
        assert srv.core.stats.mounts == 2 and srv.core.stats.recalled == 6


async def test_lru_eviction_never_evicts_pinned(dcache: Factory,
                                                http: aiohttp.ClientSession) -> None:
    """A recall into a full pool evicts the least recently used unpinned replica, never an
    older pinned one; with only pinned replicas left the recall fails."""
    srv = await dcache(disk_capacity=200)
    old_pinned = srv.core.add_file("/pnfs/l/old", 100, Locality.DISK_AND_TAPE, atime=1.0)
    newer = srv.core.add_file("/pnfs/l/newer", 100, Locality.DISK_AND_TAPE, atime=2.0)
    srv.core.add_file("/pnfs/l/c", 100, Locality.TAPE)
    srv.core.add_file("/pnfs/l/d", 100, Locality.TAPE)

    async def stage_one(path: str) -> dict[str, Any]:
        rid = (await (await _stage(http, srv, [path])).json())["requestId"]
        await _finished(srv, rid)
        return srv.frontend.requests[rid].to_json()["files"][0]  # type: ignore[no-any-return]

    assert (await stage_one("/pnfs/l/old"))["state"] == "COMPLETED"
    assert (await stage_one("/pnfs/l/c"))["state"] == "COMPLETED"
    assert old_pinned.on_disk and not newer.on_disk and srv.core.stats.evicted == 1
    failed = await stage_one("/pnfs/l/d")
    assert failed["state"] == "FAILED" and "No space" in failed["error"]
    assert old_pinned.on_disk and srv.core.files["/pnfs/l/c"].on_disk


async def test_lru_eviction_skips_a_replica_being_read(
        dcache: Factory, pki: TestPKI, proxy: Path, http: aiohttp.ClientSession) -> None:
    """A recall into a full pool skips the least recently used replica while a mover reads it
    (dCache's sweeper skips an entry in use) and evicts the next; once the reader closes its
    pool connection, LRU applies to it again."""
    srv = await dcache(disk_capacity=200)
    read = srv.core.add_file("/pnfs/u/read", 100, Locality.DISK_AND_TAPE, atime=1.0)
    idle = srv.core.add_file("/pnfs/u/idle", 100, Locality.DISK_AND_TAPE, atime=2.0)
    for name in ("c", "d"):
        srv.core.add_file(f"/pnfs/u/{name}", 100, Locality.TAPE)
    keep = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=pki.client_ssl_context(proxy)))
    try:
        async with keep.get(srv.door_url("/pnfs/u/read"), headers={"Range": "bytes=0-3"}) as r:
            assert r.status == 206 and srv.core.stats.open_movers == 1
        read.atime = 1.0  # still the least recently used: only its open mover protects it
        assert await srv.core.recall(srv.core.files["/pnfs/u/c"]) is None
        assert read.on_disk and not idle.on_disk
    finally:
        await keep.close()
    await srv.core.wait_until(lambda: srv.core.stats.open_movers == 0)
    assert await srv.core.recall(srv.core.files["/pnfs/u/d"]) is None
    assert not read.on_disk and srv.core.stats.evicted == 2


def test_a_finished_stage_request_is_not_looked_at_file_by_file_again() -> None:
    """Every bulk POST counts the user's unfinished requests: a finished request's files are
    looked at once, not at every POST (that made a 200,000-file stage and release quadratic
    in the emulator: 140,000 files looked at per POST, ~700 POSTs)."""
    from prestaged.testing.dcache.frontend import StageRequest, _File

    looked = 0

    class Counted(dict):  # type: ignore[type-arg]
        def values(self):  # type: ignore[no-untyped-def]
            nonlocal looked
            looked += 1
            return super().values()

    req = StageRequest("r1", "user", Counted({f"/f{i}": _File(f"/f{i}", state="COMPLETED")
                                              for i in range(100)}))
    for _ in range(50):
        assert req.finished
    assert looked == 1
    waiting = StageRequest("r2", "user", {"/g": _File("/g")})
    assert not waiting.finished
    waiting.files["/g"].state = "CANCELLED"
    assert waiting.finished
