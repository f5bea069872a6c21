"""The campaign runner in-process, with a gate that passes at once: how it polls ``complete``,
that its database calls never hold up the event loop, and what a submit's end records."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from campaign_fakes import LOOPS, reaped, run_on
from conftest import Backend

from prestaged.campaign.runner import CampaignResult, _Runner, run_campaign
from prestaged.campaign.spec import CampaignConfig, parse_campaign
from prestaged.catalog import Catalog
from prestaged.catalog.local import LocalCatalog
from prestaged.gate import GateResult
from prestaged.pins import ReleaseFn
from prestaged.state.store import Store

# Appends its start time to $1 and exits 0 from its $2-th call on (1 before).
COUNTING = """\
import sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{time.monotonic()}\\n")
sys.exit(0 if len(open(sys.argv[1]).read().split()) >= int(sys.argv[2]) else 1)
"""


async def passing_gate(catalog: Catalog, ready: float, timeout: float,
                       retry: float) -> GateResult:
    """A gate that finds every file warm at once (the storage is not what these tests pin)."""
    return GateResult(catalog.name, catalog.definition, ready, 1, 1, 1, 0.0, 0, "ready")


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """An open state database of each backend (5 s busy timeout), closed after the test."""
    with backend.store(busy_timeout=5.0) as s:
        yield s


def _lock_elsewhere(store: Store) -> Any:
    """Another process's connection holding what another prestaged writing its state holds:
    SQLite's write lock, or on PostgreSQL exclusive locks on the campaign tables; the caller
    ends it with ``COMMIT`` and closes it."""
    if store.url is None:
        locker = sqlite3.connect(str(store.path), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        return locker
    from prestaged.state.postgres import connect

    pg = connect(store.url)
    pg.execute("BEGIN")
    pg.execute("LOCK TABLE campaigns, campaign_controls, campaign_submissions, "
               "submission_events, campaign_ledger IN ACCESS EXCLUSIVE MODE")
    return pg


def q(*parts: object) -> str:
    """``parts`` quoted as one command line."""
    return " ".join(shlex.quote(str(p)) for p in parts)


def campaign(tmp_path: Path, *, submit: str, complete: Optional[str] = None,
             defaults: str = "") -> Any:
    """A one-stage campaign ``c`` (stage ``s``) over a one-file definition in tmp_path."""
    ds = tmp_path / "ds.txt"
    ds.write_text("https://127.0.0.1:1/pnfs/a\n")
    text = (f'name = "c"\n[defaults]\n{defaults}\n[[stage]]\nname = "s"\n'
            f"input = {json.dumps(str(ds))}\nsubmit = {json.dumps(submit)}\n")
    if complete is not None:
        text += f"complete = {json.dumps(complete)}\n"
    return parse_campaign(text, tmp_path / "c.toml")


async def run(cfg: Any, store: Store, tmp_path: Path) -> CampaignResult:
    """``run_campaign`` with the passing gate and the local catalog."""
    return await run_campaign(cfg, store, gate=passing_gate, open_catalog=LocalCatalog,
                              workdir=tmp_path / "work")


async def test_complete_polls_back_off_by_the_retry_policy(
        tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits between complete polls double from complete_poll up to complete_poll_max."""
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    waits: list[float] = []

    async def no_wait(self: _Runner, stage: Any, sub: Any, seconds: float) -> bool:
        waits.append(seconds)
        return True

    monkeypatch.setattr(_Runner, "_wait_keeping_warm", no_wait)
    cfg = campaign(tmp_path, submit=q(sys.executable, "-c", "pass"),
                   complete=q(sys.executable, script, tmp_path / "polls", 6),
                   defaults='complete_poll = "1m"\ncomplete_poll_max = "5m"')
    result = await run(cfg, store, tmp_path)
    assert result.exit_code == 0, result
    assert waits == [60.0, 120.0, 240.0, 300.0, 300.0]


async def test_a_lock_held_elsewhere_does_not_freeze_the_event_loop(
        tmp_path: Path, store: Store) -> None:
    """Another process's write lock stalls the campaign, never the loop (defect 11)."""
    cfg = campaign(tmp_path, submit=q(sys.executable, "-c", "pass"))
    locker = _lock_elsewhere(store)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run(cfg, store, tmp_path))
    try:
        gaps = []
        last = loop.time()
        for _ in range(30):  # 10 ms ticks; a blocked loop shows as one long gap
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()
        assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.1f}s"
        assert not task.done()  # the campaign waits for the lock meanwhile
    finally:
        released = time.time()
        locker.execute("COMMIT")
        locker.close()
    result = await asyncio.wait_for(task, 60)
    assert result.exit_code == 0, result
    with store.transaction() as conn:
        first = conn.execute("SELECT MIN(at) FROM submission_events").fetchone()[0]
    assert first >= released  # nothing was written while the lock was held


# Prints a job id, leaves `sleep 60` in the background holding stdout (as jobsub and condor
# tools do), writes its pid to $1 and exits 0.
LINGERING_SUBMIT = """\
echo "JobsubJobId of first job: 7.0@test"
sleep 60 &
echo $! > "$1"
exit 0
"""


def submission(store: Store) -> tuple[str, Optional[str], str, list[str]]:
    """(state, job id, reason, states passed through) of the campaign's only submission."""
    with store.transaction() as conn:
        state, job_id, reason, sub_id = conn.execute(
            "SELECT state, job_id, reason, id FROM campaign_submissions").fetchone()
        states = [r[0] for r in conn.execute(
            "SELECT to_state FROM submission_events WHERE submission_id = ? ORDER BY id",
            (sub_id,))]
    return state, job_id, reason, states


@pytest.mark.parametrize("loop", LOOPS)
def test_submit_leaving_a_child_on_stdout_is_submitted_at_its_exit(
        tmp_path: Path, store: Store, loop: str) -> None:
    """Exit 0 with a background child on stdout: submitted with its job id, well before the
    submit_timeout (issue 12, section 2)."""
    script = tmp_path / "submit.sh"
    script.write_text(LINGERING_SUBMIT)
    cfg = campaign(tmp_path, submit=q("sh", script, tmp_path / "child.pid"),
                   defaults='submit_timeout = "30s"')
    start = time.monotonic()
    with reaped(tmp_path / "child.pid"):
        result = run_on(loop, lambda: run(cfg, store, tmp_path))
        elapsed = time.monotonic() - start
    assert result.exit_code == 0, result
    state, job_id, _, states = submission(store)
    assert (state, job_id) == ("completed", "7.0@test")
    assert "submitted" in states
    assert elapsed < 10, f"took {elapsed:.1f}s of the 30 s submit_timeout"


@pytest.mark.parametrize("loop", LOOPS)
def test_submit_killed_on_timeout_is_launch_unknown(
        tmp_path: Path, store: Store, loop: str) -> None:
    """Killed at submit_timeout, it may have launched: launch_unknown, never launch_failed,
    the reason saying what happened and the job id it printed."""
    submit = q("sh", "-c", 'echo "JobsubJobId of first job: 8.0@test"; exec sleep 60')
    cfg = campaign(tmp_path, submit=submit, defaults='submit_timeout = "0.5s"')
    result = run_on(loop, lambda: run(cfg, store, tmp_path))
    assert result.exit_code == 1, result
    state, job_id, reason, states = submission(store)
    assert (state, job_id) == ("launch_unknown", None) and "launch_failed" not in states
    assert reason == ("sh was still running after 0.5s and was killed: it may or may not have "
                      "launched; its output names job id 8.0@test; not run again automatically")


@pytest.mark.parametrize("loop", LOOPS)
def test_submit_killed_by_a_signal_is_launch_unknown(
        tmp_path: Path, store: Store, loop: str) -> None:
    """Killed by a signal from elsewhere (OOM killer, an operator): launch_unknown, named."""
    cfg = campaign(tmp_path, submit=q("sh", "-c", "kill -KILL $$"))
    run_on(loop, lambda: run(cfg, store, tmp_path))
    state, _, reason, _ = submission(store)
    assert state == "launch_unknown"
    assert reason.startswith("sh was killed by SIGKILL: it may or may not have launched")


async def test_a_job_id_regex_that_backtracks_without_end_gives_up_and_the_loop_runs_on(
        tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``job_id_regex = "(a|aa)+$"`` on 3,000 a's and a b takes longer than the universe with
    ``re``, on the event loop: the daemon froze. Now the search gives up at JOB_ID_TIMEOUT
    (submitted, no job id, a warning naming the stage) and runs off the loop, which keeps
    running meanwhile."""
    import prestaged.campaign.runner as runner

    monkeypatch.setattr(runner, "JOB_ID_TIMEOUT", 0.5)
    cfg = campaign(tmp_path, submit=q("sh", "-c", "printf " + "a" * 3000 + "b"))
    cfg = dataclasses.replace(cfg, stage=tuple(
        dataclasses.replace(stage, job_id_regex="(a|aa)+$") for stage in cfg.stage))
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        result = await run(cfg, store, tmp_path)
    finally:
        ticking.cancel()
    assert result.exit_code == 0, result
    state, job_id, _, states = submission(store)
    assert (state, job_id) == ("completed", None) and "submitted" in states
    assert "job_id_regex '(a|aa)+$' did not finish within 0.5s" in caplog.text
    assert max(gaps) < 0.4, max(gaps)  # the search held neither the loop nor the GIL


def test_submit_exiting_non_zero_is_launch_failed(tmp_path: Path, store: Store) -> None:
    """An exit status of its own other than 0: the tool refused, launch_failed as before."""
    cfg = campaign(tmp_path, submit=q("sh", "-c", "echo refused; exit 3"))
    run_on("asyncio", lambda: run(cfg, store, tmp_path))
    state, _, reason, _ = submission(store)
    assert (state, reason) == ("launch_failed", "sh exited 3")


async def test_no_job_id_when_complete_needs_one_is_launch_unknown_and_complete_never_runs(
        tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A submit that exits 0 but prints no job id, with a ``complete`` that takes
    ``{job_id}``: polling ``complete ''`` could pass at once (``condor_q ''`` finds no jobs)
    and release the pins before the jobs read the files. The submission is launch_unknown,
    ``complete`` never runs, and a warning names mark-submitted."""
    polled = tmp_path / "polled"
    cfg = campaign(tmp_path, submit=q("echo", "submitted, but the format changed"),
                   complete=q("sh", "-c", 'echo "[$1]" >> "$0"', polled, "{job_id}"))
    result = await run(cfg, store, tmp_path)
    assert result.exit_code == 1, result
    state, job_id, reason, states = submission(store)
    assert (state, job_id) == ("launch_unknown", None) and "submitted" not in states
    assert reason.startswith("echo exited 0 but no job id was found in its output")
    assert not polled.exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "prestaged campaign mark-submitted --submission 1 --job-id ID" in warning


class _Listing:
    """A catalog whose entries are given: what MetaCat or SAM could answer."""

    def __init__(self, definition: str, refs: list[Any]) -> None:
        self.name, self.definition, self._refs = "listing", definition, refs

    async def files(self) -> Any:
        for ref in self._refs:
            yield ref

    async def estimate(self) -> Optional[int]:
        return len(self._refs)


@pytest.mark.parametrize("split", ["all", "drainingn(5)"])
async def test_a_line_break_in_a_catalog_name_cannot_add_files_to_the_slice(
        tmp_path: Path, store: Store, split: str, caplog: pytest.LogCaptureFixture) -> None:
    """A catalog entry whose name (or URL) holds a line break wrote extra lines of its choosing
    into ``{urls_file}``/``{files_file}``: a URL not in the dataset was warmed and given to the
    jobs. Such an entry is left out of the slice, said at ERROR; the others go on."""
    from prestaged.model import FileRef

    injected = "https://127.0.0.1:1/pnfs/NOT/IN/DATASET/injected.root"
    refs = [FileRef("a.root", "https://127.0.0.1:1/pnfs/a.root"),
            FileRef(f"evil.root\n{injected}", "https://127.0.0.1:1/pnfs/evil.root"),
            FileRef("b.root", "https://127.0.0.1:1/pnfs/b.root\r\nX-Injected: 1"),
            FileRef("c.root", "https://127.0.0.1:1/pnfs/c.root")]
    seen = tmp_path / "seen"
    cfg = campaign(tmp_path, submit=q("sh", "-c", 'cat "$1" "$2" > "$0"', seen,
                                      "{urls_file}", "{files_file}"))
    cfg = dataclasses.replace(cfg, stage=tuple(
        dataclasses.replace(stage, split=split) for stage in cfg.stage))

    def listing(definition: str) -> Any:
        return LocalCatalog(definition) if definition.endswith(".urls") else \
            _Listing(definition, refs)

    result = await run_campaign(cfg, store, gate=passing_gate, open_catalog=listing,
                                workdir=tmp_path / "work")
    assert result.exit_code == 0, result
    assert seen.read_text().splitlines() == [
        "https://127.0.0.1:1/pnfs/a.root", "https://127.0.0.1:1/pnfs/c.root",
        "a.root", "c.root"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2, errors
    assert "skipped https://127.0.0.1:1/pnfs/evil.root (name evil.root\\x0ahttps:" in errors[0]
    assert "skipped https://127.0.0.1:1/pnfs/b.root\\x0d\\x0aX-Injected: 1" in errors[1]


@pytest.mark.parametrize("printed", ["1\x1b[2J\x1b[31mFAKE.0@x", "12\x00evil"])
async def test_a_job_id_with_control_characters_is_no_job_id(
        tmp_path: Path, store: Store, printed: str) -> None:
    """``\\S+`` takes ESC and NUL: such a "job id" drove terminals in ``campaign show`` and was
    cut short in ``complete``'s argv. It is no job id (with a complete that needs one:
    launch_unknown)."""
    script = tmp_path / "submit.py"
    script.write_text(f"print({('JobsubJobId of first job: ' + printed)!r})\n")
    cfg = campaign(tmp_path, submit=q(sys.executable, script),
                   complete=q("true", "{job_id}"))
    await run(cfg, store, tmp_path)
    state, job_id, _, _ = submission(store)
    assert (state, job_id) == ("launch_unknown", None)


async def test_a_submit_killed_at_shutdown_is_said(
        tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's stop cancels a campaign step past the drain: its submit command was killed
    and nothing said so. Now a WARNING names the submission, the command is gone, and the
    submission stays in submitting (launch_unknown at the next start)."""
    pid_file = tmp_path / "submit.pid"
    cfg = campaign(tmp_path, submit=q("sh", "-c", 'echo $$ > "$0"; exec sleep 60', pid_file),
                   defaults='submit_timeout = "120s"')
    task = asyncio.ensure_future(run(cfg, store, tmp_path))
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline and not task.done(), "the submit never started"
        await asyncio.sleep(0.02)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("c/s #1: sh was still running when prestaged stopped and was "
                              "killed")
    assert submission(store)[0] == "submitting"
    deadline = time.monotonic() + 30
    while "zombie" not in _proc_state(pid):
        assert time.monotonic() < deadline, "the submit command outlived the stop"
        await asyncio.sleep(0.02)


def _proc_state(pid: int) -> str:
    """Process ``pid``'s /proc status ("zombie" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def test_one_runner_per_campaign_names_the_holder_and_ends_with_it(tmp_path: Path) -> None:
    """The runner's lock: a second taker is a ConflictError naming the first (its pid); once
    the first is done, it can be taken again; another campaign is not concerned."""
    import os

    from prestaged.campaign.runner import one_runner
    from prestaged.errors import ConflictError

    with one_runner(tmp_path, "c"):
        with pytest.raises(ConflictError, match=f"campaign c is being run by prestaged pid "
                                                f"{os.getpid()} on "):
            one_runner(tmp_path, "c")
        with one_runner(tmp_path, "other"):
            pass
    with one_runner(tmp_path, "c"):
        pass
    assert (tmp_path / "c" / ".runner.lock").stat().st_mode & 0o777 == 0o600


async def test_a_daemon_on_a_sqlite_state_takes_the_runner_lock_too(
        tmp_path: Path, backend: Backend) -> None:
    """The daemon runs campaigns as a cluster member (``owner`` set) even on SQLite, and so
    skipped the lock: ``campaign run`` beside it was not refused and made its submission in
    ``submitting`` launch_unknown while the command ran. On SQLite every runner takes the lock;
    on PostgreSQL the lease keeps members apart (and ``campaign run`` checks it)."""
    from prestaged.campaign.runner import one_runner
    from prestaged.errors import ConflictError, LeaseLost

    cfg = campaign(tmp_path, submit="true")
    with backend.store() as store, one_runner(tmp_path / "work", "c"):
        call = run_campaign(cfg, store, gate=passing_gate, open_catalog=LocalCatalog,
                            workdir=tmp_path / "work", owner="other-member")
        if store.url is None:
            with pytest.raises(ConflictError, match="campaign c is being run by prestaged pid"):
                await call
        else:  # no lock there; this member holds no lease, so it changes nothing
            with pytest.raises(LeaseLost):
                await call


def _gated_submit(tmp_path: Path) -> tuple[str, Path]:
    """A submit command that prints a jobsub job id once the test creates its ``go`` file
    (polled for at most a minute), and that file."""
    go = tmp_path / "go"
    script = ('for i in $(seq 1200); do [ -e "$0" ] && break; sleep 0.05; done; '
              'echo "JobsubJobId of first job: 1.0@jobsub01"')
    return q("sh", "-c", script, go), go


def _states(store: Store) -> list[str]:
    with store.transaction() as conn:
        return [r[0] for r in conn.execute("SELECT state FROM campaign_submissions")]


def _run_as_a(cfg: CampaignConfig, store: Store, tmp_path: Path, *,
              release: Optional[ReleaseFn] = None,
              run_cfg: Optional[CampaignConfig] = None) -> asyncio.Future[Any]:
    """``cfg`` registered, its lease claimed by member A, and A running it (``run_cfg``: the
    config A runs, when it differs from the one registered)."""
    from prestaged.campaign.repository import CampaignRepository
    from prestaged.state.cluster import claim_campaign

    CampaignRepository(store).register(cfg, "(test)")
    assert claim_campaign(store, "c", "A", 60.0)[0]
    return asyncio.ensure_future(run_campaign(
        run_cfg or cfg, store, gate=passing_gate, open_catalog=LocalCatalog,
        workdir=tmp_path / "work", release=release, owner="A"))


async def _until_submitting(store: Store) -> None:
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(_states, store) != ["submitting"]:
        assert time.monotonic() < deadline, "the submission never reached submitting"
        await asyncio.sleep(0.02)  # polling the state with a deadline


async def test_a_launch_is_recorded_by_its_launcher_after_a_takeover(
        tmp_path: Path, make_pg_url: Any) -> None:
    """Daemon A runs the submit command; meanwhile (A frozen past its lease) daemon B takes
    the campaign over and marks the submission launch_unknown. The command then launches job
    1.0@jobsub01. A's record of it was refused (its lease was gone) and dropped: the launch
    stayed launch_unknown without its job id, and a release submitted the slice again. A's
    record now replaces B's guess, job id and all, and wakes B to poll it."""
    from prestaged.campaign.repository import CampaignRepository, SubmissionState

    submit, go = _gated_submit(tmp_path)
    cfg = campaign(tmp_path, submit=submit)
    with Store(tmp_path / "anchor.db", url=make_pg_url()) as store:
        running = _run_as_a(cfg, store, tmp_path)
        await _until_submitting(store)
        with store.transaction() as conn:  # A's lease expired and B took the campaign over
            conn.execute("UPDATE campaigns SET lease_owner = 'B' WHERE name = 'c'")
        b = CampaignRepository(store, owner="B")
        [sub] = b.submissions("c")
        b.move(sub, SubmissionState.LAUNCH_UNKNOWN, "found in submitting (B's guess)")
        go.touch()
        await asyncio.wait_for(running, 60)
        state, job_id, reason, states = submission(store)
        with store.transaction() as conn:
            poked = conn.execute("SELECT poked FROM campaigns WHERE name = 'c'").fetchone()[0]
    assert (state, job_id) == ("submitted", "1.0@jobsub01")
    assert reason == "sh exited 0, job id 1.0@jobsub01 (recorded by its launcher over " \
                     "launch_unknown)"
    assert states[-2:] == ["launch_unknown", "submitted"]
    # B, whose pass ended on the launch_unknown, is woken to poll it (soak: it waited for
    # daemon.campaign_check, the submission submitted and nobody polling its complete).
    assert poked is not None


async def test_a_launch_is_recorded_once_the_state_answers_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The state cannot be written when the submit command ends (a PostgreSQL restart,
    another process's SQLite lock past busy_timeout): the move to submitted failed, the
    result was dropped, and the next pass guessed launch_unknown. The runner now says so and
    tries again until the state answers."""
    from prestaged.campaign import runner

    monkeypatch.setattr(runner, "LAUNCH_RECORD_RETRY", 0.05)
    submit, go = _gated_submit(tmp_path)
    cfg = campaign(tmp_path, submit=submit)
    with Store(tmp_path / "state.db", busy_timeout=0.2) as store:
        running = asyncio.ensure_future(run(cfg, store, tmp_path))
        await _until_submitting(store)
        locker = _lock_elsewhere(store)
        try:
            go.touch()
            deadline = time.monotonic() + 60
            while not any("cannot record it yet" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline and not running.done()
                await asyncio.sleep(0.02)  # waiting for the runner's first refused try
        finally:
            locker.execute("COMMIT")
            locker.close()
        result = await asyncio.wait_for(running, 60)
        state, job_id, _, _ = submission(store)
    assert result.exit_code == 0, result
    assert (state, job_id) == ("completed", "1.0@jobsub01")
    [warning] = [r.getMessage() for r in caplog.records if "cannot record it yet" in r.getMessage()]
    assert "c/s #1: sh exited 0, job id 1.0@jobsub01; the state cannot record it yet" in warning


async def test_a_gate_stopped_for_credentials_stops_the_run_and_keeps_the_slice_prestaging(
        tmp_path: Path, store: Store) -> None:
    """A gate ended by a run stopped for the credentials (exit 3) failed the submission for
    good, while keep-warm in the same case stops the campaign's run until they are renewed.
    Now the gate does the same: CredentialError, the submission still prestaging, and the
    next run, credentials renewed, gates and submits it."""
    from prestaged.errors import CredentialError

    async def expired(catalog: Catalog, ready: float, timeout: float, retry: float
                      ) -> GateResult:
        return GateResult(catalog.name, catalog.definition, ready, 1, 0, 1, 0.0, 3,
                          "warm run stopped: the proxy expired")

    cfg = campaign(tmp_path, submit=q(sys.executable, "-c", "pass"))
    with pytest.raises(CredentialError, match="the proxy expired"):
        await run_campaign(cfg, store, gate=expired, open_catalog=LocalCatalog,
                           workdir=tmp_path / "work")
    assert _states(store) == ["prestaging"]
    result = await run(cfg, store, tmp_path)
    assert result.exit_code == 0 and _states(store) == ["completed"]


def _take_over(store: Store) -> None:
    """What a member B does once A's lease on campaign ``c`` expired: claims it."""
    with store.transaction() as conn:
        conn.execute("UPDATE campaigns SET lease_owner = 'B' WHERE name = 'c'")


def _count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


async def _lines(path: Path, n: int) -> None:
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(_count, path) < n:
        assert time.monotonic() < deadline, f"{path} never had {n} lines"
        await asyncio.sleep(0.02)  # polling a command's record with a deadline


async def test_a_member_that_lost_the_lease_runs_no_more_complete_polls(
        tmp_path: Path, make_pg_url: Any) -> None:
    """Daemon A polls a submission's complete command; A is frozen (SIGSTOP) past its lease
    and B takes the campaign over and polls it too. On waking, A ran its next poll before its
    lease keeper noticed, beside B (soak: complete run by both). A now asks for its lease
    before each poll: it runs none once the campaign is B's, and its pass ends."""

    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    polls = tmp_path / "polls"
    cfg = campaign(tmp_path, submit="true", complete=q(sys.executable, script, polls, 3),
                   defaults='complete_poll = "0.1s"\ncomplete_poll_max = "0.1s"')
    with Store(tmp_path / "anchor.db", url=make_pg_url()) as store:
        running = _run_as_a(cfg, store, tmp_path)
        await _lines(polls, 1)
        await asyncio.to_thread(_take_over, store)
        result = await asyncio.wait_for(running, 60)
        state, _, _, _ = submission(store)
    assert _count(polls) == 1  # the poll under way when B took over, alone
    assert state == "submitted" and result.exit_code == 1  # B's to poll and complete


async def test_a_member_that_lost_the_lease_during_complete_releases_nothing(
        tmp_path: Path, make_pg_url: Any) -> None:
    """The lease is lost while the complete command runs (it then exits 0): the pins of the
    slice are B's to release, after B's own complete, and A neither releases them nor
    records the submission completed."""

    complete, go = _gated_submit(tmp_path)
    cfg = campaign(tmp_path, submit="true", complete=complete)
    released: list[str] = []

    async def release(catalog: Catalog) -> Any:
        released.append(catalog.definition)
        raise AssertionError("released by a member without the lease")

    with Store(tmp_path / "anchor.db", url=make_pg_url()) as store:
        running = _run_as_a(cfg, store, tmp_path, release=release,
                            run_cfg=dataclasses.replace(cfg, stage=[dataclasses.replace(
                                cfg.stage[0], release_after_complete=True)]))
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(_states, store) != ["submitted"]:
            assert time.monotonic() < deadline, "never submitted"
            await asyncio.sleep(0.02)  # polling the state with a deadline
        await asyncio.to_thread(_take_over, store)
        go.touch()
        result = await asyncio.wait_for(running, 60)
        state, _, _, _ = submission(store)
    assert released == [] and state == "submitted" and result.exit_code == 1


def test_submit_exiting_non_zero_after_naming_a_job_id_is_launch_unknown(
        tmp_path: Path, store: Store) -> None:
    """A submit that printed its job id and then exited 1 has launched jobs: launch_unknown
    (mark-submitted or retry, the operator's call), never launch_failed, whose way out is a
    retry that would run the slice on the grid twice."""
    submit = q("sh", "-c", 'echo "JobsubJobId of first job: 9.0@test"; echo "upload failed";'
                           " exit 1")
    cfg = campaign(tmp_path, submit=submit)
    result = run_on("asyncio", lambda: run(cfg, store, tmp_path))
    assert result.exit_code == 1, result
    state, _, reason, states = submission(store)
    assert state == "launch_unknown" and "launch_failed" not in states
    assert reason == ("sh exited 1, but its output names job id 9.0@test: it may have "
                      "launched; not run again automatically")
