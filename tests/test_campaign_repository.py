"""The campaign repository: operator actions on submissions that do not exist are 404s, on
submissions whose state refuses them 409s (defect 6), through ``apply_action`` as well."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Backend

from prestaged.campaign.actions import apply_action
from prestaged.campaign.repository import CampaignRepository, Submission, SubmissionState
from prestaged.errors import ConflictError, NotFoundError
from prestaged.model import FileRef

S = SubmissionState


@pytest.fixture
def repo(backend: Backend) -> Iterator[CampaignRepository]:
    """A repository on a fresh state database of each backend."""
    with backend.store() as store:
        yield CampaignRepository(store)


def walk(repo: CampaignRepository, sub: Submission, *states: SubmissionState) -> Submission:
    """``sub`` moved through ``states`` in turn."""
    for to in states:
        sub = repo.move(sub, to, "test")
    return sub


def test_retry_of_a_missing_submission_is_not_found(repo: CampaignRepository) -> None:
    """retry names a submission that does not exist: NotFoundError, HTTP 404."""
    repo.create("c", "s", "all", "d")
    with pytest.raises(NotFoundError, match="campaign 'c' has no submission 99") as err:
        repo.retry("c", 99)
    assert err.value.http_status == 404


def test_mark_submitted_of_a_missing_submission_is_not_found(repo: CampaignRepository) -> None:
    """mark-submitted of another campaign's or no submission: NotFoundError, HTTP 404."""
    other = repo.create("other", "s", "all", "d")
    for sub_id in (other.id, 99):
        with pytest.raises(NotFoundError) as err:
            repo.mark_submitted("c", sub_id, "1.0@job")
        assert err.value.http_status == 404


def test_get_and_move_of_a_missing_submission_are_not_found(repo: CampaignRepository) -> None:
    """A submission id with no row is a NotFoundError, not a TypeError from a missing row."""
    sub = repo.create("c", "s", "all", "d")
    with pytest.raises(NotFoundError):
        repo.get(sub.id + 1)
    with repo.store.transaction() as conn:
        conn.execute("DELETE FROM submission_events")
        conn.execute("DELETE FROM campaign_submissions")
    with pytest.raises(NotFoundError):
        repo.move(sub, S.PRESTAGING, "test")


def test_refused_transitions_are_conflicts(repo: CampaignRepository) -> None:
    """Backwards, out of a final state, or the wrong state for an action: ConflictError, 409."""
    sub = walk(repo, repo.create("c", "s", "all", "d"), S.PRESTAGING, S.READY, S.SUBMITTING,
               S.SUBMITTED, S.COMPLETED)
    refused = [lambda: repo.move(sub, S.PRESTAGING, "backwards"),
               lambda: repo.move(sub, S.CANCELLED, "out of a final state"),
               lambda: repo.retry("c", sub.id),
               lambda: repo.mark_submitted("c", sub.id, "1.0@job")]
    for action in refused:
        with pytest.raises(ConflictError) as err:
            action()
        assert err.value.http_status == 409
    assert repo.get(sub.id).state is S.COMPLETED


def test_retry_twice_is_a_conflict(repo: CampaignRepository) -> None:
    """A failed submission is retried once; retrying it again names the retry that took over."""
    sub = walk(repo, repo.create("c", "s", "all", "d"), S.PRESTAGING, S.FAILED)
    new = repo.retry("c", sub.id)
    with pytest.raises(ConflictError, match=f"already retried as #{new.id}"):
        repo.retry("c", sub.id)


@pytest.mark.parametrize("action", ["retry", "mark-submitted"])
def test_apply_action_answers_404_for_a_missing_submission(
        repo: CampaignRepository, action: str) -> None:
    """What the API and the CLI call: a missing submission is a 404, not a 409."""
    repo.create("c", "s", "all", "d")
    with pytest.raises(NotFoundError) as err:
        apply_action(repo, "c", action, submission=42, job_id="1.0@job")
    assert err.value.http_status == 404


def test_apply_action_answers_409_for_a_refused_transition(repo: CampaignRepository) -> None:
    """mark-submitted of a queued submission: its state refuses it, a 409."""
    sub = repo.create("c", "s", "all", "d")
    with pytest.raises(ConflictError, match="not launch_unknown") as err:
        apply_action(repo, "c", "mark-submitted", submission=sub.id, job_id="1.0@job")
    assert err.value.http_status == 409


def test_ledger_controls_and_retries_round_trip(repo: CampaignRepository) -> None:
    """What the runner relies on, on each backend: a slice's ledger written with its
    submission, ids handed back by the insert, controls (cancel wins over hold), a released
    launch_unknown superseded by a retry that takes over its slice, and the counts."""
    files = [FileRef(f"f{i}", f"https://h/f{i}") for i in range(3)]
    first = repo.create("c", "s", "slice-1", "d1", ledger=files)
    second = repo.create("c", "s", "slice-2", "d2")
    assert second.id > first.id and first.n_files == 3
    assert repo.taken("c", "s") == {"f0", "f1", "f2"}
    repo.hold("c")
    assert repo.control("c", "s") == "held"
    repo.cancel("c", "other")
    assert (repo.control("c", "other"), repo.controls("c")) == (
        "cancelled", {"": "held", "other": "cancelled"})
    walk(repo, first, S.PRESTAGING, S.READY, S.SUBMITTING, S.LAUNCH_UNKNOWN)
    [retry] = repo.release("c")
    assert repo.control("c", "s") is None
    assert repo.get(first.id).state is S.CANCELLED
    assert repo.get(first.id).superseded_by == retry.id
    assert (retry.item, retry.state) == ("slice-1 (retry 1)", S.QUEUED)
    assert repo.slice_of(retry.id) == files and repo.slice_of(first.id) == []
    assert repo.counts("c") == {"s": {"cancelled": 1, "queued": 2}}
    assert [e["to"] for e in repo.events(first.id)] == [
        "queued", "prestaging", "ready", "submitting", "launch_unknown", "cancelled"]
    assert repo.names() == ["c"]


@pytest.mark.parametrize("state", [S.FAILED, S.LAUNCH_UNKNOWN])
def test_two_retries_at_once_make_one_successor(
        backend: Backend, state: SubmissionState) -> None:
    """Two operators (two CLIs, two members) retry one submission at once: both read it
    unretried, then both act. Each used to create a successor, and the slice was submitted
    twice. Now the retry claims the submission in its own transaction: the one that comes
    second (here through another connection, with what it read before the first committed)
    is a conflict and adds nothing."""
    with backend.store() as one, backend.store() as other:
        first, second = CampaignRepository(one), CampaignRepository(other)
        files = [FileRef("f0", "https://h/f0")]
        middle = S.SUBMITTING if state is S.LAUNCH_UNKNOWN else S.PRESTAGING
        pre = [S.PRESTAGING, S.READY] if state is S.LAUNCH_UNKNOWN else []
        sub = walk(first, first.create("c", "s", "slice-1", "d", ledger=files),
                   *pre, middle, state)
        stale = next(s for s in second.submissions("c") if s.id == sub.id)
        assert stale.superseded_by is None  # what the second operator's check saw
        winner = first.retry("c", sub.id)
        with pytest.raises(ConflictError, match="retried meanwhile") as err:
            second._retry(stale, "retried by operator")
        assert err.value.http_status == 409
        subs = first.submissions("c")
        assert [s.id for s in subs if s.state is S.QUEUED] == [winner.id]
        old = first.get(sub.id)
        assert old.superseded_by == winner.id
        assert old.state is (S.CANCELLED if state is S.LAUNCH_UNKNOWN else state)
        assert first.slice_of(winner.id) == files


def test_retry_and_release_in_a_cancelled_campaign_are_conflicts(
        repo: CampaignRepository) -> None:
    """A cancelled campaign (or stage) creates and launches nothing ever again: a retry or a
    release there made 'queued' submissions that could never run. Both are 409s, naming the
    cancel, and nothing is created."""
    failed = walk(repo, repo.create("c", "s", "all", "d"), S.PRESTAGING, S.FAILED)
    unknown = walk(repo, repo.create("c", "t", "all", "d"), S.PRESTAGING, S.READY,
                   S.SUBMITTING, S.LAUNCH_UNKNOWN)
    repo.cancel("c", "s")
    with pytest.raises(ConflictError, match="stage s of campaign c is cancelled for good"):
        repo.retry("c", failed.id)
    repo.cancel("c")
    with pytest.raises(ConflictError, match="campaign c is cancelled for good"):
        repo.release("c")
    with pytest.raises(ConflictError, match="campaign c is cancelled for good"):
        repo.retry("c", unknown.id)
    assert {s.id: s.state for s in repo.submissions("c")} == {
        failed.id: S.FAILED, unknown.id: S.LAUNCH_UNKNOWN}


def test_release_leaves_launch_unknown_of_a_cancelled_stage_alone(
        repo: CampaignRepository) -> None:
    """Release of a campaign with one stage cancelled made a queued retry in that stage that
    could never run, and hid its launch_unknown record (cancelled) behind it."""
    there = walk(repo, repo.create("c", "s", "all", "d"), S.PRESTAGING, S.READY, S.SUBMITTING,
                 S.LAUNCH_UNKNOWN)
    other = walk(repo, repo.create("c", "t", "all", "d"), S.PRESTAGING, S.READY, S.SUBMITTING,
                 S.LAUNCH_UNKNOWN)
    repo.cancel("c", "s")
    [retry] = repo.release("c")
    assert retry.stage == "t" and repo.get(other.id).state is S.CANCELLED
    assert repo.get(there.id).state is S.LAUNCH_UNKNOWN
    assert repo.get(there.id).superseded_by is None
    repo.cancel("c")
    with pytest.raises(ConflictError, match=r"^campaign c is cancelled for good"):
        repo.retry("c", there.id)  # the campaign, not "stage s of campaign c"


def test_a_list_item_named_like_a_slice_keeps_its_list_in_the_work_directory(
        tmp_path: Path) -> None:
    """``split = "list(slice-7.urls)"`` was taken for a drainingn slice by its text, and its
    URL list went to the process's cwd (the daemon's, under systemd). Only the list the runner
    named is a slice's own; retries keep it."""
    from prestaged.campaign.repository import urls_file

    def sub(item: str, definition: str, sub_id: int = 3) -> Submission:
        return Submission(sub_id, "c", "s", item, definition, S.QUEUED, None, 0.0, 0.0, None,
                          None, None, None)

    work = tmp_path / "work"
    mine = work / "c" / "s-slice-7.urls"
    assert urls_file(work, sub("slice-7", str(mine))) == mine
    assert urls_file(work, sub("slice-7 (retry 2)", str(mine))) == mine
    for item in ("slice-7.urls", "slice-7", "slice-x.urls"):
        assert urls_file(work, sub(item, item)) == work / "c" / "s-3.urls"


def test_a_cancel_does_not_overwrite_a_launch_begun_after_it_read(
        make_pg_url: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's cancel holds no campaign lock: on PostgreSQL it read a submission
    `ready`, the runner moved it to `submitting` and ran its command, and the cancel then
    wrote `cancelled` over the launch. The move now writes only from the state it read: the
    cancel leaves the launch alone and cancels the rest. (On SQLite, BEGIN IMMEDIATE keeps
    the runner out between the read and the write.)"""
    from prestaged.state.db import PostgresDatabase

    backend = Backend("postgresql", tmp_path, make_pg_url())

    with backend.store() as operator_store, backend.store() as runner_store:
        operator, runner = CampaignRepository(operator_store), CampaignRepository(runner_store)
        launching = walk(runner, runner.create("c", "s", "slice-1", "d"), S.PRESTAGING, S.READY)
        waiting = runner.create("c", "s", "slice-2", "d")
        execute = PostgresDatabase.execute
        raced: list[str] = []

        def runner_first(db: PostgresDatabase, sql: str, params: Any = ()) -> Any:
            if sql.startswith("UPDATE campaign_submissions SET state") and not raced:
                raced.append("the runner's move")  # before it: its own UPDATE passes here
                runner.move(launching, S.SUBMITTING, "running submit")
            return execute(db, sql, params)

        monkeypatch.setattr(PostgresDatabase, "execute", runner_first)
        cancelled = operator.cancel("c")
        monkeypatch.setattr(PostgresDatabase, "execute", execute)
        assert raced, "the runner's move did not come between the cancel's read and write"
        assert [s.id for s in cancelled] == [waiting.id]
        assert runner.get(launching.id).state is S.SUBMITTING
        assert runner.get(waiting.id).state is S.CANCELLED
        assert runner.move(launching, S.SUBMITTED, "launched", job_id="1.0@j").state \
            is S.SUBMITTED


def test_a_launch_recorded_after_its_retry_keeps_the_retry_and_says_the_slice_may_run_twice(
        repo: CampaignRepository, caplog: pytest.LogCaptureFixture) -> None:
    """The submit command of a submission another runner marked launch_unknown, and that an
    operator has since released for a retry, launches after all: its state stays (the retry
    is queued), its job id is kept on it, and an ERROR says the slice may run twice."""
    sub = walk(repo, repo.create("c", "s", "all", "d"), S.PRESTAGING, S.READY, S.SUBMITTING,
               S.LAUNCH_UNKNOWN)
    retry = repo.retry("c", sub.id)
    got = repo.record_launch(sub, S.SUBMITTED, "sh exited 0, job id 7.0@j", exit_code=0,
                             job_id="7.0@j")
    assert (got.state, got.job_id, got.superseded_by) == (S.CANCELLED, "7.0@j", retry.id)
    assert repo.get(retry.id).state is S.QUEUED
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "sh exited 0, job id 7.0@j, but it was cancelled meanwhile" in error
    assert "the slice may run twice" in error


def _file(stages: str) -> Any:
    """Campaign ``c`` of the given ``[[stage]]`` tables."""
    from prestaged.campaign.spec import parse_campaign

    return parse_campaign('name = "c"\n' + stages, Path("/tmp/c.toml"))


def _stage(name: str, input: str = "def", split: str = "all") -> str:
    return (f'[[stage]]\nname = "{name}"\ninput = "{input}"\nsplit = "{split}"\n'
            'submit = "true"\n')


def test_adding_again_without_a_stage_whose_submission_is_open_is_refused(
        repo: CampaignRepository) -> None:
    """Dropping a stage whose submission is still submitted left it followed by nobody (no
    complete poll, no keep-warm) and the campaign unfinished for ever: refused, naming the
    stage and the way out; once that stage is cancelled, the new file is taken."""
    repo.register(_file(_stage("a") + _stage("b")), "v1")
    walk(repo, repo.create("c", "a", "all", "def"), S.PRESTAGING, S.READY, S.SUBMITTING,
         S.SUBMITTED)
    with pytest.raises(ConflictError, match=r"stage a is not in the file, but its submission "
                                            r"#\d+ is submitted .*campaign cancel c --stage a"):
        repo.register(_file(_stage("b")), "v2")
    with pytest.raises(ConflictError, match="stage a is not in the file"):
        repo.record_stages(_file(_stage("b")))  # `campaign run` of the edited file
    repo.cancel("c", "a")
    assert repo.register(_file(_stage("b")), "v2") is False


def test_adding_again_with_another_kind_of_split_is_refused(repo: CampaignRepository) -> None:
    """all -> drainingn would hand every file of the submitted `all` submission to slices
    again (each file run twice on the grid): refused; a new drainingn size is taken."""
    repo.register(_file(_stage("a", split="drainingn(2)")), "v1")
    sub = repo.create("c", "a", "slice-1", "/w/c/a-slice-1.urls",
                      [FileRef("f1", "https://127.0.0.1:1/f1")])
    walk(repo, sub, S.PRESTAGING, S.READY, S.SUBMITTING, S.SUBMITTED)
    with pytest.raises(ConflictError, match=r"stage a: split all does not fit its submission "
                                            r"#\d+ \(slice-1, cut by split drainingn"):
        repo.register(_file(_stage("a", split="all")), "v2")
    assert repo.register(_file(_stage("a", split="drainingn(5)")), "v2") is False
    repo.register(_file(_stage("a", split="drainingn(5)") + _stage("b")), "v3")  # and back
    repo.create("c", "b", "all", "def")
    with pytest.raises(ConflictError, match=r"split drainingn\(3\) does not fit"):
        repo.register(_file(_stage("a", split="drainingn(5)")
                            + _stage("b", split="drainingn(3)")), "v4")


def test_adding_again_with_a_new_input_for_a_made_all_submission_is_refused(
        repo: CampaignRepository) -> None:
    """An `all` stage whose submission was made for input `def`: a new input would never be
    submitted (the stage has its `all` submission) and the stage would count done."""
    repo.register(_file(_stage("a")), "v1")
    repo.create("c", "a", "all", "def")
    with pytest.raises(ConflictError, match="input other would never be submitted"):
        repo.register(_file(_stage("a", input="other")), "v2")
    assert repo.register(_file(_stage("a") + _stage("b", input="other")), "v2") is False
