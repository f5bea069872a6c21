"""The API over the real daemon parts, in-process: a state database locked by another process
does not freeze ``/healthz`` and ``/metrics`` (defect 11); run eviction never forgets a queued
or running run (defect 12); a run that dies of a bug is an error, not a stuck run (issue 12
section 3); the API reads no file a caller names and keeps operator data behind the token
(issue 12 section 1); a killed state writer is replaced by the next run, or by the next
heartbeat when no run comes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, Optional

import pytest
from aiohttp.test_utils import TestClient, TestServer
from daemon_harness import DEADLINE, free_port, in_process, metric_value, until, write_config

from prestaged.metrics import Metrics
from prestaged.model import Attempt, FileRef
from prestaged.service.api import Handler, build_app
from prestaged.service.runs import RunInfo, Runs
from prestaged.state.store import Store
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import ThreadedStorageServer
from prestaged.warm import WarmSettings

TOKEN = "locked-t0ken"


def _config(tmp_path: Path, pki: TestPKI, proxy: Path, *, token: bool = True) -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    extra = 'campaign_check = "1h"\n' + (f'token_file = "{token_file}"' if token else "")
    return write_config(tmp_path, pki, proxy, free_port(), [], extra=extra,
                        catalog_dir=tmp_path / "defs")


async def _add_held_campaign(d: Any, tmp_path: Path) -> None:
    """Campaign ``c`` (one stage over a one-file list in tmp_path) added held to ``d``."""
    (tmp_path / "ds.txt").write_text("https://127.0.0.1:1/f\n")
    campaign = (f'name = "c"\n[[stage]]\nname = "one"\ninput = "{tmp_path / "ds.txt"}"\n'
                'submit = "true"\n')
    status, body = await d.http("POST", "/api/v1/campaigns", {"toml": campaign, "held": True})
    assert status == 201, body


async def test_a_locked_state_database_does_not_freeze_health_or_metrics(
    pki: TestPKI, proxy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holds the state DB's write lock: a campaign action and a dataset query
    wait for it, while /healthz and /metrics answer at once; both finish once it is gone."""
    async with in_process(_config(tmp_path, pki, proxy), token=TOKEN) as d:
        await _add_held_campaign(d, tmp_path)

        async def idle() -> bool:  # its pass ended held, and its gauge was counted
            doc = (await d.http("GET", "/api/v1/campaigns/c"))[1]
            return doc["daemon"]["status"] == "waiting" and metric_value(
                await d.metrics(), "prestaged_campaign_submissions", campaign="c",
                state="queued") == 0
        await until("the held campaign idle", idle)

        entered = threading.Event()
        transaction = Store.transaction

        def spy(store: Store) -> Any:
            entered.set()  # a transaction is about to wait for the lock
            return transaction(store)

        monkeypatch.setattr(Store, "transaction", spy)
        locker = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            action = asyncio.ensure_future(d.http("POST", "/api/v1/campaigns/c/hold", {}))
            query = asyncio.ensure_future(d.http("GET", "/api/v1/datasets"))
            assert await asyncio.to_thread(entered.wait, DEADLINE)
            for path in ("/healthz", "/metrics", "/readyz"):
                status, _ = await asyncio.wait_for(d.http("GET", path), timeout=2)
                assert status == 200
            assert not action.done() and not query.done()
            assert time.monotonic() - start < 10  # not the store's 30 s busy timeout
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert await asyncio.wait_for(action, DEADLINE) == (200, {"result": "c: held"})
        assert (await asyncio.wait_for(query, DEADLINE))[0] == 200


# --- what a caller may name and read (issue 12, section 1) ----------------------------------

async def test_the_api_reads_no_file_a_caller_names(
    pki: TestPKI, proxy: Path, tmp_path: Path,
) -> None:
    """The reproduction: POST /api/v1/warm naming a local file by path, through `..` or by a
    symlink out of catalog.local.dir starts no run, and no answer quotes the file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET first line\n")
    (tmp_path / "defs").mkdir()
    (tmp_path / "defs" / "leak.txt").symlink_to(secret)
    answers = []
    async with in_process(_config(tmp_path, pki, proxy, token=False)) as d:
        for definition in (str(secret), "../secret", "leak", "/proc/self/environ"):
            status, body = await d.http("POST", "/api/v1/warm", {"definition": definition})
            assert status in (400, 404), body
            answers.append(json.dumps(body))
        status, body = await d.http("GET", "/api/v1/runs/1")
        answers.append(json.dumps(body))
        assert status == 404  # no run was ever queued
    assert not [a for a in answers if "TOP-SECRET" in a]


async def test_runs_need_the_token_and_campaign_output_is_kept_back(
    pki: TestPKI, proxy: Path, tmp_path: Path,
) -> None:
    """With a token configured, a run is 401 without it; a campaign's submit output is
    shown only with it (the rest of the document stays readable)."""
    (tmp_path / "defs").mkdir()
    with ThreadedStorageServer(pki.server_ssl_context()) as storage:
        (tmp_path / "defs" / "one.txt").write_text(storage.url("/one/f") + "\n")
        await _output_kept_back(tmp_path, pki, proxy)


async def _output_kept_back(tmp_path: Path, pki: TestPKI, proxy: Path) -> None:
    campaign = (f'name = "c"\n[[stage]]\nname = "one"\ninput = "{tmp_path / "defs/one.txt"}"\n'
                'submit = "echo JobsubJobId of first job: 7.0@test"\n')
    async with in_process(_config(tmp_path, pki, proxy), token=TOKEN) as d:
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "one"})
        assert status == 202
        assert (await d.http("GET", body["href"], token="wrong"))[0] == 401
        assert (await d.http("GET", body["href"]))[0] == 200
        assert (await d.http("POST", "/api/v1/campaigns", {"toml": campaign}))[0] == 201

        async def submitted() -> bool:
            doc = (await d.http("GET", "/api/v1/campaigns/c"))[1]
            return [s["state"] for s in doc["submissions"]] in (["submitted"], ["completed"])
        await until("the submission launched", submitted)
        [sub] = (await d.http("GET", "/api/v1/campaigns/c"))[1]["submissions"]
        assert "7.0@test" in sub["output_tail"]
        [sub] = (await d.http("GET", "/api/v1/campaigns/c", token="wrong"))[1]["submissions"]
        assert sub["output_tail"] is None and sub["job_id"] == "7.0@test"


# --- eviction ---------------------------------------------------------------------------------

class _Catalog:
    """A local-looking catalog of ``n`` URLs."""

    name = "local"

    def __init__(self, definition: str, n: int) -> None:
        self.definition = definition
        self.n = n

    async def files(self) -> AsyncIterator[FileRef]:
        """``n`` files under ``definition``."""
        for i in range(self.n):
            yield FileRef(name=f"f{i}", url=f"https://example.invalid/{self.definition}/f{i}")

    async def estimate(self) -> Optional[int]:
        """Known: ``n``."""
        return self.n


class _GatedToucher:
    """Answers 206 at once, except for URLs of ``slow``, which wait for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def touch(self, url: str) -> Attempt:
        """206, after ``release`` for the slow definition."""
        if "/slow/" in url:
            await self.release.wait()
        return Attempt(status=206, data=4)


def _runs(store: Store, toucher: Any, metrics: Metrics, tasks: set[asyncio.Task[Any]],
          kept: int = 1000) -> Runs:
    """Real ``Runs`` with trivial collaborators; its tasks are collected in ``tasks``."""
    def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        return task

    async def after(info: RunInfo) -> None:
        return None

    return Runs(store, toucher, metrics, settings=lambda: WarmSettings(concurrency=4),
                fresh_for=lambda: 0.0, draining=lambda: False, stop=asyncio.Event(),
                spawn=spawn, after=after, changed=lambda: None, kept=kept)


class _RunPorts:
    """Just enough ``ApiPorts`` for ``GET /api/v1/runs/<id>`` over real ``Runs``."""

    token: Optional[str] = None

    def __init__(self, runs: Runs) -> None:
        self.runs = runs

    def run(self, run_id: int) -> Optional[RunInfo]:
        """The real bookkeeping."""
        return self.runs.get(run_id)

    def metrics_handler(self) -> Handler:
        """Unused here."""
        return Metrics().aiohttp_handler()


async def test_eviction_keeps_queued_and_running_runs(tmp_path: Path) -> None:
    """With room for one finished run, finishing runs never evict a running run (GET answers
    200), a second request for its definition joins it; only finished runs go, oldest first."""
    store = Store(tmp_path / "state.db", flush_interval=0.05).open()
    tasks: set[asyncio.Task[Any]] = set()
    toucher = _GatedToucher()
    runs = _runs(store, toucher, Metrics(), tasks, kept=1)
    client = TestClient(TestServer(build_app(_RunPorts(runs)), host="127.0.0.1"))
    await client.start_server()
    try:
        running, _ = runs.submit(_Catalog("slow", 2), origin="api")
        joined, merged = runs.submit(_Catalog("slow", 2), origin="api")  # joins the running one
        assert merged and joined is running
        quick = [runs.submit(_Catalog(f"q{i}", 3), origin="api")[0] for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*(q.finished.wait() for q in quick)), DEADLINE)

        async def state(info: RunInfo) -> tuple[int, Any]:
            resp = await client.get(f"/api/v1/runs/{info.id}")
            doc = json.loads(await resp.text())
            return resp.status, doc.get("state")

        assert await state(running) == (200, "running")
        # The three finish in any order: the last one to finish is the one kept.
        answers = [await state(q) for q in quick]
        assert sorted(answers, key=str) == [(200, "done"), (404, None), (404, None)]
        kept = quick[answers.index((200, "done"))]
        toucher.release.set()
        await asyncio.wait_for(running.finished.wait(), DEADLINE)
        assert [await state(r) for r in (running, kept)] == [(200, "done"), (404, None)]
    finally:
        toucher.release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await asyncio.to_thread(store.close)


class _Missing:
    """Answers 404 for every URL."""

    async def touch(self, url: str) -> Attempt:
        """404: the file is missing."""
        return Attempt(status=404)


async def test_a_finished_run_keeps_its_counts_but_not_its_failed_files_nor_a_lock(
        tmp_path: Path) -> None:
    """The daemon keeps its last 1,000 runs for the API, and each kept up to 10,000 failed
    files' outcomes that nothing read again (a watch with 1,000 missing files grew it by
    ~0.5 MB a round); and one lock per definition ever run. A finished run keeps its counts,
    and the locks of definitions no run holds are gone."""
    store = Store(tmp_path / "state.db", flush_interval=0.05).open()
    tasks: set[asyncio.Task[Any]] = set()
    runs = _runs(store, _Missing(), Metrics(), tasks)
    try:
        done = [runs.submit(_Catalog(f"gone{i}", 50), origin="api")[0] for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*(r.finished.wait() for r in done)), DEADLINE)
        for info in done:
            assert info.to_dict()["counts"] == {"missing": 50}
            assert info.tally.failed == 50 and info.tally.failures == []
        assert len(runs._locks) == 0
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(store.close)


class _Broken(_Catalog):
    """A catalog whose listing dies of a bug (not a PrestagedError)."""

    async def files(self) -> AsyncIterator[FileRef]:
        """Raises at once."""
        raise RuntimeError("a bug in a catalog")
        yield  # pragma: no cover - makes this an async generator


async def test_a_run_that_dies_of_a_bug_is_an_error_and_the_daemon_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 12 section 3: a run whose task raises is logged, shown as error (counted as an
    aborted run), and the next run of the same definition runs."""
    store = Store(tmp_path / "state.db", flush_interval=0.05).open()
    tasks: set[asyncio.Task[Any]] = set()
    metrics = Metrics()
    runs = _runs(store, _GatedToucher(), metrics, tasks)
    try:
        broken, _ = runs.submit(_Broken("d", 1), origin="api")
        await asyncio.wait_for(broken.finished.wait(), DEADLINE)
        assert (broken.state, broken.error) == ("error", "internal error: "
                                                "RuntimeError('a bug in a catalog')")
        assert "warm of d: internal error" in caplog.text
        fine, _ = runs.submit(_Catalog("d", 2), origin="api")
        await asyncio.wait_for(fine.finished.wait(), DEADLINE)
        assert (fine.state, fine.exit_code) == ("done", 0)
        assert metric_value(metrics.exposition().decode(), "prestaged_runs_total",
                            result="aborted") == 1
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(store.close)



class _LeakyBug(_Catalog):
    """A catalog whose listing dies of a bug whose words quote credentials."""

    async def files(self) -> AsyncIterator[FileRef]:
        """Raises at once, quoting a URL's password, a query token and a header."""
        raise RuntimeError("GET https://u:urlpw-91x@h/f?authz=QUERYTOKEN-7351 failed with "
                           "Authorization: Bearer apitoken9z8y7x6w5v4u")
        yield  # pragma: no cover - makes this an async generator


def _assert_bug_scrubbed(answer: str) -> None:
    """``answer`` quotes the leaky bug's error with its three secrets hidden (the secrets are
    counted, never printed)."""
    assert "internal error: RuntimeError('GET https://***@h/f?authz=***" in answer
    leaked = [s for s in ("urlpw-91x", "QUERYTOKEN-7351", "apitoken9z8y7x6w5v4u") if s in answer]
    assert not leaked, f"{len(leaked)} secrets in the answer"


async def test_a_bug_quoting_credentials_is_answered_without_them(tmp_path: Path) -> None:
    """A run's internal error (its repr, answered by /api/v1/runs) once quoted a URL's
    password, a query token and a bearer header as the bug's words had them."""
    store = Store(tmp_path / "state.db", flush_interval=0.05).open()
    tasks: set[asyncio.Task[Any]] = set()
    runs = _runs(store, _GatedToucher(), Metrics(), tasks)
    try:
        broken, _ = runs.submit(_LeakyBug("d", 1), origin="api")
        await asyncio.wait_for(broken.finished.wait(), DEADLINE)
        _assert_bug_scrubbed(json.dumps(broken.to_dict()))
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(store.close)


async def test_a_campaign_bug_quoting_credentials_is_shown_without_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A campaign pass's internal error (its repr, answered by /api/v1/campaigns) once quoted
    a URL's password, a query token and a bearer header as the bug's words had them."""
    from types import SimpleNamespace

    from prestaged.campaign.spec import CampaignConfig
    from prestaged.config import Config
    from prestaged.service import campaigns as daemon_campaigns

    async def leaky_bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("GET https://u:urlpw-91x@h/f?authz=QUERYTOKEN-7351 failed with "
                           "Authorization: Bearer apitoken9z8y7x6w5v4u")

    monkeypatch.setattr(daemon_campaigns, "run_campaign", leaky_bug)
    context: Any = SimpleNamespace(cfg=Config(), gate=lambda *a, **k: None,
                                   rewarm=lambda *a, **k: None, release=lambda *a, **k: None)
    settings: Any = None
    store = Store(tmp_path / "state.db", flush_interval=0.05).open()
    try:
        service = daemon_campaigns.DaemonCampaigns(
            store, _GatedToucher(), Metrics(), context=lambda: context,
            settings=lambda: settings, open_catalog=lambda kind, name: _Catalog(name, 1),
            spawn=asyncio.ensure_future, draining=lambda: False)
        entry = daemon_campaigns.CampaignEntry(CampaignConfig(name="c"))
        await service._pass(entry)
        _assert_bug_scrubbed(json.dumps(entry.to_dict()))
    finally:
        await asyncio.to_thread(store.close)

# --- the state writer killed ------------------------------------------------------------------

async def _kill_the_writer() -> None:
    """SIGKILL this process's state writer (the only one) and wait until it is a zombie (the
    store reaps it: not waited for here, or ``Popen.poll`` would report exit 0)."""
    import psutil

    found = []
    for p in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # gone, or a zombie of a test
            if any("prestaged.state.writer" in arg for arg in p.cmdline()):
                found.append(p)
    [writer] = found
    writer.kill()

    async def dead() -> bool:
        return bool(writer.status() == psutil.STATUS_ZOMBIE)
    await until("the writer killed", dead)

async def test_a_killed_state_writer_is_replaced_by_the_next_run(
    pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's state writer process killed (the OOM killer, an operator's kill -9) does
    not end its recording: the next run starts a new writer, ends ok, and its files are fresh
    in the state. Before, every later run failed ("the writer process stopped answering")
    until the daemon was restarted."""
    (tmp_path / "defs").mkdir()
    with ThreadedStorageServer(pki.server_ssl_context()) as storage:
        for name in ("a", "b"):
            (tmp_path / "defs" / f"{name}.txt").write_text(
                "".join(storage.url(f"/{name}/f{i}") + "\n" for i in range(5)))
        async with in_process(_config(tmp_path, pki, proxy, token=False)) as d:

            async def warm(name: str) -> dict[str, Any]:
                status, body = await d.http("POST", "/api/v1/warm", {"definition": name})
                assert status == 202, body
                run: dict[str, Any] = {}

                async def ended() -> bool:
                    run.update((await d.http("GET", body["href"]))[1])
                    return run["state"] in ("done", "error")
                await until(f"the run of {name}", ended)
                return run

            assert (await warm("a"))["exit_code"] == 0
            await _kill_the_writer()
            run = await warm("b")
            assert (run["state"], run["exit_code"], run["error"]) == ("done", 0, None), run
            status, doc = await d.http("GET", "/api/v1/datasets/b")
            assert status == 200 and doc["fresh"] == 5, doc
    assert [r.getMessage() for r in caplog.records if "new writer process" in r.getMessage()
            ] == [f"state {tmp_path / 'state.db'}: the writer process stopped answering (it was "
                  "killed by signal 9); a new writer process replaces it (outcomes it had not "
                  "written are lost: those files will be touched again)"]


async def test_a_stopped_state_writer_shows_and_is_replaced_at_the_next_heartbeat(
    pki: TestPKI, proxy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no run coming (a daemon whose watches are a day apart), a writer that gave up is
    not left stopped until the next run: ``/readyz`` and ``prestaged_state_writer_up`` say it
    stopped, and the next heartbeat that the database answers starts a new one, counted in
    ``prestaged_state_writer_replacements_total``. Revival is held back by the test until the
    stopped state was seen, so that both halves are asserted, not raced."""
    allowed = threading.Event()
    revive = Store.revive_writer

    def gated(store: Store) -> None:
        allowed.wait(DEADLINE)
        revive(store)

    monkeypatch.setattr(Store, "revive_writer", gated)
    async with in_process(_config(tmp_path, pki, proxy, token=False)) as d:
        text = await d.metrics()
        assert metric_value(text, "prestaged_state_writer_up") == 1
        assert metric_value(text, "prestaged_state_writer_replacements_total") == 0
        await _kill_the_writer()
        status, body = await d.http("GET", "/readyz")
        assert (status, body["problems"]) == (503, [
            "state writer stopped: a new one starts once the database answers"]), body
        assert metric_value(await d.metrics(), "prestaged_state_writer_up") == 0
        allowed.set()

        async def replaced() -> bool:
            text = await d.metrics()
            return (metric_value(text, "prestaged_state_writer_replacements_total") == 1
                    and metric_value(text, "prestaged_state_writer_up") == 1)
        await until("the writer replaced by a heartbeat", replaced)
        status, body = await d.http("GET", "/readyz")
        assert status == 200, body
        assert metric_value(await d.metrics(), "prestaged_runs_total", result="ok") in (0, None)


async def test_warms_and_campaign_changes_are_refused_from_the_stop_signal_on(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """``draining`` was set only when the serve loop woke up to drain: a warm asked between
    the signal and then got 202 and ran, and campaign actions were taken all through the
    drain (a release then launched after the restart). Both are 503 from the signal on."""
    (tmp_path / "defs").mkdir()
    (tmp_path / "defs" / "a.txt").write_text("https://127.0.0.1:1/f\n")
    async with in_process(_config(tmp_path, pki, proxy), token=TOKEN) as d:
        await _add_held_campaign(d, tmp_path)
        # A task in flight, as a run would be: the drain (and the API) lasts until it ends,
        # so the requests below meet a stopping daemon, not one already gone.
        done = asyncio.Event()
        d.daemon.spawn(done.wait())
        d.daemon.request_stop()
        assert d.daemon.draining  # at once, not when the loop comes round to it
        try:
            for path, doc in (("/api/v1/warm", {"definition": "a"}),
                              ("/api/v1/campaigns/c/release", {})):
                status, body = await d.http("POST", path, doc)
                assert (status, body["error"]) == (503, "the daemon is stopping"), (path, body)
        finally:
            done.set()


async def test_a_reload_takes_up_a_rotated_token_and_keeps_it_when_the_file_is_unusable(
        pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The token file is read again on reload (SIGHUP): a rotated token is the one asked for
    at once, the old one is refused; a reload finding the file empty keeps the token in use,
    saying so at ERROR. A daemon serving plain HTTP has no certificate-expiry series."""
    rotated = "rotated-t0ken"
    async with in_process(_config(tmp_path, pki, proxy), token=TOKEN) as d:
        assert (await d.http("GET", "/api/v1/runs/1"))[0] == 404  # past the token check
        (tmp_path / "token").write_text(rotated)
        d.daemon.request_reload()

        async def taken_up() -> bool:
            return (await d.http("GET", "/api/v1/runs/1", token=rotated))[0] == 404
        await until("the rotated token accepted", taken_up)
        assert (await d.http("GET", "/api/v1/runs/1"))[0] == 401
        (tmp_path / "token").write_text("")
        d.daemon.request_reload()

        async def refused() -> bool:
            return "keeping the API's bearer token in use" in caplog.text
        await until("the reload refused the empty token file", refused)
        assert (await d.http("GET", "/api/v1/runs/1", token=rotated))[0] == 404
        assert metric_value(await d.metrics(), "prestaged_api_certificate_expiry_timestamp_"
                            "seconds", listen=d.daemon.cfg.daemon.listen) is None
        assert "prestaged_api_certificate_expiry" not in \
            "".join(line for line in (await d.metrics()).splitlines() if line[:1] != "#")
    assert f"reload: daemon.token_file {tmp_path / 'token'}: empty" in caplog.text
    assert rotated not in caplog.text and TOKEN not in caplog.text


def test_open_dataset_rows_leave_the_last_runs_error_to_the_token() -> None:
    """What the daemon answers on the open dataset routes without the token: the last run's
    error (token file, token subject, proxy DN...) is replaced; everything else is kept."""
    from prestaged.service.daemon import WITH_THE_TOKEN, _without_reason

    row = {"definition": "d", "fresh": 3,
           "last_run": {"id": 7, "reason": "stopped: token /run/bt_u1 subject alice refused"}}
    assert _without_reason(row) == {"definition": "d", "fresh": 3,
                                    "last_run": {"id": 7, "reason": WITH_THE_TOKEN}}
    assert row["last_run"]["reason"].startswith("stopped")  # the shared (coalesced) row stays
    for kept in ({"definition": "d", "last_run": None},
                 {"definition": "d", "last_run": {"id": 8, "reason": None}}):
        assert _without_reason(kept) == kept
