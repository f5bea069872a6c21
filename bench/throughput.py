"""Throughput: ``prestaged warm`` against ``curl --parallel`` on the same URLs, same concurrency.

Both clients touch the first 4 bytes (``Range: bytes=0-3``) of the same N files (default
20,000) on the test storage at 127.0.0.1, presenting the same RFC 3820 proxy, 32 transfers in
flight. Each measured run gets a fresh storage process (same port, so literally the same URLs),
whose statistics prove that the run did the work: one request per file, all answered 206.
Runs alternate (prestaged, curl, prestaged, curl, ...) so that drift of the machine hits both.

What is timed is the whole client process, as a user runs it: for prestaged, interpreter start,
imports, proxy checks, reading the URL list, the warm and the JSON summary; for curl, parsing
its config file of N entries and the transfers.

``--postgresql`` adds the client ``postgresql``: prestaged warm (with state) keeping its state
in a throw-away PostgreSQL (the test kit, ``prestaged.testing.postgres``; a fresh database per
run), so the two backends' cost can be compared with ``no-state``.

``--baseline DIR`` adds a fourth client in every round: prestaged from another source tree
(e.g. ``git archive OLD prestaged | tar -x -C DIR``) through ``PYTHONPATH``, so that a change
is measured against the code before it on the same machine, interleaved, in one run. With
``--postgresql`` too, ``baseline-postgresql`` (that tree with its state in PostgreSQL) is added
and compared with ``postgresql``.

``--python EXE`` adds this tree's prestaged run by another interpreter, whose environment has
it installed (``.venv-py39/bin/python``, which ``tests/test_pythons.py`` builds): the grid
nodes' Python 3.9 against this one, interleaved, reported as ``ratio prestaged/pythonX.Y``.

    .venv/bin/python bench/throughput.py [--files 20000] [--rounds 3] [--redirect]
        [--baseline DIR] [--postgresql] [--python EXE] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from common import (
    Credentials,
    Measured,
    empty_config,
    free_port,
    make_credentials,
    median,
    run_measured,
    server_problems,
    storage,
    url_for,
    warm_command,
    write_url_list,
)

CONCURRENCY = 32
PRESTAGED = "prestaged"
NO_STATE = "no-state"
"""prestaged warm --no-state: the same run without the state database (issue 5's baseline)."""
CURL = "curl"
BASELINE = "baseline"
"""prestaged warm (with state) of the --baseline tree."""
POSTGRES = "postgresql"
"""prestaged warm with [state] url: a fresh database on a throw-away PostgreSQL."""
BASELINE_POSTGRES = "baseline-postgresql"
"""The same with the --baseline tree (with both --baseline and --postgresql)."""
CLIENTS = (PRESTAGED, NO_STATE, CURL)
PRESTAGED_CLIENTS = (PRESTAGED, NO_STATE, BASELINE, POSTGRES, BASELINE_POSTGRES)


@dataclass(frozen=True)
class Setup:
    """Everything a measured run needs; built once, shared by every run."""

    creds: Credentials
    workdir: Path
    files: int
    redirect: bool
    port: int
    url_list: Path
    curl_config: Path
    prestaged_config: Path
    curl: str
    timeout: float
    baseline: Optional[Path] = None
    postgres: Any = None
    """A running ``PostgresCluster`` for the ``postgresql`` client, or None."""
    python: Optional[Path] = None
    """Another interpreter (``--python``) running this tree's prestaged, or None."""
    python_client: str = ""
    """Its client name: ``python`` and its version (``python3.9.18``)."""

    @property
    def clients(self) -> tuple[str, ...]:
        """The clients of each round, in the order they run."""
        both = self.baseline is not None and self.postgres is not None
        return (*CLIENTS, *([BASELINE] if self.baseline is not None else []),
                *([POSTGRES] if self.postgres is not None else []),
                *([BASELINE_POSTGRES] if both else []),
                *([self.python_client] if self.python is not None else []))


@dataclass(frozen=True)
class Run:
    """One measured run of one client; ``problems`` is empty when the run was correct.

    ``files_per_second`` is ``files / wall_seconds`` (process start to exit);
    ``reported_files_per_second`` is prestaged's own figure (its warm phase only; None for curl).
    """

    client: str
    round: int
    files: int
    wall_seconds: float
    files_per_second: float
    cpu_seconds: float
    peak_rss_mib: Optional[float]
    server_requests: int
    server_cpu_seconds: float
    reported_files_per_second: Optional[float]
    problems: list[str]


# --- set-up ------------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    """``text`` as a double-quoted curl config value."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_curl_config(path: Path, base_url: str, files: int, creds: Credentials,
                      *, redirect: bool) -> Path:
    """Write a curl config: global options first (curl applies them to every later URL), then
    one ``url``/``output`` pair per file, the same URLs as ``write_url_list``."""
    head = [
        "# global options: placed before the first url, they apply to every transfer",
        f"cert = {_quoted(str(creds.proxy))}",
        f"key = {_quoted(str(creds.proxy))}",
        f"capath = {_quoted(str(creds.pki.ca_dir))}",
        'header = "Range: bytes=0-3"',
        'write-out = "%{http_code}\\n"',
    ]
    if redirect:
        head.append("location")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(head) + "\n")
        for n in range(files):
            fh.write(f"url = {_quoted(url_for(base_url, n))}\noutput = \"/dev/null\"\n")
    return path


def prepare(workdir: Path, files: int, *, redirect: bool, curl: str, timeout: float,
            baseline: Optional[Path] = None) -> Setup:
    """Make credentials, pick the door port and write the URL list and the curl config."""
    creds = make_credentials(workdir)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    return Setup(
        creds=creds,
        workdir=workdir,
        files=files,
        redirect=redirect,
        port=port,
        url_list=write_url_list(workdir / "urls.txt", base, files),
        curl_config=write_curl_config(workdir / "curl.cfg", base, files, creds,
                                      redirect=redirect),
        prestaged_config=empty_config(workdir / "prestaged.toml"),
        curl=curl,
        timeout=timeout,
        baseline=baseline,
    )


# --- the two clients ---------------------------------------------------------------------------


def _prestaged_problems(setup: Setup, got: Measured) -> tuple[list[str], Optional[float]]:
    """Check prestaged's exit code and JSON summary; also return its own files/s figure."""
    problems = [] if got.returncode == 0 else [f"prestaged exited {got.returncode}"]
    try:
        doc = json.loads(got.stdout)
    except ValueError:
        return [*problems, f"no JSON summary; stderr: {got.stderr.strip()[-300:]!r}"], None
    warm = doc.get("counts", {}).get("warm")
    if warm != setup.files:
        problems.append(f"prestaged counts.warm = {warm}, expected {setup.files}")
    return problems, doc.get("files_per_second")


def _curl_problems(setup: Setup, got: Measured) -> list[str]:
    """Check curl's exit code and the ``%{http_code}`` it wrote for every transfer."""
    problems = [] if got.returncode == 0 else [f"curl exited {got.returncode}"]
    codes = Counter(got.stdout.split())
    if codes != Counter({"206": setup.files}):
        problems.append(f"curl statuses {dict(codes)}, expected {{'206': {setup.files}}}")
    return problems


def measure(setup: Setup, client: str, round_no: int) -> Run:
    """One run of ``client`` against a fresh storage process; checked against its stats."""
    env = None
    if client in PRESTAGED_CLIENTS:
        # A new state per run: every file is warmed (none is fresh) and recorded.
        config = setup.prestaged_config
        state = (["--no-state"] if client == NO_STATE
                 else ["--state", str(setup.workdir / f"state-{client}-{round_no}.db")])
        if client in (POSTGRES, BASELINE_POSTGRES):
            tag = "base_" if client == BASELINE_POSTGRES else ""
            url = setup.postgres.create_database(f"bench_{tag}{round_no}")
            config = setup.workdir / f"pg-{tag}{round_no}.toml"
            config.write_text(f"[state]\nurl = {json.dumps(url)}\n", encoding="utf-8")
            state = []
        cmd = warm_command(setup.url_list, setup.creds, config,
                           "--concurrency", str(CONCURRENCY), "--per-host", str(CONCURRENCY),
                           *state)
        if client in (BASELINE, BASELINE_POSTGRES):
            # Its package first on the path, before the installed one.
            env = {**os.environ, "PYTHONPATH": str(setup.baseline)}
    elif setup.python is not None and client == setup.python_client:
        script = setup.python.parent / "prestaged"  # its console script, as a user runs it
        mine = warm_command(setup.url_list, setup.creds, setup.prestaged_config,
                            "--concurrency", str(CONCURRENCY), "--per-host", str(CONCURRENCY),
                            "--state", str(setup.workdir / f"state-{client}-{round_no}.db"))
        cmd = [*([str(script)] if script.is_file() else [str(setup.python), "-m", "prestaged"]),
               *mine[mine.index("warm"):]]
    else:
        cmd = [setup.curl, "--no-progress-meter", "--parallel", "--parallel-max",
               str(CONCURRENCY), "--config", str(setup.curl_config)]
    stats_file = setup.workdir / f"stats-{client}-{round_no}.json"
    with storage(setup.creds.pki.root, stats_file, redirect=setup.redirect,
                 port=setup.port) as server:
        got = run_measured(cmd, timeout=setup.timeout, env=env)
        stats = server.stop()
    reported = None
    if client in PRESTAGED_CLIENTS or client == setup.python_client:
        problems, reported = _prestaged_problems(setup, got)
    else:
        problems = _curl_problems(setup, got)
    problems += server_problems(stats, setup.files, redirect=setup.redirect)
    stats_file.unlink()  # tens of MB at large N; everything needed is in `Run`
    return Run(
        client=client,
        round=round_no,
        files=setup.files,
        wall_seconds=round(got.elapsed, 3),
        files_per_second=round(setup.files / got.elapsed, 1),
        cpu_seconds=round(got.cpu_seconds, 2),
        peak_rss_mib=None if got.peak_rss_mib is None else round(got.peak_rss_mib, 1),
        server_requests=int(stats.get("requests_total", 0)),
        server_cpu_seconds=round(stats["cpu_seconds"], 2),
        reported_files_per_second=reported,
        problems=problems,
    )


# --- reporting ---------------------------------------------------------------------------------


def summarize(runs: list[Run], setup: Setup, curl_version: str) -> dict[str, Any]:
    """The JSON document: every run, per-client medians and the prestaged/curl ratio."""
    per: dict[str, dict[str, Optional[float]]] = {}
    for client in setup.clients:
        mine = [r for r in runs if r.client == client]
        rss = [r.peak_rss_mib for r in mine if r.peak_rss_mib is not None]
        per[client] = {
            "median_files_per_second": round(median([r.files_per_second for r in mine]), 1),
            "median_wall_seconds": round(median([r.wall_seconds for r in mine]), 3),
            "median_cpu_seconds": round(median([r.cpu_seconds for r in mine]), 2),
            "median_server_cpu_seconds": round(median([r.server_cpu_seconds for r in mine]), 2),
            "max_peak_rss_mib": max(rss) if rss else None,
        }
    ratio = (per[PRESTAGED]["median_files_per_second"] or 0.0) / (
        per[CURL]["median_files_per_second"] or 1.0)
    state_cost = 1.0 - (per[PRESTAGED]["median_files_per_second"] or 0.0) / (
        per[NO_STATE]["median_files_per_second"] or 1.0)
    extra: dict[str, Any] = {}
    if setup.postgres is not None:
        extra["postgresql_state_cost_fraction"] = round(1.0 - (
            per[POSTGRES]["median_files_per_second"] or 0.0) / (
            per[NO_STATE]["median_files_per_second"] or 1.0), 3)
    if setup.baseline is not None:
        # Per round, then the median: pairs measured minutes apart share the machine's drift.
        extra["baseline"] = str(setup.baseline)
        for new, old, key in ((PRESTAGED, BASELINE, "prestaged"),
                              (POSTGRES, BASELINE_POSTGRES, "postgresql")):
            pairs = [(r.files_per_second, b.files_per_second) for r in runs for b in runs
                     if r.client == new and b.client == old and r.round == b.round]
            if pairs:
                extra[f"ratio_{key}_over_baseline"] = round(median([a / b for a, b in pairs]), 3)
                extra[f"ratio_{key}_per_round"] = [round(a / b, 3) for a, b in pairs]
    if setup.python is not None:
        name = setup.python_client
        pairs = [(r.files_per_second, b.files_per_second) for r in runs for b in runs
                 if r.client == PRESTAGED and b.client == name and r.round == b.round]
        extra["python"] = {"client": name, "executable": str(setup.python),
                           "ratio_prestaged_over_it": round(median([a / b for a, b in pairs]), 3),
                           "ratio_per_round": [round(a / b, 3) for a, b in pairs]}
    return {
        "files": setup.files,
        "rounds": len(runs) // len(setup.clients),
        "concurrency": CONCURRENCY,
        "redirect": setup.redirect,
        "curl_version": curl_version,
        "clients": per,
        "ratio_prestaged_over_curl": round(ratio, 3),
        "state_cost_fraction": round(state_cost, 3),
        "all_correct": all(not r.problems for r in runs),
        **extra,
        "runs": [asdict(r) for r in runs],
    }


def print_table(doc: dict[str, Any]) -> None:
    """The human summary: one row per client, then the ratio and any problems."""
    mode = "door->pool redirect" if doc["redirect"] else "direct"
    print(f"throughput: {doc['files']} files x {doc['rounds']} rounds, concurrency "
          f"{doc['concurrency']}, {mode}; {doc['curl_version']}")
    print(f"{'client':<19} {'median files/s':>14} {'runs files/s':>22} {'wall s':>7} "
          f"{'CPU s':>6} {'server CPU s':>12} {'RSS MiB':>8}")
    for client, row in doc["clients"].items():
        each = ", ".join(f"{r['files_per_second']:.0f}" for r in doc["runs"]
                         if r["client"] == client)
        print(f"{client:<19} {row['median_files_per_second']:>14.0f} {each:>22} "
              f"{row['median_wall_seconds']:>7.2f} {row['median_cpu_seconds']:>6.2f} "
              f"{row['median_server_cpu_seconds']:>12.2f} {_mib(row['max_peak_rss_mib']):>8}")
    print(f"ratio prestaged/curl (median files/s): {doc['ratio_prestaged_over_curl']:.2f}")
    print(f"state cost (1 - prestaged/no-state, median files/s): "
          f"{100 * doc['state_cost_fraction']:.1f}%")
    if "postgresql_state_cost_fraction" in doc:
        print(f"PostgreSQL state cost (1 - postgresql/no-state, median files/s): "
              f"{100 * doc['postgresql_state_cost_fraction']:.1f}%")
    for key in ("prestaged", "postgresql"):
        if f"ratio_{key}_over_baseline" in doc:
            rounds = ", ".join(f"{r:.2f}" for r in doc[f"ratio_{key}_per_round"])
            print(f"ratio {key}/baseline {doc['baseline']} (median of rounds): "
                  f"{doc[f'ratio_{key}_over_baseline']:.3f} ({rounds})")
    if "python" in doc:
        other = doc["python"]
        rounds = ", ".join(f"{r:.2f}" for r in other["ratio_per_round"])
        print(f"ratio prestaged/{other['client']} ({other['executable']}; median of rounds): "
              f"{other['ratio_prestaged_over_it']:.3f} ({rounds})")
    for r in doc["runs"]:
        for problem in r["problems"]:
            print(f"INCORRECT {r['client']} round {r['round']}: {problem}")


def _mib(value: Optional[float]) -> str:
    """A MiB figure for display; ``n/a`` without GNU time."""
    return "n/a" if value is None else f"{value:.1f}"


def _progress(run: Run) -> None:
    verdict = "ok" if not run.problems else "INCORRECT: " + "; ".join(run.problems)
    print(f"round {run.round} {run.client:<19}: {run.files} files in {run.wall_seconds:.2f} s = "
          f"{run.files_per_second:.0f} files/s (CPU {run.cpu_seconds:.2f} s, peak RSS "
          f"{_mib(run.peak_rss_mib)} MiB; server: {run.server_requests} requests, CPU "
          f"{run.server_cpu_seconds:.2f} s) {verdict}",
          file=sys.stderr, flush=True)


# --- main --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20_000, help="files per run (default 20000)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each client (default 3)")
    p.add_argument("--redirect", action="store_true",
                   help="storage door redirects to a pool (curl gets -L)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a client run is killed (default 600)")
    p.add_argument("--curl", default="curl", help="curl executable (default: curl on PATH)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also run prestaged from this source tree (its prestaged/ package) in "
                        "every round, and report the ratio")
    p.add_argument("--postgresql", action="store_true",
                   help="also run prestaged with its state in a throw-away PostgreSQL "
                        "(needs Debian's postgresql and psycopg)")
    p.add_argument("--python", type=Path, metavar="EXE",
                   help="also run this tree's prestaged with this interpreter (its environment "
                        "must have prestaged installed, e.g. .venv-py39/bin/python)")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    return p


def main() -> int:
    """Run the benchmark; exit 0 if every run was correct, 1 if not, 2 on bad usage."""
    args = _parser().parse_args()
    curl = shutil.which(args.curl)
    if curl is None:
        print(f"throughput: {args.curl} not found", file=sys.stderr)
        return 2
    if args.files < 1 or args.rounds < 1:
        print("throughput: --files and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.baseline is not None and not (args.baseline / "prestaged" / "__init__.py").is_file():
        print(f"throughput: --baseline {args.baseline}: no prestaged/__init__.py there",
              file=sys.stderr)
        return 2
    other = ""
    if args.python is not None:
        probe = subprocess.run([str(args.python), "-c", "import platform, prestaged; "
                                "print(platform.python_version())"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            print(f"throughput: --python {args.python}: cannot import prestaged with it",
                  file=sys.stderr)
            return 2
        other = probe.stdout.strip()
    version = subprocess.run([curl, "--version"], capture_output=True, text=True, check=True)
    curl_version = version.stdout.split("\n", 1)[0]
    with tempfile.TemporaryDirectory(prefix="prestaged-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        setup = prepare(Path(tmp), args.files, redirect=args.redirect, curl=curl,
                        timeout=args.timeout, baseline=args.baseline)
        if args.python is not None:
            setup = replace(setup, python=args.python, python_client=f"python{other}")
        if args.postgresql:
            from prestaged.testing.postgres import PostgresCluster

            setup = replace(setup, postgres=stack.enter_context(PostgresCluster()))
        runs = []
        for round_no in range(1, args.rounds + 1):
            for client in setup.clients:
                runs.append(measure(setup, client, round_no))
                _progress(runs[-1])
    doc = summarize(runs, setup, curl_version)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
