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
``.ci/run`` on a clean clone from 847 s to 608 s (2026-12-05, 1,992 tests): the rest of the
suite mostly waits on servers (59 % of one core).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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


CROSS_SECTIONS: dict[str, tuple[list[str], bool, str]] = {
    "3.9": (MODULES_39, True, KEEP_39),
    "3.13": (MODULES_313, False, ""),
}
"""Per version: the test modules, whether at the lowest dependency versions, and ``-k``."""
GRACE = 10.0
"""Seconds a cross-section stopped by the session's end gets to tear down (SIGINT), before
its whole process group is killed."""


class _Stopped(Exception):
    """The session ended: no more processes are started."""


class _Runner:
    """Runs the processes of cross-sections (interpreter probes, venv builds, the runs), each
    in a process group of its own (a test signalling its own group never reaches them), with
    the environment of when it was made: tests change ``os.environ`` meanwhile (``run_cli``
    drops every ``PRESTAGED_*`` for a call), and a cross-section must neither miss
    ``PRESTAGED_PYTHON39`` nor inherit a test's ``HOME``. ``stop`` interrupts what runs (the
    session ended: ``-x``, Ctrl-C) and starts nothing more."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[str]] = []
        self._stopped = False

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        with self._lock:  # a stop either comes before (nothing started) or sees the process
            if self._stopped:
                raise _Stopped("the test session ended")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            self._procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _kill_group(proc)
            proc.communicate()
            raise
        finally:
            with self._lock:
                self._procs.remove(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            procs = list(self._procs)
        for proc in procs:  # pytest tears down on SIGINT; servers it started go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + GRACE
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            _kill_group(proc)

    def runs(self, python: str, version: str) -> bool:
        """``python`` starts and is ``version`` (``3.9``)."""
        want = tuple(int(x) for x in version.split("."))
        try:
            res = self.run([python, "-c", f"import sys; assert sys.version_info[:2] == {want}"],
                           timeout=30)
        except OSError:
            return False
        return res.returncode == 0

    def python(self, version: str) -> Optional[str]:
        """``$PRESTAGED_PYTHON39`` (for 3.9; 313 for 3.13), else ``python3.9`` on the PATH (a
        pyenv shim answers only when that version is selected), else pyenv's newest 3.9.x,
        else None."""
        tag = version.replace(".", "")
        candidates = [self.env.get(f"PRESTAGED_PYTHON{tag}", ""),
                      shutil.which(f"python{version}", path=self.env.get("PATH")) or ""]
        home = Path(self.env["HOME"]) if "HOME" in self.env else Path.home()
        pyenv = Path(self.env.get("PYENV_ROOT") or home / ".pyenv")
        versions = sorted((pyenv / "versions").glob(f"{version}.*"),
                          key=lambda v: [int(x) for x in re.findall(r"\d+", v.name)],
                          reverse=True)
        candidates += [str(v / "bin" / f"python{version}") for v in versions]
        return next((c for c in candidates if c and self.runs(c, version)), None)

    def venv(self, python: str, version: str, lowest: bool) -> Path:
        """A venv of ``python`` with the package (editable) and the test tools, kept between
        runs in ``.venv-py39`` (``.venv-py313``; git ignores them), rebuilt when pyproject.toml
        changes. ``lowest``: every direct dependency at its lowest allowed version, resolved
        by uv (pip has no such resolution; uv is installed into the venv from PyPI)."""
        venv = ROOT / f".venv-py{version.replace('.', '')}"
        stamp = venv / "prestaged-stamp"
        want = hashlib.sha256(f"{python}\n{lowest}\n".encode()
                              + (ROOT / "pyproject.toml").read_bytes())
        bin_python = venv / "bin" / "python"
        if stamp.is_file() and stamp.read_text() == want.hexdigest() and \
                self.runs(str(bin_python), version):
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
            res = self.run(cmd, timeout=900)
            assert res.returncode == 0, \
                f"{' '.join(cmd[:4])}...: {res.stdout[-3000:]}{res.stderr[-3000:]}"
        stamp.write_text(want.hexdigest())
        return bin_python

    def cross_section(self, version: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        """Run the cross-section of ``version``: (the interpreter, the run); ``pytest.skip``
        when no interpreter is found."""
        modules, lowest, keep = CROSS_SECTIONS[version]
        python = self.python(version)
        if python is None:
            tag = version.replace(".", "")
            pytest.skip(f"no Python {version} interpreter (PRESTAGED_PYTHON{tag}, "
                        f"python{version} or pyenv's {version}.x)")
        venv_python = self.venv(python, version, lowest)
        if lowest:  # the resolution really went to the bottom
            got = self.run([str(venv_python), "-c",
                            "import aiohttp; print(aiohttp.__version__)"], timeout=60)
            assert got.stdout.strip() == _declared_minimum("aiohttp"), got
        # A short base: the daemon's sd_notify socket path must fit AF_UNIX's 108 bytes.
        with tempfile.TemporaryDirectory(prefix=f"p{version.replace('.', '')}-") as base:
            return python, self.run(
                [str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 f"--basetemp={base}", *(["-k", keep] if keep else []),
                 *(f"tests/{m}.py" for m in modules)], timeout=1100)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class _Started:
    """A cross-section run ahead of its test: ``done`` once it has an outcome or an error."""

    done: threading.Event = field(default_factory=threading.Event)
    outcome: Optional[tuple[str, subprocess.CompletedProcess[str]]] = None
    error: Optional[BaseException] = None


class Background:
    """The cross-sections selected, started at the end of collection (``start``, from
    ``conftest.pytest_collection_finish``) one after the other in a daemon thread, so that at
    most one runs beside the rest of the suite; ``stop`` (``pytest_sessionfinish``) ends what
    still runs. A session's exit never waits for the thread."""

    def __init__(self) -> None:
        self.started: dict[str, _Started] = {}
        self._runner: Optional[_Runner] = None

    def start(self, versions: list[str]) -> None:
        runner = self._runner = _Runner()
        order = sorted(versions, key=lambda v: v != "3.9")  # the longest first
        self.started = {v: _Started() for v in order}

        def work() -> None:
            for version in order:
                slot = self.started[version]
                try:
                    slot.outcome = runner.cross_section(version)
                except BaseException as e:  # a skip or a failure, raised again in the test
                    slot.error = e
                finally:
                    slot.done.set()

        threading.Thread(target=work, name="cross-sections", daemon=True).start()

    def result(self, version: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        """The outcome of ``version``'s cross-section: the one started ahead, else run now."""
        slot = self.started.get(version)
        if slot is None:
            return _Runner().cross_section(version)
        assert slot.done.wait(1150), f"the {version} cross-section did not end in time"
        if slot.error is not None:
            raise slot.error
        assert slot.outcome is not None
        return slot.outcome

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()


BACKGROUND = Background()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("version", list(CROSS_SECTIONS))
def test_suite_cross_section_passes_on(version: str) -> None:
    """A cross-section of the suite passes under a real interpreter of ``version``, on 3.9 with
    the lowest versions of the dependencies (skips, naming what to install, when no
    interpreter is found)."""
    python, res = BACKGROUND.result(version)
    modules = CROSS_SECTIONS[version][0]
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"under {python}:\n{tail}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped)", res.stdout)}
    assert counts.get("passed", 0) >= 100 * len(modules) // 4, tail  # not mostly skipped
    assert counts.get("skipped", 0) <= 5, tail
