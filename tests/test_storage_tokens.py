"""The test storage accepting WLCG bearer tokens (``StorageServer(bearer=...)``), refusing in
the shape of XRootD, an RFC 6750 resource server or dCache, and counting tokens that reach the
redirect target."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Callable

import aiohttp
import pytest

from prestaged.testing.authz import RefusalStyle
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Status, StorageServer, generated_bytes
from prestaged.testing.tokens import BearerCheck, TokenIssuer

AUDIENCE = "https://127.0.0.1"
Factory = Callable[..., Awaitable[StorageServer]]


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    """One test issuer (its own ES256 key) for the module."""
    return TokenIssuer()


@pytest.fixture
async def storage_with_tokens(pki: TestPKI, issuer: TokenIssuer
                              ) -> AsyncIterator[Factory]:
    """Factory of started storages accepting ``issuer``'s tokens for ``AUDIENCE`` (certificates
    optional); ``await make(**StorageServer kwargs)``."""
    servers: list[StorageServer] = []

    async def make(**kwargs: Any) -> StorageServer:
        kwargs.setdefault("bearer", BearerCheck(issuer, [AUDIENCE]))
        srv = StorageServer(pki.server_ssl_context(require_client_cert=False),
                            pool_ssl_context=pki.server_ssl_context(require_client_cert=False),
                            **kwargs)
        await srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Range": "bytes=0-3"}


async def _get(session: aiohttp.ClientSession, url: str, token: str | None = None
               ) -> tuple[int, bytes, aiohttp.ClientResponse]:
    headers = _bearer(token) if token else {"Range": "bytes=0-3"}
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp


async def test_good_token_reads_without_a_certificate(
        storage_with_tokens: Factory, anonymous: aiohttp.ClientSession,
        issuer: TokenIssuer) -> None:
    """A client with no certificate but a token granting storage.read on the path is served;
    the server counts the token and keeps its jti, not the token."""
    srv = await storage_with_tokens()
    token = issuer.mint("storage.read:/pnfs")
    status, body, _ = await _get(anonymous, srv.url("/pnfs/f"), token)
    assert (status, body) == (206, generated_bytes("/pnfs/f", 0, 4))
    assert (srv.stats.token_requests, srv.stats.auth_refusals) == (1, 0)
    assert srv.bearer is not None and srv.bearer.seen == 1
    assert srv.bearer.accepted_jti == [issuer.verify(token, audiences=[AUDIENCE])["jti"]]
    assert token not in json.dumps(srv.stats.to_dict()) + repr(srv.bearer)


async def test_xrootd_refusals_are_403_permission_denied_and_close(
        storage_with_tokens: Factory, anonymous: aiohttp.ClientSession,
        issuer: TokenIssuer) -> None:
    """XRootD style: no token, an expired, foreign-key, wrong-audience or out-of-scope token all
    get 403 "permission denied" with Connection: close and no WWW-Authenticate."""
    srv = await storage_with_tokens()
    url = srv.url("/pnfs/f")
    tokens = [None, issuer.mint(lifetime=-60), issuer.mint(foreign_key=True),
              issuer.mint(audience="https://elsewhere"), issuer.mint("storage.read:/other")]
    for token in tokens:
        status, body, resp = await _get(anonymous, url, token)
        assert (status, body) == (403, b"permission denied")
        assert resp.headers["Connection"] == "close"
        assert "WWW-Authenticate" not in resp.headers
        assert token is None or token not in body.decode() + str(resp.headers)
    assert (srv.stats.token_requests, srv.stats.auth_refusals) == (4, 5)
    assert srv.stats.path("/pnfs/f").statuses == [403] * 5
    assert srv.stats.path("/pnfs/f").actions == [Status(403)] * 5
    assert srv.bearer is not None and dict(srv.bearer.refusals) == {
        "token expired": 1, "bad signature": 1, "wrong audience": 1,
        "scope does not grant storage.read on /pnfs/f": 1}


async def test_rfc6750_refusals_say_why_in_www_authenticate(
        storage_with_tokens: Factory, anonymous: aiohttp.ClientSession,
        issuer: TokenIssuer) -> None:
    """RFC 6750 style: a bad token is 401 invalid_token with the reason, a good token without
    the scope 403 insufficient_scope, no credential at all a bare Bearer challenge."""
    srv = await storage_with_tokens(refusal=RefusalStyle.RFC6750)
    url = srv.url("/pnfs/f")
    status, _, resp = await _get(anonymous, url, issuer.mint(lifetime=-60))
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == \
        'Bearer error="invalid_token", error_description="token expired"'
    status, _, resp = await _get(anonymous, url, issuer.mint("storage.stage:/pnfs"))
    assert status == 403
    assert resp.headers["WWW-Authenticate"].startswith('Bearer error="insufficient_scope"')
    status, _, resp = await _get(anonymous, url)
    assert (status, resp.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert srv.stats.auth_refusals == 3


async def test_dcache_refusals_are_401_basic_challenge_and_403(
        storage_with_tokens: Factory, anonymous: aiohttp.ClientSession,
        issuer: TokenIssuer) -> None:
    """dCache style: a failed login is 401 with the reason as the status phrase and a Basic
    challenge; a good token without the scope is 403 "Permission denied"."""
    srv = await storage_with_tokens(refusal="dcache")
    status, body, resp = await _get(anonymous, srv.url("/pnfs/f"), issuer.mint(lifetime=-60))
    assert (status, resp.reason, body) == (401, "token expired", b"")
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="dCache"'
    status, body, _ = await _get(anonymous, srv.url("/pnfs/f"), issuer.mint("storage.read:/x"))
    assert (status, body) == (403, b"Permission denied\n")


@pytest.mark.parametrize(("style", "bad_token_status"), [("xrootd", 206), ("rfc6750", 401)])
async def test_certificate_and_token_together(
        storage_with_tokens: Factory, certified: aiohttp.ClientSession, issuer: TokenIssuer,
        style: str, bad_token_status: int) -> None:
    """With a certificate: no token is served; a valid token that does not cover the path is
    refused anyway; a bad token falls back to the certificate only in the XRootD style."""
    srv = await storage_with_tokens(refusal=style)
    url = srv.url("/pnfs/f")
    assert (await _get(certified, url))[0] == 206
    assert (await _get(certified, url, issuer.mint("storage.read:/other")))[0] == 403
    assert (await _get(certified, url, issuer.mint(lifetime=-60)))[0] == bad_token_status
    assert srv.stats.client_dns  # the certificate was seen on the door


async def test_token_mode_needs_a_door_that_lets_certless_clients_in(
        pki: TestPKI, issuer: TokenIssuer) -> None:
    """A door context that requires a client certificate cannot accept tokens: refused up front
    rather than failing every token-only client in the handshake."""
    with pytest.raises(ValueError, match="require_client_cert=False"):
        StorageServer(pki.server_ssl_context(), bearer=BearerCheck(issuer, [AUDIENCE]))


async def test_redirect_target_counts_authorization_headers(
        storage_with_tokens: Factory, anonymous: aiohttp.ClientSession,
        issuer: TokenIssuer) -> None:
    """The door checks the token and 302s; aiohttp drops Authorization for the pool's port, so
    the pool counts none; a client that re-sends it to the pool is counted."""
    srv = await storage_with_tokens(redirect=True)
    token = issuer.mint("storage.read:/pnfs")
    status, body, resp = await _get(anonymous, srv.url("/pnfs/f"), token)
    assert (status, body, resp.url.port) == (206, generated_bytes("/pnfs/f", 0, 4), srv.pool_port)
    assert srv.stats.authorization_at_target == 0
    async with anonymous.get(srv.url("/pnfs/g"), headers=_bearer(token),
                             allow_redirects=False) as door:
        assert door.status == 302
        location = door.headers["Location"]
    async with anonymous.get(location, headers=_bearer(token)) as pool:  # the leak, on purpose
        assert pool.status == 206
    assert srv.stats.authorization_at_target == 1
    assert srv.stats.token_requests == 2
    assert srv.stats.to_dict()["authorization_at_target"] == 1
