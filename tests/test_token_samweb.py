"""Bearer tokens and SAM web (issue 14): with ``catalog.samweb.use_token`` every SAM request
carries the token (a renewed file included); without it (the default: SAM at Fermilab takes
certificates) none does; a refusal names the token, never its text.

A small aiohttp server on loopback plays SAM web (listing and access URLs), recording each
request's ``Authorization``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Optional

import pytest
from aiohttp import web

from prestaged.catalog import open_catalog
from prestaged.config import CatalogConfig, SamWebConfig
from prestaged.errors import CredentialError
from prestaged.testing.tokens import TokenIssuer, write_token
from prestaged.tokens import FoundToken, TokenSource

FILES = ("a.root", "b.root", "c.root")


class Sam:
    """The fake SAM web: ``refuse`` (a status) refuses everything; ``seen`` per request."""

    def __init__(self) -> None:
        self.seen: list[Optional[str]] = []
        self.refuse: Optional[int] = None
        self.base = ""

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


@pytest.fixture
async def sam() -> AsyncIterator[Sam]:
    """The fake SAM web on 127.0.0.1 (plain HTTP), experiment dune."""
    fake = Sam()
    app = web.Application()
    app.router.add_get("/sam/dune/api/definitions/name/{definition}/files/list", fake.handle)
    app.router.add_get("/sam/dune/api/files/name/{name}/locations/url", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base = f"http://127.0.0.1:{runner.addresses[0][1]}/sam/dune/api"
    yield fake
    await runner.cleanup()


def _catalog(sam: Sam, *, use_token: bool) -> CatalogConfig:
    return CatalogConfig(samweb=SamWebConfig(base_url=sam.base, url_mode="access-url",
                                             use_token=use_token, retry_for=0.0))


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
    cfg = _catalog(sam, use_token=True)
    catalog = open_catalog("samweb", "ds", cfg, token=token)
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
    catalog = open_catalog("samweb", "ds", _catalog(sam, use_token=False), token=token)
    assert len([r async for r in catalog.files()]) == len(FILES)
    assert sam.seen == [None] * (1 + len(FILES))


def test_use_token_without_a_token_is_a_credential_error(sam: Sam) -> None:
    """use_token = true but no token found: CredentialError (exit 3) naming the key."""
    with pytest.raises(CredentialError, match=r"catalog\.samweb\.use_token"):
        open_catalog("samweb", "ds", _catalog(sam, use_token=True))


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_token_names_the_token_not_its_text(
    sam: Sam, tmp_path: Path, status: int
) -> None:
    """SAM refusing the token: exit 3 naming the token (issuer, subject, scopes) and the
    server's bearer error; the token's text is not in the message."""
    text = TokenIssuer().mint("storage.read:/dune", subject="carol")
    token = _token(tmp_path / "bt", text)
    sam.refuse = status
    catalog = open_catalog("samweb", "ds", _catalog(sam, use_token=True), token=token)
    with pytest.raises(CredentialError) as refused:
        [r async for r in catalog.files()]
    message = str(refused.value)
    assert token.info.describe() in message and "subject carol" in message
    assert "invalid_token: audience mismatch" in message
    assert text.split(".")[2] not in message
