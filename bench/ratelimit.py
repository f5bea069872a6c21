"""Rate limits: ``prestaged warm`` at a dCache door that limits request rates (dCache 11.2+).

dCache 11.2 and later allow each client 250 requests a second at a door (``webdav.limits.rate``:
1,000 in all, a quarter per client, Guava's ``SmoothBursty`` with no permits stored at first)
and answer 429 with a ``Retry-After`` of 1 to 9 s beyond that. The dCache emulator keeps those
limits with ``--rate-overall 1000`` (its own process on 127.0.0.1, a FRESH one for every
measured run, so every run meets a client limiter with nothing stored). The dataset is N files
on disk (no tape), 1 KiB each.

Clients, interleaved in every round so that drift of the machine hits all of them:

* ``prestaged``: this tree, built-in defaults (32 files in flight, no ``storage.rate``);
* ``rate240``: this tree with ``[storage] rate = 240``, a fixed pace just under dCache's
  per-client limit (what the README advised before the pacer learned rates);
* ``baseline`` (with ``--baseline DIR``): prestaged from another source tree, defaults.

With ``--runs K`` (K >= 2) each measured process is a daemon's situation instead: this
script's ``--child`` mode warms the N files as K runs at once (file i in run i mod K) through
the daemon's touch path (``SharedToucher``, 32 files in flight in all). Clients:

* ``shared``: this tree, one ``pacing.Rates`` for the K runs (what the daemon does);
* ``separate``: this tree, a request-rate cap per run (each run learns its own);
* ``baseline`` (with ``--baseline DIR``): the other tree, its own pacing per run.

Each run must exit 0 with every file warm (exit 1 otherwise). Reported per client: median wall
seconds and files/s (N / wall, interpreter start-up included), answers 429 (the emulator's
count), the request rate cap the run reported (``endpoints``), and the concurrency it ended at.

    .venv/bin/python bench/ratelimit.py [--files 4000] [--rounds 3] [--runs K] [--baseline DIR]
                                        [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from common import Credentials, make_credentials, median, run_measured, stop_server, warm_command

from prestaged.testing.dcache.dataset import synthetic

DCACHE_RATE = 1000.0
"""``webdav.limits.rate.overall``: dCache 11.2's default (a quarter of it per client)."""
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
READY_POLL = 0.05
PRESTAGED, RATE240, BASELINE = "prestaged", "rate240", "baseline"
SHARED, SEPARATE = "shared", "separate"
IN_FLIGHT = 32
"""Files in flight in all (``storage.concurrency``), also for K runs at once."""


@dataclass(frozen=True)
class Run:
    """One client's run against a fresh emulator."""

    client: str
    round: int
    seconds: float
    cpu_seconds: float
    returncode: int
    warm: int
    answers_429: int
    door_requests: int
    endpoints: dict[str, Any]

    @property
    def correct(self) -> bool:
        return self.returncode == 0


def _emulator(creds: Credentials, rundir: Path, files: int) -> tuple[subprocess.Popen[bytes],
                                                                     str, Path]:
    ready, stats = rundir / "ready.json", rundir / "stats.json"
    cmd = [sys.executable, "-m", "prestaged.testing.dcache", "--pki-dir", str(creds.pki.root),
           "--ready-file", str(ready), "--stats-file", str(stats), "--files", str(files),
           "--tape-fraction", "0", "--size", "1024", "--rate-overall", str(DCACHE_RATE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the dCache emulator exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the dCache emulator was not ready after {READY_TIMEOUT} s")
        time.sleep(READY_POLL)
    return proc, json.loads(ready.read_text())["door_url"], stats


def measure(client: str, round_no: int, *, files: int, creds: Credentials, workdir: Path,
            baseline: Optional[Path], timeout: float, runs: int = 1) -> Run:
    """One run of ``client`` against a fresh emulator at dCache's default rates (with ``runs``
    > 1: ``runs`` warm runs at once in one ``--child`` process)."""
    rundir = workdir / f"{client}-{round_no}"
    rundir.mkdir()
    config = rundir / "prestaged.toml"
    config.write_text("[storage]\nrate = 240\n" if client == RATE240 else "# defaults\n")
    env = None
    if client == BASELINE:
        env = {**os.environ, "PYTHONPATH": str(baseline)}  # its package before the installed
    proc, door, stats_file = _emulator(creds, rundir, files)
    try:
        urls = rundir / "urls.txt"
        urls.write_text("".join(door + f.path + "\n"
                                for f in synthetic(files, tape_fraction=0.0, tapes=20)))
        # --retries 50: every 429 is tried again after its Retry-After, whatever the client.
        if runs > 1:
            cmd = [sys.executable, __file__, "--child", str(urls), "--proxy", str(creds.proxy),
                   "--ca-dir", str(creds.pki.ca_dir), "--runs", str(runs),
                   *(["--separate"] if client == SEPARATE else [])]
        else:
            cmd = warm_command(urls, creds, config, "--retries", "50", "--no-state")
        got = run_measured(cmd, timeout=timeout, env=env)
    finally:
        doc = stop_server(proc, stats_file, STOP_TIMEOUT, "the dCache emulator")
    try:
        report = json.loads(got.stdout)
    except ValueError:
        report = {}
    stats = doc["stats"]
    door = sum(n for kind, n in stats["requests"].items() if kind.startswith("door:"))
    return Run(client=client, round=round_no, seconds=round(got.elapsed, 2),
               cpu_seconds=round(got.cpu_seconds, 2), returncode=got.returncode,
               warm=report.get("counts", {}).get("warm", 0),
               answers_429=stats["throttled"].get("door", 0), door_requests=door,
               endpoints=report.get("endpoints", {}))


async def _child_runs(urls: list[str], proxy: Path, ca_dir: Path, runs: int,
                     separate: bool) -> dict[str, Any]:
    """``runs`` warm runs at once over ``urls`` through one touch path (``IN_FLIGHT`` files
    in flight in all), with one ``Rates`` unless ``separate`` or the tree has none."""
    import asyncio

    from prestaged.credentials import load_credentials
    from prestaged.model import FileRef
    from prestaged.retry import RetryPolicy
    from prestaged.service.toucher import SharedToucher
    from prestaged.storage.http import HttpToucher
    from prestaged.warm import WarmSettings, warm

    try:
        from prestaged.pacing import Rates
        shared: dict[str, Any] = {} if separate else {"rates": Rates()}
    except ImportError:  # a tree from before pacing.Rates
        shared = {}

    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=ca_dir,
                             ca_dir_configured=None, min_lifetime=60)

    async def refs(part: list[str]) -> Any:
        for u in part:
            yield FileRef(name=u.rsplit("/", 1)[-1], url=u)

    settings = WarmSettings(concurrency=IN_FLIGHT, retry=RetryPolicy(attempts=50, total=600.0))
    # The daemon's own touch path: one pool, IN_FLIGHT touches in all across the runs.
    toucher = SharedToucher(lambda tls: HttpToucher(tls, limit=IN_FLIGHT,
                                                    limit_per_host=IN_FLIGHT, timeout=60),
                            IN_FLIGHT)
    await toucher.install(creds.ssl_context())
    toucher.valid.set()
    try:
        reports = await asyncio.gather(*(warm(refs(urls[i::runs]), settings, toucher, **shared)
                                         for i in range(runs)))
    finally:
        await toucher.close()
    endpoints: dict[str, Any] = {}
    for i, r in enumerate(reports):
        for ep, pace in r.tally.paced.items():
            rate: Optional[float] = getattr(pace, "rate", None)  # None in an older tree too
            endpoints[f"run {i}: {ep}"] = {
                "concurrency": pace.limit, "rate": None if rate is None else round(rate, 1),
                "rate_cuts": getattr(pace, "rate_cuts", None), "backoffs": pace.cuts}
    warm_files = sum(r.tally.results["warm"] for r in reports)
    return {"counts": {"warm": warm_files}, "endpoints": endpoints,
            "exit_codes": [r.exit_code for r in reports]}


def child(args: argparse.Namespace) -> int:
    """``--child``: print the K runs' JSON summary; exit 0 when every run did."""
    import asyncio

    urls = Path(args.child).read_text().split()
    doc = asyncio.run(_child_runs(urls, args.proxy, args.ca_dir, args.runs, args.separate))
    json.dump(doc, sys.stdout)
    return 0 if set(doc["exit_codes"]) == {0} else 1


def summarize(runs: list[Run], files: int, clients: list[str],
              runs_at_once: int = 1) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for client in clients:
        mine = [r for r in runs if r.client == client]
        rows[client] = {
            "seconds": median([r.seconds for r in mine]),
            "files_per_second": round(median([files / r.seconds for r in mine]), 1),
            "answers_429": median([r.answers_429 for r in mine]),
            "cpu_seconds": median([r.cpu_seconds for r in mine]),
            "rounds_seconds": [r.seconds for r in mine],
        }
    doc: dict[str, Any] = {"files": files, "rate_per_client": DCACHE_RATE / 4,
                           "runs_at_once": runs_at_once,
                           "clients": rows, "runs": [asdict(r) for r in runs],
                           "all_correct": all(r.correct and r.warm == files for r in runs)}
    if BASELINE in rows:
        ours = PRESTAGED if PRESTAGED in rows else SHARED
        pairs = [(a.seconds, b.seconds) for a in runs for b in runs
                 if a.client == BASELINE and b.client == ours and a.round == b.round]
        doc["ratio_baseline_over_prestaged_seconds"] = round(median([a / b for a, b in pairs]),
                                                             2)
    return doc


def print_table(doc: dict[str, Any]) -> None:
    print(f"rate limits: {doc['files']} files on disk, the dCache emulator at dCache 11.2's "
          f"default rates ({doc['rate_per_client']:.0f} requests/s a client), a fresh one per "
          f"run; {doc['runs_at_once']} warm run(s) at once")
    print(f"{'client':<10} {'median s':>9} {'files/s':>8} {'429s':>6} {'CPU s':>6}  rounds s")
    for client, row in doc["clients"].items():
        each = ", ".join(f"{s:.1f}" for s in row["rounds_seconds"])
        print(f"{client:<10} {row['seconds']:>9.2f} {row['files_per_second']:>8.1f} "
              f"{row['answers_429']:>6.0f} {row['cpu_seconds']:>6.2f}  {each}")
    if "ratio_baseline_over_prestaged_seconds" in doc:
        print(f"baseline / prestaged time (median of rounds): "
              f"{doc['ratio_baseline_over_prestaged_seconds']:.2f}")
    for r in doc["runs"]:
        if not (r["returncode"] == 0 and r["warm"] == doc["files"]):
            print(f"INCORRECT {r['client']} round {r['round']}: exit {r['returncode']}, "
                  f"{r['warm']} warm")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=4000, help="files on disk (default 4000)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each client (default 3)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="another source tree to run as the client 'baseline'")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run (600)")
    p.add_argument("--runs", type=int, default=1,
                   help="warm runs at once in one process, as the daemon makes them (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    p.add_argument("--child", metavar="URLS", help=argparse.SUPPRESS)
    p.add_argument("--proxy", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ca-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--separate", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return child(args)
    if args.baseline is not None and not (args.baseline / "prestaged" / "__init__.py").is_file():
        print(f"ratelimit: --baseline {args.baseline}: no prestaged/__init__.py there",
              file=sys.stderr)
        return 2
    mine = [PRESTAGED, RATE240] if args.runs == 1 else [SHARED, SEPARATE]
    clients = [*mine, *([BASELINE] if args.baseline is not None else [])]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="prestaged-ratelimit-") as tmp:
        workdir = Path(tmp)
        creds = make_credentials(workdir / "creds")
        for round_no in range(args.rounds):
            # Rotate the order every round, so that no client always runs first.
            order = clients[round_no % len(clients):] + clients[:round_no % len(clients)]
            for client in order:
                run = measure(client, round_no, files=args.files, creds=creds,
                              workdir=workdir, baseline=args.baseline, timeout=args.timeout,
                              runs=args.runs)
                runs.append(run)
                print(f"round {round_no} {client:<9}: {run.seconds:.2f} s, {run.warm} warm, "
                      f"{run.answers_429} answers 429, endpoints {run.endpoints}",
                      file=sys.stderr, flush=True)
    doc = summarize(runs, args.files, clients, args.runs)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
