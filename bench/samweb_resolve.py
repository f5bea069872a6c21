"""SAM web resolution at scale: a 100,000-file definition, resolved and warmed on loopback.

The SAM web emulator (``python -m prestaged.testing.samweb``) and the test storage each run in
their own process on 127.0.0.1; the definition's files alternate tape (``enstore:`` with a tape
suffix) and disk (``dcache:``) locations, rewritten onto the storage by two rules. Three
measurements, each of a fresh client process (peak RSS by GNU time, see ``common``):

* ``resolve``: the library alone (``SamWebCatalog.files()`` drained as fast as possible, this
  script in ``--child`` mode): time to the first ``FileRef``, time to the last, peak RSS; for
  the large definition and for a small baseline one, so that the RSS ratio shows whether memory
  grows with the definition (it should not: batches are streamed);
* ``files``: ``prestaged files BIG`` (the CLI, every URL printed): wall time and peak RSS;
* ``warm``: ``prestaged warm BIG --json``: wall time, time from process start to the storage's
  first touch (both sides use CLOCK_MONOTONIC of this machine), peak RSS, the warm rate, and
  proof from the storage's statistics that every file was touched exactly once.

    .venv/bin/python bench/samweb_resolve.py [--files 100000] [--baseline 1000] [--json]

Exits 1 if any run resolved or warmed the wrong set of files, 2 when peak RSS cannot be
measured (no GNU time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from common import (
    Credentials,
    Measured,
    free_port,
    gnu_time,
    make_credentials,
    prestaged_command,
    run_measured,
    server_problems,
    storage,
)

BIG = "bench-big"
SMALL = "bench-small"
DOOR_PATH = "/pnfs/fnal.gov/usr/dune"
START_TIMEOUT = 60.0


# --- the SAM web emulator process --------------------------------------------------------------


def write_definitions(path: Path, files: int, baseline: int) -> Path:
    """Definitions ``BIG`` (``files`` files) and ``SMALL`` (``baseline``) for the emulator."""

    def entries(prefix: str, n: int) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            d = f"/pnfs/dune/tape_backed/dunepro/{prefix}/{i // 1000:04d}"
            loc = (f"enstore:{d}({i}@vr{i // 5000:04d}m8)" if i % 2
                   else f"dcache:{d.replace('tape_backed', 'persistent')}")
            out.append({"name": f"{prefix}_{i:07d}.root", "size": 1_500_000_000 + i,
                        "events": 100, "locations": [loc]})
        return out

    doc = {"experiment": "dune",
           "definitions": {BIG: entries("big", files), SMALL: entries("small", baseline)}}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@contextlib.contextmanager
def samweb_process(pki_dir: Path, definitions: Path) -> Iterator[str]:
    """Run the emulator for the ``with`` block; yields its base URL."""
    cmd = [sys.executable, "-m", "prestaged.testing.samweb", "--pki-dir", str(pki_dir),
           "--definitions", str(definitions)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            base_url = str(json.loads(line)["base_url"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"the SAM web emulator did not start (said {line!r})") from None
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(path: Path, base_url: str, door_port: int, batch: int, parallel: int) -> Path:
    """A prestaged config resolving through the emulator onto the storage at ``door_port``."""
    door = f"https://127.0.0.1:{door_port}{DOOR_PATH}/"
    rules = "".join(f'[[catalog.samweb.rewrite]]\nlocation = "{kind}:/pnfs/dune/"\n'
                    f'url = "{door}"\n' for kind in ("enstore", "dcache"))
    path.write_text(f'[catalog]\ndefault = "samweb"\n[catalog.samweb]\nbase_url = "{base_url}"\n'
                    f"batch = {batch}\nparallel = {parallel}\n{rules}", encoding="utf-8")
    return path


# --- child mode: the library alone --------------------------------------------------------------


async def _resolve(config: Path, definition: str, ca_dir: Path) -> dict[str, Any]:
    from prestaged.catalog.samweb import SamWebCatalog, samweb_ssl_context
    from prestaged.config import load_config

    cfg = load_config(config).catalog.samweb
    start = time.perf_counter()
    catalog = SamWebCatalog(definition, cfg, samweb_ssl_context(None, ca_dir))
    first: Optional[float] = None
    count = 0
    async for _ref in catalog.files():
        if first is None:
            first = time.perf_counter() - start
        count += 1
    return {"files": count, "unresolved": catalog.unresolved_count,
            "first_ref_seconds": first, "resolve_seconds": time.perf_counter() - start}


def child(args: argparse.Namespace) -> int:
    """``--child``: resolve one definition with the library, print one JSON line."""
    print(json.dumps(asyncio.run(_resolve(args.config, args.definition, args.ca_dir))))
    return 0


# --- the measurements ---------------------------------------------------------------------------


def _rss(m: Measured) -> Optional[float]:
    return round(m.peak_rss_mib, 1) if m.peak_rss_mib is not None else None


def measure_resolve(config: Path, creds: Credentials, definition: str, files: int,
                    timeout: float) -> dict[str, Any]:
    """The library resolving ``definition`` in a child process."""
    cmd = [sys.executable, __file__, "--child", "--config", str(config), "--definition",
           definition, "--ca-dir", str(creds.pki.ca_dir)]
    m = run_measured(cmd, timeout=timeout)
    problems = [] if m.returncode == 0 else [f"exit {m.returncode}: {m.stderr[-500:]}"]
    doc: dict[str, Any] = json.loads(m.stdout) if m.returncode == 0 else {}
    if doc and (doc["files"] != files or doc["unresolved"]):
        problems.append(f"resolved {doc['files']} ({doc['unresolved']} unresolved), "
                        f"expected {files}")
    return {"definition": definition, "files": files,
            "first_ref_seconds": _round(doc.get("first_ref_seconds")),
            "resolve_seconds": _round(doc.get("resolve_seconds")),
            "files_per_second": round(files / doc["resolve_seconds"]) if doc else None,
            "process_seconds": round(m.elapsed, 3), "peak_rss_mib": _rss(m),
            "problems": problems}


def measure_files_cli(config: Path, creds: Credentials, files: int,
                      timeout: float) -> dict[str, Any]:
    """``prestaged files BIG``: every URL printed by the real CLI."""
    cmd = prestaged_command("files", BIG, "--config", str(config), "--ca-dir",
                            str(creds.pki.ca_dir), "--proxy", str(creds.proxy))
    m = run_measured(cmd, timeout=timeout)
    lines = m.stdout.count("\n")
    problems = [] if m.returncode == 0 and lines == files else [
        f"exit {m.returncode}, {lines} URLs printed, expected {files}: {m.stderr[-300:]}"]
    return {"files": files, "wall_seconds": round(m.elapsed, 3), "peak_rss_mib": _rss(m),
            "problems": problems}


def measure_warm(workdir: Path, creds: Credentials, sam_url: str, files: int, batch: int,
                 parallel: int, timeout: float) -> dict[str, Any]:
    """``prestaged warm BIG --json`` against a fresh storage process."""
    port = free_port()
    config = write_config(workdir / "warm.toml", sam_url, port, batch, parallel)
    with storage(creds.pki.root, workdir / "storage-stats.json", port=port) as srv:
        cmd = prestaged_command("warm", BIG, "--config", str(config), "--proxy",
                                str(creds.proxy), "--ca-dir", str(creds.pki.ca_dir), "--json",
                                "--no-progress")
        started = time.monotonic()
        m = run_measured(cmd, timeout=timeout)
        stats = srv.stop()
    first_touch = min((r["time"] for p in stats["paths"].values() for r in p["records"]),
                      default=None)
    problems = server_problems(stats, files, redirect=False)
    report: dict[str, Any] = {}
    try:
        report = json.loads(m.stdout)
    except ValueError:
        problems.append(f"exit {m.returncode}, no JSON: {m.stderr[-300:]}")
    if report.get("counts", {}).get("warm") != files:
        problems.append(f"warm {report.get('counts', {}).get('warm')}, expected {files}")
    return {"files": files, "wall_seconds": round(m.elapsed, 3),
            "first_touch_seconds": _round(first_touch - started if first_touch else None),
            "reported_files_per_second": report.get("files_per_second"),
            "peak_rss_mib": _rss(m), "cpu_seconds": round(m.cpu_seconds, 2),
            "problems": problems}


def _round(value: Optional[float]) -> Optional[float]:
    return round(value, 3) if value is not None else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the JSON document."""
    with tempfile.TemporaryDirectory(prefix="bench-samweb-") as tmp:
        workdir = Path(tmp)
        creds = make_credentials(workdir)
        defs = write_definitions(workdir / "definitions.json", args.files, args.baseline)
        with samweb_process(creds.pki.root, defs) as sam_url:
            resolve_cfg = write_config(workdir / "resolve.toml", sam_url, 1, args.batch,
                                       args.parallel)
            small = measure_resolve(resolve_cfg, creds, SMALL, args.baseline, args.timeout)
            big = measure_resolve(resolve_cfg, creds, BIG, args.files, args.timeout)
            files_cli = measure_files_cli(resolve_cfg, creds, args.files, args.timeout)
            warm = measure_warm(workdir, creds, sam_url, args.files, args.batch, args.parallel,
                                args.timeout)
    ratio = (round(big["peak_rss_mib"] / small["peak_rss_mib"], 2)
             if big["peak_rss_mib"] and small["peak_rss_mib"] else None)
    return {"files": args.files, "baseline": args.baseline, "batch": args.batch,
            "parallel": args.parallel, "resolve_small": small, "resolve": big,
            "resolve_rss_ratio": ratio, "files_cli": files_cli, "warm": warm}


def print_table(doc: dict[str, Any]) -> None:
    """The human summary."""
    small, big, cli, warm = doc["resolve_small"], doc["resolve"], doc["files_cli"], doc["warm"]
    print(f"SAM web resolution, {doc['files']} files (batch {doc['batch']}, "
          f"{doc['parallel']} in flight), emulator and storage on 127.0.0.1")
    print(f"  library, {big['files']} files : first FileRef {big['first_ref_seconds']} s, "
          f"all {big['resolve_seconds']} s ({big['files_per_second']} files/s), "
          f"peak RSS {big['peak_rss_mib']} MiB")
    print(f"  library, {small['files']} files   : first FileRef {small['first_ref_seconds']} s, "
          f"all {small['resolve_seconds']} s, peak RSS {small['peak_rss_mib']} MiB "
          f"(RSS ratio {doc['resolve_rss_ratio']})")
    print(f"  prestaged files        : {cli['wall_seconds']} s wall, "
          f"peak RSS {cli['peak_rss_mib']} MiB")
    print(f"  prestaged warm         : first touch {warm['first_touch_seconds']} s after start, "
          f"{warm['wall_seconds']} s wall, {warm['reported_files_per_second']} files/s, "
          f"peak RSS {warm['peak_rss_mib']} MiB")
    for name in ("resolve_small", "resolve", "files_cli", "warm"):
        for problem in doc[name]["problems"]:
            print(f"  PROBLEM ({name}): {problem}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000, help="large definition (default 100000)")
    p.add_argument("--baseline", type=int, default=1_000, help="small definition (default 1000)")
    p.add_argument("--batch", type=int, default=500, help="catalog.samweb.batch (default 500)")
    p.add_argument("--parallel", type=int, default=4, help="catalog.samweb.parallel (default 4)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--definition", help=argparse.SUPPRESS)
    p.add_argument("--ca-dir", type=Path, help=argparse.SUPPRESS)
    return p


def main() -> int:
    """Run the benchmark; see the module docstring for exit codes."""
    args = _parser().parse_args()
    if args.child:
        return child(args)
    if gnu_time() is None:
        print("peak RSS needs GNU time (/usr/bin/time)", file=sys.stderr)
        return 2
    doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    failed = any(doc[k]["problems"] for k in ("resolve_small", "resolve", "files_cli", "warm"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
