"""Several ``prestaged serve`` on one real PostgreSQL (issue 16): they share a watch of 30,000
files chunk by chunk and a drainingn campaign; members killed with SIGKILL (one holding a watch
chunk, one while its submit command runs) have their work taken over within the lease plus a
heartbeat, every file ends warm, and no slice is ever submitted twice. A member whose database
sessions are cut stops claiming, reconnects, and never runs a submission another member took.

The daemons are real subprocesses (``daemon_harness``); waits poll the database, the API or a
file with deadlines."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import pytest
from daemon_harness import DEADLINE, Daemon, Notifications, free_port, poll

from prestaged.state.postgres import connect
from prestaged.testing.pki import TestPKI
from prestaged.testing.postgres import APP_ROLE, PostgresCluster
from prestaged.testing.storage import Delay, ThreadedStorageServer

LEASE, HEARTBEAT = 4.0, 1.0
TOKEN = "cluster-t0ken-secret"
SLACK = 1.5
"""Seconds a takeover may come after lease + heartbeat: the claim's own transaction and the
scheduling of three daemons, the storage and PostgreSQL on two shared cores."""

# One JSON line per run (item, the daemon's pid, the slice's URLs) to $CAMPAIGN_RECORD; the run
# whose item is $BLOCK_ITEM then blocks until the test writes to the FIFO $FAKE_BLOCK.
FAKE_SUBMIT = """\
import json, os, sys
item, urls = sys.argv[1], sys.argv[2]
doc = {"item": item, "daemon": os.getppid(), "urls": open(urls).read().split()}
with open(os.environ["CAMPAIGN_RECORD"], "a") as f:
    f.write(json.dumps(doc) + "\\n")
if item == os.environ.get("BLOCK_ITEM"):
    with open(os.environ["FAKE_BLOCK"]) as fifo:
        fifo.read()
print("JobsubJobId of first job: %s.0@test" % item, flush=True)
"""


class Cluster:
    """Daemons on one database: each with its own config directory and API port."""

    def __init__(self, tmp_path: Path, pki: TestPKI, proxy: Path, url: str,
                 watches: list[Path]) -> None:
        self.tmp_path, self.pki, self.proxy, self.url = tmp_path, pki, proxy, url
        self.watches = watches
        self.daemons: list[Daemon] = []
        (tmp_path / "fake_submit.py").write_text(FAKE_SUBMIT)
        self.token = tmp_path / "api-token"
        self.token.write_text(TOKEN + "\n")
        self.token.chmod(0o600)

    def start(self, url: Optional[str] = None, **env: str) -> Daemon:
        """One more daemon (on the database's ``url``, default the cluster's); READY=1
        awaited."""
        import subprocess

        n = len(self.daemons)
        home = self.tmp_path / f"d{n}"
        home.mkdir()
        port = free_port()
        watch = "".join(f'\n[[watch]]\ndefinition = "{w}"\nevery = "1h"\n' for w in self.watches)
        config = home / "prestaged.toml"
        config.write_text(f"""
[credentials]
proxy = "{self.proxy}"
ca_dir = "{self.pki.ca_dir}"
[state]
url = {json.dumps(url or self.url)}
flush_interval = "100ms"
[daemon]
listen = "127.0.0.1:{port}"
drain_timeout = "1s"
jitter = 0
campaign_check = "1h"
token_file = "{self.token}"
[cluster]
lease = "{LEASE}s"
heartbeat = "{HEARTBEAT}s"
chunk = 10000
[catalog.local]
dir = "{self.tmp_path}"
{watch}
""")
        notify = Notifications(home / "notify")
        log = home / "daemon.log"
        full_env = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
                    "NOTIFY_SOCKET": str(notify.path),
                    "CAMPAIGN_RECORD": str(self.tmp_path / "record.jsonl"), **env}
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "prestaged", "serve", "--config",
                                     str(config)], env=full_env, stdout=out, stderr=out,
                                    text=True)
        d = Daemon(proc, port, notify, config, TOKEN, log)
        self.daemons.append(d)
        try:
            notify.wait_for("READY=1")
        except AssertionError:
            proc.kill()
            proc.wait()
            raise AssertionError(d.output()) from None
        return d

    def close(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.kill()
            d.proc.wait()
            d.notify.close()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on a connection of the test's own."""
        with connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def member_of(self, pid: int) -> Optional[str]:
        """The member id of the daemon with ``pid``."""
        rows = self.query("SELECT id FROM cluster_members WHERE pid = %s", (pid,))
        return str(rows[0][0]) if rows else None

    def pid_of(self, member: str) -> int:
        """The pid of member ``member``."""
        return int(self.query("SELECT pid FROM cluster_members WHERE id = %s", (member,))[0][0])

    def records(self) -> list[dict[str, Any]]:
        """What the fake submit command recorded, in order."""
        path = self.tmp_path / "record.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    def kill(self, pid: int) -> Daemon:
        """SIGKILL the daemon with ``pid``; returns it."""
        [d] = [d for d in self.daemons if d.proc.pid == pid]
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=DEADLINE)
        return d


@pytest.fixture
def cluster_factory(tmp_path: Path, pki: TestPKI, proxy: Path,
                    pg_url: str) -> Iterator[Callable[[list[Path]], Cluster]]:
    made: list[Cluster] = []

    def make(watches: list[Path]) -> Cluster:
        c = Cluster(tmp_path, pki, proxy, pg_url, watches)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _definition(tmp_path: Path, storage: ThreadedStorageServer, name: str, n: int) -> Path:
    path = tmp_path / name
    path.write_text("".join(storage.url(f"/pnfs/{name}/f{i:05d}") + "\n" for i in range(n)))
    return path


def _campaign(tmp_path: Path, definition: Path) -> str:
    """drainingn(3) over ``definition``; the fake submit gets "<stage>-<submission id>"."""
    submit = f"{sys.executable} {tmp_path / 'fake_submit.py'} {{stage}}-{{submission}} " \
             "{urls_file}"
    return f"""
name = "drain"
[[stage]]
name = "reco"
input = {json.dumps(str(definition))}
split = "drainingn(3)"
submit = {json.dumps(submit)}
"""


def _took_over(c: Cluster, sql: str, dead: str, since: float, what: str) -> float:
    """Seconds from ``since`` (monotonic) until ``sql`` (one row: the lease owner, or NULL)
    names a member other than ``dead``."""
    def moved() -> bool:
        rows = c.query(sql)
        return bool(rows) and rows[0][0] not in (None, dead)

    poll(what, moved, timeout=LEASE + HEARTBEAT + 30)
    return time.monotonic() - since


def test_three_daemons_survive_two_kills(
    tmp_path: Path, storage: ThreadedStorageServer,
    cluster_factory: Callable[[list[Path]], Cluster],
) -> None:
    """3 daemons, a watch of 30,000 files (3 chunks) and drainingn(3) over 30 files: kill -9
    one member holding a watch chunk and another while its submit command runs. The chunk and
    the campaign are taken over within lease + heartbeat; every file ends warm; every slice is
    submitted once, the one killed mid-submit is launch_unknown and never run again."""
    big = _definition(tmp_path, storage, "big", 30_000)
    small = _definition(tmp_path, storage, "small", 30)
    fifo = tmp_path / "block"
    os.mkfifo(fifo)
    c = cluster_factory([big])
    env = {"FAKE_BLOCK": str(fifo), "BLOCK_ITEM": "reco-2"}
    first = c.start(**env)
    for _ in range(2):
        c.start(**env)

    # A member holding a chunk of the watch round: killed.
    poll("every chunk claimed", lambda: c.query(
        "SELECT COUNT(*) FROM round_chunks WHERE lease_owner IS NOT NULL")[0][0] == 3)
    owner = str(c.query("SELECT lease_owner FROM round_chunks WHERE done IS NULL AND "
                        "lease_owner IS NOT NULL ORDER BY idx LIMIT 1")[0][0])
    chunk_pid = c.pid_of(owner)
    c.kill(chunk_pid)
    killed_at = time.monotonic()
    idx = c.query("SELECT idx FROM round_chunks WHERE lease_owner = %s", (owner,))
    chunk_takeover = _took_over(
        c, f"SELECT COALESCE(lease_owner, done_by) FROM round_chunks WHERE idx = {idx[0][0]}",
        owner, killed_at, "the dead member's chunk taken over")

    # The campaign: added through a survivor; whoever runs slice 2 is killed mid-submit.
    survivor = next(d for d in c.daemons if d.proc.poll() is None)
    status, doc = survivor.http("POST", "/api/v1/campaigns",
                                {"toml": _campaign(tmp_path, small), "source": "c.toml"})
    assert status in (200, 201), doc
    poll("slice 2's submit command running",
         lambda: any(r["item"] == "reco-2" for r in c.records()))
    submit_pid = next(r["daemon"] for r in c.records() if r["item"] == "reco-2")
    submitter = c.member_of(submit_pid)
    assert submitter is not None and submit_pid != chunk_pid
    c.kill(submit_pid)
    killed_at = time.monotonic()
    campaign_takeover = _took_over(c, "SELECT lease_owner FROM campaigns WHERE name = 'drain'",
                                   submitter, killed_at, "the campaign taken over")
    with open(fifo, "w") as f:  # the orphaned submit command may end now
        f.write("go")

    last = next(d for d in c.daemons if d.proc.poll() is None)
    assert last is not first or first.proc.pid not in (chunk_pid, submit_pid)
    poll("the campaign's pass ended", lambda: last.http(
        "GET", "/api/v1/campaigns/drain")[1]["daemon"]["status"] == "waiting", timeout=120)
    poll("every chunk done", lambda: c.query(
        "SELECT COUNT(*) FROM round_chunks WHERE done IS NULL")[0][0] == 0, timeout=180)
    _, datasets = last.http("GET", "/api/v1/datasets")
    by_name = {d["definition"]: d for d in datasets["definitions"]}
    assert by_name[str(big)]["files"] == 30_000
    assert by_name[str(big)]["fresh"] == 30_000
    # Exactly one member saw the round complete; no chunk warned "below ready" on its own.
    logs = [d.output() for d in c.daemons]
    assert sum(f"round 1 of {big} complete" in text for text in logs) == 1
    assert not any("below ready" in text for text in logs)

    subs = last.http("GET", "/api/v1/campaigns/drain")[1]["submissions"]
    states = {s["item"]: s["state"] for s in subs}
    assert states.pop("slice-2") == "launch_unknown"
    assert set(states.values()) == {"completed"} and len(states) == 9
    items = [r["item"] for r in c.records()]
    assert sorted(items) == sorted(f"reco-{s['id']}" for s in subs)  # each exactly once
    assert len(set(items)) == len(items) == 10
    urls = [u for r in c.records() for u in r["urls"]]
    assert len(urls) == len(set(urls)) == 30  # disjoint slices covering the definition

    bound = LEASE + HEARTBEAT + SLACK
    assert chunk_takeover <= bound, (chunk_takeover, bound)
    assert campaign_takeover <= bound, (campaign_takeover, bound)
    assert last.metric("prestaged_lease_takeovers_total", kind="campaign") + sum(
        d.metric("prestaged_lease_takeovers_total", kind="chunk") for d in c.daemons
        if d.proc.poll() is None) >= 2
    print(f"takeovers after the kill: chunk {chunk_takeover:.2f} s, campaign "
          f"{campaign_takeover:.2f} s (lease {LEASE:g} s + heartbeat {HEARTBEAT:g} s)")


@pytest.fixture
def partitionable(pg_cluster: PostgresCluster, pg_url: str) -> Iterator[tuple[str, str]]:
    """(role, URL) of a login role of its own that acts as the application role (``SET role``),
    so that a test can cut that role's sessions and refuse its logins while the others go on;
    dropped after the test."""
    role = f"part_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    pg_cluster.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE {APP_ROLE}")
    pg_cluster.execute(f"ALTER ROLE {role} SET role = '{APP_ROLE}'")
    pg_cluster.add_login(role, password)  # in the password file: the URL shows no secret
    yield role, pg_cluster.url(urlsplit(pg_url).path.lstrip("/"), user=role)
    pg_cluster.execute(f"ALTER ROLE {role} LOGIN")
    pg_cluster.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = %s", (role,))
    poll("the role's sessions gone", lambda: not pg_cluster.execute(
        "SELECT 1 FROM pg_stat_activity WHERE usename = %s", (role,)))
    pg_cluster.execute(f"DROP ROLE {role}")


def test_a_cut_member_stops_claiming_reconnects_and_never_double_runs(
    tmp_path: Path, storage: ThreadedStorageServer, pg_cluster: PostgresCluster,
    partitionable: tuple[str, str], cluster_factory: Callable[[list[Path]], Cluster],
) -> None:
    """A daemon whose sessions are cut (pg_terminate_backend) and whose logins are refused
    while its submit command runs: it stops claiming (its heartbeat stops), the other member
    takes the campaign over and marks that submission launch_unknown; once its sessions come
    back it reconnects (heartbeats again), finds its lease lost, and neither records its
    launch nor runs anything else of the campaign: every slice ran once."""
    role, cut_url = partitionable
    small = _definition(tmp_path, storage, "small", 9)
    fifo = tmp_path / "block"
    os.mkfifo(fifo)
    c = cluster_factory([])
    a = c.start(cut_url, FAKE_BLOCK=str(fifo), BLOCK_ITEM="reco-1")
    status, doc = a.http("POST", "/api/v1/campaigns",
                         {"toml": _campaign(tmp_path, small), "source": "c.toml"})
    assert status == 201, doc
    poll("slice 1's submit command running", lambda: len(c.records()) == 1)
    b = c.start()
    member_a = c.member_of(a.proc.pid)
    assert member_a is not None
    assert c.query("SELECT lease_owner FROM campaigns")[0][0] == member_a

    pg_cluster.execute(f"ALTER ROLE {role} NOLOGIN")
    pg_cluster.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = %s", (role,))
    cut = time.monotonic()
    beat = c.query("SELECT heartbeat FROM cluster_members WHERE id = %s", (member_a,))[0][0]
    poll("the campaign taken over by b", lambda: c.query(
        "SELECT lease_owner FROM campaigns")[0][0] == c.member_of(b.proc.pid),
        timeout=LEASE + HEARTBEAT + 30)
    assert time.monotonic() - cut <= LEASE + HEARTBEAT + SLACK
    poll("b ran the other slices", lambda: len(c.records()) == 3, timeout=60)
    assert c.query("SELECT heartbeat FROM cluster_members WHERE id = %s",
                   (member_a,))[0][0] == beat  # a claimed nothing, heartbeat included

    pg_cluster.execute(f"ALTER ROLE {role} LOGIN")
    poll("a heartbeats again", lambda: c.query(
        "SELECT heartbeat FROM cluster_members WHERE id = %s", (member_a,))[0][0] > beat,
        timeout=60)
    with open(fifo, "w") as f:  # a's submit command ends now: a may not record it
        f.write("go")
    poll("a noticed", lambda: "lease lost" in a.output() or "lease was lost" in a.output(),
         timeout=30)
    subs = b.http("GET", "/api/v1/campaigns/drain")[1]["submissions"]
    assert [(s["item"], s["state"]) for s in subs] == [
        ("slice-1", "launch_unknown"), ("slice-2", "completed"), ("slice-3", "completed")]
    records = c.records()
    assert [r["item"] for r in records] == ["reco-1", "reco-2", "reco-3"]
    assert [r["daemon"] for r in records] == [a.proc.pid, b.proc.pid, b.proc.pid]
    assert "the state database does not answer" in a.output()
    # psycopg-pool retried its connection many times during the cut: one warning, not each.
    assert a.output().count("error connecting in 'prestaged-state'") == 1
    poll("a logs that it claims again", lambda: "answers again; claiming work" in a.output())
    assert a.proc.poll() is None and "Traceback" not in a.output()


def test_operator_actions_through_any_member_act_on_all(
    tmp_path: Path, storage: ThreadedStorageServer,
    cluster_factory: Callable[[list[Path]], Cluster],
) -> None:
    """A campaign driven by member a is released and then cancelled through member b's API:
    a wakes at once (its campaign_check is 1 h) and launches slice 1, a's gate of slice 2 in
    progress is interrupted by the cancel, and both members show the same submissions."""
    small = _definition(tmp_path, storage, "small", 6)
    storage.inject("/pnfs/small/f00004", [Delay(60)])  # slice 2's gate hangs until cancelled
    c = cluster_factory([])
    a = c.start()
    status, doc = a.http("POST", "/api/v1/campaigns",
                         {"toml": _campaign(tmp_path, small), "source": "c.toml", "held": True})
    assert status == 201, doc
    poll("a holds the campaign", lambda: c.query(
        "SELECT lease_owner FROM campaigns")[0][0] == c.member_of(a.proc.pid))
    b = c.start()
    poll("b sees it driven elsewhere", lambda: (b.http("GET", "/api/v1/campaigns/drain")[1]
                                                ["daemon"] or {}).get("status") == "elsewhere")
    assert c.records() == []

    status, doc = b.http("POST", "/api/v1/campaigns/drain/release")
    assert status == 200, doc
    poll("a launched slice 1", lambda: len(c.records()) == 1, timeout=30)
    assert c.records()[0]["daemon"] == a.proc.pid
    poll("slice 2 prestaging on a", lambda: [s["state"] for s in b.http(
        "GET", "/api/v1/campaigns/drain")[1]["submissions"]] == ["completed", "prestaging"])
    cancelled = time.monotonic()
    status, doc = b.http("POST", "/api/v1/campaigns/drain/cancel")
    assert status == 200, doc
    poll("a's gate interrupted: the campaign done", lambda: a.http(
        "GET", "/api/v1/campaigns/drain")[1]["daemon"]["status"] == "done", timeout=30)
    assert time.monotonic() - cancelled < 30  # not the 60 s the storage holds the file
    seen_by = [[(s["item"], s["state"]) for s in d.http("GET", "/api/v1/campaigns/drain")[1]
                ["submissions"]] for d in (a, b)]
    assert seen_by[0] == seen_by[1] == [("slice-1", "completed"), ("slice-2", "cancelled")]
    assert len(c.records()) == 1


def test_a_hold_through_another_member_stops_the_holders_next_launch(
    tmp_path: Path, storage: ThreadedStorageServer,
    cluster_factory: Callable[[list[Path]], Cluster],
) -> None:
    """Member a drives the campaign; a hold sent through member b while a gates slice 2 keeps
    a from launching it once its files are warm (a logs that the launch waits), and a release
    through b launches it on a."""
    small = _definition(tmp_path, storage, "small", 6)
    storage.inject("/pnfs/small/f00004", [Delay(8)])  # slice 2's gate outlasts the hold call
    c = cluster_factory([])
    a = c.start()
    b = c.start()
    status, doc = b.http("POST", "/api/v1/campaigns", {"toml": _campaign(tmp_path, small),
                                                        "source": "c.toml"})
    assert status == 201, doc
    poll("slice 2 prestaging", lambda: [s["state"] for s in b.http(
        "GET", "/api/v1/campaigns/drain")[1]["submissions"]] == ["completed", "prestaging"],
         timeout=30)
    driver = a if c.query("SELECT lease_owner FROM campaigns")[0][0] == c.member_of(
        a.proc.pid) else b
    other = b if driver is a else a
    status, doc = other.http("POST", "/api/v1/campaigns/drain/hold")
    assert status == 200, doc

    poll("the driver's launch waits for release",
         lambda: "held: launch waits for release" in driver.output(), timeout=30)
    assert [s["state"] for s in other.http("GET", "/api/v1/campaigns/drain")[1]
            ["submissions"]] == ["completed", "ready"]
    assert len(c.records()) == 1

    status, doc = other.http("POST", "/api/v1/campaigns/drain/release")
    assert status == 200, doc
    poll("slice 2 launched after the release", lambda: len(c.records()) == 2, timeout=30)
    assert {r["daemon"] for r in c.records()} == {driver.proc.pid}


def test_every_member_shows_the_last_finished_round_in_its_gauges(
    tmp_path: Path, storage: ThreadedStorageServer,
    cluster_factory: Callable[[list[Path]], Cluster],
) -> None:
    """A watch of 50 files (one chunk) on two members: whichever of them finishes the round,
    both members' dataset gauges show its 50 warm files, and so do those of a member started
    after it. Before, only the member that finished a round set its gauges: the others went on
    showing an older round, or nothing, for as long as they did not finish one (and the alert
    rules on those gauges fired, or stayed quiet, on that)."""
    _definition(tmp_path, storage, "small", 50)
    c = cluster_factory([tmp_path / "small"])
    early = [c.start(), c.start()]
    poll("the round finished", lambda: c.query(
        "SELECT COUNT(*) FROM watch_rounds WHERE finished IS NOT NULL")[0][0] == 1)
    [finisher] = c.query("SELECT done_by FROM round_chunks")[0]
    late = c.start()
    for d in (*early, late):
        poll(f"the gauges of the member with pid {d.proc.pid}",
             lambda d=d: d.metric("prestaged_dataset_files", definition="small",
                                  state="warm") == 50)
        assert d.metric("prestaged_dataset_files", definition="small", state="unknown") == 0
    # One early member finished the round; the other did not, and shows its gauges all the same.
    assert sorted(c.member_of(d.proc.pid) == finisher for d in early) == [False, True]
