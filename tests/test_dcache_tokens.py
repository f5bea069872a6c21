"""The dCache emulator with WLCG bearer tokens (``DCacheServer(bearer=...)``), driven by aiohttp
over TLS on 127.0.0.1: the door, the pool's indifference to tokens, the Tape REST frontend's
scopes, and dCache 11.2's blocking of clients that collect 401s. gfal2 against the same is in
test_dcache_emulator.py."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from prestaged.testing.dcache import DCacheConfig, DCacheServer, Locality, ThreadedDCache
from prestaged.testing.dcache.auth import bearer_document, load_bearer
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import BearerCheck, TokenIssuer

AUDIENCE = "https://127.0.0.1"
Factory = Callable[..., Awaitable[DCacheServer]]


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    """One test issuer for the module."""
    return TokenIssuer()


@pytest.fixture
def check(issuer: TokenIssuer) -> BearerCheck:
    """Tokens of ``issuer`` for ``AUDIENCE``, scope paths under /pnfs (as gPlazma maps them)."""
    return BearerCheck(issuer, [AUDIENCE], "/pnfs")


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _auth(token: str | None, **headers: str) -> dict[str, str]:
    return {**headers, **({"Authorization": f"Bearer {token}"} if token else {})}


async def _get(session: aiohttp.ClientSession, url: str, token: str | None = None,
               **headers: str) -> tuple[int, str, aiohttp.ClientResponse]:
    async with session.get(url, headers=_auth(token, Range="bytes=0-3", **headers)) as r:
        return r.status, (await r.read()).decode(errors="replace"), r


async def _post(session: aiohttp.ClientSession, url: str, doc: Any, token: str | None = None
                ) -> tuple[int, Any]:
    async with session.post(url, json=doc, headers=_auth(token)) as r:
        body = await r.read()
        return r.status, (json.loads(body) if body else None)


# --- door and pool ----------------------------------------------------------------------------


async def test_token_reads_through_door_and_pool_ignores_tokens(
        dcache: Factory, check: BearerCheck, issuer: TokenIssuer,
        anonymous: aiohttp.ClientSession) -> None:
    """A certless client with storage.read is redirected to the pool (aiohttp drops the token
    for the pool's port: 0 counted); the pool serves by UUID alone and counts a token sent to
    it on purpose, even one that would not verify."""
    srv = await dcache(bearer=check)
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    token = issuer.mint("storage.read:/t")
    status, _, resp = await _get(anonymous, srv.door_url("/pnfs/t/a"), token)
    assert (status, resp.history[0].status) == (206, 302)
    assert srv.core.stats.pool_authorization == 0
    for sent in (token, "not-a-jwt"):
        async with anonymous.get(srv.door_url("/pnfs/t/a"), headers=_auth(token),
                                 allow_redirects=False) as door:
            location = door.headers["Location"]
        assert (await _get(anonymous, location, sent))[0] == 206
    assert srv.core.stats.pool_authorization == 2
    assert srv.core.stats.token_requests == {"door": 3}
    assert check.accepted_jti == [issuer.verify(token, audiences=[AUDIENCE])["jti"]]
    assert token not in json.dumps(srv.core.stats.to_dict())


async def test_door_refuses_as_dcache(dcache: Factory, check: BearerCheck, issuer: TokenIssuer,
                                      anonymous: aiohttp.ClientSession) -> None:
    """Door: a token that fails to verify and a request with no credential are 401 with a
    Basic challenge (the reason as status phrase); a good token for another path is 403; a
    storage.read token cannot make the door recall a tape-only file (403, no mount); discovery
    is public unless a bad token comes with it."""
    srv = await dcache(bearer=check)
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    srv.core.add_file("/pnfs/t/tape", 10, Locality.TAPE)
    url = srv.door_url("/pnfs/t/a")
    status, body, resp = await _get(anonymous, url, issuer.mint("storage.read:/t", lifetime=-5))
    assert (status, resp.reason, body) == (401, "token expired", "")
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="dCache"'
    status, _, resp = await _get(anonymous, url)
    assert (status, resp.reason) == (401, "Unauthorized")
    assert (await _get(anonymous, url, issuer.mint("storage.read:/other")))[0] == 403
    status, body, _ = await _get(anonymous, srv.door_url("/pnfs/t/tape"),
                                 issuer.mint("storage.read:/t"))
    assert (status, body) == (403, "File not online. Staging not allowed.\n")
    assert (srv.core.stats.door_tape_gets, srv.core.stats.mounts) == (0, 0)
    async with anonymous.head(url, headers=_auth(issuer.mint("storage.poll:/t"))) as r:
        assert r.status == 200  # storage.poll grants metadata, not download
    assert (await _get(anonymous, url, issuer.mint("storage.poll:/t")))[0] == 403
    discovery = srv.door_url("/.well-known/wlcg-tape-rest-api")
    assert (await _get(anonymous, discovery))[0] == 200
    assert (await _get(anonymous, discovery, issuer.mint(foreign_key=True)))[0] == 401
    assert srv.core.stats.auth_refusals == {"door:401": 3, "door:403": 3}
    assert check.refusals["token expired"] == 1


async def test_certificate_clients_keep_working_with_tokens_on(
        dcache: Factory, check: BearerCheck, http: aiohttp.ClientSession) -> None:
    """With tokens accepted, a certificate without a token still reads and stages without any
    scope restriction, as before."""
    srv = await dcache(bearer=check)
    srv.core.add_file("/pnfs/t/tape", 10, Locality.TAPE)
    status, doc = await _post(http, srv.tape_api_url + "/stage", {"files": [
        {"path": "/pnfs/t/tape"}]})
    assert status == 201
    req = srv.frontend.requests[doc["requestId"]]
    await srv.core.wait_until(lambda: req.finished)
    assert req.files["/pnfs/t/tape"].state == "COMPLETED"
    assert (await _get(http, srv.door_url("/pnfs/t/tape")))[0] == 206
    assert srv.core.stats.token_requests == {}


def test_token_mode_needs_a_context_that_lets_certless_clients_in(
        pki: TestPKI, check: BearerCheck) -> None:
    """Contexts that require a client certificate cannot take tokens: refused up front."""
    with pytest.raises(ValueError, match="require_client_cert=False"):
        DCacheServer(pki.server_ssl_context(), pki.server_ssl_context(), bearer=check)


# --- the frontend -----------------------------------------------------------------------------


async def test_staging_needs_storage_stage_per_file(
        dcache: Factory, check: BearerCheck, issuer: TokenIssuer,
        anonymous: aiohttp.ClientSession) -> None:
    """A stage request is accepted from any good token (201, as dCache's bulk service does);
    with storage.read only, a tape-only file fails with PoolManager's message while a file
    already on disk is pinned; storage.stage recalls."""
    srv = await dcache(bearer=check)
    srv.core.add_file("/pnfs/t/tape", 10, Locality.TAPE)
    srv.core.add_file("/pnfs/t/cached", 10, Locality.DISK_AND_TAPE)
    files = {"files": [{"path": "/pnfs/t/tape"}, {"path": "/pnfs/t/cached"}]}
    status, doc = await _post(anonymous, srv.tape_api_url + "/stage", files,
                              issuer.mint("storage.read:/t"))
    assert status == 201
    req = srv.frontend.requests[doc["requestId"]]
    await srv.core.wait_until(lambda: req.finished)
    assert req.user == "token:prestaged-test-user"
    assert (req.files["/pnfs/t/tape"].state, req.files["/pnfs/t/tape"].error) == \
        ("FAILED", "File not online. Staging not allowed.")
    assert req.files["/pnfs/t/cached"].state == "COMPLETED"
    assert srv.core.stats.mounts == 0
    status, doc = await _post(anonymous, srv.tape_api_url + "/stage", files,
                              issuer.mint("storage.stage:/t"))
    req = srv.frontend.requests[doc["requestId"]]
    await srv.core.wait_until(lambda: req.finished)
    assert {f.state for f in req.files.values()} == {"COMPLETED"}
    assert srv.core.stats.recalled == 1


async def test_frontend_scopes_for_poll_cancel_release_archiveinfo_namespace(
        dcache: Factory, check: BearerCheck, issuer: TokenIssuer,
        anonymous: aiohttp.ClientSession) -> None:
    """As BulkService.checkRestrictions: the owner may poll and cancel with any token no
    broader than the one that staged (read or poll under the same path), not with one outside
    it (403 problem JSON, "Forbidden"); release is fire-and-forget (200); archiveinfo says
    "Permission denied" per path outside the token; the namespace resource is 403 there; a
    bad token is 401 before any handler, and every call is recorded."""
    srv = await dcache(bearer=check, mount_seconds=60.0)
    srv.core.add_file("/pnfs/t/tape", 10, Locality.TAPE)
    srv.core.add_file("/pnfs/u/tape", 10, Locality.TAPE)
    api = srv.tape_api_url
    stage, read, poll = (issuer.mint(s) for s in
                         ("storage.stage:/t", "storage.read:/t", "storage.poll:/t"))
    _, doc = await _post(anonymous, api + "/stage", {"files": [{"path": "/pnfs/t/tape"}]}, stage)
    rid = doc["requestId"]
    for token in (read, poll):
        async with anonymous.get(f"{api}/stage/{rid}", headers=_auth(token)) as r:
            assert r.status == 200
    async with anonymous.get(f"{api}/stage/{rid}", headers=_auth(issuer.mint("storage.read:/u"))
                             ) as r:
        assert (r.status, (await r.json())["detail"]) == (403, "Forbidden")
    broader = issuer.mint("storage.stage:/")
    assert (await _post(anonymous, f"{api}/stage/{rid}/cancel", {"paths": []}, broader))[0] \
        == 403
    assert (await _post(anonymous, f"{api}/stage/{rid}/cancel", {"paths": []}, read))[0] == 200
    for token in (read, stage):
        assert (await _post(anonymous, f"{api}/release/{rid}", {"paths": []}, token))[0] == 200
    _, answer = await _post(anonymous, api + "/archiveinfo",
                            {"paths": ["/pnfs/t/tape", "/pnfs/u/tape"]}, poll)
    assert answer == [{"path": "/pnfs/t/tape", "locality": "TAPE"},
                      {"path": "/pnfs/u/tape", "error": "Permission denied"}]
    namespace = srv.frontend_url + "/api/v1/namespace/pnfs/u/tape"
    assert (await _get(anonymous, namespace, read))[0] == 403
    assert (await _get(anonymous, namespace.replace("/u/", "/t/"), read))[0] == 200
    status, _ = await _post(anonymous, api + "/archiveinfo", {"paths": []},
                            issuer.mint(audience="https://elsewhere"))
    assert status == 401
    assert srv.core.stats.frontend_calls[-1] == "POST /api/v1/tape/archiveinfo"
    assert srv.core.stats.auth_refusals == {"frontend:403": 3, "frontend:401": 1}


# --- blocking clients with repeated 401s ------------------------------------------------------


async def test_three_401s_block_the_client_for_ten_seconds(
        dcache: Factory, check: BearerCheck, issuer: TokenIssuer,
        anonymous: aiohttp.ClientSession) -> None:
    """dCache 11.2: the third 401 blocks the client: 429 "Server is busy" with Retry-After
    (whole seconds left) even for a good token, until the block ends; other addresses (by
    X-Forwarded-For) and the frontend, a service of its own, are not blocked."""
    clock = Clock()
    srv = await dcache(bearer=check, clock=clock)
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    url, good, bad = srv.door_url("/pnfs/t/a"), issuer.mint("storage.read:/t"), \
        issuer.mint(lifetime=-5)
    assert [(await _get(anonymous, url, bad))[0] for _ in range(3)] == [401, 401, 401]
    status, body, resp = await _get(anonymous, url, good)
    assert (status, body, resp.headers["Retry-After"]) == \
        (429, "Server is busy. Please try again later.", "10")
    assert (await _get(anonymous, url, good, **{"X-Forwarded-For": "192.0.2.7"}))[0] == 206
    status, _ = await _post(anonymous, srv.tape_api_url + "/archiveinfo",
                            {"paths": ["/pnfs/t/a"]}, good)
    assert status == 200
    clock.now += 6.5
    assert (await _get(anonymous, url, good))[2].headers["Retry-After"] == "3"
    clock.now += 3.5
    assert (await _get(anonymous, url, good))[0] == 206
    assert srv.core.stats.blocked == {"door": 2}
    assert srv.limiters["door"].blocks == 1


async def test_403s_do_not_block_and_401s_are_forgotten_after_the_window(
        dcache: Factory, check: BearerCheck, issuer: TokenIssuer,
        anonymous: aiohttp.ClientSession) -> None:
    """Only 401 counts (a good token without the scope, 403, never blocks), and a 401 more
    than 20 s after the previous one starts the count again."""
    clock = Clock()
    srv = await dcache(bearer=check, clock=clock, auth_max_errors=2)
    srv.core.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
    url = srv.door_url("/pnfs/t/a")
    wrong_path = issuer.mint("storage.read:/u")
    assert [(await _get(anonymous, url, wrong_path))[0] for _ in range(5)] == [403] * 5
    assert (await _get(anonymous, url))[0] == 401
    clock.now += 20.5
    assert (await _get(anonymous, url))[0] == 401
    assert (await _get(anonymous, url, issuer.mint("storage.read:/t")))[0] == 206
    assert (await _get(anonymous, url))[0] == 401  # the second within 20 s: blocked now
    assert (await _get(anonymous, url, issuer.mint("storage.read:/t")))[0] == 429
    with pytest.raises(ValueError, match="auth_max_errors"):
        DCacheConfig(auth_max_errors=0)


# --- in a thread, and as a process ------------------------------------------------------------


def test_threaded_dcache_takes_tokens(pki: TestPKI, check: BearerCheck,
                                      issuer: TokenIssuer) -> None:
    """ThreadedDCache passes the BearerCheck on: a token-only sync client is redirected, and
    stats() reports the token and the refusal."""
    ctx = ssl.create_default_context(capath=str(pki.ca_dir))
    with ThreadedDCache(pki.server_ssl_context(require_client_cert=False),
                        pki.pool_ssl_context(), bearer=check) as site:
        site.add_file("/pnfs/t/a", 10, Locality.DISK_AND_TAPE)
        port = int(site.door_url("/pnfs/t/a").rsplit(":", 1)[1].split("/")[0])
        statuses = []
        for token in (issuer.mint("storage.read:/t"), issuer.mint(lifetime=-5)):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
            conn.request("GET", "/pnfs/t/a", headers=_auth(token))
            statuses.append(conn.getresponse().status)
            conn.close()
        stats = site.stats()
    assert statuses == [302, 401]
    assert (stats["token_requests"], stats["auth_refusals"]) == ({"door": 2}, {"door:401": 1})


def test_bearer_document_round_trip_holds_no_private_key(tmp_path: Path, check: BearerCheck,
                                                         issuer: TokenIssuer) -> None:
    """The document a separate emulator process reads verifies the issuer's tokens with the
    public key only; a verify-only issuer cannot mint; a broken document names the fields."""
    path = tmp_path / "bearer.json"
    path.write_text(json.dumps(bearer_document(check)))
    loaded = load_bearer(path)
    assert (loaded.audiences, loaded.base_path) == ([AUDIENCE], "/pnfs")
    assert loaded.check(f"Bearer {issuer.mint('storage.read:/t')}", "storage.read",
                        "/pnfs/t/a") is None
    assert loaded.check(f"Bearer {issuer.mint(foreign_key=True)}", "storage.read",
                        "/pnfs/t/a") == "bad signature"
    assert '"d"' not in path.read_text()
    with pytest.raises(RuntimeError, match="verify-only"):
        loaded.issuer.mint()
    path.write_text("{}")
    with pytest.raises(ValueError, match="issuer, jwks, audiences"):
        load_bearer(path)
