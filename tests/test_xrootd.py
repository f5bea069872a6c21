"""prestaged against the real XRootD server (XrdHttp over HTTPS, Debian xrootd-server) on 127.0.0.1.

Every test runs the CLI in-process (``run_cli``). Where XRootD's log allows, the test also checks
what the server saw: ``acc.audit`` logs a "stat" and a "read" decision per GET, XrdHttp logs one
"login as <name>" per connection, a dropped unmapped DN and a rejected certificate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import CliResult, run_cli
from xrootd_cli import definition as _definition
from xrootd_cli import in_ci as _in_ci
from xrootd_cli import summary as _doc
from xrootd_cli import why as _why

from prestaged.testing.pki import TestPKI
from prestaged.testing.xrootd import MAPPED_USER, XRootDServer, xrootd_available

FILES = 300
CONCURRENCY = 32  # prestaged's default storage.concurrency
MISSING_XROOTD = "xrootd not found: install Debian package xrootd-server"
MISSING_IN_CI = f"{MISSING_XROOTD} (CI is set: a missing server is a failure, not a skip)"
# Zero backoff keeps retried failures fast; breakers and classification do not depend on it.
FAST_RETRY = "[retry]\ninitial = 0\nmax = 0\njitter = 0\n"
BREAKER = "[breaker]\ndenials = 5\n"
# Refusal tests: a definition of REFUSED_FILES files, few in flight, so "stopped early" is clear.
REFUSED_FILES = 100
REFUSED_ARGS = ("-q", "--concurrency", "8")
EARLY = REFUSED_FILES // 4  # files a run may finish before its breaker has to have tripped
FOREIGN_DN = "/DC=org/DC=other-test/O=Other/CN=Foreign User"


if not xrootd_available() and not _in_ci():
    pytest.skip(MISSING_XROOTD, allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _xrootd_installed() -> None:
    """With CI set, a missing xrootd fails every test here instead of skipping them."""
    if not xrootd_available():
        pytest.fail(MISSING_IN_CI)


@pytest.fixture(scope="session")
def xrootd(pki: TestPKI) -> Iterator[XRootDServer]:
    """One real XRootD for the session: FILES files and two empty ones, the test user mapped."""
    if not xrootd_available():
        pytest.fail(MISSING_IN_CI)
    with XRootDServer(pki, files=FILES, empty_files=2) as server:
        yield server


def _cli(tmp_path: Path, *args: object, config: str = "") -> CliResult:
    """``prestaged ARGS --config <file with config>`` in-process, with no X509_* variables."""
    cfg = tmp_path / "prestaged.toml"
    cfg.write_text(config)
    home = str(tmp_path)
    return run_cli(*map(str, args), "--config", str(cfg),
                   env={"HOME": home, "XDG_CONFIG_HOME": home})


def _warm(tmp_path: Path, urls: list[str], proxy: Path, ca_dir: Path, *extra: str,
          config: str = "") -> CliResult:
    return _cli(tmp_path, "warm", _definition(tmp_path, urls), "--proxy", proxy,
                "--ca-dir", ca_dir, "--json", *extra, config=config)


def _only_error_line(res: CliResult, server: XRootDServer) -> str:
    """The single stderr line (run with -q) which must be a ``prestaged: error:`` line."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prestaged: error: "), _why(res, server)
    return lines[0]


def _counts(**nonzero: int) -> dict[str, int]:
    return {"warm": 0, "empty": 0, "skipped_fresh": 0, "missing": 0, "denied": 0, "failed": 0,
            "staged": 0, **nonzero}


def _assert_all_read_once(server: XRootDServer, mark: int, names: list[str]) -> None:
    """XRootD granted the mapped user one stat and one read of every file, and nothing else."""
    records = server.audit(mark)
    assert {(r.verdict, r.protocol, r.user) for r in records} == {("grant", "https", MAPPED_USER)}
    reads = sorted(r.path for r in records if r.operation == "read")
    assert reads == sorted(str(server.export_dir / n) for n in names)
    logins = server.logins(mark)
    # Keep-alive reuse: one connection per worker at most, plus the Tape REST discovery's own
    # (storage.stage = auto asks the door once; XRootD answers 403, so the files are touched).
    assert set(logins) == {MAPPED_USER} and len(logins) <= CONCURRENCY + 1


def test_warm_300_files_with_cryptography_proxy(
    xrootd: XRootDServer, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """300 files warm with a cryptography-made proxy: exit 0, one granted read per file."""
    mark = xrootd.log_mark()
    res = _warm(tmp_path, xrootd.urls(), proxy, pki.ca_dir)
    doc = _doc(res, xrootd)
    assert res.returncode == 0, _why(res, xrootd)
    assert doc["counts"] == _counts(warm=FILES) and doc["bytes_read"] == 4 * FILES
    _assert_all_read_once(xrootd, mark, xrootd.file_names)


def test_warm_300_files_with_grid_proxy_init_proxy(
    xrootd: XRootDServer, pki: TestPKI, grid_proxy: Path, tmp_path: Path
) -> None:
    """300 files warm with a grid-proxy-init -rfc proxy, which prestaged sees as RFC 3820."""
    info = _cli(tmp_path, "proxy", "--proxy", grid_proxy, "--ca-dir", pki.ca_dir, "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert (described["type"], described["identity"]) == ("RFC 3820 proxy", pki.user_dn)
    mark = xrootd.log_mark()
    res = _warm(tmp_path, xrootd.urls(), grid_proxy, pki.ca_dir)
    doc = _doc(res, xrootd)
    assert res.returncode == 0, _why(res, xrootd)
    assert doc["counts"] == _counts(warm=FILES)
    _assert_all_read_once(xrootd, mark, xrootd.file_names)


def test_missing_file_is_missing_and_exit_1(
    xrootd: XRootDServer, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A file XRootD does not have is reported missing (HTTP 404, one attempt); exit 1."""
    urls = [*xrootd.urls()[:20], xrootd.url("no-such-file.dat")]
    mark = xrootd.log_mark()
    res = _warm(tmp_path, urls, proxy, pki.ca_dir)
    doc = _doc(res, xrootd)
    assert res.returncode == 1, _why(res, xrootd)
    assert doc["counts"] == _counts(warm=20, missing=1)
    [failure] = doc["failures"]
    assert (failure["url"], failure["result"], failure["status"], failure["attempts"]) == (
        urls[-1], "missing", 404, 1)
    seen = [r for r in xrootd.audit(mark) if r.path == str(xrootd.export_dir / "no-such-file.dat")]
    assert [(r.verdict, r.user, r.operation) for r in seen] == [
        ("grant", MAPPED_USER, "stat"), ("grant", MAPPED_USER, "read")]


def test_unmapped_dn_is_refused_and_breaker_trips_early(
    xrootd: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """A DN missing from the grid-mapfile: exit 3 with one error line, stopped long before 100."""
    stranger = pki.make_proxy_for("Stranger", tmp_path / "x509up_stranger")
    mark = xrootd.log_mark()
    res = _warm(tmp_path, xrootd.urls()[:REFUSED_FILES], stranger, pki.ca_dir, *REFUSED_ARGS,
                config=BREAKER + FAST_RETRY)
    dropped = xrootd.gridmap_failures(mark)
    assert dropped and set(dropped) == {pki.dn_for("Stranger")}, _why(res, xrootd)
    assert xrootd.audit(mark) == []  # no request of the stranger reached authorization
    assert res.returncode == 3, _why(res, xrootd)
    line = _only_error_line(res, xrootd)
    assert str(stranger) in line and pki.dn_for("Stranger") in line
    assert sum(_doc(res, xrootd)["counts"].values()) < EARLY


def test_unmapped_dn_without_required_gets_403_and_trips_denial_breaker(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Without 'required' XRootD names an unmapped DN by hash and answers 403: breaker, exit 3."""
    stranger = pki.make_proxy_for("Stranger", tmp_path / "x509up_stranger")
    with XRootDServer(pki, files=REFUSED_FILES, gridmap_required=False) as lenient:
        res = _warm(tmp_path, lenient.urls(), stranger, pki.ca_dir, *REFUSED_ARGS, config=BREAKER)
        records = lenient.audit()
        assert res.returncode == 3, _why(res, lenient)
        line = _only_error_line(res, lenient)
        assert "denied 5 files in a row (HTTP 403)" in line
        assert str(stranger) in line and pki.dn_for("Stranger") in line
        counts = _doc(res, lenient)["counts"]
        assert counts["denied"] >= 5 and sum(counts.values()) < EARLY
        assert records and {(r.verdict, r.protocol) for r in records} == {("deny", "https")}
        assert MAPPED_USER not in {r.user for r in records}
        assert len({r.path for r in records}) < EARLY


def test_expired_proxy_refused_before_any_request(
    xrootd: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """An expired proxy: exit 3 with one line naming it, and XRootD sees no connection at all."""
    expired = pki.make_proxy(tmp_path / "x509up_expired", expired=True)
    mark = xrootd.log_mark()
    res = _warm(tmp_path, xrootd.urls(), expired, pki.ca_dir, "-q")
    assert res.returncode == 3, _why(res, xrootd)
    line = _only_error_line(res, xrootd)
    assert str(expired) in line and "expired" in line
    assert xrootd.logins(mark) == [] and xrootd.audit(mark) == []


def test_no_proxy_and_no_default_file_exit_3(
    xrootd: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """No proxy and no token anywhere: exit 3 naming /tmp/x509up_u<uid> and every token place."""
    default = Path(f"/tmp/x509up_u{os.getuid()}")
    for path in (default, Path(f"/tmp/bt_u{os.getuid()}")):
        if path.exists():
            pytest.skip(f"{path} exists on this machine")
    mark = xrootd.log_mark()
    res = _cli(tmp_path, "warm", _definition(tmp_path, xrootd.urls()), "--ca-dir", pki.ca_dir,
               "-q")
    assert res.returncode == 3, _why(res, xrootd)
    line = _only_error_line(res, xrootd)
    assert str(default) in line and "no credentials" in line and "$BEARER_TOKEN" in line
    assert xrootd.logins(mark) == [] and xrootd.audit(mark) == []


def test_untrusted_ca_trips_refusal_breaker(
    xrootd: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """A proxy from a CA XRootD does not trust: exit 3 by the refusal breaker, stopped early."""
    foreign = pki.make_foreign_proxy(tmp_path / "x509up_foreign")
    mark = xrootd.log_mark()
    res = _warm(tmp_path, xrootd.urls()[:REFUSED_FILES], foreign, pki.ca_dir, *REFUSED_ARGS,
                config=FAST_RETRY)
    rejected = xrootd.rejected_certificates(mark)
    assert rejected and set(rejected) == {FOREIGN_DN}, _why(res, xrootd)
    assert xrootd.audit(mark) == []
    assert res.returncode == 3, _why(res, xrootd)
    line = _only_error_line(res, xrootd)
    assert f"https://127.0.0.1:{xrootd.port} refused" in line
    assert str(foreign) in line and FOREIGN_DN in line
    assert sum(_doc(res, xrootd)["counts"].values()) < EARLY


def test_empty_file_counts_as_empty(
    xrootd: XRootDServer, pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """An empty file on XRootD is counted empty, not failed; exit 0."""
    urls = [*xrootd.urls()[:3], xrootd.url(xrootd.empty_names[0])]
    res = _warm(tmp_path, urls, proxy, pki.ca_dir, config=FAST_RETRY)
    assert _doc(res, xrootd)["counts"] == _counts(warm=3, empty=1), _why(res, xrootd)
    assert res.returncode == 0, _why(res, xrootd)


@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_a_file_shorter_than_the_bytes_asked_is_warm(
    xrootd: XRootDServer, pki: TestPKI, proxy: Path, tmp_path: Path, fast_path: str
) -> None:
    """XRootD answers a range past the end of a file (bytes 0-99 of a 64-byte one) with a 206,
    ``Content-Range: bytes 0-99/64``, a Content-Length of 100, no body and a dropped
    connection. Waiting for that body failed every file shorter than ``--bytes`` (and enough of
    them stopped the run with exit 3, blaming the proxy). The head is the answer: warm."""
    urls = xrootd.urls()[:6]
    res = _warm(tmp_path, urls, proxy, pki.ca_dir, "--bytes", "100",
                config=FAST_RETRY + f"\n[storage]\nfast_path = {fast_path}\n")
    assert _doc(res, xrootd)["counts"] == _counts(warm=6), _why(res, xrootd)
    assert res.returncode == 0, _why(res, xrootd)


# --- the kit: a start-up crash ---------------------------------------------------------------


def _crashing_xrootd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, always: bool) -> Path:
    """An ``xrootd`` first on PATH that kills itself with SIGSEGV before logging anything
    (every time, or only the first time, then it runs the real one); returns its mark file."""
    import shutil

    real = shutil.which("xrootd")
    assert real is not None
    mark = tmp_path / "crashed"
    fake = tmp_path / "bin" / "xrootd"
    fake.parent.mkdir()
    once = "" if always else f'if [ -e "{mark}" ]; then exec "{real}" "$@"; fi\n'
    fake.write_text(f'#!/bin/sh\n{once}: > "{mark}"\nkill -SEGV $$\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    return mark


def test_a_start_up_crash_is_started_once_more_and_said(
        pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """XRootD killed by a signal before its first log line (seen once on CI, SIGSEGV with the
    SciTokens plugin) is started once more (start() returns once it serves), and the kit
    says so on stderr."""
    mark = _crashing_xrootd(tmp_path, monkeypatch, always=False)
    with XRootDServer(pki, files=1, empty_files=0, audit=False) as server:
        assert mark.exists() and server.port > 0
    assert "xrootd was killed by signal 11 before it logged anything; starting it once more" \
        in capfd.readouterr().err


def test_a_second_start_up_crash_is_an_error(
        pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice is not a fluke: the kit raises, naming the signal."""
    from prestaged.testing.xrootd import XRootDError

    _crashing_xrootd(tmp_path, monkeypatch, always=True)
    with pytest.raises(XRootDError, match="killed by signal 11 before it logged anything"):
        XRootDServer(pki, files=1, empty_files=0, audit=False).start()


@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_a_directory_is_failed_not_warm(
    xrootd: XRootDServer, pki: TestPKI, proxy: Path, tmp_path: Path, fast_path: str
) -> None:
    """A directory's URL is failed, naming it a directory, never warm: XrdHttp answers its GET
    with 200 and an HTML listing (it honours Range on every file, even an empty one)."""
    folder = xrootd.export_dir / f"adir-{fast_path}"
    folder.mkdir()
    folder.chmod(0o755)
    urls = [*xrootd.urls()[:3], xrootd.url(folder.name), xrootd.url(folder.name) + "/"]
    res = _warm(tmp_path, urls, proxy, pki.ca_dir,
                config=FAST_RETRY + f"\n[storage]\nfast_path = {fast_path}\n")
    doc = _doc(res, xrootd)
    assert doc["counts"] == _counts(warm=3, failed=2), _why(res, xrootd)
    assert res.returncode == 1, _why(res, xrootd)
    assert {(f["status"], f["attempts"]) for f in doc["failures"]} == {(200, 1)}
    assert all("a directory, not a file" in f["error"] for f in doc["failures"])
    assert doc["bytes_read"] <= 4 * len(urls)


def test_a_refused_handshake_is_not_retried_by_the_tape_rest_discovery(
    xrootd: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """XRootD refuses a proxy of an unknown CA with a TLS alert after the handshake (TLS 1.3):
    the Tape REST discovery (storage.stage = auto) asks the door once, not 8 times over a
    minute of backoff before the touches' breaker could say why; exit 3 naming the proxy."""
    foreign = pki.make_foreign_proxy(tmp_path / "x509up_foreign")
    res = _warm(tmp_path, xrootd.urls()[:REFUSED_FILES], foreign, pki.ca_dir, "--concurrency",
                "8", config=FAST_RETRY)
    assert res.returncode == 3, _why(res, xrootd)
    discovery = [line for line in res.stderr.splitlines() if "wlcg-tape-rest-api" in line]
    assert discovery and not any("trying again" in line or "gave up after" in line
                                 for line in discovery), _why(res, xrootd)
    assert f"does not accept proxy {foreign}" in res.stderr


def test_a_legacy_globus_proxy_is_named_as_the_cause(
    xrootd: XRootDServer, pki: TestPKI, tmp_path: Path
) -> None:
    """XRootD refuses a legacy Globus proxy (grid-proxy-init -old) with "unknown ca", which
    blamed the CA: the start warns and the breaker's exit 3 names it legacy and the fix."""
    from prestaged.testing.xrootd import grid_ca_dir, grid_proxy_init, grid_proxy_init_available

    if not grid_proxy_init_available():
        pytest.skip("grid-proxy-init not found: install Debian package globus-proxy-utils")
    ca_dir = grid_ca_dir(pki.ca_dir, tmp_path / "grid-certificates")
    legacy = grid_proxy_init(pki.user_cert, pki.user_key, tmp_path / "x509up_old",
                             ca_dir=ca_dir, legacy=True, verify=False)
    mark = xrootd.log_mark()
    res = _warm(tmp_path, xrootd.urls()[:REFUSED_FILES], legacy, pki.ca_dir, "--concurrency",
                "8", config=FAST_RETRY)
    assert res.returncode == 3, _why(res, xrootd)
    assert xrootd.audit(mark) == []  # no request of it reached authorization
    warning = [line for line in res.stderr.splitlines() if "WARNING" in line and str(legacy) in line]
    assert warning and "legacy Globus proxy" in warning[0], _why(res, xrootd)
    [error] = [line for line in res.stderr.splitlines() if line.startswith("prestaged: error: ")]
    assert f"proxy {legacy}" in error and "legacy Globus proxy" in error
    assert "grid-proxy-init -rfc" in error
