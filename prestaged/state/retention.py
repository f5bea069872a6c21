"""What the state keeps, and for how long: a definition's newest runs (``[state] keep_runs``),
files while a definition lists them or a pin of prestaged's holds them, a watch's last round,
a finished campaign for ``[state] keep_campaigns``; and ``forget``, which drops a definition
and what only it kept, and ``forget_campaign``, which drops a finished campaign.

A daemon writes for months: every run adds a row, every file a definition ever listed stays in
``files`` after it left (``_record_listing`` drops only the membership), and every watch round
of a shared state leaves its round and chunk rows. Nothing of that is read again once newer
rows exist, and a state that only grows makes every start's ``quick_check`` and every copy
slower. The functions here run inside the caller's write transaction (``Store``) on either
engine.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Optional

from prestaged.state.db import Database

__all__ = ["Tidied", "campaign_unfinished", "forget", "forget_campaign", "hold_members",
           "keep_newest_runs", "tidy", "unsettled"]


@dataclass(frozen=True)
class Tidied:
    """Rows a tidy (or a ``forget``) removed; ``campaigns``: finished campaigns a tidy
    dropped (``forgotten``: their names), every row of theirs with them."""

    runs: int = 0
    files: int = 0
    rounds: int = 0
    campaigns: int = 0
    forgotten: tuple[str, ...] = field(default=(), compare=False)

    def __bool__(self) -> bool:
        return bool(self.runs or self.files or self.rounds or self.campaigns)

    def to_dict(self) -> dict[str, Any]:
        """``{"runs": n, "files": n, "rounds": n}`` (what a definition's ``forget`` drops)."""
        return {"runs": self.runs, "files": self.files, "rounds": self.rounds}


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


def tidy(conn: Database, keep_runs: int, now: float, keep_campaigns: float = 0.0,
         spare: Collection[str] = ()) -> Tidied:
    """Drop, in ``conn``'s transaction: every definition's runs beyond its ``keep_runs``
    newest (0: none); files no definition lists and no unexpired pin of prestaged's holds
    (``now``: Unix seconds; a pinned file's request is followed or released by a later run
    that lists it again); finished watch rounds but the last of each watch; and campaigns
    finished more than ``keep_campaigns`` seconds ago (0: none), but those in ``spare`` (the
    caller runs them) and those ``campaign_unfinished`` finds unfinished now."""
    hold_members(conn)
    forgotten = []
    if keep_campaigns > 0:
        old = conn.execute("SELECT campaign FROM campaign_ends WHERE finished < ? "
                           "ORDER BY finished", (now - keep_campaigns,)).fetchall()
        for (name,) in old:
            if name not in spare and campaign_unfinished(conn, name, now) is None:
                forget_campaign(conn, name)
                forgotten.append(name)
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
    return Tidied(int(runs), _orphan_files(conn, now), int(rounds), len(forgotten),
                  tuple(forgotten))


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


# --- campaigns -------------------------------------------------------------------------------

# A submission nothing more will happen to: completed, cancelled, superseded by a retry (its
# successor goes on), or stopped for good by a cancel of its stage or campaign (submitted,
# failed or launch_failed there: never followed, and a retry there is refused). launch_unknown
# never is: whether it launched is for a person to find out (mark-submitted records it), and
# failed or launch_failed elsewhere wait for a retry.
_UNSETTLED = (
    "SELECT s.id, s.stage, s.state FROM campaign_submissions s WHERE s.campaign = ? "
    "AND s.state NOT IN ('completed', 'cancelled') AND s.superseded_by IS NULL "
    "AND NOT (s.state IN ('submitted', 'failed', 'launch_failed') AND EXISTS ("
    "SELECT 1 FROM campaign_controls c WHERE c.campaign = s.campaign "
    "AND c.stage IN ('', s.stage) AND c.cancelled <> 0)) ORDER BY s.id")


def unsettled(conn: Database, campaign: str) -> list[tuple[int, str, str]]:
    """The submissions of ``campaign`` something may still happen to (see ``_UNSETTLED``):
    (id, stage, state), by id."""
    return [(int(r[0]), str(r[1]), str(r[2]))
            for r in conn.execute(_UNSETTLED, (campaign,)).fetchall()]


def campaign_unfinished(conn: Database, campaign: str, now: float,
                        mine: Optional[str] = None) -> Optional[str]:
    """Why ``campaign`` is not finished (a phrase), or None when it is: its last run or pass
    ended with every stage done or cancelled (``campaign_ends``) and no submission was made
    since, every submission is settled (``unsettled``), and no daemon holds its lease (one is
    running it), unless it is ``mine`` (the caller's own). On PostgreSQL the ``campaign_ends``
    row is locked until the transaction ends: a submission created meanwhile waits for it."""
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    open_subs = unsettled(conn, campaign)
    if open_subs:
        shown = ", ".join(f"#{i} {stage} {state}" for i, stage, state in open_subs[:5])
        more = f" and {len(open_subs) - 5} more" if len(open_subs) > 5 else ""
        return (f"submission{'s' if len(open_subs) > 1 else ''} {shown}{more} "
                f"{'are' if len(open_subs) > 1 else 'is'} not final (launch_unknown: "
                "mark-submitted or retry it; failed or launch_failed: retry it or cancel its "
                "stage)")
    if conn.execute(f"SELECT finished FROM campaign_ends WHERE campaign = ?{lock}",
                    (campaign,)).fetchone() is None:
        return ("no run of it has ended with every stage done or cancelled since its last "
                "submission was made (run it, or cancel it, to its end)")
    row = conn.execute("SELECT lease_owner FROM campaigns WHERE name = ? AND lease_until >= ?",
                       (campaign, now)).fetchone()
    if row is not None and row[0] is not None and row[0] != mine:
        return f"{row[0]} is running it now"
    return None


def forget_campaign(conn: Database, campaign: str) -> dict[str, int]:
    """Drop every row of ``campaign`` (its registration, submissions, their transitions, its
    ledger, controls and end), in ``conn``'s transaction; the rows dropped by kind. The caller
    has checked that it is finished (``campaign_unfinished``)."""
    def delete(sql: str) -> int:
        return int(conn.execute(sql, (campaign,)).rowcount)

    subs = "SELECT id FROM campaign_submissions WHERE campaign = ?"
    out = {"events": delete(f"DELETE FROM submission_events WHERE submission_id IN ({subs})"),
           "ledger": delete("DELETE FROM campaign_ledger WHERE campaign = ?")}
    # superseded_by points within the campaign: cleared first, so that no row is ever left
    # pointing at a deleted one, whatever order an engine deletes in.
    conn.execute("UPDATE campaign_submissions SET superseded_by = NULL WHERE campaign = ? "
                 "AND superseded_by IS NOT NULL", (campaign,))
    out["submissions"] = delete("DELETE FROM campaign_submissions WHERE campaign = ?")
    out["controls"] = delete("DELETE FROM campaign_controls WHERE campaign = ?")
    out["registration"] = delete("DELETE FROM campaigns WHERE name = ?")
    delete("DELETE FROM campaign_ends WHERE campaign = ?")
    return out
