"""The daemons sharing one state, as people see them (issue 16): ``prestaged status --members``
on both backends, ``GET /api/v1/members`` and the cluster metrics of a running daemon."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cli_runner import run_cli
from conftest import Backend
from daemon_harness import free_port, in_process, metric_value, until, write_config

from prestaged.state import cluster
from prestaged.testing.pki import TestPKI

TOKEN = "members-t0ken"


def _two_members(backend: Backend) -> None:
    """``alive`` registered now; ``dead`` too, its heartbeat then set 120 s back by the
    database's clock (twice the default ``[cluster] lease``)."""
    store = backend.store().open()
    try:
        cluster.register_member(store, "alive", listen="127.0.0.1:9464", version="1.0")
        cluster.register_member(store, "dead", listen=None, version="0.9")
        with store.transaction() as conn:
            conn.execute(f"UPDATE cluster_members SET heartbeat = {cluster.now_sql(conn)} - 120 "
                         "WHERE id = ?", ("dead",))
    finally:
        store.close()


def test_status_members_shows_each_member_alive_or_dead(backend: Backend) -> None:
    """`status --members` reads the state itself: a member silent for 120 s is dead with its
    heartbeat's age, a fresh one alive; --json is the list of ``Member.to_dict``."""
    _two_members(backend)
    res = run_cli("status", "--members", *backend.cli())
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert set(lines) == {"alive", "dead"}
    assert re.search(r"127\.0\.0\.1:9464 +[01] s ago alive +0$", lines["alive"]), lines
    assert re.search(rf" {os.getpid()} +- +12\d s ago dead +0$", lines["dead"]), lines

    res = run_cli("status", "--members", "--json", *backend.cli())
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert (answer["state"], answer["lease_seconds"]) == (backend.where, 60.0)
    doc = {m["id"]: m for m in answer["members"]}
    assert set(doc) == {"alive", "dead"}
    assert set(doc["dead"]) == {"id", "host", "pid", "listen", "version", "started",
                                "heartbeat", "age", "leases", "alive"}
    assert (doc["alive"]["alive"], doc["dead"]["alive"]) == (True, False)
    assert 120 <= doc["dead"]["age"] < 130 and doc["alive"]["age"] < 2
    assert (doc["dead"]["pid"], doc["dead"]["listen"], doc["dead"]["leases"]) == (
        os.getpid(), None, 0)


def test_status_members_is_judged_by_the_lease_in_force(backend: Backend) -> None:
    """Dead is relative to `[cluster] lease` of the config: with a 300 s lease the member
    silent for 120 s is alive again."""
    _two_members(backend)
    args = backend.cli()
    config = Path(args[1])
    config.write_text(config.read_text() + '[cluster]\nlease = "300s"\n')
    doc = json.loads(run_cli("status", "--members", "--json", *args).stdout)
    assert [m["alive"] for m in doc["members"]] == [True, True]


def test_status_members_without_a_state_fails_as_status_does(tmp_path: Path) -> None:
    """A state file that does not exist is the one-line error and exit code of `status`."""
    missing = ["--state", str(tmp_path / "nope.db")]
    plain, members = run_cli("status", *missing), run_cli("status", "--members", *missing)
    assert members.returncode == plain.returncode == 2
    assert members.stderr == plain.stderr and "no such file" in members.stderr
    assert not (tmp_path / "nope.db").exists()


def test_status_members_refuses_a_definition(tmp_path: Path) -> None:
    """`status --members` with a definition (or --catalog) is a one-line usage error, not a
    members list that silently ignored it."""
    res = run_cli("status", "--members", "mc-reco", "--state", str(tmp_path / "s.db"))
    assert res.returncode == 2 and "takes no definition" in res.stderr
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1


def _config(tmp_path: Path, pki: TestPKI, proxy: Path) -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    return write_config(tmp_path, pki, proxy, free_port(), [],
                        extra=f'campaign_check = "1h"\ntoken_file = "{token_file}"',
                        sections='[cluster]\nheartbeat = "100ms"')


async def test_the_daemon_lists_itself_and_counts_its_leases(pki: TestPKI, proxy: Path,
                                                             tmp_path: Path) -> None:
    """A daemon on SQLite is a member alone: GET /api/v1/members (no token) lists it with its
    pid and API address, alive; /metrics has one member and a campaign lease series, which
    counts 1 once the daemon drives a campaign (and the member's row says so too)."""
    config = _config(tmp_path, pki, proxy)
    async with in_process(config) as d:
        status, doc = await d.http("GET", "/api/v1/members")
        assert status == 200, doc
        [me] = doc["members"]
        assert (me["pid"], me["alive"], me["listen"]) == (
            os.getpid(), True, d.daemon.cfg.daemon.listen)
        text = await d.metrics()
        assert "\nprestaged_cluster_members 1.0\n" in text
        assert metric_value(text, "prestaged_leases_held", kind="campaign") == 0

        (tmp_path / "ds.txt").write_text("https://127.0.0.1:1/f\n")
        campaign = (f'name = "c"\n[[stage]]\nname = "one"\ninput = "{tmp_path / "ds.txt"}"\n'
                    'submit = "true"\n')
        status, body = await d.http("POST", "/api/v1/campaigns",
                                    {"toml": campaign, "held": True}, token=TOKEN)
        assert status == 201, body

        async def leased() -> bool:
            return metric_value(await d.metrics(), "prestaged_leases_held",
                                kind="campaign") == 1
        await until("the campaign lease in the metrics", leased)
        status, doc = await d.http("GET", "/api/v1/members")
        assert [m["leases"] for m in doc["members"]] == [1]
