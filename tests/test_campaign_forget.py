"""Finished campaigns go away (soak review, finding 4): what counts as finished, ``campaign
forget`` (on the state and through the daemon), the daemon's tidy after ``[state]
keep_campaigns``, no relaunch of finished campaigns at start, and no metric series left for
them; on both backends. Every wait polls with a deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest
from campaign_fakes import write_definition
from cli_runner import run_cli
from conftest import Backend
from daemon_harness import InProcess, free_port, in_process, metric_value, until, write_config

from prestaged.campaign.repository import CampaignRepository, Submission, SubmissionState
from prestaged.campaign.spec import parse_campaign
from prestaged.errors import ConflictError, NotFoundError
from prestaged.model import FileRef
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import ThreadedStorageServer

S = SubmissionState
TOKEN = "forget-t0ken-secret"
TABLES = {"campaigns": "name", "campaign_submissions": "campaign",
          "campaign_ledger": "campaign", "campaign_controls": "campaign",
          "campaign_ends": "campaign"}


def _moved(repo: CampaignRepository, sub: Submission, *states: str) -> Submission:
    for to in states:
        sub = repo.move(sub, S(to), "test")
    return sub


def _completed(repo: CampaignRepository, campaign: str, item: str = "all",
               ledger: tuple[FileRef, ...] = ()) -> Submission:
    sub = repo.create(campaign, "reco", item, "def", ledger)
    return _moved(repo, sub, "prestaging", "ready", "submitting", "submitted", "completed")


def _launch_unknown(repo: CampaignRepository, campaign: str, item: str = "all") -> Submission:
    sub = repo.create(campaign, "reco", item, "def")
    return _moved(repo, sub, "prestaging", "ready", "submitting", "launch_unknown")


def _rows(backend: Backend, campaign: str) -> dict[str, int]:
    """Rows of ``campaign`` per campaign table, and its submissions' transitions."""
    out = {table: backend.query(f"SELECT COUNT(*) FROM {table} WHERE {col} = '{campaign}'")[0][0]
           for table, col in TABLES.items()}
    out["submission_events"] = backend.query(
        "SELECT COUNT(*) FROM submission_events WHERE submission_id IN (SELECT id FROM "
        f"campaign_submissions WHERE campaign = '{campaign}')")[0][0]
    return out


def _full(repo: CampaignRepository, name: str) -> None:
    """Campaign ``name``, registered, held then released, with a drainingn ledger, a failed
    slice retried by a completed one, and a finished run."""
    repo.register(parse_campaign(f'name = "{name}"\n[[stage]]\nname = "reco"\ninput = "d"\n'
                                 'submit = "true"\n', Path(f"{name}.toml")), "body")
    repo.hold(name)
    repo.release(name)
    files = tuple(FileRef(f"{name}-f{i}", f"https://door.example/{name}/f{i}") for i in range(3))
    failed = _moved(repo, repo.create(name, "reco", "slice-1", "def", files), "prestaging",
                    "failed")
    retry = repo.retry(name, failed.id)
    _moved(repo, retry, "prestaging", "ready", "submitting", "submitted", "completed")
    repo.finish(name)


def test_forget_drops_every_row_of_a_finished_campaign_and_nothing_else(
        backend: Backend) -> None:
    """Registration, submissions (a retried one too), transitions, ledger, controls and end
    go in one forget; another campaign keeps all of its rows."""
    with backend.store() as store:
        repo = CampaignRepository(store)
        _full(repo, "old")
        _full(repo, "other")
        before = _rows(backend, "other")
        assert _rows(backend, "old") == before and all(before.values())
        assert repo.finished().keys() == {"old", "other"}
        dropped = repo.forget("old")
        assert dropped == {"submissions": 2, "events": before["submission_events"],
                           "ledger": 3, "controls": 1, "registration": 1}
        assert set(_rows(backend, "old").values()) == {0}
        assert _rows(backend, "other") == before
        assert repo.names() == ["other"]
        with pytest.raises(NotFoundError, match="no campaign 'old'"):
            repo.forget("old")


def test_only_a_finished_campaign_is_forgotten(backend: Backend) -> None:
    """Refused, naming what is left, nothing dropped: a launch_unknown or failed submission
    (an operator must act), a campaign no run has finished, one a daemon holds the lease of;
    a new submission makes a finished campaign unfinished again. A submitted one in a
    cancelled stage is final (never followed again)."""
    with backend.store() as store:
        repo = CampaignRepository(store)
        _completed(repo, "c")
        unknown = _launch_unknown(repo, "c", "b")
        repo.finish("c")  # a cancelled stage ends a pass "done" with its launch_unknown
        with pytest.raises(ConflictError, match=rf"submission #{unknown.id} reco "
                                                r"launch_unknown is not final"):
            repo.forget("c")
        assert "c" not in repo.finished()
        repo.mark_submitted("c", unknown.id, "1.0@x")  # submitted: followed until complete
        with pytest.raises(ConflictError, match=rf"#{unknown.id} reco submitted"):
            repo.forget("c")
        repo.cancel("c", "reco")  # cancelled for good: nothing will follow it
        assert "c" in repo.finished()
        _moved(repo, repo.create("c", "reco", "late", "def"), "cancelled")
        with pytest.raises(ConflictError, match="no run of it has ended with every stage"):
            repo.forget("c")  # created after the end: a run must say it is done again
        repo.finish("c")
        repo.register(parse_campaign('name = "c"\n[[stage]]\nname = "reco"\ninput = "d"\n'
                                     'submit = "true"\n', Path("c.toml")), "body")
        with pytest.raises(ConflictError, match="no run of it has ended"):
            repo.forget("c")  # added again: its new stages may have work
        repo.finish("c")
        with store.transaction() as conn:
            conn.execute("UPDATE campaigns SET lease_owner = 'h:1:m', lease_until = ? "
                         "WHERE name = 'c'", (store.now() + 60,))
        with pytest.raises(ConflictError, match="h:1:m is running it now"):
            repo.forget("c")
        assert _rows(backend, "c")["campaign_submissions"] == 3
        with store.transaction() as conn:
            conn.execute("UPDATE campaigns SET lease_until = ? WHERE name = 'c'",
                         (store.now() - 1,))
        assert repo.forget("c")["submissions"] == 3


def test_tidy_drops_campaigns_finished_longer_ago_than_keep_campaigns(
        backend: Backend) -> None:
    """Only finished campaigns whose end is older than keep_campaigns, and not spared (the
    daemon runs them); keep_campaigns 0 keeps every one."""
    with backend.store(keep_campaigns=3600) as store:
        repo = CampaignRepository(store)
        for name in ("old", "recent", "spared", "stuck"):
            _completed(repo, name)
        _launch_unknown(repo, "stuck", "b")
        for name in ("old", "recent", "spared", "stuck"):
            repo.finish(name)
        with store.transaction() as conn:
            conn.execute("UPDATE campaign_ends SET finished = finished - 7200 "
                         "WHERE campaign <> 'recent'")
        store.keep_campaigns = 0
        assert not store.tidy()
        store.keep_campaigns = 3600
        done = store.tidy(spare=["spared"])
        assert (done.campaigns, done.forgotten) == (1, ("old",))
        assert repo.names() == ["recent", "spared", "stuck"]
        assert set(_rows(backend, "old").values()) == {0}
        assert store.tidy().forgotten == ("spared",)


def test_campaign_forget_on_the_state(backend: Backend, tmp_path: Path) -> None:
    """No daemon: ``campaign forget`` works on the state: exit 0 (JSON with what it dropped),
    2 in one line naming the submission left, 4 for an unknown campaign."""
    with backend.store() as store:
        repo = CampaignRepository(store)
        _full(repo, "old")
        stuck = _launch_unknown(repo, "stuck")
        repo.finish("stuck")
    args = backend.cli()
    res = run_cli("campaign", "forget", "stuck", *args)
    assert res.returncode == 2, res.stderr
    assert f"#{stuck.id} reco launch_unknown is not final" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli("campaign", "forget", "nosuch", *args)
    assert res.returncode == 4 and "no campaign 'nosuch'" in res.stderr, res.stderr
    res = run_cli("campaign", "forget", "old", "--json", *args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["campaign"], doc["dropped"]["submissions"]) == ("old", 2)
    assert set(_rows(backend, "old").values()) == {0}
    res = run_cli("campaign", "forget", "old", *args)
    assert res.returncode == 4, res.stderr
    res = run_cli("campaign", "list", "--json", *args)
    assert [r["campaign"] for r in json.loads(res.stdout)["campaigns"]] == ["stuck"]


# --- through the daemon ----------------------------------------------------------------------

def _config(tmp_path: Path, pki: TestPKI, proxy: Path, backend: Backend, state: str = "") -> Path:
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    extra = {} if backend.url is None else {
        "state_url": backend.url, "sections": '[cluster]\nlease = "3s"\nheartbeat = "1s"\n'}
    return write_config(tmp_path, pki, proxy, free_port(), [], state=state,
                        extra=f'campaign_check = "1h"\ntoken_file = "{token}"', **extra)


def _campaign(tmp_path: Path, name: str, ds: Path, *, launch_unknown: bool = False) -> str:
    """Campaign ``name`` over ``ds``: its submit exits 0 and prints a job id (or, with
    ``launch_unknown``, none, which its ``complete`` needs: launch_unknown)."""
    out = "no job id here" if launch_unknown else "JobsubJobId of first job: 1.0@t"
    submit = json.dumps(f"{sys.executable} -c \"print('{out}')\"")
    complete = json.dumps(f"{sys.executable} -c pass {{job_id}}")
    return (f'name = "{name}"\n[[stage]]\nname = "reco"\ninput = {json.dumps(str(ds))}\n'
            f"submit = {submit}\ncomplete = {complete}\n")


async def _add(d: InProcess, text: str) -> None:
    status, body = await d.http("POST", "/api/v1/campaigns", {"toml": text, "source": "x"})
    assert status == 201, body


async def _states(d: InProcess, name: str) -> list[str]:
    status, doc = await d.http("GET", f"/api/v1/campaigns/{name}")
    assert status == 200, doc
    return [s["state"] for s in doc["submissions"]]


def _series(text: str, campaign: str) -> dict[str, float]:
    out = {}
    for state in S:
        v = metric_value(text, "prestaged_campaign_submissions", campaign=campaign,
                         state=state.value)
        if v is not None:
            out[state.value] = v
    return out


async def test_the_daemon_drops_finished_campaigns_series_and_does_not_resume_them(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    backend: Backend, caplog: pytest.LogCaptureFixture,
) -> None:
    """A campaign that finishes loses its series at once; one with a launch_unknown keeps
    them (PrestagedLaunchUnknown fires on them). After a restart the finished one is listed
    from the state but not resumed; `campaign forget` through the daemon refuses the stuck
    one (exit 2) and drops the finished one (exit 0), whose task and rows go."""
    ds = write_definition(tmp_path, storage, ["/pnfs/fg/a"])
    config = _config(tmp_path, pki, proxy, backend)
    async with in_process(config, token=TOKEN) as d:
        await _add(d, _campaign(tmp_path, "fin", ds))
        await _add(d, _campaign(tmp_path, "stuck", ds, launch_unknown=True))

        async def settled() -> bool:
            return (await _states(d, "fin"), await _states(d, "stuck")) \
                == (["completed"], ["launch_unknown"])
        await until("both campaigns at their end", settled)

        async def series_gone() -> bool:
            text = await d.metrics()
            return _series(text, "fin") == {} and _series(text, "stuck")["launch_unknown"] == 1
        await until("the finished campaign's series dropped", series_gone)
        assert len(_series(await d.metrics(), "stuck")) == len(S)

    caplog.clear()
    caplog.set_level(logging.INFO, logger="prestaged")
    async with in_process(config, token=TOKEN) as d:
        entries = d.daemon._live.campaigns.entries  # type: ignore[union-attr]
        assert list(entries) == ["stuck"]
        assert "resuming 1 campaigns: stuck" in caplog.text
        assert "1 finished campaigns not resumed" in caplog.text
        assert "campaign fin: done" not in caplog.text
        status, doc = await d.http("GET", "/api/v1/campaigns")
        rows = {r["campaign"]: r for r in doc["campaigns"]}
        assert rows["fin"]["daemon"] is None and rows["fin"]["finished"] is not None
        assert rows["stuck"]["finished"] is None

        async def stuck_series() -> bool:
            text = await d.metrics()
            return _series(text, "stuck").get("launch_unknown") == 1
        await until("the stuck campaign's series", stuck_series)
        assert _series(await d.metrics(), "fin") == {}

        status, body = await d.http("DELETE", "/api/v1/campaigns/fin", token="wrong")
        assert status == 401, body
        cli = ["--config", str(config)]
        res = await asyncio.to_thread(run_cli, "campaign", "forget", "stuck", *cli)
        assert res.returncode == 2 and "launch_unknown is not final" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        res = await asyncio.to_thread(run_cli, "campaign", "forget", "nosuch", *cli)
        assert res.returncode == 4 and "no campaign 'nosuch'" in res.stderr, res.stderr
        res = await asyncio.to_thread(run_cli, "campaign", "forget", "fin", "--json", *cli)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["source"].startswith("daemon ") and doc["dropped"]["submissions"] == 1
        status, doc = await d.http("GET", "/api/v1/campaigns")
        assert [r["campaign"] for r in doc["campaigns"]] == ["stuck"]
    assert set(_rows(backend, "fin").values()) == {0}
    assert _rows(backend, "stuck")["campaign_submissions"] == 1


async def test_the_daemons_tidy_drops_campaigns_after_keep_campaigns(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    backend: Backend,
) -> None:
    """[state] keep_campaigns: a campaign finished longer ago is dropped by the daemon's
    tidy, rows, task and all, and counted in prestaged_state_tidied_rows{what="campaigns"};
    one with a launch_unknown stays."""
    ds = write_definition(tmp_path, storage, ["/pnfs/tidy/a"])
    config = _config(tmp_path, pki, proxy, backend,
                     state='tidy_every = "50ms"\nkeep_campaigns = "100ms"')
    async with in_process(config, token=TOKEN) as d:
        await _add(d, _campaign(tmp_path, "stuck", ds, launch_unknown=True))
        await _add(d, _campaign(tmp_path, "brief", ds))

        async def tidied() -> bool:
            return metric_value(await d.metrics(), "prestaged_state_tidied_rows_total",
                                what="campaigns") == 1.0
        await until("the finished campaign tidied", tidied)
        status, doc = await d.http("GET", "/api/v1/campaigns")
        assert status == 200 and [r["campaign"] for r in doc["campaigns"]] == ["stuck"]
        assert await _states(d, "stuck") == ["launch_unknown"]
        assert list(d.daemon._live.campaigns.entries) == ["stuck"]  # type: ignore[union-attr]
    assert set(_rows(backend, "brief").values()) == {0}
