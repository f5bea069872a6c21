"""The real XRootD (Debian xrootd-server 5.5.3 + xrootd-scitokens-plugins) as a bearer-token
relying party, proven with plain aiohttp GETs of ``Range: bytes=0-3`` before prestaged is
pointed at it (fixtures in conftest.py).

Each answer is checked against what XRootD logged: the plugin's grants and failure reasons,
the authdb's audit lines (proxy decisions) and the names clients logged in as. No token text is
printed: assertion messages carry statuses, reasons and the scrubbed log tail only, and tokens
are ``HiddenToken`` (repr ``<token>``) even for ``pytest --showlocals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import aiohttp
import pytest

from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import WLCG_ANY, TokenIssuer
from prestaged.testing.xrootd import (
    MAPPED_USER,
    HiddenToken,
    XRootDServer,
    scitokens_available,
    xrootd_available,
)

NAME = "f000001.dat"
OTHER = "f000002.dat"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


if not (xrootd_available() and scitokens_available()) and not _in_ci():
    pytest.skip("install Debian packages xrootd-server and xrootd-scitokens-plugins",
                allow_module_level=True)


@dataclass(frozen=True)
class Answer:
    """What a GET got back."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@pytest.fixture(scope="session")
def no_cert(pki: TestPKI) -> ssl.SSLContext:
    """A client context trusting the test CA and presenting no certificate."""
    return ssl.create_default_context(capath=str(pki.ca_dir))


@pytest.fixture
def with_proxy(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    """A client context presenting the test user's proxy (mapped to MAPPED_USER)."""
    return pki.client_ssl_context(proxy)


async def _get(server: XRootDServer, ctx: ssl.SSLContext, token: Optional[str] = None,
               name: str = NAME) -> Answer:
    """GET the first 4 bytes of ``name``, with ``Authorization: Bearer <token>`` if given."""
    headers = {"Range": "bytes=0-3"}
    if token is not None:
        headers["Authorization"] = HiddenToken(f"Bearer {token}")  # never shown by pytest
    connector = aiohttp.TCPConnector(ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get(server.url(name), headers=headers) as resp:
        return Answer(resp.status, resp.headers.copy(), await resp.read())


def _why(server: XRootDServer, answer: Answer, mark: int) -> str:
    """What to print when an assertion fails (never a token: the log tail is scrubbed)."""
    return (f"HTTP {answer.status}; token failures {server.token_failures(mark)}; grants "
            f"{server.token_grants(mark)}; audit {server.audit(mark)}\n{server.log_tail(30)}")


def _head(server: XRootDServer, name: str = NAME) -> bytes:
    return (server.export_dir / name).read_bytes()[:4]


def _reads(server: XRootDServer, name: str = NAME) -> list[tuple[str, str]]:
    """The plugin's log of one granted GET: a stat then a read of the file."""
    path = str(server.export_dir / name)
    return [("stat", path), ("read", path)]


# --------------------------------------------------------------------------------------------
# Token-only server (onmissing = deny)
# --------------------------------------------------------------------------------------------


async def test_read_token_gets_206_granted_by_the_plugin(
    xrootd_token_only_server: XRootDServer, no_cert: ssl.SSLContext
) -> None:
    """A storage.read:/ token for server.audience reads bytes 0-3 (206) with no certificate; the
    plugin, not the authdb, granted the stat and the read, and XRootD logged no token text."""
    server = xrootd_token_only_server
    mark = server.log_mark()
    token = server.mint("storage.read:/")
    answer = await _get(server, no_cert, token)
    assert (answer.status, answer.body) == (206, _head(server)), _why(server, answer, mark)
    assert server.token_grants(mark) == _reads(server)
    assert server.token_failures(mark) == [] and server.audit(mark) == []
    assert server.logins(mark) == ["nobody"]
    leaked = token in server.log_text(mark)
    assert not leaked, "XRootD's log holds the token"


# Refusals on the token-only server: how the token is made, and the reason the plugin logs for
# each of the two checks of a GET (none when there is no token or a valid one not covering).
REFUSALS: dict[str, tuple[Optional[Callable[[XRootDServer], str]], Optional[str]]] = {
    "no token": (None, None),
    "create scope only": (lambda s: s.mint("storage.create:/"), None),
    "expired": (lambda s: s.mint(lifetime=-30, issued_ago=3600), "token expired"),
    # scitokens-cpp reports a future nbf as expiry too.
    "not yet valid": (lambda s: s.mint(not_before=600), "token expired"),
    "wrong audience": (lambda s: s.mint(audience="https://elsewhere.example:1094"),
                       "'aud' claim verification failed"),
    "foreign key": (lambda s: s.mint(foreign_key=True), "Invalid signature"),
    "unknown issuer": (lambda s: HiddenToken(TokenIssuer("https://localhost:1/other").mint(
        audience=s.audience)), "Token issuer is not in list of allowed issuers"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_token_only_refuses_with_403(
    xrootd_token_only_server: XRootDServer, no_cert: ssl.SSLContext, case: str
) -> None:
    """No token, a create-only scope, expired, not yet valid, wrong audience, foreign key and
    unknown issuer each get 403, for the reason the plugin logs, and nothing is granted."""
    server = xrootd_token_only_server
    make, reason = REFUSALS[case]
    mark = server.log_mark()
    answer = await _get(server, no_cert, make(server) if make is not None else None)
    assert answer.status == 403, _why(server, answer, mark)
    assert server.token_failures(mark) == ([reason] * 2 if reason else []), _why(
        server, answer, mark)
    assert server.token_grants(mark) == [] and server.audit(mark) == []


async def test_refusal_is_a_bare_403(
    xrootd_token_only_server: XRootDServer, no_cert: ssl.SSLContext
) -> None:
    """The measured 403: no WWW-Authenticate, Connection: Close, a body naming only the path;
    "no token" and "token without the scope" look the same to the client."""
    server = xrootd_token_only_server
    answers = [await _get(server, no_cert, token)
               for token in (None, server.mint("storage.create:/"))]
    body = f"Unable to open {server.export_dir / NAME}; permission denied\n".encode()
    for answer in answers:
        assert answer.status == 403
        assert "WWW-Authenticate" not in answer.headers
        assert answer.headers.get("Connection", "").lower() == "close"
        assert answer.body == body


async def test_scope_path_is_relative_to_the_export(
    xrootd_token_only_server: XRootDServer, no_cert: ssl.SSLContext
) -> None:
    """base_path is the export directory: storage.read:/f000001.dat reads that file and no other."""
    server = xrootd_token_only_server
    token = server.mint(f"storage.read:/{NAME}")
    mark = server.log_mark()
    mine = await _get(server, no_cert, token)
    other = await _get(server, no_cert, token, name=OTHER)
    assert (mine.status, other.status) == (206, 403), _why(server, other, mark)
    assert server.token_grants(mark) == _reads(server)


@pytest.mark.parametrize("audience", ["localhost", "wlcg-any"])
async def test_other_accepted_audiences(
    xrootd_token_only_server: XRootDServer, no_cert: ssl.SSLContext, audience: str
) -> None:
    """Besides server.audience (https://127.0.0.1:PORT) the server takes
    https://localhost:PORT and the WLCG "any" audience."""
    server = xrootd_token_only_server
    aud = f"https://localhost:{server.port}" if audience == "localhost" else WLCG_ANY
    assert aud == WLCG_ANY or aud in server.audiences
    mark = server.log_mark()
    answer = await _get(server, no_cert, server.mint(audience=aud))
    assert answer.status == 206, _why(server, answer, mark)


async def test_token_only_refuses_a_mapped_proxy_alone(
    xrootd_token_only_server: XRootDServer, with_proxy: ssl.SSLContext
) -> None:
    """onmissing = deny: the mapped test user's proxy without a token gets 403; the authdb that
    would grant it is never asked."""
    server = xrootd_token_only_server
    mark = server.log_mark()
    answer = await _get(server, with_proxy)
    assert answer.status == 403, _why(server, answer, mark)
    assert server.logins(mark) == [MAPPED_USER] and server.audit(mark) == []


async def test_token_only_does_not_require_the_gridmap(
    xrootd_token_only_server: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """The token-only config has no "http.gridmap required": a client presenting an unmapped
    proxy is not dropped, and its valid token reads."""
    server = xrootd_token_only_server
    assert not server.gridmap_required
    assert "http.gridmap required" not in server.config_path.read_text()
    stranger = pki.client_ssl_context(pki.make_proxy_for("Stranger", tmp_path / "x509up_s"))
    mark = server.log_mark()
    answer = await _get(server, stranger, server.mint())
    assert answer.status == 206, _why(server, answer, mark)
    assert server.gridmap_failures(mark) == [] and MAPPED_USER not in server.logins(mark)


# --------------------------------------------------------------------------------------------
# Token + proxy server (onmissing = passthrough)
# --------------------------------------------------------------------------------------------


async def test_proxy_alone_reads_through_the_authdb(
    xrootd_token_server: XRootDServer, with_proxy: ssl.SSLContext
) -> None:
    """Without a token the plugin passes the request on: the mapped proxy reads (206), granted
    by the authdb as before tokens."""
    server = xrootd_token_server
    mark = server.log_mark()
    answer = await _get(server, with_proxy)
    assert (answer.status, answer.body) == (206, _head(server)), _why(server, answer, mark)
    assert [(r.verdict, r.user, r.operation) for r in server.audit(mark)] == [
        ("grant", MAPPED_USER, "stat"), ("grant", MAPPED_USER, "read")]
    assert server.token_grants(mark) == []


async def test_proxy_and_read_token_read_by_token(
    xrootd_token_server: XRootDServer, with_proxy: ssl.SSLContext
) -> None:
    """Proxy plus a covering token: 206, decided by the token alone (no authdb decision)."""
    server = xrootd_token_server
    mark = server.log_mark()
    answer = await _get(server, with_proxy, server.mint("storage.read:/"))
    assert answer.status == 206, _why(server, answer, mark)
    assert server.token_grants(mark) == _reads(server) and server.audit(mark) == []
    assert server.logins(mark) == [MAPPED_USER]


async def test_proxy_and_token_without_read_scope_is_403(
    xrootd_token_server: XRootDServer, with_proxy: ssl.SSLContext
) -> None:
    """Proxy plus a VALID token without storage.read: 403, although the same proxy alone reads;
    the authdb is never asked."""
    server = xrootd_token_server
    mark = server.log_mark()
    answer = await _get(server, with_proxy, server.mint("storage.create:/ storage.stage:/"))
    assert answer.status == 403, _why(server, answer, mark)
    assert server.logins(mark) == [MAPPED_USER]
    assert server.audit(mark) == [] and server.token_failures(mark) == []


async def test_proxy_and_invalid_token_fall_back_to_the_proxy(
    xrootd_token_server: XRootDServer, with_proxy: ssl.SSLContext
) -> None:
    """Proxy plus an expired token: the plugin rejects the token and passes on, so the proxy
    reads (206) through the authdb."""
    server = xrootd_token_server
    mark = server.log_mark()
    answer = await _get(server, with_proxy, server.mint(lifetime=-30, issued_ago=3600))
    assert answer.status == 206, _why(server, answer, mark)
    assert server.token_failures(mark) == ["token expired"] * 2
    assert {(r.verdict, r.user) for r in server.audit(mark)} == {("grant", MAPPED_USER)}


async def test_token_without_certificate_reads_on_the_passthrough_server(
    xrootd_token_server: XRootDServer, no_cert: ssl.SSLContext
) -> None:
    """A client with only a token (no certificate) reads from the token + proxy server too."""
    server = xrootd_token_server
    mark = server.log_mark()
    answer = await _get(server, no_cert, server.mint())
    assert answer.status == 206, _why(server, answer, mark)
    assert server.logins(mark) == ["nobody"] and server.token_grants(mark) == _reads(server)


# --------------------------------------------------------------------------------------------
# The issuer and the key cache
# --------------------------------------------------------------------------------------------


async def test_issuer_serves_discovery_and_jwks_over_https(
    xrootd_token_server: XRootDServer, no_cert: ssl.SSLContext
) -> None:
    """While the server runs, its issuer's discovery document and JWKS are served over HTTPS
    with the test CA at the URL the tokens name as iss and scitokens.cfg trusts."""
    server = xrootd_token_server
    issuer = server.issuer
    assert issuer.url.startswith("https://localhost:")
    assert f"issuer = {issuer.url}\n" in (server.root / "scitokens.cfg").read_text()
    connector = aiohttp.TCPConnector(ssl=no_cert)
    async with aiohttp.ClientSession(connector=connector, raise_for_status=True) as session:
        async with session.get(f"{issuer.url}/.well-known/openid-configuration") as resp:
            discovery = await resp.json()
        async with session.get(discovery["jwks_uri"]) as resp:
            jwks = await resp.json()
    assert discovery["issuer"] == issuer.url
    assert jwks == issuer.jwks()


async def test_key_cache_is_what_lets_xrootd_verify(
    make_xrootd_token_server: Callable[..., XRootDServer], no_cert: ssl.SSLContext
) -> None:
    """Emptying the pre-filled key cache turns a valid token's 206 into 403: the plugin then
    fetches from the served issuer and fails TLS (its libcurl trusts only the system bundle)."""
    server = make_xrootd_token_server(token_only=True, files=2)
    before = await _get(server, no_cert, server.mint())
    assert before.status == 206, _why(server, before, 0)
    with contextlib.closing(sqlite3.connect(server.key_cache)) as db, db:
        db.execute("DELETE FROM keycache")
    mark = server.log_mark()
    after = await _get(server, no_cert, server.mint())  # a new token: not in the plugin's cache
    failures = server.token_failures(mark)
    assert after.status == 403, _why(server, after, mark)
    assert len(failures) == 2 and all("SSL" in f for f in failures), _why(server, after, mark)


@pytest.mark.slow
async def test_accepted_token_outlives_its_exp_in_xrootd_cache(
    xrootd_token_only_server: XRootDServer, no_cert: ssl.SSLContext
) -> None:
    """XRootD keeps accepting a token it has seen after that token's exp, while an unseen twin
    with the same exp gets 403 "token expired": a client must check exp itself."""
    server = xrootd_token_only_server
    now = time.time()
    seen, twin = (server.mint(lifetime=3, now=now) for _ in range(2))
    exp = int(now + 3)
    first = await _get(server, no_cert, seen)
    assert first.status == 206 and time.time() < exp, "first request too late to measure"
    # The one wait in this file is for the clock itself (about 3 s): there is nothing to poll,
    # XRootD judges exp by the same wall clock.
    await asyncio.sleep(exp + 1.2 - time.time())
    mark = server.log_mark()
    again = await _get(server, no_cert, seen)
    fresh = await _get(server, no_cert, twin)
    assert (again.status, fresh.status) == (206, 403), _why(server, fresh, mark)
    assert server.token_failures(mark) == ["token expired"] * 2
    assert "Cached token" in server.log_text(mark)
