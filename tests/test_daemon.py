"""``prestaged serve``: as a real subprocess where the process boundary is the point (systemd
notify protocol, signals, drain, exit codes), in the test's event loop otherwise (the API over
a real run, SAM watches, reload of the proxy). The storage is the loopback test server;
nothing is slept on: every wait is on a notify datagram, the metrics, the API or the storage's
counters, with a deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
from cli_runner import run_cli
from conftest import Backend
from daemon_harness import (
    DEADLINE,
    Daemon,
    free_port,
    in_process,
    metric_value,
    poll,
    state_files,
    until,
    write_config,
)

from prestaged.config import load_config
from prestaged.model import redacted_url
from prestaged.service.daemon import stop_takes
from prestaged.testing.pki import TestPKI
from prestaged.testing.postgres import PostgresCluster
from prestaged.testing.storage import Delay, ThreadedStorageServer
from prestaged.testing.tokens import TokenIssuer, write_token


def _definition(tmp_path: Path, srv: ThreadedStorageServer, name: str, n: int) -> Path:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(srv.url(f"/{name}/f{i:04d}") + "\n" for i in range(n)))
    return path


def test_daemon_schedule_metrics_reload_renewal_and_drain(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon], backend: Backend,
) -> None:
    """READY, scheduled re-warms, /metrics, SIGHUP reload, proxy renewal, SIGTERM drain; on
    each backend (PostgreSQL: the drained run's results reach the database, no state file)."""
    port = free_port()
    a = _definition(tmp_path, storage, "a", 100)
    state: dict[str, Any] = {} if backend.url is None else {
        "state_url": backend.url, "sections": '[cluster]\nlease = "3s"\nheartbeat = "1s"\n'}
    config = write_config(tmp_path, pki, proxy, port, [(a, "1s")], **state)
    d = start_daemon(config, port)
    assert d.http("GET", "/healthz")[0] == 200
    # warmed, then re-warmed on schedule
    poll("two scheduled warms", lambda: d.metric("prestaged_runs_total", result="ok") >= 2)
    if backend.url is not None:
        # A shared state's round is due ``every`` after the last was planned, not after it
        # ended, so one may skip files touched < 0.8 ``every`` before; a later one takes them.
        poll("every file re-warmed", lambda: d.metric(
            "prestaged_files_touched_total", result="warm") >= 200)
    assert storage.stats.path("/a/f0000").requests >= 2
    assert d.metric("prestaged_files_touched_total", result="warm") >= 200
    assert d.metric("prestaged_bytes_read_total") >= 800
    status, ready = d.http("GET", "/readyz")
    assert status == 200, ready
    status, ds = d.http("GET", f"/api/v1/datasets/{a}")
    assert status == 200 and ds["files"] == 100 and ds["fresh"] == 100
    # SIGHUP reloads a changed watch list
    b = _definition(tmp_path, storage, "b", 30)
    write_config(tmp_path, pki, proxy, port, [(a, "1h"), (b, "1h")], **state)
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    poll("b warmed after reload", lambda: storage.stats.path("/b/f0029").requests >= 1)
    # a renewed proxy (here: of another user) is picked up without a restart
    expiry = d.metric("prestaged_credential_expiry_timestamp_seconds", kind="proxy")
    renewed = pki.make_proxy_for("Renewed", tmp_path / "renewed", lifetime=timedelta(hours=20))
    renewed.replace(proxy)
    poll("renewed proxy re-read", lambda: d.metric(
        "prestaged_credential_expiry_timestamp_seconds", kind="proxy") > expiry + 3600)
    _definition(tmp_path, storage, "c", 10)  # c.txt in catalog.local.dir
    status, body = d.http("POST", "/api/v1/warm", {"definition": "c"})
    assert status == 202, body
    poll("run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
    assert pki.dn_for("Renewed") in "".join(storage.stats.client_dns)
    # an already expired replacement is refused, not installed over the valid one (it was,
    # and touching paused: /readyz 503)
    renewed_expiry = d.metric("prestaged_credential_expiry_timestamp_seconds", kind="proxy")
    pki.make_proxy(tmp_path / "stale", expired=True).replace(proxy)
    poll("expired replacement refused", lambda: "proxy changed but cannot be used" in d.output())
    assert "expired at" in d.output()
    assert d.metric("prestaged_credential_expiry_timestamp_seconds",
                    kind="proxy") == renewed_expiry
    assert d.http("GET", "/readyz")[0] == 200
    # SIGTERM during a run drains, then stops it; exit 0; the run's results are in the store
    _definition(tmp_path, storage, "slow", 40)
    for i in range(10, 40):
        storage.inject(f"/slow/f{i:04d}", [Delay(60)])
    status, body = d.http("POST", "/api/v1/warm", {"definition": "slow"})
    assert status == 202
    storage.wait_until(lambda s: s.path("/slow/f0039").requests >= 1, timeout=DEADLINE)
    d.proc.send_signal(signal.SIGTERM)
    d.notify.wait_for("STOPPING=1")
    # systemd is asked for the whole stop, whatever TimeoutStopSec says
    takes = stop_takes(load_config(d.config).daemon.drain_timeout)
    d.notify.wait_for(f"EXTEND_TIMEOUT_USEC={int(takes * 1_000_000)}")
    assert d.proc.wait(timeout=DEADLINE) == 0
    res = subprocess.run([sys.executable, "-m", "prestaged", "status", "slow", *backend.cli(),
                          "--json"], capture_output=True, text=True, timeout=DEADLINE,
                         check=True)
    [row] = json.loads(res.stdout)["definitions"]
    assert row["fresh"] == 10 and row["last_run"]["reason"] == "interrupted"
    assert "Traceback" not in d.output()
    assert backend.url is None or state_files(tmp_path) == []


async def test_warm_over_the_api_and_status_asks_the_daemon(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process: a token file makes warm requests need it; an unknown definition is 404; a
    run's counts; `prestaged status` asks the running daemon; the token is never logged."""
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    config = write_config(tmp_path, pki, proxy, port, [], extra=f'token_file = "{token_file}"')
    caplog.set_level(logging.DEBUG)
    async with in_process(config, token="s3cret-token") as d:
        assert (await d.http("POST", "/api/v1/warm", {"definition": "x"}, token="wrong"))[0] \
            == 401
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "nonexistent"})
        assert status == 404 and "not found in the local catalog" in body["error"]
        _definition(tmp_path, storage, "ok", 5)
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "ok"})
        assert status == 202

        async def done() -> bool:
            return (await d.http("GET", body["href"]))[1]["state"] == "done"
        await until("api run done", done)
        assert (await d.http("GET", body["href"]))[1]["counts"] == {"warm": 5}
        res = await asyncio.to_thread(run_cli, "status", "--config", str(config), "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["source"] == f"daemon http://127.0.0.1:{port}"
        assert [(r["definition"], r["fresh"]) for r in doc["definitions"]] == [("ok", 5)]
    assert "s3cret-token" not in caplog.text


async def test_a_run_stopped_by_an_unreadable_list_is_logged_at_error(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run that stops on its definition (a line that is no URL) says so at ERROR, naming the
    file: it was recorded with exit 4 and shown only by the API."""
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    caplog.set_level(logging.INFO)
    async with in_process(config) as d:
        listed = _definition(tmp_path, storage, "bad", 3)
        listed.write_text(listed.read_text() + "not a url\n")
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "bad"})
        assert status == 202
        await d.ended(body["href"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(listed) in m and "line 4 is not a URL" in m for m in errors), errors


async def test_expired_token_pauses_touching_until_a_fresh_one_appears(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token that expires: /readyz fails and touches wait (none sent) until the token file is
    rewritten; then the run goes on, and the token's expiry is in /metrics. Never logged."""
    issuer = TokenIssuer()
    first = issuer.mint(lifetime=3)
    bearer = write_token(tmp_path / "bt", first)
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [],
                          credentials=f'token_file = "{bearer}"\ntoken_min_lifetime = "0s"')
    caplog.set_level(logging.DEBUG)
    async with in_process(config) as d:
        assert (await d.http("GET", "/readyz"))[0] == 200
        expiry = metric_value(await d.metrics(), "prestaged_credential_expiry_timestamp_seconds",
                              kind="token")
        assert expiry is not None and abs(expiry - (time.time() + 3)) < 2

        async def not_ready() -> bool:
            status, body = await d.http("GET", "/readyz")
            return status == 503 and f"token {bearer}" in json.dumps(body)
        await until("not ready on the expired token", not_ready)

        async def paused() -> bool:
            return "touching paused" in caplog.text
        await until("touching paused", paused)
        _definition(tmp_path, storage, "held", 3)
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "held"})
        assert status == 202, body

        async def running() -> bool:
            return (await d.http("GET", body["href"]))[1]["state"] == "running"
        await until("run started", running)
        assert storage.stats.path("/held/f0000").requests == 0
        write_token(bearer, second := issuer.mint(lifetime=3600))

        async def done() -> bool:
            return (await d.http("GET", body["href"]))[1]["state"] == "done"
        await until("run done after renewal", done)
        assert (await d.http("GET", "/readyz"))[0] == 200
        assert (await d.http("GET", body["href"]))[1]["counts"] == {"warm": 3}
        renewed = metric_value(await d.metrics(),
                               "prestaged_credential_expiry_timestamp_seconds", kind="token")
        assert renewed is not None and renewed > time.time() + 3000
    assert "touching paused" in caplog.text and "touching resumed" in caplog.text
    for token in (first, second):
        assert token not in caplog.text and token.rsplit(".", 1)[1] not in caplog.text


async def test_a_token_not_valid_yet_keeps_touching_paused(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token in use expired and the renewal's nbf is still ahead: the daemon said
    "touching resumed" and /readyz 200, and runs ended with exit 3. Now it stays not ready
    naming the nbf and touches wait until it passes; then the run is done."""
    issuer = TokenIssuer()
    bearer = write_token(tmp_path / "bt", issuer.mint(lifetime=2))
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [],
                          credentials=f'token_file = "{bearer}"\ntoken_min_lifetime = "0s"')
    caplog.set_level(logging.INFO)
    async with in_process(config) as d:
        async def paused() -> bool:
            return "touching paused" in caplog.text
        await until("touching paused", paused)
        write_token(bearer, issuer.mint(lifetime=3600, not_before=4))

        async def taken() -> bool:
            return f"token {bearer} re-read" in caplog.text
        await until("early token taken", taken)
        status, ready = await d.http("GET", "/readyz")
        assert status == 503 and "not valid before" in json.dumps(ready), ready
        _definition(tmp_path, storage, "early", 3)
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "early"})
        assert status == 202, body
        run = await d.ended(body["href"])
        assert (run["state"], run["counts"]) == ("done", {"warm": 3}), run
        assert (await d.http("GET", "/readyz"))[0] == 200
    assert caplog.text.index("touching resumed") > caplog.text.index(f"token {bearer} re-read")


async def test_a_reload_that_finds_the_token_file_empty_keeps_following_it(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SIGHUP reload while the discovered token file was empty (a renewal between truncate
    and write) installed the proxy alone, said so only at INFO, and never followed the token
    file again. Now the reload keeps the token source with a WARNING, and the renewal written
    afterwards is taken."""
    issuer = TokenIssuer()
    bearer = write_token(Path(os.environ["XDG_RUNTIME_DIR"]) / f"bt_u{os.getuid()}",
                         issuer.mint(subject="first"))
    config = write_config(tmp_path, pki, proxy, free_port(), [])
    caplog.set_level(logging.INFO)
    async with in_process(config) as d:
        token = d.daemon.credentials.token
        assert token is not None and token.info.subject == "first"
        bearer.write_text("")
        d.daemon.request_reload()

        async def kept() -> bool:
            return "no bearer token found on reload: keeping" in caplog.text
        await until("reload kept the token", kept)
        assert d.daemon.credentials.token is token
        write_token(bearer, issuer.mint(subject="renewed"))

        async def renewed() -> bool:
            now = d.daemon.credentials.token
            return now is not None and now.info.subject == "renewed"
        await until("renewal taken", renewed)
    assert f"token {bearer} is empty: skipped" in caplog.text


async def test_a_reload_says_which_changed_keys_wait_for_a_restart(
    pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload that finds ``daemon.listen`` changed and ``storage.concurrency`` raised said
    only "reloaded": the API stayed on the old port, the shared touch budget as it was. It now
    says so, at every reload while they differ, and the API still answers."""
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    async with in_process(config) as d:
        config.write_text(config.read_text().replace(f"127.0.0.1:{port}",
                                                     f"127.0.0.1:{free_port()}")
                          + "[storage]\nconcurrency = 64\n")
        for _ in range(2):
            d.daemon.request_reload()
            before = caplog.text.count("takes effect at a restart")

            async def warned(seen: int = before) -> bool:
                return caplog.text.count("takes effect at a restart") > seen
            await until("the reload's warning", warned)
        assert (await d.http("GET", "/healthz"))[0] == 200
    assert "reload: daemon.listen changed: it takes effect at a restart" in caplog.text
    assert "reload: storage.concurrency is now 64, but the daemon's runs share the budget of " \
           "32 files in flight it started with until a restart" in caplog.text


def test_expired_proxy_refused_at_start(pki: TestPKI, tmp_path: Path) -> None:
    """The daemon will not start on an expired proxy: exit 3, one line, no READY."""
    expired = pki.make_proxy(tmp_path / "old", expired=True)
    config = write_config(tmp_path, pki, expired, free_port(), [])
    res = subprocess.run([sys.executable, "-m", "prestaged", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert res.returncode == 3
    assert "expired" in res.stderr and "Traceback" not in res.stderr


def _refused_state(config: Path, code: int = 2) -> str:
    """``prestaged serve --config config`` run to its end: checked to exit ``code`` with no
    output but one stderr line and no traceback; returns that line."""
    res = subprocess.run([sys.executable, "-m", "prestaged", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert (res.returncode, res.stdout) == (code, ""), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip()


@pytest.mark.parametrize(("host", "token"), [("0.0.0.0", False), ("192.0.2.7", True)])
def test_a_listener_beyond_loopback_without_tls_is_refused_at_start(
        pki: TestPKI, proxy: Path, tmp_path: Path, host: str, token: bool) -> None:
    """``daemon.listen`` beyond loopback without ``tls_cert`` (with a token file or without):
    exit 2 with one line naming daemon.listen and the keys to set, before anything is opened
    or bound (no state file). Neither address can be bound by a test: 0.0.0.0 goes without a
    token file (which was refused already), 192.0.2.7 (TEST-NET-1) is no address of this
    host."""
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    token_file.chmod(0o600)
    config = write_config(tmp_path, pki, proxy, port, [],
                          extra=f'token_file = "{token_file}"' if token else "")
    config.write_text(config.read_text().replace(f'"127.0.0.1:{port}"', f'"{host}:{port}"'))
    assert _refused_state(config) == (
        f"prestaged: error: daemon.listen {host}:{port} is not loopback, and over plain HTTP "
        "the bearer token would cross the network in clear: set daemon.tls_cert and "
        "daemon.tls_key (e.g. the host certificate and key), or listen on 127.0.0.1")
    assert state_files(tmp_path) == []


def test_unreachable_postgresql_refused_at_start(pki: TestPKI, proxy: Path,
                                                  tmp_path: Path) -> None:
    """``[state] url`` naming a socket directory with no server: the daemon exits 69 (not 2,
    which systemd's RestartPreventExitStatus keeps down: a member started during a database
    failover stayed dead) with one line naming the URL with its password hidden, and makes no
    state file instead."""
    pytest.importorskip("psycopg")
    # Under the system's temporary directory: a socket path is at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pg-") as empty:
        url = f"postgresql://prestaged:s3cr3t-XYZ@/state?host={empty}"
        line = _refused_state(write_config(tmp_path, pki, proxy, free_port(), [],
                                           state_url=url), code=69)
    assert line.startswith(f"prestaged: error: state {redacted_url(url)}: cannot connect")
    assert "s3cr3t" not in line
    assert state_files(tmp_path) == []


def test_newer_postgresql_schema_refused_at_start(pki: TestPKI, proxy: Path, tmp_path: Path,
                                                   pg_cluster: PostgresCluster,
                                                   pg_url: str) -> None:
    """A database migrated by a newer prestaged: the daemon exits 2 with one line naming
    both versions and the URL with its password hidden, and leaves the database alone."""
    from prestaged.state.postgres import VERSION_TABLE, connect, open_state
    from prestaged.state.schema import SCHEMA_VERSION

    open_state(pg_url).close()
    with connect(pg_url) as conn:
        conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    secret = pg_cluster.url_with_password(urlsplit(pg_url).path.lstrip("/"))
    line = _refused_state(write_config(tmp_path, pki, proxy, free_port(), [],
                                       state_url=secret))
    assert line == (f"prestaged: error: state {redacted_url(secret)}: schema version "
                    f"{SCHEMA_VERSION + 1} is newer than this prestaged knows "
                    f"({SCHEMA_VERSION}); upgrade prestaged, or give it another database")
    leaked = pg_cluster.password in line  # not in the assert: it would print the password
    assert not leaked, "the password is in the daemon's error"
    with connect(pg_url) as conn:
        assert conn.execute(f"SELECT max(version) FROM {VERSION_TABLE}").fetchone() == (
            SCHEMA_VERSION + 1,)
    assert state_files(tmp_path) == []


async def test_daemon_watches_a_samweb_definition(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    samweb: Callable[..., Any],
) -> None:
    """In-process: a [[watch]] on a SAM definition resolves through SAM (proxy presented) and
    is warmed; every SAM request is counted in prestaged_catalog_requests_total."""
    files = [{"name": f"f{i:03d}.root", "size": 10, "locations": [f"dcache:/pnfs/dune/d{i % 3}"]}
             for i in range(40)]
    sam = samweb({"mc-2026": files}, require_cert=True)
    port = free_port()
    extra = (f'[catalog.samweb]\nbase_url = "{sam.base_url}"\n'
             f'[[catalog.samweb.rewrite]]\nlocation = "dcache:/pnfs/dune/"\n'
             f'url = "{storage.url("/door")}/"\n')
    config = write_config(tmp_path, pki, proxy, port, [], extra="")
    config.write_text(config.read_text() + '\n[[watch]]\ndefinition = "mc-2026"\n'
                      'catalog = "samweb"\nevery = "1h"\n' + extra)
    async with in_process(config) as d:
        async def warmed() -> bool:
            return metric_value(await d.metrics(), "prestaged_runs_total", result="ok") == 1
        await until("samweb watch warmed", warmed)
        assert all(storage.stats.path(f"/door/d{i % 3}/f{i:03d}.root").requests == 1
                   for i in range(40))
        requests = metric_value(await d.metrics(), "prestaged_catalog_requests_total",
                                catalog="samweb", result="ok")
        assert requests is not None and requests >= 2


async def test_reload_switches_to_a_newly_configured_proxy(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """In-process: a reload with credentials.proxy pointing elsewhere makes new touches
    present the new proxy."""
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    async with in_process(config) as d:
        moved = pki.make_proxy_for("Moved", tmp_path / "moved", lifetime=timedelta(hours=20))
        config.write_text(config.read_text().replace(str(proxy), str(moved)))

        async def expiry() -> float:
            value = metric_value(await d.metrics(),
                                 "prestaged_credential_expiry_timestamp_seconds", kind="proxy")
            assert value is not None
            return value

        before = await expiry()
        d.daemon.request_reload()

        async def new_proxy() -> bool:
            return await expiry() > before + 3600
        await until("new proxy in use", new_proxy)
        _definition(tmp_path, storage, "m", 3)
        status, body = await d.http("POST", "/api/v1/warm", {"definition": "m"})
        assert status == 202

        async def done() -> bool:
            return (await d.http("GET", body["href"]))[1]["state"] == "done"
        await until("run done", done)
    assert pki.dn_for("Moved") in "".join(storage.stats.client_dns)


def test_daemon_makes_no_loop_objects_before_its_loop_runs(pki: TestPKI, proxy: Path,
                                                           tmp_path: Path) -> None:
    """`Daemon(cfg)` is built before `runtime.run` makes the loop, so it holds no asyncio
    primitive yet: on Python 3.9 one would belong to another loop, and every wait on it
    would fail at once (the serve loop spun, burning a core)."""
    from prestaged.service.daemon import Daemon as ServiceDaemon

    daemon = ServiceDaemon(load_config(write_config(tmp_path, pki, proxy, free_port(), [])),
                           None)
    loop_bound = (asyncio.Event, asyncio.Lock, asyncio.Semaphore, asyncio.Condition,
                  asyncio.Queue, asyncio.Future)
    assert not [k for k, v in vars(daemon).items() if isinstance(v, loop_bound)]


async def test_a_state_file_removed_under_the_daemon_makes_it_not_ready(
    pki: TestPKI, proxy: Path, tmp_path: Path,
) -> None:
    """The daemon went on writing to its unlinked state file, ready, and all was lost at the
    next stop (systemd's next start then made a new, empty state). /readyz now says the file
    was removed, and a run asked for fails naming it; put back, the daemon is ready again."""
    config = write_config(tmp_path, pki, proxy, free_port(), [])
    state = tmp_path / "state.db"
    async with in_process(config) as d:
        assert (await d.http("GET", "/readyz"))[0] == 200
        state.rename(tmp_path / "aside.db")
        status, body = await d.http("GET", "/readyz")
        assert status == 503 and f"state {state}: removed while in use" in json.dumps(body)
        listed = tmp_path / "one.txt"
        listed.write_text("https://127.0.0.1:1/x\n")
        code, run = await d.http("POST", "/api/v1/warm", {"definition": "one"})
        assert code == 202, run
        doc = await d.ended(run["href"])
        assert doc["state"] == "error" and "removed while in use" in doc["error"], doc
        (tmp_path / "aside.db").rename(state)
        assert (await d.http("GET", "/readyz"))[0] == 200


async def test_a_reload_that_drops_the_token_drops_its_expiry_metric(
    pki: TestPKI, proxy: Path, tmp_path: Path,
) -> None:
    """A reload to ``credentials.method = "proxy"`` stops sending the token: its expiry left
    /metrics with it (it stayed, and the token expiry alerts fired for a token not in use)."""
    bearer = write_token(tmp_path / "bt", TokenIssuer().mint(lifetime=300))
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [], credentials=f'token_file = "{bearer}"')
    async with in_process(config) as d:
        text = await d.metrics()
        assert metric_value(text, "prestaged_credential_expiry_timestamp_seconds",
                            kind="token") is not None
        write_config(tmp_path, pki, proxy, port, [], credentials='method = "proxy"')
        d.daemon.request_reload()

        async def dropped() -> bool:
            return d.daemon.credentials is not None and d.daemon.credentials.token is None
        await until("the reload dropped the token", dropped)
        text = await d.metrics()
        assert metric_value(text, "prestaged_credential_expiry_timestamp_seconds",
                            kind="token") is None
        assert metric_value(text, "prestaged_credential_expiry_timestamp_seconds",
                            kind="proxy") is not None
