"""Unit tests of the SAM web catalog: URL building, rewrite rules, error mapping, retries.

aioresponses stands in for SAM here (no sockets); ``test_samweb_integration.py`` runs the same
client against the emulator over real TLS.
"""

from __future__ import annotations

import ast
import asyncio
import re
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mocks import aioresponses
from yarl import URL

from prestaged import net
from prestaged.catalog import KINDS, open_catalog
from prestaged.catalog import http as catalog_http
from prestaged.catalog import samweb as samweb_module
from prestaged.catalog.rewrite import Rewriter, location_kind, strip_tape_suffix
from prestaged.catalog.samweb import SamWebCatalog, resolve_base_url
from prestaged.config import CatalogConfig, RewriteRule, SamWebConfig, load_config
from prestaged.errors import CatalogError, ConfigError, CredentialError
from prestaged.model import FileRef
from prestaged.retry import RetryPolicy

BASE = "https://sam.example:8483/sam/dune/api"
DOOR = "https://fndca1.fnal.gov:2880/pnfs/fnal.gov/usr/dune/"
RULES = (
    RewriteRule("enstore:/pnfs/dune/", DOOR),
    RewriteRule("dcache:/pnfs/dune/", DOOR),
)
LIST_URL = re.compile(r"^https://sam\.example:8483/sam/dune/api/definitions/name/[^/]+/files/list")
LOCATIONS_URL = re.compile(r"^https://sam\.example:8483/sam/dune/api/files/locations\?")
COUNT_URL = re.compile(r"^https://sam\.example:8483/sam/dune/api/definitions/name/[^/]+/files/count")


class _Sleeps:
    """Records backoff delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _cfg(**kw: Any) -> SamWebConfig:
    base: dict[str, Any] = {"base_url": BASE, "rewrite": RULES, "retry_initial": 1.0,
                            "retry_max": 60.0, "retry_for": 3600.0}
    base.update(kw)
    return SamWebConfig(**base)


def _catalog(definition: str = "mydef", sleep: _Sleeps | None = None, **kw: Any) -> SamWebCatalog:
    dims = kw.pop("dims", None)
    identity = kw.pop("identity", None)
    return SamWebCatalog(definition, _cfg(**kw), None, dims=dims, identity=identity, env={},
                         sleep=sleep or _Sleeps())


def _locations(names: list[str], location: str = "enstore:/pnfs/dune/tape_backed/x(1@vr1)"
               ) -> dict[str, Any]:
    return {n: [{"location": location, "full_path": strip_tape_suffix(location)}] for n in names}


async def _all(files: AsyncIterator[FileRef]) -> list[FileRef]:
    return [ref async for ref in files]


def _calls(m: aioresponses, method: str = "GET") -> list[tuple[URL, Any]]:
    return [(url, call) for (meth, url), calls in m.requests.items() if meth == method
            for call in calls]


# --- base URL -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "env", "expected"),
    [
        ({"base_url": "https://x.example/sam/uboone/dev/api/"}, {"SAM_WEB_BASE_URL": "https://no/"},
         ("https://x.example/sam/uboone/dev/api", "uboone")),
        ({}, {"SAM_WEB_BASE_URL": "https://y.example:8483/sam/nova/api", "SAM_EXPERIMENT": "nova"},
         ("https://y.example:8483/sam/nova/api", "nova")),
        ({"experiment": "dune"}, {"SAM_EXPERIMENT": "nova"},
         ("https://samweb.fnal.gov:8483/sam/dune/api", "dune")),
        ({}, {"SAM_EXPERIMENT": "mu2e", "SAM_WEB_HOST": "sammu2e.fnal.gov"},
         ("https://sammu2e.fnal.gov:8483/sam/mu2e/api", "mu2e")),
        ({"experiment": "dune", "host": "127.0.0.1:9999"}, {},
         ("https://127.0.0.1:9999/sam/dune/api", "dune")),
    ],
)
def test_base_url_order(cfg: dict[str, Any], env: dict[str, str], expected: tuple[str, str]) -> None:
    """base_url beats $SAM_WEB_BASE_URL beats https://<host>:8483/sam/<experiment>/api."""
    assert resolve_base_url(SamWebConfig(**cfg), env) == expected


def test_base_url_needs_an_experiment() -> None:
    """Nothing naming the experiment is a config error (exit 2) that says how to fix it."""
    with pytest.raises(ConfigError, match=r"no experiment.*--experiment.*\$SAM_EXPERIMENT"):
        resolve_base_url(SamWebConfig(), {})


def test_rewrite_mode_needs_rules() -> None:
    """url_mode = rewrite without rules fails before any request, pointing at the examples."""
    with pytest.raises(ConfigError, match=r"catalog\.samweb\.rewrite: no rules"):
        SamWebCatalog("d", SamWebConfig(base_url=BASE), env={})
    assert "samweb" in KINDS
    cat = open_catalog("samweb", "d", CatalogConfig(samweb=_cfg()))
    assert cat.name == "samweb" and cat.definition == "d"


def test_dims_only_with_samweb() -> None:
    """--dims with the local catalog is a usage error."""
    with pytest.raises(ConfigError, match="--dims needs the samweb catalog"):
        open_catalog("local", "x", CatalogConfig(), dims="run_number 1")


# --- rewrite rules ------------------------------------------------------------------------------


def test_rewrite_strips_tape_suffix_and_appends_name() -> None:
    """The issue's example: tape suffix removed, prefix replaced, file name appended."""
    r = Rewriter(RULES)
    url = r.url_for("a.root", ["enstore:/pnfs/dune/tape_backed/x(597@vr0337m8)"])
    assert url == DOOR + "tape_backed/x/a.root"
    assert strip_tape_suffix("enstore:/pnfs/a/b(12@vr1m8) ") == "enstore:/pnfs/a/b"
    assert strip_tape_suffix("dcache:/pnfs/a/(b)/c") == "dcache:/pnfs/a/(b)/c"
    assert location_kind("rucio:protodune-sp") == "rucio" and location_kind("/x") == ""


def test_rewrite_first_rule_wins_over_location_order() -> None:
    """Rules are preferences: the first rule matching any location wins, whatever their order."""
    disk_first = Rewriter([RewriteRule("dcache:/pnfs/dune/", "https://disk/"),
                           RewriteRule("enstore:/pnfs/dune/", "https://tape/")])
    locs = ["enstore:/pnfs/dune/t/x(1@v)", "dcache:/pnfs/dune/d/x"]
    assert disk_first.url_for("f", locs) == "https://disk/d/x/f"
    two = Rewriter([RewriteRule("enstore:/pnfs/dune/tape_backed/", "https://special/"),
                    RewriteRule("enstore:/pnfs/dune/", "https://general/")])
    assert two.url_for("f", ["enstore:/pnfs/dune/tape_backed/y"]) == "https://special/y/f"
    assert two.url_for("f", ["enstore:/pnfs/dune/other/y"]) == "https://general/other/y/f"


def test_rewrite_no_match_and_component_boundaries() -> None:
    """Unknown prefixes give None; a prefix without a trailing / stops at path components."""
    r = Rewriter([RewriteRule("enstore:/pnfs/dune", "https://door/dune")])
    assert r.url_for("f", ["enstore:/pnfs/dune/x"]) == "https://door/dune/x/f"
    assert r.url_for("f", ["enstore:/pnfs/dune"]) == "https://door/dune/f"
    assert r.url_for("f", ["enstore:/pnfs/dunepro/x"]) is None
    assert r.url_for("f", ["cern-eos:/eos/x", "rucio:protodune-sp"]) is None
    assert r.url_for("f", []) is None
    kind_only = Rewriter([RewriteRule("enstore:", "https://door/pnfs/fnal.gov/usr/")])
    assert kind_only.url_for("f", ["enstore:/pnfs/x/y(1@v)"]) == "https://door/pnfs/fnal.gov/usr/pnfs/x/y/f"


def test_rewrite_escapes_url_syntax_in_names() -> None:
    """Spaces, # and ? in locations or names are percent-encoded, not taken as URL syntax."""
    r = Rewriter([RewriteRule("dcache:/pnfs/", "https://door/")])
    assert r.url_for("a b#1?.root", ["dcache:/pnfs/my dir"]) == "https://door/my%20dir/a%20b%231%3F.root"


# --- config: arrays of tables -----------------------------------------------------------------


def test_rewrite_tables_load_in_order(tmp_path: Path) -> None:
    """[[catalog.samweb.rewrite]] tables become RewriteRules, in file order."""
    path = tmp_path / "c.toml"
    path.write_text('[catalog.samweb]\nexperiment = "dune"\nbatch = 50\n'
                    '[[catalog.samweb.rewrite]]\nlocation = "dcache:/pnfs/dune/"\nurl = "https://a/"\n'
                    '[[catalog.samweb.rewrite]]\nlocation = "enstore:"\nurl = "https://b/"\n')
    cfg = load_config(path).catalog.samweb
    assert cfg.rewrite == (RewriteRule("dcache:/pnfs/dune/", "https://a/"),
                           RewriteRule("enstore:", "https://b/"))
    assert cfg.batch == 50 and cfg.experiment == "dune"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[catalog.samweb.rewrite]]\nlocation = "a:/x"\nurl = "https://a/"\n'
         '[[catalog.samweb.rewrite]]\nlocation = "b:/x"\nurl = "https://b/"\n'
         '[[catalog.samweb.rewrite]]\nlocation = "c:/x"\nurl = "fndca1:2880/pnfs"\n',
         'catalog.samweb.rewrite[2].url: expected a URL base such as'),
        ('[[catalog.samweb.rewrite]]\nlocation = "/pnfs/dune/"\nurl = "https://a/"\n',
         'catalog.samweb.rewrite[0].location: expected a SAM location prefix'),
        ('[[catalog.samweb.rewrite]]\nlocation = "a:/x"\n',
         "catalog.samweb.rewrite[0].url: required key missing"),
        ('[[catalog.samweb.rewrite]]\nlocation = "a:/x"\nuri = "https://a/"\n',
         "unknown key catalog.samweb.rewrite[0].uri (did you mean catalog.samweb.rewrite[0].url?)"),
        ("[catalog.samweb]\nrewrite = 3\n",
         "catalog.samweb.rewrite: expected an array of tables ([[catalog.samweb.rewrite]])"),
        ('[catalog.samweb]\nurl_mode = "magic"\n',
         'catalog.samweb.url_mode: expected one of "rewrite", "access-url", got "magic"'),
        ("[catalog.samweb]\nparallel = 0\n", "catalog.samweb.parallel: expected an integer from 1 to 64"),
        ('[catalog.samweb]\nbase_url = "samweb.fnal.gov"\n', "catalog.samweb.base_url: expected an http(s) URL"),
    ],
)
def test_samweb_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Bad [catalog.samweb] values and rules name the key path, with the rule's index."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


# --- URL building ---------------------------------------------------------------------------------


async def test_definition_listing_and_bulk_locations_requests() -> None:
    """Listing asks format=plain&fileinfo=1; names go in batches as repeated file_name params."""
    names = [f"f{i}.root" for i in range(5)]
    listing = "".join(f"{n} {i} {100 + i} 7\n" for i, n in enumerate(names))
    with aioresponses() as m:
        m.get(LIST_URL, body=listing, content_type="text/plain")
        m.get(LOCATIONS_URL, payload=_locations(names[:2]))
        m.get(LOCATIONS_URL, payload=_locations(names[2:4]))
        m.get(LOCATIONS_URL, payload=_locations(names[4:]))
        refs = await _all(_catalog("my def/2", batch=2).files())
        calls = _calls(m)
    assert [r.name for r in refs] == names
    assert refs[0] == FileRef("f0.root", DOOR + "tape_backed/x/f0.root", 100)
    listed = [u for u, _ in calls if "/files/list" in str(u)]
    assert len(listed) == 1
    assert listed[0].raw_path == "/sam/dune/api/definitions/name/my%20def%2F2/files/list"
    assert listed[0].query == {"fileinfo": "1", "format": "plain"}
    batches = [c.kwargs["params"] for u, c in calls if "/files/locations" in str(u)]
    assert batches == [[("file_name", "f0.root"), ("file_name", "f1.root")],
                       [("file_name", "f2.root"), ("file_name", "f3.root")],
                       [("file_name", "f4.root")]]
    # The locations calls ask for JSON (the order of aioresponses' record is not the order
    # of the requests on every version).
    located = [c.kwargs["headers"] for u, c in calls if "/files/locations" in str(u)]
    assert [h["Accept"] for h in located] == ["application/json"] * 3


async def test_short_dims_get_long_dims_post() -> None:
    """--dims up to 1024 chars is a GET query; longer ones are POSTed as a form, like samweb."""
    short = "run_number 1234 and data_tier raw"
    long = "file_name " + ",".join(f"f{i}.root" for i in range(200))
    assert len(long) > 1024
    with aioresponses() as m:
        m.get(re.compile(r".*/files/list\?"), body="a.root\n", content_type="text/plain")
        m.post(re.compile(r".*/files/list\?"), body="b.root\n", content_type="text/plain")
        m.get(LOCATIONS_URL, payload=_locations(["a.root"]))
        assert [r.name for r in await _all(_catalog(short, dims=short).files())] == ["a.root"]
        m.get(LOCATIONS_URL, payload=_locations(["b.root"]))
        assert [r.name for r in await _all(_catalog("q", dims=long).files())] == ["b.root"]
        gets, posts = _calls(m, "GET"), _calls(m, "POST")
    listed = [u for u, _ in gets if "/files/list" in str(u)]
    assert listed[0].path == "/sam/dune/api/files/list" and listed[0].query["dims"] == short
    assert len(posts) == 1
    url, call = posts[0]
    assert "dims" not in url.query and call.kwargs["data"] == {"dims": long}


async def test_estimate_counts_once_without_retry() -> None:
    """estimate() reads files/count; a 503 there means "unknown" (None) after one request."""
    with aioresponses() as m:
        m.get(COUNT_URL, body="5001\n", content_type="text/plain")
        m.get(COUNT_URL, status=503)
        assert await _catalog().estimate() == 5001
        assert await _catalog().estimate() is None
        assert len(_calls(m)) == 2
    assert await _catalog("q", dims="x" * 2000).estimate() is None  # too long to GET


async def test_access_url_mode() -> None:
    """url_mode access-url asks SAM per file; unknown files and no URL are unresolved."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, body="a\nb c\nc\n", content_type="text/plain")
        m.get(re.compile(r".*/files/name/a/locations/url\?schema=https$"),
              payload=["https://door/x/a", "https://other/x/a"])
        m.get(re.compile(r".*/files/name/b/locations/url\?schema=https$"), status=404,
              payload={"error": "FileNotFound", "message": "File b not found"})
        m.get(re.compile(r".*/files/name/c/locations/url\?schema=https$"), payload=[])
        cat = _catalog(sleep=sleeps, url_mode="access-url", rewrite=())
        refs = await _all(cat.files())
    assert refs == [FileRef("a", "https://door/x/a")]
    assert [(u.name, u.reason) for u in cat.unresolved] == [
        ("b", "SAM does not know the file"), ("c", "SAM has no https URL for it")]
    assert cat.unresolved_count == 2 and sleeps.delays == []


# --- unresolved files -------------------------------------------------------------------------


async def test_unresolved_are_counted_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files without a matching location are kept (capped) with their locations, all counted."""
    monkeypatch.setattr(catalog_http, "MAX_UNRESOLVED_KEPT", 2)
    names = ["ok", "eos1", "eos2", "eos3", "none"]
    doc = {**_locations(["ok"]), **_locations(["eos1", "eos2", "eos3"], "cern-eos:/eos/x"),
           "none": []}
    with aioresponses() as m:
        m.get(LIST_URL, body="\n".join(names) + "\n", content_type="text/plain")
        m.get(LOCATIONS_URL, payload=doc)
        cat = _catalog()
        refs = await _all(cat.files())
    assert [r.name for r in refs] == ["ok"]
    assert cat.unresolved_count == 4 and cat.listed == 5
    assert [u.to_dict() for u in cat.unresolved] == [
        {"name": "eos1", "locations": ["cern-eos:/eos/x"],
         "reason": "no rewrite rule matches its locations"},
        {"name": "eos2", "locations": ["cern-eos:/eos/x"],
         "reason": "no rewrite rule matches its locations"},
    ]


# --- errors and retries ---------------------------------------------------------------------------


async def test_unknown_definition_one_line_exit_4() -> None:
    """404 DefinitionNotFound: "definition 'x' not found in SAM (dune)" plus SAM's message."""
    with aioresponses() as m:
        m.get(LIST_URL, status=404, payload={"message": "Definition x not found",
                                             "error": "DefinitionNotFound"})
        with pytest.raises(CatalogError) as err:
            await _all(_catalog("x").files())
        assert len(_calls(m)) == 1
    assert str(err.value) == "definition 'x' not found in SAM (dune): Definition x not found"
    assert err.value.exit_code == 4


async def test_dimension_error_is_not_retried() -> None:
    """400 DimensionError is final: one request, SAM's message, exit 4."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(re.compile(r".*/files/list\?"), status=400,
              payload={"message": "Unable to parse 'run_numbr'", "error": "DimensionError"})
        with pytest.raises(CatalogError, match=r"SAM \(dune\) rejected the dimensions: "
                                               r"Unable to parse 'run_numbr'"):
            await _all(_catalog("q", sleeps, dims="run_numbr 1").files())
        assert len(_calls(m)) == 1
    assert sleeps.delays == []


@pytest.mark.parametrize(
    ("status", "payload", "kind", "pattern"),
    [
        (403, {"message": "Forbidden", "error": "AuthorizationError"}, CredentialError,
         r"refused listing the files of definition 'mydef' anonymously.*--proxy"),
        (401, None, CredentialError, r"HTTP 401"),
        (414, None, CatalogError, r"refused listing .*: request too long \(HTTP 414"),
        (409, {"message": "busy", "error": "Conflict"}, CatalogError,
         r"SAM \(dune\) failed listing the files of definition 'mydef': HTTP 409 Conflict: busy"),
    ],
)
async def test_4xx_errors_are_final(status: int, payload: Any, kind: type[Exception],
                                    pattern: str) -> None:
    """Every 4xx is answered at once with one line (401/403 as credential errors, exit 3)."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, status=status, payload=payload)
        with pytest.raises(kind, match=pattern):
            await _all(_catalog(sleep=sleeps).files())
        assert len(_calls(m)) == 1
    assert sleeps.delays == []


async def test_5xx_and_connection_errors_retry_with_backoff() -> None:
    """503, 500 and a dropped connection are retried (1 s doubling); then the listing works."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, status=503)
        m.get(LIST_URL, status=500, body="<html><body>Internal error</body></html>",
              content_type="text/html")
        m.get(LIST_URL, exception=aiohttp.ClientConnectionError("connection reset"))
        m.get(LIST_URL, status=429, headers={"Retry-After": "7"})
        m.get(LIST_URL, body="a\n", content_type="text/plain")
        m.get(LOCATIONS_URL, status=502)
        m.get(LOCATIONS_URL, payload=_locations(["a"]))
        refs = await _all(_catalog(sleep=sleeps).files())
    assert [r.name for r in refs] == ["a"]
    assert len(sleeps.delays) == 5
    assert 1.0 <= sleeps.delays[0] <= 1.5 and 2.0 <= sleeps.delays[1] <= 3.0
    assert 4.0 <= sleeps.delays[2] <= 6.0 and sleeps.delays[3] == 7.0  # Retry-After
    assert 1.0 <= sleeps.delays[4] <= 1.5  # the locations request has its own budget


async def test_an_html_page_answered_200_is_no_listing() -> None:
    """A login or maintenance page a front end answers 200 text/html is refused, naming the
    URL and the type; no line of it is looked up as a file."""
    with aioresponses() as m:
        m.get(LIST_URL, body="<html>\n<body>Sign in</body>\n</html>\n", content_type="text/html")
        with pytest.raises(CatalogError) as err:
            await _all(_catalog(retry_for=0.0).files())
        assert len(_calls(m)) == 1
    assert str(err.value) == (
        f"SAM web {BASE}/definitions/name/mydef/files/list answered listing the files of "
        "definition 'mydef' with text/html, not the text/plain list of files (a login or "
        "maintenance page in front of SAM?); check catalog.samweb.base_url")
    with aioresponses() as m:  # SAM documents no type: anything but a web page is read
        m.get(LIST_URL, body="a\n", content_type="application/octet-stream")
        m.get(LOCATIONS_URL, payload=_locations(["a"]))
        assert [r.name for r in await _all(_catalog(retry_for=0.0).files())] == ["a"]


async def test_retries_bounded_by_time() -> None:
    """With retry_for = 0 a 503 is not retried; the error names the server and the cause."""
    with aioresponses() as m:
        m.get(LIST_URL, status=503, payload={"message": "Database unavailable", "error": "DBError"})
        with pytest.raises(CatalogError) as err:
            await _all(_catalog(retry_for=0.0).files())
        assert len(_calls(m)) == 1
    message = str(err.value)
    assert message.startswith(f"SAM web {BASE} unreachable while listing the files of definition")
    assert "HTTP 503 DBError: Database unavailable" in message and "gave up after 1 try" in message
    assert err.value.exit_code == 4


async def test_retry_for_zero_never_retries_even_with_zero_backoff() -> None:
    """retry_for = 0 means "never retry" also when the backoff is 0 s (no retry at elapsed 0)."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, status=503)
        m.get(LIST_URL, body="a\n", content_type="text/plain")
        with pytest.raises(CatalogError, match="gave up after 1 try"):
            await _all(_catalog(sleep=sleeps, retry_initial=0.0, retry_max=0.0,
                                retry_for=0.0).files())
        assert len(_calls(m)) == 1
    assert sleeps.delays == []


async def test_retry_after_beyond_retry_max_is_capped_not_fatal() -> None:
    """A Retry-After longer than retry_max waits retry_max and retries (the documented cap)."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, status=503, headers={"Retry-After": "600"})
        m.get(LIST_URL, body="a\n", content_type="text/plain")
        m.get(LOCATIONS_URL, payload=_locations(["a"]))
        refs = await _all(_catalog(sleep=sleeps, retry_max=60.0).files())
    assert [r.name for r in refs] == ["a"] and sleeps.delays == [60.0]


async def test_samweb_backoff_is_the_retry_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SAM web wait is RetryPolicy.delay's answer: one backoff formula in the project."""
    asked: list[tuple[int, float | None]] = []
    policy_delay = RetryPolicy.delay

    def spy(self: RetryPolicy, retry: int, **kw: Any) -> float | None:
        asked.append((retry, kw.get("retry_after")))
        return policy_delay(self, retry, rand=lambda: 1.0, **kw)

    monkeypatch.setattr(RetryPolicy, "delay", spy)
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, status=503)
        m.get(LIST_URL, status=500)
        m.get(LIST_URL, status=429, headers={"Retry-After": "7"})
        m.get(LIST_URL, body="a\n", content_type="text/plain")
        m.get(LOCATIONS_URL, payload=_locations(["a"]))
        await _all(_catalog(sleep=sleeps).files())
    assert asked == [(1, None), (2, None), (3, 7.0)]
    assert sleeps.delays == [1.5, 3.0, 7.0]  # initial 1 s doubling, jitter at its 50% top


def test_retry_policy_delay_without_an_attempt() -> None:
    """RetryPolicy.delay: doubling to max plus jitter, Retry-After, and the three bounds."""
    p = RetryPolicy(attempts=10, initial=1.0, max=8.0, jitter=0.5, total=100.0,
                    max_retry_after=30.0)
    assert [p.delay(k, rand=lambda: 0.0) for k in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert p.delay(2, rand=lambda: 1.0) == 3.0
    assert p.delay(1, retry_after=20.0) == 20.0
    assert p.delay(1, retry_after=0.0) == 1.0  # MIN_RETRY_AFTER: never a burst of tries
    assert p.delay(1, retry_after=31.0) is None  # asks for more than max_retry_after
    assert p.delay(10, rand=lambda: 0.0) is None  # attempts spent
    assert p.delay(3, elapsed=96.0, rand=lambda: 0.0) is None  # 96 + 4 reaches total
    assert p.delay(3, elapsed=95.9, rand=lambda: 0.0) == 4.0
    assert RetryPolicy(attempts=1 << 30, max=60.0, jitter=0.0, total=1e9).delay(5000) == 60.0
    assert RetryPolicy(initial=0.0, max=0.0, total=0.0).delay(1) is None  # total 0: no retry


async def test_html_error_pages_are_not_quoted() -> None:
    """An HTML error page from a proxy becomes its status line, not markup."""
    with aioresponses() as m:
        m.get(LIST_URL, status=502, reason="Bad Gateway", content_type="text/html",
              body="<html><head><title>502</title></head><body>x</body></html>")
        with pytest.raises(CatalogError) as err:
            await _all(_catalog(retry_for=0.0).files())
    assert "HTTP 502 Bad Gateway" in str(err.value) and "<" not in str(err.value)


async def test_malformed_locations_answer() -> None:
    """A locations answer that is not an object of names is a catalog error, not a crash."""
    with aioresponses() as m:
        m.get(LIST_URL, body="a\n", content_type="text/plain")
        m.get(LOCATIONS_URL, payload=["a"])
        with pytest.raises(CatalogError, match="not an object of file names"):
            await _all(_catalog().files())


# --- request length ---------------------------------------------------------------------------


async def test_locations_requests_are_cut_by_bytes_whatever_batch_says() -> None:
    """500 names of 200 characters go in several GETs, each target <= MAX_LOCATIONS_TARGET."""
    names = [f"{i:03d}" + "n" * 197 for i in range(500)]
    with aioresponses() as m:
        m.get(LIST_URL, body="".join(n + "\n" for n in names), content_type="text/plain")
        m.get(LOCATIONS_URL, payload={}, repeat=True)  # the requests matter here, not answers
        cat = _catalog(batch=500)
        await _all(cat.files())
        located = [u for u, _ in _calls(m) if "/files/locations" in str(u)]
    assert cat.listed == 500 and cat.unresolved_count == 500
    # 211 bytes per name: "file_name=", 200 characters and "&" (or "?" before the first).
    per_request = (samweb_module.MAX_LOCATIONS_TARGET - len(located[0].raw_path)) // 211
    assert len(located) == -(-500 // per_request)
    assert all(len(u.raw_path_qs) <= samweb_module.MAX_LOCATIONS_TARGET for u in located)
    assert sum(len(u.query.getall("file_name")) for u in located) == 500


async def test_too_long_answers_split_the_request_in_halves() -> None:
    """414, 431 and a 400 saying "too long" split a locations request in halves, in order."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(LIST_URL, body="a\nb\nc\nd\n", content_type="text/plain")
        m.get(LOCATIONS_URL, status=414)
        m.get(LOCATIONS_URL, status=400, content_type="text/plain",
              body="400, message:\n  Got more than 8190 bytes when reading: b'/sam/...'")
        m.get(LOCATIONS_URL, payload=_locations(["a"]))
        m.get(LOCATIONS_URL, payload=_locations(["b"]))
        m.get(LOCATIONS_URL, status=431)
        m.get(LOCATIONS_URL, payload=_locations(["c"]))
        m.get(LOCATIONS_URL, payload=_locations(["d"]))
        refs = await _all(_catalog(sleep=sleeps).files())
        asked = [[v for _, v in c.kwargs["params"]] for u, c in _calls(m)
                 if "/files/locations" in str(u)]
    assert [r.name for r in refs] == ["a", "b", "c", "d"]
    assert asked == [["a", "b", "c", "d"], ["a", "b"], ["a"], ["b"], ["c", "d"], ["c"], ["d"]]
    assert sleeps.delays == []


async def test_other_400_on_locations_is_final() -> None:
    """A 400 that does not say "too long" is not split: one request, SAM's message."""
    with aioresponses() as m:
        m.get(LIST_URL, body="a\nb\n", content_type="text/plain")
        m.get(LOCATIONS_URL, status=400, payload={"error": "BadRequest", "message": "bad name"})
        with pytest.raises(CatalogError, match=r"failed locating 2 files: HTTP 400 BadRequest"):
            await _all(_catalog().files())
        assert len(_calls(m)) == 2


# --- streaming -----------------------------------------------------------------------------------


async def test_streaming_keeps_at_most_parallel_batches_ahead() -> None:
    """Files come in listing order with at most `parallel` batches resolved ahead (bounded memory)."""
    names = [f"f{i:04d}" for i in range(1000)]
    batch, parallel = 10, 3
    with aioresponses() as m:
        m.get(LIST_URL, body="".join(n + "\n" for n in names), content_type="text/plain")
        for i in range(0, len(names), batch):
            m.get(LOCATIONS_URL, payload=_locations(names[i:i + batch]))
        cat = _catalog(batch=batch, parallel=parallel)
        seen, ahead = [], []
        async for ref in cat.files():
            seen.append(ref.name)
            # Let the feeder run as far as it is allowed to (yields to the loop, no waiting).
            for _ in range(20):
                await asyncio.sleep(0)
            located = sum(len(c.kwargs["params"]) for u, c in _calls(m) if "locations" in str(u))
            ahead.append(located - len(seen))
    assert seen == names
    assert max(ahead) < (parallel + 1) * batch
    assert max(ahead) >= parallel * batch  # it did run ahead: resolution overlaps use


# --- shared network helpers (prestaged.net) --------------------------------------------------


def _caused_by(*chain: BaseException) -> BaseException:
    """``chain[0]`` raised from ``chain[1]`` raised from ... (``__cause__`` links)."""
    for outer, inner in zip(chain, chain[1:]):
        outer.__cause__ = inner
    return chain[0]


def test_tls_cause_finds_the_ssl_error_behind_aiohttp_wrappers() -> None:
    """The one walker follows os_error, __cause__ and __context__ to the ssl error."""
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get issuer")
    wrapped = aiohttp.ClientOSError()
    wrapped.os_error = verify  # type: ignore[attr-defined]  # how aiohttp's connector wraps it
    assert net.tls_cause(wrapped) is verify
    assert net.tls_cause(_caused_by(aiohttp.ClientConnectionError(), OSError(), verify)) is verify
    context = aiohttp.ClientPayloadError("cut")
    context.__context__ = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    assert net.tls_cause(context) is context.__context__
    assert net.tls_cause(aiohttp.ClientConnectionError("refused")) is None


@pytest.mark.parametrize("silent", [ssl.SSLEOFError(8, "EOF"), ssl.SSLZeroReturnError(6, "zero"),
                                    ConnectionResetError(104, "reset")])
def test_tls_cause_silent_close_counts_only_during_the_handshake(silent: BaseException) -> None:
    """A close without an alert is a TLS refusal while connecting, a plain drop afterwards."""
    err = _caused_by(aiohttp.ClientConnectionError(), silent)
    assert net.tls_cause(err) is None
    assert net.tls_cause(err, handshake=True) is silent


def test_tls_cause_stops_on_cyclic_chains() -> None:
    """A cause chain that loops back ends the walk instead of spinning."""
    a, b = OSError("a"), OSError("b")
    a.__cause__, b.__cause__ = b, a
    assert net.tls_cause(a) is None


def test_one_tls_walker_and_retry_after_parser_for_catalog_and_storage() -> None:
    """The catalogs and both touch paths share prestaged.net's helpers (one copy of each)."""
    from prestaged.storage import fast, http

    assert catalog_http.tls_cause is net.tls_cause and http.tls_cause is net.tls_cause
    assert catalog_http.parse_retry_after is net.parse_retry_after
    assert fast.parse_retry_after is net.parse_retry_after
    assert not hasattr(catalog_http, "_tls_error") and not hasattr(http, "_tls_cause")


def _imported_modules(path: Path) -> set[str]:
    """Top-level-qualified names of every module ``path`` imports (at any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_catalog_does_not_import_the_storage_layer_and_net_is_stdlib_only() -> None:
    """No catalog imports prestaged.storage; prestaged/net.py only the stdlib."""
    package = Path(samweb_module.__file__).resolve().parents[1]
    for module in (package / "catalog").glob("*.py"):
        catalog_imports = _imported_modules(module)
        assert not {m for m in catalog_imports if m.startswith("prestaged.storage")}, module
    net_imports = {m.split(".")[0] for m in _imported_modules(package / "net.py")}
    assert "prestaged" not in net_imports
    stdlib = getattr(sys, "stdlib_module_names", None)  # Python 3.10+
    if stdlib is not None:
        assert net_imports <= set(stdlib), net_imports - set(stdlib)


# --- hostile answers ----------------------------------------------------------------------------


async def test_redirects_are_followed_on_the_same_origin_only() -> None:
    """Catalog requests followed every redirect, and aiohttp drops only Authorization on
    another origin: a Rucio password or login token, a MetaCat token (in X- headers) went to
    whatever host a redirect named, over plain http too. Now a redirect is followed on the
    same origin only; another origin is a CatalogError naming it, and nothing is sent there."""
    names = ["f0.root"]
    with aioresponses() as m:
        m.get(LIST_URL, status=302, headers={
            "Location": "/sam/dune/api/definitions/name/moved/files/list?format=plain"})
        m.get(LIST_URL, body="f0.root 1 10 1\n", content_type="text/plain")
        m.get(LOCATIONS_URL, payload=_locations(names))
        refs = await _all(_catalog().files())
    assert [r.name for r in refs] == names
    for location in ("https://elsewhere.example:8483/sam/dune/api/x",
                     "http://sam.example:8483/sam/dune/api/x",
                     "https://user:pw@sam.example:9999/x",
                     "https://user:pw@sam.example:8483/sam/dune/api/x",
                     "javascript:alert(1)", "mailto:x@y"):
        with aioresponses() as m:
            m.get(LIST_URL, status=307, headers={"Location": location})
            with pytest.raises(CatalogError, match="not followed, since the credentials we send "
                                                   "it would go along") as err:
                await _all(_catalog(retry_for=0.0).files())
            sent = [str(u) for u, _ in _calls(m)]
        assert not [u for u in sent if "elsewhere" in u or u.startswith("http:")
                    or ":9999" in u]
        assert "pw" not in str(err.value)
    with aioresponses() as m:  # a loop (or no Location) is said, after 5 hops
        for _ in range(6):
            m.get(LIST_URL, status=302)
        with pytest.raises(CatalogError, match=r"redirected listing .* more than 5 times "
                                               r"\(a loop, or no Location\)"):
            await _all(_catalog(retry_for=0.0).files())


async def test_numbers_sam_writes_in_other_scripts_or_without_end_are_no_numbers() -> None:
    """A count or a size of "²" passed isdigit() and then int() raised; 5,000 digits passed
    no more: each was a traceback. They read as unknown now."""
    with aioresponses() as m:
        m.get(COUNT_URL, body="\u00b2\n", content_type="text/plain")
        m.get(COUNT_URL, body="9" * 5000, content_type="text/plain")
        assert await _catalog().estimate() is None
        assert await _catalog().estimate() is None
    with aioresponses() as m:
        m.get(LIST_URL, body="f0.root 1 \u00b2 1\nf1.root 2 " + "9" * 5000 + " 1\n",
              content_type="text/plain")
        m.get(LOCATIONS_URL, payload=_locations(["f0.root", "f1.root"]))
        refs = await _all(_catalog().files())
    assert [(r.name, r.size) for r in refs] == [("f0.root", None), ("f1.root", None)]


async def test_a_listing_line_without_end_or_json_nested_without_end_is_a_catalog_error(
) -> None:
    """A listing line of 32 MiB took quadratic time and memory (9 s, 300 MB; 128 MiB: 133 s,
    1 GB) and was then quoted whole; locations nested 100,000 deep were a RecursionError."""
    class _Content:
        async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
            for _ in range(1 << 14):  # 1 GiB, if nothing stopped it
                yield b"a" * n

    class _Answer:
        url, content = URL("https://sam.example:8483/sam/dune/api/x"), _Content()

    for split in (catalog_http.lines, catalog_http.line_blocks):
        with pytest.raises(CatalogError, match=r"https://sam\.example:8483 answered a line "
                                               "longer than 64 KiB: that is no file listing"):
            async for _ in split(_Answer()):  # type: ignore[arg-type]
                pass
    with aioresponses() as m:
        m.get(LIST_URL, body="a\n", content_type="text/plain")
        m.get(LOCATIONS_URL, body="[" * 100_000, content_type="application/json")
        with pytest.raises(CatalogError, match="malformed JSON"):
            await _all(_catalog().files())


async def test_an_answer_read_whole_has_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server trickling a byte within every ``timeout`` held a request for ever (60 s of
    trickle took 62 s with timeout = 3 s). An answer read whole (not a streamed listing) now
    has ``WHOLE_DEADLINE`` x ``timeout`` in all: here the count gives up (unknown) and the
    server sees us hang up long before its 200 bytes are out."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    monkeypatch.setattr(catalog_http, "WHOLE_DEADLINE", 3)
    gone = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        try:
            for _ in range(200):
                await resp.write(b"5")
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise
        return resp

    app = web.Application()
    app.router.add_get("/sam/dune/api/definitions/name/mydef/files/count", trickle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}/sam/dune/api"
        assert await _catalog(base_url=base, timeout=0.3).estimate() is None
        await asyncio.wait_for(gone.wait(), 30)
    finally:
        await server.close()


def test_handed_resumes_a_listing_by_name_whatever_order_it_comes_in() -> None:
    """Handed: an answer in the same order is skipped by position; one in another order, or
    with a file gone before the cut, hands out exactly the names not handed out yet, also
    when that answer is cut off in turn."""
    names = [f"f{i}.root" for i in range(10)]
    same = catalog_http.Handed()
    assert [n for n in names[:4] if same.fresh(n)] == names[:4]
    same.again()
    assert [n for n in names if same.fresh(n)] == names[4:] and len(same) == 10
    moved = catalog_http.Handed()
    assert [n for n in names[:4] if moved.fresh(n)] == names[:4]
    moved.again()
    backwards = names[::-1]
    assert [n for n in backwards[:3] if moved.fresh(n)] == ["f9.root", "f8.root", "f7.root"]
    moved.again()  # cut off again; then a file before the cut is gone, shifting the rest
    assert [n for n in names[1:] if moved.fresh(n)] == ["f4.root", "f5.root", "f6.root"]
    assert len(moved) == 10
