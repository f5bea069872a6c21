"""The ``prestaged`` command line end to end: real TLS storage on 127.0.0.1.

Commands run in-process (``cli_runner.run_cli``); real ``python -m prestaged`` subprocesses only
where the process boundary is what is tested: Ctrl-C, a progress bar on a real terminal, and the
console entry point itself.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import signal
import ssl
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from cli_runner import entry_point, run_cli, subprocess_env

from prestaged.cli import build_parser, main
from prestaged.model import redact
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, Status, ThreadedStorageServer

TIMEOUT = 120


def _definition(tmp_path: Path, srv: ThreadedStorageServer, paths: list[str]) -> Path:
    path = tmp_path / "dataset.txt"
    path.write_text("# test dataset\n" + "".join(srv.url(p) + "\n" for p in paths))
    return path


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
                             "failed": 0, "staged": 0}
    assert doc["duplicates_skipped"] == 1 and doc["bytes_read"] == 48 * 4
    assert doc["failures"] == [{"url": storage.url(paths[3]), "result": "missing", "status": 404,
                                "attempts": 1, "error": "HTTP 404 Not Found"}]
    assert doc["files_per_second"] > 0
    assert storage.stats.requests_total == 50


def test_status_and_release_find_a_definition_warmed_by_a_relative_path(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``warm dataset.txt`` records the file by its absolute path; ``status dataset.txt`` from
    the same directory finds it (it was exit 4, "no record"), as ``release`` already did."""
    _definition(tmp_path, storage, [f"/pnfs/r/f{i}" for i in range(3)])
    monkeypatch.chdir(tmp_path)
    state = ["--state", str(tmp_path / "s.db")]
    assert main(["warm", "dataset.txt", "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                 "-q", *state]) == 0
    capsys.readouterr()
    assert main(["status", "dataset.txt", "--json", *state]) == 0
    [row] = json.loads(capsys.readouterr().out)["definitions"]
    assert row["definition"] == str(tmp_path / "dataset.txt") and row["fresh"] == 3
    assert main(["status", "./dataset.txt", "--catalog", "local", *state]) == 0
    assert main(["status", "other.txt", *state]) == 4
    assert main(["release", "dataset.txt", *state]) == 0


def test_a_definition_name_too_long_for_a_file_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 300-character definition name (ENAMETOOLONG when looked up as a file) and an unknown
    ``~user``: ``warm`` exits 4 with one line, ``status`` answers "no record" (both printed a
    traceback)."""
    state = tmp_path / "s.db"
    state.touch()
    for name in ("x" * 300, "~nosuchuser-prestaged/ds.txt"):
        assert main(["warm", name, "--no-state"]) == 4
        [line] = capsys.readouterr().err.splitlines()[-1:]
        assert line.startswith("prestaged: error: definition '") and "not a usable file name" in line
        assert main(["status", name, "--state", str(state)]) == 4
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "release", "forget"])
def test_a_mistyped_catalog_kind_is_a_usage_error_naming_the_kinds(tmp_path: Path,
                                                                    command: str) -> None:
    """``--catalog samwbe`` on a command naming a recorded definition is exit 2 listing the
    kinds; it was taken as a catalog with no such definition (exit 4, "no record")."""
    res = run_cli(command, "--catalog", "samwbe", "--state", str(tmp_path / "s.db"), "ds")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "invalid choice: 'samwbe' (choose from 'local', 'samweb', 'metacat')" in res.stderr
    assert not (tmp_path / "s.db").exists()


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
        ("[storage]\nconcurrency = \"ten\"\n", 'storage.concurrency: expected an integer from 1 to 10000, got "ten"'),
        ("[storage]\nconcurency = 4\n", "unknown key storage.concurency (did you mean storage.concurrency?)"),
        ("[storage\n", "invalid TOML"),
    ],
)
def test_bad_config_exit_2_one_line(tmp_path: Path, toml: str, expected: str) -> None:
    """Malformed config: exit 2, one line naming the file and the key, no traceback."""
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    (tmp_path / "d.txt").write_text("https://127.0.0.1:1/x\n")
    res = run_cli("warm", str(tmp_path / "d.txt"), "--config", str(config))
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert str(config) in line and expected in line


def test_bad_flag_value_exit_2(tmp_path: Path) -> None:
    """A bad flag value is rejected like a bad config value, naming the flag."""
    res = run_cli("warm", "x.txt", "--concurrency", "0")
    assert res.returncode == 2
    assert "--concurrency: expected an integer from 1 to 10000, got 0" in _one_error_line(res.stderr)


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
        if Path(f"/tmp/bt_u{os.getuid()}").exists():
            pytest.skip(f"/tmp/bt_u{os.getuid()} exists on this machine")
        want = ["no credentials", "no bearer token", f"/tmp/bt_u{os.getuid()}", str(default)]
    else:
        args = ["warm", str(tmp_path / "d.txt"), "--proxy", str(pki.make_proxy(tmp_path / "p")),
                "--ca-dir", str(tmp_path / "no-cas")]
        want = [str(tmp_path / "no-cas"), "no such directory"]
    res = run_cli(*args, env=env)
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
        res = run_cli("warm", str(definition), "--proxy", str(foreign), "--ca-dir", str(pki.ca_dir))
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
    res = run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  "--config", str(config), "--concurrency", "4")
    assert res.returncode == 3
    line = _one_error_line(res.stderr)
    assert "denied 5 files in a row" in line and str(proxy) in line
    assert storage.stats.requests_total <= 5 + 4


@pytest.mark.parametrize("stage", ["auto", "never"])
def test_a_malformed_url_fails_alone(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                     tmp_path: Path, stage: str) -> None:
    """A list line whose authority no request can go to (port 99999, ``abc``, no host, a broken
    IPv6 literal, a host label over 63 characters) fails that file, "bad URL", and the rest are
    warmed: with ``--stage auto`` it used to crash the run with a traceback while asking the
    door's Tape REST discovery, warming nothing. Its password is not shown."""
    definition = _definition(tmp_path, storage, [f"/ok/{i}" for i in range(20)])
    bad = ["https://alice:S3cretPW@127.0.0.1:99999/x", "https://127.0.0.1:abc/y",
           "https:///nohost/z", "https://[zz::1/w", f"https://{'a' * 64}.invalid/u",
           "https://127.0.0.1:0/v"]
    with definition.open("a") as f:
        f.write("".join(u + "\n" for u in bad))
    res = run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  "--stage", stage, "--json", "--no-progress", "--state", str(tmp_path / "s.db"),
                  "--retries", "1")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "S3cretPW" not in res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["counts"]["warm"] == 20, doc["counts"]
    failures = {f["url"]: f["error"] for f in doc["failures"]}
    assert len(failures) == len(bad), failures
    assert [failures[redact(u)].startswith("bad URL") for u in bad] == [True] * 5 + [False]
    assert "Cannot connect to host 127.0.0.1:0" in failures["https://127.0.0.1:0/v"], failures


@pytest.mark.parametrize("stage", ["auto", "never"])
def test_secrets_in_list_urls_reach_no_output_nor_state(
        pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
        stage: str) -> None:
    """Passwords and token parameters in list URLs, wherever they sit (a query with no path,
    userinfo with no path or an empty last segment, a password holding an unescaped "?", "#"
    or "/"),
    show nowhere: not at debug level, not in ``--json``, not in the state's bytes. The door's
    query once reached the INFO log and ``--json`` (``endpoint_of`` kept it), and a URL with no
    path segment was stored whole as the file's name."""
    door = storage.url("/x")[: -len("/x")]
    secret = "C4nary"
    urls = [f"{door}?authz={secret}1", f"https://u:{secret}2@127.0.0.1:1/",
            f"https://u:{secret}3@127.0.0.1:1", f"https://127.0.0.1:1/d/?token={secret}4",
            f"https://u:{secret}5?x@127.0.0.1:1/f", f"https://u:{secret}6#x@127.0.0.1:1/f",
            f"https://u:{secret}7/x@127.0.0.1:1/f", storage.url("/ok")]
    definition = tmp_path / "list.txt"
    definition.write_text("".join(u + "\n" for u in urls))
    state = tmp_path / "state"
    state.mkdir()
    res = run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  "--stage", stage, "--json", "--no-progress", "--state", str(state / "s.db"),
                  "--retries", "1", "-v")
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["counts"]["warm"] == 2  # the door serves its root too
    assert secret not in res.stdout and secret not in res.stderr
    assert "DEBUG" in res.stderr  # the debug lines were there to look at
    for f in state.iterdir():
        assert secret.encode() not in f.read_bytes(), f.name


def test_a_url_with_a_user_and_a_bearer_token_fails_saying_why(pki: TestPKI,
                                                               tmp_path: Path) -> None:
    """A list URL with user:password@ while a bearer token is sent fails that file with a
    sentence saying what to drop (aiohttp's "Cannot combine AUTHORIZATION header with AUTH
    argument" before); the password is not shown."""
    from prestaged.testing.tokens import TokenIssuer, write_token

    token = write_token(tmp_path / "tok", TokenIssuer().mint("storage.read:/"))
    listed = tmp_path / "l.txt"
    listed.write_text("https://u:Pw0rdX@127.0.0.1:1/f\n")
    res = run_cli("warm", str(listed), "--token-file", str(token), "--ca-dir", str(pki.ca_dir),
                  "--auth", "token", "--no-state", "--json", "--stage", "never")
    assert "Pw0rdX" not in res.stdout + res.stderr
    (failure,) = json.loads(res.stdout)["failures"]
    assert failure["error"].startswith("bad URL: it names a user (user:password@) and a "
                                       "bearer token"), failure


def test_ctrl_c_stops_with_partial_summary_130(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                               tmp_path: Path) -> None:
    """SIGINT mid-run: clean stop, partial summary marked interrupted, exit 130."""
    paths = [f"/slow/{i}" for i in range(200)]
    for p in paths[10:]:
        storage.inject(p, [Delay(30)])
    definition = _definition(tmp_path, storage, paths)
    proc = subprocess.Popen(entry_point("warm", str(definition), "--proxy", str(proxy), "--ca-dir",
                                        str(pki.ca_dir), "--concurrency", "4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
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
    res = run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                  "--progress-interval", "0.1")
    assert res.returncode == 0
    assert re.search(r"progress: \d+/20 \(\d+%\) files, \d+ files/s, 0 failed", res.stderr)


@pytest.mark.parametrize("columns", [120, 0])
def test_progress_bar_on_a_terminal(pki: TestPKI, proxy: Path, storage: ThreadedStorageServer,
                                    tmp_path: Path, columns: int) -> None:
    """On a terminal, a live bar shows done/total and the rate (stderr on a real pty); on one
    that reports no size (a fresh pty, `script`: 0 x 0), 100 x 24 is assumed (it showed
    nothing: tqdm hides a bar on 0 rows, and shutil's fallback hid the 0)."""
    definition = _definition(tmp_path, storage, [f"/t/{i}" for i in range(300)])
    primary, secondary = pty.openpty()
    rows = 24 if columns else 0
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(entry_point("warm", str(definition), "--proxy", str(proxy), "--ca-dir",
                                        str(pki.ca_dir)),
                            stdout=subprocess.PIPE, stderr=secondary, text=True,
                            env=subprocess_env())
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
        run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "-v", "--json"),
        run_cli("warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "-v"),
        run_cli("proxy", "--proxy", str(proxy), "--json"),
        run_cli("warm", str(definition), "--proxy", str(pki.make_proxy(tmp_path / "e", expired=True))),
    ]
    secrets = _secrets(proxy)
    assert secrets
    for res in runs:
        for s in secrets:
            assert s not in res.stdout and s not in res.stderr
        assert "PRIVATE KEY" not in res.stdout + res.stderr


def test_proxy_command(pki: TestPKI, proxy: Path) -> None:
    """`prestaged proxy` shows DN, type and time left; --json for scripts; exit 3 if expired."""
    res = run_cli("proxy", "--proxy", str(proxy))
    assert res.returncode == 0
    assert pki.user_dn in res.stdout and "RFC 3820 proxy" in res.stdout
    assert re.search(r"timeleft\s+: 1[01]h\d\dm", res.stdout)
    doc = json.loads(run_cli("proxy", "--json", env={"X509_USER_PROXY": str(proxy)}).stdout)
    assert doc["identity"] == pki.user_dn and doc["source"] == "$X509_USER_PROXY"
    assert 11 * 3600 < doc["seconds_left"] <= 12 * 3600
    expired = run_cli("proxy", "--proxy", str(pki.make_proxy(proxy.parent / "old", expired=True)))
    assert expired.returncode == 3 and "expired" in _one_error_line(expired.stderr)


def test_console_entry_point_runs_for_real(tmp_path: Path) -> None:
    """python -m prestaged runs the CLI: --version, and a usage error's exit 2 and one line."""
    from prestaged import __version__

    def real(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(entry_point(*args), capture_output=True, text=True, timeout=TIMEOUT,
                              env=subprocess_env(), cwd=tmp_path, check=False)

    assert real("--version").stdout.strip() == f"prestaged {__version__}"
    res = real("warm", "x.txt", "--concurrency", "0")
    assert res.returncode == 2
    assert "--concurrency: expected an integer from 1 to 10000, got 0" in _one_error_line(res.stderr)


@pytest.mark.parametrize(("argv", "helped"), [
    (["warm", "x.txt", "--bogus"], "prestaged warm"),
    (["campaign", "add", "c.toml", "--state", "s.db"], "prestaged campaign add"),
    (["--bogus", "status"], "prestaged status"),
])
def test_an_unknown_argument_points_at_its_commands_help(
        argv: list[str], helped: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An argument the command does not take: exit 2, one line naming it and pointing at the
    help of that command, which lists its options (``prestaged --help`` does not)."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: " in err
    assert err.endswith(f"(see {helped} --help)\n"), err


def test_a_campaign_stage_given_to_campaign_run_is_told_apart_from_the_tape_mode(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--stage` is a campaign stage on `campaign hold/release/cancel` and the tape mode on
    `campaign run` (and warm, wait, submit): `campaign run c.toml --stage reco2` said only
    "invalid choice"; it says which --stage this is."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["campaign", "run", "c.toml", "--stage", "reco2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "'reco2' is no tape mode (auto, never, always): --stage here is how tape-only " \
           "files are brought to disk, not a campaign stage" in err, err
    assert build_parser().parse_args(["warm", "x", "--stage", "never"]).stage_mode == "never"


COMMANDS = ["warm", "files", "status", "history", "release", "forget", "wait", "submit", "campaign", "serve",
            "credentials", "proxy", "demo"]
CAMPAIGN_ACTIONS = ["run", "add", "list", "show", "hold", "release", "cancel", "mark-submitted",
                    "retry", "forget"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser`` by name ({} for a leaf command)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subs[0].choices) if subs else {}


def test_help_lists_every_command_and_every_option() -> None:
    """--help names every subcommand; each subcommand's --help exits 0 and lists all its options."""
    top = run_cli("--help")
    assert top.returncode == 0
    for name in COMMANDS:
        # An alias is listed with its command: "credentials (proxy)".
        assert re.search(rf"^\s+(\S+ \()?{name}\)?\s", top.stdout, re.M), f"{name} missing"
    commands = _subcommands(build_parser())
    assert sorted(commands) == sorted(COMMANDS)
    assert sorted(_subcommands(commands["campaign"])) == sorted(CAMPAIGN_ACTIONS)
    leaves = [[n] for n in COMMANDS if n not in ("campaign", "proxy")] + [
        ["campaign", a] for a in CAMPAIGN_ACTIONS]
    for argv in [["campaign"], *leaves]:
        res = run_cli(*argv, "--help")
        assert res.returncode == 0, (argv, res.stderr)
        assert res.stdout.startswith(f"usage: prestaged {' '.join(argv)}"), argv
        if argv != ["campaign"]:  # every command takes the common options
            assert all(flag in res.stdout for flag in ("--config", "--verbose", "--quiet")), argv
        parser = commands[argv[0]] if len(argv) == 1 else _subcommands(commands[argv[0]])[argv[1]]
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in res.stdout, f"{' '.join(argv)} --help does not list {flag}"


def test_demo_runs_end_to_end() -> None:
    """`prestaged demo` starts its own storage, warms every file and exits 0."""
    res = run_cli("demo", "--files", "300")
    assert res.returncode == 0, res.stderr
    assert re.search(r"warm\s+300\b", res.stdout)
    assert "the storage saw 300 requests and sent 1200 bytes" in res.stdout


def test_tape_demo_stages_the_cold_dataset_and_never_gets_a_tape_file() -> None:
    """`prestaged demo --tape`: the emulated dCache's tape-only files are staged in bulk and
    touched, the lost one fails (exit 1), and the door never saw a GET of a tape-only file."""
    res = run_cli("demo", "--tape", "--files", "200")
    assert res.returncode == 1, res.stderr
    assert re.search(r"warm\s+199\b", res.stdout) and re.search(r"failed\s+1\b", res.stdout)
    assert "staged         139 warm from tape (139 requested, 139 reached disk)" in res.stdout
    assert re.search(r"\b1 stage requests, \d+ tape mounts, 139 recalls, and 0 GETs of a "
                     r"tape-only file at its door", res.stdout), res.stdout
