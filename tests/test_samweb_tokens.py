"""The SAM web emulator taking a WLCG bearer token in place of the client certificate
(``SamWebServer(bearer=...)``), over TLS on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from prestaged.testing.pki import TestPKI
from prestaged.testing.samweb import SamWebServer, Status
from prestaged.testing.tokens import BearerCheck, TokenIssuer

AUDIENCE = "https://127.0.0.1"


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    """One test issuer for the module."""
    return TokenIssuer()


@pytest.fixture
async def sam(pki: TestPKI, issuer: TokenIssuer) -> AsyncIterator[SamWebServer]:
    """A started SAM web accepting ``issuer``'s tokens for ``AUDIENCE``, certificates optional,
    with definition ``d`` of two files."""
    srv = SamWebServer(pki.server_ssl_context(require_client_cert=False), experiment="dune",
                       definitions={"d": ["a.root", "b.root"]},
                       bearer=BearerCheck(issuer, [AUDIENCE]))
    async with srv:
        yield srv


async def _list(session: aiohttp.ClientSession, sam: SamWebServer, token: str | None = None
                ) -> tuple[int, str, aiohttp.ClientResponse]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(sam.base_url + "/definitions/name/d/files/list",
                           params={"format": "plain"}, headers=headers) as r:
        return r.status, await r.text(), r


async def test_token_in_place_of_a_certificate(sam: SamWebServer, issuer: TokenIssuer,
                                               anonymous: aiohttp.ClientSession) -> None:
    """A client without a certificate lists a definition with a good token of any scope (SAM
    is no storage); the record says a token came, and keeps no token."""
    token = issuer.mint("compute.read")
    status, text, _ = await _list(anonymous, sam, token)
    assert (status, text.split()) == (200, ["a.root", "b.root"])
    (record,) = sam.stats.records
    assert (record.bearer, record.client_dn, record.status) == (True, None, 200)
    assert (sam.stats.token_requests, sam.stats.auth_refusals) == (1, 0)
    assert token not in json.dumps(sam.stats.to_dict())


async def test_refusals_are_401_with_sams_error_body(
        sam: SamWebServer, issuer: TokenIssuer, anonymous: aiohttp.ClientSession,
        certified: aiohttp.ClientSession) -> None:
    """No certificate and no token, an expired token, a token for another audience, and a bad
    token beside a good certificate are all 401 with SAM's JSON error and a Bearer challenge;
    a certificate alone is still served."""
    cases = [(anonymous, None, "No client certificate or bearer token"),
             (anonymous, issuer.mint(lifetime=-5), "Bearer token rejected: token expired"),
             (anonymous, issuer.mint(audience="https://elsewhere"),
              "Bearer token rejected: wrong audience"),
             (certified, issuer.mint(foreign_key=True), "Bearer token rejected: bad signature")]
    for session, token, message in cases:
        status, text, resp = await _list(session, sam, token)
        assert (status, json.loads(text)) == (401, {"message": message, "error": "Unauthorized"})
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await _list(certified, sam))[0] == 200
    assert sam.stats.auth_refusals == 4
    assert [r.action for r in sam.stats.records][:4] == ["unauthorized"] * 4


async def test_refused_request_leaves_injected_actions_for_the_next(
        sam: SamWebServer, issuer: TokenIssuer, anonymous: aiohttp.ClientSession) -> None:
    """A request refused for its credentials does not use up an injected fault: the next good
    one gets it."""
    sam.inject("list", [Status(503)])
    assert (await _list(anonymous, sam))[0] == 401
    assert (await _list(anonymous, sam, issuer.mint()))[0] == 503
    assert (await _list(anonymous, sam, issuer.mint()))[0] == 200


def test_tokens_need_a_context_that_lets_certless_clients_in(
        pki: TestPKI, issuer: TokenIssuer) -> None:
    """A context requiring client certificates cannot take tokens: refused up front."""
    with pytest.raises(ValueError, match="require_client_cert=False"):
        SamWebServer(pki.server_ssl_context(), bearer=BearerCheck(issuer, [AUDIENCE]))
