"""Bearer tokens and the Tape REST API (issue 14): the token goes to the door's discovery and to
a frontend on the door's host (another port), never to a frontend on another host; a refusal by
the frontend is exit 3 naming the token and ``storage.stage``, never the token's text.

A door and a frontend are small aiohttp HTTPS servers on loopback recording each request's
``Authorization``; "another host" is ``localhost`` against the door's ``127.0.0.1``.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import aiohttp
import pytest
from aiohttp import web

from prestaged.errors import CredentialError
from prestaged.locality import TapeAccess, TapeSettings
from prestaged.retry import RetryPolicy
from prestaged.storage.tape import DISCOVERY_PATH, TapeClient
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import TokenIssuer, write_token
from prestaged.tokens import FoundToken, TokenSource

NO_WAIT = RetryPolicy(attempts=2, initial=0.0, max=0.0, jitter=0.0, total=10.0)


@dataclass
class Tape:
    """A door and its frontend; ``seen`` has (server, path, Authorization) per request."""

    door: str
    frontend: str
    seen: list[tuple[str, str, Optional[str]]] = field(default_factory=list)
    refuse: Optional[int] = None
    """Frontend answers this status to everything (a dCache-style 401/403)."""

    def auth(self, server: str) -> list[Optional[str]]:
        return [a for s, _, a in self.seen if s == server]


Make = Callable[..., Awaitable[Tape]]


@pytest.fixture
async def tape(pki: TestPKI) -> AsyncIterator[Make]:
    """Factory of door + frontend pairs: ``await tape(frontend_host="127.0.0.1")``."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0,
                           ssl_context=pki.server_ssl_context(require_client_cert=False))
        await site.start()
        return int(runner.addresses[0][1])

    async def make(frontend_host: str = "127.0.0.1") -> Tape:
        state = Tape("", "")

        async def frontend(request: web.Request) -> web.Response:
            state.seen.append(("frontend", request.path, request.headers.get("Authorization")))
            if state.refuse is not None:
                return web.json_response(
                    {"title": "Forbidden", "detail": "Permission denied"}, status=state.refuse,
                    headers={"WWW-Authenticate": 'Bearer error="insufficient_scope", '
                                                 'error_description="needs storage.stage"'})
            body = await request.json()
            return web.json_response([{"path": p, "locality": "TAPE"} for p in body["paths"]])

        front = web.Application()
        front.router.add_post("/api/v1/archiveinfo", frontend)
        front.router.add_post("/api/v1/release/{id}", frontend)
        front_port = await start(front)
        state.frontend = f"https://{frontend_host}:{front_port}/api/v1"

        async def discovery(request: web.Request) -> web.Response:
            state.seen.append(("door", request.path, request.headers.get("Authorization")))
            doc = {"sitename": "test", "endpoints": [{"uri": state.frontend, "version": "v1"}]}
            return web.Response(text=json.dumps(doc), content_type="application/json")

        door = web.Application()
        door.router.add_get(DISCOVERY_PATH, discovery)
        state.door = f"https://127.0.0.1:{await start(door)}"
        return state

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def token(tmp_path: Path) -> tuple[str, TokenSource]:
    """A storage.read-only token (no storage.stage) in a token file, and its source."""
    text = TokenIssuer("https://localhost:8443/issuer").mint("storage.read:/dune",
                                                             subject="bob")
    path = write_token(tmp_path / "bt_u1000", text)
    return text, TokenSource(FoundToken(text, "$BEARER_TOKEN_FILE", path))


async def test_discovery_and_a_frontend_on_the_doors_host_get_the_token(
    tape: Make, anonymous: aiohttp.ClientSession, token: tuple[str, TokenSource]
) -> None:
    """The door's discovery GET and the frontend (same host, another port) both carry
    ``Bearer <token>``."""
    text, source = token
    srv = await tape()
    client = TapeClient(anonymous, token=source)
    uri = await client.discover(srv.door)
    assert uri == srv.frontend and not uri.startswith(srv.door)
    await client.archiveinfo(uri, ["/dune/a"])
    assert srv.auth("door") == [f"Bearer {text}"]
    assert srv.auth("frontend") == [f"Bearer {text}"]


async def test_a_frontend_on_another_host_never_gets_the_token(
    tape: Make, anonymous: aiohttp.ClientSession, token: tuple[str, TokenSource],
    caplog: pytest.LogCaptureFixture
) -> None:
    """A discovery document naming a frontend on another host (localhost vs 127.0.0.1): the
    frontend gets no Authorization; a warning says so once, without the token."""
    caplog.set_level(logging.DEBUG)
    text, source = token
    srv = await tape(frontend_host="localhost")
    client = TapeClient(anonymous, token=source)
    uri = await client.discover(srv.door)
    await client.archiveinfo(uri, ["/dune/a"])
    await client.archiveinfo(uri, ["/dune/b"])
    assert srv.auth("door") == [f"Bearer {text}"]
    assert srv.auth("frontend") == [None, None]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is on another host" in warnings[0]
    assert text.split(".")[2] not in caplog.text


async def test_without_a_token_nothing_is_sent(
    tape: Make, anonymous: aiohttp.ClientSession
) -> None:
    """A client without a token sends no Authorization to the door or the frontend."""
    srv = await tape()
    client = TapeClient(anonymous)
    await client.archiveinfo(await client.discover(srv.door) or "", ["/dune/a"])
    assert srv.auth("door") == [None] and srv.auth("frontend") == [None]


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refusing_frontend_names_the_token_and_storage_stage(
    tape: Make, pki: TestPKI, token: tuple[str, TokenSource], status: int
) -> None:
    """Through TapeAccess (as runs use it): a 401/403 from the frontend is a CredentialError
    (exit 3) naming the token (where, issuer, subject, scopes), the server's bearer error and
    storage.stage; the token's text is not in it."""
    text, source = token
    srv = await tape()
    srv.refuse = status
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    async with TapeAccess(ctx, TapeSettings(), policy=NO_WAIT, token=source) as access:
        uri = await access.client.discover(srv.door)
        assert uri is not None
        with pytest.raises(CredentialError) as refused:
            await access.client.archiveinfo(uri, ["/dune/a"])
    message = str(refused.value)
    assert refused.value.exit_code == 3
    assert source.info.describe() in message
    assert "subject bob, scopes storage.read:/dune" in message
    assert "needs storage.stage" in message and "insufficient_scope" in message
    assert text not in message and text.split(".")[2] not in message
    assert srv.auth("frontend") == [f"Bearer {text}"]  # refused once, not retried


async def test_an_expired_token_sends_nothing_to_the_tape_api(
    tape: Make, anonymous: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A token that expired is not sent: the call raises the CredentialError (exit 3) before
    any request reaches the door."""
    text = TokenIssuer().mint(lifetime=-30)
    source = TokenSource(FoundToken(text, "$BEARER_TOKEN", None))
    srv = await tape()
    with pytest.raises(CredentialError, match="expired at"):
        await TapeClient(anonymous, token=source).discover(srv.door)
    assert srv.seen == []


async def test_releasing_recorded_pins_sends_the_token_to_the_doors_host(
    tape: Make, anonymous: aiohttp.ClientSession, token: tuple[str, TokenSource]
) -> None:
    """Without a discovery in this process (pins recorded by an earlier run), ``allow`` with a
    file URL on the door lets the token go to the frontend on its host, and only there."""
    text, source = token
    srv = await tape()
    client = TapeClient(anonymous, token=source)
    await client.release(srv.frontend, "r1", ["/dune/a"])  # nothing allowed yet: no token
    client.allow(f"{srv.door}/dune/a")
    await client.release(srv.frontend, "r2", ["/dune/a"])
    assert srv.auth("frontend") == [None, f"Bearer {text}"]
