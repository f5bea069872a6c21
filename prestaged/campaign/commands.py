"""Running a campaign's ``submit`` and ``complete`` commands: argv lists (never a shell), stdin
from /dev/null, output captured and kept to its tail, bounded in time."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

__all__ = ["TAIL", "CommandResult", "run_argv"]

TAIL = 4000
"""Characters of a command's output kept (the end of it), in the result and in the state."""


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: exit code (128 + N for signal N; 124 timed out; 126/127 could not
    start), the tail of its output (stdout and stderr together) and an error, if any."""

    exit_code: int
    output_tail: str
    error: Optional[str] = None


async def run_argv(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run ``argv`` (no shell) with stdin from /dev/null, its output captured; kill it after
    ``timeout`` seconds."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return CommandResult(code, "", f"{argv[0]}: cannot run: {e.strerror or e}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return CommandResult(124, "", f"{argv[0]}: killed after {timeout:g}s")
    code = proc.returncode if proc.returncode is not None else -1
    tail = out.decode(errors="replace")[-TAIL:]
    return CommandResult(128 - code if code < 0 else code, tail)
