"""The dCache emulator held to real dCache's source (dCache/dcache master, July 2026): each test
names the class whose behaviour it pins down. Real servers on 127.0.0.1, over TLS."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from prestaged.testing.dcache import DCacheServer, Locality
from prestaged.testing.dcache.frontend import StageRequest, _File, parse_lifetime
from prestaged.testing.pki import TestPKI

Factory = Callable[..., Awaitable[DCacheServer]]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


async def _post(http: aiohttp.ClientSession, url: str, body: Any
                ) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(url, json=body) as r:
        text = await r.text()
        return r.status, (await r.json() if text else None), r


@pytest.fixture
async def other(pki: TestPKI, tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """A session presenting a proxy of another user of the same CA."""
    proxy = pki.make_proxy_for("Other User", tmp_path / "x509up_other")
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=pki.client_ssl_context(proxy))) as s:
        yield s


@pytest.fixture
async def renewed(pki: TestPKI, tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """A session presenting a new proxy of the test user (another proxy CN number)."""
    proxy = pki.make_proxy(tmp_path / "x509up_renewed")
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=pki.client_ssl_context(proxy))) as s:
        yield s


async def test_stage_body_is_checked_as_stageresources_does(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """StageResources.toBulkRequest: no files, another top-level member, a diskLifetime that
    java.time.Duration refuses or a targetedMetadata that is no object are 400; nothing made."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url = srv.tape_api_url + "/stage"
    bad = [{"files": []}, {"files": [{"path": "/pnfs/t/a"}], "priority": 1},
           {"files": [{"path": "/pnfs/t/a", "diskLifetime": "P1DT"}]},
           {"files": [{"path": "/pnfs/t/a", "diskLifetime": "P1W"}]},
           {"files": [{"path": "/pnfs/t/a", "targetedMetadata": "fast"}]},
           {"files": [{"diskLifetime": "PT1H"}]}]
    for body in bad:
        status, doc, _ = await _post(http, url, body)
        assert (status, doc["status"], doc["title"]) == (400, "400", "Bad Request"), body
    assert srv.frontend.requests == {}


def test_disk_lifetime_is_read_as_java_time_duration() -> None:
    """TimeUtils.validateDuration (java.time.Duration.parse): any case, fractions and signs
    are durations; a lone T, weeks or months are not."""
    assert parse_lifetime("pt1h") == 3600 and parse_lifetime("PT1.5S") == 1.5
    assert parse_lifetime("P1DT2H") == 93600 and parse_lifetime("-PT1M") == -60
    for text in ("P1DT", "PT", "P1W", "P1M", "3600", 3600):
        with pytest.raises(ValueError):
            parse_lifetime(text)


async def test_each_file_keeps_its_own_disk_lifetime(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """StageActivity.getLifetimeInMillis: each target pins for its own diskLifetime, the
    others for the 2-day default; the answer's id is a UUID and Location the URL posted to
    plus "/" and the id (BulkService.messageArrived)."""
    srv = await dcache()
    a = srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    b = srv.core.add_file("/pnfs/t/b", 10, Locality.DISK_AND_TAPE)
    c = srv.core.add_file("/pnfs/t/c", 10, Locality.DISK_AND_TAPE)
    body = {"files": [{"path": "/pnfs/t/a", "diskLifetime": "PT1H"},
                      {"path": "/pnfs/t/b", "diskLifetime": "P1D"}, {"path": "/pnfs/t/c"}]}
    status, doc, r = await _post(http, srv.tape_api_url + "/stage/", body)
    rid = doc["requestId"]
    assert status == 201 and UUID.match(rid)
    assert r.headers["Location"] == f"{srv.tape_api_url}/stage//{rid}"
    await srv.core.wait_until(lambda: srv.frontend.requests[rid].finished)
    now = time.time()
    assert a.pins[rid] - now == pytest.approx(3600, abs=60)
    assert b.pins[rid] - now == pytest.approx(86400, abs=60)
    assert c.pins[rid] - now == pytest.approx(2 * 86400, abs=60)


def test_poll_document_always_has_started_at() -> None:
    """StageRequestInfo: startedAt is createdAt until the request started; StagedFileInfo: a
    target that ended without starting shows startedAt = finishedAt."""
    f = _File("/pnfs/t/a", state="CANCELLED", finished=12.5)
    req = StageRequest("r", "u", {f.path: f}, created=10.0)
    doc = req.to_json()
    assert doc["startedAt"] == doc["createdAt"] == 10_000
    assert doc["files"][0]["startedAt"] == doc["files"][0]["finishedAt"] == 12_500


async def test_only_the_owner_polls_cancels_and_deletes(
        dcache: Factory, http: aiohttp.ClientSession, other: aiohttp.ClientSession,
        renewed: aiohttp.ClientSession) -> None:
    """JdbcBulkRequestStore.isRequestSubject: another user's poll, cancel and delete are 403
    ("Forbidden"), and its release releases nothing (PinManager: not the pin's owner); the
    same user with a renewed proxy (another proxy CN) is the owner still."""
    srv = await dcache()
    replica = srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    _, doc, _ = await _post(http, srv.tape_api_url + "/stage", {"files": [{"path": "/pnfs/t/a"}]})
    rid = doc["requestId"]
    await srv.core.wait_until(lambda: bool(replica.pins))
    url = f"{srv.tape_api_url}/stage/{rid}"
    async with other.get(url) as r:
        assert (r.status, (await r.json())["detail"]) == (403, "Forbidden")
    assert (await _post(other, url + "/cancel", {"paths": []}))[0] == 403
    async with other.delete(url) as r:
        assert r.status == 403
    assert (await _post(other, f"{srv.tape_api_url}/release/{rid}",
                        {"paths": ["/pnfs/t/a"]}))[0] == 200
    assert rid in replica.pins
    async with renewed.get(url) as r:
        assert r.status == 200
    assert (await _post(renewed, f"{srv.tape_api_url}/release/{rid}",
                        {"paths": ["/pnfs/t/a"]}))[0] == 200
    assert replica.pins == {}


async def test_errors_are_written_as_error_response_provider_does(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """ErrorResponseProvider: status (a string), title and detail, no type, application/json;
    a 413 says only its reason phrase; an unknown request is 404 "request <id> not found"; a
    cancel naming a path not in the request is 400 with title and detail headers, no body."""
    srv = await dcache(max_targets=2)
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    status, doc, r = await _post(http, srv.tape_api_url + "/stage",
                                 {"files": [{"path": f"/pnfs/t/{i}"} for i in range(3)]})
    assert (status, r.content_type) == (413, "application/json")
    assert doc == {"status": "413", "title": "Request Entity Too Large",
                   "detail": "Request Entity Too Large"}
    async with http.get(srv.tape_api_url + "/stage/nope") as r:
        assert (r.status, (await r.json())["detail"]) == (404, "request nope not found")
    _, doc, _ = await _post(http, srv.tape_api_url + "/stage", {"files": [{"path": "/pnfs/t/a"}]})
    status, body, r = await _post(http, f"{srv.tape_api_url}/stage/{doc['requestId']}/cancel",
                                  {"paths": ["/pnfs/t/b"]})
    assert (status, body, r.headers["title"]) == (400, None, "File missing from stage request")


async def test_release_is_a_bulk_request_held_to_its_limits(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """ReleaseResources sends a RELEASE bulk request: BulkService checks its user's quota of
    unfinished requests (429) before its number of targets (413), as for a stage."""
    srv = await dcache(max_targets=2, max_requests=1, mount_seconds=60)
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url = srv.tape_api_url + "/release/any"
    assert (await _post(http, url, {"paths": ["/pnfs/t/a", "/pnfs/t/b", "/pnfs/t/c"]}))[0] \
        == 413
    assert (await _post(http, url, {"paths": ["/pnfs/t/a", "/pnfs/t/b"]}))[0] == 200
    assert (await _post(http, srv.tape_api_url + "/stage",
                        {"files": [{"path": "/pnfs/t/a"}]}))[0] == 201  # unfinished: a mount
    assert (await _post(http, url, {"paths": ["/pnfs/t/a", "/pnfs/t/b", "/pnfs/t/c"]}))[0] \
        == 429


async def test_archiveinfo_cuts_first_then_answers_dirs_as_none(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """ArchiveInfoResources reads each of the first 10,000 entries as a string (400 else);
    PoolMonitorV5 gives a directory NONE; an unknown path's error names the path."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/a", 10, Locality.TAPE)
    url = srv.tape_api_url + "/archiveinfo"
    assert (await _post(http, url, {"paths": ["/pnfs/t/a", 7]}))[0] == 400
    status, doc, _ = await _post(http, url, {"paths": ["/pnfs/t", "/pnfs//t/x"]})
    assert status == 200 and doc == [
        {"path": "/pnfs/t", "locality": "NONE"},
        {"path": "/pnfs//t/x", "error": "No such file or directory: /pnfs/t/x"}]


async def test_stage_failures_name_dcache_reasons(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """A directory fails "Not a regular file." (PinManagerActivity.checkPinnable); an
    UNAVAILABLE file is a disk-only one (a stored file is NEARLINE in
    PoolMonitorV5.getFileLocality), so it fails as one."""
    srv = await dcache()
    srv.core.add_file("/pnfs/t/d/a", 10, Locality.TAPE)
    srv.core.add_file("/pnfs/t/lost", 10, Locality.LOST)
    _, doc, _ = await _post(http, srv.tape_api_url + "/stage",
                            {"files": [{"path": "/pnfs/t/d"}, {"path": "/pnfs/t/lost"}]})
    req = srv.frontend.requests[doc["requestId"]]
    await srv.core.wait_until(lambda: req.finished)
    assert {p: f.error for p, f in req.files.items()} == {
        "/pnfs/t/d": "Not a regular file.", "/pnfs/t/lost": "Cannot stage DISK only files"}


async def test_frontend_serves_the_discovery_document(
        dcache: Factory, http: aiohttp.ClientSession) -> None:
    """WellKnownWlcgProducerFactory is the frontend's as well as the doors': the frontend's
    /.well-known/wlcg-tape-rest-api names its own v1 endpoint."""
    srv = await dcache()
    async with http.get(srv.frontend_url + "/.well-known/wlcg-tape-rest-api") as r:
        doc = await r.json()
    assert r.status == 200 and doc["endpoints"] == [
        {"uri": srv.tape_api_url, "version": "v1", "metadata": {}}]
