"""prestaged against curl on a real XRootD server (XrdHttp over HTTPS) on 127.0.0.1.

Starts Debian's ``xrootd`` 5.5.3 with its XrdHttp plugin (``prestaged.testing.xrootd``) exporting
N real 16-byte files (default 20,000, 1,000 per subdirectory), from a fresh test PKI; every
client presents the same RFC 3820 proxy and reads ``Range: bytes=0-3`` of every file:

(a) **seed**: the recipe prestaged replaces, one ``curl`` process per file, sequentially
    (``curl -L --cert P --key P --cacert P --capath CA -H "Range: bytes=0-3" URL -o /dev/null -s``
    plus ``-w %{http_code}`` to check the answer), from a shell loop over a sample of 500 files
    spread over the dataset; its files/s is the rate for N;
(b) **curl --parallel**: ``curl --parallel --parallel-max 32 --config CFG`` of all N URLs, the
    same options as (a) in the config;
(c) **prestaged**: ``prestaged warm LIST --json --no-progress --concurrency 32 --per-host 32``
    with an empty ``--config``, end to end (interpreter start, proxy checks, reading the list, a
    fresh state database per run via ``XDG_STATE_HOME``, the warm, the JSON summary), on the
    event loop prestaged picks (uvloop when installed); plus,
    when uvloop is installed, ``--asyncio-rounds`` runs (default 1) with
    ``PRESTAGED_EVENT_LOOP=asyncio``.

``--baseline DIR`` adds (c0): the same prestaged command importing the package from DIR (a
checkout of another commit, e.g. ``git archive HEAD | tar -x -C DIR``) through ``PYTHONPATH``,
so a change is measured against its parent in the same interleaved rounds (ratio c/c0);
``--no-seed`` skips (a) for quicker rounds.

Runs are interleaved (a, b, c, ... per round) against the same server; medians are reported with
the ratios c/a and c/b of the median files/s. Each run is checked from both sides: prestaged
exits 0 with ``counts.warm`` = files, curl answers are all 206, and XRootD's own summary
statistics (``xrd.report``, sent every second to a UDP port of 127.0.0.1 that this script
listens on) count exactly one open and one read per file and no error during the run. With
``--audit`` XRootD also logs every authorization decision and each run must show one granted
read of every expected path and no denial; that log costs the server enough CPU to slow curl
--parallel by about a quarter, so it is off by default.

``--token`` starts XRootD with its SciTokens plugin too (tokens and proxies both accepted,
``prestaged.testing.xrootd``) and adds (t): the same prestaged command presenting no proxy but
a ``storage.read`` bearer token (``--auth token --token-file``), interleaved with (c), which then
runs ``--auth proxy``; the ratio t/c says what the token costs. XRootD's counters check (t)
like (c); the audit log only records proxy decisions, so ``--audit`` checks (c) alone.

``--rss`` is the memory mode: XRootD exports 200,000 files, and prestaged (and, for reference,
curl --parallel) warm all of them once (``--rounds`` defaults to 1); prestaged's peak RSS and
files/s are reported.

    .venv/bin/python bench/xrootd_bench.py [--rounds 3] [--json] [--baseline DIR] [--no-seed]
    .venv/bin/python bench/xrootd_bench.py --rss [--json]
    .venv/bin/python bench/xrootd_bench.py --token --no-seed [--rounds 5]

Exits 0 if every run was correct, 1 if not, 2 if something needed is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from common import (
    Credentials,
    Measured,
    empty_config,
    gnu_time,
    make_credentials,
    median,
    process_cpu_seconds,
    run_measured,
    warm_command,
    write_curl_parallel_config,
)

from prestaged.testing.tokens import TokenIssuer, write_token
from prestaged.testing.xrootd import XRootDServer, scitokens_available, xrootd_available

CONCURRENCY = 32
FILE_SIZE = 16
FILES_PER_DIR = 1000
SEED = "seed"
PARALLEL = "curl-parallel"
PRESTAGED = "prestaged"
PRESTAGED_ASYNCIO = "prestaged-asyncio"
BASELINE = "prestaged-baseline"
PRESTAGED_TOKEN = "prestaged-token"
LABELS = {
    SEED: "(a) curl per file, sequential",
    PARALLEL: "(b) curl --parallel 32",
    PRESTAGED: "(c) prestaged warm",
    PRESTAGED_ASYNCIO: "(c) prestaged, asyncio loop",
    BASELINE: "(c0) prestaged, --baseline tree",
    PRESTAGED_TOKEN: "(t) prestaged warm, token only",
}
LOOP_ENV = "PRESTAGED_EVENT_LOOP"


@dataclass(frozen=True)
class Setup:
    """Everything a measured run needs; built once, shared by every run."""

    creds: Credentials
    workdir: Path
    server: XRootDServer
    files: int
    sample_paths: list[str]
    all_paths: list[str]
    url_list: Path
    seed_script: Path
    curl_config: Path
    prestaged_config: Path
    counters: XRootDCounters
    audit: bool
    timeout: float
    baseline: Optional[Path] = None
    token_file: Optional[Path] = None
    """A ``storage.read`` token for the server (``--token``); None: proxies only."""


@dataclass(frozen=True)
class Run:
    """One measured run of one method; ``problems`` is empty when the run was correct.

    ``files_per_second`` is ``files / wall_seconds`` (process start to exit; for the seed
    recipe, of its sample). ``server_cpu_seconds`` is what ``xrootd`` used during the run;
    ``server_opens``, ``server_reads``, ``server_errors`` and ``connections`` are the growth of
    XRootD's own counters during the run; ``granted_reads`` comes from its audit log (None
    without ``--audit``). ``reported_files_per_second`` is prestaged's own figure (warm phase).
    """

    method: str
    round: int
    files: int
    wall_seconds: float
    files_per_second: float
    cpu_seconds: float
    peak_rss_mib: Optional[float]
    server_cpu_seconds: Optional[float]
    server_opens: int
    server_reads: int
    server_errors: int
    connections: int
    granted_reads: Optional[int]
    reported_files_per_second: Optional[float]
    problems: list[str]


# --- XRootD's own counters ---------------------------------------------------------------------


class XRootDCounters:
    """XRootD's summary statistics, which it sends as XML over UDP to a port of 127.0.0.1.

    Add :attr:`config_line` to the server's config: ``xrd.report`` then sends, every second,
    the link and protocol sections, whose counters (connections, opens, reads, errors) only
    grow; XrdHttp requests are served through the xroot protocol bridge and count there (one
    open and one read per ranged GET). A thread keeps the latest report; :meth:`snapshot`
    waits for one sent after the call, so it covers everything finished before it.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._latest: tuple[float, bytes] = (0.0, b"")
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="xrd.report", daemon=True)
        self._thread.start()

    @property
    def config_line(self) -> str:
        """The XRootD directive that sends the reports here."""
        return f"xrd.report 127.0.0.1:{self.port} every 1s link prot"

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self._latest = (time.monotonic(), data)
                self._cond.notify_all()

    def snapshot(self, timeout: float = 10.0) -> dict[str, int]:
        """Counters of the first report received after this call (``timeout`` s at most).

        Keys: ``connections`` (links accepted), ``opens``, ``reads``, ``errors`` (xroot
        protocol, which XrdHttp requests go through). Raises RuntimeError without a report.
        """
        since = time.monotonic()
        with self._cond:
            if not self._cond.wait_for(lambda: self._latest[0] > since, timeout):
                raise RuntimeError(f"no xrd.report from XRootD within {timeout} s")
            data = self._latest[1]
        root = ET.fromstring(data.decode("utf-8", "replace"))

        def number(path: str) -> int:
            node = root.find(path)
            if node is None or node.text is None:
                raise RuntimeError(f"xrd.report without {path}")
            return int(node.text)

        return {
            "connections": number("stats[@id='link']/tot"),
            "opens": number("stats[@id='xrootd']/ops/open"),
            "reads": number("stats[@id='xrootd']/ops/rd"),
            "errors": number("stats[@id='xrootd']/err"),
        }

    def close(self) -> None:
        """Stop listening."""
        self._closed = True
        self._thread.join()
        self._sock.close()


# --- set-up ------------------------------------------------------------------------------------


def write_seed_script(path: Path, sample: list[str], creds: Credentials) -> Path:
    """A shell script running the seed recipe, one ``curl`` process per URL of ``sample``."""
    proxy, ca_dir = shlex.quote(str(creds.proxy)), shlex.quote(str(creds.pki.ca_dir))
    sample_file = path.with_suffix(".urls")
    sample_file.write_text("".join(u + "\n" for u in sample), encoding="utf-8")
    path.write_text(
        "# the seed recipe: one curl process per file, one after the other\n"
        "while IFS= read -r url; do\n"
        f"  curl -L --cert {proxy} --key {proxy} --cacert {proxy} --capath {ca_dir} "
        '-H "Range: bytes=0-3" "$url" -o /dev/null -s -w "%{http_code}\\n"\n'
        f"done < {shlex.quote(str(sample_file))}\n",
        encoding="utf-8",
    )
    return path


def prepare(workdir: Path, server: XRootDServer, creds: Credentials, *, sample: int,
            counters: XRootDCounters, audit: bool, timeout: float,
            baseline: Optional[Path] = None, token_file: Optional[Path] = None) -> Setup:
    """Write the URL list, the seed script (on an evenly spread sample) and the curl config."""
    urls = server.urls()
    step = max(1, len(urls) // sample)
    picked = urls[::step][:sample]
    url_list = workdir / "urls.txt"
    url_list.write_text("".join(u + "\n" for u in urls), encoding="utf-8")
    export = server.export_dir
    return Setup(
        creds=creds,
        workdir=workdir,
        server=server,
        files=len(urls),
        sample_paths=[str(export / n) for n in server.file_names[::step][:sample]],
        all_paths=[str(export / n) for n in server.file_names],
        url_list=url_list,
        seed_script=write_seed_script(workdir / "seed.sh", picked, creds),
        curl_config=write_curl_parallel_config(
            workdir / "curl.cfg", urls, proxy=creds.proxy, ca_dir=creds.pki.ca_dir,
            cacert=creds.proxy, location=True),
        prestaged_config=empty_config(workdir / "prestaged.toml"),
        counters=counters,
        audit=audit,
        timeout=timeout,
        baseline=baseline,
        token_file=token_file,
    )


# --- the methods -------------------------------------------------------------------------------


def _command(setup: Setup, method: str) -> tuple[list[str], Optional[dict[str, str]]]:
    """The command line of ``method`` and its environment (None: inherit ours)."""
    if method == SEED:
        return ["/bin/sh", str(setup.seed_script)], None
    if method == PARALLEL:
        return ["curl", "--no-progress-meter", "--parallel", "--parallel-max", str(CONCURRENCY),
                "--config", str(setup.curl_config)], None
    env = {k: v for k, v in os.environ.items() if k != LOOP_ENV}
    if method == PRESTAGED_ASYNCIO:
        env[LOOP_ENV] = "asyncio"
    if method == BASELINE:
        assert setup.baseline is not None
        env["PYTHONPATH"] = str(setup.baseline)  # its package first, before the installed one
    # A fresh default state database per run: every run warms every file (none is skipped as
    # fresh), pays for recording them, and nothing lands in the state of the user running this.
    state_home = Path(tempfile.mkdtemp(prefix=f"state-{method}-", dir=setup.workdir))
    env["XDG_STATE_HOME"] = str(state_home)
    auth: list[str] = []
    if setup.token_file is not None:  # say which credential each run presents
        auth = (["--auth", "token", "--token-file", str(setup.token_file)]
                if method == PRESTAGED_TOKEN else ["--auth", "proxy"])
    cmd = warm_command(setup.url_list, setup.creds, setup.prestaged_config,
                       "--concurrency", str(CONCURRENCY), "--per-host", str(CONCURRENCY), *auth)
    return cmd, env


def _client_problems(method: str, files: int, got: Measured) -> tuple[list[str], Optional[float]]:
    """Check a client's exit code and output; also return prestaged's own files/s figure."""
    problems = [] if got.returncode == 0 else [f"exit code {got.returncode}"]
    if method in (SEED, PARALLEL):
        codes = Counter(got.stdout.split())
        if codes != Counter({"206": files}):
            problems.append(f"curl statuses {dict(codes)}, expected {{'206': {files}}}")
        return problems, None
    try:
        doc = json.loads(got.stdout)
    except ValueError:
        return [*problems, f"no JSON summary; stderr: {got.stderr.strip()[-300:]!r}"], None
    warm = doc.get("counts", {}).get("warm")
    if warm != files:
        problems.append(f"prestaged counts.warm = {warm}, expected {files}")
    return problems, doc.get("files_per_second")


def _audit_problems(setup: Setup, mark: int, paths: list[str]) -> tuple[list[str], int]:
    """Check XRootD's audit log since ``mark``: one granted read of each of ``paths``, no denial.

    Returns the problems and the number of granted reads.
    """
    records = setup.server.audit(mark)
    reads = Counter(r.path for r in records if r.verdict == "grant" and r.operation == "read")
    denied = sum(1 for r in records if r.verdict != "grant")
    problems = [f"XRootD logged {denied} denials"] if denied else []
    if reads != Counter(paths):
        extra = sum((reads - Counter(paths)).values())
        lacking = sum((Counter(paths) - reads).values())
        problems.append(f"XRootD granted {sum(reads.values())} reads, expected {len(paths)} "
                        f"(one per file): {lacking} files not read, {extra} reads too many")
    return problems, sum(reads.values())


def _counter_problems(growth: dict[str, int], files: int, discovery: int = 0) -> list[str]:
    """What XRootD's counters show that one ranged GET per file would not produce; prestaged
    also asks the door for its Tape REST discovery document once (``discovery``), which XRootD
    counts as an open (answered 403: no API here)."""
    problems = []
    for key, want in (("opens", files + discovery), ("reads", files)):
        if growth[key] != want:
            problems.append(f"XRootD counted {growth[key]} {key}, expected {want}")
    if growth["errors"]:
        problems.append(f"XRootD counted {growth['errors']} errors")
    return problems


def measure(setup: Setup, method: str, round_no: int) -> Run:
    """One run of ``method`` against the running XRootD, checked from both sides."""
    cmd, env = _command(setup, method)
    paths = setup.sample_paths if method == SEED else setup.all_paths
    pid = setup.server.pid
    assert pid is not None
    before = setup.counters.snapshot()
    mark = setup.server.log_mark()
    cpu_before = process_cpu_seconds(pid)
    got = run_measured(cmd, timeout=setup.timeout, env=env)
    cpu_after = process_cpu_seconds(pid)
    after = setup.counters.snapshot()
    growth = {key: after[key] - before[key] for key in after}
    problems, reported = _client_problems(method, len(paths), got)
    problems += _counter_problems(growth, len(paths),
                                  discovery=0 if method in (SEED, PARALLEL) else 1)
    granted = None
    if setup.audit and method != PRESTAGED_TOKEN:
        more, granted = _audit_problems(setup, mark, paths)
        problems += more
    server_cpu = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu = round(cpu_after - cpu_before, 2)
    return Run(
        method=method,
        round=round_no,
        files=len(paths),
        wall_seconds=round(got.elapsed, 3),
        files_per_second=round(len(paths) / got.elapsed, 1),
        cpu_seconds=round(got.cpu_seconds, 2),
        peak_rss_mib=None if got.peak_rss_mib is None else round(got.peak_rss_mib, 1),
        server_cpu_seconds=server_cpu,
        server_opens=growth["opens"],
        server_reads=growth["reads"],
        server_errors=growth["errors"],
        connections=growth["connections"],
        granted_reads=granted,
        reported_files_per_second=reported,
        problems=problems,
    )


def schedule(rounds: int, asyncio_rounds: int, *, rss: bool, seed: bool = True,
             baseline: bool = False, token: bool = False) -> list[tuple[int, str]]:
    """The interleaved order of runs: per round (a), (b), (c) [, (t)] [, (c) on asyncio]
    [, (c0)]; (t) alternates before and after (c) from round to round."""
    order = []
    for round_no in range(1, rounds + 1):
        methods = [PARALLEL, PRESTAGED] if rss or not seed else [SEED, PARALLEL, PRESTAGED]
        if token:
            at = len(methods) - (round_no % 2)  # (t) before (c) in odd rounds, after in even
            methods.insert(at, PRESTAGED_TOKEN)
        if round_no <= asyncio_rounds:
            methods.append(PRESTAGED_ASYNCIO)
        if baseline:
            methods.append(BASELINE)
        order += [(round_no, m) for m in methods]
    return order


# --- reporting ---------------------------------------------------------------------------------


def _versions() -> dict[str, Optional[str]]:
    """Versions of xrootd, curl, Python and uvloop (None: uvloop not installed)."""
    def first_line(cmd: list[str]) -> str:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (res.stdout + res.stderr).strip().split("\n", 1)[0]

    uv = subprocess.run([sys.executable, "-c", "import uvloop; print(uvloop.__version__)"],
                        capture_output=True, text=True, check=False)
    return {
        "xrootd": first_line(["xrootd", "-v"]),
        "curl": first_line(["curl", "--version"]),
        "python": sys.version.split()[0],
        "uvloop": uv.stdout.strip() if uv.returncode == 0 else None,
    }


def summarize(runs: list[Run], setup: Setup, *, rss: bool, sample: int,
              versions: dict[str, Optional[str]], creation_seconds: float) -> dict[str, Any]:
    """The JSON document: every run, per-method medians, the ratios c/a and c/b."""
    per: dict[str, dict[str, Any]] = {}
    for method in (SEED, PARALLEL, PRESTAGED, PRESTAGED_TOKEN, PRESTAGED_ASYNCIO, BASELINE):
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        rss_values = [r.peak_rss_mib for r in mine if r.peak_rss_mib is not None]
        server = [r.server_cpu_seconds for r in mine if r.server_cpu_seconds is not None]
        reported = [r.reported_files_per_second for r in mine
                    if r.reported_files_per_second is not None]
        per[method] = {
            "files": mine[0].files,
            "runs": len(mine),
            "median_files_per_second": round(median([r.files_per_second for r in mine]), 1),
            "median_wall_seconds": round(median([r.wall_seconds for r in mine]), 3),
            "median_cpu_seconds": round(median([r.cpu_seconds for r in mine]), 2),
            "median_server_cpu_seconds": round(median(server), 2) if server else None,
            "max_peak_rss_mib": max(rss_values) if rss_values else None,
            "median_reported_files_per_second":
                round(median(reported), 1) if reported else None,
        }

    def rate(method: str) -> Optional[float]:
        row = per.get(method)
        return None if row is None else float(row["median_files_per_second"])

    def ratio(top: str, bottom: str) -> Optional[float]:
        t, b = rate(top), rate(bottom)
        return None if t is None or not b else round(t / b, 3)

    if SEED in per:
        per[SEED]["extrapolated_seconds_for_all_files"] = round(
            setup.files / float(per[SEED]["median_files_per_second"]), 1)
    default_loop = "uvloop " + versions["uvloop"] if versions["uvloop"] else "asyncio"
    return {
        "mode": "rss" if rss else "throughput",
        "files": setup.files,
        "seed_sample": None if rss else sample,
        "rounds": max(r.round for r in runs),
        "concurrency": CONCURRENCY,
        "range": "bytes=0-3",
        "file_size": FILE_SIZE,
        "export_seconds": round(creation_seconds, 1),
        "xrootd_audit": setup.audit,
        "versions": versions,
        "prestaged_event_loop": default_loop,
        "methods": per,
        "ratio_c_over_a": ratio(PRESTAGED, SEED),
        "ratio_c_over_b": ratio(PRESTAGED, PARALLEL),
        "ratio_c_asyncio_over_b": ratio(PRESTAGED_ASYNCIO, PARALLEL),
        "ratio_c0_over_b": ratio(BASELINE, PARALLEL),
        "ratio_c_over_c0": ratio(PRESTAGED, BASELINE),
        "ratio_t_over_c": ratio(PRESTAGED_TOKEN, PRESTAGED),
        "baseline": None if setup.baseline is None else str(setup.baseline),
        "all_correct": all(not r.problems for r in runs),
        "runs": [asdict(r) for r in runs],
    }


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(doc: dict[str, Any]) -> None:
    """The human summary: one row per method, then the ratios and any problems."""
    v = doc["versions"]
    print(f"xrootd_bench ({doc['mode']}): {doc['files']} files x {doc['rounds']} rounds, "
          f"{doc['range']}, concurrency {doc['concurrency']}, XRootD {v['xrootd']} XrdHttp on "
          f"127.0.0.1 (export made in {doc['export_seconds']} s, audit log "
          f"{'on' if doc['xrootd_audit'] else 'off'})")
    print(f"{v['curl']}; Python {v['python']}; prestaged event loop: "
          f"{doc['prestaged_event_loop']}")
    print(f"{'method':<30} {'files':>6} {'median files/s':>14} {'runs files/s':>20} "
          f"{'wall s':>7} {'CPU s':>6} {'xrootd CPU s':>12} {'RSS MiB':>8}")
    for method, row in doc["methods"].items():
        each = ", ".join(f"{r['files_per_second']:.0f}" for r in doc["runs"]
                         if r["method"] == method)
        print(f"{LABELS[method]:<30} {row['files']:>6} {row['median_files_per_second']:>14.0f} "
              f"{each:>20} {row['median_wall_seconds']:>7.2f} {row['median_cpu_seconds']:>6.2f} "
              f"{_fmt(row['median_server_cpu_seconds'], '.2f'):>12} "
              f"{_fmt(row['max_peak_rss_mib'], '.1f'):>8}")
    seed = doc["methods"].get(SEED)
    if seed:
        print(f"(a) sampled on {seed['files']} files: {doc['files']} files would take "
              f"{seed['extrapolated_seconds_for_all_files']:.0f} s")
    for key, label in (("ratio_c_over_a", "ratio c/a"), ("ratio_c_over_b", "ratio c/b"),
                       ("ratio_c_asyncio_over_b", "ratio c/b, prestaged on asyncio loop"),
                       ("ratio_c0_over_b", "ratio c0/b, prestaged of the --baseline tree"),
                       ("ratio_c_over_c0", "ratio c/c0, this prestaged over the baseline"),
                       ("ratio_t_over_c", "ratio t/c, token only over proxy only")):
        if doc[key] is not None:
            print(f"{label} (median files/s): {doc[key]:.2f}")
    if doc["baseline"]:
        print(f"(c0) imports prestaged from {doc['baseline']}")
    if doc["mode"] == "rss":
        row = doc["methods"][PRESTAGED]
        print(f"prestaged at {doc['files']} files: peak RSS "
              f"{_fmt(row['max_peak_rss_mib'], '.1f')} MiB, {row['median_files_per_second']:.0f}"
              f" files/s end to end, {_fmt(row['median_reported_files_per_second'], '.0f')} "
              "files/s warm phase")
    verdict = "as expected" if doc["all_correct"] else "NOT as expected, see below"
    reads = ", ".join(f"{r['server_reads']}" for r in doc["runs"])
    print(f"XRootD counted reads per run: {reads}; errors: "
          f"{sum(r['server_errors'] for r in doc['runs'])}"
          f"{'; audit log: one granted read per file' if doc['xrootd_audit'] else ''}"
          f" ({verdict})")
    for r in doc["runs"]:
        for problem in r["problems"]:
            print(f"INCORRECT {r['method']} round {r['round']}: {problem}")


def _progress(run: Run) -> None:
    verdict = "ok" if not run.problems else "INCORRECT: " + "; ".join(run.problems)
    print(f"round {run.round} {run.method:<17}: {run.files} files in {run.wall_seconds:.2f} s = "
          f"{run.files_per_second:.0f} files/s (CPU {run.cpu_seconds:.2f} s, peak RSS "
          f"{_fmt(run.peak_rss_mib, '.1f')} MiB; xrootd CPU "
          f"{_fmt(run.server_cpu_seconds, '.2f')} s, {run.connections} connections, "
          f"{run.server_opens} opens, {run.server_reads} reads, {run.server_errors} errors) "
          f"{verdict}",
          file=sys.stderr, flush=True)


# --- main --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rss", action="store_true",
                   help="memory mode: 200,000 files, prestaged and curl --parallel once each")
    p.add_argument("--files", type=int,
                   help="files exported and warmed (default 20000; 200000 with --rss)")
    p.add_argument("--rounds", type=int, help="rounds of runs (default 3; 1 with --rss)")
    p.add_argument("--sample", type=int, default=500,
                   help="files the seed recipe (a) is timed on (default 500)")
    p.add_argument("--asyncio-rounds", type=int,
                   help="rounds that also run prestaged with PRESTAGED_EVENT_LOOP=asyncio "
                        "(default 1 if uvloop is installed, else 0)")
    p.add_argument("--audit", action="store_true",
                   help="also check XRootD's audit log for one granted read of every file "
                        "(the log costs the server CPU: slower, notably for curl --parallel)")
    p.add_argument("--no-seed", action="store_true",
                   help="skip the seed recipe (a): quicker rounds when only c/b matters")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also run prestaged importing the package from DIR (a checkout of "
                        "another commit, e.g. from `git archive`), interleaved, as row (c0)")
    p.add_argument("--token", action="store_true",
                   help="XRootD with the SciTokens plugin; add (t): prestaged with a bearer "
                        "token and no proxy, interleaved with (c) on the proxy")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a client run is killed (default 900)")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    return p


def main() -> int:
    """Run the benchmark; exit 0 if every run was correct, 1 if not, 2 on bad usage."""
    args = _parser().parse_args()
    files = args.files if args.files is not None else (200_000 if args.rss else 20_000)
    rounds = args.rounds if args.rounds is not None else (1 if args.rss else 3)
    missing = [name for name in ("xrootd", "curl") if shutil.which(name) is None]
    if not xrootd_available() or missing:
        print(f"xrootd_bench: not found: {', '.join(missing)} (Debian packages xrootd-server, "
              "curl)", file=sys.stderr)
        return 2
    if args.token and not scitokens_available():
        print("xrootd_bench: --token needs the Debian package xrootd-scitokens-plugins",
              file=sys.stderr)
        return 2
    if files < 1 or rounds < 1 or args.sample < 1:
        print("xrootd_bench: --files, --rounds and --sample must be >= 1", file=sys.stderr)
        return 2
    if args.rss and gnu_time() is None:
        print("xrootd_bench: --rss needs GNU time (/usr/bin/time, Debian package time)",
              file=sys.stderr)
        return 2
    baseline = args.baseline.resolve() if args.baseline is not None else None
    if baseline is not None and not (baseline / "prestaged" / "__init__.py").is_file():
        print(f"xrootd_bench: --baseline {baseline}: no prestaged package there",
              file=sys.stderr)
        return 2
    versions = _versions()
    asyncio_rounds = args.asyncio_rounds
    if asyncio_rounds is None:
        asyncio_rounds = 1 if versions["uvloop"] and not args.rss else 0
    with tempfile.TemporaryDirectory(prefix="prestaged-xrootd-bench-") as tmp:
        workdir = Path(tmp)
        creds = make_credentials(workdir)
        started = time.perf_counter()
        print(f"exporting {files} files of {FILE_SIZE} bytes and starting xrootd ...",
              file=sys.stderr, flush=True)
        counters = XRootDCounters()
        issuer = TokenIssuer() if args.token else None
        try:
            with XRootDServer(creds.pki, files=files, file_size=FILE_SIZE,
                              files_per_dir=FILES_PER_DIR, audit=args.audit,
                              extra_config=[counters.config_line], issuer=issuer,
                              startup_timeout=60.0) as server:
                creation = time.perf_counter() - started
                print(f"xrootd serving on port {server.port} after {creation:.1f} s",
                      file=sys.stderr, flush=True)
                token_file = None
                if issuer is not None:  # a day: no renewal within the benchmark
                    token_file = write_token(workdir / "bt", server.mint(lifetime=86400))
                setup = prepare(workdir, server, creds, sample=min(args.sample, files),
                                counters=counters, audit=args.audit, timeout=args.timeout,
                                baseline=baseline, token_file=token_file)
                runs = []
                for round_no, method in schedule(rounds, asyncio_rounds, rss=args.rss,
                                                 seed=not args.no_seed,
                                                 baseline=baseline is not None,
                                                 token=args.token):
                    runs.append(measure(setup, method, round_no))
                    _progress(runs[-1])
        finally:
            counters.close()
    doc = summarize(runs, setup, rss=args.rss, sample=args.sample, versions=versions,
                    creation_seconds=creation)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
