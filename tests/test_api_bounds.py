"""Bounds on the daemon's API (issue 12, 8): a bounded warm queue (429 with Retry-After), a
request for a definition already running joins it, request bodies are capped (413) and dataset
summaries are computed once for many concurrent askers, so /healthz stays quick."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Optional

from aiohttp.test_utils import TestClient, TestServer
from daemon_harness import DEADLINE, in_process
from test_api_daemon import _Catalog, _config, _GatedToucher, _runs

from prestaged.metrics import Metrics
from prestaged.service.api import MAX_BODY, Handler, build_app
from prestaged.service.coalesce import Coalesced
from prestaged.service.runs import RunInfo, Runs
from prestaged.state.store import Store
from prestaged.testing.pki import TestPKI


class _WarmPorts:
    """``ApiPorts`` for warm requests over real ``Runs`` (definitions are catalog stand-ins)."""

    token: Optional[str] = None

    def __init__(self, runs: Runs) -> None:
        self.runs = runs

    def submit(self, definition: str, catalog: Optional[str]) -> tuple[RunInfo, bool]:
        """The real queue, with a gated two-file catalog per definition."""
        return self.runs.submit(_Catalog(definition, 2), origin="api")

    def metrics_handler(self) -> Handler:
        """Unused here."""
        return Metrics().aiohttp_handler()


async def test_the_warm_queue_is_bounded_and_a_repeat_joins_the_running_run(
    tmp_path: Path,
) -> None:
    """With daemon.max_runs = 2: a third definition is refused with 429 and Retry-After (30,000
    POSTs were all accepted before); asking again for a running definition answers its id with
    merged = true, and a watch is never refused."""
    store = Store(tmp_path / "state.db", flush_interval=0.05).open()
    tasks: set[asyncio.Task[Any]] = set()
    toucher = _GatedToucher()
    runs = _runs(store, toucher, Metrics(), tasks)
    runs._max_runs = lambda: 2
    client = TestClient(TestServer(build_app(_WarmPorts(runs)), host="127.0.0.1"))
    await client.start_server()
    try:
        answers = []
        for name in ("slow", "slow2/slow", "slow3/slow", "slow"):
            resp = await client.post("/api/v1/warm", json={"definition": name})
            answers.append((resp.status, await resp.json(), resp.headers.get("Retry-After")))
        (s1, first, _), (s2, _second, _), (s3, third, retry), (s4, again, _) = answers
        assert (s1, s2, s4) == (202, 202, 202) and not first["merged"]
        assert s3 == 429 and "daemon.max_runs" in third["error"] and retry == "30"
        assert again["id"] == first["id"] and again["merged"] is True
        watch, merged = runs.submit(_Catalog("slow4/slow", 2), origin="watch")
        assert not merged and watch.state in ("queued", "running")
    finally:
        toucher.release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await asyncio.to_thread(store.close)


async def test_request_bodies_are_capped(tmp_path: Path) -> None:
    """A body over MAX_BODY is refused with 413 before it is read, as ``{"error": ...}`` like
    every refusal (unknown paths and methods too); the daemon goes on."""
    store = Store(tmp_path / "state.db").open()
    tasks: set[asyncio.Task[Any]] = set()
    runs = _runs(store, _GatedToucher(), Metrics(), tasks)
    client = TestClient(TestServer(build_app(_WarmPorts(runs)), host="127.0.0.1"))
    await client.start_server()
    try:
        big = b'{"definition": "' + b"a" * (MAX_BODY + 1) + b'"}'
        resp = await client.post("/api/v1/warm", data=big,
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 413
        error = (await resp.json())["error"]  # the API's form, naming the limit
        assert error.startswith(f"Maximum request body size {MAX_BODY} exceeded"), error
        for method, path, status in [("GET", "/api/v1/nope", 404),
                                     ("DELETE", "/api/v1/warm", 405)]:
            resp = await client.request(method, path)
            assert (resp.status, await resp.json()) == (status, {"error": resp.reason})
        assert resp.headers["Allow"] == "POST"
        resp = await client.post("/api/v1/warm", json={"definition": "q"})
        assert resp.status == 202
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await asyncio.to_thread(store.close)


async def test_concurrent_askers_share_one_computation_and_it_is_kept_briefly() -> None:
    """Coalesced: 200 concurrent asks of one key run one computation; within ttl the answer is
    reused, after it a new one is made; a failure is shared and not kept."""
    now = [0.0]
    cache: Coalesced[str, int] = Coalesced(ttl=2.0, clock=lambda: now[0])
    calls = 0
    gate = asyncio.Event()

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    asks = [asyncio.ensure_future(cache.get("k", compute)) for _ in range(200)]
    await asyncio.sleep(0)
    gate.set()
    assert set(await asyncio.gather(*asks)) == {1} and calls == 1
    now[0] = 1.9
    assert await cache.get("k", compute) == 1
    now[0] = 2.1
    assert await cache.get("k", compute) == 2

    async def broken() -> int:
        raise RuntimeError("db gone")

    for _ in range(2):
        try:
            await cache.get("x", broken)
        except RuntimeError:
            pass
        else:  # pragma: no cover
            raise AssertionError("the error is not kept back")


async def test_two_hundred_dataset_readers_cost_one_store_read(
    pki: TestPKI, proxy: Path, tmp_path: Path, monkeypatch: Any,
) -> None:
    """200 concurrent GET /api/v1/datasets read the store about once (each read was ~70 ms of
    CPU, p50 7 s) and /healthz answers meanwhile."""
    reads = 0
    real = Store.status

    def counted(self: Store, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        time.sleep(0.2)  # a large state database
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "status", counted)
    async with in_process(_config(tmp_path, pki, proxy, token=False)) as d:
        readers = [asyncio.ensure_future(d.http("GET", "/api/v1/datasets")) for _ in range(200)]
        start = time.monotonic()
        status, _ = await d.http("GET", "/healthz")
        health = time.monotonic() - start
        answers = await asyncio.wait_for(asyncio.gather(*readers), DEADLINE)
    assert status == 200 and health < 2.0
    assert {a[0] for a in answers} == {200}
    assert reads <= 3, f"{reads} store reads for 200 concurrent askers"


