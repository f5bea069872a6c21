"""``prestaged wait`` and ``prestaged submit``: the gate end to end against real storage.

In-process (``run_cli``) unless a submitted command runs (it inherits our stdin, stdout and
working directory: a real ``python -m prestaged``) or a signal is what is tested.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from cli_runner import CliResult, entry_point, run_cli, subprocess_env
from conftest import Backend
from daemon_harness import state_files

from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, Status, ThreadedStorageServer

TIMEOUT = 60

# Records its argv, environment and start time (CLOCK_MONOTONIC, shared by every process on the
# machine, so comparable with the storage's arrival times), says hello, exits $GATE_EXIT.
FAKE_SUBMIT = """\
import json, os, sys, time
start = time.monotonic()
with open(os.environ["GATE_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "start": start,
               "cwd": os.getcwd(), "stdin": sys.stdin.read()}, f)
print("hello from the submit command")
sys.exit(int(os.environ.get("GATE_EXIT", "0")))
"""


@pytest.fixture
def fake_submit(tmp_path: Path) -> Path:
    """The fake submit script (see ``FAKE_SUBMIT``)."""
    script = tmp_path / "fake_submit.py"
    script.write_text(FAKE_SUBMIT)
    return script


def _definition(tmp_path: Path, srv: ThreadedStorageServer, paths: list[str],
                name: str = "dataset.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(srv.url(p) + "\n" for p in paths))
    return path


def _argv(pki: TestPKI, proxy: Path, tmp_path: Path, args: tuple[str, ...],
          backend: Optional[Backend] = None) -> list[str]:
    """``args`` with the test proxy and ``backend``'s state (default: a state file in
    tmp_path), before any ``--``."""
    state = backend.cli() if backend is not None else ["--state", str(tmp_path / "state.db")]
    ours = ["--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), *state]
    i = args.index("--") if "--" in args else len(args)  # the gate's flags go before the --
    return [*args[:i], *ours, *args[i:]]


def _prestaged(pki: TestPKI, proxy: Path, tmp_path: Path, *args: str,
               backend: Optional[Backend] = None) -> CliResult:
    """``prestaged ARGS`` in-process with the test proxy and ``backend``'s state (default: a
    state file in tmp_path); on PostgreSQL no state file may appear."""
    res = run_cli(*_argv(pki, proxy, tmp_path, args, backend),
                  env={"GATE_RECORD": str(tmp_path / "record.json")})
    assert "Traceback" not in res.stderr, res.stderr
    if backend is not None and backend.url is not None:
        assert state_files(tmp_path) == []
    return res


def _process(pki: TestPKI, proxy: Path, tmp_path: Path, *args: str,
             extra_env: dict[str, str] | None = None,
             stdin: str = "") -> subprocess.CompletedProcess[str]:
    """A real ``python -m prestaged ARGS`` (in tmp_path, fed ``stdin``), for a submitted
    command that inherits our stdin, stdout and working directory."""
    env = subprocess_env({"GATE_RECORD": str(tmp_path / "record.json"), **(extra_env or {})})
    res = subprocess.run(entry_point(*_argv(pki, proxy, tmp_path, args)), input=stdin,
                         capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path,
                         check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def _error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_submit_starts_only_after_the_last_file_is_warm(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, fake_submit: Path
) -> None:
    """The command starts after every file's touch finished, gets argv, env and stdin, exit 0."""
    paths = [f"/pnfs/gate/f{i}" for i in range(8)]
    delays = {paths[2]: 0.8, paths[5]: 1.2}
    for p, seconds in delays.items():
        storage.inject(p, [Delay(seconds)])
    definition = _definition(tmp_path, storage, paths)
    res = _process(pki, proxy, tmp_path, "submit", "--definition", str(definition), "--",
                   sys.executable, str(fake_submit), "-c", "reco2.cfg", "--stage", "reco2",
                   extra_env={"GATE_MARK": "passed through"}, stdin="from stdin\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from the submit command\n"
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["argv"] == ["-c", "reco2.cfg", "--stage", "reco2"]
    assert record["env"]["GATE_MARK"] == "passed through" and record["stdin"] == "from stdin\n"
    # A response ends no earlier than its arrival plus the injected delay.
    done = [storage.stats.path(p).times[0] + delays.get(p, 0.0) for p in paths]
    assert all(len(storage.stats.path(p).times) == 1 for p in paths)
    assert record["start"] >= max(done)


@pytest.mark.slow
def test_gate_timeout_never_runs_the_command(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, fake_submit: Path
) -> None:
    """A file that stays missing with --ready 1.0: exit 1 at the timeout, command not run."""
    paths = [f"/pnfs/gate/f{i}" for i in range(4)]
    storage.remove(paths[1])
    definition = _definition(tmp_path, storage, paths)
    started = time.monotonic()
    res = _prestaged(pki, proxy, tmp_path, "submit", "--definition", str(definition),
                     "--timeout", "2s", "--", sys.executable, str(fake_submit))
    elapsed = time.monotonic() - started
    assert res.returncode == 1
    assert not (tmp_path / "record.json").exists()
    line = _error_line(res.stderr)
    assert "3/4 files warm" in line and f"1 cold: {storage.url(paths[1])}" in line
    assert "not ready within 2s" in line and "not running" in line
    assert 2.0 <= elapsed < 15
    assert res.stdout == ""


def test_credential_failure_never_runs_the_command(
    pki: TestPKI, storage: ThreadedStorageServer, tmp_path: Path, fake_submit: Path
) -> None:
    """An unusable proxy fails the gate with exit 3 before anything is touched or run."""
    definition = _definition(tmp_path, storage, ["/pnfs/gate/a"])
    res = _prestaged(pki, tmp_path / "no-such-proxy", tmp_path, "submit", "--definition",
                     str(definition), "--", sys.executable, str(fake_submit))
    assert res.returncode == 3
    assert not (tmp_path / "record.json").exists()
    assert storage.stats.requests_total == 0


def test_a_run_the_storage_stopped_is_tried_again_until_the_timeout(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """A warm run stopped by the storage (exit 5: here --stage always and a discovery document
    that cannot be read) ended the gate at once, and a campaign failed its slice for good on
    storage trouble that passes. It is tried again as cold files are: the gate passes on the
    next run; a storage that stops every run ends the gate at its timeout with exit 5 naming
    the stop. (Credentials, exit 3, still end it at once: the test above.)"""
    from prestaged.testing.dcache import DCacheConfig, Locality, ThreadedDCache

    config = tmp_path / "quick.toml"
    config.write_text('[storage]\npoll_min = "20ms"\npoll_max = "100ms"\n')
    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig()) as srv:
        for name in ("a", "b"):
            srv.add_file(f"/pnfs/g/{name}", 10, Locality.TAPE)
            (tmp_path / f"{name}.txt").write_text(srv.door_url(f"/pnfs/g/{name}") + "\n")
        srv.fail("discovery", "garbage")
        res = _prestaged(pki, proxy, tmp_path, "wait", str(tmp_path / "a.txt"), "--stage",
                         "always", "--retry-every", "0.1s", "--timeout", "60s", "--json",
                         "--config", str(config))
        assert res.returncode == 0, res.stderr
        # The second run staged the file; a third saw it still on disk before passing.
        assert json.loads(res.stdout)["runs"] == 3 and srv.replica("/pnfs/g/a").on_disk
        srv.fail("discovery", "garbage", count=1000)
        res = _prestaged(pki, proxy, tmp_path, "wait", str(tmp_path / "b.txt"), "--stage",
                         "always", "--retry-every", "0.1s", "--timeout", "1s", "--config",
                         str(config))
        assert res.returncode == 5, res.stderr
        line = _error_line(res.stderr)
        assert "not ready within 1s; the last warm run was stopped: " in line
        assert "the answer is not JSON (storage.stage = always)" in line


def test_stage_always_on_a_door_without_the_api_ends_the_gate_at_once(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """--stage always on a door that says it has no Tape REST API (no discovery document) is
    not storage trouble that passes: the gate ends after its first run with exit 5 naming the
    door, not at its timeout after asking again and again."""
    from prestaged.testing.dcache import DCacheConfig, Locality, ThreadedDCache

    with ThreadedDCache(pki.server_ssl_context(), pki.pool_ssl_context(),
                        DCacheConfig(discovery=False)) as srv:
        srv.add_file("/pnfs/g/a", 10, Locality.TAPE)
        (tmp_path / "a.txt").write_text(srv.door_url("/pnfs/g/a") + "\n")
        res = _prestaged(pki, proxy, tmp_path, "wait", str(tmp_path / "a.txt"), "--stage",
                         "always", "--retry-every", "0.1s", "--timeout", "20s", "--json")
        assert res.returncode == 5, res.stderr
        assert "publishes no WLCG Tape REST API" in _error_line(res.stderr)
        assert json.loads(res.stdout)["runs"] == 1


def test_submit_returns_the_command_exit_code(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, fake_submit: Path
) -> None:
    """prestaged submit exits with the command's own exit code."""
    definition = _definition(tmp_path, storage, ["/pnfs/gate/a", "/pnfs/gate/b"])
    res = _process(pki, proxy, tmp_path, "submit", "--definition", str(definition), "--",
                   sys.executable, str(fake_submit), extra_env={"GATE_EXIT": "7"})
    assert res.returncode == 7
    assert (tmp_path / "record.json").exists()


_WAITS_FOR_A_SIGNAL = """
import pathlib, signal, sys
got, started = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def stop(signum, frame):
    got.write_text(signal.Signals(signum).name)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGHUP, stop)
started.write_text("waiting")
while True:
    signal.pause()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_submit_is_passed_on_to_its_command(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """SIGTERM or SIGHUP to ``prestaged submit`` while its command runs reaches the command,
    whose exit is prestaged's. A SIGHUP (a closed terminal or ssh session) killed prestaged
    and left the command running alone."""
    definition = _definition(tmp_path, storage, ["/pnfs/gate/a"])
    got, started = tmp_path / "got", tmp_path / "started"
    argv = _argv(pki, proxy, tmp_path, ("submit", "--definition", str(definition), "--",
                                        sys.executable, "-c", _WAITS_FOR_A_SIGNAL, str(got),
                                        str(started)))
    proc = subprocess.Popen(entry_point(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert got.read_text() == sig.name
    assert proc.returncode == 128 + sig and "Traceback" not in err, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_just_before_the_command_starts_is_passed_on_once_it_has(
    monkeypatch: pytest.MonkeyPatch, sig: signal.Signals,
) -> None:
    """A SIGTERM or SIGHUP that arrives after the forwarders are in place but before the
    command exists is held and sent to the command as soon as it starts (it was lost, and the
    command ran on alone); the handlers are as before once ``run_command`` returns."""
    from prestaged import gate

    real_popen = subprocess.Popen

    def signalled_then_popen(args: list[str]) -> subprocess.Popen[bytes]:
        signal.raise_signal(sig)  # the handler runs here, before the command exists
        return real_popen(args)

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    monkeypatch.setattr(gate.subprocess, "Popen", signalled_then_popen)
    # Ends by itself after TIMEOUT: without the held signal the test fails, it does not hang.
    code = gate.run_command([sys.executable, "-c", f"import time; time.sleep({TIMEOUT})"])
    assert code == 128 + sig
    assert {s: signal.getsignal(s) for s in before} == before


def test_under_nohup_submit_passes_no_sighup_on(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
) -> None:
    """Under ``nohup`` (SIGHUP ignored on entry) ``submit`` leaves SIGHUP ignored for itself
    and its command: a hangup reaches neither, and a SIGTERM afterwards is still passed on."""
    definition = _definition(tmp_path, storage, ["/pnfs/gate/a"])
    got, started = tmp_path / "got", tmp_path / "started"
    argv = _argv(pki, proxy, tmp_path, ("submit", "--definition", str(definition), "--",
                                        sys.executable, "-c", _WAITS_FOR_A_SIGNAL, str(got),
                                        str(started)))
    proc = subprocess.Popen(["nohup", *entry_point(*argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.01)
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)  # comes after the hangup: it alone is passed on
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert got.read_text() == "SIGTERM"
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err


def test_shell_metacharacters_are_passed_verbatim(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, fake_submit: Path
) -> None:
    """Arguments and definition names with shell syntax reach the command verbatim, unexecuted."""
    definition = _definition(tmp_path, storage, ["/pnfs/gate/a"],
                             name="my ds; touch pwned-def $(touch pwned-sub).txt")
    argv = ["$(touch pwned)", "; rm -rf x; touch pwned-semi", "`touch pwned-tick`", "a b",
            "|| touch pwned-or", str(definition)]
    (tmp_path / "x").mkdir()
    res = _process(pki, proxy, tmp_path, "submit", "--definition", str(definition), "--",
                   sys.executable, str(fake_submit), *argv)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "record.json").read_text())["argv"] == argv
    assert not list(tmp_path.glob("pwned*")) and (tmp_path / "x").is_dir()


def test_wait_exit_0_when_warm_and_no_requests_while_fresh(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    backend: Backend,
) -> None:
    """wait warms a cold definition (exit 0); a second call within fresh_for touches nothing
    (the state, of either backend, knows the files as fresh)."""
    paths = [f"/pnfs/gate/f{i}" for i in range(5)]
    definition = _definition(tmp_path, storage, paths)
    res = _prestaged(pki, proxy, tmp_path, "wait", str(definition), backend=backend)
    assert res.returncode == 0, res.stderr
    assert "5/5 files warm" in res.stdout and "ready" in res.stdout
    assert storage.stats.requests_total == 5
    res = _prestaged(pki, proxy, tmp_path, "wait", str(definition), "--json", backend=backend)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["passed"] and doc["fresh"] == doc["files"] == 5 and doc["runs"] == 1
    assert storage.stats.requests_total == 5


def test_wait_ready_fraction_and_timeout_message(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """--ready 0.6 passes with 2 of 3 warm; --ready 1.0 times out with exit 1 naming the cold file."""
    paths = ["/pnfs/gate/a", "/pnfs/gate/b", "/pnfs/gate/c"]
    storage.remove(paths[2])
    definition = _definition(tmp_path, storage, paths)
    res = _prestaged(pki, proxy, tmp_path, "wait", str(definition), "--ready", "0.6")
    assert res.returncode == 0, res.stderr
    res = _prestaged(pki, proxy, tmp_path, "wait", str(definition), "--timeout", "1s", "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert doc["cold"] == [storage.url(paths[2])] and doc["cold_count"] == 1
    assert doc["runs"] >= 1 and not doc["passed"]
    line = _error_line(res.stderr)
    assert "2/3 files warm" in line and "need 100.0%" in line and storage.url(paths[2]) in line


def test_cold_urls(backend: Backend) -> None:
    """cold_urls lists never-tried, failed and stale members, never the fresh ones."""
    from prestaged.model import FileRef

    with backend.store() as store:
        refs = [FileRef(n, f"https://h/{n}") for n in "abcd"]
        store.add_members("local", "ds", refs)
        store.record("https://h/a", "a", "warm", 206, 4, 1, "")
        store.record("https://h/b", "b", "missing", 404, 0, 1, "HTTP 404")
        store.record("https://h/c", "c", "warm", 206, 4, 1, "", when=time.time() - 7200)
        store.flush()
        assert store.cold_urls("local", "ds", 3600) == ["https://h/b", "https://h/c",
                                                        "https://h/d"]
        assert store.cold_urls("local", "ds", 3600, limit=1) == ["https://h/b"]
        assert store.cold_urls("local", "other", 3600) == []


def test_wait_retries_the_cold_files(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path,
    backend: Backend,
) -> None:
    """A file that is missing at first is retried by a second run; warm files are not touched
    again (the cold list comes from the state, of either backend)."""
    paths = [f"/pnfs/gate/f{i}" for i in range(4)]
    storage.inject(paths[3], [Status(404)])
    definition = _definition(tmp_path, storage, paths)
    res = _prestaged(pki, proxy, tmp_path, "wait", str(definition), "--retry-every", "0.2s",
                     "--timeout", "20s", "--json", backend=backend)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["runs"] == 2 and doc["fresh"] == 4
    assert [len(storage.stats.path(p).times) for p in paths] == [1, 1, 1, 2]


def test_wait_interrupted_exit_130(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """Ctrl-C during the gate's warm run ends it at once with exit 130."""
    storage.inject("/pnfs/gate/slow", [Delay(30)])
    definition = _definition(tmp_path, storage, ["/pnfs/gate/slow"])
    proc = subprocess.Popen(entry_point(*_argv(pki, proxy, tmp_path, ("wait", str(definition)))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        storage.wait_until(lambda s: s.active_requests >= 1, timeout=TIMEOUT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in _error_line(err) and "Traceback" not in err


def test_wait_stopped_by_sigterm_twice_still_prints_its_summary(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """SIGTERM twice (to the pid and to its group: ``timeout``, ``kill -- -PGID``) is one clean
    stop: exit 130 with the partial summary. The second used to abort at once, losing the
    summary and sometimes printing a traceback from uvloop's shutdown."""
    storage.inject("/pnfs/gate/gone", [Status(404)])
    definition = _definition(tmp_path, storage, ["/pnfs/gate/gone"])
    argv = _argv(pki, proxy, tmp_path, ("wait", str(definition), "--retry-every", "60s"))
    proc = subprocess.Popen(entry_point(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    try:
        assert proc.stderr is not None
        seen = []
        while not seen or "next try in" not in seen[-1]:  # between runs: where it aborted
            seen.append(proc.stderr.readline())
            assert seen[-1], seen
        proc.send_signal(signal.SIGTERM)
        while "interrupted: stopping" not in seen[-1]:  # the first was taken: now the second
            seen.append(proc.stderr.readline())
            assert seen[-1], seen
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    line = _error_line(err)
    assert "0/1 files warm" in line and "interrupted" in line, err


@pytest.mark.parametrize(("args", "expected"), [
    (["--ready", "1.5"], "--ready: expected a fraction in (0, 1]"),
    (["--timeout", "soon"], "--timeout: expected a duration"),
])
def test_bad_gate_flags_exit_2(pki: TestPKI, proxy: Path, tmp_path: Path, args: list[str],
                               expected: str) -> None:
    """A bad --ready or --timeout is a usage error (exit 2, one line) before anything runs."""
    (tmp_path / "d.txt").write_text("https://127.0.0.1:1/x\n")
    res = _prestaged(pki, proxy, tmp_path, "wait", str(tmp_path / "d.txt"), *args)
    assert res.returncode == 2
    assert expected in _error_line(res.stderr)
