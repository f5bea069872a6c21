"""Several daemons on one state database (issue 16): members, leases, watch rounds and chunks.

No consensus of our own: the database's transactions and row locks are the coordination.

- **Members.** Each daemon registers a row (``cluster_members``) at start and heartbeats it; a
  member whose heartbeat is older than the lease is dead (``Member.alive``).
- **Leases.** A piece of work (a campaign, a watch's schedule, a chunk of a watch round) has
  ``lease_owner`` and ``lease_until`` columns. A member claims a row whose lease is free or has
  expired (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so members never wait for each
  other's claims; SQLite's ``BEGIN IMMEDIATE`` serialises them), renews it at a third of the
  lease while it works, and gives it up when done. A member that dies stops renewing: its
  leases expire and the next claim by another member takes the work over.
- **Times** in leases and heartbeats are the DATABASE's clock (``now_sql``), never a member's:
  members on several hosts then agree on what has expired whatever their clocks say.
- **Watch rounds.** The member that claims a due watch schedule lists the definition once and
  stores the round as chunks of ``[cluster] chunk`` files; every member claims chunks and warms
  them, so N members warm one large definition about N times as fast.

Everything here is synchronous (callers use ``asyncio.to_thread``) and runs on either engine.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from prestaged.model import FileRef, redact
from prestaged.state.db import Database
from prestaged.state.store import Store

__all__ = [
    "Chunk",
    "Member",
    "Round",
    "claim_campaign",
    "claim_chunk",
    "claim_schedule",
    "ensure_schedule",
    "finish_chunk",
    "forget_dead_local",
    "heartbeat",
    "holds_campaign",
    "leases_held",
    "leave",
    "members",
    "new_member_id",
    "plan_round",
    "poke_campaign",
    "pokes",
    "register_member",
    "release_campaign",
    "release_schedule",
    "renew",
]

_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())::double precision",
}


def now_sql(conn: Database) -> str:
    """SQL for the database's current time in Unix seconds (a float) on ``conn``'s engine."""
    return _NOW[conn.dialect.name]


def _lock(conn: Database) -> str:
    """Row-lock clause for a claim: PostgreSQL skips rows another member is claiming now;
    SQLite has no row locks (its transaction holds the whole file)."""
    return " FOR UPDATE SKIP LOCKED" if conn.dialect.name == "postgresql" else ""


def _free(conn: Database) -> str:
    """A lease that may be taken: nobody's, or expired."""
    return f"(lease_owner IS NULL OR lease_until < {now_sql(conn)})"


# --- members ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One row of ``cluster_members`` as ``members()`` reads it; ``age`` is seconds since its last
    heartbeat by the database's clock."""

    id: str
    host: str
    pid: int
    listen: Optional[str]
    version: Optional[str]
    started: float
    heartbeat: float
    age: float
    leases: int
    """Leases it holds now (campaigns, schedules, chunks)."""

    def alive(self, lease: float) -> bool:
        """Whether it heartbeat within ``lease`` seconds."""
        return self.age <= lease

    def to_dict(self, lease: float) -> dict[str, Any]:
        """JSON-ready form with ``alive``."""
        return {**self.__dict__, "alive": self.alive(lease)}


def new_member_id() -> str:
    """A member id new at every start: ``host:pid:random`` (a restarted daemon with a reused
    pid is a new member; its predecessor's leases still expire)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def register_member(store: Store, member_id: str, *, listen: Optional[str],
                    version: str) -> None:
    """Add this daemon to ``cluster_members`` with a first heartbeat."""
    host, pid = socket.gethostname(), os.getpid()
    with store.transaction() as conn:
        now = now_sql(conn)
        conn.execute(f"INSERT INTO cluster_members (id, host, pid, listen, version, started, "
                     f"heartbeat) VALUES (?, ?, ?, ?, ?, {now}, {now})",
                     (member_id, host, pid, listen, version))


def heartbeat(store: Store, member_id: str, *, forget_after: float) -> bool:
    """Heartbeat ``member_id``; also forget members silent for ``forget_after`` seconds (a dead
    member's row is kept that long for people to see). False when our row is gone (another
    member forgot us after a long partition): the caller registers again."""
    with store.transaction() as conn:
        now = now_sql(conn)
        found = conn.execute(f"UPDATE cluster_members SET heartbeat = {now} WHERE id = ?",
                             (member_id,)).rowcount
        conn.execute(f"DELETE FROM cluster_members WHERE heartbeat < {now} - ?", (forget_after,))
    return found == 1


def forget_dead_local(store: Store) -> list[str]:
    """Members of this host whose process is gone (killed, crashed): give up their leases and
    drop their rows, so that a daemon restarted here resumes their work at once rather than
    after their leases expire. Returns their ids. Hosts of one cluster must have distinct host
    names (a pid means nothing on another host)."""
    host = socket.gethostname()
    with store.transaction() as conn:
        rows = conn.execute("SELECT id, pid FROM cluster_members WHERE host = ?",
                            (host,)).fetchall()
    gone = [r[0] for r in rows if not _running(int(r[1]))]
    for member_id in gone:
        leave(store, member_id)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def leave(store: Store, member_id: str) -> None:
    """A clean stop: give up every lease of ``member_id`` (others take its work at once
    instead of after the lease) and remove its row."""
    with store.transaction() as conn:
        for table in ("campaigns", "watch_schedule", "round_chunks"):
            conn.execute(f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL "
                         "WHERE lease_owner = ?", (member_id,))
        conn.execute("DELETE FROM cluster_members WHERE id = ?", (member_id,))


def members(store: Store) -> list[Member]:
    """Every member, oldest first, with its age and the leases it holds."""
    with store.transaction() as conn:
        now = now_sql(conn)
        held = " + ".join(
            f"(SELECT COUNT(*) FROM {t} WHERE lease_owner = m.id AND lease_until >= {now})"
            for t in ("campaigns", "watch_schedule", "round_chunks"))
        rows = conn.execute(f"SELECT id, host, pid, listen, version, started, heartbeat, "
                            f"{now} - heartbeat, {held} FROM cluster_members m "
                            "ORDER BY started, id").fetchall()
    return [Member(r[0], r[1], int(r[2]), r[3], r[4], float(r[5]), float(r[6]),
                   max(0.0, float(r[7])), int(r[8])) for r in rows]


def leases_held(store: Store, member_id: str) -> dict[str, int]:
    """Unexpired leases ``member_id`` holds, per kind (campaign, watch, chunk)."""
    out = {}
    with store.transaction() as conn:
        now = now_sql(conn)
        for kind, table in (("campaign", "campaigns"), ("watch", "watch_schedule"),
                            ("chunk", "round_chunks")):
            row = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE lease_owner = ? AND "
                               f"lease_until >= {now}", (member_id,)).fetchone()
            out[kind] = int(row[0])
    return out


# --- campaign leases --------------------------------------------------------------------------


def claim_campaign(store: Store, name: str, member_id: str,
                   lease: float) -> tuple[bool, Optional[str]]:
    """Take (or keep) the lease on campaign ``name`` for ``lease`` seconds.

    Returns (whether we hold it now, the member we took it over from when its lease had
    expired: None for a free campaign or one already ours). (False, holder) when another
    member holds it; (False, None) when the campaign is gone or being claimed right now."""
    with store.transaction() as conn:
        now = now_sql(conn)
        row = conn.execute(f"SELECT lease_owner, lease_until < {now} FROM campaigns "
                           f"WHERE name = ?{_lock(conn)}", (name,)).fetchone()
        if row is None:
            return False, None
        owner, expired = row[0], bool(row[1])
        if owner is not None and owner != member_id and not expired:
            return False, owner
        since = "lease_since" if owner == member_id else now
        conn.execute(f"UPDATE campaigns SET lease_owner = ?, lease_until = {now} + ?, "
                     f"lease_since = {since} WHERE name = ?", (member_id, lease, name))
    return True, owner if owner not in (None, member_id) else None


def holds_campaign(conn: Database, name: str, member_id: str, *, strict: bool = True) -> bool:
    """Inside a transaction: whether ``member_id`` holds the lease on campaign ``name``
    (``strict``: unexpired; else: expired leases count until another member takes them),
    locking that row until the transaction ends (PostgreSQL), so that no claim by another
    member can come between this check and the transaction's writes."""
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    fresh = f" AND lease_until >= {now_sql(conn)}" if strict else ""
    row = conn.execute(f"SELECT 1 FROM campaigns WHERE name = ? AND lease_owner = ?{fresh}"
                       f"{lock}", (name, member_id)).fetchone()
    return row is not None


def release_campaign(store: Store, name: str, member_id: str) -> None:
    """Give up our lease on campaign ``name`` (no-op when it is not ours)."""
    with store.transaction() as conn:
        conn.execute("UPDATE campaigns SET lease_owner = NULL, lease_until = NULL "
                     "WHERE name = ? AND lease_owner = ?", (name, member_id))


def poke_campaign(store: Store, name: str) -> None:
    """An operator acted on ``name`` through this member: the member driving it looks again
    (``pokes``)."""
    with store.transaction() as conn:
        conn.execute(f"UPDATE campaigns SET poked = {now_sql(conn)} WHERE name = ?", (name,))


def pokes(store: Store) -> dict[str, tuple[Optional[float], float, Optional[str]]]:
    """Every stored campaign: (when an operator last acted on it, when its file was last
    stored, the member holding its lease now)."""
    with store.transaction() as conn:
        rows = conn.execute(f"SELECT name, poked, updated, CASE WHEN lease_until >= "
                            f"{now_sql(conn)} THEN lease_owner END FROM campaigns").fetchall()
    return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}


def renew(store: Store, kind: str, key: Sequence[Any], member_id: str, lease: float) -> bool:
    """Extend our lease on one row (``kind`` campaign: key (name,); chunk: (round, idx);
    watch: (catalog, definition), the schedule held while listing) by ``lease`` seconds from
    now; False when it is no longer ours (taken over after it expired, or the row is gone):
    the caller stops that work."""
    where = {"campaign": ("campaigns", "name = ?"),
             "chunk": ("round_chunks", "round_id = ? AND idx = ? AND done IS NULL"),
             "watch": ("watch_schedule", "catalog = ? AND definition = ?")}[kind]
    with store.transaction() as conn:
        found = conn.execute(f"UPDATE {where[0]} SET lease_until = {now_sql(conn)} + ? "
                             f"WHERE {where[1]} AND lease_owner = ?",
                             (lease, *key, member_id)).rowcount
    return found == 1


# --- watch rounds -----------------------------------------------------------------------------


def ensure_schedule(store: Store, catalog: str, definition: str, first_due: float) -> None:
    """Add the schedule of a watched definition, due at ``first_due`` (Unix seconds), unless
    another member added it already (then its schedule stands)."""
    with store.transaction() as conn:
        conn.execute("INSERT INTO watch_schedule (catalog, definition, next_due) "
                     "VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (catalog, definition, first_due))


def claim_schedule(store: Store, catalog: str, definition: str, member_id: str,
                   lease: float) -> bool:
    """Take the lease on a watch's schedule when a round is due and no earlier round of it
    still has unfinished chunks (rounds never pile up behind slow storage). The holder lists
    the definition and calls ``plan_round``."""
    with store.transaction() as conn:
        now = now_sql(conn)
        row = conn.execute(
            f"SELECT 1 FROM watch_schedule s WHERE catalog = ? AND definition = ? "
            f"AND next_due <= {now} AND {_free(conn)} AND NOT EXISTS (SELECT 1 FROM "
            "watch_rounds r JOIN round_chunks c ON c.round_id = r.id WHERE r.catalog = "
            "s.catalog AND r.definition = s.definition AND c.done IS NULL)"
            f"{_lock(conn)}", (catalog, definition)).fetchone()
        if row is None:
            return False
        conn.execute(f"UPDATE watch_schedule SET lease_owner = ?, lease_until = {now} + ? "
                     "WHERE catalog = ? AND definition = ?",
                     (member_id, lease, catalog, definition))
    return True


@dataclass(frozen=True)
class Round:
    """A planned watch round: its id and how many chunks it has."""

    id: int
    files: int
    chunks: int


def plan_round(store: Store, catalog: str, definition: str, member_id: str, *,
               refs: Sequence[FileRef], chunk: int, fresh_for: float,
               next_in: float) -> Optional[Round]:
    """Store a round of ``refs`` (the listed definition) cut into chunks of ``chunk`` files,
    set the schedule due again ``next_in`` seconds from now and give up its lease, all in one
    transaction; None (nothing stored) when our schedule lease was lost meanwhile. When the
    round's last chunk is done the schedule is set due ``next_in`` after that instead
    (``finish_chunk``), as a daemon alone waits ``every`` after a run ends: otherwise the files
    a long round touched last would still be fresh (0.8 ``every``) when the next one came.

    URLs are stored as ``model.redact`` shows them: a URL with a password or a token in it
    is refused (``ValueError``) rather than written to the shared state."""
    leaky = next((r.url for r in refs if redact(r.url) != r.url), None)
    if leaky is not None:
        raise ValueError(f"{redact(leaky)}: a URL with a password or a token (user:password, "
                         "password=, authz=...) cannot be shared between members")
    with store.transaction() as conn:
        now = now_sql(conn)
        held = conn.execute(f"SELECT 1 FROM watch_schedule WHERE catalog = ? AND definition = ?"
                            f" AND lease_owner = ? AND lease_until >= {now}",
                            (catalog, definition, member_id)).fetchone()
        if held is None:
            return None
        pieces = [refs[i:i + chunk] for i in range(0, len(refs), chunk)]
        round_id = conn.insert(
            f"INSERT INTO watch_rounds (catalog, definition, fresh_for, created, created_by, "
            f"files, chunks, next_in) VALUES (?, ?, ?, {now}, ?, ?, ?, ?)",
            (catalog, definition, fresh_for, member_id, len(refs), len(pieces), next_in))
        conn.executemany(
            "INSERT INTO round_chunks (round_id, idx, files, n_files) VALUES (?, ?, ?, ?)",
            [(round_id, i, json.dumps([[r.name, r.url, r.size] for r in piece],
                                      separators=(",", ":")), len(piece))
             for i, piece in enumerate(pieces)])
        conn.execute(f"UPDATE watch_schedule SET next_due = {now} + ?, lease_owner = NULL, "
                     "lease_until = NULL WHERE catalog = ? AND definition = ?",
                     (next_in, catalog, definition))
    return Round(round_id, len(refs), len(pieces))


def release_schedule(store: Store, catalog: str, definition: str, member_id: str,
                     retry_in: float) -> None:
    """Give up a schedule lease without a round (the definition could not be listed): it is
    due again ``retry_in`` seconds from now, for whichever member comes first."""
    with store.transaction() as conn:
        conn.execute(f"UPDATE watch_schedule SET next_due = {now_sql(conn)} + ?, "
                     "lease_owner = NULL, lease_until = NULL WHERE catalog = ? AND "
                     "definition = ? AND lease_owner = ?",
                     (retry_in, catalog, definition, member_id))


@dataclass(frozen=True)
class Chunk:
    """A chunk of a watch round claimed by this member."""

    round_id: int
    idx: int
    catalog: str
    definition: str
    fresh_for: float
    refs: list[FileRef]
    taken_from: Optional[str]
    """The member whose expired lease we took it over from (None: it was free)."""

    @property
    def key(self) -> tuple[int, int]:
        """(round, idx) as ``renew`` and ``finish_chunk`` take it."""
        return (self.round_id, self.idx)


def claim_chunk(store: Store, member_id: str, lease: float, *,
                orphans_only: bool = False) -> Optional[Chunk]:
    """Claim the oldest unfinished chunk whose lease is free or expired (``orphans_only``:
    expired only, another member's: one of ours whose renewal is late is still being warmed
    here); None when there is none. Members claim different chunks at once (``SKIP LOCKED``)."""
    free = "c.lease_owner <> ?" if orphans_only else "(c.lease_owner IS NULL OR"
    with store.transaction() as conn:
        now = now_sql(conn)
        expired = f"c.lease_until < {now}"
        row = conn.execute(
            "SELECT c.round_id, c.idx, c.files, c.lease_owner, r.catalog, r.definition, "
            "r.fresh_for FROM round_chunks c JOIN watch_rounds r ON r.id = c.round_id "
            "WHERE c.done IS NULL AND "
            + (f"{free} AND {expired}" if orphans_only else f"{free} {expired})")
            + " ORDER BY c.round_id, c.idx LIMIT 1"
            + (" FOR UPDATE OF c SKIP LOCKED" if conn.dialect.name == "postgresql" else ""),
            (member_id,) if orphans_only else ()).fetchone()
        if row is None:
            return None
        taken_from = row[3]
        conn.execute(f"UPDATE round_chunks SET lease_owner = ?, lease_until = {now} + ?, "
                     f"lease_since = {now}, takeovers = takeovers + ? WHERE round_id = ? AND "
                     "idx = ?", (member_id, lease, int(taken_from is not None), row[0], row[1]))
    refs = [FileRef(name, url, size) for name, url, size in json.loads(row[2])]
    return Chunk(int(row[0]), int(row[1]), row[4], row[5], float(row[6]), refs, taken_from)


def last_finished_round(store: Store, catalog: str, definition: str) -> Optional[int]:
    """The id of the latest round of a watch whose chunks are all done, or None."""
    with store.transaction() as conn:
        row = conn.execute("SELECT MAX(id) FROM watch_rounds WHERE catalog = ? AND "
                           "definition = ? AND finished IS NOT NULL",
                           (catalog, definition)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def finish_chunk(store: Store, chunk: Chunk, member_id: str,
                 exit_code: int) -> tuple[bool, bool]:
    """Record ``chunk`` done by ``member_id`` and drop its file list. Returns (whether we
    recorded it: False when another member took it over meanwhile, whose run then records it;
    whether that completed its round). The round's row is locked first, so of
    members finishing its last chunks at once exactly one learns it completed the round."""
    with store.transaction() as conn:
        lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
        conn.execute(f"SELECT id FROM watch_rounds WHERE id = ?{lock}", (chunk.round_id,))
        found = conn.execute(
            f"UPDATE round_chunks SET done = {now_sql(conn)}, done_by = ?, exit_code = ?, "
            "files = '[]', lease_owner = NULL, lease_until = NULL WHERE round_id = ? AND "
            "idx = ? AND done IS NULL AND lease_owner = ?",
            (member_id, exit_code, *chunk.key, member_id)).rowcount
        left = conn.execute("SELECT COUNT(*) FROM round_chunks WHERE round_id = ? AND "
                            "done IS NULL", (chunk.round_id,)).fetchone()
        completed = found == 1 and int(left[0]) == 0
        if completed:
            now = now_sql(conn)
            conn.execute(f"UPDATE watch_rounds SET finished = {now} WHERE id = ?",
                         (chunk.round_id,))
            conn.execute(f"UPDATE watch_schedule SET next_due = {now} + (SELECT next_in FROM "
                         "watch_rounds WHERE id = ?) WHERE catalog = ? AND definition = ?",
                         (chunk.round_id, chunk.catalog, chunk.definition))
    return found == 1, completed
