"""``prestaged serve`` as a real subprocess: systemd notify protocol, schedule, API, reload,
proxy renewal, drain. The storage is the loopback test server; nothing is slept on: every wait
is on a notify datagram, the metrics, the API or the storage's counters, with a deadline."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, ThreadedStorageServer

DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notifications:
    """A fake systemd: a datagram socket at $NOTIFY_SOCKET that collects what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def wait_for(self, line: str, timeout: float = DEADLINE) -> None:
        """Block until a datagram containing the line ``line`` arrives."""
        deadline = time.monotonic() + timeout
        while not any(line in m.splitlines() for m in self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} from the daemon; got {self.seen}")
            self.sock.settimeout(left)
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """A running ``prestaged serve`` with helpers to talk to it."""

    def __init__(self, proc: subprocess.Popen[str], port: int, notify: Notifications,
                 config: Path, token: Optional[str]) -> None:
        self.proc, self.port, self.notify, self.config, self.token = proc, port, notify, config, token

    def http(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
             token: Optional[str] = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method)
        if token or self.token:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            payload, status = e.read(), e.code
        ctype = "json" if payload[:1] in (b"{", b"[") else "text"
        return status, json.loads(payload) if ctype == "json" else payload.decode()

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.http("GET", "/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
                return float(m.group(3))
        return 0.0


def _poll(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling an external process's state with a deadline


def _definition(tmp_path: Path, srv: ThreadedStorageServer, name: str, n: int) -> Path:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(srv.url(f"/{name}/f{i:04d}") + "\n" for i in range(n)))
    return path


def _config(tmp_path: Path, pki: TestPKI, proxy: Path, port: int, watches: list[tuple[Path, str]],
            extra: str = "") -> Path:
    text = f"""
[credentials]
proxy = "{proxy}"
ca_dir = "{pki.ca_dir}"
[state]
path = "{tmp_path / 'state.db'}"
flush_interval = "100ms"
[daemon]
listen = "127.0.0.1:{port}"
drain_timeout = "1s"
credential_check = "100ms"
jitter = 0
{extra}
"""
    for definition, every in watches:
        text += f'\n[[watch]]\ndefinition = "{definition}"\nevery = "{every}"\n'
    path = tmp_path / "prestaged.toml"
    path.write_text(text)
    return path


@pytest.fixture
def storage(pki: TestPKI) -> Iterator[ThreadedStorageServer]:
    """The test storage in a background thread, requiring a client certificate."""
    with ThreadedStorageServer(pki.server_ssl_context()) as srv:
        yield srv


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``prestaged serve`` with a config; stopped (killed if need be) after the test."""
    started: list[Daemon] = []

    def start(config: Path, port: int, token: Optional[str] = None) -> Daemon:
        notify = Notifications(tmp_path / f"notify{len(started)}")
        env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000",
               "WATCHDOG_PID": ""}
        proc = subprocess.Popen([sys.executable, "-m", "prestaged", "serve", "--config",
                                 str(config)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        d = Daemon(proc, port, notify, config, token)
        started.append(d)
        try:
            notify.wait_for("READY=1")
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.communicate()
        d.notify.close()


def test_daemon_schedule_metrics_reload_renewal_and_drain(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    """READY, scheduled re-warms, /metrics, SIGHUP reload, proxy renewal, SIGTERM drain."""
    port = _free_port()
    a = _definition(tmp_path, storage, "a", 100)
    config = _config(tmp_path, pki, proxy, port, [(a, "1s")])
    d = start_daemon(config, port)
    assert d.http("GET", "/healthz")[0] == 200
    # warmed, then re-warmed on schedule
    _poll("two scheduled warms", lambda: d.metric("prestaged_runs_total", result="ok") >= 2)
    assert storage.stats.path("/a/f0000").requests >= 2
    assert d.metric("prestaged_files_touched_total", result="warm") >= 200
    assert d.metric("prestaged_bytes_read_total") >= 800
    status, ready = d.http("GET", "/readyz")
    assert status == 200, ready
    status, ds = d.http("GET", f"/api/v1/datasets/{a}")
    assert status == 200 and ds["files"] == 100 and ds["fresh"] == 100
    # SIGHUP reloads a changed watch list
    b = _definition(tmp_path, storage, "b", 30)
    _config(tmp_path, pki, proxy, port, [(a, "1h"), (b, "1h")])
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    _poll("b warmed after reload", lambda: storage.stats.path("/b/f0029").requests >= 1)
    # a renewed proxy (here: of another user) is picked up without a restart
    expiry = d.metric("prestaged_credential_expiry_timestamp_seconds", kind="proxy")
    renewed = pki.make_proxy_for("Renewed", tmp_path / "renewed", lifetime=timedelta(hours=20))
    renewed.replace(proxy)
    _poll("renewed proxy re-read", lambda: d.metric(
        "prestaged_credential_expiry_timestamp_seconds", kind="proxy") > expiry + 3600)
    c = _definition(tmp_path, storage, "c", 10)
    status, body = d.http("POST", "/api/v1/warm", {"definition": str(c)})
    assert status == 202, body
    _poll("run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
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
    assert "Traceback" not in d.proc.communicate()[1]


def test_api_errors_and_token(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                              tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """Bad JSON/unknown definitions get 4xx JSON errors; a token file makes POST need it."""
    port = _free_port()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    config = _config(tmp_path, pki, proxy, port, [], extra=f'token_file = "{token_file}"')
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
    _poll("api run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
    assert d.http("GET", body["href"])[1]["counts"] == {"warm": 5}
    # `prestaged status` asks the running daemon (its config names the listener)
    res = subprocess.run([sys.executable, "-m", "prestaged", "status", "--config", str(config),
                          "--json"], capture_output=True, text=True, timeout=DEADLINE, check=True)
    doc = json.loads(res.stdout)
    assert doc["source"] == f"daemon http://127.0.0.1:{port}"
    assert [(r["definition"], r["fresh"]) for r in doc["definitions"]] == [(str(ok), 5)]
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    out, err = d.proc.communicate()
    assert "s3cret-token" not in out + err


def test_expired_proxy_refused_at_start(pki: TestPKI, tmp_path: Path) -> None:
    """The daemon will not start on an expired proxy: exit 3, one line, no READY."""
    expired = pki.make_proxy(tmp_path / "old", expired=True)
    config = _config(tmp_path, pki, expired, _free_port(), [])
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
    port = _free_port()
    extra = (f'[catalog.samweb]\nbase_url = "{sam.base_url}"\n'
             f'[[catalog.samweb.rewrite]]\nlocation = "dcache:/pnfs/dune/"\n'
             f'url = "{storage.url("/door")}/"\n')
    config = _config(tmp_path, pki, proxy, port, [], extra="")
    config.write_text(config.read_text() + '\n[[watch]]\ndefinition = "mc-2026"\n'
                      'catalog = "samweb"\nevery = "1h"\n' + extra)
    d = start_daemon(config, port)
    _poll("samweb watch warmed", lambda: d.metric("prestaged_runs_total", result="ok") >= 1)
    assert all(storage.stats.path(f"/door/d{i % 3}/f{i:03d}.root").requests == 1
               for i in range(40))
    assert d.metric("prestaged_catalog_requests_total", catalog="samweb", result="ok") >= 2


def test_watch_below_ready_fraction_is_reported(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    """A watched definition left below its `ready` fraction is logged and shown in the run."""
    port = _free_port()
    low = _definition(tmp_path, storage, "low", 20)
    storage.remove("/low/f0003")
    storage.remove("/low/f0004")
    config = _config(tmp_path, pki, proxy, port, [(low, "1h")])
    config.write_text(config.read_text() + "ready = 0.95\n")
    d = start_daemon(config, port)
    _poll("first run", lambda: d.metric("prestaged_runs_total", result="failed") >= 1)
    status, run = d.http("GET", "/api/v1/runs/1")
    assert status == 200 and run["warm_fraction"] == 0.9 and run["exit_code"] == 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    err = d.proc.communicate()[1]
    assert "only 90.0% warm after the run, below ready 95.0%" in err


def test_reload_switches_to_a_newly_configured_proxy(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    """SIGHUP with credentials.proxy pointing elsewhere: new touches present the new proxy."""
    port = _free_port()
    config = _config(tmp_path, pki, proxy, port, [])
    d = start_daemon(config, port)
    moved = pki.make_proxy_for("Moved", tmp_path / "moved", lifetime=timedelta(hours=20))
    config.write_text(config.read_text().replace(str(proxy), str(moved)))
    expiry = d.metric("prestaged_credential_expiry_timestamp_seconds", kind="proxy")
    d.proc.send_signal(signal.SIGHUP)
    _poll("new proxy in use", lambda: d.metric(
        "prestaged_credential_expiry_timestamp_seconds", kind="proxy") > expiry + 3600)
    m = _definition(tmp_path, storage, "m", 3)
    status, body = d.http("POST", "/api/v1/warm", {"definition": str(m)})
    assert status == 202
    _poll("run done", lambda: d.http("GET", body["href"])[1]["state"] == "done")
    assert pki.dn_for("Moved") in "".join(storage.stats.client_dns)
