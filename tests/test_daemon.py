"""``prestaged serve`` as a real subprocess: systemd notify protocol, schedule, API, reload,
proxy renewal, drain. The storage is the loopback test server; nothing is slept on: every wait
is on a notify datagram, the metrics, the API or the storage's counters, with a deadline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from daemon_harness import DEADLINE, Daemon, free_port, poll, write_config

from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, ThreadedStorageServer


def _definition(tmp_path: Path, srv: ThreadedStorageServer, name: str, n: int) -> Path:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(srv.url(f"/{name}/f{i:04d}") + "\n" for i in range(n)))
    return path


@pytest.fixture
def storage(pki: TestPKI) -> Iterator[ThreadedStorageServer]:
    """The test storage in a background thread, requiring a client certificate."""
    with ThreadedStorageServer(pki.server_ssl_context()) as srv:
        yield srv


def test_daemon_schedule_metrics_reload_renewal_and_drain(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    """READY, scheduled re-warms, /metrics, SIGHUP reload, proxy renewal, SIGTERM drain."""
    port = free_port()
    a = _definition(tmp_path, storage, "a", 100)
    config = write_config(tmp_path, pki, proxy, port, [(a, "1s")])
    d = start_daemon(config, port)
    assert d.http("GET", "/healthz")[0] == 200
    # warmed, then re-warmed on schedule
    poll("two scheduled warms", lambda: d.metric("prestaged_runs_total", result="ok") >= 2)
    assert storage.stats.path("/a/f0000").requests >= 2
    assert d.metric("prestaged_files_touched_total", result="warm") >= 200
    assert d.metric("prestaged_bytes_read_total") >= 800
    status, ready = d.http("GET", "/readyz")
    assert status == 200, ready
    status, ds = d.http("GET", f"/api/v1/datasets/{a}")
    assert status == 200 and ds["files"] == 100 and ds["fresh"] == 100
    # SIGHUP reloads a changed watch list
    b = _definition(tmp_path, storage, "b", 30)
    write_config(tmp_path, pki, proxy, port, [(a, "1h"), (b, "1h")])
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    poll("b warmed after reload", lambda: storage.stats.path("/b/f0029").requests >= 1)
    # a renewed proxy (here: of another user) is picked up without a restart
    expiry = d.metric("prestaged_credential_expiry_timestamp_seconds", kind="proxy")
    renewed = pki.make_proxy_for("Renewed", tmp_path / "renewed", lifetime=timedelta(hours=20))
    renewed.replace(proxy)
    poll("renewed proxy re-read", lambda: d.metric(
        "prestaged_credential_expiry_timestamp_seconds", kind="proxy") > expiry + 3600)
    c = _definition(tmp_path, storage, "c", 10)
    status, body = d.http("POST", "/api/v1/warm", {"definition": str(c)})
    assert status == 202, body
    poll("run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
    assert pki.dn_for("Renewed") in "".join(storage.stats.client_dns)
    # SIGTERM during a run drains, then stops it; exit 0; the run's results are in the store
    slow = _definition(tmp_path, storage, "slow", 40)
    for i in range(10, 40):
        storage.inject(f"/slow/f{i:04d}", [Delay(60)])
    status, body = d.http("POST", "/api/v1/warm", {"definition": str(slow)})
    assert status == 202
    storage.wait_until(lambda s: s.path("/slow/f0039").requests >= 1, timeout=DEADLINE)
    d.proc.send_signal(signal.SIGTERM)
    d.notify.wait_for("STOPPING=1")
    assert d.proc.wait(timeout=DEADLINE) == 0
    res = subprocess.run([sys.executable, "-m", "prestaged", "status", str(slow), "--state",
                          str(tmp_path / "state.db"), "--json"], capture_output=True, text=True,
                         timeout=DEADLINE, check=True)
    [row] = json.loads(res.stdout)["definitions"]
    assert row["fresh"] == 10 and row["last_run"]["reason"] == "interrupted"
    assert "Traceback" not in d.output()


def test_api_errors_and_token(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                              tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """Bad JSON/unknown definitions get 4xx JSON errors; a token file makes POST need it."""
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    config = write_config(tmp_path, pki, proxy, port, [], extra=f'token_file = "{token_file}"')
    d = start_daemon(config, port, token="s3cret-token")
    assert d.http("POST", "/api/v1/warm", raw=b"{not json")[0] == 400
    assert d.http("POST", "/api/v1/warm", {"nodefinition": 1})[0] == 400
    status, body = d.http("POST", "/api/v1/warm", {"definition": "/nonexistent/list.txt"})
    assert status == 404 and "no such file" in body["error"]
    assert d.http("POST", "/api/v1/warm", {"definition": "x", "catalog": "nope"})[0] == 400
    assert d.http("POST", "/api/v1/warm", {"definition": "x"}, token="wrong")[0] == 401
    assert d.http("GET", "/api/v1/runs/999")[0] == 404
    assert d.http("GET", "/api/v1/runs/abc")[0] == 400
    assert d.http("GET", "/api/v1/datasets/unknown")[0] == 404
    ok = _definition(tmp_path, storage, "ok", 5)
    status, body = d.http("POST", "/api/v1/warm", {"definition": str(ok)})
    assert status == 202
    poll("api run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
    assert d.http("GET", body["href"])[1]["counts"] == {"warm": 5}
    # `prestaged status` asks the running daemon (its config names the listener)
    res = subprocess.run([sys.executable, "-m", "prestaged", "status", "--config", str(config),
                          "--json"], capture_output=True, text=True, timeout=DEADLINE, check=True)
    doc = json.loads(res.stdout)
    assert doc["source"] == f"daemon http://127.0.0.1:{port}"
    assert [(r["definition"], r["fresh"]) for r in doc["definitions"]] == [(str(ok), 5)]
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    err = d.output()
    assert "s3cret-token" not in err


def test_expired_proxy_refused_at_start(pki: TestPKI, tmp_path: Path) -> None:
    """The daemon will not start on an expired proxy: exit 3, one line, no READY."""
    expired = pki.make_proxy(tmp_path / "old", expired=True)
    config = write_config(tmp_path, pki, expired, free_port(), [])
    res = subprocess.run([sys.executable, "-m", "prestaged", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert res.returncode == 3
    assert "expired" in res.stderr and "Traceback" not in res.stderr


def test_daemon_watches_a_samweb_definition(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon], samweb: Callable[..., Any],
) -> None:
    """A [[watch]] on a SAM definition resolves through SAM (proxy presented) and is warmed;
    every SAM request is counted in prestaged_catalog_requests_total."""
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
    d = start_daemon(config, port)
    poll("samweb watch warmed", lambda: d.metric("prestaged_runs_total", result="ok") >= 1)
    assert all(storage.stats.path(f"/door/d{i % 3}/f{i:03d}.root").requests == 1
               for i in range(40))
    assert d.metric("prestaged_catalog_requests_total", catalog="samweb", result="ok") >= 2


def test_watch_below_ready_fraction_is_reported(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    """A watched definition left below its `ready` fraction is logged and shown in the run."""
    port = free_port()
    low = _definition(tmp_path, storage, "low", 20)
    storage.remove("/low/f0003")
    storage.remove("/low/f0004")
    config = write_config(tmp_path, pki, proxy, port, [(low, "1h")])
    config.write_text(config.read_text() + "ready = 0.95\n")
    d = start_daemon(config, port)
    poll("first run", lambda: d.metric("prestaged_runs_total", result="failed") >= 1)
    status, run = d.http("GET", "/api/v1/runs/1")
    assert status == 200 and run["warm_fraction"] == 0.9 and run["exit_code"] == 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    err = d.output()
    assert "only 90.0% warm after the run, below ready 95.0%" in err


def test_reload_switches_to_a_newly_configured_proxy(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    """SIGHUP with credentials.proxy pointing elsewhere: new touches present the new proxy."""
    port = free_port()
    config = write_config(tmp_path, pki, proxy, port, [])
    d = start_daemon(config, port)
    moved = pki.make_proxy_for("Moved", tmp_path / "moved", lifetime=timedelta(hours=20))
    config.write_text(config.read_text().replace(str(proxy), str(moved)))
    expiry = d.metric("prestaged_credential_expiry_timestamp_seconds", kind="proxy")
    d.proc.send_signal(signal.SIGHUP)
    poll("new proxy in use", lambda: d.metric(
        "prestaged_credential_expiry_timestamp_seconds", kind="proxy") > expiry + 3600)
    m = _definition(tmp_path, storage, "m", 3)
    status, body = d.http("POST", "/api/v1/warm", {"definition": str(m)})
    assert status == 202
    poll("run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
    assert pki.dn_for("Moved") in "".join(storage.stats.client_dns)
