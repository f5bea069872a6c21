"""Shared machinery of the benchmarks: credentials, the test storage process, URL lists, timing.

Everything talks to 127.0.0.1 only. The storage emulator runs in its own process
(``python -m prestaged.testing.storage``) so that it does not share an interpreter, a GIL or an
event loop with the client being measured; it still shares the machine's cores, which is why
both clients are measured against the same server under the same conditions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from prestaged.testing.pki import TestPKI, create_pki

__all__ = [
    "Credentials",
    "EmulatorProcess",
    "Measured",
    "StorageProcess",
    "empty_config",
    "emulator",
    "free_port",
    "gnu_time",
    "make_credentials",
    "median",
    "prestaged_command",
    "process_cpu_seconds",
    "run_measured",
    "server_problems",
    "status_counts",
    "storage",
    "url_for",
    "warm_command",
    "write_curl_parallel_config",
    "write_url_list",
]

#: Seconds to wait for the storage process to print its port line, and to exit on SIGTERM.
STORAGE_START_TIMEOUT = 60.0
STORAGE_STOP_TIMEOUT = 120.0


# --- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A test PKI under ``pki.root`` and one RFC 3820 proxy file (cert, key, user cert)."""

    pki: TestPKI
    proxy: Path


def make_credentials(root: Path) -> Credentials:
    """Create a fresh test PKI in ``root/pki`` and a proxy at ``root/x509up_bench``."""
    pki = create_pki(root / "pki")
    return Credentials(pki=pki, proxy=pki.make_proxy(root / "x509up_bench"))


# --- the storage process -----------------------------------------------------------------------


@dataclass
class StorageProcess:
    """A running ``prestaged.testing.storage`` process; ``stats`` is filled in by ``stop()``."""

    proc: subprocess.Popen[str]
    door_port: int
    pool_port: Optional[int]
    stats_file: Path
    stats: Optional[dict[str, Any]] = None

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:<door port>``."""
        return f"https://127.0.0.1:{self.door_port}"

    def stop(self) -> dict[str, Any]:
        """SIGTERM the server, wait for it (at most ``STORAGE_STOP_TIMEOUT`` s), return its stats.

        The server writes its statistics on the way out, so they are complete only once it
        has exited; a server that does not exit in time is killed and this raises. The
        server's CPU time (user + system, s, start-up included) is added as ``cpu_seconds``.
        """
        if self.stats is None:
            self.stats = stop_server(self.proc, self.stats_file, STORAGE_STOP_TIMEOUT,
                                     "the storage process")
        return self.stats


def stop_server(proc: subprocess.Popen[Any], stats_file: Path, timeout: float,
                what: str) -> dict[str, Any]:
    """SIGTERM a test server process that writes ``stats_file`` on its way out, reap it
    (killed after ``timeout`` s), and return those stats with its CPU seconds (user + system,
    start-up included) as ``cpu_seconds``; RuntimeError naming ``what`` if it failed."""
    proc.terminate()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by us, not Popen
    if proc.returncode != 0 or not stats_file.is_file():
        raise RuntimeError(f"{what} failed (exit {proc.returncode})")
    stats: dict[str, Any] = json.loads(stats_file.read_text())
    stats["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return stats


def _read_port_line(proc: subprocess.Popen[str], key: str = "door_port",
                    what: str = "the storage process") -> dict[str, Any]:
    """The JSON line a test server prints once listening (it must hold ``key``); kills
    ``proc`` if none comes in time."""
    assert proc.stdout is not None
    timer = threading.Timer(STORAGE_START_TIMEOUT, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    try:
        info: dict[str, Any] = json.loads(line)
        str(info[key])
    except (ValueError, KeyError, TypeError):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start (said {line.strip()!r})") from None
    return info


@contextlib.contextmanager
def storage(pki_dir: Path, stats_file: Path, *, redirect: bool = False,
            port: Optional[int] = None) -> Iterator[StorageProcess]:
    """Run a fresh storage process for the ``with`` block; it is always stopped on the way out.

    ``pki_dir`` must hold a PKI made by ``create_pki``; ``stats_file`` receives the server's
    statistics (call ``stop()`` inside the block to read them; leaving the block stops it too).
    ``port`` pins the door port (default: any free port), so that successive fresh servers
    serve the very same URLs.
    """
    cmd = [sys.executable, "-m", "prestaged.testing.storage", "--pki-dir", str(pki_dir),
           "--stats-file", str(stats_file)]
    if redirect:
        cmd.append("--redirect")
    if port is not None:
        cmd += ["--port", str(port)]
    stats_file.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        info = _read_port_line(proc)
        server = StorageProcess(proc=proc, door_port=int(info["door_port"]),
                                pool_port=info.get("pool_port"), stats_file=stats_file)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STORAGE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class EmulatorProcess:
    """A running catalog emulator (``python -m prestaged.testing.<name>``) that printed its
    ``base_url``; ``stats`` is filled in by ``stop()``."""

    proc: subprocess.Popen[str]
    base_url: str
    stats_file: Path
    what: str
    stats: Optional[dict[str, Any]] = None

    def stop(self) -> dict[str, Any]:
        """SIGTERM it and return the statistics it writes on its way out, with its CPU
        seconds (``stop_server``)."""
        if self.stats is None:
            self.stats = stop_server(self.proc, self.stats_file, STORAGE_STOP_TIMEOUT,
                                     self.what)
        return self.stats


@contextlib.contextmanager
def emulator(module: str, args: Sequence[str], stats_file: Path,
             what: str) -> Iterator[EmulatorProcess]:
    """Run ``python -m <module> ARGS --stats-file STATS_FILE`` (a test server that prints one
    JSON line with ``base_url`` once listening, like ``prestaged.testing.metacat`` and
    ``.rucio``) for the ``with`` block; it is always stopped on the way out. Start-up is
    bounded by ``STORAGE_START_TIMEOUT`` s; ``what`` names it in errors."""
    stats_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, *args, "--stats-file", str(stats_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        info = _read_port_line(proc, "base_url", what)
        yield EmulatorProcess(proc=proc, base_url=str(info["base_url"]), stats_file=stats_file,
                              what=what)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STORAGE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def status_counts(stats: dict[str, Any], site: Optional[str] = None) -> Counter[int]:
    """Response statuses the server sent (of ``site`` ``"door"``/``"pool"`` only, if given)."""
    counts: Counter[int] = Counter()
    for path in stats.get("paths", {}).values():
        for record in path["records"]:
            if site is None or record["site"] == site:
                counts[record["status"]] += 1
    return counts


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_problems(stats: dict[str, Any], files: int, *, redirect: bool) -> list[str]:
    """What the server saw that a correct warm of ``files`` distinct files would not produce.

    Correct means exactly one request per file at the door, each answered 206 (or, with
    ``redirect``, 302 at the door and 206 at the pool, once per file). Empty list: all good.
    """
    problems = []
    by_site = stats.get("requests_by_site", {})
    door_want = {302: files} if redirect else {206: files}
    checks = [("door", door_want)] + ([("pool", {206: files})] if redirect else [])
    for site, want in checks:
        if by_site.get(site) != files:
            problems.append(f"server saw {by_site.get(site)} {site} requests, expected {files}")
        got = dict(status_counts(stats, site))
        if got != want:
            problems.append(f"server {site} statuses {got}, expected {want}")
    return problems


# --- URL lists ---------------------------------------------------------------------------------


def url_for(base_url: str, n: int) -> str:
    """URL of file number ``n``: ``<base>/bench/run<n//1000>/f<n>.root`` (zero-padded)."""
    return f"{base_url}/bench/run{n // 1000:04d}/f{n:07d}.root"


def write_url_list(path: Path, base_url: str, count: int) -> Path:
    """Write ``count`` distinct file URLs, one per line (a local-catalog definition)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(url_for(base_url, n) + "\n" for n in range(count))
    return path


def write_curl_parallel_config(path: Path, urls: Sequence[str], *, proxy: Path, ca_dir: Path,
                               cacert: Optional[Path] = None, location: bool = False) -> Path:
    """Write a curl config for ``curl --parallel --config PATH`` that reads bytes 0-3 of ``urls``.

    Global options come first (curl applies options placed before the first ``url`` to every
    transfer): ``cert``/``key`` = ``proxy``, ``capath`` = ``ca_dir``, ``cacert`` if given (then
    curl does not load its default CA bundle), ``location`` (follow redirects) if asked, the
    Range header and ``write-out = "%{http_code}\\n"``; then one ``url``/``output = /dev/null``
    pair per URL.
    """
    head = [
        "# global options: placed before the first url, they apply to every transfer",
        f"cert = {_curl_quoted(str(proxy))}",
        f"key = {_curl_quoted(str(proxy))}",
    ]
    if cacert is not None:
        head.append(f"cacert = {_curl_quoted(str(cacert))}")
    head += [
        f"capath = {_curl_quoted(str(ca_dir))}",
        'header = "Range: bytes=0-3"',
        'write-out = "%{http_code}\\n"',
    ]
    if location:
        head.append("location")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(head) + "\n")
        fh.writelines(f"url = {_curl_quoted(u)}\noutput = \"/dev/null\"\n" for u in urls)
    return path


def _curl_quoted(text: str) -> str:
    """``text`` as a double-quoted curl config value."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- running and measuring a client ------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One finished client process: exit code, wall time (s), CPU time (user + system, s),
    peak RSS (MiB; None when GNU time is not available) and its output."""

    returncode: int
    elapsed: float
    cpu_seconds: float
    peak_rss_mib: Optional[float]
    stdout: str
    stderr: str


def prestaged_command(*args: str) -> list[str]:
    """The ``prestaged`` console script of this interpreter's environment, with ``args``.

    The real entry point (not ``python -m``) so that what is timed is what a user runs.
    """
    script = Path(sys.executable).parent / "prestaged"
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-m", "prestaged", *args]


def warm_command(url_list: Path, creds: Credentials, config: Path, *extra: str) -> list[str]:
    """``prestaged warm URL_LIST --json --no-progress`` with the bench proxy and CA directory.

    ``config`` should be an empty file (see ``empty_config``) so that a config file of the
    machine or of the user running the benchmark cannot change what is measured.
    """
    return prestaged_command(
        "warm", str(url_list), "--config", str(config), "--proxy", str(creds.proxy),
        "--ca-dir", str(creds.pki.ca_dir), "--json", "--no-progress", *extra,
    )


def empty_config(path: Path) -> Path:
    """Write an empty prestaged config (built-in defaults only) at ``path``."""
    path.write_text("# benchmark: built-in defaults only\n", encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def gnu_time() -> Optional[str]:
    """Path of GNU time (``/usr/bin/time`` with ``-f``/``-o``), or None if there is none."""
    path = shutil.which("time", path="/usr/bin:/bin:/usr/local/bin")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "GNU" in out.stdout + out.stderr else None


def _read(fh: IO[bytes]) -> str:
    fh.seek(0)
    return fh.read().decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group we created for one measured run (its id is the leader's pid)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# Why GNU time for peak RSS. The obvious ways are all wrong for a child of a big parent: on
# Linux, exec() folds the high-water RSS of the *old* address space into the process's maxrss,
# and subprocess starts children with vfork (posix_spawn), whose old address space is the
# parent's. So ``os.wait4(child).ru_maxrss``, ``getrusage(RUSAGE_CHILDREN)`` deltas and even
# the child's own ``getrusage(RUSAGE_SELF)`` all report at least the benchmark process's peak
# (here ~60 MiB after parsing the server's statistics: measured, /bin/true "used" 523 MiB
# after the parent had touched 500 MiB). GNU time forks a small C process and waits for the
# command with wait4(): the only old address space folded in is time's own (~1 MiB), so
# ``%M`` is the command's peak. Polling /proc or psutil would miss short peaks.
def run_measured(cmd: Sequence[str], *, timeout: float, env: Optional[dict[str, str]] = None,
                 ) -> Measured:
    """Run ``cmd`` to completion; return its exit code, wall time, CPU time and peak RSS.

    The command runs under GNU time when available (see the comment above); without it the
    peak RSS is None. Wall time includes process start-up (time's own fork/exec adds about a
    millisecond); CPU time comes from ``wait4`` and includes the reaped command's. Output goes
    to temporary files, not pipes, so the child can never block on a full pipe. The run is a
    process group of its own, killed whole after ``timeout`` s (or if we are interrupted).
    """
    timer = gnu_time()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        rss_file = Path(tmp) / "maxrss"
        full = [timer, "-f", "%M", "-o", str(rss_file), *cmd] if timer else list(cmd)
        with open(Path(tmp) / "out", "w+b") as out, open(Path(tmp) / "err", "w+b") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(full, stdout=out, stderr=err, env=env,
                                    start_new_session=True)
            killer = threading.Timer(timeout, _kill_group, (proc.pid,))
            killer.start()
            reaped = False
            try:
                _, status, usage = os.wait4(proc.pid, 0)
                reaped = True
            finally:
                killer.cancel()
                if not reaped:
                    _kill_group(proc.pid)
                    proc.wait()
            elapsed = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by us, not by Popen
            rss = _parse_maxrss(rss_file) if timer else None
            return Measured(returncode=proc.returncode, elapsed=elapsed,
                            cpu_seconds=usage.ru_utime + usage.ru_stime, peak_rss_mib=rss,
                            stdout=_read(out), stderr=_read(err))


def _parse_maxrss(path: Path) -> Optional[float]:
    """GNU time's ``%M`` (KiB) from its ``-o`` file, in MiB; None if it wrote none."""
    try:
        lines = path.read_text().split()
        return int(lines[-1]) / 1024
    except (OSError, ValueError, IndexError):
        return None


def process_cpu_seconds(pid: int) -> Optional[float]:
    """CPU time (user + system, s, all threads) used so far by the running process ``pid``.

    Read from ``/proc/<pid>/stat`` (Linux), so that the CPU a long-running server spends on one
    measured run is the difference of two readings. None where there is no such file.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14 utime, 15 stime


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (which must not be empty)."""
    return float(statistics.median(values))
