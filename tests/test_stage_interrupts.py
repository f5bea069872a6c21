"""A run stopped while a stage POST is on its way (the dCache emulator holds the answer back:
the request is made at once, as dCache's bulk service makes it before the frontend answers).

The stop used to cancel the POST: the request existed on the server, its id was never heard,
so the next run asked for the same files again (a second pin) and ``release`` could not free
the first. Now the stopped run waits ``locality.STAGE_ANSWER_GRACE`` for the answer and records
the request as one answered before the stop; a second Ctrl-C still stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest
from cli_runner import CliResult, run_cli
from daemon_harness import DEADLINE
from test_tape_warm import QUICK

from prestaged import locality
from prestaged.testing.dcache import DCacheConfig, Locality, ThreadedDCache
from prestaged.testing.pki import TestPKI

WAITING = "stopping: waiting up to"
"""How ``TapeRouter.abort`` says it waits for the answers of stage POSTs already sent."""


@pytest.fixture
def site(pki: TestPKI) -> Iterator[ThreadedDCache]:
    """A dCache emulator whose one drive takes 2 s to mount: the first run's request is still
    open when the rerun looks (it follows it, not a file found on disk)."""
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(drives=1, mount_seconds=2.0)) as srv:
        yield srv


def _tape_files(site: ThreadedDCache, tmp_path: Path, n: int = 3) -> tuple[Path, list[str]]:
    """A local definition of ``n`` tape-only files (one stage request: batches of 5)."""
    paths = [f"/pnfs/i/f{i}" for i in range(n)]
    for p in paths:
        site.add_file(p, 10, Locality.TAPE)
    definition = tmp_path / "ds.txt"
    definition.write_text("".join(site.door_url(p) + "\n" for p in paths))
    return definition, paths


def _cli(pki: TestPKI, proxy: Path, tmp_path: Path, *args: str) -> CliResult:
    """``prestaged ARGS...`` in-process, with the test proxy and the state tmp_path/state.db."""
    config = tmp_path / "cli.toml"  # the daemon's test writes prestaged.toml
    config.write_text(QUICK)
    res = run_cli(*args, "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "--state",
                  str(tmp_path / "state.db"), "--config", str(config))
    assert "Traceback" not in res.stderr, res.stderr
    return res


def _recorded(tmp_path: Path) -> dict[str, Optional[str]]:
    """Each file's stage request, as the SQLite state recorded it (by URL)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as conn:
        return dict(conn.execute("SELECT url, stage_request FROM files"))


def _requests(site: ThreadedDCache) -> dict[str, list[str]]:
    """The stage requests the emulated frontend holds: id -> its paths."""
    return site._call(lambda: {rid: sorted(r.files)
                               for rid, r in site.server.frontend.requests.items()})


@contextlib.contextmanager
def _waiting_heard() -> Iterator[threading.Event]:
    """An event set once a stopped run waits for its stage answers: the stop has reached the
    tape path, its stage POSTs are left on their way. Set by the run's loop at its next turn
    after the ``WAITING`` line, when the wait has begun (set at once, a second Ctrl-C raised
    in the main thread could land in the logging call, before the wait)."""
    seen = threading.Event()

    class Hear(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(WAITING):
                asyncio.get_running_loop().call_soon(seen.set)

    logger = logging.getLogger("prestaged.locality")
    handler, level = Hear(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # whatever the CLI (or pytest) set on the root
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling the emulator from a thread, with a deadline


class _Stopper(threading.Thread):
    """Once the emulator holds a stage answer back: SIGINT to this process (a Ctrl-C to the
    in-process CLI; ``signal`` None: none, the caller stops the run). Then, once the run says
    it waits for the answer (or it ended: without the wait, nothing would say so), ``then``
    with whether it said so. ``done`` is set by the caller once the run returned."""

    def __init__(self, site: ThreadedDCache, seen: threading.Event,
                 then: Callable[[bool], None], signum: Optional[int] = signal.SIGINT) -> None:
        super().__init__(name="stopper", daemon=True)
        self.site, self.seen, self.then, self.signum = site, seen, then, signum
        self.done = threading.Event()
        self.stopped_at: Optional[float] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            _until("a stage answer held back",
                   lambda: self.site.stage_answers_held() >= 1 or self.done.is_set())
            if self.done.is_set():
                return
            self.stopped_at = time.monotonic()
            if self.signum is not None:
                os.kill(os.getpid(), self.signum)
            _until("the run to wait for its stage answers, or to end",
                   lambda: self.seen.wait(0.02) or self.done.is_set())
            self.then(self.seen.is_set() and not self.done.is_set())
        except BaseException as e:  # raised again in the test
            self.error = e

    def finish(self) -> None:
        """The run returned: let the thread end, and raise what it raised."""
        self.done.set()
        self.join(DEADLINE)
        if self.error is not None:
            raise self.error


def _ctrl_c_while_held(pki: TestPKI, proxy: Path, tmp_path: Path, site: ThreadedDCache,
                       definition: Path, then: Callable[[bool], None]
                       ) -> tuple[CliResult, float]:
    """``warm DEFINITION`` in-process, Ctrl-C'd while its stage answer is held back; ``then``
    as ``_Stopper``'s. The result and the seconds from the Ctrl-C to the return."""
    site.hold_stage_answers()
    with _waiting_heard() as seen:
        stopper = _Stopper(site, seen, then)
        stopper.start()
        try:
            res = _cli(pki, proxy, tmp_path, "warm", str(definition))
            ended = time.monotonic()
        finally:
            stopper.finish()
    assert stopper.stopped_at is not None, "the run made no stage request"
    return res, ended - stopper.stopped_at


def test_a_ctrl_c_while_a_stage_answer_is_on_its_way_records_the_request(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """Ctrl-C while the frontend has made the request and not answered yet: the stopped run
    waits for the answer and records the request on its files (exit 130). The rerun follows
    it, making no second stage request for them, and ``release`` frees the pins it holds."""
    definition, paths = _tape_files(site, tmp_path)
    res, _ = _ctrl_c_while_held(pki, proxy, tmp_path, site, definition,
                                lambda waiting: site.release_stage_answers())
    assert res.returncode == 130, res.stderr
    assert "may have been made" not in res.stderr
    [request] = _requests(site)
    assert _recorded(tmp_path) == {site.door_url(p): request for p in paths}

    rerun = _cli(pki, proxy, tmp_path, "warm", str(definition), "--json")
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads(rerun.stdout)
    assert doc["counts"]["warm"] == 3 and doc["counts"]["staged"] == 3
    assert site.stats()["requests"]["frontend:stage"] == 1  # no second request
    assert list(_requests(site)) == [request]
    assert all(set(site.replica(p).pins) == {request} for p in paths)

    freed = _cli(pki, proxy, tmp_path, "release", str(definition), "--json")
    assert freed.returncode == 0, freed.stderr
    assert (json.loads(freed.stdout)["files"], json.loads(freed.stdout)["requests"]) == (3, 1)
    assert all(not site.replica(p).pins for p in paths)


def test_a_stage_answer_that_never_comes_ends_the_stop_after_the_grace_with_a_warning(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer does not come: the stop waits ``STAGE_ANSWER_GRACE`` for it, not the client's
    two-minute request timeout, then ends (exit 130) with one WARNING saying a request may have
    been made for the files and the next run may ask for them again."""
    monkeypatch.setattr(locality, "STAGE_ANSWER_GRACE", 1.0)
    definition, _ = _tape_files(site, tmp_path)
    res, took = _ctrl_c_while_held(pki, proxy, tmp_path, site, definition, lambda waiting: None)
    assert res.returncode == 130, res.stderr
    assert 1.0 <= took < 1.0 + 10, took
    warnings = [line for line in res.stderr.splitlines() if "may have been made" in line]
    assert warnings == [f"prestaged: WARNING: a stage request to {site.tape_api_url} may have "
                        "been made for 3 files, but no answer came before the run stopped; the "
                        "next run may ask for them again (a second pin, which ends after its "
                        "lifetime)"], res.stderr
    assert set(_recorded(tmp_path).values()) == {None}


def test_a_second_ctrl_c_while_waiting_for_a_stage_answer_stops_at_once(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for a stage answer after a Ctrl-C, a second Ctrl-C stops at once (exit 130),
    however long the grace, saying the request may have been made."""
    monkeypatch.setattr(locality, "STAGE_ANSWER_GRACE", 120.0)
    definition, _ = _tape_files(site, tmp_path)
    again: list[float] = []

    def interrupt_again(waiting: bool) -> None:
        if waiting:
            again.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    res, _ = _ctrl_c_while_held(pki, proxy, tmp_path, site, definition, interrupt_again)
    returned = time.monotonic()
    assert again, "the run did not wait for its stage answer"
    assert res.returncode == 130, res.stderr
    assert returned - again[0] < 10
    assert "prestaged: interrupted" in res.stderr
    assert "may have been made for 3 files" in res.stderr


def test_a_daemon_stopped_while_a_stage_answer_is_on_its_way_records_the_request(
    site: ThreadedDCache, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """The daemon drained (``drain_timeout`` 1 s) while a watch's stage answer was held back
    longer: its stopped run waits for the answer and records the request before the store
    closes. A warm on the CLI then follows it (no second request) and ``release`` frees it."""
    from daemon_harness import free_port, in_process, until, write_config

    definition, paths = _tape_files(site, tmp_path)
    config = write_config(tmp_path, pki, proxy, free_port(), [(definition, "1h")],
                          extra='[storage]\npoll_min = "20ms"\npoll_max = "100ms"')

    async def serve_until_held() -> None:
        async with in_process(config):
            async def held() -> bool:
                return site.stage_answers_held() >= 1
            await until("a stage answer held back", held)
        # (leaving the block drains the daemon: 1 s, then its run is stopped)

    site.hold_stage_answers()
    with _waiting_heard() as seen:
        stopper = _Stopper(site, seen, lambda waiting: site.release_stage_answers(),
                           signum=None)
        stopper.start()
        try:
            asyncio.run(serve_until_held())  # its own loop: the CLI below runs its own too
        finally:
            stopper.finish()
    [request] = _requests(site)
    assert _recorded(tmp_path) == {site.door_url(p): request for p in paths}
    assert seen.is_set()  # recorded by the stopped run, not by one that ended before the stop

    rerun = _cli(pki, proxy, tmp_path, "warm", str(definition), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["counts"]["warm"] == 3
    assert site.stats()["requests"]["frontend:stage"] == 1  # no second request
    freed = _cli(pki, proxy, tmp_path, "release", str(definition), "--json")
    assert freed.returncode == 0, freed.stderr
    assert all(not site.replica(p).pins for p in paths)
