"""The campaign runner: the state machine that takes each submission from ``queued`` to a final
state, stage after stage, in the foreground (``campaign run``) or in the daemon.

For each stage (in ``after`` order) the runner resumes what an earlier run left, then creates
the stage's submissions from its ``split`` and advances each one: gate its slice (warm to the
``ready`` fraction); submit it, ``submitting`` being committed before the command starts (see
``repository`` for at-most-once); then poll its ``complete`` command, doubling the wait from
``complete_poll`` up to ``complete_poll_max``. While a submission waits for ``complete``, its
slice is warmed again every ``keep_warm`` (files touched within ``keep_warm / 2`` are skipped).
Once ``complete`` exits 0, a stage with ``release_after_complete`` releases the tape pins held on
the slice (``release``, see ``prestaged.pins``) before the submission becomes ``completed``, its
reason saying what was released; a release that fails is logged and named in that reason, never
the campaign's failure (the pins expire on their own), and a crash in between releases again
on resume (releasing twice is harmless).

A gate that times out fails its submission (storage trouble is tried again within the gate
until then); one stopped for the credentials stops the campaign's run with exit 3 and leaves
the submission prestaging, as keep-warm does (the daemon tries again once they are renewed).

The submit command's exit status decides its outcome: exit 0 is ``submitted`` (with the job id
its output names), another exit ``launch_failed``, unless its output names a job id (it
launched, then failed): that, and a command killed on ``submit_timeout`` or by a signal, is
``launch_unknown``, since it may have launched.

Held campaigns/stages launch nothing (a launch due while held waits: the next drainingn slice is
chosen only once released, when its submission is created); cancelled ones create and launch
nothing ever again.

Every database call goes to a worker thread: a write waits up to the store's busy timeout
(30 s) for another process's lock, which must not freeze the daemon's event loop (``/metrics``,
``/healthz``, the API).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import regex

from prestaged.campaign.actions import usable_job_id
from prestaged.campaign.commands import run_argv
from prestaged.campaign.repository import (
    CANCELLABLE,
    RETRYABLE,
    CampaignRepository,
    MoveHook,
    Submission,
    SubmissionState,
    urls_file,
)
from prestaged.campaign.spec import CampaignConfig, StageConfig, render
from prestaged.catalog import Catalog
from prestaged.errors import (
    EXIT_CREDENTIALS,
    EXIT_HELD,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    CatalogError,
    ConflictError,
    CredentialError,
    NotFoundError,
    PrestagedError,
    StateError,
)
from prestaged.gate import GateFn, RewarmFn
from prestaged.model import FileRef, has_control, printable, redact
from prestaged.pins import ReleaseFn
from prestaged.retry import RetryPolicy
from prestaged.state.private import create_private, write_private
from prestaged.state.store import Store
from prestaged.warm import RunReport

__all__ = ["CampaignResult", "run_campaign"]

log = logging.getLogger(__name__)

LAUNCH_RECORD_PATIENCE = 300.0
"""Seconds a runner keeps trying to record a submit command's result while the state cannot
be reached (the state writer's patience for outcomes is the same)."""
LAUNCH_RECORD_RETRY = 1.0
"""The first wait between those tries (doubling up to 30 s)."""

S = SubmissionState

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
    repo: CampaignRepository
    gate: GateFn
    open_catalog: Callable[[str], Catalog]
    workdir: Path
    stop: asyncio.Event
    rewarm: Optional[RewarmFn] = None
    release: Optional[ReleaseFn] = None
    _next_touch: float = 0.0
    _skipped: set[str] = field(default_factory=set)

    async def _control(self, stage: StageConfig) -> Optional[str]:
        return await asyncio.to_thread(self.repo.control, self.campaign.name, stage.name)

    async def _submissions(self, stage: StageConfig) -> list[Submission]:
        return await asyncio.to_thread(self.repo.submissions, self.campaign.name, stage.name)

    async def _move(self, sub: Submission, to: SubmissionState, reason: str,
                    **fields: object) -> Submission:
        return await asyncio.to_thread(self.repo.move, sub, to, reason, **fields)

    async def _record_launch(self, sub: Submission, to: SubmissionState, reason: str,
                             **fields: object) -> Submission:
        """``repo.record_launch``: what the submit command did, known only here, tried again
        while the state cannot be reached (a PostgreSQL restart), for up to
        ``LAUNCH_RECORD_PATIENCE``; then an ERROR keeps it in the log."""
        deadline = time.monotonic() + LAUNCH_RECORD_PATIENCE
        delay = LAUNCH_RECORD_RETRY
        while True:
            try:
                return await asyncio.to_thread(self.repo.record_launch, sub, to, reason,
                                               **fields)
            except (ConflictError, NotFoundError):
                raise
            except StateError as e:
                said = f"{sub.campaign}/{sub.stage} #{sub.id}: {reason}"
                if time.monotonic() + delay > deadline:
                    log.error("%s, and the state could not record it for %g s (%s): record "
                              "it by hand once the state answers", said,
                              LAUNCH_RECORD_PATIENCE, e)
                    raise
                log.warning("%s; the state cannot record it yet (%s): trying again in %g s",
                            said, e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)

    def _values(self, stage: StageConfig, sub: Submission) -> dict[str, object]:
        base = self.workdir / self.campaign.name / f"{stage.name}-{sub.id}"
        return {"campaign": self.campaign.name, "stage": stage.name, "submission": sub.id,
                "definition": sub.definition, "files_file": f"{base}.files",
                "urls_file": str(urls_file(self.workdir, sub)), "n_files": sub.n_files or 0,
                "job_id": sub.job_id or ""}

    async def run(self) -> CampaignResult:
        # Operator actions on this campaign then know its stages (see record_stages).
        await asyncio.to_thread(self.repo.record_stages, self.campaign)
        outcome: dict[str, str] = {}
        for stage in self.campaign.ordered():
            if self.stop.is_set():
                break
            control = await self._control(stage)
            if control == "cancelled":
                outcome[stage.name] = await self._cancelled(stage)
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
        if code == EXIT_OK:  # finished: not resumed at start, and may be forgotten
            await asyncio.to_thread(self.repo.finish, self.campaign.name)
        return CampaignResult(self.campaign.name, outcome, code)

    async def _cancelled(self, stage: StageConfig) -> str:
        """A cancelled stage: what was not launched yet is cancelled (if a cancel raced)."""
        for sub in await self._submissions(stage):
            if sub.state in CANCELLABLE:
                await self._move(sub, S.CANCELLED, "stage cancelled by operator")
        log.warning("%s/%s: cancelled: nothing more is created or launched",
                    self.campaign.name, stage.name)
        return "cancelled"

    async def _stage(self, stage: StageConfig) -> str:
        """Process one stage: ``done`` when it is drained and every submission completed,
        ``held`` / ``cancelled`` when an operator control stopped it, else ``incomplete``."""
        name = self.campaign.name
        for sub in await self._submissions(stage):  # resume what a crash left
            await self._advance(stage, sub)
        split = stage.parsed_split
        drained = False  # True once every item has a submission / nothing new is left
        if split.kind in ("all", "list"):
            have = {s.item for s in await self._submissions(stage)}
            for item in split.items or ("all",):
                if item not in have and not self.stop.is_set() \
                        and not await self._control(stage):
                    definition = self._input(stage) if split.kind == "all" else item
                    sub = await asyncio.to_thread(self.repo.create, name, stage.name, item,
                                                  definition)
                    await self._advance(stage, sub)
                    have.add(item)
            drained = all(item in have for item in split.items or ("all",))
        else:
            while not self.stop.is_set() and not await self._control(stage):
                if not await self._next_slice(stage, split.n):
                    drained = True
                    break
        control = await self._control(stage)
        if control == "cancelled":
            return await self._cancelled(stage)
        subs = await self._submissions(stage)
        if drained and not self.stop.is_set() and all(
                s.state is S.COMPLETED or s.superseded_by is not None for s in subs):
            return "done"
        if control == "held" and not any(s.state in RETRYABLE and s.superseded_by is None
                                         for s in subs):
            log.warning("%s/%s: held: nothing more is created or launched until "
                        "`prestaged campaign release`", name, stage.name)
            return "held"
        return "incomplete"

    def _usable(self, stage: StageConfig, ref: FileRef) -> bool:
        """False (said at ERROR, once per file) for a catalog entry whose name or URL holds a
        control character: a line break would add lines of its choosing to the slice's
        ``{urls_file}``/``{files_file}``, which the jobs take as their input."""
        if not (has_control(ref.name) or has_control(ref.url)):
            return True
        if ref.url not in self._skipped:
            self._skipped.add(ref.url)
            log.error("%s/%s: skipped %s (name %s): a control character (a line break, NUL...) "
                      "in a catalog entry; it is left out of every slice", self.campaign.name,
                      stage.name, printable(redact(ref.url)), printable(ref.name))
        return False

    def _input(self, stage: StageConfig) -> str:
        return stage.input.format_map({"campaign": self.campaign.name, "stage": stage.name})

    async def _next_slice(self, stage: StageConfig, n: int) -> bool:
        """Create and process the next drainingn slice; False when the stage is drained."""
        taken = await asyncio.to_thread(self.repo.taken, self.campaign.name, stage.name)
        fresh: list[FileRef] = []
        seen: set[str] = set()
        async for ref in self.open_catalog(self._input(stage)).files():
            if ref.name not in taken and ref.name not in seen and self._usable(stage, ref):
                seen.add(ref.name)
                fresh.append(ref)
                if len(fresh) >= n:
                    break
        if not fresh:
            log.info("%s/%s: drained", self.campaign.name, stage.name)
            return False
        leaky = next((r.url for r in fresh if redact(r.url) != r.url), None)
        if leaky is not None:
            # The ledger keeps the slice's URLs in the state, which never holds a secret.
            raise CatalogError(
                f"campaign {self.campaign.name}, stage {stage.name}: {redact(leaky)} (from "
                f"{self._input(stage)}) carries a password or a token (user:password, "
                "password=, authz=...), and a drainingn slice is kept in the state, which "
                "holds no secrets: let the proxy or a bearer token carry the credentials")
        k = len(await self._submissions(stage)) + 1
        urls = self.workdir / self.campaign.name / f"{stage.name}-slice-{k}.urls"
        sub = await asyncio.to_thread(self.repo.create, self.campaign.name, stage.name,
                                      f"slice-{k}", str(urls), fresh)
        await self._advance(stage, sub)
        return True

    async def _advance(self, stage: StageConfig, sub: Submission) -> None:
        """Take ``sub`` as far as it goes: to a final state, or until ``stop``."""
        if sub.state is S.SUBMITTING:
            await self._move(sub, S.LAUNCH_UNKNOWN,
                             "found in submitting with no runner of it here (its runner "
                             "crashed, lost the campaign's lease or could not reach the "
                             "state): the submit command may or may not have run; not run "
                             "again automatically (its runner records the result if it can)")
            return
        steps = {S.QUEUED: self._prestage, S.PRESTAGING: self._prestage,
                 S.READY: self._submit, S.SUBMITTED: self._complete}
        while sub.state in steps and not self.stop.is_set():
            if sub.state is S.READY:  # the last moment before a launch
                control = await self._control(stage)
                if control == "cancelled":
                    await self._move(sub, S.CANCELLED, "cancelled by operator before launch")
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
            refs = await asyncio.to_thread(self.repo.slice_of, sub.id)
        else:
            refs = []
            seen: set[str] = set()
            async for ref in self.open_catalog(sub.definition).files():
                if ref.url not in seen and self._usable(stage, ref):
                    seen.add(ref.url)
                    refs.append(ref)
        values = self._values(stage, sub)
        await asyncio.to_thread(_write_lists, Path(str(values["urls_file"])),
                                Path(str(values["files_file"])), refs)
        return refs

    async def _prestage(self, stage: StageConfig, sub: Submission) -> Submission:
        from prestaged.catalog.local import LocalCatalog

        if sub.state is S.QUEUED:
            sub = await self._move(sub, S.PRESTAGING, "gate started")
        try:
            refs = await self._slice(stage, sub)
        except (CatalogError, OSError) as e:  # the move says it under -q, with the way out
            return await self._move(sub, S.FAILED, f"input: {e}")
        d = self.campaign.defaults
        ready = stage.ready if stage.ready is not None else d.ready
        catalog = LocalCatalog(str(self._values(stage, sub)["urls_file"]))
        result = await self.gate(catalog, ready, d.prestage_timeout, d.prestage_retry)
        if self.stop.is_set() or result.exit_code == EXIT_INTERRUPTED:
            return sub  # still prestaging: the next run gates it again
        if result.exit_code == EXIT_CREDENTIALS:
            # As keep-warm does: the campaign's run stops (exit 3; the daemon tries again
            # once they are renewed), the slice still prestaging. Storage trouble never gets
            # here: the gate tries again until its timeout, which fails the submission.
            raise CredentialError(f"{sub.campaign}/{sub.stage} #{sub.id}: gate: "
                                  f"{result.summary()}")
        if not result.passed:
            return await self._move(sub, S.FAILED, f"gate: {result.summary()}",
                                    n_files=len(refs))
        return await self._move(sub, S.READY, f"gate: {result.summary()}", n_files=len(refs))

    async def _submit(self, stage: StageConfig, sub: Submission) -> Submission:
        argv = render(stage.submit, self._values(stage, sub))
        # Committed before the command starts: a crash from here on is launch_unknown.
        sub = await self._move(sub, S.SUBMITTING, f"running {argv[0]}")
        try:
            res = await run_argv(argv, self.campaign.defaults.submit_timeout)
        except asyncio.CancelledError:  # the daemon's stop, past its drain: the command is killed
            log.warning("%s/%s #%d: %s was still running when prestaged stopped and was killed; "
                        "it may or may not have launched: the submission is launch_unknown at "
                        "the next start", sub.campaign, sub.stage, sub.id, argv[0])
            raise
        job_id = await asyncio.to_thread(_job_id, stage, res.output_tail)
        if res.may_have_run:  # stopped by a signal: it may have launched before it was
            seen = f"; its output names job id {job_id}" if job_id else ""
            return await self._record_launch(
                sub, S.LAUNCH_UNKNOWN, f"{res.describe(argv[0])}: it may or may not have "
                f"launched{seen}; not run again automatically", exit_code=res.exit_code,
                output_tail=res.output_tail)
        if res.exit_code != 0 and job_id is not None:
            # jobsub_submit prints the job id once condor has queued the jobs, and can still
            # exit non-zero after that (a later step failed): launch_failed would invite a
            # retry, and the slice would run twice on the grid.
            return await self._record_launch(
                sub, S.LAUNCH_UNKNOWN, f"{res.describe(argv[0])}, but its output names job "
                f"id {job_id}: it may have launched; not run again automatically",
                exit_code=res.exit_code, output_tail=res.output_tail)
        if res.exit_code != 0:
            return await self._record_launch(sub, S.LAUNCH_FAILED, res.describe(argv[0]),
                                             exit_code=res.exit_code,
                                             output_tail=res.output_tail)
        if job_id is None and stage.complete is not None and "{job_id}" in stage.complete:
            # Polling `complete` with an empty job id could pass at once (`condor_q ''` finds
            # no jobs) and release the pins before the jobs read the files.
            return await self._record_launch(
                sub, S.LAUNCH_UNKNOWN, f"{argv[0]} exited 0 but no job id was found in its "
                f"output (job_id_regex {stage.job_id_regex!r}), and complete needs one",
                exit_code=0, output_tail=res.output_tail)
        return await self._record_launch(
            sub, S.SUBMITTED, f"{argv[0]} exited 0, job id {job_id or '-'}", exit_code=0,
            job_id=job_id, output_tail=res.output_tail)

    async def _complete(self, stage: StageConfig, sub: Submission) -> Submission:
        if stage.complete is None:
            return await self._move(sub, S.COMPLETED,
                                    "no complete command: done once submitted")
        d = self.campaign.defaults
        # No jitter: one poll per submission, nothing to spread; the waits stay predictable.
        polling = RetryPolicy(initial=d.complete_poll, max=d.complete_poll_max, jitter=0.0)
        start = time.monotonic()
        self._next_touch = start + d.keep_warm
        polls = 0
        while True:
            argv = render(stage.complete, self._values(stage, sub))
            # A command per poll, run by the lease's holder alone (LeaseLost ends the pass).
            await asyncio.to_thread(self.repo.still_ours, sub.campaign)
            res = await run_argv(argv, d.submit_timeout)
            polls += 1
            if res.exit_code == 0:
                await asyncio.to_thread(self.repo.still_ours, sub.campaign)
                released = await self._release(stage, sub)
                return await self._move(sub, S.COMPLETED,
                                        f"{argv[0]} exited 0 after {polls} poll(s){released}")
            left = d.complete_timeout - (time.monotonic() - start)
            if left <= 0:
                return await self._move(sub, S.FAILED, f"not complete within "
                                        f"{d.complete_timeout:g}s: {argv[0]} last exited "
                                        f"{res.exit_code}")
            delay = polling.backoff(polls)
            if not await self._wait_keeping_warm(stage, sub, min(delay, left)):
                return sub

    async def _release(self, stage: StageConfig, sub: Submission) -> str:
        """Release the pins on ``sub``'s slice when the stage asks for it; what to add to the
        reason of ``completed``. A failure is logged, never raised: the pins expire anyway."""
        if not stage.release_after_complete or self.release is None:
            return ""
        from prestaged.catalog.local import LocalCatalog

        try:
            catalog = LocalCatalog(str(self._values(stage, sub)["urls_file"]))
            report = await self.release(catalog)
        except (PrestagedError, OSError) as e:
            log.warning("%s/%s #%d: pins not released (they expire on their own): %s",
                        sub.campaign, sub.stage, sub.id, e)
            return f"; pins not released: {e}"
        log.info("%s/%s #%d: %s", sub.campaign, sub.stage, sub.id, report.summary())
        if not report.files and not report.left and not report.kept:
            return "; nothing pinned to release"
        left = f", {report.left} still pinned (stopped)" if report.left else ""
        kept = (f"; {report.kept} pin(s) kept for {', '.join(report.kept_for)}"
                if report.kept else "")
        return (f"; pins released: {report.files} file(s) in {report.requests} request(s)"
                f"{left}{kept}")

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

                await asyncio.to_thread(self.repo.still_ours, sub.campaign)

                catalog = LocalCatalog(str(self._values(stage, sub)["urls_file"]))
                log.info("%s/%s #%d: keep-warm: touching the slice again", sub.campaign,
                         sub.stage, sub.id)
                try:
                    _judge_rewarm(sub, await self.rewarm(catalog, keep_warm / 2))
                except (CatalogError, OSError) as e:  # keep polling; try again next time
                    log.warning("%s/%s #%d: keep-warm: %s", sub.campaign, sub.stage, sub.id, e)
                self._next_touch = time.monotonic() + keep_warm
                continue
            if now >= until or self.stop.is_set():
                return not self.stop.is_set()
            wake = min(until, self._next_touch) if self.rewarm is not None else until
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), wake - now)


def _judge_rewarm(sub: Submission, report: RunReport) -> None:
    """Say what a keep-warm run of ``sub``'s slice did not do. A run stopped for its
    credentials (an expired proxy or token) stops the campaign's run with that error (exit 3;
    the daemon tries again once they are renewed): its jobs run on input nobody keeps warm, and
    only a person can renew them. Other trouble is an ERROR; the next keep-warm tries again."""
    if isinstance(report.aborted, CredentialError):
        raise report.aborted
    if report.exit_code not in (EXIT_OK, EXIT_INTERRUPTED):
        what = report.aborted if report.aborted is not None else (
            f"{report.tally.failed} of {report.tally.done} files failed")
        log.error("%s/%s #%d: keep-warm: the slice was not kept warm (exit %d): %s",
                  sub.campaign, sub.stage, sub.id, report.exit_code, what)


JOB_ID_TIMEOUT = 2.0
"""Seconds ``job_id_regex`` may search a submit command's output (at most 4,000 characters)."""


def _job_id(stage: StageConfig, output: str) -> Optional[str]:
    """The job id in a submit command's ``output`` by the stage's ``job_id_regex`` (group 1,
    or the whole match), or None. A pattern that backtracks without end (``(a|aa)+$``) gives
    up after ``JOB_ID_TIMEOUT`` (None, with a warning) instead of holding a thread and the
    GIL for ever: the ``regex`` module, which has a timeout and lets other threads run."""
    try:
        m = regex.search(stage.job_id_regex, output, timeout=JOB_ID_TIMEOUT, concurrent=True)
    except TimeoutError:
        log.warning("%s: job_id_regex %r did not finish within %gs on the submit command's "
                    "output; no job id", stage.name, stage.job_id_regex, JOB_ID_TIMEOUT)
        return None
    found = (m.group(1) if m.groups() else m.group(0)) if m else None
    if found is not None and not usable_job_id(found):
        # `\S+` takes ESC and NUL: such an id would drive terminals and cut complete's argv.
        log.warning("%s: job_id_regex %r found %r in the submit command's output, which is "
                    "no job id (empty, too long, control characters or undecodable bytes); "
                    "no job id",
                    stage.name, stage.job_id_regex, printable(found[:80]))
        return None
    return found


def _write_lists(urls: Path, names: Path, refs: Sequence[FileRef]) -> None:
    """The slice's URLs and names, one a line (what ``{urls_file}``/``{files_file}`` name)."""
    write_private(urls, "".join(r.url + "\n" for r in refs))
    write_private(names, "".join(r.name + "\n" for r in refs))


async def run_campaign(campaign: CampaignConfig, store: Store, *, gate: GateFn,
                       open_catalog: Callable[[str], Catalog], workdir: Path,
                       stop: Optional[asyncio.Event] = None,
                       rewarm: Optional[RewarmFn] = None,
                       release: Optional[ReleaseFn] = None,
                       on_move: Optional[MoveHook] = None,
                       owner: Optional[str] = None) -> CampaignResult:
    """Process ``campaign`` in the foreground: stages in ``after`` order, each stage's
    submissions one at a time (gate, submit, poll ``complete`` while keeping the slice warm
    with ``rewarm``, see ``RewarmFn``; without it no keep-warm). ``gate`` warms a slice (see
    ``GateFn``); ``open_catalog`` resolves a definition name; slice files go under
    ``workdir``/<campaign>/. ``release`` releases a slice's tape pins once its ``complete``
    succeeded, in stages with ``release_after_complete`` (without it, nothing is released).
    Setting ``stop`` ends it at the next step (exit code 130).
    Held and cancelled campaigns/stages create and launch nothing (see ``CampaignResult``).
    ``on_move`` hears every stored transition, in a worker thread (see ``MoveHook``).
    ``owner`` (a daemon's member id) makes every change check that member's campaign lease
    (see ``CampaignRepository``): a lost lease ends the pass with ``LeaseLost``."""
    runner = _Runner(campaign, CampaignRepository(store, on_move, owner), gate, open_catalog,
                     workdir,
                     stop if stop is not None else asyncio.Event(), rewarm, release)
    if owner is not None and store.url is not None:
        # Daemons sharing a PostgreSQL state, on any host: the campaign's lease keeps them
        # apart. A SQLite state is one host's, and its daemon's lease keeps no foreground
        # `campaign run` out: the lock does.
        return await runner.run()
    with await asyncio.to_thread(one_runner, workdir, campaign.name):
        return await runner.run()


@contextlib.contextmanager
def _held(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)  # the lock goes with it


def one_runner(workdir: Path, name: str) -> contextlib.AbstractContextManager[None]:
    """The lock making this process the only runner of campaign ``name`` on this state (an
    exclusive ``flock`` on ``<workdir>/<name>/.runner.lock``, which names its holder), for as
    long as the returned context lasts; the kernel drops it when the process dies. Two runners
    (``campaign run`` beside the daemon, or twice) each took the other's ``submitting``
    submission for a crash's and made it ``launch_unknown`` while it ran. ``ConflictError``
    naming the holder when another process runs it. Daemons sharing a PostgreSQL state
    (``owner`` set) are kept apart by the campaign's lease instead, whatever host they run on;
    ``campaign run`` on such a state refuses a campaign whose lease a live member holds."""
    path = workdir / name / ".runner.lock"
    create_private(path)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConflictError(f"campaign {name} is being run by {printable(holder)} on this "
                            "state: one runner per campaign (wait for it, or stop it)") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"prestaged pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return _held(fd)
