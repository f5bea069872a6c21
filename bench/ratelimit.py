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

Each run must exit 0 with every file warm (exit 1 otherwise). Reported per client: median wall
seconds and files/s (N / wall, interpreter start-up included), answers 429 (the emulator's
count), the request rate cap the run reported (``endpoints``), and the concurrency it ended at.

    .venv/bin/python bench/ratelimit.py [--files 4000] [--rounds 3] [--baseline DIR] [--json]
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
            baseline: Optional[Path], timeout: float) -> Run:
    """One run of ``client`` against a fresh emulator at dCache's default rates."""
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


def summarize(runs: list[Run], files: int, clients: list[str]) -> dict[str, Any]:
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
                           "clients": rows, "runs": [asdict(r) for r in runs],
                           "all_correct": all(r.correct and r.warm == files for r in runs)}
    if BASELINE in rows:
        pairs = [(a.seconds, b.seconds) for a in runs for b in runs
                 if a.client == BASELINE and b.client == PRESTAGED and a.round == b.round]
        doc["ratio_baseline_over_prestaged_seconds"] = round(median([a / b for a, b in pairs]),
                                                             2)
    return doc


def print_table(doc: dict[str, Any]) -> None:
    print(f"rate limits: {doc['files']} files on disk, the dCache emulator at dCache 11.2's "
          f"default rates ({doc['rate_per_client']:.0f} requests/s a client), a fresh one per "
          "run")
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
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    args = p.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "prestaged" / "__init__.py").is_file():
        print(f"ratelimit: --baseline {args.baseline}: no prestaged/__init__.py there",
              file=sys.stderr)
        return 2
    clients = [PRESTAGED, RATE240, *([BASELINE] if args.baseline is not None else [])]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="prestaged-ratelimit-") as tmp:
        workdir = Path(tmp)
        creds = make_credentials(workdir / "creds")
        for round_no in range(args.rounds):
            # Rotate the order every round, so that no client always runs first.
            order = clients[round_no % len(clients):] + clients[:round_no % len(clients)]
            for client in order:
                run = measure(client, round_no, files=args.files, creds=creds,
                              workdir=workdir, baseline=args.baseline, timeout=args.timeout)
                runs.append(run)
                print(f"round {round_no} {client:<9}: {run.seconds:.2f} s, {run.warm} warm, "
                      f"{run.answers_429} answers 429, endpoints {run.endpoints}",
                      file=sys.stderr, flush=True)
    doc = summarize(runs, args.files, clients)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
