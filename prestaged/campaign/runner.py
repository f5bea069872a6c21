"""Campaigns: stages of submissions, each held until its input slice is warm, run in the foreground.

A campaign file (TOML) names stages; each stage cuts its input definition into submissions by
its ``split`` (``all``, ``drainingn(N)``, ``list(a,b,c)``), and every submission goes through

    queued -> prestaging -> ready -> submitting -> submitted -> completed

or ends in ``launch_failed`` / ``launch_unknown`` / ``failed`` / ``cancelled``. States never
move backwards and every transition is stored (``submission_events``) with its time and reason.

At-most-once: ``submitting`` is committed before the submit command starts, so a submission
found in ``submitting`` at start-up (the process died while the command ran) may or may not have
been submitted; it becomes ``launch_unknown`` and is never run again automatically. The operator
decides: ``release`` retries it (it becomes ``cancelled``, superseded by a new ``queued``
submission that takes over its slice, both stored with their reasons), ``mark_submitted``
records a launch made outside (``launch_unknown -> submitted`` with its job id).

Controls (``campaign_controls``), per campaign or per stage: a held campaign/stage creates and
launches nothing (a launch due while held waits: the next drainingn slice is chosen only once
released, when its submission is created); a cancelled one creates and launches nothing ever
again, and its queued/prestaging/ready submissions become ``cancelled``.

Keep-warm: while a submission is ``submitted`` and its ``complete`` command has not exited 0,
its slice is warmed again every ``keep_warm`` (files touched within ``keep_warm / 2`` are
skipped), between the ``complete`` polls.

drainingn: the files of a slice are written to the ledger (``campaign_ledger``) in the same
transaction that creates the submission, before anything runs, so a restart never gives a file
to a second submission of the same stage.

Commands are argv lists, never a shell: a template is split with ``shlex.split`` first, then
each element has its placeholders substituted, so no file or definition name can inject
shell syntax.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import re
import shlex
import string
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prestaged.catalog import Catalog

# config.py's loader and value checks, so that campaign files word their errors alike.
from prestaged.config import (
    FRACTION,
    NON_EMPTY,
    PLAIN_NAME,
    POSITIVE,
    Check,
    Duration,
    build_section,
    check,
    one_of,
)
from prestaged.errors import (
    EXIT_HELD,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    CatalogError,
    ConfigError,
    ConflictError,
    NotFoundError,
)
from prestaged.gate import GateFn, RewarmFn
from prestaged.model import FileRef
from prestaged.state.store import Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_JOB_ID_REGEX",
    "EXIT_HELD",
    "PLACEHOLDERS",
    "CampaignConfig",
    "CampaignDefaults",
    "CampaignResult",
    "CampaignState",
    "CommandResult",
    "Split",
    "StageConfig",
    "Submission",
    "SubmissionState",
    "load_campaign",
    "parse_campaign",
    "parse_split",
    "render",
    "run_argv",
    "run_campaign",
    "urls_file",
]

log = logging.getLogger(__name__)

DEFAULT_JOB_ID_REGEX = r"JobsubJobId of first job: (\S+)"
"""What jobsub_submit prints; group 1 (or the whole match) becomes ``{job_id}``."""

PLACEHOLDERS = ("campaign", "stage", "submission", "definition", "files_file", "urls_file",
                "n_files", "job_id")
"""Placeholders of ``submit``/``complete`` (``{job_id}`` in ``complete`` only)."""

_TAIL = 4000  # characters of a command's output kept in the state

"""``campaign run``'s exit code when it launched nothing more because of a hold (EX_TEMPFAIL):
not a failure, run it again after ``campaign release``."""


# --- the campaign file ------------------------------------------------------------------------


def _is_regex(v: str) -> bool:
    try:
        re.compile(v)
    except re.error:
        return False
    return True


@dataclass(frozen=True)
class Split:
    """A parsed ``split``: ``kind`` is ``all``, ``drainingn`` (with ``n``) or ``list`` (items)."""

    kind: str
    n: int = 0
    items: tuple[str, ...] = ()


def parse_split(text: str) -> Split:
    """Parse ``all`` | ``drainingn(N)`` (N >= 1) | ``list(a,b,c)``; ``ValueError`` otherwise."""
    t = text.strip()
    if t == "all":
        return Split("all")
    m = re.fullmatch(r"drainingn\(\s*(\d+)\s*\)", t)
    if m and int(m.group(1)) > 0:
        return Split("drainingn", n=int(m.group(1)))
    m = re.fullmatch(r"list\((.*)\)", t, re.DOTALL)
    if m:
        items = tuple(i.strip() for i in m.group(1).split(","))
        if items and all(items):
            return Split("list", items=items)
    raise ValueError('expected "all", "drainingn(N)" with N >= 1, or "list(a,b,c)"')


def _is_split(v: str) -> bool:
    try:
        parse_split(v)
    except ValueError:
        return False
    return True


_SPLIT = Check(_is_split, '"all", "drainingn(N)" with N >= 1, or "list(a,b,c)"')
_REGEX = Check(_is_regex, "a valid regular expression")


@dataclass(frozen=True)
class CampaignDefaults:
    """``[defaults]``: settings shared by every stage."""

    catalog: Optional[str] = field(default=None, metadata=check(one_of("local", "samweb")))
    """Catalog resolving stage inputs (``local`` or ``samweb``); unset: ``catalog.default``."""
    ready: float = field(default=1.0, metadata=check(FRACTION))
    """Fraction of a submission's slice that must be warm before it is submitted."""
    keep_warm: Duration = field(default=Duration(4 * 3600.0), metadata=check(POSITIVE))
    """Re-touch interval of a submitted slice until its ``complete`` command exits 0 (seconds)."""
    prestage_timeout: Duration = field(default=Duration(6 * 3600.0), metadata=check(POSITIVE))
    """A slice not warm enough within this long fails, naming its cold files (seconds)."""
    prestage_retry: Duration = field(default=Duration(10.0), metadata=check(POSITIVE))
    """First wait before retrying cold files, doubling up to 10 minutes (seconds)."""
    submit_timeout: Duration = field(default=Duration(600.0), metadata=check(POSITIVE))
    """Longest run of one submit or complete command; then it is killed (seconds)."""
    complete_timeout: Duration = field(default=Duration(7 * 86400.0),
                                       metadata=check(POSITIVE))
    """A submission whose ``complete`` command never exits 0 within this long fails."""
    complete_poll: Duration = field(default=Duration(60.0), metadata=check(POSITIVE))
    """First wait between two ``complete`` polls, doubling up to ``complete_poll_max``."""
    complete_poll_max: Duration = field(default=Duration(1800.0), metadata=check(POSITIVE))
    """Longest wait between two ``complete`` polls (seconds)."""


@dataclass(frozen=True)
class StageConfig:
    """One ``[[stage]]``: an input, how it is split, and the commands to run."""

    name: str = field(metadata=check(PLAIN_NAME))
    input: str = field(metadata=check(NON_EMPTY))
    """Input definition; may use ``{campaign}`` and ``{stage}``."""
    submit: str = field(metadata=check(NON_EMPTY))
    """Submit command template (see ``PLACEHOLDERS``)."""
    split: str = field(default="all", metadata=check(_SPLIT))
    complete: Optional[str] = None
    """Command polled after submission until it exits 0; unset: submitted counts as complete."""
    ready: Optional[float] = field(default=None, metadata=check(FRACTION))
    """Overrides ``defaults.ready`` for this stage."""
    job_id_regex: str = field(default=DEFAULT_JOB_ID_REGEX, metadata=check(_REGEX))
    after: tuple[str, ...] = field(default=(), metadata={"internal": True})
    """Stages that must be drained and complete before this one starts."""

    @property
    def parsed_split(self) -> Split:
        """``split`` parsed."""
        return parse_split(self.split)


@dataclass(frozen=True)
class CampaignConfig:
    """A whole campaign file."""

    name: str = field(metadata=check(PLAIN_NAME))
    defaults: CampaignDefaults = field(default_factory=CampaignDefaults)
    stage: tuple[StageConfig, ...] = ()
    source: Optional[Path] = field(default=None, metadata={"internal": True})

    def ordered(self) -> list[StageConfig]:
        """Stages in an order where every stage comes after those in its ``after``."""
        by_name = {s.name: s for s in self.stage}
        out: list[StageConfig] = []
        done: set[str] = set()

        def visit(s: StageConfig) -> None:
            if s.name not in done:
                for up in s.after:
                    visit(by_name[up])
                done.add(s.name)
                out.append(s)

        for s in self.stage:
            visit(s)
        return out


def _template_problem(text: str, allowed: Sequence[str]) -> Optional[str]:
    """Why ``text`` is not a usable command template, or None."""
    try:
        argv = shlex.split(text)
        fields = [f for arg in argv for _, f, spec, conv in string.Formatter().parse(arg)
                  if f is not None and (f not in allowed or spec or conv)]
    except ValueError as e:
        return f"cannot be split into arguments ({e})"
    if not argv:
        return "is empty"
    if fields:
        return (f"unknown placeholder {{{fields[0]}}}; known: "
                + " ".join("{" + p + "}" for p in allowed) + " (write {{ for a literal {)")
    return None


def _after(raw: object, key: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ConfigError(f"{key}: expected a list of stage names, got {raw!r}")
    return tuple(raw)


def _check_stages(stages: Sequence[StageConfig]) -> None:
    """Names unique, ``after`` known, no cycles, templates usable."""
    index = {}
    for i, s in enumerate(stages):
        if s.name in index:
            raise ConfigError(f"stage[{i}].name: stage {s.name!r} is defined twice")
        index[s.name] = i
    for i, s in enumerate(stages):
        for up in s.after:
            if up not in index:
                raise ConfigError(f"stage[{i}].after: no stage named {up!r}; stages: "
                                  + ", ".join(index))
        problems = (("input", _input_problem(s.input)),
                    ("submit", _template_problem(s.submit, PLACEHOLDERS[:-1])),
                    ("complete", s.complete and _template_problem(s.complete, PLACEHOLDERS)))
        for key, problem in problems:
            if problem:
                raise ConfigError(f"stage[{i}].{key}: {problem}")
    by_name = {s.name: s for s in stages}
    for i, s in enumerate(stages):
        _no_cycle(by_name, [s.name], f"stage[{i}].after")


def _input_problem(text: str) -> Optional[str]:
    try:
        text.format_map({"campaign": "", "stage": ""})
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        return (f"only the placeholders {{campaign}} and {{stage}} may be used here "
                f"(write {{{{ for a literal {{): {e!r}")
    return None


def _no_cycle(by_name: Mapping[str, StageConfig], path: list[str], key: str) -> None:
    """``ConfigError`` naming ``key`` when following ``after`` from ``path[-1]`` loops."""
    for up in by_name[path[-1]].after:
        if up in path:
            cycle = [*path[path.index(up):], up]
            raise ConfigError(f"{key}: dependency cycle: " + " runs after ".join(cycle))
        _no_cycle(by_name, [*path, up], key)


def load_campaign(path: Path) -> CampaignConfig:
    """Load and validate a campaign file; ``ConfigError`` naming the file and key (exit 2)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"campaign {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"campaign {path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"campaign {path}: not UTF-8 text") from None
    return parse_campaign(text, path)


def parse_campaign(text: str, path: Path) -> CampaignConfig:
    """Validate campaign file ``text`` read from ``path`` (named in errors; a daemon gets the
    text and the path it came from); ``ConfigError`` naming the file and key (exit 2)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"campaign {path}: invalid TOML: {e}") from None
    try:
        # `after` is a list of strings, which the config loader has no type for: taken out
        # here, checked, and put back after the rest is built.
        stages = data.get("stage", [])
        afters: list[tuple[str, ...]] = []
        if isinstance(stages, list):
            for i, s in enumerate(stages):
                raw = s.pop("after", []) if isinstance(s, dict) else []
                afters.append(_after(raw, f"stage[{i}].after"))
        cfg = build_section(CampaignConfig, data, "", path.parent)
        if not cfg.stage:
            raise ConfigError("stage: a campaign needs at least one [[stage]]")
        built = tuple(dataclasses.replace(s, after=a) for s, a in zip(cfg.stage, afters))
        _check_stages(built)
    except ConfigError as e:
        raise ConfigError(f"campaign {path}: {e}") from None
    return dataclasses.replace(cfg, stage=built, source=path)


# --- commands ---------------------------------------------------------------------------------


def render(template: str, values: Mapping[str, object]) -> list[str]:
    """``template`` split into argv with ``shlex.split``, then each element's placeholders
    filled from ``values``: a value is never split or parsed again, whatever it contains."""
    return [arg.format_map(values) for arg in shlex.split(template)]


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: exit code (128 + N for signal N; 124 timed out; 126/127 could not
    start), the tail of its output (stdout and stderr together) and an error, if any."""

    exit_code: int
    output_tail: str
    error: Optional[str] = None


async def run_argv(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run ``argv`` (no shell) with stdin from /dev/null, its output captured; kill it after
    ``timeout`` seconds."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return CommandResult(code, "", f"{argv[0]}: cannot run: {e.strerror or e}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return CommandResult(124, "", f"{argv[0]}: killed after {timeout:g}s")
    code = proc.returncode if proc.returncode is not None else -1
    tail = out.decode(errors="replace")[-_TAIL:]
    return CommandResult(128 - code if code < 0 else code, tail)


# --- persisted state --------------------------------------------------------------------------


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

_CANCELLABLE = (S.QUEUED, S.PRESTAGING, S.READY)
"""States a cancel moves to ``cancelled`` (nothing of theirs has been launched)."""
_FINAL_BAD = (S.LAUNCH_FAILED, S.LAUNCH_UNKNOWN, S.FAILED)
"""States that make a stage ``incomplete`` even while it is held."""


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
None for a new submission); ``since`` is when the submission entered ``from_state``."""


class CampaignState:
    """Campaign rows of the state database; every write is its own committed transaction.
    ``on_move`` (see ``MoveHook``) hears every transition once it is committed (metrics)."""

    def __init__(self, store: Store, on_move: Optional[MoveHook] = None) -> None:
        self.store = store
        self.on_move = on_move

    def _moved(self, campaign: str, frm: Optional[SubmissionState], to: SubmissionState,
               since: float) -> None:
        if self.on_move is not None:
            self.on_move(campaign, frm, to, since)

    # --- the daemon's registry (`campaign add`) ---------------------------------------------

    def register(self, campaign: CampaignConfig, body: str) -> bool:
        """Store ``campaign`` (its file's text ``body``) for the daemon; True when it is new,
        False when it replaced a campaign of that name (its submissions and ledger are kept)."""
        now = time.time()
        source = str(campaign.source) if campaign.source else None
        with self.store.transaction() as conn:
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
        return [{"campaign": name, "control": self.controls(name).get(""),
                 "submissions": self.totals(name)} for name in self.names()]

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
                "stages": [{"name": st, "control": controls.get(st),
                            "counts": counts.get(st, {})} for st in stages],
                "submissions": docs}

    def stage_names(self, name: str) -> list[str]:
        """Stage names of the stored registration of campaign ``name`` ([] when none)."""
        return [st.name for st in self._config_stages(name)]

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
        """The submission ``sub_id``."""
        with self.store.transaction() as conn:
            r = conn.execute(f"SELECT {_COLUMNS} FROM campaign_submissions WHERE id = ?",
                             (sub_id,)).fetchone()
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
        now = time.time()
        with self.store.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO campaign_submissions (campaign, stage, item, definition, state, "
                "reason, created, updated, n_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (campaign, stage, item, definition, S.QUEUED.value, "created", now, now,
                 len(ledger) if ledger else None))
            sub_id = cur.lastrowid
            conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                         "to_state, reason) VALUES (?, ?, NULL, ?, 'created')",
                         (sub_id, now, S.QUEUED.value))
            conn.executemany("INSERT INTO campaign_ledger (campaign, stage, name, url, "
                             "submission_id) VALUES (?, ?, ?, ?, ?)",
                             [(campaign, stage, r.name, r.url, sub_id) for r in ledger])
        assert sub_id is not None
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

    def _set(self, conn: Any, campaign: str, stage: Optional[str], column: str, value: int,
             reason: str) -> None:
        conn.execute("INSERT OR IGNORE INTO campaign_controls (campaign, stage, updated, "
                     "reason) VALUES (?, ?, ?, ?)",
                     (campaign, stage or "", time.time(), reason))
        conn.execute(f"UPDATE campaign_controls SET {column} = ?, updated = ?, reason = ? "
                     "WHERE campaign = ? AND stage = ?",
                     (value, time.time(), reason, campaign, stage or ""))

    def hold(self, campaign: str, stage: Optional[str] = None) -> None:
        """Hold the campaign (or one stage): ``run`` creates and launches nothing there."""
        with self.store.transaction() as conn:
            self._set(conn, campaign, stage, "held", 1, "held by operator")

    def release(self, campaign: str, stage: Optional[str] = None) -> list[Submission]:
        """Lift the hold of the campaign (or one stage) and retry its ``launch_unknown``
        submissions: each is superseded (``cancelled``) by a new ``queued`` submission that
        takes over its slice, so no state ever moves backwards. Returns the new submissions."""
        with self.store.transaction() as conn:
            self._set(conn, campaign, stage, "held", 0, "released by operator")
        return [self._retry(s) for s in self.submissions(campaign, stage)
                if s.state is S.LAUNCH_UNKNOWN]

    def retry(self, campaign: str, sub_id: int) -> Submission:
        """Recovery of a ``failed`` (gate timed out, or never completed) or ``launch_failed``
        submission, or a ``launch_unknown`` one: a new ``queued`` submission takes over its
        slice (its drainingn ledger files included), which the next pass gates and submits.
        The old one keeps its final state and points to the new one (``superseded_by``); a
        ``launch_unknown`` one becomes ``cancelled`` as on release. ``NotFoundError`` for an
        unknown submission, ``ConflictError`` for one in another state."""
        found = [s for s in self.submissions(campaign) if s.id == sub_id]
        if not found:
            raise NotFoundError(f"campaign '{campaign}' has no submission {sub_id}")
        sub = found[0]
        if sub.superseded_by is not None:
            raise ConflictError(f"submission {sub_id} was already retried as "
                                f"#{sub.superseded_by}")
        if sub.state not in _FINAL_BAD:
            raise ConflictError(f"submission {sub_id} is {sub.state.value}: only failed, "
                             "launch_failed or launch_unknown submissions can be retried")
        return self._retry(sub, "retried by operator")

    def _retry(self, old: Submission, why: str = "released by operator") -> Submission:
        now = time.time()
        reason = f"retry of #{old.id}, {why}"
        tries = sum(1 for s in self.submissions(old.campaign, old.stage)
                    if s.item.split(" (retry", 1)[0] == old.item.split(" (retry", 1)[0])
        with self.store.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO campaign_submissions (campaign, stage, item, definition, state, "
                "reason, created, updated, n_files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (old.campaign, old.stage, f"{old.item.split(' (retry', 1)[0]} (retry {tries})",
                 old.definition, S.QUEUED.value, reason, now, now, old.n_files))
            new_id = cur.lastrowid
            conn.execute("UPDATE campaign_submissions SET superseded_by = ? WHERE id = ?",
                         (new_id, old.id))
            conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                         "to_state, reason) VALUES (?, ?, NULL, ?, ?)",
                         (new_id, now, S.QUEUED.value, reason))
            conn.execute("UPDATE campaign_ledger SET submission_id = ? WHERE submission_id = ?",
                         (new_id, old.id))
        assert new_id is not None
        self._moved(old.campaign, None, S.QUEUED, now)
        if old.state is S.LAUNCH_UNKNOWN:
            self.move(old, S.CANCELLED, f"superseded by #{new_id}: {why} for a retry (this "
                                        "launch may or may not have run)")
        else:
            log.info("%s/%s #%d %s: %s, superseded by #%d: %s", old.campaign, old.stage, old.id,
                     old.item, old.state.value, new_id, why)
        return self.get(new_id)

    def cancel(self, campaign: str, stage: Optional[str] = None) -> list[Submission]:
        """Cancel the campaign (or one stage) for good; its queued, prestaging and ready
        submissions become ``cancelled`` (returned)."""
        with self.store.transaction() as conn:
            self._set(conn, campaign, stage, "cancelled", 1, "cancelled by operator")
        return [self.move(s, S.CANCELLED, "cancelled by operator")
                for s in self.submissions(campaign, stage) if s.state in _CANCELLABLE]

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
        transition that is not allowed (backwards, or out of a final state)."""
        unknown = set(fields) - set(_SETTABLE)
        if unknown:  # pragma: no cover - a programming error
            raise TypeError(f"cannot set {sorted(unknown)}")
        now = time.time()
        sets = "".join(f", {k} = ?" for k in fields)
        with self.store.transaction() as conn:
            current, since = conn.execute("SELECT state, updated FROM campaign_submissions "
                                          "WHERE id = ?", (sub.id,)).fetchone()
            frm = SubmissionState(current)
            if to not in _NEXT.get(frm, frozenset()):
                raise ConflictError(f"submission {sub.id}: {frm.value} -> {to.value} is not "
                                    "allowed")
            conn.execute(f"UPDATE campaign_submissions SET state = ?, reason = ?, updated = ?"
                         f"{sets} WHERE id = ?",
                         (to.value, reason, now, *fields.values(), sub.id))
            conn.execute("INSERT INTO submission_events (submission_id, at, from_state, "
                         "to_state, reason) VALUES (?, ?, ?, ?, ?)",
                         (sub.id, now, frm.value, to.value, reason))
        log.info("%s/%s #%d %s: %s -> %s: %s", sub.campaign, sub.stage, sub.id, sub.item,
                 frm.value, to.value, reason)
        self._moved(sub.campaign, frm, to, since)
        return self.get(sub.id)


# --- running ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CampaignResult:
    """How ``run_campaign`` ended: per stage ``done`` (drained and all complete), ``held``,
    ``cancelled``, ``blocked`` (an upstream stage is not done) or ``incomplete``;
    ``exit_code`` 0 (every stage done or cancelled), 1 (a stage incomplete, or blocked by a
    cancelled one), ``EXIT_HELD`` (otherwise, when a hold stopped it) or 130."""

    campaign: str
    stages: dict[str, str]
    exit_code: int


@dataclass
class _Runner:
    campaign: CampaignConfig
    state: CampaignState
    gate: GateFn
    open_catalog: Callable[[str], Catalog]
    workdir: Path
    stop: asyncio.Event
    rewarm: Optional[RewarmFn] = None
    _next_touch: float = 0.0

    def _control(self, stage: StageConfig) -> Optional[str]:
        return self.state.control(self.campaign.name, stage.name)

    def _values(self, stage: StageConfig, sub: Submission) -> dict[str, object]:
        base = self.workdir / self.campaign.name / f"{stage.name}-{sub.id}"
        return {"campaign": self.campaign.name, "stage": stage.name, "submission": sub.id,
                "definition": sub.definition, "files_file": f"{base}.files",
                "urls_file": str(urls_file(self.workdir, sub)), "n_files": sub.n_files or 0,
                "job_id": sub.job_id or ""}

    async def run(self) -> CampaignResult:
        outcome: dict[str, str] = {}
        for stage in self.campaign.ordered():
            if self.stop.is_set():
                break
            control = self._control(stage)
            if control == "cancelled":
                outcome[stage.name] = self._cancelled(stage)
                continue
            ups = [outcome.get(up) for up in stage.after]
            if any(u != "done" for u in ups):
                log.warning("%s/%s: not started: upstream %s not done", self.campaign.name,
                            stage.name, ", ".join(stage.after))
                held_up = control == "held" or "held" in ups or "blocked-held" in ups
                outcome[stage.name] = "blocked-held" if held_up else "blocked"
                continue
            outcome[stage.name] = await self._stage(stage)
        values = set(outcome.values())
        if self.stop.is_set():
            code = EXIT_INTERRUPTED
        elif values <= {"done", "cancelled"}:
            code = EXIT_OK
        elif values & {"incomplete", "blocked"}:
            code = EXIT_SOME_FAILED
        else:
            code = EXIT_HELD
        outcome = {k: "blocked" if v == "blocked-held" else v for k, v in outcome.items()}
        return CampaignResult(self.campaign.name, outcome, code)

    def _cancelled(self, stage: StageConfig) -> str:
        """A cancelled stage: what was not launched yet is cancelled (if a cancel raced)."""
        for sub in self.state.submissions(self.campaign.name, stage.name):
            if sub.state in _CANCELLABLE:
                self.state.move(sub, S.CANCELLED, "stage cancelled by operator")
        log.warning("%s/%s: cancelled: nothing more is created or launched",
                    self.campaign.name, stage.name)
        return "cancelled"

    async def _stage(self, stage: StageConfig) -> str:
        """Process one stage: ``done`` when it is drained and every submission completed,
        ``held`` / ``cancelled`` when an operator control stopped it, else ``incomplete``."""
        name = self.campaign.name
        for sub in self.state.submissions(name, stage.name):  # resume what a crash left
            await self._advance(stage, sub)
        split = stage.parsed_split
        drained = False  # True once every item has a submission / nothing new is left
        if split.kind in ("all", "list"):
            have = {s.item for s in self.state.submissions(name, stage.name)}
            for item in split.items or ("all",):
                if item not in have and not self.stop.is_set() and not self._control(stage):
                    definition = self._input(stage) if split.kind == "all" else item
                    await self._advance(stage, self.state.create(name, stage.name, item,
                                                                 definition))
                    have.add(item)
            drained = all(item in have for item in split.items or ("all",))
        else:
            while not self.stop.is_set() and not self._control(stage):
                if not await self._next_slice(stage, split.n):
                    drained = True
                    break
        control = self._control(stage)
        if control == "cancelled":
            return self._cancelled(stage)
        subs = self.state.submissions(name, stage.name)
        if drained and not self.stop.is_set() and all(
                s.state is S.COMPLETED or s.superseded_by is not None for s in subs):
            return "done"
        if control == "held" and not any(s.state in _FINAL_BAD and s.superseded_by is None
                                         for s in subs):
            log.warning("%s/%s: held: nothing more is created or launched until "
                        "`prestaged campaign release`", name, stage.name)
            return "held"
        return "incomplete"

    def _input(self, stage: StageConfig) -> str:
        return stage.input.format_map({"campaign": self.campaign.name, "stage": stage.name})

    async def _next_slice(self, stage: StageConfig, n: int) -> bool:
        """Create and process the next drainingn slice; False when the stage is drained."""
        taken = self.state.taken(self.campaign.name, stage.name)
        fresh: list[FileRef] = []
        seen: set[str] = set()
        async for ref in self.open_catalog(self._input(stage)).files():
            if ref.name not in taken and ref.name not in seen:
                seen.add(ref.name)
                fresh.append(ref)
                if len(fresh) >= n:
                    break
        if not fresh:
            log.info("%s/%s: drained", self.campaign.name, stage.name)
            return False
        k = len(self.state.submissions(self.campaign.name, stage.name)) + 1
        urls = self.workdir / self.campaign.name / f"{stage.name}-slice-{k}.urls"
        sub = self.state.create(self.campaign.name, stage.name, f"slice-{k}", str(urls), fresh)
        await self._advance(stage, sub)
        return True

    async def _advance(self, stage: StageConfig, sub: Submission) -> None:
        """Take ``sub`` as far as it goes: to a final state, or until ``stop``."""
        if sub.state is S.SUBMITTING:
            self.state.move(sub, S.LAUNCH_UNKNOWN,
                            "found in submitting at start-up: the submit command may or may "
                            "not have run; not run again automatically")
            return
        steps = {S.QUEUED: self._prestage, S.PRESTAGING: self._prestage,
                 S.READY: self._submit, S.SUBMITTED: self._complete}
        while sub.state in steps and not self.stop.is_set():
            if sub.state is S.READY:  # the last moment before a launch
                control = self._control(stage)
                if control == "cancelled":
                    self.state.move(sub, S.CANCELLED, "cancelled by operator before launch")
                    return
                if control == "held":
                    log.info("%s/%s #%d: held: launch waits for release", sub.campaign,
                             sub.stage, sub.id)
                    return
            try:
                sub = await steps[sub.state](stage, sub)
            except ConflictError as e:  # an operator moved it meanwhile (cancel): theirs wins
                log.info("%s/%s #%d: %s", sub.campaign, sub.stage, sub.id, e)
                return

    async def _slice(self, stage: StageConfig, sub: Submission) -> list[FileRef]:
        """The files of ``sub``, written to its urls/files files."""
        if stage.parsed_split.kind == "drainingn":
            refs = self.state.slice_of(sub.id)
        else:
            refs = []
            seen: set[str] = set()
            async for ref in self.open_catalog(sub.definition).files():
                if ref.url not in seen:
                    seen.add(ref.url)
                    refs.append(ref)
        values = self._values(stage, sub)
        await asyncio.to_thread(_write_lists, Path(str(values["urls_file"])),
                                Path(str(values["files_file"])), refs)
        return refs

    async def _prestage(self, stage: StageConfig, sub: Submission) -> Submission:
        from prestaged.catalog.local import LocalCatalog

        if sub.state is S.QUEUED:
            sub = self.state.move(sub, S.PRESTAGING, "gate started")
        try:
            refs = await self._slice(stage, sub)
        except (CatalogError, OSError) as e:
            return self.state.move(sub, S.FAILED, f"input: {e}")
        d = self.campaign.defaults
        ready = stage.ready if stage.ready is not None else d.ready
        catalog = LocalCatalog(str(self._values(stage, sub)["urls_file"]))
        result = await self.gate(catalog, ready, d.prestage_timeout, d.prestage_retry)
        if self.stop.is_set() or result.exit_code == EXIT_INTERRUPTED:
            return sub  # still prestaging: the next run gates it again
        if not result.passed:
            return self.state.move(sub, S.FAILED, f"gate: {result.summary()}",
                                   n_files=len(refs))
        return self.state.move(sub, S.READY, f"gate: {result.summary()}", n_files=len(refs))

    async def _submit(self, stage: StageConfig, sub: Submission) -> Submission:
        argv = render(stage.submit, self._values(stage, sub))
        # Committed before the command starts: a crash from here on is launch_unknown.
        sub = self.state.move(sub, S.SUBMITTING, f"running {argv[0]}")
        res = await run_argv(argv, self.campaign.defaults.submit_timeout)
        if res.exit_code != 0:
            why = res.error or f"{argv[0]} exited {res.exit_code}"
            return self.state.move(sub, S.LAUNCH_FAILED, why, exit_code=res.exit_code,
                                   output_tail=res.output_tail)
        m = re.search(stage.job_id_regex, res.output_tail)
        job_id = (m.group(1) if m.groups() else m.group(0)) if m else None
        return self.state.move(sub, S.SUBMITTED, f"{argv[0]} exited 0, job id {job_id or '-'}",
                               exit_code=0, job_id=job_id, output_tail=res.output_tail)

    async def _complete(self, stage: StageConfig, sub: Submission) -> Submission:
        if stage.complete is None:
            return self.state.move(sub, S.COMPLETED, "no complete command: done once submitted")
        d = self.campaign.defaults
        start = time.monotonic()
        self._next_touch = start + d.keep_warm
        delay: float = d.complete_poll
        polls = 0
        while True:
            argv = render(stage.complete, self._values(stage, sub))
            res = await run_argv(argv, d.submit_timeout)
            polls += 1
            if res.exit_code == 0:
                return self.state.move(sub, S.COMPLETED,
                                       f"{argv[0]} exited 0 after {polls} poll(s)")
            left = d.complete_timeout - (time.monotonic() - start)
            if left <= 0:
                return self.state.move(sub, S.FAILED, f"not complete within "
                                       f"{d.complete_timeout:g}s: {argv[0]} last exited "
                                       f"{res.exit_code}")
            if not await self._wait_keeping_warm(stage, sub, min(delay, left)):
                return sub
            delay = min(d.complete_poll_max, delay * 2)

    async def _wait_keeping_warm(self, stage: StageConfig, sub: Submission,
                                 seconds: float) -> bool:
        """Wait ``seconds`` (until the next ``complete`` poll), warming the slice again each
        time ``keep_warm`` has passed since the last touch; False when ``stop`` was set."""
        keep_warm = self.campaign.defaults.keep_warm
        until = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if self.rewarm is not None and now >= self._next_touch:
                from prestaged.catalog.local import LocalCatalog

                catalog = LocalCatalog(str(self._values(stage, sub)["urls_file"]))
                log.info("%s/%s #%d: keep-warm: touching the slice again", sub.campaign,
                         sub.stage, sub.id)
                try:
                    await self.rewarm(catalog, keep_warm / 2)
                except (CatalogError, OSError) as e:  # keep polling; try again next time
                    log.warning("%s/%s #%d: keep-warm: %s", sub.campaign, sub.stage, sub.id, e)
                self._next_touch = time.monotonic() + keep_warm
                continue
            if now >= until or self.stop.is_set():
                return not self.stop.is_set()
            wake = min(until, self._next_touch) if self.rewarm is not None else until
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), wake - now)


def urls_file(workdir: Path, sub: Submission) -> Path:
    """The URL list of ``sub``'s slice (``{urls_file}``), which its gate warms as a local
    definition: a drainingn slice's definition is that list itself (``slice-N`` items, kept by
    their retries); any other submission's list is ``<workdir>/<campaign>/<stage>-<id>.urls``."""
    if sub.item.startswith("slice-") and sub.definition.endswith(".urls"):
        return Path(sub.definition)
    return workdir / sub.campaign / f"{sub.stage}-{sub.id}.urls"


def _write_lists(urls: Path, names: Path, refs: Sequence[FileRef]) -> None:
    """The slice's URLs and names, one a line (what ``{urls_file}``/``{files_file}`` name)."""
    urls.parent.mkdir(parents=True, exist_ok=True)
    urls.write_text("".join(r.url + "\n" for r in refs))
    names.write_text("".join(r.name + "\n" for r in refs))


async def run_campaign(campaign: CampaignConfig, store: Store, *, gate: GateFn,
                       open_catalog: Callable[[str], Catalog], workdir: Path,
                       stop: Optional[asyncio.Event] = None,
                       rewarm: Optional[RewarmFn] = None,
                       on_move: Optional[MoveHook] = None) -> CampaignResult:
    """Process ``campaign`` in the foreground: stages in ``after`` order, each stage's
    submissions one at a time (gate, submit, poll ``complete`` while keeping the slice warm
    with ``rewarm``, see ``RewarmFn``; without it no keep-warm). ``gate`` warms a slice (see
    ``GateFn``); ``open_catalog`` resolves a definition name; slice files go under
    ``workdir``/<campaign>/. Setting ``stop`` ends it at the next step (exit code 130).
    Held and cancelled campaigns/stages create and launch nothing (see ``CampaignResult``).
    ``on_move`` hears every stored transition (see ``MoveHook``)."""
    runner = _Runner(campaign, CampaignState(store, on_move), gate, open_catalog, workdir,
                     stop if stop is not None else asyncio.Event(), rewarm)
    return await runner.run()
