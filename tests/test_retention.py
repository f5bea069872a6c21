"""What the state keeps and for how long: ``[state] keep_runs``, the daemon's tidy
(``[state] tidy_every``) and ``prestaged forget``, on both backends."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import Backend
from daemon_harness import free_port, in_process, metric_value, poll, until, write_config

from prestaged.errors import ConflictError, NotFoundError
from prestaged.model import FileRef, TapeInfo
from prestaged.state.store import Listing, Store, url_id
from prestaged.testing.pki import TestPKI


def _refs(prefix: str, n: int) -> list[FileRef]:
    return [FileRef(f"{prefix}{i}", f"https://door.example/{prefix}{i}") for i in range(n)]


def _run(store: Store, definition: str, refs: list[FileRef], *, complete: bool = True,
         end: bool = True) -> int:
    """One run of ``local:definition`` that listed ``refs`` (all warm); its id."""
    since = store.now()
    run_id = store.start_run("local", definition)
    store.add_members("local", definition, refs)
    for r in refs:
        store.record(r.url, r.name, "warm", 206, 4, 1, "")
    if end:
        store.finish_run(run_id, {"warm": len(refs)}, 0, "ok", Listing(complete, since))
    else:
        store.flush()
    return run_id


def _run_ids(backend: Backend, definition: str) -> list[int]:
    return [r[0] for r in backend.query(
        "SELECT r.id FROM runs r JOIN definitions d ON d.id = r.definition_id "
        f"WHERE d.name = '{definition}' ORDER BY r.id")]


def _file_ids(backend: Backend) -> set[int]:
    return {r[0] for r in backend.query("SELECT id FROM files")}


def _landed(store: Store, url: str, request: str, catalog: str, definition: str,
            until: float) -> None:
    """Record that ``catalog:definition``'s run staged ``url`` in ``request``, pinned until
    ``until``."""
    uri = "https://tape.example/api/v1"
    store.note_tape(url, TapeInfo("TAPE", request, uri, requested_at=until - 3600,
                                  lifetime=3600), wanted_by=(catalog, definition))
    store.note_tape(url, TapeInfo("TAPE", request, uri, staged_at=until - 3600,
                                  pinned_until=until))


def test_each_definition_keeps_its_newest_runs(backend: Backend) -> None:
    """With keep_runs = 3, a definition's fourth and fifth runs drop its two oldest as they
    end; another definition's runs are its own to keep."""
    store = backend.store(keep_runs=3).open()
    try:
        a = [_run(store, "a", _refs("a", 2)) for _ in range(5)]
        b = [_run(store, "b", _refs("b", 2)) for _ in range(2)]
        assert [r.id for r in store.runs(limit=100)
                if r.definition == "a"] == a[:1:-1]
    finally:
        store.close()
    assert _run_ids(backend, "a") == a[2:]
    assert _run_ids(backend, "b") == b


def test_keep_runs_0_keeps_every_run(backend: Backend) -> None:
    """keep_runs = 0 drops no run."""
    store = backend.store(keep_runs=0).open()
    try:
        runs = [_run(store, "a", _refs("a", 1)) for _ in range(4)]
    finally:
        store.close()
    assert _run_ids(backend, "a") == runs


def test_tidy_drops_unlisted_files_old_runs_and_old_rounds(backend: Backend) -> None:
    """A tidy drops the files a complete listing left behind (not those another definition
    lists, nor an unexpired pin's), every definition's runs beyond a lowered keep_runs, and
    the finished watch rounds but each watch's last."""
    store = backend.store(keep_runs=10).open()
    try:
        _run(store, "a", _refs("x", 6))
        _run(store, "b", _refs("x", 2))  # x0, x1 are b's too
        pinned = _refs("x", 6)[5]
        _landed(store, pinned.url, "req-1", "local", "a", time.time() + 3600)
        runs = [_run(store, "a", _refs("x", 3)) for _ in range(3)]  # x3, x4, x5 leave a
        with store.transaction() as conn:
            for finished in (1.0, 2.0, None):
                conn.execute("INSERT INTO watch_rounds (catalog, definition, fresh_for, created, "
                             "created_by, files, chunks, next_in, finished) VALUES "
                             "('local', 'a', 0, 0, 'm', 0, 0, 0, ?)", (finished,))
        rounds = [r[0] for r in backend.query("SELECT id FROM watch_rounds ORDER BY id")]
        store.keep_runs = 2
        done = store.tidy()
        again = store.tidy()
    finally:
        store.close()
    assert (done.files, done.runs, done.rounds) == (2, 2, 2)
    kept = {url_id(r.url) for r in _refs("x", 3)} | {url_id(pinned.url)}
    assert _file_ids(backend) == kept
    assert _run_ids(backend, "a") == runs[1:]
    assert [r[0] for r in backend.query("SELECT id FROM watch_rounds ORDER BY id")] == rounds[2:]
    assert again.to_dict() == {"runs": 0, "files": 0, "rounds": 0}


def test_forget_drops_a_definition_and_only_its_files(backend: Backend) -> None:
    """forget drops the definition, its runs and members, and the files no other definition
    lists; b, which shares two files, keeps them and its runs."""
    store = backend.store().open()
    try:
        _run(store, "a", _refs("x", 5))
        b_run = _run(store, "b", _refs("x", 2))
        done = store.forget("local", "a")
        status = store.status(3600)
    finally:
        store.close()
    assert (done.runs, done.files) == (1, 3)
    assert [s.definition for s in status] == ["b"]
    assert status[0].files == status[0].fresh == 2
    assert _file_ids(backend) == {url_id(r.url) for r in _refs("x", 2)}
    assert _run_ids(backend, "a") == [] and _run_ids(backend, "b") == [b_run]


def test_forget_refuses_what_is_still_in_use(backend: Backend) -> None:
    """forget refuses (ConflictError, nothing dropped) a definition with a run still running
    or with unexpired pins, and NotFoundError for one the state never saw; --force forgets
    it."""
    store = backend.store().open()
    try:
        running = _run(store, "a", _refs("a", 2), end=False)
        with pytest.raises(ConflictError, match=rf"run {running} \(process \d+\) has no end "
                                                 "recorded and may still be running"):
            store.forget("local", "a")
        store.finish_run(running, {"warm": 2}, 0, "ok")
        # a stage request of its run still open: the pin comes once the file lands
        store.note_tape(_refs("a", 2)[0].url, TapeInfo("TAPE", "req-9", "https://t.example/v1",
                                                       requested_at=time.time(), lifetime=600),
                        wanted_by=("local", "a"))
        store.flush()
        with pytest.raises(ConflictError, match=r"1 of its files are pinned on disk by "
                                                r"prestaged's stage requests.*prestaged release"):
            store.forget("local", "a")
        assert [s.files for s in store.status(3600, "a")] == [2]
        with pytest.raises(NotFoundError, match="'nope' \\(catalog local\\) has no record"):
            store.forget("local", "nope")
        assert store.forget("local", "a", force=True).files == 1
        assert store.status(3600, "a") == []
    finally:
        store.close()
    # The file's row stays while its stage request may still be open (within the pin
    # lifetime it asked for): a run that lists it again follows that request instead of asking
    # for another.
    assert _file_ids(backend) == {url_id(_refs("a", 2)[0].url)}


def test_forget_leaves_a_pin_another_definition_relies_on_to_that_one(backend: Backend) -> None:
    """A pin two definitions rely on does not hold forget back: the other one's release frees
    it. Once that one alone relies on it, forgetting it is refused."""
    store = backend.store().open()
    try:
        shared = _refs("s", 1)
        _run(store, "a", shared)
        _run(store, "b", shared)
        for definition in ("a", "b"):
            _landed(store, shared[0].url, "req-5", "local", definition, time.time() + 3600)
        store.flush()
        assert store.forget("local", "a").runs == 1
        pins = store.pins("local", "b")
        assert pins is not None and [(p.request, p.others) for p in pins] == [("req-5", ())]
        with pytest.raises(ConflictError, match=r"1 of its files are pinned on disk by "
                                                r"prestaged's stage requests .*for it alone"):
            store.forget("local", "b")
    finally:
        store.close()


def test_forget_from_the_command_line(backend: Backend, tmp_path: Path) -> None:
    """`prestaged forget` names what it dropped (text and --json), exits 4 for an unknown
    definition, and refuses a definition the config watches (exit 2) unless --force; a local
    definition is found by the file name warm was given."""
    listing = tmp_path / "ds.txt"
    store = backend.store().open()
    try:
        _run(store, str(listing), _refs("l", 3))
        _run(store, "other", _refs("o", 1))
    finally:
        store.close()
    config_args = backend.cli(state_toml="")
    config = Path(config_args[1])
    config.write_text(config.read_text() + f'\n[[watch]]\ndefinition = "{listing}"\n'
                      f'catalog = "local"\n')
    res = run_cli("forget", str(listing), "--catalog", "local", *config_args)
    assert res.returncode == 2, res.stderr
    assert "is watched by this config's [[watch]]" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli("forget", str(listing), "--catalog", "local", "--force", "--json",
                  *config_args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["definition"], doc["catalog"], doc["dropped"]) == (
        str(listing), "local", {"runs": 1, "files": 3, "rounds": 0})
    res = run_cli("forget", "other", "--catalog", "local", *config_args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("forgot other (catalog local) in state ")
    assert res.stdout.rstrip().endswith(": 1 runs, 1 files no definition lists any more, "
                                        "0 watch rounds")
    res = run_cli("forget", "other", "--catalog", "local", *config_args)
    assert res.returncode == 4 and "has no record" in res.stderr
    assert backend.query("SELECT COUNT(*) FROM files") == [(0,)]


async def test_the_daemon_tidies_the_state(tmp_path: Path, pki: TestPKI, proxy: Path) -> None:
    """A daemon with tidy_every drops a file no definition lists any more (left by an earlier
    run) and counts it in prestaged_state_tidied_rows{what="files"}."""
    store = Store(tmp_path / "state.db").open()
    try:
        _run(store, "gone", _refs("g", 3))
        _run(store, "gone", _refs("g", 1))
    finally:
        store.close()
    backend = Backend("sqlite", tmp_path, None)
    assert len(_file_ids(backend)) == 3
    config = write_config(tmp_path, pki, proxy, free_port(), [], state='tidy_every = "50ms"')
    async with in_process(config) as d:
        async def tidied() -> bool:
            return metric_value(await d.metrics(), "prestaged_state_tidied_rows_total",
                                what="files") == 2.0
        await until("the daemon tidied", tidied)
    assert _file_ids(backend) == {url_id(_refs("g", 1)[0].url)}


def test_a_member_written_during_a_tidy_keeps_its_file(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL: a member another connection adds to an unlisted file while a tidy runs
    keeps the file (and itself): the tidy waits for memberships to settle, where its DELETE
    would otherwise miss the member and cascade it away."""
    from prestaged.state.postgres import connect

    store = Store(tmp_path / "unused.db", url=pg_url).open()
    orphan = _refs("x", 2)[1]
    try:
        _run(store, "a", _refs("x", 2))
        _run(store, "a", _refs("x", 1))  # x1 left a: its file is unlisted
        with connect(pg_url, application_name="other-writer") as other:
            other.execute("BEGIN")
            other.execute("INSERT INTO members (definition_id, file_id, listed) SELECT id, %s, 0 "
                          "FROM definitions WHERE name = 'a'", (url_id(orphan.url),))
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                tidying = pool.submit(store.tidy)

                def waiting() -> bool:
                    with connect(pg_url) as look:
                        return bool(look.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchall())
                poll("the tidy waiting on a lock", lambda: tidying.done() or waiting())
                assert not tidying.done(), tidying.result()
                other.execute("COMMIT")
                done = tidying.result(timeout=30)
    finally:
        store.close()
    assert done.files == 0
    backend = Backend("postgresql", tmp_path, pg_url)
    assert url_id(orphan.url) in _file_ids(backend)
    assert backend.query("SELECT COUNT(*) FROM members") == [(2,)]
