"""Bearer tokens and SAM web (issue 14): with ``catalog.samweb.use_token`` every SAM request
carries the token (a renewed file included); without it (the default: SAM at Fermilab takes
certificates) none does; a refusal names the token, never its text.

A small aiohttp server on loopback plays SAM web over https (listing and access URLs),
recording each request's ``Authorization``; an ``http://`` SAM with ``use_token`` is a
configuration error, and no token is ever put on a plain-http request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Optional

import pytest
from aiohttp import web

from prestaged.catalog import Catalog, open_catalog
from prestaged.catalog import samweb as samweb_module
from prestaged.catalog.http import Call, catalog_ssl_context
from prestaged.config import CatalogConfig, SamWebConfig, load_config
from prestaged.errors import ConfigError, CredentialError
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import TokenIssuer, write_token
from prestaged.tokens import FoundToken, TokenSource

FILES = ("a.root", "b.root", "c.root")


class Sam:
    """The fake SAM web: ``refuse`` (a status) refuses everything; ``seen`` per request."""

    def __init__(self) -> None:
        self.seen: list[Optional[str]] = []
        self.refuse: Optional[int] = None
        self.base = ""
        self.tls: Optional[ssl.SSLContext] = None
        """The client TLS context that trusts it."""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization"))
        if self.refuse is not None:
            return web.json_response(
                {"error": "Unauthorized", "message": "no valid credentials"},
                status=self.refuse,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token", '
                                             'error_description="audience mismatch"'})
        if request.path.endswith("/files/list"):
            return web.Response(text="".join(f"{f} {i} 10 0\n" for i, f in enumerate(FILES)))
        name = request.match_info.get("name", "")
        return web.json_response([f"https://door.example:2880/dune/{name}"])


async def _serve(fake: Sam, tls: Optional[ssl.SSLContext]) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/sam/dune/api/definitions/name/{definition}/files/list", fake.handle)
    app.router.add_get("/sam/dune/api/files/name/{name}/locations/url", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    scheme = "https" if tls is not None else "http"
    fake.base = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/sam/dune/api"
    return runner


@pytest.fixture
async def sam(pki: TestPKI) -> AsyncIterator[Sam]:
    """The fake SAM web on 127.0.0.1 over https (no client certificate asked), experiment
    dune."""
    fake = Sam()
    fake.tls = catalog_ssl_context(None, pki.ca_dir)
    runner = await _serve(fake, pki.server_ssl_context(require_client_cert=False))
    yield fake
    await runner.cleanup()


def _catalog(sam: Sam, *, use_token: bool) -> CatalogConfig:
    return CatalogConfig(samweb=SamWebConfig(base_url=sam.base, url_mode="access-url",
                                             use_token=use_token, retry_for=0.0))


def _open(sam: Sam, *, use_token: bool, token: Optional[TokenSource] = None) -> Catalog:
    return open_catalog("samweb", "ds", _catalog(sam, use_token=use_token),
                        ssl_context=sam.tls, token=token)


def _token(path: Path, text: str) -> TokenSource:
    write_token(path, text)
    return TokenSource(FoundToken(text, "--token-file", path), recheck=0.0, settle=0.0)


async def test_use_token_sends_it_with_every_request_and_follows_renewals(
    sam: Sam, tmp_path: Path
) -> None:
    """use_token = true: the listing and every access-URL request carry ``Bearer <token>``;
    after the token file is rewritten, the next listing carries the new one."""
    issuer = TokenIssuer()
    first, second = issuer.mint(), issuer.mint(subject="renewed")
    token = _token(tmp_path / "bt", first)
    catalog = _open(sam, use_token=True, token=token)
    assert [r.name async for r in catalog.files()] == list(FILES)
    assert sam.seen == [f"Bearer {first}"] * (1 + len(FILES))
    write_token(tmp_path / "bt", second)
    sam.seen.clear()
    assert len([r async for r in catalog.files()]) == len(FILES)
    assert sam.seen == [f"Bearer {second}"] * (1 + len(FILES))


async def test_by_default_sam_gets_no_token(sam: Sam, tmp_path: Path) -> None:
    """use_token = false (the default): a token found for the storage is not sent to SAM."""
    assert SamWebConfig().use_token is False
    token = _token(tmp_path / "bt", TokenIssuer().mint())
    catalog = _open(sam, use_token=False, token=token)
    assert len([r async for r in catalog.files()]) == len(FILES)
    assert sam.seen == [None] * (1 + len(FILES))


def test_use_token_without_a_token_is_a_credential_error(sam: Sam) -> None:
    """use_token = true but no token found: CredentialError (exit 3) naming the key."""
    with pytest.raises(CredentialError, match=r"catalog\.samweb\.use_token"):
        _open(sam, use_token=True)


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_token_names_the_token_not_its_text(
    sam: Sam, tmp_path: Path, status: int
) -> None:
    """SAM refusing the token: exit 3 naming the token (issuer, subject, scopes) and the
    server's bearer error; the token's text is not in the message."""
    text = TokenIssuer().mint("storage.read:/dune", subject="carol")
    token = _token(tmp_path / "bt", text)
    sam.refuse = status
    catalog = _open(sam, use_token=True, token=token)
    with pytest.raises(CredentialError) as refused:
        [r async for r in catalog.files()]
    message = str(refused.value)
    assert token.info.describe() in message and "subject carol" in message
    assert "invalid_token: audience mismatch" in message
    assert text.split(".")[2] not in message


def test_use_token_with_an_http_sam_is_a_config_error(tmp_path: Path) -> None:
    """use_token = true and an http:// base_url (in the config, or $SAM_WEB_BASE_URL): exit 2
    naming the key or the variable; the token would have gone in clear."""
    config = tmp_path / "prestaged.toml"
    config.write_text('[catalog.samweb]\nbase_url = "http://sam.example/sam/dune/api"\n'
                      "use_token = true\n")
    with pytest.raises(ConfigError, match=r"catalog\.samweb\.base_url: an http:// URL, and "
                       r"catalog\.samweb\.use_token = true would send the bearer token to it "
                       r"in clear; give an https:// URL") as err:
        load_config(config)
    assert err.value.exit_code == 2
    token = _token(tmp_path / "bt", TokenIssuer().mint())
    cfg = SamWebConfig(use_token=True, url_mode="access-url")
    with pytest.raises(ConfigError, match=r"^\$SAM_WEB_BASE_URL: an http:// URL, and "):
        samweb_module.SamWebCatalog("ds", cfg, token=token,
                                    env={"SAM_WEB_BASE_URL": "http://sam.example/sam/dune/api"})


async def test_a_token_is_never_put_on_a_plain_http_request(tmp_path: Path) -> None:
    """Past the configuration checks (a last guard): a request to an http:// SAM that would
    carry the token is refused before it is sent; the server sees nothing."""
    fake = Sam()
    runner = await _serve(fake, None)
    try:
        token = _token(tmp_path / "bt", TokenIssuer().mint())
        cfg = SamWebConfig(url_mode="access-url", retry_for=0.0)
        api = samweb_module._Api(fake.base, "dune", cfg, None, None, asyncio.sleep, token)
        async with api:
            with pytest.raises(ConfigError, match="not sending the bearer token to a http:// "
                                                  "URL"):
                await api.fetch(Call("listing"), api.url("definitions", "name", "ds", "files",
                                                         "list"))
    finally:
        await runner.cleanup()
    assert fake.seen == []
