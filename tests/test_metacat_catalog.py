"""The MetaCat catalog's own logic: PFN choice, MetaCat token discovery, configuration and the
errors MetaCat answers (against the MetaCat emulator, itself held to the real metacat-client).
The whole path through Rucio is in tests/test_metacat_rucio.py.

The emulators serve https with the test CA (``tls`` trusts it): the MetaCat token, the Rucio
password and Rucio's login tokens go over https only."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from aiohttp import web
from cli_runner import run_cli

from prestaged.catalog import open_catalog
from prestaged.catalog.http import Call, answer_cap, catalog_ssl_context
from prestaged.catalog.metacat import MetaCatCatalog, metacat_token
from prestaged.catalog.rucio import Pfn, pick, rucio_login_mode
from prestaged.config import CatalogConfig, MetaCatConfig, RucioConfig, load_config
from prestaged.errors import CatalogError, ConfigError, CredentialError
from prestaged.testing.metacat import MetaCatFile, MetaCatServer, Page, Query, synthetic_files
from prestaged.testing.pki import TestPKI
from prestaged.testing.rucio import RucioEmulator
from prestaged.testing.rucio_catalog import SyntheticFiles
from prestaged.testing.tokens import TokenIssuer

DATASET = "dune:raw-run1"


def _pfn(rse: str, kind: str = "DISK", priority: int = 1) -> Pfn:
    return Pfn(rse=rse, type=kind, priority=priority)


# --- choosing the PFN ---------------------------------------------------------------------


def test_pick_puts_disk_before_tape_whatever_the_priority() -> None:
    pfns = {"davs://tape.example:2880/pnfs/f": _pfn("FNAL_TAPE", "TAPE", 1),
            "https://disk.example:2880/pnfs/f": _pfn("FNAL_DISK", "DISK", 2)}
    chosen = pick(pfns, ())
    assert chosen is not None and chosen.rse == "FNAL_DISK"
    assert chosen.url == "https://disk.example:2880/pnfs/f"


def test_pick_follows_rse_preference_then_rucio_priority() -> None:
    pfns = {"https://a.example/f": _pfn("A", priority=1),
            "https://b.example/f": _pfn("B", priority=2),
            "https://c.example/f": _pfn("C", priority=3)}
    assert pick(pfns, ()).rse == "A"  # type: ignore[union-attr]
    assert pick(pfns, ("C", "B")).rse == "C"  # type: ignore[union-attr]
    # An unlisted RSE comes after the listed ones, however high its priority.
    assert pick(pfns, ("B",)).rse == "B"  # type: ignore[union-attr]


def test_pick_turns_davs_into_https_and_skips_other_schemes() -> None:
    pfns = {"root://x.example//pnfs/f": _pfn("X", priority=1),
            "davs://y.example:2880/pnfs/f": _pfn("Y", priority=2)}
    chosen = pick(pfns, ())
    assert chosen is not None and chosen.url == "https://y.example:2880/pnfs/f"
    assert pick({"root://x.example//pnfs/f": _pfn("X")}, ()) is None


# --- configuration ------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prestaged.toml"
    path.write_text(text)
    return path


def test_config_reads_the_metacat_and_rucio_sections(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, """
[catalog.metacat]
url = "https://metacat.fnal.gov:9443/dune_meta_prod/app"
page = 5000
[catalog.rucio]
url = "https://dune-rucio.fnal.gov"
auth_url = "https://auth-dune-rucio.fnal.gov"
account = "dunepro"
rse_expression = "FNAL_DCACHE|DUNE_US_FNAL_DISK_STAGE"
rse_preference = ["DUNE_US_FNAL_DISK_STAGE", "FNAL_DCACHE"]
chunk = 250
"""))
    assert cfg.catalog.metacat.page == 5000
    assert cfg.catalog.rucio.rse_preference == ("DUNE_US_FNAL_DISK_STAGE", "FNAL_DCACHE")
    assert cfg.catalog.rucio.chunk == 250 and cfg.catalog.rucio.account == "dunepro"


@pytest.mark.parametrize(("text", "message"), [
    ('rse_preference = "FNAL_DCACHE"', "catalog.rucio.rse_preference: expected an array"),
    ('rse_preference = ["FNAL DCACHE"]', "catalog.rucio.rse_preference[0]: expected a plain"),
    ("chunk = 2000", "catalog.rucio.chunk: expected an integer from 1 to 1000"),
    ('auth = "kerberos"', 'catalog.rucio.auth: expected one of "auto", "x509"'),
])
def test_bad_rucio_values_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_write(tmp_path, f"[catalog.rucio]\n{text}\n"))


def _catalog_cfg(metacat_url: str = "https://127.0.0.1:1/app", **rucio: object
                 ) -> CatalogConfig:
    return CatalogConfig(metacat=MetaCatConfig(url=metacat_url, retry_for=0),
                         rucio=RucioConfig(**{"url": "https://127.0.0.1:1", "retry_for": 0,
                                              **rucio}))  # type: ignore[arg-type]


def _userpass(tmp_path: Path, **more: object) -> CatalogConfig:
    secret = tmp_path / "rucio-password"
    secret.write_text("s3cret-pass\n")
    return _catalog_cfg(**{"auth": "userpass", "username": "prestaged",
                           "password_file": secret, **more})


def test_a_dataset_name_without_namespace_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"MetaCat dataset 'raw-run1': expected "
                                          r"namespace:name \(or --mql"):
        open_catalog("metacat", "raw-run1", _userpass(tmp_path))


def test_missing_servers_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"set \[catalog.metacat\] url"):
        MetaCatCatalog(DATASET, CatalogConfig(), env={})
    with pytest.raises(ConfigError, match=r"catalog\.rucio\.url: not set"):
        MetaCatCatalog(DATASET, CatalogConfig(metacat=MetaCatConfig(url="http://x/app")),
                       env={})


def test_userpass_needs_its_keys_and_x509_needs_a_proxy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'catalog.rucio.password_file: required with '
                                          r'catalog.rucio.auth = "userpass"'):
        MetaCatCatalog(DATASET, _catalog_cfg(auth="userpass", username="u"), env={})
    with pytest.raises(CredentialError, match="x509 login needs a proxy"):
        MetaCatCatalog(DATASET, _catalog_cfg(auth="x509"), env={})
    assert rucio_login_mode(RucioConfig(), have_token=True) == "token"
    assert rucio_login_mode(RucioConfig(), have_token=False) == "x509"


def test_mql_needs_the_metacat_catalog() -> None:
    with pytest.raises(ConfigError, match="--mql needs the metacat catalog"):
        open_catalog("samweb", "files from dune:x", CatalogConfig(), mql=True)


# --- MetaCat tokens -----------------------------------------------------------------------


def test_metacat_token_from_the_token_library_entry_of_the_server(tmp_path: Path) -> None:
    issuer = TokenIssuer("https://metacat.example/auth")
    good, other = issuer.mint("x", subject="alice"), issuer.mint("x", subject="bob")
    library = tmp_path / ".token_library"
    library.write_text(f"https://other.example/app {other}\n"
                       f"https://metacat.example/app {good}\n")
    cfg = MetaCatConfig(url="https://metacat.example/app")
    found = metacat_token(cfg, "https://metacat.example/app", {"HOME": str(tmp_path)})
    assert found is not None and found[0] == good and str(library) in found[1]
    assert metacat_token(cfg, "https://nowhere.example/app", {"HOME": str(tmp_path)}) is None


def test_an_expired_library_token_is_not_used(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    stale = TokenIssuer().mint("x", lifetime=-60)
    (tmp_path / ".token_library").write_text(f"https://metacat.example/app {stale}\n")
    with caplog.at_level(logging.WARNING):
        found = metacat_token(MetaCatConfig(), "https://metacat.example/app",
                              {"HOME": str(tmp_path)})
    assert found is None
    assert "metacat auth login" in caplog.text and stale not in caplog.text


def test_a_named_metacat_token_file_must_be_usable(tmp_path: Path) -> None:
    path = tmp_path / "mc-token"
    path.write_text(TokenIssuer().mint("x", lifetime=-60))
    with pytest.raises(CredentialError, match="expired"):
        metacat_token(MetaCatConfig(token_file=path), "https://m.example/app", {})


# --- MetaCat's answers, through the emulator ----------------------------------------------


METACAT_TOKEN = TokenIssuer("https://metacat.example/auth").mint("x", subject="alice")


@pytest.fixture
def serving(pki: TestPKI) -> ssl.SSLContext:
    """The emulators' server TLS context (the test host certificate, no client certificate
    asked)."""
    return pki.server_ssl_context(require_client_cert=False)


@pytest.fixture
def tls(pki: TestPKI) -> ssl.SSLContext:
    """The catalog's client TLS context, trusting the test CA."""
    return catalog_ssl_context(None, pki.ca_dir)


@pytest.fixture
async def metacat(serving: ssl.SSLContext) -> AsyncIterator[MetaCatServer]:
    """A MetaCat emulator over https listing DATASET (30 files) to METACAT_TOKEN only."""
    server = MetaCatServer(datasets={DATASET: synthetic_files(DATASET, 30)},
                           token=METACAT_TOKEN, ssl_context=serving)
    async with server:
        yield server


def _against(server: MetaCatServer, tmp_path: Path, **metacat: object) -> CatalogConfig:
    cfg = _userpass(tmp_path)
    return dataclasses.replace(cfg, metacat=MetaCatConfig(
        **{"url": server.base_url, "retry_for": 0, **metacat}))  # type: ignore[arg-type]


def _with_token(server: MetaCatServer, tmp_path: Path) -> CatalogConfig:
    (tmp_path / "mc-token").write_text(METACAT_TOKEN + "\n")
    return _against(server, tmp_path, auth="metacat", token_file=tmp_path / "mc-token")


async def _drain(catalog: MetaCatCatalog) -> list[str]:
    return [ref.url async for ref in catalog.files()]


async def test_unknown_dataset_is_a_catalog_error_naming_it(
        metacat: MetaCatServer, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """A dataset MetaCat does not know is a catalog error naming it and the server."""
    catalog = MetaCatCatalog("dune:no-such", _with_token(metacat, tmp_path), tls, env={})
    with pytest.raises(CatalogError, match="MetaCat dataset 'dune:no-such' not found at "
                                           r"https://127\.0\.0\.1:\d+/dune_meta_prod/app"):
        await _drain(catalog)


async def test_mql_metacat_rejects_is_a_catalog_error_quoting_it(
        metacat: MetaCatServer, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """MQL MetaCat rejects is a catalog error quoting its MQLSyntaxError."""
    catalog = MetaCatCatalog("files frm dune:raw-run1", _with_token(metacat, tmp_path), tls,
                             mql=True, env={})
    with pytest.raises(CatalogError, match="rejected the MQL query: MQLSyntaxError"):
        await _drain(catalog)


async def test_a_name_metacat_refuses_is_quoted_from_its_json_error(
        metacat: MetaCatServer, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """MetaCat's 400 for unsafe characters has a JSON body: the error quotes its message."""
    catalog = MetaCatCatalog("dune:raw$run1", _with_token(metacat, tmp_path), tls, env={})
    with pytest.raises(CatalogError) as info:
        await _drain(catalog)
    assert str(info.value).endswith("HTTP 400: Invalid value: raw$run1")


async def test_a_refused_request_is_a_credential_error_saying_who_asked(
        metacat: MetaCatServer, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """A 401 is exit 3 saying the request went anonymously, and is not retried."""
    anonymous = MetaCatCatalog(DATASET, _against(metacat, tmp_path, auth="none"), tls, env={})
    with pytest.raises(CredentialError, match=r"refused listing the files of dataset "
                                              r"'dune:raw-run1' anonymously \(HTTP 401"):
        await _drain(anonymous)
    assert metacat.stats.requests["dataset_files"] == 1  # a refusal is not retried


async def test_estimate_is_metacats_file_count(metacat: MetaCatServer, tls: ssl.SSLContext,
                                              tmp_path: Path) -> None:
    """A dataset's estimate is MetaCat's file_count; a query has none."""
    catalog = MetaCatCatalog(DATASET, _with_token(metacat, tmp_path), tls, env={})
    assert await catalog.estimate() == 30
    query = MetaCatCatalog(f"files from {DATASET}", _with_token(metacat, tmp_path), tls,
                           mql=True, env={})
    assert await query.estimate() is None


def test_metacat_tokens_that_are_not_jwts_are_refused_before_any_request(
        tmp_path: Path) -> None:
    """A MetaCat token file that is no JWT is a credential error at construction."""
    (tmp_path / "tok").write_text("not-a-jwt")
    cfg = dataclasses.replace(_catalog_cfg(), metacat=MetaCatConfig(
        url="https://127.0.0.1:1/app", auth="metacat", token_file=tmp_path / "tok"))
    with pytest.raises(CredentialError, match="malformed token"):
        MetaCatCatalog(DATASET, cfg, env={})


# --- streaming, chunks and retries, against both emulators ----------------------------------


SYNTHETIC = "dune:synthetic"  # the dataset both emulators generate files for


class _Clock:
    """The Rucio emulator's clock, moved forward by tests."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def pair(serving: ssl.SSLContext
               ) -> AsyncIterator[tuple[MetaCatServer, RucioEmulator, _Clock]]:
    """A MetaCat emulator listing ``dune:synthetic`` (2,000 files) and a Rucio emulator with a
    DISK replica of each, both over https (the Rucio password and login tokens go along)."""
    clock = _Clock()
    metacat = MetaCatServer(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 2000)},
                            ssl_context=serving)
    rucio = RucioEmulator(synthetic=SyntheticFiles(2000, rses=("DISK_RSE",)), clock=clock,
                          ssl_context=serving)
    async with metacat, rucio:
        yield metacat, rucio, clock


def _pair_cfg(tmp_path: Path, metacat: MetaCatServer, rucio: RucioEmulator,
              *, metacat_keys: Optional[dict[str, Any]] = None, **rucio_keys: Any
              ) -> CatalogConfig:
    secret = tmp_path / "rucio-password"
    secret.write_text("secret\n")
    return CatalogConfig(
        metacat=MetaCatConfig(**{"url": metacat.base_url, "auth": "none", "retry_initial": 0,
                                 "retry_max": 0.01, "retry_for": 30,
                                 **(metacat_keys or {})}),
        rucio=RucioConfig(**{"url": rucio.base_url, "auth": "userpass", "username": "root",
                             "password_file": secret, "retry_initial": 0, "retry_max": 0.01,
                             "retry_for": 30, **rucio_keys}))


async def test_chunks_hold_at_most_chunk_dids_and_every_file_comes_once(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """Replica requests carry at most chunk DIDs, after one login; every file comes once."""
    metacat, rucio, _ = pair
    catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio, chunk=300),
                             tls, env={})
    refs = [ref async for ref in catalog.files()]
    assert sorted(r.name for r in refs) == [f"dune:synthetic_{i:07d}.root" for i in range(2000)]
    assert sorted(rucio.stats.dids_per_request) == [200] + [300] * 6
    assert catalog.rucio_requests == 7 and rucio.stats.tokens_issued["userpass"] == 1
    assert all(r.url == f"https://127.0.0.1:2880/pnfs/dune/synthetic/{r.name[5:]}"
               for r in refs)


async def test_the_first_url_comes_before_the_later_chunks_are_asked(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """Streaming: with 20 chunks and 2 in flight, the first URL is handed out while at most
    ``parallel + 1`` replica requests have been made."""
    metacat, rucio, _ = pair
    catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio, chunk=100,
                                                  parallel=2), tls, env={})
    files = catalog.files()
    first = await files.__anext__()
    asked = rucio.stats.requests["replicas/list"]
    rest = [ref async for ref in files]
    assert first.url.startswith("https://") and len(rest) == 1999
    assert asked <= 3 < rucio.stats.requests["replicas/list"] == 20


async def test_server_trouble_is_retried_then_resolves(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """503 from MetaCat, 503 and 429 (Retry-After) from Rucio: retried, nothing lost."""
    metacat, rucio, _ = pair
    metacat.fail("/data/dataset_files", 503)
    rucio.fail("/replicas/list", 503, times=2)
    rucio.fail("/replicas/list", 429, retry_after=0)
    catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio), tls, env={})
    refs = [ref async for ref in catalog.files()]
    assert len({r.url for r in refs}) == 2000
    assert metacat.faults_served == 1 and rucio.faults_served == 3
    assert metacat.stats.requests["dataset_files"] == 1  # the 503 never reached it


async def test_retries_end_after_retry_for_with_a_catalog_error(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """A Rucio that keeps answering 503 is a catalog error after retry_for, naming the key."""
    metacat, rucio, _ = pair
    rucio.fail("/replicas/list", 503, times=1000)
    catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio, retry_for=0.05),
                             tls, env={})
    with pytest.raises(CatalogError, match=r"Rucio https://127\.0\.0\.1:\d+ unreachable while "
                                           r"listing the replicas of 500 files: HTTP 503.*"
                                           r"catalog\.rucio\.retry_for"):
        [ref async for ref in catalog.files()]


async def test_an_expired_login_token_is_renewed_once_and_the_pass_goes_on(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """Rucio refuses the login token midway (its clock passed the expiry): prestaged logs in
    again and resolves every file."""
    metacat, rucio, clock = pair
    catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio, chunk=100,
                                                  parallel=1), tls, env={})
    files = catalog.files()
    first = await files.__anext__()
    clock.offset = 7200.0  # every token issued so far has expired, as Rucio sees it
    rest = [ref async for ref in files]
    assert 1 + len(rest) == 2000 and first.url
    assert rucio.stats.tokens_issued["userpass"] == 2 and rucio.stats.auth_refusals >= 1


async def test_a_dataset_listing_cut_off_midway_resumes_without_duplicates(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """A listing cut off after 700 files is asked again; every file comes once."""
    metacat, rucio, _ = pair
    metacat.cut_next = 700
    catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio), tls, env={})
    names = [ref.name async for ref in catalog.files()]
    assert len(names) == len(set(names)) == 2000
    assert metacat.stats.requests["dataset_files"] == 2


async def test_a_listing_cut_off_and_answered_in_another_order_loses_no_file(
        serving: ssl.SSLContext, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """dataset_files is not ordered: cut off after 700 records and answered in another order
    the second time, the listing is resumed by name, not by count; every file once."""
    metacat = MetaCatServer(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 2000)},
                            reorder=True, ssl_context=serving)
    rucio = RucioEmulator(synthetic=SyntheticFiles(2000, rses=("DISK_RSE",)),
                          ssl_context=serving)
    async with metacat, rucio:
        metacat.cut_next = 700
        catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio), tls, env={})
        names = [ref.name async for ref in catalog.files()]
    assert sorted(names) == [f"dune:synthetic_{i:07d}.root" for i in range(2000)]
    assert metacat.stats.requests["dataset_files"] == 2 and catalog.listed == 2000


async def test_a_query_page_cut_off_is_asked_again_from_where_it_stopped(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """A query page cut off midway is asked again from the first file not handed out."""
    metacat, rucio, _ = pair
    metacat.cut_next = 300
    cfg = _pair_cfg(tmp_path, metacat, rucio, metacat_keys={"page": 1000})
    catalog = MetaCatCatalog(f"files from {SYNTHETIC} where core.runs < 1005", cfg, tls,
                             mql=True, env={})
    names = [ref.name async for ref in catalog.files()]
    assert sorted(names) == [f"dune:synthetic_{i:07d}.root" for i in range(500)]
    # page 1 cut at 300, asked again from skip 300 (500 - 300 = 200 more, short: the end).
    assert metacat.stats.queries[-1].endswith("ordered skip 300 limit 1000")
    assert metacat.stats.requests["query"] == 2


async def test_a_query_ending_in_a_comment_is_still_paged(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """MQL whose last line is a '#' comment (MetaCat cuts it off) keeps its paging suffix."""
    metacat, rucio, _ = pair
    cfg = _pair_cfg(tmp_path, metacat, rucio, metacat_keys={"page": 300})
    mql = f"files from {SYNTHETIC}\n  where core.runs < 1005  # the first five runs"
    catalog = MetaCatCatalog(mql, cfg, tls, mql=True, env={})
    names = [ref.name async for ref in catalog.files()]
    assert sorted(names) == [f"dune:synthetic_{i:07d}.root" for i in range(500)]
    assert metacat.stats.requests["query"] == 2


async def test_a_name_rucio_refuses_is_one_unresolved_file_not_a_dead_run(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """MetaCat lists a file named '---' (no \\w, which Rucio's r_dids schema requires): it is
    unresolved with that reason; the other files of its chunk resolve."""
    metacat, rucio, _ = pair
    metacat.add_dataset("dune:odd", [*synthetic_files(SYNTHETIC, 700),
                                     {"namespace": "dune", "name": "---"}])
    catalog = MetaCatCatalog("dune:odd", _pair_cfg(tmp_path, metacat, rucio), tls, env={})
    refs = [ref async for ref in catalog.files()]
    assert len(refs) == 700 and catalog.unresolved_count == 1
    [odd] = catalog.unresolved
    assert odd.name == "dune:---"
    assert odd.reason.startswith("Rucio refuses the name")
    assert sorted(rucio.stats.dids_per_request) == [200, 500]


class _IgnoresSkip(MetaCatServer):
    """A broken MetaCat that answers every page of a query from its start (ignores skip)."""

    def _evaluate(self, q: Query) -> list[MetaCatFile]:
        if isinstance(q, Page) and q.skip:
            q = dataclasses.replace(q, skip=0)
        return super()._evaluate(q)


async def test_a_server_ignoring_skip_stops_the_query_with_a_catalog_error(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], serving: ssl.SSLContext,
        tls: ssl.SSLContext, tmp_path: Path) -> None:
    """A full page that brings no file the page before did not bring ends paging with one
    catalog error, instead of asking the same page for ever."""
    _, rucio, _ = pair
    async with _IgnoresSkip(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 2000)},
                            ssl_context=serving) as broken:
        cfg = _pair_cfg(tmp_path, broken, rucio, metacat_keys={"page": 500})
        catalog = MetaCatCatalog(f"files from {SYNTHETIC}", cfg, tls, mql=True, env={})
        handed = 0
        with pytest.raises(CatalogError, match=r"answered the MQL query at skip 500 with the "
                           r"same 500 files as the page before: it does not honour 'skip'"):
            async for _ in catalog.files():
                handed += 1
                assert handed <= 2000, "paged past the end of the dataset"
        assert broken.stats.requests["query"] == 2


class _Bloated(RucioEmulator):
    """A hostile Rucio: each replica record carries 256 KiB of padding (still valid JSON)."""

    async def _stream(self, request: web.Request, first: str, rest: Iterator[str],
                      headers: dict[str, str]) -> web.StreamResponse:
        def pad(line: str) -> str:
            record = line.rstrip()
            return record[:-1] + ', "padding": "' + "x" * (256 << 10) + '"}\n'

        return await super()._stream(request, pad(first), map(pad, rest), headers)


async def test_an_answer_read_whole_is_capped_by_the_files_it_is_about(
        serving: ssl.SSLContext, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """Replicas of 10 DIDs may take 1 MiB (64 KiB a DID), not 256 MiB: a 2.5 MiB answer of
    valid records is one catalog error naming the cap; 500 DIDs may take 31 MiB."""
    metacat = MetaCatServer(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 10)},
                            ssl_context=serving)
    rucio = _Bloated(synthetic=SyntheticFiles(10, rses=("DISK_RSE",)), ssl_context=serving)
    async with metacat, rucio:
        catalog = MetaCatCatalog(SYNTHETIC, _pair_cfg(tmp_path, metacat, rucio), tls, env={})
        where = rucio.base_url
        with pytest.raises(CatalogError) as err:
            await _drain(catalog)
    assert str(err.value) == (
        f"Rucio {where} answered listing the replicas of 10 files with more than "
        "1 MiB (at most 64 KiB a file is read): that is no answer to it")
    assert answer_cap(Call("x", asked=500)) == 500 << 16


async def test_a_refused_metacat_token_is_named_by_where_it_came_from_never_shown(
        metacat: MetaCatServer, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """A MetaCat token MetaCat refuses is exit 3 naming the file it came from, never its
    text."""
    wrong = TokenIssuer("https://metacat.example/auth").mint("x", subject="mallory")
    (tmp_path / "mc-token").write_text(wrong)
    cfg = _against(metacat, tmp_path, auth="metacat", token_file=tmp_path / "mc-token")
    with pytest.raises(CredentialError) as err:
        await _drain(MetaCatCatalog(DATASET, cfg, tls, env={}))
    text = str(err.value)
    assert f"with the MetaCat token {tmp_path / 'mc-token'}" in text
    assert "metacat auth login" in text and wrong not in text and wrong[:40] not in text


async def test_an_unreachable_metacat_is_a_catalog_error_after_retry_for(
        tls: ssl.SSLContext, tmp_path: Path) -> None:
    """A MetaCat nobody listens for is retried for retry_for, then a catalog error naming the
    server, the request and the key."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dataclasses.replace(_userpass(tmp_path), metacat=MetaCatConfig(
        url=f"https://127.0.0.1:{port}/app", retry_initial=0, retry_max=0.01, retry_for=0.05))
    with pytest.raises(CatalogError, match=rf"MetaCat https://127\.0\.0\.1:{port}/app "
                                           r"unreachable while listing the files of dataset "
                                           r"'dune:raw-run1'.*catalog\.metacat\.retry_for"):
        await _drain(MetaCatCatalog(DATASET, cfg, tls, env={}))


async def test_rucio_account_comes_from_the_config_else_rucio_account(
        pair: tuple[MetaCatServer, RucioEmulator, _Clock], tls: ssl.SSLContext,
        tmp_path: Path) -> None:
    """``$RUCIO_ACCOUNT`` names the account when the config does not; a wrong one is refused
    at login (exit 3), naming it."""
    metacat, rucio, _ = pair
    cfg = _pair_cfg(tmp_path, metacat, rucio)
    refs = [r async for r in MetaCatCatalog(SYNTHETIC, cfg, tls, env={"RUCIO_ACCOUNT": "root"})
            .files()]
    assert len(refs) == 2000
    with pytest.raises(CredentialError, match=r"refused logging in \(userpass, account "
                                              r"nobody\) for account nobody as user root"):
        [r async for r in MetaCatCatalog(SYNTHETIC, cfg, tls, env={"RUCIO_ACCOUNT": "nobody"})
         .files()]
    configured = dataclasses.replace(cfg, rucio=dataclasses.replace(cfg.rucio, account="root"))
    assert len([r async for r in MetaCatCatalog(SYNTHETIC, configured, tls,
                                                env={"RUCIO_ACCOUNT": "nobody"}).files()]) == 2000


async def test_the_wlcg_token_goes_to_metacat_only_when_asked_for(
        pki: TestPKI, tmp_path: Path) -> None:
    """auth = "token" sends it (``Authorization: Bearer``, over https); "auto" without a
    MetaCat token sends nothing, even with a WLCG token at hand (MetaCat reads are open)."""
    from prestaged.tokens import FoundToken, TokenSource

    wlcg = TokenSource(FoundToken(METACAT_TOKEN, "$BEARER_TOKEN", None))
    tls = catalog_ssl_context(None, pki.ca_dir)
    async with MetaCatServer(datasets={DATASET: synthetic_files(DATASET, 30)},
                             token=METACAT_TOKEN,
                             ssl_context=pki.server_ssl_context(require_client_cert=False)
                             ) as metacat:
        with pytest.raises(CredentialError, match="anonymously"):
            await MetaCatCatalog(DATASET, _against(metacat, tmp_path, auth="auto"), tls,
                                 token=wlcg, env={"HOME": str(tmp_path)}).estimate()
        asked = MetaCatCatalog(DATASET, _against(metacat, tmp_path, auth="token"), tls,
                               token=wlcg, env={"HOME": str(tmp_path)})
        assert await asked.estimate() == 30


async def test_auto_leaves_a_library_token_unsent_to_an_http_metacat(
        serving: ssl.SSLContext, tls: ssl.SSLContext, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """auth = "auto" and a token library entry for an http:// MetaCat: the token is not sent,
    the (open) dataset is listed anonymously, and one WARNING names the library, not the
    token."""
    metacat = MetaCatServer(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 50)})  # http://
    rucio = RucioEmulator(synthetic=SyntheticFiles(50, rses=("DISK_RSE",)), ssl_context=serving)
    async with metacat, rucio:
        library = tmp_path / ".token_library"
        library.write_text(f"{metacat.base_url} {METACAT_TOKEN}\n")
        cfg = _pair_cfg(tmp_path, metacat, rucio, metacat_keys={"auth": "auto"})
        with caplog.at_level(logging.WARNING, logger="prestaged.catalog.metacat"):
            catalog = MetaCatCatalog(SYNTHETIC, cfg, tls, env={"HOME": str(tmp_path)})
            refs = [ref async for ref in catalog.files()]
        where, seen = metacat.base_url, metacat.stats.token_requests
    assert len(refs) == 50 and seen == 0
    [warning] = [r.getMessage() for r in caplog.records
                 if r.name == "prestaged.catalog.metacat" and r.levelno == logging.WARNING]
    assert warning == (
        f"MetaCat {where}: not sending the MetaCat token from the library {library} "
        "to an http:// URL (in clear); reading anonymously (give an https:// "
        'catalog.metacat.url, or set catalog.metacat.auth = "none")')
    assert METACAT_TOKEN not in caplog.text


async def test_a_refusal_after_leaving_the_token_unsent_says_why(tmp_path: Path) -> None:
    """An http:// MetaCat that refuses anonymous reads, with auth = "auto" and a library
    token left unsent: exit 3 saying the token was not sent to http and to give the https://
    URL; MetaCat never saw it."""
    async with MetaCatServer(datasets={DATASET: synthetic_files(DATASET, 30)},
                             token=METACAT_TOKEN) as metacat:  # http://
        (tmp_path / ".token_library").write_text(f"{metacat.base_url} {METACAT_TOKEN}\n")
        catalog = MetaCatCatalog(DATASET, _against(metacat, tmp_path, auth="auto"),
                                 env={"HOME": str(tmp_path)})
        with pytest.raises(CredentialError) as err:
            await catalog.estimate()
        seen = metacat.stats.token_requests
    message = str(err.value)
    assert seen == 0 and METACAT_TOKEN not in message
    assert (f"refused reading dataset '{DATASET}' anonymously (the MetaCat token from the "
            f"library {tmp_path / '.token_library'} is not sent to an http:// URL) "
            "(HTTP 401") in message
    assert message.endswith("; give MetaCat's https:// URL")


_HTTPS_RUCIO = '[catalog.rucio]\nurl = "https://rucio.example"\n'
_HTTPS_METACAT = '[catalog.metacat]\nurl = "https://metacat.example/app"\n'


_HTTP_METACAT = '[catalog.metacat]\nurl = "http://metacat.example/app"\n'
_HTTP_RUCIO = '[catalog.rucio]\nurl = "http://rucio.example"\n'
_USERPASS = 'username = "prestaged"\npassword_file = "rucio-password"\n'
_MC_TOKEN_FILE = 'token_file = "mc-token"\n'
_METACAT_ENV = {"METACAT_SERVER_URL": "http://metacat.example/app"}
_LOGIN_TOKEN = "send the login token Rucio hands out (X-Rucio-Auth-Token) to it"
_IN_CLEAR_LOGIN = ("log in there without TLS (no proxy can be presented) and get the login "
                   "token")


@pytest.mark.parametrize(("text", "env", "key", "setting", "would"), [
    (_HTTP_METACAT + 'auth = "token"\n' + _HTTPS_RUCIO, {}, "catalog.metacat.url",
     'catalog.metacat.auth = "token"', "send the bearer token to it"),
    ('[catalog.metacat]\nauth = "token"\n' + _HTTPS_RUCIO, _METACAT_ENV,
     "$METACAT_SERVER_URL", 'catalog.metacat.auth = "token"', "send the bearer token to it"),
    (_HTTP_METACAT + 'auth = "metacat"\n' + _MC_TOKEN_FILE + _HTTPS_RUCIO, {},
     "catalog.metacat.url", 'catalog.metacat.auth = "metacat"', "send the MetaCat token to it"),
    ('[catalog.metacat]\nauth = "metacat"\n' + _HTTPS_RUCIO, _METACAT_ENV,
     "$METACAT_SERVER_URL", 'catalog.metacat.auth = "metacat"', "send the MetaCat token to it"),
    (_HTTP_METACAT + _MC_TOKEN_FILE + _HTTPS_RUCIO, {}, "catalog.metacat.url",
     'catalog.metacat.token_file (with auth = "auto")', "send the MetaCat token to it"),
    ('[catalog.metacat]\n' + _MC_TOKEN_FILE + _HTTPS_RUCIO, _METACAT_ENV,
     "$METACAT_SERVER_URL", 'catalog.metacat.token_file (with auth = "auto")',
     "send the MetaCat token to it"),
    (_HTTPS_METACAT + _HTTP_RUCIO + 'auth = "token"\n', {}, "catalog.rucio.url",
     'catalog.rucio.auth = "token"', "send the bearer token to it"),
    (_HTTPS_METACAT + _HTTP_RUCIO, {}, "catalog.rucio.url", 'catalog.rucio.auth = "auto"',
     "send the bearer token, or the login token Rucio hands out, to it"),
    (_HTTPS_METACAT + _HTTP_RUCIO + 'auth = "x509"\n', {}, "catalog.rucio.url",
     'catalog.rucio.auth = "x509"', _LOGIN_TOKEN),
    (_HTTPS_METACAT + _HTTP_RUCIO + 'auth = "userpass"\n' + _USERPASS, {},
     "catalog.rucio.url", 'catalog.rucio.auth = "userpass"',
     "send the password, then the login token Rucio hands out, to it"),
    (_HTTPS_METACAT + _HTTP_RUCIO + 'auth_url = "https://auth.example"\nauth = "userpass"\n'
     + _USERPASS, {}, "catalog.rucio.url", 'catalog.rucio.auth = "userpass"', _LOGIN_TOKEN),
    (_HTTPS_METACAT + _HTTPS_RUCIO + 'auth_url = "http://auth.example"\nauth = "userpass"\n'
     + _USERPASS, {}, "catalog.rucio.auth_url", 'catalog.rucio.auth = "userpass"',
     "send the password to it"),
    (_HTTPS_METACAT + _HTTPS_RUCIO + 'auth_url = "http://auth.example"\nauth = "x509"\n', {},
     "catalog.rucio.auth_url", 'catalog.rucio.auth = "x509"', _IN_CLEAR_LOGIN),
    (_HTTPS_METACAT + _HTTPS_RUCIO + 'auth_url = "http://auth.example"\n', {},
     "catalog.rucio.auth_url", 'catalog.rucio.auth = "auto"', _IN_CLEAR_LOGIN),
], ids=["metacat-token-url", "metacat-token-env", "metacat-metacat-url", "metacat-metacat-env",
        "metacat-auto-token-file-url", "metacat-auto-token-file-env", "rucio-token",
        "rucio-auto", "rucio-x509", "rucio-userpass", "rucio-userpass-auth-https",
        "rucio-userpass-auth-url", "rucio-x509-auth-url", "rucio-auto-auth-url"])
def test_a_credential_for_an_http_catalog_is_a_config_error(
        tmp_path: Path, text: str, env: dict[str, str], key: str, setting: str,
        would: str) -> None:
    """Settings that would send a token or the Rucio password to an http:// MetaCat or Rucio
    URL (any Rucio login, whose token rides on every request) are exit 2 naming the key or the
    variable and the fix, before any request, whether or not a bearer token was found (Rucio's
    "auto" without one logs in with the proxy, and its login token is no less secret); no
    secret is in the message."""
    (tmp_path / "mc-token").write_text(METACAT_TOKEN + "\n")
    (tmp_path / "rucio-password").write_text("hunter2-rucio-pw\n")
    with pytest.raises(ConfigError) as err:
        MetaCatCatalog(DATASET, load_config(_write(tmp_path, text)).catalog, env=env)
    message = str(err.value)
    assert f"{key}: an http:// URL, and {setting} would {would} in clear; give an https:// " \
           "URL (credentials go over https only)" in message
    assert err.value.exit_code == 2
    assert METACAT_TOKEN not in message and "hunter2" not in message


def test_the_refusals_say_what_else_would_do(tmp_path: Path) -> None:
    """A MetaCat refusal names the setting to change besides the URL; a Rucio one only the
    URL, since every Rucio login yields a token (exact messages)."""
    (tmp_path / "mc-token").write_text(METACAT_TOKEN + "\n")
    with pytest.raises(ConfigError) as metacat:
        MetaCatCatalog(DATASET, CatalogConfig(metacat=MetaCatConfig(auth="metacat"),
                                              rucio=RucioConfig(url="https://rucio.example")),
                       env=_METACAT_ENV)
    assert str(metacat.value) == (
        '$METACAT_SERVER_URL: an http:// URL, and catalog.metacat.auth = "metacat" would send '
        "the MetaCat token to it in clear; give an https:// URL (credentials go over https "
        "only) or change catalog.metacat.auth")
    with pytest.raises(ConfigError) as token_file:
        MetaCatConfig(url="http://metacat.example/app", token_file=tmp_path / "mc-token")
    assert str(token_file.value) == (
        'catalog.metacat.url: an http:// URL, and catalog.metacat.token_file (with auth = '
        '"auto") would send the MetaCat token to it in clear; give an https:// URL '
        '(credentials go over https only) or set catalog.metacat.auth = "none" to read '
        "anonymously")
    with pytest.raises(ConfigError) as rucio:
        RucioConfig(url="http://rucio.example", auth="x509")
    assert str(rucio.value) == (
        'catalog.rucio.url: an http:// URL, and catalog.rucio.auth = "x509" would send the '
        "login token Rucio hands out (X-Rucio-Auth-Token) to it in clear; give an https:// URL "
        "(credentials go over https only)")


def test_the_cli_refuses_an_http_metacat_with_its_token_as_exit_2(tmp_path: Path) -> None:
    """`prestaged files` with auth = "metacat" and an http:// $METACAT_SERVER_URL: exit 2, one
    line naming the variable, before any request or credential check."""
    config = _write(tmp_path, '[catalog.metacat]\nauth = "metacat"\n' + _HTTPS_RUCIO)
    res = run_cli("files", DATASET, "--catalog", "metacat", "--config", str(config),
                  "--proxy", str(tmp_path / "no-proxy"), env=_METACAT_ENV)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        'prestaged: error: $METACAT_SERVER_URL: an http:// URL, and catalog.metacat.auth = '
        '"metacat" would send the MetaCat token to it in clear; give an https:// URL '
        "(credentials go over https only) or change catalog.metacat.auth"]


def test_http_catalogs_without_a_credential_are_still_allowed(tmp_path: Path) -> None:
    """An anonymous MetaCat (auth "none", or "auto" without token_file) may be http://, and
    auth = "token" never logs in, so an http:// auth_url it never asks is no error."""
    for auth in ("none", "auto"):
        cfg = CatalogConfig(metacat=MetaCatConfig(auth=auth),
                            rucio=RucioConfig(url="https://rucio.example", auth="token",
                                              auth_url="http://auth.example"))
        assert MetaCatCatalog(DATASET, cfg, env=_METACAT_ENV).url == _METACAT_ENV[
            "METACAT_SERVER_URL"]


async def test_a_login_token_is_renewed_before_rucio_says_it_expires(
        serving: ssl.SSLContext, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """The token is kept until 5 minutes before X-Rucio-Auth-Token-Expires: one login for a
    whole pass with Rucio's hour-long tokens, but a login per request with tokens that
    expire in 4 minutes (already inside the margin), and never a refusal."""
    metacat = MetaCatServer(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 600)},
                            ssl_context=serving)
    hour = RucioEmulator(synthetic=SyntheticFiles(600, rses=("DISK_RSE",)), ssl_context=serving)
    short = RucioEmulator(synthetic=SyntheticFiles(600, rses=("DISK_RSE",)),
                          token_lifetime=240, ssl_context=serving)
    async with metacat, hour, short:
        for rucio in (hour, short):
            cfg = _pair_cfg(tmp_path, metacat, rucio, chunk=100, parallel=1)
            refs = [r async for r in MetaCatCatalog(SYNTHETIC, cfg, tls, env={}).files()]
            assert len(refs) == 600 and rucio.stats.auth_refusals == 0
    assert hour.stats.tokens_issued["userpass"] == 1
    assert short.stats.tokens_issued["userpass"] == 6  # one per chunk of 100


async def test_rse_expression_is_sent_and_limits_the_replicas(
        serving: ssl.SSLContext, tls: ssl.SSLContext, tmp_path: Path) -> None:
    """``rse_expression`` goes to Rucio, which lists only replicas on matching RSEs: with
    "TAPE_RSE" every file resolves to its tape copy although a disk copy exists."""
    metacat = MetaCatServer(datasets={SYNTHETIC: synthetic_files(SYNTHETIC, 50)},
                            ssl_context=serving)
    rucio = RucioEmulator(synthetic=SyntheticFiles(50, rses=("DISK_RSE", "TAPE_RSE")),
                          ssl_context=serving)
    async with metacat, rucio:
        both = _pair_cfg(tmp_path, metacat, rucio)
        disk = [r.url async for r in MetaCatCatalog(SYNTHETIC, both, tls, env={}).files()]
        tape_only = _pair_cfg(tmp_path, metacat, rucio, rse_expression="TAPE_RSE")
        tape = [r.url async for r in MetaCatCatalog(SYNTHETIC, tape_only, tls, env={}).files()]
    assert all("/pnfs/dune/synthetic/" in u for u in disk)  # DISK before TAPE
    assert len(tape) == 50 and all("/pnfs/dune/tape/synthetic/" in u for u in tape)
