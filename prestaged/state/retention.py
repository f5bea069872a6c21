"""What the state keeps, and for how long: a definition's newest runs (``[state] keep_runs``),
files while a definition lists them or a pin of prestaged's holds them, a watch's last round;
and ``forget``, which drops a definition and what only it kept.

A daemon writes for months: every run adds a row, every file a definition ever listed stays in
``files`` after it left (``_record_listing`` drops only the membership), and every watch round
of a shared state leaves its round and chunk rows. Nothing of that is read again once newer
rows exist, and a state that only grows makes every start's ``quick_check`` and every copy
slower. The functions here run inside the caller's write transaction (``Store``) on either
engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prestaged.state.db import Database

__all__ = ["Tidied", "forget", "hold_members", "keep_newest_runs", "tidy"]


@dataclass(frozen=True)
class Tidied:
    """Rows a tidy (or a ``forget``) removed."""

    runs: int = 0
    files: int = 0
    rounds: int = 0

    def __bool__(self) -> bool:
        return bool(self.runs or self.files or self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """``{"runs": n, "files": n, "rounds": n}``."""
        return asdict(self)


def keep_newest_runs(conn: Database, def_id: int, keep: int) -> int:
    """Drop the runs of definition ``def_id`` older than its ``keep`` newest (0: keep every
    run); the runs removed. Uses the ``runs_by_definition`` index: it reads ``keep`` index
    entries, whatever the history's length."""
    if keep <= 0:
        return 0
    cut = conn.execute("SELECT started, id FROM runs WHERE definition_id = ? "
                       "ORDER BY started DESC, id DESC LIMIT 1 OFFSET ?", (def_id, keep)).fetchone()
    if cut is None:
        return 0
    return int(conn.execute("DELETE FROM runs WHERE definition_id = ? AND "
                            "(started < ? OR (started = ? AND id <= ?))",
                            (def_id, cut[0], cut[0], cut[1])).rowcount)


def tidy(conn: Database, keep_runs: int, now: float) -> Tidied:
    """Drop, in ``conn``'s transaction: every definition's runs beyond its ``keep_runs``
    newest (0: none); files no definition lists and no unexpired pin of prestaged's holds
    (``now``: Unix seconds; a pinned file's request is followed or released by a later run
    that lists it again); and finished watch rounds but the last of each watch."""
    hold_members(conn)
    runs = 0
    if keep_runs > 0:
        # Runs end pruned (Store.finish_run): only a lowered keep_runs, or definitions that
        # stopped running since, leave more. Counting on the index finds them in 0.1 s at
        # 2,000,000 runs, where a window over every run took 1.4 s.
        over = conn.execute("SELECT definition_id FROM runs GROUP BY definition_id "
                            "HAVING COUNT(*) > ?", (keep_runs,)).fetchall()
        runs = sum(keep_newest_runs(conn, row[0], keep_runs) for row in over)
    rounds = conn.execute(
        "DELETE FROM watch_rounds WHERE finished IS NOT NULL AND id NOT IN "
        "(SELECT MAX(id) FROM watch_rounds GROUP BY catalog, definition)").rowcount
    return Tidied(int(runs), _orphan_files(conn, now), int(rounds))


def hold_members(conn: Database) -> None:
    """Keep memberships from changing until ``conn``'s transaction ends: PostgreSQL only (a
    SQLite write transaction holds the whole file already).

    Without it, a member that the writer process commits while unlisted files are deleted is
    not in the DELETE's snapshot: its file is deleted as unlisted, and the cascade takes the
    new member with it, so the definition loses a file until its next listing (and the gate
    counts one file fewer). SHARE waits for the writers in flight and holds new ones back
    for the tidy's second or two. Take it first, before any row lock, so that no writer
    waits on the tidy while holding what the tidy waits for."""
    if conn.dialect.name != "sqlite":
        conn.execute("LOCK TABLE members IN SHARE MODE")


def _orphan_files(conn: Database, now: float) -> int:
    """Delete the files no definition lists and no unexpired pin (or open stage request)
    holds; how many."""
    # SQLite evaluates NOT IN's list once into a temporary index (0.1 s at 300,000 files);
    # its NOT EXISTS would scan members once per file, members having no index on file_id.
    # PostgreSQL plans NOT EXISTS as an anti-join; its NOT IN hashes the list only within
    # work_mem and otherwise rescans it per file.
    unlisted = ("id NOT IN (SELECT file_id FROM members)" if conn.dialect.name == "sqlite"
                else "NOT EXISTS (SELECT 1 FROM members m WHERE m.file_id = files.id)")
    return int(conn.execute(f"DELETE FROM files WHERE {unlisted} AND {_UNPINNED}",
                            (now, now)).rowcount)


# No pin holds the file: none landed that has not expired, and no stage request still open
# that was made within the pin lifetime it asked for (a rerun listing the file again follows
# that request rather than asking anew; its pin starts only when it lands).
_UNPINNED = ("(pinned_until IS NULL OR pinned_until <= ?) AND NOT COALESCE(staged_at IS NULL "
             "AND stage_ended IS NULL AND stage_created + stage_lifetime > ?, FALSE)")


def forget(conn: Database, def_id: int, catalog: str, definition: str, now: float) -> Tidied:
    """Drop definition ``def_id`` (``catalog:definition``) with its members, runs, watch
    rounds and watch schedule, then every file no definition lists any more and no unexpired
    pin holds (as ``tidy``); the caller holds the members (``hold_members``) and has checked
    that nothing is running on it."""
    runs = conn.execute("DELETE FROM runs WHERE definition_id = ?", (def_id,)).rowcount
    conn.execute("DELETE FROM members WHERE definition_id = ?", (def_id,))
    conn.execute("DELETE FROM definitions WHERE id = ?", (def_id,))
    rounds = conn.execute("DELETE FROM watch_rounds WHERE catalog = ? AND definition = ?",
                          (catalog, definition)).rowcount
    conn.execute("DELETE FROM watch_schedule WHERE catalog = ? AND definition = ?",
                 (catalog, definition))
    return Tidied(int(runs), _orphan_files(conn, now), int(rounds))
