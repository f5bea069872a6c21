"""Running a campaign's ``submit`` and ``complete`` commands: argv lists (never a shell), stdin
from /dev/null, output captured and kept to its tail, bounded in time.

How a command ended is decided by its exit status, never by its output pipe closing: grid
submit tools (jobsub, condor) exit 0 after printing the job id but leave a background child
that still holds stdout. Output is read until the pipe closes or ``drain`` seconds after the
exit, whichever comes first, and only its last ``TAIL`` characters are kept, so a chatty or
lingering command costs bounded memory and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from prestaged.model import printable, redact, scrub

__all__ = ["DRAIN", "TAIL", "CommandResult", "run_argv"]

TAIL = 4000
"""Characters of a command's output kept (the end of it), in the result and in the state."""

DRAIN = 1.0
"""Seconds the output is still read after the command exited (a child may hold the pipe)."""

_TIMED_OUT = 124  # as timeout(1) reports it


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: exit code (128 + N for signal N; 124 killed by us on timeout;
    126/127 could not start), the tail of its output (stdout and stderr together) and an
    error, if any. ``signal`` is the signal that ended it (SIGKILL when it timed out)."""

    exit_code: int
    output_tail: str
    error: Optional[str] = None
    signal: Optional[int] = None
    timed_out: bool = False

    @property
    def may_have_run(self) -> bool:
        """True when it was stopped by a signal (ours on timeout, or another's): it may have
        done its work before it was stopped, or not. False when it exited on its own or
        never started."""
        return self.signal is not None

    def describe(self, name: str) -> str:
        """How ``name`` ended, for people: ``exited 2``, ``was killed by SIGTERM``, ..."""
        if self.error is not None:
            return self.error
        if self.signal is not None:
            return f"{name} was killed by {_signal_name(self.signal)}"
        return f"{name} exited {self.exit_code}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Capture(asyncio.SubprocessProtocol):
    """Keeps the last bytes of the output and says when the process exited and when its
    output pipe closed (two different moments when a child inherited the pipe)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.output = bytearray()
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output += data
        if len(self.output) > 2 * self.keep:  # trim now and then, not on every read
            del self.output[:-self.keep]

    def pipe_connection_lost(self, fd: int, exc: Optional[Exception]) -> None:
        self.closed.set()

    def process_exited(self) -> None:
        self.exited.set()

    def tail(self) -> str:
        # 4 bytes per character at most in UTF-8: enough bytes for TAIL characters.
        # A NUL becomes U+FFFD as undecodable bytes do: PostgreSQL text cannot hold one.
        text = bytes(self.output[-self.keep:]).decode(errors="replace")[-TAIL:]
        # Kept in the state and shown: credentials a submit tool prints (a URL's password, a
        # token) are redacted as everywhere else.
        return scrub(redact(text.replace("\0", "\ufffd")))


def _kill(transport: asyncio.SubprocessTransport) -> None:
    """SIGKILL the process unless it has exited; one that exits meanwhile is no error (uvloop
    raises ``ProcessLookupError`` for it, asyncio does not)."""
    if transport.get_returncode() is None:
        with contextlib.suppress(ProcessLookupError):
            transport.kill()


KEPT_FROM_COMMANDS = ("PGPASSWORD",)
"""Variables of prestaged's environment its commands do not get: the state database's
password (libpq reads it) is prestaged's, not the submit tool's. Grid credentials
(``X509_USER_PROXY``, ``BEARER_TOKEN_FILE``...) are passed on: jobsub needs them."""


def command_env() -> dict[str, str]:
    """The environment of a submit or complete command: ours without ``KEPT_FROM_COMMANDS``."""
    return {k: v for k, v in os.environ.items() if k not in KEPT_FROM_COMMANDS}


async def run_argv(argv: Sequence[str], timeout: float, *,
                   drain: float = DRAIN) -> CommandResult:
    """Run ``argv`` (no shell) with stdin from /dev/null and its output captured (its last
    ``TAIL`` characters); SIGKILL it after ``timeout`` seconds. The result is decided when the
    process exits, whatever holds its output pipe; output is read for at most ``drain``
    seconds after that (default ``DRAIN``)."""
    loop = asyncio.get_running_loop()
    if any("\0" in arg for arg in argv):  # asyncio raises ValueError, uvloop cuts it short
        return CommandResult(126, "", f"{printable(argv[0])}: cannot run: an argument holds "
                                      "a NUL character")
    try:
        # Its own session: a Ctrl-C or a SIGTERM to prestaged's process group (systemd's
        # stop, timeout, kill -- -PGID) must not cut a submission short; prestaged decides
        # (the daemon's drain_timeout, then launch_unknown if it has to go).
        transport, capture = await loop.subprocess_exec(
            lambda: _Capture(4 * TAIL), *argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env=command_env())
    except OSError as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return CommandResult(code, "", f"{argv[0]}: cannot run: {e.strerror or e}")
    try:
        timed_out = False
        try:
            await asyncio.wait_for(capture.exited.wait(), timeout)
        except asyncio.TimeoutError:
            timed_out = transport.get_returncode() is None  # else it exited just now
            _kill(transport)
            await capture.exited.wait()  # SIGKILL cannot be ignored
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(capture.closed.wait(), drain)
        status = transport.get_returncode()
        assert status is not None  # process_exited was called
    finally:
        transport.close()  # our end of the pipe; a child that still holds it gets EPIPE
    tail = capture.tail()
    if timed_out:
        return CommandResult(_TIMED_OUT, tail, f"{argv[0]} was still running after "
                             f"{timeout:g}s and was killed", signal=int(signal.SIGKILL),
                             timed_out=True)
    if status < 0:
        return CommandResult(128 - status, tail, signal=-status)
    return CommandResult(status, tail)
