"""``prestaged warm`` on tape-backed storage (issue 13), against the dCache emulator in a thread:
locality in bulk, tape-only files staged and touched on landing, unreadable ones reported and
never read, the three ``--stage`` modes, path maps, the state's tape columns, a re-run after
eviction, and a gate that submits only once every file is on disk and touched."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest
from cli_runner import CliResult, run_cli
from conftest import Backend
from daemon_harness import state_files

from prestaged.testing.dcache import PNFS_TIMEOUT, DCacheConfig, Locality, ThreadedDCache
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import ThreadedStorageServer
from prestaged.testing.tokens import BearerCheck, TokenIssuer, write_token
from prestaged.tokens import TokenInfo, inspect_token, scopes_refuse

# Polls scaled down: the emulator's tape is fast, so a poll every 20-100 ms keeps tests short.
# ``extra`` text is appended to the [storage] table, last here.
QUICK = """
[retry]
initial = "10ms"
max = "50ms"
[storage]
poll_min = "20ms"
poll_max = "100ms"
stage_batch = 5
"""


def _config(tmp_path: Path, extra: str = "", state: str = "") -> Path:
    path = tmp_path / "prestaged.toml"
    path.write_text(QUICK + extra + state)
    return path


def _warm(pki: TestPKI, proxy: Path, tmp_path: Path, definition: Path, *args: str,
          extra: str = "", command: str = "warm", backend: Optional[Backend] = None,
          ) -> CliResult:
    """``prestaged warm DEFINITION --json`` in-process with the test proxy, ``backend``'s
    state (default: the file tmp_path/state.db)."""
    backend = backend or Backend("sqlite", tmp_path, None)
    res = run_cli(command, str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  *backend.state_args(), "--config",
                  str(_config(tmp_path, extra, backend.state_table())), *args)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def _definition(tmp_path: Path, urls: list[str], name: str = "ds.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(u + "\n" for u in urls))
    return path


@pytest.fixture
def site(pki: TestPKI) -> Iterator[ThreadedDCache]:
    """A dCache emulator with 2 drives (fast tape) in a thread."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=2, door_timeout=5.0)) as srv:
        yield srv


def _mixed(site: ThreadedDCache) -> dict[str, list[str]]:
    """4 disk, 3 disk+tape, 12 tape-only on 3 tapes, 1 unavailable; and 1 unknown path."""
    paths: dict[str, list[str]] = {
        "disk": [f"/pnfs/t/disk{i}" for i in range(4)],
        "cached": [f"/pnfs/t/cached{i}" for i in range(3)],
        "tape": [f"/pnfs/t/tape{i:02d}" for i in range(12)],
        "lost": ["/pnfs/t/lost"],
        "unknown": ["/pnfs/t/nowhere"],
    }
    for p in paths["disk"]:
        site.add_file(p, 100, Locality.DISK)
    for p in paths["cached"]:
        site.add_file(p, 100, Locality.DISK_AND_TAPE)
    for i, p in enumerate(paths["tape"]):
        site.add_file(p, 100, Locality.TAPE, tape=f"T{i % 3}")
    site.add_file(paths["lost"][0], 100, Locality.LOST)
    return paths


def test_a_cold_mixed_dataset_warms_in_one_run(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """Disk files touched, tape-only files staged in batches then touched (atime fresh, pinned),
    the unavailable one failed with its reason and the unknown one missing, both never read;
    no door GET of a tape-only file; counts.staged; the state (each backend) keeps locality,
    request and pin, and status reports them."""
    paths = _mixed(site)
    urls = [site.door_url(p) for group in paths.values() for p in group]
    started = time.time()
    res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json", backend=backend)
    doc = json.loads(res.stdout)
    assert res.returncode == 1, res.stderr  # one failed, one missing
    assert doc["counts"]["warm"] == 19 and doc["counts"]["staged"] == 12
    assert doc["counts"]["failed"] == 1 and doc["counts"]["missing"] == 1
    assert doc["tape"]["locality"] == {"DISK": 4, "DISK_AND_TAPE": 3, "TAPE": 12,
                                       "UNAVAILABLE": 1}
    assert doc["tape"]["endpoints"] == {site.door_url("/").rstrip("/"): site.tape_api_url}
    reasons = {f["url"]: f["error"] for f in doc["failures"]}
    assert "locality UNAVAILABLE" in reasons[site.door_url(paths["lost"][0])]
    assert "archiveinfo" in reasons[site.door_url(paths["unknown"][0])]
    assert "knows none" not in res.stderr  # one unknown path among known ones: just missing
    stats = site.stats()
    assert stats["door_tape_gets"] == 0 and stats["door_blocked_seconds"] == 0
    # One archiveinfo for the whole (admitted) chunk; 12 tape files in requests of 5, 5 and 2.
    assert stats["requests"]["frontend:archiveinfo"] == 1 and stats["max_paths"] == 21
    assert stats["requests"]["frontend:stage"] == 3
    for p in paths["tape"]:
        replica = site.replica(p)
        assert replica.on_disk and replica.pins and replica.atime >= started
    # The door was never asked for the unavailable or unknown files.
    assert stats["requests"].get("door:get", 0) == 19
    rows = {url: (loc, req, staged, pin, made) for url, loc, req, staged, pin, made in
            backend.query("SELECT url, locality, stage_request, staged_at, pinned_until, "
                          "stage_created FROM files")}
    tape_row = rows[site.door_url(paths["tape"][0])]
    assert tape_row[0] == "DISK_AND_TAPE" and tape_row[1] and tape_row[2] >= started
    # pinned for the default 24 h from its landing (a pin starts when pinned, not when asked)
    assert tape_row[3] == tape_row[2] + 24 * 3600 and started <= tape_row[4] <= tape_row[2]
    assert rows[site.door_url(paths["disk"][0])][:2] == ("DISK", None)
    assert rows[site.door_url(paths["lost"][0])][0] == "UNAVAILABLE"
    status = run_cli("status", *backend.cli())
    assert "tape: on disk 19, unavailable 1" in status.stdout, status.stdout
    assert backend.url is None or state_files(tmp_path) == []


def test_stage_never_reads_tape_files_through_the_door_as_before(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """--stage never: no Tape REST request at all; tape-only files are GET (the door recalls
    and blocks), which is today's behaviour, and they end warm."""
    tape = [f"/pnfs/n/tape{i}" for i in range(4)]
    for i, p in enumerate(tape):
        site.add_file(p, 10, Locality.TAPE, tape=f"T{i % 2}")
    site.add_file("/pnfs/n/disk", 10, Locality.DISK)
    urls = [site.door_url(p) for p in [*tape, "/pnfs/n/disk"]]
    res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json", "--stage", "never")
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr
    assert doc["counts"]["warm"] == 5 and doc["counts"]["staged"] == 0 and doc["tape"] is None
    stats = site.stats()
    assert stats["door_tape_gets"] == 4 and stats["frontend_calls"] == []
    assert "door:discovery" not in stats["requests"]


def test_dcache_11_2_request_rates_slow_a_run_down_but_fail_no_file(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """dCache 11.2's default request rates on door and frontend (1000/s in all, 250/s a
    client): 32 touches at once on loopback outrun 250/s, so the door answers some with 429.
    Those files are tried again after the Retry-After, the door's request rate is capped (its
    concurrency is not cut: fewer at once cannot fix a rate), and every file ends warm, the
    tape ones staged; nothing fails, nothing is GET from tape."""
    from prestaged.testing.dcache import DCACHE_RATE

    config = DCacheConfig(drives=2, rate_overall=DCACHE_RATE, client_idle_seconds=2)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(), config) as srv:
        paths = [f"/pnfs/q/d{i:03d}" for i in range(300)]
        for p in paths:
            srv.add_file(p, 10, Locality.DISK)
        tape = [f"/pnfs/q/t{i}" for i in range(10)]
        for p in tape:
            srv.add_file(p, 10, Locality.TAPE)
        urls = [srv.door_url(p) for p in paths + tape]
        res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json", "--retries",
                    "20")
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["warm"] == 310 and doc["counts"]["staged"] == 10
        stats = srv.stats()
        assert stats["throttled"].get("door", 0) > 0, stats["throttled"]
        assert doc["retries"]["429"] == stats["throttled"]["door"]  # each one tried again
        [door] = doc["endpoints"].values()
        # A ceiling, set. Not bounded above: a first burst's cap is a soft estimate that grows
        # +0.5/s with each delayed success until the next 429 (pacing), so a run whose later
        # starts meet no 429 ends above it (a CI run ended at 408 from 264).
        assert door["rate_cuts"] >= 1 and door["rate"] is not None and door["rate"] >= 1, door
        assert door["backoffs"] == 0 and door["concurrency"] == 32, door
        assert stats["door_tape_gets"] == 0


def test_stage_always_fails_where_the_api_is_missing(
    storage: ThreadedStorageServer, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """--stage always on a door without the API: exit 5 naming the endpoint, nothing read;
    auto touches the same files."""
    definition = _definition(tmp_path, [storage.url(f"/plain/f{i}") for i in range(3)])
    res = _warm(pki, proxy, tmp_path, definition, "--stage", "always", "-q")
    assert res.returncode == 5, res.stderr
    assert f"https://127.0.0.1:{storage.door_port} publishes no WLCG Tape REST API" in res.stderr
    assert storage.stats.requests_total == 0 and storage.stats.discovery_requests == 1
    res = _warm(pki, proxy, tmp_path, definition, "--stage", "auto", "-q")
    assert res.returncode == 0 and storage.stats.requests_total == 3


def test_a_door_without_discovery_stages_through_the_tape_api_named_in_the_config(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A door that publishes no discovery document (404): always is exit 5 pointing at
    [[storage.tape_api]]; with an entry naming its frontend the door is never asked, the tape
    file is staged, not GET, and the disk file touched (a trailing slash on the entry's door
    does not matter)."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=1, door_timeout=5.0, discovery=False)) as srv:
        srv.add_file("/pnfs/c/tape", 10, Locality.TAPE)
        srv.add_file("/pnfs/c/disk", 10, Locality.DISK)
        definition = _definition(tmp_path, [srv.door_url("/pnfs/c/tape"),
                                            srv.door_url("/pnfs/c/disk")])
        res = _warm(pki, proxy, tmp_path, definition, "-q", "--stage", "always")
        assert res.returncode == 5, res.stderr
        assert "[[storage.tape_api]]" in res.stderr and srv.stats()["requests"]["door:discovery"]
        door = srv.door_url("/").rstrip("/")
        entry = f'\n[[storage.tape_api]]\ndoor = "{door}/"\nuri = "{srv.tape_api_url}"\n'
        before = srv.stats()["requests"]["door:discovery"]
        res = _warm(pki, proxy, tmp_path, definition, "--json", "--stage", "always", extra=entry)
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["warm"] == 2 and doc["counts"]["staged"] == 1
        assert doc["tape"]["endpoints"] == {door: srv.tape_api_url}
        stats = srv.stats()
        assert stats["requests"]["door:discovery"] == before  # never asked
        assert stats["door_tape_gets"] == 0 and stats["requests"]["frontend:stage"] == 1
        assert srv.replica("/pnfs/c/tape").on_disk


@pytest.mark.parametrize(("entry", "key"), [
    ('door = "https://h:2880/pnfs"\nuri = "https://h:3880/api/v1/tape"', "door"),
    ('door = "http://h:2880"\nuri = "https://h:3880/api/v1/tape"', "door"),
    ('door = "https://h:2880"\nuri = "http://h:3880/api/v1/tape"', "uri"),
    ('door = "https://h:2880"\nuri = "https://h:99999/api/v1/tape"', "uri"),
    ('door = "https://h:2880"', "uri"),
])
def test_a_bad_tape_api_entry_is_one_line_naming_its_key(
    tmp_path: Path, entry: str, key: str
) -> None:
    """A [[storage.tape_api]] entry with a door that is not an https origin or a uri that is not
    an https URL, or a missing key: exit 2, one line naming the key."""
    (tmp_path / "c.toml").write_text(f"[[storage.tape_api]]\n{entry}\n")
    res = run_cli("warm", str(_definition(tmp_path, ["https://127.0.0.1:1/f"])), "--config",
                  str(tmp_path / "c.toml"))
    assert res.returncode == 2, res.stderr
    assert f"storage.tape_api[0].{key}" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_one_door_named_twice_in_tape_api_is_refused(tmp_path: Path) -> None:
    """Two entries for one door (the default port spelled out in one): exit 2 naming both."""
    (tmp_path / "c.toml").write_text(
        '[[storage.tape_api]]\ndoor = "https://h"\nuri = "https://h:3880/api/v1/tape"\n'
        '[[storage.tape_api]]\ndoor = "https://H:443"\nuri = "https://g:3880/api/v1/tape"\n')
    res = run_cli("warm", str(_definition(tmp_path, ["https://127.0.0.1:1/f"])), "--config",
                  str(tmp_path / "c.toml"))
    assert res.returncode == 2, res.stderr
    assert "storage.tape_api[1].door: https://H:443 is the door of storage.tape_api[0]" \
        in res.stderr, res.stderr


def test_malformed_discovery_warns_and_touches_in_auto_and_fails_in_always(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A discovery document without endpoints, or whose v1 uri no request can go to: auto
    warns once and reads the files by GET; always is exit 5 with the reason."""
    site.add_file("/pnfs/m/f", 10, Locality.DISK)
    site.set_discovery_body('{"sitename": "broken"}')
    definition = _definition(tmp_path, [site.door_url("/pnfs/m/f")])
    res = _warm(pki, proxy, tmp_path, definition, "-q", "--force")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("no endpoints list in the discovery document") == 1
    res = _warm(pki, proxy, tmp_path, definition, "-q", "--force", "--stage", "always")
    assert res.returncode == 5
    assert "no endpoints list in the discovery document (storage.stage = always)" in res.stderr
    site.set_discovery_body(
        '{"endpoints": [{"uri": "https://127.0.0.1:99999/api/v1/tape", "version": "v1"}]}')
    res = _warm(pki, proxy, tmp_path, definition, "-q", "--force")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("v1 uri is no usable URL: https://127.0.0.1:99999/api/v1/tape") == 1


def test_a_discovery_5xx_is_asked_again_and_never_turns_into_door_gets(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """One 500 on the discovery GET sent a whole chunk's tape-only files to the door (each GET
    holding a door thread up to 3 minutes). It is asked again and the files are staged; a door
    whose discovery never answers fails its files naming it, for every chunk of the run after
    one round of asking, and still nothing is GET."""
    paths = [f"/pnfs/g/f{i:03d}" for i in range(300)]  # two admitted chunks
    for i, p in enumerate(paths):
        site.add_file(p, 10, Locality.TAPE, tape=f"T{i % 3}")
    definition = _definition(tmp_path, [site.door_url(p) for p in paths])
    site.fail("discovery", "500")
    res = _warm(pki, proxy, tmp_path, definition, "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr
    assert doc["counts"]["staged"] == 300 and site.stats()["door_tape_gets"] == 0
    assert site.stats()["requests"]["door:discovery"] == 2
    assert site.faults_served() == {"discovery:500": 1}
    site.fail("discovery", "502", count=100)
    res = _warm(pki, proxy, tmp_path, definition, "--json", "--force")
    doc = json.loads(res.stdout)
    assert doc["counts"]["failed"] == 300 and doc["counts"]["warm"] == 0
    [why] = {f["error"] for f in doc["failures"]}
    assert why.startswith(site.door_url("/.well-known/wlcg-tape-rest-api") + ": gave up after")
    assert "did not say whether it has a Tape REST API" in why
    stats = site.stats()
    assert stats["door_tape_gets"] == 0 and stats["requests"].get("door:get", 0) == 300
    assert stats["requests"]["door:discovery"] == 2 + 8  # one round, then the run knows


def test_storage_poll_errors_is_how_many_failed_polls_a_request_outlives(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """``storage.poll_errors = 3``: a frontend whose polls keep failing fails the request's
    files after its third failed poll in a row, with the server's error; nothing is GET."""
    paths = [f"/pnfs/p/f{i}" for i in range(4)]
    for p in paths:
        site.add_file(p, 10, Locality.TAPE, tape="T0")
    site.add_file("/pnfs/p/disk", 10, Locality.DISK)  # touched: exit 1, not 5
    definition = _definition(tmp_path, [site.door_url(p) for p in [*paths, "/pnfs/p/disk"]])
    site.fail("poll", "500", count=50)
    res = _warm(pki, proxy, tmp_path, definition, "--json", extra="poll_errors = 3\n")
    doc = json.loads(res.stdout)
    assert res.returncode == 1 and doc["counts"]["failed"] == 4, res.stderr
    assert doc["counts"]["warm"] == 1
    [why] = {f["error"] for f in doc["failures"]}
    assert why.startswith("stage failed: 3 polls of its request failed in a row"), why
    assert site.faults_served() == {"poll:500": 3} and site.stats()["door_tape_gets"] == 0


def test_archiveinfo_errors_are_missing_denied_or_asked_again(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """dCache gives any lookup failure per path; all were "missing". Now "No such file" is
    missing, "Permission denied" denied (in a row they stop the run with exit 3, as the
    touches' 403s do), and another error (PnfsManager timed out) is asked again: once is
    enough for one file, another fails with the message after three asks. A transient failure
    of the whole archiveinfo request is asked again too."""
    names = ["ok", "slow", "stuck", "denied", "gone"]
    for name in names[:4]:
        site.add_file(f"/pnfs/a/{name}", 10, Locality.DISK_AND_TAPE)
    site.path_error("/pnfs/a/slow", PNFS_TIMEOUT, count=1)
    site.path_error("/pnfs/a/stuck", PNFS_TIMEOUT)
    site.path_error("/pnfs/a/denied", "Permission denied")
    site.fail("archiveinfo", "504")
    urls = [site.door_url(f"/pnfs/a/{name}") for name in names]
    res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 1, res.stderr
    assert doc["counts"] == {**doc["counts"], "warm": 2, "missing": 1, "denied": 1, "failed": 1}
    reasons = {f["url"].rsplit("/", 1)[1]: f["error"] for f in doc["failures"]}
    assert reasons == {"stuck": f"archiveinfo: {PNFS_TIMEOUT}",
                       "denied": "archiveinfo: Permission denied",
                       "gone": "archiveinfo: No such file or directory: /pnfs/a/gone"}
    assert site.stats()["requests"]["frontend:archiveinfo"] == 3  # the 504 is not one
    denied = [f"/pnfs/d/f{i}" for i in range(3)]
    for p in denied:
        site.add_file(p, 10, Locality.TAPE)
        site.path_error(p, "Permission denied")
    res = _warm(pki, proxy, tmp_path, _definition(tmp_path, [site.door_url(p) for p in denied],
                                                  "denied.txt"),
                extra="[breaker]\ndenials = 3\n")
    assert res.returncode == 3, res.stderr
    assert "denied 3 files in a row" in res.stderr and "Permission denied" in res.stderr
    assert "knows none" not in res.stderr  # denied is no hint of a wrong path_map


def test_a_refused_stage_is_exit_3_naming_the_right(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A user without the staging right: the frontend's 403 ends the run with exit 3 naming
    storage.stage; the tape file was never GET."""
    config = DCacheConfig(stagers=("Somebody Else",))
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        config) as srv:
        srv.add_file("/pnfs/r/tape", 10, Locality.TAPE)
        res = _warm(pki, proxy, tmp_path, _definition(tmp_path, [srv.door_url("/pnfs/r/tape")]),
                    "-q")
        assert res.returncode == 3, res.stderr
        # dCache's 403 problem says only "Forbidden" (ErrorResponseProvider): the right is ours.
        assert "storage.stage" in res.stderr and "403: Forbidden" in res.stderr
        assert srv.stats()["door_tape_gets"] == 0


def test_path_map_names_files_by_their_namespace_path(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A door with webdav.root /pnfs/fnal.gov/usr serves /dune/f for /pnfs/fnal.gov/usr/dune/f:
    a [[storage.path_map]] rule makes the Tape REST requests name the namespace path."""
    config = DCacheConfig(door_root="/pnfs/fnal.gov/usr")
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        config) as srv:
        for i in range(3):
            srv.add_file(f"/pnfs/fnal.gov/usr/dune/f{i}", 10, Locality.TAPE)
        urls = [srv.door_url(f"/pnfs/fnal.gov/usr/dune/f{i}") for i in range(3)]
        assert urls[0].endswith(":" + urls[0].split(":")[2].split("/")[0] + "/dune/f0")
        rule = (f'\n[[storage.path_map]]\nurl_prefix = "{urls[0].rsplit("/", 2)[0]}/"\n'
                'path_prefix = "/pnfs/fnal.gov/usr/"\n')
        res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json", extra=rule)
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["staged"] == 3 and srv.stats()["door_tape_gets"] == 0
        # Without the rule the frontend does not know /dune/f0: missing, and still never GET.
        res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls, "again.txt"), "--json",
                    "--force")
        doc = json.loads(res.stdout)
        assert doc["counts"]["missing"] == 3 and srv.stats()["door_tape_gets"] == 0
        [hint] = [ln for ln in res.stderr.splitlines() if "knows none" in ln]
        assert "of the 3 paths asked (/dune/f0: " in hint and "[[storage.path_map]]" in hint


def test_paths_spelled_with_double_slashes_are_staged_and_touched_not_timed_out(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """dCache lists a request's files as FsPath spells them (/a/b for /a//b): a path_map rule
    joining "/" to "/", and a URL with "//", staged files that polls never matched, so each
    timed out and was cancelled though on disk. They are asked as /a/b and land."""
    config = DCacheConfig(door_root="/pnfs/fnal.gov/usr", drives=2)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(), config) as srv:
        paths = [f"/pnfs/fnal.gov/usr/dune/f{i}" for i in range(4)]
        for p in paths:
            srv.add_file(p, 10, Locality.TAPE)
        urls = [srv.door_url(p) for p in paths]
        door = urls[0].rsplit("/dune/", 1)[0]
        urls[3] = urls[3].replace("/dune/", "//dune/")  # a URL with "//": no rule for it
        rule = (f'stage_timeout = "10s"\n[[storage.path_map]]\nurl_prefix = "{door}/dune"\n'
                'path_prefix = "/pnfs/fnal.gov/usr/dune/"\n'
                f'[[storage.path_map]]\nurl_prefix = "{door}//"\n'
                'path_prefix = "/pnfs/fnal.gov/usr/"\n')
        res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json", extra=rule)
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["staged"] == 4 and doc["counts"]["warm"] == 4
        stats = srv.stats()
        assert stats["requests"].get("frontend:cancel", 0) == 0
        assert stats["door_tape_gets"] == 0 and stats["requests"]["frontend:stage"] == 1


def test_evicted_files_are_staged_again_not_read(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """Keep-warm after eviction: a later run (files no longer fresh) asks locality again,
    touches the files still on disk and stages the evicted ones anew; never a door GET."""
    paths = [f"/pnfs/k/f{i}" for i in range(6)]
    for p in paths:
        site.add_file(p, 10, Locality.TAPE)
    definition = _definition(tmp_path, [site.door_url(p) for p in paths])
    res = _warm(pki, proxy, tmp_path, definition, "--json")
    assert json.loads(res.stdout)["counts"]["staged"] == 6
    requests_before = site.stats()["requests"]["frontend:stage"]
    for p in paths[:2]:
        site.evict(p)
    res = _warm(pki, proxy, tmp_path, definition, "--json", "--force")
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr
    assert doc["tape"]["locality"] == {"TAPE": 2, "DISK_AND_TAPE": 4}
    assert doc["counts"]["warm"] == 6 and doc["counts"]["staged"] == 2
    stats = site.stats()
    assert stats["requests"]["frontend:stage"] == requests_before + 1
    assert stats["door_tape_gets"] == 0
    assert all(site.replica(p).on_disk for p in paths)


def test_a_stage_that_does_not_finish_in_time_fails_and_is_cancelled(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """storage.stage_timeout: a recall slower than it is cancelled on the frontend and the file
    fails with "stage timed out"; it is never GET."""
    config = DCacheConfig(drives=1, mount_seconds=30.0)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        config) as srv:
        srv.add_file("/pnfs/s/slow", 10, Locality.TAPE)
        srv.add_file("/pnfs/s/disk", 10, Locality.DISK)
        urls = [srv.door_url("/pnfs/s/slow"), srv.door_url("/pnfs/s/disk")]
        res = _warm(pki, proxy, tmp_path, _definition(tmp_path, urls), "--json",
                    extra='stage_timeout = "300ms"\n')
        doc = json.loads(res.stdout)
        assert res.returncode == 1, res.stderr
        assert doc["counts"]["warm"] == 1 and doc["counts"]["failed"] == 1
        assert doc["failures"][0]["error"].startswith("stage timed out")
        stats = srv.stats()
        assert stats["requests"]["frontend:cancel"] == 1 and stats["door_tape_gets"] == 0


def test_a_rerun_with_a_longer_pin_lifetime_follows_the_open_request_without_cancelling_it(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """Run 1 (pin_lifetime 1h) gives up while the tape mounts; run 2 has pin_lifetime raised
    to 2 days. Run 2 dated the open request by its pin (pinned_until - today's lifetime: 47 h
    old), found it past stage_timeout at its first poll and cancelled it, failing every file.
    The state now keeps when the request was made: run 2 follows it, cancels nothing, and the
    request keeps its own date and lifetime; no pin end is recorded before the file lands."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=1, mount_seconds=3600.0)) as srv:
        paths = [f"/pnfs/m/f{i}" for i in range(3)]
        for p in paths:
            srv.add_file(p, 10, Locality.TAPE)
        definition = _definition(tmp_path, [srv.door_url(p) for p in paths])
        started = time.time()
        for lifetime in ("1h", "2d"):
            res = _warm(pki, proxy, tmp_path, definition, "--timeout", "300ms", command="wait",
                        extra=f'pin_lifetime = "{lifetime}"\n', backend=backend)
            assert res.returncode == 1, res.stderr
            rows = set(backend.query("SELECT stage_request, stage_created, stage_lifetime, "
                                     "pinned_until, stage_ended FROM files"))
            (request, made, asked, until, ended), = rows  # one request for the three
            assert started <= made <= time.time() and asked == 3600.0
            assert until is None and ended is None
        stats = srv.stats()
        assert stats["requests"]["frontend:stage"] == 1
        assert "frontend:cancel" not in stats["requests"]
        states = srv._call(lambda: {f.state for f in srv.server.frontend.requests[request]
                                    .files.values()})
        assert states == {"STARTED"}
        status = run_cli("status", *backend.cli(), "--json")
        [st] = json.loads(status.stdout)["definitions"]
        assert st["tape"] == {"staging": 3}  # open on the server: staging, rightly


def test_a_stage_that_timed_out_is_tape_only_in_status_not_staging(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """A stage that timed out (cancelled by us) ended: `status` counts the file tape-only, and
    the state records when the stage ended, where it showed "staging" for ever."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=1, mount_seconds=3600.0)) as srv:
        srv.add_file("/pnfs/s/slow", 10, Locality.TAPE)
        definition = _definition(tmp_path, [srv.door_url("/pnfs/s/slow")])
        res = _warm(pki, proxy, tmp_path, definition, "--json",
                    extra='stage_timeout = "200ms"\n', backend=backend)
        assert res.returncode == 5, res.stderr
        assert json.loads(res.stdout)["failures"][0]["error"].startswith("stage timed out")
    [(ended, made)] = backend.query("SELECT stage_ended, stage_created FROM files")
    assert ended >= made
    status = run_cli("status", *backend.cli(), "--json")
    [st] = json.loads(status.stdout)["definitions"]
    assert st["tape"] == {"tape_only": 1}


def _left_open(pki: TestPKI, proxy: Path, tmp_path: Path, srv: ThreadedDCache, prefix: str,
               n: int, backend: Backend, *, aged: bool = False) -> tuple[Path, list[str], str]:
    """``n`` tape-only files under ``prefix`` on ``srv`` (a slow mount), and a ``wait`` that
    gave up while the tape mounted, leaving one stage request open (``aged``: then dated two
    days back in the state); the definition, the paths and that request's id."""
    paths = [f"{prefix}/f{i}" for i in range(n)]
    for p in paths:
        srv.add_file(p, 10, Locality.TAPE)
    definition = _definition(tmp_path, [srv.door_url(p) for p in paths])
    res = _warm(pki, proxy, tmp_path, definition, "--timeout", "300ms", command="wait",
                backend=backend)
    assert res.returncode == 1, res.stderr
    assert srv.stats()["requests"]["frontend:stage"] == 1
    assert not any(srv.replica(p).on_disk for p in paths)  # still mounting
    (first,) = {r for (r,) in backend.query("SELECT stage_request FROM files")}
    assert first is not None
    if aged:
        with backend.store() as store, store.transaction() as conn:
            conn.execute("UPDATE files SET stage_created = stage_created - 172800")
    return definition, paths, first


def test_a_rerun_follows_the_open_stage_request_of_an_interrupted_run(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """A ``wait`` that gives up while the tape is still mounting leaves its stage request open
    (noted in the state); the next run polls that request instead of asking again (dCache keeps
    one request per file: a duplicate is a second pin that ``release`` cannot free), then
    touches the files. The state still names the first request, so ``release`` frees it."""
    config = DCacheConfig(drives=1, mount_seconds=1.5)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        config) as srv:
        definition, paths, request = _left_open(pki, proxy, tmp_path, srv, "/pnfs/r", 3,
                                                backend)
        first = {request}
        res = _warm(pki, proxy, tmp_path, definition, "--json", backend=backend)
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["warm"] == 3 and doc["counts"]["staged"] == 3
        stats = srv.stats()
        assert stats["requests"]["frontend:stage"] == 1  # no second request
        assert stats["door_tape_gets"] == 0
        for p in paths:
            replica = srv.replica(p)
            assert replica.on_disk and set(replica.pins) == first
        assert {r for (r,) in backend.query("SELECT stage_request FROM files")} == first


def test_a_rerun_cancels_an_open_request_older_than_stage_timeout_and_asks_anew(
    pki: TestPKI, proxy: Path, tmp_path: Path, backend: Backend
) -> None:
    """A run that stopped before its stage request timed out (here a ``wait`` that gave up,
    the request then dated two days back) left it open on the server and "staging" in the
    state for ever. The next run cancels it for its files, as that run's timeout would have,
    and asks anew: the files land and are touched, and the state names the new request."""
    config = DCacheConfig(drives=1, mount_seconds=1.5)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(), config) as srv:
        definition, paths, first = _left_open(pki, proxy, tmp_path, srv, "/pnfs/o", 3, backend,
                                              aged=True)
        res = _warm(pki, proxy, tmp_path, definition, "--json", backend=backend)
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["warm"] == 3 and doc["counts"]["staged"] == 3
        stats = srv.stats()
        assert stats["requests"]["frontend:stage"] == 2
        assert stats["requests"]["frontend:cancel"] == 1
        states = srv._call(lambda: {f.state for f in srv.server.frontend.requests[first]
                                    .files.values()})
        assert states == {"CANCELLED"}
        (second,) = {r for (r,) in backend.query("SELECT stage_request FROM files")}
        assert second != first
        for p in paths:
            assert srv.replica(p).on_disk and set(srv.replica(p).pins) == {second}
        assert backend.query("SELECT COUNT(*) FROM files WHERE stage_ended IS NOT NULL") == \
            [(0,)]


@pytest.mark.parametrize("stale", [False, True], ids=["open", "past-stage-timeout"])
def test_a_rerun_under_other_credentials_asks_anew_for_an_earlier_request_it_may_not_touch(
    pki: TestPKI, proxy: Path, tmp_path: Path, stale: bool
) -> None:
    """dCache lets only a request's owner poll or cancel it. A rerun by another user (here
    another proxy on the same state) that finds the earlier run's request open is refused its
    poll (or, past stage_timeout, its cancel): it asks anew and warms the files, where the
    refusal ended the run with exit 3, "staging needs the right to stage", for as long as that
    request stayed open (stage_timeout, 24 h)."""
    config = DCacheConfig(drives=1, mount_seconds=1.5)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(), config) as srv:
        definition, _, first = _left_open(pki, proxy, tmp_path, srv, "/pnfs/u", 2,
                                          Backend("sqlite", tmp_path, None), aged=stale)
        other = pki.make_proxy_for("Another User", tmp_path / "x509up_other")
        res = _warm(pki, other, tmp_path, definition, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["counts"]["staged"] == 2
        said = "was not cancelled" if stale else "paths asked again"
        assert f"stage request {first}" in res.stderr and said in res.stderr, res.stderr
        stats = srv.stats()
        assert stats["requests"]["frontend:stage"] == 2 and stats["door_tape_gets"] == 0
        (second,) = {r for (r,) in _rows(tmp_path, "SELECT stage_request FROM files")}
        assert second != first


def test_a_rerun_asks_anew_for_files_the_earlier_request_did_not_bring(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """The earlier run's request was cancelled (its stage timed out), and the state recorded
    that the stage ended: the rerun does not follow it (it polled it once to learn what the
    state knew) and makes a new request, which lands and is touched."""
    config = DCacheConfig(drives=1, mount_seconds=1.0)
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        config) as srv:
        srv.add_file("/pnfs/s/slow", 10, Locality.TAPE)
        definition = _definition(tmp_path, [srv.door_url("/pnfs/s/slow")])
        res = _warm(pki, proxy, tmp_path, definition, "--json",
                    extra='stage_timeout = "200ms"\n')
        assert res.returncode == 5, res.stderr  # nothing warmed
        assert json.loads(res.stdout)["failures"][0]["error"].startswith("stage timed out")
        (first,) = {r for (r,) in _rows(tmp_path, "SELECT stage_request FROM files")}
        calls = len(srv.stats()["frontend_calls"])
        res = _warm(pki, proxy, tmp_path, definition, "--json")
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["staged"] == 1
        stats = srv.stats()
        assert stats["requests"]["frontend:stage"] == 2
        # The rerun's first request after locality is its own stage request.
        rerun = [c for c in stats["frontend_calls"][calls:] if "archiveinfo" not in c]
        assert rerun[0] == "POST /api/v1/tape/stage"
        assert f"GET /api/v1/tape/stage/{first}" not in rerun
        (second,) = {r for (r,) in _rows(tmp_path, "SELECT stage_request FROM files")}
        assert second != first and second in srv.replica("/pnfs/s/slow").pins


def _rows(tmp_path: Path, query: str) -> list[tuple[object, ...]]:
    """Rows of ``query`` on the SQLite state tmp_path/state.db (flushed: the runs ended)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as conn:
        return list(conn.execute(query))


def test_submit_on_a_cold_tape_slice_runs_only_once_all_is_on_disk_and_touched(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """``prestaged submit`` gated on a cold tape definition: the command starts after every
    file was staged and touched (each replica's atime precedes the start), exactly once."""
    paths = [f"/pnfs/g/f{i}" for i in range(8)]
    for i, p in enumerate(paths):
        site.add_file(p, 10, Locality.TAPE, tape=f"T{i % 2}")
    definition = _definition(tmp_path, [site.door_url(p) for p in paths])
    marker = tmp_path / "started"
    script = f"import time, pathlib; pathlib.Path({str(marker)!r}).write_text(repr(time.time()))"
    res = run_cli("submit", "--definition", str(definition), "--proxy", str(proxy), "--ca-dir",
                  str(pki.ca_dir), "--state", str(tmp_path / "state.db"), "--config",
                  str(_config(tmp_path)), "--retry-every", "50ms", "--",
                  sys.executable, "-c", script)
    assert res.returncode == 0, res.stderr
    started = float(marker.read_text())
    for p in paths:
        replica = site.replica(p)
        assert replica.on_disk and 0 < replica.atime <= started
    assert site.stats()["door_tape_gets"] == 0


async def test_a_watch_stages_tape_files_and_reports_tape_metrics(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A daemon watching a tape-only definition stages it (no door GET of a tape file), and its
    metrics show the stage requests, per-file stage durations, no file left staging, and the
    definition's files by locality (on disk now)."""
    from daemon_harness import free_port, in_process, metric_value, until, write_config

    paths = [f"/pnfs/w/f{i}" for i in range(6)]
    for i, p in enumerate(paths):
        site.add_file(p, 10, Locality.TAPE, tape=f"T{i % 2}")
    definition = _definition(tmp_path, [site.door_url(p) for p in paths])
    config = write_config(tmp_path, pki, proxy, free_port(), [(definition, "1h")],
                          extra='[storage]\npoll_min = "20ms"\npoll_max = "100ms"')
    async with in_process(config) as d:
        async def done() -> bool:
            return (await d.http("GET", "/api/v1/runs/1"))[1].get("state") == "done"
        await until("the watch's run", done)
        run = (await d.http("GET", "/api/v1/runs/1"))[1]
        assert run["exit_code"] == 0, run
        text = await d.metrics()
        assert metric_value(text, "prestaged_stage_requests_total", result="accepted") >= 1
        assert metric_value(text, "prestaged_stage_duration_seconds_count") == 6
        assert metric_value(text, "prestaged_files_staging") == 0
        assert metric_value(text, "prestaged_locality_files", definition="ds",
                            locality="DISK_AND_TAPE") == 6
    assert site.stats()["door_tape_gets"] == 0


async def test_two_watches_sharing_tape_files_ask_for_each_file_once(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """Two watched definitions that share tape files, run at once by one daemon: each file is
    in one stage request and holds one pin (dCache would otherwise queue and pin it twice);
    both runs end with all their files staged and touched, and no file is left staging."""
    from daemon_harness import free_port, in_process, metric_value, until, write_config

    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=1, mount_seconds=0.5)) as srv:
        paths = [f"/pnfs/s/f{i}" for i in range(9)]
        for p in paths:
            srv.add_file(p, 10, Locality.TAPE)
        first = _definition(tmp_path, [srv.door_url(p) for p in paths[:6]], "first.txt")
        second = _definition(tmp_path, [srv.door_url(p) for p in paths[3:]], "second.txt")
        config = write_config(tmp_path, pki, proxy, free_port(), [(first, "1h"), (second, "1h")],
                              extra='[storage]\npoll_min = "20ms"\npoll_max = "100ms"')
        async with in_process(config) as d:
            async def done() -> bool:
                runs = [(await d.http("GET", f"/api/v1/runs/{n}"))[1] for n in (1, 2)]
                return all(r.get("state") == "done" for r in runs)
            await until("both watches' runs", done)
            for n in (1, 2):
                run = (await d.http("GET", f"/api/v1/runs/{n}"))[1]
                assert run["exit_code"] == 0 and run["counts"] == {"warm": 6}, run
            assert metric_value(await d.metrics(), "prestaged_files_staging") == 0
        pins = {p: len(srv.replica(p).pins) for p in paths}
        assert pins == {p: 1 for p in paths}, pins
        assert srv.stats()["door_tape_gets"] == 0


def test_the_gate_counts_only_files_still_on_disk(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A file touched within fresh_for but evicted since is cold for the gate: ``wait`` asks
    locality for fresh files too, skips those on disk and stages the evicted one again (no
    door GET), then passes."""
    paths = [f"/pnfs/e/f{i}" for i in range(5)]
    for p in paths:
        site.add_file(p, 10, Locality.TAPE)
    definition = _definition(tmp_path, [site.door_url(p) for p in paths])
    assert _warm(pki, proxy, tmp_path, definition, "-q").returncode == 0
    site.evict(paths[3])
    stages = site.stats()["requests"]["frontend:stage"]
    res = _warm(pki, proxy, tmp_path, definition, "--json", "--retry-every", "50ms",
                command="wait")
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["passed"] and doc["fresh"] == 5, res.stdout
    assert site.stats()["requests"]["frontend:stage"] == stages + 1
    assert site.replica(paths[3]).on_disk and site.stats()["door_tape_gets"] == 0
    # The skipped four were not read again: one pool GET each from the first run, two for f3.
    assert site.stats()["requests"]["door:get"] == 6


def test_the_gate_passes_only_once_files_skipped_as_fresh_outlived_the_recalls(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """On a full pool, the recall of the evicted half of a definition evicts the least recently
    used replicas: the other half, skipped as fresh (touched before the other users' reads).
    The gate asks the storage again before passing: when it passes, every file is on disk."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=2, door_timeout=5.0, disk_capacity=8 * 10)) as srv:
        paths = [f"/pnfs/lru/f{i}" for i in range(4)]
        for p in paths:
            srv.add_file(p, 10, Locality.TAPE)
        definition = _definition(tmp_path, [srv.door_url(p) for p in paths])
        assert _warm(pki, proxy, tmp_path, definition, "-q").returncode == 0
        for p in paths:
            srv.expire_pins(p)
        for p in paths[:2]:
            srv.evict(p)  # the sweeper took them, then other users filled the pool
        for i in range(6):
            srv.add_file(f"/pnfs/others/o{i}", 10, Locality.DISK_AND_TAPE, atime=time.time())
        res = _warm(pki, proxy, tmp_path, definition, "--json", "--retry-every", "50ms",
                    "--timeout", "30s", command="wait")
        doc = json.loads(res.stdout)
        assert res.returncode == 0 and doc["passed"], res.stdout
        on_disk = [p for p in paths if srv.replica(p).on_disk]
        assert on_disk == paths and doc["fresh"] == 4, (on_disk, doc)
        assert srv.stats()["door_tape_gets"] == 0


def test_a_campaign_submits_each_cold_tape_slice_once_all_of_it_is_on_disk(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """``campaign run`` over 6 tape-only files in drainingn(3) slices: each slice's submit
    command starts after every file of it was staged and touched, and runs exactly once; no
    door GET of a tape-only file."""
    import shlex

    paths = [f"/pnfs/c/f{i}" for i in range(6)]
    for i, p in enumerate(paths):
        site.add_file(p, 10, Locality.TAPE, tape=f"T{i % 2}")
    definition = _definition(tmp_path, [site.door_url(p) for p in paths])
    starts = tmp_path / "starts"
    starts.mkdir()
    record = ("import sys, time, pathlib; urls = pathlib.Path(sys.argv[1]).read_text().split(); "
              f"pathlib.Path({str(starts)!r}, sys.argv[2]).write_text("
              "repr(time.time()) + chr(10) + chr(10).join(urls))")
    submit = shlex.join([sys.executable, "-c", record]) + " {urls_file} {submission}"
    campaign = tmp_path / "c.toml"
    campaign.write_text(f'name = "c"\n[[stage]]\nname = "s"\ninput = {json.dumps(str(definition))}\n'
                        f'split = "drainingn(3)"\nsubmit = {json.dumps(submit)}\n')
    res = run_cli("campaign", "run", str(campaign), "--proxy", str(proxy), "--ca-dir",
                  str(pki.ca_dir), "--state", str(tmp_path / "state.db"), "--config",
                  str(_config(tmp_path)))
    assert res.returncode == 0, res.stderr
    slices = sorted(starts.iterdir())
    assert len(slices) == 2
    submitted: list[str] = []
    for f in slices:
        started, *urls = f.read_text().split("\n")
        submitted += urls
        for url in urls:
            replica = site.replica("/" + url.split("/", 3)[3])
            assert replica.on_disk and 0 < replica.atime <= float(started)
    assert sorted(submitted) == sorted(site.door_url(p) for p in paths)
    assert site.stats()["door_tape_gets"] == 0


# --- with a bearer token (issue 14) --------------------------------------------------------------


@pytest.fixture
def token_site(pki: TestPKI) -> Iterator[tuple[ThreadedDCache, TokenIssuer]]:
    """The dCache emulator checking bearer tokens (audience 127.0.0.1, scopes under /pnfs) and
    taking no client certificate: a token is the only credential."""
    issuer = TokenIssuer()
    check = BearerCheck(issuer, ["https://127.0.0.1"], "/pnfs")
    open_door = pki.server_ssl_context(require_client_cert=False)
    with ThreadedDCache(open_door, pki.pool_ssl_context(),
                        DCacheConfig(drives=2, door_timeout=5.0), bearer=check) as srv:
        yield srv, issuer


def _warm_with_token(pki: TestPKI, tmp_path: Path, definition: Path, token: str,
                     *args: str, extra: str = "") -> CliResult:
    """``prestaged warm --json`` with only a bearer token (no proxy anywhere)."""
    path = write_token(tmp_path / "bt", token)
    res = run_cli("warm", str(definition), "--token-file", str(path), "--auth", "token",
                  "--ca-dir", str(pki.ca_dir), "--state", str(tmp_path / "state.db"),
                  "--config", str(_config(tmp_path, extra)), "--json", *args)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_a_stage_token_alone_stages_and_touches_and_never_reaches_a_pool(
    token_site: tuple[ThreadedDCache, TokenIssuer], pki: TestPKI, tmp_path: Path
) -> None:
    """A token with storage.read and storage.stage, no proxy: the cold dataset is staged and
    touched as with a proxy; the door and the frontend saw the token, the pool never did
    (gfal2 sends it on to the pool, see test_dcache_emulator), nothing was refused."""
    site, issuer = token_site
    paths = _mixed(site)
    urls = [site.door_url(p) for group in paths.values() for p in group]
    token = issuer.mint("storage.read:/ storage.stage:/", audience="https://127.0.0.1")
    res = _warm_with_token(pki, tmp_path, _definition(tmp_path, urls), token, "-v")
    doc = json.loads(res.stdout)
    assert res.returncode == 1, res.stderr  # the unavailable and the unknown file
    assert doc["counts"]["warm"] == 19 and doc["counts"]["staged"] == 12
    stats = site.stats()
    assert stats["token_requests"]["door"] >= 19 and stats["token_requests"]["frontend"] >= 4
    assert stats["pool_authorization"] == 0 and not stats["auth_refusals"]
    assert stats["door_tape_gets"] == 0
    assert token not in res.stdout + res.stderr


def test_a_read_only_token_on_tape_files_is_exit_3_naming_storage_stage(
    token_site: tuple[ThreadedDCache, TokenIssuer], pki: TestPKI, tmp_path: Path
) -> None:
    """storage.read only: a warning names the missing storage.stage before staging; dCache
    fails the stage ("Staging not allowed"), which ended exit 5 blaming the storage after each
    file was asked for twice. Now no file is asked again and the run stops with exit 3, one
    line naming the token and storage.stage; no tape file is door-GET."""
    site, issuer = token_site
    paths = _mixed(site)
    urls = [site.door_url(p) for p in paths["disk"] + paths["tape"]]
    token = issuer.mint("storage.read:/", audience="https://127.0.0.1")
    res = _warm_with_token(pki, tmp_path, _definition(tmp_path, urls), token, "-v")
    assert res.returncode == 3, res.stderr
    assert "no storage.stage scope covers" in res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("prestaged: error:")]
    assert "subject prestaged-test-user, scopes storage.read:/" in line
    assert "Staging not allowed" in line and "needs a storage.stage scope" in line
    assert "asking once more" not in res.stderr
    assert site.stats()["door_tape_gets"] == 0
    assert token not in res.stdout + res.stderr


def test_whose_scopes_refuse_staging() -> None:
    """Only a token with storage scopes, none covering the path, is surely refused a stage; a
    token whose rights come from its groups is not judged (its failures stay the storage's)."""
    issuer = TokenIssuer()

    def info(scope: str, groups: list[str] | None = None) -> TokenInfo:
        return inspect_token(issuer.mint(scope, groups=groups), source="test")
    assert scopes_refuse(info("storage.read:/"), "storage.stage", "/pnfs/t/a")
    assert scopes_refuse(info("storage.stage:/dune"), "storage.stage", "/pnfs/t/a")
    assert not scopes_refuse(info("storage.read:/ storage.stage:/t"), "storage.stage", "/pnfs/t/a")
    assert not scopes_refuse(info("", groups=["/dune"]), "storage.stage", "/pnfs/t/a")
    assert not scopes_refuse(info("openid offline_access", groups=["/dune"]), "storage.stage",
                             "/pnfs/t/a")


def test_a_tape_api_named_in_the_config_gets_the_token_on_another_host(
    pki: TestPKI, tmp_path: Path
) -> None:
    """The token goes to a frontend on another host than the door's only when the config names
    it ([[storage.tape_api]]): a discovery document cannot send it there, the operator can.
    Here the door is 127.0.0.1 and the frontend is named as localhost."""
    issuer = TokenIssuer()
    check = BearerCheck(issuer, ["https://127.0.0.1"], "/pnfs")
    open_door = pki.server_ssl_context(require_client_cert=False)
    with ThreadedDCache(open_door, pki.pool_ssl_context(),
                        DCacheConfig(drives=1, door_timeout=5.0, discovery=False),
                        bearer=check) as srv:
        srv.add_file("/pnfs/t/tape", 10, Locality.TAPE)
        door = srv.door_url("/").rstrip("/")
        uri = srv.tape_api_url.replace("127.0.0.1", "localhost")
        token = issuer.mint("storage.read:/ storage.stage:/", audience="https://127.0.0.1")
        res = _warm_with_token(pki, tmp_path, _definition(tmp_path, [srv.door_url("/pnfs/t/tape")]),
                               token, extra=f'\n[[storage.tape_api]]\ndoor = "{door}"\n'
                                            f'uri = "{uri}"\n')
        doc = json.loads(res.stdout)
        assert res.returncode == 0, res.stderr
        assert doc["counts"]["staged"] == 1 and doc["tape"]["endpoints"] == {door: uri}
        stats = srv.stats()
        assert stats["token_requests"]["frontend"] >= 3  # archiveinfo, stage, poll
        assert not stats["auth_refusals"] and stats["door_tape_gets"] == 0
        assert token not in res.stdout + res.stderr


@pytest.mark.parametrize("stage", ["auto", "never"])
def test_a_token_dcache_rejects_stops_the_run_before_dcache_blocks_us(
    token_site: tuple[ThreadedDCache, TokenIssuer], pki: TestPKI, tmp_path: Path, stage: str
) -> None:
    """A token for another audience: exit 3 naming the token and quoting dCache's reason, and
    fewer than dCache's 3 authorisation errors (auto: the discovery's 401 alone; never: the
    breaker's 3 touches, then nothing), so the client is never blocked (no 429)."""
    site, issuer = token_site
    paths = _mixed(site)
    urls = [site.door_url(p) for p in paths["disk"]]
    token = issuer.mint("storage.read:/", audience="https://elsewhere")
    res = _warm_with_token(pki, tmp_path, _definition(tmp_path, urls), token, "-q",
                           "--stage", stage)
    assert res.returncode == 3, res.stderr
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert "wrong audience" in line and "scopes storage.read:/" in line
    stats = site.stats()
    assert stats["auth_refusals"] == {"door:401": 1 if stage == "auto" else 3}
    assert not any(stats["blocked"].values())
    assert token not in res.stdout + res.stderr


def test_a_client_dcache_blocked_for_its_denials_stops_with_exit_3_not_mass_failures(
    token_site: tuple[ThreadedDCache, TokenIssuer], pki: TestPKI, tmp_path: Path
) -> None:
    """With a denial limit above dCache's (a proxy's 20; here ``token_denials = 20``) the door
    blocks us after its 3 authorisation errors and answers 429 from then on: the run stops at
    the first 429 with exit 3, quoting the last denial's reason and naming the block, instead of
    retrying every file into "429" failures."""
    site, issuer = token_site
    paths = _mixed(site)
    urls = [site.door_url(p) for p in paths["disk"] + paths["cached"]]
    token = issuer.mint("storage.read:/", audience="https://elsewhere")
    res = _warm_with_token(pki, tmp_path, _definition(tmp_path, urls), token, "-q",
                           "--stage", "never", extra="[breaker]\ntoken_denials = 20\n")
    assert res.returncode == 3, res.stdout + res.stderr
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert "answered 401 3 times, each within 20 s" in line and "wrong audience" in line
    assert "now answers 429" in line
    stats = site.stats()
    assert stats["auth_refusals"] == {"door:401": 3} and stats["blocked"]["door"] >= 1
    assert token not in res.stdout + res.stderr


def test_a_metacat_dataset_with_tape_only_replicas_in_rucio_is_staged_then_touched(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """Issue 15 meets issue 13: Rucio's TAPE-only replicas (davs:// on a tape-backed dCache)
    go to the tape path (staged in bulk, touched on landing), never read cold through the door;
    files with a disk copy are touched from their DISK RSE."""
    from prestaged.testing.metacat import ThreadedMetaCatServer
    from prestaged.testing.rucio import ThreadedRucioEmulator
    from prestaged.testing.rucio_server import rfc2253_dn

    door = site.door_url("/").rstrip("/")
    host, port = door.split("://", 1)[1].split(":")
    disk = [f"d{i}.root" for i in range(3)]
    tape = [f"t{i}.root" for i in range(4)]
    for name in disk:
        site.add_file(f"/pnfs/t/{name}", 100, Locality.DISK_AND_TAPE)
    for i, name in enumerate(tape):
        site.add_file(f"/pnfs/t/{name}", 100, Locality.TAPE, tape=f"T{i % 2}")

    def rse(name: str, kind: str, scheme: str) -> dict[str, object]:
        return {"name": name, "type": kind, "deterministic": False, "protocols": [
            {"scheme": scheme, "hostname": host, "port": int(port), "prefix": "/pnfs"}]}

    files = [{"scope": "dune", "name": n, "bytes": 100, "adler32": "00000001", "replicas": {
        "FNAL_DISK": f"https://{host}:{port}/pnfs/t/{n}",
        "FNAL_TAPE": f"davs://{host}:{port}/pnfs/t/{n}"}} for n in disk]
    files += [{"scope": "dune", "name": n, "bytes": 100, "adler32": "00000001", "replicas": {
        "FNAL_TAPE": f"davs://{host}:{port}/pnfs/t/{n}"}} for n in tape]
    spec = {"scopes": ["dune"], "files": files, "datasets": [],
            "rses": [rse("FNAL_DISK", "DISK", "https"), rse("FNAL_TAPE", "TAPE", "davs")],
            "x509": [{"account": "root", "dn": rfc2253_dn(pki.user_cert)}]}
    members = [{"namespace": "dune", "name": n, "size": 100} for n in disk + tape]
    with ThreadedMetaCatServer(datasets={"dune:cold": members}) as metacat, \
            ThreadedRucioEmulator(spec, ssl_context=pki.server_ssl_context(
                require_client_cert=False)) as rucio:
        # Tables after QUICK's [storage] keys end that table.
        extra = (f'[catalog.metacat]\nurl = "{metacat.base_url}"\n'
                 f'[catalog.rucio]\nurl = "{rucio.base_url}"\nauth = "x509"\n')
        res = run_cli("warm", "dune:cold", "--catalog", "metacat", "--json", "--proxy",
                      str(proxy), "--ca-dir", str(pki.ca_dir), "--state",
                      str(tmp_path / "state.db"), "--config", str(_config(tmp_path, extra)))
        assert rucio.stats.tokens_issued["x509"] == 1
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr
    assert doc["counts"]["warm"] == 7 and doc["counts"]["staged"] == 4
    stats = site.stats()
    assert stats["door_tape_gets"] == 0
    assert stats["requests"]["frontend:stage"] == 1  # 4 files in one batch of stage_batch 5
    assert all(site.replica(f"/pnfs/t/{n}").on_disk for n in tape)

