"""Run the ``prestaged`` CLI in-process, with the shape of ``subprocess.run``'s result.

For tests that check what a command prints and returns, not the process boundary (signals,
exit of a real process, stdin/stdout of a submitted command): those keep real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import prestaged
from prestaged.cli import main

CLEAN = ("X509_", "PRESTAGED_")
"""Environment variables of the machine running the tests that must not reach the CLI."""


@dataclass(frozen=True)
class CliResult:
    """What one ``main(argv)`` call did: like ``subprocess.CompletedProcess[str]``."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _environment(env: Optional[Mapping[str, str]], clean: tuple[str, ...]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith(clean)]:
            del os.environ[key]
        os.environ.update(env or {})
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_cli(*args: str, env: Optional[Mapping[str, str]] = None,
            clean: tuple[str, ...] = CLEAN) -> CliResult:
    """``prestaged ARGS...`` through ``main(argv)`` in this process: stdout and stderr captured,
    environment variables starting with ``clean`` removed and ``env`` added for the call."""
    out, err = io.StringIO(), io.StringIO()
    with _environment(env, clean), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code if isinstance(e.code, int) else 2
    return CliResult(list(args), code, out.getvalue(), err.getvalue())


def entry_point(*args: str) -> list[str]:
    """The argv of the real console entry point: ``python -m prestaged ARGS...``."""
    return [sys.executable, "-m", "prestaged", *args]


def subprocess_env(env: Optional[Mapping[str, str]] = None,
                   clean: tuple[str, ...] = CLEAN) -> dict[str, str]:
    """The environment for a real ``python -m prestaged``: this one without variables starting
    with ``clean``, plus ``env``, with the package under test first on ``PYTHONPATH`` (so that a
    child started from any directory runs this tree, not another installed copy)."""
    root = str(Path(prestaged.__file__).resolve().parent.parent)
    full = {k: v for k, v in os.environ.items() if not k.startswith(clean)}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full.get("PYTHONPATH")]))
    full.update(env or {})
    return full
