"""Memory: peak RSS of ``prestaged warm`` on a large definition, next to a small baseline.

Warms a 2,000-file definition (baseline) and a 200,000-file one (default sizes), each against a
fresh test storage process on 127.0.0.1, and reports prestaged's peak resident set size and
rate for both plus their ratio. prestaged streams the catalog through a bounded queue and keeps
only 8-byte digests per file, so the ratio should stay close to 1; a ratio that grows with the
file count means something holds per-file state.

    .venv/bin/python bench/memory.py [--files 200000] [--baseline 2000] [--json]

Exits 1 unless every file of both runs is warm and the server saw exactly one 206 per file;
exits 2 when peak RSS cannot be measured (GNU time is needed, see ``common.run_measured``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from common import (
    Credentials,
    empty_config,
    free_port,
    gnu_time,
    make_credentials,
    run_measured,
    server_problems,
    storage,
    warm_command,
    write_url_list,
)


@dataclass(frozen=True)
class Run:
    """One ``prestaged warm`` of ``files`` files; ``problems`` is empty when it was correct.

    ``files_per_second`` is ``files / wall_seconds`` (process start to exit);
    ``reported_files_per_second`` is prestaged's own figure for its warm phase.
    """

    files: int
    peak_rss_mib: Optional[float]
    wall_seconds: float
    files_per_second: float
    reported_files_per_second: Optional[float]
    cpu_seconds: float
    warm: Optional[int]
    problems: list[str]


def measure(workdir: Path, creds: Credentials, files: int, port: int, timeout: float) -> Run:
    """Write a ``files``-URL definition, warm it against a fresh storage, check and report."""
    url_list = write_url_list(workdir / f"urls-{files}.txt", f"https://127.0.0.1:{port}", files)
    config = empty_config(workdir / "prestaged.toml")
    stats_file = workdir / f"stats-{files}.json"
    with storage(creds.pki.root, stats_file, port=port) as server:
        state = workdir / f"state-{files}.db"  # new per run: every file warmed and recorded
        got = run_measured(warm_command(url_list, creds, config, "--state", str(state)),
                           timeout=timeout)
        stats = server.stop()
    problems = [] if got.returncode == 0 else [f"prestaged exited {got.returncode}"]
    warm = reported = None
    try:
        doc = json.loads(got.stdout)
        warm = doc.get("counts", {}).get("warm")
        reported = doc.get("files_per_second")
    except ValueError:
        problems.append(f"no JSON summary; stderr: {got.stderr.strip()[-300:]!r}")
    if warm != files:
        problems.append(f"counts.warm = {warm}, expected {files}")
    problems += server_problems(stats, files, redirect=False)
    stats_file.unlink()  # tens of MB at 200k files; everything needed is in `Run`
    return Run(
        files=files,
        peak_rss_mib=None if got.peak_rss_mib is None else round(got.peak_rss_mib, 1),
        wall_seconds=round(got.elapsed, 3),
        files_per_second=round(files / got.elapsed, 1),
        reported_files_per_second=reported,
        cpu_seconds=round(got.cpu_seconds, 2),
        warm=warm,
        problems=problems,
    )


def summarize(baseline: Run, large: Run) -> dict[str, Any]:
    """The JSON document: both runs, the RSS ratio large/baseline and growth per 100k files."""
    ratio = growth = None
    if baseline.peak_rss_mib and large.peak_rss_mib:
        ratio = round(large.peak_rss_mib / baseline.peak_rss_mib, 3)
        extra = (large.peak_rss_mib - baseline.peak_rss_mib) / (large.files - baseline.files)
        growth = round(extra * 100_000, 2)
    return {
        "baseline": asdict(baseline),
        "large": asdict(large),
        "rss_ratio_large_over_baseline": ratio,
        "rss_growth_mib_per_100k_files": growth,
        "all_correct": not baseline.problems and not large.problems,
    }


def print_table(doc: dict[str, Any]) -> None:
    """The human summary: one row per run, the ratio, and any problems."""
    print(f"{'files':>8} {'peak RSS MiB':>12} {'files/s':>8} {'(warm phase)':>12} "
          f"{'wall s':>7} {'CPU s':>7} {'warm':>8}")
    for key in ("baseline", "large"):
        r = doc[key]
        rss = "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.1f}"
        print(f"{r['files']:>8} {rss:>12} {r['files_per_second']:>8.0f} "
              f"{r['reported_files_per_second'] or 0:>12.0f} {r['wall_seconds']:>7.2f} "
              f"{r['cpu_seconds']:>7.2f} {r['warm']!s:>8}")
    print(f"peak RSS ratio {doc['large']['files']}/{doc['baseline']['files']} files: "
          f"{doc['rss_ratio_large_over_baseline']} "
          f"(growth {doc['rss_growth_mib_per_100k_files']} MiB per 100k files)")
    for key in ("baseline", "large"):
        for problem in doc[key]["problems"]:
            print(f"INCORRECT {doc[key]['files']}-file run: {problem}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=200_000, help="large run (default 200000)")
    p.add_argument("--baseline", type=int, default=2_000, help="baseline run (default 2000)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before a run is killed (default 1800)")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    return p


def main() -> int:
    """Run both sizes; exit 0 if both were fully warm, 1 if not, 2 if RSS is unmeasurable."""
    args = _parser().parse_args()
    if gnu_time() is None:
        print("memory: GNU time (/usr/bin/time) is needed to measure peak RSS", file=sys.stderr)
        return 2
    if not 1 <= args.baseline < args.files:
        print("memory: need 1 <= --baseline < --files", file=sys.stderr)
        return 2
    port = free_port()
    runs = []
    with tempfile.TemporaryDirectory(prefix="prestaged-bench-mem-") as tmp:
        creds = make_credentials(Path(tmp))
        for files in (args.baseline, args.files):
            runs.append(measure(Path(tmp), creds, files, port, args.timeout))
            r = runs[-1]
            verdict = "ok" if not r.problems else "INCORRECT: " + "; ".join(r.problems)
            print(f"{r.files} files: peak RSS {r.peak_rss_mib} MiB, {r.files_per_second:.0f} "
                  f"files/s ({r.wall_seconds:.2f} s) {verdict}", file=sys.stderr, flush=True)
    doc = summarize(*runs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
