"""Campaigns run by the daemon, with a fake submit command that records its argv and start
time: ``prestaged campaign add/list/show/mark-submitted`` against a real ``prestaged serve``
subprocess across restarts (SIGTERM and SIGKILL); holds, releases, cancels, keep-warm and the
token rules against a daemon in the test's event loop. Every wait polls the API, the metrics or
a file with a deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from campaign_fakes import read_records, write_definition
from cli_runner import run_cli
from conftest import Backend
from daemon_harness import (
    DEADLINE,
    Daemon,
    InProcess,
    free_port,
    in_process,
    metric_value,
    poll,
    state_files,
    until,
    write_config,
)

from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, ThreadedStorageServer

# One JSON line per run (argv, CLOCK_MONOTONIC start, the slice's URLs) to $CAMPAIGN_RECORD,
# then a jobsub-like job id. With $FAKE_BLOCK (a FIFO) it first blocks until the test writes.
FAKE_SUBMIT = """\
import json, os, sys, time
doc = {"argv": sys.argv[1:], "start": time.monotonic()}
for arg in sys.argv[1:]:
    if arg.endswith(".urls") and os.path.isfile(arg):
        doc["urls"] = open(arg).read().split()
with open(os.environ["CAMPAIGN_RECORD"], "a") as f:
    f.write(json.dumps(doc) + "\\n")
if os.environ.get("FAKE_BLOCK"):
    with open(os.environ["FAKE_BLOCK"]) as fifo:
        fifo.read()
print("JobsubJobId of first job: %s.0@test" % sys.argv[1], flush=True)
"""


TOKEN = "campaign-t0ken-secret"


def _campaign(tmp_path: Path, body: str, name: str = "campaign.toml") -> Path:
    (tmp_path / "fake_submit.py").write_text(FAKE_SUBMIT)
    path = tmp_path / name
    path.write_text(body)
    return path


def _submit(tmp_path: Path, args: str) -> str:
    """A TOML string: the fake submit command followed by ``args`` (a template)."""
    return json.dumps(f"{sys.executable} {tmp_path / 'fake_submit.py'} {args}")


def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``prestaged ARGS --config <the daemon's config>``: the CLI finds the daemon there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "PRESTAGED_"))}
    res = subprocess.run([sys.executable, "-m", "prestaged", *args, "--config", str(d.config)],
                         capture_output=True, text=True, timeout=DEADLINE, env=env, check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def _show(d: Daemon, name: str) -> dict[str, Any]:
    status, doc = d.http("GET", f"/api/v1/campaigns/{name}")
    assert status == 200, doc
    result: dict[str, Any] = doc
    return result


def _states(d: Daemon, name: str) -> list[str]:
    return [s["state"] for s in _show(d, name)["submissions"]]


# On PostgreSQL a daemon is a cluster member: a short lease, so that a daemon started after a
# SIGKILL takes over the dead one's campaign within seconds (the default is a minute).
CLUSTER = '[cluster]\nlease = "3s"\nheartbeat = "1s"\n'


@pytest.fixture(autouse=True)
def _no_state_file(backend: Backend, tmp_path: Path) -> Iterator[None]:
    """Every test on each backend; on PostgreSQL no daemon or CLI fell back to a state file
    (in tmp_path or the default directory)."""
    yield
    if backend.url is not None:
        assert state_files(tmp_path) == []


def _state(backend: Backend) -> dict[str, Any]:
    """``write_config`` arguments selecting ``backend``'s state (tmp_path/state.db for
    SQLite)."""
    if backend.url is None:
        return {}
    return {"state_url": backend.url, "sections": CLUSTER}


def _start(tmp_path: Path, pki: TestPKI, proxy: Path, start_daemon: Callable[..., Daemon],
           port: int, backend: Backend, **env: str) -> Daemon:
    """A daemon on ``port`` with ``backend``'s state and a bearer token (campaign changes
    need one); campaigns that stopped short are only looked at again on an operator action
    (campaign_check is 1 h)."""
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = write_config(tmp_path, pki, proxy, port, [],
                          extra=f'campaign_check = "1h"\ntoken_file = "{token}"',
                          **_state(backend))
    return start_daemon(config, port, token=TOKEN,
                        env={"CAMPAIGN_RECORD": str(tmp_path / "record.jsonl"), **env})


def test_drainingn_across_a_daemon_restart_gives_disjoint_slices(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon], backend: Backend,
) -> None:
    """drainingn(2) over 5 files, daemon stopped while slice 2 is prestaging and started again:
    3 submissions, disjoint, covering all 5, each submitted after its slice was warm."""
    paths = [f"/pnfs/drain/f{i}" for i in range(5)]
    storage.inject(paths[2], [Delay(30)])  # slice 2's first gate hangs until the daemon stops
    ds = write_definition(tmp_path, storage, paths)
    campaign = _campaign(tmp_path, f"""
name = "drain"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
split = "drainingn(2)"
submit = {_submit(tmp_path, "{submission} {urls_file} {n_files}")}
""")
    port = free_port()
    d = _start(tmp_path, pki, proxy, start_daemon, port, backend)
    res = _cli(d, "campaign", "add", str(campaign))
    assert res.returncode == 0, res.stderr
    assert "drain: added" in res.stdout
    poll("slice 2 prestaging", lambda: _states(d, "drain") == ["completed", "prestaging"])
    assert len(read_records(tmp_path)) == 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0

    d = _start(tmp_path, pki, proxy, start_daemon, port, backend)  # resumes from the state database
    poll("the stage drained", lambda: _show(d, "drain")["daemon"]["status"] == "done")
    doc = _show(d, "drain")
    assert [(s["item"], s["state"], s["n_files"]) for s in doc["submissions"]] == [
        ("slice-1", "completed", 2), ("slice-2", "completed", 2), ("slice-3", "completed", 1)]
    assert [(s["warm"], s["warm_of"]) for s in doc["submissions"]] == [(2, 2), (2, 2), (1, 1)]
    records = read_records(tmp_path)
    assert [r["argv"][-1] for r in records] == ["2", "2", "1"]
    slices = [set(r["urls"]) for r in records]
    assert set().union(*slices) == {storage.url(p) for p in paths}
    assert sum(len(s) for s in slices) == 5  # disjoint
    for r in records:  # each file's answer was sent before its submit command started
        assert all(storage.stats.path(p).times[-1] <= r["start"] for p in paths
                   if storage.url(p) in r["urls"])
    # The restarted daemon's metrics: its own launches and gate waits; the campaign is
    # finished, so its submissions gauge is dropped (recounted off the event loop: poll it).
    poll("the finished campaign's gauge dropped", lambda: metric_value(
        d.http("GET", "/metrics")[1], "prestaged_campaign_submissions", campaign="drain",
        state="completed") is None)
    assert d.metric("prestaged_campaign_launches_total", result="submitted") == 2
    assert d.metric("prestaged_campaign_gate_wait_seconds_count") == 2
    listing = _cli(d, "campaign", "list")
    assert listing.returncode == 0, listing.stderr
    assert "drain" in listing.stdout and "completed 3" in listing.stdout
    assert "daemon done" in listing.stdout


def test_daemon_killed_while_submitting_does_not_resubmit(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon], backend: Backend,
) -> None:
    """SIGKILL while the submit command runs: after the restart the submission is
    launch_unknown and not run again; mark-submitted (through the daemon) completes it."""
    ds = write_definition(tmp_path, storage, ["/pnfs/crash/a", "/pnfs/crash/b"])
    campaign = _campaign(tmp_path, f"""
name = "crash"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}")}
""")
    fifo = tmp_path / "block"
    os.mkfifo(fifo)
    port = free_port()
    d = _start(tmp_path, pki, proxy, start_daemon, port, backend, FAKE_BLOCK=str(fifo))
    res = _cli(d, "campaign", "add", str(campaign))
    assert res.returncode == 0, res.stderr
    poll("the submit command started", lambda: len(read_records(tmp_path)) == 1)
    assert _states(d, "crash") == ["submitting"]
    d.proc.kill()
    d.proc.wait(timeout=DEADLINE)
    with open(fifo, "w") as f:  # let the orphaned submit command finish
        f.write("go")

    d = _start(tmp_path, pki, proxy, start_daemon, port, backend)
    poll("the pass after the restart", lambda: _show(d, "crash")["daemon"]["status"] == "waiting")
    [sub] = _show(d, "crash")["submissions"]
    assert sub["state"] == "launch_unknown" and "not run again" in sub["reason"]
    assert len(read_records(tmp_path)) == 1
    assert d.metric("prestaged_campaign_launches_total", result="launch_unknown") == 1
    shown = _cli(d, "campaign", "show", "crash")
    assert shown.returncode == 0, shown.stderr
    assert "launch_unknown" in shown.stdout and f"daemon 127.0.0.1:{port}" in shown.stdout

    res = _cli(d, "campaign", "mark-submitted", "crash", "--submission", str(sub["id"]),
               "--job-id", "77.0@jobsub01")
    assert res.returncode == 0, res.stderr
    assert "job 77.0@jobsub01" in res.stdout
    poll("completed", lambda: _states(d, "crash") == ["completed"])
    assert _show(d, "crash")["submissions"][0]["job_id"] == "77.0@jobsub01"
    assert len(read_records(tmp_path)) == 1
    bad = _cli(d, "campaign", "mark-submitted", "crash", "--submission", str(sub["id"]),
               "--job-id", "again")
    assert bad.returncode == 2 and "not launch_unknown" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def _in_process_config(tmp_path: Path, pki: TestPKI, proxy: Path, backend: Backend, *,
                       token: bool = True) -> Path:
    """A daemon config as ``_start`` writes it (with the token file unless ``token`` is
    false)."""
    extra = 'campaign_check = "1h"'
    if token:
        path = tmp_path / "api-token"
        path.write_text(TOKEN + "\n")
        path.chmod(0o600)
        extra += f'\ntoken_file = "{path}"'
    return write_config(tmp_path, pki, proxy, free_port(), [], extra=extra, **_state(backend))


async def _show_async(d: InProcess, name: str) -> dict[str, Any]:
    status, doc = await d.http("GET", f"/api/v1/campaigns/{name}")
    assert status == 200, doc
    result: dict[str, Any] = doc
    return result


async def _states_async(d: InProcess, name: str) -> list[str]:
    return [s["state"] for s in (await _show_async(d, name))["submissions"]]


async def _add(d: InProcess, campaign: Path, held: bool = False) -> None:
    text = await asyncio.to_thread(campaign.read_text)
    status, body = await d.http("POST", "/api/v1/campaigns", {
        "toml": text, "source": str(campaign), "held": held})
    assert status == 201, body


async def test_hold_release_and_cancel_through_the_daemon(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, backend: Backend,
) -> None:
    """In-process: a campaign added held launches nothing until released; a cancel stops a
    gate in progress at once and nothing of it is ever submitted."""
    monkeypatch.setenv("CAMPAIGN_RECORD", str(tmp_path / "record.jsonl"))
    ds = write_definition(tmp_path, storage, ["/pnfs/hold/a", "/pnfs/hold/b"])
    slow = write_definition(tmp_path, storage, ["/pnfs/slow/a"], name="slow.txt")
    storage.inject("/pnfs/slow/a", [Delay(30)] * 3)
    later = _campaign(tmp_path, f"""
name = "later"
[[stage]]
name = "one"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}-{submission}")}
""", name="later.toml")
    doomed = _campaign(tmp_path, f"""
name = "doomed"
[defaults]
prestage_timeout = "1h"
[[stage]]
name = "one"
input = {json.dumps(str(slow))}
submit = {_submit(tmp_path, "doomed")}
""", name="doomed.toml")
    async with in_process(_in_process_config(tmp_path, pki, proxy, backend), token=TOKEN) as d:
        await _add(d, later, held=True)

        async def held_pass() -> bool:
            return (await _show_async(d, "later"))["daemon"]["status"] == "waiting"
        await until("the held pass", held_pass)
        doc = await _show_async(d, "later")
        assert doc["control"] == "held" and doc["submissions"] == []
        assert storage.stats.path("/pnfs/hold/a").requests == 0
        status, listing = await d.http("GET", "/api/v1/campaigns")
        [row] = listing["campaigns"]
        assert (row["campaign"], row["control"]) == ("later", "held")

        status, body = await d.http("POST", "/api/v1/campaigns/later/release", {})
        assert status == 200 and body["result"].startswith("later: released"), body

        async def launched() -> bool:
            return await _states_async(d, "later") == ["completed"]
        await until("released and launched", launched)
        assert [r["argv"] for r in read_records(tmp_path)] == [["one-1"]]

        await _add(d, doomed)

        async def gating() -> bool:
            return await _states_async(d, "doomed") == ["prestaging"] \
                and storage.stats.path("/pnfs/slow/a").requests >= 1
        await until("the slow gate", gating)
        status, body = await d.http("POST", "/api/v1/campaigns/doomed/cancel", {})
        assert status == 200 and body["result"].startswith("doomed: cancelled"), body

        async def cancelled() -> bool:
            return (await _show_async(d, "doomed"))["daemon"]["status"] == "done"
        await until("cancelled", cancelled, timeout=10)
        assert await _states_async(d, "doomed") == ["cancelled"]
        assert [r["argv"] for r in read_records(tmp_path)] == [["one-1"]]
        status, body = await d.http("POST", "/api/v1/campaigns/nosuch/hold", {})
        assert (status, body) == (404, {"error": "no campaign 'nosuch'"})
        status, body = await d.http("POST", "/api/v1/campaigns", {"toml": "name = 'x'\n"})
        assert status == 400 and "needs at least one [[stage]]" in body["error"]


async def test_keep_warm_through_the_daemon_until_complete(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, backend: Backend,
) -> None:
    """In-process: while a submission is submitted and its complete command fails, the
    daemon touches its slice again every keep_warm; once complete exits 0 the campaign ends
    and touching stops."""
    monkeypatch.setenv("CAMPAIGN_RECORD", str(tmp_path / "record.jsonl"))
    path = "/pnfs/kw/a"
    ds = write_definition(tmp_path, storage, [path])
    done = tmp_path / "jobs-done"
    complete = json.dumps(f"{sys.executable} -c \"import os, sys; "
                          f"sys.exit(0 if os.path.exists({str(done)!r}) else 1)\"")
    campaign = _campaign(tmp_path, f"""
name = "warmth"
[defaults]
keep_warm = "0.3s"
complete_poll = "0.2s"
complete_poll_max = "0.2s"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}")}
complete = {complete}
""")
    async with in_process(_in_process_config(tmp_path, pki, proxy, backend), token=TOKEN) as d:
        await _add(d, campaign)

        async def touched_again() -> bool:
            return storage.stats.path(path).requests >= 3
        await until("two keep-warm touches", touched_again)
        assert await _states_async(d, "warmth") == ["submitted"]
        done.touch()

        async def ended() -> bool:
            return (await _show_async(d, "warmth"))["daemon"]["status"] == "done"
        await until("the campaign done", ended)
        # "done": the campaign's task has returned, so nothing touches the slice any more.
        assert await _states_async(d, "warmth") == ["completed"]
        assert len(read_records(tmp_path)) == 1
        touched = metric_value(await d.metrics(), "prestaged_files_touched_total",
                               result="warm")
        assert touched is not None and touched >= 3


async def test_campaign_changes_need_the_token(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, backend: Backend,
) -> None:
    """In-process: a campaign runs commands as the daemon's user: without daemon.token_file
    the daemon refuses campaign changes (403, which `campaign add` reports in one line),
    with one it refuses a wrong token (401); reads stay open."""
    ds = write_definition(tmp_path, storage, ["/pnfs/tok/a"])
    campaign = _campaign(tmp_path, f"""
name = "sneaky"
[[stage]]
name = "one"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "x")}
""")
    config = _in_process_config(tmp_path, pki, proxy, backend, token=False)
    async with in_process(config) as d:
        res = await asyncio.to_thread(run_cli, "campaign", "add", str(campaign), "--config",
                                      str(config))
        assert res.returncode == 2 and "need daemon.token_file" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        status, body = await d.http("POST", "/api/v1/campaigns/sneaky/hold", {})
        assert status == 403 and "token_file" in body["error"]
        assert await d.http("GET", "/api/v1/campaigns") == (200, {"campaigns": []})

    caplog.set_level(logging.DEBUG)
    async with in_process(_in_process_config(tmp_path, pki, proxy, backend), token=TOKEN) as d:
        status, body = await d.http("POST", "/api/v1/campaigns",
                                    {"toml": campaign.read_text()}, token="wrong")
        assert status == 401 and "bearer token" in body["error"]
        assert await d.http("GET", "/api/v1/campaigns") == (200, {"campaigns": []})
    assert TOKEN not in caplog.text
