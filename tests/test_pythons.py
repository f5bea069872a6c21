"""The package runs on the oldest and the newest Python its users have, not only on the one
that runs the suite: a cross-section of this suite runs again under each.

* **3.9**, AlmaLinux 9's system Python on grid nodes, with every direct dependency at the
  lowest version pyproject.toml allows (uv's ``--resolution lowest-direct``): a grid node's
  shared environment keeps an older aiohttp that satisfies the bound, and pip leaves it
  there. vermin reads the source for syntax and APIs newer than 3.9; it cannot see what
  differs at run time (``asyncio.TimeoutError`` is not the built-in ``TimeoutError``;
  ``create_default_context(Purpose.CLIENT_AUTH)`` is not a server context). The first full
  run of the suite under 3.9.18 failed 36 tests, all in the test kit; the first at the lowest
  versions (3.11) failed 18, and showed four bounds that were not true.
* **3.13**, a fresh Debian 13's ``python3``, where the README's two commands start. Its
  ``create_default_context`` verifies certificates in OpenSSL's strict mode, which refused
  storage certificates every other grid client accepts (``net.client_ssl_context``); its
  ``HTTPStatus`` names 416 "Range Not Satisfiable".

Both take about a third of the suite's time, mostly waiting on servers: they start when
collection ends (``conftest.pytest_collection_finish``), one after the other in a thread, and
run while the rest of the suite does; each test waits for its own. On 2 cores that took
``.ci/run`` on a clean clone from 847 s to 626 s (2026-12-05): the rest of the suite mostly
waits on servers (59 % of one core).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# What the modules below need from the test extra (the rest, Rucio and MetaCat's clients and the
# linters, is large and serves tests that run no package code differently on 3.9).
TEST_TOOLS = {"pytest", "pytest-asyncio", "aioresponses", "psutil", "pytest-timeout",
              "psycopg", "psycopg-pool"}

# 3.9: the engine and its pacing, both touch paths and the pool hop, tape staging end to end,
# the catalogs' HTTP client, credentials and tokens, SQLite and PostgreSQL state, the CLI as a
# subprocess, the daemon, the gate and the campaign runner: about 2.5 minutes. PostgreSQL (and
# psycopg at its lowest version) through the state's own modules (KEEP_39): the [postgresql]
# run of a test elsewhere runs the same adapter code again, and doubled the cross-section's
# time (it was 4 of CI's 15 minutes, 2026-12-05).
MODULES_39 = [
    "test_engine_unit", "test_pacing", "test_fast_path", "test_pool_hop", "test_hostile_endpoints",
    "test_warm_integration", "test_tape_client", "test_staging", "test_locality",
    "test_tape_warm", "test_release", "test_samweb_unit", "test_config", "test_bad_values",
    "test_credentials", "test_tokens", "test_voms", "test_store", "test_state_writer",
    "test_state_journal", "test_state_postgres", "test_cluster_state", "test_context",
    "test_cli", "test_daemon",
    "test_api", "test_sdnotify", "test_metrics", "test_gate", "test_campaign_runner",
]
KEEP_39 = "not postgresql or state_postgres or cluster_state or state_writer"
"""``-k`` of the 3.9 run: every test, but the [postgresql] runs outside the state's modules."""
# 3.13 (the whole suite passes there too, 2026-12-04): what TLS, HTTP and the state touch, in
# about a minute.
MODULES_313 = [
    "test_tls_trust", "test_credentials", "test_engine_unit", "test_pacing", "test_fast_path",
    "test_pool_hop", "test_hostile_endpoints", "test_warm_integration", "test_tape_warm",
    "test_config", "test_state_journal", "test_cli",
]


def _runs(python: str, version: str) -> bool:
    """``python`` starts and is ``version`` (``3.9``)."""
    want = tuple(int(x) for x in version.split("."))
    try:
        res = subprocess.run([python, "-c", f"import sys; assert sys.version_info[:2] == {want}"],
                             capture_output=True, timeout=30, check=False)
    except OSError:
        return False
    return res.returncode == 0


def _python(version: str) -> Optional[str]:
    """``$PRESTAGED_PYTHON39`` (for 3.9; 313 for 3.13), else ``python3.9`` on the PATH (a pyenv
    shim answers only when that version is selected), else pyenv's newest 3.9.x, else None."""
    tag = version.replace(".", "")
    candidates = [os.environ.get(f"PRESTAGED_PYTHON{tag}", ""),
                  shutil.which(f"python{version}") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    versions = sorted((pyenv / "versions").glob(f"{version}.*"),
                      key=lambda v: [int(x) for x in re.findall(r"\d+", v.name)], reverse=True)
    candidates += [str(v / "bin" / f"python{version}") for v in versions]
    return next((c for c in candidates if c and _runs(c, version)), None)


def _project() -> dict[str, Any]:
    """pyproject.toml's ``[project]`` table."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project: dict[str, Any] = doc["project"]
    return project


def _requirements() -> list[str]:
    return [req for req in _project()["optional-dependencies"]["test"]
            if re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower() in TEST_TOOLS]


def _declared_minimum(name: str) -> str:
    """The ``>=`` bound of ``name`` in the package's dependencies."""
    deps = _project()["dependencies"]
    found = [m.group(1) for d in deps if (m := re.fullmatch(rf"{name}>=([\w.]+)", d))]
    assert len(found) == 1, deps
    return found[0]


def _venv(python: str, version: str, lowest: bool) -> Path:
    """A venv of ``python`` with the package (editable) and the test tools, kept between runs
    in ``.venv-py39`` (``.venv-py313``; git ignores them), rebuilt when pyproject.toml changes.
    ``lowest``: every direct dependency at its lowest allowed version, resolved by uv (pip has
    no such resolution; uv is installed into the venv from PyPI)."""
    venv = ROOT / f".venv-py{version.replace('.', '')}"
    stamp = venv / "prestaged-stamp"
    want = hashlib.sha256(f"{python}\n{lowest}\n".encode()
                          + (ROOT / "pyproject.toml").read_bytes())
    bin_python = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == want.hexdigest() and _runs(str(bin_python),
                                                                           version):
        return bin_python
    shutil.rmtree(venv, ignore_errors=True)
    install = [str(bin_python), "-m", "pip", "install", "-q"]
    steps = [[python, "-m", "venv", str(venv)]]
    if lowest:
        steps += [[*install, "uv"],
                  [str(bin_python), "-m", "uv", "pip", "install", "-q", "--python",
                   str(bin_python), "--resolution", "lowest-direct"]]
    else:
        steps += [install]
    steps[-1] += ["-e", str(ROOT), *_requirements()]
    for cmd in steps:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                             check=False)
        assert res.returncode == 0, f"{' '.join(cmd[:4])}...: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    stamp.write_text(want.hexdigest())
    return bin_python


CROSS_SECTIONS: dict[str, tuple[list[str], bool, str]] = {
    "3.9": (MODULES_39, True, KEEP_39),
    "3.13": (MODULES_313, False, ""),
}
"""Per version: the test modules, whether at the lowest dependency versions, and ``-k``."""


@dataclass(frozen=True)
class _Outcome:
    python: str
    returncode: int
    stdout: str
    stderr: str


@dataclass
class _Background:
    """The cross-sections started ahead of their tests (``start``), one at a time in a thread,
    so that at most one runs beside the rest of the suite; ``stop`` kills what still runs when
    the session ends (a suite stopped early, or the tests deselected after all)."""

    futures: dict[str, Future[_Outcome]] = field(default_factory=dict)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self, versions: list[str]) -> None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cross-section")
        for version in sorted(versions, key=lambda v: v != "3.9"):  # the longest first
            self.futures[version] = pool.submit(_cross_section, version, self)
        pool.shutdown(wait=False)

    def spawn(self, cmd: list[str]) -> subprocess.Popen[str]:
        if self._stopped.is_set():
            raise RuntimeError("the session ended before this cross-section started")
        # Its own session: a test signalling its process group never reaches it.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        self._procs.append(proc)
        return proc

    def stop(self) -> None:
        self._stopped.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()


BACKGROUND = _Background()


def _cross_section(version: str, background: Optional[_Background] = None) -> _Outcome:
    """Run the cross-section of ``version`` (``pytest.skip`` when no interpreter is found)."""
    modules, lowest, keep = CROSS_SECTIONS[version]
    python = _python(version)
    if python is None:
        tag = version.replace(".", "")
        pytest.skip(f"no Python {version} interpreter (PRESTAGED_PYTHON{tag}, python{version} "
                    f"or pyenv's {version}.x)")
    venv_python = _venv(python, version, lowest)
    if lowest:  # the resolution really went to the bottom
        got = subprocess.run([str(venv_python), "-c", "import aiohttp; print(aiohttp.__version__)"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert got == _declared_minimum("aiohttp"), got
    # A short base: the daemon's sd_notify socket path must fit AF_UNIX's 108 bytes.
    with tempfile.TemporaryDirectory(prefix=f"p{version.replace('.', '')}-") as base:
        cmd = [str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--basetemp={base}", *(["-k", keep] if keep else []),
               *(f"tests/{m}.py" for m in modules)]
        proc = (background or _Background()).spawn(cmd)
        try:
            out, err = proc.communicate(timeout=1100)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return _Outcome(python, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("version", list(CROSS_SECTIONS))
def test_suite_cross_section_passes_on(version: str) -> None:
    """A cross-section of the suite passes under a real interpreter of ``version``, on 3.9 with
    the lowest versions of the dependencies (skips, naming what to install, when no
    interpreter is found)."""
    started = BACKGROUND.futures.get(version)
    res = started.result(timeout=1150) if started is not None else _cross_section(version)
    modules = CROSS_SECTIONS[version][0]
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"under {res.python}:\n{tail}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped)", res.stdout)}
    assert counts.get("passed", 0) >= 100 * len(modules) // 4, tail  # not mostly skipped
    assert counts.get("skipped", 0) <= 5, tail
