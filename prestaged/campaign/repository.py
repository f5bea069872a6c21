"""Campaign rows of the state database: submissions, their transitions, controls, the ledger.

Every submission goes through

    queued -> prestaging -> ready -> submitting -> submitted -> completed

or ends in ``launch_failed`` / ``launch_unknown`` / ``failed`` / ``cancelled``. States never
move backwards (``move`` refuses with ``ConflictError``) and every transition is stored
(``submission_events``) with its time and reason.

At-most-once: ``submitting`` is committed before the submit command starts, so a submission
found in ``submitting`` at start-up (the process died while the command ran) may or may not have
been submitted; it becomes ``launch_unknown`` and is never run again automatically. The operator
decides: ``release`` retries it (it becomes ``cancelled``, superseded by a new ``queued``
submission that takes over its slice, both stored with their reasons), ``mark_submitted``
records a launch made outside (``launch_unknown -> submitted`` with its job id).

Controls (``campaign_controls``), per campaign or per stage: a held campaign/stage creates and
launches nothing; a cancelled one creates and launches nothing ever again, and its
queued/prestaging/ready submissions become ``cancelled``. A run also leaves a row, neither held
nor cancelled, per stage of its file (``record_stages``): so an operator action on a campaign run
in the foreground, never registered, can refuse a stage it does not have (``stage_names``).

drainingn: the files of a slice are written to the ledger (``campaign_ledger``) in the same
transaction that creates the submission, before anything runs, so a restart never gives a file
to a second submission of the same stage.

The end (``campaign_ends``): a run or pass that ends with every stage done or cancelled records
when (``finish``); creating a submission (a retry too) or registering the campaign again deletes
that record in its own transaction. A campaign with that record and every submission final
(``state.retention.unsettled``) is finished: the daemon neither resumes it nor keeps its
metric series, and ``forget`` (or the daemon's tidy, after ``[state] keep_campaigns``) drops
all of its rows in one transaction.

Asking for a submission that does not exist is a ``NotFoundError`` (HTTP 404); a transition its
state refuses is a ``ConflictError`` (HTTP 409).

Several daemons (issue 16): the daemon driving a campaign holds its lease (``state.cluster``)
and its repository is made with ``owner`` = its member id. Then every change the runner makes
checks the lease in the same transaction: creating a submission (and its drainingn ledger) and
moving one to ``submitting`` need an unexpired lease; any other move needs that no other member
took the lease over. A member that lost the lease changes nothing (``LeaseLost``): so a
submission is launched at most once across daemons, and one found in ``submitting`` by the
member that took over becomes ``launch_unknown`` exactly as after a restart. Operator actions
go through a repository without ``owner``: any member acts on all.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prestaged.campaign.spec import CampaignConfig, StageConfig, parse_campaign
from prestaged.errors import ConfigError, ConflictError, LeaseLost, NotFoundError
from prestaged.model import FileRef
from prestaged.state import retention
from prestaged.state.db import Database
from prestaged.state.store import Store

__all__ = [
    "CANCELLABLE",
    "RETRYABLE",
    "CampaignRepository",
    "MoveHook",
    "Submission",
    "SubmissionState",
    "urls_file",
    "way_out",
]

log = logging.getLogger(__name__)


class SubmissionState(str, enum.Enum):
    """A submission's state (stored as its value)."""

    QUEUED = "queued"
    PRESTAGING = "prestaging"
    READY = "ready"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    LAUNCH_FAILED = "launch_failed"
    LAUNCH_UNKNOWN = "launch_unknown"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = SubmissionState
_NEXT: dict[SubmissionState, frozenset[SubmissionState]] = {
    S.QUEUED: frozenset({S.PRESTAGING, S.CANCELLED}),
    S.PRESTAGING: frozenset({S.READY, S.FAILED, S.CANCELLED}),
    S.READY: frozenset({S.SUBMITTING, S.CANCELLED}),
    S.SUBMITTING: frozenset({S.SUBMITTED, S.LAUNCH_FAILED, S.LAUNCH_UNKNOWN}),
    S.SUBMITTED: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    # Only by an operator: release (retry as a new attempt) or mark-submitted.
    S.LAUNCH_UNKNOWN: frozenset({S.CANCELLED, S.SUBMITTED}),
}
"""Allowed transitions; states missing here are final."""

CANCELLABLE = (S.QUEUED, S.PRESTAGING, S.READY)
"""States a cancel moves to ``cancelled`` (nothing of theirs has been launched)."""
RETRYABLE = (S.LAUNCH_FAILED, S.LAUNCH_UNKNOWN, S.FAILED)
"""Final states an operator may retry; they make a stage ``incomplete`` even while it is
held."""


@dataclass(frozen=True)
class Submission:
    """One row of ``campaign_submissions``."""

    id: int
    campaign: str
    stage: str
    item: str
    definition: str
    state: SubmissionState
    reason: Optional[str]
    created: float
    updated: float
    n_files: Optional[int]
    exit_code: Optional[int]
    job_id: Optional[str]
    output_tail: Optional[str]
    superseded_by: Optional[int] = None
    """The retry that took over this (cancelled) submission's slice, if any."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**self.__dict__, "state": self.state.value}


_COLUMNS = ("id, campaign, stage, item, definition, state, reason, created, updated, n_files, "
            "exit_code, job_id, output_tail, superseded_by")
_SETTABLE = ("n_files", "exit_code", "job_id", "output_tail")


def _row(r: Sequence[Any]) -> Submission:
    return Submission(r[0], r[1], r[2], r[3], r[4], SubmissionState(r[5]), r[6], r[7], r[8],
                      r[9], r[10], r[11], r[12], r[13])


MoveHook = Callable[[str, Optional[SubmissionState], SubmissionState, float], None]
"""``hook(campaign, from_state, to_state, since)`` after a stored transition (``from_state``
None for a new submission); ``since`` is when the submission entered ``from_state`` (Unix
seconds). It is called in the thread that made the change: a worker thread when the runner
made it, so it must be thread-safe and must not touch the event loop's objects."""


class CampaignRepository:
    """Campaign rows of the state database (SQLite or PostgreSQL, the same SQL); every write
    is its own committed transaction (``Store.transaction``). ``on_move`` (see ``MoveHook``)
    hears every transition once it is committed (metrics).

    The methods are synchronous and may wait up to the store's busy timeout for another
    process's write lock: async callers run them in a worker thread (``asyncio.to_thread``),
    as the runner does."""

    def __init__(self, store: Store, on_move: Optional[MoveHook] = None,
                 owner: Optional[str] = None) -> None:
        self.store = store
        self.on_move = on_move
        self.owner = owner
        """The member id whose campaign lease every runner change checks (None: no check)."""

    def _check_lease(self, conn: Database, campaign: str, *, strict: bool) -> None:
        """Inside a write transaction: ``LeaseLost`` unless ``owner`` holds ``campaign``'s
        lease (``strict``: unexpired; else: not taken over by another member)."""
        if self.owner is None:
            return
        from prestaged.state.cluster import holds_campaign

        if not holds_campaign(conn, campaign, self.owner, strict=strict):
            raise LeaseLost(f"campaign {campaign}: this daemon's lease was lost (taken over by "
                            "another member after it expired); nothing changed")

    def still_ours(self, campaign: str) -> None:
        """``LeaseLost`` unless ``owner`` still holds ``campaign``'s lease (not taken over by
        another member; an expired lease nobody took counts). The runner asks before each
        command it runs outside a transition (``complete``, a release): a daemon stopped past
        its lease (SIGSTOP, a VM paused) ran them on waking, beside the member that had taken
        the campaign over, before its lease keeper had noticed."""
        if self.owner is None:
            return
        with self.store.transaction() as conn:
            self._check_lease(conn, campaign, strict=False)

    def _moved(self, campaign: str, frm: Optional[SubmissionState], to: SubmissionState,
               since: float) -> None:
        if self.on_move is not None:
            self.on_move(campaign, frm, to, since)

    # --- the daemon's registry (`campaign add`) ---------------------------------------------

    def register(self, campaign: CampaignConfig, body: str) -> bool:
        """Store ``campaign`` (its file's text ``body``) for the daemon; True when it is new,
        False when it replaced a campaign of that name (its submissions and ledger are kept).
        ``ConflictError``, nothing stored, for a file its submissions do not fit
        (``_check_replacement``)."""
        now = self.store.now()
        source = str(campaign.source) if campaign.source else None
        with self.store.transaction() as conn:
            _check_replacement(conn, campaign)
            # Its new stages may have work left: finished again only once a pass says so.
            conn.execute("DELETE FROM campaign_ends WHERE campaign = ?", (campaign.name,))
            cur = conn.execute("UPDATE campaigns SET source = ?, body = ?, updated = ? "
                               "WHERE name = ?", (source, body, now, campaign.name))
            if cur.rowcount:
                return False
            conn.execute("INSERT INTO campaigns (name, source, body, added, updated) "
                         "VALUES (?, ?, ?, ?, ?)", (campaign.name, source, body, now, now))
        return True

    def registered(self) -> list[CampaignConfig]:
        """Every campaign added to the daemon, by name. A stored file that no longer parses
        (a newer version's syntax) is logged and left out rather than stopping the daemon."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT name, source, body FROM campaigns ORDER BY name").fetchall()
        out = []
        for name, source, body in rows:
            try:
                out.append(parse_campaign(body, Path(source or f"<stored {name}>")))
            except ConfigError as e:
                log.error("stored campaign %s cannot be used: %s", name, e)
        return out

    # --- the end of a campaign ----------------------------------------------------------------

    def finish(self, campaign: str) -> None:
        """A run or pass of ``campaign`` ended with every stage done or cancelled: record when
        (an earlier record stands: nothing was created since, since creating deletes it)."""
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO campaign_ends (campaign, finished) VALUES (?, ?) "
                         "ON CONFLICT DO NOTHING", (campaign, self.store.now()))

    def finished(self) -> dict[str, float]:
        """Finished campaigns (``retention.campaign_unfinished`` finds nothing left to do in
        them; a daemon's lease aside) and when they finished: the daemon resumes none of
        them and shows no series of theirs."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT campaign, finished FROM campaign_ends").fetchall()
            return {name: float(at) for name, at in rows
                    if not retention.unsettled(conn, name)}

    def gauge(self, campaign: str) -> Optional[dict[str, int]]:
        """``campaign``'s submissions by state for the daemon's gauge; None once it is
        finished (``finished``) or gone from the state: its series are dropped."""
        with self.store.transaction() as conn:
            ended = conn.execute("SELECT 1 FROM campaign_ends WHERE campaign = ?",
                                 (campaign,)).fetchone() is not None
            if ended and not retention.unsettled(conn, campaign):
                return None
            rows = conn.execute("SELECT state, COUNT(*) FROM campaign_submissions WHERE "
                                "campaign = ? GROUP BY state", (campaign,)).fetchall()
            if not rows and not self._known(conn, campaign):
                return None
        return {state: n for state, n in rows}

    def forget(self, campaign: str, lease: Optional[str] = None) -> dict[str, int]:
        """Drop every row of finished ``campaign`` in one transaction
        (``retention.forget_campaign``): the rows dropped by kind. ``NotFoundError`` for an
        unknown campaign; ``ConflictError`` naming what is left for one that is not
        finished (``retention.campaign_unfinished``; ``lease``: the caller's own lease on it,
        which does not count), nothing dropped."""
        with self.store.transaction() as conn:
            if not self._known(conn, campaign):
                raise NotFoundError(f"no campaign '{campaign}' in state {self.store.where}")
            why = retention.campaign_unfinished(conn, campaign, self.store.now(), lease)
            if why is not None:
                raise ConflictError(f"campaign {campaign} is not finished: {why}; nothing "
                                    "forgotten")
            dropped = retention.forget_campaign(conn, campaign)
        log.info("campaign %s forgotten: %d submissions, %d transitions, %d ledger files",
                 campaign, dropped["submissions"], dropped["events"], dropped["ledger"])
        return dropped

    def unfinished(self, campaign: str) -> Optional[str]:
        """Why ``campaign`` is not finished, as ``forget`` would refuse it, or None;
        ``NotFoundError`` for an unknown campaign."""
        with self.store.transaction() as conn:
            if not self._known(conn, campaign):
                raise NotFoundError(f"no campaign '{campaign}' in state {self.store.where}")
            return retention.campaign_unfinished(conn, campaign, self.store.now())

    @staticmethod
    def _known(conn: Database, campaign: str) -> bool:
        return conn.execute("SELECT 1 FROM campaigns WHERE name = ? UNION ALL SELECT 1 FROM "
                            "campaign_submissions WHERE campaign = ? UNION ALL SELECT 1 FROM "
                            "campaign_controls WHERE campaign = ?",
                            (campaign, campaign, campaign)).fetchone() is not None

    def names(self) -> list[str]:
        """Names of every campaign with a submission, a control or a registration."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT campaign FROM campaign_submissions UNION SELECT campaign "
                                "FROM campaign_controls UNION SELECT name FROM campaigns "
                                "ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    def counts(self, campaign: str) -> dict[str, dict[str, int]]:
        """Submissions of ``campaign`` by stage, then by state (only states that occur)."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT stage, state, COUNT(*) FROM campaign_submissions WHERE "
                                "campaign = ? GROUP BY stage, state", (campaign,)).fetchall()
        out: dict[str, dict[str, int]] = {}
        for stage, state, n in rows:
            out.setdefault(stage, {})[state] = n
        return out

    def totals(self, campaign: str) -> dict[str, int]:
        """Submissions of ``campaign`` by state, all stages together."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM campaign_submissions WHERE "
                                "campaign = ? GROUP BY state", (campaign,)).fetchall()
        return {state: n for state, n in rows}

    def summaries(self) -> list[dict[str, Any]]:
        """``campaign list``: every campaign with its control and submissions by state."""
        finished = self.finished()
        return [{"campaign": name, "control": self.controls(name).get(""),
                 "submissions": self.totals(name), "finished": finished.get(name)}
                for name in self.names()]

    def controls(self, campaign: str) -> dict[str, str]:
        """``held``/``cancelled`` by scope (``""`` the campaign, else a stage name)."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT stage, held, cancelled FROM campaign_controls WHERE "
                                "campaign = ?", (campaign,)).fetchall()
        return {stage: "cancelled" if cancelled else "held"
                for stage, held, cancelled in rows if held or cancelled}

    def describe(self, name: str, workdir: Path, fresh_for: float) -> dict[str, Any]:
        """``campaign show``'s document: controls, stages with counts by state, and every
        submission with its transitions and warmth (files of its slice fresh within
        ``fresh_for`` seconds, from the store; None before its slice was written)."""
        subs = self.submissions(name)
        docs = []
        for sub in subs:
            doc = sub.to_dict()
            doc["events"] = self.events(sub.id)
            rows = self.store.status(fresh_for, str(urls_file(workdir, sub)), "local")
            doc["warm"] = rows[0].fresh if rows else None
            doc["warm_of"] = rows[0].files if rows else None
            docs.append(doc)
        counts = self.counts(name)
        controls = self.controls(name)
        stages = list(dict.fromkeys([*(c.name for c in self._config_stages(name)),
                                     *(s.stage for s in subs)]))
        return {"campaign": name, "control": controls.get(""),
                "finished": self.finished().get(name),
                "stages": [{"name": st, "control": controls.get(st),
                            "counts": counts.get(st, {})} for st in stages],
                "submissions": docs}

    def stage_names(self, name: str) -> list[str]:
        """Stage names of campaign ``name``: those of its stored registration (``campaign
        add``), else those the state recorded (``record_stages``, submissions, controls), by
        name; [] when none."""
        registered = [st.name for st in self._config_stages(name)]
        if registered:
            return registered
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT stage FROM campaign_controls WHERE campaign = ? AND "
                                "stage <> '' UNION SELECT stage FROM campaign_submissions "
                                "WHERE campaign = ? ORDER BY 1", (name, name)).fetchall()
        return [r[0] for r in rows]

    def record_stages(self, campaign: CampaignConfig) -> None:
        """Record the stage names of ``campaign`` for ``stage_names`` (``ConflictError`` for
        a file its submissions do not fit, see ``_check_replacement``): a control row per stage,
        neither held nor cancelled (one that exists is kept as it is). So an operator action
        on a campaign run in the foreground (never registered) can tell a stage it has from a
        typo, before that stage has a submission."""
        now = self.store.now()
        with self.store.transaction() as conn:
            _check_replacement(conn, campaign)
            conn.executemany("INSERT INTO campaign_controls (campaign, stage, updated, reason) "
                             "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             [(campaign.name, st.name, now, "a stage of the campaign file")
                              for st in campaign.stage])

    def _config_stages(self, name: str) -> list[StageConfig]:
        with self.store.transaction() as conn:
            row = conn.execute("SELECT source, body FROM campaigns WHERE name = ?",
                               (name,)).fetchone()
        if row is None:
            return []
        try:
            return parse_campaign(row[1], Path(row[0] or name)).ordered()
        except ConfigError:
            return []

    def submissions(self, campaign: str, stage: Optional[str] = None) -> list[Submission]:
        """Submissions of ``campaign`` (or one stage), oldest first."""
        query = f"SELECT {_COLUMNS} FROM campaign_submissions WHERE campaign = ?"
        args: list[Any] = [campaign]
        if stage is not None:
            query += " AND stage = ?"
            args.append(stage)
        with self.store.transaction() as conn:
            rows = conn.execute(query + " ORDER BY id", args).fetchall()
        return [_row(r) for r in rows]

    def get(self, sub_id: int) -> Submission:
        """The submission ``sub_id``; ``NotFoundError`` when there is none."""
        with self.store.transaction() as conn:
            r = conn.execute(f"SELECT {_COLUMNS} FROM campaign_submissions WHERE id = ?",
                             (sub_id,)).fetchone()
        if r is None:
            raise NotFoundError(f"no submission {sub_id}")
        return _row(r)

    def events(self, sub_id: int) -> list[dict[str, Any]]:
        """Transitions of ``sub_id``, oldest first: ``at`` (Unix s), from, to, reason."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT at, from_state, to_state, reason FROM submission_events "
                                "WHERE submission_id = ? ORDER BY id", (sub_id,)).fetchall()
        return [{"at": r[0], "from": r[1], "to": r[2], "reason": r[3]} for r in rows]

    def taken(self, campaign: str, stage: str) -> set[str]:
        """Names of the files the ledger gives to submissions of this stage."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT name FROM campaign_ledger WHERE campaign = ? AND "
                                "stage = ?", (campaign, stage)).fetchall()
        return {r[0] for r in rows}

    def slice_of(self, sub_id: int) -> list[FileRef]:
        """The ledger's files of submission ``sub_id`` (drainingn only), in name order."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT name, url FROM campaign_ledger WHERE submission_id = ? "
                                "ORDER BY name", (sub_id,)).fetchall()
        return [FileRef(r[0], r[1]) for r in rows]

    def create(self, campaign: str, stage: str, item: str, definition: str,
               ledger: Sequence[FileRef] = ()) -> Submission:
        """A new ``queued`` submission and, in the same transaction, its ``ledger`` files."""
        now = self.store.now()
        with self.store.transaction() as conn:
            self._check_lease(conn, campaign, strict=True)
            conn.execute("DELETE FROM campaign_ends WHERE campaign = ?", (campaign,))
            sub_id = conn.insert(
                "INSERT INTO campaign_submissions (campaign, stage, item, definition, state, "
                "reason, created, updated, n_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (campaign, stage, item, definition, S.QUEUED.value, "created", now, now,
                 len(ledger) if ledger else None))
            conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                         "to_state, reason) VALUES (?, ?, NULL, ?, 'created')",
                         (sub_id, now, S.QUEUED.value))
            conn.executemany("INSERT INTO campaign_ledger (campaign, stage, name, url, "
                             "submission_id) VALUES (?, ?, ?, ?, ?)",
                             [(campaign, stage, r.name, r.url, sub_id) for r in ledger])
        self._moved(campaign, None, S.QUEUED, now)
        return self.get(sub_id)

    def control(self, campaign: str, stage: str) -> Optional[str]:
        """``cancelled`` or ``held`` when the campaign or ``stage`` is (cancel wins), else None."""
        with self.store.transaction() as conn:
            row = conn.execute("SELECT MAX(cancelled), MAX(held) FROM campaign_controls WHERE "
                               "campaign = ? AND stage IN ('', ?)", (campaign, stage)).fetchone()
        if row and row[0]:
            return "cancelled"
        if row and row[1]:
            return "held"
        return None

    def _set(self, conn: Database, campaign: str, stage: Optional[str], column: str,
             value: int, reason: str) -> None:
        conn.execute("INSERT INTO campaign_controls (campaign, stage, updated, reason) "
                     "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     (campaign, stage or "", self.store.now(), reason))
        conn.execute(f"UPDATE campaign_controls SET {column} = ?, updated = ?, reason = ? "
                     "WHERE campaign = ? AND stage = ?",
                     (value, self.store.now(), reason, campaign, stage or ""))

    def hold(self, campaign: str, stage: Optional[str] = None) -> None:
        """Hold the campaign (or one stage): ``run`` creates and launches nothing there."""
        with self.store.transaction() as conn:
            self._set(conn, campaign, stage, "held", 1, "held by operator")

    def release(self, campaign: str, stage: Optional[str] = None) -> list[Submission]:
        """Lift the hold of the campaign (or one stage) and retry its ``launch_unknown``
        submissions: each is superseded (``cancelled``) by a new ``queued`` submission that
        takes over its slice, so no state ever moves backwards. Returns the new submissions.
        ``ConflictError`` for a cancelled campaign or stage (a retry there would never run)."""
        self._not_cancelled(campaign, stage)
        with self.store.transaction() as conn:
            self._set(conn, campaign, stage, "held", 0, "released by operator")
        retried = []
        for s in self.submissions(campaign, stage):
            if s.state is S.LAUNCH_UNKNOWN and s.superseded_by is None:
                if self.control(campaign, s.stage) == "cancelled":  # its stage is: never runs
                    log.info("%s/%s #%d: launch_unknown, not retried: its stage is cancelled",
                             campaign, s.stage, s.id)
                    continue
                try:
                    retried.append(self._retry(s))
                except ConflictError:  # another operator retried it meanwhile
                    continue
        return retried

    def _not_cancelled(self, campaign: str, stage: Optional[str]) -> None:
        if self.control(campaign, stage or "") != "cancelled":
            return
        whole = self.control(campaign, "") == "cancelled"
        where = f"campaign {campaign}" if whole or not stage else \
            f"stage {stage} of campaign {campaign}"
        raise ConflictError(f"{where} is cancelled for good: nothing in it is created or "
                            "launched again, so a retry there would never run")

    def retry(self, campaign: str, sub_id: int) -> Submission:
        """Recovery of a ``failed`` (gate timed out, or never completed) or ``launch_failed``
        submission, or a ``launch_unknown`` one: a new ``queued`` submission takes over its
        slice (its drainingn ledger files included), which the next pass gates and submits.
        The old one keeps its final state and points to the new one (``superseded_by``); a
        ``launch_unknown`` one becomes ``cancelled`` as on release. ``NotFoundError`` for an
        unknown submission, ``ConflictError`` for one in another state, one already retried
        (also by a concurrent retry: see ``_retry``) or one of a cancelled campaign/stage."""
        found = [s for s in self.submissions(campaign) if s.id == sub_id]
        if not found:
            raise NotFoundError(f"campaign '{campaign}' has no submission {sub_id}")
        sub = found[0]
        if sub.superseded_by is not None:
            raise ConflictError(f"submission {sub_id} was already retried as "
                                f"#{sub.superseded_by}")
        if sub.state not in RETRYABLE:
            raise ConflictError(f"submission {sub_id} is {sub.state.value}: only failed, "
                             "launch_failed or launch_unknown submissions can be retried")
        self._not_cancelled(campaign, sub.stage)
        return self._retry(sub, "retried by operator")

    def _retry(self, old: Submission, why: str = "released by operator") -> Submission:
        """The new submission taking over ``old``'s slice. One transaction claims ``old``
        (``superseded_by`` still empty, state still retryable) before anything else: two
        retries at once (two CLIs, two members, release beside retry) made two successors,
        and the slice was submitted twice. The loser waits for the winner's commit and gets
        ``ConflictError``."""
        now = self.store.now()
        reason = f"retry of #{old.id}, {why}"
        base = old.item.split(" (retry", 1)[0]
        retryable = tuple(s.value for s in RETRYABLE)
        with self.store.transaction() as conn:
            # Pointing at itself (a valid reference) until the successor's id is known.
            claimed = conn.execute(
                "UPDATE campaign_submissions SET superseded_by = id WHERE id = ? AND "
                f"superseded_by IS NULL AND state IN ({', '.join('?' * len(retryable))})",
                (old.id, *retryable)).rowcount
            if not claimed:
                raise ConflictError(f"submission {old.id} was retried meanwhile or is no "
                                    "longer retryable")
            items = conn.execute("SELECT item FROM campaign_submissions WHERE campaign = ? AND "
                                 "stage = ?", (old.campaign, old.stage)).fetchall()
            tries = sum(1 for (item,) in items if item.split(" (retry", 1)[0] == base)
            conn.execute("DELETE FROM campaign_ends WHERE campaign = ?", (old.campaign,))
            new_id = conn.insert(
                "INSERT INTO campaign_submissions (campaign, stage, item, definition, state, "
                "reason, created, updated, n_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (old.campaign, old.stage, f"{base} (retry {tries})", old.definition,
                 S.QUEUED.value, reason, now, now, old.n_files))
            conn.execute("UPDATE campaign_submissions SET superseded_by = ? WHERE id = ?",
                         (new_id, old.id))
            conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                         "to_state, reason) VALUES (?, ?, NULL, ?, ?)",
                         (new_id, now, S.QUEUED.value, reason))
            conn.execute("UPDATE campaign_ledger SET submission_id = ? WHERE submission_id = ?",
                         (new_id, old.id))
            cancelled = f"superseded by #{new_id}: {why} for a retry (this launch may or may " \
                        "not have run)"
            if old.state is S.LAUNCH_UNKNOWN:  # in the claim's transaction: no window
                conn.execute("UPDATE campaign_submissions SET state = ?, reason = ?, "
                             "updated = ? WHERE id = ?",
                             (S.CANCELLED.value, cancelled, now, old.id))
                conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                             "to_state, reason) VALUES (?, ?, ?, ?, ?)",
                             (old.id, now, S.LAUNCH_UNKNOWN.value, S.CANCELLED.value,
                              cancelled))
        self._moved(old.campaign, None, S.QUEUED, now)
        if old.state is S.LAUNCH_UNKNOWN:
            log.info("%s/%s #%d %s: launch_unknown -> cancelled: %s", old.campaign, old.stage,
                     old.id, old.item, cancelled)
            self._moved(old.campaign, S.LAUNCH_UNKNOWN, S.CANCELLED, old.updated)
        else:
            log.info("%s/%s #%d %s: %s, superseded by #%d: %s", old.campaign, old.stage, old.id,
                     old.item, old.state.value, new_id, why)
        return self.get(new_id)

    def cancel(self, campaign: str, stage: Optional[str] = None) -> list[Submission]:
        """Cancel the campaign (or one stage) for good; its queued, prestaging and ready
        submissions become ``cancelled`` (returned)."""
        with self.store.transaction() as conn:
            self._set(conn, campaign, stage, "cancelled", 1, "cancelled by operator")
        cancelled = []
        for sub in self.submissions(campaign, stage):
            if sub.state in CANCELLABLE:
                try:
                    cancelled.append(self.move(sub, S.CANCELLED, "cancelled by operator"))
                except ConflictError:  # its runner launched it meanwhile: that launch stands
                    continue
        return cancelled

    def mark_submitted(self, campaign: str, sub_id: int, job_id: str) -> Submission:
        """Record that ``launch_unknown`` submission ``sub_id`` was launched (outside
        prestaged) as ``job_id``; ``NotFoundError`` for another campaign's submission,
        ``ConflictError`` for one in another state."""
        found = [s for s in self.submissions(campaign) if s.id == sub_id]
        if not found:
            raise NotFoundError(f"campaign '{campaign}' has no submission {sub_id}")
        sub = found[0]
        if sub.state is not S.LAUNCH_UNKNOWN:
            raise ConflictError(f"submission {sub_id} is {sub.state.value}, not launch_unknown: "
                             "only a launch_unknown submission can be marked submitted")
        return self.move(sub, S.SUBMITTED, f"marked submitted by operator, job id {job_id}",
                         job_id=job_id)

    def move(self, sub: Submission, to: SubmissionState, reason: str,
             **fields: object) -> Submission:
        """Move ``sub`` to ``to`` (stored with the time and ``reason``); ``ConflictError`` for a
        transition that is not allowed (backwards, or out of a final state), ``NotFoundError``
        when the submission is gone."""
        def judge(frm: SubmissionState, _row: Sequence[Any]) -> tuple[SubmissionState, str]:
            if to not in _NEXT.get(frm, frozenset()):
                raise ConflictError(f"submission {sub.id}: {frm.value} -> {to.value} is not "
                                    "allowed")
            return to, reason

        # The lease is checked first: on PostgreSQL it locks the campaign row, so a takeover
        # cannot come between the check and the move (the launch ledger entry included).
        frm, new, why, since = self._write(sub, fields, judge, lease=to is S.SUBMITTING)
        self._said(sub, frm, new, why)
        self._moved(sub.campaign, frm, new, since)
        return self.get(sub.id)

    def record_launch(self, sub: Submission, to: SubmissionState, reason: str,
                      **fields: object) -> Submission:
        """Record what the submit command this process ran for ``sub`` did (``to``:
        ``submitted``, ``launch_failed`` or ``launch_unknown``; ``fields``: its exit code, job
        id and output), whoever holds the campaign's lease now: a launch is a fact, and only
        its launcher knows it. (It was dropped when the lease had been taken over meanwhile, or
        the state was unreachable for a moment: the submission became ``launch_unknown``
        without its job id, and a release submitted the slice again.)

        From ``submitting`` it moves as ``move`` does. Over a ``launch_unknown`` that another
        runner guessed meanwhile (not yet retried), the result replaces the guess. If an
        operator has since retried it or cancelled it, its state stays, the result is kept on
        it and an ERROR says the slice may now run twice."""
        def judge(frm: SubmissionState, row: Sequence[Any]) -> tuple[SubmissionState, str]:
            if frm is S.SUBMITTING:
                return to, reason
            if frm is S.LAUNCH_UNKNOWN and row[2] is None:  # guessed, not yet retried
                return to, f"{reason} (recorded by its launcher over launch_unknown)"
            return frm, str(row[3] or "")

        frm, new, why, since = self._write(sub, fields, judge, lease=None)
        if frm is S.LAUNCH_UNKNOWN and new is not frm:
            # The member that guessed launch_unknown (it holds the campaign now) ended its
            # pass and idles until an operator acts or daemon.campaign_check passes (5 min):
            # wake it, as an action would, to poll the launch's complete command.
            from prestaged.state.cluster import poke_campaign

            poke_campaign(self.store, sub.campaign)
        if new is frm:
            log.error("%s/%s #%d %s: %s, but it was %s meanwhile (%s): the slice may run "
                      "twice; the result is kept on #%d", sub.campaign, sub.stage, sub.id,
                      sub.item, reason, frm.value, why, sub.id)
        else:
            self._said(sub, frm, new, why)
            self._moved(sub.campaign, frm, new, since)
        return self.get(sub.id)

    def _write(self, sub: Submission, fields: Mapping[str, object],
               judge: Callable[[SubmissionState, Sequence[Any]], tuple[SubmissionState, str]],
               *, lease: Optional[bool]) -> tuple[SubmissionState, SubmissionState, str, float]:
        """In one transaction (after the lease check: ``lease`` is ``strict``, None for none),
        ``sub``'s state, ``judge``'s new state and reason for it (from the state and the row
        ``state, updated, superseded_by, reason``), written with ``fields`` and an event (when
        the state changes) only over the state read: an operator's move (which holds no
        campaign lock) read `ready` while the runner moved it on to `submitting` and ran its
        command, then wrote `cancelled` over the launch; read again and judged anew. Returns
        (old state, new state, reason, when the old one began)."""
        unknown = set(fields) - set(_SETTABLE)
        if unknown:  # pragma: no cover - a programming error
            raise TypeError(f"cannot set {sorted(unknown)}")
        now = self.store.now()
        sets = "".join(f", {k} = ?" for k in fields)
        with self.store.transaction() as conn:
            if lease is not None:
                self._check_lease(conn, sub.campaign, strict=lease)
            while True:
                row = conn.execute("SELECT state, updated, superseded_by, reason FROM "
                                   "campaign_submissions WHERE id = ?", (sub.id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no submission {sub.id}")
                frm = SubmissionState(row[0])
                new, why = judge(frm, row)
                if conn.execute(f"UPDATE campaign_submissions SET state = ?, reason = ?, "
                                f"updated = ?{sets} WHERE id = ? AND state = ?",
                                (new.value, why, now, *fields.values(), sub.id,
                                 frm.value)).rowcount:
                    break
            if new is not frm:
                conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                             "to_state, reason) VALUES (?, ?, ?, ?, ?)",
                             (sub.id, now, frm.value, new.value, why))
        return frm, new, why, row[1]

    @staticmethod
    def _said(sub: Submission, frm: SubmissionState, to: SubmissionState, why: str) -> None:
        if to in RETRYABLE:  # the operator must act: shown under -q too, with the way out
            log.warning("%s/%s #%d %s: %s -> %s: %s; %s", sub.campaign, sub.stage, sub.id,
                        sub.item, frm.value, to.value, why, way_out(to, sub.id))
        else:
            log.info("%s/%s #%d %s: %s -> %s: %s", sub.campaign, sub.stage, sub.id, sub.item,
                     frm.value, to.value, why)


def _slice_item(sub: Submission) -> bool:
    """Whether ``sub`` is (a retry of) a drainingn slice: its list is its definition."""
    return urls_file(Path("/"), sub) == Path(sub.definition)


def _check_replacement(conn: Database, campaign: CampaignConfig) -> None:
    """``ConflictError`` naming the stage when ``campaign``'s file (added again, or run after
    an edit) does not fit the submissions its state holds, which are kept:

    - a stage that has submissions not final (``retention.unsettled``) is gone from the file:
      nothing would follow them again (a ``submitted`` one's ``complete`` and keep-warm, a
      ``ready`` one's launch) and the campaign could never finish;
    - a stage's ``split`` changed kind: its submissions' slices were cut by the old one, and
      the new one would hand their files to second submissions (``all`` -> ``drainingn``
      submits every file again, slice by slice);
    - an ``all`` stage's ``input`` changed after its submission was made for the old input:
      the new input would never be submitted, and the stage counted done."""
    by_stage: dict[str, list[Submission]] = {}
    rows = conn.execute(f"SELECT {_COLUMNS} FROM campaign_submissions WHERE campaign = ? "
                        "ORDER BY id", (campaign.name,)).fetchall()
    for r in rows:
        sub = _row(r)
        by_stage.setdefault(sub.stage, []).append(sub)
    names = {st.name for st in campaign.stage}
    gone = [(i, name, state) for i, name, state in retention.unsettled(conn, campaign.name)
            if name not in names]
    if gone:
        i, name, state = gone[0]
        raise ConflictError(
            f"campaign {campaign.name}: stage {name} is not in the file, but its submission "
            f"#{i} is {state} and nothing would follow it again: keep the stage in the file, "
            f"or `prestaged campaign cancel {campaign.name} --stage {name}` first")
    cancelled = {r[0] for r in conn.execute("SELECT stage FROM campaign_controls WHERE "
                                            "campaign = ? AND cancelled <> 0",
                                            (campaign.name,)).fetchall()}
    for st in campaign.stage:
        if cancelled & {"", st.name}:
            continue  # nothing is created there again: no file can go twice
        split = st.parsed_split
        for sub in by_stage.get(st.name, []):
            if sub.state is S.CANCELLED and sub.superseded_by is None \
                    and sub.exit_code is None:
                continue  # cancelled before its launch: no file of it went anywhere
            base = sub.item.split(" (retry", 1)[0]
            sliced = _slice_item(sub)
            if split.kind == "drainingn" and not sliced:
                was = "all" if base == "all" else "list(...)"
            elif split.kind == "all" and (sliced or base != "all"):
                was = "drainingn(...)" if sliced else "list(...)"
            elif split.kind == "list" and sliced:
                was = "drainingn(...)"
            else:
                if split.kind == "all" and base == "all":
                    want = st.input.format_map({"campaign": campaign.name, "stage": st.name})
                    if sub.definition != want:
                        raise ConflictError(
                            f"campaign {campaign.name}: stage {st.name}: input {want} would "
                            f"never be submitted: submission #{sub.id} (split all) was made "
                            f"for input {sub.definition}; give the new input a new stage")
                continue
            raise ConflictError(
                f"campaign {campaign.name}: stage {st.name}: split {st.split} does not fit its "
                f"submission #{sub.id} ({sub.item}, cut by split {was}): the new split would "
                "give its files to a second submission; keep the split, or use a new stage "
                "(and cancel this one)")


def way_out(state: SubmissionState, sub_id: int) -> str:
    """What an operator may do about a submission that ended in ``state`` (one of
    ``RETRYABLE``)."""
    if state is S.LAUNCH_UNKNOWN:
        return (f"if it did launch, `prestaged campaign mark-submitted --submission {sub_id} "
                f"--job-id ID` records it; if not, `prestaged campaign retry --submission "
                f"{sub_id}` runs it again")
    return (f"once the cause is fixed, `prestaged campaign retry --submission {sub_id}` runs it "
            "again")


def urls_file(workdir: Path, sub: Submission) -> Path:
    """The URL list of ``sub``'s slice (``{urls_file}``), which its gate warms as a local
    definition: a drainingn slice's definition is that list itself (``slice-N`` items, kept by
    their retries); any other submission's list is ``<workdir>/<campaign>/<stage>-<id>.urls``."""
    # Told by the name the runner gave the list (`<stage>-slice-N.urls`), not by the item's
    # text alone: a `list(...)` item named `slice-7.urls` wrote its list to the cwd.
    base = sub.item.split(" (retry", 1)[0]
    if re.fullmatch(r"slice-[0-9]+", base) \
            and Path(sub.definition).name == f"{sub.stage}-{base}.urls":
        return Path(sub.definition)
    return workdir / sub.campaign / f"{sub.stage}-{sub.id}.urls"

