"""The ``prestaged`` command line end to end: real TLS storage on 127.0.0.1, real subprocesses."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import ssl
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prestaged.cli import main
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, Status, ThreadedStorageServer

TIMEOUT = 120


@pytest.fixture
def storage(pki: TestPKI) -> Iterator[ThreadedStorageServer]:
    """The test storage in a background thread, requiring a client certificate."""
    with ThreadedStorageServer(pki.server_ssl_context()) as srv:
        yield srv


def _definition(tmp_path: Path, srv: ThreadedStorageServer, paths: list[str]) -> Path:
    path = tmp_path / "dataset.txt"
    path.write_text("# test dataset\n" + "".join(srv.url(p) + "\n" for p in paths))
    return path


def _cli(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point (python -m prestaged) in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "PRESTAGED_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "prestaged", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=full_env, check=False, **kw)  # type: ignore[call-overload]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _secrets(proxy: Path) -> list[str]:
    """Lines of the proxy's private key body: none of them may ever be printed."""
    match = re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\n(.*?)-----END", proxy.read_text(), re.S)
    assert match is not None
    return [ln for ln in match.group(1).splitlines() if len(ln) > 20]


def test_warm_json_counts_and_exit_1_for_missing(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json reports counts by outcome, bytes, rate and failed files; a 404 makes exit 1."""
    paths = [f"/pnfs/x/f{i}" for i in range(50)]
    storage.remove(paths[3])
    storage.set_size(paths[4], 0)
    definition = _definition(tmp_path, storage, [*paths, paths[0]])  # one duplicate
    code = main(["warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["exit_code"] == 1
    assert doc["counts"] == {"warm": 48, "empty": 1, "skipped_fresh": 0, "missing": 1, "denied": 0,
                             "failed": 0}
    assert doc["duplicates_skipped"] == 1 and doc["bytes_read"] == 48 * 4
    assert doc["failures"] == [{"url": storage.url(paths[3]), "result": "missing", "status": 404,
                                "attempts": 1, "error": "HTTP 404 Not Found"}]
    assert doc["files_per_second"] > 0
    assert storage.stats.requests_total == 50


def test_dry_run_touches_nothing(
    storage: ThreadedStorageServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run lists each URL once and sends no request (and needs no proxy)."""
    definition = _definition(tmp_path, storage, ["/a", "/b", "/a"])
    assert main(["warm", str(definition), "--dry-run", "--proxy", "/nonexistent"]) == 0
    assert capsys.readouterr().out.split() == [storage.url("/a"), storage.url("/b")]
    assert storage.stats.requests_total == 0


def test_catalog_dir_by_name_and_flags_override_config(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NAME resolves in [catalog.local] dir; --bytes beats storage.bytes from the config file."""
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "mc-2026.txt").write_text(storage.url("/named") + "\n")
    config = tmp_path / "prestaged.toml"
    config.write_text(f'[storage]\nbytes = 8\n[catalog.local]\ndir = "{defs}"\n'
                      f'[credentials]\nproxy = "{proxy}"\nca_dir = "{pki.ca_dir}"\n')
    assert main(["warm", "mc-2026", "--config", str(config), "--json"]) == 0
    assert storage.stats.path("/named").ranges == ["bytes=0-7"]
    assert main(["warm", "mc-2026", "--config", str(config), "--bytes", "2", "--json", "--force"]) == 0
    assert storage.stats.path("/named").ranges == ["bytes=0-7", "bytes=0-1"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[storage]\nconcurrency = \"ten\"\n", 'storage.concurrency: expected a positive integer, got "ten"'),
        ("[storage]\nconcurency = 4\n", "unknown key storage.concurency (did you mean storage.concurrency?)"),
        ("[storage\n", "invalid TOML"),
    ],
)
def test_bad_config_exit_2_one_line(tmp_path: Path, toml: str, expected: str) -> None:
    """Malformed config: exit 2, one line naming the file and the key, no traceback."""
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    (tmp_path / "d.txt").write_text("https://127.0.0.1:1/x\n")
    res = _cli("warm", str(tmp_path / "d.txt"), "--config", str(config))
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert str(config) in line and expected in line


def test_bad_flag_value_exit_2(tmp_path: Path) -> None:
    """A bad flag value is rejected like a bad config value, naming the flag."""
    res = _cli("warm", "x.txt", "--concurrency", "0")
    assert res.returncode == 2
    assert "--concurrency: expected a positive integer, got 0" in _one_error_line(res.stderr)


@pytest.mark.parametrize("problem", ["expired", "missing", "no-key", "default-missing", "ca-dir"])
def test_credential_problems_exit_3(pki: TestPKI, tmp_path: Path, problem: str) -> None:
    """Expired/missing proxy, a file without key, no default proxy, missing CA dir: exit 3."""
    (tmp_path / "d.txt").write_text("https://127.0.0.1:1/x\n")
    args = ["warm", str(tmp_path / "d.txt"), "--ca-dir", str(pki.ca_dir)]
    env: dict[str, str] = {}
    if problem == "expired":
        target = pki.make_proxy(tmp_path / "expired", expired=True)
        args += ["--proxy", str(target)]
        want = [str(target), "expired"]
    elif problem == "missing":
        args += ["--proxy", str(tmp_path / "nope")]
        want = [str(tmp_path / "nope"), "no such file"]
    elif problem == "no-key":
        target = tmp_path / "certonly"
        target.write_text(pki.user_cert.read_text())
        target.chmod(0o600)
        args += ["--proxy", str(target)]
        want = [str(target), "no private key"]
    elif problem == "default-missing":
        default = Path(f"/tmp/x509up_u{os.getuid()}")
        if default.exists():
            pytest.skip(f"{default} exists on this machine")
        want = [str(default), "does not exist"]
    else:
        args = ["warm", str(tmp_path / "d.txt"), "--proxy", str(pki.make_proxy(tmp_path / "p")),
                "--ca-dir", str(tmp_path / "no-cas")]
        want = [str(tmp_path / "no-cas"), "no such directory"]
    res = _cli(*args, env=env)
    assert res.returncode == 3, res.stderr
    line = _one_error_line(res.stderr)
    for w in want:
        assert w in line


def test_untrusted_ca_proxy_exit_3(pki: TestPKI, tmp_path: Path) -> None:
    """A proxy from a CA the storage does not trust: exit 3 early, one line naming the proxy."""
    ctx = pki.server_ssl_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # see test_warm_integration: handshake rejection
    foreign = pki.make_foreign_proxy(tmp_path / "foreign")
    with ThreadedStorageServer(ctx) as srv:
        definition = _definition(tmp_path, srv, [f"/f/{i}" for i in range(300)])
        res = _cli("warm", str(definition), "--proxy", str(foreign), "--ca-dir", str(pki.ca_dir))
    assert res.returncode == 3
    line = _one_error_line(res.stderr)
    assert str(foreign) in line and "refused" in line and "TLS handshake" in line


def test_storage_denying_everything_exit_3(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                           tmp_path: Path) -> None:
    """403 for everything stops after breaker.denials files with exit 3 and names the proxy."""
    storage.inject_all([Status(403)], repeat=True)
    definition = _definition(tmp_path, storage, [f"/f/{i}" for i in range(1000)])
    config = tmp_path / "c.toml"
    config.write_text("[breaker]\ndenials = 5\n")
    res = _cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
               "--config", str(config), "--concurrency", "4")
    assert res.returncode == 3
    line = _one_error_line(res.stderr)
    assert "denied 5 files in a row" in line and str(proxy) in line
    assert storage.stats.requests_total <= 5 + 4


def test_ctrl_c_stops_with_partial_summary_130(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                               tmp_path: Path) -> None:
    """SIGINT mid-run: clean stop, partial summary marked interrupted, exit 130."""
    paths = [f"/slow/{i}" for i in range(200)]
    for p in paths[10:]:
        storage.inject(p, [Delay(30)])
    definition = _definition(tmp_path, storage, paths)
    proc = subprocess.Popen([sys.executable, "-m", "prestaged", "warm", str(definition), "--proxy",
                             str(proxy), "--ca-dir", str(pki.ca_dir), "--concurrency", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        storage.wait_until(lambda s: s.active_requests >= 4, timeout=60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out and "Traceback" not in err
    assert re.search(r"warm\s+10\b", out)


def test_progress_lines_when_not_a_terminal(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                            tmp_path: Path) -> None:
    """Without a terminal, progress is reported as periodic one-line log messages."""
    paths = [f"/p/{i}" for i in range(20)]
    for p in paths[:4]:
        storage.inject(p, [Delay(0.6)])
    definition = _definition(tmp_path, storage, paths)
    res = _cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
               "--progress-interval", "0.1")
    assert res.returncode == 0
    assert re.search(r"progress: \d+/20 \(\d+%\) files, \d+ files/s, 0 failed", res.stderr)


def test_progress_bar_on_a_terminal(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                    tmp_path: Path) -> None:
    """On a terminal, a live bar shows done/total and the rate (stderr on a real pty)."""
    definition = _definition(tmp_path, storage, [f"/t/{i}" for i in range(300)])
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "prestaged", "warm", str(definition), "--proxy",
                             str(proxy), "--ca-dir", str(pki.ca_dir)],
                            stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data.decode(errors="replace"))
    os.close(primary)
    out = proc.communicate(timeout=TIMEOUT)[0]
    bar = "".join(chunks)
    assert proc.returncode == 0
    assert "300/300" in bar and "file/s" in bar
    assert "warm" in out


def test_no_secrets_in_any_output(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                  tmp_path: Path) -> None:
    """Debug logs, JSON, summaries and errors never contain the proxy's key material."""
    storage.remove("/gone")
    storage.inject("/busy", [Status(503)])
    definition = _definition(tmp_path, storage, ["/ok", "/gone", "/busy"])
    runs = [
        _cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "-v", "--json"),
        _cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "-v"),
        _cli("proxy", "--proxy", str(proxy), "--json"),
        _cli("warm", str(definition), "--proxy", str(pki.make_proxy(tmp_path / "e", expired=True))),
    ]
    secrets = _secrets(proxy)
    assert secrets
    for res in runs:
        for s in secrets:
            assert s not in res.stdout and s not in res.stderr
        assert "PRIVATE KEY" not in res.stdout + res.stderr


def test_proxy_command(pki: TestPKI, proxy: Path) -> None:
    """`prestaged proxy` shows DN, type and time left; --json for scripts; exit 3 if expired."""
    res = _cli("proxy", "--proxy", str(proxy))
    assert res.returncode == 0
    assert pki.user_dn in res.stdout and "RFC 3820 proxy" in res.stdout
    assert re.search(r"timeleft\s+: 1[01]h\d\dm", res.stdout)
    doc = json.loads(_cli("proxy", "--json", env={"X509_USER_PROXY": str(proxy)}).stdout)
    assert doc["identity"] == pki.user_dn and doc["source"] == "$X509_USER_PROXY"
    assert 11 * 3600 < doc["seconds_left"] <= 12 * 3600
    expired = _cli("proxy", "--proxy", str(pki.make_proxy(proxy.parent / "old", expired=True)))
    assert expired.returncode == 3 and "expired" in _one_error_line(expired.stderr)


def test_version_and_help() -> None:
    """--version and --help work through python -m prestaged."""
    from prestaged import __version__

    assert _cli("--version").stdout.strip() == f"prestaged {__version__}"
    res = _cli("warm", "--help")
    assert res.returncode == 0 and "--concurrency" in res.stdout and "--dry-run" in res.stdout


def test_demo_runs_end_to_end() -> None:
    """`prestaged demo` starts its own storage, warms every file and exits 0."""
    res = _cli("demo", "--files", "300")
    assert res.returncode == 0, res.stderr
    assert re.search(r"warm\s+300\b", res.stdout)
    assert "the storage saw 300 requests and sent 1200 bytes" in res.stdout
