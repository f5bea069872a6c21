"""Helpers shared by the campaign tests (foreground and daemon): definitions on the test
storage, what the fake submit commands recorded, the event loops commands run on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

from prestaged.testing.storage import ThreadedStorageServer

T = TypeVar("T")


def write_definition(tmp_path: Path, srv: ThreadedStorageServer, paths: list[str],
                     name: str = "ds.txt") -> Path:
    """A local definition (URL list) ``tmp_path/name`` of ``paths`` on ``srv``."""
    path = tmp_path / name
    path.write_text("".join(srv.url(p) + "\n" for p in paths))
    return path


def read_records(tmp_path: Path) -> list[dict[str, Any]]:
    """The JSON lines the fake submit command appended to ``tmp_path/record.jsonl``."""
    path = tmp_path / "record.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


LOOPS = ("asyncio", "uvloop")
"""Event loops the campaign commands are run on: the daemon and the CLI pick uvloop when it
is installed, which reports a vanished process differently (``ProcessLookupError``)."""


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``main()`` run to completion on a new ``loop`` (one of ``LOOPS``); fails the test when
    the loop reported an error of its own (an unretrieved task exception, a callback that
    raised), which would be a traceback in the daemon's log."""
    reported: list[dict[str, Any]] = []

    async def wrapped() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        return await main()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        result: T = uvloop.run(wrapped())
    else:
        result = asyncio.run(wrapped())
    assert reported == [], reported
    return result


@contextlib.contextmanager
def reaped(pid_file: Path) -> Iterator[None]:
    """Kill the process whose pid a fake command wrote to ``pid_file`` (a background child
    left behind on purpose), once the test is over."""
    try:
        yield
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
