"""Faults around the state store (issue 12: 7, 9, 10): a process-group SIGTERM, a SIGKILL, a
full disk, a damaged file, private file modes, and the gate on an empty input. Each test
breaks the run the way an operator or the machine would and checks what is left behind.

Faults that are not about a file run on both backends (``backend``); the full disk, the
damaged page and the file modes are SQLite's alone. PostgreSQL has its own: the server cutting
the store's sessions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import Backend
from test_store import _definition

from prestaged.errors import StateError
from prestaged.state.store import Store, describe_sqlite_error
from prestaged.testing.pki import TestPKI
from prestaged.testing.postgres import PostgresCluster
from prestaged.testing.storage import Delay, ThreadedStorageServer

TIMEOUT = 120


def _selects(state: Path | list[str]) -> list[str]:
    """The arguments selecting ``state``: a file, or ``Backend.cli``'s arguments."""
    return ["--state", str(state)] if isinstance(state, Path) else state


def _warm(definition: Path, proxy: Path, pki: TestPKI, state: Path | list[str],
          *extra: str) -> list[str]:
    return [sys.executable, "-m", "prestaged", "warm", str(definition), "--proxy", str(proxy),
            "--ca-dir", str(pki.ca_dir), *_selects(state), "--json", *extra]


def _history(state: Path | list[str]) -> list[dict[str, object]]:
    res = run_cli("history", *_selects(state), "--json")
    assert res.returncode == 0, res.stderr
    runs: list[dict[str, object]] = json.loads(res.stdout)["runs"]
    return runs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_to_the_process_group_stops_like_sigterm_to_the_pid(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend,
    sig: signal.Signals,
) -> None:
    """``kill -- -PGID`` (systemd's control-group stop, ``timeout``) reaches the state writer
    too: it must survive it, so the warm stops cleanly with exit 130, a partial JSON summary,
    every outcome recorded and the run recorded as interrupted (it died with exit 2 before).
    A SIGHUP (a closed terminal or ssh session) is the same stop: it killed the run at once,
    its last batch of outcomes lost and the run left "crashed"."""
    definition = _definition(tmp_path, storage, 400)
    for i in range(100, 400):
        storage.server.inject(f"/ds/f{i:05d}", [Delay(60)])
    state = backend.cli()
    proc = subprocess.Popen(_warm(definition, proxy, pki, state, "--concurrency", "4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        storage.wait_until(lambda s: s.active_requests == 4 and s.requests_total >= 104,
                           timeout=TIMEOUT)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "writer" not in err and "Traceback" not in err
    doc = json.loads(out)
    assert doc["counts"]["warm"] == 100
    # The files listed but not ended are said: "files" alone read as a 100-file run.
    assert doc["not_done"] >= 4 and doc["files"] + doc["not_done"] <= 400
    [run] = _history(state)
    assert run["reason"] == "interrupted" and run["exit_code"] == 130
    status = json.loads(run_cli("status", *state, "--json").stdout)
    assert status["definitions"][0]["fresh"] == 100


def test_under_nohup_a_sighup_does_not_stop_the_run(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """``nohup prestaged warm ...`` is how a long warm outlives a logout: SIGHUP is ignored on
    entry, and prestaged leaves it so (handling it would stop the run when the ssh session
    closes). The run ends on its own, every file warm."""
    definition = _definition(tmp_path, storage, 20)
    for i in range(10, 20):
        storage.server.inject(f"/ds/f{i:05d}", [Delay(2)])
    state = tmp_path / "state.db"
    proc = subprocess.Popen(["nohup", *_warm(definition, proxy, pki, state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        storage.wait_until(lambda s: s.active_requests >= 1 and s.requests_total >= 11,
                           timeout=TIMEOUT)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["counts"]["warm"] == 20 and "interrupted" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_outside_a_run_ends_the_command_at_once_and_the_state_whole(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """``forget`` runs no event loop. SIGTERM or SIGHUP while it waits for the state file's
    write lock ends it at once by the signal's default action (the lock is still held when it
    has ended: a Python handler would run only once SQLite's busy wait of up to 30 s gave up),
    and its transaction leaves the state as it was."""
    definition = _definition(tmp_path, storage, 3)
    state = tmp_path / "state.db"
    res = run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  "--state", str(state), "-q")
    assert res.returncode == 0, res.stderr
    locker = sqlite3.connect(str(state), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # forget waits for this lock (busy timeout), loopless
    try:
        proc = subprocess.Popen([sys.executable, "-m", "prestaged", "forget", str(definition),
                                 "--state", str(state)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not _holds_open(proc.pid, state):  # it has opened the state: it waits
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert proc.returncode == -sig, err
    [run] = _history(state)
    assert run["exit_code"] == 0  # nothing forgotten


def _holds_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (one of its descriptors names it)."""
    with contextlib.suppress(FileNotFoundError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if fd.readlink() == path:
                    return True
    return False


def test_a_killed_run_shows_as_crashed_not_running(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """A run whose process got SIGKILL has no end recorded; status and history say it crashed
    (its pid is gone) instead of showing it running forever."""
    definition = _definition(tmp_path, storage, 50)
    # The first file is answered at once: with every file delayed, two requests were in flight
    # only after 60 s (the run's first request goes out alone), a minute of every test run.
    for i in range(1, 50):
        storage.server.inject(f"/ds/f{i:05d}", [Delay(60)])
    state = backend.cli()
    proc = subprocess.Popen(_warm(definition, proxy, pki, state, "--concurrency", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        storage.wait_until(lambda s: s.active_requests == 2, timeout=TIMEOUT)
        assert _history(state)[0]["reason"] is None  # still running: not crashed
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    [run] = _history(state)
    assert str(run["reason"]).startswith(f"crashed: process {proc.pid} ended")
    res = run_cli("status", *state)
    assert "crashed" in res.stdout and "running" not in res.stdout
    assert "(exit -)" in res.stdout and "(exit None)" not in res.stdout
    # The counts are of the files listed so far, which status now says (a 60,000-file
    # definition interrupted after 20,000 showed as 98 % fresh).
    assert "files: those listed so far; the last run did not list the whole" in res.stdout


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 320 KiB tmpfs mounted under tmp_path (root only), unmounted after the test."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_that_says_so_and_the_store_stays_intact(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, tiny_disk: Path
) -> None:
    """The state disk fills up during a run: one line saying the disk is full, exit 2, no
    traceback, and the database is still a valid one (it said "writer process died ... Broken
    pipe" before)."""
    long_names = tmp_path / "long.txt"
    long_names.write_text("".join(storage.url(f"/full/{'x' * 400}{i:05d}") + "\n"
                                  for i in range(3000)))
    state = tiny_disk / "state.db"
    res = subprocess.run(_warm(long_names, proxy, pki, state), capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    conn = sqlite3.connect(state)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_a_run_stopped_by_a_full_disk_has_its_end_recorded_with_the_reason(
    tmp_path: Path, tiny_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose outcomes could not be written kept no end: a daemon showed it running,
    then crashed, and the full disk was never said. Its end is now written with the reason,
    at once if the database takes it (here: the failed batch's room), else before the next
    run starts."""
    with Store(tiny_disk / "state.db", batch=100_000) as store:
        run_id = store.start_run("local", "ds")
        for i in range(3000):
            store.record(f"https://h/full/{'x' * 400}{i:05d}", f"f{i}", "warm", 206, 4, 1, "")
        with pytest.raises(StateError, match="the disk is full"):
            store.finish_run(run_id, {"warm": 3000}, 0, "done")
        [first] = store.runs()
        assert (first.id, first.exit_code) == (run_id, 2)
        assert first.reason is not None and "stopped: " in first.reason
        assert "the disk is full" in first.reason
        # When even the end does not fit, it waits for the next run's start.
        run_id = store.start_run("local", "ds")
        store.record("https://h/one", "one", "warm", 206, 4, 1, "")
        real, flush = Store.transaction, Store.flush
        monkeypatch.setattr(Store, "flush", lambda self: (_ for _ in ()).throw(
            StateError("state x: cannot write: the disk is full")))
        monkeypatch.setattr(Store, "transaction", lambda self: (_ for _ in ()).throw(
            StateError("state x: cannot write: the disk is full")))
        with pytest.raises(StateError):
            store.finish_run(run_id, {"warm": 1}, 0, "done")
        monkeypatch.setattr(Store, "transaction", real)
        monkeypatch.setattr(Store, "flush", flush)
        assert store.runs()[0].exit_code is None
        store.start_run("local", "ds")
        assert [r.exit_code for r in store.runs()] == [None, 2, 2]


def test_a_state_file_removed_or_replaced_under_a_store_is_refused(tmp_path: Path) -> None:
    """The daemon and its writer went on writing to an unlinked file, ready, losing it all at
    the next stop (and systemd's next start made a new, empty state). A removed or replaced
    file is now a problem the store names, and no run starts on it."""
    state = tmp_path / "state.db"
    with Store(state) as store:
        store.start_run("local", "ds")
        assert store.file_problem() is None
        moved = tmp_path / "moved.db"
        state.rename(moved)
        assert f"state {state}: removed while in use" in str(store.file_problem())
        with pytest.raises(StateError, match="removed while in use"):
            store.start_run("local", "ds")
        restored = tmp_path / "restored.db"
        restored.write_bytes(moved.read_bytes())  # a restore: the same bytes, another file
        restored.rename(state)
        assert "replaced by another file while in use" in str(store.file_problem())
    with Store(state) as store:  # opened anew: that file is the state now
        assert store.file_problem() is None


def test_a_state_in_a_directory_that_cannot_be_written_names_the_directory(
    tmp_path: Path
) -> None:
    """status on a state readable by a group, in a directory it cannot write, said "attempt to
    write a readonly database": it is SQLite's -wal and -shm files that cannot be made."""
    shared = tmp_path / "shared"
    shared.mkdir()
    with Store(shared / "state.db") as store:
        store.start_run("local", "ds")
    shared.chmod(0o555)
    # As root, without the capabilities that ignore file modes.
    nocap = (["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
             if os.geteuid() == 0 else [])
    try:
        res = subprocess.run([*nocap, sys.executable, "-m", "prestaged", "status", "--state",
                              str(shared / "state.db")], capture_output=True, text=True,
                             timeout=TIMEOUT, check=False)
    finally:
        shared.chmod(0o755)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    assert f"its directory {shared} is not writable" in res.stderr, res.stderr


def test_a_new_state_that_cannot_be_made_leaves_no_empty_file(tiny_disk: Path) -> None:
    """On a full disk the new state failed and left a 0-byte file, which the next run took for
    a new state in silence."""
    filler = tiny_disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    with pytest.raises(StateError, match="the disk is full"):
        Store(tiny_disk / "new.db").open()
    assert not (tiny_disk / "new.db").exists()


def test_an_old_empty_state_file_is_a_warning(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A state file truncated to nothing (`> state.db`, a failed copy) became a new state
    without a word; it is a WARNING now (not for a file another process is creating)."""
    state = tmp_path / "state.db"
    state.touch()
    with Store(state):
        pass
    assert "is an empty file" not in caplog.text  # just made: someone is creating it
    state.unlink()
    state.touch()
    os.utime(state, (time.time() - 3600, time.time() - 3600))
    with Store(state):
        pass
    assert f"state {state} is an empty file: a new state is made in it" in caplog.text


def test_a_daemon_on_a_read_only_state_says_only_that(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """serve on a state it may not write exits 2 with one line; it said first that it "could
    not leave" a cluster it had never joined (a SQLite state has none)."""
    from daemon_harness import free_port, write_config

    config = write_config(tmp_path, pki, proxy, free_port(), [])
    with Store(tmp_path / "state.db") as store:
        store.start_run("local", "ds")
    for f in tmp_path.glob("state.db*"):
        f.chmod(0o444)
    nocap = (["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
             if os.geteuid() == 0 else [])
    res = subprocess.run([*nocap, sys.executable, "-m", "prestaged", "serve", "--config",
                          str(config)], capture_output=True, text=True, timeout=TIMEOUT,
                         check=False)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "read-only" in lines[0], lines


def test_a_daemon_refuses_a_state_damaged_where_nothing_has_read_yet(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """Pages damaged in the middle of a state passed open, status and warm alike, and a
    daemon wrote on into it for months; it now checks the file at start (SQLite's
    quick_check): exit 2, one line saying the database is damaged."""
    import random

    from daemon_harness import free_port, write_config

    state = tmp_path / "state.db"
    with Store(state) as store:
        run = store.start_run("local", "ds")
        for i in range(20_000):
            store.record(f"https://h/x/{i:06d}", f"f{i}", "warm", 206, 4, 1, "")
        store.finish_run(run, {"warm": 20_000}, 0, "done")
    conn = sqlite3.connect(state)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = bytearray(state.read_bytes())
    size = int.from_bytes(raw[16:18], "big")
    noise = random.Random(7)
    for i in range(10 * size, 12 * size):  # two pages of the files table's middle
        raw[i] = noise.randrange(256)
    state.write_bytes(bytes(raw))
    assert run_cli("status", "--state", str(state)).returncode == 0  # nothing reads them
    config = write_config(tmp_path, pki, proxy, free_port(), [])
    res = subprocess.run([sys.executable, "-m", "prestaged", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "the database is damaged" in lines[0], lines


def test_a_damaged_page_behind_a_valid_header_is_one_line(tmp_path: Path) -> None:
    """A state file whose header is fine but whose pages are garbage fails status and history
    with one line naming the file and exit 2 (sqlite3.DatabaseError escaped before)."""
    state = tmp_path / "state.db"
    with Store(state) as store:
        store.start_run("local", "ds")
    raw = bytearray(state.read_bytes())
    page = int.from_bytes(raw[16:18], "big")
    for i in range(page, len(raw)):  # keep page 1 (the header and schema), wreck the rest
        raw[i] = 0xA5
    state.write_bytes(bytes(raw))
    for command in ("status", "history"):
        res = run_cli(command, "--state", str(state))
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and str(state) in res.stderr, res.stderr
        assert "damaged" in res.stderr or "malformed" in res.stderr


def test_describe_sqlite_error_words_the_usual_failures() -> None:
    """Disk full, read-only, locked and damaged files each get words that say what to do."""
    assert "the disk is full" in describe_sqlite_error("database or disk is full")
    assert "read-only" in describe_sqlite_error("attempt to write a readonly database")
    assert "locked" in describe_sqlite_error("database is locked")
    assert "damaged" in describe_sqlite_error("database disk image is malformed")


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """A new state database is 0600 and the directories made for it 0700, even under umask 022
    (the CLI made them 0644/0755)."""
    old = os.umask(0o022)
    try:
        state = tmp_path / "a" / "b" / "state.db"
        with Store(state) as store:
            store.start_run("local", "ds")
    finally:
        os.umask(old)
    assert state.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    for extra in state.parent.glob("state.db-*"):
        assert extra.stat().st_mode & 0o077 == 0, extra


async def test_an_empty_definition_fails_the_gate_unless_allowed(tmp_path: Path,
                                                                backend: Backend) -> None:
    """0 of 0 files is not "100% warm": the gate fails with exit 4 naming the definition,
    and passes only with allow_empty."""
    from prestaged.catalog.local import LocalCatalog
    from prestaged.gate import wait_until_ready
    from prestaged.model import Attempt
    from prestaged.warm import WarmSettings

    class NoTouch:
        async def touch(self, url: str) -> Attempt:
            raise AssertionError(f"nothing to touch, got {url}")

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with backend.store() as store:
        got = await wait_until_ready(LocalCatalog(str(empty)), WarmSettings(), NoTouch(), store,
                                     fresh_for=3600, timeout=5)
        assert (got.passed, got.exit_code) == (False, 4)
        assert "has no files" in got.summary()
        ok = await wait_until_ready(LocalCatalog(str(empty)), WarmSettings(), NoTouch(), store,
                                    fresh_for=3600, timeout=5, allow_empty=True)
        assert ok.passed


def test_url_credentials_never_reach_the_state_file(tmp_path: Path, backend: Backend) -> None:
    """A URL with ``user:password@`` is recorded (membership, outcome, cold list) under its
    full identity, but its text in the database has the credentials redacted."""
    url = "https://alice:s3cr3t-pw@door.example:2880/pnfs/f1"
    state = backend.path
    with backend.store() as store:
        from prestaged.model import FileRef

        store.add_members("local", "ds", [FileRef("f1", url)])
        store.record(url, "f1", "failed", 503, 0, 5, f"HTTP 503 from {url}")
        store.flush()
        assert store.cold_urls("local", "ds", 3600) == ["https://***@door.example:2880/pnfs/f1"]
        store.record(url, "f1", "warm", 206, 4, 1, "")
        store.flush()
        assert store.fresh_urls([url], 3600) == {url}  # still found by its full identity
    for path in state.parent.glob("state.db*"):
        assert b"s3cr3t" not in path.read_bytes(), path
    rows = backend.query("SELECT url, name, last_error FROM files")
    assert len(rows) == 1 and "s3cr3t" not in repr(rows), rows


def test_url_query_secrets_never_reach_the_state_file(tmp_path: Path, backend: Backend) -> None:
    """A URL carrying a token or password in its query (XRootD's ``authz=``, ``password=``)
    is recorded under its full identity, with those values redacted in the database."""
    url = "https://door.example:2880/pnfs/f1?authz=Bearer%20s3cr3t-tok&password=s3cr3t-pw&x=1"
    with backend.store() as store:
        from prestaged.model import FileRef

        store.add_members("local", "ds", [FileRef("f1", url)])
        store.record(url, "f1", "failed", 503, 0, 5, f"HTTP 503 from {url}")
        store.flush()
        assert store.cold_urls("local", "ds", 3600) == [
            "https://door.example:2880/pnfs/f1?authz=***&password=***&x=1"]
    for path in backend.path.parent.glob("state.db*"):
        assert b"s3cr3t" not in path.read_bytes(), path
    rows = backend.query("SELECT url, name, last_error FROM files")
    assert len(rows) == 1 and "s3cr3t" not in repr(rows), rows


@contextlib.contextmanager
def _held_write_lock(backend: Backend) -> Iterator[None]:
    """Another process's lock on the state, held until the block ends: SQLite's write lock
    (``BEGIN IMMEDIATE``), or on PostgreSQL an exclusive lock on ``definitions`` (what a run
    row writes first)."""
    if backend.url is None:
        other = sqlite3.connect(backend.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
    else:
        from prestaged.state.postgres import connect

        other = connect(backend.url)  # type: ignore[assignment]
        other.execute("BEGIN")
        other.execute("LOCK TABLE definitions IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_recording_never_waits_for_another_process_s_lock(backend: Backend) -> None:
    """While a read or run row waits (up to busy_timeout) for a write lock another process
    holds, record() - called on the event loop - returns at once (it waited behind the same
    lock before: a locked state DB froze a daemon's loop)."""
    import threading
    import time

    from prestaged.errors import StateError

    with backend.store(busy_timeout=3.0) as store, _held_write_lock(backend):
        waiting = threading.Event()

        def start_run() -> None:
            waiting.set()
            with contextlib.suppress(StateError):
                store.start_run("local", "ds")  # waits for the lock, holding the store's

        t = threading.Thread(target=start_run)
        t.start()
        waiting.wait(5)
        deadline = time.monotonic() + 2.5
        # Until start_run is blocked holding the store's lock (SQLite). A PostgreSQL store has
        # no store-wide lock (each read takes a connection of its pool): nothing to wait for.
        lock = store._lock
        while hasattr(lock, "acquire") and t.is_alive() and time.monotonic() < deadline:
            if not lock.acquire(blocking=False):
                break
            lock.release()
        begin = time.monotonic()
        for i in range(50):
            store.record(f"https://h/f{i}", f"f{i}", "warm", 206, 4, 1, "")
        took = time.monotonic() - begin
    t.join(10)
    assert took < 0.5, f"record() waited {took:.2f} s behind the state DB's lock"


def test_wait_on_an_empty_definition_fails_and_submit_runs_nothing(
    tmp_path: Path, pki: TestPKI, proxy: Path, backend: Backend
) -> None:
    """``prestaged wait`` on an empty definition exits 4 naming it; ``submit`` does not run its
    command; ``--allow-empty`` lets it pass (issue 12, 10)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("# no files yet\n")
    marker = tmp_path / "ran"
    common = ["--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), *backend.cli(),
              "--timeout", "5s"]
    res = run_cli("wait", str(empty), *common)
    assert res.returncode == 4 and "has no files" in res.stderr, res.stderr
    res = run_cli("submit", "--definition", str(empty), *common, "--", "touch", str(marker))
    assert res.returncode == 4 and not marker.exists()
    assert run_cli("wait", str(empty), *common, "--allow-empty").returncode == 0


def test_campaign_slice_lists_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """A campaign's slice URL and name lists are 0600 in 0700 directories under umask 022 (the
    CLI made them 0644 in 0755)."""
    from prestaged.campaign.runner import _write_lists
    from prestaged.model import FileRef

    old = os.umask(0o022)
    try:
        urls, names = tmp_path / "w" / "c" / "s-1.urls", tmp_path / "w" / "c" / "s-1.files"
        _write_lists(urls, names, [FileRef("f1", "https://h/f1")])
    finally:
        os.umask(old)
    assert urls.read_text() == "https://h/f1\n" and names.read_text() == "f1\n"
    assert {p.stat().st_mode & 0o777 for p in (urls, names)} == {0o600}
    assert {p.stat().st_mode & 0o777 for p in (urls.parent, urls.parent.parent)} == {0o700}



def test_a_cut_postgresql_session_is_survived(
        pg_cluster: PostgresCluster, pg_url: str, tmp_path: Path) -> None:
    """The server terminates the store's sessions (a restart, an operator's
    pg_terminate_backend): the next read and the next flush work on new connections, and
    nothing recorded is lost (tests/test_state_reconnect.py pins the details)."""
    from urllib.parse import urlsplit

    dbname = urlsplit(pg_url).path.lstrip("/")
    with Store(tmp_path / "state.db", url=pg_url) as store:
        store.start_run("local", "ds")
        store.flush()  # answered once the writer is connected
        assert pg_cluster.terminate_backends(dbname) == 2  # the store's and its writer's
        assert [r.definition for r in store.runs()] == ["ds"]
        store.record("https://h/f1", "f1", "warm", 206, 4, 1, "")
        store.flush()
        assert store.conn.execute("SELECT count(*) FROM files").fetchone()[0] == 1


def test_a_writer_that_gave_up_on_a_lock_is_replaced_when_the_next_run_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A SQLite write lock held past ``busy_timeout`` makes the writer process give up: the
    flush fails with one line, and so does every call that meets the stopped writer, until the
    next run starts: ``start_run`` puts a new writer in its place (with a warning) and that
    run's outcomes are written. The batch the old writer held is lost, as in a crash. Before,
    one long lock left a daemon up and ready, aborting every run until it was restarted."""
    from prestaged.errors import StateError

    path = tmp_path / "state.db"

    def record(store: Store, first: int, count: int) -> None:
        for i in range(first, first + count):
            store.record(f"https://h/f{i}", f"f{i}", "warm", 206, 4, 1, "")

    with Store(path, busy_timeout=0.2) as store:
        record(store, 0, 2)
        store.flush()
        with _held_write_lock(Backend("sqlite", tmp_path, None)):
            record(store, 2, 3)
            with pytest.raises(StateError) as gave_up:
                store.flush()
        assert "locked" in str(gave_up.value) and "\n" not in str(gave_up.value)
        with pytest.raises(StateError) as again:  # the lock is gone, the writer too
            store.flush()
        assert str(again.value) == str(gave_up.value)
        assert (store.writer_stopped, store.writer_replacements) == (True, 0)
        replaced: list[int] = []
        store.on_writer_replaced = lambda: replaced.append(store.writer_replacements)
        run = store.start_run("local", "ds")
        assert (store.writer_stopped, store.writer_replacements, replaced) == (False, 1, [1])
        record(store, 10, 3)
        store.finish_run(run, {"warm": 3}, 0, "")
    with sqlite3.connect(path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM files")}
        ended = conn.execute("SELECT exit_code FROM runs WHERE id = ?", (run,)).fetchone()
    assert names == {"f0", "f1", "f10", "f11", "f12"}
    assert ended == (0,)
    warnings = [r.getMessage() for r in caplog.records if "new writer process" in r.getMessage()]
    assert warnings == [f"{gave_up.value}; a new writer process replaces it (outcomes it had "
                        "not written are lost: those files will be touched again)"]
