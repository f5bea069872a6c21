"""SAM web catalog end to end: the emulator and the test storage over real TLS on 127.0.0.1.

``prestaged warm|files DEFINITION --catalog samweb`` runs in-process (``main``), resolving
through ``prestaged.testing.samweb`` and touching ``prestaged.testing.storage``, both
requiring or accepting the test PKI's proxy; so does ``prestaged demo --catalog samweb``, which
starts the emulator and the storage as processes of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
from cli_runner import run_cli

from prestaged.catalog.samweb import MAX_LOCATIONS_TARGET, SamWebCatalog, samweb_ssl_context
from prestaged.cli import main
from prestaged.config import RewriteRule, SamWebConfig
from prestaged.errors import CatalogError
from prestaged.model import FileRef
from prestaged.testing.pki import TestPKI
from prestaged.testing.samweb import Delay, SamError, Status, ThreadedSamWebServer, Truncate
from prestaged.testing.storage import ThreadedStorageServer

Samweb = Callable[..., ThreadedSamWebServer]
DOOR_PATH = "/pnfs/fnal.gov/usr/dune"
LINE_LIMIT = 8190  # aiohttp's default max_line_size, Apache's LimitRequestLine


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxies and SAM settings of the machine running the tests must not leak in."""
    for name in ("X509_USER_PROXY", "X509_CERT_DIR", "PRESTAGED_CONFIG", "SAM_WEB_BASE_URL",
                 "SAM_EXPERIMENT", "SAM_WEB_HOST"):
        monkeypatch.delenv(name, raising=False)


def _mixed(n: int, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``n`` files alternating tape (enstore: with a tape suffix) and disk (dcache:) locations."""
    files = []
    for i in range(n):
        d = f"/pnfs/dune/tape_backed/dunepro/{i // 100:03d}"
        loc = f"enstore:{d}({i}@vr0337m8)" if i % 2 else f"dcache:{d.replace('tape_backed', 'persistent')}"
        files.append({"name": f"np04_raw_{i:05d}.root", "size": 1000 + i, "locations": [loc]})
    return files + (extra or [])


def _expected_path(f: dict[str, Any]) -> str:
    """Storage path the rewrite rules give a file of ``_mixed``."""
    loc = re.sub(r"\(.*\)$", "", f["locations"][-1])
    return f"{DOOR_PATH}/{loc.split(':', 1)[1][len('/pnfs/dune/'):]}/{f['name']}"


def _config(tmp_path: Path, sam: ThreadedSamWebServer, storage: ThreadedStorageServer | None,
            *, samweb: str = "", credentials: str = "", rules: bool = True,
            default: str = "samweb") -> Path:
    door = storage.url(DOOR_PATH) if storage is not None else "https://127.0.0.1:1" + DOOR_PATH
    text = (f'[catalog]\ndefault = "{default}"\n'
            f'[catalog.samweb]\nbase_url = "{sam.base_url}"\n'
            'retry_initial = 0\nretry_max = 0\nretry_for = "20s"\n' + samweb)
    if rules:
        for prefix in ("enstore", "dcache"):
            text += (f'[[catalog.samweb.rewrite]]\nlocation = "{prefix}:/pnfs/dune/"\n'
                     f'url = "{door}/"\n')
    if credentials:
        text += "[credentials]\n" + credentials
    path = tmp_path / "prestaged.toml"
    path.write_text(text)
    return path


def _warm(config: Path, proxy: Path, pki: TestPKI, *args: str) -> list[str]:
    return ["warm", *args, "--config", str(config), "--proxy", str(proxy), "--no-state",
            "--ca-dir", str(pki.ca_dir)]


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("prestaged: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_5000_mixed_files_resolve_and_warm_end_to_end(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """5,000 mixed enstore:/dcache: files: right URLs, each touched once, warming overlaps lookups."""
    two_locations = {"name": "two_locations.root",
                     "locations": ["cern-eos:/eos/dune/x", "dcache:/pnfs/dune/persistent/y"]}
    files = _mixed(4999, [two_locations])
    sam = samweb({"np04-raw": files})
    config = _config(tmp_path, sam, storage)
    code = main(_warm(config, proxy, pki, "np04-raw", "--json"))
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["exit_code"] == 0
    assert doc["definition"] == "np04-raw" and doc["catalog"] == "samweb"
    assert doc["source"] == sam.base_url
    assert doc["counts"]["warm"] == 5000 and doc["unresolved_count"] == 0
    expected = {_expected_path(f) for f in files}
    assert f"{DOOR_PATH}/persistent/y/two_locations.root" in expected
    assert set(storage.stats.paths) == expected
    assert all(s.requests == 1 for s in storage.stats.paths.values())
    located = [r for r in sam.stats.records if r.endpoint == "locations"]
    assert sam.stats.requests["count"] == 1 and sam.stats.requests["list"] == 1
    assert sum(r.names for r in located) == 5000 and {r.status for r in located} == {200}
    assert all(r.line <= LINE_LIMIT for r in located)
    assert all(dn is not None and dn.startswith(pki.user_dn) for dn in sam.stats.client_dns)
    first_touch = min(r.time for s in storage.stats.paths.values() for r in s.records)
    last_lookup = max(r.time for r in sam.stats.records if r.endpoint == "locations")
    assert first_touch < last_lookup


def test_summary_names_definition_and_catalog(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--catalog samweb picks SAM over catalog.default; the summary names definition and SAM."""
    sam = samweb({"small": _mixed(10)})
    config = _config(tmp_path, sam, storage, default="local")
    assert main(_warm(config, proxy, pki, "small", "--catalog", "samweb")) == 0
    out = capsys.readouterr().out
    assert f"prestaged warm small (samweb catalog: {sam.base_url}): done" in out
    assert re.search(r"warm\s+10\b", out)


def test_unresolved_file_reported_and_exit_1(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file whose only location matches no rule is reported with its location, not dropped."""
    eos = {"name": "on_eos.root", "locations": ["cern-eos:/eos/experiment/neutplatform/x"]}
    sam = samweb({"d": _mixed(4, [eos])})
    config = _config(tmp_path, sam, storage)
    assert main(_warm(config, proxy, pki, "d", "--json")) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["warm"] == 4 and doc["exit_code"] == 1
    assert doc["unresolved_count"] == 1 and doc["unresolved_omitted"] == 0
    assert doc["unresolved"] == [{"name": "on_eos.root",
                                  "locations": ["cern-eos:/eos/experiment/neutplatform/x"],
                                  "reason": "no rewrite rule matches its locations"}]
    assert main(_warm(config, proxy, pki, "d")) == 1
    out = capsys.readouterr().out
    assert "unresolved: 1 file got no URL and was not touched:" in out
    assert "on_eos.root  no rewrite rule matches its locations: cern-eos:/eos/" in out
    assert storage.stats.requests_total == 8


@pytest.mark.parametrize("command", ["warm", "files"])
def test_unknown_definition_exit_4_with_sam_message(
    pki: TestPKI, proxy: Path, samweb: Samweb, tmp_path: Path, command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown definition: exit 4, one line with SAM's own message, no retries."""
    sam = samweb({"known": _mixed(3)})
    config = _config(tmp_path, sam, None)
    args = [command, "no-such-def", "--config", str(config), "--proxy", str(proxy),
            "--ca-dir", str(pki.ca_dir)]
    assert main(args) == 4
    line = _error_line(capsys.readouterr().err)
    assert line == ("prestaged: error: definition 'no-such-def' not found in SAM (dune): "
                    "Definition no-such-def not found")
    # Each endpoint asked once (warm also asks the count, beside the listing): no retries.
    assert sam.stats.requests["list"] == 1 and max(sam.stats.requests.values()) == 1


def test_catalog_503_twice_then_200_succeeds(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """503, 503 then service, on the listing and on a location lookup: the run succeeds."""
    sam = samweb({"d": _mixed(1200)})
    sam.inject("list", [Status(503), Status(503, retry_after="0")])
    sam.inject("locations", [Status(503), SamError(503, "ServiceUnavailable", "try later")])
    config = _config(tmp_path, sam, storage)
    assert main(_warm(config, proxy, pki, "d", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["warm"] == 1200
    located = [r for r in sam.stats.records if r.endpoint == "locations"]
    assert sam.stats.requests["list"] == 3 and [r.status for r in located].count(503) == 2
    assert sum(r.names for r in located if r.status == 200) == 1200
    assert [r.status for r in sam.stats.records if r.endpoint == "list"] == [503, 503, 200]


@pytest.mark.parametrize("command", ["warm", "files"])
def test_dimension_error_not_retried(
    pki: TestPKI, proxy: Path, samweb: Samweb, tmp_path: Path, command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dims SAM cannot parse: 400 DimensionError, not retried, exit 4."""
    sam = samweb({"d": _mixed(3)})
    config = _config(tmp_path, sam, None)
    args = [command, "--dims", "run_numbr 5141", "--config", str(config), "--proxy", str(proxy),
            "--ca-dir", str(pki.ca_dir)]
    assert main(args) == 4
    line = _error_line(capsys.readouterr().err)
    assert "SAM (dune) rejected the dimensions: Unable to parse dimensions: run_numbr 5141" in line
    # Each endpoint asked once (warm also asks the count, beside the listing): no retries.
    assert sam.stats.requests["dims-list"] == 1 and max(sam.stats.requests.values()) == 1


@pytest.mark.parametrize("reorder", [False, True], ids=["same order", "another order"])
def test_a_listing_cut_off_resumes_with_every_file_once(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], reorder: bool,
) -> None:
    """A listing dropped after 1,234 lines is listed again, skipping what was already handed
    out by name, not by count: SAM promises no order, and a second answer in another order
    lost files that way."""
    files = _mixed(3000)
    sam = samweb({"d": files}, reorder=reorder)
    sam.inject("list", [Truncate(1234)])
    config = _config(tmp_path, sam, storage)
    assert main(_warm(config, proxy, pki, "d", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["warm"] == 3000 and doc["duplicates_skipped"] == 0
    assert sam.stats.requests["list"] == 2
    assert storage.stats.requests_total == 3000
    assert sorted(storage.stats.paths) == sorted(_expected_path(f) for f in files)


def test_files_lists_urls_anonymously(
    pki: TestPKI, samweb: Samweb, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`prestaged files` prints URLs in SAM's order, anonymously without a proxy; unresolved: exit 1."""
    eos = {"name": "on_eos.root", "locations": ["cern-eos:/eos/x"]}
    files = _mixed(6, [eos])
    sam = samweb({"d": files})
    missing = tmp_path / "no-proxy"
    config = _config(tmp_path, sam, None,
                     credentials=f'proxy = "{missing}"\nca_dir = "{pki.ca_dir}"\n')
    assert main(["files", "d", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    door = "https://127.0.0.1:1" + DOOR_PATH
    assert out.splitlines() == [door + _expected_path(f)[len(DOOR_PATH):] for f in files[:6]]
    [summary] = [ln for ln in err.splitlines() if ln.startswith("# d ")]
    assert summary.endswith(": 6 files resolved, 1 unresolved"), summary
    assert "on_eos.root  no rewrite rule matches its locations: cern-eos:/eos/x" in err
    assert f"asking SAM web without a certificate: proxy {missing}" in caplog.text
    assert set(sam.stats.client_dns) == {None}
    assert main(["files", "d", "--config", str(config), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["resolved"] == 6 and doc["files"][0] == {
        "name": files[0]["name"], "url": out.splitlines()[0], "size": files[0]["size"]}
    assert doc["unresolved"][0]["name"] == "on_eos.root" and doc["exit_code"] == 1
    assert {r.role for r in sam.stats.records} == {None}  # no role configured: no header


def test_sam_role_header_is_sent_when_configured(
    pki: TestPKI, samweb: Samweb, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """catalog.samweb.role goes out as the SAM-Role header of every request."""
    sam = samweb({"d": _mixed(3)})
    config = _config(tmp_path, sam, None, samweb='role = "production"\nuse_certificate = false\n',
                     credentials=f'ca_dir = "{pki.ca_dir}"\n')
    assert main(["files", "d", "--config", str(config)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert sam.stats.records and {r.role for r in sam.stats.records} == {"production"}


def test_certificate_required_anonymous_exit_3(
    pki: TestPKI, proxy: Path, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A SAM that requires a certificate: anonymous gives exit 3 and the fix; a proxy works."""
    sam = samweb({"d": _mixed(3)}, require_cert=True)
    config = _config(tmp_path, sam, None, samweb="use_certificate = false\n")
    assert main(["files", "d", "--config", str(config), "--ca-dir", str(pki.ca_dir)]) == 3
    line = _error_line(capsys.readouterr().err)
    assert "requires a client certificate (give a proxy with --proxy)" in line
    config = _config(tmp_path, sam, None)
    assert main(["files", "d", "--config", str(config), "--proxy", str(proxy),
                 "--ca-dir", str(pki.ca_dir)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_access_url_mode_and_long_dims_post(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """url_mode = "access-url" asks SAM per file; a >1024-char --dims query is POSTed."""
    files = _mixed(60)
    door = storage.url(DOOR_PATH) + "/"
    sam = samweb({"d": files}, access_rules=[("enstore:/pnfs/dune/", door),
                                             ("dcache:/pnfs/dune/", door)])
    query = "file_name " + ", ".join(f["name"] for f in files)
    assert len(query) > 1024
    sam.add_dims(query, [f["name"] for f in files[:30]])  # SAM's answer to the exact query
    config = _config(tmp_path, sam, storage, rules=False,
                     samweb='url_mode = "access-url"\naccess_url_concurrency = 4\n')
    assert main(_warm(config, proxy, pki, "--dims", query, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["warm"] == 30 and doc["catalog"] == "samweb"
    assert set(storage.stats.paths) == {_expected_path(f) for f in files[:30]}
    assert sam.stats.requests == {"dims-list": 1, "access-url": 30}
    assert [r.method for r in sam.stats.records if r.endpoint == "dims-list"] == ["POST"]


@pytest.mark.slow
def test_demo_with_samweb_catalog() -> None:
    """`prestaged demo --catalog samweb` resolves through the emulator and warms every file."""
    res = run_cli("demo", "--catalog", "samweb", "--files", "300",
                  clean=("X509_", "PRESTAGED_", "SAM_"))
    assert res.returncode == 0, res.stderr
    assert re.search(r"warm\s+300\b", res.stdout)
    assert "(samweb catalog: https://127.0.0.1:" in res.stdout
    # 300 names of 16 characters take two requests of at most MAX_LOCATIONS_TARGET bytes.
    assert ("the SAM web emulator answered 4 requests (1 file count, 1 listing, 2 bulk "
            "location lookups)") in res.stdout
    assert "the storage saw 300 requests" in res.stdout


def test_no_secrets_in_samweb_output(
    pki: TestPKI, proxy: Path, samweb: Samweb, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Debug logs, retries, errors and JSON of SAM runs never contain the proxy's key material."""
    caplog.set_level("DEBUG")
    sam = samweb({"d": _mixed(20, [{"name": "x", "locations": ["rucio:protodune-sp"]}])})
    sam.inject("locations", [Status(503)])
    config = _config(tmp_path, sam, None)
    base = ["--config", str(config), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "-v"]
    assert main(["files", "d", *base, "--json"]) == 1
    assert main(["warm", "d", "--dry-run", *base]) == 1
    assert main(["files", "nope", *base]) == 4
    out, err = capsys.readouterr()
    text = out + err + caplog.text
    key = re.search(r"PRIVATE KEY-----\n(.*?)-----END", proxy.read_text(), re.S)
    assert key is not None
    assert "PRIVATE KEY" not in text
    assert not any(line in text for line in key.group(1).splitlines() if len(line) > 20)
    assert "retry 1" in caplog.text and "rucio:protodune-sp" in err


# --- bulk location requests held to the front ends' request-line limit ---------------------------


def _long_names(n: int, length: int = 120) -> list[dict[str, Any]]:
    """``n`` dcache: files with names of about ``length`` characters, some needing escapes."""
    files = []
    for i in range(n):
        stem = f"np04_raw_run{i:06d}_" + ("p+q&r=%é~" if i % 7 == 0 else "") + "x" * length
        files.append({"name": stem[:length] + ".root", "size": i,
                      "locations": ["dcache:/pnfs/dune/persistent/long"]})
    return files


async def _resolve(sam: ThreadedSamWebServer, pki: TestPKI, definition: str = "long",
                   **cfg: Any) -> tuple[list[FileRef], list[str]]:
    """The files of ``definition`` through the library, anonymously; and every request outcome."""
    config = SamWebConfig(base_url=sam.base_url, retry_initial=0.0, retry_max=0.0,
                          retry_for=20.0,
                          rewrite=(RewriteRule("dcache:/pnfs/dune/", "https://door.test/dune/"),),
                          **cfg)
    catalog = SamWebCatalog(definition, config, samweb_ssl_context(None, pki.ca_dir), env={})
    outcomes: list[str] = []
    catalog.on_request = outcomes.append
    refs = [ref async for ref in catalog.files()]
    assert catalog.unresolved_count == 0
    return refs, outcomes


async def test_batch_of_500_long_names_fits_the_real_request_line_limit(
    pki: TestPKI, samweb: Samweb,
) -> None:
    """batch = 500 long names: split by bytes, every request line <= 8190, nothing refused."""
    files = _long_names(500)
    sam = samweb({"long": files})
    refs, outcomes = await _resolve(sam, pki, batch=500)
    assert [r.name for r in refs] == [f["name"] for f in files]
    assert set(outcomes) == {"ok"}  # aiohttp's 400s never reach the records: count them here
    located = [r for r in sam.stats.records if r.endpoint == "locations"]
    assert len(located) > 1 and sum(r.names for r in located) == 500
    assert all(r.status == 200 and r.line <= LINE_LIMIT for r in located)
    assert max(r.line for r in located) <= MAX_LOCATIONS_TARGET + len("GET  HTTP/1.1")


async def test_stricter_front_end_414_is_split_until_requests_fit(
    pki: TestPKI, samweb: Samweb,
) -> None:
    """A front end answering 414 above 1,500 bytes: requests are halved, everything resolves."""
    files = _long_names(2000)
    sam = samweb({"long": files}, max_request_line=1500)
    refs, _ = await _resolve(sam, pki, batch=500)
    assert [r.name for r in refs] == [f["name"] for f in files]
    located = [r for r in sam.stats.records if r.endpoint == "locations"]
    refused = [r for r in located if r.status == 414]
    answered = [r for r in located if r.status == 200]
    assert refused and all(r.line > 1500 for r in refused)
    assert all(r.line <= 1500 for r in answered) and sum(r.names for r in answered) == 2000
    # Later batches are cut under the learnt limit: the refusals are not repeated to the end.
    assert len(refused) < len(answered) and all(r.status == 200 for r in located[-10:])


@pytest.mark.parametrize(("limit", "length"), [(300, 400), (None, LINE_LIMIT + 100)])
async def test_one_name_too_long_for_the_server_is_named(
    pki: TestPKI, samweb: Samweb, limit: int | None, length: int,
) -> None:
    """A single name the front end still refuses (414, or aiohttp's 400) fails naming it."""
    files = _long_names(3)
    files.append({"name": "huge_" + "y" * length + ".root",
                  "locations": ["dcache:/pnfs/dune/persistent/long"]})
    sam = samweb({"long": files}, max_request_line=limit)
    with pytest.raises(CatalogError) as err:
        await _resolve(sam, pki, batch=500)
    message = str(err.value)
    assert message.startswith("SAM (dune) refused locating file 'huge_yyyy")
    assert "even with this one name in it" in message


def test_the_gate_counts_unresolved_files_as_cold(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Files SAM lists without a usable location never reach the state: `wait --ready 1.0`
    passed on the half of a definition that had URLs, and `submit` ran on it. They now count
    as cold in the gate and show in `status`."""
    eos = [{"name": f"on_eos_{i}.root", "locations": ["cern-eos:/eos/experiment/x"]}
           for i in range(2)]
    sam = samweb({"d": _mixed(4, eos)})
    config = _config(tmp_path, sam, storage)
    state = ["--state", str(tmp_path / "state.db")]
    gate = ["wait", "d", "--config", str(config), "--proxy", str(proxy), "--ca-dir",
            str(pki.ca_dir), *state, "--ready", "1.0", "--timeout", "1s", "--json"]
    assert main(gate) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["files"], doc["fresh"], doc["unresolved"]) == (6, 4, 2), doc
    assert storage.stats.requests_total == 4  # the 4 with a URL were touched
    assert main(["status", "d", *state, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["definitions"]
    assert (row["files"], row["fresh"], row["unresolved"]) == (4, 4, 2)
    assert main(["status", *state]) == 0
    assert "unresolved: 2 more files the catalog gave no URL for" in capsys.readouterr().out
    assert main([*gate[:-1], "--ready", "0.6"]) == 0  # 4 of 6


async def test_a_stalled_listing_names_what_timed_out_and_its_key(
    pki: TestPKI, samweb: Samweb,
) -> None:
    """A listing that sends nothing: the error says nothing came for `timeout` seconds and
    names catalog.samweb.timeout with its value, not only "timed out"."""
    sam = samweb({"d": _mixed(3)})
    sam.inject("list", [Delay(1.5)])
    config = SamWebConfig(base_url=sam.base_url, retry_for=0.0, timeout=0.3,
                          rewrite=(RewriteRule("dcache:/pnfs/dune/", "https://door.test/"),))
    catalog = SamWebCatalog("d", config, samweb_ssl_context(None, pki.ca_dir), env={})
    with pytest.raises(CatalogError) as err:
        [ref async for ref in catalog.files()]
    assert "timed out: nothing received for 0.3 s (catalog.samweb.timeout = 0.3s)" \
        in str(err.value)


def test_control_characters_from_sam_never_reach_the_terminal(
    pki: TestPKI, samweb: Samweb, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`files` prints a SAM access URL holding ESC/BEL percent-encoded (the same URL), and
    the unresolved list shows names and locations with control characters as \\xNN."""
    evil = {"name": "a\x1b]0;pwned\x07.root", "locations": ["dcache:/pnfs/dune/persistent/x"]}
    forged = {"name": "b\x1b[2J.root", "locations": ["cern-eos:/eos/x\rprestaged: all warm"]}
    sam = samweb({"d": [evil, forged]},
                 access_rules=[("dcache:/pnfs/dune/", "https://door.test/dune/")])
    config = _config(tmp_path, sam, None, rules=False, samweb='url_mode = "access-url"\n')
    assert main(["files", "d", "--config", str(config), "--ca-dir", str(pki.ca_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == "https://door.test/dune/persistent/x/a%1B]0;pwned%07.root\n"
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err
    assert "  b\\x1b[2J.root  SAM has no https URL for it: -" in err
    config = _config(tmp_path, sam, None)  # rewrite rules: the location is shown
    assert main(["files", "d", "--config", str(config), "--ca-dir", str(pki.ca_dir)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    assert ("  b\\x1b[2J.root  no rewrite rule matches its locations: "
            "cern-eos:/eos/x\\x0dprestaged: all warm") in err


@pytest.mark.timeout(30)
def test_a_stalled_file_count_neither_delays_nor_holds_the_run(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, samweb: Samweb, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The count (only for the progress display) is asked beside the run: a count SAM holds
    for a minute (catalog.samweb.timeout: 10 min) does not hold the warm, which ends and
    drops the request."""
    files = _mixed(5)
    sam = samweb({"d": files})
    sam.inject("count", [Delay(60.0)])
    config = _config(tmp_path, sam, storage, samweb='timeout = "10m"\n')
    assert main(_warm(config, proxy, pki, "d", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["warm"] == 5
    # Never answered (or not even asked yet): the run did not wait for it.
    assert all(r.status == 0 for r in sam.stats.records if r.endpoint == "count")


async def test_a_listing_abandoned_midway_closes_without_an_error(
    pki: TestPKI, samweb: Samweb,
) -> None:
    """A consumer that stops after a few files (a run stopped, `files | head`) closed the
    listing while the pipeline's feeder was still inside it (here: waiting out the backoff of
    a listing cut off): "aclose(): asynchronous generator is already running". The pipeline
    is closed first now, and the listing after it."""
    sam = samweb({"d": _mixed(3000)})
    sam.inject("list", [Truncate(600)])
    config = SamWebConfig(base_url=sam.base_url, retry_initial=30.0, retry_max=30.0,
                          rewrite=(RewriteRule("dcache:/pnfs/dune/", "https://door.test/dune/"),
                                   RewriteRule("enstore:/pnfs/dune/", "https://door.test/dune/")))
    catalog = SamWebCatalog("d", config, samweb_ssl_context(None, pki.ca_dir), env={})
    files = catalog.files()
    got = [await files.__anext__() for _ in range(10)]
    await files.aclose()  # what `async for ...: break` does once the generator is collected
    assert len(got) == 10 and sam.stats.requests["list"] == 1
