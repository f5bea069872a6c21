"""Submit and complete commands end by their exit status, not by their output pipe closing;
their output is bounded; a timeout or a signal is reported as such, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from campaign_fakes import LOOPS, reaped, run_on

from prestaged.campaign.commands import TAIL, CommandResult, _Capture, _kill, run_argv
from prestaged.testing.pki import TestPKI

# Prints a job id, leaves `sleep 60` in the background holding stdout (as jobsub and condor
# tools do), writes its pid to $1 and exits 0.
LINGERING_SUBMIT = """\
echo "JobsubJobId of first job: 7.0@test"
sleep 60 &
echo $! > "$1"
exit 0
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_exit_decides_even_while_a_child_holds_stdout(tmp_path: Path, loop: str) -> None:
    """A command that exits 0 with a child on its stdout is done at its exit, output kept."""
    script = tmp_path / "submit.sh"
    script.write_text(LINGERING_SUBMIT)
    start = time.monotonic()
    with reaped(tmp_path / "child.pid"):
        res = run_on(loop, lambda: run_argv(["sh", str(script), str(tmp_path / "child.pid")],
                                            timeout=20))
        elapsed = time.monotonic() - start
    assert (res.exit_code, res.error, res.may_have_run) == (0, None, False)
    assert "JobsubJobId of first job: 7.0@test" in res.output_tail
    assert elapsed < 5, f"waited {elapsed:.1f}s for the child's pipe"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_timeout_kills_and_says_so(loop: str) -> None:
    """Still running at the timeout: SIGKILLed, exit 124, "may have run", said in the error."""
    start = time.monotonic()
    res = run_on(loop, lambda: run_argv(["sh", "-c", "echo begun; exec sleep 60"],
                                        timeout=0.3))
    assert time.monotonic() - start < 5
    assert (res.exit_code, res.signal, res.timed_out) == (124, signal.SIGKILL, True)
    assert res.may_have_run and res.output_tail == "begun\n"
    assert res.describe("sh") == "sh was still running after 0.3s and was killed"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_signal_from_elsewhere_is_reported(loop: str) -> None:
    """A command killed by someone else's signal: 128 + N, named, "may have run"."""
    res = run_on(loop, lambda: run_argv(["sh", "-c", "echo begun; kill -TERM $$"], timeout=20))
    assert (res.exit_code, res.signal, res.timed_out) == (143, signal.SIGTERM, False)
    assert res.may_have_run and res.output_tail == "begun\n"
    assert res.describe("sh") == "sh was killed by SIGTERM"


def test_exit_codes_and_start_failures_did_not_run() -> None:
    """An exit of its own or a command that cannot start: no signal, nothing "may have run"."""
    res = run_on("asyncio", lambda: run_argv(["sh", "-c", "exit 3"], timeout=20))
    assert (res.exit_code, res.may_have_run, res.describe("sh")) == (3, False, "sh exited 3")
    res = run_on("asyncio", lambda: run_argv([str(Path("/nonexistent/submit"))], timeout=20))
    assert res.exit_code == 127 and not res.may_have_run and "cannot run" in str(res.error)


def test_output_is_kept_to_its_tail() -> None:
    """100 kB of output keeps its last TAIL characters, multi-byte characters intact."""
    code = "import sys; sys.stdout.write('é' * 50000 + 'x' * 3 + '\\n')"
    res = run_on("asyncio", lambda: run_argv([sys.executable, "-c", code], timeout=20))
    assert res.exit_code == 0
    assert res.output_tail == ("é" * (TAIL - 4) + "xxx\n")


@pytest.mark.parametrize("loop", LOOPS)
def test_killing_a_process_that_already_exited_is_no_error(loop: str) -> None:
    """The timeout and the exit may cross: a kill that finds no process is not an error."""

    async def main() -> CommandResult:
        capture = _Capture(TAIL)
        transport, _ = await asyncio.get_running_loop().subprocess_exec(
            lambda: capture, "true", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        await capture.exited.wait()
        _kill(transport)
        transport.close()
        _kill(transport)
        return CommandResult(transport.get_returncode() or 0, capture.tail())

    assert run_on(loop, main).exit_code == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_command_runs_in_a_session_of_its_own(loop: str) -> None:
    """A submit command is out of prestaged's process group and session, so a SIGTERM to the
    group (systemd's stop, timeout, kill -- -PGID) never reaches it (issue 12, 7)."""
    res = run_on(loop, lambda: run_argv(
        [sys.executable, "-c", "import os; print(os.getpgid(0), os.getsid(0))"], timeout=20))
    pgid, sid = (int(x) for x in res.output_tail.split())
    assert pgid != os.getpgid(0) and sid != os.getsid(0)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_nul_in_an_argument_does_not_run(loop: str) -> None:
    """asyncio raised ValueError (a traceback, the submission left in ``submitting``); uvloop
    ran the command with the argument cut at the NUL. Neither runs it: exit 126, said."""
    res = run_on(loop, lambda: run_argv(["echo", "a\0b"], timeout=20))
    assert (res.exit_code, res.may_have_run) == (126, False)
    assert res.describe("echo") == "echo: cannot run: an argument holds a NUL character"


def test_credentials_a_command_prints_are_redacted_in_its_tail() -> None:
    """The tail is kept in the state and shown with the token: a URL with a password or an
    ``authz=`` a submit tool prints is redacted there as everywhere else (it was kept whole)."""
    res = run_on("asyncio", lambda: run_argv(
        ["echo", "https://u:CANARYPW@h/x?authz=CANARYAUTHZ JobsubJobId of first job: 1.0@s"],
        timeout=20))
    assert res.output_tail == "https://***@h/x?authz=*** JobsubJobId of first job: 1.0@s\n"


def test_commands_do_not_get_the_state_databases_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Submit and complete commands inherited the daemon's whole environment, PGPASSWORD
    included (the state database's password, no business of jobsub's); grid credentials
    still pass."""
    monkeypatch.setenv("PGPASSWORD", "CANARYPG10")
    monkeypatch.setenv("BEARER_TOKEN_FILE", "/run/user/1/bt_u1")
    res = run_on("asyncio", lambda: run_argv(
        ["sh", "-c", 'echo "[${PGPASSWORD-unset}] [$BEARER_TOKEN_FILE]"'], timeout=20))
    assert res.output_tail == "[unset] [/run/user/1/bt_u1]\n"


def test_a_proxy_a_command_prints_is_kept_without_its_key(pki: TestPKI, tmp_path: Path) -> None:
    """A submit command printing the proxy file (a debugging cat, set -x) had its private key
    kept in the output tail, which the state stores and the API answers."""
    proxy = pki.make_proxy(tmp_path / "x509up")
    key = proxy.read_text().split("-----BEGIN PRIVATE KEY-----")[1].split("-----END")[0]
    res = run_on("asyncio", lambda: run_argv(["cat", str(proxy)], timeout=20))
    leaked = [line for line in key.split() if len(line) >= 40 and line in res.output_tail]
    assert not leaked, f"{len(leaked)} lines of the private key kept"
    assert res.exit_code == 0 and "-----BEGIN CERTIFICATE-----" in res.output_tail
