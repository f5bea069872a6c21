"""``prestaged demo`` stopped at any point: exit 130, no traceback from it or its servers, no
server left running, no temporary directory (with the test PKI's private keys) left behind; and
its bad ``--files`` is one line, exit 2.

Each demo runs as a real process in a session of its own (so that signalling its process group
is what Ctrl-C at a terminal does), with ``TMPDIR`` in the test's ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable, Optional

import psutil
import pytest
from cli_runner import entry_point, run_cli, subprocess_env

from prestaged import runtime

DEADLINE = 60.0
"""Seconds any one wait of these tests may take before it fails (they take about one)."""


class DemoProcess:
    """``python -m prestaged demo ARGS...`` with its output collected by threads (read as it
    comes, so a server left holding the pipes open cannot hang the test) and every process it
    starts remembered, to check and to kill at the end."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        env = subprocess_env({"TMPDIR": str(self.tmpdir), "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen(entry_point("demo", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [self._reader(self.proc.stdout, self.out, self.lines),
                        self._reader(self.proc.stderr, self.err, None)]

    @staticmethod
    def _reader(pipe: IO[str], into: list[str], lines: Optional[queue.Queue[str]]
                ) -> threading.Thread:
        def read() -> None:
            for line in pipe:
                into.append(line)
                if lines is not None:
                    lines.put(line)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def _children(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        return list(self.seen.values())

    def wait_for_child(self, module: str) -> None:
        """Until a process running ``python -m MODULE`` started by the demo is importing its
        libraries: it has loaded a C extension from site-packages (aiohttp's, cryptography's),
        so Python's own SIGINT handler is in place and the server's is not yet."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            for child in self._children():
                with contextlib.suppress(psutil.Error):
                    if module in child.cmdline() and any(
                            "site-packages" in m.path for m in child.memory_maps()):
                        return
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.01)
        pytest.fail(f"the demo started no {module} in {DEADLINE:.0f} s")

    def wait_for_line(self, start: str) -> None:
        """Until the demo prints a line starting with ``start``."""
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the demo printed no {start!r} line: {''.join(self.err)}")
            if line.startswith(start):
                return

    def signal(self, signum: int, *, group: bool) -> None:
        """Send ``signum`` to the demo's process group (Ctrl-C at a terminal) or to it alone."""
        self._children()
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def finish(self) -> tuple[int, str, str]:
        """The demo's exit code, stdout and stderr once it and its readers are done."""
        try:
            code = self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit in {DEADLINE:.0f} s: {''.join(self.err)}")
        for thread in self.readers:
            # Only a server the demo left behind holds the pipes open after it exited.
            thread.join(timeout=10)
            assert not thread.is_alive(), f"a server kept the demo's output open: {self.left()}"
        return code, "".join(self.out), "".join(self.err)

    def left(self) -> list[str]:
        """Processes the demo started that still run, after a grace period for them to go."""
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=5)
        running = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    running.append(" ".join(proc.cmdline()))
        return running

    def kill_all(self) -> None:
        """Kill whatever is still running (a failed test's leftovers)."""
        self.proc.kill()  # nothing once it has been waited for
        self.proc.wait(timeout=DEADLINE)
        for proc in self.seen.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[..., DemoProcess]]:
    """``start_demo(ARGS...)``: a ``DemoProcess``; killed with its servers at teardown."""
    started: list[DemoProcess] = []

    def start(*args: str) -> DemoProcess:
        started.append(DemoProcess(tmp_path, *args))
        return started[-1]

    yield start
    for proc in started:
        proc.kill_all()


def _assert_stopped_cleanly(run: DemoProcess) -> str:
    """Exit 130, no traceback, no server left, no temporary directory left; the stdout."""
    code, out, err = run.finish()
    assert "Traceback" not in err + out, err
    assert code == 130, err
    assert "prestaged: interrupted" in err or "interrupted" in out, err
    assert run.seen, "no server process was seen: the signal came too late to test anything"
    assert not run.left()
    assert not list(run.tmpdir.glob("prestaged-demo-*"))
    return out


@pytest.mark.parametrize(("signum", "group"), [
    (signal.SIGINT, True), (signal.SIGINT, False), (signal.SIGTERM, False),
    (signal.SIGHUP, False)], ids=["ctrl-c", "sigint-to-demo", "sigterm-to-demo", "sighup-to-demo"])
def test_stopped_while_starting_its_emulators(start_demo: Callable[..., DemoProcess],
                                              signum: int, group: bool) -> None:
    """A signal while the MetaCat emulator starts (the demo waits for its first line): every
    server is stopped and reaped, the directory with the private keys removed, exit 130. The
    emulators used to print KeyboardInterrupt (Ctrl-C), BrokenPipeError and FileNotFoundError
    tracebacks (SIGINT to the demo alone), one to keep running and to recreate the PKI
    directory; SIGTERM and SIGHUP killed the demo with no clean-up at all."""
    run = start_demo("--catalog", "metacat", "--files", "20")
    run.wait_for_child("prestaged.testing.metacat")
    run.signal(signum, group=group)
    _assert_stopped_cleanly(run)


def test_tape_demo_terminated_while_its_dcache_starts(start_demo: Callable[..., DemoProcess]
                                                     ) -> None:
    """``demo --tape``: SIGTERM while the dCache emulator starts stops and reaps it and removes
    the directory too (the demo used to die at once, leaving both)."""
    run = start_demo("--tape", "--files", "20")
    run.wait_for_child("prestaged.testing.dcache")
    run.signal(signal.SIGTERM, group=False)
    _assert_stopped_cleanly(run)


def test_ctrl_c_during_the_warm(start_demo: Callable[..., DemoProcess]) -> None:
    """Ctrl-C once the warm starts: the warm stops with its partial summary while the storage
    still answers (Ctrl-C reaches the demo, not its servers), then all is cleaned up, 130."""
    run = start_demo("--files", "20000")
    run.wait_for_line("demo: definition")
    run.signal(signal.SIGINT, group=True)
    _assert_stopped_cleanly(run)


def _read_until(fd: int, marker: bytes) -> bytes:
    """What ``fd`` gives until ``marker`` is in it (fails after ``DEADLINE`` s or at EOF)."""
    data = b""
    deadline = time.monotonic() + DEADLINE
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {DEADLINE:.0f} s"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {marker!r}: {data[-2000:]!r}"
            data += chunk
    return data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_ctrl_c_while_importing_exits_130_quietly(how: str) -> None:
    """Ctrl-C in the first ~150 ms, while ``prestaged.cli`` is still being imported: exit 130,
    one line, no KeyboardInterrupt traceback. Deterministic: with ``python -v`` the import
    writes one line per module to a 4 KiB stderr pipe, so once ``prestaged/cli/main.py`` is
    announced the process blocks in that import until the test reads on."""
    import fcntl

    script = Path(sys.executable).with_name("prestaged")
    if how == "console-script" and not script.is_file():
        pytest.skip(f"no console script next to {sys.executable}")
    argv = [str(script), "--version"] if how == "console-script" else entry_point("--version")
    read, write = os.pipe()
    fcntl.fcntl(write, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=write,
                            env=subprocess_env({"PYTHONVERBOSE": "1"}))
    os.close(write)
    try:
        err = _read_until(read, f"prestaged{os.sep}cli{os.sep}main".encode())
        proc.send_signal(signal.SIGINT)
        with os.fdopen(read, "rb") as rest:
            err += rest.read()  # EOF once the process exited (a bounded import)
        code = proc.wait(timeout=DEADLINE)
    finally:
        proc.kill()
    text = err.decode(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert code == 130, text[-3000:]
    assert "prestaged: interrupted" in text


@pytest.mark.parametrize("args", [["--files", "-5"], ["--files", "0"],
                                  ["--tape", "--files", "0"]])
def test_files_out_of_range_is_one_line_exit_2(args: list[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``demo --files -5`` (or 0) is refused in one line naming --files, exit 2, before any
    PKI or server is made; it used to run a demo "with -5 files" and exit 0."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = run_cli("demo", *args)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"prestaged: error: --files: expected an integer from 1 to 100000, got {args[-1]}"]
    assert res.stdout == ""
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_the_stop_signals_handlers_are_as_before_once_a_run_returns(
        loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed uvloop loop leaves its own SIGTERM handler behind, which ignores the signal:
    ``runtime.run`` puts back what SIGINT, SIGTERM and SIGHUP had (here the demo's
    KeyboardInterrupt), so being stopped after a warm still stops the demo and cleans up."""
    monkeypatch.setenv("PRESTAGED_EVENT_LOOP", loop)
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in stops}

    async def run() -> int:
        runtime.install_interrupt(asyncio.Event())
        return 0

    try:
        for sig in stops:
            signal.signal(sig, signal.default_int_handler)
        assert runtime.run(run()) == 0
        assert all(signal.getsignal(sig) is signal.default_int_handler for sig in stops)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
