"""``[[watch]]`` entries in a daemon running in the test's event loop: watches are known by the
catalog's canonical definition (defect 4), and a reload that drops a watch drops its gauges
(defect 5). The storage is the loopback test server; waits poll the API or the metrics with a
deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from daemon_harness import free_port, in_process, metric_value, until, write_config

from prestaged.catalog.local import LocalCatalog
from prestaged.model import FileRef
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, ThreadedStorageServer


def _urls(path: Path, srv: ThreadedStorageServer, name: str, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(srv.url(f"/{name}/f{i:02d}") + "\n" for i in range(n)))
    return path


def _config(tmp_path: Path, pki: TestPKI, proxy: Path, watches: str, state: str = "") -> Path:
    path = tmp_path / "prestaged.toml"
    path.write_text(f"""
[credentials]
proxy = "{proxy}"
ca_dir = "{pki.ca_dir}"
[state]
path = "{tmp_path / 'state.db'}"
flush_interval = "100ms"
{state}
[daemon]
listen = "127.0.0.1:{free_port()}"
drain_timeout = "1s"
jitter = 0
{watches}
""")
    return path


async def test_watches_are_known_by_the_catalogs_definition(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Watches written `defs/rel.txt` and `~/tilde.txt` (made absolute by the local catalog):
    their runs get the watch's freshness (not state.fresh_for = 0), their gauges, and the
    warning that they stay below `ready` (shown in the run too: 90% warm, exit 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rel = _urls(tmp_path / "defs" / "rel.txt", storage, "rel", 10)
    tilde = _urls(tmp_path / "home" / "tilde.txt", storage, "tilde", 10)
    storage.remove("/rel/f03")
    storage.remove("/tilde/f07")
    watches = "".join(f'[[watch]]\ndefinition = "{d}"\nevery = "1h"\nready = 0.95\n'
                      for d in ("defs/rel.txt", "~/tilde.txt"))
    config = _config(tmp_path, pki, proxy, watches, state='fresh_for = "0s"')
    caplog.set_level(logging.WARNING, logger="prestaged")
    async with in_process(config) as d:
        async def both_done() -> bool:
            states = [(await d.http("GET", f"/api/v1/runs/{i}"))[1].get("state")
                      for i in (1, 2)]
            return states == ["done", "done"]
        await until("both watch runs", both_done)
        runs = [(await d.http("GET", f"/api/v1/runs/{i}"))[1] for i in (1, 2)]
        assert sorted(r["definition"] for r in runs) == sorted([str(rel), str(tilde)])
        assert [(r["warm_fraction"], r["exit_code"]) for r in runs] == [(0.9, 1), (0.9, 1)]
        text = await d.metrics()
        for label in ("rel", "tilde"):
            assert metric_value(text, "prestaged_dataset_files", definition=label,
                                state="warm") == 9
            assert metric_value(text, "prestaged_dataset_files", definition=label,
                                state="failed") == 1
    for written in ("defs/rel.txt", "~/tilde.txt"):
        assert f"watch {written}: only 90.0% warm after the run, below ready 95.0%" \
            in caplog.text


async def test_two_spellings_of_one_definition_are_one_watch(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """`defs/a.txt` and its absolute path name one definition: one watch, one run, and a
    warning that the later entry is used."""
    monkeypatch.chdir(tmp_path)
    a = _urls(tmp_path / "defs" / "a.txt", storage, "a", 3)
    watches = "".join(f'[[watch]]\ndefinition = "{d}"\nevery = "1h"\n'
                      for d in ("defs/a.txt", a))
    async with in_process(_config(tmp_path, pki, proxy, watches)) as d:
        async def done() -> bool:
            return (await d.http("GET", "/api/v1/runs/1"))[1].get("state") == "done"
        await until("the watch run", done)
        assert (await d.http("GET", "/api/v1/runs/2"))[0] == 404
    assert "watch " + str(a) + ": the same definition as defs/a.txt" in caplog.text
    assert storage.stats.path("/a/f00").requests == 1


async def test_reload_drops_the_gauges_of_a_removed_watch(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """After a reload that removes watch `b`, /metrics has no dataset series of `b` left;
    those of the kept watch `a` stay."""
    a = _urls(tmp_path / "a.txt", storage, "a", 4)
    b = _urls(tmp_path / "b.txt", storage, "b", 5)

    def watches(*defs: Path) -> str:
        return "".join(f'[[watch]]\ndefinition = "{p}"\nevery = "1h"\n' for p in defs)

    config = _config(tmp_path, pki, proxy, watches(a, b))
    listen = next(ln for ln in config.read_text().splitlines() if ln.startswith("listen"))
    async with in_process(config) as d:
        async def gauges(name: str) -> bool:
            return metric_value(await d.metrics(), "prestaged_dataset_last_warm_timestamp_"
                                "seconds", definition=name) is not None
        await until("a's gauges", lambda: gauges("a"))
        await until("b's gauges", lambda: gauges("b"))
        text = config.read_text()
        config.write_text(text[: text.index("[[watch]]")] + watches(a))
        assert listen in config.read_text()
        d.daemon.request_reload()

        async def b_gone() -> bool:
            return "definition=\"b\"" not in await d.metrics()
        await until("b's series dropped", b_gone, timeout=10)
        text = await d.metrics()
        assert metric_value(text, "prestaged_dataset_files", definition="a", state="warm") == 4
        assert metric_value(text, "prestaged_watch_every_seconds", definition="a") == 3600


async def test_a_watch_whose_files_partly_failed_is_not_run_again_at_every_reload(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """Only a run that exited 0 counted as done: a watch with one missing file (exit 1, a
    normal state of real data) was listed and warmed again at every reload and restart. A run
    that did its work now waits out `every`; one stopped by its credentials does not."""
    a = _urls(tmp_path / "a.txt", storage, "a", 4)
    storage.remove("/a/f02")
    config = _config(tmp_path, pki, proxy, f'[[watch]]\ndefinition = "{a}"\nevery = "1h"\n')
    async with in_process(config) as d:
        async def done() -> bool:
            return (await d.http("GET", "/api/v1/runs/1"))[1].get("state") == "done"
        await until("the watch run", done)
        assert (await d.http("GET", "/api/v1/runs/1"))[1]["exit_code"] == 1
        watches = d.daemon._live.watches
        watch = watches.find("local", str(a))
        assert watch is not None
        assert 3500 < await watches._first_delay(watch) <= 3600


async def test_at_most_max_runs_watch_runs_run_at_once_and_the_rest_wait_queued(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """Every watch started its first run at once (2,000 watches: the API's reads waited
    seconds behind their state calls). Runs now take one of `daemon.max_runs` places; the
    others wait queued, and every one runs."""
    defs = [_urls(tmp_path / f"w{i}.txt", storage, f"w{i}", 1) for i in range(5)]
    for i in range(5):
        storage.server.inject(f"/w{i}/f00", [Delay(0.3)])
    watches = "".join(f'[[watch]]\ndefinition = "{d}"\nevery = "1h"\n' for d in defs)
    config = _config(tmp_path, pki, proxy, watches)
    config.write_text(config.read_text().replace("jitter = 0", "jitter = 0\nmax_runs = 2"))
    async with in_process(config) as d:
        async def all_done() -> bool:
            states = [(await d.http("GET", f"/api/v1/runs/{i}"))[1].get("state")
                      for i in range(1, 6)]
            return states == ["done"] * 5
        await until("the five watch runs", all_done)
    records = [r for i in range(5) for r in storage.stats.path(f"/w{i}/f00").records]
    assert len(records) == 5 and max(r.in_flight for r in records) == 2


async def test_a_watch_whose_listing_was_cut_off_has_no_warm_fraction(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """A run whose listing stopped half-way (a bad line here) gave the files seen so far as the
    whole definition, 100% warm. Its warm fraction is now unknown (null)."""
    a = _urls(tmp_path / "a.txt", storage, "a", 300)  # more than the engine admits at once
    a.write_text(a.read_text() + "not a URL\n")
    config = _config(tmp_path, pki, proxy, f'[[watch]]\ndefinition = "{a}"\nevery = "1h"\n')
    async with in_process(config) as d:
        async def done() -> bool:
            return (await d.http("GET", "/api/v1/runs/1"))[1].get("state") == "done"
        await until("the watch run", done)
        run = (await d.http("GET", "/api/v1/runs/1"))[1]
        assert (run["exit_code"], run["warm_fraction"]) == (4, None), run
        status, doc = await d.http("GET", "/api/v1/datasets")
        assert status == 200, doc
        [row] = doc["definitions"]
        assert 0 < row["files"] < 300 and row["listing_complete"] is False, row


async def test_a_watch_listed_for_longer_than_the_cluster_lease_is_still_planned(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, pg_url: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """On a shared (PostgreSQL) state a member lists a watched definition while holding its
    schedule's lease. A listing longer than ``cluster.lease`` (any big SAM or MetaCat
    definition with the default 60 s) lost the lease every time: the round was never planned,
    the definition listed again and again, never warmed. The lease is renewed while listing."""
    definition = _urls(tmp_path / "defs" / "slow.txt", storage, "slow", 3)
    listed = LocalCatalog.files

    async def slowly(self: LocalCatalog) -> AsyncIterator[FileRef]:
        await asyncio.sleep(2.0)  # a catalog slower than the lease below (0.9 s)
        async for ref in listed(self):
            yield ref

    monkeypatch.setattr(LocalCatalog, "files", slowly)
    config = write_config(tmp_path, pki, proxy, free_port(), [(definition, "1h")],
                          state_url=pg_url, sections='[cluster]\nlease = "900ms"\n'
                                                     'heartbeat = "200ms"')
    async with in_process(config):
        async def warmed() -> bool:
            return storage.stats.requests_total >= 3
        await until("the slowly listed watch warmed", warmed)
    assert "schedule lease lost while listing" not in caplog.text
