"""MetaCat datasets in the flows SAM definitions have: the daemon's ``[[watch]]``, a campaign's
``drainingn`` split, the gate (``wait``/``submit``), ``status`` and ``history``, and files that
resolve to no URL.

The MetaCat emulator lists the dataset; the Rucio emulator (HTTPS, the test user's DN as an
x509 identity of ``root``, so the proxy logs in as on the real server) resolves it to the test
storage's door; both are held to the real servers elsewhere (tests/test_metacat_emulator.py,
tests/test_rucio_emulator.py, tests/test_metacat_rucio.py). Nothing sleeps: the daemon is
waited on through its metrics, the CLI runs to its end.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from campaign_fakes import read_records
from cli_runner import run_cli
from conftest import Backend
from daemon_harness import free_port, in_process, metric_value, state_files, until, write_config
from test_campaigns import _prestaged, _show, _submit, _write

from prestaged.testing.metacat import ThreadedMetaCatServer
from prestaged.testing.pki import TestPKI
from prestaged.testing.rucio import LIST_REPLICAS, ThreadedRucioEmulator
from prestaged.testing.rucio_server import rfc2253_dn
from prestaged.testing.storage import ThreadedStorageServer

DATASET = "dune:flow-run7"
PREFIX = "/pnfs/dune/persistent"
UNKNOWN = "not-in-rucio.root"  # gets no URL: Rucio does not know it; SAM: no rewrite rule


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's MetaCat, Rucio and proxy settings must not leak in."""
    for name in ("X509_USER_PROXY", "X509_CERT_DIR", "PRESTAGED_CONFIG", "METACAT_SERVER_URL",
                 "RUCIO_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class World:
    """A MetaCat dataset whose files Rucio places on the test storage."""

    metacat: ThreadedMetaCatServer
    rucio: ThreadedRucioEmulator
    names: list[str]
    """File names (scope ``dune``) Rucio has a replica of, in MetaCat's listing."""

    @property
    def dids(self) -> set[str]:
        """``dune:<name>`` of every resolvable file: the names prestaged gives them."""
        return {f"dune:{n}" for n in self.names}

    def catalog_toml(self) -> str:
        """``[catalog.metacat]`` and ``[catalog.rucio]`` for this world."""
        return (f'[catalog.metacat]\nurl = "{self.metacat.base_url}"\nretry_for = 0\n'
                f'[catalog.rucio]\nurl = "{self.rucio.base_url}"\nretry_for = 0\nchunk = 4\n')


def _touched(storage: ThreadedStorageServer) -> dict[str, int]:
    """Requests per file name under the Rucio prefix of the storage."""
    return {p.rsplit("/", 1)[-1]: s.requests for p, s in storage.stats.paths.items()
            if p.startswith(PREFIX + "/")}


@pytest.fixture
def world(pki: TestPKI, storage: ThreadedStorageServer
          ) -> Iterator[Callable[..., World]]:
    """``world(n, unknown=False)``: a dataset ``DATASET`` of ``n`` files on a DISK RSE of the
    test storage (plus ``UNKNOWN``, which Rucio does not know, with ``unknown``)."""
    started: list[Any] = []

    def make(n: int, *, unknown: bool = False) -> World:
        names = [f"raw_{i:03d}.root" for i in range(n)]
        spec = {
            "scopes": ["dune"],
            "rses": [{"name": "FNAL_DISK", "type": "DISK", "protocols": [
                {"scheme": "https", "hostname": "127.0.0.1", "port": storage.door_port,
                 "prefix": PREFIX}]}],
            "files": [{"scope": "dune", "name": name, "bytes": 100, "adler32": "0cc737eb",
                       "replicas": {"FNAL_DISK": None}} for name in names],
            "x509": [{"account": "root", "dn": rfc2253_dn(pki.user_cert)}],
        }
        listed = [*names, UNKNOWN] if unknown else names
        metacat = ThreadedMetaCatServer(datasets={DATASET: [
            {"namespace": "dune", "name": name, "size": 100} for name in listed]})
        rucio = ThreadedRucioEmulator(
            spec, ssl_context=pki.server_ssl_context(require_client_cert=False))
        for server in (metacat, rucio):
            server.start()
            started.append(server)
        return World(metacat, rucio, names)

    yield make
    for server in started:
        server.stop()


# --- the daemon's [[watch]] -----------------------------------------------------------------


async def test_daemon_watches_a_metacat_dataset(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    world: Callable[..., World],
) -> None:
    """In-process: a [[watch]] on a MetaCat dataset lists it in MetaCat, resolves it through
    Rucio (the daemon's proxy logging in), warms every file once, records it under its
    ``ns:name`` with catalog metacat (as `prestaged status` hears from the daemon), and counts
    every MetaCat request as catalog="metacat" and every Rucio request as catalog="rucio" in
    prestaged_catalog_requests_total."""
    w = world(12)
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    config.write_text(config.read_text() + f'\n[[watch]]\ndefinition = "{DATASET}"\n'
                      'catalog = "metacat"\nevery = "1h"\n' + w.catalog_toml())
    async with in_process(config) as d:
        async def warmed() -> bool:
            return metric_value(await d.metrics(), "prestaged_runs_total", result="ok") == 1
        await until("metacat watch warmed", warmed)
        assert _touched(storage) == {n: 1 for n in w.names}
        status, doc = await d.http("GET", "/api/v1/datasets")
        assert status == 200, doc
        [row] = doc["definitions"]
        assert (row["definition"], row["catalog"], row["files"], row["fresh"]) \
            == (DATASET, "metacat", 12, 12)
        res = await asyncio.to_thread(run_cli, "status", DATASET, "--catalog", "metacat",
                                      "--config", str(config), "--json")
        assert res.returncode == 0, res.stderr
        asked_daemon = json.loads(res.stdout)
        assert asked_daemon["source"] == f"daemon http://127.0.0.1:{port}"
        assert [(r["definition"], r["catalog"], r["fresh"])
                for r in asked_daemon["definitions"]] == [(DATASET, "metacat", 12)]
        text = await d.metrics()
    assert w.metacat.stats.requests["dataset_files"] >= 1
    assert w.rucio.stats.requests[LIST_REPLICAS] == 3  # 12 files in chunks of 4
    assert metric_value(text, "prestaged_catalog_requests_total",
                        catalog="metacat", result="ok") == w.metacat.stats.total
    assert metric_value(text, "prestaged_catalog_requests_total",
                        catalog="rucio", result="ok") == w.rucio.stats.total
    assert metric_value(text, "prestaged_catalog_requests_total",
                        catalog="samweb", result="ok") == 0


# --- a campaign's drainingn split -------------------------------------------------------------


def _prestaged_config(tmp_path: Path, w: World) -> Path:
    """A prestaged config naming ``w``'s MetaCat and Rucio."""
    path = tmp_path / "prestaged.toml"
    path.write_text(w.catalog_toml())
    return path


def test_campaign_drainingn_slices_a_metacat_dataset(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    world: Callable[..., World],
) -> None:
    """[defaults] catalog = "metacat", drainingn(3) over a dataset of 9 files: 3 submissions
    of 3, disjoint, together the dataset's files (named ``ns:name``), each file warmed once
    before its slice is submitted; a second run submits nothing more."""
    w = world(9)
    config = _prestaged_config(tmp_path, w)
    campaign = _write(tmp_path, f"""
name = "mc-drain"
[defaults]
catalog = "metacat"
[[stage]]
name = "reco"
input = "{DATASET}"
split = "drainingn(3)"
submit = {_submit(tmp_path, "{submission} {definition} {files_file} {urls_file} {n_files}")}
""")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign),
                     "--config", str(config))
    assert res.returncode == 0, res.stderr
    records = read_records(tmp_path)
    assert [len(r["files"]) for r in records] == [3, 3, 3]
    assert [r["argv"][-1] for r in records] == ["3", "3", "3"]
    files = [f for r in records for f in r["files"]]
    assert len(files) == 9 and set(files) == w.dids  # disjoint and complete
    urls = [u for r in records for u in r["urls"]]
    assert sorted(u.rsplit("/", 1)[-1] for u in urls) == sorted(w.names)
    assert all(u.startswith(storage.url(PREFIX)) for u in urls)
    assert _touched(storage) == {n: 1 for n in w.names}
    touched = {storage.url(p): s.times[0] for p, s in storage.stats.paths.items()}
    assert all(r["start"] >= max(touched[u] for u in r["urls"]) for r in records)
    subs = _show(pki, proxy, tmp_path, "mc-drain")
    assert [(s["item"], s["state"]) for s in subs] == [
        (f"slice-{k}", "completed") for k in (1, 2, 3)]
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign),
                     "--config", str(config))
    assert res.returncode == 0, res.stderr
    assert len(read_records(tmp_path)) == 3
    assert _touched(storage) == {n: 1 for n in w.names}


# --- the gate, status and history -------------------------------------------------------------


def _cli(pki: TestPKI, proxy: Path, tmp_path: Path, config: Path, *args: str) -> Any:
    """``prestaged COMMAND ARGS`` in-process with ``config``, the test proxy and tmp_path's
    state (given right after COMMAND: ``submit`` passes what follows ``--`` on)."""
    command, *rest = args
    return run_cli(command, "--config", str(config), "--proxy", str(proxy),
                   "--ca-dir", str(pki.ca_dir), "--state", str(tmp_path / "state.db"), *rest)


def _state_cli(tmp_path: Path, *args: str) -> Any:
    """``prestaged status|history ARGS --json`` on tmp_path's state: its JSON document."""
    res = run_cli(*args, "--state", str(tmp_path / "state.db"), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _on(backend: Backend, config: Path) -> list[str]:
    """Arguments selecting ``config`` with ``backend``'s state appended to it (``--state`` for
    SQLite)."""
    config.write_text(config.read_text() + backend.state_table())
    return ["--config", str(config), *backend.state_args()]


def test_gate_passes_once_warm_and_status_and_history_name_the_dataset(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    world: Callable[..., World], backend: Backend,
) -> None:
    """`wait` on a MetaCat dataset warms it and passes; `submit` then runs its command without
    touching anything again (the store knows the dataset's files as fresh); `status` and
    `history` name the dataset ``ns:name`` with catalog metacat. On each backend."""
    w = world(6)
    on = _on(backend, _prestaged_config(tmp_path, w))
    ours = ["--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), *on]

    def state_cli(*args: str) -> Any:
        res = run_cli(*args, *on, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    res = run_cli("wait", *ours, DATASET, "--catalog", "metacat", "--json")
    assert res.returncode == 0, res.stderr
    gate = json.loads(res.stdout)
    assert (gate["catalog"], gate["definition"], gate["files"], gate["fresh"], gate["runs"]) \
        == ("metacat", DATASET, 6, 6, 1)
    assert _touched(storage) == {n: 1 for n in w.names}
    marker = tmp_path / "submitted"
    res = run_cli("submit", *ours, "--definition", DATASET, "--catalog",
                  "metacat", "--", sys.executable, "-c",
                  f"open({str(marker)!r}, 'w').write('ran')")
    assert res.returncode == 0, res.stderr
    assert marker.read_text() == "ran"
    assert f"metacat:{DATASET}: 6/6 files warm" in res.stderr
    assert _touched(storage) == {n: 1 for n in w.names}  # fresh: not touched again
    [row] = state_cli("status", DATASET, "--catalog", "metacat")["definitions"]
    assert (row["definition"], row["catalog"], row["files"], row["fresh"]) \
        == (DATASET, "metacat", 6, 6)
    other = run_cli("status", DATASET, "--catalog", "samweb", *on)
    assert other.returncode == 4 and "has no record" in other.stderr
    runs = state_cli("history")["runs"]
    assert [(r["catalog"], r["definition"], r["exit_code"]) for r in runs] \
        == [("metacat", DATASET, 0)] * 2
    text = run_cli("history", *on)
    assert f"metacat:{DATASET}  exit 0  done" in text.stdout
    assert backend.url is None or state_files(tmp_path) == []


# --- files that resolve to no URL: as SAM's -------------------------------------------------


@dataclass(frozen=True)
class Unresolvable:
    """A definition ``DATASET`` of 4 files on the storage plus UNKNOWN, which gets no URL."""

    kind: str
    catalog_toml: str
    names: list[str]
    unresolved: str
    """UNKNOWN as the catalog names it."""
    reason: str
    """Why the catalog could not resolve it."""


@pytest.fixture(params=["samweb", "metacat"])
def unresolvable(request: pytest.FixtureRequest, storage: ThreadedStorageServer,
                 world: Callable[..., World], samweb: Callable[..., Any]) -> Unresolvable:
    """The same dataset in SAM (UNKNOWN's only location matches no rewrite rule) and in
    MetaCat (Rucio does not know UNKNOWN): each flow must treat the two alike."""
    if request.param == "metacat":
        w = world(4, unknown=True)
        return Unresolvable("metacat", w.catalog_toml(), w.names, f"dune:{UNKNOWN}",
                            "Rucio does not know the file")
    names = [f"raw_{i:03d}.root" for i in range(4)]
    files = [{"name": n, "size": 100, "locations": ["dcache:/pnfs/dune/persistent"]}
             for n in names]
    files.append({"name": UNKNOWN, "size": 100, "locations": ["cern-eos:/eos/dune/x"]})
    sam = samweb({DATASET: files})
    toml = (f'[catalog.samweb]\nbase_url = "{sam.base_url}"\nretry_for = 0\n'
            '[[catalog.samweb.rewrite]]\nlocation = "dcache:/pnfs/dune/persistent"\n'
            f'url = "{storage.url(PREFIX)}"\n')
    return Unresolvable("samweb", toml, names, UNKNOWN, "no rewrite rule matches its locations")


def test_unresolved_files_in_the_gate_warm_and_status(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    unresolvable: Unresolvable,
) -> None:
    """As for SAM, so for MetaCat: the gate counts the unresolved file as cold (4/5 warm does
    not pass --ready 1.0, 0.8 does; it passed on 4/4 before), warned about on stderr; `warm`
    lists it with its reason and exits 1; `status` counts the 4 resolved files and it."""
    u = unresolvable
    config = tmp_path / "prestaged.toml"
    config.write_text(u.catalog_toml)
    res = _cli(pki, proxy, tmp_path, config, "wait", DATASET, "--catalog", u.kind, "--json",
               "--timeout", "1s")
    assert res.returncode == 1, res.stderr
    gate = json.loads(res.stdout)
    assert (gate["catalog"], gate["files"], gate["fresh"], gate["unresolved"], gate["cold"],
            gate["passed"]) == (u.kind, 5, 4, 1, [], False)
    res = _cli(pki, proxy, tmp_path, config, "wait", DATASET, "--catalog", u.kind, "--json",
               "--ready", "0.8")
    assert res.returncode == 0 and json.loads(res.stdout)["passed"], res.stderr
    assert f"unresolved: {u.unresolved} ({u.reason})" in res.stderr
    assert "1 files got no URL and are reported as unresolved" in res.stderr
    assert _touched(storage) == {n: 1 for n in u.names}
    res = _cli(pki, proxy, tmp_path, config, "warm", DATASET, "--catalog", u.kind, "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["counts"]["skipped_fresh"] == 4
    assert [(x["name"], x["reason"]) for x in doc["unresolved"]] == [(u.unresolved, u.reason)]
    [row] = _state_cli(tmp_path, "status", DATASET)["definitions"]
    assert (row["catalog"], row["files"], row["fresh"], row["never"], row["unresolved"]) \
        == (u.kind, 4, 4, 0, 1)


async def test_unresolved_files_in_a_watch(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    unresolvable: Unresolvable,
) -> None:
    """As for SAM, so for MetaCat: a watch's run over a dataset with an unresolved file warms
    the others, ends ok and leaves the dataset 4/4 fresh (the unresolved file is not a member)."""
    u = unresolvable
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    config.write_text(config.read_text() + f'\n[[watch]]\ndefinition = "{DATASET}"\n'
                      f'catalog = "{u.kind}"\nevery = "1h"\n' + u.catalog_toml)
    async with in_process(config) as d:
        async def warmed() -> bool:
            return metric_value(await d.metrics(), "prestaged_runs_total", result="ok") == 1
        await until(f"{u.kind} watch warmed", warmed)
        status, doc = await d.http("GET", "/api/v1/datasets")
        assert status == 200, doc
        [row] = doc["definitions"]
        assert (row["catalog"], row["files"], row["fresh"]) == (u.kind, 4, 4)
        run = row["last_run"]
        assert (run["exit_code"], run["reason"], run["counts"]["warm"]) == (0, "done", 4), run
    assert _touched(storage) == {n: 1 for n in u.names}


def test_unresolved_files_in_a_drainingn_campaign(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    unresolvable: Unresolvable,
) -> None:
    """As for SAM, so for MetaCat: drainingn(2) slices hold only files with a URL (2 slices
    of 2), the unresolved file in none; the stage completes."""
    u = unresolvable
    config = tmp_path / "prestaged.toml"
    config.write_text(u.catalog_toml)
    campaign = _write(tmp_path, f"""
name = "unres"
[defaults]
catalog = "{u.kind}"
[[stage]]
name = "reco"
input = "{DATASET}"
split = "drainingn(2)"
submit = {_submit(tmp_path, "{files_file} {urls_file}")}
""")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign),
                     "--config", str(config))
    assert res.returncode == 0, res.stderr
    records = read_records(tmp_path)
    assert [len(r["urls"]) for r in records] == [2, 2]
    assert sorted(f.rsplit(":", 1)[-1] for r in records for f in r["files"]) == u.names
    assert [s["state"] for s in _show(pki, proxy, tmp_path, "unres")] == ["completed"] * 2
