"""prestaged warms files on the real XRootD with WLCG bearer tokens (SciTokens plugin; fixtures
in conftest.py): a token alone, proxy and token together, refusals that stop a run early with
exit 3, a token expired before the run (nothing sent), and a token renewed in the middle of a
run. No token text in any output."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from cli_runner import CliResult, entry_point, run_cli, subprocess_env
from xrootd_cli import definition as _definition
from xrootd_cli import in_ci as _in_ci
from xrootd_cli import summary as _doc
from xrootd_cli import why as _why

from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import write_token
from prestaged.testing.xrootd import XRootDServer, scitokens_available, xrootd_available

DEADLINE = 120.0
# Connections a refused run makes: breaker.token_denials (3) touches, plus the Tape REST
# discovery at the door (storage.stage = auto), which XRootD answers 403 ("no API here").
REFUSED_RUN_CONNECTIONS = 3 + 1


if not (xrootd_available() and scitokens_available()) and not _in_ci():
    pytest.skip("install Debian packages xrootd-server and xrootd-scitokens-plugins",
                allow_module_level=True)


def _warm(tmp_path: Path, server: XRootDServer, pki: TestPKI, token: Path, *extra: str,
          urls: list[str] | None = None) -> CliResult:
    """``prestaged warm --json`` of the server's files with ``token`` (and ``extra``)."""
    config = tmp_path / "prestaged.toml"
    config.write_text("")
    return run_cli("warm", str(_definition(tmp_path, urls or server.urls())), "--token-file",
                   str(token), "--ca-dir", str(pki.ca_dir), "--json", "--config", str(config),
                   *extra, env={"HOME": str(tmp_path)})


def _error_line(res: CliResult) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def _no_token(token: str, *texts: str) -> None:
    signature = token.rsplit(".", 1)[1]
    for text in texts:
        assert token not in text and signature not in text


def test_a_read_token_warms_a_definition_with_no_proxy_anywhere(
        xrootd_token_only_server: XRootDServer, pki: TestPKI, tmp_path: Path) -> None:
    """Token-only XRootD, no proxy on the machine: every file warm, each granted by the token
    plugin; no token text in the output at -v."""
    server = xrootd_token_only_server
    token = server.mint("storage.read:/")
    path = write_token(tmp_path / "bt", token)
    mark = server.log_mark()
    res = _warm(tmp_path, server, pki, path, "-v")
    assert res.returncode == 0, _why(res, server)
    assert _doc(res, server)["counts"]["warm"] == len(server.file_names)
    granted = {p.rsplit("/", 1)[1] for op, p in server.token_grants(mark) if op == "read"}
    assert granted == set(server.file_names)
    _no_token(token, res.stdout, res.stderr)


def test_a_token_without_read_is_refused_with_few_requests(
        xrootd_token_only_server: XRootDServer, pki: TestPKI, tmp_path: Path) -> None:
    """A token with storage.create only: a warning first, then exit 3 naming the token's scopes,
    after at most breaker.token_denials (3) touches reached the server (each 403 closes its
    connection, so connections count requests)."""
    server = xrootd_token_only_server
    token = server.mint("storage.create:/", subject="writer")
    path = write_token(tmp_path / "bt", token)
    mark = server.log_mark()
    res = _warm(tmp_path, server, pki, path, "-q")
    assert res.returncode == 3, _why(res, server)
    line = _error_line(res)
    assert "subject writer" in line and "storage.create:/" in line and "403" in line
    assert 1 <= len(server.logins(mark)) <= REFUSED_RUN_CONNECTIONS, server.logins(mark)
    assert "no storage.read scope covers" in res.stderr
    _no_token(token, res.stdout, res.stderr)


def test_an_expired_token_is_refused_before_any_request(
        xrootd_token_only_server: XRootDServer, pki: TestPKI, tmp_path: Path) -> None:
    """An expired token: exit 3 naming the file, and XRootD saw no connection at all."""
    server = xrootd_token_only_server
    token = server.mint(lifetime=-30)
    path = write_token(tmp_path / "bt", token)
    mark = server.log_mark()
    res = _warm(tmp_path, server, pki, path, "-q")
    assert res.returncode == 3, _why(res, server)
    assert f"token {path} (from --token-file): expired at" in _error_line(res)
    assert server.logins(mark) == []
    _no_token(token, res.stdout, res.stderr)


def test_a_wrong_audience_is_refused(xrootd_token_only_server: XRootDServer, pki: TestPKI,
                                     tmp_path: Path) -> None:
    """A token for another storage: XRootD refuses it ('aud' claim, a bare 403), the run stops
    with exit 3 naming the token's audience beside its scopes (the log alone said why)."""
    server = xrootd_token_only_server
    token = server.mint(audience="https://other.example:1094")
    path = write_token(tmp_path / "bt", token)
    mark = server.log_mark()
    res = _warm(tmp_path, server, pki, path, "-q")
    assert res.returncode == 3, _why(res, server)
    line = _error_line(res)
    assert "403" in line and "audience https://other.example:1094" in line
    assert any("aud" in reason for reason in server.token_failures(mark))
    assert len(server.logins(mark)) <= REFUSED_RUN_CONNECTIONS


def test_proxy_and_token_together(xrootd_token_server: XRootDServer, pki: TestPKI,
                                  proxy: Path, tmp_path: Path) -> None:
    """auto with both: the proxy is presented and the token sent; the token decides (granted
    by the plugin, not the proxy's authdb)."""
    server = xrootd_token_server
    path = write_token(tmp_path / "bt", server.mint("storage.read:/"))
    mark = server.log_mark()
    res = _warm(tmp_path, server, pki, path, "--proxy", str(proxy))
    assert res.returncode == 0, _why(res, server)
    assert _doc(res, server)["counts"]["warm"] == len(server.file_names)
    assert len([1 for op, _ in server.token_grants(mark) if op == "read"]) == len(
        server.file_names)


def test_a_token_renewed_mid_run_is_used_by_later_requests(
        xrootd_token_only_server: XRootDServer, pki: TestPKI, tmp_path: Path) -> None:
    """A slow run (--rate) outlives its first token: the file is rewritten mid-run and the run
    ends with every file warm, though the first token expired while it ran (an expired token is
    never sent: without the renewal the run would stop with exit 3)."""
    server = xrootd_token_only_server
    # 5 s of the first token's life for start-up and 20 grants (with token_min_lifetime 1 s):
    # with 2.5 s, a start-up slowed by a loaded machine left it too short, and the run
    # stopped with exit 3 before the renewal. 200 files at 25/s outlive it by 2 s or more.
    first_life = 6.0
    first = server.mint(lifetime=first_life)
    expires = time.time() + first_life
    path = write_token(tmp_path / "bt", first)
    config = tmp_path / "prestaged.toml"
    config.write_text('[credentials]\ntoken_min_lifetime = "1s"\n')
    urls = server.urls()[:200]
    mark = server.log_mark()
    proc = subprocess.Popen(
        entry_point("warm", str(_definition(tmp_path, urls)), "--token-file", str(path),
                    "--ca-dir", str(pki.ca_dir), "--json", "--config", str(config),
                    "--rate", "25", "--no-state"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env({"HOME": str(tmp_path)}))
    try:
        deadline = time.monotonic() + DEADLINE
        while len(server.token_grants(mark)) < 20:  # the run is under way on the first token
            assert proc.poll() is None and time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        second = server.mint(lifetime=3600)
        write_token(path, second)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
    assert time.time() > expires + 1  # the first token expired during the run
    assert proc.returncode == 0, f"{err}\n{server.log_tail()}"
    assert json.loads(out)["counts"]["warm"] == len(urls)
    _no_token(first, out, err)
    _no_token(second, out, err)
