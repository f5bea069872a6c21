"""Releasing tape pins (issue 13, "Pins"): ``prestaged release`` against the dCache emulator,
from the state alone; a refusal keeps in the state the pins it did not release; a campaign
stage with ``release_after_complete`` releases its slice once ``complete`` succeeded.

The tests that read or change pins in the state run on both backends (``backend``: SQLite and
PostgreSQL, issue 16); the output format, the path map and the spec check stay on SQLite."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytest
from aiohttp import web
from cli_runner import CliResult, run_cli
from conftest import Backend
from daemon_harness import DEADLINE, state_files

from prestaged.campaign.spec import CampaignConfig, parse_campaign
from prestaged.errors import ConfigError
from prestaged.model import FileRef, TapeInfo
from prestaged.testing.appserver import serving
from prestaged.testing.dcache import DCacheConfig, Locality, ThreadedDCache
from prestaged.testing.pki import TestPKI

QUICK = """
[retry]
initial = "10ms"
max = "50ms"
[storage]
poll_min = "20ms"
poll_max = "100ms"
stage_batch = 3
"""


@pytest.fixture
def site(pki: TestPKI) -> Iterator[ThreadedDCache]:
    """A dCache emulator with 2 drives (fast tape) in a thread."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=2, door_timeout=5.0)) as srv:
        yield srv


def _cli(pki: TestPKI, proxy: Path, tmp_path: Path, *args: str, extra: str = "",
         backend: Optional[Backend] = None) -> CliResult:
    """``prestaged ARGS`` in-process with the test proxy, the quick config (``extra`` appended
    to its [storage] table) and ``backend``'s state (default: the file tmp_path/state.db)."""
    config = tmp_path / "prestaged.toml"
    backend = backend or Backend("sqlite", tmp_path, None)
    config.write_text(QUICK + extra + backend.state_table())
    res = run_cli(*args, "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  *backend.state_args(), "--config", str(config))
    assert "Traceback" not in res.stderr, res.stderr
    if backend.url is not None:
        assert state_files(tmp_path) == []  # never a state file beside the database
    return res


def _tape_definition(site: ThreadedDCache, tmp_path: Path, n: int = 7, *,
                     with_disk: bool = True) -> tuple[Path, list[str]]:
    """A local definition of ``n`` tape-only files (on two tapes) and one disk file (unless
    not ``with_disk``)."""
    paths = [f"/pnfs/p/tape{i}" for i in range(n)]
    for i, p in enumerate(paths):
        site.add_file(p, 10, Locality.TAPE, tape=f"T{i % 2}")
    listed = paths
    if with_disk:
        site.add_file("/pnfs/p/disk", 10, Locality.DISK)
        listed = [*paths, "/pnfs/p/disk"]
    definition = tmp_path / "ds.txt"
    definition.write_text("".join(site.door_url(p) + "\n" for p in listed))
    return definition, paths


def _recalling(pki: TestPKI) -> ThreadedDCache:
    """A dCache emulator whose one drive takes an hour to mount: nothing lands in a test."""
    return ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                          DCacheConfig(drives=1, mount_seconds=3600.0))


def _pinned_rows(backend: Backend) -> int:
    """Files of the state that hold a pin."""
    return int(backend.query(
        "SELECT COUNT(*) FROM files WHERE pinned_until IS NOT NULL")[0][0])


def _relied_on(backend: Backend) -> int:
    """Memberships that rely on a stage request's pin (landed or not)."""
    return int(backend.query(
        "SELECT COUNT(*) FROM members WHERE pin_request IS NOT NULL")[0][0])


def test_release_drops_the_pins_a_warm_made_and_a_second_release_finds_none(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """After a warm staged 7 tape files in 3 requests, `release` sends one release per request
    naming their paths (the emulator's pins are gone), NULLs pinned_until in the state and says
    so per endpoint; run again, it sends nothing and says nothing is pinned (exit 0)."""
    definition, paths = _tape_definition(site, tmp_path)
    warm = _cli(pki, proxy, tmp_path, "warm", str(definition), "-q", backend=backend)
    assert warm.returncode == 0, warm.stderr
    assert all(site.replica(p).pins for p in paths)
    assert _pinned_rows(backend) == 7

    res = _cli(pki, proxy, tmp_path, "release", str(definition), "--json", backend=backend)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["files"], doc["requests"], doc["left"]) == (7, 3, 0)
    assert doc["endpoints"] == [{"uri": site.tape_api_url, "files": 7, "requests": 3,
                                 "cancelled": 0}]
    assert (doc["cancelled"], doc["kept"], doc["kept_for"]) == (0, 0, [])
    assert doc["definition"] == str(definition.resolve()) and doc["catalog"] == "local"
    assert all(not site.replica(p).pins for p in paths)
    assert site.stats()["requests"]["frontend:release"] == 3
    assert "frontend:cancel" not in site.stats()["requests"]  # all on disk: nothing to cancel
    assert _pinned_rows(backend) == 0 and _relied_on(backend) == 0

    again = _cli(pki, proxy, tmp_path, "release", str(definition), backend=backend)
    assert again.returncode == 0, again.stderr
    assert "nothing pinned" in again.stdout
    assert site.stats()["requests"]["frontend:release"] == 3


def test_release_prints_per_endpoint_files_and_requests(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """The text form names the definition and, per Tape REST endpoint, N files in M requests."""
    definition, _ = _tape_definition(site, tmp_path, n=2)
    assert _cli(pki, proxy, tmp_path, "warm", str(definition), "-q").returncode == 0
    res = _cli(pki, proxy, tmp_path, "release", str(definition))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"local:{definition.resolve()}: released "
                                  f"{site.tape_api_url}: 2 files in 1 request")


def test_release_names_files_by_their_namespace_path_through_the_path_map(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A door serving /dune/f for /pnfs/fnal.gov/usr/dune/f: the release names the namespace
    path by the same [[storage.path_map]] rule the stage request did, so the pins go."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(door_root="/pnfs/fnal.gov/usr")) as srv:
        paths = [f"/pnfs/fnal.gov/usr/dune/f{i}" for i in range(2)]
        for p in paths:
            srv.add_file(p, 10, Locality.TAPE)
        urls = [srv.door_url(p) for p in paths]
        rule = (f'\n[[storage.path_map]]\nurl_prefix = "{urls[0].rsplit("/", 2)[0]}/"\n'
                'path_prefix = "/pnfs/fnal.gov/usr/"\n')
        definition = tmp_path / "ds.txt"
        definition.write_text("".join(u + "\n" for u in urls))
        assert _cli(pki, proxy, tmp_path, "warm", str(definition), "-q",
                    extra=rule).returncode == 0
        assert all(srv.replica(p).pins for p in paths)
        res = _cli(pki, proxy, tmp_path, "release", str(definition), "--json", extra=rule)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["files"] == 2
        assert all(not srv.replica(p).pins for p in paths)


def test_release_of_a_definition_the_state_does_not_know_is_exit_4(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """A definition with no record: exit 4 (as ``status``), one line naming it and the state
    (file or URL); no request."""
    backend.store().open().close()
    res = _cli(pki, proxy, tmp_path, "release", "never-warmed", "--catalog", "samweb",
               backend=backend)
    assert res.returncode == 4
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "'never-warmed' (catalog samweb) has no record in state" in lines[0]
    assert backend.where in lines[0]


# --- pins per definition (M3) and requests not on disk yet (L3) ----------------------------


def _two_definitions(site: ThreadedDCache, tmp_path: Path) -> tuple[Path, Path]:
    """A (a1, shared) and B (shared, b1): three tape-only files on one tape."""
    for p in ("/pnfs/p/a1", "/pnfs/p/shared", "/pnfs/p/b1"):
        site.add_file(p, 10, Locality.TAPE, tape="T1")
    a, b = tmp_path / "A.txt", tmp_path / "B.txt"
    a.write_text(f"{site.door_url('/pnfs/p/a1')}\n{site.door_url('/pnfs/p/shared')}\n")
    b.write_text(f"{site.door_url('/pnfs/p/shared')}\n{site.door_url('/pnfs/p/b1')}\n")
    return a, b


def _states(site: ThreadedDCache) -> dict[str, str]:
    """Each path's state in each stage request the emulator holds: ``{"<path> <n>": state}``,
    n counting the path's requests in the order they were made."""
    def snapshot() -> dict[str, str]:
        seen: dict[str, int] = {}
        out = {}
        for request in site.server.frontend.requests.values():
            for path, f in request.files.items():
                seen[path] = seen.get(path, 0) + 1
                out[f"{path} {seen[path]}"] = f.state
        return out
    return site._call(snapshot)


def test_release_never_frees_a_pin_the_definition_did_not_ask_for(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """A staged the shared file; B's run found it on disk (pinned by A's request) and staged
    only b1. `release B` frees b1 alone: the shared file keeps A's pin, which A's jobs were
    promised; `release A` frees it."""
    a, b = _two_definitions(site, tmp_path)
    assert _cli(pki, proxy, tmp_path, "warm", str(a), "-q", backend=backend).returncode == 0
    (first,) = site.replica("/pnfs/p/shared").pins
    assert _cli(pki, proxy, tmp_path, "warm", str(b), "-q", backend=backend).returncode == 0
    res = _cli(pki, proxy, tmp_path, "release", str(b), "--json", backend=backend)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["files"], doc["requests"], doc["kept"]) == (1, 1, 0)
    assert list(site.replica("/pnfs/p/shared").pins) == [first]
    assert not site.replica("/pnfs/p/b1").pins

    res = _cli(pki, proxy, tmp_path, "release", str(a), "--json", backend=backend)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == 2
    assert not site.replica("/pnfs/p/shared").pins and not site.replica("/pnfs/p/a1").pins


def test_release_keeps_a_pin_another_definition_relies_on_and_cancels_what_is_not_on_disk(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """A's run gave up while the tape mounts, its request open; B's run followed that request
    for the shared file and made one for b1, and gave up too. `release B` cancels and releases
    b1's request (not on disk: dCache would go on recalling it) and keeps the shared file's
    request for A, saying so; `release A` then cancels and releases A's request."""
    with _recalling(pki) as site:
        a, b = _two_definitions(site, tmp_path)
        for definition in (a, b):
            res = _cli(pki, proxy, tmp_path, "wait", str(definition), "--timeout", "300ms",
                       backend=backend)
            assert res.returncode == 1, res.stderr
        assert site.stats()["requests"]["frontend:stage"] == 2  # B followed A's for shared
        res = _cli(pki, proxy, tmp_path, "release", str(b), "--json", backend=backend)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert (doc["files"], doc["requests"], doc["cancelled"]) == (1, 1, 1)
        assert (doc["kept"], doc["kept_for"]) == (1, [f"local:{a.resolve()}"])
        assert _states(site) == {"/pnfs/p/a1 1": "STARTED", "/pnfs/p/shared 1": "STARTED",
                                 "/pnfs/p/b1 1": "CANCELLED"}
        text = _cli(pki, proxy, tmp_path, "release", str(b), backend=backend)
        assert "nothing pinned" in text.stdout  # B relies on nothing any more

        res = _cli(pki, proxy, tmp_path, "release", str(a), "--json", backend=backend)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert (doc["files"], doc["cancelled"], doc["kept"]) == (2, 2, 0)
        assert set(_states(site).values()) == {"CANCELLED"}
        assert site.stats()["requests"]["frontend:cancel"] == 2
        assert _relied_on(backend) == 0
        status = run_cli("status", str(a), "--json", *backend.cli())
        [st] = json.loads(status.stdout)["definitions"]
        assert st["tape"] == {"tape_only": 2}  # cancelled: no longer staging


# --- a frontend that refuses one request's release ------------------------------------------


@pytest.fixture
async def refusing(pki: TestPKI) -> AsyncIterator[tuple[str, list[str], list[int]]]:
    """A Tape REST frontend on 127.0.0.1 (client certificate required) whose release of request
    ``a-ok`` succeeds and of ``b-no`` answers the status put in ``status[0]``: (its URI, the
    request ids released, status)."""
    released: list[str] = []
    status = [403]

    async def release(request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        if rid == "b-no":
            return web.json_response({"title": "Forbidden", "detail": "Permission denied"},
                                     status=status[0])
        released.append(rid)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/api/tape/v1/release/{id}", release)
    async with serving(app, pki.server_ssl_context()) as port:
        yield f"https://127.0.0.1:{port}/api/tape/v1", released, status


def _seed_pins(backend: Backend, uri: str) -> str:
    """A state with definition ``ds`` (samweb) of 4 files pinned by requests a-ok and b-no."""
    store = backend.store().open()
    try:
        refs = [FileRef(name=f"f{i}", url=f"https://door.example:2880/pnfs/x/f{i}")
                for i in range(4)]
        store.add_members("samweb", "ds", refs)
        for i, ref in enumerate(refs):
            request = "a-ok" if i < 2 else "b-no"
            store.note_tape(ref.url, TapeInfo("TAPE", request, uri, requested_at=1e9,
                                              lifetime=3e9), wanted_by=("samweb", "ds"))
            store.note_tape(ref.url, TapeInfo("TAPE", request, uri, staged_at=1e9,
                                              pinned_until=4e9))
        store.flush()
    finally:
        store.close()
    return "ds"


@pytest.mark.parametrize(("status", "code"), [(403, 3), (401, 3), (500, 5)])
async def test_a_refused_release_keeps_the_pins_it_did_not_release(
    refusing: tuple[str, list[str], list[int]], pki: TestPKI, proxy: Path, tmp_path: Path,
    status: int, code: int, backend: Backend
) -> None:
    """The frontend refuses the second request's release: exit 3 for 401/403, 5 otherwise, one
    error line; the first request's files are unpinned in the state, the refused ones keep
    pinned_until."""
    uri, released, answer = refusing
    answer[0] = status
    name = _seed_pins(backend, uri)
    res = await asyncio.to_thread(lambda: _cli(pki, proxy, tmp_path, "release", name,
                                               "--catalog", "samweb", "-q", backend=backend))
    assert res.returncode == code, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("prestaged: error: ")
    assert f"release/b-no: {'the Tape REST API refused us' if code == 3 else ''}" in res.stderr
    assert released == ["a-ok"]
    rows = dict(backend.query("SELECT stage_request, COUNT(pinned_until) FROM files "
                              "GROUP BY stage_request"))
    assert rows == {"a-ok": 0, "b-no": 2}


# --- campaigns --------------------------------------------------------------------------------

# Records how many files of the state (a SQLite file or a PostgreSQL URL) still hold a pin
# when `complete` is polled, exits 0.
COMPLETE = """\
import sys
if sys.argv[1].startswith("postgresql:"):
    import psycopg
    conn = psycopg.connect(sys.argv[1])
else:
    import sqlite3
    conn = sqlite3.connect(sys.argv[1])
n = conn.execute("SELECT COUNT(*) FROM files WHERE pinned_until IS NOT NULL").fetchone()[0]
open(sys.argv[2], "w").write(str(n))
"""


def _q(*parts: object) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def test_a_campaign_stage_releases_its_slice_once_complete_succeeded(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """release_after_complete: the slice's tape files are staged and pinned for the job, still
    pinned when complete is polled, released on the emulator and in the state once it exits 0;
    the completed submission's reason says what was released."""
    definition, paths = _tape_definition(site, tmp_path, n=4)
    script = tmp_path / "complete.py"
    script.write_text(COMPLETE)
    seen = tmp_path / "pinned-at-complete"
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        f'name = "c"\n[[stage]]\nname = "s"\ninput = {json.dumps(str(definition))}\n'
        f'submit = {json.dumps(_q(sys.executable, "-c", "pass"))}\n'
        f'complete = {json.dumps(_q(sys.executable, script, backend.url or backend.path, seen))}\n'
        "release_after_complete = true\n")
    res = _cli(pki, proxy, tmp_path, "campaign", "run", str(campaign), backend=backend)
    assert res.returncode == 0, res.stderr
    assert seen.read_text() == "4"  # pinned while the job ran
    assert all(not site.replica(p).pins for p in paths)
    assert _pinned_rows(backend) == 0
    show = run_cli("campaign", "show", "c", "--json", *backend.cli())
    reason = json.loads(show.stdout)["submissions"][0]["reason"]
    assert reason.endswith("exited 0 after 1 poll(s); pins released: 4 file(s) in "
                           "2 request(s)"), reason


def test_release_after_complete_needs_a_complete_command(tmp_path: Path) -> None:
    """Without complete a submission is complete once submitted: the option is refused, naming
    the key, rather than releasing the pins before the jobs read the files."""
    from prestaged.campaign.spec import parse_campaign

    text = ('name = "c"\n[[stage]]\nname = "s"\ninput = "d"\nsubmit = "true"\n'
            "release_after_complete = true\n")
    with pytest.raises(ConfigError, match=r"stage\[0\]\.release_after_complete: expected a "
                                          "stage with a complete command"):
        parse_campaign(text, tmp_path / "c.toml")


def _releasing_campaign(tmp_path: Path) -> CampaignConfig:
    """Campaign "c": one stage "s" over a one-file list, whose submit and complete succeed at
    once, with release_after_complete."""
    ds = tmp_path / "ds.txt"
    ds.write_text("https://127.0.0.1:1/pnfs/a\n")
    ok = _q(sys.executable, "-c", "pass")
    return parse_campaign(f'name = "c"\n[[stage]]\nname = "s"\ninput = {json.dumps(str(ds))}\n'
                          f"submit = {json.dumps(ok)}\ncomplete = {json.dumps(ok)}\n"
                          "release_after_complete = true\n", tmp_path / "c.toml")


async def test_a_failed_release_is_logged_and_the_submission_still_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, backend: Backend
) -> None:
    """A release that fails (the frontend down) is a warning and a note in the reason of
    completed, never the campaign's failure: the pins expire on their own."""
    from prestaged.campaign.runner import run_campaign
    from prestaged.catalog import Catalog
    from prestaged.catalog.local import LocalCatalog
    from prestaged.errors import StorageError
    from prestaged.gate import GateResult
    from prestaged.pins import ReleaseReport

    asked: list[str] = []

    async def gate(catalog: Catalog, ready: float, timeout: float, retry: float) -> GateResult:
        return GateResult(catalog.name, catalog.definition, ready, 1, 1, 1, 0.0, 0, "ready")

    async def release(catalog: Catalog) -> ReleaseReport:
        asked.append(catalog.definition)
        raise StorageError("https://tape.example/api/tape/v1/release/r1: 502 Bad Gateway")

    cfg = _releasing_campaign(tmp_path)
    with backend.store() as store:
        result = await run_campaign(cfg, store, gate=gate, open_catalog=LocalCatalog,
                                    workdir=tmp_path / "work", release=release)
        with store.transaction() as conn:
            state, reason = conn.execute(
                "SELECT state, reason FROM campaign_submissions").fetchone()
    assert result.exit_code == 0, result
    assert len(asked) == 1 and asked[0].endswith("s-1.urls")
    assert state == "completed"
    assert reason.endswith("; pins not released: https://tape.example/api/tape/v1/release/r1: "
                           "502 Bad Gateway")
    assert "pins not released (they expire on their own)" in caplog.text
    assert backend.url is None or state_files(tmp_path) == []


async def test_a_slice_whose_pins_another_definition_relies_on_says_it_kept_them(
    tmp_path: Path
) -> None:
    """release_after_complete on a slice whose pins another definition relies on too: the
    completed submission's reason says they were kept, and for whom (not "nothing pinned")."""
    from prestaged.campaign.runner import run_campaign
    from prestaged.catalog import Catalog
    from prestaged.catalog.local import LocalCatalog
    from prestaged.gate import GateResult
    from prestaged.pins import Released, ReleaseReport
    from prestaged.state.store import Store

    async def gate(catalog: Catalog, ready: float, timeout: float, retry: float) -> GateResult:
        return GateResult(catalog.name, catalog.definition, ready, 1, 1, 1, 0.0, 0, "ready")

    async def release(catalog: Catalog) -> ReleaseReport:
        return ReleaseReport(catalog.name, catalog.definition,
                             (Released("https://fe/api/v1/tape", 1, 1),), 0, 2,
                             ("local:/other.txt",))

    cfg = _releasing_campaign(tmp_path)
    with Store(tmp_path / "state.db") as store:
        result = await run_campaign(cfg, store, gate=gate, open_catalog=LocalCatalog,
                                    workdir=tmp_path / "work", release=release)
        with store.transaction() as conn:
            (reason,) = conn.execute("SELECT reason FROM campaign_submissions").fetchone()
    assert result.exit_code == 0, result
    assert reason.endswith("; pins released: 1 file(s) in 1 request(s); 2 pin(s) kept for "
                           "local:/other.txt"), reason


def test_the_summary_says_what_was_cancelled_and_what_was_kept_for_whom() -> None:
    """The text form names the files cancelled before their release (not on disk yet) and the
    pins kept because other definitions rely on them, naming a few of those."""
    from prestaged.pins import Released, ReleaseReport

    report = ReleaseReport("local", "B", (Released("https://fe/api", 2, 1, 1),), 0, 1,
                           ("local:A",))
    assert report.summary() == ("local:B: released https://fe/api: 2 files in 1 request (1 not "
                                "on disk yet: cancelled first); kept 1 pin that local:A relies "
                                "on too")
    kept = ReleaseReport("local", "B", (), 0, 3, ("local:A", "samweb:c", "samweb:d", "x:y"))
    assert kept.summary() == ("local:B: released nothing; kept 3 pins that local:A, samweb:c, "
                              "samweb:d and 1 more rely on too")


def test_a_warm_killed_while_its_files_come_back_from_tape_leaves_their_pins_releasable(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """The stage request's id waited in the store's buffer for the next thing recorded, and a
    run whose files are on their way from tape records nothing for hours: a SIGKILL meanwhile
    left no row at all, so `release` found nothing pinned (the pins held for their whole
    lifetime) and a rerun asked the tape system for the same files again. The id is now in the
    state within moments of the request, and `release` after the kill cancels the request (its
    files are not on disk yet: dCache would go on recalling them) and releases it."""
    with _recalling(pki) as site:
        definition, _ = _tape_definition(site, tmp_path, 3, with_disk=False)
        config = tmp_path / "prestaged.toml"
        config.write_text(QUICK + backend.state_table())
        warm = subprocess.Popen(
            [sys.executable, "-m", "prestaged", "warm", str(definition), "-q", "--proxy",
             str(proxy), "--ca-dir", str(pki.ca_dir), *backend.state_args(), "--config",
             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline and not (
                    site.stats()["requests"].get("frontend:stage") and backend.query(
                        "SELECT COUNT(*) FROM files WHERE stage_request IS NOT NULL")[0][0] == 3):
                assert warm.poll() is None, warm.communicate()[1]
                time.sleep(0.05)  # polling the emulator, then the state, with a deadline
            assert site.stats()["requests"]["frontend:stage"] == 1
            warm.send_signal(signal.SIGKILL)
            warm.communicate(timeout=DEADLINE)
        finally:
            warm.kill()
        assert _relied_on(backend) == 3, "the stage request's id is not in the state"
        assert _pinned_rows(backend) == 0  # a pin's end is known once the file lands

        res = _cli(pki, proxy, tmp_path, "release", str(definition), "--json", backend=backend)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert (doc["files"], doc["requests"], doc["cancelled"]) == (3, 1, 3)
        assert site.stats()["requests"]["frontend:cancel"] == 1
        assert site.stats()["requests"]["frontend:release"] == 1
        assert _relied_on(backend) == 0


def test_a_proxy_that_expires_while_files_come_back_from_tape_stops_the_run_naming_it(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Staging went on with a proxy that had expired (nothing was touched, so nothing looked):
    the frontend refused its handshakes and the run ended, minutes later, with exit 5 "Server
    disconnected". The Tape REST requests now check the proxy first: exit 3 naming it."""
    with _recalling(pki) as site:
        definition, _ = _tape_definition(site, tmp_path, 3, with_disk=False)
        (tmp_path / "prestaged.toml").write_text(QUICK)
        short = pki.make_proxy(tmp_path / "x509up_short", lifetime=timedelta(seconds=4))
        res = subprocess.run(
            [sys.executable, "-m", "prestaged", "warm", str(definition), "-q", "--no-state",
             "--proxy", str(short), "--ca-dir", str(pki.ca_dir), "--min-lifetime", "0",
             "--config", str(tmp_path / "prestaged.toml")],
            capture_output=True, text=True, timeout=DEADLINE, check=False)
        assert site.stats()["requests"]["frontend:stage"] == 1
    assert res.returncode == 3, res.stderr
    assert f"proxy {short}: expired at" in res.stderr, res.stderr


def test_pins_others_released_meanwhile_are_sorted_in_linear_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two definitions released at once, each keeping the shared pins for the other: the one
    told that nobody relies on them any more releases them after all, and sorting its kept
    pins from those orphans compares each pin a bounded number of times, not with every
    orphan (a list lookup per pin: ~n^2/2 comparisons of a stage request's pins)."""
    from types import SimpleNamespace

    from prestaged import pins as pins_module
    from prestaged.state.store import Pin

    n = 300
    shared = [Pin(i, f"https://door.example/f{i}", "req-1", "https://tape.example/api/v1",
                  others=("local:other",)) for i in range(n)]
    answers = [list(shared), []]  # the other definition released them meanwhile, then none

    class Store:
        def unpinned(self, catalog: str, definition: str, released: object,
                     kept: object = ()) -> list[Pin]:
            return answers.pop(0)

    released: list[str] = []

    class Client:
        def allow(self, url: str) -> None:
            pass

        async def cancel(self, uri: str, request: str, paths: list[str]) -> None:
            pass

        async def release(self, uri: str, request: str, paths: list[str]) -> None:
            released.extend(paths)

    access = SimpleNamespace(settings=SimpleNamespace(path_map=()), client=Client())
    compared = 0
    eq = Pin.__eq__

    def counting(self: Pin, other: object) -> bool:
        nonlocal compared
        compared += 1
        return eq(self, other)

    monkeypatch.setattr(Pin, "__eq__", counting)
    done, kept = asyncio.run(pins_module._release_group(
        Store(), access, "local", "mine", shared))  # type: ignore[arg-type]
    assert len(done) == n and kept == [] and len(released) == n
    assert compared <= n

