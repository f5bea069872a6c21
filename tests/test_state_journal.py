"""The SQLite state keeps WAL on a local filesystem and uses the rollback journal on a network
one (NFS, AFS...), where WAL's shared memory works on one host only (``state.mounts``)."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cli_runner import entry_point, subprocess_env
from conftest import Backend

from prestaged.model import FileRef
from prestaged.state import mounts
from prestaged.state.store import Store
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import ThreadedStorageServer


def _mountinfo(path: Path, *mounts_: tuple[str, str]) -> Path:
    """A mount table in ``/proc/self/mountinfo``'s format with (mount point, type) rows."""
    lines = [f"{20 + i} 1 0:{i} / {point} rw,relatime shared:{i} - {kind} src{i} rw"
             for i, (point, kind) in enumerate(mounts_)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _journal(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    finally:
        conn.close()


def _fill(store: Store, n: int) -> None:
    """``n`` warm files of one definition, written (the writer process commits them)."""
    refs = [FileRef(name=f"f{i}", url=f"https://door.example/f{i}") for i in range(n)]
    store.add_members("local", "ds", refs)
    for r in refs:
        store.record(r.url, r.name, "warm", 206, 4, 1, "")
    store.flush()


def test_mount_table_deepest_point_and_last_mounted_win(tmp_path: Path) -> None:
    """The deepest mount point above a path names its filesystem, a later mount on the same
    point hides an earlier one, escaped mount points are read, and a missing table is None."""
    table = _mountinfo(tmp_path / "mountinfo", ("/", "ext4"), ("/home", "nfs4"),
                       ("/home/alice/scratch", "xfs"), ("/mnt/my\\040disk", "ext4"),
                       ("/mnt/my\\040disk", "fuse.eosxd"), ("/hom", "tmpfs"))
    assert mounts.filesystem_of(Path("/home/alice/.local/state/x.db"), table) == "nfs4"
    assert mounts.filesystem_of(Path("/home/alice/scratch/state.db"), table) == "xfs"
    assert mounts.filesystem_of(Path("/mnt/my disk/state.db"), table) == "fuse.eosxd"
    assert mounts.filesystem_of(Path("/var/lib/prestaged/state.db"), table) == "ext4"
    assert mounts.network_filesystem(Path("/home/bob/state.db"), table) == "nfs4"
    assert mounts.network_filesystem(Path("/home/alice/scratch/s.db"), table) is None
    assert mounts.filesystem_of(Path("/home"), tmp_path / "absent") is None
    # This machine's own table parses: some type for the test's directory.
    assert mounts.filesystem_of(tmp_path) not in (None, "")


def test_local_file_is_wal_network_file_is_rollback(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A new state file gets WAL on a local filesystem, and the rollback journal (with no -wal
    file left behind, every row kept) where the mount table says NFS."""
    local = Store(tmp_path / "local.db").open()
    _fill(local, 10)
    local.close()
    assert _journal(tmp_path / "local.db") == "wal"

    shared = tmp_path / "home"
    shared.mkdir()
    monkeypatch.setattr(mounts, "MOUNTINFO", _mountinfo(tmp_path / "mountinfo", ("/", "ext4"),
                                                        (str(shared), "nfs4")))
    store = Store(shared / "state.db", batch=3).open()
    _fill(store, 10)
    store.close()
    db = shared / "state.db"
    assert _journal(db) == "delete"
    assert not (shared / "state.db-wal").exists()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 10
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_wal_file_found_on_nfs_leaves_wal_unless_another_has_it_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A WAL state file (made before, or on a local disk) opened on NFS is switched to the
    rollback journal, saying so; while another process holds it in WAL it stays WAL, with a
    warning, and the store still works."""
    db = tmp_path / "state.db"
    Store(db).open().close()
    assert _journal(db) == "wal"
    monkeypatch.setattr(mounts, "MOUNTINFO", _mountinfo(tmp_path / "mountinfo", ("/", "ext4"),
                                                        (str(tmp_path), "nfs")))
    other = sqlite3.connect(db)
    try:
        other.execute("SELECT COUNT(*) FROM files").fetchone()  # holds the WAL index open
        with caplog.at_level(logging.WARNING, logger="prestaged.state.schema"):
            store = Store(db, busy_timeout=0.2).open()
        _fill(store, 5)
        store.close()
        assert _journal(db) == "wal"
        assert any("stays in WAL mode" in r.getMessage() and "on nfs" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        other.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prestaged.state.schema"):
        Store(db).open().close()
    assert _journal(db) == "delete"
    assert any("journal WAL -> DELETE" in r.getMessage() for r in caplog.records), caplog.text


def test_forced_journal_wins_over_the_mount_table(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``journal = "wal"`` keeps WAL on NFS; ``journal = "delete"`` uses the rollback journal on
    a local disk; anything else is refused."""
    monkeypatch.setattr(mounts, "MOUNTINFO", _mountinfo(tmp_path / "mountinfo",
                                                        ("/", "nfs4")))
    Store(tmp_path / "a.db", journal="wal").open().close()
    assert _journal(tmp_path / "a.db") == "wal"
    monkeypatch.setattr(mounts, "MOUNTINFO", _mountinfo(tmp_path / "mountinfo", ("/", "ext4")))
    Store(tmp_path / "b.db", journal="delete").open().close()
    assert _journal(tmp_path / "b.db") == "delete"
    with pytest.raises(ValueError, match="journal must be auto, wal or delete"):
        Store(tmp_path / "c.db", journal="truncate")


@pytest.mark.slow
def test_two_cli_runs_share_a_rollback_journal_state(
        pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path) -> None:
    """Two concurrent ``prestaged warm`` processes (each with its writer process) on one state
    file in rollback-journal mode (``[state] journal = "delete"``) keep every result."""
    backend = Backend("sqlite", tmp_path, None)
    state = backend.cli('journal = "delete"\nbatch = 50\nflush_interval = "50ms"')
    procs = []
    for name in ("one", "two"):
        listing = tmp_path / f"{name}.txt"
        listing.write_text("".join(storage.url(f"/{name}/f{i:04d}") + "\n" for i in range(1500)))
        procs.append(subprocess.Popen(
            entry_point("warm", str(listing), "--proxy", str(proxy), "--ca-dir",
                        str(pki.ca_dir), *state, "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()))
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert json.loads(out)["counts"]["warm"] == 1500
    assert _journal(backend.path) == "delete"
    assert backend.query("SELECT COUNT(*) FROM files") == [(3000,)]
    assert backend.query("PRAGMA integrity_check") == [("ok",)]
    assert backend.query("SELECT COUNT(*) FROM runs WHERE ended IS NOT NULL") == [(2,)]


def test_a_file_migrated_by_another_process_mid_check_is_not_something_else(
        tmp_path: Path) -> None:
    """Of two processes opening a new state file together, the second must not read the
    version before the first's migration commits and the tables after it: it then took the
    file for "a SQLite database of something else" and refused it (exit 2; CI saw it once in
    two concurrent warms). Here the first commits exactly between those two reads."""
    from prestaged.state import schema

    path = tmp_path / "s.db"
    first = sqlite3.connect(path, isolation_level=None)
    first.execute("PRAGMA journal_mode = WAL")
    first.execute("BEGIN IMMEDIATE")
    for target in range(1, schema.SCHEMA_VERSION + 1):
        for statement in schema.SQLITE.statements(target):
            first.execute(statement)
    first.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
    second = sqlite3.connect(path, isolation_level=None, timeout=10)

    def commit_the_first_between_the_reads(statement: str) -> None:
        if "sqlite_master" in statement and first.in_transaction:
            first.execute("COMMIT")
    second.set_trace_callback(commit_the_first_between_the_reads)
    schema.migrate(second, path)  # raised StateError "a SQLite database of something else"
    assert not first.in_transaction  # the interleaving above did happen
    assert second.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    first.close()
    second.close()
