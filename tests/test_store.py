"""Persistent state: crash resume, freshness, migrations, bad files, concurrent writers, status.

The CLI runs in-process (``run_cli``) except where processes are the point: SIGKILL and Ctrl-C
of a real ``python -m prestaged``, and two processes writing one state file.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_runner import entry_point, run_cli, subprocess_env
from conftest import Backend

from prestaged.errors import StateError
from prestaged.model import FileRef, TapeInfo
from prestaged.state.schema import SCHEMA_VERSION, SQLITE
from prestaged.state.store import Store, url_id
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, Status, ThreadedStorageServer

TIMEOUT = 180


def _definition(tmp_path: Path, srv: ThreadedStorageServer, n: int, name: str = "ds") -> Path:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(srv.url(f"/{name}/f{i:05d}") + "\n" for i in range(n)))
    return path


def _warm_args(definition: Path, proxy: Path, pki: TestPKI, state: Path | list[str],
               *extra: str) -> list[str]:
    """``warm DEFINITION --json`` with the test proxy and ``state`` (a file, or the arguments
    selecting a backend's state: ``Backend.cli``)."""
    selects = ["--state", str(state)] if isinstance(state, Path) else state
    return ["warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
            *selects, "--json", *extra]


def _process(args: list[str], **popen: Any) -> subprocess.Popen[str]:
    """A real ``python -m prestaged ARGS`` (to be killed or interrupted)."""
    return subprocess.Popen(entry_point(*args), stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), **popen)


def _run(args: list[str]) -> tuple[int, dict[str, object]]:
    """``prestaged ARGS`` in-process: exit code and the JSON document ({} without one)."""
    res = run_cli(*args)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


def _status(state: Path | list[str], *args: str) -> dict[str, object]:
    """``prestaged status --state STATE --json ARGS`` in-process (``state``: a file, or
    ``Backend.cli``'s arguments)."""
    selects = ["--state", str(state)] if isinstance(state, Path) else state
    res = run_cli("status", *selects, "--json", *args)
    assert res.returncode == 0, res.stderr
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


@pytest.mark.slow
def test_sigkill_then_rerun_touches_only_what_is_left(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """SIGKILL mid-run; the rerun touches only unrecorded files and ends with all 5,000 warm."""
    batch = 256
    # Outcomes reach the writer every 20 ms or every `batch`: what a SIGKILL can lose (the
    # unsent outcomes plus the 4 requests in flight) stays well under one batch.
    state = backend.cli(f'batch = {batch}\nflush_interval = "20ms"')
    definition = _definition(tmp_path, storage, 5000)
    args = _warm_args(definition, proxy, pki, state, "--concurrency", "4")
    proc = _process(args, stdout=subprocess.DEVNULL)
    try:
        storage.wait_until(lambda s: s.requests_total >= 2000, timeout=TIMEOUT)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    storage.wait_until(lambda s: s.active_requests == 0, timeout=TIMEOUT)
    first = storage.stats.requests_total
    assert first < 5000, "the first run must be killed mid-way"
    code, doc = _run(args)
    assert code == 0
    total = storage.stats.requests_total
    assert total <= 5000 + batch, f"{total - 5000} files touched twice"
    counts = doc["counts"]
    assert isinstance(counts, dict)
    assert counts["warm"] + counts["skipped_fresh"] == 5000
    # (the killed run's last few requests may be counted by the server only after `first`)
    assert abs(counts["warm"] - (total - first)) <= 4
    [ds] = _status(state)["definitions"]  # type: ignore[misc]
    assert (ds["files"], ds["fresh"], ds["never"], ds["failed"]) == (5000, 5000, 0, {})


def test_rerun_within_fresh_for_makes_no_request_and_force_touches_all(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """A rerun within fresh_for sends zero requests; --force touches everything again."""
    definition = _definition(tmp_path, storage, 300)
    state = backend.cli()
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 0
    assert storage.stats.requests_total == 300
    code, doc = _run(_warm_args(definition, proxy, pki, state))
    assert code == 0 and storage.stats.requests_total == 300
    assert doc["counts"]["skipped_fresh"] == 300  # type: ignore[index]
    code, doc = _run(_warm_args(definition, proxy, pki, state, "--force"))
    assert code == 0 and storage.stats.requests_total == 600
    code, doc = _run(_warm_args(definition, proxy, pki, state, "--fresh-for", "0"))
    assert storage.stats.requests_total == 900
    code, doc = _run(_warm_args(definition, proxy, pki, state, "--no-state"))
    assert storage.stats.requests_total == 1200


def _status_of(definition: Path, state: list[str]) -> dict[str, Any]:
    res = run_cli("status", str(definition), *state, "--json")
    assert res.returncode == 0, res.stderr
    [row] = json.loads(res.stdout)["definitions"]
    return dict(row)


def test_files_that_left_a_definition_stop_counting_once_it_is_listed_whole(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """Members were never removed: a definition that lost 4 of its 10 files kept them, and
    `wait --ready 1.0` timed out naming files no longer in it. A complete listing now makes
    the members the files it named; an incomplete one removes nothing."""
    definition = _definition(tmp_path, storage, 10)
    state = backend.cli()
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 0
    lines = definition.read_text().splitlines()
    definition.write_text("".join(f"{u}\n" for u in lines[:6]) + "not a URL\n")
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 4
    row = _status_of(definition, state)
    assert (row["files"], row["listing_complete"]) == (10, False)
    res = run_cli("status", *state)
    assert "the last run did not list the whole definition" in res.stdout
    definition.write_text("".join(f"{u}\n" for u in lines[:6]))
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 0
    row = _status_of(definition, state)
    assert (row["files"], row["fresh"], row["listing_complete"]) == (6, 6, True)
    res = run_cli("wait", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  *state, "--ready", "1.0", "--timeout", "5s")
    assert res.returncode == 0, res.stderr
    assert storage.stats.requests_total == 10  # the 6 left were fresh: never touched again


def test_failures_are_not_fresh_and_status_counts_them(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """Missing files are recorded as failed, retried on the next run, and shown by status."""
    definition = _definition(tmp_path, storage, 20)
    storage.remove("/ds/f00003")
    state = backend.cli()
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 1
    [ds] = _status(state, str(definition))["definitions"]  # type: ignore[misc]
    assert (ds["files"], ds["fresh"], ds["failed"]) == (20, 19, {"missing": 1})
    assert ds["last_run"]["exit_code"] == 1 and ds["last_run"]["reason"] == "done"
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 1
    assert storage.stats.path("/ds/f00003").requests == 2
    assert storage.stats.requests_total == 21
    history = run_cli("history", *state, "--json")
    assert history.returncode == 0, history.stderr
    runs = json.loads(history.stdout)["runs"]
    assert [r["counts"].get("skipped_fresh", 0) for r in runs] == [19, 0]
    # in the backend's own database, not a file the CLI fell back to
    assert backend.query("SELECT status, COUNT(*) FROM files GROUP BY status ORDER BY 1") == [
        ("missing", 1), ("warm", 19)]


def test_a_file_whose_last_touch_failed_is_not_skipped_as_fresh(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """A file warmed minutes ago whose last touch (a forced rerun) failed is touched again by
    the next run instead of being skipped as fresh, so ``wait`` passes at once. It used to be
    skipped while the gate counted it cold: ``wait`` and ``submit`` waited for it until their
    timeout (6 h by default)."""
    definition = _definition(tmp_path, storage, 20)
    state = backend.cli()
    assert _run(_warm_args(definition, proxy, pki, state))[0] == 0
    storage.inject("/ds/f00003", [Status(404)])
    assert _run(_warm_args(definition, proxy, pki, state, "--force"))[0] == 1
    code, doc = _run(_warm_args(definition, proxy, pki, state))
    assert code == 0 and doc["counts"]["skipped_fresh"] == 19  # type: ignore[index]
    assert storage.stats.path("/ds/f00003").requests == 3
    res = run_cli("wait", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  *state, "--timeout", "60s")
    assert res.returncode == 0, res.stderr
    assert storage.stats.requests_total == 20 + 20 + 1  # wait found it all warm


def _v1_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(";".join(SQLITE.statements(1)) + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO files (id, url, name, status, last_try, last_warm) "
                 "VALUES (?, 'https://h/a', 'a', 'warm', 1, ?)", (url_id("https://h/a"), time.time()))
    conn.commit()
    conn.close()


# SQLite files only: test_state_postgres refuses foreign and newer PostgreSQL databases.
def test_older_schema_is_migrated(tmp_path: Path) -> None:
    """A version-1 state file is migrated forward and keeps its records."""
    path = tmp_path / "old.db"
    _v1_database(path)
    with Store(path) as store:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.fresh_urls(["https://h/a", "https://h/b"], fresh_for=3600) == {"https://h/a"}
        cols = {r[1] for r in store.conn.execute("PRAGMA table_info(files)")}
        assert "size" in cols


def test_status_on_an_older_state_migrates_it_and_answers(tmp_path: Path) -> None:
    """``prestaged status`` (a reading command) on a version-1 state file brings it forward
    like a run would, keeps its records and answers; a second ``status`` finds it current."""
    backend = Backend("sqlite", tmp_path, None)
    _v1_database(backend.path)
    for _ in range(2):
        res = run_cli("status", *backend.cli(), "--json")
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        assert json.loads(res.stdout)["definitions"] == []
        assert backend.query("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert backend.query("SELECT url, status FROM files") == [("https://h/a", "warm")]


@pytest.mark.parametrize("content", [b"this is not a database\n" * 10, b"SQLite format 3\x00junk"])
def test_corrupt_state_file_exit_2_and_untouched(pki: TestPKI, proxy: Path, tmp_path: Path,
                                                 content: bytes) -> None:
    """A corrupt or non-SQLite state file: exit 2, one clear line, the file left as it was."""
    state = tmp_path / "state.db"
    state.write_bytes(content)
    definition = tmp_path / "d.txt"
    definition.write_text("https://127.0.0.1:1/x\n")
    res = run_cli(*_warm_args(definition, proxy, pki, state))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"state {state}: not a prestaged state database" in res.stderr
    assert state.read_bytes() == content


def test_foreign_and_newer_databases_refused(tmp_path: Path) -> None:
    """Another program's SQLite file, or a newer schema, is refused without change."""
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE photos (id)")
    conn.commit()
    conn.close()
    before = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(StateError, match="database of something else"):
        Store(other).open()
    assert hashlib.sha256(other.read_bytes()).hexdigest() == before
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StateError, match="newer than this prestaged knows"):
        Store(newer).open()


@pytest.mark.slow
def test_two_processes_share_one_state_file(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """Two concurrent warms of different definitions on one state keep every result."""
    state = backend.cli('batch = 50\nflush_interval = "50ms"')
    defs = [_definition(tmp_path, storage, 2000, name) for name in ("one", "two")]
    procs = [_process(_warm_args(d, proxy, pki, state), stdout=subprocess.PIPE) for d in defs]
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
        assert json.loads(out)["counts"]["warm"] == 2000
    doc = _status(state)
    assert sorted((d["definition"], d["files"], d["fresh"]) for d in doc["definitions"]) == [  # type: ignore[union-attr]
        (str(defs[0]), 2000, 2000), (str(defs[1]), 2000, 2000)]
    if backend.url is None:
        assert backend.query("PRAGMA integrity_check") == [("ok",)]
    assert backend.query("SELECT COUNT(*) FROM runs WHERE ended IS NOT NULL") == [(2,)]


def test_interrupted_run_is_recorded(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                     tmp_path: Path, backend: Backend) -> None:
    """Ctrl-C: the run is recorded as interrupted with exit 130 and what was done is kept."""
    definition = _definition(tmp_path, storage, 100)
    for i in range(20, 100):
        storage.inject(f"/ds/f{i:05d}", [Delay(30)])
    state = backend.cli()
    proc = _process(_warm_args(definition, proxy, pki, state, "--concurrency", "4"),
                    stdout=subprocess.PIPE)
    try:
        storage.wait_until(lambda s: s.active_requests >= 4, timeout=TIMEOUT)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130
    [ds] = _status(state)["definitions"]  # type: ignore[misc]
    assert ds["fresh"] == 20 and ds["last_run"]["exit_code"] == 130
    assert ds["last_run"]["reason"] == "interrupted"


def test_store_batches_writes(backend: Backend) -> None:
    """Outcomes queue up and are committed in batches; flush() makes them durable."""
    with backend.store(batch=10, flush_interval=60) as store:
        refs = [FileRef(name=f"f{i}", url=f"https://h/f{i}") for i in range(25)]
        store.add_members("local", "d", refs)
        for r in refs:
            store.record(r.url, r.name, "warm", 206, 4, 1, "")
        store.flush()
        assert backend.query("SELECT COUNT(*) FROM files WHERE status = 'warm'") == [(25,)]
        [st] = store.status(fresh_for=3600)
        assert (st.files, st.fresh) == (25, 25)


def test_buffered_rows_reach_the_database_without_another_record(backend: Backend) -> None:
    """A row waited in the buffer for the next record() past flush_interval, and a run whose
    files are coming back from tape records nothing for hours: a crash lost it. The store's
    ticker hands it to the writer once flush_interval has passed, with no flush() and no
    other record."""
    with backend.store(batch=1000, flush_interval=0.05) as store:
        store.add_members("local", "d", [FileRef("f0", "https://h/f0")])
        store.record("https://h/f0", "f0", "warm", 206, 4, 1, "")
        deadline = time.monotonic() + 30
        while backend.query("SELECT COUNT(*) FROM files WHERE status = 'warm'") != [(1,)]:
            assert time.monotonic() < deadline, "the buffered outcome never reached the state"
            time.sleep(0.02)  # polling the database with a deadline


def test_status_catalog_narrows_every_definition(backend: Backend) -> None:
    """``status --catalog K`` without a definition lists only catalog K's definitions (it
    listed all of them), from the store and on the command line."""
    with backend.store() as store:
        store.add_members("local", "/defs/a.txt", [FileRef("a", "https://h/a")])
        store.add_members("samweb", "b", [FileRef("b", "https://h/b")])
        store.add_members("samweb", "c", [FileRef("c", "https://h/c")])
        store.flush()
        assert [r.definition for r in store.status(3600, catalog="samweb")] == ["b", "c"]
        assert [r.definition for r in store.status(3600, "b", "local")] == []
        assert len(store.status(3600)) == 3
    res = run_cli("status", "--catalog", "local", "--json", *backend.cli())
    assert res.returncode == 0, res.stderr
    assert [d["definition"] for d in json.loads(res.stdout)["definitions"]] == ["/defs/a.txt"]


def test_status_of_many_definitions_is_a_few_queries(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """``status`` of every definition asks the database a fixed number of queries, each
    definition's counts and newest run matched to it: a query per definition took 4 s for
    1,500 definitions on PostgreSQL (soak), and ``GET /api/v1/datasets`` with it."""
    with backend.store() as store:
        for i in range(30):
            store.add_members("local", f"/defs/d{i:02d}", [
                FileRef(f"f{i}-{j}", f"https://h/{i}/{j}") for j in range(i % 3 + 1)])
            for k in range(i % 4):
                run = store.start_run("local", f"/defs/d{i:02d}")
                store.finish_run(run, {"warm": k}, k, "done")
        store.flush()
        executed: list[str] = []
        execute = store.conn.execute

        def counted(sql: str, params: Any = ()) -> Any:
            executed.append(sql)
            return execute(sql, params)

        monkeypatch.setattr(store.conn, "execute", counted)
        rows = store.status(3600)
        one = store.status(3600, "/defs/d07", "local")
    assert len(executed) <= 8, executed
    assert [r.definition for r in rows] == [f"/defs/d{i:02d}" for i in range(30)]
    assert [r.files for r in rows] == [i % 3 + 1 for i in range(30)]
    assert [r.never for r in rows] == [i % 3 + 1 for i in range(30)]
    lasts = [(r.last_run.exit_code, r.last_run.counts) if r.last_run else None for r in rows]
    assert lasts == [((i % 4) - 1, {"warm": (i % 4) - 1}) if i % 4 else None
                     for i in range(30)]
    assert one == [rows[7]]


def test_default_state_path_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without --state the CLI uses $XDG_STATE_HOME/prestaged/state.db."""
    from prestaged.state.store import default_state_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_path() == tmp_path / "prestaged" / "state.db"
    assert default_state_path({"HOME": "/home/u"}) == Path("/home/u/.local/state/prestaged/state.db")


# --- tape: stage requests and pins (issue 13) ---------------------------------------------------

TAPE_URI = "https://tape.example/api/v1/tape"


def _made(store: Store, ref: FileRef, request: str, made: float, lifetime: float = 3600.0,
          definition: str = "d") -> None:
    """Record that ``local:definition``'s run made (or followed) ``request`` for ``ref`` at
    ``made`` (the state's seconds), asking a pin of ``lifetime``."""
    store.note_tape(ref.url, TapeInfo("TAPE", request, TAPE_URI, requested_at=made,
                                      lifetime=lifetime), wanted_by=("local", definition))


def test_open_stages_are_the_dated_requests_neither_landed_nor_ended(backend: Backend) -> None:
    """open_stages tells every dated request that neither landed nor ended, however short the
    pin it asked for (it was dated by its pin: made = pinned_until - today's pin_lifetime) and
    however old (the router cancels one past stage_timeout); not one that ended or landed; one
    recorded before requests were dated, while the pin it was given then lasts."""
    with backend.store() as store:
        refs = [FileRef(f"f{i}", f"https://door.example/f{i}") for i in range(6)]
        store.add_members("local", "d", refs)
        now = store.now()
        _made(store, refs[0], "short-pin", now - 100, lifetime=60)
        _made(store, refs[1], "too-old", now - 2000)
        _made(store, refs[2], "ended", now - 10)
        store.note_tape(refs[2].url, TapeInfo("TAPE", "ended", TAPE_URI, ended_at=now - 5))
        _made(store, refs[3], "landed", now - 10)
        store.note_tape(refs[3].url, TapeInfo("TAPE", "landed", TAPE_URI, staged_at=now - 5,
                                              pinned_until=now + 3595))
        store.flush()
        with store.transaction() as conn:  # as schema 8 left them: no creation time
            for ref, until in ((refs[4], now + 100), (refs[5], now - 100)):
                conn.execute("UPDATE files SET stage_request = ?, stage_uri = ?, "
                             "pinned_until = ? WHERE id = ?",
                             (f"legacy-{ref.name}", TAPE_URI, until, url_id(ref.url)))
        found = store.open_stages([r.url for r in refs], now=now)
    assert sorted(found) == [refs[0].url, refs[1].url, refs[4].url]
    assert found[refs[1].url].requested_at == now - 2000
    assert found[refs[0].url] == TapeInfo("TAPE", "short-pin", TAPE_URI, requested_at=now - 100,
                                          lifetime=60.0)
    assert found[refs[4].url] == TapeInfo("TAPE", "legacy-f4", TAPE_URI)


def test_status_counts_a_stage_that_ended_without_landing_as_tape_only(
    backend: Backend
) -> None:
    """A stage that timed out, failed, was cancelled or released no longer shows as staging:
    the file is tape-only. An open request (a run interrupted while the tape mounts) is still
    staging; a landed one is on disk."""
    with backend.store() as store:
        refs = [FileRef(f"f{i}", f"https://door.example/f{i}") for i in range(3)]
        store.add_members("local", "d", refs)
        now = store.now()
        for i, ref in enumerate(refs):
            store.note_tape(ref.url, TapeInfo("TAPE"))
            _made(store, ref, f"r{i}", now)
        store.note_tape(refs[1].url, TapeInfo("TAPE", "r1", TAPE_URI, ended_at=now))
        store.note_tape(refs[2].url, TapeInfo("TAPE", "r2", TAPE_URI, staged_at=now,
                                              pinned_until=now + 3600))
        store.flush()
        [st] = store.status(3600)
    assert st.tape == {"staging": 1, "tape_only": 1, "on_disk": 1}


def test_pins_belong_to_the_definitions_that_relied_on_them(backend: Backend) -> None:
    """Each definition relies on the requests its runs made or followed, and sees who else
    relies on each: a definition that found the file on disk relies on none. Releasing one
    keeps the shared pin (and its pinned_until) for the other; releasing that one too frees
    it."""
    with backend.store() as store:
        shared, a1, b1 = (FileRef(n, f"https://door.example/{n}") for n in ("s", "a1", "b1"))
        for definition, refs in (("A", [shared, a1]), ("B", [shared, b1]), ("C", [shared])):
            store.add_members("local", definition, refs)
        now = store.now()
        for ref, request, definition in ((shared, "req-1", "A"), (a1, "req-1", "A"),
                                         (shared, "req-1", "B"), (b1, "req-2", "B")):
            _made(store, ref, request, now, definition=definition)
        for ref, request in ((shared, "req-1"), (a1, "req-1"), (b1, "req-2")):
            store.note_tape(ref.url, TapeInfo("TAPE", request, TAPE_URI, staged_at=now,
                                              pinned_until=now + 3600))
        store.flush()
        b_pins = store.pins("local", "B")
        assert b_pins is not None
        assert [(p.url, p.request, p.landed, p.others) for p in b_pins] == [
            (shared.url, "req-1", True, ("local:A",)), (b1.url, "req-2", True, ())]
        assert store.pins("local", "C") == []
        theirs, mine = b_pins[:1], b_pins[1:]
        assert store.unpinned("local", "B", mine, theirs) == []  # A still relies on it
        a_pins = store.pins("local", "A")
        assert a_pins is not None and all(p.others == () for p in a_pins)
        assert store.pins("local", "B") == []
    pinned = dict(backend.query("SELECT url, pinned_until FROM files"))
    assert pinned[shared.url] == pinned[a1.url] == now + 3600 and pinned[b1.url] is None


def test_two_definitions_releasing_together_leave_no_pin_behind(backend: Backend) -> None:
    """A and B both rely on a pin; each reads that the other does, so each keeps it for the
    other. The one recording last learns that nobody relies on it any more and is handed the
    pin to release after all."""
    with backend.store() as store:
        ref = FileRef("x", "https://door.example/x")
        for definition in ("A", "B"):
            store.add_members("local", definition, [ref])
            _made(store, ref, "req-3", store.now(), definition=definition)
        store.note_tape(ref.url, TapeInfo("TAPE", "req-3", TAPE_URI, staged_at=store.now(),
                                          pinned_until=store.now() + 60))
        store.flush()
        a_pins, b_pins = store.pins("local", "A"), store.pins("local", "B")
        assert a_pins is not None and b_pins is not None
        assert store.unpinned("local", "B", [], b_pins) == []
        assert store.unpinned("local", "A", [], a_pins) == a_pins
