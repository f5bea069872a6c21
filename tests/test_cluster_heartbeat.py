"""The cluster heartbeat in an outage: a heartbeat that answers only after its wait gave up
(then fails) is replaced without its error going unseen: that was "Task exception was never
retrieved" with a traceback in the daemon's log."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

from prestaged.config import ClusterConfig, Duration
from prestaged.errors import StateError
from prestaged.metrics import Metrics
from prestaged.service.cluster import ClusterMember


async def test_a_late_failing_heartbeat_leaves_no_unretrieved_error() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    release = threading.Event()
    calls = 0

    def beat_sync() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            release.wait(30)  # the database hangs past the wait, then fails
            raise StateError("state postgresql://db/x: the server closed the connection")
        raise StateError("state postgresql://db/x: cannot connect")

    config = ClusterConfig(lease=Duration(3.0), heartbeat=Duration(0.05))
    member = ClusterMember(None, Metrics(), config=lambda: config,  # type: ignore[arg-type]
                           listen="127.0.0.1:0", version="test")
    member._beat_sync = beat_sync  # type: ignore[method-assign]
    member.connected.set()
    await member._beat_once()  # gives up waiting: not connected
    assert not member.connected.is_set()
    first = member._inflight
    assert first is not None and not first.done()
    release.set()
    await asyncio.wait({first}, timeout=30)
    await member._beat_once()  # a new heartbeat replaces the failed one, which nobody awaited
    assert member._inflight is not first and calls == 2
    del first
    gc.collect()
    assert reported == [], reported
