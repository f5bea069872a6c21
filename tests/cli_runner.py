"""Run the ``prestaged`` CLI in-process, with the shape of ``subprocess.run``'s result.

For tests that check what a command prints and returns, not the process boundary (signals,
exit of a real process, stdin/stdout of a submitted command): those keep real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

from prestaged.cli import main


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
            clean: tuple[str, ...] = ("X509_", "PRESTAGED_")) -> CliResult:
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
