"""No catalog credential travels in clear: the client every catalog shares (``catalog.http``)
puts none of ``SECRET_HEADERS`` (the bearer token, the MetaCat token, Rucio's token and
password) on a request to an ``http://`` URL, whatever the configuration let through, and
follows no redirect from https to http with one. Real servers on 127.0.0.1: an https one with
the test CA, and a plain-http one recording what reaches it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Callable, Optional

import pytest
from aiohttp import web

from prestaged.catalog.http import (
    SECRET_HEADERS,
    Call,
    HttpApi,
    RetrySettings,
    catalog_ssl_context,
)
from prestaged.catalog.metacat import _MetaCatApi
from prestaged.config import MetaCatConfig
from prestaged.errors import CatalogError, ConfigError
from prestaged.testing.pki import TestPKI

SECRET = "s3cr3t-never-in-clear"
HEADERS = ["Authorization", "X-Authentication-Token", "X-Rucio-Auth-Token", "X-Rucio-Password",
           "x-rucio-auth-token"]
"""Every credential header, and one written in another case (header names are not)."""


class _Recorder:
    """A server's record: the headers of every request that reached it; ``redirect_to``
    makes it answer 307 to that URL instead of 200 ``{}``."""

    def __init__(self) -> None:
        self.seen: list[Mapping[str, str]] = []
        self.redirect_to: Optional[str] = None
        self.url = ""
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.json_response({})


Serve = Callable[[Optional[ssl.SSLContext]], Awaitable[_Recorder]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(tls)``: a started recording server (https with ``tls``, else http);
    stopped after the test."""
    runners: list[web.AppRunner] = []

    async def start(tls: Optional[ssl.SSLContext]) -> _Recorder:
        recorder = _Recorder()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recorder.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
        recorder.port = runner.addresses[0][1]
        recorder.url = f"{'https' if tls else 'http'}://127.0.0.1:{recorder.port}"
        return recorder

    yield start
    for runner in runners:
        await runner.cleanup()


class _Api(HttpApi):
    """A catalog client whose every request carries ``header: SECRET``; no retries."""

    service = "Test catalog"

    def __init__(self, base_url: str, header: str, tls: Optional[ssl.SSLContext]) -> None:
        super().__init__(base_url, RetrySettings(10.0, 0.0, 0.0, 0.0, "catalog.test"), tls,
                         limit=1)
        self.header = header

    async def headers_for(self, call: Call) -> Optional[Mapping[str, str]]:
        return {self.header: SECRET}


@pytest.mark.parametrize("header", HEADERS)
async def test_no_credential_header_goes_to_an_http_url(serve: Serve, header: str) -> None:
    """A request to an http:// URL that would carry any credential header is refused before
    it is sent (exit 2), naming what it would have carried, never its value."""
    plain = await serve(None)
    async with _Api(plain.url, header, None) as api:
        with pytest.raises(ConfigError) as err:
            await api.fetch(Call("listing"), api.url("list"), retry=False)
    assert plain.seen == []
    assert str(err.value) == (
        f"Test catalog {plain.url}: not sending {SECRET_HEADERS[header.lower()]} to a http:// "
        "URL (in clear); credentials go over https only")
    assert err.value.exit_code == 2 and SECRET not in str(err.value)


async def test_the_metacat_client_sends_no_metacat_token_to_an_http_url(serve: Serve) -> None:
    """MetaCat's own client, given a MetaCat token and an http:// URL (past the config
    checks): refused before anything is sent."""
    plain = await serve(None)
    api = _MetaCatApi(f"{plain.url}/app", MetaCatConfig(retry_for=0), None,
                      metacat_token=(SECRET, "MetaCat token /t"), token=None, sleep=asyncio.sleep)
    async with api:
        with pytest.raises(ConfigError, match="not sending the MetaCat token to a http:// URL"):
            await api.fetch(Call("reading"), api.url("data", "dataset"), retry=False)
    assert plain.seen == []


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("target", ["another-port", "same-port"])
async def test_a_redirect_to_http_is_not_followed_with_a_credential(
        serve: Serve, pki: TestPKI, header: str, target: str) -> None:
    """An https catalog answering 307 to an http:// URL (another port, or its own host and
    port: only the scheme differs): a catalog error naming the target; nothing is sent there,
    the credential least of all."""
    origin = await serve(pki.server_ssl_context(require_client_cert=False))
    plain = await serve(None)
    port = plain.port if target == "another-port" else origin.port
    origin.redirect_to = f"http://127.0.0.1:{port}/moved"
    async with _Api(origin.url, header, catalog_ssl_context(None, pki.ca_dir)) as api:
        with pytest.raises(CatalogError) as err:
            await api.fetch(Call("listing"), api.url("list"), retry=False)
    assert str(err.value) == (
        f"Test catalog {origin.url} redirected listing to http://127.0.0.1:{port}/moved: not "
        "followed, since the credentials we send it would go along; point the catalog's url at "
        "that server")
    assert len(origin.seen) == 1 and plain.seen == []
    assert SECRET not in str(err.value)
