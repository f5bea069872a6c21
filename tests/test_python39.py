"""The package runs on a real Python 3.9 (AlmaLinux 9's system Python on grid nodes), not only
passes vermin: a cross-section of this suite runs again under a 3.9 interpreter.

vermin reads the source for syntax and APIs newer than 3.9; it cannot see what differs at run
time (Python 3.9 gets aiohttp 3.13, not 3.14; ``asyncio.TimeoutError`` is not the built-in
``TimeoutError``; ``create_default_context(Purpose.CLIENT_AUTH)`` is not a server context; an
asyncio lock made outside a running loop binds to the wrong one). The first full run of the suite
under 3.9.18 failed 36 tests, all in the test kit; this keeps it from drifting again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-py39"
"""Kept between runs (git ignores it); rebuilt when pyproject.toml changes."""

# What the modules below need from the test extra (the rest, Rucio and MetaCat's clients and the
# linters, is large and serves tests that run no package code differently on 3.9).
TEST_TOOLS = {"pytest", "pytest-asyncio", "aioresponses", "psutil", "pytest-timeout",
              "psycopg", "psycopg-pool"}

# The engine and its pacing, both touch paths and the pool hop, tape staging end to end, the
# catalogs' HTTP client, credentials and tokens, SQLite and PostgreSQL state, the CLI as a
# subprocess, the daemon, the gate and the campaign runner: about 2 minutes.
MODULES = [
    "test_engine_unit", "test_pacing", "test_fast_path", "test_pool_hop", "test_hostile_endpoints",
    "test_warm_integration", "test_tape_client", "test_staging", "test_locality",
    "test_tape_warm", "test_release", "test_samweb_unit", "test_config", "test_bad_values",
    "test_credentials", "test_tokens", "test_voms", "test_store", "test_state_writer",
    "test_state_journal", "test_state_postgres", "test_cluster_state", "test_context",
    "test_cli", "test_daemon",
    "test_api", "test_sdnotify", "test_metrics", "test_gate", "test_campaign_runner",
]


def _runs(python: str) -> bool:
    try:
        res = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"],
                             capture_output=True, timeout=30, check=False)
    except OSError:
        return False
    return res.returncode == 0


def _python39() -> Optional[str]:
    """``$PRESTAGED_PYTHON39``, else ``python3.9`` on the PATH (a pyenv shim answers only when
    3.9 is selected), else pyenv's newest 3.9, else None."""
    candidates = [os.environ.get("PRESTAGED_PYTHON39", ""), shutil.which("python3.9") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    versions = sorted((pyenv / "versions").glob("3.9.*"),
                      key=lambda v: [int(x) for x in re.findall(r"\d+", v.name)], reverse=True)
    candidates += [str(v / "bin" / "python3.9") for v in versions]
    return next((c for c in candidates if c and _runs(c)), None)


def _requirements() -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["optional-dependencies"]
    return [req for req in extras["test"]
            if re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower() in TEST_TOOLS]


def _venv(python: str) -> Path:
    """A 3.9 venv with the package (editable) and the test tools, built once per pyproject.toml."""
    stamp = VENV / "prestaged-stamp"
    want = hashlib.sha256((python + "\n").encode() + (ROOT / "pyproject.toml").read_bytes())
    bin_python = VENV / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == want.hexdigest() and _runs(str(bin_python)):
        return bin_python
    shutil.rmtree(VENV, ignore_errors=True)
    for cmd in ([python, "-m", "venv", str(VENV)],
                [str(bin_python), "-m", "pip", "install", "-q", "-e", str(ROOT), *_requirements()]):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                             check=False)
        assert res.returncode == 0, f"{' '.join(cmd[:4])}...: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    stamp.write_text(want.hexdigest())
    return bin_python


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_suite_cross_section_passes_on_python_39() -> None:
    """The engine, touch paths, tape staging, state, CLI, daemon, gate and campaign tests pass
    under a real Python 3.9 interpreter (skips, naming what to install, when none is found)."""
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter (PRESTAGED_PYTHON39, python3.9 or pyenv's 3.9.x): "
                    "the package's 3.9 support is then checked by vermin alone")
    venv_python = _venv(python)
    # A short base: the daemon's sd_notify socket path must fit AF_UNIX's 108 bytes.
    with tempfile.TemporaryDirectory(prefix="p39-") as base:
        cmd = [str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--basetemp={base}", *(f"tests/{m}.py" for m in MODULES)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1100,
                             check=False)
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"under {python}:\n{tail}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped)", res.stdout)}
    assert counts.get("passed", 0) >= 500 and counts.get("skipped", 0) <= 5, tail
