"""Helpers of the tests that run prestaged's CLI against the real XRootD: whether CI demands the
server, a definition file, what to print when an assertion fails, the run's JSON summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_runner import CliResult

from prestaged.testing.xrootd import XRootDServer


def in_ci() -> bool:
    """``$CI`` is set (to anything but 0/false/no): a missing server fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def definition(tmp_path: Path, urls: list[str]) -> Path:
    """``tmp_path/dataset.txt`` listing ``urls``."""
    path = tmp_path / "dataset.txt"
    path.write_text("".join(u + "\n" for u in urls))
    return path


def why(res: CliResult, server: XRootDServer) -> str:
    """What to print when an assertion fails: the CLI's output and XRootD's log tail (tokens
    blanked by ``log_tail``)."""
    return (f"exit {res.returncode}\n--- stdout\n{res.stdout[:3000]}\n--- stderr\n{res.stderr}"
            f"\n--- xrootd log ({server.log_path})\n{server.log_tail()}")


def summary(res: CliResult, server: XRootDServer) -> dict[str, Any]:
    """The ``--json`` document of a run; the test fails, saying why, when there is none."""
    try:
        doc: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"no JSON document on stdout\n{why(res, server)}")
    return doc
